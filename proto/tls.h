/*
 * TLS over any byte stream with OpenSSL memory BIOs, for libuv streams.
 *
 * The owner moves bytes: ciphertext read from the socket goes into
 * pd_tls_feed; plaintext comes out through the on_plain callback;
 * ciphertext to send comes out through on_cipher. pd_tls_write encrypts
 * application data. Nothing here touches a socket or blocks.
 *
 * Contexts: pd_tls_ctx_new builds a server or client context from PEM
 * files. With a CA file, the peer must present a certificate signed by it
 * (mutual TLS between schedulers and agents); without one, a server does
 * not ask for client certificates (public API and preview listeners).
 */
#ifndef PD_TLS_H
#define PD_TLS_H

#include <openssl/ssl.h>
#include <stdbool.h>
#include <stddef.h>

struct pd_tls;

struct pd_tls_cb {
    /* Decrypted application bytes. */
    void (*on_plain)(void *arg, const void *data, size_t len);
    /* Encrypted bytes to write to the socket; copy them, they are reused. */
    void (*on_cipher)(void *arg, const void *data, size_t len);
    /* The handshake finished. Optional. */
    void (*on_ready)(void *arg);
};

/*
 * Creates a context. cert and key are PEM paths (required for a server,
 * optional for a client); ca is a PEM path whose certificates the peer
 * must chain to, or NULL for no peer verification (clients then still need
 * it to verify servers, so a client without ca verifies nothing: only for
 * tests). Returns NULL with a reason in err.
 */
SSL_CTX *pd_tls_ctx_new(bool server, const char *cert, const char *key,
                        const char *ca, char *err, size_t errlen);

struct pd_tls *pd_tls_new(SSL_CTX *ctx, bool server,
                          const struct pd_tls_cb *cb, void *arg);
void pd_tls_free(struct pd_tls *t);

/* Starts the handshake (clients). */
int pd_tls_start(struct pd_tls *t);

/* Feeds ciphertext. Returns 0 or a negative errno (reason in err). */
int pd_tls_feed(struct pd_tls *t, const void *data, size_t len);

/* Encrypts plaintext; queued until the handshake is done. */
int pd_tls_write(struct pd_tls *t, const void *data, size_t len);

/* Sends close_notify. */
void pd_tls_shutdown(struct pd_tls *t);

bool pd_tls_ready(const struct pd_tls *t);
const char *pd_tls_error(const struct pd_tls *t);

/* The peer certificate's common name into buf; -ENOENT without one. */
int pd_tls_peer_cn(const struct pd_tls *t, char *buf, size_t buflen);

/* True when the peer certificate's subject has an OU equal to ou (the
 * scheduler's RPC listener takes OU=agent and OU=scheduler peers and must
 * tell which one it talks to). */
bool pd_tls_peer_has_ou(const struct pd_tls *t, const char *ou);

#endif
