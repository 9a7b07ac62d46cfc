#include "node-agent/tlsauth.h"

#include <openssl/x509.h>
#include <stdio.h>
#include <string.h>

#include "common/log.h"
#include "proto/tls.h"

static bool
leaf_has_ou(X509 *cert, const char *want)
{
    X509_NAME *name = X509_get_subject_name(cert);
    int i = -1;

    while ((i = X509_NAME_get_index_by_NID(name, NID_organizationalUnitName,
                                           i)) >= 0) {
        X509_NAME_ENTRY *e = X509_NAME_get_entry(name, i);
        ASN1_STRING *s = X509_NAME_ENTRY_get_data(e);
        size_t n = strlen(want);

        if ((size_t)ASN1_STRING_length(s) == n &&
            memcmp(ASN1_STRING_get0_data(s), want, n) == 0)
            return true;
    }
    return false;
}

/* Runs after OpenSSL's own chain check for each certificate. */
static int
verify_cb(int ok, X509_STORE_CTX *x)
{
    X509 *cert;

    if (!ok || X509_STORE_CTX_get_error_depth(x) != 0)
        return ok;
    cert = X509_STORE_CTX_get_current_cert(x);
    if (cert == NULL || !leaf_has_ou(cert, AGENT_PEER_OU)) {
        char cn[128] = "?";

        if (cert != NULL)
            X509_NAME_get_text_by_NID(X509_get_subject_name(cert),
                                      NID_commonName, cn, sizeof(cn));
        pd_warn("tls", "peer certificate %s is not OU=%s, refusing it", cn,
                AGENT_PEER_OU);
        X509_STORE_CTX_set_error(x, X509_V_ERR_CERT_REJECTED);
        return 0;
    }
    return 1;
}

SSL_CTX *
agent_tls_ctx(bool server, const char *cert, const char *key,
              const char *ca, char *err, size_t errlen)
{
    SSL_CTX *ctx;

    if (ca == NULL || *ca == '\0') {
        snprintf(err, errlen, "mutual TLS needs the cluster CA (tls_ca)");
        return NULL;
    }
    if (cert == NULL || *cert == '\0' || key == NULL || *key == '\0') {
        snprintf(err, errlen,
                 "mutual TLS needs this agent's certificate and key "
                 "(tls_cert, tls_key)");
        return NULL;
    }
    ctx = pd_tls_ctx_new(server, cert, key, ca, err, errlen);
    if (ctx == NULL)
        return NULL;
    SSL_CTX_set_verify(ctx, SSL_CTX_get_verify_mode(ctx), verify_cb);
    return ctx;
}
