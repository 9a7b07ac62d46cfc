/*
 * Placement (scheduler/placement.c): bin-pack versus spread, label
 * constraints, draining and down nodes, the leader's reservations, ties by
 * id, and the per-resource reason when nothing fits. The last test drives
 * placement against the real FSM until it is full: never over-committed.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "raft/fsm.h"
#include "scheduler/placement.h"

#define MAXN 16

struct nodes {
    struct fsm_node_cap v[MAXN];
    char labels[MAXN][128];
    struct fsm_node_index idx;
};

/* Adds a ready node with capacity and allocation (ids must be added in
 * order: the index is sorted by id). */
static struct fsm_node_cap *
add(struct nodes *ns, const char *id, uint32_t cpus, uint64_t mem,
    uint64_t disk, uint32_t acpus, uint64_t amem, uint64_t adisk)
{
    struct fsm_node_cap *c = &ns->v[ns->idx.n];

    assert_true(ns->idx.n < MAXN);
    memset(c, 0, sizeof(*c));
    strcpy(c->id, id);
    c->cpus = cpus;
    c->memory_mb = mem;
    c->disk_mb = disk;
    c->alloc_cpus = acpus;
    c->alloc_memory_mb = amem;
    c->alloc_disk_mb = adisk;
    c->ready = true;
    ns->labels[ns->idx.n][0] = '\0';
    c->labels = ns->labels[ns->idx.n];
    ns->idx.v = ns->v;
    ns->idx.n++;
    return c;
}

static void
set_labels(struct nodes *ns, struct fsm_node_cap *c, const char *lines)
{
    size_t i = (size_t)(c - ns->v);

    strcpy(ns->labels[i], lines);
}

static struct sched_place_req
req(uint32_t cpus, uint64_t mem, uint64_t disk, enum sched_strategy s)
{
    struct sched_place_req r = {.sandbox = "sb",
                                .cpus = cpus,
                                .memory_mb = mem,
                                .disk_mb = disk,
                                .strategy = s};

    return r;
}

/* Places and returns the chosen node id (static buffer), or NULL. */
static const char *
choose(const struct nodes *ns, const struct sched_place_req *r)
{
    static struct sched_place_out out;
    char why[512];
    int rv = sched_place(&ns->idx, r, &out, why, sizeof(why));

    if (rv == -ENOSPC)
        return NULL;
    assert_int_equal(rv, 0);
    assert_true(out.feasible >= 1);
    return out.node;
}

static void
test_binpack_vs_spread(void **state)
{
    struct nodes ns = {0};
    struct sched_place_req r;
    struct sched_place_out out;
    char why[256];

    (void)state;
    add(&ns, "a", 8, 8192, 8192, 6, 6144, 6144); /* 2 free */
    add(&ns, "b", 8, 8192, 8192, 2, 2048, 2048); /* 6 free */
    add(&ns, "c", 8, 8192, 8192, 0, 0, 0);       /* empty */

    r = req(1, 1024, 1024, SCHED_BINPACK);
    assert_string_equal(choose(&ns, &r), "a");
    r.strategy = SCHED_SPREAD;
    assert_string_equal(choose(&ns, &r), "c");

    /* Too big for a: bin-pack falls back to the next fullest. */
    r = req(4, 1024, 1024, SCHED_BINPACK);
    assert_string_equal(choose(&ns, &r), "b");
    assert_int_equal(sched_place(&ns.idx, &r, &out, why, sizeof(why)), 0);
    assert_int_equal(out.feasible, 2);
    assert_string_equal(why, "");

    /* Room is the mean of the three fractions: a node full on one
     * resource and empty on the others is not "fuller" than one half
     * used on all three. */
    ns.idx.n = 0;
    add(&ns, "p", 8, 8192, 8192, 7, 0, 0);       /* 1/8 cpu free */
    add(&ns, "q", 8, 8192, 8192, 4, 4096, 4096); /* half of each */
    r = req(1, 1, 1, SCHED_BINPACK);
    assert_string_equal(choose(&ns, &r), "q");
    r.strategy = SCHED_SPREAD;
    assert_string_equal(choose(&ns, &r), "p");
}

static void
test_ties_by_id(void **state)
{
    struct nodes ns = {0};
    struct sched_place_req r;

    (void)state;
    add(&ns, "n1", 4, 4096, 4096, 1, 1024, 1024);
    add(&ns, "n2", 4, 4096, 4096, 1, 1024, 1024);
    add(&ns, "n3", 4, 4096, 4096, 1, 1024, 1024);
    r = req(1, 1, 1, SCHED_BINPACK);
    assert_string_equal(choose(&ns, &r), "n1");
    r.strategy = SCHED_SPREAD;
    assert_string_equal(choose(&ns, &r), "n1");

    /* The same answer on every call: placement is a pure function. */
    for (int i = 0; i < 10; i++)
        assert_string_equal(choose(&ns, &r), "n1");
}

static void
test_labels(void **state)
{
    struct nodes ns = {0};
    struct sched_place_req r;
    struct fsm_kv want[2] = {{.key = "zone", .value = "a"},
                             {.key = "gpu", .value = "yes"}};
    struct sched_place_out out;
    char why[256];

    (void)state;
    set_labels(&ns, add(&ns, "n1", 8, 8192, 8192, 0, 0, 0), "zone=ab\n");
    set_labels(&ns, add(&ns, "n2", 8, 8192, 8192, 0, 0, 0), "xzone=a\n");
    set_labels(&ns, add(&ns, "n3", 8, 8192, 8192, 0, 0, 0),
               "gpu=yes\nzone=a\n");
    set_labels(&ns, add(&ns, "n4", 8, 8192, 8192, 7, 0, 0), "zone=a\n");
    add(&ns, "n5", 8, 8192, 8192, 0, 0, 0);

    /* zone=a is neither zone=ab nor xzone=a. */
    r = req(1, 1, 1, SCHED_SPREAD);
    r.constraints = want;
    r.n_constraints = 1;
    assert_string_equal(choose(&ns, &r), "n3");
    r.strategy = SCHED_BINPACK;
    assert_string_equal(choose(&ns, &r), "n4");

    /* Every constraint must hold. */
    r.n_constraints = 2;
    assert_string_equal(choose(&ns, &r), "n3");
    want[1].value = "no";
    assert_int_equal(sched_place(&ns.idx, &r, &out, why, sizeof(why)), -ENOSPC);
    assert_string_equal(why, "no node fits: 5 nodes without the required "
                             "labels");
}

static void
test_draining_and_down_excluded(void **state)
{
    struct nodes ns = {0};
    struct sched_place_req r;
    struct sched_place_out out;
    struct fsm_node_cap *a, *b;
    char why[256];

    (void)state;
    a = add(&ns, "a", 8, 8192, 8192, 7, 7000, 7000); /* the bin-pack pick */
    b = add(&ns, "b", 8, 8192, 8192, 0, 0, 0);       /* the spread pick */
    add(&ns, "c", 8, 8192, 8192, 4, 4096, 4096);
    a->draining = true;
    b->ready = false;
    r = req(1, 1, 1, SCHED_BINPACK);
    assert_string_equal(choose(&ns, &r), "c");
    r.strategy = SCHED_SPREAD;
    assert_string_equal(choose(&ns, &r), "c");
    assert_int_equal(sched_place(&ns.idx, &r, &out, why, sizeof(why)), 0);
    assert_int_equal(out.feasible, 1);

    ns.v[2].draining = true;
    assert_int_equal(sched_place(&ns.idx, &r, &out, why, sizeof(why)), -ENOSPC);
    assert_string_equal(why, "no node fits: 2 nodes draining, 1 node down");
    assert_string_equal(out.node, "");
}

/* The leader's pending reservations count as used. */
static void
test_reservations(void **state)
{
    struct nodes ns = {0};
    struct sched_place_req r;
    struct sched_place_out out;
    struct fsm_node_cap *a;
    char why[256];

    (void)state;
    a = add(&ns, "a", 4, 4096, 4096, 2, 2048, 2048);
    add(&ns, "b", 4, 4096, 4096, 0, 0, 0);
    r = req(2, 1024, 1024, SCHED_BINPACK);
    assert_string_equal(choose(&ns, &r), "a");
    a->resv_cpus = 1;
    assert_string_equal(choose(&ns, &r), "b");
    ns.v[1].resv_memory_mb = 3500;
    assert_int_equal(sched_place(&ns.idx, &r, &out, why, sizeof(why)), -ENOSPC);
    assert_string_equal(why, "no node fits: 1 node lacks CPU (need 2, most "
                             "free 1), 1 node lacks memory (need 1024 MB, "
                             "most free 596 MB)");

    /* Reservations beyond the capacity read as nothing free. */
    a->resv_cpus = 100;
    a->resv_memory_mb = UINT64_MAX;
    ns.v[1].resv_memory_mb = 0;
    assert_string_equal(choose(&ns, &r), "b");
}

static void
test_why(void **state)
{
    struct nodes ns = {0};
    struct sched_place_req r;
    struct sched_place_out out;
    struct fsm_kv zone = {.key = "zone", .value = "z"};
    char why[512], tiny[16];

    (void)state;
    r = req(2, 4096, 10000, SCHED_BINPACK);
    assert_int_equal(sched_place(&ns.idx, &r, &out, why, sizeof(why)), -ENOSPC);
    assert_string_equal(why, "no node fits: no node is registered");

    add(&ns, "a", 8, 2048, 100000, 0, 0, 0);    /* memory */
    add(&ns, "b", 8, 8192, 100000, 0, 6144, 0); /* memory */
    add(&ns, "c", 1, 8192, 5000, 0, 0, 0);      /* cpu and disk */
    add(&ns, "d", 8, 8192, 100000, 0, 0, 0)->draining = true;
    add(&ns, "e", 8, 8192, 100000, 0, 0, 0)->ready = false;
    assert_int_equal(sched_place(&ns.idx, &r, &out, why, sizeof(why)), -ENOSPC);
    assert_string_equal(why,
                        "no node fits: 1 node lacks CPU (need 2, most free "
                        "1), 2 nodes lack memory (need 4096 MB, most free "
                        "2048 MB), 1 node lacks disk (need 10000 MB, most "
                        "free 5000 MB), 1 node draining, 1 node down");
    assert_int_equal(out.feasible, 0);

    /* Labels are checked before resources: such a node counts once. */
    r.constraints = &zone;
    r.n_constraints = 1;
    assert_int_equal(sched_place(&ns.idx, &r, &out, why, sizeof(why)), -ENOSPC);
    assert_string_equal(why, "no node fits: 3 nodes without the required "
                             "labels, 1 node draining, 1 node down");

    /* A short buffer is truncated, always terminated. */
    assert_int_equal(sched_place(&ns.idx, &r, &out, tiny, sizeof(tiny)),
                     -ENOSPC);
    assert_int_equal(strlen(tiny), sizeof(tiny) - 1);
    assert_int_equal(sched_place(&ns.idx, &r, &out, NULL, 0), -ENOSPC);
}

static void
test_bad_requests(void **state)
{
    struct nodes ns = {0};
    struct sched_place_req r;
    struct sched_place_out out;
    enum sched_strategy s;
    char why[256];

    (void)state;
    add(&ns, "a", 8, 8192, 8192, 0, 0, 0);
    r = req(0, 1, 1, SCHED_BINPACK);
    assert_int_equal(sched_place(&ns.idx, &r, &out, why, sizeof(why)), -EINVAL);
    assert_true(why[0] != '\0');
    r = req(1, 0, 1, SCHED_BINPACK);
    assert_int_equal(sched_place(&ns.idx, &r, &out, why, sizeof(why)), -EINVAL);
    r = req(1, 1, 0, SCHED_BINPACK);
    assert_int_equal(sched_place(&ns.idx, &r, &out, why, sizeof(why)), -EINVAL);
    r = req(1, 1, 1, SCHED_BINPACK);
    r.n_constraints = FSM_KV_MAX + 1;
    assert_int_equal(sched_place(&ns.idx, &r, &out, why, sizeof(why)), -EINVAL);
    r.n_constraints = 0;
    r.sandbox = NULL; /* only used by the trace */
    assert_int_equal(sched_place(&ns.idx, &r, &out, why, sizeof(why)), 0);

    assert_int_equal(sched_strategy_parse("binpack", &s), 0);
    assert_int_equal(s, SCHED_BINPACK);
    assert_int_equal(sched_strategy_parse("spread", &s), 0);
    assert_int_equal(s, SCHED_SPREAD);
    assert_int_equal(sched_strategy_parse("Spread", &s), -EINVAL);
    assert_int_equal(sched_strategy_parse("", &s), -EINVAL);
}

/* PADDOCK_TRACE=placement narrates every rejection and the choice: run
 * each path with it on (output to /dev/null), for the formats' sake. */
static void
test_trace(void **state)
{
    struct fsm_kv zone = {.key = "zone", .value = "z"};
    struct nodes ns = {0};
    struct sched_place_req r;
    struct sched_place_out out;
    char why[512];
    int saved = dup(2), null = open("/dev/null", O_WRONLY);

    (void)state;
    add(&ns, "a", 8, 2048, 100000, 0, 0, 0);
    add(&ns, "b", 8, 8192, 100000, 0, 0, 0)->draining = true;
    add(&ns, "c", 8, 8192, 100000, 0, 0, 0)->ready = false;
    set_labels(&ns, add(&ns, "d", 8, 8192, 100000, 0, 0, 0), "zone=z\n");
    assert_true(saved >= 0 && null >= 0);
    dup2(null, 2);
    setenv("PADDOCK_TRACE", "placement", 1);
    r = req(1, 4096, 1, SCHED_BINPACK);
    assert_int_equal(sched_place(&ns.idx, &r, &out, why, sizeof(why)), 0);
    r.sandbox = NULL;
    r.constraints = &zone;
    r.n_constraints = 1;
    r.memory_mb = 1 << 20;
    assert_int_equal(sched_place(&ns.idx, &r, &out, why, sizeof(why)), -ENOSPC);
    unsetenv("PADDOCK_TRACE");
    dup2(saved, 2);
    close(saved);
    close(null);
    assert_string_equal(why, "no node fits: 1 node lacks memory (need "
                             "1048576 MB, most free 8192 MB), 1 node "
                             "without the required labels, 1 node "
                             "draining, 1 node down");
}

/* ---- Against the real FSM ---------------------------------------------- */

static int
apply(struct fsm *f, struct fsm_cmd *c)
{
    struct fsm_result r;

    assert_int_equal(fsm_apply_cmd(f, c, &r), 0);
    fsm_cmd_free(c);
    return r.code;
}

/* Placement, reservation and PLACE the way the leader runs them, until
 * nothing fits: every placement the FSM accepts fits, and the cluster is
 * filled to exactly its capacity. */
static void
test_fill_real_fsm(void **state)
{
    static const uint32_t cpus[] = {4, 6, 8, 2};
    struct sched_place_req r = req(1, 512, 1024, SCHED_SPREAD);
    struct sched_place_out out;
    struct fsm_node *v;
    struct fsm_cmd c;
    struct fsm *f;
    char err[256], why[512];
    size_t n, placed = 0;

    (void)state;
    assert_int_equal(fsm_new(&f, err, sizeof(err)), 0);
    for (int i = 0; i < 4; i++) {
        fsm_cmd_init(&c, FSM_CMD_NODE_REGISTER);
        snprintf(c.u.node_register.node, FSM_ID_MAX + 1, "node-%d", i);
        strcpy(c.u.node_register.rpc_addr, "127.0.0.1:1");
        c.u.node_register.cpus = cpus[i];
        c.u.node_register.memory_mb = 1u << 20;
        c.u.node_register.disk_mb = 1u << 20;
        assert_int_equal(apply(f, &c), 0);
    }
    for (int i = 0; i < 100; i++) {
        int rv = sched_place(fsm_node_index(f), &r, &out, why, sizeof(why));

        if (rv == -ENOSPC)
            break;
        assert_int_equal(rv, 0);
        assert_int_equal(
            fsm_node_reserve(f, out.node, r.cpus, r.memory_mb, r.disk_mb, 1),
            0);
        fsm_cmd_init(&c, FSM_CMD_SANDBOX_PLACE);
        snprintf(c.u.place.sandbox, FSM_ID_MAX + 1, "sb-%d", i);
        strcpy(c.u.place.tenant, "acme");
        strcpy(c.u.place.node, out.node);
        c.u.place.spec.cpus = r.cpus;
        c.u.place.spec.memory_mb = r.memory_mb;
        c.u.place.spec.disk_mb = r.disk_mb;
        strcpy(c.u.place.spec.egress, "none");
        assert_int_equal(apply(f, &c), 0);
        assert_int_equal(
            fsm_node_reserve(f, out.node, r.cpus, r.memory_mb, r.disk_mb, -1),
            0);
        placed++;
    }
    assert_int_equal(placed, 20);
    assert_string_equal(why, "no node fits: 4 nodes lack CPU (need 1, most "
                             "free 0)");
    assert_int_equal(fsm_node_list(f, &v, &n), 0);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(v[i].alloc_cpus, v[i].cpus);
        assert_int_equal(v[i].n_sandboxes, v[i].cpus);
    }
    fsm_nodes_free(v, n);
    fsm_free(f);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_binpack_vs_spread),
        cmocka_unit_test(test_ties_by_id),
        cmocka_unit_test(test_labels),
        cmocka_unit_test(test_draining_and_down_excluded),
        cmocka_unit_test(test_reservations),
        cmocka_unit_test(test_why),
        cmocka_unit_test(test_bad_requests),
        cmocka_unit_test(test_trace),
        cmocka_unit_test(test_fill_real_fsm),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
