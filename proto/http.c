#include "proto/http.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <http_parser.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/log.h"
#include "common/util.h"
#include "proto/tls.h"

/*
 * How a connection moves.
 *
 * Plaintext (decrypted first when TLS is on) lands in c->in. process() runs
 * http-parser over it whenever the parser may run (can_parse), then does
 * the work the parser callbacks only recorded: dispatching a request whose
 * headers are complete, handing collected body bytes to the handler,
 * reporting the end of a body. User code therefore never runs inside
 * http_parser_execute, and every API call a handler makes only changes
 * state and schedules process() on the idle handle ("kick"), so nothing
 * re-enters.
 *
 * The parser is paused (http_parser_pause) at the end of every header
 * block that has a body, until the handler asks for the body, and at the
 * end of every message, until the response is finished: that serialises
 * pipelined requests. The socket is read only while fewer than IN_MAX
 * unparsed bytes wait, which bounds memory per connection whatever the
 * client sends and is the receive side of body backpressure.
 *
 * Server-made errors (400, 408, 413, 414, 431, 503) close the connection
 * after a lingering half-close: the response is flushed, our side is shut
 * down, and input is discarded for a short while so the client reads the
 * error instead of a reset.
 */

#define IN_MAX          (64u << 10)
#define READ_MIN        (4u << 10)
#define LINGER_MS       2000
#define LINGER_MAX      (1u << 20)
#define ERR_MSG_MAX     200

enum pstate {
    P_IDLE,  /* between requests */
    P_HEAD,  /* request line and headers */
    P_BODY,  /* body bytes */
    P_DONE,  /* message complete, the handler has it */
};

enum body_mode {
    B_NONE,
    B_WHOLE,
    B_STREAM,
};

struct hdr {
    size_t name;  /* offsets into req->hb */
    size_t value;
};

struct qparam {
    char *name;
    char *value;
};

struct conn;

struct pd_http_req {
    struct conn *c; /* NULL once the client is gone */
    struct conn *orphan_of; /* gone, and not yet told so */
    struct sockaddr_storage peer;
    char peer_s[64];
    char peer_ip[48];
    bool tls;

    /* Header arena: method, target, then NUL-terminated names and values. */
    char *hb;
    size_t hb_len, hb_cap;
    size_t target_off;
    struct hdr *hdrs;
    size_t nhdrs;
    bool in_value;
    char *path;
    struct qparam *query;
    size_t nquery;

    const char *method;
    int minor;
    bool keepalive;
    bool upgrade;
    bool has_body;
    int64_t clen;
    bool expect_continue;

    /* Body. */
    enum body_mode mode;
    bool msg_done;      /* the parser saw the end of the message */
    bool body_reported; /* the end (or an error) went to the handler */
    bool paused;
    uint64_t body_max;
    uint64_t body_seen;
    int body_err;
    char *body;         /* B_WHOLE: the body; B_STREAM: bytes to deliver */
    size_t body_len, body_cap, body_off;
    pd_http_body_cb whole_cb;
    struct pd_http_body_stream_cb stream_cb;
    void *body_arg;

    /* For pd_http_read_json. */
    const struct pd_json_field *json_fields;
    size_t json_nfields;
    pd_http_json_cb json_cb;
    void *json_arg;

    /* Response. */
    char *rh;           /* extra header lines */
    size_t rh_len;
    bool started;
    bool chunked;
    bool head;
    bool no_body;
    bool close_delimited;
    int64_t rlen;       /* declared length, -1 for chunked */
    uint64_t rsent;

    void (*on_abort)(struct pd_http_req *r, void *arg);
    void (*on_drain)(struct pd_http_req *r, void *arg);
    void *data;

    int status;         /* of the response, 0 until it starts */
    bool injected;
    void (*on_done)(void *arg, int status);
    void *done_arg;
};

struct pd_http_raw {
    struct conn *c;
    struct pd_http_raw_cb cb;
    void *arg;
    bool paused;
};

struct wr {
    uv_write_t w;
    struct conn *c;
    size_t len;
    char data[];
};

struct conn {
    struct pd_http_server *srv;
    struct conn *prev, *next;
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_idle_t kick;
    uv_shutdown_t shut;
    int handles;            /* open handles; freed at 0 */
    struct pd_tls *tls;
    http_parser parser;

    struct sockaddr_storage peer;
    char peer_s[64];
    char peer_ip[48];

    char *in;
    size_t in_len, in_off, in_cap;
    bool reading;
    bool eof;

    enum pstate pstate;
    uint64_t deadline;      /* header or idle deadline, pd_now_ms */
    struct pd_http_req *req; /* being parsed or handled */
    bool dispatched;
    int err_status;
    char err_msg[ERR_MSG_MAX];

    size_t queued;
    bool over_high;
    bool closing;           /* uv_close started */
    bool lingering;
    bool close_after_flush;
    size_t discarded;

    struct pd_http_raw *raw;
    struct pd_http_req *orphan; /* cut loose, to be told at close */
    int reason;
    bool tls_shut;

    /* Injected (pd_http_server_inject): no socket; output is collected
     * here and handed to inj_done when the connection ends. */
    bool injected;
    char *resp;
    size_t resp_len, resp_cap;
    pd_http_inject_cb inj_done;
    void *inj_arg;
};

struct pd_http_server {
    uv_loop_t *loop;
    uv_tcp_t listener;
    bool listening;
    struct pd_http_limits lim;
    SSL_CTX *tls;
    void (*on_request)(struct pd_http_req *r, void *arg);
    void *arg;
    struct conn *conns;
    unsigned nconns;
    int port;
    bool closing;
    bool listener_closed;
    unsigned nalloc;            /* connections not yet freed */
    void (*on_closed)(void *arg);
    void *closed_arg;
    char cipher_buf[IN_MAX];
};

static void process(struct conn *c);
static void kick(struct conn *c);
static void rearm(struct conn *c);
static void conn_abort(struct conn *c, int reason);
static void conn_end(struct conn *c);
static void req_free(struct pd_http_req *r);
static int out(struct conn *c, const void *data, size_t len);

/* ---- small helpers ----------------------------------------------------- */

void
pd_http_limits_default(struct pd_http_limits *l)
{
    l->max_header_bytes = 16u << 10;
    l->max_headers = 100;
    l->max_url = 8u << 10;
    l->max_body = 1u << 20;
    l->header_timeout_ms = 10000;
    l->idle_timeout_ms = 60000;
    l->body_timeout_ms = 60000;
    l->write_timeout_ms = 60000;
    l->max_conns = 1024;
}

const char *
pd_http_reason(int status)
{
    switch (status) {
#define XX(num, name, string) \
    case num:                 \
        return #string;
        HTTP_STATUS_MAP(XX)
#undef XX
    default:
        return "Unknown";
    }
}

const char *
pd_http_status_code(int status)
{
    switch (status) {
    case 400: return "bad_request";
    case 401: return "unauthorized";
    case 403: return "forbidden";
    case 404: return "not_found";
    case 405: return "method_not_allowed";
    case 408: return "request_timeout";
    case 409: return "conflict";
    case 413: return "body_too_large";
    case 414: return "uri_too_long";
    case 415: return "unsupported_media_type";
    case 429: return "rate_limited";
    case 431: return "headers_too_large";
    case 501: return "not_implemented";
    case 502: return "bad_gateway";
    case 503: return "unavailable";
    case 504: return "gateway_timeout";
    default:  return status >= 500 ? "internal" : "error";
    }
}

static int
hexval(int ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

int
pd_http_pct_decode(const char *in, size_t len, char *out_, size_t *outlen,
                   bool plus_space)
{
    size_t i, o = 0;

    for (i = 0; i < len; i++) {
        char ch = in[i];

        if (ch == '%') {
            int hi, lo;

            if (i + 2 >= len)
                return -EINVAL;
            hi = hexval((unsigned char)in[i + 1]);
            lo = hexval((unsigned char)in[i + 2]);
            if (hi < 0 || lo < 0 || (hi == 0 && lo == 0))
                return -EINVAL;
            out_[o++] = (char)(hi << 4 | lo);
            i += 2;
        } else if (ch == '\0') {
            return -EINVAL;
        } else if (ch == '+' && plus_space) {
            out_[o++] = ' ';
        } else {
            out_[o++] = ch;
        }
    }
    out_[o] = '\0';
    if (outlen != NULL)
        *outlen = o;
    return 0;
}

char *
pd_http_pct_encode(const char *in, size_t len)
{
    static const char hex[] = "0123456789ABCDEF";
    char *o = malloc(len * 3 + 1);
    size_t i, n = 0;

    if (o == NULL)
        return NULL;
    for (i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)in[i];

        if (isalnum(ch) || ch == '-' || ch == '.' || ch == '_' ||
            ch == '~') {
            o[n++] = (char)ch;
        } else {
            o[n++] = '%';
            o[n++] = hex[ch >> 4];
            o[n++] = hex[ch & 15];
        }
    }
    o[n] = '\0';
    return o;
}

/* ---- output ------------------------------------------------------------ */

static void
on_write(uv_write_t *w, int status)
{
    struct wr *x = (struct wr *)w;
    struct conn *c = x->c;

    c->queued -= x->len;
    free(x);
    if (status < 0) {
        conn_abort(c, status == UV_ECANCELED ? -ECANCELED : -EPIPE);
        return;
    }
    if (c->closing)
        return;
    if (c->over_high && c->queued < PD_HTTP_LOW_WATER) {
        c->over_high = false;
        if (c->raw != NULL && c->raw->cb.on_drain != NULL)
            c->raw->cb.on_drain(c->raw, c->raw->arg);
        else if (c->req != NULL && c->dispatched &&
                 c->req->on_drain != NULL)
            c->req->on_drain(c->req, c->req->data);
        kick(c);
    }
    if (c->queued == 0 && c->close_after_flush && !c->lingering &&
        c->req == NULL)
        conn_end(c);
    else
        rearm(c);
}

/* An injected connection's output: kept whole for its owner. */
static int
inject_out(struct conn *c, const void *data, size_t len)
{
    if (c->resp_len + len > c->resp_cap) {
        size_t cap = (c->resp_len + len) * 2;
        char *p = realloc(c->resp, cap);

        if (p == NULL) {
            conn_abort(c, -ENOMEM);
            return -ENOTCONN;
        }
        c->resp = p;
        c->resp_cap = cap;
    }
    memcpy(c->resp + c->resp_len, data, len);
    c->resp_len += len;
    return 0;
}

/* Queues bytes for the socket (ciphertext when TLS is on). */
static int
sock_write(struct conn *c, const void *data, size_t len)
{
    struct wr *x;
    uv_buf_t b;
    int rv;

    if (c->closing || c->lingering)
        return -ENOTCONN;
    if (len == 0)
        return 0;
    if (c->injected)
        return inject_out(c, data, len);
    x = malloc(sizeof(*x) + len);
    if (x == NULL)
        return -ENOMEM;
    memcpy(x->data, data, len);
    x->c = c;
    x->len = len;
    b = uv_buf_init(x->data, (unsigned)len);
    rv = uv_write(&x->w, (uv_stream_t *)&c->tcp, &b, 1, on_write);
    if (rv < 0) {
        free(x);
        conn_abort(c, -EPIPE);
        return -ENOTCONN;
    }
    c->queued += len;
    if (c->queued >= PD_HTTP_HIGH_WATER)
        c->over_high = true;
    return 0;
}

static void
tls_on_cipher(void *arg, const void *data, size_t len)
{
    sock_write(arg, data, len);
}

static void
tls_on_plain(void *arg, const void *data, size_t len)
{
    struct conn *c = arg;

    if (c->lingering)
        return;
    if (c->in_len + len > c->in_cap) {
        size_t cap = c->in_len + len + READ_MIN;
        char *p = realloc(c->in, cap);

        if (p == NULL) {
            conn_abort(c, -ENOMEM);
            return;
        }
        c->in = p;
        c->in_cap = cap;
    }
    memcpy(c->in + c->in_len, data, len);
    c->in_len += len;
}

/* Plaintext out: through TLS when it is on. */
static int
out(struct conn *c, const void *data, size_t len)
{
    if (c->closing || c->lingering)
        return -ENOTCONN;
    if (c->tls != NULL) {
        int rv = pd_tls_write(c->tls, data, len);

        if (rv < 0)
            conn_abort(c, rv);
        return c->closing ? -ENOTCONN : rv;
    }
    return sock_write(c, data, len);
}

/* ---- connection teardown ------------------------------------------------ */

static void
server_maybe_free(struct pd_http_server *s)
{
    if (!s->closing || !s->listener_closed || s->nalloc > 0)
        return;
    if (s->on_closed != NULL)
        s->on_closed(s->closed_arg);
    free(s);
}

/*
 * Tells the handler or the raw owner that the connection is gone. This
 * runs from a close callback, never inside one of their own calls, so a
 * handler may finish its request from here without re-entering anything.
 */
static void
notify(struct conn *c)
{
    struct pd_http_req *r = c->orphan;

    if (r != NULL) {
        c->orphan = NULL;
        r->orphan_of = NULL;
        if (r->mode != B_NONE && !r->body_reported) {
            r->body_reported = true;
            if (r->mode == B_WHOLE)
                r->whole_cb(r, -ECONNRESET, NULL, 0, r->body_arg);
            else
                r->stream_cb.on_end(r, -ECONNRESET, r->body_arg);
        } else if (r->on_abort != NULL) {
            r->on_abort(r, r->data);
        }
    }
    if (c->raw != NULL)
        c->raw->cb.on_close(c->raw, c->reason, c->raw->arg);
}

static void
on_handle_closed(uv_handle_t *h)
{
    struct conn *c = h->data;
    struct pd_http_server *s = c->srv;

    if (--c->handles > 0)
        return;
    notify(c);
    if (c->injected && c->inj_done != NULL)
        c->inj_done(c->inj_arg, c->reason, c->resp, c->resp_len);
    free(c->resp);
    pd_tls_free(c->tls);
    free(c->in);
    free(c->raw);
    free(c);
    s->nalloc--;
    server_maybe_free(s);
}

/*
 * Cuts the request or the raw owner loose at once: their calls fail with
 * -ENOTCONN from now on; notify() tells them later.
 */
static void
detach(struct conn *c, int reason)
{
    struct pd_http_req *r = c->req;

    c->req = NULL;
    c->reason = reason;
    if (r != NULL && !c->dispatched) {
        req_free(r);
    } else if (r != NULL) {
        r->c = NULL;
        r->orphan_of = c;
        c->orphan = r;
    }
    if (c->raw != NULL)
        c->raw->c = NULL;
}

/* Closes at once, dropping queued writes. */
static void
conn_abort(struct conn *c, int reason)
{
    struct pd_http_server *s = c->srv;

    if (c->closing)
        return;
    c->closing = true;
    pd_debug("http", "%s: connection closed (%s)", c->peer_s,
             reason == 0 ? "done" : strerror(-reason));
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    s->nconns--;
    detach(c, reason);
    if (!c->injected)
        uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
    uv_close((uv_handle_t *)&c->timer, on_handle_closed);
    uv_close((uv_handle_t *)&c->kick, on_handle_closed);
}

static void
on_shutdown(uv_shutdown_t *sh, int status)
{
    struct conn *c = sh->data;

    if (status < 0 || c->closing)
        conn_abort(c, 0);
}

/*
 * Graceful end: flush, half-close our side, then read and discard what the
 * client still sends for a moment, so it sees our last response rather than
 * a reset caused by unread input.
 */
static void
conn_end(struct conn *c)
{
    if (c->closing || c->lingering)
        return;
    if (c->injected) {
        /* Nothing to flush or linger for: the output is in c->resp. */
        conn_abort(c, 0);
        return;
    }
    c->close_after_flush = true;
    if (c->tls != NULL && !c->tls_shut) {
        c->tls_shut = true;
        pd_tls_shutdown(c->tls);
        if (c->closing)
            return;
    }
    if (c->queued > 0)
        return;
    detach(c, 0);
    c->lingering = true;
    c->shut.data = c;
    if (uv_shutdown(&c->shut, (uv_stream_t *)&c->tcp, on_shutdown) < 0) {
        conn_abort(c, 0);
        return;
    }
    rearm(c);
    kick(c);
}

/* ---- timers ------------------------------------------------------------ */

static bool
body_wanted(const struct conn *c)
{
    const struct pd_http_req *r = c->req;

    return r != NULL && c->dispatched && r->mode != B_NONE &&
           !r->msg_done && !r->paused && r->body_err == 0;
}

static void
on_timer(uv_timer_t *t)
{
    struct conn *c = t->data;
    struct pd_http_req *r = c->req;

    if (c->closing)
        return;
    if (c->lingering) {
        conn_abort(c, 0);
        return;
    }
    if (c->queued > 0) {
        conn_abort(c, -ETIMEDOUT);
        return;
    }
    if (c->pstate == P_HEAD && !c->dispatched) {
        c->err_status = 408;
        snprintf(c->err_msg, sizeof(c->err_msg),
                 "the request headers did not arrive in time");
        kick(c);
        return;
    }
    if (body_wanted(c)) {
        r->body_err = -ETIMEDOUT;
        kick(c);
        return;
    }
    if (c->req == NULL && c->pstate == P_IDLE)
        conn_abort(c, 0);
}

static void
start_timer(struct conn *c, uint64_t ms)
{
    uv_timer_start(&c->timer, on_timer, ms, 0);
}

static void
rearm(struct conn *c)
{
    const struct pd_http_limits *l = &c->srv->lim;
    uint64_t now = pd_now_ms();

    if (c->closing)
        return;
    if (c->lingering) {
        start_timer(c, c->eof ? 0 : LINGER_MS);
    } else if (c->raw != NULL) {
        uv_timer_stop(&c->timer);
    } else if (c->queued > 0) {
        start_timer(c, l->write_timeout_ms);
    } else if ((c->pstate == P_HEAD && !c->dispatched) ||
               (c->pstate == P_IDLE && c->req == NULL)) {
        start_timer(c, c->deadline > now ? c->deadline - now : 0);
    } else if (body_wanted(c)) {
        start_timer(c, l->body_timeout_ms);
    } else {
        uv_timer_stop(&c->timer);
    }
}

/* ---- server-made responses --------------------------------------------- */

static char *
error_json(const char *code, const char *msg)
{
    json_t *j = json_pack("{s:{s:s,s:s}}", "error", "code", code,
                          "message", msg);
    char *s = j != NULL ? json_dumps(j, JSON_COMPACT) : NULL;

    json_decref(j);
    return s;
}

/* Answers without a handler (parse errors, limits) and ends the
 * connection. */
static void
conn_fail(struct conn *c, int status, const char *msg)
{
    char head[256];
    char *body = error_json(pd_http_status_code(status), msg);
    size_t blen = body != NULL ? strlen(body) : 0;
    int n;

    pd_debug("http", "%s: %d: %s", c->peer_s, status, msg);
    n = snprintf(head, sizeof(head),
                 "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                 "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                 status, pd_http_reason(status), blen + 1);
    if (c->req != NULL && !c->dispatched) {
        req_free(c->req);
        c->req = NULL;
    }
    if (out(c, head, (size_t)n) == 0 && body != NULL) {
        out(c, body, blen);
        out(c, "\n", 1);
    }
    free(body);
    conn_end(c);
}

/* ---- parser callbacks --------------------------------------------------- */

static int
fail_cb(struct conn *c, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int
fail_cb(struct conn *c, int status, const char *fmt, ...)
{
    va_list ap;

    if (c->err_status == 0) {
        c->err_status = status;
        va_start(ap, fmt);
        vsnprintf(c->err_msg, sizeof(c->err_msg), fmt, ap);
        va_end(ap);
    }
    return -1;
}

static int
hb_append(struct conn *c, const char *at, size_t len)
{
    struct pd_http_req *r = c->req;
    size_t max = c->srv->lim.max_header_bytes;

    if (r->hb_len + len + 1 > max + 64)
        return fail_cb(c, 431, "request headers are larger than %zu bytes",
                       max);
    if (r->hb_len + len + 1 > r->hb_cap) {
        size_t cap = r->hb_cap * 2;
        char *p;

        while (cap < r->hb_len + len + 1)
            cap *= 2;
        p = realloc(r->hb, cap);
        if (p == NULL)
            return fail_cb(c, 503, "out of memory");
        r->hb = p;
        r->hb_cap = cap;
    }
    memcpy(r->hb + r->hb_len, at, len);
    r->hb_len += len;
    r->hb[r->hb_len] = '\0';
    return 0;
}

static int
hb_terminate(struct conn *c)
{
    struct pd_http_req *r = c->req;
    int rv = hb_append(c, "", 0);

    if (rv == 0)
        r->hb_len++; /* keep the NUL */
    return rv;
}

static int
on_message_begin(http_parser *p)
{
    struct conn *c = p->data;
    struct pd_http_req *r = calloc(1, sizeof(*r));

    if (r == NULL)
        return fail_cb(c, 503, "out of memory");
    r->hb_cap = 1024;
    r->hb = malloc(r->hb_cap);
    if (r->hb == NULL) {
        free(r);
        return fail_cb(c, 503, "out of memory");
    }
    r->hb[0] = '\0';
    r->c = c;
    r->clen = -1;
    r->rlen = -1;
    c->req = r;
    c->dispatched = false;
    c->pstate = P_HEAD;
    c->deadline = pd_now_ms() + c->srv->lim.header_timeout_ms;
    return 0;
}

static int
check_head_size(struct conn *c)
{
    if (c->parser.nread > c->srv->lim.max_header_bytes)
        return fail_cb(c, 431, "request headers are larger than %zu bytes",
                       c->srv->lim.max_header_bytes);
    return 0;
}

static int
on_url(http_parser *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    struct pd_http_req *r = c->req;

    if (r->hb_len + len > c->srv->lim.max_url)
        return fail_cb(c, 414, "the request target is longer than %zu "
                       "bytes", c->srv->lim.max_url);
    return hb_append(c, at, len);
}

static int
on_header_field(http_parser *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    struct pd_http_req *r = c->req;

    if (check_head_size(c) != 0)
        return -1;
    if (r->nhdrs == 0 && !r->in_value) {
        /* The target ends here. */
        if (r->target_off == 0 && hb_terminate(c) != 0)
            return -1;
    }
    if (r->in_value || r->nhdrs == 0) {
        struct hdr *h;

        if (r->nhdrs > 0 && hb_terminate(c) != 0)
            return -1;
        if (r->nhdrs >= c->srv->lim.max_headers)
            return fail_cb(c, 431, "more than %u request headers",
                           c->srv->lim.max_headers);
        h = realloc(r->hdrs, (r->nhdrs + 1) * sizeof(*h));
        if (h == NULL)
            return fail_cb(c, 503, "out of memory");
        r->hdrs = h;
        h[r->nhdrs].name = r->hb_len;
        h[r->nhdrs].value = 0;
        r->nhdrs++;
        r->in_value = false;
    }
    return hb_append(c, at, len);
}

static int
on_header_value(http_parser *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    struct pd_http_req *r = c->req;

    if (check_head_size(c) != 0)
        return -1;
    if (!r->in_value) {
        if (hb_terminate(c) != 0)
            return -1;
        r->hdrs[r->nhdrs - 1].value = r->hb_len;
        r->in_value = true;
    }
    return hb_append(c, at, len);
}

/* Trims header values in place (the parser keeps trailing blanks). */
static void
trim_values(struct pd_http_req *r)
{
    size_t i;

    for (i = 0; i < r->nhdrs; i++) {
        char *v;
        size_t n;

        if (r->hdrs[i].value == 0) {
            r->hdrs[i].value = r->hdrs[i].name + strlen(r->hb +
                                                        r->hdrs[i].name);
            continue; /* points at the name's NUL: empty value */
        }
        v = r->hb + r->hdrs[i].value;
        n = strlen(v);
        while (n > 0 && (v[n - 1] == ' ' || v[n - 1] == '\t'))
            v[--n] = '\0';
        while (*v == ' ' || *v == '\t') {
            v++;
            r->hdrs[i].value++;
        }
    }
}

static bool
has_ctl(const char *s)
{
    for (; *s != '\0'; s++) {
        unsigned char ch = (unsigned char)*s;

        if ((ch < 0x20 && ch != '\t') || ch == 0x7f)
            return true;
    }
    return false;
}

static bool token_ok(const char *s, bool value);

static int
count_header(const struct pd_http_req *r, const char *name,
             const char **first)
{
    size_t i;
    int n = 0;

    for (i = 0; i < r->nhdrs; i++) {
        if (strcasecmp(r->hb + r->hdrs[i].name, name) == 0) {
            if (n++ == 0 && first != NULL)
                *first = r->hb + r->hdrs[i].value;
        }
    }
    return n;
}

static int
parse_query(struct conn *c, struct pd_http_req *r, const char *q, size_t qlen)
{
    const char *p = q, *end = q + qlen;

    while (p < end) {
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *stop = amp != NULL ? amp : end;
        const char *eq = memchr(p, '=', (size_t)(stop - p));
        size_t klen = (size_t)((eq != NULL ? eq : stop) - p);
        const char *v = eq != NULL ? eq + 1 : stop;
        size_t vlen = (size_t)(stop - v);
        struct qparam *qp;
        char *k, *val;

        if (klen == 0 && vlen == 0) {
            p = stop + 1;
            continue;
        }
        qp = realloc(r->query, (r->nquery + 1) * sizeof(*qp));
        if (qp == NULL)
            return fail_cb(c, 503, "out of memory");
        r->query = qp;
        k = malloc(klen + 1);
        val = malloc(vlen + 1);
        if (k == NULL || val == NULL) {
            free(k);
            free(val);
            return fail_cb(c, 503, "out of memory");
        }
        if (pd_http_pct_decode(p, klen, k, NULL, true) < 0 ||
            pd_http_pct_decode(v, vlen, val, NULL, true) < 0) {
            free(k);
            free(val);
            return fail_cb(c, 400, "bad percent-encoding in the query");
        }
        qp[r->nquery].name = k;
        qp[r->nquery].value = val;
        r->nquery++;
        p = stop + 1;
    }
    return 0;
}

static int
parse_target(struct conn *c, struct pd_http_req *r)
{
    const char *t = r->hb + r->target_off;
    size_t tlen = strlen(t);
    struct http_parser_url u;
    const char *path = "/";
    size_t plen = 1;
    char *check;
    int rv;

    if (r->method[0] == 'O' && strcmp(t, "*") == 0) {
        path = "*";
    } else {
        http_parser_url_init(&u);
        if (http_parser_parse_url(t, tlen, 0, &u) != 0)
            return fail_cb(c, 400, "bad request target");
        if (u.field_set & (1 << UF_PATH)) {
            path = t + u.field_data[UF_PATH].off;
            plen = u.field_data[UF_PATH].len;
        }
        if (u.field_set & (1 << UF_QUERY)) {
            rv = parse_query(c, r, t + u.field_data[UF_QUERY].off,
                             u.field_data[UF_QUERY].len);
            if (rv != 0)
                return rv;
        }
    }
    r->path = strndup(path, plen);
    check = malloc(plen + 1);
    if (r->path == NULL || check == NULL) {
        free(check);
        return fail_cb(c, 503, "out of memory");
    }
    rv = pd_http_pct_decode(path, plen, check, NULL, false);
    free(check);
    if (rv < 0)
        return fail_cb(c, 400, "bad percent-encoding in the path");
    return 0;
}

static int
validate_headers(struct conn *c, struct pd_http_req *r)
{
    const char *te = NULL, *host = NULL;
    size_t i;
    int ncl, nte, nhost;

    for (i = 0; i < r->nhdrs; i++) {
        /* The parser lets blanks into names ("Content-Length : 5"),
         * which other servers read differently: refuse them. */
        if (!token_ok(r->hb + r->hdrs[i].name, false))
            return fail_cb(c, 400, "bad header name '%s'",
                           r->hb + r->hdrs[i].name);
        if (has_ctl(r->hb + r->hdrs[i].value))
            return fail_cb(c, 400, "control character in header '%s'",
                           r->hb + r->hdrs[i].name);
    }
    ncl = count_header(r, "content-length", NULL);
    nte = count_header(r, "transfer-encoding", &te);
    nhost = count_header(r, "host", &host);
    if (ncl > 1)
        return fail_cb(c, 400, "more than one Content-Length header");
    if (ncl > 0 && nte > 0)
        return fail_cb(c, 400, "both Content-Length and Transfer-Encoding");
    if (nte > 1 || (nte == 1 && strcasecmp(te, "chunked") != 0))
        return fail_cb(c, 400, "unsupported Transfer-Encoding (only a "
                       "single \"chunked\" is accepted)");
    if (nte == 1 && r->minor == 0)
        return fail_cb(c, 400, "Transfer-Encoding in an HTTP/1.0 request");
    if (nhost > 1 || (nhost == 0 && r->minor == 1))
        return fail_cb(c, 400, "an HTTP/1.1 request needs exactly one "
                       "Host header");
    return 0;
}

static int
on_headers_complete(http_parser *p)
{
    struct conn *c = p->data;
    struct pd_http_req *r = c->req;
    const char *expect = NULL;

    if (check_head_size(c) != 0)
        return -1;
    if (r->nhdrs == 0 && r->target_off == 0 && hb_terminate(c) != 0)
        return -1;
    if (r->nhdrs > 0 && hb_terminate(c) != 0)
        return -1;
    trim_values(r);
    r->method = http_method_str((enum http_method)p->method);
    r->minor = p->http_major == 1 ? p->http_minor : 0;
    if (p->http_major != 1)
        return fail_cb(c, 400, "only HTTP/1.x is served");
    if (p->method == HTTP_CONNECT)
        return fail_cb(c, 405, "CONNECT is not supported");
    if (validate_headers(c, r) != 0 || parse_target(c, r) != 0)
        return -1;
    r->has_body = (p->flags & F_CHUNKED) ||
                  (p->content_length > 0 && p->content_length != ULLONG_MAX);
    if (p->flags & F_CHUNKED)
        r->clen = -1;
    else if (p->content_length == ULLONG_MAX)
        r->clen = 0; /* a request without Content-Length has no body */
    else
        r->clen = (int64_t)p->content_length;
    r->upgrade = p->upgrade != 0;
    if (r->upgrade && r->has_body)
        return fail_cb(c, 400, "an upgrade request cannot have a body");
    r->keepalive = http_should_keep_alive(p) && r->minor == 1;
    r->head = p->method == HTTP_HEAD;
    if (count_header(r, "expect", &expect) > 0)
        r->expect_continue = strcasecmp(expect, "100-continue") == 0;
    c->dispatched = false;
    if (r->has_body) {
        /* Wait for the handler to ask for the body. */
        c->pstate = P_BODY;
        http_parser_pause(p, 1);
    }
    return 0;
}

static int
body_append(struct conn *c, struct pd_http_req *r, const char *at,
            size_t len)
{
    if (r->body_len + len > r->body_cap) {
        size_t cap = r->body_cap > 0 ? r->body_cap : 4096;
        char *b;

        while (cap < r->body_len + len + 1)
            cap *= 2;
        b = realloc(r->body, cap);
        if (b == NULL)
            return fail_cb(c, 503, "out of memory");
        r->body = b;
        r->body_cap = cap;
    }
    memcpy(r->body + r->body_len, at, len);
    r->body_len += len;
    return 0;
}

static int
on_body(http_parser *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    struct pd_http_req *r = c->req;

    r->body_seen += len;
    if (r->body_max > 0 && r->body_seen > r->body_max) {
        r->body_err = -EMSGSIZE;
        return -1;
    }
    if (body_append(c, r, at, len) != 0) {
        r->body_err = -ENOMEM;
        return -1;
    }
    return 0;
}

static int
on_message_complete(http_parser *p)
{
    struct conn *c = p->data;

    c->pstate = P_DONE;
    if (c->req != NULL)
        c->req->msg_done = true;
    http_parser_pause(p, 1);
    return 0;
}

static const http_parser_settings settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* ---- the connection loop ------------------------------------------------ */

static bool
can_parse(const struct conn *c)
{
    const struct pd_http_req *r = c->req;

    if (c->closing || c->lingering || c->raw != NULL || c->err_status != 0)
        return false;
    if (r == NULL)
        return c->queued < PD_HTTP_HIGH_WATER && !c->close_after_flush;
    if (!c->dispatched)
        return c->pstate == P_HEAD || c->pstate == P_IDLE;
    if (r->msg_done || r->body_err != 0)
        return false;
    return r->mode != B_NONE && !r->paused;
}

static void
update_reading(struct conn *c);

static void
dispatch(struct conn *c)
{
    struct pd_http_req *r = c->req;

    c->dispatched = true;
    r->peer = c->peer;
    memcpy(r->peer_s, c->peer_s, sizeof(r->peer_s));
    memcpy(r->peer_ip, c->peer_ip, sizeof(r->peer_ip));
    r->tls = c->tls != NULL;
    r->injected = c->injected;
    pd_debug("http", "%s: %s %s", c->peer_s, r->method,
             r->hb + r->target_off);
    c->srv->on_request(r, c->srv->arg);
}

/* Hands collected body bytes, the end, or an error to the handler. */
static void
deliver_body(struct conn *c)
{
    struct pd_http_req *r = c->req;

    if (r == NULL || !c->dispatched || r->mode == B_NONE ||
        r->body_reported)
        return;
    if (r->mode == B_STREAM) {
        while (c->req == r && !r->paused && r->body_off < r->body_len) {
            size_t off = r->body_off, n = r->body_len - off;

            r->body_off = r->body_len;
            r->stream_cb.on_data(r, r->body + off, n, r->body_arg);
        }
        if (c->req != r)
            return;
        if (r->body_off == r->body_len)
            r->body_off = r->body_len = 0;
        if (r->paused)
            return;
    }
    if (r->body_err == 0 && !r->msg_done)
        return;
    r->body_reported = true;
    if (r->body_err != 0)
        c->close_after_flush = true;
    if (r->mode == B_WHOLE) {
        if (r->body_err == 0 && body_append(c, r, "", 1) != 0)
            r->body_err = -ENOMEM;
        r->whole_cb(r, r->body_err, r->body_err == 0 ? r->body : NULL,
                    r->body_err == 0 ? r->body_len - 1 : 0, r->body_arg);
    } else {
        r->stream_cb.on_end(r, r->body_err, r->body_arg);
    }
}

static void
parse_error(struct conn *c)
{
    enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
    struct pd_http_req *r = c->req;

    if (r != NULL && c->dispatched) {
        /* A body went wrong under a handler: it answers. */
        if (r->body_err == 0)
            r->body_err = c->err_status == 503 ? -ENOMEM : -EPROTO;
        c->err_status = 0;
        c->close_after_flush = true;
        return;
    }
    if (c->err_status != 0) {
        conn_fail(c, c->err_status, c->err_msg);
        return;
    }
    if (e == HPE_HEADER_OVERFLOW) {
        conn_fail(c, 431, "request headers too large");
        return;
    }
    {
        char msg[ERR_MSG_MAX];

        snprintf(msg, sizeof(msg), "malformed request: %s",
                 http_errno_description(e));
        conn_fail(c, 400, msg);
    }
}

static void
process_raw(struct conn *c)
{
    struct pd_http_raw *x = c->raw;

    while (!c->closing && x->c != NULL && !x->paused &&
           c->in_off < c->in_len) {
        size_t off = c->in_off, n = c->in_len - off;

        c->in_off = c->in_len;
        x->cb.on_data(x, c->in + off, n, x->arg);
    }
    if (c->closing)
        return;
    if (c->in_off == c->in_len)
        c->in_off = c->in_len = 0;
    if (c->eof && c->in_len == 0)
        conn_end(c);
}

static void
process(struct conn *c)
{
    for (;;) {
        size_t n, avail;
        enum http_errno e;

        if (c->closing || c->lingering)
            return;
        if (c->raw != NULL) {
            process_raw(c);
            break;
        }
        if (c->err_status != 0 && (c->req == NULL || !c->dispatched)) {
            conn_fail(c, c->err_status, c->err_msg);
            return;
        }
        if (c->eof && c->in_off == c->in_len && c->req != NULL &&
            c->dispatched && c->req->has_body && !c->req->msg_done &&
            c->req->body_err == 0) {
            /* The client stopped sending in the middle of its body. */
            c->req->body_err = -ECONNRESET;
        }
        deliver_body(c);
        if (c->closing || c->lingering || c->raw != NULL)
            continue;
        avail = c->in_len - c->in_off;
        if (!can_parse(c) || avail == 0)
            break;
        http_parser_pause(&c->parser, 0);
        n = http_parser_execute(&c->parser, &settings, c->in + c->in_off,
                                avail);
        c->in_off += n;
        e = HTTP_PARSER_ERRNO(&c->parser);
        if (e != HPE_OK && e != HPE_PAUSED) {
            parse_error(c);
            continue;
        }
        if (c->req != NULL && !c->dispatched &&
            (c->pstate == P_BODY || c->pstate == P_DONE))
            dispatch(c);
    }
    if (c->closing || c->lingering)
        return;
    if (c->in_off == c->in_len)
        c->in_off = c->in_len = 0;
    if (c->eof && c->raw == NULL && c->in_off == c->in_len &&
        (c->req == NULL || !c->dispatched)) {
        /* The client finished sending and nothing is in progress. */
        conn_end(c);
        return;
    }
    update_reading(c);
    rearm(c);
}

static void
on_kick(uv_idle_t *h)
{
    struct conn *c = h->data;

    uv_idle_stop(h);
    process(c);
}

static void
kick(struct conn *c)
{
    if (!c->closing)
        uv_idle_start(&c->kick, on_kick);
}

static void
on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
    struct conn *c = h->data;
    size_t want;

    PD_UNUSED(hint);
    if (c->tls != NULL || c->lingering) {
        *b = uv_buf_init(c->srv->cipher_buf, sizeof(c->srv->cipher_buf));
        return;
    }
    if (c->in_off > 0 && c->in_off == c->in_len)
        c->in_off = c->in_len = 0;
    if (c->in_off > 0 && c->in_cap - c->in_len < READ_MIN) {
        memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
        c->in_len -= c->in_off;
        c->in_off = 0;
    }
    want = c->in_len + IN_MAX / 2;
    if (c->in_cap < want) {
        char *p = realloc(c->in, want);

        if (p == NULL) {
            *b = uv_buf_init(NULL, 0);
            return;
        }
        c->in = p;
        c->in_cap = want;
    }
    *b = uv_buf_init(c->in + c->in_len, (unsigned)(c->in_cap - c->in_len));
}

static void
on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *b)
{
    struct conn *c = st->data;

    if (c->closing)
        return;
    if (nread == UV_EOF) {
        c->eof = true;
        uv_read_stop(st);
        c->reading = false;
        if (c->lingering)
            conn_abort(c, 0);
        else
            kick(c);
        return;
    }
    if (nread < 0) {
        conn_abort(c, nread == UV_ENOBUFS ? -ENOMEM : -ECONNRESET);
        return;
    }
    if (c->lingering) {
        c->discarded += (size_t)nread;
        if (c->discarded > LINGER_MAX)
            conn_abort(c, 0);
        return;
    }
    if (nread == 0)
        return;
    if (c->tls != NULL) {
        int rv = pd_tls_feed(c->tls, b->base, (size_t)nread);

        if (rv < 0) {
            pd_debug("http", "%s: %s", c->peer_s, pd_tls_error(c->tls));
            conn_abort(c, rv == -EPIPE ? 0 : rv);
            return;
        }
    } else {
        c->in_len += (size_t)nread;
    }
    if (c->req == NULL && c->pstate == P_IDLE && c->raw == NULL) {
        /* The header deadline runs from the first byte of a request. */
        c->pstate = P_HEAD;
        c->deadline = pd_now_ms() + c->srv->lim.header_timeout_ms;
    }
    process(c);
}

static void
update_reading(struct conn *c)
{
    bool want;

    if (c->closing || c->injected)
        return;
    if (c->raw != NULL)
        want = !c->raw->paused && !c->eof;
    else
        want = !c->eof && c->in_len - c->in_off < IN_MAX / 2 &&
               !(c->req != NULL && c->req->paused);
    if (c->lingering)
        want = !c->eof;
    if (want && !c->reading) {
        if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
            c->reading = true;
    } else if (!want && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = false;
    }
}

/* ---- accepting ---------------------------------------------------------- */

static void
format_peer(struct conn *c)
{
    int len = sizeof(c->peer);
    char ip[INET6_ADDRSTRLEN] = "?";
    int port = 0;

    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&c->peer, &len) != 0)
        memset(&c->peer, 0, sizeof(c->peer));
    if (c->peer.ss_family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&c->peer;

        uv_ip4_name(a, ip, sizeof(ip));
        port = ntohs(a->sin_port);
        snprintf(c->peer_s, sizeof(c->peer_s), "%s:%d", ip, port);
    } else if (c->peer.ss_family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&c->peer;

        uv_ip6_name(a, ip, sizeof(ip));
        port = ntohs(a->sin6_port);
        snprintf(c->peer_s, sizeof(c->peer_s), "[%s]:%d", ip, port);
    } else {
        snprintf(c->peer_s, sizeof(c->peer_s), "?");
    }
    pd_strlcpy(c->peer_ip, ip, sizeof(c->peer_ip));
}

static void
on_connection(uv_stream_t *ls, int status)
{
    struct pd_http_server *s = ls->data;
    struct conn *c;

    if (status < 0 || s->closing)
        return;
    c = calloc(1, sizeof(*c));
    if (c == NULL)
        return;
    c->srv = s;
    uv_tcp_init(s->loop, &c->tcp);
    uv_timer_init(s->loop, &c->timer);
    uv_idle_init(s->loop, &c->kick);
    c->tcp.data = c->timer.data = c->kick.data = c;
    c->handles = 3;
    s->nalloc++;
    c->next = s->conns;
    if (s->conns != NULL)
        s->conns->prev = c;
    s->conns = c;
    s->nconns++;
    if (uv_accept(ls, (uv_stream_t *)&c->tcp) != 0) {
        conn_abort(c, -ECONNABORTED);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    format_peer(c);
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    c->pstate = P_IDLE;
    c->deadline = pd_now_ms() + s->lim.idle_timeout_ms;
    if (s->tls != NULL) {
        struct pd_tls_cb cb = {
            .on_plain = tls_on_plain,
            .on_cipher = tls_on_cipher,
        };

        c->tls = pd_tls_new(s->tls, true, &cb, c);
        if (c->tls == NULL) {
            conn_abort(c, -ENOMEM);
            return;
        }
    }
    if (s->nconns > s->lim.max_conns) {
        conn_fail(c, 503, "too many connections");
        update_reading(c);
        return;
    }
    update_reading(c);
    rearm(c);
}

int
pd_http_server_new(uv_loop_t *loop, const struct pd_http_opts *o,
                   struct pd_http_server **out_, char *err, size_t errlen)
{
    struct pd_http_server *s;
    struct pd_http_limits d;

    if (o->on_request == NULL) {
        snprintf(err, errlen, "an HTTP server needs a request handler");
        return -EINVAL;
    }
    s = calloc(1, sizeof(*s));
    if (s == NULL) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    pd_http_limits_default(&d);
    s->lim = o->limits;
#define DEF(f) \
    if (s->lim.f == 0) \
        s->lim.f = d.f
    DEF(max_header_bytes);
    DEF(max_headers);
    DEF(max_url);
    DEF(max_body);
    DEF(header_timeout_ms);
    DEF(idle_timeout_ms);
    DEF(body_timeout_ms);
    DEF(write_timeout_ms);
    DEF(max_conns);
#undef DEF
    s->loop = loop;
    s->tls = o->tls;
    s->on_request = o->on_request;
    s->arg = o->arg;
    uv_tcp_init(loop, &s->listener);
    s->listener.data = s;
    *out_ = s;
    return 0;
}

static int
parse_addr(const char *addr, struct sockaddr_storage *ss)
{
    char host[128];
    const char *colon, *h = addr;
    size_t hlen;
    char *end;
    long port;

    if (addr[0] == '[') {
        const char *rb = strchr(addr, ']');

        if (rb == NULL || rb[1] != ':')
            return -EINVAL;
        h = addr + 1;
        hlen = (size_t)(rb - h);
        colon = rb + 1;
    } else {
        colon = strrchr(addr, ':');
        if (colon == NULL)
            return -EINVAL;
        hlen = (size_t)(colon - addr);
    }
    if (hlen == 0 || hlen >= sizeof(host))
        return -EINVAL;
    memcpy(host, h, hlen);
    host[hlen] = '\0';
    errno = 0;
    port = strtol(colon + 1, &end, 10);
    if (errno != 0 || *end != '\0' || end == colon + 1 || port < 0 ||
        port > 65535)
        return -EINVAL;
    if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)ss) == 0)
        return 0;
    if (uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)ss) == 0)
        return 0;
    return -EINVAL;
}

int
pd_http_server_listen(struct pd_http_server *s, const char *addr, char *err,
                      size_t errlen)
{
    struct sockaddr_storage ss;
    int len = sizeof(ss);
    int rv;

    memset(&ss, 0, sizeof(ss));
    if (parse_addr(addr, &ss) < 0) {
        snprintf(err, errlen, "bad listen address '%s' (want host:port)",
                 addr);
        return -EINVAL;
    }
    rv = uv_tcp_bind(&s->listener, (struct sockaddr *)&ss, 0);
    if (rv == 0)
        rv = uv_listen((uv_stream_t *)&s->listener, 511, on_connection);
    if (rv < 0) {
        snprintf(err, errlen, "listen on %s: %s", addr, uv_strerror(rv));
        return rv;
    }
    s->listening = true;
    if (uv_tcp_getsockname(&s->listener, (struct sockaddr *)&ss, &len) == 0)
        s->port = ntohs(ss.ss_family == AF_INET6
                            ? ((struct sockaddr_in6 *)&ss)->sin6_port
                            : ((struct sockaddr_in *)&ss)->sin_port);
    return 0;
}

int
pd_http_server_port(const struct pd_http_server *s)
{
    return s->port;
}

unsigned
pd_http_server_conns(const struct pd_http_server *s)
{
    return s->nconns;
}

int
pd_http_server_inject(struct pd_http_server *s, const void *raw, size_t len,
                      const char *peer, pd_http_inject_cb done, void *arg)
{
    struct conn *c;

    if (s->closing)
        return -ESHUTDOWN;
    c = calloc(1, sizeof(*c));
    if (c == NULL)
        return -ENOMEM;
    c->in = malloc(len > 0 ? len : 1);
    if (c->in == NULL) {
        free(c);
        return -ENOMEM;
    }
    memcpy(c->in, raw, len);
    c->in_len = c->in_cap = len;
    c->srv = s;
    c->injected = true;
    c->inj_done = done;
    c->inj_arg = arg;
    uv_timer_init(s->loop, &c->timer);
    uv_idle_init(s->loop, &c->kick);
    c->timer.data = c->kick.data = c;
    c->handles = 2;
    s->nalloc++;
    c->next = s->conns;
    if (s->conns != NULL)
        s->conns->prev = c;
    s->conns = c;
    s->nconns++;
    pd_strlcpy(c->peer_s, peer != NULL ? peer : "injected",
               sizeof(c->peer_s));
    pd_strlcpy(c->peer_ip, "", sizeof(c->peer_ip));
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    /* The whole request is here: the client has nothing more to send. */
    c->eof = true;
    c->pstate = P_HEAD;
    c->deadline = pd_now_ms() + s->lim.header_timeout_ms;
    kick(c);
    return 0;
}

bool
pd_http_req_injected(const struct pd_http_req *r)
{
    return r->injected;
}

void
pd_http_on_done(struct pd_http_req *r, void (*cb)(void *arg, int status),
                void *arg)
{
    r->on_done = cb;
    r->done_arg = arg;
}

static void
on_listener_closed(uv_handle_t *h)
{
    struct pd_http_server *s = h->data;

    s->listener_closed = true;
    server_maybe_free(s);
}

void
pd_http_server_close(struct pd_http_server *s, void (*on_closed)(void *arg),
                     void *arg)
{
    if (s->closing)
        return;
    s->closing = true;
    s->on_closed = on_closed;
    s->closed_arg = arg;
    while (s->conns != NULL)
        conn_abort(s->conns, -ECANCELED);
    uv_close((uv_handle_t *)&s->listener, on_listener_closed);
}

/* ---- request accessors -------------------------------------------------- */

const char *
pd_http_req_method(const struct pd_http_req *r)
{
    return r->method;
}

bool
pd_http_req_is(const struct pd_http_req *r, const char *method)
{
    return strcmp(r->method, method) == 0;
}

const char *
pd_http_req_target(const struct pd_http_req *r)
{
    return r->hb + r->target_off;
}

const char *
pd_http_req_path(const struct pd_http_req *r)
{
    return r->path;
}

const char *
pd_http_req_header(const struct pd_http_req *r, const char *name)
{
    const char *v = NULL;

    count_header(r, name, &v);
    return v;
}

size_t
pd_http_req_header_count(const struct pd_http_req *r)
{
    return r->nhdrs;
}

bool
pd_http_req_header_at(const struct pd_http_req *r, size_t i,
                      const char **name, const char **value)
{
    if (i >= r->nhdrs)
        return false;
    *name = r->hb + r->hdrs[i].name;
    *value = r->hb + r->hdrs[i].value;
    return true;
}

const char *
pd_http_req_query(const struct pd_http_req *r, const char *name)
{
    size_t i;

    for (i = 0; i < r->nquery; i++)
        if (strcmp(r->query[i].name, name) == 0)
            return r->query[i].value;
    return NULL;
}

bool
pd_http_req_query_bool(const struct pd_http_req *r, const char *name,
                       bool def)
{
    const char *v = pd_http_req_query(r, name);

    if (v == NULL)
        return def;
    return strcmp(v, "true") == 0 || strcmp(v, "1") == 0 ||
           strcmp(v, "yes") == 0 || v[0] == '\0';
}

size_t
pd_http_req_query_count(const struct pd_http_req *r)
{
    return r->nquery;
}

bool
pd_http_req_query_at(const struct pd_http_req *r, size_t i,
                     const char **name, const char **value)
{
    if (i >= r->nquery)
        return false;
    *name = r->query[i].name;
    *value = r->query[i].value;
    return true;
}

int64_t
pd_http_req_content_length(const struct pd_http_req *r)
{
    return r->clen;
}

bool
pd_http_req_has_body(const struct pd_http_req *r)
{
    return r->has_body;
}

bool
pd_http_req_is_upgrade(const struct pd_http_req *r)
{
    return r->upgrade;
}

int
pd_http_req_minor(const struct pd_http_req *r)
{
    return r->minor;
}

/* Copied at dispatch: still readable after the client left. */
const char *
pd_http_req_peer(const struct pd_http_req *r)
{
    return r->peer_s;
}

const char *
pd_http_req_peer_ip(const struct pd_http_req *r)
{
    return r->peer_ip;
}

const struct sockaddr_storage *
pd_http_req_peer_addr(const struct pd_http_req *r)
{
    return &r->peer;
}

bool
pd_http_req_tls(const struct pd_http_req *r)
{
    return r->tls;
}

bool
pd_http_req_connected(const struct pd_http_req *r)
{
    return r->c != NULL && !r->c->closing && !r->c->lingering;
}

void
pd_http_req_set_data(struct pd_http_req *r, void *data)
{
    r->data = data;
}

void *
pd_http_req_data(const struct pd_http_req *r)
{
    return r->data;
}

void
pd_http_on_abort(struct pd_http_req *r,
                 void (*cb)(struct pd_http_req *r, void *arg))
{
    r->on_abort = cb;
}

/* ---- request bodies ------------------------------------------------------ */

static int
body_begin(struct pd_http_req *r, enum body_mode mode, uint64_t max)
{
    struct conn *c = r->c;

    if (r->mode != B_NONE || r->started)
        return -EALREADY;
    r->mode = mode;
    r->body_max = max;
    if (c == NULL) {
        r->body_err = -ECONNRESET;
        return 0; /* reported below, from the loop */
    }
    if (r->clen > 0 && max > 0 && (uint64_t)r->clen > max) {
        /* Refuse before the client sends it. */
        r->body_err = -EMSGSIZE;
    } else if (r->expect_continue && !r->msg_done) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";

        out(c, cont, sizeof(cont) - 1);
    }
    kick(c);
    return 0;
}

int
pd_http_body_read(struct pd_http_req *r, size_t max, pd_http_body_cb cb,
                  void *arg)
{
    int rv;

    if (max == 0)
        max = r->c != NULL ? r->c->srv->lim.max_body : (1u << 20);
    rv = body_begin(r, B_WHOLE, max);
    if (rv != 0)
        return rv;
    r->whole_cb = cb;
    r->body_arg = arg;
    if (r->c == NULL) {
        r->body_reported = true;
        cb(r, -ECONNRESET, NULL, 0, arg);
    }
    return 0;
}

int
pd_http_body_stream(struct pd_http_req *r, uint64_t max,
                    const struct pd_http_body_stream_cb *cb, void *arg)
{
    int rv = body_begin(r, B_STREAM, max);

    if (rv != 0)
        return rv;
    r->stream_cb = *cb;
    r->body_arg = arg;
    if (r->c == NULL) {
        r->body_reported = true;
        cb->on_end(r, -ECONNRESET, arg);
    }
    return 0;
}

void
pd_http_body_pause(struct pd_http_req *r)
{
    r->paused = true;
    if (r->c != NULL) {
        update_reading(r->c);
        rearm(r->c);
    }
}

void
pd_http_body_resume(struct pd_http_req *r)
{
    if (!r->paused)
        return;
    r->paused = false;
    if (r->c != NULL)
        kick(r->c);
}

/* ---- responses ---------------------------------------------------------- */

static bool
token_ok(const char *s, bool value)
{
    if (!value && *s == '\0')
        return false;
    for (; *s != '\0'; s++) {
        unsigned char ch = (unsigned char)*s;

        if (ch == '\r' || ch == '\n' || (!value && (ch <= ' ' ||
                                                    ch == ':')))
            return false;
    }
    return true;
}

int
pd_http_add_header(struct pd_http_req *r, const char *name,
                   const char *value)
{
    size_t n;
    char *p;

    if (r->started)
        return -EALREADY;
    if (!token_ok(name, false) || !token_ok(value, true))
        return -EINVAL;
    if (strcasecmp(name, "content-length") == 0 ||
        strcasecmp(name, "transfer-encoding") == 0 ||
        strcasecmp(name, "connection") == 0)
        return -EINVAL;
    n = strlen(name) + strlen(value) + 4;
    p = realloc(r->rh, r->rh_len + n + 1);
    if (p == NULL)
        return -ENOMEM;
    r->rh = p;
    snprintf(r->rh + r->rh_len, n + 1, "%s: %s\r\n", name, value);
    r->rh_len += n;
    return 0;
}

/* Whether the connection can carry another request after this one. */
static bool
keep_conn(const struct pd_http_req *r)
{
    const struct conn *c = r->c;

    if (c == NULL || !r->keepalive || c->eof || c->close_after_flush ||
        r->upgrade)
        return false;
    if (r->has_body && (r->mode == B_NONE || r->body_err != 0))
        return false;
    return true;
}

int
pd_http_start(struct pd_http_req *r, int status, const char *ctype,
              int64_t length)
{
    struct conn *c = r->c;
    char *head;
    size_t cap, n;
    int rv;

    if (r->started)
        return -EALREADY;
    r->started = true;
    r->status = status;
    if (c == NULL)
        return -ENOTCONN;
    r->no_body = status == 204 || status == 304 || status < 200;
    r->rlen = r->no_body ? 0 : length;
    if (!keep_conn(r))
        c->close_after_flush = true;
    if (r->rlen < 0 && r->minor == 0) {
        /* HTTP/1.0 has no chunked encoding: the close ends the body. */
        r->close_delimited = true;
        c->close_after_flush = true;
    } else if (r->rlen < 0) {
        r->chunked = true;
    }
    cap = 256 + r->rh_len + (ctype != NULL ? strlen(ctype) : 0);
    head = malloc(cap);
    if (head == NULL)
        return -ENOMEM;
    n = (size_t)snprintf(head, cap, "HTTP/1.%d %d %s\r\n", r->minor, status,
                         pd_http_reason(status));
    if (ctype != NULL && !r->no_body && token_ok(ctype, true))
        n += (size_t)snprintf(head + n, cap - n, "Content-Type: %s\r\n",
                              ctype);
    if (r->chunked)
        n += (size_t)snprintf(head + n, cap - n,
                              "Transfer-Encoding: chunked\r\n");
    else if (!r->close_delimited && status != 204 && status >= 200)
        n += (size_t)snprintf(head + n, cap - n, "Content-Length: %lld\r\n",
                              (long long)r->rlen);
    if (c->close_after_flush)
        n += (size_t)snprintf(head + n, cap - n, "Connection: close\r\n");
    if (r->rh_len > 0) {
        memcpy(head + n, r->rh, r->rh_len);
        n += r->rh_len;
    }
    memcpy(head + n, "\r\n", 2);
    n += 2;
    rv = out(c, head, n);
    free(head);
    return rv;
}

int
pd_http_write(struct pd_http_req *r, const void *data, size_t len)
{
    struct conn *c = r->c;

    if (!r->started)
        return -EINVAL;
    if (c == NULL || c->closing || c->lingering)
        return -ENOTCONN;
    if (len == 0 || r->head || r->no_body)
        return 0;
    if (r->rlen >= 0 && r->rsent + len > (uint64_t)r->rlen)
        return -EMSGSIZE;
    r->rsent += len;
    if (r->chunked) {
        char *buf = malloc(len + 32);
        int n, rv;

        if (buf == NULL)
            return -ENOMEM;
        n = snprintf(buf, 32, "%zx\r\n", len);
        memcpy(buf + n, data, len);
        memcpy(buf + n + len, "\r\n", 2);
        rv = out(c, buf, (size_t)n + len + 2);
        free(buf);
        return rv;
    }
    return out(c, data, len);
}

/* Ends the request's life; the connection goes on to the next one. */
static void
req_finish(struct pd_http_req *r)
{
    struct conn *c = r->c;

    if (r->orphan_of != NULL)
        r->orphan_of->orphan = NULL;
    if (c != NULL) {
        c->req = NULL;
        c->dispatched = false;
        if (!r->msg_done || !keep_conn(r))
            c->close_after_flush = true;
        c->pstate = P_IDLE;
        c->deadline = pd_now_ms() + c->srv->lim.idle_timeout_ms;
        if (c->close_after_flush) {
            if (c->queued == 0)
                conn_end(c);
        } else {
            http_parser_pause(&c->parser, 0);
            kick(c);
        }
    }
    req_free(r);
}

int
pd_http_end(struct pd_http_req *r)
{
    struct conn *c = r->c;
    int rv = 0;

    if (!r->started && c != NULL)
        rv = pd_http_start(r, 204, NULL, 0);
    if (c != NULL && !c->closing && !c->lingering) {
        if (r->chunked && !r->head)
            rv = out(c, "0\r\n\r\n", 5);
        else if (r->rlen >= 0 && r->rsent < (uint64_t)r->rlen && !r->head)
            c->close_after_flush = true; /* short body: never reuse */
    }
    req_finish(r);
    return rv;
}

int
pd_http_respond(struct pd_http_req *r, int status, const char *ctype,
                const void *body, size_t len)
{
    int rv;

    if (r->started) {
        /* Too late for a status: end what was started. */
        pd_http_end(r);
        return -EALREADY;
    }
    rv = pd_http_start(r, status, ctype, (int64_t)len);
    if (rv == 0 && len > 0)
        rv = pd_http_write(r, body, len);
    pd_http_end(r);
    return rv;
}

int
pd_http_respond_json(struct pd_http_req *r, int status, json_t *j)
{
    char *s = j != NULL ? json_dumps(j, JSON_COMPACT) : NULL;
    size_t n;
    int rv;

    json_decref(j);
    if (s == NULL)
        return pd_http_respond_error(r, 500, "internal",
                                     "could not encode the response");
    n = strlen(s);
    s[n] = '\n'; /* json_dumps leaves room: replace the NUL */
    rv = pd_http_respond(r, status, "application/json", s, n + 1);
    free(s);
    return rv;
}

int
pd_http_respond_error(struct pd_http_req *r, int status, const char *code,
                      const char *fmt, ...)
{
    char msg[512];
    char *body;
    size_t n;
    va_list ap;
    int rv;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    body = error_json(code != NULL ? code : pd_http_status_code(status),
                      msg);
    if (body == NULL)
        return pd_http_respond(r, status, "text/plain", msg, strlen(msg));
    n = strlen(body);
    body[n] = '\n';
    rv = pd_http_respond(r, status, "application/json", body, n + 1);
    free(body);
    return rv;
}

int
pd_http_fail(struct pd_http_req *r, int err)
{
    switch (err) {
    case -EMSGSIZE:
        return pd_http_respond_error(r, 413, NULL,
                                     "the body is larger than %llu bytes",
                                     (unsigned long long)r->body_max);
    case -ETIMEDOUT:
        return pd_http_respond_error(r, 408, NULL,
                                     "the body did not arrive in time");
    case -EPROTO:
        return pd_http_respond_error(r, 400, NULL,
                                     "malformed request body framing");
    case -ENOMEM:
        return pd_http_respond_error(r, 503, NULL, "out of memory");
    default:
        if (r->c == NULL)
            return pd_http_end(r);
        return pd_http_respond_error(r, 400, NULL, "bad request body: %s",
                                     strerror(-err));
    }
}

size_t
pd_http_queued(const struct pd_http_req *r)
{
    return r->c != NULL ? r->c->queued : 0;
}

bool
pd_http_started(const struct pd_http_req *r)
{
    return r->started;
}

void
pd_http_on_drain(struct pd_http_req *r,
                 void (*cb)(struct pd_http_req *r, void *arg))
{
    r->on_drain = cb;
}

int
pd_http_sse_start(struct pd_http_req *r)
{
    int rv = pd_http_add_header(r, "Cache-Control", "no-cache");

    if (rv < 0)
        return rv;
    return pd_http_start(r, 200, "text/event-stream", -1);
}

int
pd_http_sse_event(struct pd_http_req *r, const char *event, const char *data,
                  size_t len)
{
    const char *p = data, *end = data + len;
    size_t cap, n = 0, i;
    char *buf;
    int rv;

    if (event != NULL && (!token_ok(event, true) || strlen(event) > 64))
        return -EINVAL;
    /* The event line, then "data: " and a newline per line of data. */
    cap = len + 64 + (event != NULL ? strlen(event) : 0);
    if (memchr(data, '\r', len) != NULL)
        return -EINVAL; /* a CR would end an SSE line early */
    for (i = 0; i < len; i++)
        if (data[i] == '\n')
            cap += 7;
    buf = malloc(cap);
    if (buf == NULL)
        return -ENOMEM;
    if (event != NULL)
        n += (size_t)snprintf(buf, cap, "event: %s\n", event);
    for (;;) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t l = (size_t)((nl != NULL ? nl : end) - p);

        memcpy(buf + n, "data: ", 6);
        memcpy(buf + n + 6, p, l);
        n += 6 + l;
        buf[n++] = '\n';
        if (nl == NULL)
            break;
        p = nl + 1;
    }
    buf[n++] = '\n';
    rv = pd_http_write(r, buf, n);
    free(buf);
    return rv;
}

int
pd_http_sse_comment(struct pd_http_req *r, const char *text)
{
    char buf[256];
    int n = snprintf(buf, sizeof(buf), ": %s\n\n", text);

    if (n < 0 || (size_t)n >= sizeof(buf) || strpbrk(text, "\r\n") != NULL)
        return -EINVAL;
    return pd_http_write(r, buf, (size_t)n);
}

/* ---- upgrade ------------------------------------------------------------ */

struct pd_http_raw *
pd_http_upgrade(struct pd_http_req *r, const struct pd_http_raw_cb *cb,
                void *arg)
{
    struct conn *c = r->c;
    struct pd_http_raw *x;

    if (!r->upgrade || r->started || c == NULL || c->closing ||
        c->lingering)
        return NULL;
    x = calloc(1, sizeof(*x));
    if (x == NULL)
        return NULL;
    x->c = c;
    x->cb = *cb;
    x->arg = arg;
    c->raw = x;
    c->req = NULL;
    c->dispatched = false;
    req_free(r);
    uv_timer_stop(&c->timer);
    kick(c); /* bytes after the headers go to the owner */
    return x;
}

int
pd_http_raw_write(struct pd_http_raw *x, const void *data, size_t len)
{
    if (x->c == NULL)
        return -ENOTCONN;
    return out(x->c, data, len);
}

size_t
pd_http_raw_queued(const struct pd_http_raw *x)
{
    return x->c != NULL ? x->c->queued : 0;
}

void
pd_http_raw_pause(struct pd_http_raw *x)
{
    x->paused = true;
    if (x->c != NULL)
        update_reading(x->c);
}

void
pd_http_raw_resume(struct pd_http_raw *x)
{
    x->paused = false;
    if (x->c != NULL) {
        update_reading(x->c);
        kick(x->c);
    }
}

void
pd_http_raw_close(struct pd_http_raw *x)
{
    if (x->c != NULL)
        conn_end(x->c);
}

/* ---- freeing --------------------------------------------------------- */

static void
req_free(struct pd_http_req *r)
{
    size_t i;

    if (r == NULL)
        return;
    if (r->on_done != NULL)
        r->on_done(r->done_arg, r->status);
    for (i = 0; i < r->nquery; i++) {
        free(r->query[i].name);
        free(r->query[i].value);
    }
    free(r->query);
    free(r->hdrs);
    free(r->hb);
    free(r->path);
    free(r->body);
    free(r->rh);
    free(r);
}

/* ---- routing ------------------------------------------------------------- */

bool
pd_http_match(const char *pattern, const char *path,
              struct pd_http_params *p)
{
    const char *a = pattern, *b = path;

    p->n = 0;
    while (*a != '\0' && *b != '\0') {
        if (*a == '{') {
            const char *close = strchr(a, '}');
            const char *seg_end = strchr(b, '/');
            size_t slen;

            if (close == NULL || p->n >= PD_HTTP_MAX_PARAMS)
                return false;
            if (seg_end == NULL)
                seg_end = b + strlen(b);
            slen = (size_t)(seg_end - b);
            if (slen == 0 || slen >= PD_HTTP_PARAM_MAX)
                return false;
            if (pd_http_pct_decode(b, slen, p->value[p->n], NULL,
                                   false) < 0)
                return false;
            p->name[p->n] = a + 1;
            p->name_len[p->n] = (size_t)(close - a - 1);
            p->n++;
            a = close + 1;
            b = seg_end;
            continue;
        }
        if (*a != *b)
            return false;
        a++;
        b++;
    }
    return *a == '\0' && *b == '\0';
}

const char *
pd_http_param(const struct pd_http_params *p, const char *name)
{
    unsigned i;
    size_t n = strlen(name);

    for (i = 0; i < p->n; i++)
        if (p->name_len[i] == n && strncmp(p->name[i], name, n) == 0)
            return p->value[i];
    return NULL;
}

bool
pd_http_dispatch(struct pd_http_req *r, const struct pd_http_route *rt,
                 size_t n, void *arg)
{
    struct pd_http_params p;
    char allow[128] = "";
    size_t i, alen = 0;

    for (i = 0; i < n; i++) {
        if (!pd_http_match(rt[i].pattern, r->path, &p))
            continue;
        if (rt[i].method == NULL || strcmp(rt[i].method, r->method) == 0 ||
            (strcmp(r->method, "HEAD") == 0 &&
             strcmp(rt[i].method, "GET") == 0)) {
            rt[i].handler(r, &p, arg);
            return true;
        }
        if (strstr(allow, rt[i].method) == NULL && alen + 16 <
                                                       sizeof(allow))
            alen += (size_t)snprintf(allow + alen, sizeof(allow) - alen,
                                     "%s%s", alen > 0 ? ", " : "",
                                     rt[i].method);
    }
    if (alen > 0) {
        pd_http_add_header(r, "Allow", allow);
        pd_http_respond_error(r, 405, NULL, "%s is not allowed on %s "
                              "(allowed: %s)", r->method, r->path, allow);
    } else {
        pd_http_respond_error(r, 404, NULL, "no such endpoint: %s",
                              r->path);
    }
    return false;
}

/* ---- strict JSON --------------------------------------------------------- */

static const char *
json_type_name(const json_t *j)
{
    switch (json_typeof(j)) {
    case JSON_OBJECT:  return "an object";
    case JSON_ARRAY:   return "an array";
    case JSON_STRING:  return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL:    return "a number with a fraction";
    case JSON_TRUE:
    case JSON_FALSE:   return "a boolean";
    case JSON_NULL:    return "null";
    }
    return "something else";
}

static const char *
want_name(enum pd_json_type t)
{
    switch (t) {
    case PD_JSON_STRING:     return "a string";
    case PD_JSON_INT:        return "an integer";
    case PD_JSON_UINT:       return "a non-negative integer";
    case PD_JSON_BOOL:       return "a boolean";
    case PD_JSON_OBJECT:     return "an object";
    case PD_JSON_ARRAY:      return "an array";
    case PD_JSON_STRINGS:    return "an array of strings";
    case PD_JSON_STRING_MAP: return "an object of strings";
    case PD_JSON_ANY:        return "any value";
    }
    return "?";
}

static int
check_one(const char *name, const json_t *v, enum pd_json_type t, char *msg,
          size_t msglen)
{
    bool ok;
    size_t i;
    const char *k;
    json_t *e;

    switch (t) {
    case PD_JSON_STRING:  ok = json_is_string(v); break;
    case PD_JSON_INT:     ok = json_is_integer(v); break;
    case PD_JSON_UINT:
        ok = json_is_integer(v) && json_integer_value(v) >= 0;
        break;
    case PD_JSON_BOOL:    ok = json_is_boolean(v); break;
    case PD_JSON_OBJECT:
    case PD_JSON_STRING_MAP:
        ok = json_is_object(v);
        break;
    case PD_JSON_ARRAY:
    case PD_JSON_STRINGS:
        ok = json_is_array(v);
        break;
    default:              ok = true; break;
    }
    if (!ok) {
        snprintf(msg, msglen, "field '%s': expected %s, got %s", name,
                 want_name(t), t == PD_JSON_UINT && json_is_integer(v)
                                   ? "a negative integer"
                                   : json_type_name(v));
        return -EINVAL;
    }
    if (t == PD_JSON_STRINGS) {
        json_array_foreach(v, i, e) {
            if (!json_is_string(e)) {
                snprintf(msg, msglen, "field '%s[%zu]': expected a "
                         "string, got %s", name, i, json_type_name(e));
                return -EINVAL;
            }
        }
    }
    if (t == PD_JSON_STRING_MAP) {
        json_object_foreach((json_t *)v, k, e) {
            if (!json_is_string(e)) {
                snprintf(msg, msglen, "field '%s.%s': expected a string, "
                         "got %s", name, k, json_type_name(e));
                return -EINVAL;
            }
        }
    }
    return 0;
}

int
pd_json_check(const json_t *obj, const struct pd_json_field *fields,
              size_t n, char *msg, size_t msglen)
{
    const char *k;
    json_t *v;
    size_t i;

    if (!json_is_object(obj)) {
        snprintf(msg, msglen, "expected a JSON object, got %s",
                 json_type_name(obj));
        return -EINVAL;
    }
    json_object_foreach((json_t *)obj, k, v) {
        for (i = 0; i < n; i++)
            if (strcmp(fields[i].name, k) == 0)
                break;
        if (i == n) {
            snprintf(msg, msglen, "unknown field '%s'", k);
            return -EINVAL;
        }
        if (check_one(k, v, fields[i].type, msg, msglen) < 0)
            return -EINVAL;
    }
    for (i = 0; i < n; i++) {
        if (fields[i].required &&
            json_object_get(obj, fields[i].name) == NULL) {
            snprintf(msg, msglen, "missing required field '%s'",
                     fields[i].name);
            return -EINVAL;
        }
    }
    return 0;
}

int
pd_json_parse(const char *body, size_t len, bool emptyok,
              const struct pd_json_field *fields, size_t n, json_t **out_,
              char *msg, size_t msglen)
{
    json_error_t je;
    json_t *j;
    size_t i = 0;

    while (i < len && isspace((unsigned char)body[i]))
        i++;
    if (i == len) {
        if (!emptyok) {
            snprintf(msg, msglen, "the request needs a JSON body");
            return -EINVAL;
        }
        j = json_object();
    } else {
        j = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
        if (j == NULL) {
            snprintf(msg, msglen, "invalid JSON at line %d column %d: %s",
                     je.line, je.column, je.text);
            return -EBADMSG;
        }
    }
    if (pd_json_check(j, fields, n, msg, msglen) < 0) {
        json_decref(j);
        return -EINVAL;
    }
    *out_ = j;
    return 0;
}

static void
json_body_done(struct pd_http_req *r, int err, const char *body, size_t len,
               void *arg)
{
    char msg[300];
    json_t *j;
    int rv;

    PD_UNUSED(arg);
    if (err != 0) {
        pd_http_fail(r, err);
        return;
    }
    rv = pd_json_parse(body, len, true, r->json_fields, r->json_nfields, &j,
                       msg, sizeof(msg));
    if (rv < 0) {
        pd_http_respond_error(r, 400, rv == -EBADMSG ? "invalid_json"
                                                     : "invalid_argument",
                              "%s", msg);
        return;
    }
    r->json_cb(r, j, r->json_arg);
}

int
pd_http_read_json(struct pd_http_req *r, size_t max,
                  const struct pd_json_field *fields, size_t n,
                  pd_http_json_cb cb, void *arg)
{
    r->json_fields = fields;
    r->json_nfields = n;
    r->json_cb = cb;
    r->json_arg = arg;
    return pd_http_body_read(r, max, json_body_done, NULL);
}
