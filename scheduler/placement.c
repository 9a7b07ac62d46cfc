#include "scheduler/placement.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

int
sched_strategy_parse(const char *s, enum sched_strategy *out)
{
    if (strcmp(s, "binpack") == 0)
        *out = SCHED_BINPACK;
    else if (strcmp(s, "spread") == 0)
        *out = SCHED_SPREAD;
    else
        return -EINVAL;
    return 0;
}

enum { R_CPU, R_MEM, R_DISK, R_COUNT };

/* Why nodes were rejected, for the error when none fits. */
struct tally {
    size_t down, draining, labels;
    size_t lack[R_COUNT];
    uint64_t most_free[R_COUNT]; /* among the nodes that lack it */
};

/* Subtracts one at a time: alloc + resv could wrap. */
static uint64_t
free_of(uint64_t cap, uint64_t alloc, uint64_t resv)
{
    if (alloc >= cap)
        return 0;
    cap -= alloc;
    return cap > resv ? cap - resv : 0;
}

/* True when "key=value\n" is one of the node's label lines. */
static bool
has_label(const char *labels, const char *line, size_t len)
{
    const char *p = labels;

    if (p == NULL)
        return false;

    while ((p = strstr(p, line)) != NULL) {
        if (p == labels || p[-1] == '\n')
            return true;
        p += len;
    }
    return false;
}

static const char *const res_names[R_COUNT] = {"CPU", "memory", "disk"};

static void
append(char *buf, size_t len, size_t *off, const char *fmt, ...)
    PD_PRINTF(4, 5);

static void
append(char *buf, size_t len, size_t *off, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (*off >= len)
        return;
    va_start(ap, fmt);
    n = vsnprintf(buf + *off, len - *off, fmt, ap);
    va_end(ap);
    if (n > 0)
        *off += (size_t)n;
}

static const char *
nodes_word(size_t n)
{
    return n == 1 ? "node" : "nodes";
}

static void
explain(const struct tally *t, const struct sched_place_req *req,
        size_t total, char *why, size_t whylen)
{
    const uint64_t need[R_COUNT] = {req->cpus, req->memory_mb, req->disk_mb};
    const char *unit[R_COUNT] = {"", " MB", " MB"};
    const char *sep = "";
    size_t off = 0;

    if (whylen == 0)
        return;
    why[0] = '\0';
    if (total == 0) {
        append(why, whylen, &off, "no node fits: no node is registered");
        return;
    }
    append(why, whylen, &off, "no node fits:");
    for (int r = 0; r < R_COUNT; r++) {
        if (t->lack[r] == 0)
            continue;
        append(why, whylen, &off, "%s %zu %s %s %s (need %llu%s, most "
               "free %llu%s)", sep, t->lack[r], nodes_word(t->lack[r]),
               t->lack[r] == 1 ? "lacks" : "lack", res_names[r],
               (unsigned long long)need[r], unit[r],
               (unsigned long long)t->most_free[r], unit[r]);
        sep = ",";
    }
    if (t->labels > 0) {
        append(why, whylen, &off, "%s %zu %s without the required labels",
               sep, t->labels, nodes_word(t->labels));
        sep = ",";
    }
    if (t->draining > 0) {
        append(why, whylen, &off, "%s %zu %s draining", sep, t->draining,
               nodes_word(t->draining));
        sep = ",";
    }
    if (t->down > 0)
        append(why, whylen, &off, "%s %zu %s down", sep, t->down,
               nodes_word(t->down));
}

/* Builds the "key=value\n" lines of the constraints, once per call. */
static int
constraint_lines(const struct sched_place_req *req, char ***out,
                 size_t **lens)
{
    char **v;
    size_t *l;

    *out = NULL;
    *lens = NULL;
    if (req->n_constraints == 0)
        return 0;
    v = calloc(req->n_constraints, sizeof(*v));
    l = calloc(req->n_constraints, sizeof(*l));
    if (v == NULL || l == NULL)
        goto nomem;
    for (size_t i = 0; i < req->n_constraints; i++) {
        int n = asprintf(&v[i], "%s=%s\n", req->constraints[i].key,
                         req->constraints[i].value);

        if (n < 0) {
            v[i] = NULL;
            goto nomem;
        }
        l[i] = (size_t)n;
    }
    *out = v;
    *lens = l;
    return 0;
nomem:
    for (size_t i = 0; v != NULL && i < req->n_constraints; i++)
        free(v[i]);
    free(v);
    free(l);
    return -ENOMEM;
}

/*
 * Checks one node; returns true when feasible and sets *room, the mean
 * free fraction left after placement. Otherwise tallies why.
 */
static bool
check_node(const struct fsm_node_cap *c, const struct sched_place_req *req,
           char *const *lines, const size_t *lens, struct tally *t,
           bool trace, double *room)
{
    const uint64_t need[R_COUNT] = {req->cpus, req->memory_mb, req->disk_mb};
    const uint64_t cap[R_COUNT] = {c->cpus, c->memory_mb, c->disk_mb};
    uint64_t fr[R_COUNT];
    const char *sb = req->sandbox != NULL ? req->sandbox : "-";
    bool ok = true;

    if (!c->ready) {
        t->down++;
        if (trace)
            pd_trace("placement", "sandbox %s: node %s rejected: down", sb,
                     c->id);
        return false;
    }
    if (c->draining) {
        t->draining++;
        if (trace)
            pd_trace("placement", "sandbox %s: node %s rejected: draining",
                     sb, c->id);
        return false;
    }
    for (size_t i = 0; i < req->n_constraints; i++) {
        if (!has_label(c->labels, lines[i], lens[i])) {
            t->labels++;
            if (trace)
                pd_trace("placement", "sandbox %s: node %s rejected: no "
                         "label %s=%s", sb, c->id, req->constraints[i].key,
                         req->constraints[i].value);
            return false;
        }
    }
    fr[R_CPU] = free_of(c->cpus, c->alloc_cpus, c->resv_cpus);
    fr[R_MEM] = free_of(c->memory_mb, c->alloc_memory_mb,
                        c->resv_memory_mb);
    fr[R_DISK] = free_of(c->disk_mb, c->alloc_disk_mb, c->resv_disk_mb);
    *room = 0;
    for (int r = 0; r < R_COUNT; r++) {
        if (fr[r] < need[r]) {
            t->lack[r]++;
            if (fr[r] > t->most_free[r])
                t->most_free[r] = fr[r];
            if (trace)
                pd_trace("placement", "sandbox %s: node %s rejected: lacks "
                         "%s (need %llu, free %llu)", sb, c->id,
                         res_names[r], (unsigned long long)need[r],
                         (unsigned long long)fr[r]);
            ok = false;
            continue;
        }
        *room += (double)(fr[r] - need[r]) / (double)cap[r];
    }
    *room /= R_COUNT;
    return ok;
}

int
sched_place(const struct fsm_node_index *idx,
            const struct sched_place_req *req, struct sched_place_out *out,
            char *why, size_t whylen)
{
    struct tally t = {0};
    bool trace = pd_trace_on("placement");
    char **lines, scratch[1];
    size_t *lens, best = SIZE_MAX;
    double best_room = 0;
    int rv;

    memset(out, 0, sizeof(*out));
    if (why == NULL || whylen == 0) {
        why = scratch;
        whylen = sizeof(scratch);
    }
    why[0] = '\0';
    if (req->cpus == 0 || req->memory_mb == 0 || req->disk_mb == 0 ||
        req->n_constraints > FSM_KV_MAX) {
        snprintf(why, whylen, "a placement needs positive cpus, memory_mb "
                 "and disk_mb, and at most %d label constraints",
                 FSM_KV_MAX);
        return -EINVAL;
    }
    rv = constraint_lines(req, &lines, &lens);
    if (rv != 0)
        return rv;

    for (size_t i = 0; i < idx->n; i++) {
        double room;

        if (!check_node(&idx->v[i], req, lines, lens, &t, trace, &room))
            continue;
        out->feasible++;
        if (best == SIZE_MAX ||
            (req->strategy == SCHED_SPREAD ? room > best_room
                                           : room < best_room)) {
            best = i;
            best_room = room;
        }
    }
    for (size_t i = 0; i < req->n_constraints; i++)
        free(lines[i]);
    free(lines);
    free(lens);

    if (best == SIZE_MAX) {
        explain(&t, req, idx->n, why, whylen);
        if (trace)
            pd_trace("placement", "sandbox %s: %s",
                     req->sandbox != NULL ? req->sandbox : "-", why);
        return -ENOSPC;
    }
    pd_strlcpy(out->node, idx->v[best].id, sizeof(out->node));
    if (trace)
        pd_trace("placement", "sandbox %s: node %s chosen (%s) among %zu "
                 "feasible", req->sandbox != NULL ? req->sandbox : "-",
                 out->node,
                 req->strategy == SCHED_SPREAD ? "spread" : "binpack",
                 out->feasible);
    return 0;
}
