/*
 * HTTP/1.1 server on libuv (http-parser), for the scheduler's API and
 * preview listeners, plus the JSON, query, percent-decoding and routing
 * helpers those handlers need.
 *
 * One handler sees every request once its headers are complete. The server
 * itself answers what no handler should have to think about, always in the
 * error shape {"error": {"code": "...", "message": "..."}} and always
 * closing the connection afterwards:
 *   400  malformed request, both Content-Length and Transfer-Encoding,
 *        repeated Content-Length, a Transfer-Encoding other than
 *        "chunked", bad percent-encoding, CONNECT, an upgrade with a body
 *   408  headers not complete within header_timeout_ms of the first byte
 *        (slow clients), or a body silent for body_timeout_ms
 *   413  a body larger than the handler's cap (pd_http_body_read)
 *   414  a request target longer than max_url
 *   431  headers larger than max_header_bytes or more than max_headers
 *   503  more than max_conns connections
 *
 * Request life cycle. on_request runs once the headers are in. The request
 * is then the handler's until it finishes it with pd_http_respond*(),
 * pd_http_end() or pd_http_upgrade(); after that the pointer is dead. A
 * handler may finish at once or later (after an RPC to an agent).
 *
 * Request bodies are not read until the handler asks, so a handler chooses
 * per route how much it accepts:
 *   - pd_http_body_read() collects the whole body up to a cap (small JSON);
 *     pd_http_read_json() also parses it strictly and answers 400 itself;
 *   - pd_http_body_stream() delivers it in chunks as they arrive, with
 *     pd_http_body_pause()/pd_http_body_resume() for backpressure: while
 *     paused nothing more is delivered and the socket is not read, so a
 *     1 GiB upload never sits in memory.
 * "Expect: 100-continue" is answered when the handler first asks for the
 * body. A handler that responds without reading a body gets the connection
 * closed after its response (the unread body cannot be skipped safely).
 *
 * If the client goes away before the request is finished, a pending body
 * callback gets -ECONNRESET (or the on_abort callback runs when no body
 * read is pending); writes then return -ENOTCONN and the handler still
 * finishes the request, which then only frees it.
 *
 * Responses are whole (pd_http_respond, with Content-Length) or streamed
 * (pd_http_start, pd_http_write, pd_http_end: chunked, or with a known
 * length). Writes are copied and queued; pd_http_queued() says how much
 * waits, and a producer stops above PD_HTTP_HIGH_WATER and continues from
 * the on_drain callback, which fires when the queue falls below
 * PD_HTTP_LOW_WATER. pd_http_sse_*() format text/event-stream events.
 *
 * Keep-alive and pipelining: one request is handled at a time per
 * connection; the next pipelined request is parsed only after the previous
 * response is finished and the write queue is below the high water mark.
 *
 * Upgrade (WebSocket proxying): for a request with "Connection: upgrade"
 * (pd_http_req_is_upgrade), pd_http_upgrade() ends HTTP on the connection
 * and hands the raw byte stream (decrypted, when TLS is on) to the owner in
 * both directions, including any bytes the client sent after its headers.
 * The owner writes the 101 response itself (a proxy relays the upstream's).
 *
 * Everything runs on the loop's thread. This is library code: it logs at
 * debug level only.
 */
#ifndef PD_HTTP_H
#define PD_HTTP_H

#include <jansson.h>
#include <openssl/ssl.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <uv.h>

#define PD_HTTP_HIGH_WATER (1u << 20)
#define PD_HTTP_LOW_WATER  (256u << 10)

struct pd_http_server;
struct pd_http_req;
struct pd_http_raw;

struct pd_http_limits {
    size_t max_header_bytes;    /* request line + headers; 16 KiB */
    unsigned max_headers;       /* 100 */
    size_t max_url;             /* 8 KiB */
    size_t max_body;            /* default cap for pd_http_body_read when
                                   the handler passes 0; 1 MiB */
    uint64_t header_timeout_ms; /* first byte to end of headers; 10 s */
    uint64_t idle_timeout_ms;   /* keep-alive wait for a request; 60 s */
    uint64_t body_timeout_ms;   /* silence while reading a body; 60 s */
    uint64_t write_timeout_ms;  /* no write progress with data queued;
                                   60 s */
    unsigned max_conns;         /* 1024 */
};

struct pd_http_opts {
    struct pd_http_limits limits; /* zero fields take the defaults */
    SSL_CTX *tls;                 /* server context, or NULL for plain */
    /* Called for every request whose headers are complete. */
    void (*on_request)(struct pd_http_req *r, void *arg);
    void *arg;
};

/* Fills the defaults above. */
void pd_http_limits_default(struct pd_http_limits *l);

/* Creates a server on loop; nothing listens yet. -errno, reason in err. */
int pd_http_server_new(uv_loop_t *loop, const struct pd_http_opts *o,
                       struct pd_http_server **out, char *err,
                       size_t errlen);

/*
 * Listens on "ip:port" ("127.0.0.1:8080", "[::1]:0"; numeric addresses
 * only; port 0 picks one).
 * Returns 0 or -errno with the reason in err.
 */
int pd_http_server_listen(struct pd_http_server *s, const char *addr,
                          char *err, size_t errlen);

/* The bound port (useful after listening on port 0). */
int pd_http_server_port(const struct pd_http_server *s);

/* Live connections (for tests and metrics). */
unsigned pd_http_server_conns(const struct pd_http_server *s);

/*
 * Injected requests (added for the scheduler's forwarding): runs one
 * request that arrived some other way, e.g. a write a follower forwarded
 * over its RPC link, through the server's on_request as if a client had
 * sent it, with no socket. raw is the whole request in HTTP/1.1 wire form
 * (head and body; send "Connection: close"). The response bytes the
 * handler writes are collected and handed to done once the request is
 * finished (err 0), or with what was written so far when the server
 * closes first (err < 0). peer names the origin in logs. Returns 0 (done
 * will run, never from inside this call) or -ESHUTDOWN / -ENOMEM.
 */
typedef void (*pd_http_inject_cb)(void *arg, int err, const char *resp,
                                  size_t len);
int pd_http_server_inject(struct pd_http_server *s, const void *raw,
                          size_t len, const char *peer,
                          pd_http_inject_cb done, void *arg);

/*
 * Stops listening and closes every connection (unfinished requests see
 * their abort), then calls on_closed once every handle is closed; the
 * server is freed after it. on_closed may be NULL.
 */
void pd_http_server_close(struct pd_http_server *s,
                          void (*on_closed)(void *arg), void *arg);

/* ---- the request ------------------------------------------------------ */

/* "GET", "POST", ... */
const char *pd_http_req_method(const struct pd_http_req *r);
bool pd_http_req_is(const struct pd_http_req *r, const char *method);

/* The target as received ("/v1/x?y=1") and its path, still encoded. */
const char *pd_http_req_target(const struct pd_http_req *r);
const char *pd_http_req_path(const struct pd_http_req *r);

/* First header with this name (any case), trimmed; NULL when absent. */
const char *pd_http_req_header(const struct pd_http_req *r,
                               const char *name);
/* Every header in order (for proxies); false past the end. */
size_t pd_http_req_header_count(const struct pd_http_req *r);
bool pd_http_req_header_at(const struct pd_http_req *r, size_t i,
                           const char **name, const char **value);

/* Decoded query parameters: first value of name, or NULL. */
const char *pd_http_req_query(const struct pd_http_req *r, const char *name);
/* True when the parameter is "true", "1" or "yes"; def when absent. */
bool pd_http_req_query_bool(const struct pd_http_req *r, const char *name,
                            bool def);
size_t pd_http_req_query_count(const struct pd_http_req *r);
bool pd_http_req_query_at(const struct pd_http_req *r, size_t i,
                          const char **name, const char **value);

/* Content-Length, or -1 when chunked or absent. */
int64_t pd_http_req_content_length(const struct pd_http_req *r);
bool pd_http_req_has_body(const struct pd_http_req *r);
bool pd_http_req_is_upgrade(const struct pd_http_req *r);
/* HTTP minor version (0 or 1). */
int pd_http_req_minor(const struct pd_http_req *r);

/* The client's address: "127.0.0.1:53211" / "[::1]:53211", and the IP. */
const char *pd_http_req_peer(const struct pd_http_req *r);
const char *pd_http_req_peer_ip(const struct pd_http_req *r);
const struct sockaddr_storage *pd_http_req_peer_addr(
    const struct pd_http_req *r);
bool pd_http_req_tls(const struct pd_http_req *r);

/* False once the client went away. */
bool pd_http_req_connected(const struct pd_http_req *r);

/* True for a request from pd_http_server_inject. */
bool pd_http_req_injected(const struct pd_http_req *r);

/*
 * cb runs once when the request is freed, finished or not (metrics: the
 * status of the response, 0 when none was started). It must not call
 * back into the request.
 */
void pd_http_on_done(struct pd_http_req *r, void (*cb)(void *arg, int status),
                     void *arg);

void pd_http_req_set_data(struct pd_http_req *r, void *data);
void *pd_http_req_data(const struct pd_http_req *r);

/* Called when the client goes away before the request is finished (from
 * a close callback, never inside another pd_http call); arg is the
 * request's data. */
void pd_http_on_abort(struct pd_http_req *r,
                      void (*cb)(struct pd_http_req *r, void *arg));

/* ---- request bodies ---------------------------------------------------- */

/*
 * Whole body, at most max bytes (0 for limits.max_body). cb gets err 0 and
 * the body (NUL-terminated, owned by the request until it is finished), or
 * -EMSGSIZE (too large), -EPROTO (bad chunked framing), -ETIMEDOUT,
 * -ECONNRESET. On error, pd_http_fail(r, err) answers the right status.
 */
typedef void (*pd_http_body_cb)(struct pd_http_req *r, int err,
                                const char *body, size_t len, void *arg);
int pd_http_body_read(struct pd_http_req *r, size_t max, pd_http_body_cb cb,
                      void *arg);

/*
 * Streamed body: on_data for each piece as it arrives, then on_end with 0
 * once the body is complete or an error as above. max caps the total
 * (0 for no cap). Returns 0 or -EALREADY when the body was already asked
 * for.
 */
struct pd_http_body_stream_cb {
    void (*on_data)(struct pd_http_req *r, const char *data, size_t len,
                    void *arg);
    void (*on_end)(struct pd_http_req *r, int err, void *arg);
};
int pd_http_body_stream(struct pd_http_req *r, uint64_t max,
                        const struct pd_http_body_stream_cb *cb, void *arg);
/* Stops and restarts delivery (backpressure). */
void pd_http_body_pause(struct pd_http_req *r);
void pd_http_body_resume(struct pd_http_req *r);

/* ---- responses --------------------------------------------------------- */

/*
 * Adds a response header before the response starts. Names and values
 * with CR, LF or NUL are refused (-EINVAL). Content-Length,
 * Transfer-Encoding and Connection are the server's to set.
 */
int pd_http_add_header(struct pd_http_req *r, const char *name,
                       const char *value);

/* Whole response; finishes the request. ctype may be NULL. */
int pd_http_respond(struct pd_http_req *r, int status, const char *ctype,
                    const void *body, size_t len);
/* JSON response (takes the reference to j); finishes the request. */
int pd_http_respond_json(struct pd_http_req *r, int status, json_t *j);
/* {"error": {"code", "message"}}; finishes the request. */
int pd_http_respond_error(struct pd_http_req *r, int status,
                          const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Answers a body error from pd_http_body_*: 413, 400, 408, or just
 * finishes when the client is gone. */
int pd_http_fail(struct pd_http_req *r, int err);

/*
 * Streamed response: length is the Content-Length, or -1 for chunked.
 * pd_http_end finishes the request (with a short body under a declared
 * length the connection is closed, never kept in a broken state).
 */
int pd_http_start(struct pd_http_req *r, int status, const char *ctype,
                  int64_t length);
int pd_http_write(struct pd_http_req *r, const void *data, size_t len);
int pd_http_end(struct pd_http_req *r);
size_t pd_http_queued(const struct pd_http_req *r);
bool pd_http_started(const struct pd_http_req *r);
/* cb runs when the write queue falls below PD_HTTP_LOW_WATER after it
 * reached PD_HTTP_HIGH_WATER; arg is the request's data. */
void pd_http_on_drain(struct pd_http_req *r,
                      void (*cb)(struct pd_http_req *r, void *arg));

/* Server-sent events: starts a 200 text/event-stream response. */
int pd_http_sse_start(struct pd_http_req *r);
/* One event; data may hold newlines (split into data: lines) but no CR
 * (-EINVAL): binary output should be encoded (base64) by the caller. */
int pd_http_sse_event(struct pd_http_req *r, const char *event,
                      const char *data, size_t len);
/* A comment line, to keep idle streams open through proxies. */
int pd_http_sse_comment(struct pd_http_req *r, const char *text);

/* ---- upgrade ----------------------------------------------------------- */

struct pd_http_raw_cb {
    void (*on_data)(struct pd_http_raw *x, const char *data, size_t len,
                    void *arg);
    /* Once, when the connection ends (0 for the client's EOF, else
     * -errno); the handle is freed after it returns. */
    void (*on_close)(struct pd_http_raw *x, int reason, void *arg);
    void (*on_drain)(struct pd_http_raw *x, void *arg); /* optional */
};

/*
 * Hands the connection over; finishes the request. NULL (and the request
 * still the handler's) when the request is not an upgrade or the response
 * has started. Timeouts no longer apply.
 */
struct pd_http_raw *pd_http_upgrade(struct pd_http_req *r,
                                    const struct pd_http_raw_cb *cb,
                                    void *arg);
int pd_http_raw_write(struct pd_http_raw *x, const void *data, size_t len);
size_t pd_http_raw_queued(const struct pd_http_raw *x);
void pd_http_raw_pause(struct pd_http_raw *x);
void pd_http_raw_resume(struct pd_http_raw *x);
/* Flushes queued writes, then closes; on_close follows. */
void pd_http_raw_close(struct pd_http_raw *x);

/* ---- helpers ----------------------------------------------------------- */

/* "Not Found" for 404, "Unknown" for codes it does not know. */
const char *pd_http_reason(int status);

/* The error code a status gets by default ("not_found", ...). */
const char *pd_http_status_code(int status);

/*
 * Percent-decodes len bytes of in into out (room for len + 1 bytes),
 * NUL-terminated; plus_space turns '+' into ' ' (query strings). Fails
 * with -EINVAL on a bad escape or an encoded NUL. *outlen may be NULL.
 */
int pd_http_pct_decode(const char *in, size_t len, char *out,
                       size_t *outlen, bool plus_space);

/* Percent-encodes everything but unreserved characters; malloc'd. */
char *pd_http_pct_encode(const char *in, size_t len);

/*
 * Path matching: pattern segments are literal or "{name}", which captures
 * one non-empty path segment, percent-decoded. A trailing "/" matters.
 */
#define PD_HTTP_MAX_PARAMS 4
#define PD_HTTP_PARAM_MAX  256
struct pd_http_params {
    unsigned n;
    const char *name[PD_HTTP_MAX_PARAMS]; /* point into the pattern */
    size_t name_len[PD_HTTP_MAX_PARAMS];
    char value[PD_HTTP_MAX_PARAMS][PD_HTTP_PARAM_MAX];
};
bool pd_http_match(const char *pattern, const char *path,
                   struct pd_http_params *p);
/* Captured value by name, or NULL. */
const char *pd_http_param(const struct pd_http_params *p, const char *name);

struct pd_http_route {
    const char *method;  /* NULL matches any method */
    const char *pattern;
    void (*handler)(struct pd_http_req *r, const struct pd_http_params *p,
                    void *arg);
};

/*
 * Runs the first route whose method and pattern match. Without one it
 * answers 404, or 405 with Allow when the path matched another method, and
 * returns false.
 */
bool pd_http_dispatch(struct pd_http_req *r, const struct pd_http_route *rt,
                      size_t n, void *arg);

/*
 * Strict JSON bodies. A schema lists every field a body may have; an
 * unknown field, a missing required one or a wrong type fails with a
 * message naming the field ("field 'cpus': expected an integer").
 */
enum pd_json_type {
    PD_JSON_STRING,
    PD_JSON_INT,        /* integer */
    PD_JSON_UINT,       /* integer >= 0 */
    PD_JSON_BOOL,
    PD_JSON_OBJECT,     /* any object */
    PD_JSON_ARRAY,      /* any array */
    PD_JSON_STRINGS,    /* array of strings */
    PD_JSON_STRING_MAP, /* object whose values are strings */
    PD_JSON_ANY,
};

struct pd_json_field {
    const char *name;
    enum pd_json_type type;
    bool required;
};

/* Checks obj against fields; -EINVAL with the message in msg. */
int pd_json_check(const json_t *obj, const struct pd_json_field *fields,
                  size_t n, char *msg, size_t msglen);

/*
 * Parses body as one JSON object (duplicate keys refused) and checks it.
 * An empty body counts as {} when emptyok. *out gets a new reference.
 */
int pd_json_parse(const char *body, size_t len, bool emptyok,
                  const struct pd_json_field *fields, size_t n,
                  json_t **out, char *msg, size_t msglen);

/*
 * Reads the whole body (max as in pd_http_body_read), parses and checks
 * it. Any failure is answered (400 "invalid_json" or "invalid_argument",
 * 413, 408) and cb is not called; on success cb gets the object, which it
 * must json_decref.
 */
typedef void (*pd_http_json_cb)(struct pd_http_req *r, json_t *body,
                                void *arg);
int pd_http_read_json(struct pd_http_req *r, size_t max,
                      const struct pd_json_field *fields, size_t n,
                      pd_http_json_cb cb, void *arg);

#endif
