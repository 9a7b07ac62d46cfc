/*
 * Placement: which node gets a new (or re-placed) sandbox. Runs on the
 * leader, as a pure function of the FSM's capacity index (raft/fsm.h), so it
 * costs one scan of an in-memory array and no sqlite query.
 *
 *   1. Filter: a node is feasible when it is ready, not draining, carries
 *      every label constraint, and has free CPU, memory and disk for the
 *      request. Free = capacity - committed allocation - the leader's
 *      pending reservations (placements proposed but not yet applied).
 *   2. Score: bin-pack (default) prefers the feasible node left with the
 *      least free room, so whole nodes stay free for big sandboxes; spread
 *      prefers the one left with the most, so load evens out. Room is the
 *      mean of the three free fractions after placement. Ties go to the
 *      lowest node id, so the choice is deterministic.
 *   3. When nothing fits, the error says why for each resource, e.g.
 *      "no node fits: 2 nodes lack memory (need 4096 MB, most free
 *      2048 MB), 1 node draining".
 *
 * The FSM checks the fit again when the PLACE command is applied, so a
 * choice made on a state that changed meanwhile is rejected there, never
 * over-committed. PADDOCK_TRACE=placement narrates why each node was
 * rejected.
 *
 * Usage on the leader, per create:
 *     sched_place(fsm_node_index(fsm), &req, &out, why, sizeof(why));
 *     fsm_node_reserve(fsm, out.node, cpus, mem, disk, +1);
 *     raftnode_propose(PLACE with node = out.node) ... and in the apply
 *     callback, whatever the outcome:
 *     fsm_node_reserve(fsm, node, cpus, mem, disk, -1);
 */
#ifndef PD_SCHED_PLACEMENT_H
#define PD_SCHED_PLACEMENT_H

#include <stddef.h>
#include <stdint.h>

#include "raft/fsm.h"

enum sched_strategy {
    SCHED_BINPACK = 0,
    SCHED_SPREAD = 1,
};

/* Parses "binpack" or "spread"; -EINVAL otherwise. */
int sched_strategy_parse(const char *s, enum sched_strategy *out);

struct sched_place_req {
    const char *sandbox; /* for the trace only; may be NULL */
    uint32_t cpus;
    uint64_t memory_mb;
    uint64_t disk_mb;
    /* Node labels that must all be present with these values. */
    const struct fsm_kv *constraints;
    size_t n_constraints;
    enum sched_strategy strategy;
};

struct sched_place_out {
    char node[FSM_ID_MAX + 1];
    size_t feasible; /* how many nodes could have taken it */
};

/*
 * Chooses a node. Returns 0 with out->node set, or -ENOSPC with the
 * per-resource reason in why (always terminated), or -EINVAL for a request
 * of zero resources or too many constraints (more than FSM_KV_MAX).
 */
int sched_place(const struct fsm_node_index *idx,
                const struct sched_place_req *req,
                struct sched_place_out *out, char *why, size_t whylen);

#endif
