#include "proto/conn.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "proto/tls.h"

#define READ_BUF (64u << 10)

struct pd_conn {
    uv_stream_t *stream;
    struct pd_decoder dec;
    struct pd_tls *tls;
    struct pd_conn_cb cb;
    void *data;
    char *rbuf;
    size_t queued;    /* bytes handed to uv_write and not yet written */
    bool drain_armed; /* queued went over the low-water mark */
    bool closing;
    bool paused;
    bool hello_seen;
    bool in_drain;    /* guards against re-entrant frame delivery */
    int reason;
    uint64_t next_id;
    char role[16];
    char name[80];
    char subject[80];
    char err[256];
};

struct write_req {
    uv_write_t req;
    struct pd_conn *conn;
    size_t len;
    char *buf;
};

static void drain_frames(struct pd_conn *c);

static void
free_conn(struct pd_conn *c)
{
    pd_decoder_free(&c->dec);
    pd_tls_free(c->tls);
    free(c->rbuf);
    free(c->stream);
    free(c);
}

static void
on_handle_closed(uv_handle_t *h)
{
    struct pd_conn *c = h->data;

    if (c->cb.on_close != NULL)
        c->cb.on_close(c, c->reason);
    free_conn(c);
}

static void
vclose(struct pd_conn *c, int reason, const char *fmt, va_list ap)
    __attribute__((format(printf, 3, 0)));

static void
vclose(struct pd_conn *c, int reason, const char *fmt, va_list ap)
{
    if (c->closing)
        return;
    c->closing = true;
    c->reason = reason;
    if (fmt != NULL)
        vsnprintf(c->err, sizeof(c->err), fmt, ap);
    if (reason != 0)
        pd_debug(c->subject, "closing connection: %s", c->err);
    if (!uv_is_closing((uv_handle_t *)c->stream))
        uv_close((uv_handle_t *)c->stream, on_handle_closed);
}

static void
conn_close(struct pd_conn *c, int reason, const char *fmt, ...)
    PD_PRINTF(3, 4);

static void
conn_close(struct pd_conn *c, int reason, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vclose(c, reason, fmt, ap);
    va_end(ap);
}

static void
on_shutdown(uv_shutdown_t *req, int status)
{
    struct pd_conn *c = req->data;

    PD_UNUSED(status);
    free(req);
    if (!uv_is_closing((uv_handle_t *)c->stream))
        uv_close((uv_handle_t *)c->stream, on_handle_closed);
}

void
pd_conn_close(struct pd_conn *c, int reason, const char *fmt, ...)
{
    uv_shutdown_t *req;
    va_list ap;

    if (c->closing)
        return;
    if (reason != 0 || c->queued == 0) {
        va_start(ap, fmt);
        vclose(c, reason, fmt, ap);
        va_end(ap);
        return;
    }
    /* A clean close lets queued frames reach the peer first. */
    c->closing = true;
    c->reason = 0;
    if (fmt != NULL) {
        va_start(ap, fmt);
        vsnprintf(c->err, sizeof(c->err), fmt, ap);
        va_end(ap);
    }
    if (c->tls != NULL)
        pd_tls_shutdown(c->tls);
    uv_read_stop(c->stream);
    req = malloc(sizeof(*req));
    if (req == NULL || uv_shutdown(req, c->stream, on_shutdown) != 0) {
        free(req);
        uv_close((uv_handle_t *)c->stream, on_handle_closed);
        return;
    }
    req->data = c;
}

static void
on_write(uv_write_t *req, int status)
{
    struct write_req *w = (struct write_req *)req;
    struct pd_conn *c = w->conn;

    c->queued -= w->len;
    free(w->buf);
    free(w);
    if (status < 0 && status != UV_ECANCELED) {
        conn_close(c, -EPIPE, "write failed: %s", uv_strerror(status));
        return;
    }
    if (!c->closing && c->drain_armed && c->queued < PD_CONN_LOW_WATER) {
        c->drain_armed = false;
        if (c->cb.on_drain != NULL)
            c->cb.on_drain(c);
    }
}

/* Queues bytes for the socket; takes ownership of buf. */
static int
write_raw(struct pd_conn *c, char *buf, size_t len)
{
    struct write_req *w;
    uv_buf_t b;
    int rv;

    w = malloc(sizeof(*w));
    if (w == NULL) {
        free(buf);
        return -ENOMEM;
    }
    w->conn = c;
    w->buf = buf;
    w->len = len;
    b = uv_buf_init(buf, (unsigned)len);
    rv = uv_write(&w->req, c->stream, &b, 1, on_write);
    if (rv != 0) {
        free(buf);
        free(w);
        conn_close(c, -EPIPE, "write failed: %s", uv_strerror(rv));
        return -EPIPE;
    }
    c->queued += len;
    if (c->queued >= PD_CONN_LOW_WATER)
        c->drain_armed = true;
    return 0;
}

static void
tls_on_cipher(void *arg, const void *data, size_t len)
{
    struct pd_conn *c = arg;
    char *copy;

    if (c->closing && uv_is_closing((uv_handle_t *)c->stream))
        return;
    copy = malloc(len);
    if (copy == NULL) {
        conn_close(c, -ENOMEM, "out of memory");
        return;
    }
    memcpy(copy, data, len);
    write_raw(c, copy, len);
}

static void
tls_on_plain(void *arg, const void *data, size_t len)
{
    struct pd_conn *c = arg;

    if (c->closing)
        return;
    if (pd_decoder_feed(&c->dec, data, len) != 0) {
        conn_close(c, -ENOMEM, "out of memory buffering a frame");
        return;
    }
    drain_frames(c);
}

int
pd_conn_send_frame(struct pd_conn *c, void *buf, size_t len)
{
    int rv;

    if (c->closing) {
        free(buf);
        return -ENOTCONN;
    }
    if (c->tls == NULL)
        return write_raw(c, buf, len);
    rv = pd_tls_write(c->tls, buf, len);
    free(buf);
    if (rv != 0)
        conn_close(c, rv, "%s", pd_tls_error(c->tls));
    return rv;
}

int
pd_conn_send(struct pd_conn *c, struct pd_enc *e)
{
    void *buf;
    size_t len;
    int rv;

    if (c->closing) {
        pd_enc_discard(e);
        return -ENOTCONN;
    }
    rv = pd_enc_finish(e, &buf, &len);
    if (rv != 0)
        return rv;
    return pd_conn_send_frame(c, buf, len);
}

int
pd_conn_send_error(struct pd_conn *c, uint64_t id, int errnum,
                   const char *fmt, ...)
{
    char msg[512];
    void *buf;
    size_t len;
    va_list ap;
    int rv;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    rv = pd_enc_error(id, errnum, msg, &buf, &len);
    if (rv != 0)
        return rv;
    return pd_conn_send_frame(c, buf, len);
}

static int
check_hello(struct pd_conn *c, const struct pd_msg *m)
{
    uint64_t v;

    if (m->type != PD_MSG_HELLO) {
        conn_close(c, -EPROTO, "expected HELLO first, got %s",
                   pd_msg_type_name(m->type));
        return -1;
    }
    if (pd_msg_u64(m, "v", &v) != 0) {
        conn_close(c, -EPROTO, "HELLO without a protocol version");
        return -1;
    }
    if (v != PD_PROTO_VERSION) {
        pd_conn_send_error(c, m->id, EPROTO,
                           "protocol version %llu not supported (want %u)",
                           (unsigned long long)v, PD_PROTO_VERSION);
        pd_conn_close(c, 0, "peer speaks protocol version %llu, not %u",
                      (unsigned long long)v, PD_PROTO_VERSION);
        c->reason = -EPROTO;
        return -1;
    }
    if (pd_msg_cstr(m, "role", c->role, sizeof(c->role)) != 0 ||
        pd_msg_cstr(m, "name", c->name, sizeof(c->name)) != 0) {
        conn_close(c, -EPROTO, "HELLO with a bad role or name");
        return -1;
    }
    c->hello_seen = true;
    return 0;
}

static void
drain_frames(struct pd_conn *c)
{
    const struct pd_msg *m;
    int rv;

    if (c->in_drain)
        return;
    c->in_drain = true;
    while (!c->closing && !c->paused) {
        rv = pd_decoder_next(&c->dec, &m);
        if (rv == 0)
            break;
        if (rv < 0) {
            conn_close(c, rv, "bad frame: %s", c->dec.err);
            break;
        }
        if (!c->hello_seen && check_hello(c, m) != 0)
            break;
        c->cb.on_msg(c, m);
    }
    c->in_drain = false;
}

static void
on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct pd_conn *c = h->data;

    PD_UNUSED(suggested);
    *buf = uv_buf_init(c->rbuf, READ_BUF);
}

static void
on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct pd_conn *c = s->data;
    int rv;

    PD_UNUSED(buf);
    if (nread == 0 || c->closing)
        return;
    if (nread < 0) {
        if (nread == UV_EOF)
            conn_close(c, 0, "peer closed the connection");
        else
            conn_close(c, -ECONNRESET, "read failed: %s",
                       uv_strerror((int)nread));
        return;
    }
    if (c->tls != NULL) {
        rv = pd_tls_feed(c->tls, c->rbuf, (size_t)nread);
        if (rv != 0)
            conn_close(c, rv, "%s", pd_tls_error(c->tls));
        return;
    }
    if (pd_decoder_feed(&c->dec, c->rbuf, (size_t)nread) != 0) {
        conn_close(c, -ENOMEM, "out of memory buffering a frame");
        return;
    }
    drain_frames(c);
}

static void
free_stream_cb(uv_handle_t *h)
{
    free(h);
}

struct pd_conn *
pd_conn_new(uv_stream_t *stream, const struct pd_conn_opts *o,
            const struct pd_conn_cb *cb, void *data)
{
    static const struct pd_tls_cb tls_cb = {
        .on_plain = tls_on_plain,
        .on_cipher = tls_on_cipher,
    };
    struct pd_conn *c = calloc(1, sizeof(*c));
    struct pd_enc e;
    int rv;

    if (c != NULL)
        c->rbuf = malloc(READ_BUF);
    if (c == NULL || c->rbuf == NULL) {
        free(c);
        uv_close((uv_handle_t *)stream, free_stream_cb);
        return NULL;
    }
    c->stream = stream;
    stream->data = c;
    c->cb = *cb;
    c->data = data;
    pd_strlcpy(c->subject, o->subject != NULL ? o->subject : "conn",
               sizeof(c->subject));
    pd_decoder_init(&c->dec, o->max_frame);
    if (o->tls != NULL) {
        c->tls = pd_tls_new(o->tls, o->tls_server, &tls_cb, c);
        if (c->tls == NULL) {
            conn_close(c, -ENOMEM, "TLS setup failed");
            return c;
        }
    }

    rv = uv_read_start(stream, on_alloc, on_read);
    if (rv != 0) {
        conn_close(c, -EIO, "read start failed: %s", uv_strerror(rv));
        return c;
    }
    if (c->tls != NULL && !o->tls_server) {
        rv = pd_tls_start(c->tls);
        if (rv != 0) {
            conn_close(c, rv, "%s", pd_tls_error(c->tls));
            return c;
        }
    }

    pd_enc_begin(&e, PD_MSG_HELLO, 0);
    pd_enc_u64(&e, "v", PD_PROTO_VERSION);
    pd_enc_str(&e, "role", o->role != NULL ? o->role : "");
    pd_enc_str(&e, "name", o->name != NULL ? o->name : "");
    pd_conn_send(c, &e);
    return c;
}

size_t
pd_conn_queued(const struct pd_conn *c)
{
    return c->queued;
}

void
pd_conn_pause(struct pd_conn *c)
{
    if (c->paused || c->closing)
        return;
    c->paused = true;
    uv_read_stop(c->stream);
}

void
pd_conn_resume(struct pd_conn *c)
{
    if (!c->paused || c->closing)
        return;
    c->paused = false;
    /* Frames that arrived before the pause are delivered first. */
    drain_frames(c);
    if (!c->closing && !c->paused) {
        int rv = uv_read_start(c->stream, on_alloc, on_read);

        if (rv != 0)
            conn_close(c, -EIO, "read start failed: %s", uv_strerror(rv));
    }
}

void *
pd_conn_data(const struct pd_conn *c)
{
    return c->data;
}

void
pd_conn_set_data(struct pd_conn *c, void *data)
{
    c->data = data;
}

const char *
pd_conn_error(const struct pd_conn *c)
{
    return c->err;
}

bool
pd_conn_closing(const struct pd_conn *c)
{
    return c->closing;
}

const char *
pd_conn_peer_role(const struct pd_conn *c)
{
    return c->role;
}

const char *
pd_conn_peer_name(const struct pd_conn *c)
{
    return c->name;
}

int
pd_conn_peer_cn(const struct pd_conn *c, char *buf, size_t buflen)
{
    if (c->tls == NULL || !pd_tls_ready(c->tls))
        return -ENOENT;
    return pd_tls_peer_cn(c->tls, buf, buflen);
}

bool
pd_conn_peer_has_ou(const struct pd_conn *c, const char *ou)
{
    return c->tls != NULL && pd_tls_ready(c->tls) &&
           pd_tls_peer_has_ou(c->tls, ou);
}

uint64_t
pd_conn_next_id(struct pd_conn *c)
{
    return ++c->next_id;
}
