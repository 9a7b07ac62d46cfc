/*
 * The HTTP API listener: authentication, the route table of every module,
 * per-route metrics, and the routes that are core's own: sandboxes CRUD,
 * nodes, health and metrics (cluster routes are cluster.c's).
 *
 * Request path. on_request finds the route (so metrics can name it by its
 * pattern, never by a path with ids in it), authenticates the caller
 * (every route but /v1/health and the JWKS), and calls the handler with a
 * struct sched_call on its stack. Writes on a follower are forwarded
 * by the handler itself (sched_forward_if_follower) before it reads the
 * body, so the body travels to the leader unread. Reads are local; a GET
 * with ?consistent=true is run after a Raft barrier on the leader, or
 * forwarded to the leader from a follower.
 *
 * Sandbox creates are idempotent: the same id with the same spec (and
 * tenant) answers 200 with the existing sandbox without placing anything,
 * another spec is 409. The FSM checks the same thing again on apply, so a
 * retried create after a leader change (the forward link retries) never
 * makes two sandboxes.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "scheduler/sched.h"

#define CREATE_BODY_MAX   (256u << 10)
#define SMALL_BODY_MAX    (16u << 10)
#define WAIT_DEFAULT_MS   120000
#define WAIT_MAX_MS       600000
#define MAX_CPUS          64
#define MIN_MEMORY_MB     64
#define MAX_MEMORY_MB     (1024u * 1024)
#define MIN_DISK_MB       16
#define MAX_DISK_MB       (16u * 1024 * 1024)
#define DEFAULT_CPUS      1
#define DEFAULT_MEMORY_MB 512
#define DEFAULT_DISK_MB   1024

static struct pd_http_route *routes;
static size_t nroutes;

/* ---- Small helpers ------------------------------------------------------ */

/*
 * pd_http_read_json, for a handler that allocated a context first: on any
 * failure (answered here) the context is freed instead of leaking, since
 * the callback never runs then.
 */
struct json_read {
    const struct pd_json_field *fields;
    size_t n;
    pd_http_json_cb cb;
    void *arg;
};

static void
json_read_done(struct pd_http_req *r, int err, const char *body, size_t len,
               void *arg)
{
    struct json_read jr = *(struct json_read *)arg;
    char msg[300];
    json_t *j;
    int rv;

    free(arg);
    if (err != 0) {
        pd_http_fail(r, err);
        free(jr.arg);
        return;
    }
    rv = pd_json_parse(body, len, true, jr.fields, jr.n, &j, msg,
                       sizeof(msg));
    if (rv < 0) {
        pd_http_respond_error(r, 400, rv == -EBADMSG ? "invalid_json"
                                                     : "invalid_argument",
                              "%s", msg);
        free(jr.arg);
        return;
    }
    jr.cb(r, j, jr.arg);
}

static void
read_json(struct pd_http_req *r, size_t max,
          const struct pd_json_field *fields, size_t n, pd_http_json_cb cb,
          void *arg)
{
    struct json_read *jr = malloc(sizeof(*jr));

    if (jr == NULL) {
        pd_http_respond_error(r, 503, "unavailable", "out of memory");
        free(arg);
        return;
    }
    jr->fields = fields;
    jr->n = n;
    jr->cb = cb;
    jr->arg = arg;
    if (pd_http_body_read(r, max, json_read_done, jr) != 0) {
        pd_http_respond_error(r, 500, "internal", "the body was already "
                              "read");
        free(jr);
        free(arg);
    }
}

static bool
require_admin(struct sched_call *c, struct pd_http_req *r)
{
    if (c->who.role == SCHED_ROLE_ADMIN)
        return true;
    pd_http_respond_error(r, 403, "forbidden", "this needs an admin token");
    return false;
}

static json_t *
kv_json(const struct fsm_kv *kv, size_t n)
{
    json_t *o = json_object();
    size_t i;

    for (i = 0; i < n; i++)
        json_object_set_new(o, kv[i].key, json_string(kv[i].value));
    return o;
}

static json_t *
sandbox_json(struct sched *s, const struct fsm_sandbox *sb)
{
    json_t *j = json_pack("{s:s,s:s,s:s,s:s,s:I,s:I,s:I,s:s,s:o,s:I,s:I,s:I}",
                          "id", sb->id, "tenant", sb->tenant,
                          "state", fsm_sandbox_state_name(sb->state),
                          "node", sb->node,
                          "cpus", (json_int_t)sb->spec.cpus,
                          "memory_mb", (json_int_t)sb->spec.memory_mb,
                          "disk_mb", (json_int_t)sb->spec.disk_mb,
                          "egress", sb->spec.egress,
                          "labels", kv_json(sb->spec.labels,
                                            sb->spec.n_labels),
                          "generation", (json_int_t)sb->generation,
                          "created_at", (json_int_t)sb->created_ms,
                          "updated_at", (json_int_t)sb->updated_ms);
    struct fsm_port *ports;
    size_t n, i;

    if (j == NULL)
        return NULL;
    if (sb->reason[0] != '\0')
        json_object_set_new(j, "reason", json_string(sb->reason));
    if (s != NULL && fsm_port_list(s->fsm, sb->id, &ports, &n) == 0) {
        json_t *a = json_array();

        for (i = 0; i < n; i++)
            json_array_append_new(a, json_pack("{s:I,s:I}", "port",
                                               (json_int_t)ports[i].port,
                                               "created_at",
                                               (json_int_t)ports[i]
                                                   .created_ms));
        free(ports);
        json_object_set_new(j, "ports", a);
    }
    return j;
}

/* Maps an errno from the life cycle or Raft to a status and code. */
static int
err_status(int code, const char **ecode)
{
    switch (code) {
    case -EINVAL:
    case -ENAMETOOLONG:
    case -E2BIG:
        *ecode = "invalid_argument";
        return 400;
    case -ENOENT:
        *ecode = "not_found";
        return 404;
    case -EEXIST:
        *ecode = "conflict";
        return 409;
    case -ENOSPC:
        *ecode = "no_capacity";
        return 409;
    case -EPERM:
    case -EACCES:
        *ecode = "forbidden";
        return 403;
    case RAFTNODE_ENOTLEADER:
    case RAFTNODE_ELOST:
    case RAFTNODE_ESHUTDOWN:
    case -EAGAIN:
    case -ETIMEDOUT:
    case -ECONNREFUSED:
    case -ECONNRESET:
    case -EHOSTUNREACH:
    case -ENOTCONN:
        *ecode = "unavailable";
        return 503;
    default:
        *ecode = "internal";
        return 500;
    }
}

static void
respond_errno(struct pd_http_req *r, int code, const char *what,
              const char *message)
{
    const char *ecode;
    int status = err_status(code, &ecode);

    pd_http_respond_error(r, status, ecode, "%s: %s", what,
                          message != NULL && *message != '\0'
                              ? message : strerror(-code));
}

int
sched_sandbox_lookup(struct sched_call *c, struct pd_http_req *r,
                     const char *id, struct fsm_sandbox *out)
{
    int rv;

    memset(out, 0, sizeof(*out));
    if (id == NULL || !pd_id_valid(id)) {
        pd_http_respond_error(r, 400, "invalid_argument",
                              "sandbox id: must match [a-z0-9][a-z0-9-]{0,62}");
        return -EINVAL;
    }
    rv = fsm_sandbox_get(c->s->fsm, id, out);
    if (rv == 0 && !sched_auth_owns(&c->who, out->tenant)) {
        fsm_sandbox_clear(out);
        rv = -ENOENT;
    }
    if (rv == -ENOENT) {
        pd_http_respond_error(r, 404, "not_found", "sandbox %s not found",
                              id);
        return rv;
    }
    if (rv != 0) {
        pd_http_respond_error(r, 500, "internal", "sandbox %s: %s", id,
                              fsm_errmsg(c->s->fsm));
        return rv;
    }
    return 0;
}

/* ---- POST /v1/sandboxes ------------------------------------------------- */

static const struct pd_json_field create_fields[] = {
    {"id", PD_JSON_STRING, true},
    {"cpus", PD_JSON_UINT, false},
    {"memory_mb", PD_JSON_UINT, false},
    {"disk_mb", PD_JSON_UINT, false},
    {"env", PD_JSON_STRING_MAP, false},
    {"labels", PD_JSON_STRING_MAP, false},
    {"egress", PD_JSON_STRING, false},
    {"constraints", PD_JSON_STRING_MAP, false},
};

struct create_ctx {
    struct sched *s;
    struct pd_http_req *r;
    struct sched_principal who;
    bool wait;
    uint64_t wait_ms;
    bool pending;  /* sched_sandbox_create has not returned yet */
    bool done;     /* answered (by the callback or the caller) */
};

static bool
env_key_ok(const char *k)
{
    size_t i;

    if (k[0] == '\0' || strlen(k) > FSM_KEY_MAX ||
        (k[0] >= '0' && k[0] <= '9'))
        return false;
    for (i = 0; k[i] != '\0'; i++) {
        char ch = k[i];

        if (!(ch == '_' || (ch >= 'a' && ch <= 'z') ||
              (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9')))
            return false;
    }
    return true;
}

/* "none", "all", or an allow-list of host names "a.example,*.b.example". */
static bool
egress_ok(const char *e)
{
    size_t i;

    if (strcmp(e, "none") == 0 || strcmp(e, "all") == 0)
        return true;
    if (*e == '\0' || strlen(e) > FSM_EGRESS_MAX)
        return false;
    for (i = 0; e[i] != '\0'; i++) {
        char ch = e[i];

        if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
              ch == '-' || ch == '.' || ch == '*' || ch == ',' || ch == ':'))
            return false;
    }
    return true;
}

static int
kv_cmp(const void *a, const void *b)
{
    return strcmp(((const struct fsm_kv *)a)->key,
                  ((const struct fsm_kv *)b)->key);
}

/*
 * Copies a string map into a sorted fsm_kv list (sorted so that the same
 * map always gives the same command and compares equal). kind names the
 * field in errors; labels and constraints take pd_label_valid keys and
 * values, env takes variable names and any value.
 */
static int
kv_from_json(json_t *obj, const char *kind, bool env, struct fsm_kv **out,
             size_t *n, char *msg, size_t msglen)
{
    const char *k;
    json_t *v;
    size_t i = 0, cnt = obj != NULL ? json_object_size(obj) : 0;
    struct fsm_kv *kv;

    *out = NULL;
    *n = 0;
    if (cnt == 0)
        return 0;
    if (cnt > FSM_KV_MAX) {
        snprintf(msg, msglen, "field '%s': more than %d entries", kind,
                 FSM_KV_MAX);
        return -EINVAL;
    }
    kv = calloc(cnt, sizeof(*kv));
    if (kv == NULL)
        return -ENOMEM;
    json_object_foreach(obj, k, v) {
        const char *val = json_string_value(v);
        bool ok = env ? env_key_ok(k) && strlen(val) <= FSM_VALUE_MAX &&
                            strlen(val) == json_string_length(v)
                      : pd_label_valid(k, FSM_KEY_MAX) &&
                            pd_label_valid(val, FSM_VALUE_MAX);

        if (!ok) {
            snprintf(msg, msglen, "field '%s': bad entry \"%.64s\" (%s)",
                     kind, k, env ? "names are [A-Za-z_][A-Za-z0-9_]*, "
                     "values up to 8 KiB without NUL" : "keys and values "
                     "are printable ASCII without '=' or ','");
            fsm_kv_free(kv, i);
            return -EINVAL;
        }
        kv[i].key = strdup(k);
        kv[i].value = strdup(val);
        if (kv[i].key == NULL || kv[i].value == NULL) {
            fsm_kv_free(kv, i + 1);
            return -ENOMEM;
        }
        i++;
    }
    qsort(kv, cnt, sizeof(*kv), kv_cmp);
    *out = kv;
    *n = cnt;
    return 0;
}

static bool
kv_equal(const struct fsm_kv *a, size_t na, const struct fsm_kv *b,
         size_t nb)
{
    struct fsm_kv *sa, *sb;
    bool eq = true;
    size_t i;

    if (na != nb)
        return false;
    if (na == 0)
        return true;
    sa = malloc(na * sizeof(*sa));
    sb = malloc(nb * sizeof(*sb));
    if (sa == NULL || sb == NULL) {
        free(sa);
        free(sb);
        return false;
    }
    memcpy(sa, a, na * sizeof(*sa));
    memcpy(sb, b, nb * sizeof(*sb));
    qsort(sa, na, sizeof(*sa), kv_cmp);
    qsort(sb, nb, sizeof(*sb), kv_cmp);
    for (i = 0; i < na && eq; i++)
        eq = strcmp(sa[i].key, sb[i].key) == 0 &&
             strcmp(sa[i].value, sb[i].value) == 0;
    free(sa);
    free(sb);
    return eq;
}

static bool
spec_equal(const struct fsm_spec *a, const struct fsm_spec *b)
{
    return a->cpus == b->cpus && a->memory_mb == b->memory_mb &&
           a->disk_mb == b->disk_mb && strcmp(a->egress, b->egress) == 0 &&
           kv_equal(a->env, a->n_env, b->env, b->n_env) &&
           kv_equal(a->labels, a->n_labels, b->labels, b->n_labels);
}

static void
create_done(void *data, int code, const char *message,
            const struct fsm_sandbox *sb)
{
    struct create_ctx *x = data;

    if (x->done)
        return;
    x->done = true;
    if (code == 0 && sb != NULL) {
        json_t *j = sandbox_json(x->s, sb);

        pd_http_respond_json(x->r, 201, j);
    } else if (code == 0) {
        pd_http_respond_error(x->r, 500, "internal",
                              "sandbox created but its row is missing");
    } else {
        respond_errno(x->r, code, "create", message);
    }
    if (!x->pending)
        free(x);
}

static int
parse_spec(json_t *body, struct fsm_spec *spec, struct fsm_kv **cons,
           size_t *ncons, char *msg, size_t msglen)
{
    json_t *v;
    const char *egress = "none";
    int rv;

    memset(spec, 0, sizeof(*spec));
    spec->cpus = DEFAULT_CPUS;
    spec->memory_mb = DEFAULT_MEMORY_MB;
    spec->disk_mb = DEFAULT_DISK_MB;
    if ((v = json_object_get(body, "cpus")) != NULL) {
        if (json_integer_value(v) < 1 || json_integer_value(v) > MAX_CPUS) {
            snprintf(msg, msglen, "field 'cpus': must be 1 to %d",
                     MAX_CPUS);
            return -EINVAL;
        }
        spec->cpus = (uint32_t)json_integer_value(v);
    }
    if ((v = json_object_get(body, "memory_mb")) != NULL) {
        if (json_integer_value(v) < MIN_MEMORY_MB ||
            json_integer_value(v) > MAX_MEMORY_MB) {
            snprintf(msg, msglen, "field 'memory_mb': must be %d to %u",
                     MIN_MEMORY_MB, MAX_MEMORY_MB);
            return -EINVAL;
        }
        spec->memory_mb = (uint64_t)json_integer_value(v);
    }
    if ((v = json_object_get(body, "disk_mb")) != NULL) {
        if (json_integer_value(v) < MIN_DISK_MB ||
            json_integer_value(v) > MAX_DISK_MB) {
            snprintf(msg, msglen, "field 'disk_mb': must be %d to %u",
                     MIN_DISK_MB, MAX_DISK_MB);
            return -EINVAL;
        }
        spec->disk_mb = (uint64_t)json_integer_value(v);
    }
    if ((v = json_object_get(body, "egress")) != NULL)
        egress = json_string_value(v);
    if (!egress_ok(egress) ||
        (v != NULL && strlen(egress) != json_string_length(v))) {
        snprintf(msg, msglen, "field 'egress': \"none\", \"all\" or a "
                 "comma-separated list of host names");
        return -EINVAL;
    }
    pd_strlcpy(spec->egress, egress, sizeof(spec->egress));
    rv = kv_from_json(json_object_get(body, "env"), "env", true, &spec->env,
                      &spec->n_env, msg, msglen);
    if (rv == 0)
        rv = kv_from_json(json_object_get(body, "labels"), "labels", false,
                          &spec->labels, &spec->n_labels, msg, msglen);
    if (rv == 0)
        rv = kv_from_json(json_object_get(body, "constraints"),
                          "constraints", false, cons, ncons, msg, msglen);
    return rv;
}

static void
spec_free(struct fsm_spec *spec)
{
    fsm_kv_free(spec->env, spec->n_env);
    fsm_kv_free(spec->labels, spec->n_labels);
    spec->env = spec->labels = NULL;
}

static void
existing_ran(void *data, int code, const char *message,
             const struct fsm_sandbox *sb, bool replaced)
{
    struct create_ctx *x = data;

    PD_UNUSED(replaced);
    if (code == 0 && sb != NULL)
        pd_http_respond_json(x->r, 200, sandbox_json(x->s, sb));
    else
        respond_errno(x->r, code != 0 ? code : -EIO, "create", message);
    free(x);
}

/*
 * The same id exists: 200 when it is the same request (after it runs,
 * with ?wait=true and a sandbox still booting), else 409. Returns false
 * when there is no such sandbox, true when answered here; *async is set
 * when the answer comes later (x then belongs to the callback).
 */
static bool
create_existing(struct create_ctx *x, const char *id,
                const struct fsm_spec *spec, bool *async)
{
    struct fsm_sandbox sb;

    *async = false;
    if (fsm_sandbox_get(x->s->fsm, id, &sb) != 0)
        return false;
    if (strcmp(sb.tenant, x->who.tenant) != 0 ||
        !spec_equal(&sb.spec, spec)) {
        pd_http_respond_error(x->r, 409, "conflict", "sandbox %s already "
                              "exists with another spec", id);
    } else if (x->wait && (sb.state == FSM_SB_PENDING ||
                           sb.state == FSM_SB_STARTING)) {
        *async = true;
        sched_sandbox_ensure(x->s, id, existing_ran, x);
    } else {
        pd_http_respond_json(x->r, 200, sandbox_json(x->s, &sb));
    }
    fsm_sandbox_clear(&sb);
    return true;
}

static void
create_body(struct pd_http_req *r, json_t *body, void *arg)
{
    struct create_ctx *x = arg;
    struct sched_create_req req;
    const char *id = json_string_value(json_object_get(body, "id"));
    char msg[256] = "";
    bool async;
    int rv;

    memset(&req, 0, sizeof(req));
    if (!pd_id_valid(id)) {
        pd_http_respond_error(r, 400, "invalid_argument", "field 'id': "
                              "must match [a-z0-9][a-z0-9-]{0,62}");
        goto out;
    }
    rv = parse_spec(body, &req.spec, &req.constraints, &req.n_constraints,
                    msg, sizeof(msg));
    if (rv != 0) {
        if (rv == -ENOMEM)
            pd_http_respond_error(r, 503, "unavailable", "out of memory");
        else
            pd_http_respond_error(r, 400, "invalid_argument", "%s", msg);
        goto out;
    }
    if (create_existing(x, id, &req.spec, &async)) {
        if (async)
            x = NULL; /* the ensure callback answers and frees it */
        goto out;
    }
    pd_strlcpy(req.id, id, sizeof(req.id));
    pd_strlcpy(req.tenant, x->who.tenant, sizeof(req.tenant));
    req.wait = x->wait;
    req.wait_ms = x->wait_ms;
    x->pending = true;
    rv = sched_sandbox_create(x->s, &req, create_done, x);
    x->pending = false;
    if (rv != 0 && !x->done) {
        x->done = true;
        respond_errno(r, rv, "create", NULL);
    }
    spec_free(&req.spec);
    fsm_kv_free(req.constraints, req.n_constraints);
    json_decref(body);
    if (x->done)
        free(x);
    return;
out:
    spec_free(&req.spec);
    fsm_kv_free(req.constraints, req.n_constraints);
    json_decref(body);
    free(x);
}

static void
create_sandbox(struct pd_http_req *r, const struct pd_http_params *p,
               void *arg)
{
    struct sched_call *c = arg;
    struct create_ctx *x;
    const char *w;
    uint64_t wait_ms = WAIT_DEFAULT_MS;

    PD_UNUSED(p);
    if (c->who.role == SCHED_ROLE_NODE) {
        pd_http_respond_error(r, 403, "forbidden",
                              "node tokens cannot create sandboxes");
        return;
    }
    if ((w = pd_http_req_query(r, "wait_ms")) != NULL &&
        (pd_parse_u64(w, &wait_ms) != 0 || wait_ms == 0 ||
         wait_ms > WAIT_MAX_MS)) {
        pd_http_respond_error(r, 400, "invalid_argument",
                              "wait_ms: must be 1 to %d", WAIT_MAX_MS);
        return;
    }
    if (sched_forward_if_follower(c, r))
        return;
    if ((x = calloc(1, sizeof(*x))) == NULL) {
        pd_http_respond_error(r, 503, "unavailable", "out of memory");
        return;
    }
    x->s = c->s;
    x->r = r;
    x->who = c->who;
    x->wait = pd_http_req_query_bool(r, "wait", false);
    x->wait_ms = wait_ms;
    read_json(r, CREATE_BODY_MAX, create_fields, PD_ARRAY_SIZE(create_fields),
              create_body, x);
}

/* ---- GET /v1/sandboxes[/{id}], DELETE ----------------------------------- */

static void
list_sandboxes(struct pd_http_req *r, const struct pd_http_params *p,
               void *arg)
{
    struct sched_call *c = arg;
    struct fsm_sandbox_filter f;
    struct fsm_kv labels[32];
    char lbuf[32][2][FSM_KEY_MAX + 1];
    struct fsm_sandbox *v;
    size_t n, i, nq = pd_http_req_query_count(r), nl = 0;
    const char *st = pd_http_req_query(r, "state");
    const char *tenant = pd_http_req_query(r, "tenant");
    json_t *a;
    int rv;

    PD_UNUSED(p);
    memset(&f, 0, sizeof(f));
    f.state = -1;
    if (st != NULL && (f.state = fsm_sandbox_state_parse(st)) < 0) {
        pd_http_respond_error(r, 400, "invalid_argument", "state: \"%.40s\" "
                              "is not a sandbox state", st);
        return;
    }
    for (i = 0; i < nq; i++) {
        const char *name, *value, *eq;

        if (!pd_http_req_query_at(r, i, &name, &value) ||
            strcmp(name, "label") != 0)
            continue;
        eq = strchr(value, '=');
        if (nl == PD_ARRAY_SIZE(labels) || eq == NULL ||
            (size_t)(eq - value) > FSM_KEY_MAX ||
            strlen(eq + 1) > FSM_KEY_MAX) {
            pd_http_respond_error(r, 400, "invalid_argument", "label: "
                                  "expected k=v (at most %zu)",
                                  PD_ARRAY_SIZE(labels));
            return;
        }
        memcpy(lbuf[nl][0], value, (size_t)(eq - value));
        lbuf[nl][0][eq - value] = '\0';
        pd_strlcpy(lbuf[nl][1], eq + 1, sizeof(lbuf[nl][1]));
        labels[nl].key = lbuf[nl][0];
        labels[nl].value = lbuf[nl][1];
        nl++;
    }
    f.labels = labels;
    f.n_labels = nl;
    /* Tenants see their own; an admin sees all, or one tenant's. */
    f.tenant = c->who.role == SCHED_ROLE_ADMIN ? tenant : c->who.tenant;
    rv = fsm_sandbox_list(c->s->fsm, &f, &v, &n);
    if (rv != 0) {
        pd_http_respond_error(r, 500, "internal", "listing sandboxes: %s",
                              fsm_errmsg(c->s->fsm));
        return;
    }
    a = json_array();
    for (i = 0; i < n; i++)
        json_array_append_new(a, sandbox_json(c->s, &v[i]));
    fsm_sandboxes_free(v, n);
    pd_http_respond_json(r, 200, json_pack("{s:o}", "sandboxes", a));
}

static void
get_sandbox(struct pd_http_req *r, const struct pd_http_params *p,
            void *arg)
{
    struct sched_call *c = arg;
    struct fsm_sandbox sb;

    if (sched_sandbox_lookup(c, r, pd_http_param(p, "id"), &sb) != 0)
        return;
    pd_http_respond_json(r, 200, sandbox_json(c->s, &sb));
    fsm_sandbox_clear(&sb);
}

struct destroy_ctx {
    struct pd_http_req *r;
    char id[FSM_ID_MAX + 1];
    bool pending, done;
};

static void
destroy_done(void *data, int code, const char *message,
             const struct fsm_sandbox *sb)
{
    struct destroy_ctx *x = data;

    PD_UNUSED(sb);
    if (x->done)
        return;
    x->done = true;
    if (code == 0 || code == -ENOENT)
        pd_http_respond_json(x->r, 200, json_pack("{s:s,s:b}", "id", x->id,
                                                  "deleted", 1));
    else
        respond_errno(x->r, code, "destroy", message);
    if (!x->pending)
        free(x);
}

static void
delete_sandbox(struct pd_http_req *r, const struct pd_http_params *p,
               void *arg)
{
    struct sched_call *c = arg;
    struct fsm_sandbox sb;
    struct destroy_ctx *x;
    int rv;

    if (sched_forward_if_follower(c, r))
        return;
    if (pd_http_req_injected(r) &&
        pd_http_req_header(r, SCHED_RETRY_HEADER) != NULL &&
        pd_id_valid(pd_http_param(p, "id"))) {
        int grv = fsm_sandbox_get(c->s->fsm, pd_http_param(p, "id"), &sb);

        if (grv == 0)
            fsm_sandbox_clear(&sb);
        if (grv == -ENOENT) {
            /* A resent delete whose first attempt went through. */
            pd_http_respond_json(r, 200, json_pack("{s:s,s:b}", "id",
                                                   pd_http_param(p, "id"),
                                                   "deleted", 1));
            return;
        }
    }
    if (sched_sandbox_lookup(c, r, pd_http_param(p, "id"), &sb) != 0)
        return;
    fsm_sandbox_clear(&sb);
    if ((x = calloc(1, sizeof(*x))) == NULL) {
        pd_http_respond_error(r, 503, "unavailable", "out of memory");
        return;
    }
    x->r = r;
    pd_strlcpy(x->id, pd_http_param(p, "id"), sizeof(x->id));
    x->pending = true;
    rv = sched_sandbox_destroy(c->s, x->id, destroy_done, x);
    x->pending = false;
    if (rv != 0 && !x->done) {
        x->done = true;
        respond_errno(r, rv, "destroy", NULL);
    }
    if (x->done)
        free(x);
}

/* ---- Nodes -------------------------------------------------------------- */

static json_t *
node_json(const struct fsm_node *n)
{
    return json_pack("{s:s,s:s,s:s,s:b,s:I,s:{s:I,s:I,s:I},s:{s:I,s:I,s:I},"
                     "s:o,s:I,s:I}",
                     "id", n->id,
                     /* Draining is its own field (the CLI shows both). */
                     "state", n->state == FSM_NODE_DOWN ? "down" : "ready",
                     "address", n->rpc_addr, "draining", n->draining,
                     "sandboxes", (json_int_t)n->n_sandboxes,
                     "capacity", "cpus", (json_int_t)n->cpus,
                     "memory_mb", (json_int_t)n->memory_mb,
                     "disk_mb", (json_int_t)n->disk_mb,
                     "allocated", "cpus", (json_int_t)n->alloc_cpus,
                     "memory_mb", (json_int_t)n->alloc_memory_mb,
                     "disk_mb", (json_int_t)n->alloc_disk_mb,
                     "labels", kv_json(n->labels, n->n_labels),
                     "registered_at", (json_int_t)n->registered_ms,
                     "last_seen_at", (json_int_t)n->last_seen_ms);
}

static void
list_nodes(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    struct sched_call *c = arg;
    struct fsm_node *v;
    size_t n, i;
    json_t *a;

    PD_UNUSED(p);
    if (!require_admin(c, r))
        return;
    if (fsm_node_list(c->s->fsm, &v, &n) != 0) {
        pd_http_respond_error(r, 500, "internal", "listing nodes: %s",
                              fsm_errmsg(c->s->fsm));
        return;
    }
    a = json_array();
    for (i = 0; i < n; i++)
        json_array_append_new(a, node_json(&v[i]));
    fsm_nodes_free(v, n);
    pd_http_respond_json(r, 200, json_pack("{s:o}", "nodes", a));
}

struct drain_ctx {
    struct sched *s;
    struct pd_http_req *r;
    struct fsm_cmd cmd;
    char id[FSM_ID_MAX + 1];
};

static void
drain_applied(void *data, int status, const struct fsm_result *res)
{
    struct drain_ctx *x = data;
    struct fsm_node n;

    if (status == RAFTNODE_ELOST) {
        respond_errno(x->r, status, "drain", "leadership changed; retry");
    } else if (status != 0) {
        respond_errno(x->r, status, "drain", NULL);
    } else if (res->code != 0) {
        respond_errno(x->r, res->code, "drain", res->message);
    } else if (fsm_node_get(x->s->fsm, x->id, &n) == 0) {
        pd_info("node", "node %s: drain %s", x->id,
                x->cmd.u.node.drain ? "on" : "off");
        pd_http_respond_json(x->r, 200, node_json(&n));
        fsm_node_clear(&n);
    } else {
        pd_http_respond_error(x->r, 404, "not_found", "node %s not found",
                              x->id);
    }
    free(x);
}

static const struct pd_json_field drain_fields[] = {
    {"drain", PD_JSON_BOOL, false},
};

static void
drain_body(struct pd_http_req *r, json_t *body, void *arg)
{
    struct drain_ctx *x = arg;
    json_t *v = json_object_get(body, "drain");
    int rv;

    json_decref(body);
    if ((rv = fsm_cmd_init(&x->cmd, FSM_CMD_NODE_DRAIN)) == 0) {
        pd_strlcpy(x->cmd.u.node.node, x->id, sizeof(x->cmd.u.node.node));
        x->cmd.u.node.drain = v == NULL || json_is_true(v);
        rv = raftnode_propose(x->s->raft, &x->cmd, drain_applied, x);
    }
    if (rv != 0) {
        respond_errno(r, rv, "drain", NULL);
        free(x);
    }
}

static void
drain_node(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    struct sched_call *c = arg;
    const char *id = pd_http_param(p, "id");
    struct fsm_node n;
    struct drain_ctx *x;

    if (!require_admin(c, r) || sched_forward_if_follower(c, r))
        return;
    if (!pd_id_valid(id)) {
        pd_http_respond_error(r, 400, "invalid_argument", "node id: must "
                              "match [a-z0-9][a-z0-9-]{0,62}");
        return;
    }
    if (fsm_node_get(c->s->fsm, id, &n) != 0) {
        pd_http_respond_error(r, 404, "not_found", "node %s not found", id);
        return;
    }
    fsm_node_clear(&n);
    if ((x = calloc(1, sizeof(*x))) == NULL) {
        pd_http_respond_error(r, 503, "unavailable", "out of memory");
        return;
    }
    x->s = c->s;
    x->r = r;
    pd_strlcpy(x->id, id, sizeof(x->id));
    read_json(r, SMALL_BODY_MAX, drain_fields, PD_ARRAY_SIZE(drain_fields),
              drain_body, x);
}

/* ---- Health and metrics ------------------------------------------------- */

static void
health(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    struct sched_call *c = arg;
    struct raftnode_status st;

    PD_UNUSED(p);
    raftnode_status(c->s->raft, &st);
    pd_http_respond_json(r, 200, json_pack("{s:s,s:I,s:s,s:I}",
                                           "status", "ok",
                                           "id", (json_int_t)c->s->cfg.id,
                                           "state",
                                           raftnode_state_name(st.state),
                                           "leader",
                                           (json_int_t)st.leader_id));
}

static void
metrics(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    struct sched_call *c = arg;
    char *text;

    PD_UNUSED(p);
    if (!require_admin(c, r))
        return;
    text = sched_metrics_render(c->s);
    if (text == NULL) {
        pd_http_respond_error(r, 503, "unavailable", "out of memory");
        return;
    }
    pd_http_respond(r, 200, "text/plain; version=0.0.4", text,
                    strlen(text));
    free(text);
}

static const struct pd_http_route core_routes[] = {
    {"GET", "/v1/health", health},
    {"GET", "/metrics", metrics},
    {"POST", "/v1/sandboxes", create_sandbox},
    {"GET", "/v1/sandboxes", list_sandboxes},
    {"GET", "/v1/sandboxes/{id}", get_sandbox},
    {"DELETE", "/v1/sandboxes/{id}", delete_sandbox},
    {"GET", "/v1/nodes", list_nodes},
    {"POST", "/v1/nodes/{id}/drain", drain_node},
};

/* ---- Dispatch ----------------------------------------------------------- */

struct req_stats {
    struct sched *s;
    const char *route;
    uint64_t start_ns;
};

static void
on_req_done(void *arg, int status)
{
    struct req_stats *st = arg;

    sched_metrics_api(st->s, st->route, status,
                      (pd_now_ns() - st->start_ns) / 1000);
    free(st);
}

/* A ?consistent=true read waiting for its barrier on the leader. */
struct barrier_ctx {
    struct pd_http_req *r;
    struct sched_call call;
    struct pd_http_params params;
    const struct pd_http_route *rt;
};

static void
on_barrier(void *data, int status, const char *msg)
{
    struct barrier_ctx *x = data;

    if (status != 0)
        pd_http_respond_error(x->r, 503, "unavailable", "consistent read: "
                              "%s", *msg != '\0' ? msg : strerror(-status));
    else
        x->rt->handler(x->r, &x->params, &x->call);
    free(x);
}

static bool
no_auth(const char *path)
{
    return strcmp(path, "/v1/health") == 0 ||
           strcmp(path, "/.well-known/jwks.json") == 0;
}

static void
on_request(struct pd_http_req *r, void *arg)
{
    struct sched *s = arg;
    struct sched_call call = {.s = s};
    struct pd_http_params params;
    const struct pd_http_route *rt = NULL;
    const char *path = pd_http_req_path(r);
    struct req_stats *st;
    size_t i;

    for (i = 0; i < nroutes && rt == NULL; i++) {
        if ((routes[i].method == NULL ||
             pd_http_req_is(r, routes[i].method)) &&
            pd_http_match(routes[i].pattern, path, &params))
            rt = &routes[i];
    }
    if ((st = malloc(sizeof(*st))) != NULL) {
        st->s = s;
        st->route = rt != NULL ? rt->pattern : "unmatched";
        st->start_ns = pd_now_ns();
        pd_http_on_done(r, on_req_done, st);
    }
    if (s->stopping) {
        pd_http_respond_error(r, 503, "unavailable", "shutting down");
        return;
    }
    if (pd_http_req_injected(r) &&
        pd_http_req_header(r, SCHED_INTERNAL_HEADER) != NULL) {
        /* Another scheduler's own request, over the mutual-TLS link. */
        call.who.role = SCHED_ROLE_ADMIN;
        pd_strlcpy(call.who.tenant, "scheduler", sizeof(call.who.tenant));
    } else if (!no_auth(path) && sched_auth_request(s, r, &call.who) != 0) {
        return;
    }
    if (rt == NULL) {
        pd_http_dispatch(r, routes, nroutes, &call);
        return;
    }
    /* Consistent reads are for state. Sandbox traffic (exec, files,
     * processes) is routed to the agent from here and never forwarded. */
    if (pd_http_req_is(r, "GET") &&
        strncmp(rt->pattern, "/v1/sandboxes/{id}/", 19) != 0 &&
        pd_http_req_query_bool(r, "consistent", false)) {
        struct barrier_ctx *x;
        int rv;

        if (sched_forward_if_follower(&call, r))
            return;
        if ((x = malloc(sizeof(*x))) == NULL) {
            pd_http_respond_error(r, 503, "unavailable", "out of memory");
            return;
        }
        x->r = r;
        x->call = call;
        x->params = params;
        x->rt = rt;
        if ((rv = raftnode_barrier(s->raft, on_barrier, x)) != 0) {
            free(x);
            respond_errno(r, rv, "consistent read", NULL);
        }
        return;
    }
    rt->handler(r, &params, &call);
}

static bool
append_routes(const struct pd_http_route *v, size_t n)
{
    struct pd_http_route *nr;

    if (n == 0)
        return true;
    nr = realloc(routes, (nroutes + n) * sizeof(*nr));
    if (nr == NULL)
        return false;
    memcpy(nr + nroutes, v, n * sizeof(*nr));
    routes = nr;
    nroutes += n;
    return true;
}

int
sched_api_init(struct sched *s, char *err, size_t errlen)
{
    struct pd_http_opts o;
    int rv;

    if (!append_routes(core_routes, PD_ARRAY_SIZE(core_routes)) ||
        !append_routes(sched_cluster_routes, sched_cluster_nroutes) ||
        !append_routes(sched_io_routes, sched_io_nroutes) ||
        !append_routes(sched_token_routes, sched_token_nroutes) ||
        !append_routes(sched_port_routes, sched_port_nroutes)) {
        snprintf(err, errlen, "api: out of memory");
        return -ENOMEM;
    }
    memset(&o, 0, sizeof(o));
    pd_http_limits_default(&o.limits);
    o.tls = s->api_tls;
    o.on_request = on_request;
    o.arg = s;
    if ((rv = pd_http_server_new(s->loop, &o, &s->api, err, errlen)) != 0)
        return rv;
    if ((rv = pd_http_server_listen(s->api, s->cfg.api_listen, err,
                                    errlen)) != 0)
        return rv;
    pd_info("api", "listening on %s%s", s->cfg.api_listen,
            s->api_tls != NULL ? " (TLS)" : "");
    return 0;
}

static void
on_api_closed(void *arg)
{
    PD_UNUSED(arg);
    free(routes);
    routes = NULL;
    nroutes = 0;
}

void
sched_api_close(struct sched *s)
{
    if (s->api == NULL)
        return;
    pd_http_server_close(s->api, on_api_closed, NULL);
    s->api = NULL;
}
