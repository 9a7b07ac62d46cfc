#include "node-agent/qmp.h"

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"

#define LINE_MAX_BYTES (1u << 20)

struct pending {
    uint64_t id;
    agent_qmp_done done;
    void *arg;
    struct pending *next;
};

struct agent_qmp {
    uv_pipe_t pipe;
    uv_connect_t creq;
    struct agent_qmp_cb cb;
    void *arg;
    char *buf;
    size_t len, cap;
    bool greeted;
    bool ready;
    bool closing;
    int reason;
    uint64_t next_id;
    struct pending *pending;
};

struct wreq {
    uv_write_t req;
    char *data;
};

static void
on_written(uv_write_t *req, int status)
{
    struct wreq *w = (struct wreq *)req;

    (void)status; /* a failed write also fails the read side */
    free(w->data);
    free(w);
}

static void
fail_all(struct agent_qmp *q)
{
    while (q->pending != NULL) {
        struct pending *p = q->pending;

        q->pending = p->next;
        if (p->done != NULL)
            p->done(p->arg, -ECONNRESET, NULL, "QMP connection closed");
        free(p);
    }
}

static void
on_closed(uv_handle_t *h)
{
    struct agent_qmp *q = h->data;

    fail_all(q);
    if (q->cb.on_close != NULL)
        q->cb.on_close(q->arg, q->reason);
    free(q->buf);
    free(q);
}

static void
close_with(struct agent_qmp *q, int reason)
{
    if (q->closing)
        return;
    q->closing = true;
    q->reason = reason;
    uv_close((uv_handle_t *)&q->pipe, on_closed);
}

static int
send_json(struct agent_qmp *q, json_t *obj)
{
    struct wreq *w;
    char *text = json_dumps(obj, JSON_COMPACT);
    size_t n;
    uv_buf_t b;
    int rv;

    if (text == NULL)
        return -ENOMEM;
    n = strlen(text);
    w = malloc(sizeof(*w));
    if (w == NULL) {
        free(text);
        return -ENOMEM;
    }
    /* QMP reads JSON objects; the newline only helps humans reading. */
    w->data = malloc(n + 2);
    if (w->data == NULL) {
        free(text);
        free(w);
        return -ENOMEM;
    }
    memcpy(w->data, text, n);
    free(text);
    memcpy(w->data + n, "\r\n", 2);
    b = uv_buf_init(w->data, (unsigned)n + 2);
    rv = uv_write(&w->req, (uv_stream_t *)&q->pipe, &b, 1, on_written);
    if (rv != 0) {
        free(w->data);
        free(w);
        close_with(q, -EPIPE);
        return -EPIPE;
    }
    return 0;
}

int
agent_qmp_cmd(struct agent_qmp *q, const char *execute, json_t *args,
              agent_qmp_done done, void *arg)
{
    struct pending *p, **tail;
    json_t *obj;
    int rv;

    if (q->closing) {
        json_decref(args);
        return -ENOTCONN;
    }
    p = calloc(1, sizeof(*p));
    obj = json_object();
    if (p == NULL || obj == NULL) {
        free(p);
        json_decref(obj);
        json_decref(args);
        return -ENOMEM;
    }
    p->id = ++q->next_id;
    p->done = done;
    p->arg = arg;
    json_object_set_new(obj, "execute", json_string(execute));
    json_object_set_new(obj, "id", json_integer((json_int_t)p->id));
    if (args != NULL)
        json_object_set_new(obj, "arguments", args);
    rv = send_json(q, obj);
    json_decref(obj);
    if (rv != 0) {
        free(p);
        return rv;
    }
    for (tail = &q->pending; *tail != NULL; tail = &(*tail)->next)
        ;
    *tail = p;
    return 0;
}

int
agent_qmp_hmp(struct agent_qmp *q, const char *cmdline, agent_qmp_done done,
              void *arg)
{
    json_t *args = json_pack("{s:s}", "command-line", cmdline);

    if (args == NULL)
        return -ENOMEM;
    return agent_qmp_cmd(q, "human-monitor-command", args, done, arg);
}

static void
on_caps(void *arg, int status, json_t *ret, const char *desc)
{
    struct agent_qmp *q = arg;

    (void)ret;
    (void)desc;
    if (status != 0) {
        close_with(q, status);
        return;
    }
    q->ready = true;
    if (q->cb.on_ready != NULL)
        q->cb.on_ready(q->arg);
}

static void
on_answer(struct agent_qmp *q, json_t *obj)
{
    struct pending **pp, *p;
    json_t *jid = json_object_get(obj, "id");
    json_t *err = json_object_get(obj, "error");
    uint64_t id;

    if (!json_is_integer(jid))
        return;
    id = (uint64_t)json_integer_value(jid);
    for (pp = &q->pending; *pp != NULL; pp = &(*pp)->next) {
        if ((*pp)->id == id)
            break;
    }
    if (*pp == NULL)
        return;
    p = *pp;
    *pp = p->next;
    if (p->done != NULL) {
        if (err != NULL) {
            const char *d = json_string_value(json_object_get(err, "desc"));

            p->done(p->arg, -EIO, NULL, d ? d : "QMP error");
        } else {
            p->done(p->arg, 0, json_object_get(obj, "return"), NULL);
        }
    }
    free(p);
}

static void
on_line(struct agent_qmp *q, const char *line, size_t len)
{
    json_error_t jerr;
    json_t *obj = json_loadb(line, len, 0, &jerr);

    if (!json_is_object(obj)) {
        json_decref(obj);
        close_with(q, -EPROTO);
        return;
    }
    if (!q->greeted) {
        if (json_object_get(obj, "QMP") == NULL) {
            json_decref(obj);
            close_with(q, -EPROTO);
            return;
        }
        q->greeted = true;
        agent_qmp_cmd(q, "qmp_capabilities", NULL, on_caps, q);
    } else if (json_object_get(obj, "event") != NULL) {
        const char *name = json_string_value(json_object_get(obj, "event"));

        if (q->cb.on_event != NULL && name != NULL)
            q->cb.on_event(q->arg, name, json_object_get(obj, "data"));
    } else {
        on_answer(q, obj);
    }
    json_decref(obj);
}

static void
on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct agent_qmp *q = h->data;

    (void)suggested;
    if (q->cap - q->len < 4096) {
        size_t ncap = q->cap ? q->cap * 2 : 8192;
        char *nb = ncap <= 2 * LINE_MAX_BYTES ? realloc(q->buf, ncap) : NULL;

        if (nb == NULL) {
            *buf = uv_buf_init(NULL, 0);
            return;
        }
        q->buf = nb;
        q->cap = ncap;
    }
    *buf = uv_buf_init(q->buf + q->len, (unsigned)(q->cap - q->len));
}

static void
on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct agent_qmp *q = s->data;
    size_t start = 0;

    (void)buf;
    if (nread < 0) {
        close_with(q, nread == UV_EOF      ? 0
                      : nread == UV_ENOBUFS ? -EMSGSIZE
                                            : -ECONNRESET);
        return;
    }
    q->len += (size_t)nread;
    for (size_t i = 0; i < q->len && !q->closing; i++) {
        if (q->buf[i] != '\n')
            continue;
        if (i > start)
            on_line(q, q->buf + start, i - start);
        start = i + 1;
    }
    if (q->closing)
        return;
    memmove(q->buf, q->buf + start, q->len - start);
    q->len -= start;
    if (q->len > LINE_MAX_BYTES)
        close_with(q, -EMSGSIZE);
}

static void
on_connect(uv_connect_t *req, int status)
{
    struct agent_qmp *q = req->data;

    if (status < 0) {
        close_with(q, status == UV_ENOENT ? -ENOENT : -ECONNREFUSED);
        return;
    }
    if (uv_read_start((uv_stream_t *)&q->pipe, on_alloc, on_read) != 0)
        close_with(q, -EIO);
}

int
agent_qmp_connect(uv_loop_t *loop, const char *path,
                  const struct agent_qmp_cb *cb, void *arg,
                  struct agent_qmp **out)
{
    struct agent_qmp *q = calloc(1, sizeof(*q));

    if (q == NULL)
        return -ENOMEM;
    q->cb = *cb;
    q->arg = arg;
    uv_pipe_init(loop, &q->pipe, 0);
    q->pipe.data = q;
    q->creq.data = q;
    uv_pipe_connect(&q->creq, &q->pipe, path, on_connect);
    *out = q;
    return 0;
}

void
agent_qmp_close(struct agent_qmp *q)
{
    bool was_closing;

    if (q == NULL)
        return;
    /* Everything the caller must know happens now, while its objects
     * live: pending commands fail here and on_close is not called, even
     * when a close the peer started is already under way. */
    was_closing = q->closing;
    q->closing = true;
    q->cb.on_close = NULL;
    fail_all(q);
    if (!was_closing) {
        q->reason = 0;
        uv_close((uv_handle_t *)&q->pipe, on_closed);
    }
}
