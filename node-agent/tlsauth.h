/*
 * TLS contexts for the agent's two links with the schedulers, both mutual
 * TLS against the cluster CA (deploy/make-certs.sh):
 *  - the RPC port (agent is the server),
 *  - the session with the leader (agent is the client).
 * Beyond the chain, the peer's leaf certificate must carry
 * OU=scheduler: an agent's certificate, though signed by the same CA,
 * cannot drive another agent or pose as a scheduler.
 */
#ifndef AGENT_TLSAUTH_H
#define AGENT_TLSAUTH_H

#include <openssl/ssl.h>
#include <stdbool.h>
#include <stddef.h>

/* The OU a peer's certificate must carry. */
#define AGENT_PEER_OU "scheduler"

/* A context for one side; NULL with a reason in err. */
SSL_CTX *agent_tls_ctx(bool server, const char *cert, const char *key,
                       const char *ca, char *err, size_t errlen);

#endif
