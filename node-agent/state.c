#include "node-agent/state.h"

#include <errno.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct agent_state {
    sqlite3 *db;
    char err[256];
};

static const char schema[] =
    "PRAGMA journal_mode=WAL;"
    "PRAGMA synchronous=NORMAL;"
    "CREATE TABLE IF NOT EXISTS sandboxes ("
    "  id TEXT PRIMARY KEY,"
    "  dir TEXT NOT NULL,"
    "  spec TEXT NOT NULL,"
    "  state TEXT NOT NULL,"
    "  reason TEXT NOT NULL DEFAULT '',"
    "  pid INTEGER NOT NULL DEFAULT 0,"
    "  pid_start INTEGER NOT NULL DEFAULT 0,"
    "  created_ms INTEGER NOT NULL,"
    "  ports TEXT NOT NULL DEFAULT '[]');"
    "CREATE TABLE IF NOT EXISTS meta ("
    "  key TEXT PRIMARY KEY,"
    "  value TEXT NOT NULL);";

static int
fail(struct agent_state *st, const char *what)
{
    snprintf(st->err, sizeof(st->err), "%s: %s", what,
             sqlite3_errmsg(st->db));
    switch (sqlite3_errcode(st->db) & 0xff) {
    case SQLITE_FULL:
        return -ENOSPC;
    case SQLITE_NOMEM:
        return -ENOMEM;
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
        return -EBUSY;
    case SQLITE_CANTOPEN:
    case SQLITE_PERM:
    case SQLITE_READONLY:
        return -EACCES;
    default:
        return -EIO;
    }
}

int
agent_state_open(const char *path, struct agent_state **out, char *err,
                 size_t errlen)
{
    struct agent_state *st = calloc(1, sizeof(*st));
    char *msg = NULL;
    int rv;

    if (st == NULL)
        return -ENOMEM;
    rv = sqlite3_open_v2(path, &st->db,
                         SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE |
                             SQLITE_OPEN_NOMUTEX,
                         NULL);
    if (rv == SQLITE_OK)
        rv = sqlite3_busy_timeout(st->db, 2000);
    if (rv == SQLITE_OK)
        rv = sqlite3_exec(st->db, schema, NULL, NULL, &msg);
    if (rv != SQLITE_OK) {
        snprintf(err, errlen, "state %s: %s", path,
                 msg ? msg : sqlite3_errmsg(st->db));
        sqlite3_free(msg);
        agent_state_close(st);
        return -EIO;
    }
    *out = st;
    return 0;
}

void
agent_state_close(struct agent_state *st)
{
    if (st == NULL)
        return;
    sqlite3_close(st->db);
    free(st);
}

const char *
agent_state_error(const struct agent_state *st)
{
    return st->err;
}

int
agent_state_put(struct agent_state *st, const struct agent_state_row *row)
{
    static const char sql[] =
        "INSERT OR REPLACE INTO sandboxes (id, dir, spec, state, reason,"
        " pid, pid_start, created_ms, ports)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)";
    sqlite3_stmt *s;
    int rv;

    if (sqlite3_prepare_v2(st->db, sql, -1, &s, NULL) != SQLITE_OK)
        return fail(st, "prepare put");
    sqlite3_bind_text(s, 1, row->id, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 2, row->dir, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 3, row->spec ? row->spec : "{}", -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 4, row->state, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 5, row->reason ? row->reason : "", -1,
                      SQLITE_STATIC);
    sqlite3_bind_int64(s, 6, row->pid);
    sqlite3_bind_int64(s, 7, (sqlite3_int64)row->pid_start);
    sqlite3_bind_int64(s, 8, (sqlite3_int64)row->created_ms);
    sqlite3_bind_text(s, 9, row->ports ? row->ports : "[]", -1,
                      SQLITE_STATIC);
    rv = sqlite3_step(s) == SQLITE_DONE ? 0 : fail(st, "put");
    sqlite3_finalize(s);
    return rv;
}

int
agent_state_delete(struct agent_state *st, const char *id)
{
    sqlite3_stmt *s;
    int rv;

    if (sqlite3_prepare_v2(st->db, "DELETE FROM sandboxes WHERE id = ?", -1,
                           &s, NULL) != SQLITE_OK)
        return fail(st, "prepare delete");
    sqlite3_bind_text(s, 1, id, -1, SQLITE_STATIC);
    rv = sqlite3_step(s) == SQLITE_DONE ? 0 : fail(st, "delete");
    sqlite3_finalize(s);
    return rv;
}

static const char *
col_text(sqlite3_stmt *s, int i)
{
    const unsigned char *t = sqlite3_column_text(s, i);

    return t ? (const char *)t : "";
}

int
agent_state_each(struct agent_state *st,
                 int (*fn)(void *arg, const struct agent_state_row *row),
                 void *arg)
{
    static const char sql[] =
        "SELECT id, dir, spec, state, reason, pid, pid_start, created_ms,"
        " ports"
        " FROM sandboxes ORDER BY created_ms, id";
    sqlite3_stmt *s;
    int rv = 0, step;

    if (sqlite3_prepare_v2(st->db, sql, -1, &s, NULL) != SQLITE_OK)
        return fail(st, "prepare load");
    while ((step = sqlite3_step(s)) == SQLITE_ROW) {
        struct agent_state_row row = {
            .id = col_text(s, 0),
            .dir = col_text(s, 1),
            .spec = col_text(s, 2),
            .state = col_text(s, 3),
            .reason = col_text(s, 4),
            .pid = sqlite3_column_int64(s, 5),
            .pid_start = (uint64_t)sqlite3_column_int64(s, 6),
            .created_ms = (uint64_t)sqlite3_column_int64(s, 7),
            .ports = col_text(s, 8),
        };

        rv = fn(arg, &row);
        if (rv != 0)
            break;
    }
    if (rv == 0 && step != SQLITE_DONE)
        rv = fail(st, "load");
    sqlite3_finalize(s);
    return rv;
}

int
agent_state_meta_get(struct agent_state *st, const char *key, char **out)
{
    sqlite3_stmt *s;
    int rv;

    if (sqlite3_prepare_v2(st->db, "SELECT value FROM meta WHERE key = ?",
                           -1, &s, NULL) != SQLITE_OK)
        return fail(st, "prepare meta");
    sqlite3_bind_text(s, 1, key, -1, SQLITE_STATIC);
    rv = sqlite3_step(s);
    if (rv == SQLITE_ROW) {
        *out = strdup(col_text(s, 0));
        rv = *out ? 0 : -ENOMEM;
    } else {
        rv = rv == SQLITE_DONE ? -ENOENT : fail(st, "meta");
    }
    sqlite3_finalize(s);
    return rv;
}

int
agent_state_meta_set(struct agent_state *st, const char *key,
                     const char *value)
{
    sqlite3_stmt *s;
    int rv;

    if (sqlite3_prepare_v2(st->db,
                           "INSERT OR REPLACE INTO meta (key, value)"
                           " VALUES (?, ?)",
                           -1, &s, NULL) != SQLITE_OK)
        return fail(st, "prepare meta set");
    sqlite3_bind_text(s, 1, key, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 2, value, -1, SQLITE_STATIC);
    rv = sqlite3_step(s) == SQLITE_DONE ? 0 : fail(st, "meta set");
    sqlite3_finalize(s);
    return rv;
}
