/*
 * raftnode over the mutual-TLS transport (raft/transport_tls.c) on
 * loopback: three members elect, replicate, fail over, restart and catch
 * up by snapshot with every byte going through the TLS pump; a client with
 * no certificate, an agent's certificate (OU=agent), or a scheduler
 * certificate from another CA is refused, and one that stalls the
 * handshake is dropped after the handshake timeout; stalled handshakes
 * past RTLS_MAX_PENDING are refused at once.
 *
 * Certificates come from deploy/make-certs.sh, run once per test binary.
 * Every wait runs the loop until a condition holds or a deadline passes.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>
#include <raft.h>
#include <uv.h>

#include "helpers.h"
#include "proto/tls.h"
#include "raft/node.h"
#include "raft/transport_tls.h"

#define WAIT_MS      30000
#define DRAIN_MS     5000
#define MAXN         3
#define HANDSHAKE_MS 2000

static char pki[64], pki_other[64];

/* ---- Loop helpers ------------------------------------------------------ */

static void
tick_cb(uv_timer_t *t)
{
    (void)t;
}

static bool
run_until(uv_loop_t *loop, bool (*cond)(void *), void *arg, unsigned timeout_ms)
{
    uint64_t deadline = pd_now_ms() + timeout_ms;
    uv_timer_t tick;
    bool ok;

    uv_timer_init(loop, &tick);
    uv_timer_start(&tick, tick_cb, 5, 5);
    while (!(ok = cond(arg)) && pd_now_ms() < deadline)
        uv_run(loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&tick, NULL);
    uv_run(loop, UV_RUN_NOWAIT);
    return ok;
}

static unsigned
free_port(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET};
    socklen_t len = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(a.sin_port);
}

static SSL_CTX *
ctx(bool server, const char *dir, const char *name)
{
    char cert[128], key[128], ca[128], err[256];
    SSL_CTX *c;

    snprintf(cert, sizeof(cert), "%s/%s.pem", dir, name);
    snprintf(key, sizeof(key), "%s/%s.key", dir, name);
    snprintf(ca, sizeof(ca), "%s/ca.pem", pki);
    c = pd_tls_ctx_new(server, name != NULL ? cert : NULL,
                       name != NULL ? key : NULL, ca, err, sizeof(err));
    if (c == NULL)
        fail_msg("%s", err);
    return c;
}

/* ---- Members ----------------------------------------------------------- */

struct member {
    uint64_t id;
    char dir[256];
    char addr[64];
    struct fsm *fsm;
    struct raftnode *node;
    SSL_CTX *server, *client;
    bool closed;
};

struct world {
    uv_loop_t loop;
    char root[64];
    struct member m[MAXN];
};

static int
setup(void **state)
{
    struct world *w = calloc(1, sizeof(*w));
    char name[16];

    signal(SIGPIPE, SIG_IGN);
    test_now_ms = pd_wall_ms();
    strcpy(w->root, "/tmp/pd-rafttls-XXXXXX");
    assert_non_null(mkdtemp(w->root));
    assert_int_equal(uv_loop_init(&w->loop), 0);
    for (size_t i = 0; i < MAXN; i++) {
        struct member *m = &w->m[i];

        m->id = i + 1;
        snprintf(m->dir, sizeof(m->dir), "%s/m%zu", w->root, m->id);
        snprintf(m->addr, sizeof(m->addr), "127.0.0.1:%u", free_port());
        snprintf(name, sizeof(name), "s%zu", m->id);
        m->server = ctx(true, pki, name);
        m->client = ctx(false, pki, name);
    }
    *state = w;
    return 0;
}

static void
closed_cb(void *data)
{
    ((struct member *)data)->closed = true;
}

static bool
closed(void *arg)
{
    return ((struct member *)arg)->closed;
}

static void
member_stop(struct world *w, struct member *m)
{
    if (m->node == NULL)
        return;
    m->closed = false;
    raftnode_close(m->node, false, closed_cb, m);
    assert_true(run_until(&w->loop, closed, m, WAIT_MS));
    m->node = NULL;
}

static void
walk_cb(uv_handle_t *h, void *arg)
{
    PD_UNUSED(arg);
    print_message("open handle: %s%s\n", uv_handle_type_name(h->type),
                  uv_is_closing(h) ? " (closing)" : "");
}

static void
count_cb(uv_handle_t *h, void *arg)
{
    PD_UNUSED(h);
    (*(int *)arg)++;
}

/* Nothing open but run_until's own tick timer. */
static bool
loop_idle(void *arg)
{
    int n = 0;

    uv_walk(arg, count_cb, &n);
    return n <= 1;
}

static int
teardown(void **state)
{
    struct world *w = *state;

    for (size_t i = 0; i < MAXN; i++)
        member_stop(w, &w->m[i]);
    /* Relays close when both ends have: the loop must drain. */
    if (!run_until(&w->loop, loop_idle, &w->loop, DRAIN_MS)) {
        uv_walk(&w->loop, walk_cb, NULL);
        fail_msg("handles left open");
    }
    for (size_t i = 0; i < MAXN; i++) {
        fsm_free(w->m[i].fsm);
        SSL_CTX_free(w->m[i].server);
        SSL_CTX_free(w->m[i].client);
    }
    assert_int_equal(uv_loop_close(&w->loop), 0);
    pd_rm_rf(w->root);
    free(w);
    return 0;
}

/* Starts member i over TLS with a fresh FSM; the first n_boot members
 * bootstrap. */
static void
member_start(struct world *w, size_t i, size_t n_boot, unsigned snap)
{
    struct raftnode_peer peers[MAXN];
    struct member *m = &w->m[i];
    struct raftnode_config cfg = {0};
    char err[256];

    for (size_t j = 0; j < n_boot; j++) {
        peers[j].id = w->m[j].id;
        pd_strlcpy(peers[j].address, w->m[j].addr, sizeof(peers[j].address));
        peers[j].voter = true;
    }
    fsm_free(m->fsm);
    assert_int_equal(fsm_new(&m->fsm, err, sizeof(err)), 0);
    cfg.dir = m->dir;
    cfg.id = m->id;
    cfg.address = m->addr;
    cfg.bootstrap = peers;
    cfg.n_bootstrap = n_boot;
    cfg.election_timeout_ms = 600;
    cfg.heartbeat_timeout_ms = 60;
    cfg.snapshot_threshold = snap;
    cfg.snapshot_trailing = snap != 0 ? 8 : 0;
    cfg.tls_server = m->server;
    cfg.tls_client = m->client;
    cfg.tls_handshake_ms = HANDSHAKE_MS;
    assert_int_equal(
        raftnode_new(&m->node, &w->loop, m->fsm, &cfg, err, sizeof(err)), 0);
    assert_int_equal(raftnode_start(m->node), 0);
}

struct leader_q {
    struct world *w;
    int index;
};

static bool
has_leader(void *arg)
{
    struct leader_q *q = arg;
    int found = -1;

    for (size_t i = 0; i < MAXN; i++) {
        struct member *m = &q->w->m[i];

        if (m->node != NULL && raftnode_is_leader(m->node)) {
            if (found >= 0)
                return false;
            found = (int)i;
        }
    }
    if (found < 0)
        return false;
    for (size_t i = 0; i < MAXN; i++) {
        struct member *m = &q->w->m[i];
        uint64_t id;

        if (m->node == NULL)
            continue;
        raftnode_leader(m->node, &id, NULL, 0);
        if (id != q->w->m[found].id)
            return false;
    }
    q->index = found;
    return true;
}

static struct member *
wait_leader(struct world *w)
{
    struct leader_q q = {.w = w, .index = -1};

    assert_true(run_until(&w->loop, has_leader, &q, WAIT_MS));
    return &w->m[q.index];
}

static bool
no_leader(void *arg)
{
    struct world *w = arg;

    for (size_t i = 0; i < MAXN; i++)
        if (w->m[i].node != NULL && raftnode_is_leader(w->m[i].node))
            return false;
    return true;
}

/* ---- Proposals --------------------------------------------------------- */

struct batch {
    int pending;
    int failed;
};

static void
batch_cb(void *data, int status, const struct fsm_result *res)
{
    struct batch *b = data;

    PD_UNUSED(res);
    b->pending--;
    if (status != 0)
        b->failed++;
}

static bool
batch_done(void *arg)
{
    return ((struct batch *)arg)->pending == 0;
}

/* A node and n sandboxes, all in flight at once, so the pump carries
 * batches of many entries. */
static void
propose_workload(struct world *w, struct member *m, const char *prefix, int n)
{
    struct batch b = {0};
    struct fsm_cmd c;
    char node[32], sb[64];

    snprintf(node, sizeof(node), "%s-node", prefix);
    mk_register(&c, node, 100000, 1 << 30, 1 << 30);
    b.pending++;
    assert_int_equal(raftnode_propose(m->node, &c, batch_cb, &b), 0);
    fsm_cmd_free(&c);
    assert_true(run_until(&w->loop, batch_done, &b, WAIT_MS));
    for (int i = 0; i < n; i++) {
        snprintf(sb, sizeof(sb), "%s-%d", prefix, i);
        mk_place(&c, sb, "acme", node, 1, 1, 1);
        b.pending++;
        assert_int_equal(raftnode_propose(m->node, &c, batch_cb, &b), 0);
        fsm_cmd_free(&c);
    }
    assert_true(run_until(&w->loop, batch_done, &b, WAIT_MS));
    assert_int_equal(b.failed, 0);
}

static char *
dump(struct fsm *f)
{
    char *s;

    assert_int_equal(fsm_dump(f, &s), 0);
    return s;
}

struct same_q {
    struct fsm *f;
    const char *want;
};

static bool
dump_is(void *arg)
{
    struct same_q *q = arg;
    char *d = dump(q->f);
    bool same = strcmp(d, q->want) == 0;

    free(d);
    return same;
}

static void
wait_same(struct world *w, struct member *from)
{
    char *want = dump(from->fsm);

    for (size_t i = 0; i < MAXN; i++) {
        struct same_q q = {.f = w->m[i].fsm, .want = want};

        if (w->m[i].node == NULL || &w->m[i] == from)
            continue;
        if (!run_until(&w->loop, dump_is, &q, WAIT_MS))
            fail_msg("member %llu never caught up",
                     (unsigned long long)w->m[i].id);
    }
    free(want);
}

/* ---- A raw TLS client ---------------------------------------------------- */

struct rawc {
    uv_tcp_t tcp;
    uv_connect_t req;
    struct pd_tls *tls;
    bool connected, ready, ended, handle_closed;
    size_t got;
};

static void
raw_cipher(void *arg, const void *data, size_t len)
{
    struct rawc *r = arg;
    uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);

    /* Small handshake flights: a synchronous write is enough here. */
    if (!r->ended)
        uv_try_write((uv_stream_t *)&r->tcp, &b, 1);
}

static void
raw_plain(void *arg, const void *data, size_t len)
{
    PD_UNUSED(data);
    ((struct rawc *)arg)->got += len;
}

static void
raw_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    static char mem[65536];

    PD_UNUSED(h);
    PD_UNUSED(hint);
    *buf = uv_buf_init(mem, sizeof(mem));
}

static void
raw_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct rawc *r = s->data;

    if (nread < 0) {
        r->ended = true;
        uv_read_stop(s);
        return;
    }
    if (r->tls != NULL && nread > 0 &&
        pd_tls_feed(r->tls, buf->base, (size_t)nread) != 0)
        r->ended = true;
    if (r->tls != NULL && !r->ready && pd_tls_ready(r->tls)) {
        /* A well-formed preamble, as a member would send it. */
        unsigned char pre[40] = {1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0,
                                 0, 0, 16, 0, 0, 0, 0, 0, 0, 0};

        memcpy(pre + 24, "127.0.0.1:1", 11);
        r->ready = true;
        pd_tls_write(r->tls, pre, sizeof(pre));
    }
}

static void
raw_connected(uv_connect_t *req, int status)
{
    struct rawc *r = req->data;

    assert_int_equal(status, 0);
    r->connected = true;
    uv_read_start((uv_stream_t *)&r->tcp, raw_alloc, raw_read);
    if (r->tls != NULL)
        pd_tls_start(r->tls);
}

static bool
raw_ended(void *arg)
{
    return ((struct rawc *)arg)->ended;
}

static void
raw_closed(uv_handle_t *h)
{
    ((struct rawc *)h->data)->handle_closed = true;
}

static bool
raw_handle_closed(void *arg)
{
    return ((struct rawc *)arg)->handle_closed;
}

/* Connects r to m's Raft port with tls (NULL: plain TCP that sends
 * nothing). */
static void
raw_open(struct world *w, struct member *m, SSL_CTX *tls, struct rawc *r)
{
    static const struct pd_tls_cb cbs = {raw_plain, raw_cipher, NULL};
    struct sockaddr_in sa;
    const char *colon = strrchr(m->addr, ':');

    memset(r, 0, sizeof(*r));
    assert_int_equal(uv_ip4_addr("127.0.0.1", atoi(colon + 1), &sa), 0);
    uv_tcp_init(&w->loop, &r->tcp);
    r->tcp.data = r->req.data = r;
    if (tls != NULL)
        r->tls = pd_tls_new(tls, false, &cbs, r);
    assert_int_equal(uv_tcp_connect(&r->req, &r->tcp, (struct sockaddr *)&sa,
                                    raw_connected), 0);
}

static void
raw_free(struct world *w, struct rawc *r)
{
    uv_close((uv_handle_t *)&r->tcp, raw_closed);
    assert_true(run_until(&w->loop, raw_handle_closed, r, WAIT_MS));
    pd_tls_free(r->tls);
}

/* Returns how long, in ms, until the member closed a connection opened
 * with raw_open. */
static uint64_t
raw_refused(struct world *w, struct member *m, SSL_CTX *tls)
{
    struct rawc r;
    uint64_t t0 = pd_now_ms();

    raw_open(w, m, tls, &r);
    assert_true(run_until(&w->loop, raw_ended, &r, WAIT_MS));
    assert_true(r.connected);
    assert_int_equal(r.got, 0); /* nothing from raft ever reached us */
    raw_free(w, &r);
    return pd_now_ms() - t0;
}

struct many_q {
    struct rawc *r;
    size_t n;
};

static bool
all_connected(void *arg)
{
    struct many_q *q = arg;

    for (size_t i = 0; i < q->n; i++)
        if (!q->r[i].connected)
            return false;
    return true;
}

/* ---- Tests ------------------------------------------------------------- */

/* Three members over TLS elect and replicate; the leader dies and the
 * others elect a new one; it comes back, from disk, and catches up. */
static void
test_cluster_over_tls(void **state)
{
    struct world *w = *state;
    struct member *leader, *next;

    for (size_t i = 0; i < MAXN; i++)
        member_start(w, i, MAXN, 0);
    leader = wait_leader(w);
    propose_workload(w, leader, "a", 30);
    wait_same(w, leader);

    member_stop(w, leader);
    assert_true(run_until(&w->loop, no_leader, w, WAIT_MS));
    next = wait_leader(w);
    assert_ptr_not_equal(next, leader);
    propose_workload(w, next, "b", 10);

    member_start(w, (size_t)(leader - w->m), 0, 0);
    wait_same(w, next);
}

/* A follower that missed more than the trailing entries gets the leader's
 * snapshot: a large message through the pump in both backpressure
 * directions. */
static void
test_snapshot_over_tls(void **state)
{
    struct world *w = *state;
    struct member *leader, *lag;

    for (size_t i = 0; i < MAXN; i++)
        member_start(w, i, MAXN, 32);
    leader = wait_leader(w);
    lag = &w->m[(leader - w->m + 1) % MAXN];
    member_stop(w, lag);
    propose_workload(w, leader, "s", 400);
    member_start(w, (size_t)(lag - w->m), 0, 32);
    wait_same(w, leader);
}

/* No certificate, an agent's, another CA's scheduler certificate, or no
 * handshake at all: each connection is closed and raft never sees it. */
static void
test_refused(void **state)
{
    struct world *w = *state;
    struct member *m = &w->m[0];
    SSL_CTX *nocert = ctx(false, pki, NULL);
    SSL_CTX *agent = ctx(false, pki, "a1");
    SSL_CTX *foreign = ctx(false, pki_other, "s1");
    uint64_t ms;

    member_start(w, 0, 1, 0);
    wait_leader(w);

    ms = raw_refused(w, m, nocert);
    assert_true(ms < HANDSHAKE_MS);
    ms = raw_refused(w, m, agent);
    assert_true(ms < HANDSHAKE_MS);
    ms = raw_refused(w, m, foreign);
    assert_true(ms < HANDSHAKE_MS);
    ms = raw_refused(w, m, NULL);
    assert_true(ms >= HANDSHAKE_MS - 50);
    assert_true(ms < HANDSHAKE_MS + 5000);

    /* Still the healthy leader of its one-member cluster. */
    assert_true(raftnode_is_leader(m->node));
    propose_workload(w, m, "ok", 2);
    SSL_CTX_free(nocert);
    SSL_CTX_free(agent);
    SSL_CTX_free(foreign);
}

/* Stalled handshakes are capped: the one past RTLS_MAX_PENDING is
 * closed at once, and a real member still gets through afterwards. */
static void
test_pending_cap(void **state)
{
    struct world *w = *state;
    struct rawc *r = calloc(RTLS_MAX_PENDING, sizeof(*r));
    struct many_q q = {.r = r, .n = RTLS_MAX_PENDING};
    uint64_t ms;

    member_start(w, 0, 1, 0);
    wait_leader(w);
    for (size_t i = 0; i < RTLS_MAX_PENDING; i++)
        raw_open(w, &w->m[0], NULL, &r[i]);
    assert_true(run_until(&w->loop, all_connected, &q, WAIT_MS));
    ms = raw_refused(w, &w->m[0], NULL);
    assert_true(ms < HANDSHAKE_MS);
    for (size_t i = 0; i < RTLS_MAX_PENDING; i++)
        raw_free(w, &r[i]);
    free(r);
}

static int
group_setup(void **state)
{
    char cmd[512];

    PD_UNUSED(state);
    strcpy(pki, "/tmp/pd-rafttls-pki-XXXXXX");
    strcpy(pki_other, "/tmp/pd-rafttls-pki2-XXXXXX");
    assert_non_null(mkdtemp(pki));
    assert_non_null(mkdtemp(pki_other));
    snprintf(cmd, sizeof(cmd),
             "sh %s %s scheduler s1 s2 s3 agent a1 >/dev/null && "
             "sh %s %s scheduler s1 >/dev/null",
             MAKE_CERTS, pki, MAKE_CERTS, pki_other);
    return system(cmd) == 0 ? 0 : -1;
}

static int
group_teardown(void **state)
{
    PD_UNUSED(state);
    pd_rm_rf(pki);
    pd_rm_rf(pki_other);
    return 0;
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)

int
main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_cluster_over_tls),
        T(test_snapshot_over_tls),
        T(test_refused),
        T(test_pending_cap),
    };

    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
