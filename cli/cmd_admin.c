#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "cli/requests.h"
#include "common/util.h"

/* Runs a call whose only output is the JSON answer (in --json mode). */
static int
simple(struct cli *c, const char *method, char *path, json_t *body,
       const char *done)
{
    json_t *resp;
    int rv = cli_json(c, method, path, body, &resp);

    if (rv == EXIT_OK && c->json)
        print_json(resp != NULL ? resp : json_null());
    else if (rv == EXIT_OK && done != NULL && !c->quiet)
        printf("%s\n", done);
    json_decref(resp);
    json_decref(body);
    free(path);
    return rv;
}

static int
port_num(const char *s, unsigned *out)
{
    unsigned long long v;

    if (cli_parse_uint(s, 65535, &v) < 0 || v == 0)
        return usage_error("bad port '%s' (1 to 65535)", s);
    *out = (unsigned)v;
    return EXIT_OK;
}

int
cmd_port(struct cli *c, int argc, char **argv)
{
    static const char *const head[] = {"PORT", "AGE", "URL"};
    const char *sub = argc > 0 ? argv[0] : "";
    json_t *resp, *items, *p;
    struct table t;
    unsigned port = 0;
    char *path, done[128];
    size_t i;
    int rv;

    if (argc >= 2 && !pd_id_valid(argv[1]))
        return usage_error("bad sandbox id '%s'", argv[1]);
    if (strcmp(sub, "expose") == 0 && argc == 3) {
        char url[1024];

        if (port_num(argv[2], &port) != EXIT_OK)
            return EXIT_USAGE;
        json_t *body = json_pack("{s:i}", "port", (int)port);

        path = cli_path("/v1/sandboxes/%s/ports", argv[1]);
        rv = cli_json(c, "POST", path, body, &resp);
        json_decref(body);
        free(path);
        if (rv == EXIT_OK && c->json)
            print_json(resp);
        else if (rv == EXIT_OK)
            printf("%s\n", json_text(resp, "url", url, sizeof(url)));
        /* Only the token's hash is kept: this is the one time it shows. */
        if (rv == EXIT_OK && !c->json && !c->quiet && c->tty)
            fprintf(stderr, "keep this URL: port ls shows it without its "
                    "token\n");
        json_decref(resp);
        return rv;
    }
    if (strcmp(sub, "unexpose") == 0 && argc == 3) {
        if (port_num(argv[2], &port) != EXIT_OK)
            return EXIT_USAGE;
        snprintf(done, sizeof(done), "port %u of %s unexposed", port,
                 argv[1]);
        return simple(c, "DELETE",
                      cli_path("/v1/sandboxes/%s/ports/%d", argv[1],
                               (int)port),
                      NULL, done);
    }
    if (strcmp(sub, "ls") == 0 && argc == 2) {
        path = cli_path("/v1/sandboxes/%s/ports", argv[1]);
        rv = cli_json(c, "GET", path, NULL, &resp);
        free(path);
        if (rv != EXIT_OK)
            return rv;
        if (c->json) {
            print_json(resp);
        } else {
            items = list_items(resp, "ports");
            table_init(&t, 3, head);
            json_array_foreach(items, i, p) {
                char a[16], age[16], b[1024];
                const char *cells[3] = {a, age, b};

                json_text(p, "port", a, sizeof(a));
                fmt_age(json_object_get(p, "created_at"), pd_wall_ms(), age,
                        sizeof(age));
                /* The token is only shown once, by expose: the list has
                 * "{token}" in its place. */
                json_text(p, "url", b, sizeof(b));
                table_add(&t, cells);
            }
            table_print(&t, stdout);
            table_free(&t);
        }
        json_decref(resp);
        return EXIT_OK;
    }
    return usage_error("usage: paddock port expose ID PORT | unexpose ID "
                       "PORT | ls ID");
}

static int
token_ls(struct cli *c, const char *tenant)
{
    static const char *const head[] = {"JTI", "TENANT", "ROLE", "EXPIRES",
                                       "REVOKED"};
    json_t *resp, *items, *tk;
    struct table t;
    char *path = tenant != NULL ? cli_path("/v1/tokens?tenant=%s", tenant)
                                : strdup("/v1/tokens");
    size_t i;
    uint64_t now;
    int rv = cli_json(c, "GET", path, NULL, &resp);

    free(path);
    if (rv != EXIT_OK)
        return rv;
    if (c->json) {
        print_json(resp);
        json_decref(resp);
        return EXIT_OK;
    }
    items = list_items(resp, "tokens");
    now = pd_wall_ms();
    table_init(&t, 5, head);
    json_array_foreach(items, i, tk) {
        char jti[128], ten[128], role[16], exp[64], rev[16];
        const char *cells[5] = {jti, ten, role, exp, rev};

        json_text(tk, "jti", jti, sizeof(jti));
        json_text(tk, "tenant", ten, sizeof(ten));
        json_text(tk, "role", role, sizeof(role));
        fmt_until(json_object_get(tk, "expires_at"), now, exp, sizeof(exp));
        snprintf(rev, sizeof(rev), "%s",
                 json_is_true(json_object_get(tk, "revoked")) ? "yes" : "no");
        table_add(&t, cells);
    }
    table_print(&t, stdout);
    table_free(&t);
    json_decref(resp);
    return EXIT_OK;
}

int
cmd_token(struct cli *c, int argc, char **argv)
{
    const char *sub = argc > 0 ? argv[0] : "";
    struct cli_args a;
    char err[512], tok[4096], done[300];
    json_t *body, *resp;
    int rv;

    if (strcmp(sub, "create") == 0) {
        if (cli_args_parse(argc - 1, argv + 1, token_opts, token_nopts, &a,
                           err, sizeof(err)) < 0 ||
            req_token(&a, &body, err, sizeof(err)) != EXIT_OK)
            return usage_error("%s", err);
        rv = cli_json(c, "POST", "/v1/tokens", body, &resp);
        json_decref(body);
        if (rv == EXIT_OK && c->json)
            print_json(resp);
        else if (rv == EXIT_OK)
            /* The token alone: PADDOCK_TOKEN=$(paddock token create ...) */
            printf("%s\n", json_text(resp, "token", tok, sizeof(tok)));
        json_decref(resp);
        return rv;
    }
    if (strcmp(sub, "revoke") == 0 && argc == 2) {
        snprintf(done, sizeof(done), "token %s revoked", argv[1]);
        return simple(c, "DELETE", cli_path("/v1/tokens/%s", argv[1]), NULL,
                      done);
    }
    if (strcmp(sub, "ls") == 0 || strcmp(sub, "list") == 0) {
        if (cli_args_parse(argc - 1, argv + 1, token_opts, 1, &a, err,
                           sizeof(err)) < 0 || a.npos != 0)
            return usage_error("usage: paddock token ls [--tenant T]");
        return token_ls(c, a.set[0] ? a.val[0] : NULL);
    }
    return usage_error("usage: paddock token create --tenant T [--role "
                       "admin|tenant] [--ttl 1h] | revoke JTI | ls "
                       "[--tenant T]");
}

/* "used/total" of one resource of a node. */
static void
alloc_text(const json_t *n, const char *res, bool mb, char *buf, size_t len)
{
    char used_p1[64], used_p2[64], tot_p1[64], tot_p2[64], a[16], b[16];
    const char *const used[] = {used_p1, used_p2, NULL};
    const char *const tot[] = {tot_p1, tot_p2, NULL};
    double u = 0, t = 0;
    bool hu, ht;

    snprintf(used_p1, sizeof(used_p1), "allocated.%s", res);
    snprintf(used_p2, sizeof(used_p2), "alloc_%s", res);
    snprintf(tot_p1, sizeof(tot_p1), "capacity.%s", res);
    snprintf(tot_p2, sizeof(tot_p2), "%s", res);
    hu = json_num_at(n, &u, used);
    ht = json_num_at(n, &t, tot);
    if (mb) {
        fmt_mb((uint64_t)u, a, sizeof(a));
        fmt_mb((uint64_t)t, b, sizeof(b));
    } else {
        snprintf(a, sizeof(a), "%g", u);
        snprintf(b, sizeof(b), "%g", t);
    }
    if (!ht)
        snprintf(buf, len, "-");
    else if (!hu)
        snprintf(buf, len, "%s", b);
    else
        snprintf(buf, len, "%s/%s", a, b);
}

int
cmd_node(struct cli *c, int argc, char **argv)
{
    static const char *const head[] = {"ID", "STATE", "CPUS", "MEMORY",
                                       "DISK", "SANDBOXES", "ADDRESS"};
    const char *sub = argc > 0 ? argv[0] : "";
    json_t *resp, *items, *n;
    struct table t;
    char done[160];
    size_t i;
    int rv;

    if (strcmp(sub, "drain") == 0 && argc == 2) {
        snprintf(done, sizeof(done), "node %s is draining", argv[1]);
        return simple(c, "POST", cli_path("/v1/nodes/%s/drain", argv[1]),
                      NULL, done);
    }
    if ((strcmp(sub, "ls") != 0 && strcmp(sub, "list") != 0) || argc != 1)
        return usage_error("usage: paddock node ls | drain NODE");
    rv = cli_json(c, "GET", "/v1/nodes", NULL, &resp);
    if (rv != EXIT_OK)
        return rv;
    if (c->json) {
        print_json(resp);
        json_decref(resp);
        return EXIT_OK;
    }
    items = list_items(resp, "nodes");
    table_init(&t, 7, head);
    json_array_foreach(items, i, n) {
        char id[80], state[32], cpu[32], mem[32], disk[32], sb[16],
            addr[128];
        const char *cells[7] = {id, state, cpu, mem, disk, sb, addr};

        json_text(n, "id", id, sizeof(id));
        json_text(n, "state", state, sizeof(state));
        if (json_is_true(json_object_get(n, "draining")))
            snprintf(state + strlen(state), sizeof(state) - strlen(state),
                     ",draining");
        alloc_text(n, "cpus", false, cpu, sizeof(cpu));
        alloc_text(n, "memory_mb", true, mem, sizeof(mem));
        alloc_text(n, "disk_mb", true, disk, sizeof(disk));
        json_text(n, "sandboxes", sb, sizeof(sb));
        json_text(n, "address", addr, sizeof(addr));
        table_add(&t, cells);
    }
    table_print(&t, stdout);
    table_free(&t);
    json_decref(resp);
    return EXIT_OK;
}

static int
cluster_status(struct cli *c)
{
    static const char *const head[] = {"ID", "ROLE", "RAFT", "API",
                                       "PREVIEW"};
    json_t *resp, *items, *m;
    struct table t;
    char leader[80], term[32], commit[32], self[32], state[32];
    size_t i;
    int rv = cli_json(c, "GET", "/v1/cluster", NULL, &resp);

    if (rv != EXIT_OK)
        return rv;
    if (c->json) {
        print_json(resp);
        json_decref(resp);
        return EXIT_OK;
    }
    printf("leader: %s  term: %s  commit index: %s",
           json_text(resp, "leader", leader, sizeof(leader)),
           json_text(resp, "term", term, sizeof(term)),
           json_text(resp, "commit_index", commit, sizeof(commit)));
    /* Each member answers from its own view: say whose view this is. */
    if (json_object_get(resp, "self") != NULL)
        printf("  (as seen by %s, %s)",
               json_text(resp, "self", self, sizeof(self)),
               json_text(resp, "state", state, sizeof(state)));
    putchar('\n');
    items = list_items(resp, "members");
    table_init(&t, 5, head);
    json_array_foreach(items, i, m) {
        char id[80], role[32], raft[128], api[128], pv[128];
        const char *cells[5] = {id, role, raft, api, pv};

        json_text(m, "id", id, sizeof(id));
        json_text(m, "role", role, sizeof(role));
        if (strcmp(id, leader) == 0 ||
            json_is_true(json_object_get(m, "leader")))
            snprintf(role, sizeof(role), "leader");
        json_text(m, "raft_addr", raft, sizeof(raft));
        json_text(m, "api_addr", api, sizeof(api));
        json_text(m, "preview_addr", pv, sizeof(pv));
        table_add(&t, cells);
    }
    table_print(&t, stdout);
    table_free(&t);
    json_decref(resp);
    return EXIT_OK;
}

int
cmd_cluster(struct cli *c, int argc, char **argv)
{
    const char *sub = argc > 0 ? argv[0] : "";
    struct cli_args a;
    char err[512], done[200];
    json_t *body;

    if (strcmp(sub, "status") == 0 && argc == 1)
        return cluster_status(c);
    if (strcmp(sub, "add-member") == 0) {
        if (cli_args_parse(argc - 1, argv + 1, member_opts, member_nopts,
                           &a, err, sizeof(err)) < 0 ||
            req_member(&a, &body, err, sizeof(err)) != EXIT_OK)
            return usage_error("%s", err);
        snprintf(done, sizeof(done), "member %s added", a.pos[0]);
        return simple(c, "POST", strdup("/v1/cluster/members"), body, done);
    }
    if (strcmp(sub, "remove-member") == 0 && argc == 2) {
        snprintf(done, sizeof(done), "member %s removed", argv[1]);
        return simple(c, "DELETE",
                      cli_path("/v1/cluster/members/%s", argv[1]), NULL,
                      done);
    }
    return usage_error("usage: paddock cluster status | add-member ID "
                       "RAFT_ADDR [--api ADDR] [--preview ADDR] | "
                       "remove-member ID");
}

int
cmd_health(struct cli *c, int argc, char **argv)
{
    (void)argv;
    if (argc != 0)
        return usage_error("usage: paddock health");
    return simple(c, "GET", strdup("/v1/health"), NULL, "ok");
}
