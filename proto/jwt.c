/*
 * ES256 tokens over libjwt 1.10 and OpenSSL 3. See jwt.h for the claims,
 * the order of the checks and the key threat model.
 *
 * libjwt only signs and checks the signature here. Everything it gets wrong
 * or leaves out (algorithm choice, `none`, time claims, issuer, strict
 * base64url and JSON) is decided in this file before or after it runs.
 */
#include "proto/jwt.h"

#include <errno.h>
#include <jansson.h>
#include <jwt.h>
#include <limits.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* The P-256 coordinate size and the raw (R || S) ES256 signature size. */
#define COORD_LEN 32
#define SIG_LEN   64

/* Time claims beyond 2^40 s (year 36812) are refused: no overflow later. */
#define TIME_MAX ((int64_t)1 << 40)

/* A header or payload larger than this is not one of ours. */
#define PART_MAX 2048

struct pd_jwt_key {
    EVP_PKEY *pkey;
    char *pub_pem;
    char *priv_pem;                   /* NULL for a public key */
    size_t priv_pem_len;
    char kid[PD_JWT_KID_LEN + 1];
    char x[PD_JWT_KID_LEN + 1];       /* base64url coordinates for JWKS */
    char y[PD_JWT_KID_LEN + 1];
};

struct pd_jwt_keyset {
    char issuer[PD_JWT_ISS_MAX + 1];
    struct pd_jwt_key *keys[PD_JWT_KEYSET_MAX];
    size_t nkeys;
    int signer;                       /* index in keys, or -1 */
    pd_jwt_revoked_fn revoked;
    void *revoked_arg;
};

static const char *const role_names[] = {
    [PD_JWT_ROLE_ADMIN] = "admin",
    [PD_JWT_ROLE_TENANT] = "tenant",
    [PD_JWT_ROLE_NODE] = "node",
};

static void __attribute__((format(printf, 3, 4)))
set_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Appends OpenSSL's last error, or "unknown", and clears the queue. */
static void
set_ssl_err(char *err, size_t errlen, const char *what)
{
    unsigned long e = ERR_peek_last_error();
    char buf[160] = "unknown error";

    if (e != 0)
        ERR_error_string_n(e, buf, sizeof(buf));
    ERR_clear_error();
    set_err(err, errlen, "%s: %s", what, buf);
}

const char *
pd_jwt_role_name(enum pd_jwt_role role)
{
    if ((unsigned)role >= PD_ARRAY_SIZE(role_names))
        return NULL;
    return role_names[role];
}

int
pd_jwt_role_parse(const char *s, enum pd_jwt_role *out)
{
    for (size_t i = 0; s != NULL && i < PD_ARRAY_SIZE(role_names); i++) {
        if (strcmp(s, role_names[i]) == 0) {
            *out = (enum pd_jwt_role)i;
            return 0;
        }
    }
    return -EINVAL;
}

const char *
pd_jwt_strerror(int rc)
{
    switch (rc) {
    case 0:
        return "valid";
    case -EINVAL:
        return "malformed token";
    case -ENOTSUP:
        return "algorithm not allowed";
    case -ENOKEY:
        return "unknown key id";
    case -EBADMSG:
        return "bad signature";
    case -EACCES:
        return "wrong issuer";
    case -EKEYEXPIRED:
        return "expired";
    case -ETIME:
        return "not yet valid";
    case -EKEYREVOKED:
        return "revoked";
    default:
        return "verification failed";
    }
}

/* --- base64url ----------------------------------------------------------- */

static const char b64url_chars[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

size_t
pd_b64url_encode(const void *in, size_t len, char *out)
{
    const unsigned char *p = in;
    size_t o = 0, i = 0;

    for (; i + 3 <= len; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8 | p[i + 2];

        out[o++] = b64url_chars[v >> 18 & 63];
        out[o++] = b64url_chars[v >> 12 & 63];
        out[o++] = b64url_chars[v >> 6 & 63];
        out[o++] = b64url_chars[v & 63];
    }
    if (len - i == 1) {
        uint32_t v = (uint32_t)p[i] << 16;

        out[o++] = b64url_chars[v >> 18 & 63];
        out[o++] = b64url_chars[v >> 12 & 63];
    } else if (len - i == 2) {
        uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8;

        out[o++] = b64url_chars[v >> 18 & 63];
        out[o++] = b64url_chars[v >> 12 & 63];
        out[o++] = b64url_chars[v >> 6 & 63];
    }
    out[o] = '\0';
    return o;
}

static int
b64url_value(char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '-')
        return 62;
    if (c == '_')
        return 63;
    return -1;
}

long
pd_b64url_decode(const char *in, size_t len, void *out, size_t outlen)
{
    unsigned char *o = out;
    size_t need = len / 4 * 3 + (len % 4 == 0 ? 0 : len % 4 - 1);
    uint32_t acc = 0;
    int bits = 0;
    size_t n = 0;

    if (len % 4 == 1 || len > (size_t)LONG_MAX / 2)
        return -EINVAL;
    if (need > outlen)
        return -ENOSPC;
    for (size_t i = 0; i < len; i++) {
        int v = b64url_value(in[i]);

        if (v < 0)
            return -EINVAL;
        acc = acc << 6 | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            o[n++] = (unsigned char)(acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    /* Leftover bits must be zero, so each byte string has one encoding. */
    if (acc != 0)
        return -EINVAL;
    return (long)n;
}

/* --- keys ---------------------------------------------------------------- */

void
pd_jwt_key_free(struct pd_jwt_key *key)
{
    if (key == NULL)
        return;
    EVP_PKEY_free(key->pkey);
    free(key->pub_pem);
    if (key->priv_pem != NULL) {
        OPENSSL_cleanse(key->priv_pem, key->priv_pem_len);
        free(key->priv_pem);
    }
    free(key);
}

/* Copies a memory BIO's content into a malloc'd NUL-terminated string. */
static char *
bio_strdup(BIO *bio, size_t *out_len)
{
    char *data;
    long n = BIO_get_mem_data(bio, &data);
    char *s;

    if (n <= 0)
        return NULL;
    s = malloc((size_t)n + 1);
    if (s == NULL)
        return NULL;
    memcpy(s, data, (size_t)n);
    s[n] = '\0';
    if (out_len != NULL)
        *out_len = (size_t)n;
    return s;
}

static int
coord_b64(const EVP_PKEY *pkey, const char *param, char *out)
{
    BIGNUM *bn = NULL;
    unsigned char raw[COORD_LEN];
    int ok;

    if (!EVP_PKEY_get_bn_param(pkey, param, &bn))
        return -EINVAL;
    ok = BN_bn2binpad(bn, raw, sizeof(raw)) == (int)sizeof(raw);
    BN_free(bn);
    if (!ok)
        return -EINVAL;
    pd_b64url_encode(raw, sizeof(raw), out);
    return 0;
}

/*
 * RFC 7638: the thumbprint hashes the required members in lexical order
 * with no whitespace, so it is reproducible from the JWKS alone.
 */
static void
thumbprint(struct pd_jwt_key *key)
{
    char json[160];
    unsigned char md[SHA256_DIGEST_LENGTH];
    int n;

    n = snprintf(json, sizeof(json),
                 "{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"%s\",\"y\":\"%s\"}",
                 key->x, key->y);
    SHA256((const unsigned char *)json, (size_t)n, md);
    pd_b64url_encode(md, sizeof(md), key->kid);
}

/* Wraps an EVP_PKEY (taking it) after checking it is EC on P-256. */
static int
key_wrap(EVP_PKEY *pkey, bool private, struct pd_jwt_key **out, char *err,
         size_t errlen)
{
    struct pd_jwt_key *key;
    char group[32];
    BIO *bio = NULL;
    int rc = -ENOMEM;

    if (!EVP_PKEY_is_a(pkey, "EC") ||
        !EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME,
                                        group, sizeof(group), NULL) ||
        strcmp(group, "prime256v1") != 0) {
        ERR_clear_error();
        EVP_PKEY_free(pkey);
        set_err(err, errlen, "key is not an EC P-256 key");
        return -EINVAL;
    }
    key = calloc(1, sizeof(*key));
    if (key == NULL) {
        EVP_PKEY_free(pkey);
        return -ENOMEM;
    }
    key->pkey = pkey;
    if (coord_b64(pkey, OSSL_PKEY_PARAM_EC_PUB_X, key->x) < 0 ||
        coord_b64(pkey, OSSL_PKEY_PARAM_EC_PUB_Y, key->y) < 0) {
        set_ssl_err(err, errlen, "reading the public point");
        rc = -EINVAL;
        goto fail;
    }
    thumbprint(key);

    bio = BIO_new(BIO_s_mem());
    if (bio == NULL || !PEM_write_bio_PUBKEY(bio, pkey))
        goto fail_ssl;
    key->pub_pem = bio_strdup(bio, NULL);
    if (key->pub_pem == NULL)
        goto fail;
    if (private) {
        (void)BIO_reset(bio);
        if (!PEM_write_bio_PrivateKey(bio, pkey, NULL, NULL, 0, NULL, NULL))
            goto fail_ssl;
        key->priv_pem = bio_strdup(bio, &key->priv_pem_len);
        if (key->priv_pem == NULL)
            goto fail;
    }
    /* The memory BIO held the private PEM: wipe it before freeing. */
    {
        char *data;
        long n = BIO_get_mem_data(bio, &data);

        if (n > 0)
            OPENSSL_cleanse(data, (size_t)n);
    }
    BIO_free(bio);
    *out = key;
    return 0;

fail_ssl:
    set_ssl_err(err, errlen, "writing PEM");
fail:
    BIO_free(bio);
    pd_jwt_key_free(key);
    return rc;
}

int
pd_jwt_key_generate(struct pd_jwt_key **out, char *err, size_t errlen)
{
    EVP_PKEY *pkey = EVP_EC_gen("P-256");

    if (pkey == NULL) {
        set_ssl_err(err, errlen, "generating an EC P-256 key");
        return -EIO;
    }
    return key_wrap(pkey, true, out, err, errlen);
}

/* Refuses to prompt for a passphrase: encrypted keys are not supported. */
static int
no_passphrase(char *buf, int size, int rwflag, void *u)
{
    PD_UNUSED(buf);
    PD_UNUSED(size);
    PD_UNUSED(rwflag);
    PD_UNUSED(u);
    return -1;
}

int
pd_jwt_key_from_pem(const char *pem, size_t len, struct pd_jwt_key **out,
                    char *err, size_t errlen)
{
    EVP_PKEY *pkey;
    BIO *bio;
    bool private = true;

    if (pem == NULL || len == 0 || len > 16384) {
        set_err(err, errlen, "empty or oversized PEM");
        return -EINVAL;
    }
    bio = BIO_new_mem_buf(pem, (int)len);
    if (bio == NULL)
        return -ENOMEM;
    pkey = PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, NULL);
    if (pkey == NULL) {
        ERR_clear_error();
        private = false;
        (void)BIO_reset(bio);
        pkey = PEM_read_bio_PUBKEY(bio, NULL, no_passphrase, NULL);
    }
    BIO_free(bio);
    if (pkey == NULL) {
        set_ssl_err(err, errlen, "no unencrypted private or public key PEM");
        return -EINVAL;
    }
    return key_wrap(pkey, private, out, err, errlen);
}

int
pd_jwt_key_load_file(const char *path, struct pd_jwt_key **out, char *err,
                     size_t errlen)
{
    struct stat st;
    char *pem = NULL;
    size_t len = 0;
    int rc;

    rc = pd_read_file(path, &pem, &len, 16384);
    if (rc < 0) {
        set_err(err, errlen, "%s: %s", path, strerror(-rc));
        return rc;
    }
    if (stat(path, &st) < 0) {
        rc = -errno;
        set_err(err, errlen, "%s: %s", path, strerror(-rc));
        goto out;
    }
    rc = pd_jwt_key_from_pem(pem, len, out, err, errlen);
    if (rc == 0 && (*out)->priv_pem != NULL && (st.st_mode & 077) != 0) {
        pd_jwt_key_free(*out);
        *out = NULL;
        set_err(err, errlen,
                "%s: private key readable by group or others (mode %03o); "
                "chmod 600 it", path, (unsigned)(st.st_mode & 0777));
        rc = -EPERM;
    }
out:
    OPENSSL_cleanse(pem, len);
    free(pem);
    return rc;
}

const char *
pd_jwt_key_kid(const struct pd_jwt_key *key)
{
    return key->kid;
}

const char *
pd_jwt_key_public_pem(const struct pd_jwt_key *key)
{
    return key->pub_pem;
}

const char *
pd_jwt_key_private_pem(const struct pd_jwt_key *key)
{
    return key->priv_pem;
}

/* --- key sets ------------------------------------------------------------ */

int
pd_jwt_keyset_new(const char *issuer, struct pd_jwt_keyset **out)
{
    struct pd_jwt_keyset *ks;

    if (issuer == NULL || *issuer == '\0' ||
        strlen(issuer) > PD_JWT_ISS_MAX)
        return -EINVAL;
    ks = calloc(1, sizeof(*ks));
    if (ks == NULL)
        return -ENOMEM;
    pd_strlcpy(ks->issuer, issuer, sizeof(ks->issuer));
    ks->signer = -1;
    *out = ks;
    return 0;
}

void
pd_jwt_keyset_free(struct pd_jwt_keyset *ks)
{
    if (ks == NULL)
        return;
    for (size_t i = 0; i < ks->nkeys; i++)
        pd_jwt_key_free(ks->keys[i]);
    free(ks);
}

static int
keyset_find(const struct pd_jwt_keyset *ks, const char *kid)
{
    for (size_t i = 0; i < ks->nkeys; i++) {
        if (strcmp(ks->keys[i]->kid, kid) == 0)
            return (int)i;
    }
    return -1;
}

int
pd_jwt_keyset_add(struct pd_jwt_keyset *ks, struct pd_jwt_key *key)
{
    if (key == NULL)
        return -EINVAL;
    if (keyset_find(ks, key->kid) >= 0) {
        pd_jwt_key_free(key);
        return -EEXIST;
    }
    if (ks->nkeys == PD_JWT_KEYSET_MAX) {
        pd_jwt_key_free(key);
        return -ENOSPC;
    }
    ks->keys[ks->nkeys++] = key;
    return 0;
}

int
pd_jwt_keyset_remove(struct pd_jwt_keyset *ks, const char *kid)
{
    int i = keyset_find(ks, kid);

    if (i < 0)
        return -ENOENT;
    pd_jwt_key_free(ks->keys[i]);
    memmove(&ks->keys[i], &ks->keys[i + 1],
            (ks->nkeys - (size_t)i - 1) * sizeof(ks->keys[0]));
    ks->nkeys--;
    if (ks->signer == i)
        ks->signer = -1;
    else if (ks->signer > i)
        ks->signer--;
    return 0;
}

int
pd_jwt_keyset_set_signer(struct pd_jwt_keyset *ks, const char *kid)
{
    int i = keyset_find(ks, kid);

    if (i < 0)
        return -ENOENT;
    if (ks->keys[i]->priv_pem == NULL)
        return -EPERM;
    ks->signer = i;
    return 0;
}

size_t
pd_jwt_keyset_count(const struct pd_jwt_keyset *ks)
{
    return ks->nkeys;
}

void
pd_jwt_keyset_set_revoked(struct pd_jwt_keyset *ks, pd_jwt_revoked_fn fn,
                          void *arg)
{
    ks->revoked = fn;
    ks->revoked_arg = arg;
}

int
pd_jwt_keyset_jwks(const struct pd_jwt_keyset *ks, char **out)
{
    json_t *doc = json_object();
    json_t *keys = json_array();
    char *s;

    if (doc == NULL || keys == NULL)
        goto nomem;
    json_object_set_new(doc, "keys", keys);
    for (size_t i = 0; i < ks->nkeys; i++) {
        const struct pd_jwt_key *k = ks->keys[i];
        json_t *jwk = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s}",
                                "kty", "EC", "crv", "P-256", "x", k->x,
                                "y", k->y, "kid", k->kid, "alg", "ES256",
                                "use", "sig");

        if (jwk == NULL || json_array_append_new(keys, jwk) < 0)
            goto nomem;
    }
    s = json_dumps(doc, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(doc);
    if (s == NULL)
        return -ENOMEM;
    *out = s;
    return 0;

nomem:
    json_decref(doc);
    return -ENOMEM;
}

/* --- signing ------------------------------------------------------------- */

static int
spec_check(const struct pd_jwt_spec *spec, char *err, size_t errlen)
{
    if (spec->sub == NULL || !pd_id_valid(spec->sub)) {
        set_err(err, errlen, "subject must be an id ([a-z0-9][a-z0-9-]*)");
        return -EINVAL;
    }
    if (pd_jwt_role_name(spec->role) == NULL) {
        set_err(err, errlen, "unknown role %d", (int)spec->role);
        return -EINVAL;
    }
    if (spec->sandbox != NULL && !pd_id_valid(spec->sandbox)) {
        set_err(err, errlen, "sandbox must be an id");
        return -EINVAL;
    }
    if (spec->now_s <= 0 || spec->now_s >= TIME_MAX || spec->ttl_s <= 0 ||
        spec->ttl_s >= TIME_MAX - spec->now_s) {
        set_err(err, errlen, "ttl must be positive and end before 2^40 s");
        return -EINVAL;
    }
    return 0;
}

int
pd_jwt_sign(const struct pd_jwt_keyset *ks, const struct pd_jwt_spec *spec,
            char **out_token, struct pd_jwt_claims *out_claims, char *err,
            size_t errlen)
{
    const struct pd_jwt_key *key;
    struct pd_jwt_claims c;
    unsigned char rnd[PD_JWT_JTI_LEN / 2];
    jwt_t *jwt = NULL;
    char *tok;
    int rc;

    if (ks->signer < 0) {
        set_err(err, errlen, "no signing key in the key set");
        return -ENOKEY;
    }
    key = ks->keys[ks->signer];
    rc = spec_check(spec, err, errlen);
    if (rc < 0)
        return rc;

    memset(&c, 0, sizeof(c));
    rc = pd_random_bytes(rnd, sizeof(rnd));
    if (rc < 0) {
        set_err(err, errlen, "getrandom: %s", strerror(-rc));
        return rc;
    }
    pd_hex(rnd, sizeof(rnd), c.jti);
    pd_strlcpy(c.iss, ks->issuer, sizeof(c.iss));
    pd_strlcpy(c.sub, spec->sub, sizeof(c.sub));
    pd_strlcpy(c.kid, key->kid, sizeof(c.kid));
    if (spec->sandbox != NULL)
        pd_strlcpy(c.sandbox, spec->sandbox, sizeof(c.sandbox));
    c.role = spec->role;
    c.iat = c.nbf = spec->now_s;
    c.exp = spec->now_s + spec->ttl_s;

    rc = -ENOMEM;
    if (jwt_new(&jwt) != 0)
        goto fail;
    if (jwt_add_header(jwt, "kid", c.kid) != 0 ||
        jwt_add_grant(jwt, "iss", c.iss) != 0 ||
        jwt_add_grant(jwt, "sub", c.sub) != 0 ||
        jwt_add_grant(jwt, "role", pd_jwt_role_name(c.role)) != 0 ||
        jwt_add_grant(jwt, "jti", c.jti) != 0 ||
        jwt_add_grant_int(jwt, "iat", (long)c.iat) != 0 ||
        jwt_add_grant_int(jwt, "nbf", (long)c.nbf) != 0 ||
        jwt_add_grant_int(jwt, "exp", (long)c.exp) != 0 ||
        (c.sandbox[0] != '\0' &&
         jwt_add_grant(jwt, "sandbox", c.sandbox) != 0))
        goto fail;
    if (jwt_set_alg(jwt, JWT_ALG_ES256, (const unsigned char *)key->priv_pem,
                    (int)key->priv_pem_len) != 0) {
        rc = -EINVAL;
        goto fail;
    }
    tok = jwt_encode_str(jwt);
    if (tok == NULL) {
        rc = -EIO;
        goto fail;
    }
    jwt_free(jwt);
    *out_token = tok;
    if (out_claims != NULL)
        *out_claims = c;
    return 0;

fail:
    ERR_clear_error();
    set_err(err, errlen, "libjwt could not build the token: %s",
            strerror(-rc));
    jwt_free(jwt);
    return rc;
}

/* --- verification -------------------------------------------------------- */

/* Decodes one base64url part and parses it as a JSON object, strictly. */
static json_t *
part_json(const char *s, size_t len)
{
    char buf[PART_MAX];
    long n;
    json_t *j;

    if (len == 0 || len > (sizeof(buf) / 3) * 4)
        return NULL;
    n = pd_b64url_decode(s, len, buf, sizeof(buf));
    if (n <= 0)
        return NULL;
    j = json_loadb(buf, (size_t)n, JSON_REJECT_DUPLICATES, NULL);
    if (j != NULL && !json_is_object(j)) {
        json_decref(j);
        return NULL;
    }
    return j;
}

/* Copies a string member of at most max bytes; false if absent or bad. */
static bool
get_str(json_t *obj, const char *name, char *out, size_t max)
{
    json_t *v = json_object_get(obj, name);
    size_t len;

    if (!json_is_string(v))
        return false;
    len = json_string_length(v);
    if (len == 0 || len > max || strlen(json_string_value(v)) != len)
        return false;
    memcpy(out, json_string_value(v), len + 1);
    return true;
}

static bool
get_time(json_t *obj, const char *name, int64_t *out)
{
    json_t *v = json_object_get(obj, name);

    if (!json_is_integer(v))
        return false;
    if (json_integer_value(v) < 0 || json_integer_value(v) >= TIME_MAX)
        return false;
    *out = (int64_t)json_integer_value(v);
    return true;
}

static bool
jti_valid(const char *s)
{
    if (strlen(s) != PD_JWT_JTI_LEN)
        return false;
    for (; *s != '\0'; s++) {
        if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'f')))
            return false;
    }
    return true;
}

/* Reads and checks the shape of every claim; -EINVAL if any is wrong. */
static int
claims_parse(json_t *p, struct pd_jwt_claims *c)
{
    char role[16];

    if (!get_str(p, "iss", c->iss, PD_JWT_ISS_MAX) ||
        !get_str(p, "sub", c->sub, PD_ID_MAX) || !pd_id_valid(c->sub) ||
        !get_str(p, "role", role, sizeof(role) - 1) ||
        pd_jwt_role_parse(role, &c->role) < 0 ||
        !get_str(p, "jti", c->jti, PD_JWT_JTI_LEN) || !jti_valid(c->jti) ||
        !get_time(p, "iat", &c->iat) || !get_time(p, "nbf", &c->nbf) ||
        !get_time(p, "exp", &c->exp))
        return -EINVAL;
    if (c->nbf > c->exp || c->iat > c->exp)
        return -EINVAL;
    if (json_object_get(p, "sandbox") != NULL &&
        (!get_str(p, "sandbox", c->sandbox, PD_ID_MAX) ||
         !pd_id_valid(c->sandbox)))
        return -EINVAL;
    return 0;
}

/*
 * Checks the header: a JSON object with alg ES256 and a known kid, typ JWT
 * if present, no crit (we understand no extension). Returns the key index.
 */
static int
header_check(const struct pd_jwt_keyset *ks, json_t *h, char *kid)
{
    json_t *alg = json_object_get(h, "alg");
    json_t *typ = json_object_get(h, "typ");
    int i;

    if (!json_is_string(alg))
        return -EINVAL;
    if (strcmp(json_string_value(alg), "ES256") != 0)
        return -ENOTSUP;
    if (json_object_get(h, "crit") != NULL)
        return -EINVAL;
    if (typ != NULL &&
        (!json_is_string(typ) || strcmp(json_string_value(typ), "JWT") != 0))
        return -EINVAL;
    if (!get_str(h, "kid", kid, PD_JWT_KID_LEN))
        return -ENOKEY;
    i = keyset_find(ks, kid);
    return i < 0 ? -ENOKEY : i;
}

/*
 * Signatures already verified on this thread, by SHA-256 of the public key
 * and of the whole token. Verifying is a pure function of those two, so a
 * hit is the same answer libjwt would give; expiry, nbf and revocation are
 * still checked on every call. Why: libjwt decodes the PEM key for every
 * token, and with OpenSSL 3 that decode plus the ECDSA check was most of a
 * scheduler's CPU under load (every API request, again on the leader for
 * a forwarded one), while clients reuse a handful of tokens. Only
 * successes are kept; the slots are reused round-robin.
 */
#define SIG_MEMO_SLOTS 64

struct sig_memo {
    unsigned char key[SHA256_DIGEST_LENGTH];
    unsigned char token[SHA256_DIGEST_LENGTH];
    bool used;
};

static __thread struct sig_memo sig_memo[SIG_MEMO_SLOTS];
static __thread unsigned sig_memo_next;

static bool
sig_memo_find(const unsigned char *kd, const unsigned char *td)
{
    for (unsigned i = 0; i < SIG_MEMO_SLOTS; i++)
        if (sig_memo[i].used &&
            CRYPTO_memcmp(sig_memo[i].token, td, sizeof(sig_memo[i].token))
                == 0 &&
            CRYPTO_memcmp(sig_memo[i].key, kd, sizeof(sig_memo[i].key))
                == 0)
            return true;
    return false;
}

static void
sig_memo_put(const unsigned char *kd, const unsigned char *td)
{
    struct sig_memo *m = &sig_memo[sig_memo_next++ % SIG_MEMO_SLOTS];

    memcpy(m->key, kd, sizeof(m->key));
    memcpy(m->token, td, sizeof(m->token));
    m->used = true;
}

/* Libjwt checks the signature; the key is never NULL, alg is pinned. */
static int
signature_check(const struct pd_jwt_key *key, const char *token,
                const char *sig, size_t siglen)
{
    unsigned char raw[SIG_LEN + 3];
    unsigned char kd[SHA256_DIGEST_LENGTH], td[SHA256_DIGEST_LENGTH];
    jwt_t *jwt = NULL;
    int rc;

    if (pd_b64url_decode(sig, siglen, raw, sizeof(raw)) != SIG_LEN)
        return -EBADMSG;
    SHA256((const unsigned char *)key->pub_pem, strlen(key->pub_pem), kd);
    SHA256((const unsigned char *)token, strlen(token), td);
    if (sig_memo_find(kd, td))
        return 0;
    rc = jwt_decode(&jwt, token, (const unsigned char *)key->pub_pem,
                    (int)strlen(key->pub_pem));
    ERR_clear_error();
    if (rc != 0 || jwt == NULL)
        return -EBADMSG;
    rc = jwt_get_alg(jwt) == JWT_ALG_ES256 ? 0 : -ENOTSUP;
    jwt_free(jwt);
    if (rc == 0)
        sig_memo_put(kd, td);
    return rc;
}

int
pd_jwt_verify(const struct pd_jwt_keyset *ks, const char *token,
              int64_t now_s, struct pd_jwt_claims *out)
{
    struct pd_jwt_claims c;
    const char *dot1, *dot2;
    size_t len;
    json_t *h = NULL, *p = NULL;
    int rc, ki;

    memset(out, 0, sizeof(*out));
    memset(&c, 0, sizeof(c));
    if (token == NULL)
        return -EINVAL;
    len = strnlen(token, PD_JWT_MAX_LEN + 1);
    if (len > PD_JWT_MAX_LEN)
        return -EINVAL;
    dot1 = memchr(token, '.', len);
    dot2 = dot1 == NULL
               ? NULL
               : memchr(dot1 + 1, '.', len - (size_t)(dot1 + 1 - token));
    if (dot1 == NULL || dot2 == NULL ||
        memchr(dot2 + 1, '.', len - (size_t)(dot2 + 1 - token)) != NULL)
        return -EINVAL;

    rc = -EINVAL;
    h = part_json(token, (size_t)(dot1 - token));
    if (h == NULL)
        goto out;
    p = part_json(dot1 + 1, (size_t)(dot2 - dot1 - 1));
    if (p == NULL)
        goto out;
    /* alg first: a `none` or HMAC token must never reach libjwt. */
    ki = header_check(ks, h, c.kid);
    if (ki == -ENOTSUP || ki == -EINVAL) {
        rc = ki;
        goto out;
    }
    rc = claims_parse(p, &c);
    if (rc < 0)
        goto out;
    if (ki < 0) {
        rc = ki;
        goto out;
    }
    rc = signature_check(ks->keys[ki], token, dot2 + 1,
                         len - (size_t)(dot2 + 1 - token));
    if (rc < 0)
        goto out;

    if (strcmp(c.iss, ks->issuer) != 0)
        rc = -EACCES;
    else if (now_s >= c.exp + PD_JWT_LEEWAY_S)
        rc = -EKEYEXPIRED;
    else if (c.nbf > now_s + PD_JWT_LEEWAY_S || c.iat > now_s + PD_JWT_LEEWAY_S)
        rc = -ETIME;
    else if (ks->revoked != NULL && ks->revoked(ks->revoked_arg, c.jti))
        rc = -EKEYREVOKED;
    if (rc == 0)
        *out = c;
out:
    json_decref(h);
    json_decref(p);
    return rc;
}
