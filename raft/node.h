/*
 * One scheduler's Raft member: canonical raft 0.15 with its libuv disk log
 * and either its plaintext TCP transport or, given TLS contexts, the
 * mutual-TLS transport of raft/transport_tls.h, driving the FSM of
 * raft/fsm.h. Everything runs on the daemon's libuv loop.
 *
 * Traps of raft 0.15 handled here (DESIGN.md 9), so callers need not know:
 *   - Entries are padded to 8 bytes (fsm_cmd_encode does it) and
 *     auto-recovery is off: an unreadable segment fails the start loudly
 *     instead of being renamed away with committed entries in it.
 *   - raft_close from inside an apply callback aborts. raftnode_close
 *     never closes synchronously: it schedules the close on the loop, so
 *     it is safe from any callback, apply callbacks included.
 *   - An apply that ends in RAFT_LEADERSHIPLOST has an unknown outcome: it
 *     may have been committed, or not. It is reported as RAFTNODE_ELOST;
 *     resubmit the same struct fsm_cmd (same request id) on the new leader
 *     and the FSM applies it at most once.
 *   - One membership change at a time: a second change while one is in
 *     flight is refused with -EBUSY (RAFT_CANTCHANGE) and a message.
 *   - raft_leader gives the leader's Raft address only; the FSM's members
 *     table (MEMBER_SET) maps the Raft id to its API/RPC/preview addresses.
 *   - raft replays every entry after the last snapshot at each start into
 *     a fresh FSM: the FSM is in memory, so restore plus replay rebuilds it.
 *   - raft 0.15 has no callback on state changes; raftnode polls the state
 *     every RAFTNODE_POLL_MS and reports changes through on_state.
 *   - raft_uv writes to peers with plain writev: the process must ignore
 *     SIGPIPE, or a peer that dies mid-write kills this member too.
 *
 * Errors are negative errno values, with the reason in raftnode_errmsg.
 */
#ifndef PD_RAFT_NODE_H
#define PD_RAFT_NODE_H

#include <openssl/ssl.h>
#include <raft.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "raft/cmd.h"
#include "raft/fsm.h"

/* Not the leader: ask raftnode_leader who is and go there. */
#define RAFTNODE_ENOTLEADER (-EREMOTE)
/* Leadership was lost before the entry was known committed: the outcome
 * is unknown; retry with the same request id. */
#define RAFTNODE_ELOST (-ECONNABORTED)
/* The node is closing (or closed). */
#define RAFTNODE_ESHUTDOWN (-ESHUTDOWN)

#define RAFTNODE_POLL_MS 25

struct raftnode;

struct raftnode_peer {
    uint64_t id;
    char address[FSM_ADDR_MAX + 1];
    bool voter; /* in raftnode_members' output */
};

struct raftnode_config {
    const char *dir;          /* data directory; created 0700 if missing */
    uint64_t id;              /* this member's Raft id, non-zero */
    const char *address;      /* host:port the others reach us at */
    const char *bind_address; /* where to listen; NULL: address */
    /*
     * The initial configuration (all voters), written on the very first
     * start only; a data directory with a log resumes from it instead.
     * Empty (n_bootstrap 0) to join an existing cluster: the node then
     * waits until the leader adds it (raftnode_add).
     */
    const struct raftnode_peer *bootstrap;
    size_t n_bootstrap;
    unsigned election_timeout_ms;  /* 0: 1000 */
    unsigned heartbeat_timeout_ms; /* 0: 100 */
    unsigned snapshot_threshold;   /* entries between snapshots; 0: 8192 */
    unsigned snapshot_trailing;    /* entries kept after one; 0: 2048 */
    /* Called on the loop when this member's Raft state changes
     * (RAFT_FOLLOWER, RAFT_CANDIDATE, RAFT_LEADER, RAFT_UNAVAILABLE). */
    void (*on_state)(struct raftnode *n, int old_state, int new_state,
                     void *data);
    void *data;
    /*
     * Mutual TLS between members (raft/transport_tls.h): with both
     * contexts set, Raft traffic is encrypted and only peers with a
     * cluster-CA certificate of OU=scheduler are accepted. NULL (the
     * default): raft's plaintext TCP transport. Borrowed; they must
     * outlive the node.
     */
    SSL_CTX *tls_server;
    SSL_CTX *tls_client;
    unsigned tls_handshake_ms; /* 0: RTLS_HANDSHAKE_MS */
};

/*
 * Creates the node: raft_uv and its TCP transport over cfg->dir, raft_init,
 * the settings above. Nothing runs until raftnode_start. The FSM must
 * outlive the node.
 */
int raftnode_new(struct raftnode **out, uv_loop_t *loop, struct fsm *fsm,
                 const struct raftnode_config *cfg, char *err,
                 size_t errlen);

/*
 * Bootstraps on the first start (if configured), then starts Raft: loads
 * the log, restores the last snapshot and replays the entries after it.
 * -EIO with the reason when the log cannot be loaded (corruption is never
 * repaired silently).
 */
int raftnode_start(struct raftnode *n);

/*
 * Called once per proposed command with its outcome:
 *   status 0: the command was applied; *res is its result (res->code may
 *     still be an error the user should see, e.g. -ENOSPC).
 *   RAFTNODE_ELOST: unknown outcome; resubmit with the same request id.
 *   RAFTNODE_ESHUTDOWN, or another negative errno: not applied here.
 * res is NULL unless status is 0 and is valid during the call only.
 */
typedef void (*raftnode_apply_cb)(void *data, int status,
                                  const struct fsm_result *res);

/*
 * Proposes a command on the leader. Returns 0 (cb will be called),
 * RAFTNODE_ENOTLEADER, RAFTNODE_ESHUTDOWN, -EINVAL, -ENOMEM or -EMSGSIZE
 * (cb will not be called).
 */
int raftnode_propose(struct raftnode *n, const struct fsm_cmd *cmd,
                     raftnode_apply_cb cb, void *data);

/* Generic completion for barriers, membership changes and transfers:
 * status 0 or a negative errno; msg explains a failure (or is ""). */
typedef void (*raftnode_done_cb)(void *data, int status, const char *msg);

/*
 * A barrier: cb runs once every entry committed before it is applied
 * here, which makes a following local read consistent (?consistent=true).
 * Leader only.
 */
int raftnode_barrier(struct raftnode *n, raftnode_done_cb cb, void *data);

/*
 * Adds a scheduler: first as a spare (raft_add), then promoted to voter
 * (raft_assign), which lets it catch up before it counts for quorum. Both
 * steps finish before cb. Leader only; -EBUSY while another change runs,
 * -EEXIST for a known id or address.
 */
int raftnode_add(struct raftnode *n, uint64_t id, const char *address,
                 raftnode_done_cb cb, void *data);

/* Removes a scheduler (raft_remove). -ENOENT for an unknown id. */
int raftnode_remove(struct raftnode *n, uint64_t id, raftnode_done_cb cb,
                    void *data);

/*
 * Hands leadership to another voter (0: any up-to-date one). cb runs when
 * a new leader is seen or after the election timeout; status 0 when this
 * member is no longer the leader. -ENOENT when there is no other voter.
 */
int raftnode_transfer(struct raftnode *n, uint64_t target,
                      raftnode_done_cb cb, void *data);

/*
 * Closes the node on the next loop iteration, never from inside the
 * caller's callback. With transfer_first and this member leading a cluster
 * of more than one voter, leadership is handed over first (bounded by the
 * election timeout), so that the cluster does not wait out an election.
 * Pending proposals complete with RAFTNODE_ESHUTDOWN or RAFTNODE_ELOST.
 * done runs after everything is released; then the node is freed.
 */
void raftnode_close(struct raftnode *n, bool transfer_first,
                    void (*done)(void *data), void *data);

/* ---- State ------------------------------------------------------------- */

struct raftnode_status {
    uint64_t id;
    int state;             /* RAFT_FOLLOWER, RAFT_CANDIDATE, RAFT_LEADER.. */
    uint64_t term;
    uint64_t commit_index;
    uint64_t last_applied;
    uint64_t last_index;
    uint64_t leader_id;    /* 0 when unknown */
    char leader_address[FSM_ADDR_MAX + 1];
    unsigned voters;
};

void raftnode_status(struct raftnode *n, struct raftnode_status *out);

/* "follower", "candidate", "leader" or "unavailable". */
const char *raftnode_state_name(int state);

bool raftnode_is_leader(struct raftnode *n);

/* The known leader's id and Raft address; id 0 and "" when unknown. */
void raftnode_leader(struct raftnode *n, uint64_t *id, char *address,
                     size_t addrlen);

/* The current Raft configuration; *out is malloc'd (free()). */
int raftnode_members(struct raftnode *n, struct raftnode_peer **out,
                     size_t *count);

/* The reason of the last failure. */
const char *raftnode_errmsg(const struct raftnode *n);

/* The underlying raft instance, for read-only inspection (metrics). */
struct raft *raftnode_raft(struct raftnode *n);

#endif
