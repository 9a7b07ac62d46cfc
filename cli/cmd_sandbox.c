#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "cli/requests.h"
#include "common/util.h"

void
print_json(const json_t *j)
{
    json_dumpf(j, stdout, JSON_INDENT(2) | JSON_ENCODE_ANY);
    fputc('\n', stdout);
}

int
usage_error(const char *fmt, ...)
{
    va_list ap;
    char buf[1024];

    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    cli_errorf("%s", buf);
    return EXIT_USAGE;
}

bool
json_num_at(const json_t *o, double *out, const char *const *paths)
{
    for (; *paths != NULL; paths++) {
        const json_t *v = o;
        char buf[128], *save = NULL, *part;

        pd_strlcpy(buf, *paths, sizeof(buf));
        for (part = strtok_r(buf, ".", &save); part != NULL && v != NULL;
             part = strtok_r(NULL, ".", &save))
            v = json_object_get(v, part);
        if (json_is_number(v)) {
            *out = json_number_value(v);
            return true;
        }
    }
    return false;
}

const char *
json_text(const json_t *o, const char *key, char *buf, size_t len)
{
    fmt_scalar(json_object_get(o, key), buf, len);
    return buf;
}

static void
sandbox_row(struct table *t, const json_t *s, uint64_t now)
{
    char id[80], state[32], node[80], cpus[16], mem[16], disk[16], age[16];
    double v;
    const char *const pm[] = {"memory_mb", "resources.memory_mb", NULL};
    const char *const pd[] = {"disk_mb", "resources.disk_mb", NULL};
    const char *const pc[] = {"cpus", "resources.cpus", NULL};
    const char *cells[7];

    json_text(s, "id", id, sizeof(id));
    json_text(s, "state", state, sizeof(state));
    json_text(s, "node", node, sizeof(node));
    snprintf(cpus, sizeof(cpus), "-");
    if (json_num_at(s, &v, pc))
        snprintf(cpus, sizeof(cpus), "%g", v);
    snprintf(mem, sizeof(mem), "-");
    if (json_num_at(s, &v, pm))
        fmt_mb((uint64_t)v, mem, sizeof(mem));
    snprintf(disk, sizeof(disk), "-");
    if (json_num_at(s, &v, pd))
        fmt_mb((uint64_t)v, disk, sizeof(disk));
    fmt_age(json_object_get(s, "created_at"), now, age, sizeof(age));
    cells[0] = id;
    cells[1] = state;
    cells[2] = node;
    cells[3] = cpus;
    cells[4] = mem;
    cells[5] = disk;
    cells[6] = age;
    table_add(t, cells);
}

/* One line for a sandbox that was just created: where it runs, and how
 * long the create took when it waited for the boot. */
static void
sandbox_summary(const json_t *s, bool waited, uint64_t elapsed_ms)
{
    char id[80], state[32], node[80], reason[256];

    json_text(s, "id", id, sizeof(id));
    json_text(s, "state", state, sizeof(state));
    json_text(s, "node", node, sizeof(node));
    json_text(s, "reason", reason, sizeof(reason));
    printf("sandbox %s: %s", id, state);
    if (strcmp(node, "-") != 0)
        printf(" on node %s", node);
    if (waited)
        printf(" after %.1fs", (double)elapsed_ms / 1000);
    if (strcmp(reason, "-") != 0)
        printf(" (%s)", reason);
    putchar('\n');
}

/*
 * The exit code of a create from the sandbox it answered: a failed one is
 * a server-side failure; one still pending or starting after a wait means
 * the wait ran out first (the scheduler answers with the row as it is).
 */
int
sandbox_create_exit(const json_t *s, bool waited)
{
    const char *st = json_string_value(json_object_get(s, "state"));

    if (st == NULL)
        return EXIT_OK;
    if (strcmp(st, "failed") == 0)
        return EXIT_SERVER;
    if (waited && (strcmp(st, "pending") == 0 ||
                   strcmp(st, "starting") == 0))
        return EXIT_TIMEOUT;
    return EXIT_OK;
}

/* "sb-" and 8 random hex digits: a valid sandbox id. */
static int
random_id(char *buf, size_t len)
{
    unsigned char r[4];

    if (getrandom(r, sizeof(r), 0) != (ssize_t)sizeof(r))
        return -errno;
    snprintf(buf, len, "sb-%02x%02x%02x%02x", r[0], r[1], r[2], r[3]);
    return 0;
}

static int
create(struct cli *c, int argc, char **argv)
{
    struct cli_args a;
    char err[512], label[128], gen[16];
    json_t *body = NULL, *resp = NULL;
    char *path = NULL;
    struct cli_call k = {.method = "POST"};
    json_error_t je;
    const char *wait_to;
    uint64_t wait_ms = CREATE_WAIT_DEFAULT_MS, started;
    bool waited;
    int rv;

    if (cli_args_parse(argc, argv, create_opts, create_nopts, &a, err,
                       sizeof(err)) < 0)
        return usage_error("%s", err);
    /* No id: make one up, as E2B and Fly do; the summary names it. */
    if (a.npos == 0 && !a.dashdash) {
        if (random_id(gen, sizeof(gen)) < 0)
            return usage_error("no id given and none could be made up: %s",
                               strerror(errno));
        a.pos[a.npos++] = gen;
    }
    if (req_create(&a, &body, &path, err, sizeof(err)) != EXIT_OK)
        return usage_error("%s", err);
    waited = !opt_set(&a, create_opts, create_nopts, "--no-wait");
    wait_to = opt_val(&a, create_opts, create_nopts, "--wait-timeout");
    if (wait_to != NULL)
        pd_parse_duration_ms(wait_to, &wait_ms); /* checked by req_create */
    snprintf(label, sizeof(label), "creating sandbox %s", a.pos[0]);
    k.path = path;
    k.json = body;
    k.progress = label;
    k.wait_progress = true;
    /* The scheduler ends the wait itself; this bounds a scheduler that
     * never answers, with room for a leader change on the way. */
    k.timeout_s = (long)(wait_ms / 1000) + 60;
    started = pd_now_ms();
    rv = cli_do(c, &k);
    if (rv == EXIT_OK)
        rv = cli_check(c, &k);
    if (rv == EXIT_OK) {
        resp = json_loadb(k.resp_body != NULL ? k.resp_body : "{}",
                          k.resp_len > 0 ? k.resp_len : 2, 0, &je);
        if (resp == NULL) {
            cli_errorf("the scheduler sent bad JSON: %s", je.text);
            rv = EXIT_SERVER;
        } else if (c->json) {
            print_json(resp);
        } else if (c->quiet && a.pos[0] == gen) {
            printf("%s\n", gen); /* ID=$(paddock -q sandbox create) */
        } else if (!c->quiet) {
            sandbox_summary(resp, waited, pd_now_ms() - started);
            /* A first-hour hint, for a person only (never in a pipe). */
            if (c->tty && sandbox_create_exit(resp, waited) == EXIT_OK)
                fprintf(stderr, "try: paddock exec %s -- uname -a\n",
                        a.pos[0]);
        }
        if (resp != NULL)
            rv = sandbox_create_exit(resp, waited);
        if (rv == EXIT_TIMEOUT) {
            fflush(stdout); /* the summary first, also into one pipe */
            fmt_duration(wait_ms, label, sizeof(label));
            cli_errorf("sandbox %s is still booting after the %s wait; it "
                       "goes on (see paddock sandbox get %s)", a.pos[0],
                       label, a.pos[0]);
        }
    }
    json_decref(resp);
    json_decref(body);
    free(path);
    cli_call_free(&k);
    return rv;
}

static int
list(struct cli *c, int argc, char **argv)
{
    struct cli_args a;
    char err[512];
    char *path = NULL;
    json_t *resp, *items, *s;
    struct table t;
    static const char *const head[] = {"ID", "STATE", "NODE", "CPUS",
                                       "MEMORY", "DISK", "AGE"};
    size_t i;
    int rv;

    if (cli_args_parse(argc, argv, list_opts, list_nopts, &a, err,
                       sizeof(err)) < 0 ||
        req_list(&a, &path, err, sizeof(err)) != EXIT_OK)
        return usage_error("%s", err);
    rv = cli_json(c, "GET", path, NULL, &resp);
    free(path);
    if (rv != EXIT_OK)
        return rv;
    if (c->json) {
        print_json(resp);
        json_decref(resp);
        return EXIT_OK;
    }
    items = list_items(resp, "sandboxes");
    table_init(&t, 7, head);
    json_array_foreach(items, i, s)
        sandbox_row(&t, s, pd_wall_ms());
    table_print(&t, stdout);
    /* An empty table on a terminal could be mistaken for a broken one. */
    if (t.nrows == 0 && isatty(1))
        fputs(a.nmulti[0] > 0 || a.set[1]
                  ? "no sandboxes match\n"
                  : "no sandboxes yet: paddock sandbox create ID\n",
              stderr);
    table_free(&t);
    json_decref(resp);
    return EXIT_OK;
}

/* sandbox get: the object as "key: value" lines, with the exposed ports
 * as their numbers (their URLs are in paddock port ls). */
static void
print_sandbox(json_t *s)
{
    json_t *ports = json_object_get(s, "ports"), *nums = json_array(), *p;
    size_t i;

    json_array_foreach(ports, i, p)
        if (json_object_get(p, "port") != NULL)
            json_array_append(nums, json_object_get(p, "port"));
    if (json_is_array(ports))
        json_object_set(s, "ports", nums);
    json_decref(nums);
    print_object(s, stdout, 0);
}

static int
get_or_rm(struct cli *c, int argc, char **argv, bool rm)
{
    json_t *resp;
    char *path;
    int i, rv, worst = EXIT_OK;

    if (argc < 1 || (!rm && argc != 1))
        return usage_error("usage: paddock sandbox %s", rm ? "rm ID..."
                                                           : "get ID");
    for (i = 0; i < argc; i++)
        if (!pd_id_valid(argv[i]))
            return usage_error("bad sandbox id '%s'", argv[i]);
    /* rm takes several ids, like fly machine destroy: each is removed in
     * turn, a failure does not stop the rest, the exit code is the first
     * failure's. */
    for (i = 0; i < argc; i++) {
        path = cli_path("/v1/sandboxes/%s", argv[i]);
        rv = cli_json(c, rm ? "DELETE" : "GET", path, NULL, &resp);
        free(path);
        if (rv != EXIT_OK) {
            if (worst == EXIT_OK)
                worst = rv;
            continue;
        }
        if (c->json)
            print_json(resp != NULL ? resp : json_null());
        else if (rm && !c->quiet)
            printf("sandbox %s removed\n", argv[i]);
        else if (!rm && resp != NULL)
            print_sandbox(resp);
        json_decref(resp);
    }
    return worst;
}

int
cmd_sandbox(struct cli *c, int argc, char **argv)
{
    const char *sub = argc > 0 ? argv[0] : "";

    if (strcmp(sub, "create") == 0)
        return create(c, argc - 1, argv + 1);
    if (strcmp(sub, "list") == 0 || strcmp(sub, "ls") == 0)
        return list(c, argc - 1, argv + 1);
    if (strcmp(sub, "get") == 0)
        return get_or_rm(c, argc - 1, argv + 1, false);
    if (strcmp(sub, "rm") == 0 || strcmp(sub, "delete") == 0)
        return get_or_rm(c, argc - 1, argv + 1, true);
    return usage_error("usage: paddock sandbox create|list|get|rm ... "
                       "(see paddock --help)");
}
