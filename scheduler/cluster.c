/*
 * The Raft member as the rest of the scheduler sees it.
 *
 * Start: the bootstrap list ("1=127.0.0.1:7001,2=...") is written as the
 * initial configuration on the very first start only; later starts resume
 * from the log. With no list the member waits to be added (join mode).
 *
 * Leadership: raft_leader() knows only Raft addresses, so a new leader
 * first proposes MEMBER_SET with its own API, RPC and preview addresses;
 * followers read them from the members table to forward writes and to
 * redirect agents. Then it lets auth (signing key, bootstrap admin token)
 * and the node sessions (failure detector) start their leader duties.
 *
 * Membership changes go one at a time (raft refuses a second one with
 * RAFT_CANTCHANGE; this file answers 409 before even asking): add is
 * raftnode_add (spare, then voter) followed by MEMBER_SET for the new
 * member's addresses when they were given (else the member records them
 * itself through the leader once it follows); remove is raftnode_remove
 * then MEMBER_REMOVE. The leader does not remove itself: it would step
 * down before it could answer, so it hands leadership over and forwards
 * the removal to the new leader.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "scheduler/sched.h"

#define MEMBER_RETRY_MS 500
#define SELF_CHECK_MS   1000

static struct {
    struct sched *s;
    uv_timer_t retry;        /* own MEMBER_SET after a failed proposal */
    bool retry_init;
    bool member_ok;          /* own MEMBER_SET applied this term */
    uint64_t member_term;
    bool change_busy;        /* a membership change is in flight */
    uv_timer_t self_check;   /* follower: are our addresses recorded? */
    bool self_inflight;
    void (*handover_done)(void *data);
    void *handover_data;
} cl;

/* ---- Own addresses on leadership --------------------------------------- */

static void fill_self(struct sched *s, struct fsm_cmd_member *m);

static bool
member_row_current(struct sched *s)
{
    struct fsm_member m;
    struct fsm_cmd_member want;

    if (fsm_member_get(s->fsm, s->cfg.id, &m) != 0)
        return false;
    fill_self(s, &want);
    return strcmp(m.raft_addr, want.raft_addr) == 0 &&
           strcmp(m.api_addr, want.api_addr) == 0 &&
           strcmp(m.rpc_addr, want.rpc_addr) == 0 &&
           strcmp(m.preview_addr, want.preview_addr) == 0;
}

static void
fill_self(struct sched *s, struct fsm_cmd_member *m)
{
    memset(m, 0, sizeof(*m));
    m->id = s->cfg.id;
    pd_strlcpy(m->raft_addr, s->cfg.raft_addr, sizeof(m->raft_addr));
    pd_strlcpy(m->api_addr, s->cfg.api_listen, sizeof(m->api_addr));
    pd_strlcpy(m->rpc_addr, s->cfg.rpc_listen, sizeof(m->rpc_addr));
    pd_strlcpy(m->preview_addr, s->cfg.preview_listen,
               sizeof(m->preview_addr));
}

static void propose_self(struct sched *s);

static void
on_retry(uv_timer_t *t)
{
    struct sched *s = t->data;

    if (!s->stopping && s->raft != NULL && raftnode_is_leader(s->raft))
        propose_self(s);
}

static void
self_applied(void *data, int status, const struct fsm_result *res)
{
    struct sched *s = data;

    if (status == 0 && res->code == 0) {
        cl.member_ok = true;
        pd_info("cluster", "member %llu: addresses recorded (API %s, RPC "
                "%s)", (unsigned long long)s->cfg.id, s->cfg.api_listen,
                s->cfg.rpc_listen);
        return;
    }
    pd_warn("cluster", "member %llu: recording own addresses failed (%s), "
            "retrying in %d ms", (unsigned long long)s->cfg.id,
            status != 0 ? strerror(-status) : res->message,
            MEMBER_RETRY_MS);
    if (!s->stopping)
        uv_timer_start(&cl.retry, on_retry, MEMBER_RETRY_MS, 0);
}

static void
propose_self(struct sched *s)
{
    struct fsm_cmd cmd;
    int rv;

    if (member_row_current(s)) {
        cl.member_ok = true;
        return;
    }
    if ((rv = fsm_cmd_init(&cmd, FSM_CMD_MEMBER_SET)) == 0) {
        fill_self(s, &cmd.u.member);
        rv = raftnode_propose(s->raft, &cmd, self_applied, s);
    }
    if (rv != 0 && rv != RAFTNODE_ENOTLEADER && !s->stopping) {
        pd_warn("cluster", "member %llu: cannot propose own addresses (%s), "
                "retrying in %d ms", (unsigned long long)s->cfg.id,
                strerror(-rv), MEMBER_RETRY_MS);
        uv_timer_start(&cl.retry, on_retry, MEMBER_RETRY_MS, 0);
    }
}

/*
 * A follower whose addresses the members table lacks (a bootstrap member
 * that never led, or one whose addresses changed) asks the leader to
 * record them, so GET /v1/cluster shows every member's API address.
 */
static void
self_done(void *data, int status)
{
    struct sched *s = data;

    cl.self_inflight = false;
    if (status != 200)
        pd_debug("cluster", "member %llu: recording own addresses through "
                 "the leader: status %d, retrying",
                 (unsigned long long)s->cfg.id, status);
}

static void
on_self_check(uv_timer_t *t)
{
    struct sched *s = t->data;
    struct fsm_cmd_member m;
    char target[64];
    char *body;
    json_t *j;

    if (s->stopping || s->raft == NULL || cl.self_inflight ||
        raftnode_is_leader(s->raft) || sched_leader_rpc_addr(s) == NULL ||
        member_row_current(s))
        return;
    fill_self(s, &m);
    j = json_pack("{s:s,s:s,s:s,s:s}", "raft_addr", m.raft_addr,
                  "api_addr", m.api_addr, "rpc_addr", m.rpc_addr,
                  "preview_addr", m.preview_addr);
    body = j != NULL ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    if (body == NULL)
        return;
    snprintf(target, sizeof(target), "/v1/cluster/members/%llu",
             (unsigned long long)s->cfg.id);
    if (sched_forward_internal(s, "PUT", target, body, self_done, s) == 0)
        cl.self_inflight = true;
    free(body);
}

static void
on_state(struct raftnode *n, int old_state, int new_state, void *data)
{
    struct sched *s = data;
    struct raftnode_status st;

    PD_UNUSED(n);
    raftnode_status(s->raft, &st);
    pd_info("raft", "member %llu: %s -> %s in term %llu",
            (unsigned long long)s->cfg.id, raftnode_state_name(old_state),
            raftnode_state_name(new_state), (unsigned long long)st.term);
    if (s->stopping)
        return;
    if (new_state == RAFT_LEADER) {
        sched_metrics_inc(s, "leader_elections_won", 1);
        cl.member_ok = false;
        cl.member_term = st.term;
        propose_self(s);
        sched_auth_on_leader(s);
        sched_nodes_on_state(s, true);
    } else if (old_state == RAFT_LEADER) {
        uv_timer_stop(&cl.retry);
        cl.change_busy = false;
        sched_nodes_on_state(s, false);
    }
}

/* ---- Start and stop ----------------------------------------------------- */

/* "1=127.0.0.1:7001,2=127.0.0.1:7002" into peers. */
static int
parse_bootstrap(const char *list, struct raftnode_peer **out, size_t *n,
                char *err, size_t errlen)
{
    struct raftnode_peer *v = NULL;
    size_t cnt = 0;
    const char *p = list;

    *out = NULL;
    *n = 0;
    while (p != NULL && *p != '\0') {
        const char *end = strchr(p, ',');
        size_t len = end != NULL ? (size_t)(end - p) : strlen(p);
        char item[FSM_ADDR_MAX + 32];
        char *eq, *idend;
        unsigned long long id;
        struct raftnode_peer *nv;

        if (len == 0 || len >= sizeof(item))
            goto bad;
        memcpy(item, p, len);
        item[len] = '\0';
        eq = strchr(item, '=');
        if (eq == NULL || eq == item || eq[1] == '\0')
            goto bad;
        *eq = '\0';
        id = strtoull(item, &idend, 10);
        if (*idend != '\0' || id == 0)
            goto bad;
        nv = realloc(v, (cnt + 1) * sizeof(*v));
        if (nv == NULL) {
            free(v);
            return -ENOMEM;
        }
        v = nv;
        memset(&v[cnt], 0, sizeof(v[cnt]));
        v[cnt].id = id;
        v[cnt].voter = true;
        pd_strlcpy(v[cnt].address, eq + 1, sizeof(v[cnt].address));
        cnt++;
        p = end != NULL ? end + 1 : NULL;
        continue;
bad:
        snprintf(err, errlen, "bootstrap: \"%.*s\" is not id=host:port",
                 (int)len, p);
        free(v);
        return -EINVAL;
    }
    *out = v;
    *n = cnt;
    return 0;
}

/* Checks the bootstrap list against this member's id and Raft address;
 * fills *out (malloc'd) when out is not NULL. */
static int
check_bootstrap(const struct sched_cfg *cfg, struct raftnode_peer **out,
                size_t *nout, char *err, size_t errlen)
{
    struct raftnode_peer *peers;
    size_t npeers, i, j;
    bool self_listed = false;
    int rv;

    rv = parse_bootstrap(cfg->bootstrap, &peers, &npeers, err, errlen);
    if (rv != 0)
        return rv;
    for (i = 0; i < npeers && rv == 0; i++) {
        const char *colon = strrchr(peers[i].address, ':');

        if (colon == NULL || colon == peers[i].address ||
            colon[1] == '\0' ||
            strspn(colon + 1, "0123456789") != strlen(colon + 1)) {
            snprintf(err, errlen, "bootstrap: member %llu: \"%s\" is not "
                     "host:port", (unsigned long long)peers[i].id,
                     peers[i].address);
            rv = -EINVAL;
        }
        for (j = 0; j < i && rv == 0; j++) {
            if (peers[j].id == peers[i].id ||
                strcmp(peers[j].address, peers[i].address) == 0) {
                snprintf(err, errlen, "bootstrap: member %llu or address "
                         "%s is listed twice",
                         (unsigned long long)peers[i].id, peers[i].address);
                rv = -EINVAL;
            }
        }
        if (rv != 0 || peers[i].id != cfg->id)
            continue;
        self_listed = true;
        if (strcmp(peers[i].address, cfg->raft_addr) != 0) {
            snprintf(err, errlen, "bootstrap: member %llu is listed at %s "
                     "but raft_addr is %s", (unsigned long long)cfg->id,
                     peers[i].address, cfg->raft_addr);
            rv = -EINVAL;
        }
    }
    if (rv == 0 && npeers > 0 && !self_listed) {
        snprintf(err, errlen, "bootstrap: this member (id %llu) is not in "
                 "the list", (unsigned long long)cfg->id);
        rv = -EINVAL;
    }
    if (rv != 0 || out == NULL) {
        free(peers);
        return rv;
    }
    *out = peers;
    *nout = npeers;
    return 0;
}

int
sched_cluster_check(const struct sched_cfg *cfg, char *err, size_t errlen)
{
    return check_bootstrap(cfg, NULL, NULL, err, errlen);
}

int
sched_cluster_init(struct sched *s, char *err, size_t errlen)
{
    struct raftnode_config rc;
    struct raftnode_peer *peers = NULL;
    size_t npeers = 0;
    char dir[4096];
    int rv;

    cl.s = s;
    rv = check_bootstrap(&s->cfg, &peers, &npeers, err, errlen);
    if (rv != 0)
        return rv;
    snprintf(dir, sizeof(dir), "%s/raft", s->cfg.data_dir);
    memset(&rc, 0, sizeof(rc));
    rc.dir = dir;
    rc.id = s->cfg.id;
    rc.address = s->cfg.raft_addr;
    rc.bootstrap = peers;
    rc.n_bootstrap = npeers;
    rc.election_timeout_ms = (unsigned)s->cfg.election_timeout_ms;
    rc.heartbeat_timeout_ms = (unsigned)(s->cfg.election_timeout_ms / 10);
    rc.snapshot_threshold = (unsigned)s->cfg.snapshot_threshold;
    /* Keep as many entries after a snapshot as between two: a follower
     * that lags a little catches up from the log, not a whole snapshot. */
    rc.snapshot_trailing = (unsigned)s->cfg.snapshot_threshold;
    rc.on_state = on_state;
    rc.data = s;
    /* Raft between schedulers under the same mutual TLS as their RPC
     * port (raft/transport_tls.h); off only by raft_tls = false. */
    if (s->cfg.raft_tls) {
        rc.tls_server = s->rpc_server_tls;
        rc.tls_client = s->rpc_client_tls;
    }
    rv = raftnode_new(&s->raft, s->loop, s->fsm, &rc, err, errlen);
    free(peers);
    if (rv != 0)
        return rv;
    uv_timer_init(s->loop, &cl.retry);
    cl.retry.data = s;
    uv_timer_init(s->loop, &cl.self_check);
    cl.self_check.data = s;
    cl.retry_init = true;
    uv_timer_start(&cl.self_check, on_self_check, SELF_CHECK_MS,
                   SELF_CHECK_MS);
    if ((rv = raftnode_start(s->raft)) != 0) {
        snprintf(err, errlen, "raft: %s", raftnode_errmsg(s->raft));
        return rv;
    }
    sched_nodes_on_state(s, false);
    if (npeers == 0)
        pd_info("cluster", "member %llu: no bootstrap list; waiting to be "
                "added (or resuming from %s)", (unsigned long long)s->cfg.id,
                dir);
    return 0;
}

static void
on_transfer(void *data, int status, const char *msg)
{
    struct sched *s = data;
    void (*done)(void *) = cl.handover_done;

    if (status != 0)
        pd_warn("cluster", "member %llu: leadership transfer failed (%s), "
                "shutting down anyway", (unsigned long long)s->cfg.id,
                *msg != '\0' ? msg : strerror(-status));
    else
        pd_info("cluster", "member %llu: leadership handed over",
                (unsigned long long)s->cfg.id);
    cl.handover_done = NULL;
    if (done != NULL)
        done(cl.handover_data);
}

void
sched_cluster_handover(struct sched *s, void (*done)(void *data), void *data)
{
    struct raftnode_status st;
    int rv;

    if (s->raft == NULL || !raftnode_is_leader(s->raft)) {
        done(data);
        return;
    }
    raftnode_status(s->raft, &st);
    if (st.voters < 2) {
        done(data);
        return;
    }
    cl.handover_done = done;
    cl.handover_data = data;
    rv = raftnode_transfer(s->raft, 0, on_transfer, s);
    if (rv != 0) {
        cl.handover_done = NULL;
        pd_warn("cluster", "member %llu: cannot hand leadership over (%s), "
                "shutting down anyway", (unsigned long long)s->cfg.id,
                strerror(-rv));
        done(data);
    }
}

struct close_ctx {
    void (*done)(void *data);
    void *data;
};

static void
on_raft_closed(void *data)
{
    struct close_ctx *x = data;

    cl.s->raft = NULL;
    x->done(x->data);
    free(x);
}

void
sched_cluster_close(struct sched *s, void (*done)(void *data), void *data)
{
    struct close_ctx *x;

    if (cl.retry_init) {
        uv_timer_stop(&cl.retry);
        uv_close((uv_handle_t *)&cl.retry, NULL);
        uv_close((uv_handle_t *)&cl.self_check, NULL);
        cl.retry_init = false;
    }
    if (s->raft == NULL || (x = malloc(sizeof(*x))) == NULL) {
        done(data);
        return;
    }
    x->done = done;
    x->data = data;
    raftnode_close(s->raft, false, on_raft_closed, x);
}

/* ---- The API ------------------------------------------------------------ */

static bool
require_admin(struct sched_call *c, struct pd_http_req *r)
{
    if (c->who.role == SCHED_ROLE_ADMIN)
        return true;
    pd_http_respond_error(r, 403, "forbidden",
                          "cluster membership needs an admin token");
    return false;
}

static const char *
role_name(int role)
{
    switch (role) {
    case RAFT_VOTER:
        return "voter";
    case RAFT_STANDBY:
        return "standby";
    case RAFT_SPARE:
        return "spare";
    default:
        return "unknown";
    }
}

static void
get_cluster(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    struct sched_call *c = arg;
    struct sched *s = c->s;
    struct raftnode_status st;
    struct raft *raft = raftnode_raft(s->raft);
    json_t *j, *members;
    unsigned i;

    PD_UNUSED(p);
    if (!require_admin(c, r))
        return;
    raftnode_status(s->raft, &st);
    members = json_array();
    for (i = 0; i < raft->configuration.n; i++) {
        const struct raft_server *sv = &raft->configuration.servers[i];
        struct fsm_member m;
        json_t *o;

        memset(&m, 0, sizeof(m));
        fsm_member_get(s->fsm, sv->id, &m);
        o = json_pack("{s:I,s:s,s:b,s:s,s:s,s:s,s:s}",
                      "id", (json_int_t)sv->id,
                      "role", role_name(sv->role),
                      "leader", sv->id == st.leader_id,
                      "raft_addr", sv->address,
                      "api_addr", m.api_addr,
                      "rpc_addr", m.rpc_addr,
                      "preview_addr", m.preview_addr);
        json_array_append_new(members, o);
    }
    j = json_pack("{s:I,s:I,s:I,s:I,s:s,s:o}",
                  "leader", (json_int_t)st.leader_id,
                  "term", (json_int_t)st.term,
                  "commit_index", (json_int_t)st.commit_index,
                  "self", (json_int_t)st.id,
                  "state", raftnode_state_name(st.state),
                  "members", members);
    if (st.leader_id != 0) {
        const char *api = sched_leader_api_addr(s);

        json_object_set_new(j, "leader_api_addr",
                            json_string(api != NULL ? api : ""));
    }
    pd_http_respond_json(r, 200, j);
}

/* A membership change in progress (the request waits for it). */
struct change {
    struct sched *s;
    struct pd_http_req *r;
    struct fsm_cmd_member m;
    bool add;
};

static int
status_of(int err)
{
    switch (err) {
    case -EBUSY:
    case -EEXIST:
        return 409;
    case -ENOENT:
        return 404;
    case -EINVAL:
        return 400;
    default:
        return 503;
    }
}

static const char *
code_of(int status)
{
    switch (status) {
    case 409:
        return "conflict";
    case 404:
        return "not_found";
    case 400:
        return "invalid_argument";
    default:
        return "unavailable";
    }
}

static void
change_finish(struct change *x, int status, json_t *ok, const char *msg)
{
    cl.change_busy = false;
    if (ok != NULL)
        pd_http_respond_json(x->r, status, ok);
    else
        pd_http_respond_error(x->r, status, code_of(status),
                              "member %llu: %s", (unsigned long long)x->m.id,
                              msg);
    free(x);
}

static json_t *
member_json(const struct fsm_cmd_member *m)
{
    return json_pack("{s:I,s:s,s:s,s:s,s:s}", "id", (json_int_t)m->id,
                     "raft_addr", m->raft_addr, "api_addr", m->api_addr,
                     "rpc_addr", m->rpc_addr, "preview_addr",
                     m->preview_addr);
}

static void
member_cmd_applied(void *data, int status, const struct fsm_result *res)
{
    struct change *x = data;

    if (status == 0 && res->code == 0) {
        pd_info("cluster", "member %llu: %s", (unsigned long long)x->m.id,
                x->add ? "added" : "removed");
        change_finish(x, x->add ? 201 : 200,
                      x->add ? member_json(&x->m)
                             : json_pack("{s:I}", "removed",
                                         (json_int_t)x->m.id),
                      "");
        return;
    }
    change_finish(x, 503, NULL, status != 0 ? strerror(-status)
                                            : res->message);
}

static void
change_done(void *data, int status, const char *msg)
{
    struct change *x = data;
    struct sched *s = x->s;
    struct fsm_cmd cmd;
    int rv;

    if (status != 0) {
        int st = status_of(status);

        change_finish(x, st, NULL, *msg != '\0' ? msg : strerror(-status));
        return;
    }
    if (x->add && x->m.api_addr[0] == '\0') {
        /* Only a Raft address given (paddock cluster add-member ID ADDR):
         * the member records its other addresses itself once it follows
         * (on_self_check). */
        pd_info("cluster", "member %llu: added; it will record its own "
                "addresses", (unsigned long long)x->m.id);
        change_finish(x, 201, member_json(&x->m), "");
        return;
    }
    rv = fsm_cmd_init(&cmd, x->add ? FSM_CMD_MEMBER_SET
                                   : FSM_CMD_MEMBER_REMOVE);
    if (rv == 0) {
        cmd.u.member = x->m;
        rv = raftnode_propose(s->raft, &cmd, member_cmd_applied, x);
    }
    if (rv != 0)
        change_finish(x, 503, NULL, strerror(-rv));
}

static bool
addr_field(struct pd_http_req *r, json_t *body, const char *name,
           bool required, char *out, size_t outlen)
{
    json_t *v = json_object_get(body, name);
    const char *a = v != NULL ? json_string_value(v) : NULL;
    const char *colon;

    out[0] = '\0';
    if (a == NULL || *a == '\0') {
        if (!required)
            return true;
        pd_http_respond_error(r, 400, "invalid_argument",
                              "field '%s': required (host:port)", name);
        return false;
    }
    colon = strrchr(a, ':');
    if (strlen(a) >= outlen || colon == NULL || colon == a ||
        colon[1] == '\0' || strlen(colon + 1) > 5 ||
        strspn(colon + 1, "0123456789") != strlen(colon + 1) ||
        atoi(colon + 1) < 1 || atoi(colon + 1) > 65535) {
        pd_http_respond_error(r, 400, "invalid_argument",
                              "field '%s': \"%.100s\" is not host:port",
                              name, a);
        return false;
    }
    pd_strlcpy(out, a, outlen);
    return true;
}

/* Member ids arrive as JSON numbers or as strings of digits (the CLI). */
static int
parse_member_id(const json_t *v, const char *text, uint64_t *out)
{
    char *end;
    unsigned long long id;

    if (v != NULL && json_is_integer(v)) {
        if (json_integer_value(v) <= 0)
            return -EINVAL;
        *out = (uint64_t)json_integer_value(v);
        return 0;
    }
    if (v != NULL)
        text = json_string_value(v);
    if (text == NULL || *text == '\0' ||
        strspn(text, "0123456789") != strlen(text) || strlen(text) > 19)
        return -EINVAL;
    id = strtoull(text, &end, 10);
    if (id == 0)
        return -EINVAL;
    *out = id;
    return 0;
}

static const struct pd_json_field add_fields[] = {
    {"id", PD_JSON_ANY, true},
    {"raft_addr", PD_JSON_STRING, true},
    {"api_addr", PD_JSON_STRING, false},
    {"rpc_addr", PD_JSON_STRING, false},
    {"preview_addr", PD_JSON_STRING, false},
};

static void
add_body(struct pd_http_req *r, json_t *body, void *arg)
{
    struct sched *s = arg;
    struct change *x = calloc(1, sizeof(*x));
    int rv;

    if (x == NULL) {
        json_decref(body);
        pd_http_respond_error(r, 503, "unavailable", "out of memory");
        return;
    }
    x->s = s;
    x->r = r;
    x->add = true;
    if (parse_member_id(json_object_get(body, "id"), NULL, &x->m.id) != 0) {
        pd_http_respond_error(r, 400, "invalid_argument",
                              "field 'id': expected a positive integer");
        goto out;
    }
    if (!addr_field(r, body, "raft_addr", true, x->m.raft_addr,
                    sizeof(x->m.raft_addr)) ||
        !addr_field(r, body, "api_addr", false, x->m.api_addr,
                    sizeof(x->m.api_addr)) ||
        !addr_field(r, body, "rpc_addr", false, x->m.rpc_addr,
                    sizeof(x->m.rpc_addr)) ||
        !addr_field(r, body, "preview_addr", false, x->m.preview_addr,
                    sizeof(x->m.preview_addr)))
        goto out;
    if (cl.change_busy) {
        pd_http_respond_error(r, 409, "conflict", "another membership "
                              "change is in flight; retry when it is done");
        goto out;
    }
    rv = raftnode_add(s->raft, x->m.id, x->m.raft_addr, change_done, x);
    if (rv != 0) {
        int st = status_of(rv);

        pd_http_respond_error(r, st, code_of(st), "member %llu: %s",
                              (unsigned long long)x->m.id,
                              raftnode_errmsg(s->raft));
        goto out;
    }
    cl.change_busy = true;
    pd_info("cluster", "member %llu: adding at %s",
            (unsigned long long)x->m.id, x->m.raft_addr);
    json_decref(body);
    return;
out:
    free(x);
    json_decref(body);
}

static void
add_member(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    struct sched_call *c = arg;

    PD_UNUSED(p);
    if (!require_admin(c, r) || sched_forward_if_follower(c, r))
        return;
    pd_http_read_json(r, 64 << 10, add_fields, PD_ARRAY_SIZE(add_fields),
                      add_body, c->s);
}

/*
 * The leader is asked to remove itself: it would step down before it
 * could answer, so it hands leadership over first and then forwards the
 * same request to the new leader, which removes it like any member.
 */
struct self_remove {
    struct sched_call call;
    struct pd_http_req *r;
};

static void
on_self_transfer(void *data, int status, const char *msg)
{
    struct self_remove *x = data;
    struct pd_http_req *r = x->r;

    if (status != 0)
        pd_http_respond_error(r, 503, "unavailable", "member %llu: "
                              "leadership did not move (%s); retry",
                              (unsigned long long)x->call.s->cfg.id,
                              *msg != '\0' ? msg : strerror(-status));
    else if (pd_http_req_injected(r) ||
             !sched_forward_if_follower(&x->call, r))
        pd_http_respond_error(r, 503, "unavailable", "member %llu handed "
                              "leadership over; retry the removal",
                              (unsigned long long)x->call.s->cfg.id);
    free(x);
}

static void
remove_self(struct sched_call *c, struct pd_http_req *r)
{
    struct self_remove *x = malloc(sizeof(*x));
    int rv;

    if (x == NULL) {
        pd_http_respond_error(r, 503, "unavailable", "out of memory");
        return;
    }
    x->call = *c;
    x->r = r;
    pd_info("cluster", "member %llu: asked to remove itself; handing "
            "leadership over first", (unsigned long long)c->s->cfg.id);
    rv = raftnode_transfer(c->s->raft, 0, on_self_transfer, x);
    if (rv != 0) {
        pd_http_respond_error(r, 409, "conflict", "member %llu is the "
                              "leader and cannot hand leadership over "
                              "(%s)", (unsigned long long)c->s->cfg.id,
                              rv == -ENOENT ? "no other voter"
                                            : strerror(-rv));
        free(x);
    }
}

static void
remove_member(struct pd_http_req *r, const struct pd_http_params *p,
              void *arg)
{
    struct sched_call *c = arg;
    struct sched *s = c->s;
    struct raft *raft;
    struct change *x;
    uint64_t id;
    bool known = false;
    unsigned i;
    int rv;

    if (!require_admin(c, r) || sched_forward_if_follower(c, r))
        return;
    if (parse_member_id(NULL, pd_http_param(p, "id"), &id) != 0) {
        pd_http_respond_error(r, 400, "invalid_argument",
                              "member id: expected a positive integer");
        return;
    }
    raft = raftnode_raft(s->raft);
    for (i = 0; i < raft->configuration.n; i++)
        known |= raft->configuration.servers[i].id == id;
    if (!known) {
        pd_http_respond_error(r, 404, "not_found", "member %llu is not in "
                              "the cluster", (unsigned long long)id);
        return;
    }
    if (cl.change_busy) {
        pd_http_respond_error(r, 409, "conflict", "another membership "
                              "change is in flight; retry when it is done");
        return;
    }
    if (id == s->cfg.id) {
        remove_self(c, r);
        return;
    }
    if ((x = calloc(1, sizeof(*x))) == NULL) {
        pd_http_respond_error(r, 503, "unavailable", "out of memory");
        return;
    }
    x->s = s;
    x->r = r;
    x->m.id = id;
    rv = raftnode_remove(s->raft, id, change_done, x);
    if (rv != 0) {
        int st = status_of(rv);

        pd_http_respond_error(r, st, code_of(st), "member %llu: %s",
                              (unsigned long long)id,
                              raftnode_errmsg(s->raft));
        free(x);
        return;
    }
    cl.change_busy = true;
    pd_info("cluster", "member %llu: removing", (unsigned long long)id);
}

static const struct pd_json_field set_fields[] = {
    {"raft_addr", PD_JSON_STRING, true},
    {"api_addr", PD_JSON_STRING, true},
    {"rpc_addr", PD_JSON_STRING, true},
    {"preview_addr", PD_JSON_STRING, true},
};

struct set_ctx {
    struct pd_http_req *r;
    struct fsm_cmd cmd;
};

static void
set_applied(void *data, int status, const struct fsm_result *res)
{
    struct set_ctx *x = data;

    if (status == 0 && res->code == 0)
        pd_http_respond_json(x->r, 200, member_json(&x->cmd.u.member));
    else
        pd_http_respond_error(x->r, 503, "unavailable", "member %llu: %s",
                              (unsigned long long)x->cmd.u.member.id,
                              status != 0 ? strerror(-status)
                                          : res->message);
    free(x);
}

static void
set_body(struct pd_http_req *r, json_t *body, void *arg)
{
    struct sched *s = cl.s;
    struct set_ctx *x = calloc(1, sizeof(*x));
    struct fsm_cmd_member *m;
    int rv;

    if (x == NULL || fsm_cmd_init(&x->cmd, FSM_CMD_MEMBER_SET) != 0) {
        free(x);
        json_decref(body);
        pd_http_respond_error(r, 503, "unavailable", "out of memory");
        return;
    }
    x->r = r;
    m = &x->cmd.u.member;
    m->id = (uint64_t)(uintptr_t)arg;
    if (!addr_field(r, body, "raft_addr", true, m->raft_addr,
                    sizeof(m->raft_addr)) ||
        !addr_field(r, body, "api_addr", true, m->api_addr,
                    sizeof(m->api_addr)) ||
        !addr_field(r, body, "rpc_addr", true, m->rpc_addr,
                    sizeof(m->rpc_addr)) ||
        !addr_field(r, body, "preview_addr", true, m->preview_addr,
                    sizeof(m->preview_addr))) {
        json_decref(body);
        free(x);
        return;
    }
    json_decref(body);
    rv = raftnode_propose(s->raft, &x->cmd, set_applied, x);
    if (rv != 0) {
        pd_http_respond_error(r, 503, "unavailable", "member %llu: %s",
                              (unsigned long long)m->id, strerror(-rv));
        free(x);
    }
}

/* PUT /v1/cluster/members/{id}: a member's own addresses, sent by that
 * member through forwarding (never by a client: see api.c). */
static void
set_member(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    struct sched_call *c = arg;
    struct raft *raft;
    uint64_t id;
    bool known = false;
    unsigned i;

    if (!pd_http_req_injected(r) ||
        pd_http_req_header(r, SCHED_INTERNAL_HEADER) == NULL) {
        pd_http_respond_error(r, 403, "forbidden", "members record their "
                              "own addresses; use POST /v1/cluster/members");
        return;
    }
    if (sched_forward_if_follower(c, r))
        return;
    if (parse_member_id(NULL, pd_http_param(p, "id"), &id) != 0) {
        pd_http_respond_error(r, 400, "invalid_argument",
                              "member id: expected a positive integer");
        return;
    }
    raft = raftnode_raft(c->s->raft);
    for (i = 0; i < raft->configuration.n; i++)
        known |= raft->configuration.servers[i].id == id;
    if (!known) {
        pd_http_respond_error(r, 404, "not_found", "member %llu is not in "
                              "the cluster", (unsigned long long)id);
        return;
    }
    pd_http_read_json(r, 16 << 10, set_fields, PD_ARRAY_SIZE(set_fields),
                      set_body, (void *)(uintptr_t)id);
}

const struct pd_http_route sched_cluster_routes[] = {
    {"GET", "/v1/cluster", get_cluster},
    {"POST", "/v1/cluster/members", add_member},
    {"DELETE", "/v1/cluster/members/{id}", remove_member},
    {"PUT", "/v1/cluster/members/{id}", set_member},
};
const size_t sched_cluster_nroutes = PD_ARRAY_SIZE(sched_cluster_routes);
