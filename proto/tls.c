#include "proto/tls.h"

#include <errno.h>
#include <openssl/err.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/*
 * Peers inside the cluster are identified by a certificate chaining to the
 * cluster CA; host names are not checked (addresses are loopback or
 * private, and the CA issues only cluster certificates). The CN names the
 * member ("agent-n1", "scheduler-1") and is available to the owner.
 */

struct pd_tls {
    SSL *ssl;
    BIO *rbio; /* ciphertext from the peer */
    BIO *wbio; /* ciphertext to the peer */
    struct pd_tls_cb cb;
    void *arg;
    bool server;
    bool ready;
    unsigned char *pending; /* plaintext written before the handshake */
    size_t npending;
    char err[256];
};

static void
set_ssl_err(char *buf, size_t len, const char *what)
{
    unsigned long e = ERR_get_error();
    char detail[200] = "unknown error";

    if (e != 0)
        ERR_error_string_n(e, detail, sizeof(detail));
    snprintf(buf, len, "%s: %s", what, detail);
    ERR_clear_error();
}

SSL_CTX *
pd_tls_ctx_new(bool server, const char *cert, const char *key,
               const char *ca, char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method()
                                      : TLS_client_method());

    if (ctx == NULL) {
        set_ssl_err(err, errlen, "SSL_CTX_new");
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
                              SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (cert != NULL &&
        SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
        set_ssl_err(err, errlen, cert);
        goto fail;
    }
    if (key != NULL &&
        SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
        set_ssl_err(err, errlen, key);
        goto fail;
    }
    if (cert != NULL && key != NULL && SSL_CTX_check_private_key(ctx) != 1) {
        set_ssl_err(err, errlen, "certificate and key do not match");
        goto fail;
    }
    if (server && (cert == NULL || key == NULL)) {
        snprintf(err, errlen, "a TLS server needs a certificate and a key");
        goto fail;
    }
    if (ca != NULL) {
        if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) {
            set_ssl_err(err, errlen, ca);
            goto fail;
        }
        SSL_CTX_set_verify(ctx,
                           SSL_VERIFY_PEER |
                               (server ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0),
                           NULL);
    } else {
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    }
    return ctx;
fail:
    SSL_CTX_free(ctx);
    return NULL;
}

struct pd_tls *
pd_tls_new(SSL_CTX *ctx, bool server, const struct pd_tls_cb *cb, void *arg)
{
    struct pd_tls *t = calloc(1, sizeof(*t));

    if (t == NULL)
        return NULL;
    t->ssl = SSL_new(ctx);
    t->rbio = BIO_new(BIO_s_mem());
    t->wbio = BIO_new(BIO_s_mem());
    if (t->ssl == NULL || t->rbio == NULL || t->wbio == NULL) {
        SSL_free(t->ssl);
        BIO_free(t->rbio);
        BIO_free(t->wbio);
        free(t);
        return NULL;
    }
    SSL_set_bio(t->ssl, t->rbio, t->wbio);
    if (server)
        SSL_set_accept_state(t->ssl);
    else
        SSL_set_connect_state(t->ssl);
    t->server = server;
    t->cb = *cb;
    t->arg = arg;
    return t;
}

void
pd_tls_free(struct pd_tls *t)
{
    if (t == NULL)
        return;
    SSL_free(t->ssl); /* frees both BIOs */
    free(t->pending);
    free(t);
}

/* Hands every ciphertext byte OpenSSL produced to the owner. */
static void
flush_out(struct pd_tls *t)
{
    char buf[16384];
    int n;

    while ((n = BIO_read(t->wbio, buf, sizeof(buf))) > 0)
        t->cb.on_cipher(t->arg, buf, (size_t)n);
}

static int
write_now(struct pd_tls *t, const void *data, size_t len)
{
    const unsigned char *p = data;

    while (len > 0) {
        int chunk = len > (1u << 30) ? (1 << 30) : (int)len;
        int n = SSL_write(t->ssl, p, chunk);

        if (n <= 0) {
            set_ssl_err(t->err, sizeof(t->err), "SSL_write");
            return -EIO;
        }
        p += n;
        len -= (size_t)n;
        flush_out(t);
    }
    return 0;
}

static int
handshake(struct pd_tls *t)
{
    int rv = SSL_do_handshake(t->ssl);

    flush_out(t);
    if (rv == 1) {
        t->ready = true;
        if (t->cb.on_ready != NULL)
            t->cb.on_ready(t->arg);
        if (t->npending > 0) {
            unsigned char *p = t->pending;
            size_t n = t->npending;

            t->pending = NULL;
            t->npending = 0;
            rv = write_now(t, p, n);
            free(p);
            return rv;
        }
        return 0;
    }
    switch (SSL_get_error(t->ssl, rv)) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE:
        return 0;
    default: {
        long vr = SSL_get_verify_result(t->ssl);

        if (vr != X509_V_OK)
            snprintf(t->err, sizeof(t->err), "TLS handshake: %s",
                     X509_verify_cert_error_string(vr));
        else
            set_ssl_err(t->err, sizeof(t->err), "TLS handshake");
        return -ECONNABORTED;
    }
    }
}

int
pd_tls_start(struct pd_tls *t)
{
    return handshake(t);
}

int
pd_tls_feed(struct pd_tls *t, const void *data, size_t len)
{
    char buf[16384];
    int rv;

    if (BIO_write(t->rbio, data, (int)len) != (int)len) {
        snprintf(t->err, sizeof(t->err), "TLS: out of memory");
        return -ENOMEM;
    }
    if (!t->ready) {
        rv = handshake(t);
        if (rv != 0 || !t->ready)
            return rv;
    }
    for (;;) {
        int n = SSL_read(t->ssl, buf, sizeof(buf));

        if (n > 0) {
            t->cb.on_plain(t->arg, buf, (size_t)n);
            continue;
        }
        flush_out(t);
        switch (SSL_get_error(t->ssl, n)) {
        case SSL_ERROR_WANT_READ:
        case SSL_ERROR_WANT_WRITE:
            return 0;
        case SSL_ERROR_ZERO_RETURN:
            snprintf(t->err, sizeof(t->err), "peer closed TLS");
            return -EPIPE;
        default:
            set_ssl_err(t->err, sizeof(t->err), "SSL_read");
            return -EIO;
        }
    }
}

int
pd_tls_write(struct pd_tls *t, const void *data, size_t len)
{
    unsigned char *p;

    if (t->ready)
        return write_now(t, data, len);
    p = realloc(t->pending, t->npending + len);
    if (p == NULL)
        return -ENOMEM;
    memcpy(p + t->npending, data, len);
    t->pending = p;
    t->npending += len;
    return 0;
}

void
pd_tls_shutdown(struct pd_tls *t)
{
    if (t->ready) {
        SSL_shutdown(t->ssl);
        flush_out(t);
    }
}

bool
pd_tls_ready(const struct pd_tls *t)
{
    return t->ready;
}

const char *
pd_tls_error(const struct pd_tls *t)
{
    return t->err;
}

int
pd_tls_peer_cn(const struct pd_tls *t, char *buf, size_t buflen)
{
    X509 *cert = SSL_get1_peer_certificate(t->ssl);
    int n;

    if (cert == NULL)
        return -ENOENT;
    n = X509_NAME_get_text_by_NID(X509_get_subject_name(cert),
                                  NID_commonName, buf, (int)buflen);
    X509_free(cert);
    return n < 0 ? -ENOENT : 0;
}

bool
pd_tls_peer_has_ou(const struct pd_tls *t, const char *ou)
{
    X509 *cert = SSL_get1_peer_certificate(t->ssl);
    X509_NAME *name;
    size_t n = strlen(ou);
    bool found = false;
    int i = -1;

    if (cert == NULL)
        return false;
    name = X509_get_subject_name(cert);
    while (!found && (i = X509_NAME_get_index_by_NID(
                          name, NID_organizationalUnitName, i)) >= 0) {
        ASN1_STRING *s = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, i));

        found = (size_t)ASN1_STRING_length(s) == n &&
                memcmp(ASN1_STRING_get0_data(s), ou, n) == 0;
    }
    X509_free(cert);
    return found;
}
