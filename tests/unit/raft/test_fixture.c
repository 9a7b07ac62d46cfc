/*
 * The FSM under real Raft: a 3-member raft_fixture cluster (in-memory I/O,
 * virtual time) with Paddock's FSM on every member. Proves that commands
 * replicate to identical states, that a new leader after a leader kill
 * holds every committed command, that a retried request id is applied
 * once, and that a lagging member catches up from a snapshot.
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
#include <raft.h>
#include <raft/fixture.h>

#include "helpers.h"

#define N       3
#define WAIT_MS 10000 /* virtual time: generous, costs no real time */

/* One proposal in flight. */
struct req {
    struct raft_apply apply;
    struct fsm *fsm; /* the leader's, to read the result */
    struct fsm_rid rid;
    bool done;
    int status;
    struct fsm_result res;
};

struct cluster {
    struct raft_fixture fx;
    struct fsm *fsm[N];
    /* A request left pending on a killed member: its callback fires when
     * the fixture closes, so it must outlive the test function. */
    struct req orphan;
};

static void
apply_cb(struct raft_apply *a, int status, void *result)
{
    struct req *r = a->data;

    (void)result;
    r->done = true;
    r->status = status;
    if (status == 0)
        assert_int_equal(fsm_result_get(r->fsm, &r->rid, &r->res), 0);
}

static int
setup(void **state)
{
    struct cluster *c = calloc(1, sizeof(*c));
    struct raft_configuration conf;
    char err[128];

    test_now_ms = 1700000000000ull;
    assert_int_equal(raft_fixture_initialize(&c->fx), 0);
    for (int i = 0; i < N; i++) {
        assert_int_equal(fsm_new(&c->fsm[i], err, sizeof(err)), 0);
        assert_int_equal(raft_fixture_grow(&c->fx, fsm_raft(c->fsm[i])), 0);
    }
    assert_int_equal(raft_fixture_configuration(&c->fx, N, &conf), 0);
    assert_int_equal(raft_fixture_bootstrap(&c->fx, &conf), 0);
    raft_configuration_close(&conf);
    assert_int_equal(raft_fixture_start(&c->fx), 0);
    *state = c;
    return 0;
}

static int
teardown(void **state)
{
    struct cluster *c = *state;

    raft_fixture_close(&c->fx);
    for (int i = 0; i < N; i++)
        fsm_free(c->fsm[i]);
    free(c);
    return 0;
}

static unsigned
leader(struct cluster *c)
{
    unsigned l = raft_fixture_leader_index(&c->fx);

    assert_true(l < N);
    return l;
}

/* Proposes an encoded command on the leader (no waiting). */
static void
propose_buf(struct cluster *c, const void *buf, size_t len,
            const struct fsm_rid *rid, struct req *r)
{
    unsigned l = leader(c);
    struct raft_buffer b;

    memset(r, 0, sizeof(*r));
    r->apply.data = r;
    r->fsm = c->fsm[l];
    r->rid = *rid;
    b.len = len;
    b.base = raft_malloc(len);
    memcpy(b.base, buf, len);
    assert_int_equal(
        raft_apply(raft_fixture_get(&c->fx, l), &r->apply, &b, 1, apply_cb), 0);
}

static void
propose(struct cluster *c, struct fsm_cmd *cmd, struct req *r)
{
    void *buf;
    size_t len;

    assert_int_equal(fsm_cmd_encode(cmd, &buf, &len), 0);
    propose_buf(c, buf, len, &cmd->rid, r);
    free(buf);
    fsm_cmd_free(cmd);
}

static bool
req_done(struct raft_fixture *fx, void *arg)
{
    (void)fx;
    return ((struct req *)arg)->done;
}

/* Proposes and steps until the leader applied it; returns the result. */
static struct fsm_result
run(struct cluster *c, struct fsm_cmd *cmd)
{
    struct req r;

    propose(c, cmd, &r);
    assert_true(raft_fixture_step_until(&c->fx, req_done, &r, WAIT_MS));
    assert_int_equal(r.status, 0);
    return r.res;
}

/* Steps until every live member applied everything the leader has. */
static void
converge(struct cluster *c)
{
    raft_index last = raft_last_index(raft_fixture_get(&c->fx, leader(c)));

    for (unsigned i = 0; i < N; i++) {
        if (raft_fixture_alive(&c->fx, i))
            assert_true(
                raft_fixture_step_until_applied(&c->fx, i, last, WAIT_MS));
    }
}

/* Every live member's FSM dumps the same text. */
static void
assert_equal_states(struct cluster *c)
{
    char *first = NULL;

    for (unsigned i = 0; i < N; i++) {
        char *d;

        if (!raft_fixture_alive(&c->fx, i))
            continue;
        assert_int_equal(fsm_dump(c->fsm[i], &d), 0);
        if (first == NULL) {
            first = d;
            continue;
        }
        assert_string_equal(first, d);
        free(d);
    }
    free(first);
}

static void
elect_first(struct cluster *c)
{
    raft_fixture_elect(&c->fx, 0);
    assert_int_equal(leader(c), 0);
}

/* A cluster event list: nodes, sandboxes, states, tokens. */
static void
workload(struct cluster *c, const char *prefix, int n)
{
    struct fsm_cmd cmd;
    char node[32], sb[32];

    snprintf(node, sizeof(node), "%s-node", prefix);
    mk_register(&cmd, node, 1000, 1 << 20, 1 << 20);
    assert_int_equal(run(c, &cmd).code, 0);
    for (int i = 0; i < n; i++) {
        snprintf(sb, sizeof(sb), "%s-%d", prefix, i);
        mk_place(&cmd, sb, "acme", node, 1, 256, 1024);
        assert_int_equal(run(c, &cmd).code, 0);
        mk_state(&cmd, sb, FSM_SB_RUNNING, "");
        assert_int_equal(run(c, &cmd).code, 0);
    }
}

static int
count_sandboxes(struct fsm *f)
{
    struct fsm_sandbox *v;
    size_t n;

    assert_int_equal(fsm_sandbox_list(f, NULL, &v, &n), 0);
    fsm_sandboxes_free(v, n);
    return (int)n;
}

/* ---- Tests ------------------------------------------------------------- */

/* Elect, replicate a workload, and every FSM ends the same. */
static void
test_replicate(void **state)
{
    struct cluster *c = *state;
    struct fsm_result r;
    struct fsm_cmd cmd;

    elect_first(c);
    workload(c, "a", 20);

    /* A command that fails fails the same way everywhere. */
    mk_place(&cmd, "too-big", "acme", "a-node", 5000, 1, 1);
    r = run(c, &cmd);
    assert_int_equal(r.code, -ENOSPC);

    converge(c);
    assert_equal_states(c);
    for (int i = 0; i < N; i++)
        assert_int_equal(count_sandboxes(c->fsm[i]), 20);
}

/* Kill the leader: a new one is elected among the others and holds every
 * committed command; the cluster goes on and the old leader, revived,
 * catches up to the same state. */
static void
test_leader_kill(void **state)
{
    struct cluster *c = *state;
    struct fsm_cmd cmd;
    unsigned nl;

    elect_first(c);
    workload(c, "before", 10);
    raft_fixture_kill(&c->fx, 0);
    /* DESIGN.md 9: first until there is no leader, then until one. */
    assert_true(raft_fixture_step_until_has_no_leader(&c->fx, WAIT_MS));
    assert_true(raft_fixture_step_until_has_leader(&c->fx, WAIT_MS));
    nl = leader(c);
    assert_int_not_equal(nl, 0);
    assert_int_equal(count_sandboxes(c->fsm[nl]), 10);

    workload(c, "after", 10);
    mk_token(&cmd, FSM_CMD_TOKEN_CREATE, "t1", "acme", "tenant", 0);
    assert_int_equal(run(c, &cmd).code, 0);

    raft_fixture_revive(&c->fx, 0);
    converge(c);
    assert_equal_states(c);
    assert_int_equal(count_sandboxes(c->fsm[0]), 20);
    assert_false(fsm_token_is_revoked(c->fsm[0], "t1"));
}

/* The leader dies with a command in flight whose outcome its client never
 * learns. The client resubmits the same entry (same request id) to the
 * new leader: it takes effect exactly once, and the retry's result is the
 * success of the first apply, not -EEXIST. */
static void
test_retry_after_leader_loss(void **state)
{
    struct cluster *c = *state;
    struct fsm_result res;
    struct req *r1 = &c->orphan, r2;
    struct fsm_cmd cmd;
    struct fsm_rid rid;
    struct fsm_token t;
    void *buf;
    size_t len;

    elect_first(c);
    mk_token(&cmd, FSM_CMD_TOKEN_CREATE, "jti-1", "acme", "tenant", 0);
    rid = cmd.rid;
    assert_int_equal(fsm_cmd_encode(&cmd, &buf, &len), 0);
    propose_buf(c, buf, len, &rid, r1);

    /* Let it reach the followers' logs, then kill the leader before its
     * client hears back. */
    for (int i = 0; i < 200 && !r1->done; i++) {
        raft_fixture_step(&c->fx);
        if (raft_last_index(raft_fixture_get(&c->fx, 1)) >=
            raft_last_index(raft_fixture_get(&c->fx, 0)))
            break;
    }
    raft_fixture_kill(&c->fx, 0);
    assert_true(raft_fixture_step_until_has_no_leader(&c->fx, WAIT_MS));
    assert_true(raft_fixture_step_until_has_leader(&c->fx, WAIT_MS));

    propose_buf(c, buf, len, &rid, &r2);
    assert_true(raft_fixture_step_until(&c->fx, req_done, &r2, WAIT_MS));
    assert_int_equal(r2.status, 0);
    assert_int_equal(r2.res.code, 0);
    /* The entry was in a majority's logs, so the new leader committed
     * the first copy: the retry is recognised as a duplicate. */
    assert_true(r2.res.duplicate);
    free(buf);

    converge(c);
    assert_equal_states(c);
    assert_int_equal(fsm_token_get(c->fsm[leader(c)], "jti-1", &t), 0);
    assert_int_equal(fsm_result_get(c->fsm[leader(c)], &rid, &res), 0);
    assert_int_equal(res.code, 0);
}

/* A member that was down while the leader compacted its log catches up
 * by InstallSnapshot, then by the entries after it. */
static void
test_snapshot_install(void **state)
{
    struct cluster *c = *state;
    struct raft *r2 = raft_fixture_get(&c->fx, 2);

    for (unsigned i = 0; i < N; i++) {
        raft_set_snapshot_threshold(raft_fixture_get(&c->fx, i), 16);
        raft_set_snapshot_trailing(raft_fixture_get(&c->fx, i), 4);
    }
    elect_first(c);
    workload(c, "warm", 2);
    converge(c);

    raft_fixture_kill(&c->fx, 2);
    workload(c, "missed", 30); /* ~60 entries: several snapshots */
    assert_true(raft_fixture_get(&c->fx, 0)->log.snapshot.last_index >
                raft_last_applied(r2) + 4);
    raft_fixture_revive(&c->fx, 2);
    converge(c);

    assert_true(raft_fixture_n_recv(&c->fx, 2, RAFT_IO_INSTALL_SNAPSHOT) >= 1);
    assert_equal_states(c);
    assert_int_equal(count_sandboxes(c->fsm[2]), 32);

    /* And it goes on applying normally after the install. */
    workload(c, "later", 3);
    converge(c);
    assert_equal_states(c);
}

/* A follower cut off from the others does not make the FSMs diverge: it
 * trails, then converges once reconnected. */
static void
test_partition(void **state)
{
    struct cluster *c = *state;

    elect_first(c);
    workload(c, "p0", 3);
    converge(c);
    raft_fixture_disconnect(&c->fx, 0, 2);
    raft_fixture_disconnect(&c->fx, 1, 2);
    raft_fixture_disconnect(&c->fx, 2, 0);
    raft_fixture_disconnect(&c->fx, 2, 1);
    workload(c, "p1", 5);
    assert_int_equal(count_sandboxes(c->fsm[2]), 3);
    raft_fixture_reconnect(&c->fx, 0, 2);
    raft_fixture_reconnect(&c->fx, 1, 2);
    raft_fixture_reconnect(&c->fx, 2, 0);
    raft_fixture_reconnect(&c->fx, 2, 1);
    /* The isolated member may have raised its term and forced an
     * election; let the cluster settle on a leader again. */
    assert_true(raft_fixture_step_until_has_leader(&c->fx, WAIT_MS));
    converge(c);
    assert_equal_states(c);
    assert_int_equal(count_sandboxes(c->fsm[2]), 8);
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)

int
main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_replicate),
        T(test_leader_kill),
        T(test_retry_after_leader_loss),
        T(test_snapshot_install),
        T(test_partition),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
