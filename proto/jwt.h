/*
 * Paddock's tokens: ES256 JWTs signed by the cluster, verified by every
 * scheduler (API) and every agent (egress proxy, sandbox-scoped tokens).
 *
 * A token carries {iss, sub, role, jti, iat, nbf, exp} and, for a
 * sandbox-scoped token, {sandbox}; its header carries {alg: ES256, typ: JWT,
 * kid}. sub is the tenant (or the node id for a node token) and must be a
 * valid id (pd_id_valid). jti is 128 bits from the OS CSPRNG in lower-case
 * hex; it names the token in the tokens table and the revocation set.
 *
 * Keys rotate: a key set holds several public keys by kid and at most one
 * signer (a key with its private part). A new key signs; older keys stay in
 * the set and still verify until the operator retires (removes) them. The
 * kid is the RFC 7638 JWK thumbprint of the public key (base64url of the
 * SHA-256 of its canonical JWK), so anyone can recompute it from the JWKS.
 *
 * Verification checks, in this order, and returns the first failure:
 *   -EINVAL       malformed: longer than PD_JWT_MAX_LEN, not three
 *                 base64url parts, header or payload not a JSON object
 *                 (duplicate members refused), no alg, `crit` present
 *   -ENOTSUP      alg is anything but ES256 (`none`, HS256, RS256...)
 *   -EINVAL       a claim missing, of the wrong type or out of range (sub
 *                 or sandbox not an id, unknown role, jti not 32 hex
 *                 digits, nbf or iat after exp)
 *   -ENOKEY       kid missing or not in the set (never seen, or retired)
 *   -EBADMSG      the signature does not verify with that kid's key
 *   -EACCES       iss is not the key set's issuer
 *   -EKEYEXPIRED  now >= exp + leeway
 *   -ETIME        not yet valid: nbf or iat > now + leeway
 *   -EKEYREVOKED  the revocation hook says the jti is revoked
 * pd_jwt_strerror() names each one for the log line (never log the token).
 *
 * libjwt 1.10 traps (DESIGN.md 9) and how this file avoids them: libjwt
 * accepts HS256 signed with the public key PEM when that PEM is passed to
 * jwt_decode, accepts `alg: none` with a NULL key, and checks no time
 * claim. Here the header is parsed first and must say ES256 before libjwt
 * sees the token; jwt_decode always gets the kid's public PEM (never NULL);
 * jwt_get_alg() must then say ES256 again; exp, nbf, iat and iss are checked
 * here.
 *
 * Revocation: install a hook with pd_jwt_keyset_set_revoked() and verify
 * consults it after the signature and time checks (so unauthenticated input
 * never reaches the revocation lookup). Without a hook the caller must look
 * up claims.jti itself; the daemons install the hook once at start-up so
 * no call site can forget it.
 *
 * Where the keys live (threat model)
 * ----------------------------------
 * Choices: (a) private and public keys in the replicated state (Raft log,
 * snapshots, sqlite), (b) both in files the deploy scripts create on every
 * scheduler, (c) private keys in files, public keys in the replicated state.
 *
 * (a) is the most convenient (rotation is one Raft command, a new member
 * gets the keys when it joins) but puts the private key everywhere the
 * Raft data goes: libraft's TCP transport is not encrypted, log segments
 * and snapshots persist on disk long after rotation, and backups of the
 * data directory carry them. Anyone who reads any of those mints admin
 * tokens for as long as the key is trusted.
 * (b) keeps private keys off the wire, but each scheduler has its own idea
 * of the trusted public keys: during a rotation a token signed with the new
 * key fails on a scheduler whose files are not updated yet, and retiring a
 * key needs a file edit and reload on every member.
 *
 * What the scheduler does: (a), for now. scheduler/auth.c writes down
 * why (any member that becomes the leader can mint at once, rotation is
 * one command, no deploy step has to keep key files in step) and the
 * threat model that comes with it (the Raft port and the data
 * directories must be as protected as the key). The library supports (c)
 * unchanged, and it is the better choice once Raft traffic crosses an
 * untrusted network:
 *
 * (c) in detail. The private key is a file (mode 0600, owned by the
 * scheduler's user, created by the deploy scripts; pd_jwt_key_load_file()
 * refuses a private key readable by group or others) on each scheduler
 * that may lead; it never enters the Raft log, a snapshot or an RPC. The
 * signing-keys table in the replicated state holds only public PEMs with
 * their status (active, verify-only, retired), so every scheduler and,
 * through the leader's push, every agent agree on which kids verify at the
 * same log index, with no skew and no leak if the table is read. Rotation:
 * put the new private key file on the schedulers, commit its public key as
 * active (the old one becomes verify-only), later commit the old kid as
 * retired. A leader whose files lack the active key's private part cannot
 * mint tokens and says so; verification keeps working. What (c) does not
 * protect against: root on a scheduler host (it reads the key file), and
 * a compromised Raft member committing its own public key (a member can
 * already write any state).
 *
 * The library does not log; functions return 0 or a negative errno, and
 * those that can fail for a reason worth telling fill err (which may be
 * NULL) with a short message.
 */
#ifndef PD_JWT_H
#define PD_JWT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/util.h"

/* Clock skew tolerated on exp, nbf and iat between cluster machines. */
#define PD_JWT_LEEWAY_S 10

/* Longest token accepted by pd_jwt_verify (ours are about 450 bytes). */
#define PD_JWT_MAX_LEN 4096

/* Lengths without the NUL: jti is 32 hex digits, kid 43 base64url chars. */
#define PD_JWT_JTI_LEN 32
#define PD_JWT_KID_LEN 43
#define PD_JWT_ISS_MAX 128

enum pd_jwt_role {
    PD_JWT_ROLE_ADMIN = 0,
    PD_JWT_ROLE_TENANT,
    PD_JWT_ROLE_NODE,
};

/* The claims of a signed or verified token; plain buffers, nothing to free. */
struct pd_jwt_claims {
    char iss[PD_JWT_ISS_MAX + 1];
    char sub[PD_ID_MAX + 1];          /* tenant, or node id for node */
    enum pd_jwt_role role;
    char jti[PD_JWT_JTI_LEN + 1];
    char sandbox[PD_ID_MAX + 1];      /* "" unless sandbox-scoped */
    char kid[PD_JWT_KID_LEN + 1];     /* the key that signed it */
    int64_t iat, nbf, exp;            /* seconds since the epoch */
};

/* What to sign; iat and nbf are now_s, exp is now_s + ttl_s. */
struct pd_jwt_spec {
    const char *sub;                  /* must satisfy pd_id_valid */
    enum pd_jwt_role role;
    const char *sandbox;              /* NULL, or the scoped sandbox id */
    int64_t now_s;                    /* wall clock, seconds */
    int64_t ttl_s;                    /* > 0 */
};

struct pd_jwt_key;
struct pd_jwt_keyset;

/* "admin", "tenant", "node"; NULL for a value outside the enum. */
const char *pd_jwt_role_name(enum pd_jwt_role role);

/* Parses a role name; -EINVAL for anything else. */
int pd_jwt_role_parse(const char *s, enum pd_jwt_role *out);

/* A short reason for a pd_jwt_verify result, for log lines. */
const char *pd_jwt_strerror(int rc);

/* --- keys ---------------------------------------------------------------- */

/* Generates a fresh EC P-256 key pair (private part included). */
int pd_jwt_key_generate(struct pd_jwt_key **out, char *err, size_t errlen);

/*
 * Reads a PEM: a private key (PKCS#8 or SEC1 "EC PRIVATE KEY") gives a key
 * that can sign, a public key ("PUBLIC KEY") one that only verifies. Any
 * other key type or curve is -EINVAL.
 */
int pd_jwt_key_from_pem(const char *pem, size_t len, struct pd_jwt_key **out,
                        char *err, size_t errlen);

/*
 * Like pd_jwt_key_from_pem on a file's content; a private key in a file
 * that group or others may read is refused with -EPERM.
 */
int pd_jwt_key_load_file(const char *path, struct pd_jwt_key **out,
                         char *err, size_t errlen);

/* The kid (RFC 7638 thumbprint), NUL-terminated, PD_JWT_KID_LEN chars. */
const char *pd_jwt_key_kid(const struct pd_jwt_key *key);

/* The public key as PEM ("-----BEGIN PUBLIC KEY-----"). */
const char *pd_jwt_key_public_pem(const struct pd_jwt_key *key);

/* The private key as unencrypted PKCS#8 PEM, or NULL for a public key. */
const char *pd_jwt_key_private_pem(const struct pd_jwt_key *key);

/* Frees a key (NULL is fine); the private PEM is wiped first. */
void pd_jwt_key_free(struct pd_jwt_key *key);

/* --- key sets ------------------------------------------------------------ */

/*
 * A key set for one issuer (the cluster name, e.g. "paddock"). A key set is
 * not thread-safe; the daemons build a new one when the signing-keys table
 * changes and swap it in.
 */
int pd_jwt_keyset_new(const char *issuer, struct pd_jwt_keyset **out);
void pd_jwt_keyset_free(struct pd_jwt_keyset *ks);

/*
 * Adds a key, which the set then owns (also on failure). -EEXIST when the
 * kid is already there, -ENOSPC beyond PD_JWT_KEYSET_MAX keys.
 */
#define PD_JWT_KEYSET_MAX 16
int pd_jwt_keyset_add(struct pd_jwt_keyset *ks, struct pd_jwt_key *key);

/*
 * Retires a key: tokens it signed stop verifying at once. If it was the
 * signer, the set has no signer until the next pd_jwt_keyset_set_signer.
 * -ENOENT when the kid is unknown.
 */
int pd_jwt_keyset_remove(struct pd_jwt_keyset *ks, const char *kid);

/* Chooses the signing key: -ENOENT if unknown, -EPERM if public only. */
int pd_jwt_keyset_set_signer(struct pd_jwt_keyset *ks, const char *kid);

/* The number of keys in the set. */
size_t pd_jwt_keyset_count(const struct pd_jwt_keyset *ks);

/*
 * Installs the revocation hook: it returns true when jti is revoked. It is
 * called only for tokens whose signature and times are valid.
 */
typedef bool (*pd_jwt_revoked_fn)(void *arg, const char *jti);
void pd_jwt_keyset_set_revoked(struct pd_jwt_keyset *ks, pd_jwt_revoked_fn fn,
                               void *arg);

/*
 * The JWKS document for /.well-known/jwks.json: {"keys": [{kty: EC,
 * crv: P-256, x, y, kid, alg: ES256, use: sig}, ...]} with every key of the
 * set (the signer and those that still verify). *out is malloc'd.
 */
int pd_jwt_keyset_jwks(const struct pd_jwt_keyset *ks, char **out);

/* --- tokens -------------------------------------------------------------- */

/*
 * Signs a token with the set's signer and a fresh jti. *out_token is
 * malloc'd; out_claims (may be NULL) receives what was signed, for the
 * tokens table. -ENOKEY when the set has no signer, -EINVAL for a bad spec.
 */
int pd_jwt_sign(const struct pd_jwt_keyset *ks, const struct pd_jwt_spec *spec,
                char **out_token, struct pd_jwt_claims *out_claims,
                char *err, size_t errlen);

/*
 * Verifies a token at time now_s (wall clock seconds) and fills out with
 * its claims (out is cleared on failure). Returns 0 or one of the codes in
 * the table at the top of this file. The role and the sandbox binding are
 * the caller's to check against the request.
 */
int pd_jwt_verify(const struct pd_jwt_keyset *ks, const char *token,
                  int64_t now_s, struct pd_jwt_claims *out);

/*
 * Strict base64url without padding (RFC 7515 section 2), exposed for the
 * tests. encode writes 4 * ceil(len / 3) + 1 bytes at most into out.
 * decode rejects '=', characters outside the alphabet, a length of 1 mod 4
 * and non-zero trailing bits; it returns the decoded length or -EINVAL
 * (-ENOSPC if out is too small).
 */
size_t pd_b64url_encode(const void *in, size_t len, char *out);
long pd_b64url_decode(const char *in, size_t len, void *out, size_t outlen);

#endif
