/* libFuzzer target for token verification (proto/jwt.c pd_jwt_verify, on
 * raw strings and on a valid token with one part replaced) and the preview
 * Host parser (scheduler/preview_token.c): neither crashes or over-reads,
 * and nothing but the untouched valid token ever verifies. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto/jwt.h"
#include "scheduler/preview.h"

/*
 * Byte 0 picks the mode:
 *   0  the rest is a token string;
 *   1  the rest replaces the decoded header (byte 1 % 3 == 0), payload (1)
 *      or signature (2) of a valid token, re-encoded in base64url, so
 *      mutations reach the JSON and claim checks behind the encoding;
 *   2  the rest is a Host header for the preview parser, and a preview
 *      token for the validity and hash checks;
 *   3  the rest is base64url for the strict decoder, and a PEM key.
 */
#define NOW 1700000000

static struct pd_jwt_keyset *ks;
static char *good;            /* a valid token signed by ks */
static size_t good_parts[3];  /* offsets of the three parts */
static size_t good_len;
static char good_hash[SCHED_PREVIEW_HASH_LEN + 1];

static bool
revoked(void *arg, const char *jti)
{
    (void)arg;
    return jti[0] == '0'; /* reached only with a valid signature */
}

static void
setup(void)
{
    struct pd_jwt_spec spec = {
        .sub = "tenant-a", .role = PD_JWT_ROLE_TENANT,
        .sandbox = "sb-1", .now_s = NOW, .ttl_s = 3600,
    };
    struct pd_jwt_claims cl;
    struct pd_jwt_key *k;
    char err[256];
    const char *dot;

    if (pd_jwt_key_generate(&k, err, sizeof(err)) != 0 ||
        pd_jwt_keyset_new("paddock", &ks) != 0 ||
        pd_jwt_keyset_add(ks, k) != 0 ||
        pd_jwt_keyset_set_signer(ks, pd_jwt_key_kid(k)) != 0)
        abort();
    pd_jwt_keyset_set_revoked(ks, revoked, NULL);
    /* A jti starting with '0' would be revoked: sign until it is not. */
    do {
        free(good);
        if (pd_jwt_sign(ks, &spec, &good, &cl, err, sizeof(err)) != 0)
            abort();
    } while (cl.jti[0] == '0');
    if (pd_jwt_verify(ks, good, NOW, &cl) != 0)
        abort();
    good_len = strlen(good);
    dot = strchr(good, '.');
    good_parts[1] = (size_t)(dot - good) + 1;
    good_parts[2] = (size_t)(strchr(dot + 1, '.') - good) + 1;
    sched_preview_token_hash("abcdefghijklmnopqrstuvwxyz", good_hash);
}

static void
verify(const char *tok, bool may_pass)
{
    struct pd_jwt_claims cl;
    int rv = pd_jwt_verify(ks, tok, NOW, &cl);

    if (rv == 0 && !may_pass)
        abort(); /* a forged or altered token verified */
    if (rv == 0 && (strlen(cl.sub) > PD_ID_MAX || cl.exp < cl.nbf))
        abort();
    if (pd_jwt_strerror(rv) == NULL)
        abort();
}

static void
raw_token(const uint8_t *data, size_t size)
{
    char *tok = malloc(size + 1);

    if (tok == NULL)
        abort();
    memcpy(tok, data, size);
    tok[size] = '\0';
    /* Only the exact valid token may pass (the fuzzer finds it in the
     * dictionary of compared strings sometimes). */
    verify(tok, strcmp(tok, good) == 0);
    free(tok);
}

static void
replace_part(unsigned part, const uint8_t *data, size_t size)
{
    size_t start = good_parts[part];
    size_t end = part < 2 ? good_parts[part + 1] - 1 : good_len;
    size_t cap = good_len + (size + 2) / 3 * 4 + 2;
    char *tok = malloc(cap);
    size_t n;

    if (tok == NULL)
        abort();
    memcpy(tok, good, start);
    n = pd_b64url_encode(data, size, tok + start);
    memcpy(tok + start + n, good + end, good_len - end);
    tok[start + n + good_len - end] = '\0';
    verify(tok, strcmp(tok, good) == 0);
    free(tok);
}

static void
host(const uint8_t *data, size_t size)
{
    struct sched_preview_host h;
    const char *s = (const char *)data;
    char url[1024];

    if (sched_preview_parse_host(s, size, "preview.localhost", &h) == 0) {
        /* What parses must make a URL that parses to the same thing. */
        struct sched_preview_host h2;
        int n = sched_preview_url(url, sizeof(url), "http", h.port,
                                  h.sandbox, h.token, "preview.localhost",
                                  0);

        if (n < 0 ||
            sched_preview_parse_host(url + 7, (size_t)n - 7,
                                     "preview.localhost", &h2) != 0 ||
            memcmp(&h, &h2, sizeof(h)) != 0)
            abort();
    }
    sched_preview_parse_host(s, size, "", &h);
    if (sched_preview_token_valid(s, size) && size < 64) {
        char tok[64];

        memcpy(tok, s, size);
        tok[size] = '\0';
        sched_preview_token_matches(tok, good_hash);
        sched_preview_token_matches("abcdefghijklmnopqrstuvwxyz", tok);
    }
}

static void
b64_and_pem(const uint8_t *data, size_t size)
{
    unsigned char out[PD_JWT_MAX_LEN];
    struct pd_jwt_key *k = NULL;
    char err[256];
    long n = pd_b64url_decode((const char *)data, size, out, sizeof(out));

    if (n > (long)sizeof(out))
        abort();
    if (n >= 0) {
        /* Strict base64url is a bijection: encoding gives the input. */
        char *enc = malloc((size_t)n / 3 * 4 + 8);

        if (enc == NULL)
            abort();
        if (pd_b64url_encode(out, (size_t)n, enc) != size ||
            memcmp(enc, data, size) != 0)
            abort();
        free(enc);
    }
    if (pd_jwt_key_from_pem((const char *)data, size, &k, err,
                            sizeof(err)) == 0)
        pd_jwt_key_free(k);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (ks == NULL)
        setup();
    if (size < 2)
        return 0;
    switch (data[0] % 4) {
    case 0:
        raw_token(data + 1, size - 1);
        break;
    case 1:
        replace_part(data[1] % 3, data + 2, size - 2);
        break;
    case 2:
        host(data + 1, size - 1);
        break;
    default:
        b64_and_pem(data + 1, size - 1);
        break;
    }
    return 0;
}
