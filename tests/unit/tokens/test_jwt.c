/*
 * proto/jwt.c: keys, key sets, signing, and every verification failure in
 * the order jwt.h promises, including libjwt's traps (alg none, HS256
 * keyed with the public key, unchecked time claims) and the strict
 * base64url and JSON parsing in front of it.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <openssl/hmac.h>

#include "proto/jwt.h"

#define NOW 1800000000LL

struct fx {
    struct pd_jwt_keyset *ks;
    struct pd_jwt_key *key; /* a copy of the signer, public part only */
    char kid[PD_JWT_KID_LEN + 1];
};

static char err[256];

static int
setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    struct pd_jwt_key *k;

    assert_non_null(f);
    assert_int_equal(pd_jwt_key_generate(&k, err, sizeof(err)), 0);
    pd_strlcpy(f->kid, pd_jwt_key_kid(k), sizeof(f->kid));
    assert_int_equal(pd_jwt_key_from_pem(pd_jwt_key_public_pem(k),
                                         strlen(pd_jwt_key_public_pem(k)),
                                         &f->key, err, sizeof(err)), 0);
    assert_int_equal(pd_jwt_keyset_new("paddock", &f->ks), 0);
    assert_int_equal(pd_jwt_keyset_add(f->ks, k), 0);
    assert_int_equal(pd_jwt_keyset_set_signer(f->ks, f->kid), 0);
    *state = f;
    return 0;
}

static int
teardown(void **state)
{
    struct fx *f = *state;

    pd_jwt_keyset_free(f->ks);
    pd_jwt_key_free(f->key);
    free(f);
    return 0;
}

static char *
sign(struct pd_jwt_keyset *ks, const char *sub, int64_t now, int64_t ttl,
     struct pd_jwt_claims *cl)
{
    struct pd_jwt_spec spec = {.sub = sub, .role = PD_JWT_ROLE_TENANT,
                               .now_s = now, .ttl_s = ttl};
    char *tok = NULL;

    assert_int_equal(pd_jwt_sign(ks, &spec, &tok, cl, err, sizeof(err)), 0);
    return tok;
}

static void
enc(const char *s, char *out)
{
    pd_b64url_encode(s, strlen(s), out);
}

/* header.payload.sig with the header replaced by hdr (JSON text). */
static char *
rehead(const char *tok, const char *hdr)
{
    char h[1024];
    char *out = malloc(strlen(tok) + sizeof(h));

    enc(hdr, h);
    sprintf(out, "%s%s", h, strchr(tok, '.'));
    return out;
}

static char *
repay(const char *tok, const char *payload)
{
    char p[2048];
    const char *d1 = strchr(tok, '.'), *d2 = strrchr(tok, '.');
    char *out = malloc(strlen(tok) + sizeof(p));

    enc(payload, p);
    sprintf(out, "%.*s.%s%s", (int)(d1 - tok), tok, p, d2);
    return out;
}

/* ---- keys and sets ------------------------------------------------------ */

static void
test_keys(void **state)
{
    struct fx *f = *state;
    struct pd_jwt_keyset *ks;
    struct pd_jwt_key *k;

    assert_int_equal(strlen(f->kid), PD_JWT_KID_LEN);
    assert_null(pd_jwt_key_private_pem(f->key));
    assert_string_equal(pd_jwt_key_kid(f->key), f->kid);
    assert_int_equal(pd_jwt_key_from_pem("nope", 4, &k, err, sizeof(err)),
                     -EINVAL);
    /* A public key cannot sign. */
    assert_int_equal(pd_jwt_key_from_pem(pd_jwt_key_public_pem(f->key),
                                         strlen(pd_jwt_key_public_pem(f->key)),
                                         &k, err, sizeof(err)), 0);
    assert_int_equal(pd_jwt_keyset_new("paddock", &ks), 0);
    assert_int_equal(pd_jwt_keyset_add(ks, k), 0);
    assert_int_equal(pd_jwt_keyset_set_signer(ks, f->kid), -EPERM);
    assert_int_equal(pd_jwt_keyset_set_signer(ks, "x"), -ENOENT);
    {
        struct pd_jwt_spec spec = {.sub = "a", .now_s = NOW, .ttl_s = 1};
        char *tok = NULL;

        assert_int_equal(pd_jwt_sign(ks, &spec, &tok, NULL, err,
                                     sizeof(err)), -ENOKEY);
    }
    /* The same kid twice, and the size cap. */
    assert_int_equal(pd_jwt_key_from_pem(pd_jwt_key_public_pem(f->key),
                                         strlen(pd_jwt_key_public_pem(f->key)),
                                         &k, err, sizeof(err)), 0);
    assert_int_equal(pd_jwt_keyset_add(ks, k), -EEXIST);
    for (int i = 1; i < PD_JWT_KEYSET_MAX; i++) {
        assert_int_equal(pd_jwt_key_generate(&k, err, sizeof(err)), 0);
        assert_int_equal(pd_jwt_keyset_add(ks, k), 0);
    }
    assert_int_equal(pd_jwt_key_generate(&k, err, sizeof(err)), 0);
    assert_int_equal(pd_jwt_keyset_add(ks, k), -ENOSPC);
    assert_int_equal(pd_jwt_keyset_count(ks), PD_JWT_KEYSET_MAX);
    assert_int_equal(pd_jwt_keyset_remove(ks, "nope"), -ENOENT);
    pd_jwt_keyset_free(ks);
}

static void
test_key_file_permissions(void **state)
{
    struct fx *f = *state;
    struct pd_jwt_key *k, *g;
    char path[] = "/tmp/test-jwt-XXXXXX";
    int fd = mkstemp(path);
    const char *pem;

    (void)f;
    assert_true(fd >= 0);
    assert_int_equal(pd_jwt_key_generate(&g, err, sizeof(err)), 0);
    pem = pd_jwt_key_private_pem(g);
    assert_int_equal(write(fd, pem, strlen(pem)), (ssize_t)strlen(pem));
    close(fd);
    chmod(path, 0644);
    assert_int_equal(pd_jwt_key_load_file(path, &k, err, sizeof(err)),
                     -EPERM);
    chmod(path, 0600);
    assert_int_equal(pd_jwt_key_load_file(path, &k, err, sizeof(err)), 0);
    assert_string_equal(pd_jwt_key_kid(k), pd_jwt_key_kid(g));
    assert_non_null(pd_jwt_key_private_pem(k));
    pd_jwt_key_free(k);
    pd_jwt_key_free(g);
    unlink(path);
}

static void
test_jwks(void **state)
{
    struct fx *f = *state;
    char *doc = NULL;

    assert_int_equal(pd_jwt_keyset_jwks(f->ks, &doc), 0);
    assert_non_null(strstr(doc, f->kid));
    assert_non_null(strstr(doc, "\"ES256\""));
    assert_non_null(strstr(doc, "\"P-256\""));
    assert_null(strstr(doc, "\"d\""));
    free(doc);
}

static void
test_roles(void **state)
{
    enum pd_jwt_role r;

    (void)state;
    assert_int_equal(pd_jwt_role_parse("admin", &r), 0);
    assert_int_equal(r, PD_JWT_ROLE_ADMIN);
    assert_int_equal(pd_jwt_role_parse("node", &r), 0);
    assert_int_equal(r, PD_JWT_ROLE_NODE);
    assert_int_equal(pd_jwt_role_parse("Admin", &r), -EINVAL);
    assert_int_equal(pd_jwt_role_parse("", &r), -EINVAL);
    assert_null(pd_jwt_role_name((enum pd_jwt_role)7));
}

/* ---- signing and verifying ---------------------------------------------- */

static void
test_roundtrip(void **state)
{
    struct fx *f = *state;
    struct pd_jwt_claims a, b;
    struct pd_jwt_spec spec = {.sub = "acme", .role = PD_JWT_ROLE_TENANT,
                               .sandbox = "sb-1", .now_s = NOW,
                               .ttl_s = 300};
    char *tok = NULL, *tok2;

    assert_int_equal(pd_jwt_sign(f->ks, &spec, &tok, &a, err, sizeof(err)),
                     0);
    assert_int_equal(pd_jwt_verify(f->ks, tok, NOW + 1, &b), 0);
    assert_string_equal(b.sub, "acme");
    assert_string_equal(b.sandbox, "sb-1");
    assert_string_equal(b.iss, "paddock");
    assert_string_equal(b.kid, f->kid);
    assert_string_equal(b.jti, a.jti);
    assert_int_equal(strlen(b.jti), PD_JWT_JTI_LEN);
    assert_int_equal(b.exp, NOW + 300);
    assert_int_equal(b.nbf, NOW);
    assert_int_equal(b.role, PD_JWT_ROLE_TENANT);
    tok2 = sign(f->ks, "acme", NOW, 300, &b);
    assert_string_not_equal(a.jti, b.jti);
    free(tok);
    free(tok2);
}

static void
test_bad_specs(void **state)
{
    struct fx *f = *state;
    struct pd_jwt_spec spec = {.sub = "Not An Id", .now_s = NOW,
                               .ttl_s = 1};
    char *tok = NULL;

    assert_int_equal(pd_jwt_sign(f->ks, &spec, &tok, NULL, err,
                                 sizeof(err)), -EINVAL);
    spec.sub = "ok";
    spec.ttl_s = 0;
    assert_int_equal(pd_jwt_sign(f->ks, &spec, &tok, NULL, err,
                                 sizeof(err)), -EINVAL);
    spec.ttl_s = 1;
    spec.sandbox = "BAD";
    assert_int_equal(pd_jwt_sign(f->ks, &spec, &tok, NULL, err,
                                 sizeof(err)), -EINVAL);
    spec.sandbox = NULL;
    spec.role = (enum pd_jwt_role)9;
    assert_int_equal(pd_jwt_sign(f->ks, &spec, &tok, NULL, err,
                                 sizeof(err)), -EINVAL);
    assert_null(tok);
}

static void
test_times(void **state)
{
    struct fx *f = *state;
    struct pd_jwt_claims c;
    char *tok = sign(f->ks, "acme", NOW, 60, NULL);

    /* exp with the leeway, to the second. */
    assert_int_equal(pd_jwt_verify(f->ks, tok, NOW + 60 + PD_JWT_LEEWAY_S - 1,
                                   &c), 0);
    assert_int_equal(pd_jwt_verify(f->ks, tok, NOW + 60 + PD_JWT_LEEWAY_S,
                                   &c), -EKEYEXPIRED);
    assert_string_equal(c.sub, ""); /* cleared on failure */
    /* nbf and iat in the future, beyond the leeway. */
    assert_int_equal(pd_jwt_verify(f->ks, tok, NOW - PD_JWT_LEEWAY_S, &c), 0);
    assert_int_equal(pd_jwt_verify(f->ks, tok, NOW - PD_JWT_LEEWAY_S - 1, &c),
                     -ETIME);
    free(tok);
}

static void
test_signature_and_kid(void **state)
{
    struct fx *f = *state;
    struct pd_jwt_keyset *other, *iss;
    struct pd_jwt_key *k;
    struct pd_jwt_claims c;
    char *tok = sign(f->ks, "acme", NOW, 60, NULL), *bad, *t2;
    size_t n = strlen(tok);

    bad = strdup(tok);
    bad[n - 3] = bad[n - 3] == 'A' ? 'B' : 'A';
    assert_int_equal(pd_jwt_verify(f->ks, bad, NOW, &c), -EBADMSG);
    free(bad);
    /* A payload of our own choosing under a valid signature. */
    bad = repay(tok, "{\"iss\":\"paddock\",\"sub\":\"root\",\"role\":"
                "\"admin\",\"jti\":\"00000000000000000000000000000000\","
                "\"iat\":1800000000,\"nbf\":1800000000,\"exp\":1900000000}");
    assert_int_equal(pd_jwt_verify(f->ks, bad, NOW, &c), -EBADMSG);
    free(bad);
    /* Signed by a key the set does not have. */
    assert_int_equal(pd_jwt_key_generate(&k, err, sizeof(err)), 0);
    assert_int_equal(pd_jwt_keyset_new("paddock", &other), 0);
    assert_int_equal(pd_jwt_keyset_add(other, k), 0);
    assert_int_equal(pd_jwt_keyset_set_signer(other, pd_jwt_key_kid(k)), 0);
    t2 = sign(other, "acme", NOW, 60, NULL);
    assert_int_equal(pd_jwt_verify(f->ks, t2, NOW, &c), -ENOKEY);
    /* Another key's token under our kid: the signature fails. */
    {
        char hdr[256];

        snprintf(hdr, sizeof(hdr), "{\"alg\":\"ES256\",\"kid\":\"%s\","
                 "\"typ\":\"JWT\"}", f->kid);
        bad = rehead(t2, hdr);
        assert_int_equal(pd_jwt_verify(f->ks, bad, NOW, &c), -EBADMSG);
        free(bad);
    }
    free(t2);
    pd_jwt_keyset_free(other);
    /* Another issuer with our own key. */
    assert_int_equal(pd_jwt_key_from_pem(pd_jwt_key_public_pem(f->key),
                                         strlen(pd_jwt_key_public_pem(f->key)),
                                         &k, err, sizeof(err)), 0);
    assert_int_equal(pd_jwt_keyset_new("someone", &iss), 0);
    assert_int_equal(pd_jwt_keyset_add(iss, k), 0);
    assert_int_equal(pd_jwt_verify(iss, tok, NOW, &c), -EACCES);
    pd_jwt_keyset_free(iss);
    /* A retired key's tokens stop verifying. */
    assert_int_equal(pd_jwt_verify(f->ks, tok, NOW, &c), 0);
    free(tok);
}

static void
test_retire(void **state)
{
    struct pd_jwt_keyset *ks;
    struct pd_jwt_key *a, *b;
    struct pd_jwt_claims c;
    char *ta, *tb;

    (void)state;
    assert_int_equal(pd_jwt_keyset_new("paddock", &ks), 0);
    assert_int_equal(pd_jwt_key_generate(&a, err, sizeof(err)), 0);
    assert_int_equal(pd_jwt_key_generate(&b, err, sizeof(err)), 0);
    assert_int_equal(pd_jwt_keyset_add(ks, a), 0);
    assert_int_equal(pd_jwt_keyset_add(ks, b), 0);
    assert_int_equal(pd_jwt_keyset_set_signer(ks, pd_jwt_key_kid(a)), 0);
    ta = sign(ks, "x", NOW, 60, NULL);
    assert_int_equal(pd_jwt_keyset_set_signer(ks, pd_jwt_key_kid(b)), 0);
    tb = sign(ks, "x", NOW, 60, &c);
    assert_string_equal(c.kid, pd_jwt_key_kid(b));
    assert_int_equal(pd_jwt_verify(ks, ta, NOW, &c), 0);
    assert_int_equal(pd_jwt_keyset_remove(ks, c.kid[0] ? pd_jwt_key_kid(a)
                                                       : ""), 0);
    assert_int_equal(pd_jwt_verify(ks, ta, NOW, &c), -ENOKEY);
    assert_int_equal(pd_jwt_verify(ks, tb, NOW, &c), 0);
    free(ta);
    free(tb);
    pd_jwt_keyset_free(ks);
}

static void
test_alg_traps(void **state)
{
    struct fx *f = *state;
    struct pd_jwt_claims c;
    char *tok = sign(f->ks, "acme", NOW, 60, NULL), *bad;
    char hdr[256], sig[128];
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned maclen = 0;
    const char *pem = pd_jwt_key_public_pem(f->key);
    const char *algs[] = {"none", "None", "HS256", "RS256", "ES384",
                          "PS256", ""};

    for (size_t i = 0; i < sizeof(algs) / sizeof(algs[0]); i++) {
        snprintf(hdr, sizeof(hdr), "{\"alg\":\"%s\",\"kid\":\"%s\"}",
                 algs[i], f->kid);
        bad = rehead(tok, hdr);
        assert_int_equal(pd_jwt_verify(f->ks, bad, NOW, &c), -ENOTSUP);
        /* alg none with an empty signature part. */
        *(strrchr(bad, '.') + 1) = '\0';
        assert_int_equal(pd_jwt_verify(f->ks, bad, NOW, &c), -ENOTSUP);
        free(bad);
    }
    /* HS256 keyed with the public PEM, properly MACed. */
    snprintf(hdr, sizeof(hdr), "{\"alg\":\"HS256\",\"typ\":\"JWT\","
             "\"kid\":\"%s\"}", f->kid);
    bad = rehead(tok, hdr);
    *strrchr(bad, '.') = '\0';
    HMAC(EVP_sha256(), pem, (int)strlen(pem), (unsigned char *)bad,
         strlen(bad), mac, &maclen);
    pd_b64url_encode(mac, maclen, sig);
    bad = realloc(bad, strlen(bad) + strlen(sig) + 2);
    strcat(bad, ".");
    strcat(bad, sig);
    assert_int_equal(pd_jwt_verify(f->ks, bad, NOW, &c), -ENOTSUP);
    free(bad);
    /* No alg at all, or a non-string one. */
    bad = rehead(tok, "{\"kid\":\"x\"}");
    assert_int_equal(pd_jwt_verify(f->ks, bad, NOW, &c), -EINVAL);
    free(bad);
    bad = rehead(tok, "{\"alg\":256}");
    assert_int_equal(pd_jwt_verify(f->ks, bad, NOW, &c), -EINVAL);
    free(bad);
    free(tok);
}

static void
test_malformed(void **state)
{
    struct fx *f = *state;
    struct pd_jwt_claims c;
    char *tok = sign(f->ks, "acme", NOW, 60, NULL), *bad, hdr[256];
    char *longtok = malloc(PD_JWT_MAX_LEN + 2);
    const char *junk[] = {"", ".", "..", "...", "a.b", "a.b.c.d", "a..c",
                          "e30.e30.", "!!!.e30.e30", "e30=.e30.e30"};

    for (size_t i = 0; i < sizeof(junk) / sizeof(junk[0]); i++)
        assert_int_equal(pd_jwt_verify(f->ks, junk[i], NOW, &c), -EINVAL);
    assert_int_equal(pd_jwt_verify(f->ks, NULL, NOW, &c), -EINVAL);
    memset(longtok, 'a', PD_JWT_MAX_LEN + 1);
    longtok[PD_JWT_MAX_LEN + 1] = '\0';
    assert_int_equal(pd_jwt_verify(f->ks, longtok, NOW, &c), -EINVAL);
    free(longtok);
    /* Duplicate members, crit, a header that is an array. */
    snprintf(hdr, sizeof(hdr), "{\"alg\":\"ES256\",\"alg\":\"none\","
             "\"kid\":\"%s\"}", f->kid);
    bad = rehead(tok, hdr);
    assert_int_equal(pd_jwt_verify(f->ks, bad, NOW, &c), -EINVAL);
    free(bad);
    snprintf(hdr, sizeof(hdr), "{\"alg\":\"ES256\",\"crit\":[\"exp\"],"
             "\"kid\":\"%s\"}", f->kid);
    bad = rehead(tok, hdr);
    assert_int_equal(pd_jwt_verify(f->ks, bad, NOW, &c), -EINVAL);
    free(bad);
    bad = rehead(tok, "[1,2]");
    assert_int_equal(pd_jwt_verify(f->ks, bad, NOW, &c), -EINVAL);
    free(bad);
    /* Claims of the wrong shape: checked before the signature. */
    bad = repay(tok, "{\"sub\":\"acme\"}");
    assert_int_equal(pd_jwt_verify(f->ks, bad, NOW, &c), -EINVAL);
    free(bad);
    bad = repay(tok, "{\"iss\":\"paddock\",\"sub\":\"acme\",\"role\":"
                "\"god\",\"jti\":\"00000000000000000000000000000000\","
                "\"iat\":1,\"nbf\":1,\"exp\":2}");
    assert_int_equal(pd_jwt_verify(f->ks, bad, NOW, &c), -EINVAL);
    free(bad);
    bad = repay(tok, "{\"iss\":\"paddock\",\"sub\":\"acme\",\"role\":"
                "\"tenant\",\"jti\":\"xyz\",\"iat\":1,\"nbf\":1,\"exp\":2}");
    assert_int_equal(pd_jwt_verify(f->ks, bad, NOW, &c), -EINVAL);
    free(bad);
    bad = repay(tok, "{\"iss\":\"paddock\",\"sub\":\"acme\",\"role\":"
                "\"tenant\",\"jti\":\"00000000000000000000000000000000\","
                "\"iat\":1,\"nbf\":5,\"exp\":2}");
    assert_int_equal(pd_jwt_verify(f->ks, bad, NOW, &c), -EINVAL);
    free(bad);
    free(tok);
}

static bool revoked_called;

static bool
revoke_all(void *arg, const char *jti)
{
    (void)arg;
    (void)jti;
    revoked_called = true;
    return true;
}

static void
test_revocation_hook(void **state)
{
    struct fx *f = *state;
    struct pd_jwt_claims c;
    char *tok = sign(f->ks, "acme", NOW, 60, NULL), *bad;
    size_t n = strlen(tok);

    pd_jwt_keyset_set_revoked(f->ks, revoke_all, NULL);
    assert_int_equal(pd_jwt_verify(f->ks, tok, NOW, &c), -EKEYREVOKED);
    assert_true(revoked_called);
    /* Unauthenticated input never reaches the hook. */
    revoked_called = false;
    bad = strdup(tok);
    bad[n - 3] = bad[n - 3] == 'A' ? 'B' : 'A';
    assert_int_equal(pd_jwt_verify(f->ks, bad, NOW, &c), -EBADMSG);
    assert_int_equal(pd_jwt_verify(f->ks, tok, NOW + 3600, &c),
                     -EKEYEXPIRED);
    assert_false(revoked_called);
    pd_jwt_keyset_set_revoked(f->ks, NULL, NULL);
    free(bad);
    free(tok);
}

/* A remembered signature answers only for the same bytes under the same
 * key, and the time and revocation checks still run on every call. */
static void
test_signature_memo(void **state)
{
    struct fx *f = *state;
    struct pd_jwt_claims c;
    char *tok = sign(f->ks, "acme", NOW, 60, NULL), *bad, *many[70];
    size_t n = strlen(tok);

    assert_int_equal(pd_jwt_verify(f->ks, tok, NOW, &c), 0);
    assert_int_equal(pd_jwt_verify(f->ks, tok, NOW, &c), 0);
    assert_string_equal(c.sub, "acme");
    bad = strdup(tok);
    bad[n - 3] = bad[n - 3] == 'A' ? 'B' : 'A';
    assert_int_equal(pd_jwt_verify(f->ks, bad, NOW, &c), -EBADMSG);
    free(bad);
    bad = repay(tok, "{\"iss\":\"paddock\",\"sub\":\"root\",\"role\":"
                "\"admin\",\"jti\":\"00000000000000000000000000000000\","
                "\"iat\":1800000000,\"nbf\":1800000000,\"exp\":1900000000}");
    assert_int_equal(pd_jwt_verify(f->ks, bad, NOW, &c), -EBADMSG);
    free(bad);
    assert_int_equal(pd_jwt_verify(f->ks, tok, NOW + 3600, &c),
                     -EKEYEXPIRED);
    pd_jwt_keyset_set_revoked(f->ks, revoke_all, NULL);
    assert_int_equal(pd_jwt_verify(f->ks, tok, NOW, &c), -EKEYREVOKED);
    pd_jwt_keyset_set_revoked(f->ks, NULL, NULL);
    /* More tokens than the memo holds: the first is checked afresh. */
    for (size_t i = 0; i < 70; i++) {
        many[i] = sign(f->ks, "acme", NOW, 60, NULL);
        assert_int_equal(pd_jwt_verify(f->ks, many[i], NOW, &c), 0);
    }
    assert_int_equal(pd_jwt_verify(f->ks, tok, NOW, &c), 0);
    for (size_t i = 0; i < 70; i++)
        free(many[i]);
    free(tok);
}

static void
test_b64url(void **state)
{
    char out[64];

    (void)state;
    assert_int_equal(pd_b64url_encode("\xfb\xff", 2, out), 3);
    assert_string_equal(out, "-_8");
    assert_int_equal(pd_b64url_decode("-_8", 3, out, sizeof(out)), 2);
    assert_int_equal(pd_b64url_decode("-_8=", 4, out, sizeof(out)), -EINVAL);
    assert_int_equal(pd_b64url_decode("+/8", 3, out, sizeof(out)), -EINVAL);
    assert_int_equal(pd_b64url_decode("a", 1, out, sizeof(out)), -EINVAL);
    assert_int_equal(pd_b64url_decode("-_9", 3, out, sizeof(out)), -EINVAL);
    assert_int_equal(pd_b64url_decode("AAAA", 4, out, 2), -ENOSPC);
    assert_int_equal(pd_b64url_decode("", 0, out, sizeof(out)), 0);
}

static void
test_strerror(void **state)
{
    (void)state;
    assert_string_equal(pd_jwt_strerror(-EKEYREVOKED), "revoked");
    assert_string_equal(pd_jwt_strerror(-ENOTSUP), "algorithm not allowed");
    assert_string_equal(pd_jwt_strerror(-12345), "verification failed");
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_keys, setup, teardown),
        cmocka_unit_test_setup_teardown(test_key_file_permissions, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_jwks, setup, teardown),
        cmocka_unit_test(test_roles),
        cmocka_unit_test_setup_teardown(test_roundtrip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_specs, setup, teardown),
        cmocka_unit_test_setup_teardown(test_times, setup, teardown),
        cmocka_unit_test_setup_teardown(test_signature_and_kid, setup,
                                        teardown),
        cmocka_unit_test(test_retire),
        cmocka_unit_test_setup_teardown(test_alg_traps, setup, teardown),
        cmocka_unit_test_setup_teardown(test_malformed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_revocation_hook, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_signature_memo, setup,
                                        teardown),
        cmocka_unit_test(test_b64url),
        cmocka_unit_test(test_strerror),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
