/*
 * The CLI's pieces without a cluster: argument parsing, the requests built
 * from arguments, table and size formatting, the SSE and base64 decoders,
 * and the client transport (address failover, exit codes, streaming)
 * against a real HTTP server on loopback.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <curl/curl.h>

#include "cli/args.h"
#include "cli/client.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "cli/requests.h"
#include "common/util.h"
#include "proto/http.h"

/* Parses a command line given as one string (split on spaces). */
static int
parse(char *line, char **argv, int *argc, const struct cli_opt *opts,
      size_t n, struct cli_args *a, char *err)
{
    char *save = NULL, *tok;

    *argc = 0;
    for (tok = strtok_r(line, " ", &save); tok != NULL;
         tok = strtok_r(NULL, " ", &save))
        argv[(*argc)++] = tok;
    argv[*argc] = NULL;
    return cli_args_parse(*argc, argv, opts, n, a, err, 256);
}

static void
test_globals(void **state)
{
    char a0[] = "sandbox", a1[] = "--json", a2[] = "list", a3[] = "--addr",
         a4[] = "h:1,h:2", a5[] = "--token=abc", a6[] = "--", a7[] = "--json";
    char *argv[] = {a0, a1, a2, a3, a4, a5, a6, a7, NULL};
    int argc = 8;
    struct cli_globals g = {0};
    char err[256];

    (void)state;
    assert_int_equal(cli_globals_parse(&argc, argv, &g, err, sizeof(err)),
                     0);
    assert_true(g.json);
    assert_string_equal(g.addr, "h:1,h:2");
    assert_string_equal(g.token, "abc");
    /* After "--" nothing is taken: it belongs to the command. */
    assert_int_equal(argc, 4);
    assert_string_equal(argv[0], "sandbox");
    assert_string_equal(argv[1], "list");
    assert_string_equal(argv[2], "--");
    assert_string_equal(argv[3], "--json");

    {
        char b0[] = "--addr";
        char *bv[] = {b0, NULL};
        int bc = 1;
        struct cli_globals h = {0};

        assert_int_equal(cli_globals_parse(&bc, bv, &h, err, sizeof(err)),
                         -EINVAL);
        assert_non_null(strstr(err, "--addr needs a value"));
    }
}

static void
test_args(void **state)
{
    char line[] = "web --cpus 2 --env A=1 -e B=2=3 --memory=512 --no-wait";
    char *argv[32];
    int argc;
    struct cli_args a;
    char err[256];
    json_t *body = NULL;
    char *path = NULL;

    (void)state;
    assert_int_equal(parse(line, argv, &argc, create_opts, create_nopts, &a,
                           err), 0);
    assert_int_equal(a.npos, 1);
    assert_int_equal(req_create(&a, &body, &path, err, sizeof(err)),
                     EXIT_OK);
    assert_string_equal(path, "/v1/sandboxes");
    assert_string_equal(json_string_value(json_object_get(body, "id")),
                        "web");
    assert_int_equal(json_integer_value(json_object_get(body, "cpus")), 2);
    assert_int_equal(json_integer_value(json_object_get(body, "memory_mb")),
                     512);
    assert_null(json_object_get(body, "disk_mb"));
    assert_string_equal(json_string_value(json_object_get(
                            json_object_get(body, "env"), "B")),
                        "2=3");
    json_decref(body);
    free(path);
}

static void
expect_usage(const struct cli_opt *opts, size_t n, const char *cmdline,
             const char *msg, int which)
{
    char line[512];
    char *argv[32];
    int argc, rv;
    struct cli_args a;
    char err[256] = "";
    json_t *body = NULL;
    char *path = NULL;

    snprintf(line, sizeof(line), "%s", cmdline);
    rv = parse(line, argv, &argc, opts, n, &a, err);
    if (rv == 0) {
        switch (which) {
        case 0:
            rv = req_create(&a, &body, &path, err, sizeof(err));
            break;
        case 1:
            rv = req_exec(&a, false, false, &body, err, sizeof(err));
            break;
        case 2:
            rv = req_exec(&a, true, false, &body, err, sizeof(err));
            break;
        case 3:
            rv = req_token(&a, &body, err, sizeof(err));
            break;
        default:
            rv = req_list(&a, &path, err, sizeof(err));
        }
    }
    if (rv == 0)
        fail_msg("'%s' was accepted", cmdline);
    if (strstr(err, msg) == NULL)
        fail_msg("'%s': message '%s' lacks '%s'", cmdline, err, msg);
    json_decref(body);
    free(path);
}

/* Bad arguments are refused with a message that says what is wrong. */
/* --wait-timeout becomes the scheduler's wait_ms; no hint for an option
 * that resembles nothing. */
static void
test_create_wait(void **state)
{
    char line[] = "web --wait-timeout 90s";
    char *argv[8];
    int argc;
    struct cli_args a;
    char err[256];
    json_t *body = NULL;
    char *path = NULL;

    (void)state;
    assert_int_equal(parse(line, argv, &argc, create_opts, create_nopts, &a,
                           err), 0);
    assert_int_equal(req_create(&a, &body, &path, err, sizeof(err)),
                     EXIT_OK);
    assert_string_equal(path, "/v1/sandboxes?wait=true&wait_ms=90000");
    assert_null(json_object_get(body, "wait_ms"));
    json_decref(body);
    free(path);
    assert_null(cli_opt_suggest(create_opts, create_nopts, "--bogus", 7));
    assert_null(cli_opt_suggest(create_opts, create_nopts, "-c", 2));
}

static void
test_bad_args(void **state)
{
    (void)state;
    expect_usage(create_opts, create_nopts, "Bad_Id", "bad sandbox id", 0);
    expect_usage(create_opts, create_nopts, "a --cpus two", "--cpus wants",
                 0);
    expect_usage(create_opts, create_nopts, "a --cpus 0", "--cpus wants", 0);
    expect_usage(create_opts, create_nopts, "a --env NOEQUALS",
                 "--env wants KEY=VALUE", 0);
    expect_usage(create_opts, create_nopts, "a --env =v",
                 "--env wants KEY=VALUE", 0);
    expect_usage(create_opts, create_nopts, "a --egress some",
                 "--egress is none or all", 0);
    expect_usage(create_opts, create_nopts, "a --bogus 1",
                 "unknown option '--bogus'", 0);
    expect_usage(create_opts, create_nopts, "a --cpu 2",
                 "unknown option '--cpu' (did you mean --cpus?)", 0);
    expect_usage(create_opts, create_nopts, "a --memory-mb 2",
                 "(did you mean --memory?)", 0);
    expect_usage(create_opts, create_nopts, "a --wait-timeout soon",
                 "--wait-timeout wants a duration", 0);
    expect_usage(create_opts, create_nopts, "a --wait-timeout 11m",
                 "--wait-timeout wants a duration", 0);
    expect_usage(create_opts, create_nopts, "a --no-wait --wait-timeout 5s",
                 "exclude each other", 0);
    expect_usage(create_opts, create_nopts, "a --cpus", "needs a value", 0);
    expect_usage(create_opts, create_nopts, "a --cpus 1 --cpus 2",
                 "given twice", 0);
    expect_usage(create_opts, create_nopts, "", "usage:", 0);
    expect_usage(exec_opts, exec_nopts, "sb", "usage: paddock exec", 1);
    expect_usage(exec_opts, exec_nopts, "sb --", "usage: paddock exec", 1);
    expect_usage(exec_opts, exec_nopts, "sb --timeout soon -- ls",
                 "bad --timeout", 1);
    expect_usage(exec_opts, exec_nopts, "sb", "usage: paddock sh", 2);
    expect_usage(token_opts, token_nopts, "--role admin", "--tenant", 3);
    expect_usage(token_opts, token_nopts, "--tenant t --role root",
                 "--role is", 3);
    expect_usage(token_opts, token_nopts, "--tenant t --ttl 0",
                 "bad --ttl", 3);
    expect_usage(list_opts, list_nopts, "--label nokv",
                 "--label wants KEY=VALUE", 4);
}

static void
test_exec_request(void **state)
{
    char line[] = "sb1 -w /tmp -e X=1 --timeout 1500ms -- ls -la --color";
    char *argv[32];
    int argc;
    struct cli_args a;
    char err[256];
    json_t *body = NULL, *av;

    (void)state;
    assert_int_equal(parse(line, argv, &argc, exec_opts, exec_nopts, &a,
                           err), 0);
    assert_int_equal(req_exec(&a, false, false, &body, err, sizeof(err)),
                     EXIT_OK);
    av = json_object_get(body, "argv");
    assert_int_equal(json_array_size(av), 3);
    assert_string_equal(json_string_value(json_array_get(av, 2)),
                        "--color");
    assert_string_equal(json_string_value(json_object_get(body, "cwd")),
                        "/tmp");
    assert_int_equal(json_integer_value(json_object_get(body,
                                                        "timeout_ms")),
                     1500);
    assert_null(json_object_get(body, "command"));
    json_decref(body);
}

static void
test_list_and_token_requests(void **state)
{
    char line[] = "--label app=web -l team=a&b --state running";
    char line2[] = "--tenant acme --ttl 2h";
    char *argv[32];
    int argc;
    struct cli_args a;
    char err[256];
    char *path = NULL;
    json_t *body = NULL;

    (void)state;
    assert_int_equal(parse(line, argv, &argc, list_opts, list_nopts, &a,
                           err), 0);
    assert_int_equal(req_list(&a, &path, err, sizeof(err)), EXIT_OK);
    assert_string_equal(path, "/v1/sandboxes?label=app%3Dweb"
                              "&label=team%3Da%26b&state=running");
    free(path);
    assert_int_equal(parse(line2, argv, &argc, token_opts, token_nopts, &a,
                           err), 0);
    assert_int_equal(req_token(&a, &body, err, sizeof(err)), EXIT_OK);
    assert_string_equal(json_string_value(json_object_get(body, "role")),
                        "tenant");
    assert_int_equal(json_integer_value(json_object_get(body, "ttl_s")),
                     7200);
    json_decref(body);
}

static void
test_path_encoding(void **state)
{
    char *p = cli_path("/v1/sandboxes/%s/files?path=%s", "sb",
                       "/a b/c&d?e");

    (void)state;
    assert_string_equal(p, "/v1/sandboxes/sb/files?path=%2Fa%20b%2Fc%26d%3Fe");
    free(p);
    p = cli_path("/v1/sandboxes/%s/ports/%d", "x", 8080);
    assert_string_equal(p, "/v1/sandboxes/x/ports/8080");
    free(p);
}

static void
test_addrs(void **state)
{
    struct cli c = {0};
    char err[256];

    (void)state;
    assert_int_equal(cli_set_addrs(&c, "127.0.0.1:1, https://h:2/,h3:3",
                                   err, sizeof(err)), 0);
    assert_int_equal(c.naddrs, 3);
    assert_string_equal(c.addrs[0], "http://127.0.0.1:1");
    assert_string_equal(c.addrs[1], "https://h:2");
    assert_string_equal(c.addrs[2], "http://h3:3");
    cli_free(&c);
    assert_int_equal(cli_set_addrs(&c, "", err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "PADDOCK_ADDR"));
    assert_int_equal(cli_set_addrs(&c, "h:1/x", err, sizeof(err)), -EINVAL);
    cli_free(&c);
}

/* ---- output ---- */

static void
test_formatting(void **state)
{
    char b[32];
    json_t *j;

    (void)state;
    fmt_bytes(0, b, sizeof(b));
    assert_string_equal(b, "0");
    fmt_bytes(1023, b, sizeof(b));
    assert_string_equal(b, "1023");
    fmt_bytes(1536, b, sizeof(b));
    assert_string_equal(b, "1.5K");
    fmt_bytes(10ull << 30, b, sizeof(b));
    assert_string_equal(b, "10G");
    fmt_mb(512, b, sizeof(b));
    assert_string_equal(b, "512M");
    fmt_mb(2048, b, sizeof(b));
    assert_string_equal(b, "2G");
    fmt_duration(850, b, sizeof(b));
    assert_string_equal(b, "850ms");
    fmt_duration(42000, b, sizeof(b));
    assert_string_equal(b, "42s");
    fmt_duration(3 * 3600000ull, b, sizeof(b));
    assert_string_equal(b, "3h");
    j = json_integer(1000000);              /* seconds since the epoch */
    fmt_age(j, 1000060ull * 1000, b, sizeof(b));
    assert_string_equal(b, "60s");
    json_decref(j);
    j = json_string("1970-01-01T00:01:00Z");
    fmt_age(j, 3600000, b, sizeof(b));
    assert_string_equal(b, "59m");
    json_decref(j);
    fmt_age(NULL, 0, b, sizeof(b));
    assert_string_equal(b, "-");
}

/* Token expiry and timestamps read as a person would say them. */
static void
test_times(void **state)
{
    char b[64];
    json_t *j;
    uint64_t now = 1796362302800ull, ms;

    (void)state;
    j = json_integer((json_int_t)(now / 1000) + 3540);
    fmt_until(j, now, b, sizeof(b));
    assert_string_equal(b, "in 58m");
    json_decref(j);
    j = json_integer((json_int_t)(now / 1000) - 7200);
    fmt_until(j, now, b, sizeof(b));
    assert_string_equal(b, "expired 2h ago");
    json_decref(j);
    j = json_integer((json_int_t)now + 300);   /* ms, half a second left */
    fmt_until(j, now, b, sizeof(b));
    assert_string_equal(b, "in 1s");
    json_decref(j);
    fmt_until(NULL, now, b, sizeof(b));
    assert_string_equal(b, "-");
    j = json_integer((json_int_t)now - 400);   /* ages are whole seconds */
    fmt_age(j, now, b, sizeof(b));
    assert_string_equal(b, "0s");
    json_decref(j);
    j = json_integer(0);                       /* a file from the epoch */
    fmt_age(j, now, b, sizeof(b));
    assert_string_equal(b, "56y");
    json_decref(j);
    j = json_integer(1796362302);
    fmt_time(j, now, b, sizeof(b));
    assert_string_equal(b, "2026-12-04 05:31:42 UTC (0s ago)");
    json_decref(j);
    j = json_string("2026-01-02T03:04:05Z");
    assert_int_equal(json_time_ms(j, &ms), 0);
    assert_int_equal(ms, 1767323045000ull);
    json_decref(j);
    j = json_string("soon");
    assert_int_equal(json_time_ms(j, &ms), -EINVAL);
    fmt_time(j, now, b, sizeof(b));
    assert_string_equal(b, "soon");
    json_decref(j);
}

/* sandbox get and ps PROC: times as times, argv joined, empties as "-". */
static void
test_print_object(void **state)
{
    json_t *o = json_loads("{\"id\":\"p\",\"argv\":[\"sh\",\"-c\","
                           "\"exit 4\"],\"labels\":{},\"ports\":[],"
                           "\"started_at\":1767323045000,\"signal\":null,"
                           "\"env\":{\"K\":\"V\"}}", 0, NULL);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);

    (void)state;
    assert_non_null(o);
    print_object(o, f, 0);
    fclose(f);
    assert_non_null(strstr(buf, "id: p\nargv: sh -c exit 4\nlabels: -\n"
                                "ports: -\nstarted_at: 2026-01-02 03:04:05 "
                                "UTC ("));
    assert_non_null(strstr(buf, " ago)\nsignal: -\nenv:\n  K: V\n"));
    free(buf);
    json_decref(o);
}

/* Rows sorted by a column; the print stays aligned to the widest cell. */
static void
test_table_sort(void **state)
{
    static const char *const head[] = {"TYPE", "NAME"};
    const char *r1[] = {"file", "zeta"};
    const char *r2[] = {"dir", "alpha"};
    const char *r3[] = {"file", "mid"};
    struct table t;
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);

    (void)state;
    table_init(&t, 2, head);
    table_add(&t, r1);
    table_add(&t, r2);
    table_add(&t, r3);
    table_sort(&t, 1);
    table_print(&t, f);
    fclose(f);
    assert_string_equal(buf, "TYPE  NAME\n"
                             "dir   alpha\n"
                             "file  mid\n"
                             "file  zeta\n");
    free(buf);
    table_free(&t);
}

static void
test_table(void **state)
{
    static const char *const head[] = {"ID", "STATE", "NODE"};
    const char *r1[] = {"web-1", "running", "n1"};
    const char *r2[] = {"a", NULL, ""};
    struct table t;
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);

    (void)state;
    table_init(&t, 3, head);
    table_add(&t, r1);
    table_add(&t, r2);
    table_print(&t, f);
    fclose(f);
    assert_string_equal(buf, "ID     STATE    NODE\n"
                             "web-1  running  n1\n"
                             "a      -        -\n");
    free(buf);
    table_free(&t);
}

static void
test_error_message(void **state)
{
    json_t *j = json_loads("{\"error\":{\"code\":\"not_found\","
                           "\"message\":\"no sandbox x\"}}", 0, NULL);
    json_t *arr = json_loads("{\"sandboxes\":[1,2]}", 0, NULL);
    const char *code = NULL;

    (void)state;
    assert_string_equal(error_message(j, &code), "no sandbox x");
    assert_string_equal(code, "not_found");
    assert_int_equal(json_array_size(list_items(arr, "sandboxes")), 2);
    assert_null(list_items(arr, "nodes"));
    json_decref(j);
    json_decref(arr);
}

struct events {
    int n;
    char name[8][32];
    char data[8][64];
};

static void
collect_event(const char *event, const char *data, size_t len, void *arg)
{
    struct events *e = arg;

    assert_true(e->n < 8);
    snprintf(e->name[e->n], 32, "%s", event);
    snprintf(e->data[e->n], 64, "%.*s", (int)len, data);
    e->n++;
}

/* Events split at every byte boundary come out the same. */
static void
test_sse(void **state)
{
    static const char in[] = ": hello\n\nevent: stdout\ndata: a\ndata: b\n\n"
                             "event: exit\r\ndata: {\"exit_code\":3}\r\n\r\n"
                             "data: plain\n\nevent: x\n\n";
    size_t split;

    (void)state;
    for (split = 0; split < sizeof(in) - 1; split++) {
        struct events e = {0};
        struct sse s;

        sse_init(&s);
        assert_int_equal(sse_feed(&s, in, split, collect_event, &e), 0);
        assert_int_equal(sse_feed(&s, in + split, sizeof(in) - 1 - split,
                                  collect_event, &e), 0);
        assert_int_equal(e.n, 3);
        assert_string_equal(e.name[0], "stdout");
        assert_string_equal(e.data[0], "a\nb");
        assert_string_equal(e.name[1], "exit");
        assert_string_equal(e.data[1], "{\"exit_code\":3}");
        assert_string_equal(e.name[2], "message");
        assert_string_equal(e.data[2], "plain");
        sse_free(&s);
    }
}

static void
test_b64(void **state)
{
    unsigned char out[64];
    size_t n;

    (void)state;
    assert_int_equal(b64_decode("aGVsbG8=", 8, out, &n), 0);
    assert_int_equal(n, 5);
    assert_memory_equal(out, "hello", 5);
    assert_int_equal(b64_decode("aGVsbG8", 7, out, &n), 0);
    assert_int_equal(n, 5);
    assert_int_equal(b64_decode("AP8=", 4, out, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(out[1], 0xff);
    assert_int_equal(b64_decode("", 0, out, &n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(b64_decode("a$==", 4, out, &n), -EINVAL);
    assert_int_equal(b64_decode("a", 1, out, &n), -EINVAL);
}

/* ---- the client against a loopback HTTP server ---- */

static uv_loop_t loop;
static uv_async_t stop_async;
static struct pd_http_server *srv;
static pthread_t thread;
static int port;
static char last_auth[256];
static uint64_t uploaded;

static void
up_data(struct pd_http_req *r, const char *d, size_t n, void *arg)
{
    (void)r;
    (void)d;
    (void)arg;
    uploaded += n;
}

static void
up_end(struct pd_http_req *r, int err, void *arg)
{
    (void)arg;
    if (err != 0)
        pd_http_fail(r, err);
    else
        pd_http_respond_json(r, 200, json_pack("{s:I}", "size",
                                               (json_int_t)uploaded));
}

static char last_query[256];

/* A create as the scheduler answers it: "huge" fits nowhere (409 with the
 * per-resource reason), "slow" is still starting when the wait ends (the
 * scheduler answers with the row as it is). */
static void
on_create(struct pd_http_req *r, int err, const char *body, size_t len,
          void *arg)
{
    json_t *j = err == 0 ? json_loadb(body, len, 0, NULL) : NULL;
    const char *id = json_string_value(json_object_get(j, "id"));
    const char *t = pd_http_req_target(r), *q = strchr(t, '?');

    (void)arg;
    snprintf(last_query, sizeof(last_query), "%s", q != NULL ? q + 1 : "");
    if (id != NULL && strcmp(id, "huge") == 0)
        pd_http_respond_error(r, 409, "no_capacity", "create: no node fits: "
                              "1 node lacks CPU (need 64, most free 7)");
    else
        pd_http_respond_json(r, 200, json_pack("{s:s,s:s,s:s}", "id",
                                               id != NULL ? id : "?",
                                               "state", "starting", "node",
                                               "n1"));
    json_decref(j);
}

#define SSE(r, ev, lit) pd_http_sse_event(r, ev, lit, sizeof(lit) - 1)

static void
on_request(struct pd_http_req *r, void *arg)
{
    const char *auth = pd_http_req_header(r, "Authorization");
    const char *path = pd_http_req_path(r);

    (void)arg;
    snprintf(last_auth, sizeof(last_auth), "%s", auth != NULL ? auth : "");
    if (strcmp(path, "/missing") == 0) {
        pd_http_respond_error(r, 404, "not_found", "no sandbox 'x'");
    } else if (strcmp(path, "/auth") == 0) {
        pd_http_respond_error(r, 401, "unauthorized", "bad token");
    } else if (strcmp(path, "/boom") == 0) {
        pd_http_respond_error(r, 503, "unavailable", "no leader");
    } else if (strcmp(path, "/v1/sandboxes/sb/exec") == 0) {
        /* The event shapes cli/README.md documents. */
        pd_http_sse_start(r);
        SSE(r, "start", "{\"pid\":5}");
        SSE(r, "stdout", "{\"data\":\"aGVsbG8K\"}");
        SSE(r, "stderr", "{\"text\":\"warn\"}");
        SSE(r, "stdout", "{\"data\":\"AAE=\"}");
        SSE(r, "exit", "{\"exit_code\":7}");
        pd_http_end(r);
    } else if (strcmp(path, "/v1/sandboxes/cut/exec") == 0) {
        pd_http_sse_start(r);
        SSE(r, "stdout", "{\"data\":\"aGk=\"}");
        pd_http_end(r);
    } else if (strcmp(path, "/multiline") == 0) {
        pd_http_respond_error(r, 409, "conflict", "two\nlines\033[2J");
    } else if (strcmp(path, "/v1/sandboxes/sb/processes/gone/logs") == 0) {
        pd_http_respond_error(r, 404, "not_found", "no process named gone");
    } else if (strcmp(path, "/v1/sandboxes/sb/processes/p/logs") == 0 &&
               pd_http_req_query_bool(r, "follow", false)) {
        pd_http_sse_start(r);
        SSE(r, "stdout", "{\"data\":\"eAo=\"}");
        SSE(r, "exit", "{\"exit_code\":4,\"signal\":null}");
        pd_http_end(r);
    } else if (strcmp(path, "/v1/sandboxes/sb/processes/p/logs") == 0) {
        pd_http_respond_json(r, 200, json_pack("{s:s,s:s,s:b,s:i}",
                                               "stdout", "x\n", "stderr",
                                               "", "running", 0,
                                               "exit_code", 4));
    } else if (strcmp(path, "/v1/sandboxes") == 0 && pd_http_req_is(r,
                                                                    "POST")) {
        pd_http_body_read(r, 0, on_create, NULL);
    } else if (strcmp(path, "/upload") == 0) {
        static const struct pd_http_body_stream_cb cb = {up_data, up_end};

        uploaded = 0;
        pd_http_body_stream(r, 0, &cb, NULL);
    } else {
        pd_http_respond_json(r, 200, json_pack("{s:s}", "path", path));
    }
}

static void
on_stop(uv_async_t *a)
{
    pd_http_server_close(srv, NULL, NULL);
    uv_close((uv_handle_t *)a, NULL);
}

static void *
loop_main(void *arg)
{
    (void)arg;
    uv_run(&loop, UV_RUN_DEFAULT);
    return NULL;
}

static int
setup_server(void **state)
{
    struct pd_http_opts o = {.on_request = on_request};
    char err[256];

    (void)state;
    uv_loop_init(&loop);
    assert_int_equal(pd_http_server_new(&loop, &o, &srv, err, sizeof(err)),
                     0);
    assert_int_equal(pd_http_server_listen(srv, "127.0.0.1:0", err,
                                           sizeof(err)), 0);
    port = pd_http_server_port(srv);
    uv_async_init(&loop, &stop_async, on_stop);
    pthread_create(&thread, NULL, loop_main, NULL);
    curl_global_init(CURL_GLOBAL_ALL);
    return 0;
}

static int
teardown_server(void **state)
{
    (void)state;
    uv_async_send(&stop_async);
    pthread_join(thread, NULL);
    uv_loop_close(&loop);
    curl_global_cleanup();
    return 0;
}

/* A dead first address is skipped; the token goes along; statuses map to
 * the documented exit codes. */
static void
test_client_transport(void **state)
{
    struct cli c = {0};
    char list[128], err[256];
    json_t *out = NULL;
    FILE *devnull = fopen("/dev/null", "w");
    FILE *saved = stderr;

    (void)state;
    /* Port 1 on loopback refuses connections. */
    snprintf(list, sizeof(list), "127.0.0.1:1,127.0.0.1:%d", port);
    assert_int_equal(cli_set_addrs(&c, list, err, sizeof(err)), 0);
    c.token = "tok123";
    assert_int_equal(cli_json(&c, "GET", "/v1/x?y=1", NULL, &out), EXIT_OK);
    assert_string_equal(json_string_value(json_object_get(out, "path")),
                        "/v1/x");
    assert_string_equal(last_auth, "Bearer tok123");
    assert_int_equal(c.cur, 1);
    json_decref(out);
    stderr = devnull; /* the one-line messages are not under test here */
    assert_int_equal(cli_json(&c, "GET", "/missing", NULL, &out),
                     EXIT_NOTFOUND);
    assert_int_equal(cli_json(&c, "GET", "/auth", NULL, &out), EXIT_AUTH);
    assert_int_equal(cli_json(&c, "GET", "/boom", NULL, &out), EXIT_SERVER);
    assert_int_equal(cli_json(&c, "POST", "/x", json_null(), &out),
                     EXIT_OK);
    json_decref(out);
    cli_free(&c);
    assert_int_equal(cli_set_addrs(&c, "127.0.0.1:1", err, sizeof(err)), 0);
    assert_int_equal(cli_json(&c, "GET", "/", NULL, &out),
                     EXIT_UNREACHABLE);
    stderr = saved;
    fclose(devnull);
    cli_free(&c);
}

/* An upload of unknown size streams from a pipe-like FILE, chunked. */
static void
test_client_upload(void **state)
{
    struct cli c = {0};
    struct cli_call k = {.method = "PUT", .path = "/upload"};
    char list[64], err[256];
    FILE *f = tmpfile();
    static char block[65536];
    int i;

    (void)state;
    memset(block, 'z', sizeof(block));
    for (i = 0; i < 64; i++)
        fwrite(block, 1, sizeof(block), f);
    rewind(f);
    snprintf(list, sizeof(list), "127.0.0.1:%d", port);
    assert_int_equal(cli_set_addrs(&c, list, err, sizeof(err)), 0);
    k.upload = f;
    k.upload_size = -1;
    assert_int_equal(cli_do(&c, &k), EXIT_OK);
    assert_int_equal(cli_check(&c, &k), EXIT_OK);
    assert_non_null(strstr(k.resp_body, "4194304"));
    cli_call_free(&k);
    fclose(f);
    cli_free(&c);
}

/* Runs fn with fd 1 and 2 captured into out/err (NUL-terminated). */
static int
captured(int (*fn)(struct cli *, int, char **, bool), struct cli *c,
         int argc, char **argv, char *out, size_t outlen, char *err,
         size_t errlen)
{
    FILE *fo = tmpfile(), *fe = tmpfile();
    int so = dup(1), se = dup(2), rv;
    size_t n;

    fflush(stdout);
    fflush(stderr);
    dup2(fileno(fo), 1);
    dup2(fileno(fe), 2);
    rv = fn(c, argc, argv, false);
    fflush(stdout);
    fflush(stderr);
    dup2(so, 1);
    dup2(se, 2);
    close(so);
    close(se);
    rewind(fo);
    n = fread(out, 1, outlen - 1, fo);
    out[n] = '\0';
    rewind(fe);
    n = fread(err, 1, errlen - 1, fe);
    err[n] = '\0';
    fclose(fo);
    fclose(fe);
    return rv;
}

/* exec decodes the event stream: bytes pass through, the exit code is the
 * command's, a stream cut before "exit" is paddock's failure (125). */
static void
test_exec_stream(void **state)
{
    struct cli c = {0};
    char list[64], err[256], out[256], errs[512];
    char a0[] = "sb", a1[] = "--", a2[] = "true";
    char b0[] = "cut", b1[] = "--", b2[] = "true";
    char *argv[] = {a0, a1, a2, NULL};
    char *argv2[] = {b0, b1, b2, NULL};

    (void)state;
    snprintf(list, sizeof(list), "127.0.0.1:%d", port);
    assert_int_equal(cli_set_addrs(&c, list, err, sizeof(err)), 0);
    assert_int_equal(captured(cmd_exec, &c, 3, argv, out, sizeof(out), errs,
                              sizeof(errs)), 7);
    assert_memory_equal(out, "hello\n\0\1", 8);
    assert_string_equal(errs, "warn");
    assert_int_equal(captured(cmd_exec, &c, 3, argv2, out, sizeof(out),
                              errs, sizeof(errs)), EXIT_EXEC_FAILED);
    assert_string_equal(out, "hi");
    assert_non_null(strstr(errs, "ended before the process exited"));
    cli_free(&c);
}

static int
logs_fn(struct cli *c, int argc, char **argv, bool unused)
{
    (void)unused;
    return cmd_logs(c, argc, argv);
}

static int
sandbox_fn(struct cli *c, int argc, char **argv, bool unused)
{
    (void)unused;
    return cmd_sandbox(c, argc, argv);
}

/* logs -f waits for the process and exits with its code, like exec;
 * paddock's own failure there is 125. Plain logs print and exit 0. */
static void
test_logs_exit_code(void **state)
{
    struct cli c = {0};
    char list[64], err[256], out[256], errs[512];
    char a0[] = "sb", a1[] = "p", a2[] = "-f", g1[] = "gone";
    char *follow[] = {a0, a1, a2, NULL};
    char *plain[] = {a0, a1, NULL};
    char *gone[] = {a0, g1, a2, NULL};

    (void)state;
    snprintf(list, sizeof(list), "127.0.0.1:%d", port);
    assert_int_equal(cli_set_addrs(&c, list, err, sizeof(err)), 0);
    assert_int_equal(captured(logs_fn, &c, 3, follow, out, sizeof(out), errs,
                              sizeof(errs)), 4);
    assert_string_equal(out, "x\n");
    assert_int_equal(captured(logs_fn, &c, 2, plain, out, sizeof(out), errs,
                              sizeof(errs)), EXIT_OK);
    assert_string_equal(out, "x\n");
    /* --json: one JSON line per event, the exit code still the process's. */
    c.json = true;
    assert_int_equal(captured(logs_fn, &c, 3, follow, out, sizeof(out), errs,
                              sizeof(errs)), 4);
    assert_string_equal(out, "{\"event\":\"stdout\",\"data\":{\"data\":"
                             "\"eAo=\"}}\n{\"event\":\"exit\",\"data\":"
                             "{\"exit_code\":4,\"signal\":null}}\n");
    c.json = false;
    /* A 404 is paddock's failure, not a process that exited 3. */
    assert_int_equal(captured(logs_fn, &c, 3, gone, out, sizeof(out), errs,
                              sizeof(errs)), EXIT_EXEC_FAILED);
    assert_string_equal(errs, "paddock: no process named gone (HTTP 404 "
                              "not_found)\n");
    cli_free(&c);
}

static int
multiline_fn(struct cli *c, int argc, char **argv, bool unused)
{
    json_t *out = NULL;

    (void)argc;
    (void)argv;
    (void)unused;
    return cli_json(c, "GET", "/multiline", NULL, &out);
}

/* A server's message is printed on one line, control bytes blanked. */
static void
test_error_one_line(void **state)
{
    struct cli c = {0};
    char list[64], err[256], out[256], errs[512];

    (void)state;
    snprintf(list, sizeof(list), "127.0.0.1:%d", port);
    assert_int_equal(cli_set_addrs(&c, list, err, sizeof(err)), 0);
    assert_int_equal(captured(multiline_fn, &c, 0, NULL, out, sizeof(out),
                              errs, sizeof(errs)), EXIT_API);
    assert_string_equal(errs, "paddock: two lines [2J (HTTP 409 "
                              "conflict)\n");
    cli_free(&c);
}

/* A create that fits nowhere prints the scheduler's per-resource reason
 * in one line and exits 2; one still starting when --wait-timeout ends
 * exits 8 and says the sandbox goes on; wait_ms carries the timeout. */
static void
test_create_outcomes(void **state)
{
    struct cli c = {0};
    char list[64], err[256], out[256], errs[512];
    char c0[] = "create", h[] = "huge", s1[] = "slow", w[] = "--wait-timeout",
         w2[] = "2s", nw[] = "--no-wait";
    char *huge[] = {c0, h, NULL};
    char *slow[] = {c0, s1, w, w2, NULL};
    char *nowait[] = {c0, s1, nw, NULL};
    char *noid[] = {c0, nw, NULL};

    (void)state;
    snprintf(list, sizeof(list), "127.0.0.1:%d", port);
    assert_int_equal(cli_set_addrs(&c, list, err, sizeof(err)), 0);
    assert_int_equal(captured(sandbox_fn, &c, 2, huge, out, sizeof(out),
                              errs, sizeof(errs)), EXIT_API);
    assert_string_equal(errs, "paddock: create: no node fits: 1 node lacks "
                              "CPU (need 64, most free 7) (HTTP 409 "
                              "no_capacity)\n");
    assert_string_equal(out, "");
    assert_int_equal(captured(sandbox_fn, &c, 4, slow, out, sizeof(out),
                              errs, sizeof(errs)), EXIT_TIMEOUT);
    assert_string_equal(last_query, "wait=true&wait_ms=2000");
    assert_true(strncmp(out, "sandbox slow: starting on node n1 after ",
                        40) == 0);
    assert_non_null(strstr(errs, "still booting after the 2s wait"));
    assert_int_equal(strchr(errs, '\n') - errs + 1, (long)strlen(errs));
    /* c.tty is false: no progress line is drawn. */
    assert_null(strchr(errs, '\r'));
    assert_int_equal(captured(sandbox_fn, &c, 3, nowait, out, sizeof(out),
                              errs, sizeof(errs)), EXIT_OK);
    assert_string_equal(last_query, "");
    assert_string_equal(out, "sandbox slow: starting on node n1\n");
    /* Without an id one is made up, and -q prints it alone. */
    c.quiet = true;
    assert_int_equal(captured(sandbox_fn, &c, 2, noid, out, sizeof(out),
                              errs, sizeof(errs)), EXIT_OK);
    assert_int_equal(strlen(out), 12);
    assert_true(strncmp(out, "sb-", 3) == 0 && out[11] == '\n');
    out[11] = '\0';
    assert_true(pd_id_valid(out));
    c.quiet = false;
    cli_free(&c);
}

int
main(void)
{
    const struct CMUnitTest pure[] = {
        cmocka_unit_test(test_globals),
        cmocka_unit_test(test_args),
        cmocka_unit_test(test_bad_args),
        cmocka_unit_test(test_create_wait),
        cmocka_unit_test(test_exec_request),
        cmocka_unit_test(test_list_and_token_requests),
        cmocka_unit_test(test_path_encoding),
        cmocka_unit_test(test_addrs),
        cmocka_unit_test(test_formatting),
        cmocka_unit_test(test_table),
        cmocka_unit_test(test_times),
        cmocka_unit_test(test_table_sort),
        cmocka_unit_test(test_print_object),
        cmocka_unit_test(test_error_message),
        cmocka_unit_test(test_sse),
        cmocka_unit_test(test_b64),
    };
    const struct CMUnitTest net[] = {
        cmocka_unit_test(test_client_transport),
        cmocka_unit_test(test_client_upload),
        cmocka_unit_test(test_exec_stream),
        cmocka_unit_test(test_logs_exit_code),
        cmocka_unit_test(test_create_outcomes),
        cmocka_unit_test(test_error_one_line),
    };
    int fails = 0;

    fails += cmocka_run_group_tests_name("cli", pure, NULL, NULL);
    fails += cmocka_run_group_tests_name("client", net, setup_server,
                                         teardown_server);
    return fails != 0;
}
