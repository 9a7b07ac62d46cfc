/*
 * Raft commands: the only way the replicated state changes.
 *
 * A command is one struct fsm_cmd; fsm_cmd_encode turns it into the bytes of
 * one Raft log entry and fsm_cmd_decode turns them back. The entry is
 *
 *     [4-byte big-endian length][msgpack map][zero padding]
 *
 * where the map is built with proto/frame.h's encoder ("t" is the command
 * type below, "id" is 0) and the padding brings the entry to a multiple of
 * 8 bytes. The padding is not cosmetic: raft 0.15's on-disk segments cannot
 * be loaded again when an entry's length is not a multiple of 8, and with
 * auto-recovery on, the segment is silently renamed away (DESIGN.md 9).
 *
 * Every command carries:
 *   - a request id (16 random bytes). The FSM remembers the ids it applied
 *     together with their results; applying an id again returns the first
 *     result and changes nothing. A write whose apply ended in
 *     RAFT_LEADERSHIPLOST has an unknown outcome, so the caller resubmits
 *     the same command with the same id to the new leader.
 *   - the proposer's wall-clock time in milliseconds. The FSM never reads a
 *     clock itself: every member must compute the same state from the log.
 *
 * Strings are NUL-terminated C strings in fixed arrays, so a decoded command
 * has the same shape as one the caller built. The few unbounded values (the
 * key/value lists and PEM keys) are heap pointers: the caller owns them when
 * encoding, fsm_cmd_free releases them after decoding.
 */
#ifndef PD_RAFT_CMD_H
#define PD_RAFT_CMD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/util.h"

#define FSM_RID_LEN 16
#define FSM_ID_MAX PD_ID_MAX  /* node, sandbox and tenant ids */
#define FSM_ADDR_MAX 255      /* host:port */
#define FSM_REASON_MAX 511
#define FSM_EGRESS_MAX 1023
#define FSM_ROLE_MAX 15
#define FSM_JTI_MAX 63
#define FSM_KID_MAX 63
#define FSM_ALG_MAX 15
#define FSM_PEM_MAX 16384
#define FSM_KV_MAX 256        /* entries in one env or label list */
#define FSM_KEY_MAX 255       /* an env or label key */
#define FSM_VALUE_MAX 8191    /* an env or label value */
#define FSM_TOKEN_HASH_LEN 32 /* SHA-256 of a preview token */

/* Alignment of every encoded entry (the raft 0.15 trap above). */
#define FSM_CMD_ALIGN 8

/* A request id: random, chosen once per logical request, kept on retry. */
struct fsm_rid {
    unsigned char b[FSM_RID_LEN];
};

/* Fills rid from the OS CSPRNG. Returns 0 or a negative errno. */
int fsm_rid_new(struct fsm_rid *rid);

/* Lower-case hex of a request id into out (33 bytes), for logs. */
void fsm_rid_hex(const struct fsm_rid *rid, char *out);

enum fsm_cmd_type {
    FSM_CMD_MEMBER_SET = 1,    /* member: id, addresses (upsert) */
    FSM_CMD_MEMBER_REMOVE,     /* member: id */
    FSM_CMD_NODE_REGISTER,     /* node_register */
    FSM_CMD_NODE_HEARTBEAT,    /* node: ready again, last seen = now */
    FSM_CMD_NODE_DOWN,         /* node: down; its sandboxes become lost */
    FSM_CMD_NODE_DRAIN,        /* node: drain on (drain=true) or off */
    FSM_CMD_SANDBOX_PLACE,     /* place: create on a node, or re-place */
    FSM_CMD_SANDBOX_STATE,     /* state: a reported state change */
    FSM_CMD_SANDBOX_DELETE,    /* sandbox: remove with its ports */
    FSM_CMD_PORT_EXPOSE,       /* port: with the token's hash */
    FSM_CMD_PORT_UNEXPOSE,     /* port */
    FSM_CMD_TOKEN_CREATE,      /* token */
    FSM_CMD_TOKEN_REVOKE,      /* token: jti */
    FSM_CMD_TOKEN_GC,          /* (now only) drop tokens expired by now */
    FSM_CMD_KEY_ADD,           /* key */
    FSM_CMD_KEY_RETIRE,        /* key: kid */
    FSM_CMD_BOOTSTRAP_ADMIN,   /* token: the first admin token, once */
    FSM_CMD_TYPE_MAX = FSM_CMD_BOOTSTRAP_ADMIN,
};

/* A short name for logs ("SANDBOX_PLACE"), or "UNKNOWN". */
const char *fsm_cmd_name(int type);

/* Sandbox states (DESIGN.md 5). Numbers are stored: append only. */
enum fsm_sandbox_state {
    FSM_SB_PENDING = 0,
    FSM_SB_STARTING,
    FSM_SB_RUNNING,
    FSM_SB_STOPPING,
    FSM_SB_STOPPED,
    FSM_SB_LOST,
    FSM_SB_FAILED,
    FSM_SB_NSTATES,
};

/* "pending", "running"...; "unknown" for a bad value. */
const char *fsm_sandbox_state_name(int state);

/* Parses a state name; returns the state or -EINVAL. */
int fsm_sandbox_state_parse(const char *name);

/* One entry of an env or label list. */
struct fsm_kv {
    char *key;
    char *value;
};

/* What a sandbox asks for. */
struct fsm_spec {
    uint32_t cpus;
    uint64_t memory_mb;
    uint64_t disk_mb;
    char egress[FSM_EGRESS_MAX + 1]; /* "none", "all", or an allow-list */
    struct fsm_kv *env;
    size_t n_env;
    struct fsm_kv *labels;
    size_t n_labels;
};

struct fsm_cmd_member {
    uint64_t id; /* the Raft id */
    char raft_addr[FSM_ADDR_MAX + 1];
    char api_addr[FSM_ADDR_MAX + 1];
    char rpc_addr[FSM_ADDR_MAX + 1];
    char preview_addr[FSM_ADDR_MAX + 1];
};

struct fsm_cmd_node_register {
    char node[FSM_ID_MAX + 1];
    char rpc_addr[FSM_ADDR_MAX + 1];
    uint32_t cpus;
    uint64_t memory_mb;
    uint64_t disk_mb;
    struct fsm_kv *labels;
    size_t n_labels;
};

struct fsm_cmd_node {
    char node[FSM_ID_MAX + 1];
    bool drain;                         /* NODE_DRAIN only */
    char reason[FSM_REASON_MAX + 1];    /* NODE_DOWN: why, for the users */
};

struct fsm_cmd_place {
    char sandbox[FSM_ID_MAX + 1];
    char tenant[FSM_ID_MAX + 1];
    char node[FSM_ID_MAX + 1];          /* chosen by the leader's placement */
    struct fsm_spec spec;
    /*
     * False: create; an existing sandbox with the same tenant and spec is
     * returned as it is (result.existing), another spec is -EEXIST.
     * True: place again a sandbox that is lost, failed or stopped, with
     * a new generation (a fresh disk on the new node).
     */
    bool replace;
};

struct fsm_cmd_state {
    char sandbox[FSM_ID_MAX + 1];
    int state;                          /* enum fsm_sandbox_state */
    char reason[FSM_REASON_MAX + 1];
    /* When set, the report is rejected (-ESTALE) unless they match: a
     * report from a node that no longer holds the sandbox changes nothing. */
    char node[FSM_ID_MAX + 1];
    uint64_t generation;
};

struct fsm_cmd_sandbox {
    char sandbox[FSM_ID_MAX + 1];
};

struct fsm_cmd_port {
    char sandbox[FSM_ID_MAX + 1];
    uint32_t port;
    /* PORT_EXPOSE: SHA-256 of the preview token. The token itself never
     * enters the log, which is on disk on every scheduler. */
    unsigned char token_hash[FSM_TOKEN_HASH_LEN];
};

struct fsm_cmd_token {
    char jti[FSM_JTI_MAX + 1];
    char tenant[FSM_ID_MAX + 1];
    char role[FSM_ROLE_MAX + 1];        /* "admin", "tenant" or "node" */
    uint64_t exp_ms;                    /* wall clock; 0 = never */
};

struct fsm_cmd_key {
    char kid[FSM_KID_MAX + 1];
    char alg[FSM_ALG_MAX + 1];          /* "ES256" */
    char *public_pem;
    char *private_pem;
};

struct fsm_cmd {
    int type; /* enum fsm_cmd_type */
    struct fsm_rid rid;
    uint64_t now_ms;
    union {
        struct fsm_cmd_member member;
        struct fsm_cmd_node_register node_register;
        struct fsm_cmd_node node;
        struct fsm_cmd_place place;
        struct fsm_cmd_state state;
        struct fsm_cmd_sandbox sandbox;
        struct fsm_cmd_port port;
        struct fsm_cmd_token token;
        struct fsm_cmd_key key;
    } u;
};

/*
 * Zeroes cmd and sets its type, a fresh request id and now_ms from the wall
 * clock. Returns 0 or a negative errno (the CSPRNG failed).
 */
int fsm_cmd_init(struct fsm_cmd *cmd, int type);

/*
 * Encodes cmd into a malloc'd entry whose length is a multiple of
 * FSM_CMD_ALIGN. Returns 0, -EINVAL (unknown type, NULL in a list),
 * -E2BIG (a list over FSM_KV_MAX), -ENAMETOOLONG (a list key, list value
 * or PEM over its maximum: the decoder would refuse it), -ENOMEM or
 * -EMSGSIZE.
 */
int fsm_cmd_encode(const struct fsm_cmd *cmd, void **out, size_t *out_len);

/*
 * Decodes an entry. Every size is checked before use: a string too long for
 * its array, a list longer than FSM_KV_MAX, a wrong type, a missing field,
 * or non-zero padding is an error with the reason in err: -ENAMETOOLONG
 * (a string), -E2BIG (a list), -ERANGE (a 32-bit field over 2^32 - 1),
 * -EINVAL (an embedded NUL), -EPROTO (everything else). *out is zeroed on
 * failure; on success the caller calls fsm_cmd_free. (tests/unit/raft/
 * test_cmd.c checks each case; tests/fuzz/fuzz_cmd.c fuzzes it.)
 */
int fsm_cmd_decode(const void *buf, size_t len, struct fsm_cmd *out,
                   char *err, size_t errlen);

/* Frees what fsm_cmd_decode allocated; cmd itself is the caller's. */
void fsm_cmd_free(struct fsm_cmd *cmd);

/* Frees a list of n key/value pairs and their strings (NULL-safe). */
void fsm_kv_free(struct fsm_kv *kv, size_t n);

/* ---- Batches ----------------------------------------------------------- */

/*
 * A batch is one Raft entry holding several encoded commands, so that the
 * proposals of one loop iteration cost one log entry, one replication
 * message and one disk write instead of one each. It is a container, not a
 * command: each part is an entry of fsm_cmd_encode, applied by the FSM one
 * after the other in its own transaction, with its own request id and
 * result, exactly as if it had been an entry of its own. The layout is
 *
 *     "PDB1" [4-byte big-endian count]
 *     count times: [4-byte big-endian length][4 zero bytes][part]
 *
 * where each part's length is a multiple of 8, so the batch is too. The
 * magic can never start a command, whose first 4 bytes are a length far
 * below it. Parts are never batches themselves.
 */
#define FSM_BATCH_MAX 4096             /* parts in one batch */
#define FSM_BATCH_BYTES (4u << 20)     /* a batch's size, at most */

/* True when the entry is a batch (by its magic; not yet validated). */
bool fsm_batch_is(const void *buf, size_t len);

/*
 * Encodes n parts (each from fsm_cmd_encode) into a malloc'd batch.
 * Returns 0, -EINVAL (n is 0 or over FSM_BATCH_MAX, a part not padded),
 * -EMSGSIZE (over FSM_BATCH_BYTES) or -ENOMEM.
 */
int fsm_batch_encode(void *const *parts, const size_t *lens, size_t n,
                     void **out, size_t *out_len);

/*
 * Calls fn for each part of a batch, in order, after checking the whole
 * container (magic, count, every length and padding) first, so fn sees
 * either every part or none. fn's non-zero return stops the walk and is
 * returned. -EPROTO with the reason in err for a malformed batch.
 */
int fsm_batch_each(const void *buf, size_t len,
                   int (*fn)(void *arg, const void *part, size_t part_len),
                   void *arg, char *err, size_t errlen);

#endif
