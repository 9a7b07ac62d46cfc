/*
 * Bearer tokens for the API: the signing keys, the bootstrap admin token,
 * verification of every request, roles, tenants and the per-token rate
 * limit.
 *
 * Where the signing keys live
 * ---------------------------
 * The keys are rows of the replicated signing-keys table: KEY_ADD carries
 * the public and the private PEM (option (a) of proto/jwt.h). Every
 * scheduler builds the same key set from the same rows, so any member that
 * becomes the leader can mint tokens at once, a new key is one Raft command
 * (POST /v1/keys/rotate) and a retired key stops verifying on every member
 * at the same log index. No deploy script has to put a key file on every
 * host and keep them in step.
 *
 * Threat model of that choice. The private key is everywhere the Raft data
 * goes: in the log segments and snapshots under each member's data
 * directory (mode 0700, the scheduler's user), in backups of those
 * directories, and on the wire between members, because libraft's TCP
 * transport is not encrypted. Whoever reads any of these can mint any
 * token, admin included, until the key is retired; retiring a key makes
 * its tokens fail everywhere but does not erase the PEM from old segments
 * or backups. Hence: the Raft port must only be reachable on a trusted
 * network (loopback in the local cluster, a private VLAN or a WireGuard
 * mesh between control hosts in production), the data directories are as
 * secret as the key itself, and a suspected leak is answered by rotating
 * and then retiring the old key, which invalidates every token it signed.
 * What it does not add: the key never leaves the schedulers through the
 * API, the agents (which get public keys only) or the logs. The
 * alternative, private keys in files on each scheduler (option (c) of
 * jwt.h), closes the wire and backup paths but needs the deploy scripts to
 * distribute every new key before it is committed; that is the way to go
 * for a deployment whose Raft traffic crosses an untrusted network.
 *
 * The key set is rebuilt whenever the table changes: each request compares
 * the FSM's applied count with the one the set was built at, and only
 * when it moved lists the (few) keys and compares their kids and retired
 * marks. A rebuild never happens inside an apply.
 *
 * Verification (pd_jwt_verify): ES256 only, the kid's key, the signature,
 * the issuer, exp and nbf with PD_JWT_LEEWAY_S, then the jti against the
 * FSM: revoked, or unknown to the tokens table (a token the cluster never
 * recorded, or one garbage-collected after it expired), is refused.
 */
#include "scheduler/auth.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>

#include "common/log.h"
#include "scheduler/ratelimit.h"

/* Defaults when the configuration leaves the rate limit at 0. */
#define AUTH_RATE_DEFAULT 50
#define AUTH_BURST_DEFAULT 200
#define AUTH_RL_KEYS 8192

/* After a lost leadership, how long to watch for the admin token. */
#define BOOT_WATCH_MS 200
#define BOOT_WATCH_TRIES 50

struct boot;

struct sched_auth {
    struct sched *s;
    struct pd_jwt_keyset *ks;
    uint64_t ks_applied;      /* fsm_applied() when ks was checked */
    char *ks_sig;             /* "kid:retired\n" per key, newest first */
    bool ks_checked;
    struct sched_ratelimit *rl;
    struct boot *boot;        /* bootstrap in progress, or NULL */
    uv_timer_t watch;         /* admin token after a lost leadership */
    bool watch_init;
    unsigned watch_tries;
    char watch_jti[PD_JWT_JTI_LEN + 1];
    char *watch_token;
};

/* ---- Proposals with one retry after a lost leadership ----------------- */

struct prop {
    struct sched *s;
    struct fsm_cmd cmd;
    raftnode_apply_cb cb;
    void *data;
    bool retried;
};

static void
prop_done(void *data, int status, const struct fsm_result *res)
{
    struct prop *p = data;
    int rc;

    /* The same request id again: applied at most once whatever happened
     * to the first attempt. */
    if (status == RAFTNODE_ELOST && !p->retried &&
        raftnode_is_leader(p->s->raft)) {
        p->retried = true;
        rc = raftnode_propose(p->s->raft, &p->cmd, prop_done, p);
        if (rc == 0)
            return;
    }
    p->cb(p->data, status, res);
    free(p);
}

/* Proposes a copy of cmd (its heap pointers stay the caller's until cb);
 * 0 (cb will run) or a negative errno (it will not). */
static int
propose(struct sched *s, const struct fsm_cmd *cmd, raftnode_apply_cb cb,
        void *data)
{
    struct prop *p;
    int rc;

    if (s->raft == NULL)
        return RAFTNODE_ENOTLEADER;
    p = calloc(1, sizeof(*p));
    if (p == NULL)
        return -ENOMEM;
    p->s = s;
    p->cmd = *cmd;
    p->cb = cb;
    p->data = data;
    rc = raftnode_propose(s->raft, &p->cmd, prop_done, p);
    if (rc != 0)
        free(p);
    return rc;
}

/* ---- The key set ------------------------------------------------------- */

static bool
is_revoked(void *arg, const char *jti)
{
    struct sched *s = arg;

    return fsm_token_is_revoked(s->fsm, jti);
}

static char *
keys_signature(const struct fsm_key *v, size_t n)
{
    size_t len = 1, off = 0, i;
    char *sig;

    for (i = 0; i < n; i++)
        len += strlen(v[i].kid) + 4;
    sig = malloc(len);
    if (sig == NULL)
        return NULL;
    for (i = 0; i < n; i++)
        off += (size_t)snprintf(sig + off, len - off, "%s:%c\n", v[i].kid,
                                v[i].retired_ms != 0 ? 'r' : 'a');
    sig[off] = '\0';
    return sig;
}

/* A key set of the rows that are not retired; the newest signs. */
static struct pd_jwt_keyset *
keyset_build(struct sched *s, const struct fsm_key *v, size_t n)
{
    struct pd_jwt_keyset *ks;
    struct pd_jwt_key *key;
    const char *signer = NULL, *pem;
    char err[256];
    size_t i;
    int rc;

    if (pd_jwt_keyset_new(SCHED_AUTH_ISSUER, &ks) != 0)
        return NULL;
    pd_jwt_keyset_set_revoked(ks, is_revoked, s);
    for (i = 0; i < n; i++) {
        if (v[i].retired_ms != 0)
            continue;
        pem = v[i].private_pem != NULL && v[i].private_pem[0] != '\0'
                  ? v[i].private_pem
                  : v[i].public_pem;
        if (pem == NULL)
            continue;
        rc = pd_jwt_key_from_pem(pem, strlen(pem), &key, err, sizeof(err));
        if (rc != 0) {
            pd_warn("auth", "signing key %s unusable: %s; skipping it",
                    v[i].kid, err);
            continue;
        }
        if (strcmp(pd_jwt_key_kid(key), v[i].kid) != 0) {
            pd_warn("auth", "signing key %s: its PEM has kid %s; skipping "
                    "it", v[i].kid, pd_jwt_key_kid(key));
            pd_jwt_key_free(key);
            continue;
        }
        rc = pd_jwt_keyset_add(ks, key);
        if (rc == -ENOSPC) {
            pd_warn("auth", "more than %d signing keys are not retired; "
                    "the oldest no longer verify", PD_JWT_KEYSET_MAX);
            break;
        }
        if (rc == 0 && signer == NULL)
            signer = v[i].kid;
    }
    if (signer != NULL)
        pd_jwt_keyset_set_signer(ks, signer);
    return ks;
}

struct pd_jwt_keyset *
sched_auth_keyset(struct sched *s)
{
    struct sched_auth *a = s->auth;
    struct pd_jwt_keyset *ks;
    struct fsm_key *v = NULL;
    size_t n = 0;
    uint64_t applied;
    char *sig;

    if (a == NULL || s->fsm == NULL)
        return NULL;
    applied = fsm_applied(s->fsm);
    if (a->ks_checked && applied == a->ks_applied)
        return a->ks;
    if (fsm_key_list(s->fsm, &v, &n) != 0) {
        pd_warn("auth", "cannot list signing keys: %s; keeping the old set",
                fsm_errmsg(s->fsm));
        return a->ks;
    }
    sig = keys_signature(v, n);
    if (sig == NULL) {
        fsm_keys_free(v, n);
        return a->ks;
    }
    a->ks_applied = applied;
    a->ks_checked = true;
    if (a->ks_sig != NULL && strcmp(sig, a->ks_sig) == 0) {
        free(sig);
        fsm_keys_free(v, n);
        return a->ks;
    }
    ks = n > 0 ? keyset_build(s, v, n) : NULL;
    fsm_keys_free(v, n);
    if (n > 0 && ks == NULL) {
        free(sig);
        a->ks_checked = false;
        return a->ks;
    }
    pd_jwt_keyset_free(a->ks);
    a->ks = ks;
    free(a->ks_sig);
    a->ks_sig = sig;
    pd_debug("auth", "key set rebuilt: %zu keys verify",
             ks != NULL ? pd_jwt_keyset_count(ks) : 0);
    return a->ks;
}

static void
nudge_done(void *data, int status, const char *msg)
{
    (void)data;
    (void)status;
    (void)msg;
}

void
sched_auth_nudge(struct sched *s)
{
    if (s->raft == NULL || raftnode_barrier(s->raft, nudge_done, NULL) != 0)
        pd_debug("auth", "no barrier; followers apply the last change at "
                 "the next heartbeat");
}

/* ---- Minting ----------------------------------------------------------- */

struct mint {
    struct sched *s;
    sched_mint_cb cb;
    void *data;
    char *token;
    struct pd_jwt_claims claims;
};

static void
mint_applied(void *data, int status, const struct fsm_result *res)
{
    struct mint *m = data;

    if (status != 0)
        m->cb(m->data, status, "the leader changed before the token was "
              "recorded; retry", NULL, NULL);
    else if (res->code != 0)
        m->cb(m->data, res->code, res->message, NULL, NULL);
    else {
        sched_auth_nudge(m->s);
        m->cb(m->data, 0, "", m->token, &m->claims);
    }
    free(m->token);
    free(m);
}

int
sched_auth_mint(struct sched *s, const char *sub, enum pd_jwt_role role,
                const char *sandbox, int64_t ttl_s, sched_mint_cb cb,
                void *data, char *err, size_t errlen)
{
    struct pd_jwt_keyset *ks = sched_auth_keyset(s);
    struct pd_jwt_spec spec = {
        .sub = sub,
        .role = role,
        .sandbox = sandbox,
        .now_s = (int64_t)(pd_wall_ms() / 1000),
        .ttl_s = ttl_s,
    };
    struct fsm_cmd cmd;
    struct mint *m;
    int rc;

    if (ks == NULL) {
        snprintf(err, errlen, "the cluster has no signing key yet");
        return -EAGAIN;
    }
    m = calloc(1, sizeof(*m));
    if (m == NULL) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    rc = pd_jwt_sign(ks, &spec, &m->token, &m->claims, err, errlen);
    if (rc != 0) {
        free(m);
        return rc;
    }
    m->s = s;
    m->cb = cb;
    m->data = data;
    rc = fsm_cmd_init(&cmd, FSM_CMD_TOKEN_CREATE);
    if (rc == 0) {
        pd_strlcpy(cmd.u.token.jti, m->claims.jti, sizeof(cmd.u.token.jti));
        pd_strlcpy(cmd.u.token.tenant, sub, sizeof(cmd.u.token.tenant));
        pd_strlcpy(cmd.u.token.role, pd_jwt_role_name(role),
                   sizeof(cmd.u.token.role));
        cmd.u.token.exp_ms = (uint64_t)m->claims.exp * 1000;
        rc = propose(s, &cmd, mint_applied, m);
    }
    if (rc != 0) {
        snprintf(err, errlen, "%s", rc == RAFTNODE_ENOTLEADER
                                         ? "this scheduler is not the leader"
                                         : strerror(-rc));
        free(m->token);
        free(m);
    }
    return rc;
}

static void
scoped_recorded(void *data, int status, const struct fsm_result *res)
{
    char *jti = data;

    if (status != 0 || res->code != 0)
        pd_warn("auth", "sandbox token %s not recorded: %s; it cannot be "
                "revoked by id", jti, status != 0 ? strerror(-status)
                                                  : res->message);
    free(jti);
}

char *
sched_auth_sandbox_token(struct sched *s, const char *tenant,
                         const char *sandbox)
{
    struct pd_jwt_keyset *ks = sched_auth_keyset(s);
    struct pd_jwt_spec spec = {
        .sub = tenant,
        .role = PD_JWT_ROLE_TENANT,
        .sandbox = sandbox,
        .now_s = (int64_t)(pd_wall_ms() / 1000),
        .ttl_s = SCHED_AUTH_SANDBOX_TTL_S,
    };
    struct pd_jwt_claims cl;
    struct fsm_cmd cmd;
    char err[256], subj[PD_ID_MAX + 16], *tok = NULL, *jti;

    snprintf(subj, sizeof(subj), "sandbox %s", sandbox ? sandbox : "?");
    if (ks == NULL) {
        pd_warn(subj, "no signing key yet; starting without a sandbox "
                "token");
        return NULL;
    }
    if (pd_jwt_sign(ks, &spec, &tok, &cl, err, sizeof(err)) != 0) {
        pd_warn(subj, "cannot sign a sandbox token: %s; starting without "
                "one", err);
        return NULL;
    }
    jti = strdup(cl.jti);
    if (jti == NULL || fsm_cmd_init(&cmd, FSM_CMD_TOKEN_CREATE) != 0) {
        free(jti);
        free(tok);
        return NULL;
    }
    pd_strlcpy(cmd.u.token.jti, cl.jti, sizeof(cmd.u.token.jti));
    pd_strlcpy(cmd.u.token.tenant, tenant, sizeof(cmd.u.token.tenant));
    pd_strlcpy(cmd.u.token.role, "tenant", sizeof(cmd.u.token.role));
    cmd.u.token.exp_ms = (uint64_t)cl.exp * 1000;
    if (propose(s, &cmd, scoped_recorded, jti) != 0) {
        pd_warn(subj, "sandbox token %s not recorded (not the leader); it "
                "cannot be revoked by id", cl.jti);
        free(jti);
    }
    pd_debug(subj, "sandbox token %s, expires %lld", cl.jti,
             (long long)cl.exp);
    return tok;
}

/* ---- Bootstrap on the leader ------------------------------------------- */

struct boot {
    struct sched *s;
    struct pd_jwt_key *key; /* KEY_ADD in flight */
    char *token;            /* BOOTSTRAP_ADMIN in flight */
    char jti[PD_JWT_JTI_LEN + 1];
};

static void boot_step(struct boot *b);

static void
boot_end(struct boot *b)
{
    if (b->s->auth != NULL && b->s->auth->boot == b)
        b->s->auth->boot = NULL;
    pd_jwt_key_free(b->key);
    if (b->token != NULL) {
        explicit_bzero(b->token, strlen(b->token));
        free(b->token);
    }
    free(b);
}

static void
admin_token_write(struct sched *s, const char *token)
{
    char path[4096];
    int rc;

    snprintf(path, sizeof(path), "%s/admin.token", s->cfg.data_dir);
    rc = pd_write_file_atomic(path, token, strlen(token), 0600);
    if (rc != 0)
        pd_log_errno(PD_LOG_ERROR, -rc, "auth", "cannot write %s; the "
                     "bootstrap admin token is lost, mint another with a "
                     "key from the data directory", path);
    else
        pd_info("auth", "bootstrap admin token written to %s", path);
}

static void
watch_stop(struct sched_auth *a)
{
    if (a->watch_init)
        uv_timer_stop(&a->watch);
    if (a->watch_token != NULL) {
        explicit_bzero(a->watch_token, strlen(a->watch_token));
        free(a->watch_token);
        a->watch_token = NULL;
    }
}

/* The BOOTSTRAP_ADMIN outcome was unknown (leadership lost): if the entry
 * was committed after all, this member still holds the only copy of the
 * token, so it writes the file once the entry is applied here. */
static void
watch_tick(uv_timer_t *t)
{
    struct sched_auth *a = t->data;
    char jti[FSM_JTI_MAX + 1];

    if (fsm_admin_jti(a->s->fsm, jti, sizeof(jti)) == 0) {
        if (strcmp(jti, a->watch_jti) == 0)
            admin_token_write(a->s, a->watch_token);
        watch_stop(a);
        return;
    }
    if (++a->watch_tries >= BOOT_WATCH_TRIES) {
        pd_info("auth", "bootstrap admin token was not committed; the "
                "next leader mints one");
        watch_stop(a);
    }
}

static void
watch_start(struct sched_auth *a, const char *jti, const char *token)
{
    watch_stop(a);
    a->watch_token = strdup(token);
    if (a->watch_token == NULL)
        return;
    pd_strlcpy(a->watch_jti, jti, sizeof(a->watch_jti));
    a->watch_tries = 0;
    if (!a->watch_init) {
        uv_timer_init(a->s->loop, &a->watch);
        a->watch.data = a;
        a->watch_init = true;
    }
    uv_timer_start(&a->watch, watch_tick, BOOT_WATCH_MS, BOOT_WATCH_MS);
}

static void
boot_key_applied(void *data, int status, const struct fsm_result *res)
{
    struct boot *b = data;

    pd_jwt_key_free(b->key);
    b->key = NULL;
    if (status != 0 || res->code != 0) {
        pd_warn("auth", "signing key not committed: %s; the next leader "
                "tries again", status != 0 ? strerror(-status)
                                           : res->message);
        boot_end(b);
        return;
    }
    pd_info("auth", "signing key committed");
    boot_step(b);
}

static void
boot_admin_applied(void *data, int status, const struct fsm_result *res)
{
    struct boot *b = data;

    if (status == 0 && res->code == 0) {
        admin_token_write(b->s, b->token);
    } else if (status == RAFTNODE_ELOST && b->s->auth != NULL) {
        watch_start(b->s->auth, b->jti, b->token);
    } else if (status == 0 && res->code == -EEXIST) {
        pd_debug("auth", "bootstrap admin token already exists");
    } else {
        pd_warn("auth", "bootstrap admin token not committed: %s; the next "
                "leader tries again", status != 0 ? strerror(-status)
                                                  : res->message);
    }
    boot_end(b);
}

static int
boot_key(struct boot *b)
{
    struct fsm_cmd cmd;
    char err[256];
    int rc;

    rc = pd_jwt_key_generate(&b->key, err, sizeof(err));
    if (rc != 0) {
        pd_error("auth", "cannot generate a signing key: %s", err);
        return rc;
    }
    rc = fsm_cmd_init(&cmd, FSM_CMD_KEY_ADD);
    if (rc != 0)
        return rc;
    pd_strlcpy(cmd.u.key.kid, pd_jwt_key_kid(b->key), sizeof(cmd.u.key.kid));
    pd_strlcpy(cmd.u.key.alg, "ES256", sizeof(cmd.u.key.alg));
    cmd.u.key.public_pem = (char *)pd_jwt_key_public_pem(b->key);
    cmd.u.key.private_pem = (char *)pd_jwt_key_private_pem(b->key);
    return propose(b->s, &cmd, boot_key_applied, b);
}

static int
boot_admin(struct boot *b)
{
    struct pd_jwt_keyset *ks = sched_auth_keyset(b->s);
    struct pd_jwt_spec spec = {
        .sub = "admin",
        .role = PD_JWT_ROLE_ADMIN,
        .now_s = (int64_t)(pd_wall_ms() / 1000),
        .ttl_s = SCHED_AUTH_ADMIN_TTL_S,
    };
    struct pd_jwt_claims cl;
    struct fsm_cmd cmd;
    char err[256];
    int rc;

    if (ks == NULL)
        return -ENOKEY;
    rc = pd_jwt_sign(ks, &spec, &b->token, &cl, err, sizeof(err));
    if (rc != 0) {
        pd_error("auth", "cannot sign the bootstrap admin token: %s", err);
        return rc;
    }
    pd_strlcpy(b->jti, cl.jti, sizeof(b->jti));
    rc = fsm_cmd_init(&cmd, FSM_CMD_BOOTSTRAP_ADMIN);
    if (rc != 0)
        return rc;
    pd_strlcpy(cmd.u.token.jti, cl.jti, sizeof(cmd.u.token.jti));
    pd_strlcpy(cmd.u.token.tenant, "admin", sizeof(cmd.u.token.tenant));
    pd_strlcpy(cmd.u.token.role, "admin", sizeof(cmd.u.token.role));
    cmd.u.token.exp_ms = (uint64_t)cl.exp * 1000;
    return propose(b->s, &cmd, boot_admin_applied, b);
}

static void
boot_step(struct boot *b)
{
    struct fsm_key k;
    char jti[FSM_JTI_MAX + 1];
    int rc;

    if (!raftnode_is_leader(b->s->raft)) {
        boot_end(b);
        return;
    }
    rc = fsm_key_active(b->s->fsm, &k);
    if (rc == 0)
        fsm_key_clear(&k);
    if (rc == -ENOENT) {
        rc = boot_key(b);
    } else if (fsm_admin_jti(b->s->fsm, jti, sizeof(jti)) == -ENOENT) {
        rc = boot_admin(b);
    } else {
        boot_end(b);
        return;
    }
    if (rc != 0) {
        pd_warn("auth", "bootstrap stopped: %s; retried at the next "
                "leadership", strerror(-rc));
        boot_end(b);
    }
}

/* A new leader may still have committed entries to apply: the barrier makes
 * the "no key yet" and "no admin token yet" checks look at the whole log. */
static void
boot_barrier_done(void *data, int status, const char *msg)
{
    struct boot *b = data;

    if (status != 0) {
        pd_warn("auth", "barrier failed: %s; bootstrap retried at the next "
                "leadership", msg != NULL && msg[0] ? msg : strerror(-status));
        boot_end(b);
        return;
    }
    boot_step(b);
}

void
sched_auth_on_leader(struct sched *s)
{
    struct sched_auth *a = s->auth;
    struct boot *b;

    if (a == NULL || a->boot != NULL || s->raft == NULL)
        return;
    b = calloc(1, sizeof(*b));
    if (b == NULL)
        return;
    b->s = s;
    a->boot = b;
    if (raftnode_barrier(s->raft, boot_barrier_done, b) != 0) {
        pd_warn("auth", "cannot start a barrier; bootstrap retried at the "
                "next leadership");
        boot_end(b);
    }
}

/* ---- Requests ---------------------------------------------------------- */

const char *
sched_role_name(enum sched_role role)
{
    switch (role) {
    case SCHED_ROLE_ADMIN:
        return "admin";
    case SCHED_ROLE_TENANT:
        return "tenant";
    case SCHED_ROLE_NODE:
        return "node";
    }
    return "unknown";
}

/* The unverified sub and jti of a refused token, for the log line only:
 * each is printed only when it is a well-formed id, so a forged payload
 * cannot write into the log. */
static void
unverified_claims(const char *token, char *sub, size_t sublen, char *jti,
                  size_t jtilen)
{
    const char *d1 = strchr(token, '.'), *d2;
    char buf[2048];
    json_t *j, *v;
    long n;

    snprintf(sub, sublen, "?");
    snprintf(jti, jtilen, "?");
    if (d1 == NULL || (d2 = strchr(d1 + 1, '.')) == NULL)
        return;
    n = pd_b64url_decode(d1 + 1, (size_t)(d2 - d1 - 1), buf,
                         sizeof(buf) - 1);
    if (n < 0)
        return;
    j = json_loadb(buf, (size_t)n, 0, NULL);
    if (j == NULL)
        return;
    v = json_object_get(j, "sub");
    if (json_is_string(v) && pd_id_valid(json_string_value(v)))
        snprintf(sub, sublen, "%s", json_string_value(v));
    v = json_object_get(j, "jti");
    if (json_is_string(v) && pd_label_valid(json_string_value(v), 63))
        snprintf(jti, jtilen, "%s", json_string_value(v));
    json_decref(j);
}

static const char *
refusal_message(int rc)
{
    switch (rc) {
    case -EINVAL:
        return "malformed token";
    case -ENOTSUP:
        return "token algorithm not accepted (only ES256)";
    case -ENOKEY:
        return "token signed by an unknown or retired key";
    case -EBADMSG:
        return "token signature does not verify";
    case -EACCES:
        return "token issued by another issuer";
    case -EKEYEXPIRED:
        return "token expired";
    case -ETIME:
        return "token not valid yet";
    case -EKEYREVOKED:
        return "token revoked";
    default:
        return "token refused";
    }
}

static int
refuse(struct pd_http_req *r, const char *why, const char *sub,
       const char *jti)
{
    pd_info("auth", "%s %s from %s refused: %s (sub %s, jti %s)",
            pd_http_req_method(r), pd_http_req_path(r), pd_http_req_peer(r),
            why, sub, jti);
    pd_http_add_header(r, "WWW-Authenticate", "Bearer realm=\"paddock\"");
    pd_http_respond_error(r, 401, "unauthorized", "%s", why);
    return -EACCES;
}

/* The token of "Authorization: Bearer <token>", or NULL. */
static const char *
bearer(const char *h)
{
    if (h == NULL || strncasecmp(h, "Bearer", 6) != 0 ||
        (h[6] != ' ' && h[6] != '\t'))
        return NULL;
    h += 6;
    while (*h == ' ' || *h == '\t')
        h++;
    return *h != '\0' ? h : NULL;
}

int
sched_auth_request(struct sched *s, struct pd_http_req *r,
                   struct sched_principal *out)
{
    struct pd_jwt_keyset *ks = sched_auth_keyset(s);
    const char *h = pd_http_req_header(r, "Authorization");
    const char *tok = bearer(h);
    struct pd_jwt_claims cl;
    char sub[PD_ID_MAX + 1], jti[64], ra[32];
    unsigned retry;
    int rc;

    memset(out, 0, sizeof(*out));
    if (h == NULL)
        return refuse(r, "missing bearer token (Authorization: Bearer "
                      "<token>)", "-", "-");
    if (tok == NULL)
        return refuse(r, "malformed Authorization header (expected "
                      "\"Bearer <token>\")", "-", "-");
    if (ks == NULL) {
        pd_http_respond_error(r, 503, "unavailable", "the cluster has no "
                              "signing key yet; retry shortly");
        return -EAGAIN;
    }
    rc = pd_jwt_verify(ks, tok, (int64_t)(pd_wall_ms() / 1000), &cl);
    if (rc != 0) {
        struct fsm_token row;
        const char *why = refusal_message(rc);

        unverified_claims(tok, sub, sizeof(sub), jti, sizeof(jti));
        sched_metrics_inc(s, "auth_refused", 1);
        /* The hook runs only on a valid signature, so this jti is ours: a
         * missing row is not a revocation but an unknown token, e.g. one
         * minted on the leader a moment ago and not applied here yet. */
        if (rc == -EKEYREVOKED && fsm_token_get(s->fsm, jti, &row) != 0)
            why = "token unknown to this scheduler (never recorded, "
                  "expired and collected, or not replicated here yet)";
        return refuse(r, why, sub, jti);
    }

    /* A forwarded write was charged by the follower that took it; the
     * leader charging it again would halve the rate of every client that
     * happens to reach a follower. */
    retry = s->auth->rl != NULL && !pd_http_req_injected(r)
                ? sched_ratelimit_take(s->auth->rl, cl.jti, pd_now_ms())
                : 0;
    if (retry > 0) {
        snprintf(ra, sizeof(ra), "%u", retry);
        pd_debug("auth", "token %s (sub %s) rate limited for %u s", cl.jti,
                 cl.sub, retry);
        sched_metrics_inc(s, "auth_rate_limited", 1);
        pd_http_add_header(r, "Retry-After", ra);
        pd_http_respond_error(r, 429, "rate_limited", "too many requests "
                              "for this token; retry after %u s", retry);
        return -EBUSY;
    }

    /* A sandbox-scoped token lives inside an untrusted VM: it is for the
     * egress proxy only and must not drive the API, not even for the
     * sandbox it is bound to. */
    if (cl.sandbox[0] != '\0') {
        pd_info("auth", "%s %s from %s refused: sandbox-scoped token (sub "
                "%s, jti %s)", pd_http_req_method(r), pd_http_req_path(r),
                pd_http_req_peer(r), cl.sub, cl.jti);
        pd_http_respond_error(r, 403, "forbidden", "a sandbox-scoped token "
                              "is only accepted by the egress proxy");
        return -EPERM;
    }

    switch (cl.role) {
    case PD_JWT_ROLE_ADMIN:
        out->role = SCHED_ROLE_ADMIN;
        break;
    case PD_JWT_ROLE_TENANT:
        out->role = SCHED_ROLE_TENANT;
        break;
    default:
        out->role = SCHED_ROLE_NODE;
        break;
    }
    pd_strlcpy(out->tenant, cl.sub, sizeof(out->tenant));
    pd_strlcpy(out->jti, cl.jti, sizeof(out->jti));
    pd_strlcpy(out->sandbox, cl.sandbox, sizeof(out->sandbox));
    return 0;
}

int
sched_auth_node_token(struct sched *s, const char *token, const char *node,
                      char *why, size_t whylen)
{
    struct pd_jwt_keyset *ks = sched_auth_keyset(s);
    struct pd_jwt_claims cl;
    int rc;

    if (ks == NULL) {
        snprintf(why, whylen, "the cluster has no signing key yet");
        return -EAGAIN;
    }
    rc = pd_jwt_verify(ks, token, (int64_t)(pd_wall_ms() / 1000), &cl);
    if (rc != 0) {
        snprintf(why, whylen, "join token refused: %s",
                 refusal_message(rc));
        return rc;
    }
    if (cl.role != PD_JWT_ROLE_NODE || cl.sandbox[0] != '\0') {
        snprintf(why, whylen, "join token refused: role %s is not node",
                 pd_jwt_role_name(cl.role));
        return -EPERM;
    }
    if (node == NULL || strcmp(cl.sub, node) != 0) {
        snprintf(why, whylen, "join token refused: it is for node %s",
                 cl.sub);
        return -EPERM;
    }
    return 0;
}

bool
sched_auth_owns(const struct sched_principal *p, const char *tenant)
{
    if (p == NULL || tenant == NULL)
        return false;
    switch (p->role) {
    case SCHED_ROLE_ADMIN:
        return true;
    case SCHED_ROLE_TENANT:
        return p->tenant[0] != '\0' && strcmp(p->tenant, tenant) == 0;
    default:
        return false;
    }
}

void
sched_auth_respond_errno(struct pd_http_req *r, int status, const char *msg)
{
    const char *m = msg != NULL && msg[0] != '\0' ? msg : strerror(-status);

    switch (status) {
    case RAFTNODE_ELOST:
    case RAFTNODE_ENOTLEADER:
    case RAFTNODE_ESHUTDOWN:
    case -EAGAIN:
        pd_http_respond_error(r, 503, "unavailable", "%s", m);
        break;
    case -ENOENT:
        pd_http_respond_error(r, 404, "not_found", "%s", m);
        break;
    case -EEXIST:
    case -EBUSY:
        pd_http_respond_error(r, 409, "conflict", "%s", m);
        break;
    case -EINVAL:
    case -ENAMETOOLONG:
        pd_http_respond_error(r, 400, "invalid_argument", "%s", m);
        break;
    default:
        pd_http_respond_error(r, 500, "internal", "%s", m);
        break;
    }
}

/* ---- JSON bodies ------------------------------------------------------- */

struct jread {
    const struct pd_json_field *fields;
    size_t n;
    pd_http_json_cb cb;
    void (*fail)(void *arg);
    void *arg;
};

static void
jread_done(struct pd_http_req *r, int err, const char *body, size_t len,
           void *data)
{
    struct jread j = *(struct jread *)data;
    char msg[300];
    json_t *obj;
    int rv;

    free(data);
    if (err != 0) {
        pd_http_fail(r, err);
        j.fail(j.arg);
        return;
    }
    rv = pd_json_parse(body, len, true, j.fields, j.n, &obj, msg,
                       sizeof(msg));
    if (rv < 0) {
        pd_http_respond_error(r, 400, rv == -EBADMSG ? "invalid_json"
                                                     : "invalid_argument",
                              "%s", msg);
        j.fail(j.arg);
        return;
    }
    j.cb(r, obj, j.arg);
}

int
sched_read_json(struct pd_http_req *r, size_t max,
                const struct pd_json_field *fields, size_t n,
                pd_http_json_cb cb, void (*fail)(void *arg), void *arg)
{
    struct jread *j = malloc(sizeof(*j));
    int rc;

    if (j == NULL)
        return -ENOMEM;
    *j = (struct jread){fields, n, cb, fail, arg};
    rc = pd_http_body_read(r, max, jread_done, j);
    if (rc != 0)
        free(j);
    return rc;
}

/* ---- Life cycle -------------------------------------------------------- */

int
sched_auth_init(struct sched *s, char *err, size_t errlen)
{
    struct sched_auth *a;
    double rate = s->cfg.rate_per_s ? (double)s->cfg.rate_per_s
                                    : AUTH_RATE_DEFAULT;
    unsigned burst = s->cfg.rate_burst ? (unsigned)s->cfg.rate_burst
                                       : AUTH_BURST_DEFAULT;
    int rc;

    a = calloc(1, sizeof(*a));
    if (a == NULL) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    a->s = s;
    rc = sched_ratelimit_new(rate, burst, AUTH_RL_KEYS, &a->rl);
    if (rc != 0) {
        snprintf(err, errlen, "invalid rate limit %.1f/s burst %u", rate,
                 burst);
        free(a);
        return rc;
    }
    s->auth = a;
    rc = sched_tokens_init(s);
    if (rc != 0) {
        snprintf(err, errlen, "cannot start the token gc timer");
        sched_auth_close(s);
        return rc;
    }
    return 0;
}

static void
watch_closed(uv_handle_t *h)
{
    free(h->data);
}

void
sched_auth_close(struct sched *s)
{
    struct sched_auth *a = s->auth;

    if (a == NULL)
        return;
    s->auth = NULL;
    sched_tokens_close(s);
    if (a->boot != NULL)
        a->boot = NULL; /* freed by its pending callback */
    watch_stop(a);
    pd_jwt_keyset_free(a->ks);
    free(a->ks_sig);
    sched_ratelimit_free(a->rl);
    if (a->watch_init)
        uv_close((uv_handle_t *)&a->watch, watch_closed);
    else
        free(a);
}
