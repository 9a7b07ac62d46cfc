/*
 * A sandbox's traffic: exec, processes and files (DESIGN.md section 3),
 * routed from whichever scheduler took the request to the agent that holds
 * the sandbox, over agentc.c. No leader is involved: the sandbox's row and
 * its node's RPC address are local reads.
 *
 * Every route runs the same steps:
 *   1. sched_sandbox_lookup: the caller may see the sandbox (else 404);
 *   2. the input is checked strictly (a JSON schema, then the values);
 *      argv goes to the guest as data, and only `command` means a shell;
 *   3. sched_sandbox_ensure: a lost sandbox is placed again first (which
 *      may take a boot); such a response says so, with the header
 *      X-Paddock-Replaced: true and "replaced": true in JSON bodies and in
 *      an event stream's start event;
 *   4. one request to the agent, whose reply becomes the response.
 *
 * Streams keep backpressure end to end, so a scheduler never holds more
 * than about a window per stream: streamed output (exec, logs, file
 * reads) takes WINDOW grants in manual mode and grants only what the HTTP
 * client's socket took; an upload reads the HTTP body only while the agent
 * grants credit and the link's queue stays below its high water mark.
 *
 * Failure modes: a guest error becomes a status by its errno (ENOENT 404,
 * EISDIR/ENOTDIR/EINVAL 400, EEXIST/ENOTEMPTY/ESRCH 409, ENOSPC 507,
 * EACCES 403); an unreachable agent or a broken link is 503 with
 * Retry-After. Once a streamed response has started its status cannot
 * change: an event stream gets an `error` event, a file download is cut
 * short (Content-Length unmet, the connection closes). A client that goes
 * away cancels the agent request, which the agent passes to the guest
 * (an exec is killed, a read or a write is abandoned).
 */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <openssl/evp.h>

#include "common/log.h"
#include "proto/conn.h"
#include "proto/frame.h"
#include "proto/msgtypes.h"
#include "scheduler/sched.h"

#define EXEC_BODY_MAX (4u << 20)   /* stdin of 1 MiB, JSON-escaped */
#define SMALL_BODY_MAX (256u << 10)
#define STDIN_MAX (1u << 20)
#define ARGV_MAX 4096
#define ARG_MAX_BYTES (256u << 10) /* argv and command, summed */
#define ENV_MAX 256
#define LOGS_MAX (8u << 20)        /* collected logs, per stream */
/* Uploads go out in whole chunks: each frame costs the guest a round of
 * virtio-serial, a write and a WINDOW, so trickling the HTTP reads' 64 KiB
 * pieces made uploads several times slower than downloads. */
#define UPLOAD_CHUNK PD_CHUNK_MAX
#define UPLOAD_BUF_MAX (2 * UPLOAD_CHUNK) /* body held before pausing */
#define GRANT_BATCH (PD_STREAM_WINDOW / 8)
#define TIMEOUT_MAX_MS (24ull * 3600 * 1000)
#define PATH_MAX_LEN 4095
/* An idle event stream gets a comment this often: a client that went away
 * is noticed only by a failing write (its FIN alone reads as a
 * half-close), and then its exec or follow is cancelled in the guest. */
#define SSE_KEEPALIVE_MS 1000
/* An event stream whose first frame is slow (a follow of a silent
 * process) starts anyway after this, so the client sees its headers. */
#define SSE_START_MS 300

enum io_kind {
    IO_EXEC,
    IO_PROC_START,
    IO_PROC_LIST,
    IO_PROC_GET,
    IO_PROC_SIGNAL,
    IO_PROC_LOGS,
    IO_FILE_PUT,
    IO_FILE_GET,
    IO_FILE_DELETE,
    IO_FILE_LIST,
    IO_FILE_MKDIR,
    IO_FILE_RENAME,
};

struct obuf {
    char *data;
    size_t len, cap;
};

struct io {
    struct sched *s;
    struct pd_http_req *r;    /* NULL once the response is finished */
    struct sched_areq *q;     /* the agent request in flight, or NULL */
    enum io_kind kind;
    unsigned busy;            /* calls in progress that still use io */
    bool ensuring;            /* waiting for sched_sandbox_ensure */
    bool replaced;
    char sandbox[PD_ID_MAX + 1];
    char subject[PD_ID_MAX + 16]; /* "sandbox <id>", for logs */
    char node[PD_ID_MAX + 1];
    char rpc_addr[128];

    json_t *body;             /* checked JSON body (exec, start, mkdir..) */
    char *path;               /* files */
    char proc[PD_ID_MAX + 1];
    int64_t signal;           /* 0: the guest's default */
    unsigned mode;
    bool recursive, follow, stream, append;

    /* streamed responses */
    bool sse;
    uv_timer_t *keepalive;
    uint64_t held;            /* bytes consumed, not yet granted back */
    uint64_t size, sent;      /* file download */

    /* collected logs */
    struct obuf out, err;
    bool truncated;

    /* uploads */
    struct obuf up;
    size_t up_off;
    bool body_done, body_paused, eof_sent;
    uint64_t up_bytes;
};

static void io_ensured(void *data, int code, const char *message,
                       const struct fsm_sandbox *sb, bool replaced);

/* ---- small helpers ---------------------------------------------------- */

static int
obuf_add(struct obuf *b, const void *p, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        char *d;

        while (cap < b->len + n + 1)
            cap *= 2;
        d = realloc(b->data, cap);
        if (d == NULL)
            return -ENOMEM;
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

static char *
b64(const void *p, size_t n)
{
    char *s = malloc(4 * ((n + 2) / 3) + 1);

    if (s != NULL)
        EVP_EncodeBlock((unsigned char *)s, p, (int)n);
    return s;
}

/* A JSON string of bytes that may not be UTF-8: invalid sequences become
 * U+FFFD (the raw bytes go alongside in base64, see set_output). */
static json_t *
lossy_string(const char *p, size_t n, bool *lossy)
{
    json_t *j = json_stringn(p, n);
    struct obuf b = {0};

    *lossy = false;
    if (j != NULL || n == 0)
        return j != NULL ? j : json_string("");
    *lossy = true;
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)p[i];
        size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3
                   : (c >> 3) == 30 ? 4 : 0;
        json_t *t = len > 0 && i + len <= n ? json_stringn(p + i, len) : NULL;

        if (t != NULL) {
            obuf_add(&b, p + i, len);
            json_decref(t);
            i += len;
        } else {
            obuf_add(&b, "\xef\xbf\xbd", 3);
            i++;
        }
    }
    j = json_stringn(b.data != NULL ? b.data : "", b.len);
    free(b.data);
    return j;
}

static void
set_output(json_t *o, const char *key, const void *p, size_t n)
{
    bool lossy;
    char k64[32];

    json_object_set_new(o, key, lossy_string(p, n, &lossy));
    if (lossy) {
        char *s = b64(p, n);

        snprintf(k64, sizeof(k64), "%s_base64", key);
        json_object_set_new(o, k64, json_string(s != NULL ? s : ""));
        free(s);
    }
}

/* msgpack to JSON, for the guest's process maps. */
static json_t *
mp_json(const msgpack_object *o)
{
    json_t *v;

    switch (o->type) {
    case MSGPACK_OBJECT_MAP:
        v = json_object();
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            const msgpack_object *k = &o->via.map.ptr[i].key;
            char key[64];

            if (k->type != MSGPACK_OBJECT_STR || k->via.str.size >= 64)
                continue;
            memcpy(key, k->via.str.ptr, k->via.str.size);
            key[k->via.str.size] = '\0';
            json_object_set_new(v, key, mp_json(&o->via.map.ptr[i].val));
        }
        return v;
    case MSGPACK_OBJECT_ARRAY:
        v = json_array();
        for (uint32_t i = 0; i < o->via.array.size; i++)
            json_array_append_new(v, mp_json(&o->via.array.ptr[i]));
        return v;
    case MSGPACK_OBJECT_STR:
    case MSGPACK_OBJECT_BIN: {
        bool lossy;

        return lossy_string(o->via.str.ptr, o->via.str.size, &lossy);
    }
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
        return json_integer((json_int_t)o->via.u64);
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
        return json_integer(o->via.i64);
    case MSGPACK_OBJECT_BOOLEAN:
        return json_boolean(o->via.boolean);
    default:
        return json_null();
    }
}

/* The guest's process map in the API's shape (cli/README.md). */
static json_t *
proc_json(const msgpack_object *o)
{
    json_t *g = mp_json(o), *p = json_object();
    json_t *running = json_object_get(g, "running");
    json_int_t code = json_integer_value(json_object_get(g, "exit_code"));
    json_int_t sig = json_integer_value(json_object_get(g, "signal"));
    json_int_t ended = json_integer_value(json_object_get(g, "ended_ms"));
    bool live = json_is_true(running);

    json_object_set(p, "id", json_object_get(g, "proc"));
    json_object_set(p, "pid", json_object_get(g, "pid"));
    json_object_set(p, "argv", json_object_get(g, "argv"));
    json_object_set_new(p, "running", json_boolean(live));
    json_object_set_new(p, "exit_code", live || code < 0 ? json_null()
                                                         : json_integer(code));
    json_object_set_new(p, "signal", live || sig == 0 ? json_null()
                                                      : json_integer(sig));
    json_object_set(p, "started_at", json_object_get(g, "started_ms"));
    json_object_set_new(p, "ended_at", live || ended <= 0
                                           ? json_null()
                                           : json_integer(ended));
    json_decref(g);
    return p;
}

/* ---- the io object ---------------------------------------------------- */

static void
stop_keepalive(struct io *io)
{
    if (io->keepalive != NULL) {
        uv_close((uv_handle_t *)io->keepalive, (uv_close_cb)free);
        io->keepalive = NULL;
    }
}

static void
io_free(struct io *io)
{
    stop_keepalive(io);
    json_decref(io->body);
    free(io->path);
    free(io->out.data);
    free(io->err.data);
    free(io->up.data);
    free(io);
}

static void
io_maybe_free(struct io *io)
{
    if (io->r == NULL && io->q == NULL && !io->ensuring && io->busy == 0)
        io_free(io);
}

/* The response is done (or the client gone): stop the agent side too. */
static void
io_done(struct io *io)
{
    stop_keepalive(io);
    if (io->q != NULL) {
        sched_areq_cancel(io->q);
        io->q = NULL;
    }
    io->r = NULL;
}

static void
add_replaced(struct io *io)
{
    if (io->replaced && io->r != NULL)
        pd_http_add_header(io->r, "X-Paddock-Replaced", "true");
}

static void
respond_json(struct io *io, int status, json_t *j)
{
    struct pd_http_req *r = io->r;

    if (r == NULL) {
        json_decref(j);
        return;
    }
    if (io->replaced)
        json_object_set_new(j, "replaced", json_true());
    add_replaced(io);
    io_done(io);
    pd_http_respond_json(r, status, j);
}

static void
io_fail(struct io *io, int status, const char *code, const char *fmt, ...)
    PD_PRINTF(4, 5);

/* Answers an error in whatever shape the response still allows. */
static void
io_fail(struct io *io, int status, const char *code, const char *fmt, ...)
{
    struct pd_http_req *r = io->r;
    char msg[512];
    va_list ap;

    if (r == NULL)
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    io_done(io);
    if (io->sse) {
        json_t *j = json_pack("{s:{s:s,s:s}}", "error", "code", code,
                              "message", msg);
        char *s = json_dumps(j, JSON_COMPACT);

        pd_http_sse_event(r, "error", s, strlen(s));
        free(s);
        json_decref(j);
        pd_http_end(r);
        return;
    }
    if (pd_http_started(r)) {
        /* A download cut short: the unmet length closes the connection,
         * so the client cannot mistake it for the whole file. */
        pd_info(io->subject, "download of %s cut short: %s", io->path, msg);
        pd_http_end(r);
        return;
    }
    if (status == 503)
        pd_http_add_header(r, "Retry-After", "1");
    pd_http_respond_error(r, status, code, "%s", msg);
}

/* A guest or agent errno as an HTTP status and error code. */
static void
errno_status(int err, const char *msg, int *status, const char **code)
{
    switch (err) {
    case ENOENT:
        /* The agent's own ENOENT: the sandbox is not (yet) on the node. */
        if (strncmp(msg, "no sandbox ", 11) == 0) {
            *status = 503, *code = "unavailable";
            return;
        }
        *status = 404, *code = "not_found";
        return;
    case EISDIR: case ENOTDIR: case EINVAL: case ENAMETOOLONG: case ELOOP:
    case E2BIG: case ENOTSUP: case ENOEXEC: case EBADF: case EXDEV:
    case EFAULT: case EPROTO: case ERANGE:
        *status = 400, *code = "invalid_argument";
        return;
    case EEXIST: case ENOTEMPTY: case ESRCH: case EBUSY: case ETXTBSY:
        *status = 409, *code = "conflict";
        return;
    case ENOSPC: case EDQUOT:
        *status = 507, *code = "no_capacity";
        return;
    case EFBIG:
        *status = 413, *code = "invalid_argument";
        return;
    case EACCES: case EPERM: case EROFS:
        *status = 403, *code = "forbidden";
        return;
    case EAGAIN: case ENOTCONN: case ECONNRESET: case ECONNREFUSED:
    case ETIMEDOUT: case EHOSTUNREACH: case ESHUTDOWN: case ENOBUFS:
    case ENOMEM: case ECANCELED: case EPIPE: case ENETUNREACH:
        *status = 503, *code = "unavailable";
        return;
    default:
        *status = 500, *code = "internal";
        return;
    }
}

/* on_end with an error: ERROR from the agent (m set) or a broken link. */
static void
fail_from_agent(struct io *io, int status, const struct pd_msg *m)
{
    char msg[400] = "";
    const char *code;
    int http;

    io->q = NULL;
    if (m == NULL) {
        pd_info(io->subject, "node %s (%s) unreachable: %s", io->node,
                io->rpc_addr, strerror(-status));
        io_fail(io, 503, "unavailable", "node %s unreachable: %s",
                io->node, strerror(-status));
        return;
    }
    pd_msg_cstr(m, "message", msg, sizeof(msg));
    errno_status(-status, msg, &http, &code);
    if (http == 500)
        pd_warn(io->subject, "agent error %s: %s", pd_errno_name(-status),
                msg);
    io_fail(io, http, code, "%s", msg[0] ? msg : strerror(-status));
}

static void
io_abort(struct pd_http_req *r, void *arg)
{
    struct io *io = arg;

    io_done(io);
    pd_http_end(r);
    io_maybe_free(io);
}

static struct io *
io_new(struct sched_call *c, struct pd_http_req *r,
       const struct pd_http_params *p, enum io_kind kind)
{
    struct fsm_sandbox sb;
    const char *id = pd_http_param(p, "id");
    struct io *io;

    if (sched_sandbox_lookup(c, r, id != NULL ? id : "", &sb) != 0)
        return NULL;
    fsm_sandbox_clear(&sb);
    io = calloc(1, sizeof(*io));
    if (io == NULL) {
        pd_http_respond_error(r, 503, "unavailable", "out of memory");
        return NULL;
    }
    io->s = c->s;
    io->r = r;
    io->kind = kind;
    pd_strlcpy(io->sandbox, id, sizeof(io->sandbox));
    snprintf(io->subject, sizeof(io->subject), "sandbox %s", io->sandbox);
    pd_http_req_set_data(r, io);
    pd_http_on_abort(r, io_abort);
    return io;
}

/* Step 3: make sure the sandbox runs, then io_ensured sends. */
static void
io_route(struct io *io)
{
    io->ensuring = true;
    io->busy++;
    sched_sandbox_ensure(io->s, io->sandbox, io_ensured, io);
    io->busy--;
    io_maybe_free(io);
}

/* ---- request building ------------------------------------------------- */

static void
pack_jstr(struct pd_enc *e, json_t *s)
{
    msgpack_pack_str_with_body(&e->pk, json_string_value(s),
                               json_string_length(s));
}

/* argv or command, cwd and env from a checked body. */
static void
enc_command(struct pd_enc *e, json_t *b)
{
    json_t *argv = json_object_get(b, "argv"), *v;
    json_t *env = json_object_get(b, "env");
    const char *k;
    size_t i;

    if (argv != NULL) {
        pd_enc_key(e, "argv");
        msgpack_pack_array(&e->pk, json_array_size(argv));
        json_array_foreach(argv, i, v)
            pack_jstr(e, v);
    } else {
        pd_enc_key(e, "command");
        pack_jstr(e, json_object_get(b, "command"));
    }
    if ((v = json_object_get(b, "cwd")) != NULL) {
        pd_enc_key(e, "cwd");
        pack_jstr(e, v);
    }
    if (env != NULL) {
        pd_enc_key(e, "env");
        msgpack_pack_map(&e->pk, json_object_size(env));
        json_object_foreach(env, k, v)
        {
            msgpack_pack_str_with_body(&e->pk, k, strlen(k));
            pack_jstr(e, v);
        }
    }
}

static bool
has_nul(json_t *s)
{
    return strlen(json_string_value(s)) != json_string_length(s);
}

/* The values a schema cannot check: one of argv and command, sizes, no
 * NUL bytes (the guest gets C strings), env names. */
static int
check_command(json_t *b, char *msg, size_t len)
{
    json_t *argv = json_object_get(b, "argv"), *cmd, *env, *v;
    size_t i, total = 0;
    const char *k;

    cmd = json_object_get(b, "command");
    if ((argv == NULL) == (cmd == NULL)) {
        snprintf(msg, len, "give exactly one of 'argv' (an array of "
                 "strings) and 'command' (a shell string)");
        return -EINVAL;
    }
    if (argv != NULL) {
        if (json_array_size(argv) == 0 || json_array_size(argv) > ARGV_MAX) {
            snprintf(msg, len, "field 'argv': want 1 to %d strings",
                     ARGV_MAX);
            return -EINVAL;
        }
        json_array_foreach(argv, i, v)
        {
            total += json_string_length(v);
            if (has_nul(v)) {
                snprintf(msg, len, "field 'argv': entry %zu holds a NUL "
                         "byte", i);
                return -EINVAL;
            }
        }
        if (json_string_length(json_array_get(argv, 0)) == 0) {
            snprintf(msg, len, "field 'argv': the program name is empty");
            return -EINVAL;
        }
    } else {
        total = json_string_length(cmd);
        if (total == 0 || has_nul(cmd)) {
            snprintf(msg, len, "field 'command': want a non-empty string "
                     "without NUL bytes");
            return -EINVAL;
        }
    }
    if (total > ARG_MAX_BYTES) {
        snprintf(msg, len, "the command is longer than %u bytes",
                 ARG_MAX_BYTES);
        return -EINVAL;
    }
    v = json_object_get(b, "cwd");
    if (v != NULL && (json_string_length(v) == 0 ||
                      json_string_length(v) > PATH_MAX_LEN || has_nul(v))) {
        snprintf(msg, len, "field 'cwd': want a path");
        return -EINVAL;
    }
    env = json_object_get(b, "env");
    if (env != NULL && json_object_size(env) > ENV_MAX) {
        snprintf(msg, len, "field 'env': at most %d variables", ENV_MAX);
        return -EINVAL;
    }
    json_object_foreach(env, k, v)
    {
        if (k[0] == '\0' || strchr(k, '=') != NULL || strlen(k) > 256 ||
            has_nul(v) || json_string_length(v) > 4096) {
            snprintf(msg, len, "field 'env': bad variable '%.64s' (names "
                     "are non-empty without '=', values at most 4096 "
                     "bytes)", k);
            return -EINVAL;
        }
    }
    return 0;
}

/* ---- reply callbacks -------------------------------------------------- */

/*
 * Grants consumed bytes back in batches of GRANT_BATCH (each WINDOW costs
 * the guest a frame; holding less than an eighth of the window never
 * stalls it), and not while the HTTP client is behind: io_drain grants
 * once its queue drained.
 */
static void
grant_or_hold(struct io *io, size_t n)
{
    if (io->q == NULL)
        return;
    io->held += n;
    if (io->held < GRANT_BATCH ||
        (io->r != NULL && pd_http_queued(io->r) >= PD_HTTP_HIGH_WATER))
        return;
    sched_areq_grant(io->q, io->held);
    io->held = 0;
}

static void
io_drain(struct pd_http_req *r, void *arg)
{
    struct io *io = arg;

    (void)r;
    if (io->held > 0 && io->q != NULL) {
        sched_areq_grant(io->q, io->held);
        io->held = 0;
    }
}

static void
sse_json(struct io *io, const char *event, json_t *j)
{
    char *s = json_dumps(j, JSON_COMPACT);

    if (s != NULL && io->r != NULL)
        pd_http_sse_event(io->r, event, s, strlen(s));
    free(s);
    json_decref(j);
}

static void
start_sse(struct io *io)
{
    if (io->sse || io->r == NULL)
        return;
    add_replaced(io);
    pd_http_sse_start(io->r);
    pd_http_on_drain(io->r, io_drain);
    io->sse = true;
}

static void
on_keepalive(uv_timer_t *t)
{
    struct io *io = t->data;

    if (io->r == NULL)
        return;
    if (!io->sse)
        start_sse(io);
    else if (pd_http_queued(io->r) == 0)
        pd_http_sse_comment(io->r, "keep-alive");
}

/* For the event streams: starts them late, keeps them alive. */
static void
arm_keepalive(struct io *io)
{
    io->keepalive = malloc(sizeof(*io->keepalive));
    if (io->keepalive == NULL)
        return;
    uv_timer_init(io->s->loop, io->keepalive);
    io->keepalive->data = io;
    uv_timer_start(io->keepalive, on_keepalive, SSE_START_MS,
                   SSE_KEEPALIVE_MS);
}

/* Ends a streamed response that completed. */
static void
end_stream(struct io *io)
{
    struct pd_http_req *r = io->r;

    stop_keepalive(io);
    if (r != NULL) {
        io->r = NULL;
        pd_http_end(r);
    }
}

/* STDOUT / STDERR as an event with base64 data. */
static void
sse_output(struct io *io, const struct pd_msg *m)
{
    const void *p;
    size_t n = 0;
    char *s;

    if (pd_msg_bin(m, "data", &p, &n) != 0 || n == 0)
        return;
    s = b64(p, n);
    if (s != NULL) {
        sse_json(io, m->type == PD_MSG_STDERR ? "stderr" : "stdout",
                 json_pack("{s:s}", "data", s));
        free(s);
    }
    grant_or_hold(io, n);
}

static json_t *
exit_json(const struct pd_msg *m)
{
    int64_t code = -1, sig = 0;
    uint64_t dur = 0;
    bool timed_out = false, truncated = false;
    json_t *j;

    pd_msg_i64(m, "exit_code", &code);
    pd_msg_i64(m, "signal", &sig);
    pd_msg_u64(m, "duration_ms", &dur);
    pd_msg_bool(m, "timed_out", &timed_out);
    pd_msg_bool(m, "truncated", &truncated);
    j = json_pack("{s:I,s:b,s:b}", "duration_ms", (json_int_t)dur,
                  "truncated", truncated, "timed_out", timed_out);
    json_object_set_new(j, "exit_code", code >= 0 ? json_integer(code)
                                                  : json_null());
    json_object_set_new(j, "signal", sig > 0 ? json_integer(sig)
                                             : json_null());
    return j;
}

static void
exec_frame(struct sched_areq *q, const struct pd_msg *m, void *data)
{
    struct io *io = data;
    uint64_t pid = 0;
    json_t *j;

    (void)q;
    if (io->r == NULL || !io->stream)
        return;
    switch (m->type) {
    case PD_MSG_EXEC_START:
        pd_msg_u64(m, "pid", &pid);
        start_sse(io);
        j = json_pack("{s:I}", "pid", (json_int_t)pid);
        if (io->replaced)
            json_object_set_new(j, "replaced", json_true());
        sse_json(io, "start", j);
        return;
    case PD_MSG_STDOUT:
    case PD_MSG_STDERR:
        start_sse(io);
        sse_output(io, m);
        return;
    default:
        return;
    }
}

static void
exec_end(struct sched_areq *q, int status, const struct pd_msg *m,
         void *data)
{
    struct io *io = data;
    const void *p;
    size_t n;
    json_t *j;

    (void)q;
    if (status != 0 || m == NULL || m->type != PD_MSG_EXIT) {
        fail_from_agent(io, status != 0 ? status : -EPROTO, m);
        io_maybe_free(io);
        return;
    }
    io->q = NULL;
    j = exit_json(m);
    if (io->stream) {
        start_sse(io);
        sse_json(io, "exit", j);
        end_stream(io);
    } else {
        n = 0;
        p = "";
        pd_msg_bin(m, "stdout", &p, &n);
        set_output(j, "stdout", p, n);
        n = 0;
        p = "";
        pd_msg_bin(m, "stderr", &p, &n);
        set_output(j, "stderr", p, n);
        respond_json(io, 200, j);
    }
    io_maybe_free(io);
}

/* Replies that are one OK: the JSON comes from a per-kind builder. */
static void
ok_frame(struct sched_areq *q, const struct pd_msg *m, void *data)
{
    (void)q;
    (void)m;
    (void)data;
}

static json_t *
list_json(const struct pd_msg *m)
{
    const msgpack_object_array *a;
    json_t *entries = json_array();
    bool truncated = false;

    if (pd_msg_array(m, "entries", &a) == 0) {
        for (uint32_t i = 0; i < a->size; i++) {
            json_t *g = mp_json(&a->ptr[i]), *e = json_object();
            const char *type = json_string_value(json_object_get(g, "type"));

            json_object_set(e, "name", json_object_get(g, "name"));
            json_object_set_new(e, "type", json_string(
                type != NULL && strcmp(type, "symlink") == 0 ? "link"
                : type != NULL ? type : "other"));
            json_object_set(e, "size", json_object_get(g, "size"));
            json_object_set(e, "mode", json_object_get(g, "mode"));
            json_object_set(e, "mtime", json_object_get(g, "mtime_ms"));
            json_array_append_new(entries, e);
            json_decref(g);
        }
    }
    pd_msg_bool(m, "truncated", &truncated);
    return json_pack("{s:o,s:b}", "entries", entries, "truncated",
                     truncated);
}

static void
ok_end(struct sched_areq *q, int status, const struct pd_msg *m, void *data)
{
    struct io *io = data;
    const msgpack_object *o;
    const msgpack_object_array *a;
    json_t *j = NULL, *list;
    uint64_t u = 0;
    char name[PD_ID_MAX + 1] = "";

    (void)q;
    if (status != 0 || m == NULL) {
        fail_from_agent(io, status != 0 ? status : -EPROTO, m);
        io_maybe_free(io);
        return;
    }
    io->q = NULL;
    switch (io->kind) {
    case IO_PROC_START:
        pd_msg_cstr(m, "proc", name, sizeof(name));
        pd_msg_u64(m, "pid", &u);
        j = json_pack("{s:s,s:I}", "id", name, "pid", (json_int_t)u);
        respond_json(io, 201, j);
        break;
    case IO_PROC_LIST:
        list = json_array();
        if (pd_msg_array(m, "procs", &a) == 0)
            for (uint32_t i = 0; i < a->size; i++)
                json_array_append_new(list, proc_json(&a->ptr[i]));
        respond_json(io, 200, json_pack("{s:o}", "processes", list));
        break;
    case IO_PROC_GET:
        o = pd_msg_field(m, "proc");
        if (o == NULL || o->type != MSGPACK_OBJECT_MAP) {
            io_fail(io, 502, "internal", "the agent sent no process");
            break;
        }
        respond_json(io, 200, proc_json(o));
        break;
    case IO_PROC_SIGNAL:
        j = json_pack("{s:s}", "id", io->proc);
        json_object_set_new(j, "signal", io->signal > 0
                                             ? json_integer(io->signal)
                                             : json_integer(SIGTERM));
        respond_json(io, 200, j);
        break;
    case IO_FILE_PUT:
        pd_msg_u64(m, "size", &u);
        respond_json(io, 200, json_pack("{s:s,s:I}", "path", io->path,
                                        "size", (json_int_t)u));
        break;
    case IO_FILE_DELETE:
        respond_json(io, 200, json_pack("{s:s,s:b}", "path", io->path,
                                        "deleted", 1));
        break;
    case IO_FILE_LIST:
        j = list_json(m);
        json_object_set_new(j, "path", json_string(io->path));
        respond_json(io, 200, j);
        break;
    case IO_FILE_MKDIR:
        respond_json(io, 200, json_pack("{s:O}", "path",
                                        json_object_get(io->body, "path")));
        break;
    case IO_FILE_RENAME:
        respond_json(io, 200, json_pack("{s:O,s:O}", "from",
                                        json_object_get(io->body, "from"),
                                        "to",
                                        json_object_get(io->body, "to")));
        break;
    default:
        io_fail(io, 500, "internal", "unexpected reply");
        break;
    }
    io_maybe_free(io);
}

/* Logs: collected into JSON, or followed as events. */
static void
logs_frame(struct sched_areq *q, const struct pd_msg *m, void *data)
{
    struct io *io = data;
    struct obuf *b;
    const void *p;
    size_t n = 0;

    (void)q;
    if (m->type != PD_MSG_STDOUT && m->type != PD_MSG_STDERR)
        return;
    if (io->follow) {
        start_sse(io);
        sse_output(io, m);
        return;
    }
    if (pd_msg_bin(m, "data", &p, &n) != 0)
        return;
    b = m->type == PD_MSG_STDERR ? &io->err : &io->out;
    if (b->len + n > LOGS_MAX || obuf_add(b, p, n) != 0)
        io->truncated = true;
    grant_or_hold(io, n);
}

static void
logs_end(struct sched_areq *q, int status, const struct pd_msg *m,
         void *data)
{
    struct io *io = data;
    const msgpack_object *o;
    json_t *j, *pj = NULL;

    (void)q;
    if (status != 0 || m == NULL) {
        fail_from_agent(io, status != 0 ? status : -EPROTO, m);
        io_maybe_free(io);
        return;
    }
    io->q = NULL;
    o = pd_msg_field(m, "proc");
    if (o != NULL && o->type == MSGPACK_OBJECT_MAP)
        pj = proc_json(o);
    if (io->follow) {
        start_sse(io);
        j = json_object();
        if (pj != NULL) {
            json_object_set(j, "exit_code", json_object_get(pj, "exit_code"));
            json_object_set(j, "signal", json_object_get(pj, "signal"));
            json_object_set(j, "running", json_object_get(pj, "running"));
        }
        sse_json(io, "exit", j);
        end_stream(io);
    } else {
        j = json_object();
        set_output(j, "stdout", io->out.data ? io->out.data : "",
                   io->out.len);
        set_output(j, "stderr", io->err.data ? io->err.data : "",
                   io->err.len);
        json_object_set_new(j, "truncated", json_boolean(io->truncated));
        if (pj != NULL) {
            json_object_set(j, "running", json_object_get(pj, "running"));
            json_object_set(j, "exit_code",
                            json_object_get(pj, "exit_code"));
        }
        respond_json(io, 200, j);
    }
    json_decref(pj);
    io_maybe_free(io);
}

/* Download: OK {size, mode} starts the response, DATA fills it. */
static void
read_frame(struct sched_areq *q, const struct pd_msg *m, void *data)
{
    struct io *io = data;
    const void *p;
    size_t n = 0;
    char len[32];

    (void)q;
    if (io->r == NULL)
        return;
    if (m->type == PD_MSG_OK) {
        pd_msg_u64(m, "size", &io->size);
        add_replaced(io);
        snprintf(len, sizeof(len), "%llu", (unsigned long long)io->size);
        pd_http_add_header(io->r, "X-Paddock-Size", len);
        pd_http_start(io->r, 200, "application/octet-stream",
                      (int64_t)io->size);
        pd_http_on_drain(io->r, io_drain);
        return;
    }
    if (m->type != PD_MSG_DATA || pd_msg_bin(m, "data", &p, &n) != 0)
        return;
    /* The length was promised at the stat: a file that grew since is cut
     * there, and a device that never ends cannot stream forever. */
    if (n > io->size - io->sent)
        n = (size_t)(io->size - io->sent);
    if (n > 0)
        pd_http_write(io->r, p, n);
    io->sent += n;
    sched_metrics_inc(io->s, "file_bytes_read", n);
    if (io->sent >= io->size) {
        struct pd_http_req *r = io->r;

        /* Cancelled, so no on_end follows: free here. */
        io_done(io);
        pd_http_end(r);
        io_maybe_free(io);
        return;
    }
    grant_or_hold(io, n);
}

static void
read_end(struct sched_areq *q, int status, const struct pd_msg *m,
         void *data)
{
    struct io *io = data;

    (void)q;
    if (status != 0) {
        fail_from_agent(io, status, m);
    } else {
        io->q = NULL;
        if (io->r != NULL) {
            struct pd_http_req *r = io->r;

            /* A file that shrank since its stat ends short: the unmet
             * Content-Length closes the connection. */
            io->r = NULL;
            pd_http_end(r);
        }
    }
    io_maybe_free(io);
}

/* ---- uploads ---------------------------------------------------------- */

static void upload_pump(struct io *io);

static void
up_data(struct pd_http_req *r, const char *data, size_t len, void *arg)
{
    struct io *io = arg;

    (void)r;
    if (obuf_add(&io->up, data, len) != 0) {
        io_fail(io, 503, "unavailable", "out of memory");
        return;
    }
    io->up_bytes += len;
    sched_metrics_inc(io->s, "file_bytes_written", len);
    io->busy++;
    upload_pump(io);
    io->busy--;
    io_maybe_free(io);
}

static void
up_end(struct pd_http_req *r, int err, void *arg)
{
    struct io *io = arg;

    io->body_done = true;
    if (err != 0) {
        /* The client went away or sent a broken body: abandon the write
         * (the guest removes its temporary file). */
        pd_info(io->subject, "upload of %s abandoned after %llu bytes: %s",
                io->path, (unsigned long long)io->up_bytes, strerror(-err));
        io_done(io);
        pd_http_fail(r, err);
        io_maybe_free(io);
        return;
    }
    io->busy++;
    upload_pump(io);
    io->busy--;
    io_maybe_free(io);
}

static void
send_data(struct io *io, const void *p, size_t n, bool eof)
{
    struct pd_enc e;

    pd_enc_begin(&e, PD_MSG_DATA, sched_areq_id(io->q));
    pd_enc_bin(&e, "data", p, n);
    pd_enc_bool(&e, "eof", eof);
    sched_areq_send(io->q, &e);
}

/*
 * Moves buffered body bytes to the agent within its credit and the link's
 * queue, and reads more of the body only while little is buffered.
 */
static void
upload_pump(struct io *io)
{
    if (io->q == NULL || io->r == NULL)
        return;
    while (io->up_off < io->up.len &&
           sched_areq_queued(io->q) < PD_CONN_HIGH_WATER) {
        size_t n = io->up.len - io->up_off;

        if (n > UPLOAD_CHUNK)
            n = UPLOAD_CHUNK;
        /* A part chunk only at the end; and wait for credit for all of
         * it (the credit comes back whole once the guest wrote). */
        if ((n < UPLOAD_CHUNK && !io->body_done) ||
            n > sched_areq_credit(io->q))
            break;
        send_data(io, io->up.data + io->up_off, n, false);
        if (io->q == NULL)
            return;
        io->up_off += n;
    }
    if (io->up_off == io->up.len) {
        io->up_off = io->up.len = 0;
        if (io->body_done && !io->eof_sent) {
            io->eof_sent = true;
            send_data(io, "", 0, true);
        }
    } else if (io->up_off > io->up.len / 2) {
        memmove(io->up.data, io->up.data + io->up_off,
                io->up.len - io->up_off);
        io->up.len -= io->up_off;
        io->up_off = 0;
    }
    if (io->body_done || io->r == NULL)
        return;
    if (io->up.len - io->up_off >= UPLOAD_BUF_MAX) {
        if (!io->body_paused) {
            io->body_paused = true;
            pd_http_body_pause(io->r);
        }
    } else if (io->body_paused) {
        io->body_paused = false;
        pd_http_body_resume(io->r);
    }
}

static void
up_writable(struct sched_areq *q, void *data)
{
    struct io *io = data;

    (void)q;
    /* Resuming the body may deliver its end at once, which finishes the
     * request: io must outlive the pump. */
    io->busy++;
    upload_pump(io);
    io->busy--;
    io_maybe_free(io);
}

static void
up_frame(struct sched_areq *q, const struct pd_msg *m, void *data)
{
    (void)q;
    (void)m;
    (void)data;
}

static void
start_upload(struct io *io)
{
    static const struct pd_http_body_stream_cb cb = {up_data, up_end};

    if (pd_http_body_stream(io->r, 0, &cb, io) != 0)
        io_fail(io, 500, "internal", "the request body was already read");
}

/* ---- sending ---------------------------------------------------------- */

static const struct sched_areq_cb exec_cb = {exec_frame, exec_end, NULL};
static const struct sched_areq_cb ok_cb = {ok_frame, ok_end, NULL};
static const struct sched_areq_cb logs_cb = {logs_frame, logs_end, NULL};
static const struct sched_areq_cb read_cb = {read_frame, read_end, NULL};
static const struct sched_areq_cb write_cb = {up_frame, ok_end, up_writable};

static unsigned
kind_type(enum io_kind k)
{
    static const unsigned t[] = {
        [IO_EXEC] = PD_MSG_EXEC,
        [IO_PROC_START] = PD_MSG_PROC_START,
        [IO_PROC_LIST] = PD_MSG_PROC_LIST,
        [IO_PROC_GET] = PD_MSG_PROC_GET,
        [IO_PROC_SIGNAL] = PD_MSG_PROC_SIGNAL,
        [IO_PROC_LOGS] = PD_MSG_PROC_LOGS,
        [IO_FILE_PUT] = PD_MSG_FILE_WRITE,
        [IO_FILE_GET] = PD_MSG_FILE_READ,
        [IO_FILE_DELETE] = PD_MSG_FILE_DELETE,
        [IO_FILE_LIST] = PD_MSG_FILE_LIST,
        [IO_FILE_MKDIR] = PD_MSG_FILE_MKDIR,
        [IO_FILE_RENAME] = PD_MSG_FILE_RENAME,
    };

    return t[k];
}

static void
enc_fields(struct io *io, struct pd_enc *e)
{
    json_t *b = io->body, *v;

    switch (io->kind) {
    case IO_EXEC:
        enc_command(e, b);
        pd_enc_bool(e, "stream", io->stream);
        if ((v = json_object_get(b, "stdin")) != NULL)
            pd_enc_bin(e, "stdin", json_string_value(v),
                       json_string_length(v));
        if ((v = json_object_get(b, "timeout_ms")) != NULL)
            pd_enc_u64(e, "timeout_ms", (uint64_t)json_integer_value(v));
        else if (io->s->cfg.exec_timeout_ms > 0)
            pd_enc_u64(e, "timeout_ms", io->s->cfg.exec_timeout_ms);
        break;
    case IO_PROC_START:
        enc_command(e, b);
        if ((v = json_object_get(b, "id")) != NULL)
            pd_enc_str(e, "proc", json_string_value(v));
        break;
    case IO_PROC_GET:
        pd_enc_str(e, "proc", io->proc);
        break;
    case IO_PROC_SIGNAL:
        pd_enc_str(e, "proc", io->proc);
        if (io->signal > 0)
            pd_enc_i64(e, "signal", io->signal);
        break;
    case IO_PROC_LOGS:
        pd_enc_str(e, "proc", io->proc);
        pd_enc_bool(e, "follow", io->follow);
        break;
    case IO_FILE_PUT:
        pd_enc_str(e, "path", io->path);
        pd_enc_u64(e, "mode", io->mode);
        pd_enc_bool(e, "append", io->append);
        break;
    case IO_FILE_GET:
        pd_enc_str(e, "path", io->path);
        break;
    case IO_FILE_DELETE:
    case IO_FILE_LIST:
        pd_enc_str(e, "path", io->path);
        pd_enc_bool(e, "recursive", io->recursive);
        break;
    case IO_FILE_MKDIR:
        pd_enc_str(e, "path", json_string_value(json_object_get(b, "path")));
        pd_enc_bool(e, "parents",
                    json_is_true(json_object_get(b, "parents")));
        v = json_object_get(b, "mode");
        pd_enc_u64(e, "mode", v != NULL ? (uint64_t)json_integer_value(v)
                                        : 0755);
        break;
    case IO_FILE_RENAME:
        pd_enc_str(e, "from", json_string_value(json_object_get(b, "from")));
        pd_enc_str(e, "to", json_string_value(json_object_get(b, "to")));
        break;
    default:
        break;
    }
}

static void
io_send(struct io *io)
{
    const struct sched_areq_cb *cb = &ok_cb;
    struct sched_areq *q;
    struct pd_enc e;

    switch (io->kind) {
    case IO_EXEC: cb = &exec_cb; break;
    case IO_PROC_LOGS: cb = &logs_cb; break;
    case IO_FILE_GET: cb = &read_cb; break;
    case IO_FILE_PUT: cb = &write_cb; break;
    default: break;
    }
    pd_enc_begin(&e, kind_type(io->kind), 0);
    pd_enc_str(&e, "sandbox", io->sandbox);
    enc_fields(io, &e);
    io->busy++;
    q = sched_agentc_send(io->s, io->rpc_addr, &e, cb, io);
    io->busy--;
    if (q == NULL)
        return; /* on_end already answered */
    io->q = q;
    if (cb == &exec_cb || cb == &logs_cb || cb == &read_cb)
        sched_areq_manual_window(q);
    if ((io->kind == IO_EXEC && io->stream) ||
        (io->kind == IO_PROC_LOGS && io->follow))
        arm_keepalive(io);
    if (io->kind == IO_FILE_PUT)
        start_upload(io);
}

static void
io_ensured(void *data, int code, const char *message,
           const struct fsm_sandbox *sb, bool replaced)
{
    struct io *io = data;
    struct fsm_node n;
    int rv;

    io->ensuring = false;
    io->replaced = replaced;
    if (io->r == NULL) {
        io_maybe_free(io);
        return;
    }
    if (code != 0 || sb == NULL) {
        int status = 503;
        const char *ecode = "unavailable";

        /* lifecycle.c's verdicts: stopped (ENOTCONN) or failed (EIO) are
         * the user's to act on; the rest pass with a retry. */
        if (code == -ENOENT)
            status = 404, ecode = "not_found";
        else if (code == -ENOTCONN || code == -EIO)
            status = 409, ecode = "conflict";
        else if (code == -ENOSPC)
            ecode = "no_capacity";
        else if (code == -EINVAL)
            status = 400, ecode = "invalid_argument";
        io_fail(io, status, ecode, "%s", message != NULL && message[0]
                                             ? message
                                             : strerror(code ? -code : EIO));
        io_maybe_free(io);
        return;
    }
    pd_strlcpy(io->node, sb->node, sizeof(io->node));
    rv = sb->node[0] != '\0' ? fsm_node_get(io->s->fsm, sb->node, &n)
                             : -ENOENT;
    if (rv != 0 || n.rpc_addr[0] == '\0') {
        if (rv == 0)
            fsm_node_clear(&n);
        io_fail(io, 503, "unavailable", "sandbox %s has no reachable node "
                "yet", io->sandbox);
        io_maybe_free(io);
        return;
    }
    pd_strlcpy(io->rpc_addr, n.rpc_addr, sizeof(io->rpc_addr));
    fsm_node_clear(&n);
    if (replaced) {
        sched_metrics_inc(io->s, "sandboxes_replaced_on_use", 1);
        pd_info(io->subject, "was lost; placed again on node %s before "
                "routing", io->node);
    }
    io_send(io);
    io_maybe_free(io);
}

/* ---- input ------------------------------------------------------------ */

static const struct pd_json_field exec_fields[] = {
    {"argv", PD_JSON_STRINGS, false},
    {"command", PD_JSON_STRING, false},
    {"cwd", PD_JSON_STRING, false},
    {"env", PD_JSON_STRING_MAP, false},
    {"stdin", PD_JSON_STRING, false},
    {"timeout_ms", PD_JSON_UINT, false},
};

static const struct pd_json_field start_fields[] = {
    {"argv", PD_JSON_STRINGS, false},
    {"command", PD_JSON_STRING, false},
    {"cwd", PD_JSON_STRING, false},
    {"env", PD_JSON_STRING_MAP, false},
    {"id", PD_JSON_STRING, false},
};

static const struct pd_json_field mkdir_fields[] = {
    {"path", PD_JSON_STRING, true},
    {"parents", PD_JSON_BOOL, false},
    {"mode", PD_JSON_UINT, false},
};

static const struct pd_json_field rename_fields[] = {
    {"from", PD_JSON_STRING, true},
    {"to", PD_JSON_STRING, true},
};

static bool
path_ok(const char *p)
{
    return p != NULL && p[0] != '\0' && strlen(p) <= PATH_MAX_LEN;
}

/* Checks a parsed body by kind; 0 or -EINVAL with the reason in msg. */
static int
check_body(struct io *io, char *msg, size_t len)
{
    json_t *b = io->body, *v;

    switch (io->kind) {
    case IO_EXEC:
        if (check_command(b, msg, len) != 0)
            return -EINVAL;
        v = json_object_get(b, "stdin");
        if (v != NULL && json_string_length(v) > STDIN_MAX) {
            snprintf(msg, len, "field 'stdin': at most %u bytes", STDIN_MAX);
            return -EINVAL;
        }
        v = json_object_get(b, "timeout_ms");
        if (v != NULL && (json_integer_value(v) == 0 ||
                          (uint64_t)json_integer_value(v) > TIMEOUT_MAX_MS)) {
            snprintf(msg, len, "field 'timeout_ms': want 1 to %llu",
                     (unsigned long long)TIMEOUT_MAX_MS);
            return -EINVAL;
        }
        return 0;
    case IO_PROC_START:
        if (check_command(b, msg, len) != 0)
            return -EINVAL;
        v = json_object_get(b, "id");
        if (v != NULL && !pd_id_valid(json_string_value(v))) {
            snprintf(msg, len, "field 'id': want an id matching "
                     "[a-z0-9][a-z0-9-]{0,62}");
            return -EINVAL;
        }
        return 0;
    case IO_FILE_MKDIR:
        v = json_object_get(b, "mode");
        if (!path_ok(json_string_value(json_object_get(b, "path"))) ||
            has_nul(json_object_get(b, "path"))) {
            snprintf(msg, len, "field 'path': want a non-empty path");
            return -EINVAL;
        }
        if (v != NULL && json_integer_value(v) > 07777) {
            snprintf(msg, len, "field 'mode': want permission bits "
                     "(at most 07777)");
            return -EINVAL;
        }
        return 0;
    case IO_FILE_RENAME:
        if (!path_ok(json_string_value(json_object_get(b, "from"))) ||
            !path_ok(json_string_value(json_object_get(b, "to"))) ||
            has_nul(json_object_get(b, "from")) ||
            has_nul(json_object_get(b, "to"))) {
            snprintf(msg, len, "fields 'from' and 'to': want non-empty "
                     "paths");
            return -EINVAL;
        }
        return 0;
    default:
        return 0;
    }
}

static void
on_body(struct pd_http_req *r, int err, const char *body, size_t len,
        void *arg)
{
    struct io *io = arg;
    const struct pd_json_field *f = exec_fields;
    size_t nf = sizeof(exec_fields) / sizeof(exec_fields[0]);
    char msg[256];
    int rv;

    if (err != 0) {
        io->r = NULL;
        pd_http_fail(r, err);
        io_maybe_free(io);
        return;
    }
    switch (io->kind) {
    case IO_PROC_START:
        f = start_fields;
        nf = sizeof(start_fields) / sizeof(start_fields[0]);
        break;
    case IO_FILE_MKDIR:
        f = mkdir_fields;
        nf = sizeof(mkdir_fields) / sizeof(mkdir_fields[0]);
        break;
    case IO_FILE_RENAME:
        f = rename_fields;
        nf = sizeof(rename_fields) / sizeof(rename_fields[0]);
        break;
    default:
        break;
    }
    rv = pd_json_parse(body, len, false, f, nf, &io->body, msg, sizeof(msg));
    if (rv == 0)
        rv = check_body(io, msg, sizeof(msg));
    if (rv != 0) {
        io_fail(io, 400, "invalid_argument", "%s", msg);
        io_maybe_free(io);
        return;
    }
    io_route(io);
}

static void
read_body(struct io *io, size_t max)
{
    if (pd_http_body_read(io->r, max, on_body, io) != 0) {
        io_fail(io, 500, "internal", "the request body was already read");
        io_maybe_free(io);
    }
}

/* Query parameters: only the listed names, each at most once
 * ("consistent" is api.c's, for any GET, and means nothing here). */
static bool
query_ok(struct io *io, const char *const *allowed)
{
    size_t n = pd_http_req_query_count(io->r);

    for (size_t i = 0; i < n; i++) {
        const char *k, *v;
        bool ok = false;

        pd_http_req_query_at(io->r, i, &k, &v);
        if (strcmp(k, "consistent") == 0)
            continue;
        for (const char *const *a = allowed; *a != NULL; a++)
            ok = ok || strcmp(*a, k) == 0;
        for (size_t j = 0; ok && j < i; j++) {
            const char *k2, *v2;

            pd_http_req_query_at(io->r, j, &k2, &v2);
            if (strcmp(k, k2) == 0) {
                io_fail(io, 400, "invalid_argument", "query parameter "
                        "'%.64s' given twice", k);
                return false;
            }
        }
        if (!ok) {
            io_fail(io, 400, "invalid_argument", "unknown query parameter "
                    "'%.64s'", k);
            return false;
        }
    }
    return true;
}

/* A boolean parameter, strictly: true/false/1/0/yes/no. */
static int
query_bool(struct io *io, const char *name, bool *out)
{
    const char *v = pd_http_req_query(io->r, name);

    *out = false;
    if (v == NULL)
        return 0;
    if (strcmp(v, "true") == 0 || strcmp(v, "1") == 0 ||
        strcmp(v, "yes") == 0 || v[0] == '\0') {
        *out = true;
        return 0;
    }
    if (strcmp(v, "false") == 0 || strcmp(v, "0") == 0 ||
        strcmp(v, "no") == 0)
        return 0;
    io_fail(io, 400, "invalid_argument", "query parameter '%s': want true "
            "or false", name);
    return -EINVAL;
}

static int
query_path(struct io *io, const char *def)
{
    const char *p = pd_http_req_query(io->r, "path");

    if (p == NULL)
        p = def;
    if (!path_ok(p)) {
        io_fail(io, 400, "invalid_argument", "query parameter 'path': want "
                "a non-empty path of at most %d bytes", PATH_MAX_LEN);
        return -EINVAL;
    }
    io->path = strdup(p);
    if (io->path == NULL) {
        io_fail(io, 503, "unavailable", "out of memory");
        return -ENOMEM;
    }
    return 0;
}

static int
parse_signal(const char *s, int64_t *out)
{
    static const struct {
        const char *name;
        int num;
    } sigs[] = {
        {"HUP", SIGHUP},   {"INT", SIGINT},   {"QUIT", SIGQUIT},
        {"KILL", SIGKILL}, {"USR1", SIGUSR1}, {"USR2", SIGUSR2},
        {"TERM", SIGTERM}, {"CONT", SIGCONT}, {"STOP", SIGSTOP},
        {"ALRM", SIGALRM}, {"PIPE", SIGPIPE}, {"WINCH", SIGWINCH},
    };
    uint64_t v;

    if (pd_parse_u64(s, &v) == 0) {
        if (v < 1 || v > 64)
            return -EINVAL;
        *out = (int64_t)v;
        return 0;
    }
    if (strncasecmp(s, "SIG", 3) == 0)
        s += 3;
    for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++) {
        if (strcasecmp(s, sigs[i].name) == 0) {
            *out = sigs[i].num;
            return 0;
        }
    }
    return -EINVAL;
}

static int
proc_param(struct io *io, const struct pd_http_params *p)
{
    const char *proc = pd_http_param(p, "proc");

    if (proc == NULL || !pd_id_valid(proc)) {
        io_fail(io, 400, "invalid_argument", "process id: want an id "
                "matching [a-z0-9][a-z0-9-]{0,62}");
        return -EINVAL;
    }
    pd_strlcpy(io->proc, proc, sizeof(io->proc));
    return 0;
}

/* ---- routes ----------------------------------------------------------- */

static const char *const no_query[] = {NULL};

/* Starts a route: lookup, then (when the input so far is fine) returns
 * the io; NULL when the request was already answered. */
static struct io *
begin(struct pd_http_req *r, const struct pd_http_params *p, void *arg,
      enum io_kind kind, const char *const *allowed)
{
    struct io *io = io_new(arg, r, p, kind);

    if (io == NULL)
        return NULL;
    if (!query_ok(io, allowed)) {
        io_maybe_free(io);
        return NULL;
    }
    return io;
}

/* Ends a route handler that failed validation after begin. */
static void
reject(struct io *io)
{
    io_maybe_free(io);
}

static void
h_exec(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    static const char *const q[] = {"stream", NULL};
    struct io *io = begin(r, p, arg, IO_EXEC, q);

    if (io == NULL)
        return;
    if (query_bool(io, "stream", &io->stream) != 0)
        return reject(io);
    read_body(io, EXEC_BODY_MAX);
}

static void
h_procs(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    bool post = pd_http_req_is(r, "POST");
    struct io *io = begin(r, p, arg, post ? IO_PROC_START : IO_PROC_LIST,
                          no_query);

    if (io == NULL)
        return;
    if (post)
        read_body(io, SMALL_BODY_MAX);
    else
        io_route(io);
}

static void
h_proc(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    static const char *const q[] = {"signal", NULL};
    bool del = pd_http_req_is(r, "DELETE");
    struct io *io = begin(r, p, arg, del ? IO_PROC_SIGNAL : IO_PROC_GET,
                          del ? q : no_query);
    const char *sig;

    if (io == NULL)
        return;
    if (proc_param(io, p) != 0)
        return reject(io);
    sig = pd_http_req_query(r, "signal");
    if (del && sig != NULL && parse_signal(sig, &io->signal) != 0) {
        io_fail(io, 400, "invalid_argument", "query parameter 'signal': "
                "want a name (TERM, SIGKILL, ...) or a number from 1 to 64");
        return reject(io);
    }
    io_route(io);
}

static void
h_logs(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    static const char *const q[] = {"follow", NULL};
    struct io *io = begin(r, p, arg, IO_PROC_LOGS, q);

    if (io == NULL)
        return;
    if (proc_param(io, p) != 0 || query_bool(io, "follow", &io->follow) != 0)
        return reject(io);
    io_route(io);
}

static void
h_files(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    static const char *const put_q[] = {"path", "mode", "append", NULL};
    static const char *const get_q[] = {"path", NULL};
    static const char *const del_q[] = {"path", "recursive", NULL};
    enum io_kind kind = pd_http_req_is(r, "PUT")      ? IO_FILE_PUT
                        : pd_http_req_is(r, "DELETE") ? IO_FILE_DELETE
                                                      : IO_FILE_GET;
    struct io *io = begin(r, p, arg, kind,
                          kind == IO_FILE_PUT      ? put_q
                          : kind == IO_FILE_DELETE ? del_q
                                                   : get_q);
    const char *mode;
    uint64_t m = 0644;

    if (io == NULL)
        return;
    if (query_path(io, NULL) != 0 ||
        query_bool(io, "recursive", &io->recursive) != 0 ||
        query_bool(io, "append", &io->append) != 0)
        return reject(io);
    mode = pd_http_req_query(r, "mode");
    if (mode != NULL) {
        char *end;

        errno = 0;
        m = strtoull(mode, &end, 8);
        if (mode[0] == '\0' || *end != '\0' || errno != 0 || m > 07777) {
            io_fail(io, 400, "invalid_argument", "query parameter 'mode': "
                    "want octal permission bits such as 0644");
            return reject(io);
        }
    }
    io->mode = (unsigned)m;
    io_route(io);
}

static void
h_list(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    static const char *const q[] = {"path", "recursive", NULL};
    struct io *io = begin(r, p, arg, IO_FILE_LIST, q);

    if (io == NULL)
        return;
    if (query_path(io, "/workspace") != 0 ||
        query_bool(io, "recursive", &io->recursive) != 0)
        return reject(io);
    io_route(io);
}

static void
h_mkdir(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    struct io *io = begin(r, p, arg, IO_FILE_MKDIR, no_query);

    if (io != NULL)
        read_body(io, SMALL_BODY_MAX);
}

static void
h_rename(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    struct io *io = begin(r, p, arg, IO_FILE_RENAME, no_query);

    if (io != NULL)
        read_body(io, SMALL_BODY_MAX);
}

const struct pd_http_route sched_io_routes[] = {
    {"POST", "/v1/sandboxes/{id}/exec", h_exec},
    {"POST", "/v1/sandboxes/{id}/processes", h_procs},
    {"GET", "/v1/sandboxes/{id}/processes", h_procs},
    {"GET", "/v1/sandboxes/{id}/processes/{proc}", h_proc},
    {"DELETE", "/v1/sandboxes/{id}/processes/{proc}", h_proc},
    {"GET", "/v1/sandboxes/{id}/processes/{proc}/logs", h_logs},
    {"PUT", "/v1/sandboxes/{id}/files", h_files},
    {"GET", "/v1/sandboxes/{id}/files", h_files},
    {"DELETE", "/v1/sandboxes/{id}/files", h_files},
    {"GET", "/v1/sandboxes/{id}/files/list", h_list},
    {"POST", "/v1/sandboxes/{id}/files/mkdir", h_mkdir},
    {"POST", "/v1/sandboxes/{id}/files/rename", h_rename},
};
const size_t sched_io_nroutes =
    sizeof(sched_io_routes) / sizeof(sched_io_routes[0]);
