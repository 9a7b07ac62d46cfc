/*
 * The preview listener: http(s)://{port}-{sandbox}-{token}.{domain} on
 * every scheduler, proxied into that port of that sandbox wherever it
 * runs.
 *
 * Happy path, per request:
 *   1. The client address has not used up its budget of wrong guesses
 *      (else 429 with Retry-After, before the guess is even looked at).
 *   2. Host parses (preview_token.c), the port is exposed in the local FSM
 *      and the token's SHA-256 matches the stored one in constant time.
 *      Any failure is the same 404 and costs the client one guess.
 *   3. TUNNEL_OPEN {sandbox, port} to the owning agent's RPC port
 *      (agentc.c, manual-window mode); the agent relays it to the guest
 *      agent, which connects to 127.0.0.1:port inside the VM.
 *   4. On the tunnel's OK, the request head goes up, rewritten: hop-by-hop
 *      headers dropped, X-Forwarded-For / -Proto / -Host set by us (never
 *      trusted from the client), "Connection: close" (so the response ends
 *      with the tunnel), the body re-framed from what proto/http.c
 *      decoded (Content-Length, or chunked). Since proto/http.c already
 *      refused ambiguous framing (CL with TE, two CLs, a TE other than
 *      chunked) and we frame the upstream request ourselves, a smuggled
 *      second request can never reach the guest as its own request.
 *   5. The response is parsed (http_parser) and streamed back: status,
 *      end-to-end headers, and the body as it arrives (plain, chunked or
 *      SSE alike), re-framed by proto/http.c.
 * A WebSocket (any Upgrade) goes the same way up to 4; then the client
 * connection is handed over raw (pd_http_upgrade) and bytes flow both
 * ways untouched, the guest's 101 included.
 *
 * Backpressure: guest -> client, the agent's window is granted back only
 * as the client's write queue drains below PD_HTTP_HIGH_WATER; client ->
 * guest, the body (or raw stream) is paused while the tunnel has no send
 * credit or its connection is over PD_CONN_HIGH_WATER, and resumed from
 * on_writable. A slow side holds up only its own tunnel.
 *
 * Failure modes: nothing listening in the guest -> 502 saying so; the
 * agent unreachable or the sandbox not on it -> 502; no OK within
 * OPEN_TIMEOUT_MS or no response head within the response timeout
 * (PADDOCK_PREVIEW_TIMEOUT_MS, default 30 s) -> 504; the guest closing
 * before its head -> 502; the client going away -> the tunnel is
 * cancelled. Unexposing the port, destroying the sandbox, or a new token
 * for the port closes the tunnels already open through it within
 * SWEEP_MS: a revoked URL keeps no WebSocket alive.
 */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <http_parser.h>
#include <openssl/sha.h>

#include "common/log.h"
#include "proto/conn.h"
#include "proto/frame.h"
#include "scheduler/preview.h"
#include "scheduler/ratelimit.h"
#include "scheduler/sched.h"

#define OPEN_TIMEOUT_MS 10000
#define RESPONSE_TIMEOUT_MS 30000
#define SWEEP_MS 1000
/* Wrong guesses per client address: a burst, then this many a second. */
#define GUESS_RATE 5.0
#define GUESS_BURST 30
#define GUESS_KEYS 4096
/* Send credit below which the client's side is paused. */
#define CREDIT_LOW (256u << 10)
#define HEAD_MAX (64u << 10)
#define RESP_HEADERS_MAX 100

struct ptun;

struct sched_preview {
    struct sched *s;
    struct pd_http_server *srv;
    struct sched_ratelimit *guesses;
    uv_timer_t sweep;
    uint64_t response_timeout_ms;
    struct ptun *tuns;
    uint64_t n_requests, n_refused;
};

struct rhdr {
    char *name, *value;
};

struct ptun {
    struct sched_preview *pv;
    struct ptun *next, **pprev;
    struct pd_http_req *r;     /* until the HTTP side is finished */
    struct pd_http_raw *raw;   /* after an upgrade, until its on_close */
    struct sched_areq *q;      /* until it ended or was cancelled */
    uv_timer_t timer;
    bool timer_on;

    char sandbox[PD_ID_MAX + 1];
    uint16_t port;
    unsigned char hash[FSM_TOKEN_HASH_LEN];
    char subject[PD_ID_MAX + 16];

    bool upgrade;
    bool opened;               /* the tunnel's OK arrived */
    bool body_paused;
    bool body_done;
    bool chunked_up;           /* request body re-chunked upstream */
    bool resp_started;         /* pd_http_start done */
    bool resp_done;
    bool http_done;            /* r finished (or handed to raw) */
    bool raw_open;
    size_t ungranted;          /* agent bytes not granted back yet */

    http_parser parser;
    struct rhdr hdrs[RESP_HEADERS_MAX];
    size_t nhdrs;
    bool last_was_value;
    size_t head_bytes;
};

static void on_timeout(uv_timer_t *h);

/* ---- small helpers ----------------------------------------------------- */

/* The one answer for every wrong URL. Logged with what it asked for
 * (never the token); the guess limiter bounds how often per address. */
static void
not_found(struct sched_preview *pv, struct pd_http_req *r,
          const struct sched_preview_host *ph, const char *why)
{
    const char *ip = pd_http_req_peer_ip(r);

    pv->n_refused++;
    sched_metrics_inc(pv->s, "preview_refused", 1);
    sched_ratelimit_take(pv->guesses, ip, pd_now_ms());
    if (ph != NULL)
        pd_info("preview", "request from %s for port %u of sandbox %s "
                "refused: %s; answering 404", ip, ph->port, ph->sandbox, why);
    else
        pd_info("preview", "request from %s refused: %s; answering 404", ip,
                why);
    pd_http_respond_error(r, 404, "not_found", "no such preview URL");
}

static bool
hop_by_hop(const char *name)
{
    static const char *const drop[] = {
        "connection", "keep-alive", "proxy-connection", "te", "trailer",
        "transfer-encoding", "upgrade", "content-length", "expect",
        "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
        "x-real-ip", "forwarded", "proxy-authorization",
    };

    for (size_t i = 0; i < sizeof(drop) / sizeof(drop[0]); i++)
        if (strcasecmp(name, drop[i]) == 0)
            return true;
    return false;
}

/* ---- the tunnel's life ------------------------------------------------- */

static void
hdrs_free(struct ptun *t)
{
    for (size_t i = 0; i < t->nhdrs; i++) {
        free(t->hdrs[i].name);
        free(t->hdrs[i].value);
    }
    t->nhdrs = 0;
}

static void
tun_closed(uv_handle_t *h)
{
    struct ptun *t = h->data;

    hdrs_free(t);
    free(t);
}

/* Frees t once nothing refers to it any more. */
static void
tun_maybe_free(struct ptun *t)
{
    if (t->q != NULL || !t->http_done || t->raw_open)
        return;
    if (t->pprev != NULL) {
        *t->pprev = t->next;
        if (t->next != NULL)
            t->next->pprev = t->pprev;
        t->pprev = NULL;
    }
    uv_close((uv_handle_t *)&t->timer, tun_closed);
}

static void
timer_stop(struct ptun *t)
{
    if (t->timer_on) {
        uv_timer_stop(&t->timer);
        t->timer_on = false;
    }
}

static void
up_cancel(struct ptun *t)
{
    struct sched_areq *q = t->q;

    t->q = NULL;
    if (q != NULL)
        sched_areq_cancel(q);
}

/* Ends the HTTP side with an error if nothing was sent yet, else cuts the
 * response short (the client sees a truncated body, never a fake end). */
static void
http_fail(struct ptun *t, int status, const char *code, const char *msg)
{
    struct pd_http_req *r = t->r;

    if (t->http_done || r == NULL)
        return;
    t->http_done = true;
    t->r = NULL;
    if (t->resp_started)
        pd_http_end(r);
    else
        pd_http_respond_error(r, status, code, "%s", msg);
}

/* Everything ends now: the tunnel, the client's request or raw stream. */
static void
tun_abort(struct ptun *t, int status, const char *code, const char *msg)
{
    timer_stop(t);
    up_cancel(t);
    if (t->raw != NULL && t->raw_open) {
        struct pd_http_raw *x = t->raw;

        t->raw = NULL;
        pd_http_raw_close(x);
    }
    http_fail(t, status, code, msg);
    tun_maybe_free(t);
}

static void
grant(struct ptun *t)
{
    if (t->q != NULL && t->ungranted > 0) {
        sched_areq_grant(t->q, t->ungranted);
        t->ungranted = 0;
    }
}

static size_t
client_queued(const struct ptun *t)
{
    if (t->raw != NULL)
        return pd_http_raw_queued(t->raw);
    if (t->r != NULL)
        return pd_http_queued(t->r);
    return 0;
}

/* DATA up the tunnel, in chunks the frame size allows. */
static int
up_send(struct ptun *t, const char *data, size_t len, bool eof)
{
    struct pd_enc e;
    size_t n;
    int rc;

    do {
        n = len > PD_CHUNK_MAX ? PD_CHUNK_MAX : len;
        if (t->q == NULL)
            return -ENOTCONN;
        pd_enc_begin(&e, PD_MSG_DATA, 0);
        pd_enc_bin(&e, "data", data, n);
        pd_enc_bool(&e, "eof", eof && n == len);
        rc = sched_areq_send(t->q, &e);
        if (rc != 0)
            return rc;
        data += n;
        len -= n;
    } while (len > 0);
    return 0;
}

static bool
up_full(const struct ptun *t)
{
    return t->q == NULL || sched_areq_credit(t->q) < CREDIT_LOW ||
           sched_areq_queued(t->q) > PD_CONN_HIGH_WATER;
}

/* ---- the request head -------------------------------------------------- */

static int
head_append(char *buf, size_t *off, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int
head_append(char *buf, size_t *off, size_t cap, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (*off >= cap)
        return -ENOSPC;
    va_start(ap, fmt);
    n = vsnprintf(buf + *off, cap - *off, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= cap - *off)
        return -ENOSPC;
    *off += (size_t)n;
    return 0;
}

static int
send_head(struct ptun *t)
{
    struct pd_http_req *r = t->r;
    const char *name, *value, *up;
    size_t off = 0, i, n = pd_http_req_header_count(r);
    int64_t cl = pd_http_req_content_length(r);
    char *buf = malloc(HEAD_MAX);
    int rc;

    if (buf == NULL)
        return -ENOMEM;
    rc = head_append(buf, &off, HEAD_MAX, "%s %s HTTP/1.1\r\n",
                     pd_http_req_method(r), pd_http_req_target(r));
    for (i = 0; rc == 0 && i < n; i++) {
        if (!pd_http_req_header_at(r, i, &name, &value) || hop_by_hop(name))
            continue;
        rc = head_append(buf, &off, HEAD_MAX, "%s: %s\r\n", name, value);
    }
    if (rc == 0)
        rc = head_append(buf, &off, HEAD_MAX,
                         "X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n",
                         pd_http_req_peer_ip(r),
                         pd_http_req_tls(r) ? "https" : "http");
    if (rc == 0 && pd_http_req_header(r, "Host") != NULL)
        rc = head_append(buf, &off, HEAD_MAX, "X-Forwarded-Host: %s\r\n",
                         pd_http_req_header(r, "Host"));
    if (rc == 0 && t->upgrade) {
        up = pd_http_req_header(r, "Upgrade");
        rc = head_append(buf, &off, HEAD_MAX,
                         "Connection: Upgrade\r\nUpgrade: %s\r\n",
                         up != NULL ? up : "websocket");
    } else if (rc == 0) {
        rc = head_append(buf, &off, HEAD_MAX, "Connection: close\r\n");
    }
    if (rc == 0 && !t->upgrade && cl >= 0)
        rc = head_append(buf, &off, HEAD_MAX, "Content-Length: %lld\r\n",
                         (long long)cl);
    else if (rc == 0 && !t->upgrade && pd_http_req_has_body(r)) {
        t->chunked_up = true;
        rc = head_append(buf, &off, HEAD_MAX,
                         "Transfer-Encoding: chunked\r\n");
    }
    if (rc == 0)
        rc = head_append(buf, &off, HEAD_MAX, "\r\n");
    if (rc == 0)
        rc = up_send(t, buf, off, false);
    free(buf);
    return rc;
}

/* ---- request body, client -> guest ------------------------------------- */

static void
body_data(struct pd_http_req *r, const char *data, size_t len, void *arg)
{
    struct ptun *t = arg;
    char hdr[24];
    int n;

    if (t->chunked_up) {
        n = snprintf(hdr, sizeof(hdr), "%zx\r\n", len);
        up_send(t, hdr, (size_t)n, false);
        up_send(t, data, len, false);
        up_send(t, "\r\n", 2, false);
    } else {
        up_send(t, data, len, false);
    }
    if (!t->body_paused && up_full(t)) {
        t->body_paused = true;
        pd_http_body_pause(r);
    }
}

static void
body_end(struct pd_http_req *r, int err, void *arg)
{
    struct ptun *t = arg;

    (void)r;
    t->body_done = true;
    if (err != 0) {
        /* The client's body broke off: the guest would wait forever. */
        tun_abort(t, err == -EMSGSIZE ? 413 : 400, "invalid_argument",
                  "the request body was cut short");
        return;
    }
    if (t->chunked_up)
        up_send(t, "0\r\n\r\n", 5, false);
}

static const struct pd_http_body_stream_cb body_cb = {
    .on_data = body_data,
    .on_end = body_end,
};

/* ---- response, guest -> client ----------------------------------------- */

static int
p_header_field(http_parser *p, const char *at, size_t len)
{
    struct ptun *t = p->data;
    struct rhdr *h;
    char *n;
    size_t old;

    t->head_bytes += len;
    if (t->head_bytes > HEAD_MAX)
        return 1;
    if (t->nhdrs == 0 || t->last_was_value) {
        if (t->nhdrs == RESP_HEADERS_MAX)
            return 1;
        t->hdrs[t->nhdrs].name = NULL;
        t->hdrs[t->nhdrs].value = NULL;
        t->nhdrs++;
    }
    t->last_was_value = false;
    h = &t->hdrs[t->nhdrs - 1];
    old = h->name != NULL ? strlen(h->name) : 0;
    n = realloc(h->name, old + len + 1);
    if (n == NULL)
        return 1;
    memcpy(n + old, at, len);
    n[old + len] = '\0';
    h->name = n;
    return 0;
}

static int
p_header_value(http_parser *p, const char *at, size_t len)
{
    struct ptun *t = p->data;
    struct rhdr *h;
    char *v;
    size_t old;

    t->head_bytes += len;
    if (t->head_bytes > HEAD_MAX || t->nhdrs == 0)
        return 1;
    t->last_was_value = true;
    h = &t->hdrs[t->nhdrs - 1];
    old = h->value != NULL ? strlen(h->value) : 0;
    v = realloc(h->value, old + len + 1);
    if (v == NULL)
        return 1;
    memcpy(v + old, at, len);
    v[old + len] = '\0';
    h->value = v;
    return 0;
}

static int
p_headers_complete(http_parser *p)
{
    struct ptun *t = p->data;
    struct pd_http_req *r = t->r;
    const char *ctype = NULL;
    int64_t length = -1;
    bool head;

    if (r == NULL)
        return 1;
    /* 1xx other than 101 (we never forward Expect, so rare): skip. */
    if (p->status_code >= 100 && p->status_code < 200) {
        hdrs_free(t);
        return 0;
    }
    timer_stop(t);
    head = pd_http_req_is(r, "HEAD");
    for (size_t i = 0; i < t->nhdrs; i++) {
        const char *n = t->hdrs[i].name, *v = t->hdrs[i].value;

        if (n == NULL || v == NULL)
            continue;
        if (strcasecmp(n, "content-type") == 0) {
            ctype = v;
            continue;
        }
        if (hop_by_hop(n))
            continue;
        pd_http_add_header(r, n, v);
    }
    if (!(p->flags & F_CHUNKED) && p->content_length != ULLONG_MAX)
        length = (int64_t)p->content_length;
    if (head || p->status_code == 204 || p->status_code == 304)
        length = 0;
    pd_http_start(r, (int)p->status_code, ctype, length);
    t->resp_started = true;
    hdrs_free(t);
    /* http_parser: 1 means "no body follows" (HEAD). */
    return head ? 1 : 0;
}

static int
p_body(http_parser *p, const char *at, size_t len)
{
    struct ptun *t = p->data;

    if (t->r != NULL)
        pd_http_write(t->r, at, len);
    return 0;
}

static int
p_message_complete(http_parser *p)
{
    struct ptun *t = p->data;
    struct pd_http_req *r = t->r;

    if (p->status_code >= 100 && p->status_code < 200)
        return 0;
    t->resp_done = true;
    if (r != NULL && !t->http_done) {
        t->http_done = true;
        t->r = NULL;
        pd_http_end(r);
    }
    return 0;
}

static const http_parser_settings resp_settings = {
    .on_header_field = p_header_field,
    .on_header_value = p_header_value,
    .on_headers_complete = p_headers_complete,
    .on_body = p_body,
    .on_message_complete = p_message_complete,
};

static void
resp_feed(struct ptun *t, const char *data, size_t len)
{
    size_t n;

    if (t->resp_done)
        return;
    n = http_parser_execute(&t->parser, &resp_settings, data, len);
    if (t->resp_done) {
        tun_abort(t, 502, "unavailable", "");
        return;
    }
    if (n != len || HTTP_PARSER_ERRNO(&t->parser) != HPE_OK) {
        pd_info(t->subject, "port %u: the guest's response is not HTTP "
                "(%s); answering 502", t->port,
                http_errno_name(HTTP_PARSER_ERRNO(&t->parser)));
        tun_abort(t, 502, "unavailable", "the service in the sandbox sent "
                  "a response that is not valid HTTP");
    }
}

/* The guest closed its side. */
static void
resp_eof(struct ptun *t)
{
    if (t->upgrade) {
        if (t->raw != NULL) {
            struct pd_http_raw *x = t->raw;

            t->raw = NULL;
            pd_http_raw_close(x);
        }
        return;
    }
    if (!t->resp_done)
        http_parser_execute(&t->parser, &resp_settings, NULL, 0);
    if (!t->resp_done && !t->resp_started)
        tun_abort(t, 502, "unavailable", "the service in the sandbox "
                  "closed the connection without answering");
    else
        tun_abort(t, 502, "unavailable", "");
}

/* ---- the raw side of an upgrade ---------------------------------------- */

static void
raw_data(struct pd_http_raw *x, const char *data, size_t len, void *arg)
{
    struct ptun *t = arg;

    up_send(t, data, len, false);
    if (!t->body_paused && up_full(t)) {
        t->body_paused = true;
        pd_http_raw_pause(x);
    }
}

static void
raw_close(struct pd_http_raw *x, int reason, void *arg)
{
    struct ptun *t = arg;

    (void)x;
    (void)reason;
    t->raw = NULL;
    t->raw_open = false;
    /* Half-closing is not worth it for WebSockets: the client is gone. */
    up_cancel(t);
    tun_maybe_free(t);
}

static void
raw_drain(struct pd_http_raw *x, void *arg)
{
    struct ptun *t = arg;

    (void)x;
    grant(t);
}

static const struct pd_http_raw_cb raw_cb = {
    .on_data = raw_data,
    .on_close = raw_close,
    .on_drain = raw_drain,
};

/* ---- agent callbacks --------------------------------------------------- */

static void
on_opened(struct ptun *t)
{
    struct pd_http_req *r = t->r;

    t->opened = true;
    if (send_head(t) != 0) {
        tun_abort(t, 502, "unavailable", "cannot send the request into "
                  "the sandbox");
        return;
    }
    if (t->upgrade) {
        timer_stop(t);
        t->r = NULL;
        t->http_done = true;
        t->raw = pd_http_upgrade(r, &raw_cb, t);
        if (t->raw == NULL) {
            /* Not an upgrade after all (proto/http.c said no): answer. */
            t->r = r;
            t->http_done = false;
            tun_abort(t, 400, "invalid_argument", "bad upgrade request");
            return;
        }
        t->raw_open = true;
        return;
    }
    /* From here the guest has response_timeout_ms to send its head. */
    timer_stop(t);
    t->timer_on = true;
    uv_timer_start(&t->timer, on_timeout, t->pv->response_timeout_ms, 0);
    if (pd_http_req_has_body(r))
        pd_http_body_stream(r, 0, &body_cb, t);
}

static void
on_frame(struct sched_areq *q, const struct pd_msg *m, void *data)
{
    struct ptun *t = data;
    const void *bytes = NULL;
    size_t len = 0;
    bool eof = false;

    (void)q;
    if (m->type == PD_MSG_OK && !t->opened) {
        on_opened(t);
        return;
    }
    if (m->type != PD_MSG_DATA)
        return;
    pd_msg_bin(m, "data", &bytes, &len);
    pd_msg_bool(m, "eof", &eof);
    t->ungranted += len;
    if (len > 0) {
        if (t->upgrade && t->raw != NULL)
            pd_http_raw_write(t->raw, bytes, len);
        else if (!t->upgrade)
            resp_feed(t, bytes, len);
    }
    if (client_queued(t) < PD_HTTP_HIGH_WATER)
        grant(t);
    if (eof)
        resp_eof(t);
}

static void
on_end(struct sched_areq *q, int status, const struct pd_msg *m, void *data)
{
    struct ptun *t = data;
    char msg[256];
    const char *why = NULL;
    size_t wl = 0;

    (void)q;
    t->q = NULL;
    if (t->opened) {
        resp_eof(t);
        tun_maybe_free(t);
        return;
    }
    if (m != NULL && pd_msg_str(m, "message", &why, &wl) != 0)
        why = NULL;
    if (m == NULL)
        /* The link to the agent broke (or never came up): not the
         * guest's port, whatever the errno says. */
        snprintf(msg, sizeof(msg), "the node of sandbox %s is unreachable: "
                 "%s", t->sandbox, strerror(status < 0 ? -status : EIO));
    else if (status == -ECONNREFUSED)
        snprintf(msg, sizeof(msg), "nothing is listening on port %u in "
                 "sandbox %s", t->port, t->sandbox);
    else if (status == -ENOENT)
        snprintf(msg, sizeof(msg), "sandbox %s is not running on its node",
                 t->sandbox);
    else
        snprintf(msg, sizeof(msg), "cannot reach port %u of sandbox %s: "
                 "%.*s", t->port, t->sandbox, why ? (int)wl : 64,
                 why ? why : strerror(status < 0 ? -status : EIO));
    pd_info(t->subject, "preview of port %u: %s; answering 502", t->port,
            msg);
    tun_abort(t, 502, "unavailable", msg);
}

static void
on_writable(struct sched_areq *q, void *data)
{
    struct ptun *t = data;

    (void)q;
    if (!t->body_paused || up_full(t))
        return;
    t->body_paused = false;
    if (t->raw != NULL)
        pd_http_raw_resume(t->raw);
    else if (t->r != NULL && !t->body_done)
        pd_http_body_resume(t->r);
}

static const struct sched_areq_cb tun_cb = {
    .on_frame = on_frame,
    .on_end = on_end,
    .on_writable = on_writable,
};

/* ---- client callbacks and timers --------------------------------------- */

static void
on_client_drain(struct pd_http_req *r, void *arg)
{
    (void)r;
    grant(arg);
}

static void
on_client_abort(struct pd_http_req *r, void *arg)
{
    struct ptun *t = arg;

    (void)r;
    tun_abort(t, 499, "unavailable", "client went away");
}

static void
on_timeout(uv_timer_t *h)
{
    struct ptun *t = h->data;
    char msg[160];

    t->timer_on = false;
    if (!t->opened)
        snprintf(msg, sizeof(msg), "sandbox %s did not open port %u within "
                 "%u s", t->sandbox, t->port, OPEN_TIMEOUT_MS / 1000);
    else
        snprintf(msg, sizeof(msg), "the service on port %u of sandbox %s "
                 "did not answer within %llu s", t->port, t->sandbox,
                 (unsigned long long)(t->pv->response_timeout_ms / 1000));
    pd_info(t->subject, "%s; answering 504", msg);
    tun_abort(t, 504, "unavailable", msg);
}

/* ---- requests ---------------------------------------------------------- */

static void
tunnel_start(struct sched_preview *pv, struct pd_http_req *r,
             const struct fsm_sandbox *sb, const struct fsm_port *fp)
{
    struct fsm_node node;
    struct ptun *t;
    struct pd_enc e;

    if (sb->state != FSM_SB_RUNNING) {
        pd_http_add_header(r, "Retry-After", "1");
        pd_http_respond_error(r, 503, "unavailable", "sandbox %s is %s; "
                              "retry once it runs", sb->id,
                              fsm_sandbox_state_name(sb->state));
        return;
    }
    if (fsm_node_get(pv->s->fsm, sb->node, &node) != 0) {
        pd_http_respond_error(r, 502, "unavailable", "the node of sandbox "
                              "%s is unknown", sb->id);
        return;
    }
    t = calloc(1, sizeof(*t));
    if (t == NULL) {
        fsm_node_clear(&node);
        pd_http_respond_error(r, 500, "internal", "out of memory");
        return;
    }
    t->pv = pv;
    t->r = r;
    t->port = (uint16_t)fp->port;
    pd_strlcpy(t->sandbox, sb->id, sizeof(t->sandbox));
    memcpy(t->hash, fp->token_hash, sizeof(t->hash));
    snprintf(t->subject, sizeof(t->subject), "sandbox %s", sb->id);
    t->upgrade = pd_http_req_is_upgrade(r);
    http_parser_init(&t->parser, HTTP_RESPONSE);
    t->parser.data = t;
    uv_timer_init(pv->s->loop, &t->timer);
    t->timer.data = t;
    t->next = pv->tuns;
    if (pv->tuns != NULL)
        pv->tuns->pprev = &t->next;
    pv->tuns = t;
    t->pprev = &pv->tuns;
    pd_http_req_set_data(r, t);
    pd_http_on_abort(r, on_client_abort);
    pd_http_on_drain(r, on_client_drain);

    t->timer_on = true;
    uv_timer_start(&t->timer, on_timeout, OPEN_TIMEOUT_MS, 0);
    pd_enc_begin(&e, PD_MSG_TUNNEL_OPEN, 0);
    pd_enc_str(&e, "sandbox", sb->id);
    pd_enc_u64(&e, "port", fp->port);
    /* on_end may run inside the call (the link is already broken): until
     * the call returns, t->q must look alive so that t is not freed under
     * us; on_end clears it and answers the client. */
    t->q = (struct sched_areq *)1;
    t->q = sched_agentc_send(pv->s, node.rpc_addr, &e, &tun_cb, t);
    fsm_node_clear(&node);
    if (t->q != NULL)
        sched_areq_manual_window(t->q);
}

/* A sandbox that is not running yet (starting, or lost with its node and
 * placed again on first use): the request waits for it, bounded by
 * lifecycle.c's own deadline. */
struct pensure {
    struct sched_preview *pv;
    struct pd_http_req *r;
    struct fsm_port fp;
    bool aborted;
};

static void
ensure_abort(struct pd_http_req *r, void *arg)
{
    struct pensure *e = arg;

    (void)r;
    e->aborted = true; /* r is still ours to finish in ensure_done */
}

static void
ensure_done(void *data, int code, const char *message,
            const struct fsm_sandbox *sb, bool replaced)
{
    struct pensure *e = data;
    char subj[PD_ID_MAX + 16];

    if (code != 0 || sb == NULL) {
        pd_http_add_header(e->r, "Retry-After", "1");
        pd_http_respond_error(e->r, 503, "unavailable", "%s",
                              message != NULL && message[0] != '\0'
                                  ? message : "sandbox not running");
    } else if (e->aborted) {
        pd_http_respond_error(e->r, 503, "unavailable", "client gone");
    } else {
        if (replaced) {
            snprintf(subj, sizeof(subj), "sandbox %s", sb->id);
            pd_info(subj, "placed again on node %s for a preview request",
                    sb->node);
        }
        tunnel_start(e->pv, e->r, sb, &e->fp);
    }
    free(e);
}

static void
ensure_then_tunnel(struct sched_preview *pv, struct pd_http_req *r,
                   const struct fsm_port *fp)
{
    struct pensure *e = calloc(1, sizeof(*e));

    if (e == NULL) {
        pd_http_respond_error(r, 500, "internal", "out of memory");
        return;
    }
    e->pv = pv;
    e->r = r;
    e->fp = *fp;
    pd_http_req_set_data(r, e);
    pd_http_on_abort(r, ensure_abort);
    sched_sandbox_ensure(pv->s, fp->sandbox, ensure_done, e);
}

static void
on_request(struct pd_http_req *r, void *arg)
{
    struct sched_preview *pv = arg;
    struct sched *s = pv->s;
    const char *host = pd_http_req_header(r, "Host");
    const char *ip = pd_http_req_peer_ip(r);
    struct sched_preview_host ph;
    struct fsm_sandbox sb;
    struct fsm_port fp;
    char hex[SCHED_PREVIEW_HASH_LEN + 1], ra[16];
    unsigned wait;

    pv->n_requests++;
    wait = sched_ratelimit_peek(pv->guesses, ip, pd_now_ms());
    if (wait > 0) {
        snprintf(ra, sizeof(ra), "%u", wait);
        pd_http_add_header(r, "Retry-After", ra);
        pd_http_respond_error(r, 429, "rate_limited", "too many unknown "
                              "preview URLs from this address; retry after "
                              "%u s", wait);
        return;
    }
    if (host == NULL ||
        sched_preview_parse_host(host, strlen(host), s->cfg.preview_domain,
                                 &ph) != 0) {
        not_found(pv, r, NULL, "Host is not a preview URL");
        return;
    }
    if (fsm_port_get(s->fsm, ph.sandbox, ph.port, &fp) != 0) {
        /* Same work as a wrong token, so timing tells nothing. */
        sched_preview_token_matches(ph.token, "");
        not_found(pv, r, &ph, "port not exposed");
        return;
    }
    pd_hex(fp.token_hash, sizeof(fp.token_hash), hex);
    if (!sched_preview_token_matches(ph.token, hex)) {
        not_found(pv, r, &ph, "wrong token");
        return;
    }
    if (fsm_sandbox_get(s->fsm, ph.sandbox, &sb) != 0) {
        not_found(pv, r, &ph, "sandbox gone");
        return;
    }
    if (sb.state == FSM_SB_RUNNING) {
        tunnel_start(pv, r, &sb, &fp);
        fsm_sandbox_clear(&sb);
        return;
    }
    fsm_sandbox_clear(&sb);
    ensure_then_tunnel(pv, r, &fp);
}

/* Tunnels whose port was unexposed (or re-exposed with a new token, or
 * whose sandbox was destroyed) close: the URL is dead everywhere. */
static void
on_sweep(uv_timer_t *h)
{
    struct sched_preview *pv = h->data;
    struct ptun *t, *next;
    struct fsm_port fp;

    for (t = pv->tuns; t != NULL; t = next) {
        next = t->next;
        if (fsm_port_get(pv->s->fsm, t->sandbox, t->port, &fp) == 0 &&
            memcmp(fp.token_hash, t->hash, sizeof(t->hash)) == 0)
            continue;
        pd_info(t->subject, "port %u no longer exposed; closing its open "
                "preview connection", t->port);
        tun_abort(t, 404, "not_found", "no such preview URL");
    }
}

/* ---- life cycle -------------------------------------------------------- */

int
sched_preview_init(struct sched *s, char *err, size_t errlen)
{
    struct pd_http_opts o;
    struct sched_preview *pv;
    const char *env = getenv("PADDOCK_PREVIEW_TIMEOUT_MS");
    uint64_t ms;
    int rc;

    if (s->cfg.preview_listen == NULL || s->cfg.preview_listen[0] == '\0')
        return 0;
    pv = calloc(1, sizeof(*pv));
    if (pv == NULL) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    pv->s = s;
    pv->response_timeout_ms = RESPONSE_TIMEOUT_MS;
    if (env != NULL && pd_parse_u64(env, &ms) == 0 && ms > 0)
        pv->response_timeout_ms = ms;
    rc = sched_ratelimit_new(GUESS_RATE, GUESS_BURST, GUESS_KEYS,
                             &pv->guesses);
    if (rc != 0) {
        snprintf(err, errlen, "preview: cannot create the rate limiter");
        free(pv);
        return rc;
    }
    memset(&o, 0, sizeof(o));
    pd_http_limits_default(&o.limits);
    o.tls = s->api_tls;
    o.on_request = on_request;
    o.arg = pv;
    rc = pd_http_server_new(s->loop, &o, &pv->srv, err, errlen);
    if (rc == 0)
        rc = pd_http_server_listen(pv->srv, s->cfg.preview_listen, err,
                                   errlen);
    if (rc != 0) {
        if (pv->srv != NULL)
            pd_http_server_close(pv->srv, NULL, NULL);
        sched_ratelimit_free(pv->guesses);
        free(pv);
        return rc;
    }
    uv_timer_init(s->loop, &pv->sweep);
    pv->sweep.data = pv;
    uv_timer_start(&pv->sweep, on_sweep, SWEEP_MS, SWEEP_MS);
    s->preview = pv;
    s->preview_srv = pv->srv;
    pd_info("preview", "listening on %s for *.%s", s->cfg.preview_listen,
            s->cfg.preview_domain);
    return 0;
}

static void
sweep_closed(uv_handle_t *h)
{
    struct sched_preview *pv = h->data;

    sched_ratelimit_free(pv->guesses);
    free(pv);
}

void
sched_preview_close(struct sched *s)
{
    struct sched_preview *pv = s->preview;

    if (pv == NULL)
        return;
    s->preview = NULL;
    s->preview_srv = NULL;
    while (pv->tuns != NULL)
        tun_abort(pv->tuns, 503, "unavailable", "the scheduler is "
                  "shutting down");
    pd_http_server_close(pv->srv, NULL, NULL);
    uv_close((uv_handle_t *)&pv->sweep, sweep_closed);
}
