/*
 * proto/http.c against real sockets: a server on loopback in its own loop
 * thread, driven by a raw TCP client (hostile and malformed input, limits,
 * timeouts, pipelining, upgrade) and by libcurl (normal use, large
 * streamed transfers, TLS).
 */
#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/util.h"
#include "proto/http.h"
#include "proto/tls.h"

/* ---- the server under test, in its own loop thread ---------------------- */

struct fixture {
    uv_loop_t loop;
    uv_async_t stop;
    pthread_t thread;
    struct pd_http_server *srv;
    SSL_CTX *tls;
    int port;
};

static struct fixture fx;
static int aborts;           /* on_abort calls (atomic) */
static int upload_max_chunk; /* largest piece the upload handler saw */

static void
h_hello(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    (void)p;
    (void)arg;
    pd_http_respond(r, 200, "text/plain", "hello", 5);
}

static void
echo_done(struct pd_http_req *r, int err, const char *body, size_t len,
          void *arg)
{
    (void)arg;
    if (err != 0) {
        pd_http_fail(r, err);
        return;
    }
    pd_http_respond(r, 200, "application/octet-stream", body, len);
}

static void
h_echo(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    (void)p;
    (void)arg;
    pd_http_body_read(r, 1024, echo_done, NULL);
}

static const struct pd_json_field person[] = {
    {"name", PD_JSON_STRING, true},
    {"age", PD_JSON_UINT, false},
    {"tags", PD_JSON_STRINGS, false},
    {"env", PD_JSON_STRING_MAP, false},
};

static void
json_done(struct pd_http_req *r, json_t *body, void *arg)
{
    (void)arg;
    pd_http_respond_json(r, 200, json_pack("{s:O}", "got", body));
    json_decref(body);
}

static void
h_json(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    (void)p;
    (void)arg;
    pd_http_read_json(r, 4096, person, PD_ARRAY_SIZE(person), json_done,
                      NULL);
}

/* Upload: count and hash, pausing after every piece for a moment so the
 * server has to hold the client back. */
struct upload {
    uint64_t bytes;
    uint64_t hash;
    uv_timer_t t;
    struct pd_http_req *r;
};

static void
upload_resume(uv_timer_t *t)
{
    struct upload *u = t->data;

    pd_http_body_resume(u->r);
}

static void
upload_data(struct pd_http_req *r, const char *d, size_t n, void *arg)
{
    struct upload *u = arg;
    size_t i;

    for (i = 0; i < n; i++)
        u->hash = (u->hash ^ (unsigned char)d[i]) * 1099511628211ull;
    u->bytes += n;
    if ((int)n > upload_max_chunk)
        upload_max_chunk = (int)n;
    pd_http_body_pause(r);
    uv_timer_start(&u->t, upload_resume, 1, 0);
}

static void
upload_closed(uv_handle_t *h)
{
    free(h->data);
}

static void
upload_end(struct pd_http_req *r, int err, void *arg)
{
    struct upload *u = arg;
    char buf[128];

    uv_timer_stop(&u->t);
    if (err != 0) {
        pd_http_fail(r, err);
    } else {
        snprintf(buf, sizeof(buf), "%llu %016llx",
                 (unsigned long long)u->bytes, (unsigned long long)u->hash);
        pd_http_respond(r, 200, "text/plain", buf, strlen(buf));
    }
    uv_close((uv_handle_t *)&u->t, upload_closed);
}

static void
h_upload(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    static const struct pd_http_body_stream_cb cb = {
        .on_data = upload_data,
        .on_end = upload_end,
    };
    struct upload *u = calloc(1, sizeof(*u));

    (void)p;
    (void)arg;
    u->hash = 1469598103934665603ull;
    u->r = r;
    uv_timer_init(&fx.loop, &u->t);
    u->t.data = u;
    pd_http_body_stream(r, 0, &cb, u);
}

/* The same with a 1 MiB cap. */
static void
h_capped(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    static const struct pd_http_body_stream_cb cb = {
        .on_data = upload_data,
        .on_end = upload_end,
    };
    struct upload *u = calloc(1, sizeof(*u));

    (void)p;
    (void)arg;
    u->r = r;
    uv_timer_init(&fx.loop, &u->t);
    u->t.data = u;
    pd_http_body_stream(r, 1u << 20, &cb, u);
}

/* Download: ?mb=N megabytes of a pattern, chunked, paced by on_drain. */
struct download {
    uint64_t left;
    uint64_t off;
};

static void
download_pump(struct pd_http_req *r, void *arg)
{
    struct download *d = arg;
    char buf[65536];

    while (d->left > 0 && pd_http_queued(r) < PD_HTTP_HIGH_WATER) {
        size_t n = d->left < sizeof(buf) ? d->left : sizeof(buf), i;

        for (i = 0; i < n; i++)
            buf[i] = (char)('a' + (d->off + i) % 26);
        if (pd_http_write(r, buf, n) < 0)
            break;
        d->left -= n;
        d->off += n;
    }
    if (d->left == 0 || !pd_http_req_connected(r)) {
        free(d);
        pd_http_end(r);
    }
}

static void
h_download(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    struct download *d = calloc(1, sizeof(*d));
    const char *mb = pd_http_req_query(r, "mb");

    (void)p;
    (void)arg;
    d->left = (uint64_t)atoi(mb != NULL ? mb : "1") << 20;
    pd_http_req_set_data(r, d);
    pd_http_on_drain(r, download_pump);
    pd_http_start(r, 200, "application/octet-stream", -1);
    download_pump(r, d);
}

static void
h_sse(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    (void)p;
    (void)arg;
    pd_http_sse_start(r);
    pd_http_sse_event(r, "start", "{}", 2);
    pd_http_sse_event(r, "stdout", "one\ntwo", 7);
    pd_http_sse_comment(r, "ping");
    pd_http_sse_event(r, "exit", "{\"exit_code\":3}", 15);
    /* The longest event name with short data (found by fuzz_http: the
     * buffer once left no room for the name). */
    pd_http_sse_event(r, "e234567890123456789012345678901234567890123456789"
                      "012345678901234", "x", 1);
    pd_http_end(r);
}

static void
h_peer(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    (void)p;
    (void)arg;
    pd_http_respond(r, 200, "text/plain", pd_http_req_peer_ip(r),
                    strlen(pd_http_req_peer_ip(r)));
}

static void
h_files(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    char buf[600];
    const char *path = pd_http_req_query(r, "path");

    (void)arg;
    snprintf(buf, sizeof(buf), "%s|%s", pd_http_param(p, "id"),
             path != NULL ? path : "(none)");
    pd_http_respond(r, 200, "text/plain", buf, strlen(buf));
}

/* Slow: never answers by itself; counts aborts and then finishes. */
static void
slow_abort(struct pd_http_req *r, void *arg)
{
    (void)arg;
    __atomic_add_fetch(&aborts, 1, __ATOMIC_SEQ_CST);
    pd_http_end(r);
}

static void
h_slow(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    (void)p;
    (void)arg;
    pd_http_on_abort(r, slow_abort);
}

/* Upgrade: answers 101 itself and echoes every byte back. */
static void
ws_data(struct pd_http_raw *x, const char *d, size_t n, void *arg)
{
    (void)arg;
    if (n == 4 && memcmp(d, "quit", 4) == 0) {
        pd_http_raw_close(x);
        return;
    }
    pd_http_raw_write(x, d, n);
}

static void
ws_close(struct pd_http_raw *x, int reason, void *arg)
{
    (void)x;
    (void)reason;
    (void)arg;
}

static void
h_ws(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    static const struct pd_http_raw_cb cb = {
        .on_data = ws_data,
        .on_close = ws_close,
    };
    static const char sw[] = "HTTP/1.1 101 Switching Protocols\r\n"
                             "Upgrade: echo\r\nConnection: Upgrade\r\n\r\n";
    struct pd_http_raw *x;

    (void)p;
    (void)arg;
    if (!pd_http_req_is_upgrade(r)) {
        pd_http_respond_error(r, 400, NULL, "not an upgrade");
        return;
    }
    x = pd_http_upgrade(r, &cb, NULL);
    assert_non_null(x);
    pd_http_raw_write(x, sw, sizeof(sw) - 1);
}

static const struct pd_http_route routes[] = {
    {"GET", "/hello", h_hello},
    {"POST", "/echo", h_echo},
    {"POST", "/json", h_json},
    {"PUT", "/upload", h_upload},
    {"PUT", "/capped", h_capped},
    {"GET", "/download", h_download},
    {"GET", "/sse", h_sse},
    {"GET", "/peer", h_peer},
    {"GET", "/slow", h_slow},
    {"GET", "/ws", h_ws},
    {"GET", "/v1/sandboxes/{id}/files", h_files},
    {"DELETE", "/v1/sandboxes/{id}/files", h_files},
};

static void
on_request(struct pd_http_req *r, void *arg)
{
    pd_http_dispatch(r, routes, PD_ARRAY_SIZE(routes), arg);
}

static void
on_stop(uv_async_t *a)
{
    pd_http_server_close(fx.srv, NULL, NULL);
    uv_close((uv_handle_t *)a, NULL);
}

static void *
loop_main(void *arg)
{
    (void)arg;
    uv_run(&fx.loop, UV_RUN_DEFAULT);
    return NULL;
}

static void
server_start(const struct pd_http_limits *lim, SSL_CTX *tls)
{
    struct pd_http_opts o = {.on_request = on_request, .tls = tls};
    char err[256];

    if (lim != NULL)
        o.limits = *lim;
    memset(&fx, 0, sizeof(fx));
    assert_int_equal(uv_loop_init(&fx.loop), 0);
    assert_int_equal(pd_http_server_new(&fx.loop, &o, &fx.srv, err,
                                        sizeof(err)), 0);
    assert_int_equal(pd_http_server_listen(fx.srv, "127.0.0.1:0", err,
                                           sizeof(err)), 0);
    fx.port = pd_http_server_port(fx.srv);
    assert_true(fx.port > 0);
    uv_async_init(&fx.loop, &fx.stop, on_stop);
    assert_int_equal(pthread_create(&fx.thread, NULL, loop_main, NULL), 0);
}

static void
server_stop(void)
{
    uv_async_send(&fx.stop);
    pthread_join(fx.thread, NULL);
    assert_int_equal(uv_loop_close(&fx.loop), 0);
}

static int
setup_default(void **state)
{
    struct pd_http_limits lim = {0};

    (void)state;
    lim.header_timeout_ms = 400;
    lim.idle_timeout_ms = 600;
    lim.max_header_bytes = 4096;
    lim.max_headers = 20;
    lim.max_url = 1024;
    lim.max_conns = 16;
    server_start(&lim, NULL);
    return 0;
}

static int
teardown_default(void **state)
{
    (void)state;
    server_stop();
    return 0;
}

/* ---- a raw client ------------------------------------------------------- */

struct client {
    int fd;
    char buf[1 << 16];
    size_t len;
};

struct resp {
    int status;
    char head[8192];
    char body[1 << 16];
    size_t blen;
};

static int
tcp_connect(int port)
{
    struct sockaddr_in a = {.sin_family = AF_INET};
    struct timeval tv = {.tv_sec = 5};
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_true(fd >= 0);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    return fd;
}

static struct client *
client_new(void)
{
    struct client *c = calloc(1, sizeof(*c));

    c->fd = tcp_connect(fx.port);
    return c;
}

static void
client_free(struct client *c)
{
    close(c->fd);
    free(c);
}

static void
send_str(struct client *c, const char *s)
{
    size_t n = strlen(s);

    assert_int_equal(send(c->fd, s, n, MSG_NOSIGNAL), (ssize_t)n);
}

/* Reads more; returns bytes read, 0 on EOF, -1 on error or timeout. */
static ssize_t
fill(struct client *c)
{
    ssize_t n = recv(c->fd, c->buf + c->len, sizeof(c->buf) - c->len, 0);

    if (n > 0)
        c->len += (size_t)n;
    return n;
}

static void
consume(struct client *c, size_t n)
{
    memmove(c->buf, c->buf + n, c->len - n);
    c->len -= n;
}

static bool
read_exact(struct client *c, size_t n)
{
    while (c->len < n)
        if (fill(c) <= 0)
            return false;
    return true;
}

static const char *
find_header(const char *head, const char *name)
{
    const char *p = head;
    size_t n = strlen(name);

    while ((p = strchr(p, '\n')) != NULL) {
        p++;
        if (strncasecmp(p, name, n) == 0 && p[n] == ':')
            return p + n + 1 + (p[n + 1] == ' ');
    }
    return NULL;
}

/* Reads one response; false on EOF or timeout before it is complete. */
static bool
read_resp(struct client *c, struct resp *r)
{
    char *end;
    const char *cl, *te;
    size_t hlen;

    memset(r, 0, sizeof(*r));
    for (;;) {
        c->buf[c->len] = '\0';
        end = c->len > 0 ? strstr(c->buf, "\r\n\r\n") : NULL;
        if (end != NULL)
            break;
        if (c->len + 1 >= sizeof(c->buf) || fill(c) <= 0)
            return false;
    }
    hlen = (size_t)(end - c->buf) + 4;
    memcpy(r->head, c->buf, hlen < sizeof(r->head) ? hlen : 0);
    r->head[hlen] = '\0';
    if (sscanf(r->head, "HTTP/1.%*d %d", &r->status) != 1)
        return false;
    consume(c, hlen);
    if (r->status == 100 || r->status == 101)
        return true;
    cl = find_header(r->head, "Content-Length");
    te = find_header(r->head, "Transfer-Encoding");
    if (cl != NULL) {
        r->blen = (size_t)atol(cl);
        if (r->blen >= sizeof(r->body) || !read_exact(c, r->blen))
            return false;
        memcpy(r->body, c->buf, r->blen);
        consume(c, r->blen);
    } else if (te != NULL) {
        for (;;) {
            size_t sz;
            char *nl;

            for (;;) {
                c->buf[c->len] = '\0';
                nl = strstr(c->buf, "\r\n");
                if (nl != NULL)
                    break;
                if (fill(c) <= 0)
                    return false;
            }
            sz = strtoul(c->buf, NULL, 16);
            consume(c, (size_t)(nl - c->buf) + 2);
            if (!read_exact(c, sz + 2))
                return false;
            if (r->blen + sz < sizeof(r->body))
                memcpy(r->body + r->blen, c->buf, sz);
            r->blen += sz;
            consume(c, sz + 2);
            if (sz == 0)
                break;
        }
    } else {
        while (fill(c) > 0)
            ;
        r->blen = c->len < sizeof(r->body) ? c->len : 0;
        memcpy(r->body, c->buf, r->blen);
        c->len = 0;
    }
    r->body[r->blen < sizeof(r->body) ? r->blen : 0] = '\0';
    return true;
}

/* True when the server closes the connection (EOF) within 5 s. */
static bool
closed_by_server(struct client *c)
{
    for (;;) {
        ssize_t n = fill(c);

        if (n == 0)
            return true;
        if (n < 0)
            return errno == ECONNRESET;
        c->len = 0;
    }
}

/* Sends raw, expects one response with this status and then a close. */
static void
expect_status_and_close(const char *raw, int status, const char *code)
{
    struct client *c = client_new();
    struct resp r;

    send_str(c, raw);
    assert_true(read_resp(c, &r));
    if (r.status != status)
        fail_msg("got %d instead of %d for: %s", r.status, status, raw);
    if (code != NULL) {
        json_t *j = json_loads(r.body, 0, NULL);

        assert_non_null(j);
        assert_string_equal(json_string_value(json_object_get(
                                json_object_get(j, "error"), "code")),
                            code);
        assert_non_null(json_object_get(json_object_get(j, "error"),
                                        "message"));
        json_decref(j);
    }
    assert_true(closed_by_server(c));
    client_free(c);
}

/* ---- tests: the raw protocol -------------------------------------------- */

/* Two requests on one connection: keep-alive works. */
static void
test_keepalive(void **state)
{
    struct client *c = client_new();
    struct resp r;

    (void)state;
    send_str(c, "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_true(read_resp(c, &r));
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "hello");
    assert_null(find_header(r.head, "Connection"));
    send_str(c, "GET /peer HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_true(read_resp(c, &r));
    assert_string_equal(r.body, "127.0.0.1");
    client_free(c);
}

/* Three pipelined requests in one write come back in order. */
static void
test_pipelining(void **state)
{
    struct client *c = client_new();
    struct resp r;

    (void)state;
    send_str(c, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n"
                "abcGET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
                "POST /echo HTTP/1.1\r\nHost: x\r\n"
                "Transfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\n");
    assert_true(read_resp(c, &r));
    assert_string_equal(r.body, "abc");
    assert_true(read_resp(c, &r));
    assert_string_equal(r.body, "hello");
    assert_true(read_resp(c, &r));
    assert_string_equal(r.body, "xy");
    client_free(c);
}

/* Request smuggling shapes are refused with 400. */
static void
test_smuggling(void **state)
{
    (void)state;
    expect_status_and_close("POST /echo HTTP/1.1\r\nHost: x\r\n"
                            "Content-Length: 3\r\n"
                            "Transfer-Encoding: chunked\r\n\r\n"
                            "0\r\n\r\n",
                            400, "bad_request");
    expect_status_and_close("POST /echo HTTP/1.1\r\nHost: x\r\n"
                            "Transfer-Encoding: chunked\r\n"
                            "Content-Length: 3\r\n\r\nabc",
                            400, "bad_request");
    expect_status_and_close("POST /echo HTTP/1.1\r\nHost: x\r\n"
                            "Content-Length: 3\r\nContent-Length: 3\r\n\r\n"
                            "abc",
                            400, "bad_request");
    expect_status_and_close("POST /echo HTTP/1.1\r\nHost: x\r\n"
                            "Content-Length: 3\r\nContent-Length: 4\r\n\r\n"
                            "abcd",
                            400, "bad_request");
    expect_status_and_close("POST /echo HTTP/1.1\r\nHost: x\r\n"
                            "Transfer-Encoding: chunked, identity\r\n\r\n"
                            "0\r\n\r\n",
                            400, "bad_request");
    expect_status_and_close("POST /echo HTTP/1.1\r\nHost: x\r\n"
                            "Transfer-Encoding: gzip\r\n\r\n",
                            400, "bad_request");
    expect_status_and_close("POST /echo HTTP/1.0\r\n"
                            "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                            400, "bad_request");
    expect_status_and_close("POST /echo HTTP/1.1\r\nHost: x\r\n"
                            "Content-Length: -1\r\n\r\n",
                            400, "bad_request");
    expect_status_and_close("POST /echo HTTP/1.1\r\nHost: x\r\n"
                            "Content-Length : 3\r\n\r\nabc",
                            400, "bad_request");
}

/* Malformed and unserved requests get 400 with the error shape. */
static void
test_malformed(void **state)
{
    (void)state;
    expect_status_and_close("HELLO\r\n\r\n", 400, "bad_request");
    expect_status_and_close("GET /hello HTTP/1.1\r\n\r\n", 400,
                            "bad_request"); /* no Host */
    expect_status_and_close("GET /hello HTTP/1.1\r\nHost: a\r\nHost: b\r\n"
                            "\r\n", 400, "bad_request");
    expect_status_and_close("GET /hello?x=%zz HTTP/1.1\r\nHost: x\r\n\r\n",
                            400, "bad_request");
    expect_status_and_close("GET /a%00b HTTP/1.1\r\nHost: x\r\n\r\n", 400,
                            "bad_request");
    expect_status_and_close("GET /hello HTTP/2.0\r\nHost: x\r\n\r\n", 400,
                            "bad_request");
    expect_status_and_close("CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n",
                            405, "method_not_allowed");
    expect_status_and_close("GET /hello HTTP/1.1\r\nHost: x\r\n"
                            "X-A: a\x01b\r\n\r\n", 400, "bad_request");
    expect_status_and_close("POST /echo HTTP/1.1\r\nHost: x\r\n"
                            "Transfer-Encoding: chunked\r\n\r\n"
                            "zz\r\nabc\r\n0\r\n\r\n", 400, "bad_request");
}

/* Size limits: headers, header count, URL, bodies. */
static void
test_limits(void **state)
{
    static char big[20000];
    char *p;
    int i;

    (void)state;
    /* 431: one huge header. */
    p = big + sprintf(big, "GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: ");
    memset(p, 'a', 8000);
    strcpy(p + 8000, "\r\n\r\n");
    expect_status_and_close(big, 431, "headers_too_large");
    /* 431: too many headers. */
    p = big + sprintf(big, "GET /hello HTTP/1.1\r\nHost: x\r\n");
    for (i = 0; i < 30; i++)
        p += sprintf(p, "X-%d: y\r\n", i);
    strcpy(p, "\r\n");
    expect_status_and_close(big, 431, "headers_too_large");
    /* 414: long target. */
    p = big + sprintf(big, "GET /");
    memset(p, 'a', 2000);
    strcpy(p + 2000, " HTTP/1.1\r\nHost: x\r\n\r\n");
    expect_status_and_close(big, 414, "uri_too_long");
    /* 413: declared length over the route's cap, refused before sending. */
    expect_status_and_close("POST /echo HTTP/1.1\r\nHost: x\r\n"
                            "Content-Length: 5000\r\n\r\n", 413,
                            "body_too_large");
    /* 413: chunked body that grows past the cap. */
    p = big + sprintf(big, "POST /echo HTTP/1.1\r\nHost: x\r\n"
                           "Transfer-Encoding: chunked\r\n\r\n");
    for (i = 0; i < 5; i++) {
        p += sprintf(p, "200\r\n");
        memset(p, 'b', 512);
        p += 512;
        p += sprintf(p, "\r\n");
    }
    strcpy(p, "0\r\n\r\n");
    expect_status_and_close(big, 413, "body_too_large");
}

/* Headers sent one byte at a time too slowly get 408 near the deadline. */
static void
test_slow_headers(void **state)
{
    static const char req[] = "GET /hello HTTP/1.1\r\nHost: x\r\n"
                              "X-Slow: aaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    struct client *c = client_new();
    uint64_t t0 = pd_now_ms(), elapsed;
    struct resp r;
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(req) - 1; i++) {
        if (send(c->fd, req + i, 1, MSG_NOSIGNAL) != 1)
            break;
        usleep(50000);
        if (recv(c->fd, c->buf, 1, MSG_PEEK | MSG_DONTWAIT) > 0 ||
            pd_now_ms() - t0 > 1500)
            break; /* answered (or never: the assert below says) */
    }
    assert_true(read_resp(c, &r));
    elapsed = pd_now_ms() - t0;
    assert_int_equal(r.status, 408);
    printf("408 after %llu ms\n", (unsigned long long)elapsed);
    assert_true(elapsed >= 350 && elapsed < 1500);
    assert_true(closed_by_server(c));
    client_free(c);
}

/* An idle keep-alive connection is closed after the idle timeout. */
static void
test_idle_timeout(void **state)
{
    struct client *c = client_new();
    uint64_t t0 = pd_now_ms();

    (void)state;
    assert_true(closed_by_server(c));
    assert_true(pd_now_ms() - t0 >= 500);
    assert_true(pd_now_ms() - t0 < 3000);
    client_free(c);
}

/* Expect: 100-continue is answered when the handler reads the body. */
static void
test_expect_continue(void **state)
{
    struct client *c = client_new();
    struct resp r;

    (void)state;
    send_str(c, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                "Expect: 100-continue\r\n\r\n");
    assert_true(read_resp(c, &r));
    assert_int_equal(r.status, 100);
    send_str(c, "ping");
    assert_true(read_resp(c, &r));
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "ping");
    client_free(c);
}

/* A body cut short by the client's EOF is an error, not a hang. */
static void
test_truncated_body(void **state)
{
    struct client *c = client_new();
    struct resp r;

    (void)state;
    send_str(c, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
                "\r\nabc");
    shutdown(c->fd, SHUT_WR);
    assert_true(read_resp(c, &r));
    assert_int_equal(r.status, 400);
    assert_true(closed_by_server(c));
    client_free(c);
}

/* The upgrade hands over the raw stream, including bytes sent early. */
static void
test_upgrade(void **state)
{
    struct client *c = client_new();
    struct resp r;

    (void)state;
    send_str(c, "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                "Upgrade: echo\r\n\r\nearly");
    assert_true(read_resp(c, &r));
    assert_int_equal(r.status, 101);
    assert_true(read_exact(c, 5));
    assert_memory_equal(c->buf, "early", 5);
    consume(c, 5);
    send_str(c, "GET / HTTP/1.1\r\n\r\n"); /* just bytes now */
    assert_true(read_exact(c, 18));
    assert_memory_equal(c->buf, "GET / HTTP/1.1\r\n\r\n", 18);
    c->len = 0;
    send_str(c, "quit");
    assert_true(closed_by_server(c));
    client_free(c);
}

/* Routing, 404 and 405 with Allow, decoded path parameters. */
static void
test_routing(void **state)
{
    struct client *c = client_new();
    struct resp r;

    (void)state;
    send_str(c, "GET /v1/sandboxes/sb%2D1/files?path=%2Fetc%2Fa+b HTTP/1.1"
                "\r\nHost: x\r\n\r\n");
    assert_true(read_resp(c, &r));
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "sb-1|/etc/a b");
    send_str(c, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_true(read_resp(c, &r));
    assert_int_equal(r.status, 404);
    assert_non_null(strstr(r.body, "\"not_found\""));
    send_str(c, "POST /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_true(read_resp(c, &r));
    assert_int_equal(r.status, 405);
    assert_non_null(strstr(find_header(r.head, "Allow"), "GET"));
    send_str(c, "HEAD /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    c->buf[0] = '\0';
    assert_true(fill(c) > 0);
    c->buf[c->len] = '\0';
    assert_non_null(strstr(c->buf, "Content-Length: 5"));
    assert_null(strstr(c->buf, "hello"));
    client_free(c);
}

static void
json_case(const char *body, int status, const char *code, const char *msg)
{
    struct client *c = client_new();
    char req[2048];
    struct resp r;

    snprintf(req, sizeof(req), "POST /json HTTP/1.1\r\nHost: x\r\n"
             "Content-Length: %zu\r\n\r\n%s", strlen(body), body);
    send_str(c, req);
    assert_true(read_resp(c, &r));
    assert_int_equal(r.status, status);
    if (code != NULL)
        assert_non_null(strstr(r.body, code));
    if (msg != NULL) {
        if (strstr(r.body, msg) == NULL)
            fail_msg("body %s lacks %s", r.body, msg);
    }
    client_free(c);
}

/* Strict JSON: unknown fields, wrong types, bad JSON, each named. */
static void
test_json(void **state)
{
    (void)state;
    json_case("{\"name\":\"a\",\"age\":3,\"tags\":[\"x\"],"
              "\"env\":{\"K\":\"v\"}}",
              200, NULL, "\"got\"");
    json_case("{\"name\":\"a\",\"agee\":3}", 400, "invalid_argument",
              "unknown field 'agee'");
    json_case("{\"name\":\"a\",\"age\":\"3\"}", 400, "invalid_argument",
              "field 'age': expected a non-negative integer, got a string");
    json_case("{\"name\":\"a\",\"age\":-1}", 400, NULL, "negative");
    json_case("{\"name\":\"a\",\"age\":1.5}", 400, NULL, "'age'");
    json_case("{\"name\":\"a\",\"tags\":[\"x\",2]}", 400, NULL,
              "field 'tags[1]': expected a string");
    json_case("{\"name\":\"a\",\"env\":{\"K\":1}}", 400, NULL,
              "field 'env.K'");
    json_case("{\"age\":1}", 400, NULL, "missing required field 'name'");
    json_case("{\"name\":\"a\",", 400, "invalid_json", "line 1");
    json_case("[1,2]", 400, NULL, "expected a JSON object");
    json_case("{\"name\":\"a\",\"name\":\"b\"}", 400, "invalid_json", NULL);
    json_case("", 400, NULL, "missing required field 'name'");
}

/* A client that leaves during a slow request: the handler hears it. */
static void
test_abort(void **state)
{
    struct client *c = client_new();
    int i;

    (void)state;
    __atomic_store_n(&aborts, 0, __ATOMIC_SEQ_CST);
    send_str(c, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n");
    usleep(100000);
    /* RST rather than FIN: a half-closed client still gets answers. */
    {
        struct linger l = {.l_onoff = 1, .l_linger = 0};

        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
    }
    client_free(c);
    for (i = 0; i < 200 && __atomic_load_n(&aborts, __ATOMIC_SEQ_CST) == 0;
         i++)
        usleep(10000);
    assert_int_equal(__atomic_load_n(&aborts, __ATOMIC_SEQ_CST), 1);
}

/* Beyond max_conns a connection gets 503 and the others keep working. */
static void
test_max_conns(void **state)
{
    struct client *cs[16];
    struct client *extra;
    struct resp r;
    int i;

    (void)state;
    for (i = 0; i < 16; i++)
        cs[i] = client_new();
    usleep(50000);
    extra = client_new();
    assert_true(read_resp(extra, &r));
    assert_int_equal(r.status, 503);
    client_free(extra);
    send_str(cs[0], "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_true(read_resp(cs[0], &r));
    assert_int_equal(r.status, 200);
    for (i = 0; i < 16; i++)
        client_free(cs[i]);
    for (i = 0; i < 300 && pd_http_server_conns(fx.srv) > 0; i++)
        usleep(10000);
}

/* Mutated requests (fixed seed) never crash the server or wedge it. */
static void
test_garbage(void **state)
{
    static const char *const seeds[] = {
        "GET /hello?a=1&b=%20 HTTP/1.1\r\nHost: x\r\nX-A: b\r\n\r\n",
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
        "hello",
        "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
        "\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "POST /json HTTP/1.1\r\nHost: x\r\nContent-Length: 15\r\n\r\n"
        "{\"name\":\"abc\"}",
        "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
        "Upgrade: echo\r\n\r\nquit",
    };
    static const char junk[] = "\r\n:% \t\x00\xff" "0aZ{";
    unsigned seed = 12345;
    int i, answered = 0;
    struct client *c;
    struct resp r;

    (void)state;
    for (i = 0; i < 400; i++) {
        char buf[512];
        const char *sd = seeds[i % PD_ARRAY_SIZE(seeds)];
        size_t n = strlen(sd), k, edits = 1 + rand_r(&seed) % 4;

        memcpy(buf, sd, n);
        for (k = 0; k < edits; k++) {
            size_t at = (size_t)rand_r(&seed) % n;

            switch (rand_r(&seed) % 3) {
            case 0: /* replace */
                buf[at] = junk[rand_r(&seed) % (sizeof(junk) - 1)];
                break;
            case 1: /* cut */
                n = at + 1;
                break;
            default: /* insert */
                if (n + 1 < sizeof(buf)) {
                    memmove(buf + at + 1, buf + at, n - at);
                    buf[at] = junk[rand_r(&seed) % (sizeof(junk) - 1)];
                    n++;
                }
            }
        }
        c = client_new();
        if (send(c->fd, buf, n, MSG_NOSIGNAL) == (ssize_t)n) {
            shutdown(c->fd, SHUT_WR);
            while (fill(c) > 0 && c->len < sizeof(c->buf) - 1)
                ;
            answered += c->len > 0;
        }
        client_free(c);
    }
    printf("%d of 400 mutated requests got an answer\n", answered);
    assert_true(answered > 100);
    c = client_new();
    send_str(c, "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_true(read_resp(c, &r));
    assert_int_equal(r.status, 200);
    client_free(c);
}

/* ---- tests: libcurl ----------------------------------------------------- */

struct sink {
    char *data;
    size_t len;
    uint64_t total;
    bool keep;
    bool pattern_ok;
};

static size_t
sink_write(char *p, size_t sz, size_t n, void *arg)
{
    struct sink *s = arg;
    size_t len = sz * n, i;

    for (i = 0; i < len && s->pattern_ok; i++)
        if (p[i] != (char)('a' + (s->total + i) % 26))
            s->pattern_ok = false;
    if (s->keep) {
        s->data = realloc(s->data, s->len + len + 1);
        memcpy(s->data + s->len, p, len);
        s->len += len;
        s->data[s->len] = '\0';
    }
    s->total += len;
    return len;
}

struct source {
    uint64_t left;
    uint64_t hash;
    uint64_t off;
};

static size_t
source_read(char *p, size_t sz, size_t n, void *arg)
{
    struct source *s = arg;
    size_t len = sz * n, i;

    if (len > s->left)
        len = (size_t)s->left;
    for (i = 0; i < len; i++) {
        p[i] = (char)((s->off + i) * 7 % 251);
        s->hash = (s->hash ^ (unsigned char)p[i]) * 1099511628211ull;
    }
    s->off += len;
    s->left -= len;
    return len;
}

static long
max_rss_kb(void)
{
    struct rusage ru;

    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss;
}

static CURL *
curl_for(const char *path, struct sink *s)
{
    CURL *h = curl_easy_init();
    char url[256];

    snprintf(url, sizeof(url), "%s://127.0.0.1:%d%s",
             fx.tls != NULL ? "https" : "http", fx.port, path);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, sink_write);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, s);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT, 60L);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 0L);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 0L);
    return h;
}

/* 256 MiB up and down stream through without growing memory much. */
static void
test_curl_large(void **state)
{
    struct sink s = {.pattern_ok = true, .keep = true};
    struct source src = {.left = 256ull << 20,
                         .hash = 1469598103934665603ull};
    long rss0 = max_rss_kb(), code = 0;
    char want[128];
    CURL *h = curl_for("/upload", &s);

    (void)state;
    curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(h, CURLOPT_READFUNCTION, source_read);
    curl_easy_setopt(h, CURLOPT_READDATA, &src);
    curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, (curl_off_t)src.left);
    assert_int_equal(curl_easy_perform(h), CURLE_OK);
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
    curl_easy_cleanup(h);
    assert_int_equal(code, 200);
    snprintf(want, sizeof(want), "%llu %016llx", 256ull << 20,
             (unsigned long long)src.hash);
    assert_string_equal(s.data, want);
    assert_true(upload_max_chunk <= 128 * 1024);
    free(s.data);

    memset(&s, 0, sizeof(s));
    s.pattern_ok = true;
    h = curl_for("/download?mb=256", &s);
    assert_int_equal(curl_easy_perform(h), CURLE_OK);
    curl_easy_cleanup(h);
    assert_int_equal(s.total, 256ull << 20);
    assert_true(s.pattern_ok);
    /* Server and client share the process: both must stay small. */
    printf("max RSS growth over 512 MiB of transfers: %ld KiB\n",
           max_rss_kb() - rss0);
#ifndef __SANITIZE_ADDRESS__
    /* (ASan's quarantine keeps freed buffers: no bound to check there.) */
    assert_true(max_rss_kb() - rss0 < 48 * 1024);
#endif
}

/* A streamed upload over the route's cap gets 413, declared or not. */
static void
test_curl_capped(void **state)
{
    int chunked;

    (void)state;
    for (chunked = 0; chunked < 2; chunked++) {
        struct sink s = {.keep = true};
        struct source src = {.left = 8u << 20};
        CURL *h = curl_for("/capped", &s);
        long code = 0;
        CURLcode rc;

        curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
        curl_easy_setopt(h, CURLOPT_READFUNCTION, source_read);
        curl_easy_setopt(h, CURLOPT_READDATA, &src);
        if (!chunked)
            curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE,
                             (curl_off_t)src.left);
        rc = curl_easy_perform(h);
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
        curl_easy_cleanup(h);
        /* curl may also notice that the rest was not read. */
        assert_true(rc == CURLE_OK || rc == CURLE_SEND_ERROR);
        assert_int_equal(code, 413);
        assert_non_null(strstr(s.data, "body_too_large"));
        free(s.data);
    }
}

/* SSE events arrive in the text/event-stream format. */
static void
test_curl_sse(void **state)
{
    struct sink s = {.keep = true};
    CURL *h = curl_for("/sse", &s);
    char *ctype = NULL;

    (void)state;
    assert_int_equal(curl_easy_perform(h), CURLE_OK);
    curl_easy_getinfo(h, CURLINFO_CONTENT_TYPE, &ctype);
    assert_string_equal(ctype, "text/event-stream");
    assert_string_equal(s.data,
                        "event: start\ndata: {}\n\n"
                        "event: stdout\ndata: one\ndata: two\n\n"
                        ": ping\n\n"
                        "event: exit\ndata: {\"exit_code\":3}\n\n"
                        "event: e2345678901234567890123456789012345678901"
                        "23456789012345678901234\ndata: x\n\n");
    curl_easy_cleanup(h);
    free(s.data);
}

/* Keep-alive through curl: many requests, one connection. */
static void
test_curl_reuse(void **state)
{
    struct sink s = {.keep = true};
    CURL *h = curl_for("/hello", &s);
    long conns = 0;
    int i;

    (void)state;
    for (i = 0; i < 50; i++) {
        assert_int_equal(curl_easy_perform(h), CURLE_OK);
    }
    curl_easy_getinfo(h, CURLINFO_NUM_CONNECTS, &conns);
    assert_int_equal(conns, 0); /* the last perform reused it */
    assert_int_equal(s.len, 250);
    curl_easy_cleanup(h);
    free(s.data);
}

/* ---- TLS ----------------------------------------------------------------- */

static char tlsdir[64];

static int
setup_tls(void **state)
{
    char cmd[512], err[256], cert[128], key[128];
    SSL_CTX *ctx;

    (void)state;
    snprintf(tlsdir, sizeof(tlsdir), "/tmp/pd-http-tls-XXXXXX");
    assert_non_null(mkdtemp(tlsdir));
    snprintf(cmd, sizeof(cmd),
             "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 "
             "-nodes -keyout %s/k.pem -out %s/c.pem -days 1 "
             "-subj /CN=127.0.0.1 2>/dev/null", tlsdir, tlsdir);
    assert_int_equal(system(cmd), 0);
    snprintf(cert, sizeof(cert), "%s/c.pem", tlsdir);
    snprintf(key, sizeof(key), "%s/k.pem", tlsdir);
    ctx = pd_tls_ctx_new(true, cert, key, NULL, err, sizeof(err));
    assert_non_null(ctx);
    server_start(NULL, ctx);
    fx.tls = ctx;
    return 0;
}

static int
teardown_tls(void **state)
{
    SSL_CTX *ctx = fx.tls;

    (void)state;
    server_stop();
    SSL_CTX_free(ctx);
    pd_rm_rf(tlsdir);
    return 0;
}

/* The same server over TLS: small, large and streamed. */
static void
test_tls(void **state)
{
    struct sink s = {.keep = true};
    CURL *h = curl_for("/peer", &s);

    (void)state;
    assert_int_equal(curl_easy_perform(h), CURLE_OK);
    assert_string_equal(s.data, "127.0.0.1");
    curl_easy_cleanup(h);
    free(s.data);

    memset(&s, 0, sizeof(s));
    s.pattern_ok = true;
    h = curl_for("/download?mb=16", &s);
    assert_int_equal(curl_easy_perform(h), CURLE_OK);
    curl_easy_cleanup(h);
    assert_int_equal(s.total, 16u << 20);
    assert_true(s.pattern_ok);
}

/* ---- helpers without a server ------------------------------------------ */

static void
test_pct_and_match(void **state)
{
    char out[64];
    size_t n;
    struct pd_http_params p;
    char *e;

    (void)state;
    assert_int_equal(pd_http_pct_decode("a%20b+c", 7, out, &n, true), 0);
    assert_string_equal(out, "a b c");
    assert_int_equal(pd_http_pct_decode("a+b", 3, out, &n, false), 0);
    assert_string_equal(out, "a+b");
    assert_int_equal(pd_http_pct_decode("%4", 2, out, &n, false), -EINVAL);
    assert_int_equal(pd_http_pct_decode("%", 1, out, &n, false), -EINVAL);
    assert_int_equal(pd_http_pct_decode("%g0", 3, out, &n, false),
                     -EINVAL);
    assert_int_equal(pd_http_pct_decode("%00", 3, out, &n, false),
                     -EINVAL);
    e = pd_http_pct_encode("a b/ü", 6);
    assert_string_equal(e, "a%20b%2F%C3%BC");
    free(e);

    assert_true(pd_http_match("/v1/sandboxes/{id}", "/v1/sandboxes/abc",
                              &p));
    assert_string_equal(pd_http_param(&p, "id"), "abc");
    assert_null(pd_http_param(&p, "x"));
    assert_true(pd_http_match("/v1/s/{id}/p/{proc}/logs",
                              "/v1/s/a/p/b%20c/logs", &p));
    assert_string_equal(pd_http_param(&p, "proc"), "b c");
    assert_false(pd_http_match("/v1/sandboxes/{id}", "/v1/sandboxes/", &p));
    assert_false(pd_http_match("/v1/sandboxes/{id}", "/v1/sandboxes/a/b",
                               &p));
    assert_false(pd_http_match("/v1/sandboxes", "/v1/sandboxes/", &p));
    assert_false(pd_http_match("/v1/sandboxes/{id}", "/v1/sandboxes/%zz",
                               &p));
}

int
main(void)
{
    const struct CMUnitTest raw[] = {
        cmocka_unit_test(test_keepalive),
        cmocka_unit_test(test_pipelining),
        cmocka_unit_test(test_smuggling),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_slow_headers),
        cmocka_unit_test(test_idle_timeout),
        cmocka_unit_test(test_expect_continue),
        cmocka_unit_test(test_upgrade),
        cmocka_unit_test(test_truncated_body),
        cmocka_unit_test(test_routing),
        cmocka_unit_test(test_json),
        cmocka_unit_test(test_abort),
        cmocka_unit_test(test_max_conns),
        cmocka_unit_test(test_garbage),
        cmocka_unit_test(test_curl_sse),
        cmocka_unit_test(test_curl_capped),
        cmocka_unit_test(test_curl_reuse),
    };
    const struct CMUnitTest big[] = {
        cmocka_unit_test(test_curl_large),
    };
    const struct CMUnitTest tls[] = {
        cmocka_unit_test(test_tls),
    };
    const struct CMUnitTest pure[] = {
        cmocka_unit_test(test_pct_and_match),
    };
    int fails = 0;

    curl_global_init(CURL_GLOBAL_ALL);
    fails += cmocka_run_group_tests_name("helpers", pure, NULL, NULL);
    fails += cmocka_run_group_tests_name("raw", raw, setup_default,
                                         teardown_default);
    fails += cmocka_run_group_tests_name("large", big, setup_default,
                                         teardown_default);
    fails += cmocka_run_group_tests_name("tls", tls, setup_tls,
                                         teardown_tls);
    curl_global_cleanup();
    return fails != 0;
}
