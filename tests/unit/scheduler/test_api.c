/*
 * The pieces of the scheduler core that stand alone: injected HTTP
 * requests (proto/http.c's pd_http_server_inject, which forwarding runs
 * on), pd_http_on_done (per-route metrics), and the Prometheus text of
 * scheduler/metrics.c over a real FSM.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "proto/http.h"
#include "scheduler/sched.h"

struct injected {
    bool done;
    int err;
    char *resp;
    size_t len;
};

static int done_status = -1;
static struct pd_http_req *held; /* a request the handler keeps open */

static void
on_inject_done(void *arg, int err, const char *resp, size_t len)
{
    struct injected *x = arg;

    x->done = true;
    x->err = err;
    x->resp = malloc(len + 1);
    if (len > 0) /* resp may be NULL when there is nothing */
        memcpy(x->resp, resp, len);
    x->resp[len] = '\0';
    x->len = len;
}

static void
on_req_done(void *arg, int status)
{
    (void)arg;
    done_status = status;
}

static const struct pd_json_field fields[] = {
    {"name", PD_JSON_STRING, true},
};

static void
on_json(struct pd_http_req *r, json_t *body, void *arg)
{
    (void)arg;
    pd_http_respond_json(r, 201, json_pack("{s:s,s:b}", "hello",
                                           json_string_value(json_object_get(
                                               body, "name")),
                                           "injected",
                                           pd_http_req_injected(r)));
    json_decref(body);
}

static void
on_request(struct pd_http_req *r, void *arg)
{
    (void)arg;
    pd_http_on_done(r, on_req_done, NULL);
    if (strcmp(pd_http_req_path(r), "/hold") == 0) {
        held = r;
        return;
    }
    if (pd_http_req_is(r, "POST")) {
        pd_http_read_json(r, 1024, fields, 1, on_json, NULL);
        return;
    }
    pd_http_add_header(r, "X-Test", pd_http_req_header(r, "X-In"));
    pd_http_respond_json(r, 200, json_pack("{s:s}", "path",
                                           pd_http_req_target(r)));
}

static struct pd_http_server *
server(uv_loop_t *loop)
{
    struct pd_http_opts o;
    struct pd_http_server *s;
    char err[128];

    memset(&o, 0, sizeof(o));
    o.on_request = on_request;
    assert_int_equal(pd_http_server_new(loop, &o, &s, err, sizeof(err)), 0);
    assert_int_equal(pd_http_server_listen(s, "127.0.0.1:0", err,
                                           sizeof(err)), 0);
    return s;
}

static void
run_until(uv_loop_t *loop, const bool *flag)
{
    int i;

    for (i = 0; i < 1000 && !*flag; i++)
        uv_run(loop, UV_RUN_ONCE);
    assert_true(*flag);
}

static void
inject(struct pd_http_server *s, const char *raw, struct injected *x)
{
    memset(x, 0, sizeof(*x));
    assert_int_equal(pd_http_server_inject(s, raw, strlen(raw), "test",
                                           on_inject_done, x), 0);
    /* Never from inside the call. */
    assert_false(x->done);
}

static void
close_server(uv_loop_t *loop, struct pd_http_server *s)
{
    pd_http_server_close(s, NULL, NULL);
    while (uv_run(loop, UV_RUN_NOWAIT) != 0)
        ;
}

/* A GET runs through the handler; the response is collected whole. */
static void
test_inject_get(void **state)
{
    uv_loop_t loop;
    struct pd_http_server *s;
    struct injected x;

    (void)state;
    uv_loop_init(&loop);
    s = server(&loop);
    done_status = -1;
    inject(s, "GET /v1/x?y=1 HTTP/1.1\r\nHost: a\r\nX-In: v1\r\n"
              "Connection: close\r\n\r\n", &x);
    run_until(&loop, &x.done);
    assert_int_equal(x.err, 0);
    assert_non_null(strstr(x.resp, "HTTP/1.1 200 OK\r\n"));
    assert_non_null(strstr(x.resp, "X-Test: v1\r\n"));
    assert_non_null(strstr(x.resp, "{\"path\":\"/v1/x?y=1\"}"));
    assert_int_equal(done_status, 200);
    free(x.resp);
    close_server(&loop, s);
    uv_loop_close(&loop);
}

/* A body travels with the request; bad JSON gets the usual 400. */
static void
test_inject_post(void **state)
{
    uv_loop_t loop;
    struct pd_http_server *s;
    struct injected x, y;

    (void)state;
    uv_loop_init(&loop);
    s = server(&loop);
    inject(s, "POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 15\r\n"
              "Connection: close\r\n\r\n{\"name\": \"bob\"}", &x);
    inject(s, "POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
              "Connection: close\r\n\r\n{\"na\"", &y);
    run_until(&loop, &x.done);
    run_until(&loop, &y.done);
    assert_non_null(strstr(x.resp, "HTTP/1.1 201 Created\r\n"));
    assert_non_null(strstr(x.resp, "\"hello\":\"bob\""));
    assert_non_null(strstr(x.resp, "\"injected\":true"));
    assert_non_null(strstr(y.resp, "HTTP/1.1 400 "));
    assert_non_null(strstr(y.resp, "invalid_json"));
    free(x.resp);
    free(y.resp);
    close_server(&loop, s);
    uv_loop_close(&loop);
}

/* Garbage never reaches the handler: the server answers 400 itself. */
static void
test_inject_malformed(void **state)
{
    uv_loop_t loop;
    struct pd_http_server *s;
    struct injected x;

    (void)state;
    uv_loop_init(&loop);
    s = server(&loop);
    done_status = -1;
    inject(s, "NOT HTTP AT ALL\r\n\r\n", &x);
    run_until(&loop, &x.done);
    assert_non_null(strstr(x.resp, " 400 "));
    assert_int_equal(done_status, -1);
    free(x.resp);
    close_server(&loop, s);
    uv_loop_close(&loop);
}

/* A request still held when the server closes ends with an error, and
 * the handler can still finish it. */
static void
test_inject_server_close(void **state)
{
    uv_loop_t loop;
    struct pd_http_server *s;
    struct injected x;
    int i;

    (void)state;
    uv_loop_init(&loop);
    s = server(&loop);
    held = NULL;
    inject(s, "GET /hold HTTP/1.1\r\nHost: a\r\n\r\n", &x);
    for (i = 0; i < 100 && held == NULL; i++)
        uv_run(&loop, UV_RUN_ONCE);
    assert_non_null(held);
    pd_http_server_close(s, NULL, NULL);
    run_until(&loop, &x.done);
    assert_true(x.err < 0);
    assert_false(pd_http_req_connected(held));
    pd_http_respond_error(held, 503, "unavailable", "late");
    while (uv_run(&loop, UV_RUN_NOWAIT) != 0)
        ;
    free(x.resp);
    uv_loop_close(&loop);
}

/* After close, injecting is refused. */
static void
test_inject_after_close(void **state)
{
    uv_loop_t loop;
    struct pd_http_server *s;
    int x = 0;

    (void)state;
    uv_loop_init(&loop);
    s = server(&loop);
    pd_http_server_close(s, NULL, NULL);
    assert_int_equal(pd_http_server_inject(s, "GET / HTTP/1.1\r\n\r\n", 18,
                                           "t", on_inject_done, &x),
                     -ESHUTDOWN);
    while (uv_run(&loop, UV_RUN_NOWAIT) != 0)
        ;
    uv_loop_close(&loop);
}

/* Metrics: histograms by route, counters, sandboxes by state, nodes. */
static void
test_metrics_render(void **state)
{
    struct sched s;
    struct fsm_cmd cmd;
    struct fsm_result res;
    char err[128], *text;

    (void)state;
    memset(&s, 0, sizeof(s));
    s.cfg.id = 7;
    assert_int_equal(fsm_new(&s.fsm, err, sizeof(err)), 0);
    assert_int_equal(fsm_cmd_init(&cmd, FSM_CMD_NODE_REGISTER), 0);
    strcpy(cmd.u.node_register.node, "n1");
    strcpy(cmd.u.node_register.rpc_addr, "127.0.0.1:1");
    cmd.u.node_register.cpus = 8;
    cmd.u.node_register.memory_mb = 4096;
    cmd.u.node_register.disk_mb = 10000;
    assert_int_equal(fsm_apply_cmd(s.fsm, &cmd, &res), 0);
    assert_int_equal(res.code, 0);
    assert_int_equal(fsm_cmd_init(&cmd, FSM_CMD_SANDBOX_PLACE), 0);
    strcpy(cmd.u.place.sandbox, "a");
    strcpy(cmd.u.place.tenant, "t");
    strcpy(cmd.u.place.node, "n1");
    cmd.u.place.spec.cpus = 2;
    cmd.u.place.spec.memory_mb = 512;
    cmd.u.place.spec.disk_mb = 100;
    strcpy(cmd.u.place.spec.egress, "none");
    assert_int_equal(fsm_apply_cmd(s.fsm, &cmd, &res), 0);
    assert_int_equal(res.code, 0);

    assert_int_equal(sched_metrics_init(&s), 0);
    sched_metrics_api(&s, "/v1/sandboxes", 201, 3000);
    sched_metrics_api(&s, "/v1/sandboxes", 409, 20000000);
    sched_metrics_api(&s, "/v1/sandboxes", 0, 10);
    sched_metrics_inc(&s, "placements", 2);
    sched_metrics_inc(&s, "placements", 3);
    text = sched_metrics_render(&s);
    assert_non_null(text);
    assert_non_null(strstr(text, "paddock_scheduler_id 7\n"));
    assert_non_null(strstr(text, "paddock_placements_total 5\n"));
    assert_non_null(strstr(text, "paddock_api_request_duration_seconds_"
                           "bucket{route=\"/v1/sandboxes\",le=\"0.005\"} "
                           "2\n"));
    assert_non_null(strstr(text, "paddock_api_request_duration_seconds_"
                           "bucket{route=\"/v1/sandboxes\",le=\"+Inf\"} "
                           "3\n"));
    assert_non_null(strstr(text, "paddock_api_requests_total{route=\"/v1/"
                           "sandboxes\",status=\"4xx\"} 1\n"));
    assert_non_null(strstr(text, "paddock_node_allocated_cpus{node=\"n1\"} "
                           "2\n"));
    assert_non_null(strstr(text, "paddock_sandboxes{state=\"pending\"} "
                           "1\n"));
    free(text);
    sched_metrics_close(&s);
    fsm_free(s.fsm);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_inject_get),
        cmocka_unit_test(test_inject_post),
        cmocka_unit_test(test_inject_malformed),
        cmocka_unit_test(test_inject_server_close),
        cmocka_unit_test(test_inject_after_close),
        cmocka_unit_test(test_metrics_render),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
