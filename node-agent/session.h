/*
 * The agent's session with the scheduler leader (msgtypes.h 300-399).
 *
 * Happy path:
 *   1. connect (TCP, then mutual TLS, then HELLO role "agent") to the next
 *      scheduler address in the configured list;
 *   2. send NODE_REGISTER with the node's capacity, labels and every
 *      sandbox it holds; the leader answers OK {heartbeat_ms};
 *   3. send NODE_HEARTBEAT every heartbeat_ms (default 1 s) with the
 *      current allocation; each is answered by OK;
 *   4. send SANDBOX_STATE whenever a sandbox changes state (answered by
 *      OK, which the agent does not wait for);
 *   5. the scheduler may send any agent RPC request (100-299) down the
 *      same connection; it is served as on the RPC port.
 *
 * Failures:
 *   - a follower answers NODE_REGISTER (or a heartbeat, after losing the
 *     leadership) with NODE_REDIRECT {leader_addr}: the agent closes and
 *     connects to that address at once; after AGENT_SESSION_MAX_REDIRECTS
 *     redirects in a row without a registration it backs off instead;
 *     a redirect with an empty leader_addr (election in progress) is a
 *     back-off;
 *   - ERROR, a closed connection, a refused or failed TLS handshake, or
 *     no answer to heartbeats for 5 intervals: close, wait (exponential
 *     back-off from 100 ms to 5 s, with jitter), try the next address;
 *   - no scheduler configured: the session is off and the agent runs
 *     alone, driven through its RPC port only.
 * A state change while disconnected is not queued: the next
 * NODE_REGISTER carries every sandbox's current state. One after
 * NODE_REGISTER was sent is reported at once, even before the OK: it
 * follows the registration on the same connection.
 */
#ifndef AGENT_SESSION_H
#define AGENT_SESSION_H

#include <openssl/ssl.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "proto/conn.h"
#include "proto/frame.h"

#define AGENT_SESSION_MAX_REDIRECTS 5

struct agent_session;

struct agent_session_cb {
    /* Adds the NODE_REGISTER fields beyond "node" (capacity, labels,
     * sandboxes, rpc_addr). */
    void (*fill_register)(void *arg, struct pd_enc *e);
    /* Adds the NODE_HEARTBEAT fields beyond "node". */
    void (*fill_heartbeat)(void *arg, struct pd_enc *e);
    /* A request from the scheduler (types 100-299) on the session. */
    void (*on_request)(void *arg, struct pd_conn *c, const struct pd_msg *m);
    /* The session's connection closed (to drop per-connection state). */
    void (*on_conn_closed)(void *arg, struct pd_conn *c);
};

struct agent_session_cfg {
    const char *node;      /* node id */
    const char *addrs;     /* "host:port,host:port"; NULL/"" for none */
    SSL_CTX *tls;          /* client context (agent_tls_ctx) */
    uint64_t heartbeat_ms; /* used until the leader names its own */
    uint64_t backoff_min_ms;
    uint64_t backoff_max_ms;
};

/*
 * Starts the session (connecting in the background). With no address,
 * returns 0 and sets *out to NULL. -EINVAL with a reason in err for an
 * address that does not parse.
 */
int agent_session_start(uv_loop_t *loop, const struct agent_session_cfg *cfg,
                        const struct agent_session_cb *cb, void *arg,
                        struct agent_session **out, char *err,
                        size_t errlen);

/* Reports a sandbox state change to the leader when connected. */
void agent_session_report(struct agent_session *s, const char *sandbox,
                          const char *state, const char *reason);

/* True when registered with a leader. */
bool agent_session_registered(const struct agent_session *s);

/* The address of the scheduler currently connected, or "". */
const char *agent_session_peer(const struct agent_session *s);

/* Stops and frees the session; safe with NULL. */
void agent_session_stop(struct agent_session *s);

/* Parses "1.2.3.4:80", "[::1]:80" or "localhost:80". */
int agent_parse_addr(const char *s, struct sockaddr_storage *out);

#endif
