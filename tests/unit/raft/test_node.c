/*
 * raftnode (raft/node.c) with the real raft_uv disk log and TCP transport,
 * on loopback ports and in temporary directories. Proves that a restart
 * brings every row back from disk (the 8-byte padding and auto-recovery
 * off, DESIGN.md 9), that a 3-member cluster elects, replicates and hands
 * leadership over, and that membership changes are one at a time.
 *
 * Every wait runs the loop until a condition holds or a deadline passes;
 * nothing sleeps.
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
#include "raft/node.h"

#define WAIT_MS 20000
#define MAXN    3

/* ---- Loop helpers ------------------------------------------------------ */

static void
tick_cb(uv_timer_t *t)
{
    (void)t; /* only makes uv_run(UV_RUN_ONCE) return regularly */
}

/* Runs the loop until cond(arg) or timeout_ms of real time; returns cond. */
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

/* ---- Members ----------------------------------------------------------- */

struct member {
    uint64_t id;
    char dir[256];
    char addr[64];
    struct fsm *fsm;
    struct raftnode *node;
    bool closed;
    int state;     /* the last state on_state reported */
    int n_changes; /* how many it reported */
};

struct world {
    uv_loop_t loop;
    char root[64];
    struct member m[MAXN];
    size_t n;
};

static void
member_init(struct world *w, size_t i)
{
    struct member *m = &w->m[i];

    m->id = i + 1;
    snprintf(m->dir, sizeof(m->dir), "%s/m%zu", w->root, m->id);
    snprintf(m->addr, sizeof(m->addr), "127.0.0.1:%u", free_port());
}

static int
setup(void **state)
{
    struct world *w = calloc(1, sizeof(*w));

    /* As the daemon does (raft/node.h): raft_uv's writes to a member
     * that was just stopped would otherwise kill the test. */
    signal(SIGPIPE, SIG_IGN);
    test_now_ms = pd_wall_ms();
    strcpy(w->root, "/tmp/pd-raftnode-XXXXXX");
    assert_non_null(mkdtemp(w->root));
    assert_int_equal(uv_loop_init(&w->loop), 0);
    for (size_t i = 0; i < MAXN; i++)
        member_init(w, i);
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

/* Closes a member's node and waits until it is released. */
static void
member_stop(struct world *w, struct member *m, bool transfer)
{
    if (m->node == NULL)
        return;
    m->closed = false;
    raftnode_close(m->node, transfer, closed_cb, m);
    assert_true(run_until(&w->loop, closed, m, WAIT_MS));
    m->node = NULL;
}

static int
teardown(void **state)
{
    struct world *w = *state;

    for (size_t i = 0; i < MAXN; i++) {
        member_stop(w, &w->m[i], false);
        fsm_free(w->m[i].fsm);
    }
    uv_run(&w->loop, UV_RUN_NOWAIT);
    assert_int_equal(uv_loop_close(&w->loop), 0);
    pd_rm_rf(w->root);
    free(w);
    return 0;
}

static void
on_state(struct raftnode *n, int old_state, int new_state, void *data)
{
    struct member *m = data;

    assert_ptr_equal(n, m->node);
    assert_int_not_equal(old_state, new_state);
    m->state = new_state;
    m->n_changes++;
}

/*
 * Starts member i with a fresh FSM. Bootstraps the first n_boot members
 * (0: join an existing cluster).
 */
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
    /* Long enough that a loaded 2-core machine does not cause spurious
     * elections; short enough that tests take seconds. */
    cfg.election_timeout_ms = 400;
    cfg.heartbeat_timeout_ms = 50;
    cfg.snapshot_threshold = snap;
    cfg.snapshot_trailing = snap != 0 ? 8 : 0;
    cfg.bind_address = m->addr;
    cfg.on_state = on_state;
    cfg.data = m;
    assert_int_equal(
        raftnode_new(&m->node, &w->loop, m->fsm, &cfg, err, sizeof(err)), 0);
    assert_int_equal(raftnode_start(m->node), 0);
}

struct leader_q {
    struct world *w;
    size_t n;
    int index; /* out */
};

/* Exactly one live member leads and every live member knows it. */
static bool
has_leader(void *arg)
{
    struct leader_q *q = arg;
    int found = -1;

    for (size_t i = 0; i < q->n; i++) {
        struct member *m = &q->w->m[i];

        if (m->node != NULL && raftnode_is_leader(m->node)) {
            if (found >= 0)
                return false;
            found = (int)i;
        }
    }
    if (found < 0)
        return false;
    for (size_t i = 0; i < q->n; i++) {
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
wait_leader(struct world *w, size_t n)
{
    struct leader_q q = {.w = w, .n = n, .index = -1};

    assert_true(run_until(&w->loop, has_leader, &q, WAIT_MS));
    return &w->m[q.index];
}

/* ---- Proposals --------------------------------------------------------- */

struct batch {
    int pending;
    int failed;
    int last_status;
    struct fsm_result last;
};

static void
batch_cb(void *data, int status, const struct fsm_result *res)
{
    struct batch *b = data;

    b->pending--;
    b->last_status = status;
    if (status != 0)
        b->failed++;
    else
        b->last = *res;
}

static bool
batch_done(void *arg)
{
    return ((struct batch *)arg)->pending == 0;
}

/* Proposes cmd and waits for its outcome; returns the result code. */
static int
propose_wait(struct world *w, struct member *m, struct fsm_cmd *c)
{
    struct batch b = {.pending = 1};

    assert_int_equal(raftnode_propose(m->node, c, batch_cb, &b), 0);
    fsm_cmd_free(c);
    assert_true(run_until(&w->loop, batch_done, &b, WAIT_MS));
    assert_int_equal(b.last_status, 0);
    return b.last.code;
}

/*
 * Proposes a node and n sandboxes, all in flight at once. Sandbox ids and
 * reasons vary in length, so the natural entry lengths are not multiples
 * of 8: only the padding keeps the segments loadable.
 */
static void
propose_workload(struct world *w, struct member *m, const char *prefix, int n)
{
    struct batch b = {0};
    struct fsm_cmd c;
    char node[32], sb[64];

    snprintf(node, sizeof(node), "%s-node", prefix);
    mk_register(&c, node, 10000, 1 << 30, 1 << 30);
    assert_int_equal(propose_wait(w, m, &c), 0);
    for (int i = 0; i < n; i++) {
        snprintf(sb, sizeof(sb), "%s-%.*s%d", prefix, i % 9, "abcdefghi", i);
        mk_place(&c, sb, "acme", node, 1, 1 + (uint64_t)i, 1);
        b.pending++;
        assert_int_equal(raftnode_propose(m->node, &c, batch_cb, &b), 0);
        fsm_cmd_free(&c);
        mk_state(&c, sb, FSM_SB_RUNNING, i % 2 ? "up" : "booted in 3 s");
        b.pending++;
        assert_int_equal(raftnode_propose(m->node, &c, batch_cb, &b), 0);
        fsm_cmd_free(&c);
        /* Proposals of one loop iteration share an entry: one turn of
         * the loop per pair gives the log one (batched) entry each. */
        uv_run(&w->loop, UV_RUN_NOWAIT);
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
wait_dump(struct world *w, struct fsm *f, const char *want)
{
    struct same_q q = {.f = f, .want = want};

    if (!run_until(&w->loop, dump_is, &q, WAIT_MS)) {
        char *d = dump(f);

        fail_msg("state differs:\n--- want\n%s\n--- got\n%s", want, d);
    }
}

struct snap_q {
    struct raftnode *node;
    uint64_t index;
};

/* The member's last snapshot covers q->index. */
static bool
snapshot_past(void *arg)
{
    struct snap_q *q = arg;

    return raftnode_raft(q->node)->log.snapshot.last_index >= q->index;
}

/*
 * Waits until the member's last snapshot covers index. raft considers a
 * snapshot only after an apply, and not while one is being written: a
 * batch applied during a write leaves the snapshot behind. So each round
 * waits for the write in flight, then commits one more small entry.
 */
static void
snapshot_beyond(struct world *w, struct member *m, uint64_t index)
{
    struct snap_q q = {.node = m->node, .index = index};
    struct fsm_cmd c;

    for (int i = 0; i < 20 && !snapshot_past(&q); i++) {
        struct snap_q any = {.node = m->node, .index = 1};

        run_until(&w->loop, snapshot_past, &any, 2000);
        cmd_new(&c, FSM_CMD_TOKEN_GC);
        assert_int_equal(propose_wait(w, m, &c), 0);
        run_until(&w->loop, snapshot_past, &q, 500);
    }
    assert_true(snapshot_past(&q));
}

/* ---- Tests ------------------------------------------------------------- */

/* One member bootstraps, commits, closes and restarts from its directory
 * with every row back; then again with snapshots in the way, so the
 * restart is restore plus replay. */
static void
test_restart_from_disk(void **state)
{
    struct world *w = *state;
    struct member *m = &w->m[0];
    struct raftnode_status st;
    struct fsm_cmd c;
    char *before;

    member_start(w, 0, 1, 0);
    wait_leader(w, 1);
    propose_workload(w, m, "r", 40);
    raftnode_status(m->node, &st);
    assert_int_equal(st.id, 1);
    assert_int_equal(st.state, RAFT_LEADER);
    assert_int_equal(st.voters, 1);
    assert_true(st.commit_index >= 41);
    before = dump(m->fsm);
    member_stop(w, m, true);

    /* The same bootstrap configuration on a second start is ignored: the
     * log on disk wins. */
    member_start(w, 0, 1, 0);
    wait_leader(w, 1);
    wait_dump(w, m->fsm, before);
    free(before);

    /* More entries, with a snapshot every 32, then restart again. */
    member_stop(w, m, false);
    member_start(w, 0, 1, 32);
    wait_leader(w, 1);
    propose_workload(w, m, "s", 60);
    mk_token(&c, FSM_CMD_TOKEN_CREATE, "tok", "acme", "tenant", 0);
    assert_int_equal(propose_wait(w, m, &c), 0);
    snapshot_beyond(w, m, 100);
    before = dump(m->fsm);
    member_stop(w, m, false);
    member_start(w, 0, 1, 32);
    wait_leader(w, 1);
    wait_dump(w, m->fsm, before);
    assert_false(fsm_token_is_revoked(m->fsm, "tok"));
    free(before);
}

/* The trap itself: an entry whose length is not a multiple of 8 makes
 * the segment unloadable, and with auto-recovery off the start fails
 * loudly instead of renaming committed entries away. raftnode never
 * writes such an entry; this one goes around it, straight to raft. */
static void
apply_raw_cb(struct raft_apply *req, int status, void *result)
{
    (void)result;
    *(int *)req->data = status;
}

static bool
int_set(void *arg)
{
    return *(int *)arg != 1;
}

/*
 * Runs in its own executable (test_raft_node_trap): after the failed start,
 * raft 0.15 leaks a little of the segment it could not load, inside
 * libraft on its error path. The leak suppression covers that executable
 * only, so test_raft_node still catches any leak of ours through libraft.
 */
static void
test_unpadded_entry_fails_loudly(void **state)
{
    struct world *w = *state;
    struct member *m = &w->m[0];
    struct raft_apply req;
    struct raft_buffer buf;
    struct raftnode_config cfg = {0};
    struct raftnode_peer peer = {.id = 1, .voter = true};
    struct fsm_cmd c;
    char err[256];
    int status = 1, rv;

#ifndef TEST_NODE_TRAP
    skip();
#endif
    member_start(w, 0, 1, 0);
    wait_leader(w, 1);
    mk_register(&c, "n1", 1, 1, 1);
    assert_int_equal(propose_wait(w, m, &c), 0);

    buf.len = 13;
    buf.base = raft_malloc(buf.len);
    memset(buf.base, 0x42, buf.len);
    req.data = &status;
    assert_int_equal(
        raft_apply(raftnode_raft(m->node), &req, &buf, 1, apply_raw_cb), 0);
    assert_true(run_until(&w->loop, int_set, &status, WAIT_MS));
    member_stop(w, m, false);

    fsm_free(m->fsm);
    assert_int_equal(fsm_new(&m->fsm, err, sizeof(err)), 0);
    pd_strlcpy(peer.address, m->addr, sizeof(peer.address));
    cfg.dir = m->dir;
    cfg.id = 1;
    cfg.address = m->addr;
    cfg.bootstrap = &peer;
    cfg.n_bootstrap = 1;
    assert_int_equal(
        raftnode_new(&m->node, &w->loop, m->fsm, &cfg, err, sizeof(err)), 0);
    rv = raftnode_start(m->node);
    if (rv == 0)
        fail_msg("raft loaded a segment with an unpadded entry: the trap "
                 "of DESIGN.md 9 did not reproduce");
    assert_int_equal(rv, -EIO);
    assert_true(raftnode_errmsg(m->node)[0] != '\0');
    member_stop(w, m, false);
}

struct each {
    int pending;
    int status[8];
    int code[8];
    char node[8][FSM_ID_MAX + 1];
};

struct each_slot {
    struct each *e;
    int i;
};

static void
each_cb(void *data, int status, const struct fsm_result *res)
{
    struct each_slot *s = data;

    s->e->pending--;
    s->e->status[s->i] = status;
    if (status == 0) {
        s->e->code[s->i] = res->code;
        snprintf(s->e->node[s->i], sizeof(s->e->node[0]), "%s", res->node);
    }
}

static bool
each_done(void *arg)
{
    return ((struct each *)arg)->pending == 0;
}

/* Proposals made in one loop iteration become one entry on a three-member
 * cluster, and each still gets its own result: a part that fails (no room
 * left) fails alone, and every member applies the same. */
static void
test_batched_proposals(void **state)
{
    struct world *w = *state;
    struct each e = {.pending = 6};
    struct each_slot slots[6];
    struct member *l;
    struct fsm_cmd c;
    uint64_t before;
    char *want;

    for (size_t i = 0; i < 3; i++)
        member_start(w, i, 3, 0);
    l = wait_leader(w, 3);
    mk_register(&c, "bn", 4, 1 << 20, 1 << 20);
    assert_int_equal(propose_wait(w, l, &c), 0);
    before = raft_last_index(raftnode_raft(l->node));
    for (int i = 0; i < 6; i++) {
        char sb[16];

        snprintf(sb, sizeof(sb), "b%d", i);
        /* 1 CPU each on a 4-CPU node: the fifth and sixth do not fit. */
        mk_place(&c, sb, "acme", "bn", 1, 1, 1);
        slots[i] = (struct each_slot){.e = &e, .i = i};
        assert_int_equal(raftnode_propose(l->node, &c, each_cb, &slots[i]),
                         0);
        fsm_cmd_free(&c);
    }
    assert_true(run_until(&w->loop, each_done, &e, WAIT_MS));
    assert_int_equal(raft_last_index(raftnode_raft(l->node)), before + 1);
    for (int i = 0; i < 6; i++) {
        assert_int_equal(e.status[i], 0);
        assert_int_equal(e.code[i], i < 4 ? 0 : -ENOSPC);
        if (i < 4)
            assert_string_equal(e.node[i], "bn");
    }
    want = dump(l->fsm);
    for (size_t i = 0; i < 3; i++)
        wait_dump(w, w->m[i].fsm, want);
    free(want);
    for (size_t i = 0; i < 3; i++)
        member_stop(w, &w->m[i], false);
}

/* Three members on loopback: one leader, replication to every FSM,
 * leadership transfer to a chosen member, and a graceful close that hands
 * leadership over first. */
static void
test_three_members(void **state)
{
    struct world *w = *state;
    struct member *l, *target = NULL;
    struct raftnode_peer *peers;
    struct raftnode_status st;
    struct fsm_cmd c;
    size_t n;
    char *want;

    for (size_t i = 0; i < 3; i++)
        member_start(w, i, 3, 0);
    l = wait_leader(w, 3);
    assert_int_equal(raftnode_members(l->node, &peers, &n), 0);
    assert_int_equal(n, 3);
    for (size_t i = 0; i < n; i++)
        assert_true(peers[i].voter);
    free(peers);

    propose_workload(w, l, "x", 20);
    want = dump(l->fsm);
    for (size_t i = 0; i < 3; i++)
        wait_dump(w, w->m[i].fsm, want);
    free(want);

    /* Followers refuse proposals and name the leader. */
    for (size_t i = 0; i < 3; i++) {
        uint64_t id;
        char addr[64];

        if (&w->m[i] == l)
            continue;
        target = &w->m[i];
        mk_register(&c, "nope", 1, 1, 1);
        assert_int_equal(raftnode_propose(target->node, &c, batch_cb, NULL),
                         RAFTNODE_ENOTLEADER);
        raftnode_leader(target->node, &id, addr, sizeof(addr));
        assert_int_equal(id, l->id);
        assert_string_equal(addr, l->addr);
    }

    /* Transfer to a chosen member. */
    assert_int_equal(raftnode_transfer(l->node, target->id, NULL, NULL), 0);
    l = wait_leader(w, 3);
    assert_ptr_equal(l, target);
    raftnode_status(l->node, &st);
    assert_int_equal(st.voters, 3);

    /* The new leader takes writes. */
    mk_token(&c, FSM_CMD_TOKEN_CREATE, "t1", "acme", "tenant", 0);
    assert_int_equal(propose_wait(w, l, &c), 0);

    /* A graceful close hands leadership to another member first. */
    member_stop(w, l, true);
    l = wait_leader(w, 3);
    mk_token(&c, FSM_CMD_TOKEN_CREATE, "t2", "acme", "tenant", 0);
    assert_int_equal(propose_wait(w, l, &c), 0);
}

/* A member that was down while the others took snapshots and compacted
 * their logs restarts from its own directory and catches up over TCP by
 * InstallSnapshot: the FSM restore path as raft_uv drives it. */
static void
test_catch_up_by_snapshot(void **state)
{
    struct world *w = *state;
    struct member *l, *lag = NULL;
    struct snap_q q;
    char *want;

    for (size_t i = 0; i < 3; i++)
        member_start(w, i, 3, 16);
    l = wait_leader(w, 3);
    propose_workload(w, l, "warm", 2);
    for (size_t i = 0; i < 3 && lag == NULL; i++) {
        if (&w->m[i] != l)
            lag = &w->m[i];
    }
    want = dump(l->fsm);
    wait_dump(w, lag->fsm, want);
    free(want);

    member_stop(w, lag, false);
    propose_workload(w, l, "missed", 40); /* 41 entries it misses */
    snapshot_beyond(w, l, 40);

    member_start(w, (size_t)(lag - w->m), 3, 16);
    want = dump(l->fsm);
    wait_dump(w, lag->fsm, want);
    free(want);
    /* It holds the leader's snapshot now, so it was installed: the
     * entries it missed were no longer in the leader's log. */
    q.node = lag->node;
    q.index = 40;
    assert_true(run_until(&w->loop, snapshot_past, &q, WAIT_MS));
    wait_leader(w, 3);
}

static void
barrier_cb(void *data, int status, const char *msg)
{
    struct batch *b = data;

    (void)msg;
    b->pending--;
    b->last_status = status;
}

static bool
reports_leader(void *arg)
{
    return ((struct member *)arg)->state == RAFT_LEADER;
}

/* A leader that loses its quorum steps down: a proposal in flight ends
 * with RAFTNODE_ELOST (outcome unknown, retry with the same request id),
 * and later ones are refused as not leader. Barriers work on a leader. */
static void
test_quorum_lost(void **state)
{
    struct world *w = *state;
    struct batch b = {.pending = 1};
    struct member *l;
    struct fsm_cmd c;

    for (size_t i = 0; i < 3; i++)
        member_start(w, i, 3, 0);
    l = wait_leader(w, 3);
    /* on_state comes from a poll: it follows within RAFTNODE_POLL_MS. */
    assert_true(run_until(&w->loop, reports_leader, l, WAIT_MS));
    assert_true(l->n_changes >= 2); /* follower, (candidate,) leader */

    assert_int_equal(raftnode_barrier(l->node, barrier_cb, &b), 0);
    assert_true(run_until(&w->loop, batch_done, &b, WAIT_MS));
    assert_int_equal(b.last_status, 0);

    for (size_t i = 0; i < 3; i++) {
        if (&w->m[i] != l)
            member_stop(w, &w->m[i], false);
    }
    b.pending = 1;
    mk_token(&c, FSM_CMD_TOKEN_CREATE, "lost", "acme", "tenant", 0);
    assert_int_equal(raftnode_propose(l->node, &c, batch_cb, &b), 0);
    assert_true(run_until(&w->loop, batch_done, &b, WAIT_MS));
    assert_int_equal(b.last_status, RAFTNODE_ELOST);
    assert_false(raftnode_is_leader(l->node));
    assert_int_equal(raftnode_propose(l->node, &c, batch_cb, &b),
                     RAFTNODE_ENOTLEADER);
    assert_int_equal(raftnode_barrier(l->node, barrier_cb, &b),
                     RAFTNODE_ENOTLEADER);
}

/* ---- Membership -------------------------------------------------------- */

struct change {
    bool done;
    int status;
    char msg[256];
};

static void
change_cb(void *data, int status, const char *msg)
{
    struct change *ch = data;

    ch->done = true;
    ch->status = status;
    pd_strlcpy(ch->msg, msg, sizeof(ch->msg));
}

static bool
change_done(void *arg)
{
    return ((struct change *)arg)->done;
}

static size_t
voter_count(struct raftnode *n)
{
    struct raftnode_peer *v;
    size_t count, voters = 0;

    assert_int_equal(raftnode_members(n, &v, &count), 0);
    for (size_t i = 0; i < count; i++)
        voters += v[i].voter;
    free(v);
    return voters;
}

/* Add a member (spare, then voter) that catches up; a second change while
 * one runs is -EBUSY; remove a member; unknown and duplicate ids fail. */
static void
test_membership(void **state)
{
    struct world *w = *state;
    struct member *a = &w->m[0], *b = &w->m[1];
    struct change ch = {0}, ch2 = {0};
    struct fsm_cmd c;
    char *want;
    int rv;

    member_start(w, 0, 1, 0);
    wait_leader(w, 1);
    propose_workload(w, a, "m", 10);
    member_start(w, 1, 0, 0); /* joins: no bootstrap */
    member_start(w, 2, 0, 0);

    assert_int_equal(raftnode_add(a->node, b->id, b->addr, change_cb, &ch), 0);
    /* One change at a time. */
    assert_int_equal(raftnode_add(a->node, 3, w->m[2].addr, change_cb, &ch2),
                     -EBUSY);
    assert_non_null(strstr(raftnode_errmsg(a->node), "one change at a"));
    assert_int_equal(raftnode_remove(a->node, b->id, change_cb, &ch2), -EBUSY);
    assert_true(run_until(&w->loop, change_done, &ch, WAIT_MS));
    assert_int_equal(ch.status, 0);
    assert_false(ch2.done);
    assert_int_equal(voter_count(a->node), 2);

    /* The new member caught up with what was committed before it. */
    want = dump(a->fsm);
    wait_dump(w, b->fsm, want);
    free(want);

    /* Known ids and addresses are refused. */
    rv = raftnode_add(a->node, b->id, "127.0.0.1:1", change_cb, &ch2);
    assert_int_equal(rv, -EEXIST);
    rv = raftnode_add(a->node, 9, b->addr, change_cb, &ch2);
    assert_int_equal(rv, -EEXIST);
    assert_int_equal(raftnode_add(a->node, 0, "127.0.0.1:1", change_cb, &ch2),
                     -EINVAL);

    /* A third member, then it leaves again. */
    memset(&ch, 0, sizeof(ch));
    assert_int_equal(raftnode_add(a->node, 3, w->m[2].addr, change_cb, &ch), 0);
    assert_true(run_until(&w->loop, change_done, &ch, WAIT_MS));
    assert_int_equal(ch.status, 0);
    assert_int_equal(voter_count(a->node), 3);
    memset(&ch, 0, sizeof(ch));
    assert_int_equal(raftnode_remove(a->node, 3, change_cb, &ch), 0);
    assert_true(run_until(&w->loop, change_done, &ch, WAIT_MS));
    assert_int_equal(ch.status, 0);
    assert_int_equal(voter_count(a->node), 2);

    /* Unknown ids. */
    memset(&ch, 0, sizeof(ch));
    rv = raftnode_remove(a->node, 42, change_cb, &ch);
    if (rv == 0) {
        assert_true(run_until(&w->loop, change_done, &ch, WAIT_MS));
        rv = ch.status;
    }
    assert_int_equal(rv, -ENOENT);

    /* Writes still commit with two voters. */
    mk_token(&c, FSM_CMD_TOKEN_CREATE, "t", "acme", "tenant", 0);
    assert_int_equal(propose_wait(w, a, &c), 0);
    assert_false(ch2.done);
}

/* A member added at an address nobody answers: the promotion gives up
 * (raft aborts the catch-up) instead of blocking every later change, and
 * the spare it left behind can be removed. */
static void
test_add_unreachable(void **state)
{
    struct world *w = *state;
    struct member *a = &w->m[0];
    struct raftnode_peer *v;
    struct change ch = {0};
    char dead[64];
    size_t n;

    member_start(w, 0, 1, 0);
    wait_leader(w, 1);
    snprintf(dead, sizeof(dead), "127.0.0.1:%u", free_port());
    assert_int_equal(raftnode_add(a->node, 5, dead, change_cb, &ch), 0);
    assert_true(run_until(&w->loop, change_done, &ch, WAIT_MS));
    assert_int_equal(ch.status, -ENOTCONN);
    assert_non_null(strstr(ch.msg, "promotion to voter failed"));
    assert_int_equal(voter_count(a->node), 1);

    memset(&ch, 0, sizeof(ch));
    assert_int_equal(raftnode_remove(a->node, 5, change_cb, &ch), 0);
    assert_true(run_until(&w->loop, change_done, &ch, WAIT_MS));
    assert_int_equal(ch.status, 0);
    assert_int_equal(raftnode_members(a->node, &v, &n), 0);
    assert_int_equal(n, 1);
    free(v);
}

static bool
has_node_n1(void *arg)
{
    struct fsm_node n;

    if (fsm_node_get(arg, "n1", &n) != 0)
        return false;
    fsm_node_clear(&n);
    return true;
}

static void
close_from_apply_cb(void *data, int status, const struct fsm_result *res)
{
    struct member *m = data;

    assert_int_equal(status, 0);
    assert_int_equal(res->code, 0);
    /* raft_close from here would abort (DESIGN.md 9); raftnode defers. */
    raftnode_close(m->node, false, closed_cb, m);
}

/* Closing from inside an apply callback is safe, and the entry is on
 * disk for the next start. */
static void
test_close_from_apply_callback(void **state)
{
    struct world *w = *state;
    struct member *m = &w->m[0];
    struct fsm_cmd c;

    member_start(w, 0, 1, 0);
    wait_leader(w, 1);
    mk_register(&c, "n1", 1, 1, 1);
    m->closed = false;
    assert_int_equal(raftnode_propose(m->node, &c, close_from_apply_cb, m), 0);
    assert_true(run_until(&w->loop, closed, m, WAIT_MS));
    m->node = NULL;

    member_start(w, 0, 1, 0);
    wait_leader(w, 1);
    assert_true(run_until(&w->loop, has_node_n1, m->fsm, WAIT_MS));
}

/* Bad configurations and calls out of order. */
static void
test_errors(void **state)
{
    struct world *w = *state;
    struct raftnode_config cfg = {0};
    struct raftnode *n;
    struct fsm_cmd c;
    struct fsm *f;
    char err[256];

    assert_int_equal(fsm_new(&f, err, sizeof(err)), 0);
    cfg.dir = w->m[0].dir;
    cfg.address = w->m[0].addr;
    cfg.id = 0;
    assert_int_equal(raftnode_new(&n, &w->loop, f, &cfg, err, sizeof(err)),
                     -EINVAL);
    assert_true(err[0] != '\0');
    cfg.id = 1;
    cfg.address = NULL;
    assert_int_equal(raftnode_new(&n, &w->loop, f, &cfg, err, sizeof(err)),
                     -EINVAL);

    /* Created, never started: proposals are refused and close still
     * releases everything. */
    cfg.address = w->m[0].addr;
    assert_int_equal(raftnode_new(&n, &w->loop, f, &cfg, err, sizeof(err)), 0);
    mk_register(&c, "n1", 1, 1, 1);
    assert_int_equal(raftnode_propose(n, &c, batch_cb, NULL),
                     RAFTNODE_ESHUTDOWN);
    w->m[0].node = n;
    member_stop(w, &w->m[0], true);
    fsm_free(f);

    member_start(w, 0, 1, 0);
    wait_leader(w, 1);
    assert_int_equal(raftnode_start(w->m[0].node), -EALREADY);
    mk_place(&c, "s", "acme", "n", 1, 1, 1);
    c.u.place.spec.env = calloc(1, sizeof(struct fsm_kv));
    c.u.place.spec.n_env = 1; /* a NULL key: refused before raft */
    assert_int_equal(raftnode_propose(w->m[0].node, &c, batch_cb, NULL),
                     -EINVAL);
    free(c.u.place.spec.env);
    assert_int_equal(raftnode_transfer(w->m[0].node, 0, change_cb, NULL),
                     -ENOENT);
    assert_string_equal(raftnode_state_name(RAFT_LEADER), "leader");
    assert_string_equal(raftnode_state_name(RAFT_FOLLOWER), "follower");
    assert_string_equal(raftnode_state_name(-1), "unavailable");
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)

#ifdef TEST_NODE_TRAP
const char *__lsan_default_suppressions(void);

/* See test_unpadded_entry_fails_loudly: libraft's own leak, this
 * executable only. */
const char *
__lsan_default_suppressions(void)
{
    return "leak:libraft.so\n";
}
#endif

int
main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_restart_from_disk),
        T(test_unpadded_entry_fails_loudly),
        T(test_three_members),
        T(test_batched_proposals),
        T(test_catch_up_by_snapshot),
        T(test_quorum_lost),
        T(test_membership),
        T(test_add_unreachable),
        T(test_close_from_apply_callback),
        T(test_errors),
    };

#ifdef TEST_NODE_TRAP
    cmocka_set_test_filter("test_unpadded_entry_fails_loudly");
#endif
    if (getenv("TEST_FILTER") != NULL)
        cmocka_set_test_filter(getenv("TEST_FILTER"));
    return cmocka_run_group_tests(tests, NULL, NULL);
}
