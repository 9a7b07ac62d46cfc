/*
 * scheduler/auth.c's decisions on real HTTP requests: an FSM with a
 * signing key and recorded tokens, the auth check in front of a loopback
 * HTTP server, and a client on the same loop. Every bad token of the
 * tokens issue gets a 401 that names the reason, a sandbox-scoped token a
 * 403, a flood a 429 with Retry-After; a good one maps to its principal.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <openssl/hmac.h>

#include "common/util.h"
#include "proto/jwt.h"
#include "scheduler/auth.h"
#include "scheduler/sched.h"

struct sched *sched_global;

static uv_loop_t loop;
static struct sched S;
static struct pd_http_server *srv;
static int port;
static struct pd_jwt_keyset *ks;  /* the test's own signer, same key */
static struct pd_jwt_key *key2;   /* a key the cluster never heard of */

/* ---- server ------------------------------------------------------------- */

static void
on_request(struct pd_http_req *r, void *arg)
{
    struct sched_principal p;

    (void)arg;
    if (sched_auth_request(&S, r, &p) != 0)
        return;
    pd_http_respond_json(r, 200, json_pack("{s:s, s:s, s:s}", "role",
                                           sched_role_name(p.role), "tenant",
                                           p.tenant, "jti", p.jti));
}

/* ---- a client on the same loop ------------------------------------------ */

struct client {
    uv_tcp_t tcp;
    uv_connect_t conn;
    uv_write_t wr;
    char req[8192];
    char resp[16384];
    size_t len;
    bool done;
};

static void
c_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b)
{
    struct client *c = h->data;

    (void)sz;
    b->base = c->resp + c->len;
    b->len = sizeof(c->resp) - 1 - c->len;
}

static void
c_closed(uv_handle_t *h)
{
    struct client *c = h->data;

    c->done = true;
}

static void
c_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
    struct client *c = s->data;

    (void)b;
    if (n > 0) {
        c->len += (size_t)n;
        c->resp[c->len] = '\0';
        return;
    }
    if (n < 0)
        uv_close((uv_handle_t *)s, c_closed);
}

static void
c_written(uv_write_t *w, int status)
{
    (void)w;
    (void)status;
}

static void
c_connected(uv_connect_t *cr, int status)
{
    struct client *c = cr->data;
    uv_buf_t b = uv_buf_init(c->req, (unsigned)strlen(c->req));

    assert_int_equal(status, 0);
    uv_write(&c->wr, (uv_stream_t *)&c->tcp, &b, 1, c_written);
    uv_read_start((uv_stream_t *)&c->tcp, c_alloc, c_read);
}

/* Sends GET /v1/x with the given Authorization value (NULL: none) and
 * returns the status; the whole response lands in resp. */
static char resp[16384];

static int
get(const char *authz)
{
    struct client *c = calloc(1, sizeof(*c));
    struct sockaddr_in sa;
    int status = 0;

    assert_non_null(c);
    snprintf(c->req, sizeof(c->req),
             "GET /v1/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
             "%s%s%s\r\n", authz ? "Authorization: " : "",
             authz ? authz : "", authz ? "\r\n" : "");
    uv_tcp_init(&loop, &c->tcp);
    c->tcp.data = c;
    c->conn.data = c;
    uv_ip4_addr("127.0.0.1", port, &sa);
    uv_tcp_connect(&c->conn, &c->tcp, (struct sockaddr *)&sa, c_connected);
    while (!c->done)
        uv_run(&loop, UV_RUN_ONCE);
    memcpy(resp, c->resp, c->len + 1);
    sscanf(resp, "HTTP/1.1 %d", &status);
    free(c);
    return status;
}

static int
get_bearer(const char *token)
{
    char h[8192];

    snprintf(h, sizeof(h), "Bearer %s", token);
    return get(h);
}

/* ---- helpers ------------------------------------------------------------ */

/* A string field of the last response's JSON body ("" when absent). */
static const char *
body_field(const char *name)
{
    static char out[256];
    const char *b = strstr(resp, "\r\n\r\n");
    json_t *j = b != NULL ? json_loads(b + 4, 0, NULL) : NULL;
    const char *v = json_string_value(json_object_get(j, name));

    snprintf(out, sizeof(out), "%s", v != NULL ? v : "");
    json_decref(j);
    return out;
}

static void
apply(struct fsm_cmd *c)
{
    struct fsm_result res;

    assert_int_equal(fsm_apply_cmd(S.fsm, c, &res), 0);
    assert_int_equal(res.code, 0);
}

static void
record(const struct pd_jwt_claims *cl)
{
    struct fsm_cmd c;

    assert_int_equal(fsm_cmd_init(&c, FSM_CMD_TOKEN_CREATE), 0);
    pd_strlcpy(c.u.token.jti, cl->jti, sizeof(c.u.token.jti));
    pd_strlcpy(c.u.token.tenant, cl->sub, sizeof(c.u.token.tenant));
    pd_strlcpy(c.u.token.role, pd_jwt_role_name(cl->role),
               sizeof(c.u.token.role));
    c.u.token.exp_ms = (uint64_t)cl->exp * 1000;
    apply(&c);
}

/* A token signed by set k at now + skew, valid for ttl, recorded when rec. */
static char *
mint_with(struct pd_jwt_keyset *k, const char *sub, enum pd_jwt_role role,
          const char *sandbox, int64_t skew, int64_t ttl, bool rec,
          struct pd_jwt_claims *out)
{
    struct pd_jwt_spec spec = {
        .sub = sub,
        .role = role,
        .sandbox = sandbox,
        .now_s = (int64_t)(pd_wall_ms() / 1000) + skew,
        .ttl_s = ttl,
    };
    struct pd_jwt_claims cl;
    char *tok = NULL, err[256];

    assert_int_equal(pd_jwt_sign(k, &spec, &tok, &cl, err, sizeof(err)), 0);
    if (rec)
        record(&cl);
    if (out != NULL)
        *out = cl;
    return tok;
}

static char *
mint(const char *sub, enum pd_jwt_role role)
{
    return mint_with(ks, sub, role, NULL, 0, 600, true, NULL);
}

static void
key_add(struct pd_jwt_key *k)
{
    struct fsm_cmd c;

    assert_int_equal(fsm_cmd_init(&c, FSM_CMD_KEY_ADD), 0);
    pd_strlcpy(c.u.key.kid, pd_jwt_key_kid(k), sizeof(c.u.key.kid));
    pd_strlcpy(c.u.key.alg, "ES256", sizeof(c.u.key.alg));
    c.u.key.public_pem = (char *)pd_jwt_key_public_pem(k);
    c.u.key.private_pem = (char *)pd_jwt_key_private_pem(k);
    apply(&c);
}

static void
assert_refused(int status, const char *why)
{
    assert_int_equal(status, 401);
    assert_non_null(strstr(resp, "\"unauthorized\""));
    if (strstr(resp, why) == NULL)
        fail_msg("expected \"%s\" in: %s", why, resp);
}

/* ---- fixture ------------------------------------------------------------ */

static int
setup(void **state)
{
    struct pd_http_opts o = {.on_request = on_request};
    struct pd_jwt_key *k, *copy;
    char err[256];

    (void)state;
    assert_int_equal(uv_loop_init(&loop), 0);
    S.loop = &loop;
    /* Each test uses fresh tokens, so a small per-token burst is enough
     * for all of them and makes the 429 quick to reach. */
    S.cfg.rate_per_s = 1;
    S.cfg.rate_burst = 5;
    S.cfg.data_dir = "/tmp";
    assert_int_equal(fsm_new(&S.fsm, err, sizeof(err)), 0);
    assert_int_equal(sched_metrics_init(&S), 0);
    assert_int_equal(sched_auth_init(&S, err, sizeof(err)), 0);

    assert_int_equal(pd_jwt_key_generate(&k, err, sizeof(err)), 0);
    key_add(k);
    assert_int_equal(pd_jwt_key_from_pem(pd_jwt_key_private_pem(k),
                                         strlen(pd_jwt_key_private_pem(k)),
                                         &copy, err, sizeof(err)), 0);
    assert_int_equal(pd_jwt_keyset_new(SCHED_AUTH_ISSUER, &ks), 0);
    assert_int_equal(pd_jwt_keyset_add(ks, copy), 0);
    assert_int_equal(pd_jwt_keyset_set_signer(ks, pd_jwt_key_kid(k)), 0);
    pd_jwt_key_free(k);
    assert_int_equal(pd_jwt_key_generate(&key2, err, sizeof(err)), 0);

    o.arg = NULL;
    assert_int_equal(pd_http_server_new(&loop, &o, &srv, err, sizeof(err)),
                     0);
    assert_int_equal(pd_http_server_listen(srv, "127.0.0.1:0", err,
                                           sizeof(err)), 0);
    port = pd_http_server_port(srv);
    return 0;
}

static int
teardown(void **state)
{
    (void)state;
    pd_http_server_close(srv, NULL, NULL);
    sched_auth_close(&S);
    sched_metrics_close(&S);
    while (uv_run(&loop, UV_RUN_NOWAIT) != 0)
        ;
    fsm_free(S.fsm);
    pd_jwt_keyset_free(ks);
    pd_jwt_key_free(key2);
    uv_loop_close(&loop);
    return 0;
}

/* ---- tests -------------------------------------------------------------- */

/* A recorded tenant token maps to its tenant and role. */
static void
test_valid_tenant(void **state)
{
    char *t = mint("acme", PD_JWT_ROLE_TENANT);

    (void)state;
    assert_int_equal(get_bearer(t), 200);
    assert_string_equal(body_field("tenant"), "acme");
    assert_string_equal(body_field("role"), "tenant");
    free(t);
    t = mint("root", PD_JWT_ROLE_ADMIN);
    assert_int_equal(get_bearer(t), 200);
    assert_string_equal(body_field("role"), "admin");
    free(t);
}

/* No header, another scheme, an empty bearer: 401 saying what to send. */
static void
test_missing_and_malformed_header(void **state)
{
    (void)state;
    assert_refused(get(NULL), "missing bearer token");
    assert_non_null(strstr(resp, "WWW-Authenticate: Bearer"));
    assert_refused(get("Basic YWRtaW46YWRtaW4="), "malformed Authorization");
    assert_refused(get("Bearer"), "malformed Authorization");
    assert_refused(get("Bearer    "), "malformed Authorization");
    assert_refused(get("Bearertoken"), "malformed Authorization");
    assert_refused(get_bearer("abc.def"), "malformed token");
    assert_refused(get_bearer("a.b.c"), "malformed token");
    assert_refused(get_bearer("..."), "malformed token");
    /* Header part that is base64url of something that is not JSON. */
    assert_refused(get_bearer("bm90IGpzb24.e30.c2ln"), "malformed token");
}

static void
test_expired(void **state)
{
    char *t = mint_with(ks, "acme", PD_JWT_ROLE_TENANT, NULL, -7200, 600,
                        true, NULL);

    (void)state;
    assert_refused(get_bearer(t), "token expired");
    free(t);
}

static void
test_not_yet_valid(void **state)
{
    char *t = mint_with(ks, "acme", PD_JWT_ROLE_TENANT, NULL, 3600, 600,
                        true, NULL);

    (void)state;
    assert_refused(get_bearer(t), "not valid yet");
    free(t);
}

/* One flipped character in the signature part. */
static void
test_wrong_signature(void **state)
{
    char *t = mint("acme", PD_JWT_ROLE_TENANT);
    size_t n = strlen(t);

    (void)state;
    t[n - 5] = t[n - 5] == 'A' ? 'B' : 'A';
    assert_refused(get_bearer(t), "signature does not verify");
    free(t);
}

/* A payload swapped for another tenant's keeps the old signature. */
static void
test_tampered_payload(void **state)
{
    char *a = mint("acme", PD_JWT_ROLE_TENANT);
    char *b = mint("evil", PD_JWT_ROLE_ADMIN);
    char forged[4096];
    char *a1 = strchr(a, '.'), *a2 = strrchr(a, '.');
    char *b1 = strchr(b, '.'), *b2 = strrchr(b, '.');

    (void)state;
    snprintf(forged, sizeof(forged), "%.*s%.*s%s", (int)(a1 - a), a,
             (int)(b2 - b1), b1, a2);
    assert_refused(get_bearer(forged), "signature does not verify");
    free(a);
    free(b);
}

/* Signed by a key the cluster does not have. */
static void
test_wrong_kid(void **state)
{
    struct pd_jwt_keyset *other;
    struct pd_jwt_key *k;
    char err[256];
    char *t;

    (void)state;
    assert_int_equal(pd_jwt_key_from_pem(pd_jwt_key_private_pem(key2),
                                         strlen(pd_jwt_key_private_pem(key2)),
                                         &k, err, sizeof(err)), 0);
    assert_int_equal(pd_jwt_keyset_new(SCHED_AUTH_ISSUER, &other), 0);
    assert_int_equal(pd_jwt_keyset_add(other, k), 0);
    assert_int_equal(pd_jwt_keyset_set_signer(other, pd_jwt_key_kid(key2)),
                     0);
    t = mint_with(other, "acme", PD_JWT_ROLE_TENANT, NULL, 0, 600, true,
                  NULL);
    assert_refused(get_bearer(t), "unknown or retired key");
    free(t);
    pd_jwt_keyset_free(other);
}

/* The right key, another issuer. */
static void
test_wrong_issuer(void **state)
{
    struct pd_jwt_keyset *other;
    struct pd_jwt_key *k;
    const char *pem;
    struct fsm_key fk;
    char err[256];
    char *t;

    (void)state;
    assert_int_equal(fsm_key_active(S.fsm, &fk), 0);
    pem = fk.private_pem;
    assert_int_equal(pd_jwt_key_from_pem(pem, strlen(pem), &k, err,
                                         sizeof(err)), 0);
    assert_int_equal(pd_jwt_keyset_new("someone-else", &other), 0);
    assert_int_equal(pd_jwt_keyset_add(other, k), 0);
    assert_int_equal(pd_jwt_keyset_set_signer(other, fk.kid), 0);
    t = mint_with(other, "acme", PD_JWT_ROLE_TENANT, NULL, 0, 600, true,
                  NULL);
    assert_refused(get_bearer(t), "another issuer");
    free(t);
    pd_jwt_keyset_free(other);
    fsm_key_clear(&fk);
}

static void
b64(const char *s, char *out)
{
    pd_b64url_encode(s, strlen(s), out);
}

/* The payload of a valid token under a header of our choosing. */
static void
rehead(const char *tok, const char *header, char *out, size_t n,
       bool keep_sig)
{
    char h[512];
    const char *d1 = strchr(tok, '.'), *d2 = strrchr(tok, '.');

    b64(header, h);
    snprintf(out, n, "%s%.*s%s", h, (int)(d2 - d1 + 1), d1,
             keep_sig ? d2 + 1 : "");
}

static void
test_alg_none(void **state)
{
    char *t = mint("acme", PD_JWT_ROLE_ADMIN);
    struct fsm_key fk;
    char hdr[256], forged[4096];

    (void)state;
    assert_int_equal(fsm_key_active(S.fsm, &fk), 0);
    snprintf(hdr, sizeof(hdr), "{\"alg\":\"none\",\"typ\":\"JWT\","
             "\"kid\":\"%s\"}", fk.kid);
    rehead(t, hdr, forged, sizeof(forged), false);
    assert_refused(get_bearer(forged), "algorithm not accepted");
    rehead(t, "{\"alg\":\"none\"}", forged, sizeof(forged), false);
    assert_refused(get_bearer(forged), "algorithm not accepted");
    rehead(t, "{\"alg\":\"NONE\",\"typ\":\"JWT\"}", forged, sizeof(forged),
           true);
    assert_refused(get_bearer(forged), "algorithm not accepted");
    fsm_key_clear(&fk);
    free(t);
}

/* The classic confusion: HS256 keyed with the public key's PEM. */
static void
test_hs256_with_public_key(void **state)
{
    char *t = mint("acme", PD_JWT_ROLE_ADMIN);
    struct fsm_key fk;
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned maclen = 0;
    char hdr[256], forged[4096], sig[128];
    const char *d2;

    (void)state;
    assert_int_equal(fsm_key_active(S.fsm, &fk), 0);
    snprintf(hdr, sizeof(hdr), "{\"alg\":\"HS256\",\"typ\":\"JWT\","
             "\"kid\":\"%s\"}", fk.kid);
    rehead(t, hdr, forged, sizeof(forged), false);
    d2 = strrchr(forged, '.');
    HMAC(EVP_sha256(), fk.public_pem, (int)strlen(fk.public_pem),
         (const unsigned char *)forged, (size_t)(d2 - forged), mac, &maclen);
    pd_b64url_encode(mac, maclen, sig);
    strcat(forged, sig);
    assert_refused(get_bearer(forged), "algorithm not accepted");
    fsm_key_clear(&fk);
    free(t);
}

/* Revoked in the FSM: refused at once, with no cache to wait out. */
static void
test_revoked(void **state)
{
    struct pd_jwt_claims cl;
    struct fsm_cmd c;
    char *t = mint_with(ks, "acme", PD_JWT_ROLE_TENANT, NULL, 0, 600, true,
                        &cl);

    (void)state;
    assert_int_equal(get_bearer(t), 200);
    assert_int_equal(fsm_cmd_init(&c, FSM_CMD_TOKEN_REVOKE), 0);
    pd_strlcpy(c.u.token.jti, cl.jti, sizeof(c.u.token.jti));
    apply(&c);
    assert_refused(get_bearer(t), "token revoked");
    free(t);
}

/* Validly signed but never recorded by the cluster (or GC'd). */
static void
test_unrecorded(void **state)
{
    char *t = mint_with(ks, "acme", PD_JWT_ROLE_TENANT, NULL, 0, 600, false,
                        NULL);

    (void)state;
    assert_refused(get_bearer(t), "token unknown");
    free(t);
}

/* A new key signs; the old one verifies until it is retired. */
static void
test_rotation_and_retire(void **state)
{
    char *old = mint("acme", PD_JWT_ROLE_TENANT);
    struct pd_jwt_keyset *cur;
    struct pd_jwt_key *k;
    struct pd_jwt_claims cl;
    struct fsm_key fk;
    struct fsm_cmd c;
    char err[256], *fresh = NULL;
    struct pd_jwt_spec spec = {.sub = "acme", .role = PD_JWT_ROLE_TENANT,
                               .ttl_s = 600};

    (void)state;
    assert_int_equal(fsm_key_active(S.fsm, &fk), 0);
    assert_int_equal(pd_jwt_key_generate(&k, err, sizeof(err)), 0);
    key_add(k);
    cur = sched_auth_keyset(&S);
    assert_non_null(cur);
    assert_int_equal(pd_jwt_keyset_count(cur), 2);
    spec.now_s = (int64_t)(pd_wall_ms() / 1000);
    assert_int_equal(pd_jwt_sign(cur, &spec, &fresh, &cl, err, sizeof(err)),
                     0);
    assert_string_equal(cl.kid, pd_jwt_key_kid(k));
    record(&cl);
    assert_int_equal(get_bearer(fresh), 200);
    assert_int_equal(get_bearer(old), 200);

    assert_int_equal(fsm_cmd_init(&c, FSM_CMD_KEY_RETIRE), 0);
    pd_strlcpy(c.u.key.kid, fk.kid, sizeof(c.u.key.kid));
    apply(&c);
    assert_refused(get_bearer(old), "unknown or retired key");
    assert_int_equal(get_bearer(fresh), 200);

    /* The test's signer follows the cluster's new active key. */
    pd_jwt_keyset_free(ks);
    assert_int_equal(pd_jwt_keyset_new(SCHED_AUTH_ISSUER, &ks), 0);
    assert_int_equal(pd_jwt_keyset_add(ks, k), 0);
    assert_int_equal(pd_jwt_keyset_set_signer(ks, cl.kid), 0);
    fsm_key_clear(&fk);
    free(old);
    free(fresh);
}

/* A sandbox-scoped token is for the egress proxy, not the API. */
static void
test_sandbox_scoped(void **state)
{
    char *t = mint_with(ks, "acme", PD_JWT_ROLE_TENANT, "sb1", 0, 300, true,
                        NULL);

    (void)state;
    assert_int_equal(get_bearer(t), 403);
    assert_non_null(strstr(resp, "egress proxy"));
    free(t);
}

/* The leader's token for a sandbox's environment: scoped, short-lived. */
static void
test_sandbox_token_for_env(void **state)
{
    struct pd_jwt_claims cl;
    char *t = sched_auth_sandbox_token(&S, "acme", "sb-env");
    int64_t now = (int64_t)(pd_wall_ms() / 1000);

    (void)state;
    assert_non_null(t);
    /* Not recorded here (no Raft in this test): unknown to the FSM... */
    assert_int_equal(pd_jwt_verify(sched_auth_keyset(&S), t, now, &cl),
                     -EKEYREVOKED);
    /* ...but signed by the active key (the test's set has no hook). */
    assert_int_equal(pd_jwt_verify(ks, t, now, &cl), 0);
    assert_string_equal(cl.sandbox, "sb-env");
    assert_string_equal(cl.sub, "acme");
    assert_true(cl.exp - now <= SCHED_AUTH_SANDBOX_TTL_S);
    record(&cl);
    assert_int_equal(get_bearer(t), 403);
    assert_null(sched_auth_sandbox_token(&S, "Bad Id", "sb"));
    free(t);
}

/* burst requests pass, the next is 429 with Retry-After. */
static void
test_rate_limit(void **state)
{
    char *t = mint("busy", PD_JWT_ROLE_TENANT);
    char *u = mint("calm", PD_JWT_ROLE_TENANT);
    int i, st = 0;

    (void)state;
    for (i = 0; i < 100 && (st = get_bearer(t)) == 200; i++)
        ;
    assert_int_equal(st, 429);
    assert_in_range(i, 5, 6);
    assert_non_null(strstr(resp, "Retry-After: "));
    assert_non_null(strstr(resp, "\"rate_limited\""));
    /* Another token is not affected. */
    assert_int_equal(get_bearer(u), 200);
    free(t);
    free(u);
}

/* An agent's join token: role node, for that node only. */
static void
test_node_token(void **state)
{
    char why[256];
    char *node = mint("n7", PD_JWT_ROLE_NODE);
    char *tenant = mint("n7", PD_JWT_ROLE_TENANT);
    char *late = mint_with(ks, "n7", PD_JWT_ROLE_NODE, NULL, -7200, 60,
                           true, NULL);

    (void)state;
    assert_int_equal(sched_auth_node_token(&S, node, "n7", why,
                                           sizeof(why)), 0);
    assert_int_equal(sched_auth_node_token(&S, node, "n8", why,
                                           sizeof(why)), -EPERM);
    assert_non_null(strstr(why, "for node n7"));
    assert_int_equal(sched_auth_node_token(&S, tenant, "n7", why,
                                           sizeof(why)), -EPERM);
    assert_int_equal(sched_auth_node_token(&S, late, "n7", why,
                                           sizeof(why)), -EKEYEXPIRED);
    assert_int_equal(sched_auth_node_token(&S, "junk", "n7", why,
                                           sizeof(why)), -EINVAL);
    free(node);
    free(tenant);
    free(late);
}

static void
test_owns(void **state)
{
    struct sched_principal p = {.role = SCHED_ROLE_TENANT};

    (void)state;
    pd_strlcpy(p.tenant, "acme", sizeof(p.tenant));
    assert_true(sched_auth_owns(&p, "acme"));
    assert_false(sched_auth_owns(&p, "acme2"));
    assert_false(sched_auth_owns(&p, "acm"));
    assert_false(sched_auth_owns(&p, ""));
    assert_false(sched_auth_owns(&p, NULL));
    p.role = SCHED_ROLE_ADMIN;
    assert_true(sched_auth_owns(&p, "anyone"));
    p.role = SCHED_ROLE_NODE;
    assert_false(sched_auth_owns(&p, "acme"));
    p.role = SCHED_ROLE_TENANT;
    p.tenant[0] = '\0';
    assert_false(sched_auth_owns(&p, ""));
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_tenant),
        cmocka_unit_test(test_missing_and_malformed_header),
        cmocka_unit_test(test_expired),
        cmocka_unit_test(test_not_yet_valid),
        cmocka_unit_test(test_wrong_signature),
        cmocka_unit_test(test_tampered_payload),
        cmocka_unit_test(test_wrong_kid),
        cmocka_unit_test(test_wrong_issuer),
        cmocka_unit_test(test_alg_none),
        cmocka_unit_test(test_hs256_with_public_key),
        cmocka_unit_test(test_revoked),
        cmocka_unit_test(test_unrecorded),
        cmocka_unit_test(test_rotation_and_retire),
        cmocka_unit_test(test_sandbox_scoped),
        cmocka_unit_test(test_sandbox_token_for_env),
        cmocka_unit_test(test_rate_limit),
        cmocka_unit_test(test_node_token),
        cmocka_unit_test(test_owns),
    };

    return cmocka_run_group_tests(tests, setup, teardown);
}
