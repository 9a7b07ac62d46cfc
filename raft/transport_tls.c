#include "raft/transport_tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "proto/tls.h"

/* raft's TCP transport preamble: protocol, id, address buffer size. */
#define PREAMBLE_PROTOCOL 1
#define PREAMBLE_HEAD     24
#define ADDR_MAX          256
/* Plaintext an accepted peer may send before raft takes the stream. */
#define EARLY_MAX         (64u * 1024)
#define READ_BUF          (64u * 1024)

struct rtls {
    struct raft_uv_transport *t;
    uv_loop_t *loop;
    SSL_CTX *sctx, *cctx;
    unsigned handshake_ms;
    raft_id id;
    char address[ADDR_MAX];
    char bind[ADDR_MAX];

    uv_tcp_t listener;
    raft_uv_accept_cb accept_cb;
    raft_uv_transport_close_cb close_cb;
    bool closing, released;
    int refs; /* the listener handle plus every live connection */
    struct conn *pending; /* not yet handed to raft */
    unsigned npending;
};

enum conn_state { C_HANDSHAKE, C_RELAY, C_CLOSING };

struct conn {
    struct rtls *tr;
    struct conn *next, **pprev; /* on tr->pending while C_HANDSHAKE */
    enum conn_state state;
    bool outbound;
    struct raft_uv_connect *req;  /* outbound, until its cb ran */
    raft_id peer_id;
    char peer_addr[ADDR_MAX];     /* preamble's, or the Raft address */
    char where[64];               /* the TCP peer, for log lines */

    uv_tcp_t tcp;
    uv_pipe_t relay;              /* our end of the socketpair */
    uv_timer_t timer;
    uv_connect_t connect;
    uv_shutdown_t shutdown;
    int handles;
    bool relay_open, dead, checked;

    struct pd_tls *tls;
    unsigned char *early;         /* accepted side: preamble and after */
    size_t nearly;

    char tcp_buf[READ_BUF];
    char relay_buf[READ_BUF];
};

struct wreq {
    uv_write_t req;
    struct conn *c;
    char data[];
};

static void conn_close(struct conn *c);

/* ---- Small helpers ----------------------------------------------------- */

static void
put64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t
get64(const unsigned char *p)
{
    uint64_t v = 0;

    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static int
parse_addr(const char *address, struct sockaddr_storage *out)
{
    char host[ADDR_MAX];
    const char *colon = strrchr(address, ':');
    struct addrinfo hints, *res = NULL;
    size_t hl;
    int port;

    if (colon == NULL || (hl = (size_t)(colon - address)) >= sizeof(host))
        return -EINVAL;
    memcpy(host, address, hl);
    host[hl] = '\0';
    port = atoi(colon + 1);
    if (port <= 0 || port > 65535)
        return -EINVAL;
    if (uv_ip4_addr(host, port, (struct sockaddr_in *)out) == 0)
        return 0;
    /* Not numeric: resolve now (see the header). */
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, NULL, &hints, &res) != 0 || res == NULL)
        return -EHOSTUNREACH;
    memcpy(out, res->ai_addr, res->ai_addrlen);
    ((struct sockaddr_in *)out)->sin_port = htons((uint16_t)port);
    freeaddrinfo(res);
    return 0;
}

static void
describe_peer(struct conn *c)
{
    struct sockaddr_storage ss;
    int len = sizeof(ss);
    char ip[INET6_ADDRSTRLEN] = "?";

    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &len) == 0 &&
        ss.ss_family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&ss;

        uv_ip4_name(sin, ip, sizeof(ip));
        snprintf(c->where, sizeof(c->where), "%s:%u", ip,
                 (unsigned)ntohs(sin->sin_port));
    } else if (c->where[0] == '\0') {
        snprintf(c->where, sizeof(c->where), "%s", ip);
    }
}

static void
tr_unref(struct rtls *tr)
{
    if (--tr->refs == 0 && tr->released)
        free(tr);
}

static void
pending_remove(struct conn *c)
{
    if (c->pprev == NULL)
        return;
    c->tr->npending--;
    *c->pprev = c->next;
    if (c->next != NULL)
        c->next->pprev = c->pprev;
    c->next = NULL;
    c->pprev = NULL;
}

/* ---- Writes with backpressure ------------------------------------------ */

static void tcp_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);
static void relay_read_cb(uv_stream_t *s, ssize_t nread,
                          const uv_buf_t *buf);

static void
alloc_tcp(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    struct conn *c = h->data;

    PD_UNUSED(hint);
    *buf = uv_buf_init(c->tcp_buf, sizeof(c->tcp_buf));
}

static void
alloc_relay(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    struct conn *c = h->data;

    PD_UNUSED(hint);
    *buf = uv_buf_init(c->relay_buf, sizeof(c->relay_buf));
}

/* A write finished: a source stopped for backpressure may read again. */
static void
write_cb(uv_write_t *req, int status)
{
    struct wreq *w = (struct wreq *)req;
    struct conn *c = w->c;
    uv_stream_t *s = req->handle;

    free(w);
    if (status != 0 || c->state != C_RELAY) {
        if (status != 0 && status != UV_ECANCELED)
            conn_close(c);
        return;
    }
    if (s->write_queue_size > RTLS_HIGH_WATER / 2)
        return;
    if (s == (uv_stream_t *)&c->tcp && c->relay_open)
        uv_read_start((uv_stream_t *)&c->relay, alloc_relay, relay_read_cb);
    else if (s == (uv_stream_t *)&c->relay)
        uv_read_start((uv_stream_t *)&c->tcp, alloc_tcp, tcp_read_cb);
}

static int
stream_write(struct conn *c, uv_stream_t *s, const void *data, size_t len)
{
    struct wreq *w = malloc(sizeof(*w) + len);
    uv_buf_t buf;

    if (w == NULL)
        return -ENOMEM;
    w->c = c;
    memcpy(w->data, data, len);
    buf = uv_buf_init(w->data, (unsigned)len);
    if (uv_write(&w->req, s, &buf, 1, write_cb) != 0) {
        free(w);
        return -EPIPE;
    }
    return 0;
}

/* ---- TLS callbacks (run inside pd_tls_feed/pd_tls_write) --------------- */

static void
on_cipher(void *arg, const void *data, size_t len)
{
    struct conn *c = arg;

    if (c->dead)
        return;
    if (stream_write(c, (uv_stream_t *)&c->tcp, data, len) != 0)
        c->dead = true;
    else if (c->tcp.write_queue_size > RTLS_HIGH_WATER && c->relay_open)
        uv_read_stop((uv_stream_t *)&c->relay);
}

static void
on_plain(void *arg, const void *data, size_t len)
{
    struct conn *c = arg;
    unsigned char *p;

    if (c->dead || c->state == C_CLOSING)
        return;
    if (c->state == C_RELAY) {
        if (stream_write(c, (uv_stream_t *)&c->relay, data, len) != 0)
            c->dead = true;
        else if (c->relay.write_queue_size > RTLS_HIGH_WATER)
            uv_read_stop((uv_stream_t *)&c->tcp);
        return;
    }
    if (c->outbound || c->nearly + len > EARLY_MAX) {
        pd_warn("raft", "peer %s: %zu bytes before the preamble was "
                "taken; closing", c->where, c->nearly + len);
        c->dead = true;
        return;
    }
    p = realloc(c->early, c->nearly + len);
    if (p == NULL) {
        c->dead = true;
        return;
    }
    memcpy(p + c->nearly, data, len);
    c->early = p;
    c->nearly += len;
}

/* ---- Hand-off to raft -------------------------------------------------- */

/* Creates the socketpair; *out is raft's end (freed by raft). */
static int
make_pair(struct conn *c, uv_stream_t **out)
{
    uv_os_sock_t fds[2];
    uv_pipe_t *theirs;
    int rv;

    rv = uv_socketpair(SOCK_STREAM, 0, fds, UV_NONBLOCK_PIPE,
                       UV_NONBLOCK_PIPE);
    if (rv != 0)
        return rv;
    theirs = raft_malloc(sizeof(*theirs));
    if (theirs == NULL) {
        close(fds[0]);
        close(fds[1]);
        return UV_ENOMEM;
    }
    uv_pipe_init(c->tr->loop, theirs, 0);
    uv_pipe_init(c->tr->loop, &c->relay, 0);
    c->relay.data = c;
    c->handles++;
    c->relay_open = true;
    uv_pipe_open(theirs, fds[0]);
    uv_pipe_open(&c->relay, fds[1]);
    *out = (uv_stream_t *)theirs;
    return 0;
}

static bool
check_peer(struct conn *c)
{
    char cn[128] = "";

    c->checked = true;
    if (pd_tls_peer_has_ou(c->tls, "scheduler"))
        return true;
    if (pd_tls_peer_cn(c->tls, cn, sizeof(cn)) != 0)
        snprintf(cn, sizeof(cn), "(none)");
    pd_warn("raft", "peer %s: certificate CN=%s is not a scheduler's "
            "(OU=scheduler); refusing the connection", c->where, cn);
    return false;
}

static void
start_relay(struct conn *c)
{
    c->state = C_RELAY;
    pending_remove(c);
    uv_timer_stop(&c->timer);
    uv_read_start((uv_stream_t *)&c->relay, alloc_relay, relay_read_cb);
}

static void
outbound_ready(struct conn *c)
{
    unsigned char pre[PREAMBLE_HEAD + ADDR_MAX + 8];
    size_t alen = (strlen(c->tr->address) + 1 + 7) & ~(size_t)7;
    struct raft_uv_connect *req = c->req;
    uv_stream_t *theirs;

    if (!check_peer(c)) {
        c->dead = true;
        return;
    }
    memset(pre, 0, sizeof(pre));
    put64(pre, PREAMBLE_PROTOCOL);
    put64(pre + 8, c->tr->id);
    put64(pre + 16, alen);
    memcpy(pre + PREAMBLE_HEAD, c->tr->address, strlen(c->tr->address));
    if (pd_tls_write(c->tls, pre, PREAMBLE_HEAD + alen) != 0 || c->dead ||
        make_pair(c, &theirs) != 0) {
        c->dead = true;
        return;
    }
    start_relay(c);
    c->req = NULL;
    pd_trace("raft", "peer %s: TLS up to member %llu", c->where,
             (unsigned long long)c->peer_id);
    req->cb(req, theirs, 0);
}

/* The accepted side, once the preamble is complete. */
static void
inbound_take(struct conn *c)
{
    uint64_t proto, id, alen;
    uv_stream_t *theirs;
    size_t used;

    if (c->nearly < PREAMBLE_HEAD)
        return;
    proto = get64(c->early);
    id = get64(c->early + 8);
    alen = get64(c->early + 16);
    if (proto != PREAMBLE_PROTOCOL || id == 0 || alen == 0 ||
        alen > ADDR_MAX) {
        pd_warn("raft", "peer %s: bad preamble (protocol %llu, address "
                "size %llu); closing", c->where, (unsigned long long)proto,
                (unsigned long long)alen);
        c->dead = true;
        return;
    }
    if (c->nearly < PREAMBLE_HEAD + alen)
        return;
    memcpy(c->peer_addr, c->early + PREAMBLE_HEAD, alen);
    c->peer_addr[alen - 1] = '\0';
    c->peer_id = id;
    if (c->tr->closing || make_pair(c, &theirs) != 0) {
        c->dead = true;
        return;
    }
    start_relay(c);
    used = PREAMBLE_HEAD + alen;
    if (c->nearly > used &&
        stream_write(c, (uv_stream_t *)&c->relay, c->early + used,
                     c->nearly - used) != 0)
        c->dead = true;
    free(c->early);
    c->early = NULL;
    c->nearly = 0;
    pd_trace("raft", "peer %s: TLS up from member %llu (%s)", c->where,
             (unsigned long long)id, c->peer_addr);
    c->tr->accept_cb(c->tr->t, id, c->peer_addr, theirs);
}

/* ---- Reads ------------------------------------------------------------- */

static void
tcp_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct conn *c = s->data;
    int rv;

    if (nread == 0)
        return;
    if (nread < 0) {
        if (c->state == C_HANDSHAKE)
            pd_warn("raft", "peer %s: closed during the TLS handshake "
                    "(%s)", c->where, uv_strerror((int)nread));
        conn_close(c);
        return;
    }
    rv = pd_tls_feed(c->tls, buf->base, (size_t)nread);
    if (rv != 0 && !(rv == -EPIPE && c->state == C_RELAY)) {
        pd_warn("raft", "peer %s: %s; closing", c->where,
                pd_tls_error(c->tls));
        c->dead = true;
    } else if (rv != 0) {
        c->dead = true; /* close_notify from the peer */
    }
    if (!c->dead && c->state == C_HANDSHAKE && pd_tls_ready(c->tls) &&
        !c->checked) {
        if (c->outbound)
            outbound_ready(c);
        else if (!check_peer(c))
            c->dead = true;
    }
    if (!c->dead && c->state == C_HANDSHAKE && c->checked && !c->outbound)
        inbound_take(c);
    if (c->dead)
        conn_close(c);
}

static void
linger_cb(uv_timer_t *t)
{
    struct conn *c = t->data;

    pd_debug("raft", "peer %s: unsent bytes after close; dropping them",
             c->where);
    conn_close(c);
}

static void
shutdown_cb(uv_shutdown_t *req, int status)
{
    PD_UNUSED(status);
    conn_close(req->data);
}

/* raft's side: plaintext to encrypt, or raft closed its end. */
static void
relay_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct conn *c = s->data;

    if (nread == 0)
        return;
    if (nread < 0) {
        /* raft closed the stream: say so in TLS, then let the bytes
         * drain before closing the socket. */
        uv_read_stop(s);
        c->state = C_CLOSING;
        pd_tls_shutdown(c->tls);
        /* A peer that no longer reads must not hold the socket open. */
        uv_timer_start(&c->timer, linger_cb, c->tr->handshake_ms, 0);
        c->shutdown.data = c;
        if (c->dead ||
            uv_shutdown(&c->shutdown, (uv_stream_t *)&c->tcp,
                        shutdown_cb) != 0)
            conn_close(c);
        return;
    }
    if (pd_tls_write(c->tls, buf->base, (size_t)nread) != 0)
        c->dead = true;
    if (c->dead)
        conn_close(c);
}

/* ---- Lifecycle --------------------------------------------------------- */

static void
handle_closed(uv_handle_t *h)
{
    struct conn *c = h->data;
    struct rtls *tr = c->tr;

    if (--c->handles > 0)
        return;
    pd_tls_free(c->tls);
    free(c->early);
    free(c);
    tr_unref(tr);
}

/* Idempotent: closes every handle; an outbound request still waiting is
 * told the connection failed. */
static void
conn_close(struct conn *c)
{
    struct raft_uv_connect *req = c->req;

    if (uv_is_closing((uv_handle_t *)&c->timer))
        return;
    c->state = C_CLOSING;
    c->dead = true;
    c->req = NULL;
    pending_remove(c);
    uv_close((uv_handle_t *)&c->timer, handle_closed);
    uv_close((uv_handle_t *)&c->tcp, handle_closed);
    if (c->relay_open)
        uv_close((uv_handle_t *)&c->relay, handle_closed);
    if (req != NULL)
        req->cb(req, NULL, c->tr->closing ? RAFT_CANCELED
                                           : RAFT_NOCONNECTION);
}

static void
timer_cb(uv_timer_t *t)
{
    struct conn *c = t->data;

    pd_warn("raft", "peer %s: TLS handshake and preamble not done in %u "
            "ms; closing", c->where, c->tr->handshake_ms);
    conn_close(c);
}

static struct conn *
conn_new(struct rtls *tr, bool outbound)
{
    static const struct pd_tls_cb cbs = {on_plain, on_cipher, NULL};
    struct conn *c = calloc(1, sizeof(*c));

    if (c == NULL)
        return NULL;
    c->tls = pd_tls_new(outbound ? tr->cctx : tr->sctx, !outbound, &cbs, c);
    if (c->tls == NULL) {
        free(c);
        return NULL;
    }
    c->tr = tr;
    c->outbound = outbound;
    uv_tcp_init(tr->loop, &c->tcp);
    uv_timer_init(tr->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->handles = 2;
    tr->refs++;
    c->next = tr->pending;
    if (c->next != NULL)
        c->next->pprev = &c->next;
    tr->pending = c;
    c->pprev = &tr->pending;
    tr->npending++;
    uv_timer_start(&c->timer, timer_cb, tr->handshake_ms, 0);
    return c;
}

static void
connected_cb(uv_connect_t *req, int status)
{
    struct conn *c = req->data;

    if (c->state == C_CLOSING)
        return; /* closed meanwhile; the close cancels us */
    if (status != 0) {
        pd_trace("raft", "peer %s: connect: %s", c->where,
                 uv_strerror(status));
        conn_close(c);
        return;
    }
    describe_peer(c);
    uv_tcp_nodelay(&c->tcp, 1);
    if (pd_tls_start(c->tls) != 0 || c->dead ||
        uv_read_start((uv_stream_t *)&c->tcp, alloc_tcp, tcp_read_cb) != 0)
        conn_close(c);
}

static void
accept_cb(uv_stream_t *server, int status)
{
    struct rtls *tr = server->data;
    struct conn *c;

    if (status != 0 || tr->closing)
        return;
    c = conn_new(tr, false);
    if (c == NULL) {
        pd_warn("raft", "listener: out of memory; dropping a connection");
        return;
    }
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        conn_close(c);
        return;
    }
    describe_peer(c);
    if (tr->npending > RTLS_MAX_PENDING) {
        pd_warn("raft", "peer %s: already %u connections in their "
                "handshake; refusing this one", c->where, tr->npending - 1);
        conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    if (uv_read_start((uv_stream_t *)&c->tcp, alloc_tcp, tcp_read_cb) != 0)
        conn_close(c);
}

/* ---- struct raft_uv_transport methods ---------------------------------- */

static int
t_init(struct raft_uv_transport *t, raft_id id, const char *address)
{
    struct rtls *tr = t->impl;

    if (strlen(address) >= sizeof(tr->address))
        return RAFT_NAMETOOLONG;
    tr->id = id;
    strcpy(tr->address, address);
    return 0;
}

static int
t_listen(struct raft_uv_transport *t, raft_uv_accept_cb cb)
{
    struct rtls *tr = t->impl;
    const char *where = tr->bind[0] != '\0' ? tr->bind : tr->address;
    struct sockaddr_storage ss;
    int rv;

    tr->accept_cb = cb;
    if (parse_addr(where, &ss) != 0) {
        snprintf(t->errmsg, sizeof(t->errmsg), "bad address %.100s", where);
        return RAFT_INVALID;
    }
    rv = uv_tcp_bind(&tr->listener, (struct sockaddr *)&ss, 0);
    if (rv == 0)
        rv = uv_listen((uv_stream_t *)&tr->listener, 128, accept_cb);
    if (rv != 0) {
        snprintf(t->errmsg, sizeof(t->errmsg), "listen on %.100s: %s", where,
                 uv_strerror(rv));
        return RAFT_IOERR;
    }
    return 0;
}

static int
t_connect(struct raft_uv_transport *t, struct raft_uv_connect *req,
          raft_id id, const char *address, raft_uv_connect_cb cb)
{
    struct rtls *tr = t->impl;
    struct sockaddr_storage ss;
    struct conn *c;

    if (tr->closing)
        return RAFT_CANCELED;
    if (parse_addr(address, &ss) != 0)
        return RAFT_NOCONNECTION;
    c = conn_new(tr, true);
    if (c == NULL)
        return RAFT_NOMEM;
    req->cb = cb;
    c->req = req;
    c->peer_id = id;
    snprintf(c->peer_addr, sizeof(c->peer_addr), "%s", address);
    snprintf(c->where, sizeof(c->where), "%s", address);
    c->connect.data = c;
    if (uv_tcp_connect(&c->connect, &c->tcp, (struct sockaddr *)&ss,
                       connected_cb) != 0) {
        c->req = NULL; /* failing synchronously: no callback */
        conn_close(c);
        return RAFT_NOCONNECTION;
    }
    return 0;
}

static void
listener_closed(uv_handle_t *h)
{
    struct rtls *tr = h->data;
    raft_uv_transport_close_cb cb = tr->close_cb;
    struct raft_uv_transport *t = tr->t;

    tr_unref(tr);
    if (cb != NULL)
        cb(t);
}

static void
t_close(struct raft_uv_transport *t, raft_uv_transport_close_cb cb)
{
    struct rtls *tr = t->impl;

    tr->closing = true;
    tr->close_cb = cb;
    /* Connections raft already holds close when raft closes them; the
     * ones still in their handshake are cancelled now. */
    while (tr->pending != NULL)
        conn_close(tr->pending);
    uv_close((uv_handle_t *)&tr->listener, listener_closed);
}

int
rtls_init(struct raft_uv_transport *t, uv_loop_t *loop, SSL_CTX *server_ctx,
          SSL_CTX *client_ctx, const char *bind_address,
          unsigned handshake_ms, char *err, size_t errlen)
{
    struct rtls *tr;

    if (server_ctx == NULL || client_ctx == NULL) {
        snprintf(err, errlen, "raft TLS needs a server and a client context");
        return -EINVAL;
    }
    if (bind_address != NULL && strlen(bind_address) >= ADDR_MAX) {
        snprintf(err, errlen, "raft bind address too long");
        return -ENAMETOOLONG;
    }
    tr = calloc(1, sizeof(*tr));
    if (tr == NULL) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    memset(t, 0, sizeof(*t));
    tr->t = t;
    tr->loop = loop;
    tr->sctx = server_ctx;
    tr->cctx = client_ctx;
    tr->handshake_ms = handshake_ms != 0 ? handshake_ms : RTLS_HANDSHAKE_MS;
    if (bind_address != NULL)
        strcpy(tr->bind, bind_address);
    uv_tcp_init(loop, &tr->listener);
    tr->listener.data = tr;
    tr->refs = 1;
    t->impl = tr;
    t->init = t_init;
    t->listen = t_listen;
    t->connect = t_connect;
    t->close = t_close;
    return 0;
}

void
rtls_close(struct raft_uv_transport *t)
{
    struct rtls *tr = t->impl;

    if (tr == NULL)
        return;
    tr->released = true;
    if (!tr->closing) {
        /* raft_uv never closed it (a failed raftnode_new): close the
         * listener here; the last reference frees the rest. */
        t_close(t, NULL);
    } else if (tr->refs == 0) {
        free(tr);
    }
    t->impl = NULL;
}
