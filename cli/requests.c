#include "cli/requests.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/client.h"
#include "common/util.h"

const char *
opt_val(const struct cli_args *a, const struct cli_opt *opts, size_t nopts,
        const char *name)
{
    int i = cli_opt_index(opts, nopts, name);

    return i >= 0 && a->set[i] ? a->val[i] : NULL;
}

bool
opt_set(const struct cli_args *a, const struct cli_opt *opts, size_t nopts,
        const char *name)
{
    int i = cli_opt_index(opts, nopts, name);

    return i >= 0 && a->set[i];
}

/* Collects repeated K=V options into an object. */
static int
kv_object(const struct cli_args *a, const struct cli_opt *opts, size_t n,
          const char *name, json_t **out, char *err, size_t errlen)
{
    int i = cli_opt_index(opts, n, name), k;
    json_t *o = json_object();

    for (k = 0; i >= 0 && k < a->nmulti[i]; k++) {
        char key[256];
        const char *v;

        if (cli_split_kv(a->multi[i][k], key, sizeof(key), &v) < 0) {
            snprintf(err, errlen, "%s wants KEY=VALUE, got '%s'", name,
                     a->multi[i][k]);
            json_decref(o);
            return EXIT_USAGE;
        }
        json_object_set_new(o, key, json_string(v));
    }
    *out = o;
    return EXIT_OK;
}

static int
uint_opt(const struct cli_args *a, const struct cli_opt *opts, size_t n,
         const char *name, unsigned long long max, json_t *body,
         const char *field, char *err, size_t errlen)
{
    const char *v = opt_val(a, opts, n, name);
    unsigned long long x;

    if (v == NULL)
        return EXIT_OK;
    if (cli_parse_uint(v, max, &x) < 0 || x == 0) {
        snprintf(err, errlen, "%s wants a whole number from 1 to %llu, got "
                 "'%s'", name, max, v);
        return EXIT_USAGE;
    }
    json_object_set_new(body, field, json_integer((json_int_t)x));
    return EXIT_OK;
}

const struct cli_opt create_opts[] = {
    {"--cpus", NULL, true, false},
    {"--memory", NULL, true, false},
    {"--disk", NULL, true, false},
    {"--env", "-e", true, true},
    {"--label", "-l", true, true},
    {"--egress", NULL, true, false},
    {"--no-wait", NULL, false, false},
    {"--wait-timeout", NULL, true, false},
};
const size_t create_nopts = PD_ARRAY_SIZE(create_opts);

int
req_create(const struct cli_args *a, json_t **body, char **path, char *err,
           size_t errlen)
{
    const struct cli_opt *o = create_opts;
    size_t n = create_nopts;
    const char *egress = opt_val(a, o, n, "--egress");
    const char *wait_to = opt_val(a, o, n, "--wait-timeout");
    uint64_t wait_ms = 0;
    json_t *b, *env = NULL, *labels = NULL;

    if (a->npos != 1 || a->dashdash) {
        snprintf(err, errlen, "usage: paddock sandbox create ID [--cpus N] "
                 "[--memory MB] [--disk MB] [--env K=V] [--label K=V] "
                 "[--egress none|all] [--no-wait | --wait-timeout DUR]");
        return EXIT_USAGE;
    }
    if (wait_to != NULL &&
        (pd_parse_duration_ms(wait_to, &wait_ms) < 0 || wait_ms == 0 ||
         wait_ms > CREATE_WAIT_MAX_MS || opt_set(a, o, n, "--no-wait"))) {
        snprintf(err, errlen, opt_set(a, o, n, "--no-wait")
                 ? "--wait-timeout and --no-wait exclude each other"
                 : "--wait-timeout wants a duration from 1ms to 10m, got "
                   "'%s'", wait_to);
        return EXIT_USAGE;
    }
    if (!pd_id_valid(a->pos[0])) {
        snprintf(err, errlen, "bad sandbox id '%s': use 1 to 63 of a-z, "
                 "0-9 and '-', starting with a letter or digit", a->pos[0]);
        return EXIT_USAGE;
    }
    if (egress != NULL && strcmp(egress, "none") != 0 &&
        strcmp(egress, "all") != 0) {
        snprintf(err, errlen, "--egress is none or all, not '%s'", egress);
        return EXIT_USAGE;
    }
    b = json_pack("{s:s}", "id", a->pos[0]);
    if (uint_opt(a, o, n, "--cpus", 1024, b, "cpus", err, errlen) ||
        uint_opt(a, o, n, "--memory", 1u << 24, b, "memory_mb", err,
                 errlen) ||
        uint_opt(a, o, n, "--disk", 1u << 30, b, "disk_mb", err, errlen) ||
        kv_object(a, o, n, "--env", &env, err, errlen) ||
        kv_object(a, o, n, "--label", &labels, err, errlen)) {
        json_decref(env);
        json_decref(b);
        return EXIT_USAGE;
    }
    if (json_object_size(env) > 0)
        json_object_set(b, "env", env);
    if (json_object_size(labels) > 0)
        json_object_set(b, "labels", labels);
    json_decref(env);
    json_decref(labels);
    if (egress != NULL)
        json_object_set_new(b, "egress", json_string(egress));
    *body = b;
    if (opt_set(a, o, n, "--no-wait"))
        *path = strdup("/v1/sandboxes");
    else if (wait_ms == 0)
        *path = strdup("/v1/sandboxes?wait=true");
    else if (asprintf(path, "/v1/sandboxes?wait=true&wait_ms=%llu",
                      (unsigned long long)wait_ms) < 0)
        *path = NULL;
    return EXIT_OK;
}

const struct cli_opt list_opts[] = {
    {"--label", "-l", true, true},
    {"--state", NULL, true, false},
};
const size_t list_nopts = PD_ARRAY_SIZE(list_opts);

int
req_list(const struct cli_args *a, char **path, char *err, size_t errlen)
{
    int li = cli_opt_index(list_opts, list_nopts, "--label"), k;
    const char *state = opt_val(a, list_opts, list_nopts, "--state");
    char *p = strdup("/v1/sandboxes");
    char sep = '?';

    if (a->npos != 0) {
        snprintf(err, errlen, "usage: paddock sandbox list [--label K=V] "
                 "[--state STATE]");
        free(p);
        return EXIT_USAGE;
    }
    for (k = 0; k < a->nmulti[li]; k++) {
        char key[256], *q, *enc;
        const char *v;

        if (cli_split_kv(a->multi[li][k], key, sizeof(key), &v) < 0) {
            snprintf(err, errlen, "--label wants KEY=VALUE, got '%s'",
                     a->multi[li][k]);
            free(p);
            return EXIT_USAGE;
        }
        enc = cli_path("%s", a->multi[li][k]);
        if (asprintf(&q, "%s%clabel=%s", p, sep, enc) < 0)
            q = NULL;
        free(enc);
        free(p);
        p = q;
        sep = '&';
    }
    if (state != NULL) {
        char *enc = cli_path("%s", state), *q;

        if (asprintf(&q, "%s%cstate=%s", p, sep, enc) < 0)
            q = NULL;
        free(enc);
        free(p);
        p = q;
    }
    *path = p;
    return p != NULL ? EXIT_OK : EXIT_LOCAL;
}

const struct cli_opt exec_opts[] = {
    {"--cwd", "-w", true, false},
    {"--env", "-e", true, true},
    {"--timeout", "-t", true, false},
    {"--id", NULL, true, false},
    {"--stdin", "-i", false, false},
};
const size_t exec_nopts = PD_ARRAY_SIZE(exec_opts);

int
req_exec(const struct cli_args *a, bool shell, bool start, json_t **body,
         char *err, size_t errlen)
{
    const struct cli_opt *o = exec_opts;
    size_t n = exec_nopts;
    const char *cwd = opt_val(a, o, n, "--cwd");
    const char *timeout = opt_val(a, o, n, "--timeout");
    const char *id = opt_val(a, o, n, "--id");
    json_t *b = json_object(), *env;
    int i;

    if (shell && (a->npos != 2 || a->dashdash)) {
        snprintf(err, errlen, "usage: paddock sh ID 'shell command'");
        goto usage;
    }
    if (!shell && (a->npos != 1 || !a->dashdash || a->nrest == 0)) {
        snprintf(err, errlen, "usage: paddock %s ID [options] -- ARGV...",
                 start ? "start" : "exec");
        goto usage;
    }
    if (!pd_id_valid(a->pos[0])) {
        snprintf(err, errlen, "bad sandbox id '%s'", a->pos[0]);
        goto usage;
    }
    if (id != NULL && (!start || !pd_id_valid(id))) {
        snprintf(err, errlen, start ? "bad process id '%s'"
                                    : "--id is only for start", id);
        goto usage;
    }
    if (start && timeout != NULL) {
        snprintf(err, errlen, "--timeout is not for start");
        goto usage;
    }
    if (shell) {
        json_object_set_new(b, "command", json_string(a->pos[1]));
    } else {
        json_t *argv = json_array();

        for (i = 0; i < a->nrest; i++)
            json_array_append_new(argv, json_string(a->rest[i]));
        json_object_set_new(b, "argv", argv);
    }
    if (cwd != NULL)
        json_object_set_new(b, "cwd", json_string(cwd));
    if (kv_object(a, o, n, "--env", &env, err, errlen) != EXIT_OK)
        goto usage;
    if (json_object_size(env) > 0)
        json_object_set(b, "env", env);
    json_decref(env);
    if (timeout != NULL) {
        uint64_t ms;

        if (pd_parse_duration_ms(timeout, &ms) < 0 || ms == 0) {
            snprintf(err, errlen, "bad --timeout '%s' (e.g. 30s, 1500ms, "
                     "5m)", timeout);
            goto usage;
        }
        json_object_set_new(b, "timeout_ms", json_integer((json_int_t)ms));
    }
    if (id != NULL)
        json_object_set_new(b, "id", json_string(id));
    *body = b;
    return EXIT_OK;
usage:
    json_decref(b);
    return EXIT_USAGE;
}

const struct cli_opt token_opts[] = {
    {"--tenant", NULL, true, false},
    {"--role", NULL, true, false},
    {"--ttl", NULL, true, false},
};
const size_t token_nopts = PD_ARRAY_SIZE(token_opts);

int
req_token(const struct cli_args *a, json_t **body, char *err, size_t errlen)
{
    const char *tenant = opt_val(a, token_opts, token_nopts, "--tenant");
    const char *role = opt_val(a, token_opts, token_nopts, "--role");
    const char *ttl = opt_val(a, token_opts, token_nopts, "--ttl");
    uint64_t ms = 0;

    if (a->npos != 0 || tenant == NULL || tenant[0] == '\0') {
        snprintf(err, errlen, "usage: paddock token create --tenant T "
                 "[--role admin|tenant] [--ttl 1h]");
        return EXIT_USAGE;
    }
    if (role != NULL && strcmp(role, "admin") != 0 &&
        strcmp(role, "tenant") != 0 && strcmp(role, "node") != 0) {
        snprintf(err, errlen, "--role is admin, tenant or node, not '%s'",
                 role);
        return EXIT_USAGE;
    }
    if (ttl != NULL && (pd_parse_duration_ms(ttl, &ms) < 0 || ms < 1000)) {
        snprintf(err, errlen, "bad --ttl '%s' (e.g. 30m, 1h, 7d)", ttl);
        return EXIT_USAGE;
    }
    *body = json_pack("{s:s,s:s}", "tenant", tenant, "role",
                      role != NULL ? role : "tenant");
    if (ttl != NULL)
        json_object_set_new(*body, "ttl_s",
                            json_integer((json_int_t)(ms / 1000)));
    return EXIT_OK;
}

const struct cli_opt member_opts[] = {
    {"--api", NULL, true, false},
    {"--preview", NULL, true, false},
};
const size_t member_nopts = PD_ARRAY_SIZE(member_opts);

int
req_member(const struct cli_args *a, json_t **body, char *err,
           size_t errlen)
{
    const char *api = opt_val(a, member_opts, member_nopts, "--api");
    const char *preview = opt_val(a, member_opts, member_nopts,
                                  "--preview");

    if (a->npos != 2) {
        snprintf(err, errlen, "usage: paddock cluster add-member ID "
                 "RAFT_ADDR [--api ADDR] [--preview ADDR]");
        return EXIT_USAGE;
    }
    if (strchr(a->pos[1], ':') == NULL) {
        snprintf(err, errlen, "bad address '%s' (want host:port)",
                 a->pos[1]);
        return EXIT_USAGE;
    }
    /* Raft ids are numbers; a numeric ID goes as one. */
    if (strspn(a->pos[0], "0123456789") == strlen(a->pos[0]) &&
        strlen(a->pos[0]) < 19)
        *body = json_pack("{s:I,s:s}", "id",
                          (json_int_t)strtoll(a->pos[0], NULL, 10),
                          "raft_addr", a->pos[1]);
    else
        *body = json_pack("{s:s,s:s}", "id", a->pos[0], "raft_addr",
                          a->pos[1]);
    if (api != NULL)
        json_object_set_new(*body, "api_addr", json_string(api));
    if (preview != NULL)
        json_object_set_new(*body, "preview_addr", json_string(preview));
    return EXIT_OK;
}
