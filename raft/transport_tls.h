/*
 * A raft_uv transport (struct raft_uv_transport, raft/uv.h) over mutual
 * TLS, so that only a scheduler of this cluster can talk Raft to another.
 * raft_uv's own TCP transport is plaintext and unauthenticated: whoever
 * reaches a Raft port could append entries or install a snapshot.
 *
 * raft_uv reads and writes a uv_stream_t itself, so TLS cannot sit inside
 * it. Each Raft connection is pumped instead: raft gets one end of a
 * socketpair as a uv_pipe_t, and this transport relays bytes between the
 * other end and a TLS session (proto/tls.h, memory BIOs) on the real TCP
 * connection.
 *
 * Happy path, connecting side: TCP connect, TLS handshake, check that the
 * server's certificate has OU=scheduler, write the preamble (the same one
 * raft's TCP transport writes: protocol 1, our Raft id, our address), hand
 * raft its pipe. Accepting side: TLS handshake (the CA is required and the
 * client must present a certificate), OU=scheduler, read the preamble,
 * hand raft its pipe with the peer's id and address.
 *
 * Failure modes:
 *   - no certificate, one from another CA, or one without OU=scheduler
 *     (an agent's): the connection is closed and a warning names the
 *     peer's address and certificate subject;
 *   - a peer that does not finish the handshake and preamble within the
 *     handshake timeout: closed, with a warning; beyond RTLS_MAX_PENDING
 *     such connections, new ones are refused at once;
 *   - raft closes its pipe end: TLS close_notify, then the TCP connection
 *     is shut down and closed;
 *   - the peer closes or errs: raft's pipe end sees EOF;
 *   - backpressure: a direction stops reading its source while more than
 *     RTLS_HIGH_WATER bytes wait to be written to its sink, so neither
 *     a slow peer nor a slow raft grows memory without bound.
 *
 * Connect addresses must be numeric IPv4 host:port, or a name that
 * resolves quickly: names are resolved synchronously on the loop (the
 * cluster's addresses are numeric in every deployment we ship).
 */
#ifndef PD_RAFT_TRANSPORT_TLS_H
#define PD_RAFT_TRANSPORT_TLS_H

#include <openssl/ssl.h>
#include <raft.h>
#include <raft/uv.h>
#include <uv.h>

/* Bytes queued towards one sink before its source stops being read. */
#define RTLS_HIGH_WATER (1u << 20)
/* Connections in their handshake at once; more are refused, so that
 * unauthenticated peers cannot hold unbounded memory. */
#define RTLS_MAX_PENDING 64
/* Default bound on TLS handshake plus preamble, in milliseconds. */
#define RTLS_HANDSHAKE_MS 5000

/*
 * Initializes t as a TLS transport for raft_uv_init. server_ctx accepts
 * and client_ctx connects; both must verify peers against the cluster CA
 * (pd_tls_ctx_new with a CA file) and hold this scheduler's certificate.
 * They are borrowed and must outlive the transport. bind_address (may be
 * NULL: the Raft address) is where to listen. handshake_ms 0 means
 * RTLS_HANDSHAKE_MS. Returns 0 or a negative errno with a reason in err.
 */
int rtls_init(struct raft_uv_transport *t, uv_loop_t *loop,
              SSL_CTX *server_ctx, SSL_CTX *client_ctx,
              const char *bind_address, unsigned handshake_ms, char *err,
              size_t errlen);

/*
 * Releases the transport after raft_uv_close (as raft_uv_tcp_close does
 * for the TCP transport). Relays still open finish on their own and free
 * the rest when the last one closes.
 */
void rtls_close(struct raft_uv_transport *t);

#endif
