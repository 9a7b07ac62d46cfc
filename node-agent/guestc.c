/*
 * guestc: host-side client of the guest protocol. See guestc.h.
 *
 * Connecting: QEMU creates the socket a moment after it starts, and
 * accepts a client before the guest has booted; the guest's HELLO is what
 * says the agent is there. Until then the connect is retried every
 * RETRY_MS, within the caller's timeout.
 */
#include "node-agent/guestc.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "proto/conn.h"

#define RETRY_MS 20
/*
 * HELLO again after this long without the guest's: the guest can see the
 * previous host's hangup after it read our HELLO and then drop its answer
 * with the old session. Extra HELLOs are harmless: they all precede our
 * first request in the stream, and later answers are ignored.
 */
#define HELLO_RESEND_MS 1000
#define SEND_CHUNK (256u << 10)

struct guestc {
    uv_loop_t *loop;
    char *path;
    struct guestc_cb cb;
    void *data;
    uv_pipe_t *pipe;        /* while connecting */
    uv_connect_t creq;
    struct pd_conn *conn;
    uv_timer_t timer;       /* retry and deadline */
    uint64_t deadline;
    uint64_t hello_ms;      /* when our last HELLO went out */
    bool ready, closing, timer_open;
    int reason;
    char why[256];
    char peer[80];
    struct guestc_req *reqs;
    size_t nreqs;
    uint64_t next_id;
};

struct guestc_req {
    struct guestc *g;
    uint64_t id;
    unsigned type;
    struct guestc_req_cb cb;
    void *data;
    uint64_t credit;       /* bytes we may still send */
    bool manual_window;
    bool sent_eof, got_eof;
    bool blocked;          /* wanted to write but had no credit */
    struct guestc_req *next, *prev;
};

/* ---- request bookkeeping ------------------------------------------------- */

static void
req_unlink(struct guestc_req *r)
{
    struct guestc *g = r->g;

    if (r->prev != NULL)
        r->prev->next = r->next;
    else
        g->reqs = r->next;
    if (r->next != NULL)
        r->next->prev = r->prev;
    g->nreqs--;
}

static struct guestc_req *
req_find(struct guestc *g, uint64_t id)
{
    for (struct guestc_req *r = g->reqs; r != NULL; r = r->next)
        if (r->id == id)
            return r;
    return NULL;
}

static void
req_fail(struct guestc_req *r, int errnum, const char *msg)
{
    req_unlink(r);
    r->cb.on_error(r, errnum, msg);
    free(r);
}

static void
req_reply(struct guestc_req *r, const struct pd_msg *m)
{
    req_unlink(r);
    if (r->cb.on_reply != NULL)
        r->cb.on_reply(r, m);
    free(r);
}

static void
fail_all(struct guestc *g, int errnum, const char *msg)
{
    while (g->reqs != NULL)
        req_fail(g->reqs, errnum, msg);
}

/* ---- the connection ------------------------------------------------------ */

static void
on_timer_closed(uv_handle_t *h)
{
    struct guestc *g = h->data;
    int reason = g->reason;

    g->cb.on_close(g, reason, g->why);
    free(g->path);
    free(g);
}

/* Everything is closed: report and free. */
static void
finish(struct guestc *g)
{
    fail_all(g, ECONNRESET, g->why[0] ? g->why : "connection closed");
    if (g->timer_open) {
        g->timer_open = false;
        uv_close((uv_handle_t *)&g->timer, on_timer_closed);
    }
}

static void
on_pipe_closed(uv_handle_t *h)
{
    struct guestc *g = h->data;

    free(h);
    if (g->closing)
        finish(g);
}

static void
set_why(struct guestc *g, int reason, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void
set_why(struct guestc *g, int reason, const char *fmt, ...)
{
    va_list ap;

    if (g->why[0] != '\0')
        return;
    g->reason = reason;
    va_start(ap, fmt);
    vsnprintf(g->why, sizeof(g->why), fmt, ap);
    va_end(ap);
}

static void
dispatch(struct guestc *g, const struct pd_msg *m)
{
    struct guestc_req *r;
    const void *p = NULL;
    size_t n = 0;
    bool eof = false;
    uint64_t bytes;

    if (m->type == PD_MSG_HELLO) {
        pd_msg_cstr(m, "name", g->peer, sizeof(g->peer));
        if (!g->ready) {
            g->ready = true;
            uv_timer_stop(&g->timer);
            if (g->cb.on_ready != NULL)
                g->cb.on_ready(g);
        }
        return;
    }
    if (m->type == PD_MSG_ERROR && m->id == 0) {
        char msg[200] = "";

        pd_msg_cstr(m, "message", msg, sizeof(msg));
        pd_warn("guest", "protocol error reported by the guest: %s; "
                "closing the connection", msg);
        set_why(g, -EPROTO, "guest reported a protocol error: %s", msg);
        pd_conn_close(g->conn, -EPROTO, "%s", g->why);
        return;
    }
    r = req_find(g, m->id);
    if (r == NULL)
        return; /* late frames of a cancelled request */

    switch (m->type) {
    case PD_MSG_WINDOW:
        if (pd_msg_u64(m, "bytes", &bytes) == 0)
            r->credit += bytes;
        if (r->blocked && r->cb.on_writable != NULL) {
            r->blocked = false;
            r->cb.on_writable(r);
        }
        return;
    case PD_MSG_ERROR: {
        char msg[512] = "";
        int64_t en = EIO;

        pd_msg_cstr(m, "message", msg, sizeof(msg));
        pd_msg_i64(m, "errno", &en);
        req_fail(r, (int)en, msg);
        return;
    }
    case PD_MSG_EXEC_START:
        if (r->cb.on_start != NULL)
            r->cb.on_start(r, m);
        return;
    case PD_MSG_OK:
        /* A file read and a tunnel open with OK; their end is DATA eof. */
        if (r->type == PD_MSG_FILE_READ || r->type == PD_MSG_TUNNEL_OPEN) {
            if (r->cb.on_start != NULL)
                r->cb.on_start(r, m);
            return;
        }
        req_reply(r, m);
        return;
    case PD_MSG_EXIT:
    case PD_MSG_PONG:
        req_reply(r, m);
        return;
    case PD_MSG_STDOUT:
    case PD_MSG_STDERR:
    case PD_MSG_DATA:
        pd_msg_bin(m, "data", &p, &n);
        pd_msg_bool(m, "eof", &eof);
        if (r->cb.on_data != NULL)
            r->cb.on_data(r, m->type == PD_MSG_STDOUT ? GUESTC_STDOUT :
                          m->type == PD_MSG_STDERR ? GUESTC_STDERR :
                          GUESTC_DATA, p, n, eof);
        /* on_data may have cancelled r: look it up again. */
        if (req_find(g, m->id) != r)
            return;
        if (n > 0 && !r->manual_window && !eof)
            guestc_req_grant(r, n);
        if (m->type == PD_MSG_DATA && eof) {
            r->got_eof = true;
            if (r->type == PD_MSG_FILE_READ || r->sent_eof)
                req_reply(r, NULL);
        }
        return;
    default:
        return;
    }
}

static void
conn_on_msg(struct pd_conn *c, const struct pd_msg *m)
{
    dispatch(pd_conn_data(c), m);
}

static void
conn_on_drain(struct pd_conn *c)
{
    struct guestc *g = pd_conn_data(c);
    struct guestc_req *r, *next;

    for (r = g->reqs; r != NULL; r = next) {
        next = r->next;
        if (r->blocked && r->cb.on_writable != NULL &&
            guestc_req_credit(r) > 0) {
            r->blocked = false;
            r->cb.on_writable(r);
        }
    }
}

static void
conn_on_close(struct pd_conn *c, int reason)
{
    struct guestc *g = pd_conn_data(c);

    g->conn = NULL;
    g->ready = false;
    set_why(g, reason, "%s", pd_conn_error(c)[0] ? pd_conn_error(c) :
            "connection closed");
    g->closing = true;
    finish(g);
}

static void try_connect(struct guestc *g);

static void
send_hello(struct guestc *g)
{
    struct pd_enc e;

    pd_enc_begin(&e, PD_MSG_HELLO, 0);
    pd_enc_u64(&e, "v", PD_PROTO_VERSION);
    pd_enc_str(&e, "role", "agent");
    pd_enc_str(&e, "name", "host");
    pd_conn_send(g->conn, &e);
    g->hello_ms = pd_now_ms();
}

static void
on_timer(uv_timer_t *t)
{
    struct guestc *g = t->data;

    if (g->closing)
        return;
    if (pd_now_ms() >= g->deadline) {
        set_why(g, -ETIMEDOUT, "no HELLO from the guest agent on %s",
                g->path);
        guestc_close(g);
        return;
    }
    if (g->conn == NULL && g->pipe == NULL)
        try_connect(g);
    else if (g->conn != NULL && !g->ready &&
             pd_now_ms() - g->hello_ms >= HELLO_RESEND_MS)
        send_hello(g);
}

static void
on_connect(uv_connect_t *req, int status)
{
    static const struct pd_conn_cb ccb = {
        .on_msg = conn_on_msg,
        .on_close = conn_on_close,
        .on_drain = conn_on_drain,
    };
    struct guestc *g = req->data;
    struct pd_conn_opts o = {.role = "agent", .name = "host",
                             .subject = "guest"};
    uv_pipe_t *p = g->pipe;

    g->pipe = NULL;
    if (status != 0 || g->closing) {
        p->data = g;
        uv_close((uv_handle_t *)p, on_pipe_closed);
        if (!g->closing)
            uv_timer_start(&g->timer, on_timer, RETRY_MS, RETRY_MS);
        return;
    }
    g->conn = pd_conn_new((uv_stream_t *)p, &o, &ccb, g);
    if (g->conn == NULL) {
        set_why(g, -ENOMEM, "out of memory");
        g->closing = true;
        finish(g);
        return;
    }
    /* pd_conn_new sent the first HELLO; the timer resends it (and keeps
     * the deadline) until the guest answers. */
    g->hello_ms = pd_now_ms();
    uv_timer_start(&g->timer, on_timer, RETRY_MS, RETRY_MS);
}

static void
try_connect(struct guestc *g)
{
    g->pipe = calloc(1, sizeof(*g->pipe));
    if (g->pipe == NULL)
        return; /* the timer tries again */
    uv_pipe_init(g->loop, g->pipe, 0);
    g->pipe->data = g;
    g->creq.data = g;
    uv_pipe_connect(&g->creq, g->pipe, g->path, on_connect);
}

struct guestc *
guestc_connect(uv_loop_t *loop, const char *sock_path, unsigned timeout_ms,
               const struct guestc_cb *cb, void *data)
{
    struct guestc *g = calloc(1, sizeof(*g));

    if (g == NULL || (g->path = strdup(sock_path)) == NULL) {
        free(g);
        return NULL;
    }
    g->loop = loop;
    g->cb = *cb;
    g->data = data;
    g->next_id = 1;
    g->deadline = pd_now_ms() + timeout_ms;
    uv_timer_init(loop, &g->timer);
    g->timer.data = g;
    g->timer_open = true;
    /* The deadline check runs on the retry timer and this one-shot. */
    uv_timer_start(&g->timer, on_timer, timeout_ms, RETRY_MS);
    try_connect(g);
    return g;
}

void
guestc_close(struct guestc *g)
{
    if (g->closing)
        return;
    g->closing = true;
    g->ready = false;
    uv_timer_stop(&g->timer);
    if (g->conn != NULL) {
        set_why(g, 0, "closed by the host");
        pd_conn_close(g->conn, g->reason, "%s", g->why);
        return; /* conn_on_close finishes */
    }
    if (g->pipe != NULL)
        return; /* on_connect sees closing, then on_pipe_closed finishes */
    finish(g);
}

bool
guestc_is_ready(const struct guestc *g)
{
    return g->ready;
}

void *
guestc_data(const struct guestc *g)
{
    return g->data;
}

const char *
guestc_peer_name(const struct guestc *g)
{
    return g->peer;
}

size_t
guestc_pending(const struct guestc *g)
{
    return g->nreqs;
}

/* ---- requests ------------------------------------------------------------ */

struct guestc_req *
guestc_req_new(struct guestc *g, unsigned type, const struct guestc_req_cb *cb,
               void *data, struct pd_enc *e)
{
    struct guestc_req *r;

    if (!g->ready || g->conn == NULL || cb->on_error == NULL)
        return NULL;
    r = calloc(1, sizeof(*r));
    if (r == NULL)
        return NULL;
    r->g = g;
    r->id = g->next_id++;
    r->type = type;
    r->cb = *cb;
    r->data = data;
    r->credit = PD_STREAM_WINDOW;
    r->next = g->reqs;
    if (g->reqs != NULL)
        g->reqs->prev = r;
    g->reqs = r;
    g->nreqs++;
    pd_enc_begin(e, type, r->id);
    return r;
}

void
guestc_req_submit(struct guestc_req *r, struct pd_enc *e)
{
    int rv = r->g->conn != NULL ? pd_conn_send(r->g->conn, e) : -ENOTCONN;

    if (r->g->conn == NULL)
        pd_enc_discard(e);
    if (rv != 0)
        req_fail(r, -rv, rv == -EMSGSIZE ? "request too large" :
                 "cannot send the request");
}

void *
guestc_req_data(const struct guestc_req *r)
{
    return r->data;
}

uint64_t
guestc_req_id(const struct guestc_req *r)
{
    return r->id;
}

void
guestc_req_cancel(struct guestc_req *r)
{
    struct pd_enc e;

    if (r->g->conn != NULL) {
        pd_enc_begin(&e, PD_MSG_CANCEL, r->id);
        pd_conn_send(r->g->conn, &e);
    }
    req_unlink(r);
    free(r);
}

void
guestc_req_manual_window(struct guestc_req *r)
{
    r->manual_window = true;
}

void
guestc_req_grant(struct guestc_req *r, size_t bytes)
{
    struct pd_enc e;

    if (r->g->conn == NULL || bytes == 0)
        return;
    pd_enc_begin(&e, PD_MSG_WINDOW, r->id);
    pd_enc_u64(&e, "bytes", bytes);
    pd_conn_send(r->g->conn, &e);
}

size_t
guestc_req_credit(const struct guestc_req *r)
{
    size_t queued;

    if (r->g->conn == NULL || r->sent_eof)
        return 0;
    queued = pd_conn_queued(r->g->conn);
    if (queued >= PD_CONN_HIGH_WATER)
        return 0;
    return r->credit < PD_CONN_HIGH_WATER - queued ?
           (size_t)r->credit : PD_CONN_HIGH_WATER - queued;
}

int
guestc_req_send_data(struct guestc_req *r, const void *data, size_t len,
                     bool eof)
{
    const unsigned char *p = data;
    unsigned type = r->type == PD_MSG_EXEC ? PD_MSG_STDIN : PD_MSG_DATA;

    if (r->g->conn == NULL || r->sent_eof)
        return -ENOTCONN;
    if (len > r->credit) {
        r->blocked = true;
        return -EAGAIN;
    }
    do {
        size_t n = len > SEND_CHUNK ? SEND_CHUNK : len;
        struct pd_enc e;
        int rv;

        pd_enc_begin(&e, type, r->id);
        pd_enc_bin(&e, "data", p, n);
        pd_enc_bool(&e, "eof", eof && n == len);
        rv = pd_conn_send(r->g->conn, &e);
        if (rv != 0)
            return rv;
        r->credit -= n;
        p += n;
        len -= n;
    } while (len > 0);
    if (guestc_req_credit(r) == 0)
        r->blocked = true;
    if (eof) {
        r->sent_eof = true;
        if (r->type == PD_MSG_TUNNEL_OPEN && r->got_eof)
            req_reply(r, NULL);
    }
    return 0;
}

/* ---- typed helpers ------------------------------------------------------- */

static void
enc_cmd(struct pd_enc *e, const struct guestc_exec *x)
{
    if (x->command != NULL) {
        pd_enc_str(e, "command", x->command);
    } else if (x->argv != NULL) {
        size_t n = 0;

        while (x->argv[n] != NULL)
            n++;
        pd_enc_strv(e, "argv", x->argv, n);
    }
    if (x->cwd != NULL)
        pd_enc_str(e, "cwd", x->cwd);
    if (x->env != NULL) {
        size_t n = 0;

        while (x->env[n] != NULL)
            n++;
        pd_enc_key(e, "env");
        msgpack_pack_map(&e->pk, n);
        for (size_t i = 0; i < n; i++) {
            const char *eq = strchr(x->env[i], '=');
            size_t kl = eq ? (size_t)(eq - x->env[i]) : strlen(x->env[i]);
            const char *v = eq ? eq + 1 : "";

            msgpack_pack_str(&e->pk, kl);
            msgpack_pack_str_body(&e->pk, x->env[i], kl);
            pd_enc_pack_str(e, v);
        }
    }
}

struct guestc_req *
guestc_exec(struct guestc *g, const struct guestc_exec *x,
            const struct guestc_req_cb *cb, void *data)
{
    struct pd_enc e;
    struct guestc_req *r = guestc_req_new(g, PD_MSG_EXEC, cb, data, &e);

    if (r == NULL)
        return NULL;
    enc_cmd(&e, x);
    if (x->stdin_data != NULL)
        pd_enc_bin(&e, "stdin", x->stdin_data, x->stdin_len);
    if (x->timeout_ms != 0)
        pd_enc_u64(&e, "timeout_ms", x->timeout_ms);
    if (x->output_max != 0)
        pd_enc_u64(&e, "output_max", x->output_max);
    pd_enc_bool(&e, "stream", x->stream);
    if (x->stdin_stream)
        pd_enc_bool(&e, "stdin_stream", true);
    guestc_req_submit(r, &e);
    return r;
}

struct guestc_req *
guestc_proc_start(struct guestc *g, const char *proc,
                  const struct guestc_exec *x, const struct guestc_req_cb *cb,
                  void *data)
{
    struct pd_enc e;
    struct guestc_req *r = guestc_req_new(g, PD_MSG_PROC_START, cb, data, &e);

    if (r == NULL)
        return NULL;
    if (proc != NULL)
        pd_enc_str(&e, "proc", proc);
    enc_cmd(&e, x);
    guestc_req_submit(r, &e);
    return r;
}

/* A request with at most two string fields, a bool and a number. */
static struct guestc_req *
simple(struct guestc *g, unsigned type, const char *k1, const char *v1,
       const char *k2, const char *v2, const char *kb, bool vb,
       const char *kn, int64_t vn, const struct guestc_req_cb *cb, void *data)
{
    struct pd_enc e;
    struct guestc_req *r = guestc_req_new(g, type, cb, data, &e);

    if (r == NULL)
        return NULL;
    if (k1 != NULL)
        pd_enc_str(&e, k1, v1 != NULL ? v1 : "");
    if (k2 != NULL)
        pd_enc_str(&e, k2, v2 != NULL ? v2 : "");
    if (kb != NULL)
        pd_enc_bool(&e, kb, vb);
    if (kn != NULL)
        pd_enc_i64(&e, kn, vn);
    guestc_req_submit(r, &e);
    return r;
}

struct guestc_req *
guestc_proc_list(struct guestc *g, const struct guestc_req_cb *cb, void *data)
{
    return simple(g, PD_MSG_PROC_LIST, NULL, NULL, NULL, NULL, NULL, false,
                  NULL, 0, cb, data);
}

struct guestc_req *
guestc_proc_get(struct guestc *g, const char *proc,
                const struct guestc_req_cb *cb, void *data)
{
    return simple(g, PD_MSG_PROC_GET, "proc", proc, NULL, NULL, NULL, false,
                  NULL, 0, cb, data);
}

struct guestc_req *
guestc_proc_logs(struct guestc *g, const char *proc, bool follow,
                 const struct guestc_req_cb *cb, void *data)
{
    return simple(g, PD_MSG_PROC_LOGS, "proc", proc, NULL, NULL, "follow",
                  follow, NULL, 0, cb, data);
}

struct guestc_req *
guestc_proc_signal(struct guestc *g, const char *proc, int sig,
                   uint64_t kill_after_ms, const struct guestc_req_cb *cb,
                   void *data)
{
    struct pd_enc e;
    struct guestc_req *r = guestc_req_new(g, PD_MSG_PROC_SIGNAL, cb, data,
                                          &e);

    if (r == NULL)
        return NULL;
    pd_enc_str(&e, "proc", proc);
    pd_enc_i64(&e, "signal", sig);
    pd_enc_u64(&e, "kill_after_ms", kill_after_ms);
    guestc_req_submit(r, &e);
    return r;
}

struct guestc_req *
guestc_wait_port(struct guestc *g, unsigned port, uint64_t timeout_ms,
                 const struct guestc_req_cb *cb, void *data)
{
    struct pd_enc e;
    struct guestc_req *r = guestc_req_new(g, PD_MSG_PROC_WAIT_PORT, cb, data,
                                          &e);

    if (r == NULL)
        return NULL;
    pd_enc_u64(&e, "port", port);
    pd_enc_u64(&e, "timeout_ms", timeout_ms);
    guestc_req_submit(r, &e);
    return r;
}

struct guestc_req *
guestc_file_write(struct guestc *g, const char *path, unsigned mode,
                  bool append, const struct guestc_req_cb *cb, void *data)
{
    return simple(g, PD_MSG_FILE_WRITE, "path", path, NULL, NULL, "append",
                  append, "mode", mode != 0 ? mode : 0644, cb, data);
}

struct guestc_req *
guestc_file_read(struct guestc *g, const char *path,
                 const struct guestc_req_cb *cb, void *data)
{
    return simple(g, PD_MSG_FILE_READ, "path", path, NULL, NULL, NULL, false,
                  NULL, 0, cb, data);
}

struct guestc_req *
guestc_file_stat(struct guestc *g, const char *path,
                 const struct guestc_req_cb *cb, void *data)
{
    return simple(g, PD_MSG_FILE_STAT, "path", path, NULL, NULL, NULL, false,
                  NULL, 0, cb, data);
}

struct guestc_req *
guestc_file_list(struct guestc *g, const char *path, bool recursive,
                 const struct guestc_req_cb *cb, void *data)
{
    return simple(g, PD_MSG_FILE_LIST, "path", path, NULL, NULL, "recursive",
                  recursive, NULL, 0, cb, data);
}

struct guestc_req *
guestc_file_mkdir(struct guestc *g, const char *path, bool parents,
                  unsigned mode, const struct guestc_req_cb *cb, void *data)
{
    return simple(g, PD_MSG_FILE_MKDIR, "path", path, NULL, NULL, "parents",
                  parents, "mode", mode != 0 ? mode : 0755, cb, data);
}

struct guestc_req *
guestc_file_delete(struct guestc *g, const char *path, bool recursive,
                   const struct guestc_req_cb *cb, void *data)
{
    return simple(g, PD_MSG_FILE_DELETE, "path", path, NULL, NULL,
                  "recursive", recursive, NULL, 0, cb, data);
}

struct guestc_req *
guestc_file_rename(struct guestc *g, const char *from, const char *to,
                   const struct guestc_req_cb *cb, void *data)
{
    return simple(g, PD_MSG_FILE_RENAME, "from", from, "to", to, NULL, false,
                  NULL, 0, cb, data);
}

struct guestc_req *
guestc_tunnel(struct guestc *g, unsigned port, const struct guestc_req_cb *cb,
              void *data)
{
    return simple(g, PD_MSG_TUNNEL_OPEN, NULL, NULL, NULL, NULL, NULL, false,
                  "port", port, cb, data);
}

struct guestc_req *
guestc_ping(struct guestc *g, const struct guestc_req_cb *cb, void *data)
{
    return simple(g, PD_MSG_PING, NULL, NULL, NULL, NULL, NULL, false, NULL,
                  0, cb, data);
}

struct guestc_req *
guestc_info(struct guestc *g, const struct guestc_req_cb *cb, void *data)
{
    return simple(g, PD_MSG_INFO, NULL, NULL, NULL, NULL, NULL, false, NULL,
                  0, cb, data);
}

struct guestc_req *
guestc_shutdown(struct guestc *g, const struct guestc_req_cb *cb, void *data)
{
    return simple(g, PD_MSG_SHUTDOWN, NULL, NULL, NULL, NULL, NULL, false,
                  NULL, 0, cb, data);
}
