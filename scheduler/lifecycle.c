/*
 * The sandbox life cycle on the leader: create, destroy, and the
 * re-placement of lost sandboxes on their next use (ensure).
 *
 * Create, happy path:
 *   1. validate; an id that exists is sent to the FSM as a PLACE on its
 *      own node, which answers "existing" for the same tenant and spec
 *      (idempotent create) or -EEXIST, without a placement;
 *   2. sched_place on the FSM's capacity index; the chosen node's
 *      resources are reserved while the PLACE is in flight (so concurrent
 *      creates do not all pick the same free slot) and released in the
 *      apply callback whatever the outcome;
 *   3. PLACE commits the sandbox as pending on that node (the FSM checks
 *      the fit again); a stale choice (-ESTALE, -ENOSPC from the FSM) is
 *      placed again with a fresh request id, at most PLACE_TRIES times;
 *   4. SANDBOX_CREATE {spec, wait: true} to the node's agent RPC
 *      (agentc.c). Its answer is the outcome: OK {state: running} or
 *      ERROR with the agent's reason. The state is committed with the
 *      node and generation, so a late answer for an older generation
 *      changes nothing. A caller that did not ask to wait is answered
 *      once the PLACE is committed (pending); one that waits is answered
 *      when the FSM shows the sandbox running, failed or lost, or when
 *      its wait_ms runs out (with the state at that moment).
 *
 * Failure modes of the assignment: an agent that refuses commits failed
 * with its reason; an agent that cannot be reached (link down) commits
 * lost, so the next use places it again elsewhere; an agent that does
 * not answer within ASSIGN_TIMEOUT_MS is treated as unreachable.
 * Leadership lost mid-way: the PLACE's outcome is unknown (-EAGAIN to the
 * caller, whose retry with the same id is idempotent); commits after it
 * fail here, and the new leader reconciles with the agent when the agent
 * registers with it (nodes.c).
 *
 * Re-placement (ensure of a lost sandbox): PLACE with replace=true on a
 * node placement chose (new generation, the stored spec), then
 * SANDBOX_DESTROY on that node first (it may be the node the sandbox was
 * lost on, back with the old VM and disk: the agent would otherwise
 * return that VM, as a create of the same id and spec is idempotent
 * there), then SANDBOX_CREATE. A follower asks the leader with
 * SANDBOX_ENSURE over the RPC link and then waits until its own FSM
 * shows the new generation running.
 *
 * Destroy: SANDBOX_DESTROY on the agent when its node is up, then FSM
 * SANDBOX_DELETE, which also removes the sandbox's ports (their preview
 * tokens die with them). A node that is down when the sandbox is
 * destroyed gets the VM destroyed when it comes back (nodes.c reconciles
 * its list against the FSM).
 *
 * Waiting uses one timer that polls the FSM rows of the waited-for
 * sandboxes every WATCH_MS: the FSM has no change callback, and a
 * follower learns of a state only by applying the log.
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

#define PLACE_TRIES 3
#define WATCH_MS 50
#define ASSIGN_TIMEOUT_MS (5ull * 60 * 1000)
#define CREATE_WAIT_DEFAULT_MS (5ull * 60 * 1000)
#define ALLOW_MAX 64

enum op_kind {
    OP_CREATE,
    OP_REPLACE,
    OP_DESTROY,
};

/* Who waits for an outcome: a create/destroy caller or an ensure caller. */
struct waiter {
    struct waiter *next;
    sched_sandbox_cb scb;
    sched_ensure_cb ecb;
    void *data;
    char id[FSM_ID_MAX + 1];
    uint64_t min_generation; /* watch: until this generation runs */
    uint64_t deadline_ms;    /* watch: answer with the state by then */
    bool replaced;           /* ensure: the answer says so */
};

/* One create, re-placement or destroy in flight. */
struct op {
    struct sched_lifecycle *lc;
    struct op *next, *prev;
    enum op_kind kind;
    struct fsm_cmd cmd;      /* PLACE, or DELETE for a destroy */
    struct fsm_kv *constraints;
    size_t n_constraints;
    struct fsm_sandbox row;  /* destroy: the row before; else after PLACE */
    char node[FSM_ID_MAX + 1];
    char rpc_addr[FSM_ADDR_MAX + 1];
    uint64_t generation;
    int tries;
    bool reserved;
    bool wait;
    uint64_t wait_ms;
    uint64_t assign_deadline_ms;
    struct sched_areq *areq;
    struct waiter *waiters;  /* answered when the op's outcome is known */
};

/* A follower's SANDBOX_ENSURE sent to the leader. */
struct asked {
    struct asked *next;
    uint64_t req_id;
    struct waiter *w;
};

/* A SANDBOX_ENSURE served for a follower. */
struct served {
    struct served *next, *prev;
    struct sched_lifecycle *lc;
    struct pd_conn *conn; /* NULL once it closed */
    uint64_t req_id;
};

struct sched_lifecycle {
    struct sched *s;
    struct op *ops;
    struct waiter *watch;
    uv_timer_t tick;
    bool closing;

    /* The link to the leader, for SANDBOX_ENSURE from a follower. */
    struct pd_conn *leader;
    uv_tcp_t *leader_tcp; /* while connecting */
    char leader_addr[FSM_ADDR_MAX + 1];
    bool leader_ready;    /* HELLO seen */
    uint64_t leader_next_id;
    struct asked *asked;
    struct served *served;
};

static void op_assign(struct op *o);
static void op_place(struct op *o);
static void watch_add(struct sched_lifecycle *lc, struct waiter *w);
static void on_tick(uv_timer_t *t);

/* ---- helpers ----------------------------------------------------------- */

static bool
is_leader(struct sched *s)
{
    return s->raft != NULL && raftnode_is_leader(s->raft);
}

static void
kv_copy(const struct fsm_kv *in, size_t n, struct fsm_kv **out, int *err)
{
    struct fsm_kv *v;

    *out = NULL;
    if (n == 0 || *err != 0)
        return;
    v = calloc(n, sizeof(*v));
    if (v == NULL) {
        *err = -ENOMEM;
        return;
    }
    for (size_t i = 0; i < n; i++) {
        v[i].key = strdup(in[i].key != NULL ? in[i].key : "");
        v[i].value = strdup(in[i].value != NULL ? in[i].value : "");
        if (v[i].key == NULL || v[i].value == NULL)
            *err = -ENOMEM;
    }
    *out = v;
}

static struct waiter *
waiter_new(const char *id, sched_sandbox_cb scb, sched_ensure_cb ecb,
           void *data)
{
    struct waiter *w = calloc(1, sizeof(*w));

    if (w == NULL)
        return NULL;
    pd_strlcpy(w->id, id, sizeof(w->id));
    w->scb = scb;
    w->ecb = ecb;
    w->data = data;
    return w;
}

/* Answers a waiter and frees it. */
static void
answer(struct waiter *w, int code, const char *msg,
       const struct fsm_sandbox *sb)
{
    if (w->scb != NULL)
        w->scb(w->data, code, msg, sb);
    else if (w->ecb != NULL)
        w->ecb(w->data, code, msg, sb, w->replaced);
    free(w);
}

static void
answer_all(struct waiter **list, int code, const char *msg,
           const struct fsm_sandbox *sb)
{
    while (*list != NULL) {
        struct waiter *w = *list;

        *list = w->next;
        answer(w, code, msg, sb);
    }
}

static struct op *
op_new(struct sched_lifecycle *lc, enum op_kind kind, int cmd_type)
{
    struct op *o = calloc(1, sizeof(*o));

    if (o == NULL)
        return NULL;
    if (fsm_cmd_init(&o->cmd, cmd_type) != 0) {
        free(o);
        return NULL;
    }
    o->lc = lc;
    o->kind = kind;
    o->next = lc->ops;
    if (lc->ops != NULL)
        lc->ops->prev = o;
    lc->ops = o;
    return o;
}

static void
op_free(struct op *o)
{
    struct sched_lifecycle *lc = o->lc;

    if (o->prev != NULL)
        o->prev->next = o->next;
    else
        lc->ops = o->next;
    if (o->next != NULL)
        o->next->prev = o->prev;
    if (o->cmd.type == FSM_CMD_SANDBOX_PLACE) {
        fsm_kv_free(o->cmd.u.place.spec.env, o->cmd.u.place.spec.n_env);
        fsm_kv_free(o->cmd.u.place.spec.labels,
                    o->cmd.u.place.spec.n_labels);
    }
    fsm_kv_free(o->constraints, o->n_constraints);
    fsm_sandbox_clear(&o->row);
    free(o);
}

static const char *
op_sandbox(const struct op *o)
{
    return o->kind == OP_DESTROY ? o->cmd.u.sandbox.sandbox
                                 : o->cmd.u.place.sandbox;
}

static struct op *
op_find(struct sched_lifecycle *lc, const char *id, enum op_kind kind)
{
    for (struct op *o = lc->ops; o != NULL; o = o->next)
        if (o->kind == kind && strcmp(op_sandbox(o), id) == 0)
            return o;
    return NULL;
}

bool
sched_lifecycle_busy(struct sched *s, const char *id)
{
    struct sched_lifecycle *lc = s->lifecycle;

    if (lc == NULL)
        return false;
    for (struct op *o = lc->ops; o != NULL; o = o->next)
        if (strcmp(op_sandbox(o), id) == 0)
            return true;
    return false;
}

/* Hands the op's waiters to the watch list (until the sandbox runs). */
static void
op_watch(struct op *o, uint64_t generation)
{
    uint64_t now = pd_now_ms();

    while (o->waiters != NULL) {
        struct waiter *w = o->waiters;

        o->waiters = w->next;
        w->next = NULL;
        w->min_generation = generation;
        if (w->deadline_ms == 0)
            w->deadline_ms = now + (o->wait_ms ? o->wait_ms
                                               : CREATE_WAIT_DEFAULT_MS);
        watch_add(o->lc, w);
    }
}

/* Answers the op's waiters with the sandbox's row as it is now. */
static void
op_answer_row(struct op *o, int code, const char *msg)
{
    struct fsm_sandbox row;

    if (fsm_sandbox_get(o->lc->s->fsm, op_sandbox(o), &row) == 0) {
        answer_all(&o->waiters, code, msg, &row);
        fsm_sandbox_clear(&row);
    } else {
        answer_all(&o->waiters, code, msg, NULL);
    }
}

/* ---- committing states ------------------------------------------------- */

struct state_prop {
    struct fsm_cmd cmd;
    struct sched_lifecycle *lc;
    struct op *op; /* NULL when nobody waits for the commit */
};

static void
on_state_applied(void *data, int status, const struct fsm_result *res)
{
    struct state_prop *p = data;
    const struct fsm_cmd_state *c = &p->cmd.u.state;

    if (status != 0 || res->code != 0)
        pd_info("lifecycle", "sandbox %s: state %s not committed (%s); the "
                "leader reconciles it with the agent", c->sandbox,
                fsm_sandbox_state_name(c->state),
                status != 0 ? strerror(-status) : res->message);
    free(p);
}

static void
commit_state(struct op *o, int state, const char *reason)
{
    struct state_prop *p = calloc(1, sizeof(*p));
    struct fsm_cmd_state *c;

    if (p == NULL || fsm_cmd_init(&p->cmd, FSM_CMD_SANDBOX_STATE) != 0) {
        free(p);
        return;
    }
    c = &p->cmd.u.state;
    pd_strlcpy(c->sandbox, op_sandbox(o), sizeof(c->sandbox));
    c->state = state;
    pd_strlcpy(c->reason, reason != NULL ? reason : "", sizeof(c->reason));
    pd_strlcpy(c->node, o->node, sizeof(c->node));
    c->generation = o->generation;
    p->lc = o->lc;
    if (o->lc->s->raft == NULL ||
        raftnode_propose(o->lc->s->raft, &p->cmd, on_state_applied, p) != 0)
        free(p);
}

/* ---- the assignment to the agent --------------------------------------- */

/* SANDBOX_CREATE's fields from the spec. token (added by tokens): the
 * sandbox-scoped token for an allow-list sandbox's egress proxy, given to
 * the guest as PADDOCK_TOKEN in place of any such variable of the spec. */
static void
encode_create(struct pd_enc *e, const char *id, const struct fsm_spec *sp,
              const char *token)
{
    const char *eg = sp->egress;
    bool listed = strcmp(eg, "none") != 0 && strcmp(eg, "all") != 0 &&
                  eg[0] != '\0';

    pd_enc_begin(e, PD_MSG_SANDBOX_CREATE, 0);
    pd_enc_str(e, "sandbox", id);
    pd_enc_u64(e, "cpus", sp->cpus);
    pd_enc_u64(e, "memory_mb", sp->memory_mb);
    pd_enc_u64(e, "disk_mb", sp->disk_mb);
    pd_enc_str(e, "egress", listed ? "allow" : eg[0] ? eg : "none");
    if (listed) {
        const char *p = eg;
        size_t n = 1;

        for (const char *q = eg; *q; q++)
            n += *q == ',';
        pd_enc_key(e, "allow");
        msgpack_pack_array(&e->pk, n);
        while (n-- > 0) {
            size_t len = strcspn(p, ",");

            msgpack_pack_str_with_body(&e->pk, p, len);
            p += len + (p[len] == ',');
        }
    }
    size_t n_env = 0;

    for (size_t i = 0; i < sp->n_env; i++)
        n_env += token == NULL || strcmp(sp->env[i].key, "PADDOCK_TOKEN");
    pd_enc_key(e, "env");
    msgpack_pack_map(&e->pk, n_env + (token != NULL));
    for (size_t i = 0; i < sp->n_env; i++) {
        if (token != NULL && strcmp(sp->env[i].key, "PADDOCK_TOKEN") == 0)
            continue;
        pd_enc_pack_str(e, sp->env[i].key);
        pd_enc_pack_str(e, sp->env[i].value);
    }
    if (token != NULL) {
        pd_enc_pack_str(e, "PADDOCK_TOKEN");
        pd_enc_pack_str(e, token);
    }
    pd_enc_bool(e, "wait", true);
}

static void
on_assign_end(struct sched_areq *q, int status, const struct pd_msg *m,
              void *data)
{
    struct op *o = data;
    const char *id = op_sandbox(o);
    char reason[FSM_REASON_MAX + 1], msg[400] = "";

    PD_UNUSED(q);
    o->areq = NULL;
    if (status == 0) {
        pd_debug("lifecycle", "sandbox %s: running on node %s (generation "
                 "%llu)", id, o->node, (unsigned long long)o->generation);
        commit_state(o, FSM_SB_RUNNING, "");
        sched_metrics_inc(o->lc->s, "sandboxes_started", 1);
    } else if (m != NULL) {
        pd_msg_cstr(m, "message", msg, sizeof(msg));
        snprintf(reason, sizeof(reason), "node %s could not start it: %s",
                 o->node, msg[0] ? msg : strerror(-status));
        pd_warn("lifecycle", "sandbox %s: %s", id, reason);
        commit_state(o, FSM_SB_FAILED, reason);
    } else {
        snprintf(reason, sizeof(reason), "node %s unreachable: %s", o->node,
                 strerror(-status));
        pd_warn("lifecycle", "sandbox %s: %s, marking it lost (placed "
                "again on its next use)", id, reason);
        commit_state(o, FSM_SB_LOST, reason);
    }
    /* The waiters watch the FSM, which shows the commit shortly. */
    op_watch(o, o->generation);
    op_free(o);
}

static void
on_assign_frame(struct sched_areq *q, const struct pd_msg *m, void *data)
{
    PD_UNUSED(q);
    PD_UNUSED(m);
    PD_UNUSED(data);
}

static const struct sched_areq_cb assign_cb = {
    .on_frame = on_assign_frame,
    .on_end = on_assign_end,
};

/*
 * Sends a request for the op. sched_agentc_send may call on_end (which
 * frees the op) before it returns NULL, so o is touched only when it
 * returned a request.
 */
static void
op_send(struct op *o, struct pd_enc *e, const struct sched_areq_cb *cb)
{
    struct sched_areq *q = sched_agentc_send(o->lc->s, o->rpc_addr, e, cb,
                                             o);

    if (q != NULL)
        o->areq = q;
}

static void
op_create_on_agent(struct op *o)
{
    const char *eg = o->row.spec.egress;
    struct pd_enc e;
    char *token = NULL;

    if (strcmp(eg, "none") != 0 && strcmp(eg, "all") != 0 && eg[0] != '\0')
        token = sched_auth_sandbox_token(o->lc->s, o->row.tenant,
                                         op_sandbox(o));
    encode_create(&e, op_sandbox(o), &o->row.spec, token);
    if (token != NULL) {
        explicit_bzero(token, strlen(token));
        free(token);
    }
    o->assign_deadline_ms = pd_now_ms() + ASSIGN_TIMEOUT_MS;
    op_send(o, &e, &assign_cb);
}

/* Re-placement: make sure the node holds no older VM of this id. */
static void
on_clear_end(struct sched_areq *q, int status, const struct pd_msg *m,
             void *data)
{
    struct op *o = data;

    PD_UNUSED(q);
    PD_UNUSED(m);
    o->areq = NULL;
    if (status != 0 && status != -ENOENT && m == NULL) {
        on_assign_end(NULL, status, NULL, o);
        return;
    }
    op_create_on_agent(o);
}

static const struct sched_areq_cb clear_cb = {
    .on_frame = on_assign_frame,
    .on_end = on_clear_end,
};

static void
op_assign(struct op *o)
{
    struct sched *s = o->lc->s;
    struct fsm_node node;
    struct pd_enc e;

    fsm_sandbox_clear(&o->row);
    if (fsm_sandbox_get(s->fsm, op_sandbox(o), &o->row) != 0 ||
        fsm_node_get(s->fsm, o->node, &node) != 0) {
        op_answer_row(o, -ENOENT, "the sandbox or its node vanished");
        op_free(o);
        return;
    }
    pd_strlcpy(o->rpc_addr, node.rpc_addr, sizeof(o->rpc_addr));
    fsm_node_clear(&node);
    if (o->kind == OP_REPLACE) {
        pd_enc_begin(&e, PD_MSG_SANDBOX_DESTROY, 0);
        pd_enc_str(&e, "sandbox", op_sandbox(o));
        o->assign_deadline_ms = pd_now_ms() + ASSIGN_TIMEOUT_MS;
        op_send(o, &e, &clear_cb);
        return;
    }
    op_create_on_agent(o);
}

/* ---- PLACE ------------------------------------------------------------- */

static void
unreserve(struct op *o)
{
    const struct fsm_spec *sp = &o->cmd.u.place.spec;

    if (!o->reserved)
        return;
    o->reserved = false;
    fsm_node_reserve(o->lc->s->fsm, o->cmd.u.place.node, sp->cpus,
                     sp->memory_mb, sp->disk_mb, -1);
}

static void
on_place_applied(void *data, int status, const struct fsm_result *res)
{
    struct op *o = data;
    const char *id = op_sandbox(o);

    unreserve(o);
    if (o->lc->closing) {
        op_free(o);
        return;
    }
    if (status == RAFTNODE_ELOST && is_leader(o->lc->s)) {
        /* Still leading (a short blip): the same request id is applied
         * at most once. */
        if (raftnode_propose(o->lc->s->raft, &o->cmd, on_place_applied,
                             o) == 0)
            return;
    }
    if (status != 0) {
        op_answer_row(o, -EAGAIN, "the leader changed during the create; "
                      "retry it (creating the same id is idempotent)");
        op_free(o);
        return;
    }
    /* A stale choice: the node went down, started draining, filled up,
     * or (for a create, where the sandbox's absence is normal) vanished.
     * Choose again from the state as it is now. */
    if ((res->code == -ESTALE || res->code == -ENOSPC ||
         (res->code == -ENOENT && !o->cmd.u.place.replace)) &&
        o->tries < PLACE_TRIES) {
        pd_trace("lifecycle", "sandbox %s: %s, placing again", id,
                 res->message);
        fsm_rid_new(&o->cmd.rid);
        op_place(o);
        return;
    }
    if (res->code != 0) {
        op_answer_row(o, res->code, res->message);
        op_free(o);
        return;
    }
    if (res->existing) {
        /* The same sandbox exists (a retried create, or a re-placement
         * someone else did): nothing to assign. */
        if (o->wait || o->kind == OP_REPLACE)
            op_watch(o, res->generation);
        else
            op_answer_row(o, 0, "");
        op_free(o);
        return;
    }
    pd_strlcpy(o->node, res->node, sizeof(o->node));
    o->generation = res->generation;
    sched_metrics_inc(o->lc->s, "placements", 1);
    pd_debug("lifecycle", "sandbox %s: placed on node %s (generation %llu)",
             id, o->node, (unsigned long long)o->generation);
    /* Waiters watch the FSM from now on (which enforces their wait_ms);
     * the others get the pending row. */
    if (o->wait || o->kind == OP_REPLACE)
        op_watch(o, o->generation);
    else
        op_answer_row(o, 0, "");
    op_assign(o);
}

/*
 * Chooses a node and proposes the PLACE. An existing sandbox (idempotent
 * create) skips the placement: the FSM compares the spec.
 */
static void
op_place(struct op *o)
{
    struct sched *s = o->lc->s;
    struct fsm_cmd_place *c = &o->cmd.u.place;
    struct sched_place_req pr = {
        .sandbox = c->sandbox,
        .cpus = c->spec.cpus,
        .memory_mb = c->spec.memory_mb,
        .disk_mb = c->spec.disk_mb,
        .constraints = o->constraints,
        .n_constraints = o->n_constraints,
        .strategy = s->strategy,
    };
    struct sched_place_out out;
    struct fsm_sandbox row;
    char why[512] = "";
    int rv;

    o->tries++;
    if (!c->replace && fsm_sandbox_get(s->fsm, c->sandbox, &row) == 0) {
        pd_strlcpy(c->node, row.node, sizeof(c->node));
        fsm_sandbox_clear(&row);
    } else {
        rv = sched_place(fsm_node_index(s->fsm), &pr, &out, why,
                         sizeof(why));
        if (rv != 0) {
            pd_info("lifecycle", "sandbox %s: %s", c->sandbox, why);
            sched_metrics_inc(s, "placements_failed", 1);
            op_answer_row(o, rv, why);
            op_free(o);
            return;
        }
        pd_strlcpy(c->node, out.node, sizeof(c->node));
        if (fsm_node_reserve(s->fsm, c->node, c->spec.cpus,
                             c->spec.memory_mb, c->spec.disk_mb, +1) == 0)
            o->reserved = true;
    }
    rv = s->raft != NULL
             ? raftnode_propose(s->raft, &o->cmd, on_place_applied, o)
             : RAFTNODE_ENOTLEADER;
    if (rv != 0) {
        unreserve(o);
        op_answer_row(o, rv == RAFTNODE_ENOTLEADER ? -EAGAIN : rv,
                      rv == RAFTNODE_ENOTLEADER
                          ? "this scheduler stopped leading; retry"
                          : "cannot propose the placement");
        op_free(o);
    }
}

static bool
egress_valid(const char *eg)
{
    size_t n = 0;

    if (strcmp(eg, "none") == 0 || strcmp(eg, "all") == 0)
        return true;
    for (const char *p = eg; *p; p++) {
        if (*p == ',') {
            if (p == eg || p[1] == '\0' || p[1] == ',')
                return false;
            n++;
            continue;
        }
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
              (*p >= '0' && *p <= '9') || *p == '.' || *p == '-' ||
              *p == ':' || (*p == '*' && (p == eg || p[-1] == ','))))
            return false;
    }
    return eg[0] != '\0' && n < ALLOW_MAX;
}

int
sched_sandbox_create(struct sched *s, const struct sched_create_req *req,
                     sched_sandbox_cb cb, void *data)
{
    struct sched_lifecycle *lc = s->lifecycle;
    const struct fsm_spec *sp = &req->spec;
    struct fsm_cmd_place *c;
    struct waiter *w;
    struct op *o;
    int err = 0;

    if (lc == NULL || !is_leader(s))
        return RAFTNODE_ENOTLEADER;
    if (!pd_id_valid(req->id)) {
        cb(data, -EINVAL, "id: want [a-z0-9][a-z0-9-]{0,62}", NULL);
        return 0;
    }
    if (!pd_id_valid(req->tenant)) {
        cb(data, -EINVAL, "tenant: not a valid id", NULL);
        return 0;
    }
    if (sp->cpus == 0 || sp->memory_mb == 0 || sp->disk_mb == 0) {
        cb(data, -EINVAL, "cpus, memory_mb and disk_mb must be positive",
           NULL);
        return 0;
    }
    if (sp->egress[0] != '\0' && !egress_valid(sp->egress)) {
        cb(data, -EINVAL, "egress: want none, all, or a comma-separated "
           "list of host names", NULL);
        return 0;
    }
    if (req->n_constraints > FSM_KV_MAX) {
        cb(data, -EINVAL, "too many label constraints", NULL);
        return 0;
    }
    o = op_new(lc, OP_CREATE, FSM_CMD_SANDBOX_PLACE);
    w = waiter_new(req->id, cb, NULL, data);
    if (o == NULL || w == NULL) {
        if (o != NULL)
            op_free(o);
        free(w);
        return -ENOMEM;
    }
    o->waiters = w;
    o->wait = req->wait;
    o->wait_ms = req->wait_ms;
    c = &o->cmd.u.place;
    pd_strlcpy(c->sandbox, req->id, sizeof(c->sandbox));
    pd_strlcpy(c->tenant, req->tenant, sizeof(c->tenant));
    c->spec.cpus = sp->cpus;
    c->spec.memory_mb = sp->memory_mb;
    c->spec.disk_mb = sp->disk_mb;
    pd_strlcpy(c->spec.egress, sp->egress[0] ? sp->egress : "none",
               sizeof(c->spec.egress));
    kv_copy(sp->env, sp->n_env, &c->spec.env, &err);
    c->spec.n_env = c->spec.env != NULL ? sp->n_env : 0;
    kv_copy(sp->labels, sp->n_labels, &c->spec.labels, &err);
    c->spec.n_labels = c->spec.labels != NULL ? sp->n_labels : 0;
    kv_copy(req->constraints, req->n_constraints, &o->constraints, &err);
    o->n_constraints = o->constraints != NULL ? req->n_constraints : 0;
    if (err != 0) {
        o->waiters = NULL;
        op_free(o);
        free(w);
        return err;
    }
    op_place(o);
    return 0;
}

/* ---- re-placement ------------------------------------------------------ */

/* Leader: place a lost sandbox again; w is answered once it runs. */
static void
replace_start(struct sched_lifecycle *lc, const struct fsm_sandbox *row,
              struct waiter *w)
{
    struct op *o = op_find(lc, row->id, OP_REPLACE);
    struct fsm_cmd_place *c;

    w->replaced = true;
    if (o != NULL) {
        w->next = o->waiters;
        o->waiters = w;
        return;
    }
    o = op_new(lc, OP_REPLACE, FSM_CMD_SANDBOX_PLACE);
    if (o == NULL) {
        answer(w, -ENOMEM, "out of memory", row);
        return;
    }
    o->waiters = w;
    o->wait = true;
    o->wait_ms = SCHED_ENSURE_WAIT_MS;
    c = &o->cmd.u.place;
    pd_strlcpy(c->sandbox, row->id, sizeof(c->sandbox));
    pd_strlcpy(c->tenant, row->tenant, sizeof(c->tenant));
    c->spec.cpus = row->spec.cpus;
    c->spec.memory_mb = row->spec.memory_mb;
    c->spec.disk_mb = row->spec.disk_mb;
    pd_strlcpy(c->spec.egress, row->spec.egress, sizeof(c->spec.egress));
    c->replace = true;
    pd_info("lifecycle", "sandbox %s: lost (%s), placing it again with a "
            "fresh disk", row->id, row->reason);
    op_place(o);
}

/* ---- the link to the leader (follower side of ensure) ------------------ */

static void
asked_fail_all(struct sched_lifecycle *lc, int code, const char *msg)
{
    while (lc->asked != NULL) {
        struct asked *a = lc->asked;

        lc->asked = a->next;
        answer(a->w, code, msg, NULL);
        free(a);
    }
}

static void
on_leader_msg(struct pd_conn *c, const struct pd_msg *m)
{
    struct sched_lifecycle *lc = pd_conn_data(c);
    struct asked **ap, *a;
    char msg[300] = "";
    uint64_t gen = 0;
    bool replaced = false;

    if (lc == NULL)
        return;
    if (m->type == PD_MSG_HELLO) {
        lc->leader_ready = true;
        return;
    }
    if (m->type != PD_MSG_OK && m->type != PD_MSG_ERROR)
        return;
    for (ap = &lc->asked; *ap != NULL && (*ap)->req_id != m->id;
         ap = &(*ap)->next)
        ;
    a = *ap;
    if (a == NULL)
        return;
    *ap = a->next;
    if (m->type == PD_MSG_ERROR) {
        int64_t en = EIO;

        pd_msg_i64(m, "errno", &en);
        pd_msg_cstr(m, "message", msg, sizeof(msg));
        answer(a->w, en > 0 ? -(int)en : -EIO, msg, NULL);
        free(a);
        return;
    }
    pd_msg_u64(m, "generation", &gen);
    pd_msg_bool(m, "replaced", &replaced);
    a->w->replaced = replaced;
    a->w->min_generation = gen;
    a->w->deadline_ms = pd_now_ms() + SCHED_ENSURE_WAIT_MS;
    watch_add(lc, a->w);
    free(a);
}

static void
on_leader_close(struct pd_conn *c, int reason)
{
    struct sched_lifecycle *lc = pd_conn_data(c);

    PD_UNUSED(reason);
    if (lc == NULL)
        return;
    if (lc->leader == c) {
        lc->leader = NULL;
        lc->leader_ready = false;
    }
    asked_fail_all(lc, -EAGAIN, "the link to the leader broke; retry");
}

struct lconnect {
    uv_connect_t req;
    struct sched_lifecycle *lc;
};

static void
on_leader_connect(uv_connect_t *req, int status)
{
    struct lconnect *lcn = (struct lconnect *)req;
    struct sched_lifecycle *lc = lcn->lc;
    uv_tcp_t *tcp = (uv_tcp_t *)req->handle;

    if (status == UV_ECANCELED) {
        free(lcn); /* lifecycle closed, and the handle with it */
        return;
    }
    static const struct pd_conn_cb cb = {
        .on_msg = on_leader_msg,
        .on_close = on_leader_close,
    };
    char name[32];
    struct pd_conn_opts opts = {
        .role = "scheduler",
        .name = name,
        .tls = lc->s->rpc_client_tls,
        .tls_server = false,
        .subject = "lifecycle",
    };

    free(lcn);
    lc->leader_tcp = NULL;
    if (status < 0 || lc->closing) {
        uv_close((uv_handle_t *)tcp, (uv_close_cb)free);
        asked_fail_all(lc, -EAGAIN, "cannot reach the leader; retry");
        return;
    }
    snprintf(name, sizeof(name), "%llu", (unsigned long long)lc->s->cfg.id);
    lc->leader = pd_conn_new((uv_stream_t *)tcp, &opts, &cb, lc);
    if (lc->leader == NULL) {
        asked_fail_all(lc, -EAGAIN, "cannot reach the leader; retry");
        return;
    }
    /* Requests queued while connecting go now (TLS buffers them until
     * the handshake is done). */
    for (struct asked *a = lc->asked; a != NULL; a = a->next) {
        struct pd_enc e;

        pd_enc_begin(&e, PD_MSG_SANDBOX_ENSURE, a->req_id);
        pd_enc_str(&e, "sandbox", a->w->id);
        pd_conn_send(lc->leader, &e);
    }
}

/* forward.c's leader RPC address, else the members table's entry for
 * raftnode's leader id (the same rule as nodes.c's redirects). */
static const char *
leader_rpc(struct sched *s)
{
    static struct fsm_member m;
    const char *addr = sched_leader_rpc_addr(s);
    char raft_addr[FSM_ADDR_MAX + 1];
    uint64_t id = 0;

    if (addr != NULL && addr[0] != '\0')
        return addr;
    if (s->raft == NULL)
        return NULL;
    raftnode_leader(s->raft, &id, raft_addr, sizeof(raft_addr));
    if (id == 0 || fsm_member_get(s->fsm, id, &m) != 0)
        return NULL;
    return m.rpc_addr;
}

/* Follower: asks the leader to ensure the sandbox. */
static void
ask_leader(struct sched_lifecycle *lc, struct waiter *w)
{
    const char *addr = leader_rpc(lc->s);
    struct sockaddr_storage sa;
    struct asked *a;
    struct pd_enc e;

    if (addr == NULL || addr[0] == '\0') {
        answer(w, -EAGAIN, "no leader right now; retry", NULL);
        return;
    }
    if (lc->leader != NULL && strcmp(lc->leader_addr, addr) != 0) {
        pd_conn_close(lc->leader, 0, "the leader moved to %s", addr);
        lc->leader = NULL;
    }
    a = calloc(1, sizeof(*a));
    if (a == NULL) {
        answer(w, -ENOMEM, "out of memory", NULL);
        return;
    }
    a->w = w;
    a->req_id = ++lc->leader_next_id;
    a->next = lc->asked;
    lc->asked = a;
    if (lc->leader != NULL) {
        pd_enc_begin(&e, PD_MSG_SANDBOX_ENSURE, a->req_id);
        pd_enc_str(&e, "sandbox", w->id);
        pd_conn_send(lc->leader, &e);
        return;
    }
    if (lc->leader_tcp != NULL)
        return; /* sent once connected */
    if (sched_parse_addr(addr, false, &sa) != 0) {
        asked_fail_all(lc, -EAGAIN, "the leader's RPC address is unusable");
        return;
    }
    struct lconnect *lcn = calloc(1, sizeof(*lcn));
    uv_tcp_t *tcp = malloc(sizeof(*tcp));

    if (lcn == NULL || tcp == NULL) {
        free(lcn);
        free(tcp);
        asked_fail_all(lc, -ENOMEM, "out of memory");
        return;
    }
    uv_tcp_init(lc->s->loop, tcp);
    lcn->lc = lc;
    pd_strlcpy(lc->leader_addr, addr, sizeof(lc->leader_addr));
    if (uv_tcp_connect(&lcn->req, tcp, (const struct sockaddr *)&sa,
                       on_leader_connect) != 0) {
        free(lcn);
        uv_close((uv_handle_t *)tcp, (uv_close_cb)free);
        asked_fail_all(lc, -EAGAIN, "cannot reach the leader; retry");
        return;
    }
    lc->leader_tcp = tcp;
}

/* ---- ensure ------------------------------------------------------------ */

/* What ensure answers for a row, or 1 when it must wait or re-place. */
static int
judge(const struct fsm_sandbox *row, const char **msg, char *buf,
      size_t buflen)
{
    switch (row->state) {
    case FSM_SB_RUNNING:
        *msg = "";
        return 0;
    case FSM_SB_STOPPING:
    case FSM_SB_STOPPED:
        snprintf(buf, buflen, "sandbox %s is %s", row->id,
                 fsm_sandbox_state_name(row->state));
        *msg = buf;
        return -ENOTCONN;
    case FSM_SB_FAILED:
        snprintf(buf, buflen, "sandbox %s failed: %s", row->id,
                 row->reason);
        *msg = buf;
        return -EIO;
    default:
        return 1;
    }
}

void
sched_sandbox_ensure(struct sched *s, const char *id, sched_ensure_cb cb,
                     void *data)
{
    struct sched_lifecycle *lc = s->lifecycle;
    struct fsm_sandbox row;
    struct waiter *w;
    const char *msg;
    char buf[FSM_REASON_MAX + 200];
    int rv;

    if (lc == NULL) {
        cb(data, -EAGAIN, "the scheduler is starting or stopping", NULL,
           false);
        return;
    }
    rv = fsm_sandbox_get(s->fsm, id, &row);
    if (rv != 0) {
        snprintf(buf, sizeof(buf), "no sandbox %s", id);
        cb(data, rv == -ENOENT ? -ENOENT : rv, buf, NULL, false);
        return;
    }
    rv = judge(&row, &msg, buf, sizeof(buf));
    if (rv <= 0) {
        cb(data, rv, msg, &row, false);
        fsm_sandbox_clear(&row);
        return;
    }
    w = waiter_new(id, NULL, cb, data);
    if (w == NULL) {
        cb(data, -ENOMEM, "out of memory", &row, false);
        fsm_sandbox_clear(&row);
        return;
    }
    if (row.state != FSM_SB_LOST) {
        /* pending or starting: wait until it runs */
        w->min_generation = row.generation;
        w->deadline_ms = pd_now_ms() + SCHED_ENSURE_WAIT_MS;
        watch_add(lc, w);
    } else if (is_leader(s)) {
        replace_start(lc, &row, w);
    } else {
        ask_leader(lc, w);
    }
    fsm_sandbox_clear(&row);
}

/* ---- watching the FSM -------------------------------------------------- */

static void
watch_add(struct sched_lifecycle *lc, struct waiter *w)
{
    w->next = lc->watch;
    lc->watch = w;
}

/* One waiter's verdict: true when answered (and freed). */
static bool
watch_check(struct sched_lifecycle *lc, struct waiter *w, uint64_t now)
{
    struct fsm_sandbox row;
    char buf[FSM_REASON_MAX + 200];
    const char *msg = "";
    int rv = fsm_sandbox_get(lc->s->fsm, w->id, &row);

    if (rv != 0) {
        snprintf(buf, sizeof(buf), "sandbox %s was destroyed", w->id);
        answer(w, -ENOENT, buf, NULL);
        return true;
    }
    if (row.generation < w->min_generation && now < w->deadline_ms) {
        fsm_sandbox_clear(&row);
        return false; /* this member has not applied it yet */
    }
    rv = judge(&row, &msg, buf, sizeof(buf));
    if (rv == 1 && row.state == FSM_SB_LOST &&
        row.generation >= w->min_generation) {
        snprintf(buf, sizeof(buf), "sandbox %s was lost while starting: "
                 "%s; retry", w->id, row.reason);
        msg = buf;
        rv = -EAGAIN;
    }
    if (rv == 1 && now < w->deadline_ms) {
        fsm_sandbox_clear(&row);
        return false;
    }
    if (w->scb != NULL) {
        /* A create answers with the row whatever its state. */
        answer(w, 0, "", &row);
    } else if (rv == 1) {
        snprintf(buf, sizeof(buf), "sandbox %s is still %s", w->id,
                 fsm_sandbox_state_name(row.state));
        answer(w, -ETIMEDOUT, buf, &row);
    } else {
        answer(w, rv, msg, &row);
    }
    fsm_sandbox_clear(&row);
    return true;
}

static void
on_tick(uv_timer_t *t)
{
    struct sched_lifecycle *lc = t->data;
    uint64_t now = pd_now_ms();
    struct waiter *list = lc->watch, *keep = NULL;

    lc->watch = NULL;
    while (list != NULL) {
        struct waiter *w = list;

        list = w->next;
        w->next = NULL;
        if (!watch_check(lc, w, now)) {
            w->next = keep;
            keep = w;
        }
    }
    /* Answers may have added waiters meanwhile. */
    while (keep != NULL) {
        struct waiter *w = keep;

        keep = w->next;
        w->next = lc->watch;
        lc->watch = w;
    }
    for (struct op *o = lc->ops; o != NULL; o = o->next) {
        if (o->areq != NULL && o->assign_deadline_ms != 0 &&
            now > o->assign_deadline_ms) {
            struct sched_areq *q = o->areq;

            o->areq = NULL;
            sched_areq_cancel(q);
            on_assign_end(NULL, -ETIMEDOUT, NULL, o);
            break; /* the list changed; the rest on the next tick */
        }
    }
}

/* ---- destroy ----------------------------------------------------------- */

static void
on_delete_applied(void *data, int status, const struct fsm_result *res)
{
    struct op *o = data;

    if (status == RAFTNODE_ELOST && is_leader(o->lc->s) &&
        raftnode_propose(o->lc->s->raft, &o->cmd, on_delete_applied, o) == 0)
        return;
    if (status != 0) {
        answer_all(&o->waiters, -EAGAIN, "the leader changed during the "
                   "destroy; retry it", &o->row);
    } else if (res->code != 0 && res->code != -ENOENT) {
        answer_all(&o->waiters, res->code, res->message, &o->row);
    } else {
        pd_info("lifecycle", "sandbox %s: destroyed", o->row.id);
        o->row.state = FSM_SB_STOPPED;
        answer_all(&o->waiters, 0, "", &o->row);
    }
    op_free(o);
}

static void
op_delete(struct op *o)
{
    struct sched *s = o->lc->s;

    if (s->raft == NULL ||
        raftnode_propose(s->raft, &o->cmd, on_delete_applied, o) != 0) {
        answer_all(&o->waiters, -EAGAIN, "this scheduler stopped leading; "
                   "retry", &o->row);
        op_free(o);
    }
}

static void
on_destroy_end(struct sched_areq *q, int status, const struct pd_msg *m,
               void *data)
{
    struct op *o = data;

    PD_UNUSED(q);
    PD_UNUSED(m);
    o->areq = NULL;
    if (status != 0 && status != -ENOENT)
        pd_info("lifecycle", "sandbox %s: destroy on node %s: %s; deleting "
                "it anyway, the node reconciles when it next registers",
                o->row.id, o->row.node, strerror(-status));
    op_delete(o);
}

static const struct sched_areq_cb destroy_cb = {
    .on_frame = on_assign_frame,
    .on_end = on_destroy_end,
};

int
sched_sandbox_destroy(struct sched *s, const char *id, sched_sandbox_cb cb,
                      void *data)
{
    struct sched_lifecycle *lc = s->lifecycle;
    struct fsm_node node;
    struct waiter *w;
    struct op *o;
    char buf[128];
    int rv;

    if (lc == NULL || !is_leader(s))
        return RAFTNODE_ENOTLEADER;
    if (!pd_id_valid(id)) {
        cb(data, -EINVAL, "id: want [a-z0-9][a-z0-9-]{0,62}", NULL);
        return 0;
    }
    o = op_find(lc, id, OP_DESTROY);
    w = waiter_new(id, cb, NULL, data);
    if (w == NULL)
        return -ENOMEM;
    if (o != NULL) {
        w->next = o->waiters;
        o->waiters = w;
        return 0;
    }
    o = op_new(lc, OP_DESTROY, FSM_CMD_SANDBOX_DELETE);
    if (o == NULL) {
        free(w);
        return -ENOMEM;
    }
    o->waiters = w;
    pd_strlcpy(o->cmd.u.sandbox.sandbox, id, sizeof(o->cmd.u.sandbox.sandbox));
    rv = fsm_sandbox_get(s->fsm, id, &o->row);
    if (rv != 0) {
        snprintf(buf, sizeof(buf), "no sandbox %s", id);
        answer_all(&o->waiters, rv, buf, NULL);
        op_free(o);
        return 0;
    }
    pd_strlcpy(o->node, o->row.node, sizeof(o->node));
    o->generation = o->row.generation;
    /* The VM (or a failed one's disk) is on a node that is up: stop it
     * there first. Otherwise reconciliation does it on the node's
     * return. */
    if (o->row.state != FSM_SB_LOST && o->row.state != FSM_SB_STOPPED &&
        fsm_node_get(s->fsm, o->row.node, &node) == 0) {
        bool up = node.state == FSM_NODE_READY;
        struct pd_enc e;

        pd_strlcpy(o->rpc_addr, node.rpc_addr, sizeof(o->rpc_addr));
        fsm_node_clear(&node);
        if (up) {
            pd_enc_begin(&e, PD_MSG_SANDBOX_DESTROY, 0);
            pd_enc_str(&e, "sandbox", id);
            o->assign_deadline_ms = 0;
            op_send(o, &e, &destroy_cb);
            return 0;
        }
    }
    op_delete(o);
    return 0;
}

/* ---- SANDBOX_ENSURE served for followers ------------------------------- */

static void
on_served(void *data, int code, const char *message,
          const struct fsm_sandbox *sb, bool replaced)
{
    struct served *sv = data;
    struct sched_lifecycle *lc = sv->lc;
    struct pd_enc e;

    if (sv->conn != NULL) {
        if (code != 0) {
            pd_conn_send_error(sv->conn, sv->req_id, -code, "%s", message);
        } else {
            pd_enc_begin(&e, PD_MSG_OK, sv->req_id);
            pd_enc_bool(&e, "replaced", replaced);
            pd_enc_str(&e, "node", sb != NULL ? sb->node : "");
            pd_enc_u64(&e, "generation", sb != NULL ? sb->generation : 0);
            pd_conn_send(sv->conn, &e);
        }
    }
    if (sv->prev != NULL)
        sv->prev->next = sv->next;
    else
        lc->served = sv->next;
    if (sv->next != NULL)
        sv->next->prev = sv->prev;
    free(sv);
}

void
sched_lifecycle_serve(struct sched *s, struct pd_conn *c,
                      const struct pd_msg *m)
{
    struct sched_lifecycle *lc = s->lifecycle;
    char id[FSM_ID_MAX + 1];
    struct served *sv;

    if (lc == NULL || !is_leader(s)) {
        pd_conn_send_error(c, m->id, EREMOTE, "not the leader");
        return;
    }
    if (pd_msg_cstr(m, "sandbox", id, sizeof(id)) != 0 || !pd_id_valid(id)) {
        pd_conn_send_error(c, m->id, EINVAL, "sandbox: want a sandbox id");
        return;
    }
    sv = calloc(1, sizeof(*sv));
    if (sv == NULL) {
        pd_conn_send_error(c, m->id, ENOMEM, "out of memory");
        return;
    }
    sv->lc = lc;
    sv->conn = c;
    sv->req_id = m->id;
    sv->next = lc->served;
    if (lc->served != NULL)
        lc->served->prev = sv;
    lc->served = sv;
    sched_sandbox_ensure(s, id, on_served, sv);
}

void
sched_lifecycle_conn_closed(struct sched *s, struct pd_conn *c)
{
    struct sched_lifecycle *lc = s->lifecycle;

    if (lc == NULL)
        return;
    for (struct served *sv = lc->served; sv != NULL; sv = sv->next)
        if (sv->conn == c)
            sv->conn = NULL;
}

/* ---- init and close ---------------------------------------------------- */

int
sched_lifecycle_init(struct sched *s, char *err, size_t errlen)
{
    struct sched_lifecycle *lc = calloc(1, sizeof(*lc));

    PD_UNUSED(err);
    PD_UNUSED(errlen);
    if (lc == NULL)
        return -ENOMEM;
    lc->s = s;
    uv_timer_init(s->loop, &lc->tick);
    lc->tick.data = lc;
    /* Always on (20 wake-ups a second, a list walk each) but unref'd, so
     * it never keeps the loop alive by itself. */
    uv_timer_start(&lc->tick, on_tick, WATCH_MS, WATCH_MS);
    uv_unref((uv_handle_t *)&lc->tick);
    s->lifecycle = lc;
    return 0;
}

static void
on_tick_closed(uv_handle_t *h)
{
    free(h->data);
}

void
sched_lifecycle_close(struct sched *s)
{
    struct sched_lifecycle *lc = s->lifecycle;

    if (lc == NULL)
        return;
    lc->closing = true;
    s->lifecycle = NULL;
    /* Callers are not answered at shutdown: the API is closed by now. */
    while (lc->ops != NULL) {
        struct op *o = lc->ops;

        if (o->areq != NULL)
            sched_areq_cancel(o->areq);
        while (o->waiters != NULL) {
            struct waiter *w = o->waiters;

            o->waiters = w->next;
            free(w);
        }
        op_free(o);
    }
    while (lc->watch != NULL) {
        struct waiter *w = lc->watch;

        lc->watch = w->next;
        free(w);
    }
    while (lc->asked != NULL) {
        struct asked *a = lc->asked;

        lc->asked = a->next;
        free(a->w);
        free(a);
    }
    while (lc->served != NULL) {
        struct served *sv = lc->served;

        lc->served = sv->next;
        free(sv);
    }
    if (lc->leader != NULL) {
        pd_conn_set_data(lc->leader, NULL);
        pd_conn_close(lc->leader, 0, "scheduler stopping");
    }
    if (lc->leader_tcp != NULL)
        uv_close((uv_handle_t *)lc->leader_tcp, (uv_close_cb)free);
    uv_close((uv_handle_t *)&lc->tick, on_tick_closed);
}
