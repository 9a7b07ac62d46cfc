/*
 * paddock-scheduler internals: the daemon's configuration, its one global
 * object, and the interfaces between the files of scheduler/.
 *
 *   main.c       configuration, start-up, signals, shutdown
 *   cluster.c    the Raft member: bootstrap, own MEMBER_SET on leadership,
 *                membership API, leadership transfer before shutdown
 *   api.c        the HTTP API listener: auth, the route table of every
 *                module, sandboxes CRUD, nodes, cluster, health, metrics
 *   forward.c    writes on a follower go to the leader (PD_MSG_FORWARD)
 *   nodes.c      the RPC listener: agent sessions (register, heartbeat,
 *                state reports), failure detection, redirects; hands
 *                scheduler peers (forwarding) to forward.c
 *   lifecycle.c  create (placement, PLACE, assignment), destroy, re-place
 *                of lost sandboxes, drain
 *   agentc.c     client pool to the agents' RPC ports (mutual TLS),
 *                multiplexed requests and streams with flow control
 *   io.c         exec, processes, files routed to the owning agent
 *   auth.c       bearer tokens: keys, bootstrap admin token, verification,
 *                roles and tenants, rate limits
 *   tokens.c     the token API, JWKS, revocation push to agents
 *   ports.c      expose/unexpose, preview tokens (preview_token.c)
 *   preview.c    the preview listener: Host routing, HTTP and WebSocket
 *   metrics.c    counters and histograms for /metrics
 *
 * Everything runs on one libuv loop; no locks.
 *
 * Conventions shared by every handler:
 *   - A route handler gets a struct sched_call as its arg. It is valid
 *     only during the handler's call: copy what is needed later.
 *   - Errors use pd_http_respond_error with DESIGN.md section 3's shape;
 *     codes: invalid_argument, unauthorized, forbidden, not_found,
 *     conflict, no_capacity, unavailable, rate_limited, internal.
 *   - A tenant asking for another tenant's sandbox gets the same 404 as
 *     for a sandbox that does not exist (sched_sandbox_lookup does it).
 */
#ifndef SCHED_H
#define SCHED_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include <openssl/ssl.h>

#include "common/util.h"
#include "proto/http.h"
#include "raft/fsm.h"
#include "raft/node.h"
#include "scheduler/placement.h"

struct sched_nodes;
struct sched_agentc;
struct sched_auth;
struct sched_forward;
struct sched_metrics;
struct sched_preview;
struct sched_lifecycle;

struct sched_cfg {
    char *data_dir;          /* Raft log, certs copy, admin.token */
    uint64_t id;             /* Raft id, non-zero */
    char *raft_addr;         /* host:port for Raft */
    char *api_listen;        /* host:port of the HTTP API */
    char *rpc_listen;        /* host:port for agents and schedulers */
    char *preview_listen;    /* host:port of the preview listener */
    char *preview_domain;    /* "preview.localhost" */
    /* Bootstrap: "1=127.0.0.1:7001,2=127.0.0.1:7002,..." (Raft ids and
     * addresses, this member included). Empty: join an existing cluster
     * (wait to be added). */
    char *bootstrap;
    char *tls_cert, *tls_key, *tls_ca; /* cluster mTLS (make-certs.sh) */
    char *api_tls_cert, *api_tls_key;  /* optional HTTPS on API/preview */
    bool raft_tls;           /* Raft over the cluster mTLS; default on */
    /* Agents must present a join token (role node, subject = their node
     * id) when they register, beside their certificate; default off. */
    bool require_join_token;
    char *strategy;          /* binpack | spread */
    char *log_level;
    uint64_t heartbeat_ms;   /* agents' heartbeat interval; 1 s */
    uint64_t grace_ms;       /* silent node -> down; 5 s */
    uint64_t election_timeout_ms; /* 1 s */
    uint64_t exec_timeout_ms;     /* default exec timeout */
    uint64_t rate_per_s, rate_burst; /* per-token API rate limit */
    uint64_t snapshot_threshold;
};

struct sched {
    uv_loop_t *loop;
    struct sched_cfg cfg;
    enum sched_strategy strategy;

    struct fsm *fsm;
    struct raftnode *raft;

    struct pd_http_server *api;
    struct pd_http_server *preview_srv;
    SSL_CTX *rpc_server_tls; /* RPC listener: agents and schedulers */
    SSL_CTX *rpc_client_tls; /* to agents' RPC ports and the leader */
    SSL_CTX *api_tls;        /* optional, API and preview listeners */

    struct sched_nodes *nodes;
    struct sched_agentc *agentc;
    struct sched_auth *auth;
    struct sched_forward *fwd;
    struct sched_metrics *metrics;
    struct sched_preview *preview;
    struct sched_lifecycle *lifecycle; /* added by nodes: lifecycle.c */

    bool stopping;
};

/* The daemon's one instance (main.c). */
extern struct sched *sched_global;

/* ---- Who is calling (auth.c) ------------------------------------------ */

enum sched_role {
    SCHED_ROLE_ADMIN = 0,
    SCHED_ROLE_TENANT,
    SCHED_ROLE_NODE,
};

struct sched_principal {
    enum sched_role role;
    char tenant[PD_ID_MAX + 1]; /* the token's subject */
    char jti[64];
    char sandbox[PD_ID_MAX + 1]; /* "" unless sandbox-scoped */
};

/* What every route handler gets as its arg (valid during the call). */
struct sched_call {
    struct sched *s;
    struct sched_principal who;
};

int sched_auth_init(struct sched *s, char *err, size_t errlen);
void sched_auth_close(struct sched *s);
/*
 * Called when this member becomes the leader: makes sure a signing key and
 * the bootstrap admin token exist (proposing KEY_ADD and BOOTSTRAP_ADMIN
 * once per cluster) and writes the admin token to <data_dir>/admin.token
 * (mode 0600) on the member that minted it.
 */
void sched_auth_on_leader(struct sched *s);
/*
 * Authenticates r (Authorization: Bearer). Returns 0 with *out filled, or
 * a negative errno after it has answered r itself (401, or 429 with
 * Retry-After).
 */
int sched_auth_request(struct sched *s, struct pd_http_req *r,
                       struct sched_principal *out);
/* True when the principal may act on a sandbox of this tenant. */
bool sched_auth_owns(const struct sched_principal *p, const char *tenant);

/* ---- The API (api.c) --------------------------------------------------- */

int sched_api_init(struct sched *s, char *err, size_t errlen);
void sched_api_close(struct sched *s);

/*
 * Looks up a sandbox visible to the caller. Returns 0 with *out filled
 * (fsm_sandbox_clear it), or a negative errno after answering r (404 for
 * an unknown sandbox or another tenant's, 400 for an invalid id).
 */
int sched_sandbox_lookup(struct sched_call *c, struct pd_http_req *r,
                         const char *id, struct fsm_sandbox *out);

/* Route tables that api.c concatenates, in this order, after its own. */
extern const struct pd_http_route sched_io_routes[];
extern const size_t sched_io_nroutes;
extern const struct pd_http_route sched_token_routes[];
extern const size_t sched_token_nroutes;
extern const struct pd_http_route sched_port_routes[];
extern const size_t sched_port_nroutes;

/* ---- Forwarding to the leader (forward.c) ------------------------------ */

int sched_forward_init(struct sched *s, char *err, size_t errlen);
void sched_forward_close(struct sched *s);
/*
 * For a write handler: when this member is not the leader, sends the whole
 * request (method, target, headers, body up to 1 MiB) to the leader as
 * PD_MSG_FORWARD over the RPC link, answers r with the leader's response,
 * and returns true. Returns false on the leader (the handler goes on). With
 * no known leader it answers 503 "unavailable" and returns true.
 */
bool sched_forward_if_follower(struct sched_call *c, struct pd_http_req *r);
/* A FORWARD frame from another scheduler (nodes.c hands it over). */
struct pd_conn;
struct pd_msg;
void sched_forward_serve(struct sched *s, struct pd_conn *c,
                         const struct pd_msg *m);
/* The leader's API / RPC address from the members table, or NULL. */
const char *sched_leader_api_addr(struct sched *s);
const char *sched_leader_rpc_addr(struct sched *s);
/*
 * Added by core: nodes.c calls this when a connection from another
 * scheduler closes, so that forward.c drops the replies it still owes on
 * it instead of writing to a freed connection.
 */
void sched_forward_conn_closed(struct sched *s, struct pd_conn *c);
/*
 * Added by core: a request of this scheduler's own to the leader, e.g. a
 * follower recording its addresses (PUT /v1/cluster/members/{id}). It
 * carries SCHED_INTERNAL_HEADER, which the API trusts on injected
 * (forwarded) requests only and which forwarding strips from clients'.
 * done gets the HTTP status (5xx when the leader could not be reached).
 */
#define SCHED_INTERNAL_HEADER "X-Paddock-Internal"
/*
 * Added by core: set on a forwarded request that is a resend after the
 * link or the leader was lost, so its first attempt may have been applied.
 * Handlers whose retry is not naturally idempotent can tell (DELETE of a
 * sandbox that is gone answers 200). Trusted on injected requests only;
 * forwarding strips every X-Paddock-* header from clients' requests.
 */
#define SCHED_RETRY_HEADER "X-Paddock-Retry"
int sched_forward_internal(struct sched *s, const char *method,
                           const char *target, const char *body,
                           void (*done)(void *data, int status),
                           void *data);

/* ---- The Raft member (cluster.c; added by core) ------------------------ */

/* Checks the bootstrap list (for --check-config). */
int sched_cluster_check(const struct sched_cfg *cfg, char *err,
                        size_t errlen);
/* Creates and starts the raftnode (bootstrap list or join mode). */
int sched_cluster_init(struct sched *s, char *err, size_t errlen);
/* Hands leadership over when leading (bounded by the election timeout),
 * then calls done. */
void sched_cluster_handover(struct sched *s, void (*done)(void *data),
                            void *data);
/* Closes Raft; done runs once it is released (s->raft is NULL then). */
void sched_cluster_close(struct sched *s, void (*done)(void *data),
                         void *data);
/* GET /v1/cluster, POST/DELETE /v1/cluster/members (api.c mounts them). */
extern const struct pd_http_route sched_cluster_routes[];
extern const size_t sched_cluster_nroutes;

/* ---- Agent sessions and failure detection (nodes.c) -------------------- */

int sched_nodes_init(struct sched *s, char *err, size_t errlen);
void sched_nodes_close(struct sched *s);
/* Leadership changed: start or stop the failure detector. */
void sched_nodes_on_state(struct sched *s, bool leader);
/* Sends a frame to every connected agent session (revocation push).
 * (nodes:) the call finishes and releases e, whatever happens. */
struct pd_enc;
void sched_nodes_broadcast(struct sched *s, struct pd_enc *e);
/*
 * Added by tokens (tokens.c): sends TOKEN_REVOKE {jti, exp} for every
 * revoked token that has not expired on a session that just registered,
 * so an agent that was away during a revocation (or restarted) knows the
 * whole set; nodes.c calls it after the registration's OK.
 */
void sched_tokens_push_revoked(struct sched *s, struct pd_conn *c);
/*
 * Added by nodes. True when the node has a registered session with this
 * member (the leader) and was heard from within the grace period.
 */
bool sched_nodes_alive(struct sched *s, const char *node);

/* ---- Sandbox life cycle, leader side (lifecycle.c) --------------------- */

struct sched_create_req {
    char id[PD_ID_MAX + 1];
    char tenant[PD_ID_MAX + 1];
    struct fsm_spec spec;     /* owned by the caller during the call */
    struct fsm_kv *constraints;
    size_t n_constraints;
    bool wait;                /* until running (or failed) */
    uint64_t wait_ms;
};

/* Outcome of a create, destroy or ensure. code 0 or a negative errno with
 * a user-facing message; sb is the sandbox's row after the operation. */
typedef void (*sched_sandbox_cb)(void *data, int code, const char *message,
                                 const struct fsm_sandbox *sb);

/*
 * Leader only: place, commit, assign to the agent, optionally wait.
 *
 * (Added by nodes, the contract of create and destroy.) They return 0
 * when cb will run (once, possibly before they return), or
 * RAFTNODE_ENOTLEADER / -ENOMEM, and then cb never runs. Codes given to
 * cb, with the HTTP answer they call for:
 *   0            sb is the row: created (or existing, same id and spec),
 *                running if waited for; a sandbox the agent failed to
 *                start is code 0 with sb->state failed and sb->reason
 *                (the CLI prints the reason); a wait that outlives
 *                wait_ms answers with the current state (starting).
 *   -EINVAL      400 invalid_argument (bad id, zero resources, egress).
 *   -EEXIST      409 conflict (the id exists with another spec or tenant).
 *   -ENOSPC      409 no_capacity (api.c's choice): nothing fits; the
 *                message says why per resource. A conflict with the
 *                cluster's current capacity, not an outage (503 would
 *                make clients retry blindly); the distinct code tells it
 *                from an id conflict.
 *   -EAGAIN      503 unavailable: leadership changed mid-create (outcome
 *                unknown); retrying the same create is safe (idempotent).
 *   -ENOENT      404 not_found (destroy of an unknown sandbox).
 *   other        500 internal.
 */
int sched_sandbox_create(struct sched *s, const struct sched_create_req *req,
                         sched_sandbox_cb cb, void *data);
/* Leader only: stop on the agent, unexpose ports, delete the row. */
int sched_sandbox_destroy(struct sched *s, const char *id,
                          sched_sandbox_cb cb, void *data);
/*
 * Any member: makes sure the sandbox runs before traffic is routed to it.
 * A running sandbox calls cb at once; a lost (or failed by node loss) one
 * is placed again with a fresh disk (on a follower, by asking the leader)
 * and cb runs when it runs again, with *replaced set.
 */
typedef void (*sched_ensure_cb)(void *data, int code, const char *message,
                                const struct fsm_sandbox *sb, bool replaced);
void sched_sandbox_ensure(struct sched *s, const char *id,
                          sched_ensure_cb cb, void *data);
/*
 * Added by nodes: ensure's codes (cb may run before ensure returns):
 * 0 (sb running), -ENOENT (404), -ENOSPC (no_capacity, re-placement
 * fits nowhere), -EAGAIN / -ETIMEDOUT (503 unavailable: no leader, or
 * not running within SCHED_ENSURE_WAIT_MS), -ENOTCONN (409 conflict:
 * stopping or stopped), -EIO (409 conflict: failed, sb->reason says why).
 */
#define SCHED_ENSURE_WAIT_MS 120000

/*
 * Added by nodes: between nodes.c and lifecycle.c. sched_nodes_init calls
 * sched_lifecycle_init, sched_nodes_close sched_lifecycle_close. A
 * follower's ensure asks the leader with PD_MSG_SANDBOX_ENSURE over the
 * RPC link; nodes.c hands such frames (and the close of their
 * connection) to lifecycle.c.
 */
int sched_lifecycle_init(struct sched *s, char *err, size_t errlen);
void sched_lifecycle_close(struct sched *s);
void sched_lifecycle_serve(struct sched *s, struct pd_conn *c,
                           const struct pd_msg *m);
void sched_lifecycle_conn_closed(struct sched *s, struct pd_conn *c);
/* True while a create, destroy or re-placement of the sandbox runs here:
 * reconciliation with an agent's list leaves such a sandbox alone. */
bool sched_lifecycle_busy(struct sched *s, const char *id);

/* ---- Agent RPC client (agentc.c) --------------------------------------- */

/*
 * "1.2.3.4:80", "[::1]:80" or "localhost:80" into a socket address (for
 * listening, connecting to agents and to the leader). Port 0 only with
 * port0 (listen on any port). 0 or -EINVAL.
 */
struct sockaddr_storage;
int sched_parse_addr(const char *text, bool port0,
                     struct sockaddr_storage *sa);

struct sched_areq;

struct sched_areq_cb {
    /* A frame of the reply stream: EXEC_START, STDOUT, STDERR, DATA. The
     * client grants WINDOW credit back once this returns, unless the
     * request is in manual-window mode. */
    void (*on_frame)(struct sched_areq *q, const struct pd_msg *m,
                     void *data);
    /* The final frame: OK, EXIT (m set, status 0), or ERROR (status
     * the errno it carried, m set), or a broken link (status < 0, m
     * NULL). The request is freed after this returns.
     * (agentc.c: ERROR gives the negated errno, -ENOENT; a FILE_READ
     * ends at the agent's DATA {eof}, which on_frame sees first; a
     * TUNNEL_OPEN ends once DATA {eof} went both ways.) */
    void (*on_end)(struct sched_areq *q, int status, const struct pd_msg *m,
                   void *data);
    /* Optional, added by agentc.c: more send credit arrived (the agent's
     * WINDOW) or the connection's queue drained below its low water
     * mark; an uploader sends more (see sched_areq_credit). */
    void (*on_writable)(struct sched_areq *q, void *data);
};

int sched_agentc_init(struct sched *s, char *err, size_t errlen);
void sched_agentc_close(struct sched *s);
/*
 * Sends a request to the agent at rpc_addr (connecting if needed; one
 * connection per agent is shared by every request). e holds the request
 * being built (pd_enc_begin with any id: the client sets a fresh one).
 * Returns the request, or NULL with cb->on_end already called.
 */
struct sched_areq *sched_agentc_send(struct sched *s, const char *rpc_addr,
                                     struct pd_enc *e,
                                     const struct sched_areq_cb *cb,
                                     void *data);
/* A follow-up frame under the request's id (DATA, STDIN, WINDOW). */
int sched_areq_send(struct sched_areq *q, struct pd_enc *e);
/* Ends the request early (CANCEL); on_end is not called after this. */
void sched_areq_cancel(struct sched_areq *q);
/* Take over WINDOW grants (for proxies with their own backpressure). */
void sched_areq_manual_window(struct sched_areq *q);
void sched_areq_grant(struct sched_areq *q, size_t bytes);
uint64_t sched_areq_id(const struct sched_areq *q);
/* Bytes queued on the request's connection (upload backpressure). */
size_t sched_areq_queued(const struct sched_areq *q);
/* Added by agentc.c: DATA/STDIN payload bytes the agent accepts now
 * (PD_STREAM_WINDOW at first, spent by sched_areq_send, restored by the
 * agent's WINDOW grants). An uploader sends while this is above zero
 * and sched_areq_queued is below PD_CONN_HIGH_WATER. */
uint64_t sched_areq_credit(const struct sched_areq *q);

/* ---- Metrics (metrics.c) ----------------------------------------------- */

int sched_metrics_init(struct sched *s);
void sched_metrics_close(struct sched *s);
/* One API request finished: route name, status, duration. */
void sched_metrics_api(struct sched *s, const char *route, int status,
                       uint64_t duration_us);
void sched_metrics_inc(struct sched *s, const char *counter, uint64_t n);
/* The Prometheus text; malloc'd. */
char *sched_metrics_render(struct sched *s);

/* ---- Preview (preview.c) ----------------------------------------------- */

int sched_preview_init(struct sched *s, char *err, size_t errlen);
void sched_preview_close(struct sched *s);

#endif
