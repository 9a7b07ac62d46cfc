/*
 * The replicated state machine: Paddock's cluster state in an in-memory
 * sqlite database, changed only by Raft commands (raft/cmd.h).
 *
 * Determinism. Every scheduler applies the same log to the same starting
 * state and must end with the same rows. So apply never reads a clock (the
 * command carries the proposer's time), never draws random numbers, and
 * orders every multi-row choice by a key. A command that fails (a bad id, a
 * placement that no longer fits) changes nothing but its own entry in the
 * table of applied request ids: each command runs in a transaction that is
 * rolled back on error, and the error becomes the command's result.
 *
 * Results. Raft hands an apply's result to the proposer only, and only on
 * the leader; a follower would leak anything apply allocated. So the FSM
 * allocates nothing per result: it stores each result under the command's
 * request id (kept FSM_DEDUP_KEEP_MS of command time), and the proposer
 * reads it back with fsm_result_get from its apply callback. The same table
 * makes a retried request id return the first result without applying
 * again.
 *
 * Snapshots. A snapshot is a short header plus sqlite3_serialize of the
 * database; restore is sqlite3_deserialize of it. raft replays every entry
 * after the last snapshot at each start, so restore plus replay rebuilds the
 * state; nothing of the FSM is kept on disk by the FSM itself.
 *
 * Resource accounting. A node's allocation is the sum of the specs of its
 * sandboxes in pending, starting, running or stopping; the FSM updates it on
 * every transition, and PLACE re-checks the fit against it, so a stale
 * placement is rejected (-ENOSPC), never over-committed.
 *
 * Threading: none. One event loop owns the FSM; reads and applies run on it.
 * Read functions return 0, -ENOENT when the row does not exist, or another
 * negative errno (-EIO with the reason in fsm_errmsg) when sqlite failed.
 */
#ifndef PD_RAFT_FSM_H
#define PD_RAFT_FSM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "raft/cmd.h"

struct raft_fsm;

/* How long (in command time) a request id is remembered for dedup. */
#define FSM_DEDUP_KEEP_MS (15ull * 60 * 1000)

/*
 * The largest CPU count and memory or disk size (MB) that NODE_REGISTER
 * and SANDBOX_PLACE accept; larger ones are -EINVAL. Sizes are stored in
 * sqlite's signed 64-bit integers and summed into a node's allocation:
 * bounding each (2^40 MB is far beyond any real machine) keeps every sum
 * exact. (Added with the Raft tests; callers may validate against them.)
 */
#define FSM_CPUS_MAX (1u << 20)
#define FSM_SIZE_MAX_MB (1ull << 40)

/* Magic at the start of every snapshot. */
#define FSM_SNAPSHOT_MAGIC "PDFSM001"

/* The outcome of one command, as the API can show it. */
struct fsm_result {
    int code;                  /* 0 or a negative errno */
    char message[256];         /* why, for a user, when code != 0 */
    char node[FSM_ID_MAX + 1]; /* PLACE: the node that holds the sandbox */
    uint64_t generation;       /* PLACE: the sandbox's generation */
    uint64_t count;            /* NODE_DOWN: sandboxes lost;
                                  TOKEN_GC: tokens dropped */
    bool existing;             /* PLACE: same sandbox and spec existed */
    bool duplicate;            /* this request id was applied before: the
                                  result is the first one's */
};

struct fsm;

/* ---- Life cycle -------------------------------------------------------- */

/*
 * Opens an empty state (in-memory sqlite with the schema). Returns 0 or a
 * negative errno with the reason in err.
 */
int fsm_new(struct fsm **out, char *err, size_t errlen);

/* Closes the database and frees everything (NULL-safe). */
void fsm_free(struct fsm *f);

/* The raft_fsm to hand to raft_init or raft_fixture_grow. */
struct raft_fsm *fsm_raft(struct fsm *f);

/* The reason of the last -EIO or other internal failure. */
const char *fsm_errmsg(const struct fsm *f);

/* ---- Applying (what raft does; also used by tests and benchmarks) ------ */

/*
 * Applies one encoded command and copies its result into res (may be
 * NULL). Returns 0 when the command was applied, whether it succeeded or
 * not (see res->code); a negative errno only for an internal failure after
 * which the FSM cannot go on (sqlite out of memory).
 */
int fsm_apply_buf(struct fsm *f, const void *buf, size_t len,
                  struct fsm_result *res);

/*
 * Applies one Raft entry as raft does: a command (fsm_apply_buf), or a
 * batch of them (cmd.h), each part in its own transaction with its own
 * result under its request id. Returns as fsm_apply_buf.
 */
int fsm_apply_entry(struct fsm *f, const void *buf, size_t len);

/* Same for a command struct: encodes it, then applies it. */
int fsm_apply_cmd(struct fsm *f, const struct fsm_cmd *cmd,
                  struct fsm_result *res);

/*
 * The stored result of the command with this request id: 0, or -ENOENT
 * when it was never applied here (or pruned). Call it from the apply
 * callback; the result of the last command is served from memory.
 */
int fsm_result_get(struct fsm *f, const struct fsm_rid *rid,
                   struct fsm_result *out);

/* Commands applied since fsm_new or the last restore. */
uint64_t fsm_applied(const struct fsm *f);

/* ---- Snapshots --------------------------------------------------------- */

/* The snapshot bytes: malloc'd, the caller frees. */
int fsm_snapshot_bytes(struct fsm *f, void **out, size_t *out_len);

/* Replaces the whole state with a snapshot. -EINVAL when it is not one. */
int fsm_restore_bytes(struct fsm *f, const void *buf, size_t len);

/*
 * A canonical text dump of every table, ordered by key, for tests that
 * compare two FSMs (and for debugging). malloc'd; the caller frees.
 */
int fsm_dump(struct fsm *f, char **out);

/* ---- Nodes ------------------------------------------------------------- */

enum fsm_node_state {
    FSM_NODE_READY = 0,
    FSM_NODE_DOWN = 1,
};

struct fsm_node {
    char id[FSM_ID_MAX + 1];
    char rpc_addr[FSM_ADDR_MAX + 1];
    uint32_t cpus;
    uint64_t memory_mb;
    uint64_t disk_mb;
    uint32_t alloc_cpus;
    uint64_t alloc_memory_mb;
    uint64_t alloc_disk_mb;
    int state; /* enum fsm_node_state */
    bool draining;
    struct fsm_kv *labels;
    size_t n_labels;
    uint64_t registered_ms;
    uint64_t last_seen_ms; /* time of the last REGISTER or HEARTBEAT */
    uint64_t down_ms;      /* time of the last NODE_DOWN, 0 if never */
    uint64_t n_sandboxes;  /* sandboxes that count against it */
};

/* "ready", "draining" (ready and draining) or "down". */
const char *fsm_node_state_name(const struct fsm_node *n);

int fsm_node_get(struct fsm *f, const char *id, struct fsm_node *out);
/* Every node, ordered by id. *out is malloc'd (free with fsm_nodes_free). */
int fsm_node_list(struct fsm *f, struct fsm_node **out, size_t *n);
void fsm_node_clear(struct fsm_node *n);
void fsm_nodes_free(struct fsm_node *v, size_t n);

/*
 * The in-memory capacity index that placement reads: one entry per node,
 * ordered by id, kept in step with the nodes table after every apply and
 * rebuilt on restore. Placement scans it instead of querying sqlite.
 *
 * The resv_* fields are the leader's own bookkeeping, not replicated: the
 * resources of placements it proposed whose PLACE has not been applied
 * yet, so that concurrent creates do not all choose the same free slot.
 * They start at 0 and are reset by a restore.
 */
struct fsm_node_cap {
    char id[FSM_ID_MAX + 1];
    uint32_t cpus;
    uint64_t memory_mb;
    uint64_t disk_mb;
    uint32_t alloc_cpus;
    uint64_t alloc_memory_mb;
    uint64_t alloc_disk_mb;
    uint32_t resv_cpus;
    uint64_t resv_memory_mb;
    uint64_t resv_disk_mb;
    bool ready;
    bool draining;
    char *labels; /* "key=value\n" per label, sorted by key; never NULL */
};

struct fsm_node_index {
    struct fsm_node_cap *v;
    size_t n;
};

const struct fsm_node_index *fsm_node_index(const struct fsm *f);

/*
 * Adds (sign > 0) or removes (sign < 0) a pending reservation on a node of
 * the index; removal stops at zero. -ENOENT for an unknown node.
 */
int fsm_node_reserve(struct fsm *f, const char *node, uint32_t cpus,
                     uint64_t memory_mb, uint64_t disk_mb, int sign);

/* ---- Sandboxes --------------------------------------------------------- */

struct fsm_sandbox {
    char id[FSM_ID_MAX + 1];
    char tenant[FSM_ID_MAX + 1];
    struct fsm_spec spec;
    char node[FSM_ID_MAX + 1]; /* the node it is (or was last) placed on */
    int state;                 /* enum fsm_sandbox_state */
    char reason[FSM_REASON_MAX + 1];
    uint64_t generation;       /* 1 at creation, +1 at each re-placement */
    uint64_t created_ms;
    uint64_t updated_ms;
};

/* Which sandboxes fsm_sandbox_list returns. Zero the struct for "all". */
struct fsm_sandbox_filter {
    const char *tenant;  /* NULL: any tenant */
    const char *node;    /* NULL: any node */
    int state;           /* a state, or -1 for any (set it!) */
    const struct fsm_kv *labels; /* every pair must match */
    size_t n_labels;
    const char *after;   /* ids greater than this (paging), or NULL */
    size_t limit;        /* 0: no limit */
};

int fsm_sandbox_get(struct fsm *f, const char *id, struct fsm_sandbox *out);
/* Ordered by id; free with fsm_sandboxes_free. */
int fsm_sandbox_list(struct fsm *f, const struct fsm_sandbox_filter *flt,
                     struct fsm_sandbox **out, size_t *n);
void fsm_sandbox_clear(struct fsm_sandbox *s);
void fsm_sandboxes_free(struct fsm_sandbox *v, size_t n);

/* Sandboxes per state, for /metrics. */
int fsm_sandbox_counts(struct fsm *f, uint64_t counts[FSM_SB_NSTATES]);

/* ---- Ports ------------------------------------------------------------- */

struct fsm_port {
    char sandbox[FSM_ID_MAX + 1];
    uint32_t port;
    unsigned char token_hash[FSM_TOKEN_HASH_LEN];
    uint64_t created_ms;
};

int fsm_port_get(struct fsm *f, const char *sandbox, uint32_t port,
                 struct fsm_port *out);
/* Ports of one sandbox, ordered by port; *out is malloc'd (free()). */
int fsm_port_list(struct fsm *f, const char *sandbox, struct fsm_port **out,
                  size_t *n);

/* ---- Tokens and keys --------------------------------------------------- */

struct fsm_token {
    char jti[FSM_JTI_MAX + 1];
    char tenant[FSM_ID_MAX + 1];
    char role[FSM_ROLE_MAX + 1];
    uint64_t exp_ms;
    uint64_t created_ms;
    bool revoked;
    uint64_t revoked_ms;
};

int fsm_token_get(struct fsm *f, const char *jti, struct fsm_token *out);
/* Tokens of a tenant (or all when tenant is NULL), by jti; free(). With
 * revoked_only, just the revoked ones (to push to agents). */
int fsm_token_list(struct fsm *f, const char *tenant, bool revoked_only,
                   struct fsm_token **out, size_t *n);
/*
 * True when the jti is revoked, or unknown: a token this cluster did not
 * record is not trusted. The JWT signature and time checks are the
 * caller's; this is only the replicated revocation set.
 */
bool fsm_token_is_revoked(struct fsm *f, const char *jti);

/* The jti of the bootstrap admin token, or -ENOENT before bootstrap. */
int fsm_admin_jti(struct fsm *f, char *out, size_t outlen);

struct fsm_key {
    char kid[FSM_KID_MAX + 1];
    char alg[FSM_ALG_MAX + 1];
    char *public_pem;
    char *private_pem;
    uint64_t created_ms;
    uint64_t retired_ms; /* 0 while it signs */
};

int fsm_key_get(struct fsm *f, const char *kid, struct fsm_key *out);
/* All keys (retired ones too, they still verify), newest first. */
int fsm_key_list(struct fsm *f, struct fsm_key **out, size_t *n);
/* The newest key that is not retired: the one to sign with. */
int fsm_key_active(struct fsm *f, struct fsm_key *out);
void fsm_key_clear(struct fsm_key *k);
void fsm_keys_free(struct fsm_key *v, size_t n);

/* ---- Members ----------------------------------------------------------- */

/*
 * The addresses of each scheduler, by Raft id. raft_leader() gives only the
 * Raft address; this maps it to the API, RPC and preview addresses.
 */
struct fsm_member {
    uint64_t id;
    char raft_addr[FSM_ADDR_MAX + 1];
    char api_addr[FSM_ADDR_MAX + 1];
    char rpc_addr[FSM_ADDR_MAX + 1];
    char preview_addr[FSM_ADDR_MAX + 1];
};

int fsm_member_get(struct fsm *f, uint64_t id, struct fsm_member *out);
/* Ordered by id; *out is malloc'd (free()). */
int fsm_member_list(struct fsm *f, struct fsm_member **out, size_t *n);

#endif
