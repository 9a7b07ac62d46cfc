/*
 * A framed connection on a libuv stream: decoder, write queue with
 * backpressure, optional TLS, and the HELLO exchange.
 *
 * Used by the node agent (guest link, scheduler RPC, leader session) and
 * the scheduler (agent sessions, RPC client, forwarding).
 *
 * Life cycle: pd_conn_new takes an initialised, connected uv stream (TCP or
 * pipe) and owns it from then on. The connection sends HELLO at once and
 * checks the peer's HELLO: another protocol version closes it. on_msg sees
 * every frame after a valid HELLO (HELLO included, so the owner learns the
 * peer's role and name). on_close is called exactly once, after which the
 * owner must not touch the connection; memory is released after the
 * handles close.
 *
 * Backpressure: pd_conn_send queues without limit, but pd_conn_queued tells
 * how many bytes wait; owners producing bulk data stop above
 * PD_CONN_HIGH_WATER and continue from on_drain, which fires when the queue
 * falls below PD_CONN_LOW_WATER.
 */
#ifndef PD_CONN_H
#define PD_CONN_H

#include <openssl/ssl.h>
#include <stdbool.h>
#include <stddef.h>
#include <uv.h>

#include "proto/frame.h"

#define PD_CONN_HIGH_WATER (8u << 20)
#define PD_CONN_LOW_WATER  (2u << 20)

struct pd_conn;

struct pd_conn_cb {
    void (*on_msg)(struct pd_conn *c, const struct pd_msg *m);
    /* reason: 0 for a clean end, else a negative errno; see pd_conn_error */
    void (*on_close)(struct pd_conn *c, int reason);
    void (*on_drain)(struct pd_conn *c); /* optional */
};

struct pd_conn_opts {
    const char *role;  /* sent in HELLO: "agent", "scheduler", "guest" */
    const char *name;  /* sent in HELLO: node or scheduler id */
    SSL_CTX *tls;      /* NULL for plaintext */
    bool tls_server;
    size_t max_frame;  /* 0 for PD_FRAME_MAX */
    const char *subject; /* log subject, e.g. "node n1" (copied) */
};

/* Takes ownership of stream (must be heap-allocated by the caller; it is
 * freed with the connection). Returns NULL only on allocation failure, in
 * which case the stream is closed and freed. */
struct pd_conn *pd_conn_new(uv_stream_t *stream, const struct pd_conn_opts *o,
                            const struct pd_conn_cb *cb, void *data);

/* Finishes the encoder and queues the frame. -ENOTCONN once closing. */
int pd_conn_send(struct pd_conn *c, struct pd_enc *e);

/* Queues an already encoded frame; takes ownership of buf. */
int pd_conn_send_frame(struct pd_conn *c, void *buf, size_t len);

/* Sends ERROR {code, errno, message} under id. */
int pd_conn_send_error(struct pd_conn *c, uint64_t id, int errnum,
                       const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

size_t pd_conn_queued(const struct pd_conn *c);

/* Stops and restarts reading from the peer (receive-side backpressure). */
void pd_conn_pause(struct pd_conn *c);
void pd_conn_resume(struct pd_conn *c);

/*
 * Closes the connection: pending writes are flushed when reason is 0,
 * dropped otherwise. The reason is logged at debug level and kept for
 * pd_conn_error. Safe to call more than once and from callbacks.
 */
void pd_conn_close(struct pd_conn *c, int reason, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

void *pd_conn_data(const struct pd_conn *c);
void pd_conn_set_data(struct pd_conn *c, void *data);
const char *pd_conn_error(const struct pd_conn *c);
bool pd_conn_closing(const struct pd_conn *c);
/* Peer's HELLO: role and name (empty until received). */
const char *pd_conn_peer_role(const struct pd_conn *c);
const char *pd_conn_peer_name(const struct pd_conn *c);
/* The peer certificate's CN on a TLS connection; -ENOENT otherwise. */
int pd_conn_peer_cn(const struct pd_conn *c, char *buf, size_t buflen);
/* True when the peer certificate carries OU=ou; false without TLS. */
bool pd_conn_peer_has_ou(const struct pd_conn *c, const char *ou);

/* Allocates a request id unique on this connection (never 0). */
uint64_t pd_conn_next_id(struct pd_conn *c);

#endif
