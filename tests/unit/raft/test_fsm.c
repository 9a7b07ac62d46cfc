/*
 * The sqlite FSM (raft/fsm.c, fsm_read.c, fsm_index.c): every command and
 * its error cases, request-id dedup, determinism (two FSMs fed one log end
 * equal), snapshots, and the resource accounting that placement trusts:
 * PLACE re-checks the fit and nothing is ever over-committed.
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
#include <sqlite3.h>

#include "helpers.h"

/* ---- Helpers ----------------------------------------------------------- */

static struct fsm *
fsm_open(void)
{
    struct fsm *f;
    char err[256];

    assert_int_equal(fsm_new(&f, err, sizeof(err)), 0);
    return f;
}

/* Applies c (and frees what it holds); returns the result. */
static struct fsm_result
ap(struct fsm *f, struct fsm_cmd *c)
{
    struct fsm_result r;

    assert_int_equal(fsm_apply_cmd(f, c, &r), 0);
    fsm_cmd_free(c);
    return r;
}

static int
ap_code(struct fsm *f, struct fsm_cmd *c)
{
    return ap(f, c).code;
}

static char *
dump(struct fsm *f)
{
    char *s;

    assert_int_equal(fsm_dump(f, &s), 0);
    return s;
}

static struct fsm_kv *
kv1(const char *k, const char *v)
{
    struct fsm_kv *kv = calloc(1, sizeof(*kv));

    kv->key = strdup(k);
    kv->value = strdup(v);
    return kv;
}

static void
reg(struct fsm *f, const char *node, uint32_t cpus, uint64_t mem, uint64_t disk)
{
    struct fsm_cmd c;

    mk_register(&c, node, cpus, mem, disk);
    assert_int_equal(ap_code(f, &c), 0);
}

static int
place(struct fsm *f, const char *sb, const char *node, uint32_t cpus,
      uint64_t mem, uint64_t disk)
{
    struct fsm_cmd c;

    mk_place(&c, sb, "acme", node, cpus, mem, disk);
    return ap_code(f, &c);
}

static int
set_state(struct fsm *f, const char *sb, int state)
{
    struct fsm_cmd c;

    mk_state(&c, sb, state, "");
    return ap_code(f, &c);
}

static struct fsm_result
replace(struct fsm *f, const char *sb, const char *node)
{
    struct fsm_cmd c;

    mk_place(&c, sb, "acme", node, 0, 0, 0);
    c.u.place.replace = true;
    return ap(f, &c);
}

static void
node_alloc(struct fsm *f, const char *node, uint32_t cpus, uint64_t mem,
           uint64_t disk)
{
    struct fsm_node n;

    assert_int_equal(fsm_node_get(f, node, &n), 0);
    assert_int_equal(n.alloc_cpus, cpus);
    assert_int_equal(n.alloc_memory_mb, mem);
    assert_int_equal(n.alloc_disk_mb, disk);
    fsm_node_clear(&n);
}

static const struct fsm_node_cap *
cap_of(struct fsm *f, const char *node)
{
    const struct fsm_node_index *idx = fsm_node_index(f);

    for (size_t i = 0; i < idx->n; i++) {
        if (strcmp(idx->v[i].id, node) == 0)
            return &idx->v[i];
    }
    return NULL;
}

static int
sb_state(struct fsm *f, const char *sb)
{
    struct fsm_sandbox s;
    int state;

    assert_int_equal(fsm_sandbox_get(f, sb, &s), 0);
    state = s.state;
    fsm_sandbox_clear(&s);
    return state;
}

/* The capacity index must always mirror the nodes table. */
static void
index_matches_table(struct fsm *f)
{
    const struct fsm_node_index *idx = fsm_node_index(f);
    struct fsm_node *v;
    size_t n;

    assert_int_equal(fsm_node_list(f, &v, &n), 0);
    assert_int_equal(idx->n, n);
    for (size_t i = 0; i < n; i++) {
        assert_string_equal(idx->v[i].id, v[i].id);
        assert_int_equal(idx->v[i].alloc_cpus, v[i].alloc_cpus);
        assert_int_equal(idx->v[i].alloc_memory_mb, v[i].alloc_memory_mb);
        assert_int_equal(idx->v[i].alloc_disk_mb, v[i].alloc_disk_mb);
        assert_int_equal(idx->v[i].cpus, v[i].cpus);
        assert_int_equal(idx->v[i].ready, v[i].state == FSM_NODE_READY);
        assert_int_equal(idx->v[i].draining, v[i].draining);
        assert_non_null(idx->v[i].labels);
        /* And allocation never exceeds capacity. */
        assert_true(v[i].alloc_cpus <= v[i].cpus);
        assert_true(v[i].alloc_memory_mb <= v[i].memory_mb);
        assert_true(v[i].alloc_disk_mb <= v[i].disk_mb);
    }
    fsm_nodes_free(v, n);
}

static int
setup(void **state)
{
    test_now_ms = 1700000000000ull;
    *state = fsm_open();
    return 0;
}

static int
teardown(void **state)
{
    fsm_free(*state);
    return 0;
}

/* ---- Members ----------------------------------------------------------- */

static void
test_members(void **state)
{
    struct fsm *f = *state;
    struct fsm_member m, *v;
    struct fsm_cmd c;
    size_t n;

    for (uint64_t id = 3; id >= 1; id--) {
        mk_member(&c, id);
        assert_int_equal(ap_code(f, &c), 0);
    }
    assert_int_equal(fsm_member_get(f, 2, &m), 0);
    assert_string_equal(m.raft_addr, "127.0.0.1:9002");
    assert_string_equal(m.api_addr, "127.0.0.1:8002");
    assert_string_equal(m.rpc_addr, "127.0.0.1:8102");
    assert_string_equal(m.preview_addr, "127.0.0.1:8202");
    assert_int_equal(fsm_member_list(f, &v, &n), 0);
    assert_int_equal(n, 3);
    assert_int_equal(v[0].id, 1);
    assert_int_equal(v[2].id, 3);
    free(v);

    /* Upsert: a member's addresses change in place. */
    mk_member(&c, 2);
    strcpy(c.u.member.api_addr, "127.0.0.1:18002");
    assert_int_equal(ap_code(f, &c), 0);
    assert_int_equal(fsm_member_get(f, 2, &m), 0);
    assert_string_equal(m.api_addr, "127.0.0.1:18002");

    cmd_new(&c, FSM_CMD_MEMBER_REMOVE);
    c.u.member.id = 2;
    assert_int_equal(ap_code(f, &c), 0);
    assert_int_equal(fsm_member_get(f, 2, &m), -ENOENT);
    cmd_new(&c, FSM_CMD_MEMBER_REMOVE);
    c.u.member.id = 2;
    assert_int_equal(ap_code(f, &c), -ENOENT);

    mk_member(&c, 0);
    assert_int_equal(ap_code(f, &c), -EINVAL);
    mk_member(&c, 5);
    c.u.member.api_addr[0] = '\0';
    assert_int_equal(ap_code(f, &c), -EINVAL);
    assert_int_equal(fsm_member_get(f, 5, &m), -ENOENT);
}

/* ---- Nodes ------------------------------------------------------------- */

static void
test_node_register(void **state)
{
    struct fsm *f = *state;
    const struct fsm_node_cap *cap;
    struct fsm_node n;
    struct fsm_cmd c;

    mk_register(&c, "n1", 8, 16384, 100000);
    c.u.node_register.labels = calloc(2, sizeof(struct fsm_kv));
    c.u.node_register.labels[0].key = strdup("zone");
    c.u.node_register.labels[0].value = strdup("b");
    c.u.node_register.labels[1].key = strdup("arch");
    c.u.node_register.labels[1].value = strdup("x86");
    c.u.node_register.n_labels = 2;
    assert_int_equal(ap_code(f, &c), 0);

    assert_int_equal(fsm_node_get(f, "n1", &n), 0);
    assert_int_equal(n.cpus, 8);
    assert_int_equal(n.memory_mb, 16384);
    assert_int_equal(n.disk_mb, 100000);
    assert_int_equal(n.state, FSM_NODE_READY);
    assert_false(n.draining);
    assert_int_equal(n.registered_ms, test_now_ms);
    assert_int_equal(n.last_seen_ms, test_now_ms);
    assert_string_equal(fsm_node_state_name(&n), "ready");
    assert_int_equal(n.n_labels, 2);
    assert_string_equal(n.labels[0].key, "arch"); /* ordered by key */
    fsm_node_clear(&n);
    cap = cap_of(f, "n1");
    assert_non_null(cap);
    assert_string_equal(cap->labels, "arch=x86\nzone=b\n");
    assert_true(cap->ready);

    /* Re-registering replaces capacity and labels, keeps registered_ms. */
    test_now_ms += 1000;
    mk_register(&c, "n1", 4, 8192, 50000);
    c.u.node_register.labels = kv1("zone", "c");
    c.u.node_register.n_labels = 1;
    assert_int_equal(ap_code(f, &c), 0);
    assert_int_equal(fsm_node_get(f, "n1", &n), 0);
    assert_int_equal(n.cpus, 4);
    assert_int_equal(n.registered_ms, test_now_ms - 1000);
    assert_int_equal(n.last_seen_ms, test_now_ms);
    assert_int_equal(n.n_labels, 1);
    fsm_node_clear(&n);
    assert_string_equal(cap_of(f, "n1")->labels, "zone=c\n");

    /* Refusals change nothing. */
    mk_register(&c, "N1", 4, 1, 1);
    assert_int_equal(ap_code(f, &c), -EINVAL);
    mk_register(&c, "n2", 0, 1, 1);
    assert_int_equal(ap_code(f, &c), -EINVAL);
    mk_register(&c, "n2", 1, 1, 0);
    assert_int_equal(ap_code(f, &c), -EINVAL);
    mk_register(&c, "n2", 1, UINT64_MAX, 1);
    assert_int_equal(ap_code(f, &c), -EINVAL);
    mk_register(&c, "n2", 1, 1, 1);
    c.u.node_register.rpc_addr[0] = '\0';
    assert_int_equal(ap_code(f, &c), -EINVAL);
    mk_register(&c, "n2", 1, 1, 1);
    c.u.node_register.labels = kv1("bad key", "v");
    c.u.node_register.n_labels = 1;
    assert_int_equal(ap_code(f, &c), -EINVAL);
    mk_register(&c, "n2", 1, 1, 1);
    c.u.node_register.labels = calloc(2, sizeof(struct fsm_kv));
    c.u.node_register.labels[0].key = strdup("k");
    c.u.node_register.labels[0].value = strdup("a");
    c.u.node_register.labels[1].key = strdup("k");
    c.u.node_register.labels[1].value = strdup("b");
    c.u.node_register.n_labels = 2;
    assert_int_equal(ap_code(f, &c), -EINVAL);
    assert_int_equal(fsm_node_get(f, "n2", &n), -ENOENT);
    assert_int_equal(fsm_node_index(f)->n, 1);
    index_matches_table(f);
}

static void
test_node_heartbeat_drain(void **state)
{
    struct fsm *f = *state;
    struct fsm_node n;
    struct fsm_cmd c;

    reg(f, "n1", 4, 4096, 4096);
    test_now_ms += 500;
    mk_node(&c, FSM_CMD_NODE_HEARTBEAT, "n1");
    assert_int_equal(ap_code(f, &c), 0);
    assert_int_equal(fsm_node_get(f, "n1", &n), 0);
    assert_int_equal(n.last_seen_ms, test_now_ms);
    fsm_node_clear(&n);

    mk_node(&c, FSM_CMD_NODE_DRAIN, "n1");
    c.u.node.drain = true;
    assert_int_equal(ap_code(f, &c), 0);
    assert_int_equal(fsm_node_get(f, "n1", &n), 0);
    assert_true(n.draining);
    assert_string_equal(fsm_node_state_name(&n), "draining");
    fsm_node_clear(&n);
    assert_true(cap_of(f, "n1")->draining);
    assert_int_equal(place(f, "s1", "n1", 1, 1, 1), -ESTALE);

    mk_node(&c, FSM_CMD_NODE_DRAIN, "n1");
    c.u.node.drain = false;
    assert_int_equal(ap_code(f, &c), 0);
    assert_false(cap_of(f, "n1")->draining);
    assert_int_equal(place(f, "s1", "n1", 1, 1, 1), 0);

    mk_node(&c, FSM_CMD_NODE_HEARTBEAT, "nope");
    assert_int_equal(ap_code(f, &c), -ENOENT);
    mk_node(&c, FSM_CMD_NODE_DRAIN, "nope");
    assert_int_equal(ap_code(f, &c), -ENOENT);
    mk_node(&c, FSM_CMD_NODE_DOWN, "nope");
    assert_int_equal(ap_code(f, &c), -ENOENT);
    mk_node(&c, FSM_CMD_NODE_HEARTBEAT, "-bad");
    assert_int_equal(ap_code(f, &c), -EINVAL);
    index_matches_table(f);
}

/* ---- Placement and accounting ------------------------------------------ */

static void
test_place(void **state)
{
    struct fsm *f = *state;
    struct fsm_sandbox s;
    struct fsm_result r;
    struct fsm_cmd c;

    reg(f, "n1", 8, 8192, 10000);
    mk_place(&c, "s1", "acme", "n1", 2, 1024, 2000);
    c.u.place.spec.env = calloc(2, sizeof(struct fsm_kv));
    c.u.place.spec.env[0].key = strdup("B");
    c.u.place.spec.env[0].value = strdup("2");
    c.u.place.spec.env[1].key = strdup("A");
    c.u.place.spec.env[1].value = strdup("1=x");
    c.u.place.spec.n_env = 2;
    c.u.place.spec.labels = kv1("team", "red");
    c.u.place.spec.n_labels = 1;
    r = ap(f, &c);
    assert_int_equal(r.code, 0);
    assert_string_equal(r.node, "n1");
    assert_int_equal(r.generation, 1);
    assert_false(r.existing);
    assert_false(r.duplicate);

    assert_int_equal(fsm_sandbox_get(f, "s1", &s), 0);
    assert_string_equal(s.tenant, "acme");
    assert_string_equal(s.node, "n1");
    assert_int_equal(s.state, FSM_SB_PENDING);
    assert_int_equal(s.generation, 1);
    assert_int_equal(s.spec.cpus, 2);
    assert_int_equal(s.spec.memory_mb, 1024);
    assert_string_equal(s.spec.egress, "none");
    assert_int_equal(s.spec.n_env, 2);
    assert_string_equal(s.spec.env[0].key, "A");
    assert_string_equal(s.spec.env[0].value, "1=x");
    assert_int_equal(s.spec.n_labels, 1);
    assert_int_equal(s.created_ms, test_now_ms);
    fsm_sandbox_clear(&s);
    node_alloc(f, "n1", 2, 1024, 2000);
    assert_int_equal(cap_of(f, "n1")->alloc_cpus, 2);

    /* The same spec, env in another order: the create is idempotent. */
    mk_place(&c, "s1", "acme", "n1", 2, 1024, 2000);
    c.u.place.spec.env = calloc(2, sizeof(struct fsm_kv));
    c.u.place.spec.env[0].key = strdup("A");
    c.u.place.spec.env[0].value = strdup("1=x");
    c.u.place.spec.env[1].key = strdup("B");
    c.u.place.spec.env[1].value = strdup("2");
    c.u.place.spec.n_env = 2;
    c.u.place.spec.labels = kv1("team", "red");
    c.u.place.spec.n_labels = 1;
    r = ap(f, &c);
    assert_int_equal(r.code, 0);
    assert_true(r.existing);
    assert_string_equal(r.node, "n1");
    node_alloc(f, "n1", 2, 1024, 2000);

    /* Another spec, or another tenant, for a taken id. */
    assert_int_equal(place(f, "s1", "n1", 3, 1024, 2000), -EEXIST);
    mk_place(&c, "s1", "other", "n1", 2, 1024, 2000);
    assert_int_equal(ap_code(f, &c), -EEXIST);

    /* Bad requests. */
    assert_int_equal(place(f, "s2", "nope", 1, 1, 1), -ENOENT);
    assert_int_equal(place(f, "S2", "n1", 1, 1, 1), -EINVAL);
    assert_int_equal(place(f, "s2", "n1", 0, 1, 1), -EINVAL);
    assert_int_equal(place(f, "s2", "n1", 1, 0, 1), -EINVAL);
    mk_place(&c, "s2", "", "n1", 1, 1, 1);
    assert_int_equal(ap_code(f, &c), -EINVAL);
    mk_place(&c, "s2", "acme", "n1", 1, 1, 1);
    c.u.place.spec.egress[0] = '\0';
    assert_int_equal(ap_code(f, &c), -EINVAL);
    mk_place(&c, "s2", "acme", "n1", 1, 1, 1);
    c.u.place.spec.env = kv1("A=B", "x");
    c.u.place.spec.n_env = 1;
    assert_int_equal(ap_code(f, &c), -EINVAL);
    assert_int_equal(fsm_sandbox_get(f, "s2", &s), -ENOENT);
    node_alloc(f, "n1", 2, 1024, 2000);
    index_matches_table(f);
}

/* The FSM re-checks the leader's choice: a stale one gets -ENOSPC or
 * -ESTALE, and the allocation never passes the capacity. */
static void
test_place_rechecks_fit(void **state)
{
    struct fsm *f = *state;
    struct fsm_sandbox s;
    struct fsm_result r;
    struct fsm_cmd c;
    char id[16];

    reg(f, "n1", 4, 4096, 4096);
    assert_int_equal(place(f, "s1", "n1", 3, 1000, 1000), 0);
    assert_int_equal(place(f, "s2", "n1", 2, 1000, 1000), -ENOSPC);
    assert_int_equal(place(f, "s2", "n1", 1, 3097, 1000), -ENOSPC);
    assert_int_equal(place(f, "s2", "n1", 1, 1000, 3097), -ENOSPC);
    mk_place(&c, "s2", "acme", "n1", 2, 1000, 1000);
    r = ap(f, &c);
    assert_int_equal(r.code, -ENOSPC);
    assert_non_null(strstr(r.message, "lacks CPU"));
    assert_int_equal(fsm_sandbox_get(f, "s2", &s), -ENOENT);

    /* Exactly full fits. */
    assert_int_equal(place(f, "s2", "n1", 1, 3096, 3096), 0);
    node_alloc(f, "n1", 4, 4096, 4096);
    assert_int_equal(place(f, "s3", "n1", 1, 1, 1), -ENOSPC);

    /* Sizes that would wrap a sum are refused outright. */
    assert_int_equal(place(f, "s3", "n1", 1, UINT64_MAX, 1), -EINVAL);
    assert_int_equal(place(f, "s3", "n1", 1, 1, UINT64_MAX - 10), -EINVAL);
    assert_int_equal(place(f, "s3", "n1", UINT32_MAX, 1, 1), -EINVAL);

    /* Many small placements: exactly the capacity fits. */
    reg(f, "n2", 16, 1 << 20, 1 << 20);
    for (int i = 0; i < 40; i++) {
        snprintf(id, sizeof(id), "m%d", i);
        assert_int_equal(place(f, id, "n2", 1, 1, 1), i < 16 ? 0 : -ENOSPC);
    }
    node_alloc(f, "n2", 16, 16, 16);
    index_matches_table(f);
}

static void
test_state_transitions(void **state)
{
    struct fsm *f = *state;
    struct fsm_sandbox s;
    struct fsm_result r;
    struct fsm_cmd c;

    reg(f, "n1", 4, 4096, 4096);
    assert_int_equal(place(f, "s1", "n1", 2, 1000, 1000), 0);
    assert_int_equal(set_state(f, "s1", FSM_SB_STARTING), 0);
    assert_int_equal(set_state(f, "s1", FSM_SB_RUNNING), 0);
    /* A repeated report is not an error. */
    assert_int_equal(set_state(f, "s1", FSM_SB_RUNNING), 0);
    assert_int_equal(set_state(f, "s1", FSM_SB_PENDING), -EINVAL);
    assert_int_equal(set_state(f, "s1", FSM_SB_STARTING), -EINVAL);
    node_alloc(f, "n1", 2, 1000, 1000);

    /* A report from the wrong node or generation changes nothing. */
    mk_state(&c, "s1", FSM_SB_STOPPING, "");
    strcpy(c.u.state.node, "n9");
    assert_int_equal(ap_code(f, &c), -ESTALE);
    mk_state(&c, "s1", FSM_SB_STOPPING, "");
    strcpy(c.u.state.node, "n1");
    c.u.state.generation = 2;
    assert_int_equal(ap_code(f, &c), -ESTALE);
    assert_int_equal(sb_state(f, "s1"), FSM_SB_RUNNING);
    mk_state(&c, "s1", FSM_SB_STOPPING, "");
    strcpy(c.u.state.node, "n1");
    c.u.state.generation = 1;
    r = ap(f, &c);
    assert_int_equal(r.code, 0);
    assert_int_equal(r.generation, 1);
    node_alloc(f, "n1", 2, 1000, 1000); /* stopping still counts */

    mk_state(&c, "s1", FSM_SB_STOPPED, "destroyed by the user");
    assert_int_equal(ap_code(f, &c), 0);
    node_alloc(f, "n1", 0, 0, 0);
    assert_int_equal(fsm_sandbox_get(f, "s1", &s), 0);
    assert_string_equal(s.reason, "destroyed by the user");
    fsm_sandbox_clear(&s);
    assert_int_equal(set_state(f, "s1", FSM_SB_RUNNING), -EINVAL);

    /* Failed releases the allocation once, then only stopped follows. */
    assert_int_equal(place(f, "s2", "n1", 1, 100, 100), 0);
    assert_int_equal(set_state(f, "s2", FSM_SB_FAILED), 0);
    node_alloc(f, "n1", 0, 0, 0);
    assert_int_equal(set_state(f, "s2", FSM_SB_RUNNING), -EINVAL);
    assert_int_equal(set_state(f, "s2", FSM_SB_STOPPED), 0);
    node_alloc(f, "n1", 0, 0, 0);

    assert_int_equal(set_state(f, "nope", FSM_SB_RUNNING), -ENOENT);
    assert_int_equal(set_state(f, "-x", FSM_SB_RUNNING), -EINVAL);
    index_matches_table(f);
}

/* NODE_DOWN commits the node down and its counting sandboxes lost. */
static void
test_node_down_loses_sandboxes(void **state)
{
    struct fsm *f = *state;
    uint64_t counts[FSM_SB_NSTATES];
    struct fsm_sandbox s;
    struct fsm_result r;
    struct fsm_node n;
    struct fsm_cmd c;

    reg(f, "n1", 8, 8192, 8192);
    reg(f, "n2", 8, 8192, 8192);
    assert_int_equal(place(f, "a", "n1", 1, 100, 100), 0);
    assert_int_equal(place(f, "b", "n1", 1, 100, 100), 0);
    assert_int_equal(place(f, "c", "n1", 1, 100, 100), 0);
    assert_int_equal(place(f, "d", "n2", 1, 100, 100), 0);
    assert_int_equal(set_state(f, "b", FSM_SB_RUNNING), 0);
    assert_int_equal(set_state(f, "c", FSM_SB_STOPPED), 0);

    test_now_ms += 5000;
    mk_node(&c, FSM_CMD_NODE_DOWN, "n1");
    r = ap(f, &c);
    assert_int_equal(r.code, 0);
    assert_int_equal(r.count, 2);
    assert_int_equal(sb_state(f, "a"), FSM_SB_LOST);
    assert_int_equal(sb_state(f, "b"), FSM_SB_LOST);
    assert_int_equal(sb_state(f, "c"), FSM_SB_STOPPED);
    assert_int_equal(sb_state(f, "d"), FSM_SB_PENDING);
    assert_int_equal(fsm_sandbox_get(f, "a", &s), 0);
    assert_string_equal(s.reason, "node n1 went down");
    assert_int_equal(s.updated_ms, test_now_ms);
    fsm_sandbox_clear(&s);
    assert_int_equal(fsm_node_get(f, "n1", &n), 0);
    assert_int_equal(n.state, FSM_NODE_DOWN);
    assert_int_equal(n.down_ms, test_now_ms);
    assert_int_equal(n.n_sandboxes, 0);
    assert_string_equal(fsm_node_state_name(&n), "down");
    fsm_node_clear(&n);
    node_alloc(f, "n1", 0, 0, 0);
    node_alloc(f, "n2", 1, 100, 100);
    assert_false(cap_of(f, "n1")->ready);
    assert_int_equal(fsm_sandbox_counts(f, counts), 0);
    assert_int_equal(counts[FSM_SB_LOST], 2);
    assert_int_equal(counts[FSM_SB_STOPPED], 1);
    assert_int_equal(counts[FSM_SB_PENDING], 1);

    /* Nothing lands on a down node; a late report from it is stale. */
    assert_int_equal(place(f, "e", "n1", 1, 1, 1), -ESTALE);
    assert_int_equal(set_state(f, "b", FSM_SB_RUNNING), -ESTALE);

    /* Down again: nothing more is lost. A custom reason is kept. */
    mk_node(&c, FSM_CMD_NODE_DOWN, "n2");
    strcpy(c.u.node.reason, "agent n2 stopped heartbeating");
    r = ap(f, &c);
    assert_int_equal(r.count, 1);
    assert_int_equal(fsm_sandbox_get(f, "d", &s), 0);
    assert_string_equal(s.reason, "agent n2 stopped heartbeating");
    fsm_sandbox_clear(&s);
    mk_node(&c, FSM_CMD_NODE_DOWN, "n2");
    assert_int_equal(ap(f, &c).count, 0);

    /* A heartbeat brings the node back; its lost sandboxes stay lost. */
    mk_node(&c, FSM_CMD_NODE_HEARTBEAT, "n1");
    assert_int_equal(ap_code(f, &c), 0);
    assert_true(cap_of(f, "n1")->ready);
    assert_int_equal(sb_state(f, "a"), FSM_SB_LOST);
    index_matches_table(f);
}

/* A lost sandbox is placed again with a new generation. */
static void
test_replace_generation(void **state)
{
    struct fsm *f = *state;
    struct fsm_sandbox s;
    struct fsm_result r;
    struct fsm_cmd c;

    reg(f, "n1", 4, 4096, 4096);
    reg(f, "n2", 4, 4096, 4096);
    assert_int_equal(place(f, "a", "n1", 2, 1000, 1000), 0);
    assert_int_equal(set_state(f, "a", FSM_SB_RUNNING), 0);

    /* Re-placing a sandbox that still counts returns where it is. */
    r = replace(f, "a", "n2");
    assert_int_equal(r.code, 0);
    assert_true(r.existing);
    assert_string_equal(r.node, "n1");
    assert_int_equal(r.generation, 1);

    mk_node(&c, FSM_CMD_NODE_DOWN, "n1");
    assert_int_equal(ap_code(f, &c), 0);
    r = replace(f, "a", "n2");
    assert_int_equal(r.code, 0);
    assert_false(r.existing);
    assert_string_equal(r.node, "n2");
    assert_int_equal(r.generation, 2);
    assert_int_equal(fsm_sandbox_get(f, "a", &s), 0);
    assert_int_equal(s.state, FSM_SB_PENDING);
    assert_int_equal(s.generation, 2);
    assert_string_equal(s.node, "n2");
    assert_string_equal(s.reason, "");
    assert_int_equal(s.spec.cpus, 2); /* the stored spec */
    fsm_sandbox_clear(&s);
    node_alloc(f, "n2", 2, 1000, 1000);

    /* A report for generation 1 is stale now. */
    mk_state(&c, "a", FSM_SB_RUNNING, "");
    c.u.state.generation = 1;
    assert_int_equal(ap_code(f, &c), -ESTALE);

    /* Stopped, then re-placed on a node without room, then with room. */
    assert_int_equal(set_state(f, "a", FSM_SB_STOPPED), 0);
    assert_int_equal(place(f, "big", "n2", 3, 100, 100), 0);
    assert_int_equal(replace(f, "a", "n2").code, -ENOSPC);
    assert_int_equal(sb_state(f, "a"), FSM_SB_STOPPED);
    mk_node(&c, FSM_CMD_NODE_HEARTBEAT, "n1");
    assert_int_equal(ap_code(f, &c), 0);
    r = replace(f, "a", "n1");
    assert_int_equal(r.code, 0);
    assert_int_equal(r.generation, 3);
    node_alloc(f, "n1", 2, 1000, 1000);

    assert_int_equal(replace(f, "nope", "n1").code, -ENOENT);
    mk_place(&c, "a", "other", "n1", 0, 0, 0);
    c.u.place.replace = true;
    assert_int_equal(ap_code(f, &c), -EEXIST);
    index_matches_table(f);
}

static void
test_delete(void **state)
{
    struct fsm *f = *state;
    struct fsm_sandbox s;
    struct fsm_port *ports;
    struct fsm_cmd c;
    size_t n;

    reg(f, "n1", 4, 4096, 4096);
    mk_place(&c, "a", "acme", "n1", 2, 1000, 1000);
    c.u.place.spec.env = kv1("K", "V");
    c.u.place.spec.n_env = 1;
    c.u.place.spec.labels = kv1("l", "v");
    c.u.place.spec.n_labels = 1;
    assert_int_equal(ap_code(f, &c), 0);
    mk_port(&c, FSM_CMD_PORT_EXPOSE, "a", 80);
    assert_int_equal(ap_code(f, &c), 0);

    mk_sandbox(&c, "a");
    assert_int_equal(ap_code(f, &c), 0);
    assert_int_equal(fsm_sandbox_get(f, "a", &s), -ENOENT);
    assert_int_equal(fsm_port_list(f, "a", &ports, &n), 0);
    assert_int_equal(n, 0);
    free(ports);
    node_alloc(f, "n1", 0, 0, 0);

    /* The id is free again; a new sandbox does not inherit old rows. */
    assert_int_equal(place(f, "a", "n1", 1, 1, 1), 0);
    assert_int_equal(fsm_sandbox_get(f, "a", &s), 0);
    assert_int_equal(s.spec.n_env, 0);
    assert_int_equal(s.spec.n_labels, 0);
    fsm_sandbox_clear(&s);

    /* Deleting a stopped sandbox does not release twice. */
    assert_int_equal(set_state(f, "a", FSM_SB_STOPPED), 0);
    mk_sandbox(&c, "a");
    assert_int_equal(ap_code(f, &c), 0);
    node_alloc(f, "n1", 0, 0, 0);

    mk_sandbox(&c, "a");
    assert_int_equal(ap_code(f, &c), -ENOENT);
    mk_sandbox(&c, "A");
    assert_int_equal(ap_code(f, &c), -EINVAL);
    index_matches_table(f);
}

static void
test_ports(void **state)
{
    struct fsm *f = *state;
    struct fsm_port p, *v;
    struct fsm_cmd c;
    size_t n;

    reg(f, "n1", 4, 4096, 4096);
    assert_int_equal(place(f, "a", "n1", 1, 1, 1), 0);
    mk_port(&c, FSM_CMD_PORT_EXPOSE, "a", 8080);
    assert_int_equal(ap_code(f, &c), 0);
    mk_port(&c, FSM_CMD_PORT_EXPOSE, "a", 3000);
    c.u.port.token_hash[0] = 0x01;
    assert_int_equal(ap_code(f, &c), 0);
    mk_port(&c, FSM_CMD_PORT_EXPOSE, "a", 8080);
    assert_int_equal(ap_code(f, &c), -EEXIST);

    assert_int_equal(fsm_port_get(f, "a", 8080, &p), 0);
    assert_int_equal(p.token_hash[0], 0xab);
    assert_int_equal(p.created_ms, test_now_ms);
    assert_int_equal(fsm_port_list(f, "a", &v, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(v[0].port, 3000);
    assert_int_equal(v[0].token_hash[0], 0x01);
    free(v);

    mk_port(&c, FSM_CMD_PORT_EXPOSE, "a", 0);
    assert_int_equal(ap_code(f, &c), -EINVAL);
    mk_port(&c, FSM_CMD_PORT_EXPOSE, "a", 65536);
    assert_int_equal(ap_code(f, &c), -EINVAL);
    mk_port(&c, FSM_CMD_PORT_EXPOSE, "nope", 80);
    assert_int_equal(ap_code(f, &c), -ENOENT);

    mk_port(&c, FSM_CMD_PORT_UNEXPOSE, "a", 8080);
    assert_int_equal(ap_code(f, &c), 0);
    assert_int_equal(fsm_port_get(f, "a", 8080, &p), -ENOENT);
    mk_port(&c, FSM_CMD_PORT_UNEXPOSE, "a", 8080);
    assert_int_equal(ap_code(f, &c), -ENOENT);

    /* A stopping or stopped sandbox exposes nothing new. */
    assert_int_equal(set_state(f, "a", FSM_SB_STOPPED), 0);
    mk_port(&c, FSM_CMD_PORT_EXPOSE, "a", 9000);
    assert_int_equal(ap_code(f, &c), -EINVAL);
}

/* ---- Tokens and keys --------------------------------------------------- */

static void
test_tokens(void **state)
{
    struct fsm *f = *state;
    struct fsm_token t, *v;
    struct fsm_result r;
    struct fsm_cmd c;
    uint64_t now = test_now_ms;
    size_t n;

    mk_token(&c, FSM_CMD_TOKEN_CREATE, "t1", "acme", "tenant", now + 1000);
    assert_int_equal(ap_code(f, &c), 0);
    mk_token(&c, FSM_CMD_TOKEN_CREATE, "t2", "acme", "admin", 0);
    assert_int_equal(ap_code(f, &c), 0);
    mk_token(&c, FSM_CMD_TOKEN_CREATE, "t3", "beta", "node", now + 5000);
    assert_int_equal(ap_code(f, &c), 0);
    mk_token(&c, FSM_CMD_TOKEN_CREATE, "t1", "acme", "tenant", 0);
    assert_int_equal(ap_code(f, &c), -EEXIST);
    mk_token(&c, FSM_CMD_TOKEN_CREATE, "t4", "acme", "root", 0);
    assert_int_equal(ap_code(f, &c), -EINVAL);
    mk_token(&c, FSM_CMD_TOKEN_CREATE, "t 4", "acme", "admin", 0);
    assert_int_equal(ap_code(f, &c), -EINVAL);
    mk_token(&c, FSM_CMD_TOKEN_CREATE, "t4", "Acme", "admin", 0);
    assert_int_equal(ap_code(f, &c), -EINVAL);

    assert_int_equal(fsm_token_get(f, "t1", &t), 0);
    assert_string_equal(t.tenant, "acme");
    assert_string_equal(t.role, "tenant");
    assert_int_equal(t.exp_ms, now + 1000);
    assert_int_equal(t.created_ms, now);
    assert_false(t.revoked);
    assert_int_equal(fsm_token_list(f, "acme", false, &v, &n), 0);
    assert_int_equal(n, 2);
    assert_string_equal(v[0].jti, "t1");
    free(v);
    assert_int_equal(fsm_token_list(f, NULL, false, &v, &n), 0);
    assert_int_equal(n, 3);
    free(v);

    /* Unknown tokens count as revoked: only recorded ones are trusted. */
    assert_false(fsm_token_is_revoked(f, "t1"));
    assert_true(fsm_token_is_revoked(f, "never-issued"));
    assert_true(fsm_token_is_revoked(f, ""));

    test_now_ms += 10;
    mk_token(&c, FSM_CMD_TOKEN_REVOKE, "t1", "", "", 0);
    assert_int_equal(ap_code(f, &c), 0);
    assert_true(fsm_token_is_revoked(f, "t1"));
    assert_int_equal(fsm_token_get(f, "t1", &t), 0);
    assert_int_equal(t.revoked_ms, test_now_ms);
    /* Revoking twice is fine and keeps the first time. */
    test_now_ms += 10;
    mk_token(&c, FSM_CMD_TOKEN_REVOKE, "t1", "", "", 0);
    assert_int_equal(ap_code(f, &c), 0);
    assert_int_equal(fsm_token_get(f, "t1", &t), 0);
    assert_int_equal(t.revoked_ms, test_now_ms - 10);
    mk_token(&c, FSM_CMD_TOKEN_REVOKE, "nope", "", "", 0);
    assert_int_equal(ap_code(f, &c), -ENOENT);
    assert_int_equal(fsm_token_list(f, NULL, true, &v, &n), 0);
    assert_int_equal(n, 1);
    assert_string_equal(v[0].jti, "t1");
    free(v);

    /* GC drops what expired by the command's time; never-expiring stay. */
    test_now_ms = now + 1000;
    cmd_new(&c, FSM_CMD_TOKEN_GC);
    r = ap(f, &c);
    assert_int_equal(r.code, 0);
    assert_int_equal(r.count, 1);
    assert_int_equal(fsm_token_get(f, "t1", &t), -ENOENT);
    assert_true(fsm_token_is_revoked(f, "t1"));
    assert_false(fsm_token_is_revoked(f, "t2"));
    assert_false(fsm_token_is_revoked(f, "t3"));
    test_now_ms = now + 100000;
    cmd_new(&c, FSM_CMD_TOKEN_GC);
    assert_int_equal(ap(f, &c).count, 1);
    assert_false(fsm_token_is_revoked(f, "t2"));
    assert_true(fsm_token_is_revoked(f, "t3"));
}

static void
test_bootstrap_admin(void **state)
{
    struct fsm *f = *state;
    char jti[FSM_JTI_MAX + 1];
    struct fsm_token t;
    struct fsm_cmd c;

    assert_int_equal(fsm_admin_jti(f, jti, sizeof(jti)), -ENOENT);
    mk_token(&c, FSM_CMD_BOOTSTRAP_ADMIN, "boot", "admin", "tenant", 0);
    assert_int_equal(ap_code(f, &c), 0);
    assert_int_equal(fsm_admin_jti(f, jti, sizeof(jti)), 0);
    assert_string_equal(jti, "boot");
    assert_int_equal(fsm_token_get(f, "boot", &t), 0);
    assert_string_equal(t.role, "admin"); /* whatever was asked */
    assert_false(fsm_token_is_revoked(f, "boot"));

    /* Once per cluster: a second bootstrap (another member racing the
     * first) is refused and changes nothing. */
    mk_token(&c, FSM_CMD_BOOTSTRAP_ADMIN, "boot2", "admin", "admin", 0);
    assert_int_equal(ap_code(f, &c), -EEXIST);
    assert_int_equal(fsm_admin_jti(f, jti, sizeof(jti)), 0);
    assert_string_equal(jti, "boot");
    assert_int_equal(fsm_token_get(f, "boot2", &t), -ENOENT);
}

static void
key_cmd(struct fsm_cmd *c, int type, const char *kid)
{
    cmd_new(c, type);
    pd_strlcpy(c->u.key.kid, kid, sizeof(c->u.key.kid));
    strcpy(c->u.key.alg, "ES256");
    if (type == FSM_CMD_KEY_ADD) {
        c->u.key.public_pem = strdup("PUBLIC");
        c->u.key.private_pem = strdup("PRIVATE");
    }
}

static void
test_keys(void **state)
{
    struct fsm *f = *state;
    struct fsm_key k, *v;
    struct fsm_cmd c;
    size_t n;

    assert_int_equal(fsm_key_active(f, &k), -ENOENT);
    key_cmd(&c, FSM_CMD_KEY_ADD, "k1");
    assert_int_equal(ap_code(f, &c), 0);
    test_now_ms += 1000;
    key_cmd(&c, FSM_CMD_KEY_ADD, "k2");
    assert_int_equal(ap_code(f, &c), 0);
    key_cmd(&c, FSM_CMD_KEY_ADD, "k2");
    assert_int_equal(ap_code(f, &c), -EEXIST);
    key_cmd(&c, FSM_CMD_KEY_ADD, "k3");
    c.u.key.public_pem[0] = '\0';
    assert_int_equal(ap_code(f, &c), -EINVAL);
    key_cmd(&c, FSM_CMD_KEY_ADD, "bad kid");
    assert_int_equal(ap_code(f, &c), -EINVAL);

    assert_int_equal(fsm_key_active(f, &k), 0);
    assert_string_equal(k.kid, "k2");
    assert_string_equal(k.public_pem, "PUBLIC");
    assert_string_equal(k.private_pem, "PRIVATE");
    fsm_key_clear(&k);

    test_now_ms += 1000;
    key_cmd(&c, FSM_CMD_KEY_RETIRE, "k2");
    assert_int_equal(ap_code(f, &c), 0);
    assert_int_equal(fsm_key_active(f, &k), 0);
    assert_string_equal(k.kid, "k1");
    fsm_key_clear(&k);
    assert_int_equal(fsm_key_get(f, "k2", &k), 0);
    assert_int_equal(k.retired_ms, test_now_ms);
    fsm_key_clear(&k);

    /* Retired keys still verify, so the list keeps them, newest first. */
    assert_int_equal(fsm_key_list(f, &v, &n), 0);
    assert_int_equal(n, 2);
    assert_string_equal(v[0].kid, "k2");
    assert_string_equal(v[1].kid, "k1");
    fsm_keys_free(v, n);

    key_cmd(&c, FSM_CMD_KEY_RETIRE, "k2");
    assert_int_equal(ap_code(f, &c), 0);
    key_cmd(&c, FSM_CMD_KEY_RETIRE, "k9");
    assert_int_equal(ap_code(f, &c), -ENOENT);
    key_cmd(&c, FSM_CMD_KEY_RETIRE, "k1");
    assert_int_equal(ap_code(f, &c), 0);
    assert_int_equal(fsm_key_active(f, &k), -ENOENT);
    assert_int_equal(fsm_key_get(f, "k9", &k), -ENOENT);
}

/* ---- Dedup, malformed entries ------------------------------------------ */

static void
test_dedup(void **state)
{
    struct fsm *f = *state;
    struct fsm_result r1, r2, got;
    struct fsm_cmd c, retry;
    char *before, *after;
    void *buf;
    size_t len;

    reg(f, "n1", 2, 4096, 4096);
    mk_place(&c, "a", "acme", "n1", 2, 100, 100);
    assert_int_equal(fsm_cmd_encode(&c, &buf, &len), 0);
    assert_int_equal(fsm_apply_buf(f, buf, len, &r1), 0);
    assert_int_equal(r1.code, 0);
    assert_false(r1.duplicate);
    before = dump(f);

    /* The same entry again (a retry after a lost leader): same result,
     * flagged duplicate, nothing applied twice. */
    assert_int_equal(fsm_apply_buf(f, buf, len, &r2), 0);
    assert_true(r2.duplicate);
    assert_int_equal(r2.code, 0);
    assert_string_equal(r2.node, "n1");
    assert_int_equal(r2.generation, 1);
    after = dump(f);
    assert_string_equal(before, after);
    free(before);
    free(after);
    node_alloc(f, "n1", 2, 100, 100);
    assert_int_equal(fsm_result_get(f, &c.rid, &got), 0);
    assert_string_equal(got.node, "n1");
    free(buf);

    /* A failed command is remembered too: its retry fails the same way
     * even after the cause went away. */
    mk_place(&c, "b", "acme", "n1", 1, 1, 1);
    retry = c;
    assert_int_equal(ap_code(f, &c), -ENOSPC);
    mk_sandbox(&c, "a");
    assert_int_equal(ap_code(f, &c), 0);
    r2 = ap(f, &retry);
    assert_true(r2.duplicate);
    assert_int_equal(r2.code, -ENOSPC);
    assert_non_null(strstr(r2.message, "lacks CPU"));

    /* The last result is served from memory; older ones from the table. */
    assert_int_equal(fsm_result_get(f, &c.rid, &got), 0);
    assert_int_equal(got.code, 0);
    assert_int_equal(fsm_result_get(f, &retry.rid, &got), 0);
    assert_int_equal(got.code, -ENOSPC);

    /* Ids are forgotten after the keep window, in command time. */
    test_now_ms += FSM_DEDUP_KEEP_MS + 1;
    cmd_new(&c, FSM_CMD_TOKEN_GC);
    assert_int_equal(ap_code(f, &c), 0);
    assert_int_equal(fsm_result_get(f, &retry.rid, &got), -ENOENT);
    assert_int_equal(fsm_result_get(f, &c.rid, &got), 0);
}

static void
test_malformed_entry(void **state)
{
    static const unsigned char junk[16] = {0, 0, 0, 3, 0xc1, 0xc1, 0xc1};
    struct fsm *f = *state;
    struct fsm_result r;
    char *before, *after;
    uint64_t n;

    reg(f, "n1", 2, 4096, 4096);
    before = dump(f);
    n = fsm_applied(f);
    assert_int_equal(fsm_apply_buf(f, junk, sizeof(junk), &r), 0);
    assert_int_equal(r.code, -EINVAL);
    assert_non_null(strstr(r.message, "malformed command"));
    assert_int_equal(fsm_apply_buf(f, junk, 5, &r), 0);
    assert_int_equal(r.code, -EINVAL);
    assert_int_equal(fsm_applied(f), n + 2);
    after = dump(f);
    assert_string_equal(before, after);
    free(before);
    free(after);
}

/*
 * The spec digest is part of the replicated state (and of snapshots that
 * members exchange): it must not change between builds or architectures.
 * A change here breaks idempotent creates of sandboxes made before it.
 */
static void
test_spec_digest_is_stable(void **state)
{
    struct fsm *f = *state;
    struct fsm_cmd c;
    char *d;

    reg(f, "n1", 8, 8192, 8192);
    mk_place(&c, "golden", "acme", "n1", 2, 1024, 2048);
    c.u.place.spec.env = kv1("K", "V");
    c.u.place.spec.n_env = 1;
    assert_int_equal(ap_code(f, &c), 0);
    d = dump(f);
    assert_non_null(strstr(d, "golden|acme|2|1024|2048|none|"
                              "2728321179671093489|n1|"));
    free(d);
}

/* ---- Determinism and snapshots ----------------------------------------- */

/* A small deterministic generator, so a failure replays. */
static uint32_t
rnd(uint64_t *s)
{
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(*s >> 33);
}

struct entry {
    void *buf;
    size_t len;
};

/* A log of n mixed commands over a few nodes and sandboxes, many of which
 * fail (stale placements, bad transitions): failures must be just as
 * deterministic. */
static struct entry *
make_log(size_t n, uint64_t seed)
{
    struct entry *log = calloc(n, sizeof(*log));
    uint64_t s = seed;

    for (size_t i = 0; i < n; i++) {
        char node[16], sb[16], jti[16];
        struct fsm_cmd c;
        uint32_t k = rnd(&s) % 100;

        test_now_ms += rnd(&s) % 2000;
        snprintf(node, sizeof(node), "n%u", rnd(&s) % 6);
        snprintf(sb, sizeof(sb), "s%u", rnd(&s) % 40);
        snprintf(jti, sizeof(jti), "j%u", rnd(&s) % 20);
        if (i < 6) {
            snprintf(node, sizeof(node), "n%zu", i);
            mk_register(&c, node, 8, 8192, 8192);
            c.u.node_register.labels = kv1("zone", i % 2 ? "a" : "b");
            c.u.node_register.n_labels = 1;
        } else if (k < 35) {
            mk_place(&c, sb, "acme", node, 1 + rnd(&s) % 4,
                     512 * (1 + rnd(&s) % 4), 1000);
            c.u.place.replace = rnd(&s) % 4 == 0;
        } else if (k < 60) {
            mk_state(&c, sb, (int)(rnd(&s) % FSM_SB_NSTATES), "report");
        } else if (k < 65) {
            mk_node(&c, FSM_CMD_NODE_DOWN, node);
        } else if (k < 72) {
            mk_node(&c, FSM_CMD_NODE_HEARTBEAT, node);
        } else if (k < 75) {
            mk_node(&c, FSM_CMD_NODE_DRAIN, node);
            c.u.node.drain = rnd(&s) % 2;
        } else if (k < 80) {
            mk_sandbox(&c, sb);
        } else if (k < 85) {
            mk_port(&c,
                    rnd(&s) % 2 ? FSM_CMD_PORT_EXPOSE : FSM_CMD_PORT_UNEXPOSE,
                    sb, 1 + rnd(&s) % 3);
        } else if (k < 90) {
            mk_token(&c, FSM_CMD_TOKEN_CREATE, jti, "acme", "tenant",
                     test_now_ms + rnd(&s) % 100000);
        } else if (k < 94) {
            mk_token(&c, FSM_CMD_TOKEN_REVOKE, jti, "", "", 0);
        } else if (k < 96) {
            cmd_new(&c, FSM_CMD_TOKEN_GC);
        } else {
            mk_member(&c, 1 + rnd(&s) % 3);
        }
        assert_int_equal(fsm_cmd_encode(&c, &log[i].buf, &log[i].len), 0);
        fsm_cmd_free(&c);
    }
    return log;
}

static void
free_log(struct entry *log, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(log[i].buf);
    free(log);
}

static void
replay(struct fsm *f, const struct entry *log, size_t from, size_t to)
{
    for (size_t i = from; i < to; i++)
        assert_int_equal(fsm_apply_buf(f, log[i].buf, log[i].len, NULL), 0);
}

#define LOG_LEN 3000

/* Two FSMs fed the same log end with the same dump; a third restored from
 * a snapshot taken midway and fed the rest ends the same too. */
static void
test_determinism(void **state)
{
    struct entry *log = make_log(LOG_LEN, 42);
    struct fsm *a = *state, *b = fsm_open(), *c = fsm_open();
    uint64_t counts[FSM_SB_NSTATES], total = 0;
    char *da, *db, *dc;
    void *snap;
    size_t snap_len;

    replay(a, log, 0, LOG_LEN / 2);
    assert_int_equal(fsm_snapshot_bytes(a, &snap, &snap_len), 0);
    replay(a, log, LOG_LEN / 2, LOG_LEN);
    replay(b, log, 0, LOG_LEN);
    assert_int_equal(fsm_restore_bytes(c, snap, snap_len), 0);
    replay(c, log, LOG_LEN / 2, LOG_LEN);
    free(snap);

    da = dump(a);
    db = dump(b);
    dc = dump(c);
    assert_string_equal(da, db);
    assert_string_equal(da, dc);
    index_matches_table(a);
    index_matches_table(c);

    /* The log did something: sandboxes exist in several states. */
    assert_int_equal(fsm_sandbox_counts(a, counts), 0);
    for (int i = 0; i < FSM_SB_NSTATES; i++)
        total += counts[i];
    assert_true(total > 10);
    assert_true(counts[FSM_SB_LOST] + counts[FSM_SB_STOPPED] > 0);
    free(da);
    free(db);
    free(dc);
    fsm_free(b);
    fsm_free(c);
    free_log(log, LOG_LEN);
}

static void
test_snapshot_restore(void **state)
{
    struct fsm *f = *state, *g = fsm_open();
    struct entry *log = make_log(500, 7);
    struct fsm_sandbox *v;
    char *df, *dg, *dg2;
    unsigned char *snap;
    size_t len, n;

    replay(f, log, 0, 500);
    assert_int_equal(fsm_node_reserve(f, "n1", 1, 1, 1, 1), 0);
    assert_int_equal(fsm_snapshot_bytes(f, (void **)&snap, &len), 0);
    assert_memory_equal(snap, FSM_SNAPSHOT_MAGIC, 8);

    /* Restore into a fresh FSM that already has other state. */
    reg(g, "zz", 1, 1, 1);
    assert_int_equal(fsm_restore_bytes(g, snap, len), 0);
    df = dump(f);
    dg = dump(g);
    assert_string_equal(df, dg);
    index_matches_table(g);
    assert_null(cap_of(g, "zz"));
    /* Reservations are the leader's own, never in a snapshot. */
    assert_int_equal(cap_of(g, "n1")->resv_cpus, 0);
    assert_int_equal(fsm_applied(g), 0);
    /* Reads and applies work on the restored database. */
    assert_int_equal(fsm_sandbox_list(g, NULL, &v, &n), 0);
    fsm_sandboxes_free(v, n);
    reg(g, "n9", 1, 1, 1);

    /* Bad snapshots are refused and leave the state as it was. */
    free(dg);
    dg = dump(g);
    assert_int_equal(fsm_restore_bytes(g, snap, 8), -EINVAL);
    assert_int_equal(fsm_restore_bytes(g, snap, len - 1), -EINVAL);
    snap[0] ^= 1;
    assert_int_equal(fsm_restore_bytes(g, snap, len), -EINVAL);
    snap[0] ^= 1;
    memset(snap + 16, 0x5a, len - 16); /* header fine, database garbage */
    assert_int_equal(fsm_restore_bytes(g, snap, len), -EINVAL);
    assert_true(fsm_errmsg(g)[0] != '\0');
    dg2 = dump(g);
    assert_string_equal(dg, dg2);
    index_matches_table(g);
    reg(g, "n10", 1, 1, 1);

    free(df);
    free(dg);
    free(dg2);
    free(snap);
    fsm_free(g);
    free_log(log, 500);
}

/* A snapshot of f with sql run on its database: what a forged or
 * tampered snapshot would look like. */
static unsigned char *
tampered_snapshot(struct fsm *f, const char *sql, size_t *len)
{
    sqlite3_int64 size = 0;
    unsigned char *snap, *db, *out, *copy;
    sqlite3 *conn;
    size_t n;

    assert_int_equal(fsm_snapshot_bytes(f, (void **)&snap, &n), 0);
    assert_int_equal(sqlite3_open(":memory:", &conn), SQLITE_OK);
    copy = sqlite3_malloc64(n - 16);
    memcpy(copy, snap + 16, n - 16);
    assert_int_equal(sqlite3_deserialize(conn, "main", copy, n - 16, n - 16,
                                         SQLITE_DESERIALIZE_FREEONCLOSE |
                                             SQLITE_DESERIALIZE_RESIZEABLE),
                     SQLITE_OK);
    assert_int_equal(sqlite3_exec(conn, sql, NULL, NULL, NULL), SQLITE_OK);
    db = sqlite3_serialize(conn, "main", &size, 0);
    assert_non_null(db);
    out = malloc(16 + (size_t)size);
    memcpy(out, FSM_SNAPSHOT_MAGIC, 8);
    for (int i = 0; i < 8; i++)
        out[8 + i] = (unsigned char)((uint64_t)size >> (56 - 8 * i));
    memcpy(out + 16, db, (size_t)size);
    sqlite3_free(db);
    sqlite3_close(conn);
    free(snap);
    *len = 16 + (size_t)size;
    return out;
}

/* A snapshot whose schema is not exactly ours is refused: a trigger in
 * it would run on every member's writes. */
static void
test_snapshot_schema_checked(void **state)
{
    static const char *const sql[] = {
        "CREATE TRIGGER t AFTER INSERT ON sandboxes BEGIN"
        " DELETE FROM tokens; END;",
        "CREATE TABLE extra (x INTEGER);",
        "DROP INDEX tokens_tenant;",
        "UPDATE meta SET value = '2' WHERE key = 'schema';",
    };
    struct fsm *f = *state, *g = fsm_open();
    unsigned char *snap;
    char *before, *after;
    size_t len;

    reg(f, "n1", 1, 1, 1);
    before = dump(g);
    for (size_t i = 0; i < PD_ARRAY_SIZE(sql); i++) {
        snap = tampered_snapshot(f, sql[i], &len);
        assert_int_equal(fsm_restore_bytes(g, snap, len), -EINVAL);
        free(snap);
    }
    after = dump(g);
    assert_string_equal(before, after);

    /* The untampered snapshot, through the same path, is fine. */
    snap = tampered_snapshot(f, "SELECT 1;", &len);
    assert_int_equal(fsm_restore_bytes(g, snap, len), 0);
    assert_non_null(cap_of(g, "n1"));
    free(snap);
    free(before);
    free(after);
    fsm_free(g);
}

/* The raft_fsm callbacks that raft itself calls. */
static void
test_raft_callbacks(void **state)
{
    struct fsm *f = *state, *g = fsm_open();
    struct raft_fsm *rf = fsm_raft(f), *rg = fsm_raft(g);
    struct raft_buffer buf, *bufs, copy;
    struct fsm_result r;
    struct fsm_cmd c;
    unsigned n_bufs;
    void *result = (void *)1;
    char *df, *dg;

    mk_register(&c, "n1", 1, 1, 1);
    assert_int_equal(fsm_cmd_encode(&c, &buf.base, &buf.len), 0);
    assert_int_equal(rf->apply(rf, &buf, &result), 0);
    assert_null(result); /* results travel by request id */
    assert_int_equal(fsm_result_get(f, &c.rid, &r), 0);
    assert_int_equal(r.code, 0);
    free(buf.base);

    assert_int_equal(rf->snapshot(rf, &bufs, &n_bufs), 0);
    assert_int_equal(n_bufs, 1);
    copy.len = bufs[0].len;
    copy.base = raft_malloc(copy.len);
    memcpy(copy.base, bufs[0].base, copy.len);
    raft_free(bufs[0].base);
    raft_free(bufs);
    assert_int_equal(rg->restore(rg, &copy), 0); /* takes copy.base */
    df = dump(f);
    dg = dump(g);
    assert_string_equal(df, dg);
    free(df);
    free(dg);
    fsm_free(g);
}

/* ---- Reads ------------------------------------------------------------- */

static void
test_sandbox_list(void **state)
{
    struct fsm *f = *state;
    struct fsm_sandbox_filter flt = {.state = -1};
    struct fsm_kv want[33];
    struct fsm_sandbox *v;
    struct fsm_cmd c;
    char id[8];
    size_t n;

    reg(f, "n1", 64, 65536, 65536);
    reg(f, "n2", 64, 65536, 65536);
    for (int i = 0; i < 10; i++) {
        snprintf(id, sizeof(id), "s%d", i);
        mk_place(&c, id, i < 7 ? "acme" : "beta", i % 2 ? "n1" : "n2", 1, 1, 1);
        c.u.place.spec.labels = kv1("parity", i % 2 ? "odd" : "even");
        c.u.place.spec.n_labels = 1;
        assert_int_equal(ap_code(f, &c), 0);
    }
    assert_int_equal(set_state(f, "s3", FSM_SB_RUNNING), 0);

    assert_int_equal(fsm_sandbox_list(f, &flt, &v, &n), 0);
    assert_int_equal(n, 10);
    assert_string_equal(v[0].id, "s0");
    assert_int_equal(v[0].spec.n_labels, 1);
    fsm_sandboxes_free(v, n);

    flt.tenant = "beta";
    assert_int_equal(fsm_sandbox_list(f, &flt, &v, &n), 0);
    assert_int_equal(n, 3);
    fsm_sandboxes_free(v, n);
    flt.tenant = "acme";
    flt.node = "n1";
    assert_int_equal(fsm_sandbox_list(f, &flt, &v, &n), 0);
    assert_int_equal(n, 3); /* s1 s3 s5 */
    fsm_sandboxes_free(v, n);
    flt.state = FSM_SB_RUNNING;
    assert_int_equal(fsm_sandbox_list(f, &flt, &v, &n), 0);
    assert_int_equal(n, 1);
    assert_string_equal(v[0].id, "s3");
    fsm_sandboxes_free(v, n);

    /* Labels, paging. */
    memset(&flt, 0, sizeof(flt));
    flt.state = -1;
    want[0].key = "parity";
    want[0].value = "even";
    flt.labels = want;
    flt.n_labels = 1;
    flt.after = "s2";
    flt.limit = 2;
    assert_int_equal(fsm_sandbox_list(f, &flt, &v, &n), 0);
    assert_int_equal(n, 2);
    assert_string_equal(v[0].id, "s4");
    assert_string_equal(v[1].id, "s6");
    fsm_sandboxes_free(v, n);

    /* The most label constraints the query takes, and one more. */
    for (int i = 0; i < 33; i++)
        want[i] = want[0];
    flt.n_labels = 32;
    flt.limit = 0;
    flt.after = NULL;
    assert_int_equal(fsm_sandbox_list(f, &flt, &v, &n), 0);
    assert_int_equal(n, 5);
    fsm_sandboxes_free(v, n);
    /* With every other filter too: the longest query there is. */
    flt.tenant = "acme";
    flt.node = "n2";
    flt.state = FSM_SB_PENDING;
    flt.after = "s0";
    assert_int_equal(fsm_sandbox_list(f, &flt, &v, &n), 0);
    assert_int_equal(n, 3); /* s2 s4 s6 */
    fsm_sandboxes_free(v, n);
    flt.n_labels = 33;
    assert_int_equal(fsm_sandbox_list(f, &flt, &v, &n), -E2BIG);

    assert_int_equal(fsm_sandbox_list(f, NULL, &v, &n), 0);
    assert_int_equal(n, 10);
    fsm_sandboxes_free(v, n);
}

static void
test_reserve(void **state)
{
    struct fsm *f = *state;
    const struct fsm_node_cap *cap;

    reg(f, "n1", 8, 8192, 8192);
    assert_int_equal(fsm_node_reserve(f, "n1", 2, 100, 10, 1), 0);
    assert_int_equal(fsm_node_reserve(f, "n1", 1, 50, 5, 1), 0);
    cap = cap_of(f, "n1");
    assert_int_equal(cap->resv_cpus, 3);
    assert_int_equal(cap->resv_memory_mb, 150);
    assert_int_equal(cap->resv_disk_mb, 15);

    /* Applies refresh the committed fields and keep the reservations. */
    assert_int_equal(place(f, "a", "n1", 2, 100, 10), 0);
    cap = cap_of(f, "n1");
    assert_int_equal(cap->alloc_cpus, 2);
    assert_int_equal(cap->resv_cpus, 3);

    assert_int_equal(fsm_node_reserve(f, "n1", 2, 100, 10, -1), 0);
    assert_int_equal(fsm_node_reserve(f, "n1", 5, 500, 50, -1), 0);
    cap = cap_of(f, "n1");
    assert_int_equal(cap->resv_cpus, 0);
    assert_int_equal(cap->resv_memory_mb, 0);
    assert_int_equal(cap->resv_disk_mb, 0);
    assert_int_equal(fsm_node_reserve(f, "nope", 1, 1, 1, 1), -ENOENT);
}

/* A node registered between others keeps the index sorted. */
static void
test_index_order(void **state)
{
    static const char *const ids[] = {"m", "c", "x", "a", "q", "b"};
    struct fsm *f = *state;
    const struct fsm_node_index *idx;

    for (size_t i = 0; i < PD_ARRAY_SIZE(ids); i++)
        reg(f, ids[i], 1, 1, 1);
    for (int i = 0; i < 100; i++) {
        char id[8];

        snprintf(id, sizeof(id), "z%02d", (i * 37) % 100);
        reg(f, id, 1, 1, 1);
    }
    idx = fsm_node_index(f);
    assert_int_equal(idx->n, 106);
    for (size_t i = 1; i < idx->n; i++)
        assert_true(strcmp(idx->v[i - 1].id, idx->v[i].id) < 0);
    index_matches_table(f);
}

/* ---- Batches ----------------------------------------------------------- */

/* Encodes the commands (and frees what they hold) as one batch entry. */
static void
batch_of(struct fsm_cmd *cmds, size_t n, void **out, size_t *out_len)
{
    void *parts[8];
    size_t lens[8];

    assert_true(n <= 8);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(fsm_cmd_encode(&cmds[i], &parts[i], &lens[i]), 0);
        fsm_cmd_free(&cmds[i]);
    }
    assert_int_equal(fsm_batch_encode(parts, lens, n, out, out_len), 0);
    for (size_t i = 0; i < n; i++)
        free(parts[i]);
}

struct walk {
    size_t n;
    struct fsm_cmd got[4];
};

static int
walk_part(void *arg, const void *part, size_t len)
{
    struct walk *w = arg;
    char err[200];

    assert_true(w->n < 4);
    assert_int_equal(fsm_cmd_decode(part, len, &w->got[w->n], err,
                                    sizeof(err)), 0);
    w->n++;
    return 0;
}

/* A batch's parts come back whole and in order; every malformed container
 * is refused before any part is seen; a batch is never a command. */
static void
test_batch_codec(void **state)
{
    struct fsm_cmd c[3];
    struct fsm_rid rids[3];
    struct walk w = {0};
    unsigned char *buf, *bad;
    size_t len;
    char err[200];

    (void)state;
    mk_register(&c[0], "n1", 4, 4096, 4096);
    mk_place(&c[1], "a", "acme", "n1", 1, 1, 1);
    mk_state(&c[2], "a", FSM_SB_RUNNING, "up");
    for (int i = 0; i < 3; i++)
        rids[i] = c[i].rid;
    batch_of(c, 3, (void **)&buf, &len);
    assert_int_equal(len % FSM_CMD_ALIGN, 0);
    assert_true(fsm_batch_is(buf, len));
    assert_int_equal(fsm_batch_each(buf, len, walk_part, &w, err,
                                    sizeof(err)), 0);
    assert_int_equal(w.n, 3);
    assert_int_equal(w.got[0].type, FSM_CMD_NODE_REGISTER);
    assert_int_equal(w.got[1].type, FSM_CMD_SANDBOX_PLACE);
    assert_string_equal(w.got[1].u.place.sandbox, "a");
    assert_int_equal(w.got[2].type, FSM_CMD_SANDBOX_STATE);
    for (int i = 0; i < 3; i++) {
        assert_memory_equal(w.got[i].rid.b, rids[i].b, FSM_RID_LEN);
        fsm_cmd_free(&w.got[i]);
    }
    /* Not a command, whatever the decoder is given. */
    assert_int_not_equal(fsm_cmd_decode(buf, len, &c[0], err, sizeof(err)),
                         0);

    /* Truncated, a length off by 8, padding, count 0: all refused, and
     * the walker never runs. */
    w.n = 0;
    assert_int_equal(fsm_batch_each(buf, len - 8, walk_part, &w, err,
                                    sizeof(err)), -EPROTO);
    bad = malloc(len);
    memcpy(bad, buf, len);
    bad[11] += 8; /* the first part's length */
    assert_int_equal(fsm_batch_each(bad, len, walk_part, &w, err,
                                    sizeof(err)), -EPROTO);
    memcpy(bad, buf, len);
    bad[12] = 1; /* the zero bytes after it */
    assert_int_equal(fsm_batch_each(bad, len, walk_part, &w, err,
                                    sizeof(err)), -EPROTO);
    memcpy(bad, buf, len);
    memset(bad + 4, 0, 4);
    assert_int_equal(fsm_batch_each(bad, len, walk_part, &w, err,
                                    sizeof(err)), -EPROTO);
    assert_int_equal(w.n, 0);
    free(bad);
    free(buf);

    /* Parts must be padded commands. */
    {
        char odd[12] = {0};
        void *part = odd, *out;
        size_t plen = sizeof(odd), olen;

        assert_int_equal(fsm_batch_encode(&part, &plen, 1, &out, &olen),
                         -EINVAL);
        assert_int_equal(fsm_batch_encode(&part, &plen, 0, &out, &olen),
                         -EINVAL);
    }
}

/* Each part of a batch applies in its own transaction with its own
 * result: a failing part leaves the others applied, a part seen before is
 * a duplicate, and a batch gives the same state, replayed or restored
 * from a snapshot, as the same commands one entry each. */
static void
test_batch_apply(void **state)
{
    struct fsm *f = *state, *g = fsm_open(), *h = fsm_open();
    struct fsm_cmd c[4], again;
    struct fsm_result r;
    void *buf, *snap, *one;
    size_t len, snap_len, one_len;
    char *df, *dg, *dh;

    mk_register(&c[0], "n1", 2, 4096, 4096);
    mk_place(&c[1], "a", "acme", "n1", 2, 100, 100);
    mk_place(&c[2], "b", "acme", "n1", 1, 100, 100); /* no CPU left */
    mk_state(&c[3], "a", FSM_SB_RUNNING, "up");
    again = c[1];
    /* g gets the same commands one entry each. */
    for (int i = 0; i < 4; i++) {
        struct fsm_cmd copy = c[i];

        assert_int_equal(fsm_cmd_encode(&copy, &one, &one_len), 0);
        assert_int_equal(fsm_apply_entry(g, one, one_len), 0);
        free(one);
    }
    batch_of(c, 4, &buf, &len);
    assert_int_equal(fsm_apply_entry(f, buf, len), 0);
    assert_int_equal(sb_state(f, "a"), FSM_SB_RUNNING);
    {
        struct fsm_sandbox row;

        assert_int_equal(fsm_sandbox_get(f, "b", &row), -ENOENT);
    }
    assert_int_equal(fsm_result_get(f, &c[1].rid, &r), 0);
    assert_int_equal(r.code, 0);
    assert_string_equal(r.node, "n1");
    assert_int_equal(fsm_result_get(f, &c[2].rid, &r), 0);
    assert_int_equal(r.code, -ENOSPC);
    assert_int_equal(fsm_result_get(f, &c[3].rid, &r), 0);
    assert_int_equal(r.code, 0);

    df = dump(f);
    dg = dump(g);
    assert_string_equal(df, dg);
    free(dg);

    /* The same batch again (a retry): every part a duplicate, nothing
     * changes; and a part retried alone is a duplicate too. */
    assert_int_equal(fsm_apply_entry(f, buf, len), 0);
    dg = dump(f);
    assert_string_equal(df, dg);
    free(dg);
    assert_int_equal(fsm_cmd_encode(&again, &one, &one_len), 0);
    assert_int_equal(fsm_apply_buf(f, one, one_len, &r), 0);
    assert_true(r.duplicate);
    free(one);
    node_alloc(f, "n1", 2, 100, 100);

    /* Replay into a fresh FSM, and restore from f's snapshot. */
    assert_int_equal(fsm_apply_entry(h, buf, len), 0);
    dh = dump(h);
    assert_string_equal(df, dh);
    free(dh);
    assert_int_equal(fsm_snapshot_bytes(f, &snap, &snap_len), 0);
    assert_int_equal(fsm_restore_bytes(h, snap, snap_len), 0);
    dh = dump(h);
    assert_string_equal(df, dh);
    free(dh);
    free(snap);

    /* A malformed container changes nothing and is not an error. */
    memset((unsigned char *)buf + 4, 0xff, 4); /* the count */
    assert_int_equal(fsm_apply_entry(g, buf, len), 0);
    dg = dump(g);
    assert_string_equal(df, dg);
    free(dg);

    free(df);
    free(buf);
    fsm_free(g);
    fsm_free(h);
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)

int
main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_members),
        T(test_node_register),
        T(test_node_heartbeat_drain),
        T(test_place),
        T(test_place_rechecks_fit),
        T(test_state_transitions),
        T(test_node_down_loses_sandboxes),
        T(test_replace_generation),
        T(test_delete),
        T(test_ports),
        T(test_tokens),
        T(test_bootstrap_admin),
        T(test_keys),
        T(test_dedup),
        T(test_malformed_entry),
        T(test_spec_digest_is_stable),
        T(test_determinism),
        T(test_snapshot_restore),
        T(test_snapshot_schema_checked),
        T(test_raft_callbacks),
        T(test_sandbox_list),
        T(test_reserve),
        T(test_index_order),
        T(test_batch_codec),
        T(test_batch_apply),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
