/*
 * Internals shared by fsm.c (schema, apply, snapshots), fsm_read.c (the
 * read API) and fsm_index.c (the capacity index). Not for other components.
 */
#ifndef PD_RAFT_FSM_INT_H
#define PD_RAFT_FSM_INT_H

#include <raft.h>
#include <sqlite3.h>

#include "raft/fsm.h"

/* Prepared statements, compiled on first use and kept until a restore. */
enum fsm_stmt {
    ST_BEGIN,
    ST_COMMIT,
    ST_ROLLBACK,
    ST_SAVEPOINT,
    ST_ROLLBACK_TO,
    ST_RELEASE,
    ST_APPLIED_GET,
    ST_APPLIED_PUT,
    ST_APPLIED_PRUNE,
    ST_META_GET,
    ST_META_PUT,
    ST_MEMBER_PUT,
    ST_MEMBER_DEL,
    ST_MEMBER_GET,
    ST_MEMBER_LIST,
    ST_NODE_UPSERT,
    ST_NODE_LABELS_DEL,
    ST_NODE_LABEL_PUT,
    ST_NODE_LABELS_GET,
    ST_NODE_HEARTBEAT,
    ST_NODE_DOWN,
    ST_NODE_DRAIN,
    ST_NODE_GET,
    ST_NODE_LIST,
    ST_NODE_CAP,
    ST_NODE_CAP_ALL,
    ST_NODE_ALLOC,
    ST_NODE_ALLOC_ZERO,
    ST_SB_INSERT,
    ST_SB_REPLACE,
    ST_SB_GET,
    ST_SB_STATE,
    ST_SB_LOST_ON_NODE,
    ST_SB_DEL,
    ST_SB_ENV_PUT,
    ST_SB_ENV_GET,
    ST_SB_ENV_DEL,
    ST_SB_LABEL_PUT,
    ST_SB_LABELS_GET,
    ST_SB_LABELS_DEL,
    ST_SB_PORTS_DEL,
    ST_SB_COUNTS,
    ST_PORT_PUT,
    ST_PORT_DEL,
    ST_PORT_GET,
    ST_PORT_LIST,
    ST_TOKEN_PUT,
    ST_TOKEN_REVOKE,
    ST_TOKEN_GET,
    ST_TOKEN_LIST,
    ST_TOKEN_GC,
    ST_KEY_PUT,
    ST_KEY_RETIRE,
    ST_KEY_GET,
    ST_KEY_LIST,
    ST_KEY_ACTIVE,
    ST_COUNT,
};

struct fsm {
    sqlite3 *db;
    sqlite3_stmt *st[ST_COUNT];
    struct raft_fsm rfsm;

    struct fsm_node_index idx;
    size_t idx_cap;

    /* The node the command being applied changed (each command changes
     * at most one), refreshed in the index after the commit. */
    char touched[FSM_ID_MAX + 1];
    bool touched_labels;

    struct fsm_rid last_rid;
    struct fsm_result last;
    bool have_last;

    uint64_t applied;
    char err[256];
};

/* The statement, reset and with its bindings cleared; NULL on failure. */
sqlite3_stmt *fsm_stmt(struct fsm *f, enum fsm_stmt id);

/* Records sqlite's message with context in f->err; returns -EIO. */
int fsm_sql_fail(struct fsm *f, const char *what);

/* Steps a statement that returns no rows; 0 or -EIO. */
int fsm_exec(struct fsm *f, sqlite3_stmt *st, const char *what);

/* Copies a text column into a fixed buffer (truncating; "" for NULL). */
void fsm_col_str(sqlite3_stmt *st, int col, char *buf, size_t len);

/* A malloc'd copy of a text column; NULL for NULL or out of memory. */
char *fsm_col_dup(sqlite3_stmt *st, int col);

/* Loads the (key, value) rows of a statement bound with ?1 = owner. */
int fsm_kv_load(struct fsm *f, enum fsm_stmt id, const char *owner,
                struct fsm_kv **out, size_t *n);

/* Index maintenance (fsm_index.c). */
int fsm_index_rebuild(struct fsm *f);
int fsm_index_refresh(struct fsm *f, const char *node, bool labels);
void fsm_index_free(struct fsm *f);

#endif
