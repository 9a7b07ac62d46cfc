/*
 * Placement decisions per second over 1,000 nodes (scheduler/placement.c
 * on the FSM's capacity index), bin-pack and spread, with and without a
 * label constraint; then the leader's whole path per create (placement,
 * reservation, PLACE applied to the FSM, reservation released). The
 * baseline, measured in the same run, is a bare scan of the same index
 * that only reads each node's free CPU: the floor any placement pays.
 * Issue 5's target for the cluster is above 3,750 placements/s.
 *
 *   build/tests/bench/scheduler/bench_placement [nodes, default 1000]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "raft/fsm.h"
#include "scheduler/placement.h"

#define SECS 1.0

static struct fsm *
cluster(size_t nodes)
{
    struct fsm_result res;
    struct fsm_cmd c;
    struct fsm *f;
    char err[256];

    if (fsm_new(&f, err, sizeof(err)) != 0) {
        fprintf(stderr, "bench_placement: %s\n", err);
        exit(1);
    }
    for (size_t i = 0; i < nodes; i++) {
        fsm_cmd_init(&c, FSM_CMD_NODE_REGISTER);
        snprintf(c.u.node_register.node, FSM_ID_MAX + 1, "node-%05zu", i);
        snprintf(c.u.node_register.rpc_addr, FSM_ADDR_MAX + 1, "127.0.0.1:%zu",
                 20000 + i);
        /* Mixed sizes, so scores differ and ties are rare. */
        c.u.node_register.cpus = 16 + (uint32_t)(i % 7) * 8;
        c.u.node_register.memory_mb = 65536 + (i % 5) * 16384;
        c.u.node_register.disk_mb = 1u << 20;
        c.u.node_register.labels = calloc(2, sizeof(struct fsm_kv));
        c.u.node_register.labels[0].key = strdup("zone");
        c.u.node_register.labels[0].value = strdup(i % 3 ? "b" : "a");
        c.u.node_register.labels[1].key = strdup("pool");
        c.u.node_register.labels[1].value = strdup("default");
        c.u.node_register.n_labels = 2;
        if (fsm_apply_cmd(f, &c, &res) != 0 || res.code != 0) {
            fprintf(stderr, "bench_placement: register: %s\n", res.message);
            exit(1);
        }
        fsm_cmd_free(&c);
    }
    return f;
}

/* Decisions per second of sched_place with this request. */
static double
rate(const struct fsm_node_index *idx, const struct sched_place_req *r)
{
    struct sched_place_out out;
    uint64_t start = pd_now_ns(), n = 0;
    char why[512];

    while ((double)(pd_now_ns() - start) < SECS * 1e9) {
        for (int i = 0; i < 100; i++) {
            if (sched_place(idx, r, &out, why, sizeof(why)) != 0) {
                fprintf(stderr, "bench_placement: %s\n", why);
                exit(1);
            }
        }
        n += 100;
    }
    return (double)n / ((double)(pd_now_ns() - start) / 1e9);
}

/* The floor: one pass over the index reading each node's free CPU. */
static double
scan_rate(const struct fsm_node_index *idx)
{
    uint64_t start = pd_now_ns(), n = 0;
    volatile uint64_t sink = 0;

    while ((double)(pd_now_ns() - start) < SECS * 1e9) {
        for (int i = 0; i < 100; i++) {
            uint64_t best = 0;

            for (size_t j = 0; j < idx->n; j++) {
                const struct fsm_node_cap *c = &idx->v[j];
                uint64_t fr = c->cpus - c->alloc_cpus - c->resv_cpus;

                if (c->ready && !c->draining && fr > best)
                    best = fr;
            }
            sink += best;
        }
        n += 100;
    }
    (void)sink;
    return (double)n / ((double)(pd_now_ns() - start) / 1e9);
}

/* The leader's path per create, until count sandboxes are placed. */
static double
end_to_end(struct fsm *f, struct sched_place_req *r, size_t count)
{
    struct sched_place_out out;
    struct fsm_result res;
    struct fsm_cmd c;
    uint64_t start = pd_now_ns();
    char why[512];

    for (size_t i = 0; i < count; i++) {
        if (sched_place(fsm_node_index(f), r, &out, why, sizeof(why)) != 0) {
            fprintf(stderr, "bench_placement: %s\n", why);
            exit(1);
        }
        fsm_node_reserve(f, out.node, r->cpus, r->memory_mb, r->disk_mb, 1);
        fsm_cmd_init(&c, FSM_CMD_SANDBOX_PLACE);
        snprintf(c.u.place.sandbox, FSM_ID_MAX + 1, "sb-%zu", i);
        strcpy(c.u.place.tenant, "bench");
        strcpy(c.u.place.node, out.node);
        c.u.place.spec.cpus = r->cpus;
        c.u.place.spec.memory_mb = r->memory_mb;
        c.u.place.spec.disk_mb = r->disk_mb;
        strcpy(c.u.place.spec.egress, "none");
        if (fsm_apply_cmd(f, &c, &res) != 0 || res.code != 0) {
            fprintf(stderr, "bench_placement: place: %s\n", res.message);
            exit(1);
        }
        fsm_node_reserve(f, out.node, r->cpus, r->memory_mb, r->disk_mb, -1);
    }
    return (double)count / ((double)(pd_now_ns() - start) / 1e9);
}

int
main(int argc, char **argv)
{
    size_t nodes = argc > 1 ? strtoul(argv[1], NULL, 10) : 1000;
    struct fsm_kv zone = {.key = "zone", .value = "a"};
    struct sched_place_req r = {
        .sandbox = "bench", .cpus = 1, .memory_mb = 512, .disk_mb = 1024};
    struct fsm *f;
    double base;

    if (nodes == 0)
        nodes = 1000;
    f = cluster(nodes);
    printf("placement over %zu nodes (decisions/s, %.0f s per case)\n", nodes,
           SECS);
    base = scan_rate(fsm_node_index(f));
    printf("  %-34s %12.0f\n", "baseline: bare scan of the index", base);
    r.strategy = SCHED_BINPACK;
    printf("  %-34s %12.0f\n", "bin-pack", rate(fsm_node_index(f), &r));
    r.strategy = SCHED_SPREAD;
    printf("  %-34s %12.0f\n", "spread", rate(fsm_node_index(f), &r));
    r.constraints = &zone;
    r.n_constraints = 1;
    printf("  %-34s %12.0f\n", "spread, label zone=a",
           rate(fsm_node_index(f), &r));
    r.constraints = NULL;
    r.n_constraints = 0;
    r.strategy = SCHED_BINPACK;
    printf("  %-34s %12.0f\n", "place + PLACE apply (10,000)",
           end_to_end(f, &r, 10000));
    printf("  target (issue 5, whole cluster): above 3750 placements/s\n");
    fsm_free(f);
    return 0;
}
