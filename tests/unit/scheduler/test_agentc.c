/*
 * scheduler/agentc.c against a scripted agent on loopback (plaintext:
 * the TLS layer is proto/conn.c's and tested there). Proves multiplexed
 * requests, the end rules of each reply stream, flow control both ways,
 * ERROR status, CANCEL, a broken link failing every open request, the
 * reconnect after it, and bounded connect failures.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/log.h"
#include "proto/conn.h"
#include "proto/msgtypes.h"
#include "scheduler/sched.h"

#define CHUNK (64u << 10)

/* ---- the scripted agent ----------------------------------------------- */

struct fstream {
    uint64_t id;
    uint64_t left;   /* FILE_READ bytes still to send */
    uint64_t credit; /* our send window */
    uint64_t wrote;  /* FILE_WRITE bytes received */
    struct fstream *next;
};

static struct {
    uv_loop_t *loop;
    uv_tcp_t server, silent;
    int port, silent_port;
    struct pd_conn *conn;
    struct fstream *streams;
    int cancels;
    int conns;
    int pings;
    uint64_t max_unacked; /* most read payload in flight without grant */
} fa;

static struct fstream *
fs_get(uint64_t id)
{
    struct fstream *f;

    for (f = fa.streams; f != NULL; f = f->next)
        if (f->id == id)
            return f;
    f = calloc(1, sizeof(*f));
    f->id = id;
    f->credit = PD_STREAM_WINDOW;
    f->next = fa.streams;
    fa.streams = f;
    return f;
}

static void
pump_read(struct pd_conn *c, struct fstream *f)
{
    static char buf[CHUNK];
    struct pd_enc e;

    while (f->left > 0 && f->credit > 0) {
        size_t n = f->left < CHUNK ? f->left : CHUNK;

        if (n > f->credit)
            n = f->credit;
        pd_enc_begin(&e, PD_MSG_DATA, f->id);
        pd_enc_bin(&e, "data", buf, n);
        pd_enc_bool(&e, "eof", false);
        pd_conn_send(c, &e);
        f->left -= n;
        f->credit -= n;
        if (PD_STREAM_WINDOW - f->credit > fa.max_unacked)
            fa.max_unacked = PD_STREAM_WINDOW - f->credit;
        if (f->left == 0) {
            pd_enc_begin(&e, PD_MSG_DATA, f->id);
            pd_enc_bool(&e, "eof", true);
            pd_conn_send(c, &e);
        }
    }
}

static void
fa_on_msg(struct pd_conn *c, const struct pd_msg *m)
{
    struct pd_enc e;
    uint64_t v;
    const void *p;
    size_t n = 0;
    bool eof = false;
    struct fstream *f;

    switch (m->type) {
    case PD_MSG_HELLO:
        return;
    case PD_MSG_EXEC:
        pd_enc_begin(&e, PD_MSG_EXEC_START, m->id);
        pd_enc_u64(&e, "pid", 42);
        pd_conn_send(c, &e);
        pd_enc_begin(&e, PD_MSG_STDOUT, m->id);
        pd_enc_bin(&e, "data", "hello", 5);
        pd_conn_send(c, &e);
        pd_enc_begin(&e, PD_MSG_STDERR, m->id);
        pd_enc_bin(&e, "data", "oops", 4);
        pd_conn_send(c, &e);
        pd_enc_begin(&e, PD_MSG_EXIT, m->id);
        pd_enc_i64(&e, "exit_code", 3);
        pd_conn_send(c, &e);
        return;
    case PD_MSG_FILE_READ:
        f = fs_get(m->id);
        pd_msg_u64(m, "size", &f->left);
        pd_enc_begin(&e, PD_MSG_OK, m->id);
        pd_enc_u64(&e, "size", f->left);
        pd_conn_send(c, &e);
        pump_read(c, f);
        return;
    case PD_MSG_FILE_WRITE:
        fs_get(m->id);
        return;
    case PD_MSG_WINDOW:
        f = fs_get(m->id);
        if (pd_msg_u64(m, "bytes", &v) == 0)
            f->credit += v;
        pump_read(c, f);
        return;
    case PD_MSG_DATA:
        f = fs_get(m->id);
        pd_msg_bin(m, "data", &p, &n);
        pd_msg_bool(m, "eof", &eof);
        f->wrote += n;
        /* The client must stay within the window we grant. */
        assert_true(f->wrote <= f->credit);
        if (n > 0) {
            pd_enc_begin(&e, PD_MSG_WINDOW, m->id);
            pd_enc_u64(&e, "bytes", n);
            pd_conn_send(c, &e);
            f->credit += n;
        }
        if (eof) {
            pd_enc_begin(&e, PD_MSG_OK, m->id);
            pd_enc_u64(&e, "size", f->wrote);
            pd_conn_send(c, &e);
        }
        return;
    case PD_MSG_PROC_LIST:
        pd_conn_send_error(c, m->id, ENOENT, "no such thing");
        return;
    case PD_MSG_TUNNEL_OPEN:
        pd_enc_begin(&e, PD_MSG_OK, m->id);
        pd_conn_send(c, &e);
        pd_enc_begin(&e, PD_MSG_DATA, m->id);
        pd_enc_bin(&e, "data", "pong", 4);
        pd_conn_send(c, &e);
        pd_enc_begin(&e, PD_MSG_DATA, m->id);
        pd_enc_bool(&e, "eof", true);
        pd_conn_send(c, &e);
        return;
    case PD_MSG_CANCEL:
        fa.cancels++;
        return;
    case PD_MSG_PING:
        fa.pings++; /* never answered: this agent is "frozen" */
        return;
    case PD_MSG_SHUTDOWN:
        pd_conn_close(c, -ECONNRESET, "scripted drop");
        return;
    default:
        return; /* INFO and others: never answered */
    }
}

static void
fa_on_close(struct pd_conn *c, int reason)
{
    (void)reason;
    if (fa.conn == c)
        fa.conn = NULL;
}

static void
fa_on_conn(uv_stream_t *server, int status)
{
    static const struct pd_conn_cb cb = {
        .on_msg = fa_on_msg,
        .on_close = fa_on_close,
    };
    struct pd_conn_opts o = {.role = "agent", .name = "n1",
                             .subject = "fake"};
    uv_tcp_t *tcp = malloc(sizeof(*tcp));

    assert_int_equal(status, 0);
    uv_tcp_init(fa.loop, tcp);
    assert_int_equal(uv_accept(server, (uv_stream_t *)tcp), 0);
    fa.conns++;
    fa.conn = pd_conn_new((uv_stream_t *)tcp, &o, &cb, NULL);
}

/* Accepts nothing: the kernel completes the TCP handshake, no HELLO. */
static void
silent_on_conn(uv_stream_t *server, int status)
{
    (void)server;
    (void)status;
}

static int
listen_on(uv_tcp_t *t, uv_connection_cb cb)
{
    struct sockaddr_in sa;
    struct sockaddr_storage b;
    int len = sizeof(b);

    uv_tcp_init(fa.loop, t);
    uv_ip4_addr("127.0.0.1", 0, &sa);
    assert_int_equal(uv_tcp_bind(t, (struct sockaddr *)&sa, 0), 0);
    assert_int_equal(uv_listen((uv_stream_t *)t, 16, cb), 0);
    uv_tcp_getsockname(t, (struct sockaddr *)&b, &len);
    return ntohs(((struct sockaddr_in *)&b)->sin_port);
}

/* ---- the client under test -------------------------------------------- */

static struct sched S;
static char addr[64];

struct rec {
    int frames, ends, status;
    bool has_m;
    unsigned last_type, end_type;
    char out[64];
    size_t outlen;
    uint64_t bytes;
    int64_t exit_code;
    bool cancel_me; /* cancel from inside on_frame */
    struct sched_areq *q;
};

static void
rec_frame(struct sched_areq *q, const struct pd_msg *m, void *data)
{
    struct rec *r = data;
    const void *p;
    size_t n;

    r->frames++;
    r->last_type = m->type;
    if (pd_msg_bin(m, "data", &p, &n) == 0) {
        r->bytes += n;
        if (m->type == PD_MSG_STDOUT && r->outlen + n < sizeof(r->out)) {
            memcpy(r->out + r->outlen, p, n);
            r->outlen += n;
        }
    }
    if (r->cancel_me)
        sched_areq_cancel(q);
}

static void
rec_end(struct sched_areq *q, int status, const struct pd_msg *m, void *data)
{
    struct rec *r = data;

    (void)q;
    r->ends++;
    r->status = status;
    r->has_m = m != NULL;
    if (m != NULL) {
        r->end_type = m->type;
        pd_msg_i64(m, "exit_code", &r->exit_code);
    }
}

static const struct sched_areq_cb rec_cb = {rec_frame, rec_end, NULL};

static void
on_guard(uv_timer_t *t)
{
    (void)t;
    fail_msg("test timed out");
}

/* Runs the loop until *flag reaches want (20 s at most). */
static void
run_until(const int *flag, int want)
{
    uv_timer_t guard;

    uv_timer_init(fa.loop, &guard);
    uv_timer_start(&guard, on_guard, 20000, 0);
    while (*flag < want)
        uv_run(fa.loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&guard, NULL);
    uv_run(fa.loop, UV_RUN_NOWAIT);
}

static struct sched_areq *
request(const char *to, unsigned type, struct rec *r, uint64_t size)
{
    struct pd_enc e;

    pd_enc_begin(&e, type, 0);
    pd_enc_str(&e, "sandbox", "sb1");
    if (size > 0)
        pd_enc_u64(&e, "size", size);
    r->q = sched_agentc_send(&S, to, &e, &rec_cb, r);
    return r->q;
}

static int
setup(void **state)
{
    char err[128];

    (void)state;
    memset(&fa, 0, sizeof(fa));
    fa.loop = uv_default_loop();
    fa.port = listen_on(&fa.server, fa_on_conn);
    fa.silent_port = listen_on(&fa.silent, silent_on_conn);
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", fa.port);
    memset(&S, 0, sizeof(S));
    S.loop = fa.loop;
    S.cfg.id = 7;
    assert_int_equal(sched_agentc_init(&S, err, sizeof(err)), 0);
    return 0;
}

static void
test_exec_stream(void **state)
{
    struct rec r = {0};

    (void)state;
    assert_non_null(request(addr, PD_MSG_EXEC, &r, 0));
    assert_true(sched_areq_id(r.q) > 0);
    run_until(&r.ends, 1);
    assert_int_equal(r.frames, 3); /* EXEC_START, STDOUT, STDERR */
    assert_int_equal(r.status, 0);
    assert_int_equal(r.end_type, PD_MSG_EXIT);
    assert_int_equal(r.exit_code, 3);
    assert_memory_equal(r.out, "hello", 5);
}

static void
test_error_status(void **state)
{
    struct rec r = {0};

    (void)state;
    request(addr, PD_MSG_PROC_LIST, &r, 0);
    run_until(&r.ends, 1);
    assert_int_equal(r.status, -ENOENT);
    assert_true(r.has_m);
    assert_int_equal(r.end_type, PD_MSG_ERROR);
}

/* A stream larger than the window completes: the client grants back. */
static void
test_read_window(void **state)
{
    struct rec r = {0};
    const uint64_t size = 3 * PD_STREAM_WINDOW + 12345;

    (void)state;
    fa.max_unacked = 0;
    request(addr, PD_MSG_FILE_READ, &r, size);
    run_until(&r.ends, 1);
    assert_int_equal(r.status, 0);
    assert_int_equal(r.bytes, size);
    assert_int_equal(r.end_type, PD_MSG_DATA);
    assert_true(fa.max_unacked <= PD_STREAM_WINDOW);
}

/* Manual mode: nothing is granted until the caller says so. */
static void
test_manual_window(void **state)
{
    struct rec r = {0};
    int frames;

    (void)state;
    request(addr, PD_MSG_FILE_READ, &r, 2 * PD_STREAM_WINDOW);
    sched_areq_manual_window(r.q);
    run_until(&r.frames, 1 + PD_STREAM_WINDOW / CHUNK);
    /* The window is spent; give the loop a chance to deliver more. */
    for (int i = 0; i < 50; i++)
        uv_run(fa.loop, UV_RUN_NOWAIT);
    frames = r.frames;
    assert_int_equal(r.bytes, PD_STREAM_WINDOW);
    assert_int_equal(r.ends, 0);
    sched_areq_grant(r.q, PD_STREAM_WINDOW);
    run_until(&r.ends, 1);
    assert_true(r.frames > frames);
    assert_int_equal(r.bytes, 2 * PD_STREAM_WINDOW);
}

struct upload {
    struct sched_areq *q;
    uint64_t left, sent;
    bool eof_sent;
    int ends, status;
    uint64_t size;
};

static void
up_pump(struct upload *u)
{
    static char buf[CHUNK];
    struct pd_enc e;

    while (!u->eof_sent && sched_areq_credit(u->q) > 0 &&
           sched_areq_queued(u->q) < PD_CONN_HIGH_WATER) {
        uint64_t n = u->left < CHUNK ? u->left : CHUNK;

        if (n > sched_areq_credit(u->q))
            n = sched_areq_credit(u->q);
        pd_enc_begin(&e, PD_MSG_DATA, 0);
        pd_enc_bin(&e, "data", buf, n);
        pd_enc_bool(&e, "eof", u->left == n);
        assert_int_equal(sched_areq_send(u->q, &e), 0);
        u->left -= n;
        u->sent += n;
        u->eof_sent = u->left == 0;
    }
}

static void
up_writable(struct sched_areq *q, void *data)
{
    (void)q;
    up_pump(data);
}

static void
up_frame(struct sched_areq *q, const struct pd_msg *m, void *data)
{
    (void)q;
    (void)m;
    (void)data;
}

static void
up_end(struct sched_areq *q, int status, const struct pd_msg *m, void *data)
{
    struct upload *u = data;

    (void)q;
    u->ends++;
    u->status = status;
    if (m != NULL)
        pd_msg_u64(m, "size", &u->size);
}

static void
test_upload_credit(void **state)
{
    static const struct sched_areq_cb cb = {up_frame, up_end, up_writable};
    struct upload u = {.left = 3 * PD_STREAM_WINDOW + 7};
    struct pd_enc e;

    (void)state;
    pd_enc_begin(&e, PD_MSG_FILE_WRITE, 0);
    pd_enc_str(&e, "path", "/x");
    u.q = sched_agentc_send(&S, addr, &e, &cb, &u);
    assert_non_null(u.q);
    assert_int_equal(sched_areq_credit(u.q), PD_STREAM_WINDOW);
    up_pump(&u);
    assert_int_equal(u.sent, PD_STREAM_WINDOW); /* then waits for WINDOW */
    run_until(&u.ends, 1);
    assert_int_equal(u.status, 0);
    assert_int_equal(u.size, 3 * PD_STREAM_WINDOW + 7);
}

/* Requests share one link; cancelling one leaves the other. */
static void
test_multiplex_cancel(void **state)
{
    struct rec slow = {0}, fast = {0}, self = {0};
    int conns = fa.conns, cancels = fa.cancels;

    (void)state;
    request(addr, PD_MSG_INFO, &slow, 0);
    request(addr, PD_MSG_EXEC, &fast, 0);
    assert_int_not_equal(sched_areq_id(slow.q), sched_areq_id(fast.q));
    run_until(&fast.ends, 1);
    assert_int_equal(slow.ends, 0);
    sched_areq_cancel(slow.q);
    run_until(&fa.cancels, cancels + 1);
    assert_int_equal(slow.ends, 0);

    /* Cancel from inside on_frame: no further callbacks. */
    self.cancel_me = true;
    request(addr, PD_MSG_EXEC, &self, 0);
    run_until(&fa.cancels, cancels + 2);
    assert_int_equal(self.frames, 1);
    assert_int_equal(self.ends, 0);
    assert_int_equal(fa.conns, conns); /* same connection throughout */
}

static void
test_broken_link(void **state)
{
    struct rec a = {0}, b = {0}, drop = {0}, after = {0};
    int conns = fa.conns;

    (void)state;
    request(addr, PD_MSG_INFO, &a, 0);
    request(addr, PD_MSG_INFO, &b, 0);
    request(addr, PD_MSG_SHUTDOWN, &drop, 0);
    run_until(&b.ends, 1);
    run_until(&a.ends, 1);
    assert_true(a.status < 0);
    assert_false(a.has_m);
    assert_true(b.status < 0);
    run_until(&drop.ends, 1);

    request(addr, PD_MSG_EXEC, &after, 0);
    run_until(&after.ends, 1);
    assert_int_equal(after.status, 0);
    assert_int_equal(fa.conns, conns + 1);
}

static void
test_connect_failures(void **state)
{
    struct rec refused = {0}, silent = {0}, bad = {0};
    char to[64];
    uint64_t t0;

    (void)state;
    /* A port nobody listens on: refused at once. */
    uv_tcp_t tmp;
    int port = listen_on(&tmp, silent_on_conn);

    uv_close((uv_handle_t *)&tmp, NULL);
    uv_run(fa.loop, UV_RUN_NOWAIT);
    snprintf(to, sizeof(to), "127.0.0.1:%d", port);
    request(to, PD_MSG_EXEC, &refused, 0);
    run_until(&refused.ends, 1);
    assert_int_equal(refused.status, -ECONNREFUSED);

    /* Accepted by the kernel, never a HELLO: bounded by the timeout. */
    snprintf(to, sizeof(to), "127.0.0.1:%d", fa.silent_port);
    t0 = pd_now_ms();
    request(to, PD_MSG_EXEC, &silent, 0);
    run_until(&silent.ends, 1);
    assert_int_equal(silent.status, -ETIMEDOUT);
    assert_true(pd_now_ms() - t0 < 6000);

    /* An address that does not parse fails at once, synchronously. */
    assert_null(request("nowhere", PD_MSG_EXEC, &bad, 0));
    assert_int_equal(bad.ends, 1);
    assert_true(bad.status < 0);
}

/* A tunnel's first OK opens it and it ends once eof went both ways. */
static void
test_tunnel_ends_both_ways(void **state)
{
    struct rec r = {0};
    struct pd_enc e;

    (void)state;
    request(addr, PD_MSG_TUNNEL_OPEN, &r, 0);
    run_until(&r.frames, 3); /* OK, DATA "pong", DATA eof */
    assert_int_equal(r.ends, 0);
    assert_int_equal(r.bytes, 4);
    pd_enc_begin(&e, PD_MSG_DATA, 0);
    pd_enc_bool(&e, "eof", true);
    assert_int_equal(sched_areq_send(r.q, &e), 0);
    assert_int_equal(r.ends, 1);
    assert_int_equal(r.status, 0);
}

/* A link that answers nothing, not even PINGs, fails its requests. */
static void
test_silent_agent(void **state)
{
    struct rec r = {0};
    uint64_t t0 = pd_now_ms();

    (void)state;
    request(addr, PD_MSG_INFO, &r, 0);
    run_until(&r.ends, 1);
    assert_int_equal(r.status, -ETIMEDOUT);
    assert_false(r.has_m);
    assert_true(fa.pings >= 1);
    assert_true(pd_now_ms() - t0 >= 9000);
}

static int
teardown(void **state)
{
    struct rec r = {0};

    (void)state;
    request(addr, PD_MSG_INFO, &r, 0);
    sched_agentc_close(&S);
    assert_int_equal(r.ends, 1);
    assert_int_equal(r.status, -ESHUTDOWN);
    if (fa.conn != NULL)
        pd_conn_close(fa.conn, 0, "done");
    uv_close((uv_handle_t *)&fa.server, NULL);
    uv_close((uv_handle_t *)&fa.silent, NULL);
    uv_run(fa.loop, UV_RUN_DEFAULT);
    while (fa.streams != NULL) {
        struct fstream *f = fa.streams;

        fa.streams = f->next;
        free(f);
    }
    return 0;
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exec_stream),
        cmocka_unit_test(test_error_status),
        cmocka_unit_test(test_read_window),
        cmocka_unit_test(test_manual_window),
        cmocka_unit_test(test_upload_credit),
        cmocka_unit_test(test_multiplex_cancel),
        cmocka_unit_test(test_broken_link),
        cmocka_unit_test(test_connect_failures),
        cmocka_unit_test(test_tunnel_ends_both_ways),
        cmocka_unit_test(test_silent_agent),
    };

    pd_log_init("test_agentc", PD_LOG_WARN);
    return cmocka_run_group_tests(tests, setup, teardown);
}
