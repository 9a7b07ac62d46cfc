/*
 * Preview URLs: http(s)://{port}-{sandbox}-{token}.{preview domain}
 *
 * The token part (preview_token.c): generation, hashing for storage, the
 * constant-time check, and the parsing of a request's Host header.
 *
 * A preview token is 26 characters of lower-case RFC 4648 base32
 * ("a-z2-7", DNS-safe), 130 bits from getrandom. Only its SHA-256 (in hex)
 * is stored in the replicated ports table; the plain token is shown once,
 * in the expose answer. With a 26-character token and a 5-digit port the
 * first label fits DNS's 63-octet limit for sandbox ids up to 30
 * characters; longer ids still work with a Host header and a resolver that
 * does not enforce the limit (*.localhost, /etc/hosts), not with real DNS.
 *
 * Parsing: the sandbox id may contain '-', so the label is read from both
 * ends: the port is the leading digits up to the first '-', the token the
 * last 26 characters after a '-', the id what lies between. Host names are
 * case-insensitive (RFC 4343), so the Host is compared in lower case; an
 * optional ":port" suffix (the listener's port) is ignored. Everything
 * else (extra or missing labels, another domain, a trailing dot, port 0 or
 * above 65535 or with a leading zero, an invalid id, a token of the wrong
 * length or alphabet) is the same -ENOENT, so the caller answers the same
 * 404 without telling which part was wrong.
 */
#ifndef SCHED_PREVIEW_H
#define SCHED_PREVIEW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/util.h"

#define SCHED_PREVIEW_TOKEN_LEN 26    /* characters, 130 bits */
#define SCHED_PREVIEW_HASH_LEN  64    /* hex of SHA-256 */

/* The longest Host header the parser looks at. */
#define SCHED_PREVIEW_HOST_MAX 512

struct sched_preview_host {
    uint16_t port;
    char sandbox[PD_ID_MAX + 1];
    char token[SCHED_PREVIEW_TOKEN_LEN + 1];
};

/* Fills out with a fresh token (NUL-terminated). 0 or -errno (getrandom). */
int sched_preview_token_new(char out[SCHED_PREVIEW_TOKEN_LEN + 1]);

/* True when s is exactly SCHED_PREVIEW_TOKEN_LEN base32 characters. */
bool sched_preview_token_valid(const char *s, size_t len);

/* The hex SHA-256 of the token, as stored in the ports table. */
void sched_preview_token_hash(const char *token,
                              char out[SCHED_PREVIEW_HASH_LEN + 1]);

/*
 * True when token hashes to stored_hash. The hashes are compared in
 * constant time, so the time taken says nothing about how much matched.
 * A malformed token or hash is false (after the same amount of work).
 */
bool sched_preview_token_matches(const char *token, const char *stored_hash);

/*
 * Parses a Host header value (len bytes, not NUL-terminated) against the
 * preview domain (e.g. "preview.localhost", lower case, no trailing dot).
 * 0 and *out filled, or -ENOENT for anything else (out is then cleared).
 */
int sched_preview_parse_host(const char *host, size_t len, const char *domain,
                             struct sched_preview_host *out);

/*
 * Writes the URL "{scheme}://{port}-{sandbox}-{token}.{domain}[:{lport}]"
 * into out (listen_port 0 for none). Returns the length, or -ENOSPC /
 * -EINVAL (bad id or token).
 */
int sched_preview_url(char *out, size_t size, const char *scheme,
                      uint16_t port, const char *sandbox, const char *token,
                      const char *domain, uint16_t listen_port);

#endif
