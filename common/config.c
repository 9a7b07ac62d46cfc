#include "common/config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"

/*
 * Strings set by the loader are tracked so pd_config_free releases them and
 * never a default that points at static storage.
 */
#define MAX_OWNED 256
static void *owned[MAX_OWNED];
static size_t nowned;

static char *
own_strdup(const char *s)
{
    char *p = strdup(s);

    if (p != NULL && nowned < MAX_OWNED)
        owned[nowned++] = p;
    return p;
}

static void
disown(void *p)
{
    for (size_t i = 0; i < nowned; i++) {
        if (owned[i] == p) {
            free(p);
            owned[i] = owned[--nowned];
            return;
        }
    }
}

static const struct pd_config_opt *
find_opt(const struct pd_config_opt *opts, const char *key, size_t keylen)
{
    for (; opts->name != NULL; opts++) {
        if (strlen(opts->name) != keylen)
            continue;
        /* Accept '-' or '_' interchangeably: memory-reserve = memory_reserve */
        size_t i;
        for (i = 0; i < keylen; i++) {
            char a = opts->name[i], b = key[i];

            if (a == '-')
                a = '_';
            if (b == '-')
                b = '_';
            if (a != b)
                break;
        }
        if (i == keylen)
            return opts;
    }
    return NULL;
}

static int
parse_bool(const char *v, bool *out)
{
    if (strcmp(v, "true") == 0 || strcmp(v, "yes") == 0 ||
        strcmp(v, "on") == 0 || strcmp(v, "1") == 0) {
        *out = true;
        return 0;
    }
    if (strcmp(v, "false") == 0 || strcmp(v, "no") == 0 ||
        strcmp(v, "off") == 0 || strcmp(v, "0") == 0) {
        *out = false;
        return 0;
    }
    return -EINVAL;
}

static int
set_opt(const struct pd_config_opt *o, const char *value, char *err,
        size_t errlen)
{
    uint64_t u;
    int rv = 0;

    switch (o->type) {
    case PD_CFG_STRING: {
        char **dst = o->ptr;
        char *s = own_strdup(value);

        if (s == NULL)
            return -ENOMEM;
        disown(*dst);
        *dst = s;
        return 0;
    }
    case PD_CFG_LIST: {
        char **dst = o->ptr;
        size_t n = (*dst != NULL ? strlen(*dst) + 1 : 0) + strlen(value) + 1;
        char *s = malloc(n);

        if (s == NULL)
            return -ENOMEM;
        if (*dst != NULL && **dst != '\0')
            snprintf(s, n, "%s,%s", *dst, value);
        else
            snprintf(s, n, "%s", value);
        disown(*dst);
        if (nowned < MAX_OWNED)
            owned[nowned++] = s;
        *dst = s;
        return 0;
    }
    case PD_CFG_INT: {
        char *end;
        long long v;

        errno = 0;
        v = strtoll(value, &end, 10);
        if (errno != 0 || end == value || *end != '\0') {
            snprintf(err, errlen, "%s: not an integer: \"%s\"", o->name,
                     value);
            return -EINVAL;
        }
        *(int64_t *)o->ptr = v;
        return 0;
    }
    case PD_CFG_UINT:
        rv = pd_parse_u64(value, &u);
        if (rv == 0)
            *(uint64_t *)o->ptr = u;
        else
            snprintf(err, errlen, "%s: not a whole number: \"%s\"", o->name,
                     value);
        return rv;
    case PD_CFG_BOOL:
        rv = parse_bool(value, o->ptr);
        if (rv != 0)
            snprintf(err, errlen, "%s: not true or false: \"%s\"", o->name,
                     value);
        return rv;
    case PD_CFG_DURATION:
        rv = pd_parse_duration_ms(value, &u);
        if (rv == 0)
            *(uint64_t *)o->ptr = u;
        else
            snprintf(err, errlen,
                     "%s: not a duration (like 500ms, 5s, 1h): \"%s\"",
                     o->name, value);
        return rv;
    case PD_CFG_SIZE:
        rv = pd_parse_size(value, &u);
        if (rv == 0)
            *(uint64_t *)o->ptr = u;
        else
            snprintf(err, errlen, "%s: not a size (like 512M, 4G): \"%s\"",
                     o->name, value);
        return rv;
    }
    return -EINVAL;
}

int
pd_config_set(const struct pd_config_opt *opts, const char *key,
              const char *value, char *err, size_t errlen)
{
    const struct pd_config_opt *o = find_opt(opts, key, strlen(key));

    if (o == NULL) {
        snprintf(err, errlen, "%s: unknown option", key);
        return -ENOENT;
    }
    return set_opt(o, value, err, errlen);
}

static char *
trim(char *s)
{
    char *end;

    while (*s == ' ' || *s == '\t')
        s++;
    end = s + strlen(s);
    while (end > s && (end[-1] == ' ' || end[-1] == '\t' ||
                       end[-1] == '\n' || end[-1] == '\r'))
        *--end = '\0';
    return s;
}

int
pd_config_file(const struct pd_config_opt *opts, const char *path, char *err,
               size_t errlen)
{
    char line[4096], msg[512];
    unsigned lineno = 0;
    FILE *f;
    int rv = 0;

    f = fopen(path, "re");
    if (f == NULL) {
        rv = -errno;
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return rv;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        char *key, *value, *eq;

        lineno++;
        if (strchr(line, '\n') == NULL && !feof(f)) {
            snprintf(err, errlen, "%s:%u: line too long", path, lineno);
            rv = -EINVAL;
            break;
        }
        key = trim(line);
        if (*key == '\0' || *key == '#')
            continue;
        eq = strchr(key, '=');
        if (eq == NULL) {
            snprintf(err, errlen, "%s:%u: expected \"key = value\"", path,
                     lineno);
            rv = -EINVAL;
            break;
        }
        *eq = '\0';
        key = trim(key);
        value = trim(eq + 1);
        if (*value == '"') {
            size_t n = strlen(value);

            if (n < 2 || value[n - 1] != '"') {
                snprintf(err, errlen, "%s:%u: %s: unterminated quote", path,
                         lineno, key);
                rv = -EINVAL;
                break;
            }
            value[n - 1] = '\0';
            value++;
        }
        rv = pd_config_set(opts, key, value, msg, sizeof(msg));
        if (rv != 0) {
            snprintf(err, errlen, "%s:%u: %s", path, lineno, msg);
            break;
        }
    }
    fclose(f);
    return rv;
}

void
pd_config_usage(const char *prog, const struct pd_config_opt *opts)
{
    printf("usage: %s [--config FILE] [--check-config] [--KEY VALUE ...]\n\n",
           prog);
    for (; opts->name != NULL; opts++)
        printf("  --%-22s %s\n", opts->name, opts->help ? opts->help : "");
}

int
pd_config_load(const struct pd_config_opt *opts, int argc, char **argv,
               char ***rest, int *nrest, char *err, size_t errlen)
{
    const char *file = NULL;
    bool check = false;
    int npos = 0, rv;

    /* The file first, so flags given anywhere override it. */
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--config") == 0 && i + 1 < argc)
            file = argv[++i];
        else if (strncmp(argv[i], "--config=", 9) == 0)
            file = argv[i] + 9;
    }
    if (file != NULL) {
        rv = pd_config_file(opts, file, err, errlen);
        if (rv != 0)
            return rv;
    }

    for (int i = 1; i < argc; i++) {
        char *arg = argv[i];
        const struct pd_config_opt *o;
        const char *name, *eq, *value = NULL;
        char msg[512];

        if (strcmp(arg, "--config") == 0) {
            i++;
            continue;
        }
        if (strncmp(arg, "--config=", 9) == 0)
            continue;
        if (strcmp(arg, "--check-config") == 0) {
            check = true;
            continue;
        }
        if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            pd_config_usage(argv[0], opts);
            return 1;
        }
        if (strncmp(arg, "--", 2) != 0 || arg[2] == '\0') {
            if (rest == NULL) {
                snprintf(err, errlen, "unexpected argument \"%s\"", arg);
                return -EINVAL;
            }
            argv[1 + npos++] = arg;
            continue;
        }
        name = arg + 2;
        eq = strchr(name, '=');
        o = find_opt(opts, name, eq ? (size_t)(eq - name) : strlen(name));
        if (o == NULL) {
            snprintf(err, errlen, "--%.*s: unknown flag (try --help)",
                     (int)(eq ? (size_t)(eq - name) : strlen(name)), name);
            return -EINVAL;
        }
        if (eq != NULL)
            value = eq + 1;
        else if (o->type == PD_CFG_BOOL &&
                 (i + 1 >= argc || strncmp(argv[i + 1], "--", 2) == 0))
            value = "true";
        else if (i + 1 < argc)
            value = argv[++i];
        else {
            snprintf(err, errlen, "--%s: needs a value", o->name);
            return -EINVAL;
        }
        rv = set_opt(o, value, msg, sizeof(msg));
        if (rv != 0) {
            snprintf(err, errlen, "flag --%s", msg);
            return rv;
        }
    }
    if (rest != NULL) {
        *rest = argv + 1;
        *nrest = npos;
    }
    return check ? 1 : 0;
}

void
pd_config_free(const struct pd_config_opt *opts)
{
    for (; opts->name != NULL; opts++) {
        if (opts->type != PD_CFG_STRING && opts->type != PD_CFG_LIST)
            continue;
        char **p = opts->ptr;

        for (size_t i = 0; i < nowned; i++) {
            if (owned[i] == *p) {
                free(*p);
                owned[i] = owned[--nowned];
                *p = NULL;
                break;
            }
        }
    }
}
