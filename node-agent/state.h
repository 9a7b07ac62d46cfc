/*
 * The agent's own durable state: one sqlite database in the data
 * directory, so a restarted agent knows which VMs it started.
 *
 * One row per sandbox the agent holds (running, starting, failed): the
 * spec as JSON, the state and reason, the QEMU pid together with the
 * process start time (so a recycled pid is never mistaken for our VM),
 * and the exposed ports as JSON. A destroyed sandbox's row is deleted.
 *
 * Writes are small and synchronous on the event loop (WAL journal,
 * synchronous=NORMAL): a few per sandbox life, never per request.
 */
#ifndef AGENT_STATE_H
#define AGENT_STATE_H

#include <stddef.h>
#include <stdint.h>

struct agent_state;

struct agent_state_row {
    const char *id;
    const char *dir;    /* the sandbox's directory (agent-chosen name) */
    const char *spec;   /* JSON object */
    const char *state;  /* "starting", "running", "failed", ... */
    const char *reason; /* "" when none */
    int64_t pid;        /* 0 when no process */
    uint64_t pid_start; /* /proc/<pid>/stat starttime, clock ticks */
    uint64_t created_ms; /* wall clock */
    const char *ports;  /* JSON array */
};

/* Opens (creating) the database at path. -errno with a reason in err. */
int agent_state_open(const char *path, struct agent_state **out, char *err,
                     size_t errlen);
void agent_state_close(struct agent_state *st);

/* Inserts or replaces the row for row->id. */
int agent_state_put(struct agent_state *st, const struct agent_state_row *row);

int agent_state_delete(struct agent_state *st, const char *id);

/*
 * Calls fn for every row (strings valid during the call only). Stops at
 * the first non-zero return of fn and returns it.
 */
int agent_state_each(struct agent_state *st,
                     int (*fn)(void *arg, const struct agent_state_row *row),
                     void *arg);

/* A small key/value table (node id, ...). get: malloc'd or -ENOENT. */
int agent_state_meta_get(struct agent_state *st, const char *key,
                         char **out);
int agent_state_meta_set(struct agent_state *st, const char *key,
                         const char *value);

/* The last sqlite error message, for logs. */
const char *agent_state_error(const struct agent_state *st);

#endif
