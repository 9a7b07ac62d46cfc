/*
 * FSM apply rate of SANDBOX_PLACE commands (commands/s, what one member
 * sustains with raft out of the picture) and the FSM's memory per 10,000
 * sandboxes (sqlite's heap, the capacity index, the snapshot size). The
 * baselines, measured in the same run: decoding the same entries without
 * applying them, and applying NODE_HEARTBEAT (the cheapest write).
 *
 *   build/tests/bench/scheduler/bench_fsm [sandboxes, default 20000]
 */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "raft/fsm.h"

#define NODES 1000

struct entry {
    void *buf;
    size_t len;
};

static void
die(const char *what, const char *msg)
{
    fprintf(stderr, "bench_fsm: %s: %s\n", what, msg);
    exit(1);
}

static struct fsm_kv *
kv(const char *const *pairs, size_t n)
{
    struct fsm_kv *v = calloc(n, sizeof(*v));

    for (size_t i = 0; i < n; i++) {
        v[i].key = strdup(pairs[2 * i]);
        v[i].value = strdup(pairs[2 * i + 1]);
    }
    return v;
}

static void
apply(struct fsm *f, struct fsm_cmd *c)
{
    struct fsm_result res;

    if (fsm_apply_cmd(f, c, &res) != 0 || res.code != 0)
        die("apply", res.message);
    fsm_cmd_free(c);
}

static void
register_nodes(struct fsm *f)
{
    struct fsm_cmd c;

    for (int i = 0; i < NODES; i++) {
        fsm_cmd_init(&c, FSM_CMD_NODE_REGISTER);
        snprintf(c.u.node_register.node, FSM_ID_MAX + 1, "node-%04d", i);
        strcpy(c.u.node_register.rpc_addr, "127.0.0.1:7000");
        c.u.node_register.cpus = 256;
        c.u.node_register.memory_mb = 1u << 20;
        c.u.node_register.disk_mb = 1u << 24;
        apply(f, &c);
    }
}

/* A typical create: 3 env entries, 2 labels, on node i % NODES. */
static struct entry *
encode_places(size_t from, size_t n)
{
    static const char *const env[] = {"PATH",       "/usr/bin:/bin", "HOME",
                                      "/workspace", "LANG",          "C.UTF-8"};
    static const char *const labels[] = {"team", "search", "env", "ci"};
    struct entry *v = calloc(n, sizeof(*v));

    for (size_t i = 0; i < n; i++) {
        struct fsm_cmd c;

        fsm_cmd_init(&c, FSM_CMD_SANDBOX_PLACE);
        snprintf(c.u.place.sandbox, FSM_ID_MAX + 1, "sandbox-%07zu", from + i);
        strcpy(c.u.place.tenant, "tenant-a");
        snprintf(c.u.place.node, FSM_ID_MAX + 1, "node-%04zu",
                 (from + i) % NODES);
        c.u.place.spec.cpus = 1;
        c.u.place.spec.memory_mb = 512;
        c.u.place.spec.disk_mb = 1024;
        strcpy(c.u.place.spec.egress, "none");
        c.u.place.spec.env = kv(env, 3);
        c.u.place.spec.n_env = 3;
        c.u.place.spec.labels = kv(labels, 2);
        c.u.place.spec.n_labels = 2;
        if (fsm_cmd_encode(&c, &v[i].buf, &v[i].len) != 0)
            die("encode", "PLACE");
        fsm_cmd_free(&c);
    }
    return v;
}

static void
free_entries(struct entry *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(v[i].buf);
    free(v);
}

/* Applies every entry; returns commands per second. */
static double
apply_all(struct fsm *f, const struct entry *v, size_t n)
{
    uint64_t start = pd_now_ns();
    struct fsm_result res;

    for (size_t i = 0; i < n; i++) {
        if (fsm_apply_buf(f, v[i].buf, v[i].len, &res) != 0 || res.code != 0)
            die("apply", res.message);
    }
    return (double)n / ((double)(pd_now_ns() - start) / 1e9);
}

static double
decode_all(const struct entry *v, size_t n)
{
    uint64_t start = pd_now_ns();
    struct fsm_cmd c;
    char err[200];

    for (size_t i = 0; i < n; i++) {
        if (fsm_cmd_decode(v[i].buf, v[i].len, &c, err, sizeof(err)) != 0)
            die("decode", err);
        fsm_cmd_free(&c);
    }
    return (double)n / ((double)(pd_now_ns() - start) / 1e9);
}

static double
heartbeats(struct fsm *f, size_t n)
{
    struct entry *v = calloc(n, sizeof(*v));
    double r;

    for (size_t i = 0; i < n; i++) {
        struct fsm_cmd c;

        fsm_cmd_init(&c, FSM_CMD_NODE_HEARTBEAT);
        snprintf(c.u.node.node, FSM_ID_MAX + 1, "node-%04zu", i % NODES);
        if (fsm_cmd_encode(&c, &v[i].buf, &v[i].len) != 0)
            die("encode", "HEARTBEAT");
    }
    r = apply_all(f, v, n);
    free_entries(v, n);
    return r;
}

int
main(int argc, char **argv)
{
    size_t n = argc > 1 ? strtoul(argv[1], NULL, 10) : 20000;
    struct entry *first, *rest;
    sqlite3_int64 mem0, mem1;
    size_t half, snap_len;
    struct fsm *f, *g = NULL;
    uint64_t t0, t1, t2;
    char err[256], label[64];
    void *snap;
    double r1, r2;

    if (n < 20000)
        n = 20000;
    half = 10000;
    if (fsm_new(&f, err, sizeof(err)) != 0)
        die("fsm", err);
    register_nodes(f);
    first = encode_places(0, half);
    rest = encode_places(half, n - half);

    printf("FSM apply (in-memory sqlite, %d nodes)\n", NODES);
    printf("  %-44s %10.0f/s\n", "baseline: decode PLACE only",
           decode_all(first, half));
    printf("  %-44s %10.0f/s\n", "baseline: apply NODE_HEARTBEAT",
           heartbeats(f, 20000));

    mem0 = sqlite3_memory_used();
    r1 = apply_all(f, first, half);
    mem1 = sqlite3_memory_used();
    printf("  %-44s %10.0f/s\n", "apply PLACE, sandboxes 0 to 10,000", r1);
    r2 = apply_all(f, rest, n - half);
    snprintf(label, sizeof(label), "apply PLACE, sandboxes 10,000 to %zu", n);
    printf("  %-44s %10.0f/s\n", label, r2);

    t0 = pd_now_ns();
    if (fsm_snapshot_bytes(f, &snap, &snap_len) != 0)
        die("snapshot", fsm_errmsg(f));
    t1 = pd_now_ns();
    if (fsm_new(&g, err, sizeof(err)) != 0)
        die("fsm", err);
    if (fsm_restore_bytes(g, snap, snap_len) != 0)
        die("restore", fsm_errmsg(g));
    t2 = pd_now_ns();
    printf("snapshots (%zu sandboxes; both block the loop)\n", n);
    printf("  %-44s %10.1f ms\n", "take (sqlite3_serialize)",
           (double)(t1 - t0) / 1e6);
    printf("  %-44s %10.1f ms\n", "restore (deserialize, check, index)",
           (double)(t2 - t1) / 1e6);
    fsm_free(g);
    printf("memory\n");
    printf("  %-44s %10.1f MB\n", "sqlite heap per 10,000 sandboxes",
           (double)(mem1 - mem0) / 1e6);
    printf("  %-44s %10.1f MB\n", "sqlite heap in all",
           (double)sqlite3_memory_used() / 1e6);
    snprintf(label, sizeof(label), "snapshot of %zu sandboxes", n);
    printf("  %-44s %10.1f MB\n", label, (double)snap_len / 1e6);
    printf("  %-44s %10.1f KB\n", "capacity index (1,000 nodes)",
           (double)(fsm_node_index(f)->n * sizeof(struct fsm_node_cap)) / 1e3);
    free(snap);
    free_entries(first, half);
    free_entries(rest, n - half);
    fsm_free(f);
    return 0;
}
