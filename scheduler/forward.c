/*
 * Writes on a follower go to the leader.
 *
 * A write handler calls sched_forward_if_follower before it reads its
 * body. On a follower the request (method, target, headers, body of at
 * most FWD_BODY_MAX) becomes one PD_MSG_FORWARD frame on a mutual-TLS
 * link to the leader's RPC address (members table). The leader turns the
 * frame back into HTTP/1.1 bytes and injects them into its own API server
 * (pd_http_server_inject): the request runs through the very same
 * on_request, authentication and handlers as one from a socket, and the
 * response bytes come back as OK {status, headers, body}.
 *
 * Failure modes, follower side:
 *   - no known leader (an election): the request waits up to
 *     FWD_WAIT_MS for one, then gets 503;
 *   - the link breaks, or the peer says it is not the leader (any ERROR
 *     frame with EREMOTE): the request is queued again and sent to the
 *     leader of the moment, at most FWD_ATTEMPTS times. A write may so
 *     reach two leaders; creates are idempotent by sandbox id and spec
 *     (the FSM checks on apply), so a retried create never makes two;
 *   - this member became the leader while the request waited: it is
 *     injected here, as a leader would do with a frame.
 * The answer carries the leader's applied index and waits until this
 * member has applied as far (read-your-writes through one follower).
 * Leader side: a frame for a member that is not (or no longer) the leader
 * gets ERROR EREMOTE; a reply for a link that closed meanwhile is dropped
 * (nodes.c tells us through sched_forward_conn_closed).
 *
 * Forwarded requests are injected only once: a leader that lost its
 * leadership while running one answers 503 rather than forwarding again.
 */
#include <errno.h>
#include <http_parser.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/log.h"
#include "proto/conn.h"
#include "scheduler/sched.h"

#define FWD_BODY_MAX     (1u << 20)
#define FWD_ATTEMPTS     4
#define FWD_TICK_MS      50
#define FWD_WAIT_MIN_MS  3000
#define FWD_HELLO_MS     5000
#define FWD_REPLY_MS     (11u * 60 * 1000)
#define FWD_HEADERS_MAX  100
#define FWD_RESP_MAX     (PD_FRAME_MAX - 64 * 1024)
#define FWD_HOLD_MS      1000
#define FWD_HOLD_TICK_MS 5

struct resp;

/* A request waiting to be answered by the leader (follower side). */
struct fwd_req {
    struct fwd_req *prev, *next;
    struct sched_forward *f;
    struct pd_http_req *r;
    char method[16];
    char *target;
    char origin[32];
    char **hname, **hvalue; /* end-to-end headers */
    size_t nh;
    char *body;
    size_t body_len;
    uint64_t id;          /* on the link, 0 while queued */
    struct fwd_link *link; /* the link it was sent on */
    unsigned attempts;
    uint64_t deadline;    /* pd_now_ms: give up waiting for a leader */
    uint64_t reply_deadline;
    char *raw;            /* the same request as HTTP bytes (local run) */
    size_t raw_len;
    bool local;           /* injected here: the callback answers */
    struct resp *held;    /* an answer waiting for this member to catch
                             up (read-your-writes) */
    uint64_t hold_index;
    uint64_t hold_deadline;
    /* An internal request (no client): its outcome goes here instead. */
    void (*idone)(void *data, int status);
    void *idata;
};

/* A forwarded request the leader runs for a peer (leader side). */
struct fwd_serve {
    struct fwd_serve *prev, *next;
    struct sched_forward *f;
    struct pd_conn *conn; /* NULL once the peer's link closed */
    uint64_t id;
    struct fwd_req *local; /* or a request of our own, see above */
};

struct fwd_link {
    struct sched_forward *f;
    char addr[FSM_ADDR_MAX + 1];
    uv_tcp_t *tcp;        /* until pd_conn owns it */
    uv_connect_t creq;
    struct pd_conn *conn;
    bool ready;           /* the leader's HELLO arrived */
    uint64_t since;
};

struct sched_forward {
    struct sched *s;
    uv_timer_t tick;
    bool ticking;
    struct fwd_req waiting;  /* list heads (sentinels) */
    struct fwd_req sent;
    struct fwd_req holding;
    uv_timer_t hold_timer;
    struct fwd_serve serving;
    struct fwd_link *link;
    uint64_t wait_ms;
    bool closed;
    char leader_api[FSM_ADDR_MAX + 1];
    char leader_rpc[FSM_ADDR_MAX + 1];
};

/* Static, not malloc'd: link and injection callbacks may still run after
 * sched_forward_close, while the loop winds down. */
static struct sched_forward fwd_state;

static void
list_init(struct fwd_req *h)
{
    h->prev = h->next = h;
}

static void
list_add(struct fwd_req *h, struct fwd_req *q)
{
    q->prev = h->prev;
    q->next = h;
    h->prev->next = q;
    h->prev = q;
}

static void
list_del(struct fwd_req *q)
{
    q->prev->next = q->next;
    q->next->prev = q->prev;
    q->prev = q->next = q;
}

static void kick_tick(struct sched_forward *f);
static void on_hold(uv_timer_t *t);
static void link_close(struct sched_forward *f, const char *why);
static int serve_inject(struct sched_forward *f, const char *raw,
                        size_t raw_len, const char *peer,
                        struct fwd_serve *sv);

/* ---- Leader addresses --------------------------------------------------- */

static bool
leader_member(struct sched *s, struct fsm_member *m)
{
    uint64_t id;
    char addr[FSM_ADDR_MAX + 1];

    if (s->raft == NULL)
        return false;
    raftnode_leader(s->raft, &id, addr, sizeof(addr));
    return id != 0 && fsm_member_get(s->fsm, id, m) == 0;
}

const char *
sched_leader_api_addr(struct sched *s)
{
    struct fsm_member m;

    if (s->fwd == NULL || !leader_member(s, &m) || m.api_addr[0] == '\0')
        return NULL;
    pd_strlcpy(s->fwd->leader_api, m.api_addr, sizeof(s->fwd->leader_api));
    return s->fwd->leader_api;
}

const char *
sched_leader_rpc_addr(struct sched *s)
{
    struct fsm_member m;

    if (s->fwd == NULL || !leader_member(s, &m) || m.rpc_addr[0] == '\0')
        return NULL;
    pd_strlcpy(s->fwd->leader_rpc, m.rpc_addr, sizeof(s->fwd->leader_rpc));
    return s->fwd->leader_rpc;
}

/* ---- HTTP bytes <-> frames ---------------------------------------------- */

/* Headers that describe one hop, never the request itself. The internal
 * marker is never taken from a client. */
static bool
hop_header(const char *name)
{
    static const char *const hop[] = {
        "connection", "keep-alive", "transfer-encoding", "content-length",
        "expect", "upgrade", "te", "trailer", "proxy-connection",
        "x-paddock-forwarded-by",
    };
    size_t i;

    for (i = 0; i < PD_ARRAY_SIZE(hop); i++)
        if (strcasecmp(name, hop[i]) == 0)
            return true;
    return false;
}

static bool
text_ok(const char *s, size_t len, bool allow_space)
{
    size_t i;

    for (i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];

        if (ch == '\r' || ch == '\n' || ch == '\0' ||
            (!allow_space && (ch == ' ' || ch == ':')))
            return false;
    }
    return true;
}

struct sbuf {
    char *p;
    size_t len, cap;
    bool failed;
};

static void
sb_add(struct sbuf *b, const void *data, size_t len)
{
    if (b->failed)
        return;
    if (b->len + len + 1 > b->cap) {
        size_t cap = (b->len + len + 1) * 2;
        char *p = realloc(b->p, cap);

        if (p == NULL) {
            b->failed = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, len);
    b->len += len;
    b->p[b->len] = '\0';
}

static void
sb_str(struct sbuf *b, const char *s)
{
    sb_add(b, s, strlen(s));
}

/*
 * Keeps what the FORWARD frame needs (method, target, end-to-end headers,
 * body) and the same request as HTTP bytes, for running it here.
 */
static int
save_req(struct pd_http_req *r, const char *body, size_t blen,
         struct fwd_req *q)
{
    size_t i, n = pd_http_req_header_count(r);
    const char *name, *value;
    struct sbuf raw = {0};
    char line[64];

    pd_strlcpy(q->method, pd_http_req_method(r), sizeof(q->method));
    q->target = strdup(pd_http_req_target(r));
    q->hname = calloc(n + 1, sizeof(char *));
    q->hvalue = calloc(n + 1, sizeof(char *));
    q->body = malloc(blen + 1);
    if (q->target == NULL || q->hname == NULL || q->hvalue == NULL ||
        q->body == NULL)
        return -ENOMEM;
    memcpy(q->body, body != NULL ? body : "", blen);
    q->body_len = blen;
    sb_str(&raw, q->method);
    sb_str(&raw, " ");
    sb_str(&raw, q->target);
    sb_str(&raw, " HTTP/1.1\r\n");
    for (i = 0; i < n; i++) {
        /* X-Paddock-* headers are ours to set, never a client's. */
        if (!pd_http_req_header_at(r, i, &name, &value) ||
            hop_header(name) || strncasecmp(name, "x-paddock-", 10) == 0)
            continue;
        q->hname[q->nh] = strdup(name);
        q->hvalue[q->nh] = strdup(value);
        if (q->hname[q->nh] == NULL || q->hvalue[q->nh] == NULL) {
            q->nh++;
            free(raw.p);
            return -ENOMEM;
        }
        q->nh++;
        sb_str(&raw, name);
        sb_str(&raw, ": ");
        sb_str(&raw, value);
        sb_str(&raw, "\r\n");
    }
    snprintf(line, sizeof(line), "Content-Length: %zu\r\n", blen);
    sb_str(&raw, line);
    sb_str(&raw, "Connection: close\r\nX-Paddock-Forwarded-By: self\r\n"
           "\r\n");
    if (blen > 0)
        sb_add(&raw, body, blen);
    if (raw.failed) {
        free(raw.p);
        return -ENOMEM;
    }
    q->raw = raw.p;
    q->raw_len = raw.len;
    return 0;
}

/* The FORWARD frame: {method, path (the target), origin, headers:
 * [[name, value]...], body: bin}, under the link's request id. */
static int
send_frame(struct pd_conn *c, const struct fwd_req *q)
{
    struct pd_enc e;
    size_t i;

    pd_enc_begin(&e, PD_MSG_FORWARD, q->id);
    pd_enc_str(&e, "method", q->method);
    pd_enc_str(&e, "path", q->target);
    pd_enc_str(&e, "origin", q->origin);
    pd_enc_key(&e, "headers");
    msgpack_pack_array(&e.pk, q->nh + (q->attempts > 0));
    for (i = 0; i < q->nh; i++) {
        msgpack_pack_array(&e.pk, 2);
        pd_enc_pack_str(&e, q->hname[i]);
        pd_enc_pack_str(&e, q->hvalue[i]);
    }
    if (q->attempts > 0) {
        /* A resend after a lost link or leader: the first attempt may
         * have been applied (see SCHED_RETRY_HEADER). */
        msgpack_pack_array(&e.pk, 2);
        pd_enc_pack_str(&e, SCHED_RETRY_HEADER);
        pd_enc_pack_str(&e, "1");
    }
    pd_enc_bin(&e, "body", q->body, q->body_len);
    return pd_conn_send(c, &e);
}

/* The leader's side: a FORWARD frame back into HTTP bytes. */
static int
frame_to_raw(const struct pd_msg *m, struct sbuf *raw, char *origin,
             size_t originlen, char *err, size_t errlen)
{
    const char *method, *path, *body;
    size_t mlen, plen, blen = 0;
    const msgpack_object_array *hs;
    const void *bptr = NULL;
    char line[64];
    bool has_host = false;
    uint32_t i;

    if (pd_msg_str(m, "method", &method, &mlen) != 0 || mlen == 0 ||
        mlen > 16 || !text_ok(method, mlen, false) ||
        pd_msg_str(m, "path", &path, &plen) != 0 || plen == 0 ||
        path[0] != '/' || plen > 8192 || !text_ok(path, plen, false)) {
        snprintf(err, errlen, "method or path missing or malformed");
        return -EPROTO;
    }
    if (pd_msg_cstr(m, "origin", origin, originlen) != 0 ||
        !text_ok(origin, strlen(origin), true))
        pd_strlcpy(origin, "?", originlen);
    if (pd_msg_array(m, "headers", &hs) != 0 || hs->size > FWD_HEADERS_MAX) {
        snprintf(err, errlen, "headers missing or more than %d",
                 FWD_HEADERS_MAX);
        return -EPROTO;
    }
    switch (pd_msg_bin(m, "body", &bptr, &blen)) {
    case 0:
    case -ENOENT:
        break;
    default:
        snprintf(err, errlen, "body is not binary");
        return -EPROTO;
    }
    body = bptr;
    sb_add(raw, method, mlen);
    sb_str(raw, " ");
    sb_add(raw, path, plen);
    sb_str(raw, " HTTP/1.1\r\n");
    for (i = 0; i < hs->size; i++) {
        const msgpack_object *h = &hs->ptr[i];
        const char *n, *v;
        size_t nl, vl;

        if (h->type != MSGPACK_OBJECT_ARRAY || h->via.array.size != 2 ||
            pd_obj_str(&h->via.array.ptr[0], &n, &nl) != 0 ||
            pd_obj_str(&h->via.array.ptr[1], &v, &vl) != 0 || nl == 0 ||
            !text_ok(n, nl, false) || !text_ok(v, vl, true)) {
            snprintf(err, errlen, "header %u is malformed", i);
            return -EPROTO;
        }
        {
            char name[128];

            if (nl >= sizeof(name)) {
                snprintf(err, errlen, "header %u: name too long", i);
                return -EPROTO;
            }
            memcpy(name, n, nl);
            name[nl] = '\0';
            if (hop_header(name))
                continue;
            has_host |= strcasecmp(name, "host") == 0;
        }
        sb_add(raw, n, nl);
        sb_str(raw, ": ");
        sb_add(raw, v, vl);
        sb_str(raw, "\r\n");
    }
    if (!has_host) /* an HTTP/1.0 client's request is sent as 1.1 */
        sb_str(raw, "Host: paddock\r\n");
    snprintf(line, sizeof(line), "Content-Length: %zu\r\n", blen);
    sb_str(raw, line);
    sb_str(raw, "Connection: close\r\nX-Paddock-Forwarded-By: ");
    sb_str(raw, origin);
    sb_str(raw, "\r\n\r\n");
    if (blen > 0)
        sb_add(raw, body, blen);
    if (raw->failed) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    return 0;
}

/* ---- Parsing the injected response -------------------------------------- */

struct resp {
    int status;
    char **hname, **hvalue;
    size_t nh;
    bool in_value;
    struct sbuf field, value;
    struct sbuf body;
    bool complete;
    bool failed;
};

static void
resp_flush_header(struct resp *x)
{
    char **nn, **nv;

    if (x->field.len == 0)
        return;
    nn = realloc(x->hname, (x->nh + 1) * sizeof(*nn));
    if (nn != NULL)
        x->hname = nn;
    nv = realloc(x->hvalue, (x->nh + 1) * sizeof(*nv));
    if (nv != NULL)
        x->hvalue = nv;
    if (nn == NULL || nv == NULL) {
        x->failed = true;
        return;
    }
    x->hname[x->nh] = x->field.p;
    x->hvalue[x->nh] = x->value.p != NULL ? x->value.p : strdup("");
    x->nh++;
    memset(&x->field, 0, sizeof(x->field));
    memset(&x->value, 0, sizeof(x->value));
}

static int
on_hfield(http_parser *p, const char *at, size_t len)
{
    struct resp *x = p->data;

    if (x->in_value) {
        resp_flush_header(x);
        x->in_value = false;
    }
    sb_add(&x->field, at, len);
    return 0;
}

static int
on_hvalue(http_parser *p, const char *at, size_t len)
{
    struct resp *x = p->data;

    x->in_value = true;
    sb_add(&x->value, at, len);
    return 0;
}

static int
on_hdone(http_parser *p)
{
    struct resp *x = p->data;

    resp_flush_header(x);
    x->status = (int)p->status_code;
    return 0;
}

static int
on_rbody(http_parser *p, const char *at, size_t len)
{
    struct resp *x = p->data;

    sb_add(&x->body, at, len);
    return x->body.len > FWD_RESP_MAX ? -1 : 0;
}

static int
on_rdone(http_parser *p)
{
    ((struct resp *)p->data)->complete = true;
    return 0;
}

static void
resp_free(struct resp *x)
{
    size_t i;

    for (i = 0; i < x->nh; i++) {
        free(x->hname[i]);
        free(x->hvalue[i]);
    }
    free(x->hname);
    free(x->hvalue);
    free(x->field.p);
    free(x->value.p);
    free(x->body.p);
}

static int
resp_parse(const char *buf, size_t len, struct resp *x)
{
    http_parser_settings st;
    http_parser p;

    memset(x, 0, sizeof(*x));
    memset(&st, 0, sizeof(st));
    st.on_header_field = on_hfield;
    st.on_header_value = on_hvalue;
    st.on_headers_complete = on_hdone;
    st.on_body = on_rbody;
    st.on_message_complete = on_rdone;
    http_parser_init(&p, HTTP_RESPONSE);
    p.data = x;
    http_parser_execute(&p, &st, buf, len);
    if (HTTP_PARSER_ERRNO(&p) == HPE_OK && !x->complete)
        http_parser_execute(&p, &st, NULL, 0);
    if (x->status == 0 || x->failed || x->body.failed)
        return -EPROTO;
    return 0;
}

/* ---- Answering the client (follower side) -------------------------------- */

static void q_fail(struct fwd_req *q, int status, const char *code,
                   const char *fmt, ...) __attribute__((format(printf, 4, 5)));

/* Answers the client, or ends an internal request, with an error. */
static void
q_fail(struct fwd_req *q, int status, const char *code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (q->r != NULL) {
        pd_http_respond_error(q->r, status, code, "%s", msg);
    } else if (q->idone != NULL) {
        pd_debug("forward", "%s %s: %d %s", q->method, q->target, status,
                 msg);
        q->idone(q->idata, status);
        q->idone = NULL;
    }
}

static void
req_free(struct fwd_req *q)
{
    size_t i;

    if (q->next != q)
        list_del(q);
    for (i = 0; i < q->nh; i++) {
        free(q->hname[i]);
        free(q->hvalue[i]);
    }
    free(q->hname);
    free(q->hvalue);
    free(q->target);
    free(q->body);
    free(q->raw);
    if (q->held != NULL) {
        resp_free(q->held);
        free(q->held);
    }
    free(q);
}

static void
answer_resp(struct pd_http_req *r, const struct resp *x)
{
    const char *ctype = NULL;
    size_t i;

    for (i = 0; i < x->nh; i++) {
        if (strcasecmp(x->hname[i], "content-type") == 0)
            ctype = x->hvalue[i];
        else if (!hop_header(x->hname[i]))
            pd_http_add_header(r, x->hname[i], x->hvalue[i]);
    }
    pd_http_respond(r, x->status, ctype, x->body.p != NULL ? x->body.p : "",
                    x->body.len);
}

/* The leader's OK {status, headers, body} as a struct resp. */
static int
msg_to_resp(const struct pd_msg *m, struct resp *x)
{
    const msgpack_object_array *hs;
    const void *body = NULL;
    size_t blen = 0;
    uint64_t status;
    uint32_t i;

    memset(x, 0, sizeof(*x));
    if (pd_msg_u64(m, "status", &status) != 0 || status < 100 ||
        status > 599 || pd_msg_array(m, "headers", &hs) != 0 ||
        hs->size > FWD_HEADERS_MAX ||
        (pd_msg_bin(m, "body", &body, &blen) != 0 && blen != 0))
        return -EPROTO;
    x->status = (int)status;
    for (i = 0; i < hs->size; i++) {
        const msgpack_object *h = &hs->ptr[i];
        const char *n, *v;
        size_t nl, vl;

        if (h->type != MSGPACK_OBJECT_ARRAY || h->via.array.size != 2 ||
            pd_obj_str(&h->via.array.ptr[0], &n, &nl) != 0 ||
            pd_obj_str(&h->via.array.ptr[1], &v, &vl) != 0 || nl == 0 ||
            nl > 128 || vl > 4096 || !text_ok(n, nl, false) ||
            !text_ok(v, vl, true))
            continue;
        sb_add(&x->field, n, nl);
        sb_add(&x->value, v, vl);
        if (x->value.p == NULL)
            sb_add(&x->value, "", 0);
        resp_flush_header(x);
    }
    sb_add(&x->body, body != NULL ? body : "", blen);
    if (x->failed || x->body.failed) {
        resp_free(x);
        return -ENOMEM;
    }
    return 0;
}

static uint64_t
applied_here(struct sched *s)
{
    struct raftnode_status st;

    if (s->raft == NULL)
        return 0;
    raftnode_status(s->raft, &st);
    return st.last_applied;
}

/*
 * Read-your-writes: the leader says up to which index it had applied when
 * it answered. A client that writes through this follower and then reads
 * from it must see its write, so the answer waits (at most FWD_HOLD_MS)
 * until this member has applied as far.
 */
static void
answer_ok(struct fwd_req *q, const struct pd_msg *m)
{
    struct sched_forward *f = q->f;
    struct resp *x = malloc(sizeof(*x));
    uint64_t idx = 0;

    if (x == NULL || msg_to_resp(m, x) != 0) {
        free(x);
        q_fail(q, 502, "unavailable", "the leader's answer was malformed");
        req_free(q);
        return;
    }
    if (q->r == NULL) {
        if (q->idone != NULL)
            q->idone(q->idata, x->status);
        q->idone = NULL;
    } else if (pd_msg_u64(m, "applied", &idx) == 0 &&
               applied_here(f->s) < idx) {
        list_del(q);
        q->held = x;
        q->hold_index = idx;
        q->hold_deadline = pd_now_ms() + FWD_HOLD_MS;
        list_add(&f->holding, q);
        uv_timer_start(&f->hold_timer, on_hold, FWD_HOLD_TICK_MS,
                       FWD_HOLD_TICK_MS);
        return;
    } else {
        answer_resp(q->r, x);
    }
    resp_free(x);
    free(x);
    req_free(q);
}

static void
on_hold(uv_timer_t *t)
{
    struct sched_forward *f = t->data;
    uint64_t idx = applied_here(f->s), now = pd_now_ms();
    struct fwd_req *q, *next;

    for (q = f->holding.next; q != &f->holding; q = next) {
        next = q->next;
        if (idx >= q->hold_index || now >= q->hold_deadline ||
            f->closed) {
            answer_resp(q->r, q->held);
            req_free(q);
        }
    }
    if (f->holding.next == &f->holding)
        uv_timer_stop(&f->hold_timer);
}

/* ---- The link to the leader (follower side) ----------------------------- */

static void
requeue(struct fwd_req *q, const char *why)
{
    struct sched_forward *f = q->f;

    list_del(q);
    q->id = 0;
    q->link = NULL;
    if (f->closed) {
        q_fail(q, 503, "unavailable", "shutting down");
        req_free(q);
        return;
    }
    if (++q->attempts >= FWD_ATTEMPTS) {
        q_fail(q, 503, "unavailable", "the leader did not answer (%s); "
               "retry", why);
        req_free(q);
        return;
    }
    q->deadline = pd_now_ms() + f->wait_ms;
    list_add(&f->waiting, q);
    sched_metrics_inc(f->s, "forward_retries", 1);
    kick_tick(f);
}

/* Ids are per connection: a reply matches only a request of its link. */
static struct fwd_req *
sent_find(struct sched_forward *f, struct fwd_link *l, uint64_t id)
{
    struct fwd_req *q;

    for (q = f->sent.next; q != &f->sent; q = q->next)
        if (q->link == l && q->id == id)
            return q;
    return NULL;
}

static void
link_msg(struct pd_conn *c, const struct pd_msg *m)
{
    struct fwd_link *l = pd_conn_data(c);
    struct sched_forward *f = l->f;
    struct fwd_req *q;

    if (m->type == PD_MSG_HELLO) {
        if (strcmp(pd_conn_peer_role(c), "scheduler") != 0 ||
            !pd_conn_peer_has_ou(c, "scheduler")) {
            pd_warn("forward", "leader %s: peer is not a scheduler, "
                    "closing the link", l->addr);
            pd_conn_close(c, -EPERM, "not a scheduler");
            return;
        }
        l->ready = true;
        kick_tick(f);
        return;
    }
    if (m->type != PD_MSG_OK && m->type != PD_MSG_ERROR)
        return;
    if ((q = sent_find(f, l, m->id)) == NULL)
        return;
    if (m->type == PD_MSG_OK) {
        answer_ok(q, m);
        return;
    }
    {
        char code[32] = "", msg[256] = "";
        int64_t eno = 0;

        pd_msg_cstr(m, "code", code, sizeof(code));
        pd_msg_cstr(m, "message", msg, sizeof(msg));
        pd_msg_i64(m, "errno", &eno);
        /* Not (or no longer) the leader, or going away: try again on the
         * leader of the moment. */
        if (eno == EREMOTE || eno == ESHUTDOWN) {
            requeue(q, msg);
            return;
        }
        q_fail(q, 502, "unavailable", "leader: %s",
               msg[0] != '\0' ? msg : code);
        req_free(q);
    }
}

static void
link_closed(struct pd_conn *c, int reason)
{
    struct fwd_link *l = pd_conn_data(c);
    struct sched_forward *f = l->f;
    struct fwd_req *q, *next;

    PD_UNUSED(reason);
    if (f->link == l)
        f->link = NULL;
    pd_info("forward", "leader %s: link closed (%s)%s", l->addr,
            pd_conn_error(c)[0] != '\0' ? pd_conn_error(c) : "done",
            f->sent.next != &f->sent ? "; retrying its requests" : "");
    for (q = f->sent.next; q != &f->sent; q = next) {
        next = q->next;
        if (q->link == l)
            requeue(q, "the link to the leader broke");
    }
    free(l);
}

static void
on_tcp_closed(uv_handle_t *h)
{
    free(h);
}

static void
on_connect(uv_connect_t *req, int status)
{
    struct fwd_link *l = req->data;
    struct sched_forward *f = l->f;
    struct pd_conn_opts o;
    struct pd_conn_cb cb = {.on_msg = link_msg, .on_close = link_closed};
    char name[32], subject[FSM_ADDR_MAX + 16];
    uv_tcp_t *tcp = l->tcp;

    l->tcp = NULL;
    if (status < 0 || f->link != l) {
        if (status < 0)
            pd_info("forward", "leader %s: connect failed (%s), retrying",
                    l->addr, uv_strerror(status));
        uv_close((uv_handle_t *)tcp, on_tcp_closed);
        if (f->link == l)
            f->link = NULL;
        free(l);
        kick_tick(f);
        return;
    }
    snprintf(name, sizeof(name), "%llu", (unsigned long long)f->s->cfg.id);
    snprintf(subject, sizeof(subject), "leader %s", l->addr);
    memset(&o, 0, sizeof(o));
    o.role = "scheduler";
    o.name = name;
    o.tls = f->s->rpc_client_tls;
    o.tls_server = false;
    o.subject = subject;
    l->conn = pd_conn_new((uv_stream_t *)tcp, &o, &cb, l);
    if (l->conn == NULL) {
        f->link = NULL;
        free(l);
    }
}

static int
parse_hostport(const char *addr, struct sockaddr_storage *ss)
{
    char host[FSM_ADDR_MAX + 1];
    const char *colon = strrchr(addr, ':');
    size_t hl;
    int port;

    if (colon == NULL || colon == addr)
        return -EINVAL;
    hl = (size_t)(colon - addr);
    if (hl >= sizeof(host))
        return -EINVAL;
    memcpy(host, addr, hl);
    host[hl] = '\0';
    port = atoi(colon + 1);
    if (host[0] == '[' && hl > 2 && host[hl - 1] == ']') {
        host[hl - 1] = '\0';
        return uv_ip6_addr(host + 1, port, (struct sockaddr_in6 *)ss) == 0
                   ? 0 : -EINVAL;
    }
    return uv_ip4_addr(host, port, (struct sockaddr_in *)ss) == 0 ? 0
                                                                 : -EINVAL;
}

static void
link_open(struct sched_forward *f, const char *addr)
{
    struct sockaddr_storage ss;
    struct fwd_link *l;

    memset(&ss, 0, sizeof(ss));
    if (parse_hostport(addr, &ss) != 0) {
        pd_warn("forward", "leader %s: not a numeric host:port, cannot "
                "forward", addr);
        return;
    }
    if ((l = calloc(1, sizeof(*l))) == NULL)
        return;
    if ((l->tcp = malloc(sizeof(*l->tcp))) == NULL) {
        free(l);
        return;
    }
    l->f = f;
    pd_strlcpy(l->addr, addr, sizeof(l->addr));
    l->since = pd_now_ms();
    uv_tcp_init(f->s->loop, l->tcp);
    l->creq.data = l;
    if (uv_tcp_connect(&l->creq, l->tcp, (struct sockaddr *)&ss,
                       on_connect) != 0) {
        uv_close((uv_handle_t *)l->tcp, on_tcp_closed);
        free(l);
        return;
    }
    f->link = l;
}

static void
link_close(struct sched_forward *f, const char *why)
{
    struct fwd_link *l = f->link;

    if (l == NULL)
        return;
    if (l->conn != NULL) {
        pd_conn_close(l->conn, -ECONNABORTED, "%s", why);
        return;
    }
    /* Still connecting: on_connect frees it. */
    f->link = NULL;
}

/* ---- Running a request here (this member became the leader) ------------- */

static void
local_done(struct fwd_req *q, const char *resp, size_t len, int err)
{
    struct resp x;
    int prv = err == 0 ? resp_parse(resp, len, &x) : -EPROTO;

    if (prv == 0 && q->r == NULL) {
        if (q->idone != NULL)
            q->idone(q->idata, x.status);
        q->idone = NULL;
    } else if (prv == 0) {
        answer_resp(q->r, &x);
    } else {
        q_fail(q, 503, "unavailable", "the request could not be run (%s)",
               err != 0 ? strerror(-err) : "bad response");
    }
    if (err == 0)
        resp_free(&x);
    req_free(q);
}

static void
run_local(struct sched_forward *f, struct fwd_req *q)
{
    struct fwd_serve *sv = calloc(1, sizeof(*sv));
    int rv;

    list_del(q);
    if (sv == NULL) {
        q_fail(q, 503, "unavailable", "out of memory");
        req_free(q);
        return;
    }
    sv->f = f;
    sv->local = q;
    q->local = true;
    rv = serve_inject(f, q->raw, q->raw_len, "self", sv);
    if (rv != 0) {
        q_fail(q, 503, "unavailable", "the request could not be run (%s)",
               strerror(-rv));
        req_free(q);
    }
}

/* ---- The queue ---------------------------------------------------------- */

static void
send_one(struct sched_forward *f, struct fwd_req *q)
{
    struct pd_conn *c = f->link->conn;
    int rv;

    list_del(q);
    q->id = pd_conn_next_id(c);
    rv = send_frame(c, q);
    if (rv != 0) {
        q_fail(q, rv == -EMSGSIZE ? 413 : 503,
               rv == -EMSGSIZE ? "invalid_argument" : "unavailable",
               "forwarding to the leader: %s", strerror(-rv));
        req_free(q);
        return;
    }
    q->reply_deadline = pd_now_ms() + FWD_REPLY_MS;
    q->link = f->link;
    list_add(&f->sent, q);
}

static void
on_tick(uv_timer_t *t)
{
    struct sched_forward *f = t->data;
    struct sched *s = f->s;
    struct fwd_req *q, *next;
    uint64_t now = pd_now_ms();
    const char *addr = NULL;
    bool leader = s->raft != NULL && raftnode_is_leader(s->raft);

    if (!leader)
        addr = sched_leader_rpc_addr(s);
    if (f->link != NULL && (leader || addr == NULL ||
                            strcmp(f->link->addr, addr) != 0))
        link_close(f, "the leader changed");
    if (f->link != NULL && !f->link->ready &&
        now - f->link->since > FWD_HELLO_MS)
        link_close(f, "no HELLO from the leader");
    if (!leader && addr != NULL && f->link == NULL &&
        f->waiting.next != &f->waiting)
        link_open(f, addr);
    for (q = f->waiting.next; q != &f->waiting; q = next) {
        next = q->next;
        if (leader) {
            run_local(f, q);
        } else if (f->link != NULL && f->link->ready &&
                   f->link->conn != NULL) {
            send_one(f, q);
        } else if (now >= q->deadline) {
            q_fail(q, 503, "unavailable",
                   "no leader to take the write; retry");
            req_free(q);
        }
    }
    for (q = f->sent.next; q != &f->sent; q = next) {
        next = q->next;
        if (now >= q->reply_deadline) {
            q_fail(q, 504, "unavailable",
                   "the leader did not answer in time");
            req_free(q);
        }
    }
    if (f->waiting.next == &f->waiting && f->sent.next == &f->sent) {
        uv_timer_stop(&f->tick);
        f->ticking = false;
    }
}

static void
kick_tick(struct sched_forward *f)
{
    if (f->s->stopping)
        return;
    /* Run soon, then every tick while anything waits. */
    uv_timer_start(&f->tick, on_tick, 0, FWD_TICK_MS);
    f->ticking = true;
}

static void
on_fwd_body(struct pd_http_req *r, int err, const char *body, size_t len,
            void *arg)
{
    struct sched_forward *f = arg;
    struct fwd_req *q;
    int rv;

    if (err != 0) {
        pd_http_fail(r, err);
        return;
    }
    if ((q = calloc(1, sizeof(*q))) == NULL) {
        pd_http_respond_error(r, 503, "unavailable", "out of memory");
        return;
    }
    q->prev = q->next = q;
    q->f = f;
    q->r = r;
    snprintf(q->origin, sizeof(q->origin), "scheduler %llu",
             (unsigned long long)f->s->cfg.id);
    if ((rv = save_req(r, body, len, q)) != 0) {
        pd_http_respond_error(r, 503, "unavailable", "forwarding to the "
                              "leader: %s", strerror(-rv));
        req_free(q);
        return;
    }
    q->deadline = pd_now_ms() + f->wait_ms;
    list_add(&f->waiting, q);
    sched_metrics_inc(f->s, "forwarded", 1);
    kick_tick(f);
}

bool
sched_forward_if_follower(struct sched_call *c, struct pd_http_req *r)
{
    struct sched *s = c->s;
    struct sched_forward *f = s->fwd;

    if (s->raft != NULL && raftnode_is_leader(s->raft))
        return false;
    if (f == NULL || f->closed || s->stopping) {
        pd_http_respond_error(r, 503, "unavailable", "shutting down");
        return true;
    }
    if (pd_http_req_injected(r)) {
        /* Forwarded once already: never bounce it around. */
        pd_http_respond_error(r, 503, "unavailable", "this member lost its "
                              "leadership; retry");
        return true;
    }
    if (pd_http_body_read(r, FWD_BODY_MAX, on_fwd_body, f) != 0) {
        pd_http_respond_error(r, 500, "internal", "the body was already "
                              "read before forwarding");
    }
    return true;
}

/*
 * A request of the scheduler's own to the leader (no client): marked with
 * SCHED_INTERNAL_HEADER, which the leader trusts only on injected requests
 * (they come over the mutual-TLS scheduler link) and which save_req strips
 * from every client request. done gets the leader's status, or a 5xx.
 */
int
sched_forward_internal(struct sched *s, const char *method,
                       const char *target, const char *body,
                       void (*done)(void *data, int status), void *data)
{
    struct sched_forward *f = s->fwd;
    struct fwd_req *q;
    struct sbuf raw = {0};
    size_t blen = strlen(body);
    char line[64];

    if (f == NULL || f->closed || s->stopping)
        return -ESHUTDOWN;
    if ((q = calloc(1, sizeof(*q))) == NULL)
        return -ENOMEM;
    q->prev = q->next = q;
    q->f = f;
    q->idone = done;
    q->idata = data;
    snprintf(q->origin, sizeof(q->origin), "scheduler %llu",
             (unsigned long long)s->cfg.id);
    pd_strlcpy(q->method, method, sizeof(q->method));
    q->target = strdup(target);
    q->body = strdup(body);
    q->hname = calloc(3, sizeof(char *));
    q->hvalue = calloc(3, sizeof(char *));
    if (q->target == NULL || q->body == NULL || q->hname == NULL ||
        q->hvalue == NULL)
        goto nomem;
    q->body_len = blen;
    q->hname[0] = strdup("Content-Type");
    q->hvalue[0] = strdup("application/json");
    q->hname[1] = strdup(SCHED_INTERNAL_HEADER);
    q->hvalue[1] = strdup("member");
    q->hname[2] = strdup("Host");
    q->hvalue[2] = strdup("paddock");
    q->nh = 3;
    sb_str(&raw, method);
    sb_str(&raw, " ");
    sb_str(&raw, target);
    sb_str(&raw, " HTTP/1.1\r\nHost: paddock\r\n"
           "Content-Type: application/json\r\n");
    sb_str(&raw, SCHED_INTERNAL_HEADER);
    snprintf(line, sizeof(line), ": member\r\nContent-Length: %zu\r\n",
             blen);
    sb_str(&raw, line);
    sb_str(&raw, "Connection: close\r\n\r\n");
    sb_str(&raw, body);
    if (raw.failed)
        goto nomem;
    q->raw = raw.p;
    q->raw_len = raw.len;
    q->deadline = pd_now_ms() + f->wait_ms;
    list_add(&f->waiting, q);
    kick_tick(f);
    return 0;
nomem:
    free(raw.p);
    q->idone = NULL;
    req_free(q);
    return -ENOMEM;
}

/* ---- Serving forwarded requests (leader side) --------------------------- */

static void
serve_list_del(struct fwd_serve *sv)
{
    sv->prev->next = sv->next;
    sv->next->prev = sv->prev;
}

static void
serve_reply(struct fwd_serve *sv, int err, const char *resp, size_t len)
{
    struct resp x;
    struct pd_enc e;
    size_t i;

    if (err != 0 || resp_parse(resp, len, &x) != 0) {
        pd_conn_send_error(sv->conn, sv->id, ESHUTDOWN, "the leader could "
                           "not finish the request (%s); retry",
                           err != 0 ? strerror(-err) : "bad response");
        if (err == 0)
            resp_free(&x);
        return;
    }
    pd_enc_begin(&e, PD_MSG_OK, sv->id);
    pd_enc_u64(&e, "status", (uint64_t)x.status);
    pd_enc_key(&e, "headers");
    msgpack_pack_array(&e.pk, x.nh);
    for (i = 0; i < x.nh; i++) {
        msgpack_pack_array(&e.pk, 2);
        pd_enc_pack_str(&e, x.hname[i]);
        pd_enc_pack_str(&e, x.hvalue[i]);
    }
    pd_enc_bin(&e, "body", x.body.p != NULL ? x.body.p : "", x.body.len);
    pd_enc_u64(&e, "applied", applied_here(sv->f->s));
    if (pd_conn_send(sv->conn, &e) == -EMSGSIZE)
        pd_conn_send_error(sv->conn, sv->id, EMSGSIZE, "the answer is too "
                           "large to forward");
    resp_free(&x);
}

static void
on_injected(void *arg, int err, const char *resp, size_t len)
{
    struct fwd_serve *sv = arg;

    serve_list_del(sv);
    if (sv->local != NULL)
        local_done(sv->local, resp, len, err);
    else if (sv->conn != NULL)
        serve_reply(sv, err, resp, len);
    free(sv);
}

static int
serve_inject(struct sched_forward *f, const char *raw, size_t raw_len,
             const char *peer, struct fwd_serve *sv)
{
    int rv;

    if (f->s->api == NULL)
        return -ESHUTDOWN;
    sv->prev = &f->serving;
    sv->next = f->serving.next;
    f->serving.next->prev = sv;
    f->serving.next = sv;
    rv = pd_http_server_inject(f->s->api, raw, raw_len, peer, on_injected,
                               sv);
    if (rv != 0) {
        serve_list_del(sv);
        free(sv);
    }
    return rv;
}

void
sched_forward_serve(struct sched *s, struct pd_conn *c,
                    const struct pd_msg *m)
{
    struct sched_forward *f = s->fwd;
    struct sbuf raw = {0};
    struct fwd_serve *sv;
    char err[160], origin[64], peer[96];
    int rv;

    if (m->type != PD_MSG_FORWARD)
        return;
    if (f == NULL || f->closed || s->stopping) {
        pd_conn_send_error(c, m->id, ESHUTDOWN, "shutting down");
        return;
    }
    if (s->raft == NULL || !raftnode_is_leader(s->raft)) {
        pd_conn_send_error(c, m->id, EREMOTE, "member %llu is not the "
                           "leader", (unsigned long long)s->cfg.id);
        return;
    }
    rv = frame_to_raw(m, &raw, origin, sizeof(origin), err, sizeof(err));
    if (rv != 0) {
        pd_warn("forward", "%s: bad FORWARD frame (%s), refusing it",
                pd_conn_peer_name(c), err);
        pd_conn_send_error(c, m->id, -rv, "bad FORWARD frame: %s", err);
        free(raw.p);
        return;
    }
    if ((sv = calloc(1, sizeof(*sv))) == NULL) {
        pd_conn_send_error(c, m->id, ENOMEM, "out of memory");
        free(raw.p);
        return;
    }
    sv->f = f;
    sv->conn = c;
    sv->id = m->id;
    snprintf(peer, sizeof(peer), "forwarded by %s", origin);
    rv = serve_inject(f, raw.p, raw.len, peer, sv);
    free(raw.p);
    if (rv != 0)
        pd_conn_send_error(c, m->id, -rv, "cannot run the request: %s",
                           strerror(-rv));
}

void
sched_forward_conn_closed(struct sched *s, struct pd_conn *c)
{
    struct sched_forward *f = s->fwd;
    struct fwd_serve *sv;

    if (f == NULL)
        return;
    for (sv = f->serving.next; sv != &f->serving; sv = sv->next)
        if (sv->conn == c)
            sv->conn = NULL;
}

/* ---- Life cycle ---------------------------------------------------------- */

int
sched_forward_init(struct sched *s, char *err, size_t errlen)
{
    struct sched_forward *f = &fwd_state;

    PD_UNUSED(err);
    PD_UNUSED(errlen);
    memset(f, 0, sizeof(*f));
    f->s = s;
    list_init(&f->waiting);
    list_init(&f->sent);
    list_init(&f->holding);
    uv_timer_init(s->loop, &f->hold_timer);
    f->hold_timer.data = f;
    f->serving.prev = f->serving.next = &f->serving;
    /* Long enough for an election with a split vote or two. */
    f->wait_ms = 5 * s->cfg.election_timeout_ms;
    if (f->wait_ms < FWD_WAIT_MIN_MS)
        f->wait_ms = FWD_WAIT_MIN_MS;
    uv_timer_init(s->loop, &f->tick);
    f->tick.data = f;
    s->fwd = f;
    return 0;
}

void
sched_forward_close(struct sched *s)
{
    struct sched_forward *f = s->fwd;
    struct fwd_req *q, *next;
    struct fwd_serve *sv;

    if (f == NULL || f->closed)
        return;
    f->closed = true;
    for (q = f->waiting.next; q != &f->waiting; q = next) {
        next = q->next;
        q_fail(q, 503, "unavailable", "shutting down");
        req_free(q);
    }
    for (q = f->sent.next; q != &f->sent; q = next) {
        next = q->next;
        q_fail(q, 503, "unavailable", "shutting down");
        req_free(q);
    }
    /* Injected requests end when the API server closes; replies to peers
     * have nowhere to go by then. */
    for (sv = f->serving.next; sv != &f->serving; sv = sv->next)
        sv->conn = NULL;
    link_close(f, "shutting down");
    for (q = f->holding.next; q != &f->holding; q = next) {
        next = q->next;
        answer_resp(q->r, q->held);
        req_free(q);
    }
    uv_timer_stop(&f->tick);
    uv_close((uv_handle_t *)&f->tick, NULL);
    uv_timer_stop(&f->hold_timer);
    uv_close((uv_handle_t *)&f->hold_timer, NULL);
}
