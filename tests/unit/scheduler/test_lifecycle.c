/*
 * nodes.c and lifecycle.c on a one-member Raft cluster (real raftnode, real
 * FSM, real mutual TLS from deploy/make-certs.sh) with scripted agents: a
 * session client and an RPC server per node. Proves registration, a
 * create that runs, a create that fits nowhere, an agent that refuses,
 * failure detection after the grace period, re-placement of a lost
 * sandbox with a destroy first on the new node, reconciliation of a
 * returning node (its stale VM destroyed, a missing one lost), a stale
 * report ignored, destroy, and a new leader's full grace period.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/log.h"
#include "proto/conn.h"
#include "proto/msgtypes.h"
#include "proto/tls.h"
#include "scheduler/sched.h"

#define GRACE_MS 600
#define HB_MS 100

struct sched *sched_global;

/* ---- one scripted agent ------------------------------------------------- */

struct fake {
    const char *name;
    SSL_CTX *client_tls, *server_tls;
    uv_tcp_t server;
    char rpc_addr[64];
    struct pd_conn *sess;
    bool registered;
    bool beating;
    uv_timer_t beat;
    int creates, destroys, session_destroys;
    char last_destroyed[64];
    int refuse; /* SANDBOX_CREATE answers ERROR with this errno */
    const char *report; /* sandbox listed in NODE_REGISTER, or NULL */
    const char *report_state;
};

static struct {
    char dir[64];
    char pki[96];
    uv_loop_t loop;
    struct sched s;
    struct fake n1, n2;
    int cb_code;
    char cb_msg[512];
    struct fsm_sandbox cb_sb;
    bool cb_done, cb_replaced;
} w;

static void
serve(struct fake *f, struct pd_conn *c, const struct pd_msg *m,
      bool on_session)
{
    struct pd_enc e;
    char id[64] = "";

    pd_msg_cstr(m, "sandbox", id, sizeof(id));
    if (m->type == PD_MSG_SANDBOX_CREATE) {
        f->creates++;
        if (f->refuse != 0) {
            pd_conn_send_error(c, m->id, f->refuse, "lacks memory: need "
                               "more than it has");
            return;
        }
        pd_enc_begin(&e, PD_MSG_OK, m->id);
        pd_enc_str(&e, "state", "running");
        pd_conn_send(c, &e);
    } else if (m->type == PD_MSG_SANDBOX_DESTROY) {
        if (on_session)
            f->session_destroys++;
        else
            f->destroys++;
        snprintf(f->last_destroyed, sizeof(f->last_destroyed), "%s", id);
        pd_enc_begin(&e, PD_MSG_OK, m->id);
        pd_conn_send(c, &e);
    } else if (m->type == PD_MSG_SANDBOX_LIST) {
        pd_enc_begin(&e, PD_MSG_OK, m->id);
        pd_enc_key(&e, "sandboxes");
        msgpack_pack_array(&e.pk, 0);
        pd_conn_send(c, &e);
    }
}

static void
rpc_on_msg(struct pd_conn *c, const struct pd_msg *m)
{
    if (m->type != PD_MSG_HELLO)
        serve(pd_conn_data(c), c, m, false);
}

static void
rpc_on_close(struct pd_conn *c, int reason)
{
    (void)c;
    (void)reason;
}

static void
on_rpc_conn(uv_stream_t *server, int status)
{
    struct fake *f = server->data;
    static const struct pd_conn_cb cb = {rpc_on_msg, rpc_on_close, NULL};
    struct pd_conn_opts o = {.role = "agent", .name = f->name,
                             .tls = f->server_tls, .tls_server = true};
    uv_tcp_t *tcp = malloc(sizeof(*tcp));

    assert_int_equal(status, 0);
    uv_tcp_init(&w.loop, tcp);
    assert_int_equal(uv_accept(server, (uv_stream_t *)tcp), 0);
    pd_conn_new((uv_stream_t *)tcp, &o, &cb, f);
}

static void
on_beat(uv_timer_t *t)
{
    struct fake *f = t->data;
    struct pd_enc e;

    if (f->sess == NULL || !f->registered || !f->beating)
        return;
    pd_enc_begin(&e, PD_MSG_NODE_HEARTBEAT, pd_conn_next_id(f->sess));
    pd_enc_str(&e, "node", f->name);
    pd_conn_send(f->sess, &e);
}

static void
sess_on_msg(struct pd_conn *c, const struct pd_msg *m)
{
    struct fake *f = pd_conn_data(c);

    if (m->type == PD_MSG_OK && m->id == 1)
        f->registered = true;
    else if (m->type >= 100 && m->type < 300)
        serve(f, c, m, true);
}

static void
sess_on_close(struct pd_conn *c, int reason)
{
    struct fake *f = pd_conn_data(c);

    (void)reason;
    if (f->sess == c)
        f->sess = NULL;
    f->registered = false;
}

static void
send_register(struct fake *f)
{
    struct pd_enc e;

    pd_enc_begin(&e, PD_MSG_NODE_REGISTER, 1);
    pd_enc_str(&e, "node", f->name);
    pd_enc_str(&e, "rpc_addr", f->rpc_addr);
    pd_enc_u64(&e, "cpus", 4);
    pd_enc_u64(&e, "memory_mb", 4096);
    pd_enc_u64(&e, "disk_mb", 10000);
    pd_enc_key(&e, "sandboxes");
    msgpack_pack_array(&e.pk, f->report != NULL ? 1 : 0);
    if (f->report != NULL) {
        msgpack_pack_map(&e.pk, 2);
        pd_enc_pack_str(&e, "sandbox");
        pd_enc_pack_str(&e, f->report);
        pd_enc_pack_str(&e, "state");
        pd_enc_pack_str(&e, f->report_state);
    }
    pd_conn_send(f->sess, &e);
}

static void
on_sess_connect(uv_connect_t *req, int status)
{
    struct fake *f = req->data;
    static const struct pd_conn_cb cb = {sess_on_msg, sess_on_close, NULL};
    struct pd_conn_opts o = {.role = "agent", .name = f->name,
                             .tls = f->client_tls};

    assert_int_equal(status, 0);
    f->sess = pd_conn_new((uv_stream_t *)req->handle, &o, &cb, f);
    free(req);
    send_register(f);
}

/* Runs the loop until cond holds (bounded); returns the time it took. */
static uint64_t
run_until(bool (*cond)(void *), void *arg, uint64_t max_ms)
{
    uint64_t t0 = pd_now_ms();

    while (!cond(arg)) {
        assert_true(pd_now_ms() - t0 < max_ms);
        uv_run(&w.loop, UV_RUN_ONCE);
    }
    return pd_now_ms() - t0;
}

static bool
is_registered(void *arg)
{
    return ((struct fake *)arg)->registered;
}

static void
connect_fake(struct fake *f)
{
    struct sockaddr_in sa;
    uv_connect_t *req = malloc(sizeof(*req));
    uv_tcp_t *tcp = malloc(sizeof(*tcp));

    uv_ip4_addr("127.0.0.1", atoi(strrchr(w.s.cfg.rpc_listen, ':') + 1),
                &sa);
    uv_tcp_init(&w.loop, tcp);
    req->data = f;
    assert_int_equal(uv_tcp_connect(req, tcp, (struct sockaddr *)&sa,
                                    on_sess_connect), 0);
    f->beating = true;
    run_until(is_registered, f, 5000);
}

static void
fake_init(struct fake *f, const char *name)
{
    char cert[160], key[160], ca[160], err[256];
    struct sockaddr_in sa;
    struct sockaddr_storage bound;
    int len = sizeof(bound);

    f->name = name;
    snprintf(cert, sizeof(cert), "%s/%s.pem", w.pki, name);
    snprintf(key, sizeof(key), "%s/%s.key", w.pki, name);
    snprintf(ca, sizeof(ca), "%s/ca.pem", w.pki);
    f->client_tls = pd_tls_ctx_new(false, cert, key, ca, err, sizeof(err));
    f->server_tls = pd_tls_ctx_new(true, cert, key, ca, err, sizeof(err));
    assert_non_null(f->client_tls);
    assert_non_null(f->server_tls);
    uv_tcp_init(&w.loop, &f->server);
    f->server.data = f;
    uv_ip4_addr("127.0.0.1", 0, &sa);
    assert_int_equal(uv_tcp_bind(&f->server, (struct sockaddr *)&sa, 0), 0);
    assert_int_equal(uv_listen((uv_stream_t *)&f->server, 16, on_rpc_conn),
                     0);
    uv_tcp_getsockname(&f->server, (struct sockaddr *)&bound, &len);
    snprintf(f->rpc_addr, sizeof(f->rpc_addr), "127.0.0.1:%d",
             ntohs(((struct sockaddr_in *)&bound)->sin_port));
    uv_timer_init(&w.loop, &f->beat);
    f->beat.data = f;
    uv_timer_start(&f->beat, on_beat, HB_MS, HB_MS);
}

/* ---- the scheduler ------------------------------------------------------ */

static int
free_port(void)
{
    uv_tcp_t t;
    struct sockaddr_in sa;
    struct sockaddr_storage bound;
    int len = sizeof(bound), port;

    uv_tcp_init(&w.loop, &t);
    uv_ip4_addr("127.0.0.1", 0, &sa);
    uv_tcp_bind(&t, (struct sockaddr *)&sa, 0);
    uv_tcp_getsockname(&t, (struct sockaddr *)&bound, &len);
    port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(&w.loop, UV_RUN_NOWAIT);
    return port;
}

static bool
leading(void *arg)
{
    (void)arg;
    return raftnode_is_leader(w.s.raft);
}

static int
setup(void **state)
{
    static char raft_addr[32], rpc[32], cert[160], key[160], ca[160];
    struct raftnode_peer peer = {.id = 1, .voter = true};
    struct raftnode_config rc = {0};
    char cmd[512], err[256], rdir[128];

    (void)state;
    pd_log_init("test_lifecycle", PD_LOG_WARN);
    snprintf(w.dir, sizeof(w.dir), "/tmp/test-lifecycle-XXXXXX");
    assert_non_null(mkdtemp(w.dir));
    snprintf(w.pki, sizeof(w.pki), "%s/pki", w.dir);
    snprintf(cmd, sizeof(cmd), "%s/deploy/make-certs.sh %s scheduler s1 "
             "agent n1 n2 >/dev/null", SOURCE_ROOT, w.pki);
    assert_int_equal(system(cmd), 0);
    uv_loop_init(&w.loop);

    w.s.loop = &w.loop;
    w.s.cfg.id = 1;
    w.s.cfg.grace_ms = GRACE_MS;
    w.s.cfg.heartbeat_ms = HB_MS;
    snprintf(raft_addr, sizeof(raft_addr), "127.0.0.1:%d", free_port());
    snprintf(rpc, sizeof(rpc), "127.0.0.1:%d", free_port());
    w.s.cfg.raft_addr = raft_addr;
    w.s.cfg.rpc_listen = rpc;
    snprintf(cert, sizeof(cert), "%s/s1.pem", w.pki);
    snprintf(key, sizeof(key), "%s/s1.key", w.pki);
    snprintf(ca, sizeof(ca), "%s/ca.pem", w.pki);
    w.s.rpc_server_tls = pd_tls_ctx_new(true, cert, key, ca, err,
                                        sizeof(err));
    w.s.rpc_client_tls = pd_tls_ctx_new(false, cert, key, ca, err,
                                        sizeof(err));
    assert_non_null(w.s.rpc_server_tls);
    sched_global = &w.s;
    assert_int_equal(fsm_new(&w.s.fsm, err, sizeof(err)), 0);

    pd_strlcpy(peer.address, raft_addr, sizeof(peer.address));
    snprintf(rdir, sizeof(rdir), "%s/raft", w.dir);
    rc.dir = rdir;
    rc.id = 1;
    rc.address = raft_addr;
    rc.bootstrap = &peer;
    rc.n_bootstrap = 1;
    rc.election_timeout_ms = 200;
    rc.heartbeat_timeout_ms = 50;
    assert_int_equal(raftnode_new(&w.s.raft, &w.loop, w.s.fsm, &rc, err,
                                  sizeof(err)), 0);
    assert_int_equal(raftnode_start(w.s.raft), 0);
    assert_int_equal(sched_agentc_init(&w.s, err, sizeof(err)), 0);
    assert_int_equal(sched_nodes_init(&w.s, err, sizeof(err)), 0);
    run_until(leading, NULL, 10000);
    sched_nodes_on_state(&w.s, true);

    fake_init(&w.n1, "n1");
    fake_init(&w.n2, "n2");
    return 0;
}

static void
on_closed(void *data)
{
    *(bool *)data = true;
}

static bool
flag(void *arg)
{
    return *(bool *)arg;
}

static int
teardown(void **state)
{
    char cmd[128];
    bool closed = false;

    (void)state;
    raftnode_close(w.s.raft, false, on_closed, &closed);
    run_until(flag, &closed, 10000);
    sched_nodes_close(&w.s);
    sched_agentc_close(&w.s);
    snprintf(cmd, sizeof(cmd), "rm -rf %s", w.dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* ---- helpers ------------------------------------------------------------ */

static void
on_sandbox(void *data, int code, const char *message,
           const struct fsm_sandbox *sb)
{
    (void)data;
    w.cb_code = code;
    snprintf(w.cb_msg, sizeof(w.cb_msg), "%s", message ? message : "");
    memset(&w.cb_sb, 0, sizeof(w.cb_sb));
    if (sb != NULL) {
        w.cb_sb = *sb;
        w.cb_sb.spec.env = w.cb_sb.spec.labels = NULL;
        w.cb_sb.spec.n_env = w.cb_sb.spec.n_labels = 0;
    }
    w.cb_done = true;
}

static void
on_ensure(void *data, int code, const char *message,
          const struct fsm_sandbox *sb, bool replaced)
{
    on_sandbox(data, code, message, sb);
    w.cb_replaced = replaced;
}

static bool
cb_done(void *arg)
{
    (void)arg;
    return w.cb_done;
}

static void
create(const char *id, uint32_t cpus)
{
    struct sched_create_req req = {.wait = true, .wait_ms = 5000};

    pd_strlcpy(req.id, id, sizeof(req.id));
    pd_strlcpy(req.tenant, "t1", sizeof(req.tenant));
    req.spec.cpus = cpus;
    req.spec.memory_mb = 256;
    req.spec.disk_mb = 100;
    pd_strlcpy(req.spec.egress, "none", sizeof(req.spec.egress));
    w.cb_done = false;
    assert_int_equal(sched_sandbox_create(&w.s, &req, on_sandbox, NULL), 0);
    run_until(cb_done, NULL, 10000);
}

static int
sb_state(const char *id)
{
    struct fsm_sandbox sb;
    int st;

    if (fsm_sandbox_get(w.s.fsm, id, &sb) != 0)
        return -1;
    st = sb.state;
    fsm_sandbox_clear(&sb);
    return st;
}

static bool
node_down(void *arg)
{
    struct fsm_node n;
    bool down;

    if (fsm_node_get(w.s.fsm, arg, &n) != 0)
        return false;
    down = n.state == FSM_NODE_DOWN;
    fsm_node_clear(&n);
    return down;
}

static bool
node_ready(void *arg)
{
    struct fsm_node n;
    bool ready;

    if (fsm_node_get(w.s.fsm, arg, &n) != 0)
        return false;
    ready = n.state == FSM_NODE_READY;
    fsm_node_clear(&n);
    return ready;
}

/* ---- the scenario ------------------------------------------------------- */

/* One scenario in steps: each depends on the state the previous left. */
static void
test_life_cycle(void **state)
{
    (void)state;

    /* An agent registers; its node is ready in the FSM. */
    connect_fake(&w.n1);
    assert_true(node_ready("n1"));

    /* A create runs on it, once; the same create again is the same. */
    create("sb-1", 1);
    assert_int_equal(w.cb_code, 0);
    assert_int_equal(w.cb_sb.state, FSM_SB_RUNNING);
    assert_string_equal(w.cb_sb.node, "n1");
    assert_int_equal(w.n1.creates, 1);
    create("sb-1", 1);
    assert_int_equal(w.cb_code, 0);
    assert_int_equal(w.n1.creates, 1);

    /* Nothing fits: the reason names the resource. */
    create("sb-big", 64);
    assert_int_equal(w.cb_code, -ENOSPC);
    assert_non_null(strstr(w.cb_msg, "CPU"));
    assert_int_equal(sb_state("sb-big"), -1);

    /* The agent refuses: failed, with its reason. */
    w.n1.refuse = ENOSPC;
    create("sb-2", 1);
    w.n1.refuse = 0;
    assert_int_equal(w.cb_code, 0);
    assert_int_equal(w.cb_sb.state, FSM_SB_FAILED);
    assert_non_null(strstr(w.cb_sb.reason, "lacks memory"));

    /* Silence past the grace period: down, its sandboxes lost. */
    w.n1.beating = false;
    uint64_t took = run_until(node_down, "n1", 5000);
    assert_true(took >= GRACE_MS - HB_MS);
    assert_true(took <= GRACE_MS + HB_MS + 400);
    assert_int_equal(sb_state("sb-1"), FSM_SB_LOST);

    /* The next use places it again, on the other node, with a destroy
     * there first (no older VM may come back). */
    connect_fake(&w.n2);
    w.cb_done = false;
    sched_sandbox_ensure(&w.s, "sb-1", on_ensure, NULL);
    run_until(cb_done, NULL, 10000);
    assert_int_equal(w.cb_code, 0);
    assert_true(w.cb_replaced);
    assert_string_equal(w.cb_sb.node, "n2");
    assert_int_equal(w.cb_sb.generation, 2);
    assert_int_equal(w.n2.destroys, 1);
    assert_int_equal(w.n2.creates, 1);

    /* n1 comes back still holding the old VM: the leader destroys it on
     * n1's session. */
    pd_conn_close(w.n1.sess, 0, "restart");
    while (w.n1.sess != NULL)
        uv_run(&w.loop, UV_RUN_ONCE);
    w.n1.report = "sb-1";
    w.n1.report_state = "running";
    connect_fake(&w.n1);
    while (w.n1.session_destroys == 0)
        uv_run(&w.loop, UV_RUN_ONCE);
    assert_string_equal(w.n1.last_destroyed, "sb-1");
    assert_int_equal(sb_state("sb-1"), FSM_SB_RUNNING);

    /* A stale report (n1 no longer holds sb-1) changes nothing. */
    struct pd_enc e;

    pd_enc_begin(&e, PD_MSG_SANDBOX_STATE, pd_conn_next_id(w.n1.sess));
    pd_enc_str(&e, "sandbox", "sb-1");
    pd_enc_str(&e, "state", "stopped");
    pd_conn_send(w.n1.sess, &e);
    uint64_t t0 = pd_now_ms();
    while (pd_now_ms() - t0 < 300)
        uv_run(&w.loop, UV_RUN_NOWAIT);
    assert_int_equal(sb_state("sb-1"), FSM_SB_RUNNING);

    /* Destroy: on the agent, then the row. */
    w.cb_done = false;
    assert_int_equal(sched_sandbox_destroy(&w.s, "sb-1", on_sandbox, NULL),
                     0);
    run_until(cb_done, NULL, 10000);
    assert_int_equal(w.cb_code, 0);
    assert_int_equal(w.n2.destroys, 2);
    assert_int_equal(sb_state("sb-1"), -1);

    /* A new leader judges nobody before a full grace period of its own:
     * n2 falls silent, half a grace later the leadership "changes", and
     * n2 is down a whole grace period after that, not half of one. */
    w.n2.beating = false;
    t0 = pd_now_ms();
    while (pd_now_ms() - t0 < GRACE_MS / 2)
        uv_run(&w.loop, UV_RUN_NOWAIT);
    sched_nodes_on_state(&w.s, false);
    sched_nodes_on_state(&w.s, true);
    took = run_until(node_down, "n2", 5000);
    assert_true(took >= GRACE_MS - 50);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_life_cycle),
    };

    return cmocka_run_group_tests(tests, setup, teardown);
}
