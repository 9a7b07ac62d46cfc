/*
 * scheduler/io.c over agentc.c, without VMs: the real HTTP server with
 * io.c's routes, the sandbox lookup and ensure replaced by stubs, and a
 * scripted agent on loopback. Proves backpressure both ways (an upload to
 * an agent that stops granting pauses the HTTP body; a download to a
 * client that stops reading stops the agent), the guest errno to HTTP
 * status table, and the "replaced" marks. Clients run in a thread with
 * blocking sockets; the loop runs here.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/log.h"
#include "proto/conn.h"
#include "proto/msgtypes.h"
#include "scheduler/sched.h"

#define MIB (1u << 20)
#define BIG (64u * MIB)

/* ---- stubs for the modules io.c calls ------------------------------------ */

static char agent_addr[64];

int
sched_sandbox_lookup(struct sched_call *c, struct pd_http_req *r,
                     const char *id, struct fsm_sandbox *out)
{
    (void)c;
    if (strcmp(id, "sb1") != 0 && strcmp(id, "lost1") != 0) {
        pd_http_respond_error(r, 404, "not_found", "sandbox %s not found",
                              id);
        return -ENOENT;
    }
    memset(out, 0, sizeof(*out));
    pd_strlcpy(out->id, id, sizeof(out->id));
    return 0;
}

void
sched_sandbox_ensure(struct sched *s, const char *id, sched_ensure_cb cb,
                     void *data)
{
    struct fsm_sandbox row;

    (void)s;
    memset(&row, 0, sizeof(row));
    pd_strlcpy(row.id, id, sizeof(row.id));
    pd_strlcpy(row.node, "n1", sizeof(row.node));
    row.state = FSM_SB_RUNNING;
    cb(data, 0, "", &row, strcmp(id, "lost1") == 0);
}

void
fsm_sandbox_clear(struct fsm_sandbox *sb)
{
    (void)sb;
}

int
fsm_node_get(struct fsm *f, const char *id, struct fsm_node *out)
{
    (void)f;
    memset(out, 0, sizeof(*out));
    pd_strlcpy(out->id, id, sizeof(out->id));
    pd_strlcpy(out->rpc_addr, agent_addr, sizeof(out->rpc_addr));
    return 0;
}

void
fsm_node_clear(struct fsm_node *n)
{
    (void)n;
}

void
sched_metrics_inc(struct sched *s, const char *counter, uint64_t n)
{
    (void)s;
    (void)counter;
    (void)n;
}

/* ---- the scripted agent -------------------------------------------------- */

static struct {
    uv_loop_t *loop;
    uv_tcp_t server;
    struct pd_conn *conn;
    bool hold_grants;      /* FILE_WRITE: stop granting WINDOW */
    uint64_t write_id;
    uint64_t received;     /* FILE_WRITE payload */
    uint64_t withheld;     /* grants not sent while holding */
    uint64_t read_id;
    uint64_t read_left, read_credit, read_sent;
} ag;

static void
read_pump(void)
{
    static char buf[256 << 10];
    struct pd_enc e;

    while (ag.conn != NULL && ag.read_left > 0 && ag.read_credit > 0) {
        size_t n = ag.read_left < sizeof(buf) ? ag.read_left : sizeof(buf);

        if (n > ag.read_credit)
            n = ag.read_credit;
        pd_enc_begin(&e, PD_MSG_DATA, ag.read_id);
        pd_enc_bin(&e, "data", buf, n);
        pd_enc_bool(&e, "eof", false);
        pd_conn_send(ag.conn, &e);
        ag.read_left -= n;
        ag.read_credit -= n;
        ag.read_sent += n;
        if (ag.read_left == 0) {
            pd_enc_begin(&e, PD_MSG_DATA, ag.read_id);
            pd_enc_bool(&e, "eof", true);
            pd_conn_send(ag.conn, &e);
        }
    }
}

static void
grant(uint64_t id, uint64_t n)
{
    struct pd_enc e;

    pd_enc_begin(&e, PD_MSG_WINDOW, id);
    pd_enc_u64(&e, "bytes", n);
    pd_conn_send(ag.conn, &e);
}

/* FILE_DELETE's path names the errno the guest answers with. */
static void
answer_delete(struct pd_conn *c, const struct pd_msg *m)
{
    static const struct {
        const char *path;
        int err;
    } t[] = {
        {"/enoent", ENOENT}, {"/eisdir", EISDIR}, {"/enotempty", ENOTEMPTY},
        {"/enospc", ENOSPC}, {"/eacces", EACCES}, {"/eoverflow", EOVERFLOW},
    };
    char path[64] = "";
    struct pd_enc e;

    pd_msg_cstr(m, "path", path, sizeof(path));
    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        if (strcmp(path, t[i].path) == 0) {
            pd_conn_send_error(c, m->id, t[i].err, "%s: %s", path,
                               strerror(t[i].err));
            return;
        }
    }
    pd_enc_begin(&e, PD_MSG_OK, m->id);
    pd_conn_send(c, &e);
}

static void
ag_on_msg(struct pd_conn *c, const struct pd_msg *m)
{
    struct pd_enc e;
    const void *p;
    size_t n = 0;
    bool eof = false;
    uint64_t v;

    switch (m->type) {
    case PD_MSG_EXEC:
        pd_enc_begin(&e, PD_MSG_EXIT, m->id);
        pd_enc_i64(&e, "exit_code", 0);
        pd_enc_bin(&e, "stdout", "ok\n", 3);
        pd_enc_bin(&e, "stderr", "\xff\xfe", 2); /* not UTF-8 */
        pd_conn_send(c, &e);
        return;
    case PD_MSG_FILE_DELETE:
        answer_delete(c, m);
        return;
    case PD_MSG_FILE_WRITE:
        ag.write_id = m->id;
        ag.received = 0;
        return;
    case PD_MSG_FILE_READ:
        ag.read_id = m->id;
        ag.read_left = BIG;
        ag.read_credit = PD_STREAM_WINDOW;
        ag.read_sent = 0;
        pd_enc_begin(&e, PD_MSG_OK, m->id);
        pd_enc_u64(&e, "size", BIG);
        pd_conn_send(c, &e);
        read_pump();
        return;
    case PD_MSG_WINDOW:
        if (m->id == ag.read_id && pd_msg_u64(m, "bytes", &v) == 0) {
            ag.read_credit += v;
            read_pump();
        }
        return;
    case PD_MSG_DATA:
        if (m->id != ag.write_id)
            return;
        pd_msg_bin(m, "data", &p, &n);
        pd_msg_bool(m, "eof", &eof);
        ag.received += n;
        if (ag.hold_grants)
            ag.withheld += n;
        else if (n > 0)
            grant(m->id, n);
        if (eof) {
            pd_enc_begin(&e, PD_MSG_OK, m->id);
            pd_enc_u64(&e, "size", ag.received);
            pd_conn_send(c, &e);
        }
        return;
    default:
        return;
    }
}

static void
ag_on_close(struct pd_conn *c, int reason)
{
    (void)reason;
    if (ag.conn == c)
        ag.conn = NULL;
}

static void
ag_on_conn(uv_stream_t *server, int status)
{
    static const struct pd_conn_cb cb = {.on_msg = ag_on_msg,
                                         .on_close = ag_on_close};
    struct pd_conn_opts o = {.role = "agent", .name = "n1",
                             .subject = "fake agent"};
    uv_tcp_t *tcp = malloc(sizeof(*tcp));

    assert_int_equal(status, 0);
    uv_tcp_init(ag.loop, tcp);
    assert_int_equal(uv_accept(server, (uv_stream_t *)tcp), 0);
    ag.conn = pd_conn_new((uv_stream_t *)tcp, &o, &cb, NULL);
}

/* ---- the scheduler side -------------------------------------------------- */

static struct sched S;
static struct pd_http_server *api;
static int api_port;

static void
on_request(struct pd_http_req *r, void *arg)
{
    struct sched_call call = {.s = arg};

    call.who.role = SCHED_ROLE_ADMIN;
    pd_http_dispatch(r, sched_io_routes, sched_io_nroutes, &call);
}

/* ---- a blocking HTTP client in a thread ---------------------------------- */

struct client {
    pthread_t t;
    const char *method, *target;
    const char *body;          /* small body, or NULL */
    uint64_t upload;           /* bytes of a large body to send */
    volatile uint64_t sent;    /* large body bytes the kernel took */
    bool wait_before_read;     /* hold reading until released */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool released;
    volatile bool done;
    int status;
    char head[4096];
    char *resp;                /* first 64 KiB of the body */
    uint64_t resp_len;         /* whole body length read */
};

static int
dial(void)
{
    struct sockaddr_in sa = {.sin_family = AF_INET};
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    sa.sin_port = htons((uint16_t)api_port);
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void *
client_run(void *arg)
{
    struct client *k = arg;
    static char chunk[256 << 10];
    char req[1024], buf[64 << 10];
    size_t blen = k->body ? strlen(k->body) : (size_t)k->upload;
    size_t have = 0;
    char *hend = NULL;
    int fd = dial(), n;

    n = snprintf(req, sizeof(req), "%s %s HTTP/1.1\r\nHost: t\r\n"
                 "Content-Length: %zu\r\nConnection: close\r\n\r\n%s",
                 k->method, k->target, blen, k->body ? k->body : "");
    if (fd < 0 || write(fd, req, (size_t)n) != n)
        goto out;
    while (k->sent < k->upload) {
        size_t w = k->upload - k->sent < sizeof(chunk)
                       ? (size_t)(k->upload - k->sent)
                       : sizeof(chunk);
        ssize_t got = write(fd, chunk, w);

        if (got <= 0)
            break;
        k->sent += (uint64_t)got;
    }
    if (k->wait_before_read) {
        pthread_mutex_lock(&k->mu);
        while (!k->released)
            pthread_cond_wait(&k->cv, &k->mu);
        pthread_mutex_unlock(&k->mu);
    }
    k->resp = calloc(1, sizeof(buf) + 1);
    for (;;) {
        ssize_t got = read(fd, buf, sizeof(buf));

        if (got <= 0)
            break;
        if (hend == NULL) {
            size_t room = sizeof(k->head) - 1 - have;
            size_t take = (size_t)got < room ? (size_t)got : room;

            memcpy(k->head + have, buf, take);
            have += take;
            k->head[have] = '\0';
            hend = strstr(k->head, "\r\n\r\n");
            if (hend != NULL) {
                size_t body = have - (size_t)(hend + 4 - k->head);

                memcpy(k->resp, hend + 4, body);
                k->resp_len = body + ((size_t)got - take);
            }
            continue;
        }
        if (k->resp_len < sizeof(buf))
            memcpy(k->resp + k->resp_len, buf,
                   (size_t)got < sizeof(buf) - k->resp_len
                       ? (size_t)got
                       : sizeof(buf) - k->resp_len);
        k->resp_len += (uint64_t)got;
    }
    sscanf(k->head, "HTTP/1.1 %d", &k->status);
out:
    if (fd >= 0)
        close(fd);
    k->done = true;
    return NULL;
}

static void
client_start(struct client *k)
{
    pthread_mutex_init(&k->mu, NULL);
    pthread_cond_init(&k->cv, NULL);
    assert_int_equal(pthread_create(&k->t, NULL, client_run, k), 0);
}

static void
client_release(struct client *k)
{
    pthread_mutex_lock(&k->mu);
    k->released = true;
    pthread_cond_signal(&k->cv);
    pthread_mutex_unlock(&k->mu);
}

static void
client_join(struct client *k)
{
    pthread_join(k->t, NULL);
    free(k->resp);
}

/* ---- loop helpers -------------------------------------------------------- */

static bool expired;

static void
on_deadline(uv_timer_t *t)
{
    (void)t;
    expired = true;
}

static void
on_tick(uv_timer_t *t)
{
    (void)t;
}

/* Runs the loop until cond() or ms pass, checking at least every 10 ms
 * (the client thread changes state the loop does not see); returns
 * cond(). */
static bool
run_for(bool (*cond)(void *), void *arg, uint64_t ms)
{
    uv_timer_t t, tick;

    expired = false;
    uv_timer_init(ag.loop, &t);
    uv_timer_start(&t, on_deadline, ms, 0);
    uv_timer_init(ag.loop, &tick);
    uv_timer_start(&tick, on_tick, 10, 10);
    while (!expired && !(cond != NULL && cond(arg)))
        uv_run(ag.loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&t, NULL);
    uv_close((uv_handle_t *)&tick, NULL);
    uv_run(ag.loop, UV_RUN_NOWAIT);
    return cond != NULL && cond(arg);
}

static bool
is_done(void *arg)
{
    return ((struct client *)arg)->done;
}

static struct client *
simple(struct client *k, const char *method, const char *target,
       const char *body)
{
    memset(k, 0, sizeof(*k));
    k->method = method;
    k->target = target;
    k->body = body;
    client_start(k);
    assert_true(run_for(is_done, k, 10000));
    return k;
}

/* ---- tests --------------------------------------------------------------- */

static void
test_exec_collected_and_replaced(void **state)
{
    struct client k;

    (void)state;
    simple(&k, "POST", "/v1/sandboxes/lost1/exec", "{\"argv\":[\"x\"]}");
    assert_int_equal(k.status, 200);
    assert_non_null(strstr(k.head, "X-Paddock-Replaced: true"));
    assert_non_null(strstr(k.resp, "\"replaced\":true"));
    assert_non_null(strstr(k.resp, "\"stdout\":\"ok\\n\""));
    /* Bytes that are not UTF-8 come lossy, and whole in base64. */
    assert_non_null(strstr(k.resp, "\"stderr_base64\":\"//4=\""));
    client_join(&k);

    simple(&k, "POST", "/v1/sandboxes/sb1/exec", "{\"argv\":[\"x\"]}");
    assert_int_equal(k.status, 200);
    assert_null(strstr(k.head, "X-Paddock-Replaced"));
    assert_null(strstr(k.resp, "replaced"));
    client_join(&k);
}

static void
test_errno_statuses(void **state)
{
    static const struct {
        const char *path;
        int status;
        const char *code;
    } t[] = {
        {"/enoent", 404, "not_found"},
        {"/eisdir", 400, "invalid_argument"},
        {"/enotempty", 409, "conflict"},
        {"/enospc", 507, "no_capacity"},
        {"/eacces", 403, "forbidden"},
        {"/eoverflow", 500, "internal"},
        {"/fine", 200, NULL},
    };
    char target[128], code[64];
    struct client k;

    (void)state;
    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        snprintf(target, sizeof(target), "/v1/sandboxes/sb1/files?path=%s",
                 t[i].path);
        simple(&k, "DELETE", target, NULL);
        assert_int_equal(k.status, t[i].status);
        if (t[i].code != NULL) {
            snprintf(code, sizeof(code), "\"code\":\"%s\"", t[i].code);
            assert_non_null(strstr(k.resp, code));
        }
        client_join(&k);
    }
    simple(&k, "DELETE", "/v1/sandboxes/other/files?path=/x", NULL);
    assert_int_equal(k.status, 404);
    client_join(&k);
}

static bool
agent_got_window(void *arg)
{
    (void)arg;
    return ag.received >= PD_STREAM_WINDOW;
}

static bool
upload_stalled(void *arg)
{
    static uint64_t last;
    static int same;
    struct client *k = arg;

    same = k->sent == last ? same + 1 : 0;
    last = k->sent;
    return same > 50;
}

/* An agent that stops granting: the scheduler stops reading the body. */
static void
test_upload_backpressure(void **state)
{
    struct client k = {.method = "PUT",
                       .target = "/v1/sandboxes/sb1/files?path=/big",
                       .upload = BIG};

    (void)state;
    ag.hold_grants = true;
    ag.withheld = 0;
    client_start(&k);
    assert_true(run_for(agent_got_window, NULL, 10000));
    run_for(upload_stalled, &k, 3000);
    /* The agent took one window; the client could push only what the
     * scheduler's small buffer and the sockets hold. */
    print_message("upload stalled: agent %llu KiB, client pushed %llu KiB "
                  "of %u MiB\n", (unsigned long long)ag.received >> 10,
                  (unsigned long long)k.sent >> 10, BIG / MIB);
    assert_int_equal(ag.received, PD_STREAM_WINDOW);
    assert_true(k.sent < 24u * MIB);
    assert_false(k.done);

    ag.hold_grants = false;
    grant(ag.write_id, ag.withheld);
    assert_true(run_for(is_done, &k, 20000));
    assert_int_equal(k.status, 200);
    assert_int_equal(ag.received, BIG);
    assert_non_null(strstr(k.resp, "\"size\":67108864"));
    client_join(&k);
}

static bool
agent_stalled(void *arg)
{
    static uint64_t last;
    static int same;

    (void)arg;
    same = ag.read_sent == last && ag.read_credit == 0 ? same + 1 : 0;
    last = ag.read_sent;
    return same > 50;
}

/* A client that stops reading: the agent is stopped by its window. */
static void
test_download_backpressure(void **state)
{
    struct client k = {.method = "GET",
                       .target = "/v1/sandboxes/sb1/files?path=/big",
                       .wait_before_read = true};

    (void)state;
    client_start(&k);
    run_for(agent_stalled, NULL, 5000);
    print_message("download stalled: agent sent %llu KiB of %u MiB\n",
                  (unsigned long long)ag.read_sent >> 10, BIG / MIB);
    assert_true(ag.read_sent < 24u * MIB);
    assert_true(ag.read_left > 0);
    client_release(&k);
    assert_true(run_for(is_done, &k, 20000));
    assert_int_equal(k.status, 200);
    assert_int_equal(k.resp_len, BIG);
    client_join(&k);
}

/* ---- setup --------------------------------------------------------------- */

static int
setup(void **state)
{
    struct pd_http_opts o = {.on_request = on_request, .arg = &S};
    struct sockaddr_in sa;
    struct sockaddr_storage b;
    int len = sizeof(b);
    char err[256];

    (void)state;
    ag.loop = uv_default_loop();
    uv_tcp_init(ag.loop, &ag.server);
    uv_ip4_addr("127.0.0.1", 0, &sa);
    assert_int_equal(uv_tcp_bind(&ag.server, (struct sockaddr *)&sa, 0), 0);
    assert_int_equal(uv_listen((uv_stream_t *)&ag.server, 16, ag_on_conn),
                     0);
    uv_tcp_getsockname(&ag.server, (struct sockaddr *)&b, &len);
    snprintf(agent_addr, sizeof(agent_addr), "127.0.0.1:%d",
             ntohs(((struct sockaddr_in *)&b)->sin_port));

    S.loop = ag.loop;
    S.cfg.id = 5;
    assert_int_equal(sched_agentc_init(&S, err, sizeof(err)), 0);
    assert_int_equal(pd_http_server_new(ag.loop, &o, &api, err,
                                        sizeof(err)), 0);
    assert_int_equal(pd_http_server_listen(api, "127.0.0.1:0", err,
                                           sizeof(err)), 0);
    api_port = pd_http_server_port(api);
    return 0;
}

static int
teardown(void **state)
{
    (void)state;
    sched_agentc_close(&S);
    pd_http_server_close(api, NULL, NULL);
    if (ag.conn != NULL)
        pd_conn_close(ag.conn, 0, "done");
    uv_close((uv_handle_t *)&ag.server, NULL);
    uv_run(ag.loop, UV_RUN_DEFAULT);
    return 0;
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exec_collected_and_replaced),
        cmocka_unit_test(test_errno_statuses),
        cmocka_unit_test(test_upload_backpressure),
        cmocka_unit_test(test_download_backpressure),
    };

    pd_log_init("test_agentc_io", PD_LOG_WARN);
    return cmocka_run_group_tests(tests, setup, teardown);
}
