#include "cli/args.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const struct {
    const char *name;
    bool has_arg;
} globals[] = {
    {"--addr", true},  {"--token", true}, {"--cacert", true},
    {"--json", false}, {"--help", false}, {"-h", false},
    {"--version", false}, {"--quiet", false}, {"-q", false},
};

static void
set_global(struct cli_globals *g, const char *name, const char *v)
{
    if (strcmp(name, "--addr") == 0)
        g->addr = v;
    else if (strcmp(name, "--token") == 0)
        g->token = v;
    else if (strcmp(name, "--cacert") == 0)
        g->cacert = v;
    else if (strcmp(name, "--json") == 0)
        g->json = true;
    else if (strcmp(name, "--version") == 0)
        g->version = true;
    else if (strcmp(name, "--quiet") == 0 || strcmp(name, "-q") == 0)
        g->quiet = true;
    else
        g->help = true;
}

int
cli_globals_parse(int *argc, char **argv, struct cli_globals *g,
                  char *err, size_t errlen)
{
    int i, o = 0, n = *argc;
    bool rest = false;

    for (i = 0; i < n; i++) {
        const char *a = argv[i];
        const char *eq = strchr(a, '=');
        size_t nlen = eq != NULL ? (size_t)(eq - a) : strlen(a);
        size_t k;
        bool found = false;

        if (rest || a[0] != '-') {
            argv[o++] = argv[i];
            continue;
        }
        if (strcmp(a, "--") == 0) {
            rest = true;
            argv[o++] = argv[i];
            continue;
        }
        for (k = 0; k < sizeof(globals) / sizeof(globals[0]); k++) {
            if (strlen(globals[k].name) != nlen ||
                strncmp(globals[k].name, a, nlen) != 0)
                continue;
            found = true;
            if (!globals[k].has_arg) {
                if (eq != NULL) {
                    snprintf(err, errlen, "%s takes no value",
                             globals[k].name);
                    return -EINVAL;
                }
                set_global(g, globals[k].name, NULL);
            } else if (eq != NULL) {
                set_global(g, globals[k].name, eq + 1);
            } else if (i + 1 < n) {
                set_global(g, globals[k].name, argv[++i]);
            } else {
                snprintf(err, errlen, "%s needs a value", globals[k].name);
                return -EINVAL;
            }
            break;
        }
        if (!found)
            argv[o++] = argv[i];
    }
    argv[o] = NULL;
    *argc = o;
    return 0;
}

int
cli_opt_index(const struct cli_opt *opts, size_t nopts, const char *name)
{
    size_t i;

    for (i = 0; i < nopts; i++)
        if (strcmp(opts[i].name, name) == 0)
            return (int)i;
    return -1;
}

static int
find_opt(const struct cli_opt *opts, size_t nopts, const char *a,
         size_t nlen)
{
    size_t i;

    for (i = 0; i < nopts; i++) {
        if ((strlen(opts[i].name) == nlen &&
             strncmp(opts[i].name, a, nlen) == 0) ||
            (opts[i].alias != NULL && strlen(opts[i].alias) == nlen &&
             strncmp(opts[i].alias, a, nlen) == 0))
            return (int)i;
    }
    return -1;
}

/*
 * The option a mistyped one most likely meant: one that the text starts
 * with or that starts with the text, at least "--" and 3 letters long
 * ("--cpu" for "--cpus", "--memory-mb" for "--memory"). NULL if none.
 */
const char *
cli_opt_suggest(const struct cli_opt *opts, size_t nopts, const char *a,
                size_t nlen)
{
    size_t i;

    if (nlen < 5 || strncmp(a, "--", 2) != 0)
        return NULL;
    for (i = 0; i < nopts; i++) {
        size_t olen = strlen(opts[i].name);
        size_t n = olen < nlen ? olen : nlen;

        if (n >= 5 && strncmp(opts[i].name, a, n) == 0)
            return opts[i].name;
    }
    return NULL;
}

int
cli_args_parse(int argc, char **argv, const struct cli_opt *opts,
               size_t nopts, struct cli_args *a, char *err, size_t errlen)
{
    int i;

    memset(a, 0, sizeof(*a));
    if (nopts > CLI_MAX_OPTS) {
        snprintf(err, errlen, "internal: too many options");
        return -EINVAL;
    }
    for (i = 0; i < argc; i++) {
        char *s = argv[i];
        char *eq, *v = NULL;
        size_t nlen;
        int k;

        if (strcmp(s, "--") == 0) {
            a->dashdash = true;
            a->rest = argv + i + 1;
            a->nrest = argc - i - 1;
            break;
        }
        /* "-" alone is a positional (stdin/stdout), as are numbers. */
        if (s[0] != '-' || s[1] == '\0' || (s[1] >= '0' && s[1] <= '9')) {
            if (a->npos >= CLI_MAX_POS) {
                snprintf(err, errlen, "too many arguments");
                return -EINVAL;
            }
            a->pos[a->npos++] = s;
            continue;
        }
        eq = strchr(s, '=');
        nlen = eq != NULL ? (size_t)(eq - s) : strlen(s);
        k = find_opt(opts, nopts, s, nlen);
        if (k < 0) {
            const char *hint = cli_opt_suggest(opts, nopts, s, nlen);

            snprintf(err, errlen, "unknown option '%.*s'%s%s%s", (int)nlen,
                     s, hint != NULL ? " (did you mean " : "",
                     hint != NULL ? hint : "", hint != NULL ? "?)" : "");
            return -EINVAL;
        }
        if (opts[k].has_arg) {
            if (eq != NULL)
                v = eq + 1;
            else if (i + 1 < argc)
                v = argv[++i];
            else {
                snprintf(err, errlen, "%s needs a value", opts[k].name);
                return -EINVAL;
            }
        } else if (eq != NULL) {
            snprintf(err, errlen, "%s takes no value", opts[k].name);
            return -EINVAL;
        }
        if (a->set[k] && !opts[k].multi && opts[k].has_arg) {
            snprintf(err, errlen, "%s given twice", opts[k].name);
            return -EINVAL;
        }
        a->set[k] = true;
        a->val[k] = v;
        if (opts[k].multi) {
            if (a->nmulti[k] >= CLI_MAX_MULTI) {
                snprintf(err, errlen, "%s given too many times",
                         opts[k].name);
                return -EINVAL;
            }
            a->multi[k][a->nmulti[k]++] = v;
        }
    }
    return 0;
}

int
cli_split_kv(const char *s, char *key, size_t keylen, const char **value)
{
    const char *eq = strchr(s, '=');
    size_t n;

    if (eq == NULL || eq == s)
        return -EINVAL;
    n = (size_t)(eq - s);
    if (n >= keylen)
        return -ENAMETOOLONG;
    memcpy(key, s, n);
    key[n] = '\0';
    *value = eq + 1;
    return 0;
}

int
cli_parse_uint(const char *s, unsigned long long max,
               unsigned long long *out)
{
    char *end;
    unsigned long long v;

    if (s == NULL || *s < '0' || *s > '9')
        return -EINVAL;
    errno = 0;
    v = strtoull(s, &end, 10);
    if (*end != '\0')
        return -EINVAL;
    if (errno != 0 || v > max)
        return -ERANGE;
    *out = v;
    return 0;
}
