/*
 * The token API: minting, listing and revoking tokens, the JWKS document,
 * signing-key rotation, the revocation push to agents and the garbage
 * collection of expired tokens.
 *
 *   POST   /v1/tokens          admin: {tenant, role, ttl_s, sandbox?}
 *                              -> 201 {token, jti, tenant, role,
 *                                      expires_at, sandbox?}
 *   GET    /v1/tokens          admin: ?tenant= -> {tokens: [...]}
 *   DELETE /v1/tokens/{jti}    admin: TOKEN_REVOKE, pushed to agents
 *   GET    /.well-known/jwks.json  no token needed (the public keys)
 *   GET    /v1/keys            admin: the signing keys, without secrets
 *   POST   /v1/keys/rotate     admin: a new key signs from now on; the old
 *                              ones keep verifying
 *   DELETE /v1/keys/{kid}      admin: retire a key; what it signed stops
 *                              verifying everywhere
 *
 * Writes go through the leader (sched_forward_if_follower). Revocation is
 * effective on a scheduler as soon as it applies the TOKEN_REVOKE entry:
 * every request checks the jti against the FSM (auth.c). The leader then
 * pushes TOKEN_REVOKE {jti, exp} to every agent session, so the agents'
 * egress proxies refuse a sandbox-scoped token without asking; an agent
 * that was not connected at that moment learns the revoked set from its
 * next registration (nodes.c sends the list from fsm_token_list).
 *
 * Expired tokens are dropped by TOKEN_GC, proposed by the leader every
 * TOK_GC_MS when at least one token expired PD_JWT_LEEWAY_S ago or more:
 * the revocation set stays the size of the live tokens. A dropped jti is
 * unknown, and unknown jtis are refused, so GC never revives a token.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "common/log.h"
#include "proto/conn.h"
#include "proto/frame.h"
#include "scheduler/auth.h"

#define TOK_TTL_DEFAULT_S (24 * 3600)
#define TOK_GC_MS (60 * 1000)

/* What a handler keeps once its sched_call is gone. */
struct tokreq {
    struct sched *s;
    struct sched_principal who;
    struct pd_http_req *r;
    char jti[PD_JWT_JTI_LEN + 1];
    char kid[PD_JWT_KID_LEN + 1];
    char tenant[PD_ID_MAX + 1];
    uint64_t exp_ms;
    struct pd_jwt_key *key;
};

static struct tokreq *
tokreq_new(struct sched_call *c, struct pd_http_req *r)
{
    struct tokreq *t = calloc(1, sizeof(*t));

    if (t == NULL) {
        pd_http_respond_error(r, 500, "internal", "out of memory");
        return NULL;
    }
    t->s = c->s;
    t->who = c->who;
    t->r = r;
    return t;
}

static void
tokreq_free(struct tokreq *t)
{
    pd_jwt_key_free(t->key);
    free(t);
}

static void
tokreq_fail(void *arg)
{
    tokreq_free(arg);
}

static bool
require_admin(struct sched_call *c, struct pd_http_req *r)
{
    if (c->who.role == SCHED_ROLE_ADMIN)
        return true;
    pd_info("tokens", "%s %s by %s (%s) refused: admin only",
            pd_http_req_method(r), pd_http_req_path(r), c->who.tenant,
            sched_role_name(c->who.role));
    pd_http_respond_error(r, 403, "forbidden", "this call needs an admin "
                          "token");
    return false;
}

static bool
jti_valid(const char *s)
{
    size_t i;

    if (strlen(s) != PD_JWT_JTI_LEN)
        return false;
    for (i = 0; i < PD_JWT_JTI_LEN; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return false;
    return true;
}

/* ---- POST /v1/tokens --------------------------------------------------- */

static const struct pd_json_field create_fields[] = {
    {"tenant", PD_JSON_STRING, true},
    {"role", PD_JSON_STRING, false},
    {"ttl_s", PD_JSON_UINT, false},
    {"sandbox", PD_JSON_STRING, false},
};

static void
create_minted(void *data, int status, const char *msg, const char *token,
              const struct pd_jwt_claims *cl)
{
    struct tokreq *t = data;
    json_t *j;

    if (status != 0) {
        pd_warn("tokens", "token for %s not minted: %s", t->tenant, msg);
        sched_auth_respond_errno(t->r, status, msg);
        tokreq_free(t);
        return;
    }
    pd_info("tokens", "token %s minted for %s (%s, expires %lld) by %s",
            cl->jti, cl->sub, pd_jwt_role_name(cl->role),
            (long long)cl->exp, t->who.tenant);
    j = json_pack("{s:s, s:s, s:s, s:s, s:I}", "token", token, "jti",
                  cl->jti, "tenant", cl->sub, "role",
                  pd_jwt_role_name(cl->role), "expires_at",
                  (json_int_t)cl->exp);
    if (j != NULL && cl->sandbox[0] != '\0')
        json_object_set_new(j, "sandbox", json_string(cl->sandbox));
    if (j == NULL)
        pd_http_respond_error(t->r, 500, "internal", "out of memory");
    else
        pd_http_respond_json(t->r, 201, j);
    tokreq_free(t);
}

static void
create_body(struct pd_http_req *r, json_t *body, void *arg)
{
    struct tokreq *t = arg;
    const char *tenant = json_string_value(json_object_get(body, "tenant"));
    json_t *jr = json_object_get(body, "role");
    json_t *jt = json_object_get(body, "ttl_s");
    json_t *js = json_object_get(body, "sandbox");
    const char *sandbox = js != NULL ? json_string_value(js) : NULL;
    enum pd_jwt_role role = PD_JWT_ROLE_TENANT;
    json_int_t ttl = jt != NULL ? json_integer_value(jt) : TOK_TTL_DEFAULT_S;
    char err[256];
    int rc;

    if (!pd_id_valid(tenant)) {
        pd_http_respond_error(r, 400, "invalid_argument", "field 'tenant': "
                              "expected an id matching "
                              "[a-z0-9][a-z0-9-]{0,62}");
        goto out;
    }
    if (jr != NULL && pd_jwt_role_parse(json_string_value(jr), &role) != 0) {
        pd_http_respond_error(r, 400, "invalid_argument", "field 'role': "
                              "expected admin, tenant or node");
        goto out;
    }
    if (ttl < 1 || ttl > SCHED_AUTH_TTL_MAX_S) {
        pd_http_respond_error(r, 400, "invalid_argument", "field 'ttl_s': "
                              "expected 1 to %lld seconds",
                              (long long)SCHED_AUTH_TTL_MAX_S);
        goto out;
    }
    if (sandbox != NULL &&
        (!pd_id_valid(sandbox) || role != PD_JWT_ROLE_TENANT)) {
        pd_http_respond_error(r, 400, "invalid_argument", "field "
                              "'sandbox': a sandbox id, for a tenant "
                              "token only");
        goto out;
    }
    pd_strlcpy(t->tenant, tenant, sizeof(t->tenant));
    rc = sched_auth_mint(t->s, tenant, role, sandbox, (int64_t)ttl,
                         create_minted, t, err, sizeof(err));
    json_decref(body);
    if (rc != 0) {
        sched_auth_respond_errno(r, rc, err);
        tokreq_free(t);
    }
    return;
out:
    json_decref(body);
    tokreq_free(t);
}

static void
h_create(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    struct sched_call *c = arg;
    struct tokreq *t;

    (void)p;
    if (!require_admin(c, r) || sched_forward_if_follower(c, r))
        return;
    t = tokreq_new(c, r);
    if (t == NULL)
        return;
    if (sched_read_json(r, 16384, create_fields,
                        sizeof(create_fields) / sizeof(create_fields[0]),
                        create_body, tokreq_fail, t) != 0) {
        pd_http_respond_error(r, 500, "internal", "cannot read the body");
        tokreq_free(t);
    }
}

/* ---- GET /v1/tokens ---------------------------------------------------- */

static json_t *
token_json(const struct fsm_token *k)
{
    json_t *j = json_pack("{s:s, s:s, s:s, s:I, s:I, s:b}", "jti", k->jti,
                          "tenant", k->tenant, "role", k->role,
                          "expires_at", (json_int_t)(k->exp_ms / 1000),
                          "created_at", (json_int_t)(k->created_ms / 1000),
                          "revoked", k->revoked);

    if (j != NULL && k->revoked)
        json_object_set_new(j, "revoked_at",
                            json_integer((json_int_t)(k->revoked_ms / 1000)));
    return j;
}

static void
h_list(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    struct sched_call *c = arg;
    const char *tenant = pd_http_req_query(r, "tenant");
    struct fsm_token *v = NULL;
    json_t *arr;
    size_t n = 0, i;
    int rc;

    (void)p;
    if (!require_admin(c, r))
        return;
    if (tenant != NULL && !pd_id_valid(tenant)) {
        pd_http_respond_error(r, 400, "invalid_argument", "parameter "
                              "'tenant': not a valid id");
        return;
    }
    rc = fsm_token_list(c->s->fsm, tenant, false, &v, &n);
    if (rc != 0) {
        pd_http_respond_error(r, 500, "internal", "cannot list tokens: %s",
                              fsm_errmsg(c->s->fsm));
        return;
    }
    arr = json_array();
    for (i = 0; arr != NULL && i < n; i++)
        json_array_append_new(arr, token_json(&v[i]));
    free(v);
    if (arr == NULL) {
        pd_http_respond_error(r, 500, "internal", "out of memory");
        return;
    }
    pd_http_respond_json(r, 200, json_pack("{s:o}", "tokens", arr));
}

/* ---- DELETE /v1/tokens/{jti} ------------------------------------------- */

/* Tells every connected agent; the frame is the broadcast's to send. */
static void
push_revoke(struct sched *s, const char *jti, uint64_t exp_ms)
{
    struct pd_enc e;

    pd_enc_begin(&e, PD_MSG_TOKEN_REVOKE, 0);
    pd_enc_str(&e, "jti", jti);
    pd_enc_u64(&e, "exp", exp_ms / 1000);
    sched_nodes_broadcast(s, &e);
}

static void
revoke_applied(void *data, int status, const struct fsm_result *res)
{
    struct tokreq *t = data;

    if (status != 0 || res->code != 0) {
        sched_auth_respond_errno(t->r, status != 0 ? status : res->code,
                                 status != 0 ? "the leader changed before "
                                 "the revocation was known committed; "
                                 "retry" : res->message);
        tokreq_free(t);
        return;
    }
    sched_auth_nudge(t->s);
    push_revoke(t->s, t->jti, t->exp_ms);
    sched_metrics_inc(t->s, "tokens_revoked", 1);
    pd_info("tokens", "token %s revoked by %s", t->jti, t->who.tenant);
    pd_http_respond_json(t->r, 200, json_pack("{s:s, s:b}", "jti", t->jti,
                                              "revoked", 1));
    tokreq_free(t);
}

static void
h_revoke(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    struct sched_call *c = arg;
    const char *jti = pd_http_param(p, "jti");
    struct fsm_token tok;
    struct fsm_cmd cmd;
    struct tokreq *t;
    int rc;

    if (!require_admin(c, r))
        return;
    if (jti == NULL || !jti_valid(jti)) {
        pd_http_respond_error(r, 400, "invalid_argument", "a token id is "
                              "32 lower-case hex digits");
        return;
    }
    if (sched_forward_if_follower(c, r))
        return;
    if (fsm_token_get(c->s->fsm, jti, &tok) != 0) {
        pd_http_respond_error(r, 404, "not_found", "no token %s", jti);
        return;
    }
    t = tokreq_new(c, r);
    if (t == NULL)
        return;
    pd_strlcpy(t->jti, jti, sizeof(t->jti));
    t->exp_ms = tok.exp_ms;
    rc = fsm_cmd_init(&cmd, FSM_CMD_TOKEN_REVOKE);
    if (rc == 0) {
        pd_strlcpy(cmd.u.token.jti, jti, sizeof(cmd.u.token.jti));
        rc = raftnode_propose(c->s->raft, &cmd, revoke_applied, t);
    }
    if (rc != 0) {
        sched_auth_respond_errno(r, rc, NULL);
        tokreq_free(t);
    }
}

/* ---- JWKS and keys ----------------------------------------------------- */

static void
h_jwks(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    struct sched_call *c = arg;
    struct pd_jwt_keyset *ks = sched_auth_keyset(c->s);
    char *doc = NULL;

    (void)p;
    if (ks == NULL) {
        pd_http_respond(r, 200, "application/json", "{\"keys\":[]}", 11);
        return;
    }
    if (pd_jwt_keyset_jwks(ks, &doc) != 0) {
        pd_http_respond_error(r, 500, "internal", "cannot encode the keys");
        return;
    }
    pd_http_add_header(r, "Cache-Control", "max-age=60");
    pd_http_respond(r, 200, "application/json", doc, strlen(doc));
    free(doc);
}

static void
h_keys(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    struct sched_call *c = arg;
    struct fsm_key *v = NULL, act;
    size_t n = 0, i;
    json_t *arr;
    bool have_active;

    (void)p;
    if (!require_admin(c, r))
        return;
    if (fsm_key_list(c->s->fsm, &v, &n) != 0) {
        pd_http_respond_error(r, 500, "internal", "cannot list keys: %s",
                              fsm_errmsg(c->s->fsm));
        return;
    }
    have_active = fsm_key_active(c->s->fsm, &act) == 0;
    arr = json_array();
    for (i = 0; arr != NULL && i < n; i++) {
        json_t *k = json_pack("{s:s, s:s, s:I, s:b}", "kid", v[i].kid, "alg",
                              v[i].alg, "created_at",
                              (json_int_t)(v[i].created_ms / 1000), "active",
                              have_active && strcmp(act.kid, v[i].kid) == 0);
        if (k != NULL && v[i].retired_ms != 0)
            json_object_set_new(k, "retired_at", json_integer((json_int_t)(
                                    v[i].retired_ms / 1000)));
        json_array_append_new(arr, k);
    }
    if (have_active)
        fsm_key_clear(&act);
    fsm_keys_free(v, n);
    if (arr == NULL) {
        pd_http_respond_error(r, 500, "internal", "out of memory");
        return;
    }
    pd_http_respond_json(r, 200, json_pack("{s:o}", "keys", arr));
}

static void
rotate_applied(void *data, int status, const struct fsm_result *res)
{
    struct tokreq *t = data;

    if (status != 0 || res->code != 0) {
        sched_auth_respond_errno(t->r, status != 0 ? status : res->code,
                                 status != 0 ? NULL : res->message);
    } else {
        pd_info("tokens", "signing key %s committed by %s; it signs from "
                "now on, older keys still verify", pd_jwt_key_kid(t->key),
                t->who.tenant);
        pd_http_respond_json(t->r, 201, json_pack("{s:s, s:b}", "kid",
                                                  pd_jwt_key_kid(t->key),
                                                  "active", 1));
    }
    tokreq_free(t);
}

static void
h_rotate(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    struct sched_call *c = arg;
    struct fsm_cmd cmd;
    struct tokreq *t;
    char err[256];
    int rc;

    (void)p;
    if (!require_admin(c, r) || sched_forward_if_follower(c, r))
        return;
    t = tokreq_new(c, r);
    if (t == NULL)
        return;
    rc = pd_jwt_key_generate(&t->key, err, sizeof(err));
    if (rc != 0) {
        pd_http_respond_error(r, 500, "internal", "cannot generate a key: "
                              "%s", err);
        tokreq_free(t);
        return;
    }
    rc = fsm_cmd_init(&cmd, FSM_CMD_KEY_ADD);
    if (rc == 0) {
        pd_strlcpy(cmd.u.key.kid, pd_jwt_key_kid(t->key),
                   sizeof(cmd.u.key.kid));
        pd_strlcpy(cmd.u.key.alg, "ES256", sizeof(cmd.u.key.alg));
        cmd.u.key.public_pem = (char *)pd_jwt_key_public_pem(t->key);
        cmd.u.key.private_pem = (char *)pd_jwt_key_private_pem(t->key);
        rc = raftnode_propose(c->s->raft, &cmd, rotate_applied, t);
    }
    if (rc != 0) {
        sched_auth_respond_errno(r, rc, NULL);
        tokreq_free(t);
    }
}

static void
retire_applied(void *data, int status, const struct fsm_result *res)
{
    struct tokreq *t = data;

    if (status != 0 || res->code != 0) {
        sched_auth_respond_errno(t->r, status != 0 ? status : res->code,
                                 status != 0 ? NULL : res->message);
    } else {
        pd_info("tokens", "signing key %s retired by %s; tokens it signed "
                "no longer verify", t->kid, t->who.tenant);
        pd_http_respond_json(t->r, 200, json_pack("{s:s, s:b}", "kid",
                                                  t->kid, "retired", 1));
    }
    tokreq_free(t);
}

static void
h_retire(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    struct sched_call *c = arg;
    const char *kid = pd_http_param(p, "kid");
    struct fsm_key *v = NULL;
    size_t n = 0, i, live = 0;
    bool found = false, retired = false;
    struct fsm_cmd cmd;
    struct tokreq *t;
    int rc;

    if (!require_admin(c, r))
        return;
    if (kid == NULL || strlen(kid) != PD_JWT_KID_LEN) {
        pd_http_respond_error(r, 400, "invalid_argument", "a key id is %d "
                              "base64url characters", PD_JWT_KID_LEN);
        return;
    }
    if (sched_forward_if_follower(c, r))
        return;
    if (fsm_key_list(c->s->fsm, &v, &n) != 0) {
        pd_http_respond_error(r, 500, "internal", "cannot list keys");
        return;
    }
    for (i = 0; i < n; i++) {
        if (v[i].retired_ms == 0)
            live++;
        if (strcmp(v[i].kid, kid) == 0) {
            found = true;
            retired = v[i].retired_ms != 0;
        }
    }
    fsm_keys_free(v, n);
    if (!found || retired) {
        pd_http_respond_error(r, 404, "not_found", "no signing key %s%s",
                              kid, retired ? " in use (already retired)"
                                           : "");
        return;
    }
    if (live <= 1) {
        pd_http_respond_error(r, 409, "conflict", "%s is the only key in "
                              "use; rotate first (POST /v1/keys/rotate)",
                              kid);
        return;
    }
    t = tokreq_new(c, r);
    if (t == NULL)
        return;
    pd_strlcpy(t->kid, kid, sizeof(t->kid));
    rc = fsm_cmd_init(&cmd, FSM_CMD_KEY_RETIRE);
    if (rc == 0) {
        pd_strlcpy(cmd.u.key.kid, kid, sizeof(cmd.u.key.kid));
        rc = raftnode_propose(c->s->raft, &cmd, retire_applied, t);
    }
    if (rc != 0) {
        sched_auth_respond_errno(r, rc, NULL);
        tokreq_free(t);
    }
}

const struct pd_http_route sched_token_routes[] = {
    {"POST", "/v1/tokens", h_create},
    {"GET", "/v1/tokens", h_list},
    {"DELETE", "/v1/tokens/{jti}", h_revoke},
    {"GET", "/.well-known/jwks.json", h_jwks},
    {"GET", "/v1/keys", h_keys},
    {"POST", "/v1/keys/rotate", h_rotate},
    {"DELETE", "/v1/keys/{kid}", h_retire},
};
const size_t sched_token_nroutes =
    sizeof(sched_token_routes) / sizeof(sched_token_routes[0]);

/* ---- Garbage collection on the leader ---------------------------------- */

static uv_timer_t *gc_timer;
static bool gc_busy;

static void
gc_applied(void *data, int status, const struct fsm_result *res)
{
    (void)data;
    gc_busy = false;
    if (status == 0 && res->code == 0 && res->count > 0)
        pd_info("tokens", "%llu expired tokens dropped",
                (unsigned long long)res->count);
    else if (status != 0)
        pd_debug("tokens", "token gc not applied: %s", strerror(-status));
}

static void
gc_tick(uv_timer_t *t)
{
    struct sched *s = t->data;
    struct fsm_token *v = NULL;
    struct fsm_cmd cmd;
    uint64_t cutoff = pd_wall_ms() - PD_JWT_LEEWAY_S * 1000ull;
    size_t n = 0, i, due = 0;

    if (gc_busy || s->raft == NULL || !raftnode_is_leader(s->raft))
        return;
    if (fsm_token_list(s->fsm, NULL, false, &v, &n) != 0)
        return;
    for (i = 0; i < n; i++)
        if (v[i].exp_ms != 0 && v[i].exp_ms <= cutoff)
            due++;
    free(v);
    if (due == 0 || fsm_cmd_init(&cmd, FSM_CMD_TOKEN_GC) != 0)
        return;
    /* Tokens within the verification leeway still verify: keep them. */
    cmd.now_ms = cutoff;
    if (raftnode_propose(s->raft, &cmd, gc_applied, NULL) == 0)
        gc_busy = true;
}

int
sched_tokens_init(struct sched *s)
{
    const char *env = getenv("PADDOCK_TOKEN_GC_MS");
    uint64_t ms = TOK_GC_MS;

    if (env != NULL && pd_parse_u64(env, &ms) != 0)
        ms = TOK_GC_MS;
    if (ms == 0)
        ms = TOK_GC_MS;
    gc_timer = malloc(sizeof(*gc_timer));
    if (gc_timer == NULL)
        return -ENOMEM;
    uv_timer_init(s->loop, gc_timer);
    gc_timer->data = s;
    uv_timer_start(gc_timer, gc_tick, ms, ms);
    uv_unref((uv_handle_t *)gc_timer);
    return 0;
}

static void
gc_closed(uv_handle_t *h)
{
    free(h);
}

void
sched_tokens_close(struct sched *s)
{
    (void)s;
    if (gc_timer == NULL)
        return;
    uv_close((uv_handle_t *)gc_timer, gc_closed);
    gc_timer = NULL;
}

/* ---- The revoked set for an agent that (re)registers ------------------- */

void
sched_tokens_push_revoked(struct sched *s, struct pd_conn *c)
{
    struct fsm_token *v = NULL;
    uint64_t now = pd_wall_ms();
    size_t n = 0, i, sent = 0;
    struct pd_enc e;

    if (c == NULL || fsm_token_list(s->fsm, NULL, true, &v, &n) != 0)
        return;
    for (i = 0; i < n; i++) {
        if (v[i].exp_ms != 0 && v[i].exp_ms <= now)
            continue;
        pd_enc_begin(&e, PD_MSG_TOKEN_REVOKE, 0);
        pd_enc_str(&e, "jti", v[i].jti);
        pd_enc_u64(&e, "exp", v[i].exp_ms / 1000);
        if (pd_conn_send(c, &e) == 0)
            sent++;
    }
    free(v);
    if (sent > 0)
        pd_debug("tokens", "%zu revoked tokens sent to a registering agent",
                 sent);
}
