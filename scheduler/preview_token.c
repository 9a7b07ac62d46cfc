/*
 * Preview tokens and preview Host parsing; see preview.h for the format and
 * why every failure looks the same.
 */
#include "scheduler/preview.h"

#include <errno.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

static const char base32_chars[] = "abcdefghijklmnopqrstuvwxyz234567";

int
sched_preview_token_new(char out[SCHED_PREVIEW_TOKEN_LEN + 1])
{
    /* 17 bytes = 136 bits; the first 130 make the 26 characters. */
    unsigned char rnd[(SCHED_PREVIEW_TOKEN_LEN * 5 + 7) / 8];
    uint32_t acc = 0;
    int bits = 0;
    size_t n = 0;
    int rc;

    rc = pd_random_bytes(rnd, sizeof(rnd));
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < sizeof(rnd) && n < SCHED_PREVIEW_TOKEN_LEN; i++) {
        acc = acc << 8 | rnd[i];
        bits += 8;
        while (bits >= 5 && n < SCHED_PREVIEW_TOKEN_LEN) {
            bits -= 5;
            out[n++] = base32_chars[(acc >> bits) & 31];
        }
        acc &= (1u << bits) - 1;
    }
    out[n] = '\0';
    memset(rnd, 0, sizeof(rnd));
    return 0;
}

static bool
base32_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= '2' && c <= '7');
}

bool
sched_preview_token_valid(const char *s, size_t len)
{
    if (s == NULL || len != SCHED_PREVIEW_TOKEN_LEN)
        return false;
    for (size_t i = 0; i < len; i++) {
        if (!base32_char(s[i]))
            return false;
    }
    return true;
}

void
sched_preview_token_hash(const char *token,
                         char out[SCHED_PREVIEW_HASH_LEN + 1])
{
    unsigned char md[SHA256_DIGEST_LENGTH];

    SHA256((const unsigned char *)token,
           strnlen(token, SCHED_PREVIEW_HOST_MAX), md);
    pd_hex(md, sizeof(md), out);
}

bool
sched_preview_token_matches(const char *token, const char *stored_hash)
{
    char h[SCHED_PREVIEW_HASH_LEN + 1];
    char stored[SCHED_PREVIEW_HASH_LEN] = {0};
    size_t tlen, slen;
    bool ok;

    if (token == NULL || stored_hash == NULL)
        return false;
    tlen = strnlen(token, SCHED_PREVIEW_TOKEN_LEN + 1);
    slen = strnlen(stored_hash, SCHED_PREVIEW_HASH_LEN + 1);
    sched_preview_token_hash(token, h);
    memcpy(stored, stored_hash,
           slen < sizeof(stored) ? slen : sizeof(stored));
    ok = pd_ct_equal(h, stored, SCHED_PREVIEW_HASH_LEN);
    return ok && slen == SCHED_PREVIEW_HASH_LEN &&
           sched_preview_token_valid(token, tlen);
}

/* Leading 1-5 digits with no leading zero, 1..65535. */
static bool
parse_port(const char *s, size_t len, uint16_t *out)
{
    uint32_t v = 0;

    if (len == 0 || len > 5 || s[0] == '0')
        return false;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (uint32_t)(s[i] - '0');
    }
    if (v == 0 || v > 65535)
        return false;
    *out = (uint16_t)v;
    return true;
}

/* Splits "{port}-{sandbox}-{token}" from both ends. */
static bool
parse_label(const char *l, size_t len, struct sched_preview_host *out)
{
    const char *dash, *tok;
    size_t idlen;

    /* The shortest label is "1-a-" plus the token. */
    if (len < 4 + SCHED_PREVIEW_TOKEN_LEN)
        return false;
    tok = l + len - SCHED_PREVIEW_TOKEN_LEN;
    if (tok[-1] != '-' || !sched_preview_token_valid(tok,
                                                     SCHED_PREVIEW_TOKEN_LEN))
        return false;
    dash = memchr(l, '-', len);
    if (!parse_port(l, (size_t)(dash - l), &out->port))
        return false;
    if (dash + 1 >= tok - 1)
        return false;
    idlen = (size_t)(tok - 1 - (dash + 1));
    if (!pd_id_valid_n(dash + 1, idlen))
        return false;
    memcpy(out->sandbox, dash + 1, idlen);
    out->sandbox[idlen] = '\0';
    memcpy(out->token, tok, SCHED_PREVIEW_TOKEN_LEN);
    out->token[SCHED_PREVIEW_TOKEN_LEN] = '\0';
    return true;
}

int
sched_preview_parse_host(const char *host, size_t len, const char *domain,
                         struct sched_preview_host *out)
{
    char h[SCHED_PREVIEW_HOST_MAX];
    const char *colon, *dot;
    uint16_t lport;

    memset(out, 0, sizeof(*out));
    if (host == NULL || domain == NULL || *domain == '\0' || len == 0 ||
        len >= sizeof(h))
        return -ENOENT;
    for (size_t i = 0; i < len; i++) {
        char c = host[i];

        if (c >= 'A' && c <= 'Z')
            c = (char)(c - 'A' + 'a');
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '.' || c == ':'))
            return -ENOENT;
        h[i] = c;
    }

    colon = memchr(h, ':', len);
    if (colon != NULL) {
        if (!parse_port(colon + 1, len - (size_t)(colon + 1 - h), &lport))
            return -ENOENT;
        len = (size_t)(colon - h);
    }

    dot = memchr(h, '.', len);
    if (dot == NULL || strlen(domain) != len - (size_t)(dot + 1 - h) ||
        strncasecmp(dot + 1, domain, strlen(domain)) != 0 ||
        !parse_label(h, (size_t)(dot - h), out)) {
        memset(out, 0, sizeof(*out));
        return -ENOENT;
    }
    return 0;
}

int
sched_preview_url(char *out, size_t size, const char *scheme, uint16_t port,
                  const char *sandbox, const char *token, const char *domain,
                  uint16_t listen_port)
{
    char lp[8] = "";
    int n;

    if (port == 0 || !pd_id_valid(sandbox) ||
        !sched_preview_token_valid(token, strlen(token)))
        return -EINVAL;
    if (listen_port != 0)
        snprintf(lp, sizeof(lp), ":%u", (unsigned)listen_port);
    n = snprintf(out, size, "%s://%u-%s-%s.%s%s", scheme, (unsigned)port,
                 sandbox, token, domain, lp);
    if (n < 0 || (size_t)n >= size)
        return -ENOSPC;
    return n;
}
