/*
 * The capacity index: the nodes table mirrored in a sorted array, so that
 * placement scans memory instead of running a query per placement. It is
 * derived state, never snapshotted: refreshed for the one node a command
 * touched after that command commits, and rebuilt whole after a restore.
 */
#include "raft/fsm_int.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Index of id, or of where it would go (*found false). */
static size_t
find(const struct fsm_node_index *idx, const char *id, bool *found)
{
    size_t lo = 0, hi = idx->n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(idx->v[mid].id, id);

        if (c == 0) {
            *found = true;
            return mid;
        }
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = false;
    return lo;
}

/* "key=value\n" lines in key order, as placement's constraint match
 * expects. */
static char *
labels_line(struct fsm *f, const char *node)
{
    struct fsm_kv *kv = NULL;
    size_t n = 0, len = 1, off = 0;
    char *s;

    if (fsm_kv_load(f, ST_NODE_LABELS_GET, node, &kv, &n) != 0)
        return NULL;
    for (size_t i = 0; i < n; i++)
        len += strlen(kv[i].key) + strlen(kv[i].value) + 2;
    s = malloc(len);
    if (s != NULL) {
        for (size_t i = 0; i < n; i++) {
            size_t kl = strlen(kv[i].key), vl = strlen(kv[i].value);

            memcpy(s + off, kv[i].key, kl);
            s[off + kl] = '=';
            memcpy(s + off + kl + 1, kv[i].value, vl);
            s[off + kl + 1 + vl] = '\n';
            off += kl + vl + 2;
        }
        s[off] = '\0';
    }
    fsm_kv_free(kv, n);
    return s;
}

static void
fill_cap(struct fsm_node_cap *c, sqlite3_stmt *st)
{
    c->cpus = (uint32_t)sqlite3_column_int64(st, 1);
    c->memory_mb = (uint64_t)sqlite3_column_int64(st, 2);
    c->disk_mb = (uint64_t)sqlite3_column_int64(st, 3);
    c->alloc_cpus = (uint32_t)sqlite3_column_int64(st, 4);
    c->alloc_memory_mb = (uint64_t)sqlite3_column_int64(st, 5);
    c->alloc_disk_mb = (uint64_t)sqlite3_column_int64(st, 6);
    c->ready = sqlite3_column_int(st, 7) == FSM_NODE_READY;
    c->draining = sqlite3_column_int(st, 8) != 0;
}

static int
grow(struct fsm *f)
{
    struct fsm_node_cap *v;
    size_t cap;

    if (f->idx.n < f->idx_cap)
        return 0;
    cap = f->idx_cap != 0 ? f->idx_cap * 2 : 64;
    v = realloc(f->idx.v, cap * sizeof(*v));
    if (v == NULL)
        return -ENOMEM;
    f->idx.v = v;
    f->idx_cap = cap;
    return 0;
}

void
fsm_index_free(struct fsm *f)
{
    for (size_t i = 0; i < f->idx.n; i++)
        free(f->idx.v[i].labels);
    free(f->idx.v);
    f->idx.v = NULL;
    f->idx.n = f->idx_cap = 0;
}

int
fsm_index_refresh(struct fsm *f, const char *node, bool labels)
{
    sqlite3_stmt *st = fsm_stmt(f, ST_NODE_CAP);
    struct fsm_node_cap *c;
    bool found;
    size_t i;
    int rc;

    if (st == NULL)
        return -EIO;
    sqlite3_bind_text(st, 1, node, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    i = find(&f->idx, node, &found);
    if (rc != SQLITE_ROW) {
        sqlite3_reset(st);
        if (rc != SQLITE_DONE)
            return fsm_sql_fail(f, "node capacity");
        if (found) {
            free(f->idx.v[i].labels);
            memmove(&f->idx.v[i], &f->idx.v[i + 1],
                    (f->idx.n - i - 1) * sizeof(f->idx.v[0]));
            f->idx.n--;
        }
        return 0;
    }
    if (!found) {
        if (grow(f) != 0) {
            sqlite3_reset(st);
            return -ENOMEM;
        }
        memmove(&f->idx.v[i + 1], &f->idx.v[i],
                (f->idx.n - i) * sizeof(f->idx.v[0]));
        f->idx.n++;
        c = &f->idx.v[i];
        memset(c, 0, sizeof(*c));
        pd_strlcpy(c->id, node, sizeof(c->id));
        labels = true;
    }
    c = &f->idx.v[i];
    fill_cap(c, st);
    sqlite3_reset(st);
    if (labels) {
        char *s = labels_line(f, node);

        if (s == NULL)
            return -ENOMEM;
        free(c->labels);
        c->labels = s;
    }
    return 0;
}

int
fsm_index_rebuild(struct fsm *f)
{
    sqlite3_stmt *st;
    int rc;

    fsm_index_free(f);
    st = fsm_stmt(f, ST_NODE_CAP_ALL);
    if (st == NULL)
        return -EIO;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        struct fsm_node_cap *c;

        if (grow(f) != 0) {
            sqlite3_reset(st);
            return -ENOMEM;
        }
        c = &f->idx.v[f->idx.n++];
        memset(c, 0, sizeof(*c));
        fsm_col_str(st, 0, c->id, sizeof(c->id));
        fill_cap(c, st);
    }
    sqlite3_reset(st);
    if (rc != SQLITE_DONE)
        return fsm_sql_fail(f, "node index");
    for (size_t i = 0; i < f->idx.n; i++) {
        f->idx.v[i].labels = labels_line(f, f->idx.v[i].id);
        if (f->idx.v[i].labels == NULL)
            return -ENOMEM;
    }
    return 0;
}

const struct fsm_node_index *
fsm_node_index(const struct fsm *f)
{
    return &f->idx;
}

static uint64_t
sub_clamp(uint64_t a, uint64_t b)
{
    return a > b ? a - b : 0;
}

int
fsm_node_reserve(struct fsm *f, const char *node, uint32_t cpus,
                 uint64_t memory_mb, uint64_t disk_mb, int sign)
{
    struct fsm_node_cap *c;
    bool found;
    size_t i = find(&f->idx, node, &found);

    if (!found)
        return -ENOENT;
    c = &f->idx.v[i];
    if (sign > 0) {
        c->resv_cpus += cpus;
        c->resv_memory_mb += memory_mb;
        c->resv_disk_mb += disk_mb;
    } else {
        c->resv_cpus = (uint32_t)sub_clamp(c->resv_cpus, cpus);
        c->resv_memory_mb = sub_clamp(c->resv_memory_mb, memory_mb);
        c->resv_disk_mb = sub_clamp(c->resv_disk_mb, disk_mb);
    }
    return 0;
}
