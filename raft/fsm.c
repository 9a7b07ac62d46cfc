#include "raft/fsm_int.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

/*
 * The schema. Nodes carry their allocation (alloc_*) as columns updated on
 * every sandbox transition, so placement and the PLACE re-check never sum
 * the sandboxes table. Sandbox states are the numbers of enum
 * fsm_sandbox_state; 0-3 (pending to stopping) count against the node.
 */
static const char schema_sql[] =
    "PRAGMA journal_mode = MEMORY;"
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
    "CREATE TABLE members (id INTEGER PRIMARY KEY, raft_addr TEXT NOT NULL,"
    " api_addr TEXT NOT NULL, rpc_addr TEXT NOT NULL,"
    " preview_addr TEXT NOT NULL, updated_ms INTEGER NOT NULL);"
    "CREATE TABLE nodes (id TEXT PRIMARY KEY, rpc_addr TEXT NOT NULL,"
    " cpus INTEGER NOT NULL, memory_mb INTEGER NOT NULL,"
    " disk_mb INTEGER NOT NULL, alloc_cpus INTEGER NOT NULL,"
    " alloc_memory_mb INTEGER NOT NULL, alloc_disk_mb INTEGER NOT NULL,"
    " state INTEGER NOT NULL, draining INTEGER NOT NULL,"
    " registered_ms INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL,"
    " down_ms INTEGER NOT NULL);"
    "CREATE TABLE node_labels (node TEXT NOT NULL, key TEXT NOT NULL,"
    " value TEXT NOT NULL, PRIMARY KEY (node, key)) WITHOUT ROWID;"
    "CREATE TABLE sandboxes (id TEXT PRIMARY KEY, tenant TEXT NOT NULL,"
    " cpus INTEGER NOT NULL, memory_mb INTEGER NOT NULL,"
    " disk_mb INTEGER NOT NULL, egress TEXT NOT NULL,"
    " spec_digest INTEGER NOT NULL, node TEXT NOT NULL,"
    " state INTEGER NOT NULL, reason TEXT NOT NULL,"
    " generation INTEGER NOT NULL, created_ms INTEGER NOT NULL,"
    " updated_ms INTEGER NOT NULL);"
    "CREATE INDEX sandboxes_node ON sandboxes (node, state);"
    "CREATE INDEX sandboxes_tenant ON sandboxes (tenant, id);"
    "CREATE TABLE sandbox_env (sandbox TEXT NOT NULL, key TEXT NOT NULL,"
    " value TEXT NOT NULL, PRIMARY KEY (sandbox, key)) WITHOUT ROWID;"
    "CREATE TABLE sandbox_labels (sandbox TEXT NOT NULL, key TEXT NOT NULL,"
    " value TEXT NOT NULL, PRIMARY KEY (sandbox, key)) WITHOUT ROWID;"
    "CREATE INDEX sandbox_labels_kv ON sandbox_labels (key, value);"
    "CREATE TABLE ports (sandbox TEXT NOT NULL, port INTEGER NOT NULL,"
    " token_hash BLOB NOT NULL, created_ms INTEGER NOT NULL,"
    " PRIMARY KEY (sandbox, port)) WITHOUT ROWID;"
    "CREATE TABLE tokens (jti TEXT PRIMARY KEY, tenant TEXT NOT NULL,"
    " role TEXT NOT NULL, exp_ms INTEGER NOT NULL,"
    " created_ms INTEGER NOT NULL, revoked INTEGER NOT NULL,"
    " revoked_ms INTEGER NOT NULL);"
    "CREATE INDEX tokens_tenant ON tokens (tenant, jti);"
    "CREATE TABLE signing_keys (kid TEXT PRIMARY KEY, alg TEXT NOT NULL,"
    " public_pem TEXT NOT NULL, private_pem TEXT NOT NULL,"
    " created_ms INTEGER NOT NULL, retired_ms INTEGER NOT NULL);"
    "CREATE TABLE applied (rid BLOB PRIMARY KEY, at_ms INTEGER NOT NULL,"
    " code INTEGER NOT NULL, message TEXT NOT NULL, node TEXT NOT NULL,"
    " generation INTEGER NOT NULL, count INTEGER NOT NULL,"
    " existing INTEGER NOT NULL) WITHOUT ROWID;"
    "CREATE INDEX applied_at ON applied (at_ms);"
    "INSERT INTO meta (key, value) VALUES ('schema', '1');";

#define NODE_COLS                                                         \
    "id, rpc_addr, cpus, memory_mb, disk_mb, alloc_cpus, alloc_memory_mb," \
    " alloc_disk_mb, state, draining, registered_ms, last_seen_ms,"       \
    " down_ms, (SELECT count(*) FROM sandboxes s WHERE s.node = nodes.id" \
    " AND s.state <= 3)"
#define SB_COLS                                                           \
    "id, tenant, cpus, memory_mb, disk_mb, egress, spec_digest, node,"    \
    " state, reason, generation, created_ms, updated_ms"
#define TOKEN_COLS "jti, tenant, role, exp_ms, created_ms, revoked, revoked_ms"
#define KEY_COLS "kid, alg, public_pem, private_pem, created_ms, retired_ms"
#define CAP_COLS                                                          \
    "id, cpus, memory_mb, disk_mb, alloc_cpus, alloc_memory_mb,"          \
    " alloc_disk_mb, state, draining"

static const char *const stmt_sql[ST_COUNT] = {
    [ST_BEGIN] = "BEGIN",
    [ST_COMMIT] = "COMMIT",
    [ST_ROLLBACK] = "ROLLBACK",
    [ST_SAVEPOINT] = "SAVEPOINT cmd",
    [ST_ROLLBACK_TO] = "ROLLBACK TO cmd",
    [ST_RELEASE] = "RELEASE cmd",
    [ST_APPLIED_GET] = "SELECT code, message, node, generation, count,"
                       " existing FROM applied WHERE rid = ?1",
    [ST_APPLIED_PUT] = "INSERT OR REPLACE INTO applied (rid, at_ms, code,"
                       " message, node, generation, count, existing)"
                       " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    [ST_APPLIED_PRUNE] = "DELETE FROM applied WHERE at_ms < ?1",
    [ST_META_GET] = "SELECT value FROM meta WHERE key = ?1",
    [ST_META_PUT] = "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
    [ST_MEMBER_PUT] = "INSERT OR REPLACE INTO members (id, raft_addr,"
                      " api_addr, rpc_addr, preview_addr, updated_ms)"
                      " VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    [ST_MEMBER_DEL] = "DELETE FROM members WHERE id = ?1",
    [ST_MEMBER_GET] = "SELECT id, raft_addr, api_addr, rpc_addr,"
                      " preview_addr FROM members WHERE id = ?1",
    [ST_MEMBER_LIST] = "SELECT id, raft_addr, api_addr, rpc_addr,"
                       " preview_addr FROM members ORDER BY id",
    [ST_NODE_UPSERT] =
        "INSERT INTO nodes (id, rpc_addr, cpus, memory_mb, disk_mb,"
        " alloc_cpus, alloc_memory_mb, alloc_disk_mb, state, draining,"
        " registered_ms, last_seen_ms, down_ms)"
        " VALUES (?1, ?2, ?3, ?4, ?5, 0, 0, 0, 0, 0, ?6, ?6, 0)"
        " ON CONFLICT (id) DO UPDATE SET rpc_addr = ?2, cpus = ?3,"
        " memory_mb = ?4, disk_mb = ?5, state = 0, last_seen_ms = ?6",
    [ST_NODE_LABELS_DEL] = "DELETE FROM node_labels WHERE node = ?1",
    [ST_NODE_LABEL_PUT] = "INSERT INTO node_labels (node, key, value)"
                          " VALUES (?1, ?2, ?3)",
    [ST_NODE_LABELS_GET] = "SELECT key, value FROM node_labels"
                           " WHERE node = ?1 ORDER BY key",
    [ST_NODE_HEARTBEAT] = "UPDATE nodes SET state = 0, last_seen_ms = ?2"
                          " WHERE id = ?1",
    [ST_NODE_DOWN] = "UPDATE nodes SET state = 1, down_ms = ?2,"
                     " alloc_cpus = 0, alloc_memory_mb = 0,"
                     " alloc_disk_mb = 0 WHERE id = ?1",
    [ST_NODE_DRAIN] = "UPDATE nodes SET draining = ?2 WHERE id = ?1",
    [ST_NODE_GET] = "SELECT " NODE_COLS " FROM nodes WHERE id = ?1",
    [ST_NODE_LIST] = "SELECT " NODE_COLS " FROM nodes ORDER BY id",
    [ST_NODE_CAP] = "SELECT " CAP_COLS " FROM nodes WHERE id = ?1",
    [ST_NODE_CAP_ALL] = "SELECT " CAP_COLS " FROM nodes ORDER BY id",
    [ST_NODE_ALLOC] = "UPDATE nodes SET alloc_cpus = alloc_cpus + ?2,"
                      " alloc_memory_mb = alloc_memory_mb + ?3,"
                      " alloc_disk_mb = alloc_disk_mb + ?4 WHERE id = ?1",
    [ST_NODE_ALLOC_ZERO] = "UPDATE nodes SET alloc_cpus = 0,"
                           " alloc_memory_mb = 0, alloc_disk_mb = 0"
                           " WHERE id = ?1",
    [ST_SB_INSERT] = "INSERT INTO sandboxes (" SB_COLS ") VALUES (?1, ?2,"
                     " ?3, ?4, ?5, ?6, ?7, ?8, 0, '', 1, ?9, ?9)",
    [ST_SB_REPLACE] = "UPDATE sandboxes SET node = ?2, state = 0,"
                      " reason = '', generation = generation + 1,"
                      " updated_ms = ?3 WHERE id = ?1",
    [ST_SB_GET] = "SELECT " SB_COLS " FROM sandboxes WHERE id = ?1",
    [ST_SB_STATE] = "UPDATE sandboxes SET state = ?2, reason = ?3,"
                    " updated_ms = ?4 WHERE id = ?1",
    [ST_SB_LOST_ON_NODE] = "UPDATE sandboxes SET state = 5, reason = ?2,"
                           " updated_ms = ?3 WHERE node = ?1"
                           " AND state <= 3",
    [ST_SB_DEL] = "DELETE FROM sandboxes WHERE id = ?1",
    [ST_SB_ENV_PUT] = "INSERT INTO sandbox_env (sandbox, key, value)"
                      " VALUES (?1, ?2, ?3)",
    [ST_SB_ENV_GET] = "SELECT key, value FROM sandbox_env"
                      " WHERE sandbox = ?1 ORDER BY key",
    [ST_SB_ENV_DEL] = "DELETE FROM sandbox_env WHERE sandbox = ?1",
    [ST_SB_LABEL_PUT] = "INSERT INTO sandbox_labels (sandbox, key, value)"
                        " VALUES (?1, ?2, ?3)",
    [ST_SB_LABELS_GET] = "SELECT key, value FROM sandbox_labels"
                         " WHERE sandbox = ?1 ORDER BY key",
    [ST_SB_LABELS_DEL] = "DELETE FROM sandbox_labels WHERE sandbox = ?1",
    [ST_SB_PORTS_DEL] = "DELETE FROM ports WHERE sandbox = ?1",
    [ST_SB_COUNTS] = "SELECT state, count(*) FROM sandboxes GROUP BY state",
    [ST_PORT_PUT] = "INSERT INTO ports (sandbox, port, token_hash,"
                    " created_ms) VALUES (?1, ?2, ?3, ?4)",
    [ST_PORT_DEL] = "DELETE FROM ports WHERE sandbox = ?1 AND port = ?2",
    [ST_PORT_GET] = "SELECT sandbox, port, token_hash, created_ms FROM ports"
                    " WHERE sandbox = ?1 AND port = ?2",
    [ST_PORT_LIST] = "SELECT sandbox, port, token_hash, created_ms"
                     " FROM ports WHERE sandbox = ?1 ORDER BY port",
    [ST_TOKEN_PUT] = "INSERT INTO tokens (" TOKEN_COLS ")"
                     " VALUES (?1, ?2, ?3, ?4, ?5, 0, 0)",
    [ST_TOKEN_REVOKE] = "UPDATE tokens SET revoked = 1, revoked_ms = ?2"
                        " WHERE jti = ?1 AND revoked = 0",
    [ST_TOKEN_GET] = "SELECT " TOKEN_COLS " FROM tokens WHERE jti = ?1",
    [ST_TOKEN_LIST] = "SELECT " TOKEN_COLS " FROM tokens"
                      " WHERE (?1 IS NULL OR tenant = ?1)"
                      " AND (?2 = 0 OR revoked = 1) ORDER BY jti",
    [ST_TOKEN_GC] = "DELETE FROM tokens WHERE exp_ms != 0 AND exp_ms <= ?1",
    [ST_KEY_PUT] = "INSERT INTO signing_keys (" KEY_COLS ")"
                   " VALUES (?1, ?2, ?3, ?4, ?5, 0)",
    [ST_KEY_RETIRE] = "UPDATE signing_keys SET retired_ms = ?2"
                      " WHERE kid = ?1 AND retired_ms = 0",
    [ST_KEY_GET] = "SELECT " KEY_COLS " FROM signing_keys WHERE kid = ?1",
    [ST_KEY_LIST] = "SELECT " KEY_COLS " FROM signing_keys"
                    " ORDER BY created_ms DESC, kid DESC",
    [ST_KEY_ACTIVE] = "SELECT " KEY_COLS " FROM signing_keys"
                      " WHERE retired_ms = 0"
                      " ORDER BY created_ms DESC, kid DESC LIMIT 1",
};

/* ---- sqlite helpers ---------------------------------------------------- */

int
fsm_sql_fail(struct fsm *f, const char *what)
{
    snprintf(f->err, sizeof(f->err), "%s: %s", what, sqlite3_errmsg(f->db));
    return -EIO;
}

sqlite3_stmt *
fsm_stmt(struct fsm *f, enum fsm_stmt id)
{
    sqlite3_stmt *st = f->st[id];

    if (st == NULL) {
        if (sqlite3_prepare_v3(f->db, stmt_sql[id], -1,
                               SQLITE_PREPARE_PERSISTENT, &st,
                               NULL) != SQLITE_OK) {
            fsm_sql_fail(f, stmt_sql[id]);
            return NULL;
        }
        f->st[id] = st;
        return st;
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return st;
}

int
fsm_exec(struct fsm *f, sqlite3_stmt *st, const char *what)
{
    int rc;

    if (st == NULL)
        return -EIO;
    rc = sqlite3_step(st);
    sqlite3_reset(st);
    if (rc != SQLITE_DONE && rc != SQLITE_ROW)
        return fsm_sql_fail(f, what);
    return 0;
}

void
fsm_col_str(sqlite3_stmt *st, int col, char *buf, size_t len)
{
    const unsigned char *s = sqlite3_column_text(st, col);

    pd_strlcpy(buf, s != NULL ? (const char *)s : "", len);
}

char *
fsm_col_dup(sqlite3_stmt *st, int col)
{
    const unsigned char *s = sqlite3_column_text(st, col);

    return strdup(s != NULL ? (const char *)s : "");
}

static void
finalize_all(struct fsm *f)
{
    for (int i = 0; i < ST_COUNT; i++) {
        sqlite3_finalize(f->st[i]);
        f->st[i] = NULL;
    }
}

/* Runs a statement by id with no bindings (BEGIN, COMMIT...). */
static int
run(struct fsm *f, enum fsm_stmt id)
{
    return fsm_exec(f, fsm_stmt(f, id), stmt_sql[id]);
}

/* ---- Life cycle -------------------------------------------------------- */

static int fsm_raft_apply(struct raft_fsm *rfsm,
                          const struct raft_buffer *buf, void **result);
static int fsm_raft_snapshot(struct raft_fsm *rfsm,
                             struct raft_buffer *bufs[], unsigned *n_bufs);
static int fsm_raft_restore(struct raft_fsm *rfsm, struct raft_buffer *buf);

/*
 * An empty in-memory connection. Defensive mode and an untrusted schema
 * mean a database that came from elsewhere (a snapshot) cannot rewrite
 * its own schema or run functions from it; fsm_restore_bytes also
 * compares the schema with ours.
 */
static int
db_open(sqlite3 **out)
{
    sqlite3 *db = NULL;

    if (sqlite3_open_v2(":memory:", &db,
                        SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE |
                            SQLITE_OPEN_NOMUTEX,
                        NULL) != SQLITE_OK) {
        sqlite3_close(db);
        return -ENOMEM;
    }
    sqlite3_db_config(db, SQLITE_DBCONFIG_DEFENSIVE, 1, NULL);
    sqlite3_db_config(db, SQLITE_DBCONFIG_TRUSTED_SCHEMA, 0, NULL);
    *out = db;
    return 0;
}

static int
open_db(struct fsm *f)
{
    char *msg = NULL;

    if (db_open(&f->db) != 0) {
        snprintf(f->err, sizeof(f->err), "sqlite: cannot open a database");
        return -ENOMEM;
    }
    if (sqlite3_exec(f->db, schema_sql, NULL, NULL, &msg) != SQLITE_OK) {
        snprintf(f->err, sizeof(f->err), "schema: %s",
                 msg != NULL ? msg : "?");
        sqlite3_free(msg);
        return -EIO;
    }
    return 0;
}

int
fsm_new(struct fsm **out, char *err, size_t errlen)
{
    struct fsm *f = calloc(1, sizeof(*f));
    int rv;

    if (f == NULL) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    rv = open_db(f);
    if (rv != 0) {
        snprintf(err, errlen, "%s", f->err);
        fsm_free(f);
        return rv;
    }
    f->rfsm.version = 1;
    f->rfsm.data = f;
    f->rfsm.apply = fsm_raft_apply;
    f->rfsm.snapshot = fsm_raft_snapshot;
    f->rfsm.restore = fsm_raft_restore;
    *out = f;
    return 0;
}

void
fsm_free(struct fsm *f)
{
    if (f == NULL)
        return;
    finalize_all(f);
    sqlite3_close(f->db);
    fsm_index_free(f);
    free(f);
}

struct raft_fsm *
fsm_raft(struct fsm *f)
{
    return &f->rfsm;
}

const char *
fsm_errmsg(const struct fsm *f)
{
    return f->err;
}

uint64_t
fsm_applied(const struct fsm *f)
{
    return f->applied;
}

/* ---- Results and dedup ------------------------------------------------- */

static void PD_PRINTF(3, 4)
fail(struct fsm_result *res, int code, const char *fmt, ...)
{
    va_list ap;

    res->code = code;
    va_start(ap, fmt);
    vsnprintf(res->message, sizeof(res->message), fmt, ap);
    va_end(ap);
}

static int
applied_get(struct fsm *f, const struct fsm_rid *rid, struct fsm_result *out)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_APPLIED_GET);
    int rc;

    if (st == NULL)
        return -EIO;
    sqlite3_bind_blob(st, 1, rid->b, FSM_RID_LEN, SQLITE_STATIC);
    rc = sqlite3_step(st);
    if (rc == SQLITE_DONE) {
        sqlite3_reset(st);
        return -ENOENT;
    }
    if (rc != SQLITE_ROW) {
        sqlite3_reset(st);
        return fsm_sql_fail(f, "applied lookup");
    }
    memset(out, 0, sizeof(*out));
    out->code = sqlite3_column_int(st, 0);
    fsm_col_str(st, 1, out->message, sizeof(out->message));
    fsm_col_str(st, 2, out->node, sizeof(out->node));
    out->generation = (uint64_t)sqlite3_column_int64(st, 3);
    out->count = (uint64_t)sqlite3_column_int64(st, 4);
    out->existing = sqlite3_column_int(st, 5) != 0;
    sqlite3_reset(st);
    return 0;
}

static int
applied_put(struct fsm *f, const struct fsm_cmd *c,
            const struct fsm_result *res)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_APPLIED_PUT);
    int rv;

    if (st == NULL)
        return -EIO;
    sqlite3_bind_blob(st, 1, c->rid.b, FSM_RID_LEN, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)c->now_ms);
    sqlite3_bind_int(st, 3, res->code);
    sqlite3_bind_text(st, 4, res->message, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, res->node, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 6, (sqlite3_int64)res->generation);
    sqlite3_bind_int64(st, 7, (sqlite3_int64)res->count);
    sqlite3_bind_int(st, 8, res->existing);
    rv = fsm_exec(f, st, "applied insert");
    if (rv != 0)
        return rv;

    /* Forget ids older than the keep window, in command time: every
     * member prunes the same rows at the same entry. */
    if (c->now_ms <= FSM_DEDUP_KEEP_MS)
        return 0;
    st = fsm_stmt(f, ST_APPLIED_PRUNE);
    if (st == NULL)
        return -EIO;
    sqlite3_bind_int64(st, 1, (sqlite3_int64)(c->now_ms - FSM_DEDUP_KEEP_MS));
    return fsm_exec(f, st, "applied prune");
}

int
fsm_result_get(struct fsm *f, const struct fsm_rid *rid,
               struct fsm_result *out)
{
    if (f->have_last && memcmp(f->last_rid.b, rid->b, FSM_RID_LEN) == 0) {
        *out = f->last;
        return 0;
    }
    return applied_get(f, rid, out);
}

/* ---- Validation helpers ------------------------------------------------ */

static bool
kv_valid(const struct fsm_kv *kv, size_t n, bool labels,
         struct fsm_result *res, const char *what)
{
    for (size_t i = 0; i < n; i++) {
        const char *k = kv[i].key, *v = kv[i].value;
        bool ok;

        if (labels)
            ok = pd_label_valid(k, FSM_KEY_MAX) &&
                 pd_label_valid(v, FSM_VALUE_MAX);
        else
            ok = k[0] != '\0' && strchr(k, '=') == NULL;
        if (!ok) {
            fail(res, -EINVAL, "invalid %s entry \"%.64s\"", what, k);
            return false;
        }
        for (size_t j = 0; j < i; j++) {
            if (strcmp(kv[j].key, k) == 0) {
                fail(res, -EINVAL, "duplicate %s key \"%.64s\"", what, k);
                return false;
            }
        }
    }
    return true;
}

static bool
id_ok(const char *id, const char *what, struct fsm_result *res)
{
    if (pd_id_valid(id))
        return true;
    fail(res, -EINVAL, "invalid %s id \"%.64s\": use [a-z0-9][a-z0-9-]*, "
         "at most 63 characters", what, id);
    return false;
}

/* See FSM_SIZE_MAX_MB in fsm.h. */
static bool
size_ok(uint32_t cpus, uint64_t memory_mb, uint64_t disk_mb)
{
    return cpus <= FSM_CPUS_MAX && memory_mb <= FSM_SIZE_MAX_MB &&
           disk_mb <= FSM_SIZE_MAX_MB;
}

static bool
counts(int state)
{
    return state >= FSM_SB_PENDING && state <= FSM_SB_STOPPING;
}

/* FNV-1a over the spec in a canonical order (lists sorted by key), so the
 * same spec in another order is the same spec. */
static uint64_t
fnv(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;

    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 1099511628211ull;
    }
    return h;
}

/* Integers are hashed as 8 little-endian bytes, so the digest stored in
 * the replicated state is the same on every architecture. */
static uint64_t
fnv_u64(uint64_t h, uint64_t v)
{
    unsigned char b[8];

    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)(v >> (8 * i));
    return fnv(h, b, sizeof(b));
}

static int
kv_cmp(const void *a, const void *b)
{
    const struct fsm_kv *x = *(const struct fsm_kv *const *)a;
    const struct fsm_kv *y = *(const struct fsm_kv *const *)b;

    return strcmp(x->key, y->key);
}

static uint64_t
kv_digest(uint64_t h, const struct fsm_kv *kv, size_t n)
{
    const struct fsm_kv *sorted[FSM_KV_MAX];

    if (n > FSM_KV_MAX) /* the decoder refuses more; never overrun */
        n = FSM_KV_MAX;
    for (size_t i = 0; i < n; i++)
        sorted[i] = &kv[i];
    qsort(sorted, n, sizeof(sorted[0]), kv_cmp);
    h = fnv_u64(h, n);
    for (size_t i = 0; i < n; i++) {
        h = fnv(h, sorted[i]->key, strlen(sorted[i]->key) + 1);
        h = fnv(h, sorted[i]->value, strlen(sorted[i]->value) + 1);
    }
    return h;
}

static int64_t
spec_digest(const struct fsm_spec *s)
{
    uint64_t h = 14695981039346656037ull;

    h = fnv_u64(h, s->cpus);
    h = fnv_u64(h, s->memory_mb);
    h = fnv_u64(h, s->disk_mb);
    h = fnv(h, s->egress, strlen(s->egress) + 1);
    h = kv_digest(h, s->env, s->n_env);
    h = kv_digest(h, s->labels, s->n_labels);
    return (int64_t)(h >> 1); /* fits sqlite's signed integer */
}

/* ---- Small row helpers used by several commands ------------------------ */

/* The parts of a sandbox row the commands need. */
struct sb_row {
    char tenant[FSM_ID_MAX + 1];
    char node[FSM_ID_MAX + 1];
    uint32_t cpus;
    uint64_t memory_mb, disk_mb;
    int64_t digest;
    int state;
    uint64_t generation;
};

static int
sb_row_get(struct fsm *f, const char *id, struct sb_row *r)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_SB_GET);
    int rc;

    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) {
        sqlite3_reset(st);
        return rc == SQLITE_DONE ? -ENOENT : fsm_sql_fail(f, "sandbox get");
    }
    fsm_col_str(st, 1, r->tenant, sizeof(r->tenant));
    r->cpus = (uint32_t)sqlite3_column_int64(st, 2);
    r->memory_mb = (uint64_t)sqlite3_column_int64(st, 3);
    r->disk_mb = (uint64_t)sqlite3_column_int64(st, 4);
    r->digest = sqlite3_column_int64(st, 6);
    fsm_col_str(st, 7, r->node, sizeof(r->node));
    r->state = sqlite3_column_int(st, 8);
    r->generation = (uint64_t)sqlite3_column_int64(st, 10);
    sqlite3_reset(st);
    return 0;
}

/* Adds sign * (cpus, memory, disk) to a node's allocation. */
static int
node_alloc(struct fsm *f, const char *node, int sign, uint32_t cpus,
           uint64_t memory_mb, uint64_t disk_mb)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_NODE_ALLOC);

    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, node, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, sign * (sqlite3_int64)cpus);
    sqlite3_bind_int64(st, 3, sign * (sqlite3_int64)memory_mb);
    sqlite3_bind_int64(st, 4, sign * (sqlite3_int64)disk_mb);
    pd_strlcpy(f->touched, node, sizeof(f->touched));
    return fsm_exec(f, st, "node allocation");
}

/* Binds ?1 = text and steps: for the many "WHERE id = ?1" updates. Sets
 * *changed to the number of rows changed. */
static int
exec_id(struct fsm *f, enum fsm_stmt id, const char *key, sqlite3_int64 a2,
        sqlite3_int64 a3, int *changed)
{
    sqlite3_stmt *st = fsm_stmt(f, id);
    int rv;

    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    if (sqlite3_bind_parameter_count(st) >= 2)
        sqlite3_bind_int64(st, 2, a2);
    if (sqlite3_bind_parameter_count(st) >= 3)
        sqlite3_bind_int64(st, 3, a3);
    rv = fsm_exec(f, st, stmt_sql[id]);
    if (changed != NULL)
        *changed = sqlite3_changes(f->db);
    return rv;
}

/* True when a "WHERE key = ?1" select returns a row. */
static bool
row_exists(struct fsm *f, enum fsm_stmt id, const char *key)
{
    sqlite3_stmt *st = fsm_stmt(f, id);
    bool found;

    if (st == NULL)
        return false;
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    found = sqlite3_step(st) == SQLITE_ROW;
    sqlite3_reset(st);
    return found;
}

static int
put_kv(struct fsm *f, enum fsm_stmt id, const char *owner,
       const struct fsm_kv *kv, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        sqlite3_stmt *st = fsm_stmt(f, id);
        int rv;

        if (st == NULL)
            return -EIO;
        sqlite3_bind_text(st, 1, owner, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, kv[i].key, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 3, kv[i].value, -1, SQLITE_STATIC);
        rv = fsm_exec(f, st, "key/value insert");
        if (rv != 0)
            return rv;
    }
    return 0;
}

/* ---- Members ----------------------------------------------------------- */

static int
do_member_set(struct fsm *f, const struct fsm_cmd *c, struct fsm_result *res)
{
    const struct fsm_cmd_member *m = &c->u.member;
    sqlite3_stmt *st;

    if (m->id == 0 || m->raft_addr[0] == '\0' || m->api_addr[0] == '\0') {
        fail(res, -EINVAL, "a member needs a non-zero id, a Raft address "
             "and an API address");
        return 0;
    }
    st = fsm_stmt(f, ST_MEMBER_PUT);
    if (st == NULL)
        return -EIO;
    sqlite3_bind_int64(st, 1, (sqlite3_int64)m->id);
    sqlite3_bind_text(st, 2, m->raft_addr, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, m->api_addr, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, m->rpc_addr, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, m->preview_addr, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 6, (sqlite3_int64)c->now_ms);
    return fsm_exec(f, st, "member insert");
}

static int
do_member_remove(struct fsm *f, const struct fsm_cmd *c,
                 struct fsm_result *res)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_MEMBER_DEL);
    int rv;

    if (st == NULL)
        return -EIO;
    sqlite3_bind_int64(st, 1, (sqlite3_int64)c->u.member.id);
    rv = fsm_exec(f, st, "member delete");
    if (rv == 0 && sqlite3_changes(f->db) == 0)
        fail(res, -ENOENT, "no member with id %llu",
             (unsigned long long)c->u.member.id);
    return rv;
}

/* ---- Nodes ------------------------------------------------------------- */

static int
do_node_register(struct fsm *f, const struct fsm_cmd *c,
                 struct fsm_result *res)
{
    const struct fsm_cmd_node_register *n = &c->u.node_register;
    sqlite3_stmt *st;
    int rv;

    if (!id_ok(n->node, "node", res) ||
        !kv_valid(n->labels, n->n_labels, true, res, "label"))
        return 0;
    if (n->rpc_addr[0] == '\0' || n->cpus == 0 || n->memory_mb == 0 ||
        n->disk_mb == 0) {
        fail(res, -EINVAL, "node %s: an RPC address and non-zero CPU, "
             "memory and disk capacity are required", n->node);
        return 0;
    }
    if (!size_ok(n->cpus, n->memory_mb, n->disk_mb)) {
        fail(res, -EINVAL, "node %s: capacity out of range", n->node);
        return 0;
    }
    st = fsm_stmt(f, ST_NODE_UPSERT);
    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, n->node, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, n->rpc_addr, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, n->cpus);
    sqlite3_bind_int64(st, 4, (sqlite3_int64)n->memory_mb);
    sqlite3_bind_int64(st, 5, (sqlite3_int64)n->disk_mb);
    sqlite3_bind_int64(st, 6, (sqlite3_int64)c->now_ms);
    rv = fsm_exec(f, st, "node upsert");
    if (rv == 0)
        rv = exec_id(f, ST_NODE_LABELS_DEL, n->node, 0, 0, NULL);
    if (rv == 0)
        rv = put_kv(f, ST_NODE_LABEL_PUT, n->node, n->labels, n->n_labels);
    pd_strlcpy(f->touched, n->node, sizeof(f->touched));
    f->touched_labels = true;
    return rv;
}

static int
do_node_simple(struct fsm *f, const struct fsm_cmd *c, struct fsm_result *res)
{
    const struct fsm_cmd_node *n = &c->u.node;
    int changed = 0, rv;

    if (!id_ok(n->node, "node", res))
        return 0;
    if (c->type == FSM_CMD_NODE_HEARTBEAT)
        rv = exec_id(f, ST_NODE_HEARTBEAT, n->node,
                     (sqlite3_int64)c->now_ms, 0, &changed);
    else
        rv = exec_id(f, ST_NODE_DRAIN, n->node, n->drain, 0, &changed);
    if (rv == 0 && changed == 0)
        fail(res, -ENOENT, "node %s is not registered", n->node);
    pd_strlcpy(f->touched, n->node, sizeof(f->touched));
    return rv;
}

/* A node stopped answering: commit it down and its sandboxes lost, so they
 * are placed again (on a fresh disk) on their next use. */
static int
do_node_down(struct fsm *f, const struct fsm_cmd *c, struct fsm_result *res)
{
    const struct fsm_cmd_node *n = &c->u.node;
    char reason[FSM_REASON_MAX + 1];
    sqlite3_stmt *st;
    int changed = 0, rv;

    if (!id_ok(n->node, "node", res))
        return 0;
    if (n->reason[0] != '\0')
        pd_strlcpy(reason, n->reason, sizeof(reason));
    else
        snprintf(reason, sizeof(reason), "node %s went down", n->node);

    st = fsm_stmt(f, ST_SB_LOST_ON_NODE);
    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, n->node, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, reason, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, (sqlite3_int64)c->now_ms);
    rv = fsm_exec(f, st, "sandboxes lost");
    if (rv != 0)
        return rv;
    res->count = (uint64_t)sqlite3_changes(f->db);

    /* Every sandbox that counted is lost now, so the allocation is 0. */
    rv = exec_id(f, ST_NODE_DOWN, n->node, (sqlite3_int64)c->now_ms, 0,
                 &changed);
    if (rv == 0 && changed == 0)
        fail(res, -ENOENT, "node %s is not registered", n->node);
    pd_strlcpy(f->touched, n->node, sizeof(f->touched));
    return rv;
}

/* ---- Sandboxes --------------------------------------------------------- */

/*
 * Re-checks the leader's choice against the committed state: the node
 * exists, is ready, is not draining and has room. A stale choice fails
 * here with a reason; nothing is ever over-committed.
 */
static int
check_fit(struct fsm *f, const char *node, uint32_t cpus, uint64_t memory_mb,
          uint64_t disk_mb, struct fsm_result *res)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_NODE_CAP);
    uint64_t cap[3], alloc[3];
    int rc, state, draining;

    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, node, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) {
        sqlite3_reset(st);
        if (rc != SQLITE_DONE)
            return fsm_sql_fail(f, "node capacity");
        fail(res, -ENOENT, "node %s is not registered", node);
        return 0;
    }
    for (int i = 0; i < 3; i++) {
        cap[i] = (uint64_t)sqlite3_column_int64(st, 1 + i);
        alloc[i] = (uint64_t)sqlite3_column_int64(st, 4 + i);
    }
    state = sqlite3_column_int(st, 7);
    draining = sqlite3_column_int(st, 8);
    sqlite3_reset(st);

    /* Free is computed as cap - alloc (never alloc + need, which a huge
     * need in a hostile entry could wrap past the capacity). */
    for (int i = 0; i < 3; i++)
        alloc[i] = alloc[i] < cap[i] ? cap[i] - alloc[i] : 0;
    if (state != FSM_NODE_READY)
        fail(res, -ESTALE, "node %s is down", node);
    else if (draining)
        fail(res, -ESTALE, "node %s is draining", node);
    else if (cpus > alloc[0])
        fail(res, -ENOSPC, "node %s lacks CPU: need %u, free %llu", node,
             cpus, (unsigned long long)alloc[0]);
    else if (memory_mb > alloc[1])
        fail(res, -ENOSPC, "node %s lacks memory: need %llu MB, free %llu MB",
             node, (unsigned long long)memory_mb,
             (unsigned long long)alloc[1]);
    else if (disk_mb > alloc[2])
        fail(res, -ENOSPC, "node %s lacks disk: need %llu MB, free %llu MB",
             node, (unsigned long long)disk_mb,
             (unsigned long long)alloc[2]);
    return 0;
}

static bool
place_valid(const struct fsm_cmd_place *p, struct fsm_result *res)
{
    const struct fsm_spec *s = &p->spec;

    if (!id_ok(p->sandbox, "sandbox", res) ||
        !id_ok(p->tenant, "tenant", res) || !id_ok(p->node, "node", res))
        return false;
    if (p->replace)
        return true; /* the stored spec is used */
    if (s->cpus == 0 || s->memory_mb == 0 || s->disk_mb == 0) {
        fail(res, -EINVAL, "sandbox %s: cpus, memory_mb and disk_mb must be "
             "positive", p->sandbox);
        return false;
    }
    if (!size_ok(s->cpus, s->memory_mb, s->disk_mb)) {
        fail(res, -EINVAL, "sandbox %s: cpus, memory_mb or disk_mb out of "
             "range", p->sandbox);
        return false;
    }
    if (s->egress[0] == '\0') {
        fail(res, -EINVAL, "sandbox %s: egress is empty", p->sandbox);
        return false;
    }
    return kv_valid(s->env, s->n_env, false, res, "env") &&
           kv_valid(s->labels, s->n_labels, true, res, "label");
}

static void
placed(struct fsm_result *res, const char *node, uint64_t generation,
       bool existing)
{
    pd_strlcpy(res->node, node, sizeof(res->node));
    res->generation = generation;
    res->existing = existing;
}

static int
place_new(struct fsm *f, const struct fsm_cmd *c, struct fsm_result *res)
{
    const struct fsm_cmd_place *p = &c->u.place;
    const struct fsm_spec *s = &p->spec;
    sqlite3_stmt *st;
    int rv;

    rv = check_fit(f, p->node, s->cpus, s->memory_mb, s->disk_mb, res);
    if (rv != 0 || res->code != 0)
        return rv;
    st = fsm_stmt(f, ST_SB_INSERT);
    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, p->sandbox, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, p->tenant, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, s->cpus);
    sqlite3_bind_int64(st, 4, (sqlite3_int64)s->memory_mb);
    sqlite3_bind_int64(st, 5, (sqlite3_int64)s->disk_mb);
    sqlite3_bind_text(st, 6, s->egress, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 7, spec_digest(s));
    sqlite3_bind_text(st, 8, p->node, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 9, (sqlite3_int64)c->now_ms);
    rv = fsm_exec(f, st, "sandbox insert");
    if (rv == 0)
        rv = put_kv(f, ST_SB_ENV_PUT, p->sandbox, s->env, s->n_env);
    if (rv == 0)
        rv = put_kv(f, ST_SB_LABEL_PUT, p->sandbox, s->labels, s->n_labels);
    if (rv == 0)
        rv = node_alloc(f, p->node, 1, s->cpus, s->memory_mb, s->disk_mb);
    if (rv == 0)
        placed(res, p->node, 1, false);
    return rv;
}

static int
place_again(struct fsm *f, const struct fsm_cmd *c, const struct sb_row *r,
            struct fsm_result *res)
{
    const struct fsm_cmd_place *p = &c->u.place;
    sqlite3_stmt *st;
    int rv;

    /* Already placed again (a concurrent or retried re-placement). */
    if (counts(r->state)) {
        placed(res, r->node, r->generation, true);
        return 0;
    }
    rv = check_fit(f, p->node, r->cpus, r->memory_mb, r->disk_mb, res);
    if (rv != 0 || res->code != 0)
        return rv;
    st = fsm_stmt(f, ST_SB_REPLACE);
    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, p->sandbox, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, p->node, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, (sqlite3_int64)c->now_ms);
    rv = fsm_exec(f, st, "sandbox re-place");
    if (rv == 0)
        rv = node_alloc(f, p->node, 1, r->cpus, r->memory_mb, r->disk_mb);
    if (rv == 0)
        placed(res, p->node, r->generation + 1, false);
    return rv;
}

static int
do_place(struct fsm *f, const struct fsm_cmd *c, struct fsm_result *res)
{
    const struct fsm_cmd_place *p = &c->u.place;
    struct sb_row r;
    int rv;

    if (!place_valid(p, res))
        return 0;
    rv = sb_row_get(f, p->sandbox, &r);
    if (rv == -ENOENT) {
        if (p->replace) {
            fail(res, -ENOENT, "sandbox %s does not exist", p->sandbox);
            return 0;
        }
        return place_new(f, c, res);
    }
    if (rv != 0)
        return rv;
    if (strcmp(r.tenant, p->tenant) != 0) {
        fail(res, -EEXIST, "sandbox id %s is taken", p->sandbox);
        return 0;
    }
    if (p->replace)
        return place_again(f, c, &r, res);
    if (r.digest != spec_digest(&p->spec)) {
        fail(res, -EEXIST, "sandbox %s exists with another spec",
             p->sandbox);
        return 0;
    }
    placed(res, r.node, r.generation, true);
    return 0;
}

/* Which reported transitions are legal. Nothing returns to pending (only a
 * re-placement does that) and lost comes from counting states only. */
static bool
transition_ok(int from, int to)
{
    switch (from) {
    case FSM_SB_PENDING:
    case FSM_SB_STARTING:
        return to != FSM_SB_PENDING;
    case FSM_SB_RUNNING:
        return to > FSM_SB_RUNNING;
    case FSM_SB_STOPPING:
        return to == FSM_SB_STOPPED || to == FSM_SB_FAILED ||
               to == FSM_SB_LOST;
    case FSM_SB_LOST:
    case FSM_SB_FAILED:
        return to == FSM_SB_STOPPED;
    default:
        return false;
    }
}

static int
do_state(struct fsm *f, const struct fsm_cmd *c, struct fsm_result *res)
{
    const struct fsm_cmd_state *s = &c->u.state;
    sqlite3_stmt *st;
    struct sb_row r;
    int rv;

    if (!id_ok(s->sandbox, "sandbox", res))
        return 0;
    rv = sb_row_get(f, s->sandbox, &r);
    if (rv == -ENOENT) {
        fail(res, -ENOENT, "sandbox %s does not exist", s->sandbox);
        return 0;
    }
    if (rv != 0)
        return rv;
    placed(res, r.node, r.generation, false);
    if ((s->node[0] != '\0' && strcmp(s->node, r.node) != 0) ||
        (s->generation != 0 && s->generation != r.generation)) {
        fail(res, -ESTALE, "sandbox %s: report from %s generation %llu, "
             "but it is generation %llu on %s", s->sandbox,
             s->node[0] != '\0' ? s->node : "?",
             (unsigned long long)s->generation,
             (unsigned long long)r.generation, r.node);
        return 0;
    }
    if (s->state == r.state)
        return 0;
    if (!transition_ok(r.state, s->state)) {
        fail(res, r.state == FSM_SB_LOST ? -ESTALE : -EINVAL,
             "sandbox %s cannot go from %s to %s", s->sandbox,
             fsm_sandbox_state_name(r.state),
             fsm_sandbox_state_name(s->state));
        return 0;
    }
    st = fsm_stmt(f, ST_SB_STATE);
    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, s->sandbox, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 2, s->state);
    sqlite3_bind_text(st, 3, s->reason, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 4, (sqlite3_int64)c->now_ms);
    rv = fsm_exec(f, st, "sandbox state");
    if (rv == 0 && counts(r.state) && !counts(s->state))
        rv = node_alloc(f, r.node, -1, r.cpus, r.memory_mb, r.disk_mb);
    return rv;
}

static int
do_delete(struct fsm *f, const struct fsm_cmd *c, struct fsm_result *res)
{
    const char *id = c->u.sandbox.sandbox;
    struct sb_row r;
    int rv;

    if (!id_ok(id, "sandbox", res))
        return 0;
    rv = sb_row_get(f, id, &r);
    if (rv == -ENOENT) {
        fail(res, -ENOENT, "sandbox %s does not exist", id);
        return 0;
    }
    if (rv != 0)
        return rv;
    placed(res, r.node, r.generation, false);
    rv = exec_id(f, ST_SB_DEL, id, 0, 0, NULL);
    if (rv == 0)
        rv = exec_id(f, ST_SB_ENV_DEL, id, 0, 0, NULL);
    if (rv == 0)
        rv = exec_id(f, ST_SB_LABELS_DEL, id, 0, 0, NULL);
    if (rv == 0)
        rv = exec_id(f, ST_SB_PORTS_DEL, id, 0, 0, NULL);
    if (rv == 0 && counts(r.state))
        rv = node_alloc(f, r.node, -1, r.cpus, r.memory_mb, r.disk_mb);
    return rv;
}

/* ---- Ports ------------------------------------------------------------- */

static int
do_port(struct fsm *f, const struct fsm_cmd *c, struct fsm_result *res)
{
    const struct fsm_cmd_port *p = &c->u.port;
    sqlite3_stmt *st;
    struct sb_row r;
    int rc, rv;

    if (!id_ok(p->sandbox, "sandbox", res))
        return 0;
    if (p->port < 1 || p->port > 65535) {
        fail(res, -EINVAL, "port %u is not in 1-65535", p->port);
        return 0;
    }
    if (c->type == FSM_CMD_PORT_UNEXPOSE) {
        st = fsm_stmt(f, ST_PORT_DEL);
        if (st == NULL)
            return -EIO;
        sqlite3_bind_text(st, 1, p->sandbox, -1, SQLITE_STATIC);
        sqlite3_bind_int(st, 2, (int)p->port);
        rv = fsm_exec(f, st, "port delete");
        if (rv == 0 && sqlite3_changes(f->db) == 0)
            fail(res, -ENOENT, "port %u of sandbox %s is not exposed",
                 p->port, p->sandbox);
        return rv;
    }

    rv = sb_row_get(f, p->sandbox, &r);
    if (rv == -ENOENT) {
        fail(res, -ENOENT, "sandbox %s does not exist", p->sandbox);
        return 0;
    }
    if (rv != 0)
        return rv;
    if (r.state == FSM_SB_STOPPING || r.state == FSM_SB_STOPPED) {
        fail(res, -EINVAL, "sandbox %s is %s", p->sandbox,
             fsm_sandbox_state_name(r.state));
        return 0;
    }
    st = fsm_stmt(f, ST_PORT_PUT);
    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, p->sandbox, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 2, (int)p->port);
    sqlite3_bind_blob(st, 3, p->token_hash, FSM_TOKEN_HASH_LEN,
                      SQLITE_STATIC);
    sqlite3_bind_int64(st, 4, (sqlite3_int64)c->now_ms);
    rc = sqlite3_step(st);
    sqlite3_reset(st);
    if (rc == SQLITE_CONSTRAINT) {
        fail(res, -EEXIST, "port %u of sandbox %s is already exposed",
             p->port, p->sandbox);
        return 0;
    }
    return rc == SQLITE_DONE ? 0 : fsm_sql_fail(f, "port insert");
}

/* ---- Tokens and keys --------------------------------------------------- */

static bool
token_valid(const struct fsm_cmd_token *t, struct fsm_result *res)
{
    if (!pd_label_valid(t->jti, FSM_JTI_MAX)) {
        fail(res, -EINVAL, "invalid token id \"%.64s\"", t->jti);
        return false;
    }
    if (!id_ok(t->tenant, "tenant", res))
        return false;
    if (strcmp(t->role, "admin") != 0 && strcmp(t->role, "tenant") != 0 &&
        strcmp(t->role, "node") != 0) {
        fail(res, -EINVAL, "invalid role \"%.16s\": use admin, tenant or "
             "node", t->role);
        return false;
    }
    return true;
}

static int
token_insert(struct fsm *f, const struct fsm_cmd *c, const char *role,
             struct fsm_result *res)
{
    const struct fsm_cmd_token *t = &c->u.token;
    sqlite3_stmt *st = fsm_stmt(f, ST_TOKEN_PUT);
    int rc;

    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, t->jti, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, t->tenant, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, role, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 4, (sqlite3_int64)t->exp_ms);
    sqlite3_bind_int64(st, 5, (sqlite3_int64)c->now_ms);
    rc = sqlite3_step(st);
    sqlite3_reset(st);
    if (rc == SQLITE_CONSTRAINT) {
        fail(res, -EEXIST, "token %s already exists", t->jti);
        return 0;
    }
    return rc == SQLITE_DONE ? 0 : fsm_sql_fail(f, "token insert");
}

static int
meta_get(struct fsm *f, const char *key, char *out, size_t outlen)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_META_GET);
    int rc;

    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        fsm_col_str(st, 0, out, outlen);
    sqlite3_reset(st);
    if (rc == SQLITE_ROW)
        return 0;
    return rc == SQLITE_DONE ? -ENOENT : fsm_sql_fail(f, "meta get");
}

static int
do_token(struct fsm *f, const struct fsm_cmd *c, struct fsm_result *res)
{
    const struct fsm_cmd_token *t = &c->u.token;
    sqlite3_stmt *st;
    char jti[FSM_JTI_MAX + 1];
    int changed = 0, rv;

    switch (c->type) {
    case FSM_CMD_TOKEN_CREATE:
        if (!token_valid(t, res))
            return 0;
        return token_insert(f, c, t->role, res);
    case FSM_CMD_TOKEN_REVOKE:
        rv = exec_id(f, ST_TOKEN_REVOKE, t->jti, (sqlite3_int64)c->now_ms, 0,
                     &changed);
        if (rv == 0 && changed == 0 && !row_exists(f, ST_TOKEN_GET, t->jti))
            fail(res, -ENOENT, "no token with id %.64s", t->jti);
        return rv;
    case FSM_CMD_TOKEN_GC:
        st = fsm_stmt(f, ST_TOKEN_GC);
        if (st == NULL)
            return -EIO;
        sqlite3_bind_int64(st, 1, (sqlite3_int64)c->now_ms);
        rv = fsm_exec(f, st, "token gc");
        res->count = (uint64_t)sqlite3_changes(f->db);
        return rv;
    default: /* FSM_CMD_BOOTSTRAP_ADMIN */
        if (!token_valid(t, res))
            return 0;
        rv = meta_get(f, "admin_jti", jti, sizeof(jti));
        if (rv == 0) {
            fail(res, -EEXIST, "the cluster already has its bootstrap "
                 "admin token");
            return 0;
        }
        if (rv != -ENOENT)
            return rv;
        rv = token_insert(f, c, "admin", res);
        if (rv != 0 || res->code != 0)
            return rv;
        st = fsm_stmt(f, ST_META_PUT);
        if (st == NULL)
            return -EIO;
        sqlite3_bind_text(st, 1, "admin_jti", -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, t->jti, -1, SQLITE_STATIC);
        return fsm_exec(f, st, "meta put");
    }
}

static int
do_key(struct fsm *f, const struct fsm_cmd *c, struct fsm_result *res)
{
    const struct fsm_cmd_key *k = &c->u.key;
    sqlite3_stmt *st;
    int changed = 0, rc, rv;

    if (!pd_label_valid(k->kid, FSM_KID_MAX)) {
        fail(res, -EINVAL, "invalid key id \"%.64s\"", k->kid);
        return 0;
    }
    if (c->type == FSM_CMD_KEY_RETIRE) {
        rv = exec_id(f, ST_KEY_RETIRE, k->kid, (sqlite3_int64)c->now_ms, 0,
                     &changed);
        if (rv == 0 && changed == 0 && !row_exists(f, ST_KEY_GET, k->kid))
            fail(res, -ENOENT, "no signing key %s", k->kid);
        return rv;
    }
    if (k->alg[0] == '\0' || k->public_pem[0] == '\0' ||
        k->private_pem[0] == '\0') {
        fail(res, -EINVAL, "key %s: algorithm and both PEMs are required",
             k->kid);
        return 0;
    }
    st = fsm_stmt(f, ST_KEY_PUT);
    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, k->kid, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, k->alg, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, k->public_pem, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, k->private_pem, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 5, (sqlite3_int64)c->now_ms);
    rc = sqlite3_step(st);
    sqlite3_reset(st);
    if (rc == SQLITE_CONSTRAINT) {
        fail(res, -EEXIST, "signing key %s already exists", k->kid);
        return 0;
    }
    return rc == SQLITE_DONE ? 0 : fsm_sql_fail(f, "key insert");
}

/* ---- Apply ------------------------------------------------------------- */

static int
dispatch(struct fsm *f, const struct fsm_cmd *c, struct fsm_result *res)
{
    switch (c->type) {
    case FSM_CMD_MEMBER_SET:
        return do_member_set(f, c, res);
    case FSM_CMD_MEMBER_REMOVE:
        return do_member_remove(f, c, res);
    case FSM_CMD_NODE_REGISTER:
        return do_node_register(f, c, res);
    case FSM_CMD_NODE_HEARTBEAT:
    case FSM_CMD_NODE_DRAIN:
        return do_node_simple(f, c, res);
    case FSM_CMD_NODE_DOWN:
        return do_node_down(f, c, res);
    case FSM_CMD_SANDBOX_PLACE:
        return do_place(f, c, res);
    case FSM_CMD_SANDBOX_STATE:
        return do_state(f, c, res);
    case FSM_CMD_SANDBOX_DELETE:
        return do_delete(f, c, res);
    case FSM_CMD_PORT_EXPOSE:
    case FSM_CMD_PORT_UNEXPOSE:
        return do_port(f, c, res);
    case FSM_CMD_TOKEN_CREATE:
    case FSM_CMD_TOKEN_REVOKE:
    case FSM_CMD_TOKEN_GC:
    case FSM_CMD_BOOTSTRAP_ADMIN:
        return do_token(f, c, res);
    case FSM_CMD_KEY_ADD:
    case FSM_CMD_KEY_RETIRE:
        return do_key(f, c, res);
    default:
        fail(res, -EINVAL, "unknown command type %d", c->type);
        return 0;
    }
}

/*
 * One command in one transaction: the command's own changes sit in a
 * savepoint that is rolled back when the command fails, and its result is
 * recorded under its request id either way.
 */
static int
apply_decoded(struct fsm *f, const struct fsm_cmd *c, struct fsm_result *res)
{
    int rv;

    rv = applied_get(f, &c->rid, res);
    if (rv == 0) {
        res->duplicate = true;
        return 0;
    }
    if (rv != -ENOENT)
        return rv;

    f->touched[0] = '\0';
    f->touched_labels = false;
    rv = run(f, ST_BEGIN);
    if (rv != 0)
        return rv;
    rv = run(f, ST_SAVEPOINT);
    if (rv == 0)
        rv = dispatch(f, c, res);
    if (rv == 0 && res->code != 0) {
        rv = run(f, ST_ROLLBACK_TO);
        f->touched[0] = '\0';
    }
    if (rv == 0)
        rv = run(f, ST_RELEASE);
    if (rv == 0)
        rv = applied_put(f, c, res);
    if (rv == 0)
        rv = run(f, ST_COMMIT);
    if (rv != 0) {
        run(f, ST_ROLLBACK);
        fsm_index_rebuild(f);
        return rv;
    }
    if (f->touched[0] != '\0')
        rv = fsm_index_refresh(f, f->touched, f->touched_labels);
    return rv;
}

int
fsm_apply_buf(struct fsm *f, const void *buf, size_t len,
              struct fsm_result *out)
{
    struct fsm_result res = {0};
    struct fsm_cmd c;
    char err[200];
    int rv;

    rv = fsm_cmd_decode(buf, len, &c, err, sizeof(err));
    if (rv != 0) {
        /* Every member rejects the same bytes the same way: nothing
         * changes and the log moves on. */
        fail(&res, -EINVAL, "malformed command: %s", err);
        memset(&f->last_rid, 0, sizeof(f->last_rid));
        rv = 0;
    } else {
        rv = apply_decoded(f, &c, &res);
        f->last_rid = c.rid;
        fsm_cmd_free(&c);
    }
    f->last = res;
    f->have_last = rv == 0;
    f->applied++;
    if (out != NULL)
        *out = res;
    return rv;
}

int
fsm_apply_cmd(struct fsm *f, const struct fsm_cmd *cmd,
              struct fsm_result *res)
{
    void *buf;
    size_t len;
    int rv;

    rv = fsm_cmd_encode(cmd, &buf, &len);
    if (rv != 0)
        return rv;
    rv = fsm_apply_buf(f, buf, len, res);
    free(buf);
    return rv;
}

/* ---- Snapshots --------------------------------------------------------- */

#define SNAP_HDR 16 /* magic, then the database length, big-endian */

/* The snapshot in memory from alloc (malloc for callers, raft_malloc
 * for raft, which frees it itself): one copy of the database, not two. */
static int
snapshot_alloc(struct fsm *f, void *(*alloc)(size_t), void **out,
               size_t *out_len)
{
    sqlite3_int64 size = 0;
    unsigned char *db, *p;

    db = sqlite3_serialize(f->db, "main", &size, 0);
    if (db == NULL)
        return fsm_sql_fail(f, "serialize");
    p = alloc(SNAP_HDR + (size_t)size);
    if (p == NULL) {
        sqlite3_free(db);
        return -ENOMEM;
    }
    memcpy(p, FSM_SNAPSHOT_MAGIC, 8);
    for (int i = 0; i < 8; i++)
        p[8 + i] = (unsigned char)((uint64_t)size >> (56 - 8 * i));
    memcpy(p + SNAP_HDR, db, (size_t)size);
    sqlite3_free(db);
    *out = p;
    *out_len = SNAP_HDR + (size_t)size;
    return 0;
}

int
fsm_snapshot_bytes(struct fsm *f, void **out, size_t *out_len)
{
    return snapshot_alloc(f, malloc, out, out_len);
}

/* Every schema object (tables, indexes, and any trigger or view) as
 * text, in a fixed order; malloc'd, NULL when it cannot be read. */
static char *
schema_text(sqlite3 *db)
{
    sqlite3_stmt *st = NULL;
    char *buf = NULL;
    size_t len = 0;
    FILE *fp;
    int rc = SQLITE_ERROR;

    fp = open_memstream(&buf, &len);
    if (fp == NULL)
        return NULL;
    if (sqlite3_prepare_v2(db, "SELECT type, name, tbl_name, sql FROM"
                           " sqlite_master ORDER BY type, name", -1, &st,
                           NULL) == SQLITE_OK) {
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
            for (int c = 0; c < 4; c++) {
                const unsigned char *v = sqlite3_column_text(st, c);

                fprintf(fp, "%s|", v != NULL ? (const char *)v : "");
            }
            fputc('\n', fp);
        }
    }
    sqlite3_finalize(st);
    if (fclose(fp) != 0 || rc != SQLITE_DONE) {
        free(buf);
        return NULL;
    }
    return buf;
}

/* True when db has exactly the schema fsm_new creates. */
static bool
schema_is_ours(sqlite3 *db)
{
    sqlite3 *ref = NULL;
    char *mine = NULL, *theirs = schema_text(db);
    bool same = false;

    if (theirs != NULL && db_open(&ref) == 0 &&
        sqlite3_exec(ref, schema_sql, NULL, NULL, NULL) == SQLITE_OK &&
        (mine = schema_text(ref)) != NULL)
        same = strcmp(mine, theirs) == 0;
    sqlite3_close(ref);
    free(mine);
    free(theirs);
    return same;
}

/* True when db looks like a database this FSM wrote: sqlite accepts it
 * as a whole, and its schema and schema version are ours. A snapshot
 * comes from the leader over the Raft transport; anything else in it (a
 * trigger that would run on our writes, a view in a table's place) is
 * refused. */
static bool
snapshot_db_ok(sqlite3 *db, char *err, size_t errlen)
{
    sqlite3_stmt *st = NULL;
    const unsigned char *v;
    bool ok = false;

    if (sqlite3_prepare_v2(db, "PRAGMA quick_check", -1, &st, NULL) !=
            SQLITE_OK ||
        sqlite3_step(st) != SQLITE_ROW ||
        (v = sqlite3_column_text(st, 0)) == NULL ||
        strcmp((const char *)v, "ok") != 0) {
        snprintf(err, errlen, "snapshot database is corrupt: %s",
                 sqlite3_errmsg(db));
        sqlite3_finalize(st);
        return false;
    }
    sqlite3_finalize(st);
    if (!schema_is_ours(db)) {
        snprintf(err, errlen, "snapshot database has another schema");
        return false;
    }
    if (sqlite3_prepare_v2(db, "SELECT value FROM meta WHERE key = "
                           "'schema'", -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW &&
        (v = sqlite3_column_text(st, 0)) != NULL &&
        strcmp((const char *)v, "1") == 0)
        ok = true;
    else
        snprintf(err, errlen, "snapshot database has no schema version 1");
    sqlite3_finalize(st);
    return ok;
}

/*
 * The snapshot is loaded into a new connection and checked there; only a
 * good one replaces the current database, so a bad snapshot leaves the
 * state as it was instead of half-replaced.
 */
int
fsm_restore_bytes(struct fsm *f, const void *buf, size_t len)
{
    const unsigned char *p = buf;
    unsigned char *copy;
    sqlite3 *db = NULL;
    uint64_t size = 0;
    int rc;

    if (len < SNAP_HDR || memcmp(p, FSM_SNAPSHOT_MAGIC, 8) != 0) {
        snprintf(f->err, sizeof(f->err), "not a Paddock FSM snapshot");
        return -EINVAL;
    }
    for (int i = 0; i < 8; i++)
        size = size << 8 | p[8 + i];
    if (size != len - SNAP_HDR || size == 0) {
        snprintf(f->err, sizeof(f->err), "snapshot length %llu does not "
                 "match its %zu bytes", (unsigned long long)size, len);
        return -EINVAL;
    }
    if (db_open(&db) != 0) {
        snprintf(f->err, sizeof(f->err), "sqlite: cannot open a database");
        return -ENOMEM;
    }
    copy = sqlite3_malloc64(size);
    if (copy == NULL) {
        sqlite3_close(db);
        return -ENOMEM;
    }
    memcpy(copy, p + SNAP_HDR, size);
    /* With FREEONCLOSE, sqlite frees copy even when this fails. */
    rc = sqlite3_deserialize(db, "main", copy, (sqlite3_int64)size,
                             (sqlite3_int64)size,
                             SQLITE_DESERIALIZE_FREEONCLOSE |
                                 SQLITE_DESERIALIZE_RESIZEABLE);
    if (rc != SQLITE_OK) {
        snprintf(f->err, sizeof(f->err), "deserialize: %s",
                 sqlite3_errmsg(db));
        sqlite3_close(db);
        return -EINVAL;
    }
    if (!snapshot_db_ok(db, f->err, sizeof(f->err))) {
        sqlite3_close(db);
        return -EINVAL;
    }

    /* Statements belong to the old connection: drop them with it. */
    finalize_all(f);
    sqlite3_close(f->db);
    f->db = db;
    f->have_last = false;
    f->applied = 0;
    return fsm_index_rebuild(f);
}

static int
apply_part(void *arg, const void *part, size_t len)
{
    return fsm_apply_buf(arg, part, len, NULL);
}

/*
 * A batch's parts one by one, each in its own transaction with its own
 * result (cmd.h): a part that fails leaves the others applied, and a
 * duplicate part is answered from the applied table as it would be alone.
 * A malformed container changes nothing, the same way on every member.
 */
int
fsm_apply_entry(struct fsm *f, const void *buf, size_t len)
{
    char err[200];
    int rv;

    if (!fsm_batch_is(buf, len))
        return fsm_apply_buf(f, buf, len, NULL);
    rv = fsm_batch_each(buf, len, apply_part, f, err, sizeof(err));
    if (rv == -EPROTO) {
        memset(&f->last_rid, 0, sizeof(f->last_rid));
        f->have_last = false;
        f->applied++;
        return 0;
    }
    return rv;
}

static int
fsm_raft_apply(struct raft_fsm *rfsm, const struct raft_buffer *buf,
               void **result)
{
    struct fsm *f = rfsm->data;

    /* Results travel by request id (fsm_result_get), never by pointer. */
    *result = NULL;
    return fsm_apply_entry(f, buf->base, buf->len) == 0 ? 0 : RAFT_IOERR;
}

/* Version 1 FSM: raft frees the buffers with raft_free after the
 * snapshot is written, so they come from raft_malloc. */
static int
fsm_raft_snapshot(struct raft_fsm *rfsm, struct raft_buffer *bufs[],
                  unsigned *n_bufs)
{
    struct fsm *f = rfsm->data;
    struct raft_buffer *b = raft_malloc(sizeof(*b));
    int rv;

    if (b == NULL)
        return RAFT_NOMEM;
    rv = snapshot_alloc(f, raft_malloc, &b->base, &b->len);
    if (rv != 0) {
        raft_free(b);
        return rv == -ENOMEM ? RAFT_NOMEM : RAFT_IOERR;
    }
    *bufs = b;
    *n_bufs = 1;
    return 0;
}

/* On success the FSM owns buf->base and must raft_free it. */
static int
fsm_raft_restore(struct raft_fsm *rfsm, struct raft_buffer *buf)
{
    struct fsm *f = rfsm->data;

    if (fsm_restore_bytes(f, buf->base, buf->len) != 0)
        return RAFT_CORRUPT;
    raft_free(buf->base);
    return 0;
}

/* ---- Dump -------------------------------------------------------------- */

static const char *const dump_sql[] = {
    "SELECT * FROM meta ORDER BY key",
    "SELECT * FROM members ORDER BY id",
    "SELECT * FROM nodes ORDER BY id",
    "SELECT * FROM node_labels ORDER BY node, key",
    "SELECT * FROM sandboxes ORDER BY id",
    "SELECT * FROM sandbox_env ORDER BY sandbox, key",
    "SELECT * FROM sandbox_labels ORDER BY sandbox, key",
    "SELECT sandbox, port, hex(token_hash), created_ms FROM ports"
    " ORDER BY sandbox, port",
    "SELECT * FROM tokens ORDER BY jti",
    "SELECT * FROM signing_keys ORDER BY kid",
    "SELECT hex(rid), at_ms, code, message, node, generation, count,"
    " existing FROM applied ORDER BY rid",
};

int
fsm_dump(struct fsm *f, char **out)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *fp = open_memstream(&buf, &len);
    int rv = 0;

    if (fp == NULL)
        return -ENOMEM;
    for (size_t i = 0; i < PD_ARRAY_SIZE(dump_sql) && rv == 0; i++) {
        sqlite3_stmt *st;

        if (sqlite3_prepare_v2(f->db, dump_sql[i], -1, &st, NULL) !=
            SQLITE_OK) {
            rv = fsm_sql_fail(f, dump_sql[i]);
            break;
        }
        fprintf(fp, "# %s\n", dump_sql[i]);
        while (sqlite3_step(st) == SQLITE_ROW) {
            for (int c = 0; c < sqlite3_column_count(st); c++) {
                const unsigned char *s = sqlite3_column_text(st, c);

                fprintf(fp, "%s%s", c > 0 ? "|" : "",
                        s != NULL ? (const char *)s : "NULL");
            }
            fputc('\n', fp);
        }
        sqlite3_finalize(st);
    }
    if (fclose(fp) != 0 && rv == 0)
        rv = -ENOMEM;
    if (rv != 0) {
        free(buf);
        return rv;
    }
    *out = buf;
    return 0;
}
