/*
 * The egress proxy for sandboxes with the "allow" policy: an HTTP proxy
 * inside the agent that speaks CONNECT (for TLS) and plain HTTP with
 * absolute URIs, and lets a sandbox reach only the hosts on its list.
 *
 * Such a sandbox's slirp network has restrict=on, so the proxy is its only
 * way out: the guest reaches it at 10.0.2.100:3128 through a slirp
 * guestfwd whose chardev is a unix socket the agent listens on, one per
 * sandbox (so the proxy knows which sandbox speaks without trusting
 * anything the guest says). A guestfwd chardev is one byte stream for
 * all the guest's connections to that address and carries no connection
 * boundaries, so such a "persistent" client is served one request after
 * another: after each upstream exchange ends, the proxy reads the next
 * request head from the same stream. Guests should use one connection at
 * a time (busybox wget does).
 *
 * Allow-list entries: "host" (ports 80 and 443), "host:port", or
 * "*.domain" (any subdomain, ports 80 and 443). Matching is on the name
 * the guest asked for, case-insensitive; the proxy resolves it itself.
 *
 * Requests pass through with their Proxy-* headers removed and
 * "Connection: close" forced; this is where the Tokens issue will inject
 * credentials the sandbox never sees.
 */
#ifndef AGENT_EGRESS_H
#define AGENT_EGRESS_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

/* Where the guest finds the proxy (slirp guestfwd address). */
#define AGENT_EGRESS_GUEST_ADDR "10.0.2.100"
#define AGENT_EGRESS_GUEST_PORT 3128

struct agent_egress_listener;

/* True when host:port is allowed by the comma-separated list. */
bool agent_egress_allowed(const char *allow, const char *host,
                          unsigned port);

/*
 * Serves one accepted client stream (taking ownership) for a sandbox.
 * allow is copied. persistent: see above.
 */
int agent_egress_serve(uv_loop_t *loop, uv_stream_t *client,
                       const char *sandbox, const char *allow,
                       bool persistent);

/* Listens on a unix socket path for a sandbox (mode 0600, owner uid). */
int agent_egress_listen_unix(uv_loop_t *loop, const char *path,
                             const char *sandbox, const char *allow,
                             int owner_uid, int owner_gid,
                             struct agent_egress_listener **out);

/* Listens on a loopback TCP port for a sandbox (tests and host tools);
 * port 0 picks one, written to *port. */
int agent_egress_listen_tcp(uv_loop_t *loop, const char *sandbox,
                            const char *allow, unsigned *port,
                            struct agent_egress_listener **out);

/* Stops listening. Connections in flight finish on their own, except the
 * persistent stream of a unix listener (QEMU's chardev), which is closed:
 * it would never end by itself. */
void agent_egress_unlisten(struct agent_egress_listener *l);

/* Connections and requests served so far, for AGENT_INFO and tests. */
uint64_t agent_egress_requests(void);
uint64_t agent_egress_denied(void);

/*
 * Sandbox tokens (added by tokens; see egress.c): the token handed over in
 * SANDBOX_CREATE's environment (PADDOCK_TOKEN), NULL to forget it; a
 * revoked jti with its exp (seconds); requests refused for a bad token.
 */
int agent_egress_set_token(const char *sandbox, const char *token);
int agent_egress_revoke(const char *jti, uint64_t exp_s);
uint64_t agent_egress_token_refused(void);

#endif
