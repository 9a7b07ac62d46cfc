/*
 * What auth.c offers the other token files (tokens.c, ports.c) beyond
 * sched.h: the current key set and minting on the leader. Owned by tokens.
 */
#ifndef SCHED_AUTH_H
#define SCHED_AUTH_H

#include <stdbool.h>
#include <stdint.h>

#include "proto/jwt.h"
#include "scheduler/sched.h"

/* The cluster's token issuer ("iss"). */
#define SCHED_AUTH_ISSUER "paddock"

/* Longest ttl a minted token may ask for: one year. */
#define SCHED_AUTH_TTL_MAX_S (366LL * 24 * 3600)

/* ttl of the bootstrap admin token (it can be revoked like any other). */
#define SCHED_AUTH_ADMIN_TTL_S (365LL * 24 * 3600)

/*
 * The key set built from the FSM's signing-keys table, rebuilt first if
 * the table changed since the last call. NULL before the first key is
 * committed. Valid until the next call (do not keep it across callbacks).
 */
struct pd_jwt_keyset *sched_auth_keyset(struct sched *s);

/*
 * Mints a token on the leader: signs it with the active key, then commits
 * TOKEN_CREATE (a token the tokens table does not know is refused
 * everywhere). cb gets status 0 with the token (malloc'd, the callee's:
 * copy it) and its claims, or a negative errno with a message. Returns 0
 * (cb will run) or a negative errno with the reason in err (cb will not).
 */
typedef void (*sched_mint_cb)(void *data, int status, const char *msg,
                              const char *token,
                              const struct pd_jwt_claims *claims);
int sched_auth_mint(struct sched *s, const char *sub, enum pd_jwt_role role,
                    const char *sandbox, int64_t ttl_s, sched_mint_cb cb,
                    void *data, char *err, size_t errlen);

/*
 * Leader: makes the followers apply what was just committed now rather
 * than at the next heartbeat. Raft tells followers the commit index only
 * in its next AppendEntries, sent at the heartbeat (100 ms) when nothing
 * else is appended; a barrier appends an entry at once. Used after a
 * revocation, a new token and a port change, so that every scheduler
 * agrees within a round trip.
 */
void sched_auth_nudge(struct sched *s);

/* ttl of a sandbox-scoped token: minutes, it lives inside an untrusted VM. */
#define SCHED_AUTH_SANDBOX_TTL_S (30LL * 60)

/*
 * Leader: a sandbox-scoped token for the sandbox's environment
 * (PADDOCK_TOKEN), signed now and recorded with TOKEN_CREATE in the
 * background, so that DELETE /v1/tokens/{jti} can revoke it. Only the
 * agent's egress proxy accepts it (the API refuses scoped tokens), and the
 * agent checks it against the token it was handed over mutual TLS with
 * the sandbox, so nothing waits for the commit. malloc'd, or NULL (no key
 * yet, a bad id) with the reason logged.
 */
char *sched_auth_sandbox_token(struct sched *s, const char *tenant,
                               const char *sandbox);

/*
 * Like pd_http_read_json, but a body that is refused (answered 400, 413,
 * 408 there) also calls fail(arg), so the handler's state is freed.
 * Returns 0, or a negative errno when the body cannot be read at all
 * (nothing answered, neither callback runs).
 */
int sched_read_json(struct pd_http_req *r, size_t max,
                    const struct pd_json_field *fields, size_t n,
                    pd_http_json_cb cb, void (*fail)(void *arg), void *arg);

/*
 * Checks an agent's join token (role node, sub the node id, the usual
 * signature, time and revocation checks) for nodes.c's registration.
 * 0, or a negative errno with a reason for the agent in why. Mint one with
 * POST /v1/tokens {"tenant": NODE_ID, "role": "node"}.
 */
int sched_auth_node_token(struct sched *s, const char *token,
                          const char *node, char *why, size_t whylen);

/* Maps a principal's role to its name ("admin", "tenant", "node"). */
const char *sched_role_name(enum sched_role role);

/* Answers r with a JSON error for a negative errno from a proposal (503
 * for a lost leadership, 409, 404, 400, 500) and the message. */
void sched_auth_respond_errno(struct pd_http_req *r, int status,
                              const char *msg);

/* tokens.c's periodic TOKEN_GC on the leader (auth init/close call
 * them). PADDOCK_TOKEN_GC_MS overrides the period (tests). */
int sched_tokens_init(struct sched *s);
void sched_tokens_close(struct sched *s);

#endif
