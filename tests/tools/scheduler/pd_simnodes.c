/*
 * pd-simnodes: simulated node agents and a create load generator, for the
 * scheduler's placement benchmarks. No VM is ever booted.
 *
 *   pd-simnodes nodes --schedulers A,B,C --ca-cert ca.pem --ca-key ca.key
 *               [--count N] [--prefix sim] [--cpus 128] [--memory-mb M]
 *               [--disk-mb D] [--rpc-listen 127.0.0.1:0]
 *     Opens N agent sessions (mutual TLS, HELLO role "agent",
 *     NODE_REGISTER, heartbeats at the interval the leader names) and
 *     follows NODE_REDIRECT to the leader. Every node advertises one
 *     shared RPC port that acknowledges SANDBOX_CREATE at once as
 *     running, SANDBOX_DESTROY as done, and lists no sandboxes. Each
 *     node's certificate (OU=agent, CN=its node id, as the scheduler
 *     requires) is minted in memory from the cluster CA given, so a
 *     thousand nodes need no thousand files. Prints "registered N" once
 *     every node registered, and then on every change.
 *
 *   pd-simnodes load --api H:P[,H:P...] --token T [--count 100000]
 *               [--concurrency 64] [--prefix b] [--wait]
 *     Sends COUNT POST /v1/sandboxes (1 CPU, 64 MB memory, 16 MB disk)
 *     over CONCURRENCY keep-alive connections spread over the API
 *     addresses, and prints one JSON line: count, ok, errors, seconds,
 *     rate (creates answered 2xx per second), p50/p99/max latency in ms,
 *     and the first error's body. With --drain-node NODE the requests
 *     are POST /v1/nodes/NODE/drain {"drain": false} instead: one Raft
 *     write each and no placement, the baseline of the same path.
 *
 * Everything runs on one libuv loop; runs are bounded by --timeout.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <uv.h>

#include "common/log.h"
#include "common/util.h"
#include "proto/conn.h"
#include "proto/msgtypes.h"
#include "proto/tls.h"

static uv_loop_t *loop;

/* ---- addresses --------------------------------------------------------- */

static int
parse_addr(const char *text, struct sockaddr_in *sa)
{
    char host[64];
    const char *colon = strrchr(text, ':');
    uint64_t port;
    size_t hl;

    if (colon == NULL || pd_parse_u64(colon + 1, &port) != 0 ||
        port > 65535)
        return -EINVAL;
    hl = (size_t)(colon - text);
    if (hl == 0 || hl >= sizeof(host))
        return -EINVAL;
    memcpy(host, text, hl);
    host[hl] = '\0';
    if (strcmp(host, "localhost") == 0)
        strcpy(host, "127.0.0.1");
    return uv_ip4_addr(host, (int)port, sa);
}

/* Splits "a,b,c" into at most max malloc'd strings. */
static size_t
split_list(const char *s, char **out, size_t max)
{
    size_t n = 0;

    while (*s != '\0' && n < max) {
        size_t len = strcspn(s, ",");

        if (len > 0)
            out[n++] = strndup(s, len);
        s += len + (s[len] == ',');
    }
    return n;
}

/* ---- certificates ------------------------------------------------------ */

static X509 *ca_cert;
static EVP_PKEY *ca_key, *node_key;
static const char *ca_path;

static int
load_ca(const char *cert, const char *key)
{
    FILE *f = fopen(cert, "r");

    if (f == NULL)
        return -errno;
    ca_cert = PEM_read_X509(f, NULL, NULL, NULL);
    fclose(f);
    f = fopen(key, "r");
    if (f == NULL)
        return -errno;
    ca_key = PEM_read_PrivateKey(f, NULL, NULL, NULL);
    fclose(f);
    node_key = EVP_EC_gen("P-256");
    return ca_cert && ca_key && node_key ? 0 : -EINVAL;
}

/* A certificate O=paddock, OU=agent, CN=name signed by the CA. */
static X509 *
mint(const char *name)
{
    X509 *x = X509_new();
    X509_NAME *n;
    static long serial = 1000;

    if (x == NULL)
        return NULL;
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), serial++);
    X509_gmtime_adj(X509_getm_notBefore(x), -3600);
    X509_gmtime_adj(X509_getm_notAfter(x), 7 * 24 * 3600);
    n = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(n, "O", MBSTRING_ASC,
                               (const unsigned char *)"paddock", -1, -1, 0);
    X509_NAME_add_entry_by_txt(n, "OU", MBSTRING_ASC,
                               (const unsigned char *)"agent", -1, -1, 0);
    X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_ASC,
                               (const unsigned char *)name, -1, -1, 0);
    X509_set_issuer_name(x, X509_get_subject_name(ca_cert));
    X509_set_pubkey(x, node_key);
    if (X509_sign(x, ca_key, EVP_sha256()) == 0) {
        X509_free(x);
        return NULL;
    }
    return x;
}

/* A TLS context (client or server) with a freshly minted certificate. */
static SSL_CTX *
ctx_for(const char *name, bool server)
{
    SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method()
                                      : TLS_client_method());
    X509 *x = mint(name);

    if (ctx == NULL || x == NULL ||
        SSL_CTX_use_certificate(ctx, x) != 1 ||
        SSL_CTX_use_PrivateKey(ctx, node_key) != 1 ||
        SSL_CTX_load_verify_locations(ctx, ca_path, NULL) != 1) {
        SSL_CTX_free(ctx);
        X509_free(x);
        return NULL;
    }
    X509_free(x);
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER |
                            SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    return ctx;
}

/* ---- simulated nodes --------------------------------------------------- */

struct simnode {
    char id[PD_ID_MAX + 1];
    SSL_CTX *tls;
    struct pd_conn *conn;
    uv_timer_t beat, retry;
    uint64_t register_id;
    uint64_t heartbeat_ms;
    bool registered;
    size_t next_addr;
    struct sockaddr_in redirect;
    bool have_redirect;
};

static struct simnode *nodes;
static size_t n_nodes, n_registered, last_printed = (size_t)-1;
static struct sockaddr_in sched_addrs[16];
static size_t n_sched;
static char rpc_addr[64];
static uint64_t cap_cpus = 128, cap_mem = 1 << 20, cap_disk = 1 << 20;
static uint64_t creates_acked;

static void node_connect(struct simnode *sn);

static void
print_registered(void)
{
    if (n_registered == last_printed)
        return;
    last_printed = n_registered;
    printf("registered %zu\n", n_registered);
    fflush(stdout);
}

static void
on_retry(uv_timer_t *t)
{
    node_connect(t->data);
}

static void
send_register(struct simnode *sn)
{
    struct pd_enc e;

    sn->register_id = pd_conn_next_id(sn->conn);
    pd_enc_begin(&e, PD_MSG_NODE_REGISTER, sn->register_id);
    pd_enc_str(&e, "node", sn->id);
    pd_enc_str(&e, "rpc_addr", rpc_addr);
    pd_enc_u64(&e, "cpus", cap_cpus);
    pd_enc_u64(&e, "memory_mb", cap_mem);
    pd_enc_u64(&e, "disk_mb", cap_disk);
    pd_enc_key(&e, "labels");
    msgpack_pack_map(&e.pk, 1);
    pd_enc_pack_str(&e, "sim");
    pd_enc_pack_str(&e, "true");
    pd_enc_key(&e, "sandboxes");
    msgpack_pack_array(&e.pk, 0);
    pd_conn_send(sn->conn, &e);
}

static void
on_beat(uv_timer_t *t)
{
    struct simnode *sn = t->data;
    struct pd_enc e;

    if (sn->conn == NULL || !sn->registered)
        return;
    pd_enc_begin(&e, PD_MSG_NODE_HEARTBEAT, pd_conn_next_id(sn->conn));
    pd_enc_str(&e, "node", sn->id);
    pd_conn_send(sn->conn, &e);
}

/* Requests the scheduler sends down the session (reconciliation). */
static void
serve_request(struct pd_conn *c, const struct pd_msg *m)
{
    struct pd_enc e;

    pd_enc_begin(&e, PD_MSG_OK, m->id);
    if (m->type == PD_MSG_SANDBOX_LIST) {
        pd_enc_key(&e, "sandboxes");
        msgpack_pack_array(&e.pk, 0);
    } else if (m->type == PD_MSG_SANDBOX_CREATE) {
        pd_enc_str(&e, "state", "running");
        creates_acked++;
    } else if (m->type != PD_MSG_SANDBOX_DESTROY &&
               m->type != PD_MSG_TOKEN_REVOKE &&
               m->type != PD_MSG_PING) {
        pd_enc_discard(&e);
        pd_conn_send_error(c, m->id, ENOSYS, "pd-simnodes does not "
                           "serve %s", pd_msg_type_name(m->type));
        return;
    }
    if (m->type == PD_MSG_TOKEN_REVOKE) {
        pd_enc_discard(&e); /* a push, not a request */
        return;
    }
    pd_conn_send(c, &e);
}

static void
on_node_msg(struct pd_conn *c, const struct pd_msg *m)
{
    struct simnode *sn = pd_conn_data(c);
    char leader[64] = "";
    uint64_t hb;

    switch (m->type) {
    case PD_MSG_HELLO:
        return;
    case PD_MSG_OK:
        if (m->id != sn->register_id || sn->registered)
            return;
        sn->registered = true;
        n_registered++;
        if (pd_msg_u64(m, "heartbeat_ms", &hb) == 0 && hb >= 50)
            sn->heartbeat_ms = hb;
        uv_timer_start(&sn->beat, on_beat, sn->heartbeat_ms,
                       sn->heartbeat_ms);
        if (n_registered == n_nodes)
            print_registered();
        return;
    case PD_MSG_NODE_REDIRECT:
        pd_msg_cstr(m, "leader_addr", leader, sizeof(leader));
        sn->have_redirect = leader[0] != '\0' &&
                            parse_addr(leader, &sn->redirect) == 0;
        pd_conn_close(c, 0, "redirected");
        return;
    case PD_MSG_ERROR:
        pd_conn_close(c, -EPERM, "scheduler refused a request");
        return;
    default:
        if (m->type >= 100 && m->type < 300)
            serve_request(c, m);
    }
}

static void
on_node_close(struct pd_conn *c, int reason)
{
    struct simnode *sn = pd_conn_data(c);

    PD_UNUSED(reason);
    sn->conn = NULL;
    uv_timer_stop(&sn->beat);
    if (sn->registered) {
        sn->registered = false;
        n_registered--;
        print_registered();
    }
    uv_timer_start(&sn->retry, on_retry, sn->have_redirect ? 0 : 200, 0);
}

static void
on_node_connect(uv_connect_t *req, int status)
{
    struct simnode *sn = req->data;
    uv_tcp_t *tcp = (uv_tcp_t *)req->handle;
    static const struct pd_conn_cb cb = {
        .on_msg = on_node_msg,
        .on_close = on_node_close,
    };
    struct pd_conn_opts o = {
        .role = "agent",
        .name = sn->id,
        .tls = sn->tls,
        .subject = sn->id,
    };

    free(req);
    if (status < 0) {
        uv_close((uv_handle_t *)tcp, (uv_close_cb)free);
        uv_timer_start(&sn->retry, on_retry, 200, 0);
        return;
    }
    sn->conn = pd_conn_new((uv_stream_t *)tcp, &o, &cb, sn);
    if (sn->conn == NULL) {
        uv_timer_start(&sn->retry, on_retry, 200, 0);
        return;
    }
    send_register(sn);
}

static void
node_connect(struct simnode *sn)
{
    uv_tcp_t *tcp = malloc(sizeof(*tcp));
    uv_connect_t *req = malloc(sizeof(*req));
    const struct sockaddr_in *sa;

    if (tcp == NULL || req == NULL) {
        free(tcp);
        free(req);
        uv_timer_start(&sn->retry, on_retry, 200, 0);
        return;
    }
    if (sn->have_redirect) {
        sa = &sn->redirect;
        sn->have_redirect = false;
    } else {
        sa = &sched_addrs[sn->next_addr++ % n_sched];
    }
    uv_tcp_init(loop, tcp);
    req->data = sn;
    if (uv_tcp_connect(req, tcp, (const struct sockaddr *)sa,
                       on_node_connect) != 0) {
        free(req);
        uv_close((uv_handle_t *)tcp, (uv_close_cb)free);
        uv_timer_start(&sn->retry, on_retry, 200, 0);
    }
}

/* The shared RPC port: every node's assignments arrive here. */
static SSL_CTX *rpc_tls;

static void
on_rpc_msg(struct pd_conn *c, const struct pd_msg *m)
{
    if (m->type >= 100 && m->type < 300)
        serve_request(c, m);
}

static void
on_rpc_close(struct pd_conn *c, int reason)
{
    PD_UNUSED(c);
    PD_UNUSED(reason);
}

static void
on_rpc_conn(uv_stream_t *server, int status)
{
    static const struct pd_conn_cb cb = {
        .on_msg = on_rpc_msg,
        .on_close = on_rpc_close,
    };
    struct pd_conn_opts o = {
        .role = "agent",
        .name = "simnodes",
        .tls = rpc_tls,
        .tls_server = true,
        .subject = "rpc",
    };
    uv_tcp_t *tcp;

    if (status < 0)
        return;
    tcp = malloc(sizeof(*tcp));
    if (tcp == NULL)
        return;
    uv_tcp_init(loop, tcp);
    if (uv_accept(server, (uv_stream_t *)tcp) != 0) {
        uv_close((uv_handle_t *)tcp, (uv_close_cb)free);
        return;
    }
    uv_tcp_nodelay(tcp, 1);
    pd_conn_new((uv_stream_t *)tcp, &o, &cb, NULL);
}

static int
run_nodes(const char *schedulers, size_t count, const char *prefix,
          const char *listen)
{
    static uv_tcp_t server;
    struct sockaddr_in sa;
    struct sockaddr_storage bound;
    int blen = sizeof(bound);
    char *list[16];
    char host[32];

    n_sched = split_list(schedulers, list, 16);
    for (size_t i = 0; i < n_sched; i++) {
        if (parse_addr(list[i], &sched_addrs[i]) != 0) {
            fprintf(stderr, "pd-simnodes: bad scheduler address %s\n",
                    list[i]);
            return 2;
        }
        free(list[i]);
    }
    if (n_sched == 0 || parse_addr(listen, &sa) != 0) {
        fprintf(stderr, "pd-simnodes: --schedulers and --rpc-listen "
                "want host:port\n");
        return 2;
    }
    rpc_tls = ctx_for("simnodes-rpc", true);
    if (rpc_tls == NULL) {
        fprintf(stderr, "pd-simnodes: cannot build the RPC TLS context\n");
        return 1;
    }
    uv_tcp_init(loop, &server);
    if (uv_tcp_bind(&server, (const struct sockaddr *)&sa, 0) != 0 ||
        uv_listen((uv_stream_t *)&server, 1024, on_rpc_conn) != 0 ||
        uv_tcp_getsockname(&server, (struct sockaddr *)&bound, &blen) != 0) {
        fprintf(stderr, "pd-simnodes: cannot listen on %s\n", listen);
        return 1;
    }
    uv_ip4_name((struct sockaddr_in *)&bound, host, sizeof(host));
    snprintf(rpc_addr, sizeof(rpc_addr), "%s:%u", host,
             ntohs(((struct sockaddr_in *)&bound)->sin_port));

    nodes = calloc(count, sizeof(*nodes));
    if (nodes == NULL)
        return 1;
    n_nodes = count;
    for (size_t i = 0; i < count; i++) {
        struct simnode *sn = &nodes[i];

        snprintf(sn->id, sizeof(sn->id), "%s-%04zu", prefix, i);
        sn->tls = ctx_for(sn->id, false);
        if (sn->tls == NULL) {
            fprintf(stderr, "pd-simnodes: cannot mint %s\n", sn->id);
            return 1;
        }
        sn->heartbeat_ms = 1000;
        sn->next_addr = i;
        uv_timer_init(loop, &sn->beat);
        uv_timer_init(loop, &sn->retry);
        sn->beat.data = sn->retry.data = sn;
        /* Spread the first connections (5 ms apart, at most 10 s in
         * all): one process doing a thousand TLS handshakes at once on a
         * busy host stalls its own heartbeats past the grace period, a
         * failure real agents on separate hosts do not share. */
        uv_timer_start(&sn->retry, on_retry,
                       count * 5 <= 10000 ? i * 5 : (i * 10000) / count, 0);
    }
    printf("rpc %s\n", rpc_addr);
    fflush(stdout);
    return uv_run(loop, UV_RUN_DEFAULT);
}

/* ---- create load ------------------------------------------------------- */

struct client {
    uv_tcp_t tcp;
    struct sockaddr_in addr;
    char *in;
    size_t in_len, in_cap;
    uint64_t started_ns;
    bool busy, connected;
    int failures;         /* connects failed in a row */
    uv_timer_t again;
};

static const char *token, *prefix_load, *drain_node;
static uint64_t n_total, n_sent, n_done, n_ok, n_err;
static uint32_t *lat_us;
static char first_error[512];
static bool wait_running;
static uint64_t t0_ns;

static void client_next(struct client *cl);
static void client_connect(struct client *cl);

static void
on_write_done(uv_write_t *w, int status)
{
    PD_UNUSED(status);
    free(w->data);
    free(w);
}

static void
client_send(struct client *cl)
{
    char body[256], *req;
    uv_write_t *w;
    uv_buf_t b;
    int n;

    if (drain_node != NULL) {
        /* The baseline: one Raft write per request, no placement. */
        snprintf(body, sizeof(body), "{\"drain\": false}");
        n = asprintf(&req, "POST /v1/nodes/%s/drain HTTP/1.1\r\nHost: x\r\n"
                     "Authorization: Bearer %s\r\nContent-Type: "
                     "application/json\r\nContent-Length: %zu\r\n\r\n%s",
                     drain_node, token, strlen(body), body);
    } else {
        snprintf(body, sizeof(body), "{\"id\": \"%s-%llu\", \"cpus\": 1, "
                 "\"memory_mb\": 64, \"disk_mb\": 16}", prefix_load,
                 (unsigned long long)n_sent);
        n = asprintf(&req, "POST /v1/sandboxes%s HTTP/1.1\r\nHost: x\r\n"
                     "Authorization: Bearer %s\r\nContent-Type: "
                     "application/json\r\nContent-Length: %zu\r\n\r\n%s",
                     wait_running ? "?wait=true" : "", token, strlen(body),
                     body);
    }
    if (n < 0)
        return;
    n_sent++;
    cl->busy = true;
    cl->started_ns = pd_now_ns();
    w = malloc(sizeof(*w));
    w->data = req;
    b = uv_buf_init(req, (unsigned)n);
    if (uv_write(w, (uv_stream_t *)&cl->tcp, &b, 1, on_write_done) != 0) {
        free(req);
        free(w);
    }
}

/* A complete response in cl->in? Returns its length, or 0. */
static size_t
response_len(struct client *cl, int *status, const char **body,
             size_t *blen)
{
    char *end, *cl_hdr;
    size_t head, clen = 0;

    if (cl->in_len < 12)
        return 0;
    cl->in[cl->in_len] = '\0';
    end = strstr(cl->in, "\r\n\r\n");
    if (end == NULL)
        return 0;
    head = (size_t)(end - cl->in) + 4;
    cl_hdr = strcasestr(cl->in, "\r\nContent-Length:");
    if (cl_hdr != NULL && cl_hdr < end)
        clen = strtoull(cl_hdr + 17, NULL, 10);
    if (cl->in_len < head + clen)
        return 0;
    *status = atoi(cl->in + 9);
    *body = cl->in + head;
    *blen = clen;
    return head + clen;
}

static void
on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct client *cl = h->data;

    PD_UNUSED(suggested);
    if (cl->in_cap - cl->in_len < 65537) {
        cl->in_cap = cl->in_cap * 2 + 65537;
        cl->in = realloc(cl->in, cl->in_cap);
    }
    *buf = uv_buf_init(cl->in + cl->in_len,
                       (unsigned)(cl->in_cap - cl->in_len - 1));
}

static void
finish_if_done(void)
{
    double secs;

    if (n_done < n_total)
        return;
    secs = (double)(pd_now_ns() - t0_ns) / 1e9;
    uv_stop(loop);
    /* sort latencies */
    for (size_t gap = n_done / 2; gap > 0; gap /= 2)
        for (size_t i = gap; i < n_done; i++)
            for (size_t j = i; j >= gap && lat_us[j - gap] > lat_us[j];
                 j -= gap) {
                uint32_t t = lat_us[j];

                lat_us[j] = lat_us[j - gap];
                lat_us[j - gap] = t;
            }
    printf("{\"count\": %llu, \"ok\": %llu, \"errors\": %llu, "
           "\"seconds\": %.3f, \"rate\": %.1f, \"p50_ms\": %.2f, "
           "\"p99_ms\": %.2f, \"max_ms\": %.2f, \"first_error\": \"",
           (unsigned long long)n_total, (unsigned long long)n_ok,
           (unsigned long long)n_err, secs, (double)n_ok / secs,
           lat_us[n_done / 2] / 1000.0, lat_us[(n_done * 99) / 100] / 1000.0,
           lat_us[n_done - 1] / 1000.0);
    for (const char *p = first_error; *p; p++)
        if (*p != '"' && *p != '\\' && (unsigned char)*p >= 32)
            putchar(*p);
    printf("\"}\n");
    fflush(stdout);
}

static void
on_client_closed(uv_handle_t *h)
{
    struct client *cl = h->data;

    if (n_sent < n_total)
        client_connect(cl);
}

static void
on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct client *cl = s->data;
    const char *body;
    size_t blen, len;
    int status;

    PD_UNUSED(buf);
    if (nread < 0) {
        /* The server may close after an error answer: count the request
         * in flight as failed and connect again. */
        if (cl->busy) {
            n_err++;
            lat_us[n_done++] = 0;
            if (first_error[0] == '\0')
                snprintf(first_error, sizeof(first_error),
                         "connection lost: %s", uv_strerror((int)nread));
        }
        cl->busy = cl->connected = false;
        cl->in_len = 0;
        uv_close((uv_handle_t *)s, on_client_closed);
        finish_if_done();
        return;
    }
    cl->in_len += (size_t)nread;
    while ((len = response_len(cl, &status, &body, &blen)) > 0) {
        uint64_t us = (pd_now_ns() - cl->started_ns) / 1000;

        lat_us[n_done++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
        if (status >= 200 && status < 300) {
            n_ok++;
        } else {
            n_err++;
            if (first_error[0] == '\0')
                snprintf(first_error, sizeof(first_error), "%d %.*s",
                         status, (int)(blen < 400 ? blen : 400), body);
        }
        memmove(cl->in, cl->in + len, cl->in_len - len);
        cl->in_len -= len;
        cl->busy = false;
        client_next(cl);
    }
    finish_if_done();
}

static void
client_next(struct client *cl)
{
    if (n_sent < n_total && cl->connected)
        client_send(cl);
}

static void
on_again(uv_timer_t *t)
{
    client_connect(t->data);
}

static void
on_retry_closed(uv_handle_t *h)
{
    struct client *cl = h->data;

    uv_timer_start(&cl->again, on_again, 100, 0);
}

static void
on_client_connect(uv_connect_t *req, int status)
{
    struct client *cl = req->data;

    free(req);
    if (status < 0) {
        /* A busy listener may refuse for a moment: retry, bounded. */
        if (++cl->failures > 50) {
            fprintf(stderr, "pd-simnodes: connect: %s\n",
                    uv_strerror(status));
            exit(1);
        }
        uv_close((uv_handle_t *)&cl->tcp, on_retry_closed);
        return;
    }
    cl->failures = 0;
    cl->connected = true;
    uv_tcp_nodelay(&cl->tcp, 1);
    uv_read_start((uv_stream_t *)&cl->tcp, on_alloc, on_read);
    client_next(cl);
}

static void
client_connect(struct client *cl)
{
    uv_connect_t *req = malloc(sizeof(*req));

    uv_tcp_init(loop, &cl->tcp);
    cl->tcp.data = cl;
    req->data = cl;
    if (uv_tcp_connect(req, &cl->tcp, (const struct sockaddr *)&cl->addr,
                       on_client_connect) != 0) {
        fprintf(stderr, "pd-simnodes: cannot connect\n");
        exit(1);
    }
}

static void
on_timeout(uv_timer_t *t)
{
    PD_UNUSED(t);
    fprintf(stderr, "pd-simnodes: timed out with %llu of %llu answered\n",
            (unsigned long long)n_done, (unsigned long long)n_total);
    n_total = n_done;
    if (n_done == 0)
        exit(1);
    finish_if_done();
}

static int
run_load(const char *apis, size_t conc, uint64_t timeout_ms)
{
    static uv_timer_t timer;
    struct client *cls = calloc(conc, sizeof(*cls));
    char *list[16];
    size_t n = split_list(apis, list, 16);

    lat_us = calloc(n_total + 1, sizeof(*lat_us));
    if (cls == NULL || lat_us == NULL || n == 0 || token == NULL) {
        fprintf(stderr, "pd-simnodes: load needs --api and --token\n");
        return 2;
    }
    t0_ns = pd_now_ns();
    for (size_t i = 0; i < conc; i++) {
        struct client *cl = &cls[i];

        if (parse_addr(list[i % n], &cl->addr) != 0) {
            fprintf(stderr, "pd-simnodes: bad --api %s\n", list[i % n]);
            return 2;
        }
        uv_timer_init(loop, &cl->again);
        cl->again.data = cl;
        client_connect(cl);
    }
    for (size_t i = 0; i < n; i++)
        free(list[i]);
    uv_timer_init(loop, &timer);
    uv_timer_start(&timer, on_timeout, timeout_ms, 0);
    uv_run(loop, UV_RUN_DEFAULT);
    return n_err > 0 && n_ok == 0 ? 1 : 0;
}

/* ---- main -------------------------------------------------------------- */

static void
usage(void)
{
    fprintf(stderr,
            "usage: pd-simnodes nodes --schedulers A,B --ca-cert F "
            "--ca-key F [--count N] [--prefix P]\n"
            "                   [--cpus N] [--memory-mb N] [--disk-mb N] "
            "[--rpc-listen H:P]\n"
            "       pd-simnodes load --api A,B --token T [--count N] "
            "[--concurrency N] [--prefix P] [--wait] [--timeout S]\n"
            "                   [--drain-node NODE]\n");
    exit(2);
}

int
main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"schedulers", required_argument, NULL, 's'},
        {"ca-cert", required_argument, NULL, 'c'},
        {"ca-key", required_argument, NULL, 'k'},
        {"count", required_argument, NULL, 'n'},
        {"prefix", required_argument, NULL, 'p'},
        {"cpus", required_argument, NULL, 'C'},
        {"memory-mb", required_argument, NULL, 'M'},
        {"disk-mb", required_argument, NULL, 'D'},
        {"rpc-listen", required_argument, NULL, 'l'},
        {"api", required_argument, NULL, 'a'},
        {"token", required_argument, NULL, 't'},
        {"concurrency", required_argument, NULL, 'j'},
        {"wait", no_argument, NULL, 'w'},
        {"timeout", required_argument, NULL, 'T'},
        {"drain-node", required_argument, NULL, 'd'},
        {NULL, 0, NULL, 0},
    };
    const char *mode, *schedulers = NULL, *cert = NULL, *key = NULL;
    const char *prefix = NULL, *listen = "127.0.0.1:0", *apis = NULL;
    uint64_t count = 0, conc = 64, timeout_s = 600;
    int c;

    if (argc < 2)
        usage();
    mode = argv[1];
    optind = 2;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 's': schedulers = optarg; break;
        case 'c': cert = optarg; break;
        case 'k': key = optarg; break;
        case 'n': pd_parse_u64(optarg, &count); break;
        case 'p': prefix = optarg; break;
        case 'C': pd_parse_u64(optarg, &cap_cpus); break;
        case 'M': pd_parse_u64(optarg, &cap_mem); break;
        case 'D': pd_parse_u64(optarg, &cap_disk); break;
        case 'l': listen = optarg; break;
        case 'a': apis = optarg; break;
        case 't': token = optarg; break;
        case 'j': pd_parse_u64(optarg, &conc); break;
        case 'w': wait_running = true; break;
        case 'T': pd_parse_u64(optarg, &timeout_s); break;
        case 'd': drain_node = optarg; break;
        default: usage();
        }
    }
    pd_log_init("pd-simnodes", PD_LOG_WARN);
    signal(SIGPIPE, SIG_IGN);
    loop = uv_default_loop();
    if (strcmp(mode, "nodes") == 0) {
        if (schedulers == NULL || cert == NULL || key == NULL)
            usage();
        ca_path = cert;
        if (load_ca(cert, key) != 0) {
            fprintf(stderr, "pd-simnodes: cannot load the CA %s / %s\n",
                    cert, key);
            return 1;
        }
        return run_nodes(schedulers, count ? count : 1000,
                         prefix ? prefix : "sim", listen);
    }
    if (strcmp(mode, "load") == 0) {
        n_total = count ? count : 100000;
        prefix_load = prefix ? prefix : "b";
        if (conc == 0 || conc > 4096)
            usage();
        if (conc > n_total)
            conc = n_total;
        return run_load(apis ? apis : "", (size_t)conc, timeout_s * 1000);
    }
    usage();
    return 2;
}
