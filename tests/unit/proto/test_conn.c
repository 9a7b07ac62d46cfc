/* Framed connections over real loopback TCP: HELLO exchange, version
 * mismatch, garbage, mutual TLS accepted and refused, backpressure. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/util.h"
#include "proto/conn.h"
#include "proto/tls.h"

struct side {
    struct pd_conn *conn;
    int msgs;
    int closed;
    int reason;
    int drains;
    unsigned last_type;
    char peer_cn[64];
};

struct fixture {
    uv_loop_t loop;
    uv_tcp_t server;
    int port;
    struct side srv, cli;
    SSL_CTX *srv_tls, *cli_tls;
    bool echo; /* server answers PING with PONG */
    char dir[64];
};

static struct fixture *F;

static void
on_msg(struct pd_conn *c, const struct pd_msg *m)
{
    struct side *s = pd_conn_data(c);

    s->msgs++;
    s->last_type = m->type;
    if (m->type == PD_MSG_HELLO)
        pd_conn_peer_cn(c, s->peer_cn, sizeof(s->peer_cn));
    if (s == &F->srv && m->type == PD_MSG_PING && F->echo) {
        struct pd_enc e;

        pd_enc_begin(&e, PD_MSG_PONG, m->id);
        pd_conn_send(c, &e);
    }
}

static void
on_close(struct pd_conn *c, int reason)
{
    struct side *s = pd_conn_data(c);

    s->closed++;
    s->reason = reason;
    s->conn = NULL;
}

static void
on_drain(struct pd_conn *c)
{
    struct side *s = pd_conn_data(c);

    s->drains++;
}

static const struct pd_conn_cb cbs = {on_msg, on_close, on_drain};

static void
on_connection(uv_stream_t *server, int status)
{
    uv_tcp_t *t = malloc(sizeof(*t));
    struct pd_conn_opts o = {.role = "agent", .name = "srv",
                             .tls = F->srv_tls, .tls_server = true,
                             .subject = "test server"};

    assert_int_equal(status, 0);
    uv_tcp_init(&F->loop, t);
    assert_int_equal(uv_accept(server, (uv_stream_t *)t), 0);
    F->srv.conn = pd_conn_new((uv_stream_t *)t, &o, &cbs, &F->srv);
}

static int
setup(void **state)
{
    struct sockaddr_in a;
    int len = sizeof(a);

    F = calloc(1, sizeof(*F));
    F->echo = true;
    uv_loop_init(&F->loop);
    uv_tcp_init(&F->loop, &F->server);
    uv_ip4_addr("127.0.0.1", 0, &a);
    assert_int_equal(uv_tcp_bind(&F->server, (struct sockaddr *)&a, 0), 0);
    assert_int_equal(uv_listen((uv_stream_t *)&F->server, 16,
                               on_connection), 0);
    uv_tcp_getsockname(&F->server, (struct sockaddr *)&a, &len);
    F->port = ntohs(a.sin_port);
    *state = F;
    return 0;
}

static void
close_walk(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static int
teardown(void **state)
{
    (void)state;
    if (F->srv.conn != NULL)
        pd_conn_close(F->srv.conn, -ECANCELED, "teardown");
    if (F->cli.conn != NULL)
        pd_conn_close(F->cli.conn, -ECANCELED, "teardown");
    uv_run(&F->loop, UV_RUN_NOWAIT);
    uv_walk(&F->loop, close_walk, NULL);
    uv_run(&F->loop, UV_RUN_DEFAULT);
    uv_loop_close(&F->loop);
    if (F->srv_tls)
        SSL_CTX_free(F->srv_tls);
    if (F->cli_tls)
        SSL_CTX_free(F->cli_tls);
    if (F->dir[0] != '\0')
        pd_rm_rf(F->dir);
    free(F);
    return 0;
}

/* Runs the loop until cond holds or 5 s pass. */
#define RUN_UNTIL(cond)                                                    \
    do {                                                                   \
        uint64_t end_ = pd_now_ms() + 5000;                                \
        while (!(cond) && pd_now_ms() < end_)                              \
            uv_run(&F->loop, UV_RUN_ONCE);                                 \
        assert_true(cond);                                                 \
    } while (0)

static void
on_connect(uv_connect_t *req, int status)
{
    struct pd_conn_opts o = {.role = "scheduler", .name = "cli",
                             .tls = F->cli_tls, .subject = "test client"};

    assert_int_equal(status, 0);
    F->cli.conn = pd_conn_new(req->handle, &o, &cbs, &F->cli);
    free(req);
}

static void
connect_client(void)
{
    uv_tcp_t *t = malloc(sizeof(*t));
    uv_connect_t *req = malloc(sizeof(*req));
    struct sockaddr_in a;

    uv_tcp_init(&F->loop, t);
    uv_ip4_addr("127.0.0.1", F->port, &a);
    assert_int_equal(uv_tcp_connect(req, t, (struct sockaddr *)&a,
                                    on_connect), 0);
}

static void
test_hello_ping(void **state)
{
    struct pd_enc e;

    (void)state;
    connect_client();
    RUN_UNTIL(F->cli.msgs >= 1 && F->srv.msgs >= 1);
    assert_string_equal(pd_conn_peer_role(F->cli.conn), "agent");
    assert_string_equal(pd_conn_peer_name(F->srv.conn), "cli");
    pd_enc_begin(&e, PD_MSG_PING, 7);
    assert_int_equal(pd_conn_send(F->cli.conn, &e), 0);
    RUN_UNTIL(F->cli.last_type == PD_MSG_PONG);
    pd_conn_close(F->cli.conn, 0, "done");
    RUN_UNTIL(F->srv.closed == 1 && F->cli.closed == 1);
    assert_int_equal(F->srv.reason, 0);
}

/* A raw client: writes bytes, then lets the server react. */
static int
raw_client(const void *bytes, size_t n)
{
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)F->port)};
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(write(fd, bytes, n), (ssize_t)n);
    return fd;
}

static size_t
raw_hello(unsigned char *out, unsigned version)
{
    struct pd_enc e;
    void *buf;
    size_t len;

    pd_enc_begin(&e, PD_MSG_HELLO, 0);
    pd_enc_u64(&e, "v", version);
    pd_enc_str(&e, "role", "scheduler");
    pd_enc_str(&e, "name", "raw");
    assert_int_equal(pd_enc_finish(&e, &buf, &len), 0);
    memcpy(out, buf, len);
    free(buf);
    return len;
}

static void
test_version_mismatch(void **state)
{
    unsigned char buf[4096];
    size_t n = raw_hello(buf, PD_PROTO_VERSION + 1);
    int fd = raw_client(buf, n);
    ssize_t got;

    (void)state;
    RUN_UNTIL(F->srv.closed == 1);
    assert_int_equal(F->srv.reason, -EPROTO);
    assert_int_equal(F->srv.msgs, 0);
    /* The refusal tells the peer why. */
    got = read(fd, buf, sizeof(buf));
    assert_true(got > 0);
    assert_non_null(memmem(buf, (size_t)got, "protocol version", 16));
    close(fd);
}

static void
test_garbage_closes(void **state)
{
    unsigned char buf[4096];
    size_t n = raw_hello(buf, PD_PROTO_VERSION);
    const unsigned char junk[] = {0, 0, 0, 5, 0xdd, 0xff, 0xff, 0xff, 0xff};
    int fd;

    (void)state;
    memcpy(buf + n, junk, sizeof(junk));
    fd = raw_client(buf, n + sizeof(junk));
    RUN_UNTIL(F->srv.closed == 1);
    assert_int_equal(F->srv.reason, -EPROTO);
    assert_int_equal(F->srv.msgs, 1); /* the HELLO only */
    close(fd);
}

static void
test_not_hello_first(void **state)
{
    struct pd_enc e;
    void *buf;
    size_t len;
    int fd;

    (void)state;
    pd_enc_begin(&e, PD_MSG_EXEC, 1);
    assert_int_equal(pd_enc_finish(&e, &buf, &len), 0);
    fd = raw_client(buf, len);
    free(buf);
    RUN_UNTIL(F->srv.closed == 1);
    assert_int_equal(F->srv.reason, -EPROTO);
    close(fd);
}

static void
test_backpressure(void **state)
{
    static char chunk[PD_CHUNK_MAX];
    int sent = 0;

    (void)state;
    F->echo = false;
    connect_client();
    RUN_UNTIL(F->cli.msgs >= 1);
    /* The server stops reading: the client's queue must grow past the high
     * mark, and drain once reading resumes. */
    pd_conn_pause(F->srv.conn);
    while (pd_conn_queued(F->cli.conn) < PD_CONN_HIGH_WATER && sent < 64) {
        struct pd_enc e;

        pd_enc_begin(&e, PD_MSG_DATA, 3);
        pd_enc_bin(&e, "data", chunk, sizeof(chunk));
        assert_int_equal(pd_conn_send(F->cli.conn, &e), 0);
        sent++;
        uv_run(&F->loop, UV_RUN_NOWAIT);
    }
    assert_true(pd_conn_queued(F->cli.conn) >= PD_CONN_HIGH_WATER);
    pd_conn_resume(F->srv.conn);
    RUN_UNTIL(F->cli.drains >= 1);
    RUN_UNTIL(F->srv.msgs == 1 + sent);
}

static void
make_certs(void)
{
    char cmd[2048];

    snprintf(F->dir, sizeof(F->dir), "/tmp/pd-conn-XXXXXX");
    assert_non_null(mkdtemp(F->dir));
    snprintf(cmd, sizeof(cmd),
             "cd %s && "
             "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 "
             "-nodes -keyout ca.key -out ca.pem -subj /CN=test-ca -days 1 "
             "2>/dev/null && "
             "for n in srv cli; do "
             "openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
             "-keyout $n.key -out $n.csr -subj /CN=$n 2>/dev/null && "
             "openssl x509 -req -in $n.csr -CA ca.pem -CAkey ca.key "
             "-CAcreateserial -out $n.pem -days 1 2>/dev/null; done && "
             "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 "
             "-nodes -keyout rogue.key -out rogue.pem -subj /CN=rogue "
             "-days 1 2>/dev/null",
             F->dir);
    assert_int_equal(system(cmd), 0);
}

static SSL_CTX *
ctx(bool server, const char *name, bool with_cert)
{
    char cert[128], key[128], ca[128], err[256];
    SSL_CTX *c;

    snprintf(cert, sizeof(cert), "%s/%s.pem", F->dir, name);
    snprintf(key, sizeof(key), "%s/%s.key", F->dir, name);
    snprintf(ca, sizeof(ca), "%s/ca.pem", F->dir);
    c = pd_tls_ctx_new(server, with_cert ? cert : NULL,
                       with_cert ? key : NULL, ca, err, sizeof(err));
    if (c == NULL)
        fail_msg("%s", err);
    return c;
}

static void
test_mutual_tls(void **state)
{
    struct pd_enc e;

    (void)state;
    make_certs();
    F->srv_tls = ctx(true, "srv", true);
    F->cli_tls = ctx(false, "cli", true);
    connect_client();
    RUN_UNTIL(F->cli.msgs >= 1 && F->srv.msgs >= 1);
    assert_string_equal(F->srv.peer_cn, "cli");
    assert_string_equal(F->cli.peer_cn, "srv");
    pd_enc_begin(&e, PD_MSG_PING, 9);
    pd_conn_send(F->cli.conn, &e);
    RUN_UNTIL(F->cli.last_type == PD_MSG_PONG);
}

static void
test_tls_refuses_no_cert(void **state)
{
    (void)state;
    make_certs();
    F->srv_tls = ctx(true, "srv", true);
    F->cli_tls = ctx(false, "cli", false);
    connect_client();
    RUN_UNTIL(F->srv.closed == 1);
    assert_int_equal(F->srv.msgs, 0);
    assert_true(F->srv.reason < 0);
}

static void
test_tls_refuses_rogue_cert(void **state)
{
    (void)state;
    make_certs();
    F->srv_tls = ctx(true, "srv", true);
    F->cli_tls = ctx(false, "rogue", true);
    connect_client();
    RUN_UNTIL(F->srv.closed == 1);
    assert_int_equal(F->srv.msgs, 0);
    assert_true(F->srv.reason < 0);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_hello_ping, setup, teardown),
        cmocka_unit_test_setup_teardown(test_version_mismatch, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_garbage_closes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_not_hello_first, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_backpressure, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mutual_tls, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tls_refuses_no_cert, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_tls_refuses_rogue_cert, setup,
                                        teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
