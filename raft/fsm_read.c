/*
 * The read API of the FSM: what the scheduler's HTTP handlers, placement,
 * token checks and routing query. Reads see the local state, which on a
 * follower may trail the leader by the entries not yet applied here.
 */
#include "raft/fsm_int.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

/* ---- Generic helpers --------------------------------------------------- */

int
fsm_kv_load(struct fsm *f, enum fsm_stmt id, const char *owner,
            struct fsm_kv **out, size_t *n)
{
    sqlite3_stmt *st = fsm_stmt(f, id);
    struct fsm_kv *v = NULL, *nv;
    size_t len = 0, cap = 0;
    int rc;

    *out = NULL;
    *n = 0;
    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, owner, -1, SQLITE_TRANSIENT);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (len == cap) {
            cap = cap != 0 ? cap * 2 : 8;
            nv = realloc(v, cap * sizeof(*v));
            if (nv == NULL)
                goto nomem;
            v = nv;
        }
        v[len].key = fsm_col_dup(st, 0);
        v[len].value = fsm_col_dup(st, 1);
        len++;
        if (v[len - 1].key == NULL || v[len - 1].value == NULL)
            goto nomem;
    }
    sqlite3_reset(st);
    if (rc != SQLITE_DONE) {
        fsm_kv_free(v, len);
        return fsm_sql_fail(f, "key/value list");
    }
    *out = v;
    *n = len;
    return 0;
nomem:
    sqlite3_reset(st);
    fsm_kv_free(v, len);
    return -ENOMEM;
}

/*
 * Collects rows into a growing array of elem_size bytes: fill is called for
 * each row with a zeroed element. Returns 0 or a negative errno.
 */
typedef int (*row_fill)(struct fsm *f, sqlite3_stmt *st, void *elem);

static int
collect(struct fsm *f, sqlite3_stmt *st, size_t elem_size, size_t limit,
        row_fill fill, void **out, size_t *n)
{
    char *v = NULL, *nv;
    size_t len = 0, cap = 0;
    int rc, rv = 0;

    while ((limit == 0 || len < limit) &&
           (rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (len == cap) {
            cap = cap != 0 ? cap * 2 : 16;
            nv = realloc(v, cap * elem_size);
            if (nv == NULL) {
                rv = -ENOMEM;
                break;
            }
            v = nv;
        }
        memset(v + len * elem_size, 0, elem_size);
        rv = fill(f, st, v + len * elem_size);
        len++;
        if (rv != 0)
            break;
    }
    if (rv == 0 && limit != 0 && len == limit)
        rc = SQLITE_DONE;
    sqlite3_reset(st);
    if (rv == 0 && rc != SQLITE_DONE)
        rv = fsm_sql_fail(f, "list");
    *out = v;
    *n = len;
    return rv;
}

/* Steps a single-row select; 0, -ENOENT or -EIO. */
static int
one_row(struct fsm *f, sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);

    if (rc == SQLITE_ROW)
        return 0;
    sqlite3_reset(st);
    return rc == SQLITE_DONE ? -ENOENT : fsm_sql_fail(f, "get");
}

/* ---- Nodes ------------------------------------------------------------- */

const char *
fsm_node_state_name(const struct fsm_node *n)
{
    if (n->state == FSM_NODE_DOWN)
        return "down";
    return n->draining ? "draining" : "ready";
}

static int
fill_node(struct fsm *f, sqlite3_stmt *st, void *elem)
{
    struct fsm_node *n = elem;

    fsm_col_str(st, 0, n->id, sizeof(n->id));
    fsm_col_str(st, 1, n->rpc_addr, sizeof(n->rpc_addr));
    n->cpus = (uint32_t)sqlite3_column_int64(st, 2);
    n->memory_mb = (uint64_t)sqlite3_column_int64(st, 3);
    n->disk_mb = (uint64_t)sqlite3_column_int64(st, 4);
    n->alloc_cpus = (uint32_t)sqlite3_column_int64(st, 5);
    n->alloc_memory_mb = (uint64_t)sqlite3_column_int64(st, 6);
    n->alloc_disk_mb = (uint64_t)sqlite3_column_int64(st, 7);
    n->state = sqlite3_column_int(st, 8);
    n->draining = sqlite3_column_int(st, 9) != 0;
    n->registered_ms = (uint64_t)sqlite3_column_int64(st, 10);
    n->last_seen_ms = (uint64_t)sqlite3_column_int64(st, 11);
    n->down_ms = (uint64_t)sqlite3_column_int64(st, 12);
    n->n_sandboxes = (uint64_t)sqlite3_column_int64(st, 13);
    PD_UNUSED(f);
    return 0;
}

void
fsm_node_clear(struct fsm_node *n)
{
    fsm_kv_free(n->labels, n->n_labels);
    n->labels = NULL;
    n->n_labels = 0;
}

void
fsm_nodes_free(struct fsm_node *v, size_t n)
{
    for (size_t i = 0; v != NULL && i < n; i++)
        fsm_node_clear(&v[i]);
    free(v);
}

int
fsm_node_get(struct fsm *f, const char *id, struct fsm_node *out)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_NODE_GET);
    int rv;

    memset(out, 0, sizeof(*out));
    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
    rv = one_row(f, st);
    if (rv != 0)
        return rv;
    fill_node(f, st, out);
    sqlite3_reset(st);
    return fsm_kv_load(f, ST_NODE_LABELS_GET, out->id, &out->labels,
                       &out->n_labels);
}

int
fsm_node_list(struct fsm *f, struct fsm_node **out, size_t *n)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_NODE_LIST);
    void *v;
    int rv;

    if (st == NULL)
        return -EIO;
    rv = collect(f, st, sizeof(struct fsm_node), 0, fill_node, &v, n);
    *out = v;
    for (size_t i = 0; rv == 0 && i < *n; i++)
        rv = fsm_kv_load(f, ST_NODE_LABELS_GET, (*out)[i].id,
                         &(*out)[i].labels, &(*out)[i].n_labels);
    if (rv != 0) {
        fsm_nodes_free(*out, *n);
        *out = NULL;
        *n = 0;
    }
    return rv;
}

/* ---- Sandboxes --------------------------------------------------------- */

static int
fill_sandbox(struct fsm *f, sqlite3_stmt *st, void *elem)
{
    struct fsm_sandbox *s = elem;

    fsm_col_str(st, 0, s->id, sizeof(s->id));
    fsm_col_str(st, 1, s->tenant, sizeof(s->tenant));
    s->spec.cpus = (uint32_t)sqlite3_column_int64(st, 2);
    s->spec.memory_mb = (uint64_t)sqlite3_column_int64(st, 3);
    s->spec.disk_mb = (uint64_t)sqlite3_column_int64(st, 4);
    fsm_col_str(st, 5, s->spec.egress, sizeof(s->spec.egress));
    fsm_col_str(st, 7, s->node, sizeof(s->node));
    s->state = sqlite3_column_int(st, 8);
    fsm_col_str(st, 9, s->reason, sizeof(s->reason));
    s->generation = (uint64_t)sqlite3_column_int64(st, 10);
    s->created_ms = (uint64_t)sqlite3_column_int64(st, 11);
    s->updated_ms = (uint64_t)sqlite3_column_int64(st, 12);
    PD_UNUSED(f);
    return 0;
}

static int
load_lists(struct fsm *f, struct fsm_sandbox *s)
{
    int rv = fsm_kv_load(f, ST_SB_ENV_GET, s->id, &s->spec.env,
                         &s->spec.n_env);

    if (rv == 0)
        rv = fsm_kv_load(f, ST_SB_LABELS_GET, s->id, &s->spec.labels,
                         &s->spec.n_labels);
    return rv;
}

void
fsm_sandbox_clear(struct fsm_sandbox *s)
{
    fsm_kv_free(s->spec.env, s->spec.n_env);
    fsm_kv_free(s->spec.labels, s->spec.n_labels);
    s->spec.env = s->spec.labels = NULL;
    s->spec.n_env = s->spec.n_labels = 0;
}

void
fsm_sandboxes_free(struct fsm_sandbox *v, size_t n)
{
    for (size_t i = 0; v != NULL && i < n; i++)
        fsm_sandbox_clear(&v[i]);
    free(v);
}

int
fsm_sandbox_get(struct fsm *f, const char *id, struct fsm_sandbox *out)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_SB_GET);
    int rv;

    memset(out, 0, sizeof(*out));
    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
    rv = one_row(f, st);
    if (rv != 0)
        return rv;
    fill_sandbox(f, st, out);
    sqlite3_reset(st);
    rv = load_lists(f, out);
    if (rv != 0)
        fsm_sandbox_clear(out);
    return rv;
}

/* Appends to a query buffer; once it is full, further text is dropped
 * and *off stays past the end, which the caller checks once. */
static void PD_PRINTF(4, 5)
sql_add(char *sql, size_t size, size_t *off, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (*off >= size)
        return;
    va_start(ap, fmt);
    n = vsnprintf(sql + *off, size - *off, fmt, ap);
    va_end(ap);
    *off += n > 0 ? (size_t)n : 0;
}

/* The list query is built per call: its label clauses vary in number. */
static int
prepare_list(struct fsm *f, const struct fsm_sandbox_filter *flt,
             sqlite3_stmt **out)
{
    char sql[4096];
    size_t off = 0;
    sqlite3_stmt *st;
    int p = 1;

    if (flt->n_labels > 32)
        return -E2BIG;
    sql_add(sql, sizeof(sql), &off,
            "SELECT id, tenant, cpus, memory_mb, disk_mb,"
            " egress, spec_digest, node, state, reason,"
            " generation, created_ms, updated_ms"
            " FROM sandboxes s WHERE 1");
    if (flt->tenant != NULL)
        sql_add(sql, sizeof(sql), &off, " AND tenant = ?%d", p++);
    if (flt->node != NULL)
        sql_add(sql, sizeof(sql), &off, " AND node = ?%d", p++);
    if (flt->state >= 0)
        sql_add(sql, sizeof(sql), &off, " AND state = ?%d", p++);
    if (flt->after != NULL)
        sql_add(sql, sizeof(sql), &off, " AND id > ?%d", p++);
    for (size_t i = 0; i < flt->n_labels; i++) {
        sql_add(sql, sizeof(sql), &off,
                " AND EXISTS (SELECT 1 FROM sandbox_labels l"
                " WHERE l.sandbox = s.id AND l.key = ?%d"
                " AND l.value = ?%d)", p, p + 1);
        p += 2;
    }
    sql_add(sql, sizeof(sql), &off, " ORDER BY id");
    if (off >= sizeof(sql))
        return -E2BIG; /* cannot happen with 32 labels; never truncate */
    if (sqlite3_prepare_v2(f->db, sql, -1, &st, NULL) != SQLITE_OK)
        return fsm_sql_fail(f, "sandbox list");

    p = 1;
    if (flt->tenant != NULL)
        sqlite3_bind_text(st, p++, flt->tenant, -1, SQLITE_TRANSIENT);
    if (flt->node != NULL)
        sqlite3_bind_text(st, p++, flt->node, -1, SQLITE_TRANSIENT);
    if (flt->state >= 0)
        sqlite3_bind_int(st, p++, flt->state);
    if (flt->after != NULL)
        sqlite3_bind_text(st, p++, flt->after, -1, SQLITE_TRANSIENT);
    for (size_t i = 0; i < flt->n_labels; i++) {
        sqlite3_bind_text(st, p++, flt->labels[i].key, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, p++, flt->labels[i].value, -1,
                          SQLITE_TRANSIENT);
    }
    *out = st;
    return 0;
}

int
fsm_sandbox_list(struct fsm *f, const struct fsm_sandbox_filter *flt,
                 struct fsm_sandbox **out, size_t *n)
{
    struct fsm_sandbox_filter all = {.state = -1};
    sqlite3_stmt *st;
    void *v = NULL;
    int rv;

    *out = NULL;
    *n = 0;
    if (flt == NULL)
        flt = &all;
    rv = prepare_list(f, flt, &st);
    if (rv != 0)
        return rv;
    rv = collect(f, st, sizeof(struct fsm_sandbox), flt->limit,
                 fill_sandbox, &v, n);
    sqlite3_finalize(st);
    *out = v;
    for (size_t i = 0; rv == 0 && i < *n; i++)
        rv = load_lists(f, &(*out)[i]);
    if (rv != 0) {
        fsm_sandboxes_free(*out, *n);
        *out = NULL;
        *n = 0;
    }
    return rv;
}

int
fsm_sandbox_counts(struct fsm *f, uint64_t counts[FSM_SB_NSTATES])
{
    sqlite3_stmt *st = fsm_stmt(f, ST_SB_COUNTS);
    int rc;

    memset(counts, 0, FSM_SB_NSTATES * sizeof(counts[0]));
    if (st == NULL)
        return -EIO;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        int s = sqlite3_column_int(st, 0);

        if (s >= 0 && s < FSM_SB_NSTATES)
            counts[s] = (uint64_t)sqlite3_column_int64(st, 1);
    }
    sqlite3_reset(st);
    return rc == SQLITE_DONE ? 0 : fsm_sql_fail(f, "sandbox counts");
}

/* ---- Ports ------------------------------------------------------------- */

static int
fill_port(struct fsm *f, sqlite3_stmt *st, void *elem)
{
    struct fsm_port *p = elem;
    const void *h = sqlite3_column_blob(st, 2);

    fsm_col_str(st, 0, p->sandbox, sizeof(p->sandbox));
    p->port = (uint32_t)sqlite3_column_int(st, 1);
    if (h != NULL && sqlite3_column_bytes(st, 2) == FSM_TOKEN_HASH_LEN)
        memcpy(p->token_hash, h, FSM_TOKEN_HASH_LEN);
    p->created_ms = (uint64_t)sqlite3_column_int64(st, 3);
    PD_UNUSED(f);
    return 0;
}

int
fsm_port_get(struct fsm *f, const char *sandbox, uint32_t port,
             struct fsm_port *out)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_PORT_GET);
    int rv;

    memset(out, 0, sizeof(*out));
    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, sandbox, -1, SQLITE_TRANSIENT);
    sqlite3_bind_int(st, 2, (int)port);
    rv = one_row(f, st);
    if (rv != 0)
        return rv;
    fill_port(f, st, out);
    sqlite3_reset(st);
    return 0;
}

int
fsm_port_list(struct fsm *f, const char *sandbox, struct fsm_port **out,
              size_t *n)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_PORT_LIST);
    void *v = NULL;
    int rv;

    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, sandbox, -1, SQLITE_TRANSIENT);
    rv = collect(f, st, sizeof(struct fsm_port), 0, fill_port, &v, n);
    if (rv != 0) {
        free(v);
        v = NULL;
        *n = 0;
    }
    *out = v;
    return rv;
}

/* ---- Tokens ------------------------------------------------------------ */

static int
fill_token(struct fsm *f, sqlite3_stmt *st, void *elem)
{
    struct fsm_token *t = elem;

    fsm_col_str(st, 0, t->jti, sizeof(t->jti));
    fsm_col_str(st, 1, t->tenant, sizeof(t->tenant));
    fsm_col_str(st, 2, t->role, sizeof(t->role));
    t->exp_ms = (uint64_t)sqlite3_column_int64(st, 3);
    t->created_ms = (uint64_t)sqlite3_column_int64(st, 4);
    t->revoked = sqlite3_column_int(st, 5) != 0;
    t->revoked_ms = (uint64_t)sqlite3_column_int64(st, 6);
    PD_UNUSED(f);
    return 0;
}

int
fsm_token_get(struct fsm *f, const char *jti, struct fsm_token *out)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_TOKEN_GET);
    int rv;

    memset(out, 0, sizeof(*out));
    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, jti, -1, SQLITE_TRANSIENT);
    rv = one_row(f, st);
    if (rv != 0)
        return rv;
    fill_token(f, st, out);
    sqlite3_reset(st);
    return 0;
}

int
fsm_token_list(struct fsm *f, const char *tenant, bool revoked_only,
               struct fsm_token **out, size_t *n)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_TOKEN_LIST);
    void *v = NULL;
    int rv;

    if (st == NULL)
        return -EIO;
    if (tenant != NULL)
        sqlite3_bind_text(st, 1, tenant, -1, SQLITE_TRANSIENT);
    sqlite3_bind_int(st, 2, revoked_only);
    rv = collect(f, st, sizeof(struct fsm_token), 0, fill_token, &v, n);
    if (rv != 0) {
        free(v);
        v = NULL;
        *n = 0;
    }
    *out = v;
    return rv;
}

bool
fsm_token_is_revoked(struct fsm *f, const char *jti)
{
    struct fsm_token t;

    if (fsm_token_get(f, jti, &t) != 0)
        return true;
    return t.revoked;
}

int
fsm_admin_jti(struct fsm *f, char *out, size_t outlen)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_META_GET);
    int rv;

    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, "admin_jti", -1, SQLITE_STATIC);
    rv = one_row(f, st);
    if (rv != 0)
        return rv;
    fsm_col_str(st, 0, out, outlen);
    sqlite3_reset(st);
    return 0;
}

/* ---- Keys -------------------------------------------------------------- */

static int
fill_key(struct fsm *f, sqlite3_stmt *st, void *elem)
{
    struct fsm_key *k = elem;

    fsm_col_str(st, 0, k->kid, sizeof(k->kid));
    fsm_col_str(st, 1, k->alg, sizeof(k->alg));
    k->public_pem = fsm_col_dup(st, 2);
    k->private_pem = fsm_col_dup(st, 3);
    k->created_ms = (uint64_t)sqlite3_column_int64(st, 4);
    k->retired_ms = (uint64_t)sqlite3_column_int64(st, 5);
    PD_UNUSED(f);
    return k->public_pem != NULL && k->private_pem != NULL ? 0 : -ENOMEM;
}

void
fsm_key_clear(struct fsm_key *k)
{
    free(k->public_pem);
    free(k->private_pem);
    k->public_pem = k->private_pem = NULL;
}

void
fsm_keys_free(struct fsm_key *v, size_t n)
{
    for (size_t i = 0; v != NULL && i < n; i++)
        fsm_key_clear(&v[i]);
    free(v);
}

static int
key_one(struct fsm *f, sqlite3_stmt *st, struct fsm_key *out)
{
    int rv = one_row(f, st);

    if (rv != 0)
        return rv;
    rv = fill_key(f, st, out);
    sqlite3_reset(st);
    if (rv != 0)
        fsm_key_clear(out);
    return rv;
}

int
fsm_key_get(struct fsm *f, const char *kid, struct fsm_key *out)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_KEY_GET);

    memset(out, 0, sizeof(*out));
    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, kid, -1, SQLITE_TRANSIENT);
    return key_one(f, st, out);
}

int
fsm_key_active(struct fsm *f, struct fsm_key *out)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_KEY_ACTIVE);

    memset(out, 0, sizeof(*out));
    if (st == NULL)
        return -EIO;
    return key_one(f, st, out);
}

int
fsm_key_list(struct fsm *f, struct fsm_key **out, size_t *n)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_KEY_LIST);
    void *v = NULL;
    int rv;

    if (st == NULL)
        return -EIO;
    rv = collect(f, st, sizeof(struct fsm_key), 0, fill_key, &v, n);
    if (rv != 0) {
        fsm_keys_free(v, *n);
        v = NULL;
        *n = 0;
    }
    *out = v;
    return rv;
}

/* ---- Members ----------------------------------------------------------- */

static int
fill_member(struct fsm *f, sqlite3_stmt *st, void *elem)
{
    struct fsm_member *m = elem;

    m->id = (uint64_t)sqlite3_column_int64(st, 0);
    fsm_col_str(st, 1, m->raft_addr, sizeof(m->raft_addr));
    fsm_col_str(st, 2, m->api_addr, sizeof(m->api_addr));
    fsm_col_str(st, 3, m->rpc_addr, sizeof(m->rpc_addr));
    fsm_col_str(st, 4, m->preview_addr, sizeof(m->preview_addr));
    PD_UNUSED(f);
    return 0;
}

int
fsm_member_get(struct fsm *f, uint64_t id, struct fsm_member *out)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_MEMBER_GET);
    int rv;

    memset(out, 0, sizeof(*out));
    if (st == NULL)
        return -EIO;
    sqlite3_bind_int64(st, 1, (sqlite3_int64)id);
    rv = one_row(f, st);
    if (rv != 0)
        return rv;
    fill_member(f, st, out);
    sqlite3_reset(st);
    return 0;
}

int
fsm_member_list(struct fsm *f, struct fsm_member **out, size_t *n)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_MEMBER_LIST);
    void *v = NULL;
    int rv;

    if (st == NULL)
        return -EIO;
    rv = collect(f, st, sizeof(struct fsm_member), 0, fill_member, &v, n);
    if (rv != 0) {
        free(v);
        v = NULL;
        *n = 0;
    }
    *out = v;
    return rv;
}
