/*
 * The RPC listener: mutual-TLS connections from node agents (their
 * sessions with the leader) and from other schedulers (forwarding, and a
 * follower's request to place a lost sandbox again).
 *
 * Who is who. The cluster CA signs both kinds of peer, so the chain alone
 * says nothing: the HELLO role must match the certificate's OU ("agent"
 * or "scheduler"), and an agent may only register the node named by its
 * certificate's CN. Anything else closes the connection.
 *
 * Agent sessions, happy path (node-agent/session.h is the other side):
 *   1. NODE_REGISTER {node, rpc_addr, capacity, labels, sandboxes}: the
 *      leader commits NODE_REGISTER (which also brings a down node back)
 *      and answers OK {heartbeat_ms}; then it reconciles the sandboxes the
 *      agent reported with the FSM (below).
 *   2. NODE_HEARTBEAT every heartbeat_ms: refreshes an in-memory last-seen
 *      time and is answered OK. Heartbeats are not committed: 1,000 nodes
 *      would otherwise write 1,000 entries a second. Only a heartbeat from
 *      a node the FSM has down commits NODE_HEARTBEAT (it is back), and
 *      then the leader lists the agent's sandboxes to reconcile again.
 *   3. SANDBOX_STATE {sandbox, state, reason}: committed as FSM
 *      SANDBOX_STATE with the session's node and the sandbox's current
 *      generation, so a report from a node that no longer holds the
 *      sandbox is rejected by the FSM (-ESTALE) and changes nothing.
 *
 * Failure modes:
 *   - On a follower, NODE_REGISTER (or anything later, once this member
 *     lost the leadership) is answered NODE_REDIRECT {leader_addr}, the
 *     leader's RPC address, or "" while there is no leader (the agent
 *     backs off and tries again).
 *   - Failure detection runs on the leader only. A ready node silent for
 *     grace_ms is committed NODE_DOWN, which makes its sandboxes lost. A
 *     new leader has heard nobody yet, so it gives every node a full grace
 *     period from its election before judging it.
 *   - A second session for the same node replaces the first (an agent
 *     that restarted before its old connection timed out).
 *   - Bad fields get ERROR and the connection stays; a bad frame closes
 *     the connection (proto/conn.c).
 *
 * Reconciliation (after a registration, or a down node coming back):
 *   - a sandbox the agent has but the FSM does not, or that the FSM has
 *     on another node, or as lost or stopped, is destroyed on the agent:
 *     a lost sandbox is placed again with a fresh disk on its next use,
 *     so its old VM must not come back to life beside the new one;
 *   - a sandbox the FSM counts on this node (pending to stopping) that
 *     the agent lacks is committed lost (the agent restarted without it,
 *     or a leader died between PLACE and SANDBOX_CREATE). It is not
 *     re-created here: re-placing on next use (lifecycle.c) is one path
 *     for both this and node loss, and it gives the disk-is-fresh rule one
 *     place to live;
 *   - a sandbox both agree on gets the agent's state committed if it
 *     differs.
 *   A sandbox with a create, destroy or re-placement in flight on this
 *   leader (sched_lifecycle_busy) is left alone: the agent's list may
 *   predate the request.
 *
 * PADDOCK_TRACE=nodes narrates heartbeats and reconciliation decisions.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "proto/conn.h"
#include "proto/msgtypes.h"
#include "scheduler/auth.h"
#include "scheduler/sched.h"

#define SEEN_BUCKETS 4096
#define DETECT_MIN_MS 20
#define DETECT_MAX_MS 100
#define REPORT_MAX 4096 /* sandboxes in one NODE_REGISTER we look at */

struct sess;

/* What the leader remembers of one node (not replicated). */
struct seen {
    struct seen *hnext;
    char id[FSM_ID_MAX + 1];
    uint64_t last_ms;  /* monotonic: last frame from its session */
    bool down_busy;    /* NODE_DOWN proposed, not applied yet */
    bool up_busy;      /* NODE_HEARTBEAT (back up) proposed */
    struct sess *sess; /* its registered session here, or NULL */
};

/* One sandbox of an agent's list. */
struct report {
    char id[FSM_ID_MAX + 1];
    int state;                     /* FSM state, or -1 for unknown */
    char reason[FSM_REASON_MAX + 1];
};

/* A sandbox this session is destroying on the agent (reconciliation):
 * the agent's state reports for it are not committed. */
struct destroying {
    struct destroying *next;
    uint64_t req_id;
    char id[FSM_ID_MAX + 1];
};

struct sess {
    struct sched_nodes *n;
    struct sess *next, *prev;
    struct pd_conn *conn; /* NULL once closed */
    int refs;
    bool scheduler;       /* a scheduler peer, not an agent */
    bool hello;
    bool registered;      /* registered with this member as leader */
    bool registering;
    char node[FSM_ID_MAX + 1];
    uint64_t list_id;     /* SANDBOX_LIST sent for reconciliation */
    struct destroying *destroying;
};

struct sched_nodes {
    struct sched *s;
    uv_tcp_t listener;
    uv_timer_t detector;
    bool listening;
    bool leader;
    uint64_t leader_since_ms;
    uint64_t last_tick_ms;  /* the detector's previous run */
    uint64_t detect_ms;     /* its period */
    uint64_t grace_ms, heartbeat_ms;
    struct sess *sessions;
    struct seen *buckets[SEEN_BUCKETS];
    int open_handles;
    bool closing;
};

/* A proposal and who waits for its outcome. */
struct prop {
    struct sched_nodes *n;
    struct fsm_cmd cmd;
    struct sess *sess;     /* referenced, or NULL */
    uint64_t msg_id;       /* the agent's request, for the answer */
    struct report *reports;
    size_t n_reports;
};

static void reconcile(struct sess *ss, const struct report *r, size_t n);
static void nodes_release(struct sched_nodes *n);

/* ---- small helpers ----------------------------------------------------- */

static uint64_t
fnv1a(const char *s)
{
    uint64_t h = 1469598103934665603ull;

    while (*s != '\0')
        h = (h ^ (unsigned char)*s++) * 1099511628211ull;
    return h;
}

static struct seen *
seen_find(struct sched_nodes *n, const char *id)
{
    struct seen *e = n->buckets[fnv1a(id) % SEEN_BUCKETS];

    while (e != NULL && strcmp(e->id, id) != 0)
        e = e->hnext;
    return e;
}

/* Finds or adds; a new entry starts with a full grace period. */
static struct seen *
seen_get(struct sched_nodes *n, const char *id)
{
    struct seen *e = seen_find(n, id);
    size_t b;

    if (e != NULL)
        return e;
    e = calloc(1, sizeof(*e));
    if (e == NULL)
        return NULL;
    pd_strlcpy(e->id, id, sizeof(e->id));
    e->last_ms = pd_now_ms();
    b = fnv1a(id) % SEEN_BUCKETS;
    e->hnext = n->buckets[b];
    n->buckets[b] = e;
    return e;
}

static void
seen_free_all(struct sched_nodes *n)
{
    for (size_t b = 0; b < SEEN_BUCKETS; b++) {
        while (n->buckets[b] != NULL) {
            struct seen *e = n->buckets[b];

            n->buckets[b] = e->hnext;
            free(e);
        }
    }
}

/* The node's entry in the FSM's capacity index (sorted by id). */
static const struct fsm_node_cap *
cap_find(struct sched *s, const char *id)
{
    const struct fsm_node_index *idx = fsm_node_index(s->fsm);
    size_t lo = 0, hi = idx->n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(idx->v[mid].id, id);

        if (c == 0)
            return &idx->v[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

static bool
is_leader(struct sched *s)
{
    return s->raft != NULL && raftnode_is_leader(s->raft);
}

static void
sess_unref(struct sess *ss)
{
    if (--ss->refs > 0)
        return;
    while (ss->destroying != NULL) {
        struct destroying *d = ss->destroying;

        ss->destroying = d->next;
        free(d);
    }
    free(ss);
}

static const char *
sess_name(const struct sess *ss)
{
    return ss->node[0] != '\0' ? ss->node : "(unregistered)";
}

static void
send_ok(struct sess *ss, uint64_t id)
{
    struct pd_enc e;

    if (ss->conn == NULL)
        return;
    pd_enc_begin(&e, PD_MSG_OK, id);
    pd_conn_send(ss->conn, &e);
}

static void
send_error(struct sess *ss, uint64_t id, int errnum, const char *msg)
{
    if (ss->conn != NULL)
        pd_conn_send_error(ss->conn, id, errnum < 0 ? -errnum : errnum,
                           "%s", msg);
}

/*
 * The leader's RPC address: forward.c's answer, else the members table
 * entry of raftnode's leader id. NULL while there is no leader.
 */
static const char *
leader_rpc(struct sched_nodes *n)
{
    static struct fsm_member m;
    const char *addr = sched_leader_rpc_addr(n->s);
    uint64_t id = 0;
    char raft_addr[FSM_ADDR_MAX + 1];

    if (addr != NULL && addr[0] != '\0')
        return addr;
    if (n->s->raft == NULL)
        return NULL;
    raftnode_leader(n->s->raft, &id, raft_addr, sizeof(raft_addr));
    if (id == 0 || fsm_member_get(n->s->fsm, id, &m) != 0 ||
        m.rpc_addr[0] == '\0')
        return NULL;
    return m.rpc_addr;
}

/* Tells the agent where the leader is; "" while there is none. */
static void
send_redirect(struct sess *ss, uint64_t id)
{
    const char *leader = leader_rpc(ss->n);
    struct pd_enc e;

    if (ss->conn == NULL)
        return;
    pd_enc_begin(&e, PD_MSG_NODE_REDIRECT, id);
    pd_enc_str(&e, "leader_addr", leader != NULL ? leader : "");
    pd_conn_send(ss->conn, &e);
    pd_trace("nodes", "node %s: redirected to the leader at \"%s\"",
             sess_name(ss), leader != NULL ? leader : "");
}

/* Drops the session's registration (it stays connected). */
static void
unregister(struct sess *ss)
{
    struct seen *e;

    if (!ss->registered)
        return;
    ss->registered = false;
    e = seen_find(ss->n, ss->node);
    if (e != NULL && e->sess == ss)
        e->sess = NULL;
}

static struct prop *
prop_new(struct sched_nodes *n, int type, struct sess *ss)
{
    struct prop *p = calloc(1, sizeof(*p));

    if (p == NULL)
        return NULL;
    if (fsm_cmd_init(&p->cmd, type) != 0) {
        free(p);
        return NULL;
    }
    p->n = n;
    p->sess = ss;
    if (ss != NULL)
        ss->refs++;
    return p;
}

static void
prop_free(struct prop *p)
{
    if (p->cmd.type == FSM_CMD_NODE_REGISTER)
        fsm_kv_free(p->cmd.u.node_register.labels,
                    p->cmd.u.node_register.n_labels);
    if (p->sess != NULL)
        sess_unref(p->sess);
    free(p->reports);
    free(p);
}

/* Proposes p's command; on failure to even propose, frees p. */
static int
prop_submit(struct prop *p, raftnode_apply_cb cb)
{
    int rv = -ENOTCONN;

    if (p->n->s->raft != NULL)
        rv = raftnode_propose(p->n->s->raft, &p->cmd, cb, p);
    if (rv != 0)
        prop_free(p);
    return rv;
}

/* ---- state reports ----------------------------------------------------- */

static void
on_state_applied(void *data, int status, const struct fsm_result *res)
{
    struct prop *p = data;
    const struct fsm_cmd_state *c = &p->cmd.u.state;

    if (status != 0)
        pd_debug("nodes", "sandbox %s: state %s from node %s not committed "
                 "(%s), the next report or reconciliation retries",
                 c->sandbox, fsm_sandbox_state_name(c->state), c->node,
                 strerror(-status));
    else if (res->code != 0)
        pd_debug("nodes", "sandbox %s: state %s from node %s refused: %s",
                 c->sandbox, fsm_sandbox_state_name(c->state), c->node,
                 res->message);
    else
        pd_trace("nodes", "sandbox %s: %s on node %s committed", c->sandbox,
                 fsm_sandbox_state_name(c->state), c->node);
    prop_free(p);
}

static void
propose_state(struct sched_nodes *n, const struct fsm_sandbox *row,
              const char *node, int state, const char *reason)
{
    struct prop *p = prop_new(n, FSM_CMD_SANDBOX_STATE, NULL);
    struct fsm_cmd_state *c;

    if (p == NULL)
        return;
    c = &p->cmd.u.state;
    pd_strlcpy(c->sandbox, row->id, sizeof(c->sandbox));
    c->state = state;
    pd_strlcpy(c->reason, reason != NULL ? reason : "", sizeof(c->reason));
    pd_strlcpy(c->node, node, sizeof(c->node));
    c->generation = row->generation;
    prop_submit(p, on_state_applied);
}

static bool
is_destroying(const struct sess *ss, const char *id)
{
    for (const struct destroying *d = ss->destroying; d; d = d->next)
        if (strcmp(d->id, id) == 0)
            return true;
    return false;
}

/* Destroys a sandbox on the agent over the session itself (the agent
 * serves RPC requests there too); the answer only ends the bookkeeping. */
static void
destroy_on_agent(struct sess *ss, const char *id, const char *why)
{
    struct destroying *d;
    struct pd_enc e;

    if (ss->conn == NULL || is_destroying(ss, id))
        return;
    d = calloc(1, sizeof(*d));
    if (d == NULL)
        return;
    d->req_id = pd_conn_next_id(ss->conn);
    pd_strlcpy(d->id, id, sizeof(d->id));
    d->next = ss->destroying;
    ss->destroying = d;
    pd_info("nodes", "sandbox %s: destroying it on node %s, %s", id,
            ss->node, why);
    pd_enc_begin(&e, PD_MSG_SANDBOX_DESTROY, d->req_id);
    pd_enc_str(&e, "sandbox", id);
    pd_conn_send(ss->conn, &e);
}

/* An OK or ERROR from the agent: the answer to one of our requests. */
static bool
destroy_answered(struct sess *ss, const struct pd_msg *m)
{
    for (struct destroying **dp = &ss->destroying; *dp; dp = &(*dp)->next) {
        struct destroying *d = *dp;
        char msg[256] = "";

        if (d->req_id != m->id)
            continue;
        if (m->type == PD_MSG_ERROR) {
            pd_msg_cstr(m, "message", msg, sizeof(msg));
            pd_debug("nodes", "sandbox %s: destroy on node %s: %s", d->id,
                     ss->node, msg);
        }
        *dp = d->next;
        free(d);
        return true;
    }
    return false;
}

/*
 * Decides about one sandbox the agent holds. ss is registered and this
 * member leads. live: a SANDBOX_STATE as it happens, not an entry of a
 * list that may predate a request in flight; while lifecycle.c works on
 * the sandbox, only such a live report of progress (starting, running)
 * is committed, so the FSM shows a VM booting as starting. Anything
 * else then could be the old VM that a re-placement is clearing away.
 */
static void
judge_report(struct sess *ss, const struct report *r, bool live)
{
    struct sched *s = ss->n->s;
    struct fsm_sandbox row;
    bool gone = r->state == FSM_SB_STOPPED;
    int rv;

    if (is_destroying(ss, r->id))
        return;
    rv = fsm_sandbox_get(s->fsm, r->id, &row);
    if (rv == -ENOENT) {
        if (!gone && !sched_lifecycle_busy(s, r->id))
            destroy_on_agent(ss, r->id, "the cluster has no such sandbox");
        return;
    }
    if (rv != 0)
        return;
    if (strcmp(row.node, ss->node) != 0) {
        if (!gone)
            destroy_on_agent(ss, r->id, "it was placed again elsewhere");
    } else if (row.state == FSM_SB_LOST || row.state == FSM_SB_STOPPED) {
        if (!gone && !sched_lifecycle_busy(s, r->id))
            destroy_on_agent(ss, r->id,
                             row.state == FSM_SB_LOST
                                 ? "it was lost (it gets a fresh disk on "
                                   "its next use)"
                                 : "it is stopped");
    } else if (r->state >= 0 && r->state != row.state &&
               (!sched_lifecycle_busy(s, r->id) ||
                (live && (r->state == FSM_SB_STARTING ||
                          r->state == FSM_SB_RUNNING)))) {
        propose_state(ss->n, &row, ss->node, r->state, r->reason);
    }
    fsm_sandbox_clear(&row);
}

static void
on_state_report(struct sess *ss, const struct pd_msg *m)
{
    struct report r = {.state = -1};
    char state[32] = "";

    send_ok(ss, m->id);
    if (pd_msg_cstr(m, "sandbox", r.id, sizeof(r.id)) != 0 ||
        !pd_id_valid(r.id) ||
        pd_msg_cstr(m, "state", state, sizeof(state)) != 0) {
        pd_debug("nodes", "node %s: SANDBOX_STATE without a valid sandbox "
                 "or state, ignoring", ss->node);
        return;
    }
    r.state = fsm_sandbox_state_parse(state);
    pd_msg_cstr(m, "reason", r.reason, sizeof(r.reason));
    if (r.state < 0) {
        pd_debug("nodes", "node %s: sandbox %s in unknown state \"%s\", "
                 "ignoring", ss->node, r.id, state);
        return;
    }
    judge_report(ss, &r, true);
}

/* The agent's sandboxes: an array of maps {sandbox, state, reason}. */
static int
read_reports(const msgpack_object *arr, struct report **out, size_t *n)
{
    struct report *v;
    size_t k = 0;

    *out = NULL;
    *n = 0;
    if (arr == NULL || arr->type == MSGPACK_OBJECT_NIL)
        return 0;
    if (arr->type != MSGPACK_OBJECT_ARRAY ||
        arr->via.array.size > REPORT_MAX)
        return -EINVAL;
    if (arr->via.array.size == 0)
        return 0;
    v = calloc(arr->via.array.size, sizeof(*v));
    if (v == NULL)
        return -ENOMEM;
    for (uint32_t i = 0; i < arr->via.array.size; i++) {
        const msgpack_object *o = &arr->via.array.ptr[i];
        const char *p;
        size_t len;

        if (o->type != MSGPACK_OBJECT_MAP ||
            pd_obj_str(pd_obj_field(o, "sandbox"), &p, &len) != 0 ||
            !pd_id_valid_n(p, len)) {
            free(v);
            return -EINVAL;
        }
        memcpy(v[k].id, p, len);
        v[k].state = -1;
        if (pd_obj_str(pd_obj_field(o, "state"), &p, &len) == 0 &&
            len < 16) {
            char st[16];

            memcpy(st, p, len);
            st[len] = '\0';
            v[k].state = fsm_sandbox_state_parse(st);
        }
        if (pd_obj_str(pd_obj_field(o, "reason"), &p, &len) == 0 &&
            len <= FSM_REASON_MAX && memchr(p, '\0', len) == NULL)
            memcpy(v[k].reason, p, len);
        k++;
    }
    *out = v;
    *n = k;
    return 0;
}

static void
reconcile(struct sess *ss, const struct report *r, size_t n)
{
    struct sched *s = ss->n->s;
    struct fsm_sandbox_filter flt = {.node = ss->node, .state = -1};
    struct fsm_sandbox *rows = NULL;
    size_t nrows = 0, lost = 0;

    if (!ss->registered || !is_leader(s))
        return;
    for (size_t i = 0; i < n; i++)
        judge_report(ss, &r[i], false);

    if (fsm_sandbox_list(s->fsm, &flt, &rows, &nrows) != 0)
        return;
    for (size_t i = 0; i < nrows; i++) {
        const struct fsm_sandbox *row = &rows[i];
        bool held = false;
        char why[FSM_REASON_MAX + 1];

        if (row->state > FSM_SB_STOPPING || sched_lifecycle_busy(s, row->id))
            continue;
        for (size_t j = 0; j < n && !held; j++)
            held = strcmp(r[j].id, row->id) == 0;
        if (held)
            continue;
        snprintf(why, sizeof(why), "node %s no longer has it (the agent "
                 "restarted without it)", ss->node);
        propose_state(ss->n, row, ss->node, FSM_SB_LOST, why);
        lost++;
    }
    fsm_sandboxes_free(rows, nrows);
    pd_trace("nodes", "node %s: reconciled %zu reported sandboxes, %zu lost",
             ss->node, n, lost);
}

/* ---- registration and heartbeats --------------------------------------- */

static void
on_register_applied(void *data, int status, const struct fsm_result *res)
{
    struct prop *p = data;
    struct sess *ss = p->sess;
    const char *node = p->cmd.u.node_register.node;
    struct seen *e;

    ss->registering = false;
    if (ss->conn == NULL || p->n->closing) {
        prop_free(p);
        return;
    }
    if (status != 0) {
        pd_info("nodes", "node %s: registration not committed (%s), "
                "redirecting it", node, strerror(-status));
        send_redirect(ss, p->msg_id);
        prop_free(p);
        return;
    }
    if (res->code != 0) {
        pd_warn("nodes", "node %s: registration refused: %s", node,
                res->message);
        send_error(ss, p->msg_id, res->code, res->message);
        prop_free(p);
        return;
    }
    e = seen_get(p->n, node);
    if (e == NULL) {
        send_error(ss, p->msg_id, ENOMEM, "out of memory");
        prop_free(p);
        return;
    }
    if (e->sess != NULL && e->sess != ss && e->sess->conn != NULL) {
        pd_info("nodes", "node %s: a new session replaces the old one",
                node);
        e->sess->registered = false;
        pd_conn_close(e->sess->conn, 0, "replaced by a new session");
    }
    e->sess = ss;
    e->last_ms = pd_now_ms();
    e->down_busy = false;
    ss->registered = true;

    struct pd_enc enc;

    pd_enc_begin(&enc, PD_MSG_OK, p->msg_id);
    pd_enc_u64(&enc, "heartbeat_ms", p->n->heartbeat_ms);
    pd_conn_send(ss->conn, &enc);
    sched_tokens_push_revoked(p->n->s, ss->conn); /* added by tokens */
    pd_info("nodes", "node %s: registered (%s, %u CPUs, %llu MB, %llu MB "
            "disk, %zu sandboxes)", node, p->cmd.u.node_register.rpc_addr,
            p->cmd.u.node_register.cpus,
            (unsigned long long)p->cmd.u.node_register.memory_mb,
            (unsigned long long)p->cmd.u.node_register.disk_mb,
            p->n_reports);
    reconcile(ss, p->reports, p->n_reports);
    prop_free(p);
}

/* Labels: a map of string to string. */
static int
read_labels(const struct pd_msg *m, struct fsm_kv **out, size_t *n)
{
    const msgpack_object_map *map;
    struct fsm_kv *kv;
    int rv = pd_msg_map(m, "labels", &map);

    *out = NULL;
    *n = 0;
    if (rv == -ENOENT)
        return 0;
    if (rv != 0 || map->size > FSM_KV_MAX)
        return -EINVAL;
    if (map->size == 0)
        return 0;
    kv = calloc(map->size, sizeof(*kv));
    if (kv == NULL)
        return -ENOMEM;
    for (uint32_t i = 0; i < map->size; i++) {
        if (pd_obj_strdup(&map->ptr[i].key, &kv[i].key) != 0 ||
            pd_obj_strdup(&map->ptr[i].val, &kv[i].value) != 0 ||
            !pd_label_valid(kv[i].key, FSM_KEY_MAX) ||
            !pd_label_valid(kv[i].value, FSM_VALUE_MAX)) {
            fsm_kv_free(kv, map->size);
            return -EINVAL;
        }
    }
    *out = kv;
    *n = map->size;
    return 0;
}

/*
 * A join token (role node, subject = the node id, not revoked) proves the
 * operator admitted this node, beside the certificate that proves it is
 * an agent of this cluster: a leaked agent certificate alone then cannot
 * join once the node's token is revoked. Required with
 * require_join_token; checked whenever one is sent.
 */
static int
check_join_token(struct sess *ss, const struct pd_msg *m, const char *node)
{
    struct sched *s = ss->n->s;
    char tok[4096], why[256];
    int rv;

    rv = pd_msg_cstr(m, "token", tok, sizeof(tok));
    if (rv == -ENOENT) {
        if (!s->cfg.require_join_token)
            return 0;
        pd_warn("nodes", "node %s: registered without a join token, "
                "refusing it", node);
        snprintf(why, sizeof(why), "this cluster requires a join token: "
                 "mint one with `paddock token create --role node --tenant "
                 "%s` and give it to the agent (join_token_file)", node);
        send_error(ss, m->id, EACCES, why);
        return -EACCES;
    }
    if (rv != 0) {
        send_error(ss, m->id, EINVAL, "token: want a string");
        return -EINVAL;
    }
    rv = sched_auth_node_token(s, tok, node, why, sizeof(why));
    if (rv != 0) {
        pd_warn("nodes", "node %s: %s, refusing it", node, why);
        send_error(ss, m->id, EACCES, why);
        return -EACCES;
    }
    return 0;
}

static void
on_register(struct sess *ss, const struct pd_msg *m)
{
    struct sched_nodes *n = ss->n;
    struct fsm_cmd_node_register *c;
    uint64_t cpus = 0, mem = 0, disk = 0;
    char node[FSM_ID_MAX + 1], cn[128] = "";
    struct prop *p;
    int rv;

    if (!is_leader(n->s)) {
        send_redirect(ss, m->id);
        return;
    }
    if (pd_msg_cstr(m, "node", node, sizeof(node)) != 0 ||
        !pd_id_valid(node)) {
        send_error(ss, m->id, EINVAL, "node: want an id matching "
                   "[a-z0-9][a-z0-9-]{0,62}");
        return;
    }
    if (pd_conn_peer_cn(ss->conn, cn, sizeof(cn)) != 0 ||
        strcmp(cn, node) != 0) {
        char msg[256];

        snprintf(msg, sizeof(msg), "certificate CN=%s may not register "
                 "node %s", cn, node);
        pd_warn("nodes", "node %s: %s, refusing it", node, msg);
        send_error(ss, m->id, EPERM, msg);
        return;
    }
    if (check_join_token(ss, m, node) != 0)
        return;
    if (ss->registering || (ss->registered && strcmp(ss->node, node) != 0)) {
        send_error(ss, m->id, EBUSY, "this session is already registering "
                   "or registered");
        return;
    }
    if (pd_msg_u64(m, "cpus", &cpus) != 0 || cpus == 0 ||
        cpus > UINT32_MAX || pd_msg_u64(m, "memory_mb", &mem) != 0 ||
        mem == 0 || pd_msg_u64(m, "disk_mb", &disk) != 0 || disk == 0) {
        send_error(ss, m->id, EINVAL, "cpus, memory_mb and disk_mb: want "
                   "positive whole numbers");
        return;
    }
    p = prop_new(n, FSM_CMD_NODE_REGISTER, ss);
    if (p == NULL) {
        send_error(ss, m->id, ENOMEM, "out of memory");
        return;
    }
    p->msg_id = m->id;
    c = &p->cmd.u.node_register;
    pd_strlcpy(c->node, node, sizeof(c->node));
    c->cpus = (uint32_t)cpus;
    c->memory_mb = mem;
    c->disk_mb = disk;
    rv = pd_msg_cstr(m, "rpc_addr", c->rpc_addr, sizeof(c->rpc_addr));
    if (rv != 0 || c->rpc_addr[0] == '\0') {
        send_error(ss, m->id, EINVAL, "rpc_addr: want host:port");
        prop_free(p);
        return;
    }
    if (read_labels(m, &c->labels, &c->n_labels) != 0) {
        send_error(ss, m->id, EINVAL, "labels: want a map of printable "
                   "strings without '='");
        prop_free(p);
        return;
    }
    if (read_reports(pd_msg_field(m, "sandboxes"), &p->reports,
                     &p->n_reports) != 0) {
        send_error(ss, m->id, EINVAL, "sandboxes: want a list of "
                   "{sandbox, state, reason}");
        prop_free(p);
        return;
    }
    pd_strlcpy(ss->node, node, sizeof(ss->node));
    ss->registering = true;
    rv = prop_submit(p, on_register_applied);
    if (rv != 0) {
        ss->registering = false;
        send_redirect(ss, m->id);
    }
}

static void
on_back_applied(void *data, int status, const struct fsm_result *res)
{
    struct prop *p = data;
    struct sess *ss = p->sess;
    struct seen *e = seen_find(p->n, p->cmd.u.node.node);
    struct pd_enc enc;

    if (e != NULL)
        e->up_busy = false;
    if (status != 0 || res->code != 0 || ss->conn == NULL ||
        !ss->registered) {
        prop_free(p);
        return;
    }
    pd_info("nodes", "node %s: heard from again, ready; listing its "
            "sandboxes to reconcile", ss->node);
    ss->list_id = pd_conn_next_id(ss->conn);
    pd_enc_begin(&enc, PD_MSG_SANDBOX_LIST, ss->list_id);
    pd_conn_send(ss->conn, &enc);
    prop_free(p);
}

static void
on_heartbeat(struct sess *ss, const struct pd_msg *m)
{
    struct sched_nodes *n = ss->n;
    const struct fsm_node_cap *cap;
    struct seen *e;
    struct prop *p;

    if (!is_leader(n->s) || !ss->registered) {
        unregister(ss);
        send_redirect(ss, m->id);
        return;
    }
    e = seen_get(n, ss->node);
    if (e == NULL)
        return;
    e->last_ms = pd_now_ms();
    send_ok(ss, m->id);
    cap = cap_find(n->s, ss->node);
    if (cap == NULL) {
        /* The row is gone (it should not be): register again. */
        pd_conn_close(ss->conn, 0, "node %s is not in the cluster state",
                      ss->node);
        return;
    }
    if (cap->ready || e->up_busy || e->down_busy)
        return;
    p = prop_new(n, FSM_CMD_NODE_HEARTBEAT, ss);
    if (p == NULL)
        return;
    pd_strlcpy(p->cmd.u.node.node, ss->node, sizeof(p->cmd.u.node.node));
    e->up_busy = true;
    if (prop_submit(p, on_back_applied) != 0)
        e->up_busy = false;
}

static void
on_list_answer(struct sess *ss, const struct pd_msg *m)
{
    struct report *r = NULL;
    size_t n = 0;

    ss->list_id = 0;
    if (m->type != PD_MSG_OK ||
        read_reports(pd_msg_field(m, "sandboxes"), &r, &n) != 0) {
        pd_warn("nodes", "node %s: no usable sandbox list, reconciling at "
                "its next registration", ss->node);
        return;
    }
    reconcile(ss, r, n);
    free(r);
}

/* ---- failure detection (leader only) ----------------------------------- */

static void
on_down_applied(void *data, int status, const struct fsm_result *res)
{
    struct prop *p = data;
    const char *node = p->cmd.u.node.node;
    struct seen *e = seen_find(p->n, node);

    if (e != NULL)
        e->down_busy = false;
    if (status != 0)
        pd_info("nodes", "node %s: NODE_DOWN not committed (%s); the next "
                "leader judges it again", node, strerror(-status));
    else if (res->code != 0)
        pd_warn("nodes", "node %s: NODE_DOWN refused: %s", node,
                res->message);
    else {
        pd_warn("nodes", "node %s: committed down, %llu sandboxes lost "
                "(placed again on their next use)", node,
                (unsigned long long)res->count);
        sched_metrics_inc(p->n->s, "nodes_down", 1);
        sched_metrics_inc(p->n->s, "sandboxes_lost", res->count);
    }
    prop_free(p);
}

static void
on_detect(uv_timer_t *t)
{
    struct sched_nodes *n = t->data;
    struct sched *s = n->s;
    const struct fsm_node_index *idx;
    uint64_t now = pd_now_ms();

    if (!is_leader(s))
        return;
    /* A loop that stalled (an overloaded host, a long snapshot) could not
     * read heartbeats either: the stall is this member's silence, not the
     * nodes', so it does not count against them. */
    if (n->last_tick_ms != 0 &&
        now - n->last_tick_ms > 4 * n->detect_ms + n->heartbeat_ms) {
        uint64_t stall = now - n->last_tick_ms;

        pd_warn("nodes", "leader: event loop stalled for %llu ms, not "
                "counting it as the nodes' silence",
                (unsigned long long)stall);
        for (size_t b = 0; b < SEEN_BUCKETS; b++)
            for (struct seen *e = n->buckets[b]; e; e = e->hnext)
                e->last_ms = e->last_ms + stall < now ? e->last_ms + stall
                                                      : now;
    }
    n->last_tick_ms = now;
    idx = fsm_node_index(s->fsm);
    for (size_t i = 0; i < idx->n; i++) {
        const struct fsm_node_cap *cap = &idx->v[i];
        struct seen *e;
        struct prop *p;

        if (!cap->ready)
            continue;
        e = seen_get(n, cap->id);
        if (e == NULL)
            return;
        if (e->last_ms < n->leader_since_ms)
            e->last_ms = n->leader_since_ms;
        if (e->down_busy || e->last_ms >= now ||
            now - e->last_ms <= n->grace_ms)
            continue;
        p = prop_new(n, FSM_CMD_NODE_DOWN, NULL);
        if (p == NULL)
            return;
        pd_strlcpy(p->cmd.u.node.node, cap->id, sizeof(p->cmd.u.node.node));
        snprintf(p->cmd.u.node.reason, sizeof(p->cmd.u.node.reason),
                 "node %s stopped answering (silent for %llu ms)", cap->id,
                 (unsigned long long)(now - e->last_ms));
        pd_warn("nodes", "node %s: silent for %llu ms (grace %llu ms), "
                "committing it down", cap->id,
                (unsigned long long)(now - e->last_ms),
                (unsigned long long)n->grace_ms);
        e->down_busy = true;
        if (prop_submit(p, on_down_applied) != 0)
            e->down_busy = false;
    }
}

void
sched_nodes_on_state(struct sched *s, bool leader)
{
    struct sched_nodes *n = s->nodes;
    uint64_t period;

    if (n == NULL || n->closing || n->leader == leader)
        return;
    n->leader = leader;
    if (leader) {
        /* Nobody has been heard by this leader yet: a full grace period
         * from now for every node, however stale the old times were. */
        n->leader_since_ms = pd_now_ms();
        for (size_t b = 0; b < SEEN_BUCKETS; b++)
            for (struct seen *e = n->buckets[b]; e; e = e->hnext) {
                e->last_ms = n->leader_since_ms;
                e->down_busy = e->up_busy = false;
            }
        period = n->grace_ms / 20;
        if (period < DETECT_MIN_MS)
            period = DETECT_MIN_MS;
        if (period > DETECT_MAX_MS)
            period = DETECT_MAX_MS;
        n->detect_ms = period;
        n->last_tick_ms = 0;
        uv_timer_start(&n->detector, on_detect, period, period);
        pd_info("nodes", "leader: failure detector on (grace %llu ms), "
                "every node has a full grace period from now",
                (unsigned long long)n->grace_ms);
        return;
    }
    uv_timer_stop(&n->detector);
    /* Sessions follow the leadership: send each agent to the new leader
     * now when it is known, else at its next heartbeat. */
    for (struct sess *ss = n->sessions; ss; ss = ss->next) {
        if (!ss->registered)
            continue;
        unregister(ss);
        if (leader_rpc(n) != NULL)
            send_redirect(ss, 0);
    }
    pd_info("nodes", "no longer the leader: failure detector off, agent "
            "sessions redirected");
}

bool
sched_nodes_alive(struct sched *s, const char *node)
{
    struct sched_nodes *n = s->nodes;
    struct seen *e;

    if (n == NULL || !n->leader)
        return false;
    e = seen_find(n, node);
    return e != NULL && e->sess != NULL && e->sess->registered &&
           pd_now_ms() - e->last_ms <= n->grace_ms;
}

void
sched_nodes_broadcast(struct sched *s, struct pd_enc *e)
{
    struct sched_nodes *n = s->nodes;
    void *buf;
    size_t len;

    if (pd_enc_finish(e, &buf, &len) != 0)
        return;
    for (struct sess *ss = n != NULL ? n->sessions : NULL; ss;
         ss = ss->next) {
        void *copy;

        if (ss->scheduler || ss->conn == NULL || !ss->hello)
            continue;
        copy = malloc(len);
        if (copy == NULL)
            break;
        memcpy(copy, buf, len);
        pd_conn_send_frame(ss->conn, copy, len);
    }
    free(buf);
}

/* ---- connections ------------------------------------------------------- */

static bool
check_peer(struct sess *ss)
{
    struct pd_conn *c = ss->conn;
    const char *role = pd_conn_peer_role(c);

    if (strcmp(role, "agent") == 0 && pd_conn_peer_has_ou(c, "agent"))
        return true;
    if (strcmp(role, "scheduler") == 0 &&
        pd_conn_peer_has_ou(c, "scheduler")) {
        ss->scheduler = true;
        return true;
    }
    pd_warn("nodes", "RPC peer %s says it is a \"%s\" but its certificate "
            "does not carry that OU, closing", pd_conn_peer_name(c), role);
    pd_conn_close(c, -EPERM, "role and certificate disagree");
    return false;
}

static void
on_scheduler_msg(struct sess *ss, const struct pd_msg *m)
{
    struct pd_enc e;

    switch (m->type) {
    case PD_MSG_FORWARD:
        sched_forward_serve(ss->n->s, ss->conn, m);
        return;
    case PD_MSG_SANDBOX_ENSURE:
        sched_lifecycle_serve(ss->n->s, ss->conn, m);
        return;
    case PD_MSG_PING:
        pd_enc_begin(&e, PD_MSG_PONG, m->id);
        pd_conn_send(ss->conn, &e);
        return;
    default:
        pd_conn_send_error(ss->conn, m->id, EOPNOTSUPP,
                           "%s is not served to schedulers here",
                           pd_msg_type_name(m->type));
    }
}

static void
on_agent_msg(struct sess *ss, const struct pd_msg *m)
{
    switch (m->type) {
    case PD_MSG_NODE_REGISTER:
        on_register(ss, m);
        return;
    case PD_MSG_NODE_HEARTBEAT:
        on_heartbeat(ss, m);
        return;
    case PD_MSG_SANDBOX_STATE:
        if (!is_leader(ss->n->s) || !ss->registered) {
            unregister(ss);
            send_redirect(ss, m->id);
            return;
        }
        on_state_report(ss, m);
        return;
    case PD_MSG_OK:
    case PD_MSG_ERROR:
        if (ss->list_id != 0 && m->id == ss->list_id)
            on_list_answer(ss, m);
        else
            destroy_answered(ss, m);
        return;
    case PD_MSG_PING: {
        struct pd_enc e;

        pd_enc_begin(&e, PD_MSG_PONG, m->id);
        pd_conn_send(ss->conn, &e);
        return;
    }
    default:
        pd_conn_send_error(ss->conn, m->id, EOPNOTSUPP,
                           "%s is not served to agents here",
                           pd_msg_type_name(m->type));
    }
}

static void
on_msg(struct pd_conn *c, const struct pd_msg *m)
{
    struct sess *ss = pd_conn_data(c);

    if (m->type == PD_MSG_HELLO) {
        if (!ss->hello && check_peer(ss))
            ss->hello = true;
        return;
    }
    if (!ss->hello)
        return;
    if (ss->scheduler)
        on_scheduler_msg(ss, m);
    else
        on_agent_msg(ss, m);
}

static void
on_close(struct pd_conn *c, int reason)
{
    struct sess *ss = pd_conn_data(c);
    struct sched_nodes *n = ss->n;

    if (ss->scheduler) {
        sched_forward_conn_closed(n->s, c);
        sched_lifecycle_conn_closed(n->s, c);
    } else if (ss->registered) {
        pd_info("nodes", "node %s: session closed (%s); down after %llu ms "
                "of silence", ss->node,
                pd_conn_error(c)[0] ? pd_conn_error(c) : "clean",
                (unsigned long long)n->grace_ms);
    }
    PD_UNUSED(reason);
    unregister(ss);
    ss->conn = NULL;
    if (ss->prev != NULL)
        ss->prev->next = ss->next;
    else
        n->sessions = ss->next;
    if (ss->next != NULL)
        ss->next->prev = ss->prev;
    sess_unref(ss);
    nodes_release(n);
}

static void
on_connection(uv_stream_t *server, int status)
{
    struct sched_nodes *n = server->data;
    static const struct pd_conn_cb cb = {
        .on_msg = on_msg,
        .on_close = on_close,
    };
    char name[32];
    struct pd_conn_opts o = {
        .role = "scheduler",
        .name = name,
        .tls = n->s->rpc_server_tls,
        .tls_server = true,
        .subject = "rpc",
    };
    struct sess *ss;
    uv_tcp_t *tcp;

    if (status < 0 || n->closing)
        return;
    snprintf(name, sizeof(name), "%llu", (unsigned long long)n->s->cfg.id);
    tcp = malloc(sizeof(*tcp));
    ss = calloc(1, sizeof(*ss));
    if (tcp == NULL || ss == NULL) {
        free(tcp);
        free(ss);
        return;
    }
    uv_tcp_init(server->loop, tcp);
    if (uv_accept(server, (uv_stream_t *)tcp) != 0) {
        uv_close((uv_handle_t *)tcp, (uv_close_cb)free);
        free(ss);
        return;
    }
    uv_tcp_nodelay(tcp, 1);
    ss->n = n;
    ss->refs = 1;
    ss->next = n->sessions;
    if (n->sessions != NULL)
        n->sessions->prev = ss;
    n->sessions = ss;
    ss->conn = pd_conn_new((uv_stream_t *)tcp, &o, &cb, ss);
    if (ss->conn == NULL) {
        n->sessions = ss->next;
        if (ss->next != NULL)
            ss->next->prev = NULL;
        free(ss);
        return;
    }
    n->open_handles++; /* released by on_close */
}

int
sched_nodes_init(struct sched *s, char *err, size_t errlen)
{
    struct sched_nodes *n;
    struct sockaddr_storage sa;
    int rv;

    if (s->cfg.rpc_listen == NULL ||
        sched_parse_addr(s->cfg.rpc_listen, true, &sa) != 0) {
        snprintf(err, errlen, "rpc_listen: \"%s\" is not ip:port",
                 s->cfg.rpc_listen ? s->cfg.rpc_listen : "");
        return -EINVAL;
    }
    if (s->rpc_server_tls == NULL) {
        snprintf(err, errlen, "rpc_listen needs the cluster TLS "
                 "certificates (tls_cert, tls_key, tls_ca)");
        return -EINVAL;
    }
    n = calloc(1, sizeof(*n));
    if (n == NULL)
        return -ENOMEM;
    n->s = s;
    n->grace_ms = s->cfg.grace_ms ? s->cfg.grace_ms : 5000;
    n->heartbeat_ms = s->cfg.heartbeat_ms ? s->cfg.heartbeat_ms : 1000;
    uv_tcp_init(s->loop, &n->listener);
    uv_timer_init(s->loop, &n->detector);
    n->listener.data = n->detector.data = n;
    n->open_handles = 2;
    rv = uv_tcp_bind(&n->listener, (const struct sockaddr *)&sa, 0);
    if (rv == 0)
        rv = uv_listen((uv_stream_t *)&n->listener, 512, on_connection);
    s->nodes = n;
    if (rv != 0) {
        snprintf(err, errlen, "rpc_listen %s: %s", s->cfg.rpc_listen,
                 uv_strerror(rv));
        sched_nodes_close(s);
        return -EADDRINUSE;
    }
    n->listening = true;
    rv = sched_lifecycle_init(s, err, errlen);
    if (rv != 0) {
        sched_nodes_close(s);
        return rv;
    }
    pd_info("nodes", "RPC listening on %s (mutual TLS: agents and "
            "schedulers)", s->cfg.rpc_listen);
    return 0;
}

/* The listener, the detector and every session hold n. */
static void
nodes_release(struct sched_nodes *n)
{
    if (--n->open_handles == 0) {
        seen_free_all(n);
        free(n);
    }
}

static void
on_handle_closed(uv_handle_t *h)
{
    nodes_release(h->data);
}

void
sched_nodes_close(struct sched *s)
{
    struct sched_nodes *n = s->nodes;

    if (n == NULL || n->closing)
        return;
    sched_lifecycle_close(s);
    n->closing = true;
    for (struct sess *ss = n->sessions; ss; ss = ss->next)
        if (ss->conn != NULL)
            pd_conn_close(ss->conn, 0, "scheduler stopping");
    uv_close((uv_handle_t *)&n->listener, on_handle_closed);
    uv_close((uv_handle_t *)&n->detector, on_handle_closed);
    s->nodes = NULL;
}
