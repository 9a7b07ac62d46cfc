/*
 * Counters and histograms for GET /metrics, in Prometheus text format.
 *
 * Counters and API histograms live here; everything else (Raft state,
 * nodes, sandboxes per state) is read from Raft and the FSM at render
 * time, so it can never drift from the state it describes. Counter and
 * route names are few and fixed by the code, so plain arrays with linear
 * lookup are enough.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "scheduler/sched.h"

/* Upper bounds of the latency buckets, in microseconds. */
static const uint64_t bucket_us[] = {
    1000, 5000, 10000, 25000, 50000, 100000, 250000, 500000,
    1000000, 2500000, 5000000, 10000000, 30000000,
};
#define NBUCKETS PD_ARRAY_SIZE(bucket_us)
#define NCLASSES 5 /* 1xx..5xx */

struct counter {
    char *name;
    uint64_t value;
};

struct route_hist {
    char *route;
    uint64_t buckets[NBUCKETS];  /* non-cumulative */
    uint64_t count;
    uint64_t sum_us;
    uint64_t by_class[NCLASSES + 1]; /* [0]: no response */
};

struct sched_metrics {
    struct counter *counters;
    size_t ncounters;
    struct route_hist *routes;
    size_t nroutes;
};

int
sched_metrics_init(struct sched *s)
{
    s->metrics = calloc(1, sizeof(*s->metrics));
    return s->metrics != NULL ? 0 : -ENOMEM;
}

void
sched_metrics_close(struct sched *s)
{
    struct sched_metrics *m = s->metrics;
    size_t i;

    if (m == NULL)
        return;
    for (i = 0; i < m->ncounters; i++)
        free(m->counters[i].name);
    for (i = 0; i < m->nroutes; i++)
        free(m->routes[i].route);
    free(m->counters);
    free(m->routes);
    free(m);
    s->metrics = NULL;
}

static struct route_hist *
route_get(struct sched_metrics *m, const char *route)
{
    struct route_hist *v;
    size_t i;

    for (i = 0; i < m->nroutes; i++)
        if (strcmp(m->routes[i].route, route) == 0)
            return &m->routes[i];
    v = realloc(m->routes, (m->nroutes + 1) * sizeof(*v));
    if (v == NULL)
        return NULL;
    m->routes = v;
    memset(&v[m->nroutes], 0, sizeof(v[0]));
    if ((v[m->nroutes].route = strdup(route)) == NULL)
        return NULL;
    return &v[m->nroutes++];
}

void
sched_metrics_api(struct sched *s, const char *route, int status,
                  uint64_t duration_us)
{
    struct route_hist *h;
    size_t i;

    if (s->metrics == NULL || (h = route_get(s->metrics, route)) == NULL)
        return;
    for (i = 0; i < NBUCKETS && duration_us > bucket_us[i]; i++)
        ;
    if (i < NBUCKETS)
        h->buckets[i]++;
    h->count++;
    h->sum_us += duration_us;
    h->by_class[status >= 100 && status < 600 ? status / 100 : 0]++;
}

void
sched_metrics_inc(struct sched *s, const char *counter, uint64_t n)
{
    struct sched_metrics *m = s->metrics;
    struct counter *v;
    size_t i;

    if (m == NULL)
        return;
    for (i = 0; i < m->ncounters; i++) {
        if (strcmp(m->counters[i].name, counter) == 0) {
            m->counters[i].value += n;
            return;
        }
    }
    v = realloc(m->counters, (m->ncounters + 1) * sizeof(*v));
    if (v == NULL)
        return;
    m->counters = v;
    if ((v[m->ncounters].name = strdup(counter)) == NULL)
        return;
    v[m->ncounters++].value = n;
}

/* ---- Rendering ---------------------------------------------------------- */

struct buf {
    char *p;
    size_t len, cap;
    bool failed;
};

static void bprintf(struct buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void
bprintf(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (b->failed)
        return;
    for (;;) {
        va_start(ap, fmt);
        n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->failed = true;
            return;
        }
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        {
            size_t cap = (b->cap + (size_t)n + 1) * 2;
            char *p = realloc(b->p, cap);

            if (p == NULL) {
                b->failed = true;
                return;
            }
            b->p = p;
            b->cap = cap;
        }
    }
}

/* Prometheus label values: backslash, quote and newline escaped. Route
 * patterns and node ids need none of it, but cost nothing to guard. */
static const char *
esc(const char *in, char *out, size_t outlen)
{
    size_t o = 0;

    for (; *in != '\0' && o + 3 < outlen; in++) {
        if (*in == '\\' || *in == '"') {
            out[o++] = '\\';
            out[o++] = *in;
        } else if (*in == '\n') {
            out[o++] = '\\';
            out[o++] = 'n';
        } else {
            out[o++] = *in;
        }
    }
    out[o] = '\0';
    return out;
}

static void
render_raft(struct sched *s, struct buf *b)
{
    static const int states[] = {RAFT_FOLLOWER, RAFT_CANDIDATE, RAFT_LEADER,
                                 RAFT_UNAVAILABLE};
    struct raftnode_status st;
    size_t i;

    if (s->raft == NULL)
        return;
    raftnode_status(s->raft, &st);
    bprintf(b, "# HELP paddock_raft_state This member's Raft state.\n"
            "# TYPE paddock_raft_state gauge\n");
    for (i = 0; i < PD_ARRAY_SIZE(states); i++)
        bprintf(b, "paddock_raft_state{state=\"%s\"} %d\n",
                raftnode_state_name(states[i]), st.state == states[i]);
    bprintf(b, "# TYPE paddock_raft_term gauge\n"
            "paddock_raft_term %llu\n"
            "# TYPE paddock_raft_commit_index gauge\n"
            "paddock_raft_commit_index %llu\n"
            "# TYPE paddock_raft_last_applied gauge\n"
            "paddock_raft_last_applied %llu\n"
            "# TYPE paddock_raft_last_index gauge\n"
            "paddock_raft_last_index %llu\n"
            "# TYPE paddock_raft_leader_id gauge\n"
            "paddock_raft_leader_id %llu\n"
            "# TYPE paddock_raft_voters gauge\n"
            "paddock_raft_voters %u\n",
            (unsigned long long)st.term,
            (unsigned long long)st.commit_index,
            (unsigned long long)st.last_applied,
            (unsigned long long)st.last_index,
            (unsigned long long)st.leader_id, st.voters);
}

static void
render_counters(struct sched_metrics *m, struct buf *b)
{
    size_t i;

    for (i = 0; i < m->ncounters; i++)
        bprintf(b, "# TYPE paddock_%s_total counter\n"
                "paddock_%s_total %llu\n", m->counters[i].name,
                m->counters[i].name,
                (unsigned long long)m->counters[i].value);
}

static void
render_api(struct sched_metrics *m, struct buf *b)
{
    static const char *classes[] = {"none", "1xx", "2xx", "3xx", "4xx",
                                    "5xx"};
    size_t i, k;

    bprintf(b, "# HELP paddock_api_request_duration_seconds API request "
            "latency by route.\n"
            "# TYPE paddock_api_request_duration_seconds histogram\n");
    for (i = 0; i < m->nroutes; i++) {
        struct route_hist *h = &m->routes[i];
        char r[512];
        uint64_t cum = 0;

        esc(h->route, r, sizeof(r));
        for (k = 0; k < NBUCKETS; k++) {
            cum += h->buckets[k];
            bprintf(b, "paddock_api_request_duration_seconds_bucket"
                    "{route=\"%s\",le=\"%g\"} %llu\n", r,
                    (double)bucket_us[k] / 1e6, (unsigned long long)cum);
        }
        bprintf(b, "paddock_api_request_duration_seconds_bucket"
                "{route=\"%s\",le=\"+Inf\"} %llu\n"
                "paddock_api_request_duration_seconds_sum{route=\"%s\"} "
                "%.6f\n"
                "paddock_api_request_duration_seconds_count{route=\"%s\"} "
                "%llu\n", r, (unsigned long long)h->count, r,
                (double)h->sum_us / 1e6, r, (unsigned long long)h->count);
    }
    bprintf(b, "# TYPE paddock_api_requests_total counter\n");
    for (i = 0; i < m->nroutes; i++) {
        char r[512];

        esc(m->routes[i].route, r, sizeof(r));
        for (k = 0; k < PD_ARRAY_SIZE(classes); k++)
            if (m->routes[i].by_class[k] > 0)
                bprintf(b, "paddock_api_requests_total{route=\"%s\","
                        "status=\"%s\"} %llu\n", r, classes[k],
                        (unsigned long long)m->routes[i].by_class[k]);
    }
}

static void
render_nodes(struct sched *s, struct buf *b)
{
    struct fsm_node *v;
    size_t n, i;

    if (fsm_node_list(s->fsm, &v, &n) != 0)
        return;
    bprintf(b, "# HELP paddock_node_up 1 when the node is ready.\n"
            "# TYPE paddock_node_up gauge\n");
    for (i = 0; i < n; i++) {
        char id[160];

        esc(v[i].id, id, sizeof(id));
        bprintf(b, "paddock_node_up{node=\"%s\"} %d\n"
                "paddock_node_draining{node=\"%s\"} %d\n"
                "paddock_node_sandboxes{node=\"%s\"} %llu\n"
                "paddock_node_capacity_cpus{node=\"%s\"} %u\n"
                "paddock_node_allocated_cpus{node=\"%s\"} %u\n"
                "paddock_node_capacity_memory_mb{node=\"%s\"} %llu\n"
                "paddock_node_allocated_memory_mb{node=\"%s\"} %llu\n"
                "paddock_node_capacity_disk_mb{node=\"%s\"} %llu\n"
                "paddock_node_allocated_disk_mb{node=\"%s\"} %llu\n",
                id, v[i].state == FSM_NODE_READY, id, v[i].draining, id,
                (unsigned long long)v[i].n_sandboxes, id, v[i].cpus, id,
                v[i].alloc_cpus, id, (unsigned long long)v[i].memory_mb, id,
                (unsigned long long)v[i].alloc_memory_mb, id,
                (unsigned long long)v[i].disk_mb, id,
                (unsigned long long)v[i].alloc_disk_mb);
    }
    fsm_nodes_free(v, n);
}

static void
render_sandboxes(struct sched *s, struct buf *b)
{
    uint64_t counts[FSM_SB_NSTATES];
    int i;

    if (fsm_sandbox_counts(s->fsm, counts) != 0)
        return;
    bprintf(b, "# HELP paddock_sandboxes Sandboxes by state.\n"
            "# TYPE paddock_sandboxes gauge\n");
    for (i = 0; i < FSM_SB_NSTATES; i++)
        bprintf(b, "paddock_sandboxes{state=\"%s\"} %llu\n",
                fsm_sandbox_state_name(i), (unsigned long long)counts[i]);
}

char *
sched_metrics_render(struct sched *s)
{
    struct buf b = {0};

    bprintf(&b, "# TYPE paddock_scheduler_id gauge\n"
            "paddock_scheduler_id %llu\n", (unsigned long long)s->cfg.id);
    render_raft(s, &b);
    if (s->metrics != NULL) {
        render_counters(s->metrics, &b);
        render_api(s->metrics, &b);
    }
    if (s->fsm != NULL) {
        render_nodes(s, &b);
        render_sandboxes(s, &b);
    }
    if (b.failed) {
        free(b.p);
        return NULL;
    }
    if (b.p == NULL)
        return strdup("");
    return b.p;
}
