/* libFuzzer target for the HTTP/1.1 server (proto/http.c): arbitrary request
 * bytes, over a real loopback connection in pieces the input picks or
 * injected whole, under handlers that read bodies whole, streamed, paused
 * and as strict JSON, and answer plainly, streamed, as SSE or by taking
 * the raw stream over; the server must never crash, leak or over-read. */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "common/log.h"
#include "proto/http.h"

/*
 * Input layout: byte 0 picks the handler behaviour (it changes for each
 * pipelined request), byte 1 the piece size for the socket writes (0 for
 * one write), byte 2 bit 0 the injected path instead of the socket. The
 * rest is the request stream.
 */
#define HDR_LEN    3
#define SPIN_MAX   4000 /* loop turns before the client resets */
#define DRAIN_MAX  4000 /* loop turns for the reset to be seen */

static uv_loop_t loop;
static struct pd_http_server *srv;
static int srv_port;
static unsigned sel, nreq;

/* A request whose streamed body is paused, resumed from the idle handle. */
static struct pd_http_req *paused;
static uv_idle_t resumer;

struct ctx {
    unsigned mode;
    size_t got;
};

static const struct pd_json_field create_fields[] = {
    {"id", PD_JSON_STRING, true},
    {"cpus", PD_JSON_UINT, false},
    {"memory_mb", PD_JSON_UINT, false},
    {"env", PD_JSON_STRING_MAP, false},
    {"argv", PD_JSON_STRINGS, false},
    {"wait", PD_JSON_BOOL, false},
    {"timeout_ms", PD_JSON_INT, false},
    {"spec", PD_JSON_OBJECT, false},
    {"list", PD_JSON_ARRAY, false},
    {"any", PD_JSON_ANY, false},
};

static void
ctx_free(void *arg, int status)
{
    (void)status;
    free(arg);
}

/* Every accessor, on whatever the parser let through. */
static void
touch(struct pd_http_req *r)
{
    static const char *const pats[] = {
        "/v1/sandboxes/{id}", "/v1/sandboxes/{id}/files",
        "/v1/{a}/{b}/{c}/{d}", "/v1/sandboxes/",
    };
    struct pd_http_params p;
    const char *path = pd_http_req_path(r), *n, *v;
    size_t len = strlen(path), i, sum = 0;
    char *buf = malloc(len + 1), *enc;

    if (buf != NULL && pd_http_pct_decode(path, len, buf, NULL, false) == 0)
        sum += strlen(buf);
    free(buf);
    enc = pd_http_pct_encode(path, len);
    free(enc);
    for (i = 0; i < sizeof(pats) / sizeof(pats[0]); i++)
        if (pd_http_match(pats[i], path, &p) && pd_http_param(&p, "id"))
            sum += strlen(pd_http_param(&p, "id"));
    for (i = 0; pd_http_req_header_at(r, i, &n, &v); i++)
        sum += strlen(n) + strlen(v);
    for (i = 0; pd_http_req_query_at(r, i, &n, &v); i++)
        sum += strlen(n) + strlen(v);
    sum += pd_http_req_header_count(r) + pd_http_req_query_count(r);
    if (pd_http_req_header(r, "host") != NULL)
        sum += strlen(pd_http_req_header(r, "host"));
    if (pd_http_req_query(r, "a") != NULL)
        sum += strlen(pd_http_req_query(r, "a"));
    sum += pd_http_req_query_bool(r, "wait", false);
    sum += (size_t)pd_http_req_content_length(r);
    sum += pd_http_req_has_body(r) + pd_http_req_is_upgrade(r);
    sum += (size_t)pd_http_req_minor(r) + pd_http_req_tls(r);
    sum += strlen(pd_http_req_method(r)) + strlen(pd_http_req_target(r));
    sum += strlen(pd_http_req_peer(r)) + strlen(pd_http_req_peer_ip(r));
    sum += pd_http_req_is(r, "GET") + pd_http_req_injected(r);
    sum += pd_http_req_connected(r);
    if (sum == 1)
        pd_http_add_header(r, "X-Sum", "1"); /* keeps sum alive */
}

static void
answer(struct pd_http_req *r, size_t got)
{
    const char *echo = pd_http_req_header(r, "x-echo");
    char line[64];

    /* An echoed header value may hold anything: add_header must refuse
     * what would split the response. */
    if (echo != NULL)
        pd_http_add_header(r, "X-Echo", echo);
    snprintf(line, sizeof(line), "%zu\n", got);
    pd_http_respond(r, 200, "text/plain", line, strlen(line));
}

static void
on_whole(struct pd_http_req *r, int err, const char *body, size_t len,
         void *arg)
{
    struct ctx *x = arg;

    if (err != 0) {
        pd_http_fail(r, err);
        return;
    }
    if (body[len] != '\0')
        abort(); /* the body is NUL-terminated */
    x->got = len;
    answer(r, len);
}

static void on_resume(uv_idle_t *h);

static void
on_data(struct pd_http_req *r, const char *data, size_t len, void *arg)
{
    struct ctx *x = arg;
    volatile char last = len > 0 ? data[len - 1] : 0;

    (void)last;
    x->got += len;
    if (x->mode == 4 && paused == NULL) {
        paused = r;
        pd_http_body_pause(r);
        uv_idle_start(&resumer, on_resume);
    }
}

static void
on_end(struct pd_http_req *r, int err, void *arg)
{
    struct ctx *x = arg;
    char line[64];

    if (paused == r)
        paused = NULL;
    if (err != 0) {
        pd_http_fail(r, err);
        return;
    }
    snprintf(line, sizeof(line), "%zu\n", x->got);
    if (sel & 0x80) {
        /* A declared length the handler falls short of. */
        pd_http_start(r, 200, "text/plain", 100);
        pd_http_write(r, line, strlen(line));
    } else {
        pd_http_start(r, 200, "text/plain", -1);
        pd_http_write(r, line, strlen(line));
        pd_http_write(r, line, strlen(line));
    }
    pd_http_end(r);
}

static const struct pd_http_body_stream_cb stream_cb = {on_data, on_end};

static void
on_resume(uv_idle_t *h)
{
    uv_idle_stop(h);
    if (paused != NULL)
        pd_http_body_resume(paused);
}

static void
on_json(struct pd_http_req *r, json_t *body, void *arg)
{
    (void)arg;
    pd_http_respond_json(r, 201, body); /* takes the reference */
}

static void
raw_data(struct pd_http_raw *x, const char *data, size_t len, void *arg)
{
    (void)arg;
    pd_http_raw_write(x, data, len);
    if (pd_http_raw_queued(x) > PD_HTTP_HIGH_WATER)
        abort(); /* an echo of at most 4 KiB never queues that much */
    if (memchr(data, 'p', len) != NULL) {
        pd_http_raw_pause(x);
        pd_http_raw_resume(x);
    }
    if (memchr(data, 'q', len) != NULL)
        pd_http_raw_close(x);
}

static void
raw_close(struct pd_http_raw *x, int reason, void *arg)
{
    (void)x;
    (void)reason;
    (void)arg;
}

static const struct pd_http_raw_cb raw_cb = {raw_data, raw_close, NULL};

static void
sse(struct pd_http_req *r)
{
    const char *h = pd_http_req_header(r, "x-event");
    const char *t = pd_http_req_target(r);

    if (pd_http_sse_start(r) == 0) {
        pd_http_sse_event(r, h, t, strlen(t));
        pd_http_sse_comment(r, h != NULL ? h : "keep");
    }
    pd_http_end(r);
}

static void
route_ok(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    const char *id = pd_http_param(p, "id");

    (void)arg;
    pd_http_respond_error(r, 409, NULL, "sandbox %s: %s", id ? id : "-",
                          pd_http_req_path(r));
}

static const struct pd_http_route routes[] = {
    {"GET", "/v1/health", route_ok},
    {"POST", "/v1/sandboxes/{id}/exec", route_ok},
    {"DELETE", "/v1/sandboxes/{id}", route_ok},
    {NULL, "/v1/{a}/{b}/{c}/{id}", route_ok},
};

static void
on_request(struct pd_http_req *r, void *arg)
{
    struct ctx *x = calloc(1, sizeof(*x));

    (void)arg;
    if (x == NULL)
        abort();
    x->mode = (sel + nreq++) % 8;
    pd_http_req_set_data(r, x);
    pd_http_on_done(r, ctx_free, x);
    touch(r);
    switch (x->mode) {
    case 0:
        answer(r, 0); /* without reading a body */
        break;
    case 1:
        pd_http_body_read(r, 0, on_whole, x);
        break;
    case 2:
        pd_http_body_read(r, 64, on_whole, x);
        break;
    case 3:
    case 4:
        pd_http_body_stream(r, x->mode == 3 ? 0 : 200, &stream_cb, x);
        break;
    case 5:
        pd_http_read_json(r, 0, create_fields,
                          sizeof(create_fields) / sizeof(create_fields[0]),
                          on_json, x);
        break;
    case 6:
        if (pd_http_upgrade(r, &raw_cb, NULL) == NULL)
            sse(r);
        break;
    default:
        pd_http_dispatch(r, routes, sizeof(routes) / sizeof(routes[0]),
                         NULL);
        break;
    }
}

static void
setup(void)
{
    struct pd_http_opts o;
    char err[256];

    pd_log_init("fuzz_http", PD_LOG_ERROR);
    if (uv_loop_init(&loop) != 0)
        abort();
    uv_idle_init(&loop, &resumer);
    memset(&o, 0, sizeof(o));
    /* Small limits, so the fuzzer reaches 413, 414 and 431 quickly. */
    o.limits.max_header_bytes = 1024;
    o.limits.max_headers = 12;
    o.limits.max_url = 256;
    o.limits.max_body = 512;
    o.on_request = on_request;
    if (pd_http_server_new(&loop, &o, &srv, err, sizeof(err)) != 0 ||
        pd_http_server_listen(srv, "127.0.0.1:0", err, sizeof(err)) != 0) {
        fprintf(stderr, "fuzz_http: %s\n", err);
        abort();
    }
    srv_port = pd_http_server_port(srv);
}

/* Reads and drops what the server sent; true once it closed its side. */
static bool
drain(int fd)
{
    char buf[4096];

    for (;;) {
        ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);

        if (n > 0)
            continue;
        return n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR);
    }
}

static void
wait_idle(int fd, bool *eof)
{
    for (int i = 0; i < SPIN_MAX; i++) {
        uv_run(&loop, UV_RUN_NOWAIT);
        if (fd >= 0 && !*eof)
            *eof = drain(fd);
        if (pd_http_server_conns(srv) == 0 && (fd < 0 || *eof))
            return;
        if (i > 64) {
            struct pollfd p = {fd, POLLIN, 0};

            poll(&p, fd >= 0 ? 1 : 0, 1);
        }
    }
}

static void
send_all(int fd, const uint8_t *data, size_t len, bool *eof)
{
    size_t off = 0;

    for (int tries = 0; off < len && tries < SPIN_MAX; tries++) {
        ssize_t n = send(fd, data + off, len - off,
                         MSG_DONTWAIT | MSG_NOSIGNAL);

        if (n > 0)
            off += (size_t)n;
        else if (n < 0 && errno != EAGAIN && errno != EINTR)
            return; /* the server closed: the rest is moot */
        uv_run(&loop, UV_RUN_NOWAIT);
        if (!*eof)
            *eof = drain(fd);
    }
}

static void
run_socket(const uint8_t *data, size_t size, size_t piece)
{
    struct sockaddr_in a;
    struct linger lg = {1, 0};
    bool eof = false;
    int fd = -1;

    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)srv_port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    /*
     * The harness's own connect can fail on a machine under load (the
     * listen queue full while the server has not run, no port free for a
     * moment): let the loop run and try again, and give the input up
     * after that; a failed connect says nothing about the server.
     */
    for (int tries = 0; fd < 0 && tries < 8; tries++) {
        fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            return;
        if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
            close(fd);
            fd = -1;
            for (int i = 0; i < 64; i++)
                uv_run(&loop, UV_RUN_NOWAIT);
        }
    }
    if (fd < 0)
        return;
    /* Closing with a reset leaves no TIME_WAIT behind: a long run would
     * otherwise use up the ephemeral ports. */
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    for (int i = 0; i < 64 && pd_http_server_conns(srv) == 0; i++)
        uv_run(&loop, UV_RUN_NOWAIT);
    if (piece == 0)
        piece = size;
    for (size_t off = 0; off < size && !eof; off += piece) {
        size_t n = size - off < piece ? size - off : piece;

        send_all(fd, data + off, n, &eof);
        for (int i = 0; i < 4; i++)
            uv_run(&loop, UV_RUN_NOWAIT);
    }
    shutdown(fd, SHUT_WR);
    wait_idle(fd, &eof);
    close(fd);
    /* Whatever still runs (a handler that never ended) sees the reset. */
    wait_idle(-1, &eof);
    if (pd_http_server_conns(srv) != 0)
        abort(); /* a connection that outlives its client's reset */
    /* Close callbacks run one turn later; they free the connection. */
    for (int i = 0; i < 4; i++)
        uv_run(&loop, UV_RUN_NOWAIT);
}

static void
on_injected(void *arg, int err, const char *resp, size_t len)
{
    volatile char last = len > 0 ? resp[len - 1] : 0;

    (void)err;
    (void)last;
    *(bool *)arg = true;
}

static void
run_injected(const uint8_t *data, size_t size)
{
    bool done = false;

    if (pd_http_server_inject(srv, data, size, "fuzz", on_injected,
                              &done) != 0)
        abort();
    for (int i = 0; i < SPIN_MAX && !done; i++)
        uv_run(&loop, UV_RUN_NOWAIT);
    if (!done)
        abort(); /* an injected request must always finish */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (srv == NULL)
        setup();
    if (size < HDR_LEN)
        return 0;
    sel = data[0];
    nreq = 0;
    if (data[2] & 1)
        run_injected(data + HDR_LEN, size - HDR_LEN);
    else
        run_socket(data + HDR_LEN, size - HDR_LEN, data[1]);
    paused = NULL;
    return 0;
}
