/*
 * Client pool to the agents' RPC ports (sched.h, "Agent RPC client").
 *
 * Happy path: the first request for an agent address opens its link: TCP,
 * mutual TLS with the scheduler certificate (s->rpc_client_tls), HELLO role
 * "scheduler"; the agent's HELLO (role "agent") makes the link ready. Every
 * later request to that agent shares the link under a fresh id, so one slow
 * stream never holds up another. Requests made while the link connects are
 * queued and go out as soon as TCP is up (TLS buffers them until its
 * handshake ends).
 *
 * Replies: every frame under a request's id goes to on_frame until the one
 * that ends the request: OK, EXIT, ERROR or CANCEL. FILE_READ and
 * TUNNEL_OPEN are streams opened by their OK: a read ends with the agent's
 * DATA {eof}, a tunnel once DATA {eof} went both ways (relay.c's rules).
 *
 * Flow control (msgtypes.h): the agent may have PD_STREAM_WINDOW bytes of
 * STDOUT/STDERR/DATA payload in flight per id. In the default mode the
 * client grants consumed bytes back with WINDOW after on_frame returns, in
 * batches of GRANT_BATCH (far below the window, so a sender never stalls on
 * a grant we hold back); a proxy takes over with manual mode and grants as
 * its own client drains. The other way, our DATA/STDIN payload spends the
 * credit that the agent's WINDOW frames restore (sched_areq_credit).
 *
 * Failure modes: a refused connect, no agent HELLO within
 * CONNECT_TIMEOUT_MS (covers a black-holed address and a stuck TLS
 * handshake), a rejected certificate, a peer that is not an agent, a bad
 * frame or a dropped connection: the link closes and every open request on
 * it ends with a negative errno and no frame. So does a link that stays
 * silent DEAD_MS while requests are open, despite PINGs (a frozen agent or
 * a host gone without a RST). Nothing is retried here, since only the
 * caller knows whether a request is safe to repeat; the next request
 * connects again. A link unused for IDLE_MS is closed quietly.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "proto/conn.h"
#include "proto/frame.h"
#include "proto/msgtypes.h"
#include "scheduler/sched.h"

#define CONNECT_TIMEOUT_MS 3000
/* With requests open, a link silent for PING_MS gets a PING; one silent
 * for DEAD_MS is closed: a frozen or vanished agent host sends no RST, and
 * a stream with no output is otherwise indistinguishable from it. */
#define PING_MS 3000
#define DEAD_MS 10000
/* A link unused this long is closed (an agent that moved to another
 * address would otherwise keep its old link forever). */
#define IDLE_MS (5 * 60 * 1000)
#define GRANT_BATCH (256u << 10)
#define ADDR_MAX 128
/* pd_enc_begin's placeholder: length (4), map32 tag and count (5). */
#define ENC_HDR 9

struct pframe {
    void *buf;
    size_t len;
    struct pframe *next;
};

struct alink {
    struct sched_agentc *pool; /* NULL once the pool closed */
    char addr[ADDR_MAX];
    char subject[ADDR_MAX + 8];
    uv_timer_t timer;          /* connect deadline */
    uv_timer_t ping;           /* liveness while requests are open */
    uint64_t last_rx;          /* when the agent last sent anything */
    uint64_t last_use;         /* when a request last ended or began */
    uv_connect_t creq;
    uv_tcp_t *tcp;             /* while TCP connects */
    struct pd_conn *conn;      /* from TCP up to its on_close */
    bool ready;                /* the agent's HELLO arrived */
    bool timed_out;
    bool dead;                 /* closed by the liveness check */
    int handles;               /* timer, tcp or conn still open */
    struct pframe *pending, **pending_tail;
    size_t pending_bytes;
    struct sched_areq *reqs;
    uint64_t next_id;
    struct alink *next;
};

struct sched_agentc {
    struct sched *s;
    struct alink *links;
    char name[32];
};

struct sched_areq {
    struct alink *link; /* NULL once ended */
    uint64_t id;
    unsigned type;
    struct sched_areq_cb cb;
    void *data;
    bool manual;
    bool opened;        /* FILE_READ / TUNNEL_OPEN got their OK */
    bool eof_in, eof_out;
    bool done;          /* ended or cancelled; freed when refs reach 0 */
    unsigned refs;      /* callbacks in progress */
    uint64_t credit;    /* payload we may still send */
    uint64_t ungranted; /* consumed, not yet granted back */
    struct sched_areq *next;
};

static void link_fail(struct alink *l, int err, const char *why);

/* ---- encoder surgery -------------------------------------------------- */

/* A msgpack unsigned integer at p: its value and encoded size. */
static int
mp_uint(const unsigned char *p, size_t left, uint64_t *v, size_t *n)
{
    size_t w;

    if (left < 1)
        return -EPROTO;
    if (p[0] < 0x80) {
        *v = p[0];
        *n = 1;
        return 0;
    }
    switch (p[0]) {
    case 0xcc: w = 1; break;
    case 0xcd: w = 2; break;
    case 0xce: w = 4; break;
    case 0xcf: w = 8; break;
    default: return -EPROTO;
    }
    if (left < 1 + w)
        return -EPROTO;
    *v = 0;
    for (size_t i = 0; i < w; i++)
        *v = (*v << 8) | p[1 + i];
    *n = 1 + w;
    return 0;
}

/*
 * Reads the type and rewrites the id of a frame being built. pd_enc_begin
 * always starts with "t" then "id", so both sit at a known place; the new
 * id is written as a full uint64, moving the fields after it if needed.
 */
static int
enc_set_id(struct pd_enc *e, uint64_t id, unsigned *type)
{
    unsigned char *p = (unsigned char *)e->sbuf.data;
    size_t size = e->sbuf.size, tn, in, off;
    uint64_t t, old;
    unsigned char enc[9];

    if (e->err != 0 || size < ENC_HDR + 2 || p[ENC_HDR] != 0xa1 ||
        p[ENC_HDR + 1] != 't' ||
        mp_uint(p + ENC_HDR + 2, size - ENC_HDR - 2, &t, &tn) != 0)
        return -EPROTO;
    off = ENC_HDR + 2 + tn;
    if (size < off + 3 || memcmp(p + off, "\xa2id", 3) != 0 ||
        mp_uint(p + off + 3, size - off - 3, &old, &in) != 0)
        return -EPROTO;
    off += 3;
    *type = (unsigned)t;
    enc[0] = 0xcf;
    for (int i = 0; i < 8; i++)
        enc[1 + i] = (unsigned char)(id >> (56 - 8 * i));
    if (in < sizeof(enc)) {
        size_t grow = sizeof(enc) - in;

        if (msgpack_sbuffer_write(&e->sbuf, (const char *)enc, grow) != 0)
            return -ENOMEM;
        p = (unsigned char *)e->sbuf.data;
        memmove(p + off + sizeof(enc), p + off + in, size - off - in);
    }
    memcpy(p + off, enc, sizeof(enc));
    return 0;
}

/* ---- requests --------------------------------------------------------- */

static void
req_unlink(struct sched_areq *q)
{
    struct sched_areq **pp;

    if (q->link == NULL)
        return;
    q->link->last_use = pd_now_ms();
    for (pp = &q->link->reqs; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == q) {
            *pp = q->next;
            break;
        }
    }
    q->link = NULL;
    q->next = NULL;
}

static void
req_release(struct sched_areq *q)
{
    if (q->refs == 0 && q->done)
        free(q);
}

/* Ends q with on_end, once; q is freed unless a callback still runs. */
static void
req_end(struct sched_areq *q, int status, const struct pd_msg *m)
{
    if (q->done)
        return;
    q->done = true;
    req_unlink(q);
    q->refs++;
    q->cb.on_end(q, status, m, q->data);
    q->refs--;
    req_release(q);
}

static struct sched_areq *
req_find(struct alink *l, uint64_t id)
{
    for (struct sched_areq *q = l->reqs; q != NULL; q = q->next)
        if (q->id == id)
            return q;
    return NULL;
}

static int
link_send_buf(struct alink *l, void *buf, size_t len)
{
    struct pframe *f;

    if (l->conn != NULL)
        return pd_conn_send_frame(l->conn, buf, len);
    f = malloc(sizeof(*f));
    if (f == NULL) {
        free(buf);
        return -ENOMEM;
    }
    f->buf = buf;
    f->len = len;
    f->next = NULL;
    *l->pending_tail = f;
    l->pending_tail = &f->next;
    l->pending_bytes += len;
    return 0;
}

static void
send_window(struct sched_areq *q, uint64_t bytes)
{
    struct pd_enc e;
    void *buf;
    size_t len;

    if (q->link == NULL || bytes == 0)
        return;
    pd_enc_begin(&e, PD_MSG_WINDOW, q->id);
    pd_enc_u64(&e, "bytes", bytes);
    if (pd_enc_finish(&e, &buf, &len) == 0)
        link_send_buf(q->link, buf, len);
}

/* Payload bytes of a STDOUT/STDERR/DATA frame (0 for others). */
static size_t
payload_len(const struct pd_msg *m)
{
    const void *p;
    size_t n = 0;

    if (m->type != PD_MSG_STDOUT && m->type != PD_MSG_STDERR &&
        m->type != PD_MSG_DATA)
        return 0;
    if (pd_msg_bin(m, "data", &p, &n) != 0)
        return 0;
    return n;
}

static void
req_frame(struct sched_areq *q, const struct pd_msg *m)
{
    size_t n = payload_len(m);

    q->refs++;
    q->cb.on_frame(q, m, q->data);
    q->refs--;
    if (q->done) {
        req_release(q);
        return;
    }
    if (q->manual || n == 0)
        return;
    q->ungranted += n;
    if (q->ungranted >= GRANT_BATCH) {
        send_window(q, q->ungranted);
        q->ungranted = 0;
    }
}

static void
req_writable(struct sched_areq *q)
{
    if (q->cb.on_writable == NULL || q->done)
        return;
    q->refs++;
    q->cb.on_writable(q, q->data);
    q->refs--;
    req_release(q);
}

/* One frame from the agent under q's id. */
static void
req_dispatch(struct sched_areq *q, const struct pd_msg *m)
{
    int64_t errnum = EIO;
    uint64_t bytes;
    bool eof = false;

    switch (m->type) {
    case PD_MSG_WINDOW:
        /* A grant beyond a few windows is a confused peer; cap it so the
         * credit cannot overflow. */
        if (pd_msg_u64(m, "bytes", &bytes) == 0 &&
            bytes <= 4ull * PD_STREAM_WINDOW &&
            q->credit <= 4ull * PD_STREAM_WINDOW)
            q->credit += bytes;
        req_writable(q);
        return;
    case PD_MSG_ERROR:
        pd_msg_i64(m, "errno", &errnum);
        if (errnum <= 0 || errnum > 4095)
            errnum = EIO;
        req_end(q, (int)-errnum, m);
        return;
    case PD_MSG_EXIT:
        req_end(q, 0, m);
        return;
    case PD_MSG_CANCEL:
        req_end(q, -ECANCELED, m);
        return;
    case PD_MSG_OK:
        if ((q->type == PD_MSG_FILE_READ || q->type == PD_MSG_TUNNEL_OPEN) &&
            !q->opened) {
            q->opened = true;
            req_frame(q, m);
            return;
        }
        req_end(q, 0, m);
        return;
    case PD_MSG_DATA:
        pd_msg_bool(m, "eof", &eof);
        q->refs++;
        req_frame(q, m);
        q->refs--;
        if (q->done) {
            req_release(q);
            return;
        }
        if (!eof)
            return;
        q->eof_in = true;
        if (q->type == PD_MSG_FILE_READ ||
            (q->type == PD_MSG_TUNNEL_OPEN && q->eof_out))
            req_end(q, 0, m);
        return;
    default:
        req_frame(q, m);
        return;
    }
}

/* ---- links ------------------------------------------------------------ */

static void
link_maybe_free(struct alink *l)
{
    if (l->pool == NULL && l->handles == 0)
        free(l);
}

static void
on_timer_closed(uv_handle_t *h)
{
    struct alink *l = h->data;

    l->handles--;
    link_maybe_free(l);
}

static void
on_tcp_closed(uv_handle_t *h)
{
    struct alink *l = h->data;

    free(h);
    l->handles--;
    link_maybe_free(l);
}

static void
drop_pending(struct alink *l)
{
    while (l->pending != NULL) {
        struct pframe *f = l->pending;

        l->pending = f->next;
        free(f->buf);
        free(f);
    }
    l->pending_tail = &l->pending;
    l->pending_bytes = 0;
}

/* Ends every request of the link; the link itself stays for a reconnect. */
static void
link_fail(struct alink *l, int err, const char *why)
{
    int n = 0;

    drop_pending(l);
    while (l->reqs != NULL) {
        req_end(l->reqs, err, NULL);
        n++;
    }
    if (err == 0 && n == 0) {
        pd_debug(l->subject, "link closed (%s)", why);
        return;
    }
    if (l->pool != NULL && err != -ESHUTDOWN)
        sched_metrics_inc(l->pool->s, "agent_link_failures", 1);
    if (n > 0 || err != -ESHUTDOWN)
        pd_info(l->subject, "link lost (%s); %d open request(s) failed, "
                "the next request reconnects", why, n);
}

static void
on_ping_timer(uv_timer_t *t)
{
    struct alink *l = t->data;
    uint64_t quiet = pd_now_ms() - l->last_rx;
    struct pd_enc e;

    if (l->conn == NULL)
        return;
    if (l->reqs == NULL) {
        struct pd_conn *c = l->conn;

        if (pd_now_ms() - l->last_use < IDLE_MS)
            return;
        /* Detached first: a request arriving meanwhile connects anew
         * instead of racing this close. */
        l->conn = NULL;
        l->ready = false;
        uv_timer_stop(&l->ping);
        pd_conn_close(c, 0, "idle for %d s", IDLE_MS / 1000);
        return;
    }
    if (quiet >= DEAD_MS) {
        l->dead = true;
        pd_conn_close(l->conn, -ETIMEDOUT, "agent silent for %llu ms "
                      "despite pings", (unsigned long long)quiet);
        return;
    }
    if (quiet >= PING_MS) {
        pd_enc_begin(&e, PD_MSG_PING, 0);
        pd_conn_send(l->conn, &e);
    }
}

static void
link_on_msg(struct pd_conn *c, const struct pd_msg *m)
{
    struct alink *l = pd_conn_data(c);
    struct sched_areq *q;

    if (c != l->conn)
        return; /* an idle link being closed */
    l->last_rx = pd_now_ms();
    if (m->type == PD_MSG_HELLO) {
        if (strcmp(pd_conn_peer_role(c), "agent") != 0) {
            pd_conn_close(c, -EPROTO, "peer says it is a \"%s\", not an "
                          "agent", pd_conn_peer_role(c));
            return;
        }
        /* The CA signs schedulers too: only an OU=agent certificate may
         * answer at an agent's address. */
        if (l->pool != NULL && l->pool->s->rpc_client_tls != NULL &&
            !pd_conn_peer_has_ou(c, "agent")) {
            pd_warn(l->subject, "peer certificate is not OU=agent, "
                    "closing");
            pd_conn_close(c, -EPERM, "peer certificate is not OU=agent");
            return;
        }
        l->ready = true;
        uv_timer_stop(&l->timer);
        uv_timer_start(&l->ping, on_ping_timer, PING_MS, PING_MS);
        pd_debug(l->subject, "connected to node %s", pd_conn_peer_name(c));
        return;
    }
    if (m->id == 0)
        return;
    q = req_find(l, m->id);
    if (q == NULL) {
        /* Late frames of a cancelled request are expected. */
        pd_trace("agentc", "%s: %s for no request (id %llu), ignoring",
                 l->addr, pd_msg_type_name(m->type),
                 (unsigned long long)m->id);
        return;
    }
    req_dispatch(q, m);
}

static void
link_on_close(struct pd_conn *c, int reason)
{
    struct alink *l = pd_conn_data(c);
    char why[300];
    int err;

    if (c != l->conn) {
        /* An idle link closed by on_ping_timer: nothing was open. */
        pd_debug(l->subject, "idle link closed");
        l->handles--;
        link_maybe_free(l);
        return;
    }
    snprintf(why, sizeof(why), "%s", pd_conn_error(c)[0] ? pd_conn_error(c)
                                                        : "closed by peer");
    l->conn = NULL;
    l->ready = false;
    l->handles--;
    if (l->pool != NULL) {
        uv_timer_stop(&l->timer);
        uv_timer_stop(&l->ping);
    }
    err = l->timed_out || l->dead ? -ETIMEDOUT
          : reason != 0           ? reason
          : l->reqs == NULL       ? 0
                                  : -ECONNRESET;
    l->timed_out = false;
    l->dead = false;
    link_fail(l, err, why);
    link_maybe_free(l);
}

static void
link_on_drain(struct pd_conn *c)
{
    struct alink *l = pd_conn_data(c);
    struct sched_areq *held[64];
    size_t n = 0;

    if (c != l->conn)
        return;
    /* Callbacks may end or cancel any request: hold them first. */
    for (struct sched_areq *q = l->reqs; q != NULL && n < 64; q = q->next) {
        if (q->cb.on_writable != NULL) {
            q->refs++;
            held[n++] = q;
        }
    }
    for (size_t i = 0; i < n; i++) {
        held[i]->refs--;
        if (!held[i]->done)
            req_writable(held[i]);
        else
            req_release(held[i]);
    }
}

static void
on_connect(uv_connect_t *req, int status)
{
    struct alink *l = req->data;
    uv_tcp_t *tcp = (uv_tcp_t *)req->handle;
    static const struct pd_conn_cb cb = {
        .on_msg = link_on_msg,
        .on_close = link_on_close,
        .on_drain = link_on_drain,
    };
    struct pd_conn_opts o = {
        .role = "scheduler",
        .subject = l->subject,
    };
    struct pframe *f;
    char why[160];

    l->tcp = NULL;
    if (status < 0 || l->pool == NULL) {
        if (!uv_is_closing((uv_handle_t *)tcp))
            uv_close((uv_handle_t *)tcp, on_tcp_closed);
        if (l->pool == NULL)
            return;
        snprintf(why, sizeof(why), "connect: %s",
                 l->timed_out ? "timed out" : uv_strerror(status));
        uv_timer_stop(&l->timer);
        status = l->timed_out ? -ETIMEDOUT : status;
        l->timed_out = false;
        link_fail(l, status, why);
        return;
    }
    uv_tcp_nodelay(tcp, 1);
    o.name = l->pool->name;
    o.tls = l->pool->s->rpc_client_tls;
    /* The conn owns the handle from here; its on_close drops the count. */
    tcp->data = NULL;
    l->conn = pd_conn_new((uv_stream_t *)tcp, &o, &cb, l);
    if (l->conn == NULL) {
        l->handles--;
        uv_timer_stop(&l->timer);
        link_fail(l, -ENOMEM, "out of memory");
        return;
    }
    sched_metrics_inc(l->pool->s, "agent_links_opened", 1);
    while ((f = l->pending) != NULL) {
        l->pending = f->next;
        pd_conn_send_frame(l->conn, f->buf, f->len);
        free(f);
    }
    l->pending_tail = &l->pending;
    l->pending_bytes = 0;
}

static void
on_connect_timeout(uv_timer_t *t)
{
    struct alink *l = t->data;

    l->timed_out = true;
    if (l->tcp != NULL) {
        /* on_connect follows with UV_ECANCELED. */
        uv_close((uv_handle_t *)l->tcp, on_tcp_closed);
        return;
    }
    if (l->conn != NULL && !l->ready)
        pd_conn_close(l->conn, -ETIMEDOUT, "no HELLO from the agent within "
                      "%d ms", CONNECT_TIMEOUT_MS);
}

int
sched_parse_addr(const char *text, bool port0, struct sockaddr_storage *sa)
{
    char host[64];
    const char *colon = strrchr(text, ':');
    uint64_t port;
    size_t hl;

    if (colon == NULL || pd_parse_u64(colon + 1, &port) != 0 ||
        port > 65535 || (port == 0 && !port0))
        return -EINVAL;
    hl = (size_t)(colon - text);
    if (hl >= 2 && text[0] == '[' && text[hl - 1] == ']') {
        text++;
        hl -= 2;
    }
    if (hl == 0 || hl >= sizeof(host))
        return -EINVAL;
    memcpy(host, text, hl);
    host[hl] = '\0';
    if (strcmp(host, "localhost") == 0)
        strcpy(host, "127.0.0.1");
    if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)sa) == 0)
        return 0;
    if (uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)sa) == 0)
        return 0;
    return -EINVAL;
}

static int
link_connect(struct alink *l)
{
    struct sockaddr_storage sa;
    int rv;

    if (sched_parse_addr(l->addr, false, &sa) != 0)
        return -EINVAL;
    l->tcp = malloc(sizeof(*l->tcp));
    if (l->tcp == NULL)
        return -ENOMEM;
    uv_tcp_init(l->pool->s->loop, l->tcp);
    l->tcp->data = l;
    l->handles++;
    l->creq.data = l;
    rv = uv_tcp_connect(&l->creq, l->tcp, (struct sockaddr *)&sa,
                        on_connect);
    if (rv != 0) {
        uv_close((uv_handle_t *)l->tcp, on_tcp_closed);
        l->tcp = NULL;
        return rv;
    }
    l->timed_out = false;
    uv_timer_start(&l->timer, on_connect_timeout, CONNECT_TIMEOUT_MS, 0);
    return 0;
}

static struct alink *
link_get(struct sched_agentc *p, const char *addr)
{
    struct alink *l;

    for (l = p->links; l != NULL; l = l->next)
        if (strcmp(l->addr, addr) == 0)
            return l;
    if (strlen(addr) >= ADDR_MAX)
        return NULL;
    l = calloc(1, sizeof(*l));
    if (l == NULL)
        return NULL;
    l->pool = p;
    pd_strlcpy(l->addr, addr, sizeof(l->addr));
    snprintf(l->subject, sizeof(l->subject), "agent %s", addr);
    l->pending_tail = &l->pending;
    uv_timer_init(p->s->loop, &l->timer);
    l->timer.data = l;
    uv_timer_init(p->s->loop, &l->ping);
    l->ping.data = l;
    l->handles = 2;
    l->next = p->links;
    p->links = l;
    return l;
}

/* ---- the interface ---------------------------------------------------- */

int
sched_agentc_init(struct sched *s, char *err, size_t errlen)
{
    struct sched_agentc *p = calloc(1, sizeof(*p));

    if (p == NULL) {
        snprintf(err, errlen, "agent client: out of memory");
        return -ENOMEM;
    }
    p->s = s;
    snprintf(p->name, sizeof(p->name), "%llu",
             (unsigned long long)s->cfg.id);
    s->agentc = p;
    return 0;
}

void
sched_agentc_close(struct sched *s)
{
    struct sched_agentc *p = s->agentc;

    if (p == NULL)
        return;
    s->agentc = NULL;
    while (p->links != NULL) {
        struct alink *l = p->links;

        p->links = l->next;
        link_fail(l, -ESHUTDOWN, "scheduler shutting down");
        l->pool = NULL;
        uv_close((uv_handle_t *)&l->timer, on_timer_closed);
        uv_close((uv_handle_t *)&l->ping, on_timer_closed);
        if (l->tcp != NULL) {
            uv_close((uv_handle_t *)l->tcp, on_tcp_closed);
            l->tcp = NULL;
        }
        if (l->conn != NULL)
            pd_conn_close(l->conn, 0, "scheduler shutting down");
    }
    free(p);
}

static struct sched_areq *
send_failed(struct sched_areq *q, int err)
{
    q->done = true;
    q->refs++;
    q->cb.on_end(q, err, NULL, q->data);
    free(q);
    return NULL;
}

struct sched_areq *
sched_agentc_send(struct sched *s, const char *rpc_addr, struct pd_enc *e,
                  const struct sched_areq_cb *cb, void *data)
{
    struct sched_agentc *p = s->agentc;
    struct sched_areq *q = calloc(1, sizeof(*q));
    struct alink *l;
    void *buf;
    size_t len;
    int rv;

    if (q == NULL) {
        pd_enc_discard(e);
        cb->on_end(NULL, -ENOMEM, NULL, data);
        return NULL;
    }
    q->cb = *cb;
    q->data = data;
    q->credit = PD_STREAM_WINDOW;
    if (p == NULL || s->stopping) {
        pd_enc_discard(e);
        return send_failed(q, -ESHUTDOWN);
    }
    l = link_get(p, rpc_addr != NULL ? rpc_addr : "");
    if (l == NULL) {
        pd_enc_discard(e);
        return send_failed(q, -ENOMEM);
    }
    q->id = ++l->next_id;
    rv = enc_set_id(e, q->id, &q->type);
    if (rv == 0)
        rv = pd_enc_finish(e, &buf, &len);
    else
        pd_enc_discard(e);
    if (rv != 0)
        return send_failed(q, rv);
    if (l->conn == NULL && l->tcp == NULL) {
        rv = link_connect(l);
        if (rv != 0) {
            free(buf);
            pd_info(l->subject, "cannot connect: %s", uv_strerror(rv));
            return send_failed(q, rv == -EINVAL ? -EINVAL : rv);
        }
    }
    rv = link_send_buf(l, buf, len);
    if (rv != 0)
        return send_failed(q, rv);
    sched_metrics_inc(s, "agent_requests", 1);
    /* Silence counts from when a reply is first awaited. */
    if (l->reqs == NULL)
        l->last_rx = pd_now_ms();
    l->last_use = pd_now_ms();
    q->link = l;
    q->next = l->reqs;
    l->reqs = q;
    pd_trace("agentc", "%s: %s id %llu", l->addr, pd_msg_type_name(q->type),
             (unsigned long long)q->id);
    return q;
}

int
sched_areq_send(struct sched_areq *q, struct pd_enc *e)
{
    struct alink *l = q->link;
    struct pd_msg m;
    unsigned type;
    void *buf;
    size_t len, n = 0;
    const void *data;
    bool eof = false;
    char err[64];
    int rv;

    if (q->done || l == NULL) {
        pd_enc_discard(e);
        return -ENOTCONN;
    }
    rv = enc_set_id(e, q->id, &type);
    if (rv != 0) {
        pd_enc_discard(e);
        return rv;
    }
    rv = pd_enc_finish(e, &buf, &len);
    if (rv != 0)
        return rv;
    if (type == PD_MSG_DATA || type == PD_MSG_STDIN) {
        /* Our own frame, decoded only to account for its payload. */
        if (pd_msg_decode((char *)buf + 4, len - 4, &m, err,
                          sizeof(err)) == 0) {
            if (pd_msg_bin(&m, "data", &data, &n) != 0)
                n = 0;
            pd_msg_bool(&m, "eof", &eof);
            pd_msg_release(&m);
        }
        q->credit = n < q->credit ? q->credit - n : 0;
    }
    rv = link_send_buf(l, buf, len);
    if (rv != 0)
        return rv;
    if (type == PD_MSG_DATA && eof && q->type == PD_MSG_TUNNEL_OPEN) {
        q->eof_out = true;
        if (q->eof_in)
            req_end(q, 0, NULL);
    }
    return 0;
}

void
sched_areq_cancel(struct sched_areq *q)
{
    struct pd_enc e;
    void *buf;
    size_t len;

    if (q == NULL || q->done)
        return;
    if (q->link != NULL) {
        pd_enc_begin(&e, PD_MSG_CANCEL, q->id);
        if (pd_enc_finish(&e, &buf, &len) == 0)
            link_send_buf(q->link, buf, len);
    }
    q->done = true;
    req_unlink(q);
    req_release(q);
}

void
sched_areq_manual_window(struct sched_areq *q)
{
    q->manual = true;
    if (q->ungranted > 0) {
        send_window(q, q->ungranted);
        q->ungranted = 0;
    }
}

void
sched_areq_grant(struct sched_areq *q, size_t bytes)
{
    if (!q->done)
        send_window(q, bytes);
}

uint64_t
sched_areq_id(const struct sched_areq *q)
{
    return q != NULL ? q->id : 0;
}

size_t
sched_areq_queued(const struct sched_areq *q)
{
    const struct alink *l = q != NULL ? q->link : NULL;

    if (l == NULL)
        return 0;
    return l->conn != NULL ? pd_conn_queued(l->conn) : l->pending_bytes;
}

uint64_t
sched_areq_credit(const struct sched_areq *q)
{
    return q != NULL && !q->done ? q->credit : 0;
}
