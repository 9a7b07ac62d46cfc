/*
 * pd-agent-client: drives a node agent's RPC over mutual TLS, standing in
 * for the scheduler in tests and benchmarks.
 *
 *   pd-agent-client [conn options] call TYPE 'JSON'   any request; prints
 *                                                   every reply frame
 *   pd-agent-client [conn options] exec SANDBOX [--timeout MS] -- ARGV...
 *   pd-agent-client [conn options] sh SANDBOX 'shell string'
 *   pd-agent-client [conn options] put SANDBOX PATH LOCAL|-
 *   pd-agent-client [conn options] get SANDBOX PATH LOCAL|-
 *
 * Connection options: --addr HOST:PORT (default 127.0.0.1:7400), --cert,
 * --key, --ca (PEM; without --cert the client offers no certificate),
 * --name NAME (HELLO name, default "test-client"), --timeout-s N (whole
 * run, default 300).
 *
 * call: TYPE is a number or a name (SANDBOX_CREATE, EXEC, ...). JSON holds
 * the fields; {"$b64": "..."} stands for binary. Each reply frame under
 * the request is printed as one JSON line ({"t": NAME, ...}, binary shown
 * as a string when it is UTF-8, else {"$b64": ...}). The run ends with the
 * request (OK, ERROR or EXIT; FILE_READ and TUNNEL_OPEN at DATA eof).
 *
 * exec / sh print the command's stdout and stderr and exit with its code.
 * put / get stream a file in PD_CHUNK_MAX pieces under the flow-control
 * window, never holding the whole file.
 *
 * Exit status: 0 on OK or EXIT, 1 on ERROR, 2 on usage, 3 when the
 * connection or TLS handshake failed, 4 on timeout.
 */
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>
#include <uv.h>

#include "common/log.h"
#include "common/util.h"
#include "proto/conn.h"
#include "proto/msgtypes.h"
#include "proto/tls.h"

enum mode { M_CALL, M_EXEC, M_PUT, M_GET };

static struct {
    enum mode mode;
    const char *addr, *cert, *key, *ca, *name;
    unsigned type;
    json_t *fields;
    const char *sandbox, *path, *local;
    char **argv;
    const char *command;
    uint64_t timeout_ms; /* exec's own timeout */
    uint64_t run_ms;     /* deadline of the whole run */
    int fd;
    uint64_t credit;
    bool eof_sent, opened, got_hello, done;
    int exit_code;
    struct pd_conn *conn;
    uv_timer_t timer;
    uv_loop_t *loop;
} cl = {.addr = "127.0.0.1:7400", .name = "test-client", .exit_code = 3};

static void
finish(int code)
{
    if (cl.done)
        return;
    cl.done = true;
    cl.exit_code = code;
    uv_timer_stop(&cl.timer);
    if (cl.conn != NULL)
        pd_conn_close(cl.conn, 0, "done");
}

/* ---- JSON <-> msgpack -------------------------------------------------- */

static int
pack_json(msgpack_packer *pk, json_t *v)
{
    const char *k;
    json_t *x;
    size_t i;

    switch (json_typeof(v)) {
    case JSON_OBJECT:
        if (json_object_size(v) == 1 &&
            json_is_string(json_object_get(v, "$b64"))) {
            const char *s = json_string_value(json_object_get(v, "$b64"));
            size_t n = strlen(s);
            unsigned char *buf = malloc(n + 4);
            int len = EVP_DecodeBlock(buf, (const unsigned char *)s, (int)n);

            if (len < 0) {
                free(buf);
                return -EINVAL;
            }
            while (n > 0 && s[n - 1] == '=' && len > 0) {
                len--;
                n--;
            }
            msgpack_pack_bin_with_body(pk, buf, (size_t)len);
            free(buf);
            return 0;
        }
        msgpack_pack_map(pk, json_object_size(v));
        json_object_foreach(v, k, x)
        {
            msgpack_pack_str_with_body(pk, k, strlen(k));
            if (pack_json(pk, x) != 0)
                return -EINVAL;
        }
        return 0;
    case JSON_ARRAY:
        msgpack_pack_array(pk, json_array_size(v));
        json_array_foreach(v, i, x)
        {
            if (pack_json(pk, x) != 0)
                return -EINVAL;
        }
        return 0;
    case JSON_STRING:
        msgpack_pack_str_with_body(pk, json_string_value(v),
                                   json_string_length(v));
        return 0;
    case JSON_INTEGER:
        if (json_integer_value(v) < 0)
            msgpack_pack_int64(pk, json_integer_value(v));
        else
            msgpack_pack_uint64(pk, (uint64_t)json_integer_value(v));
        return 0;
    case JSON_REAL:
        msgpack_pack_double(pk, json_real_value(v));
        return 0;
    case JSON_TRUE:
        msgpack_pack_true(pk);
        return 0;
    case JSON_FALSE:
        msgpack_pack_false(pk);
        return 0;
    default:
        msgpack_pack_nil(pk);
        return 0;
    }
}

static json_t *
to_json(const msgpack_object *o)
{
    json_t *v;

    switch (o->type) {
    case MSGPACK_OBJECT_MAP:
        v = json_object();
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            const msgpack_object *k = &o->via.map.ptr[i].key;
            char key[128];

            if (k->type != MSGPACK_OBJECT_STR)
                continue;
            snprintf(key, sizeof(key), "%.*s", (int)k->via.str.size,
                     k->via.str.ptr);
            json_object_set_new(v, key, to_json(&o->via.map.ptr[i].val));
        }
        return v;
    case MSGPACK_OBJECT_ARRAY:
        v = json_array();
        for (uint32_t i = 0; i < o->via.array.size; i++)
            json_array_append_new(v, to_json(&o->via.array.ptr[i]));
        return v;
    case MSGPACK_OBJECT_STR:
        v = json_stringn(o->via.str.ptr, o->via.str.size);
        return v ? v : json_string("<invalid utf-8>");
    case MSGPACK_OBJECT_BIN: {
        v = json_stringn(o->via.bin.ptr, o->via.bin.size);
        if (v != NULL)
            return v;
        size_t n = 4 * ((o->via.bin.size + 2) / 3) + 1;
        char *b = malloc(n);

        EVP_EncodeBlock((unsigned char *)b,
                        (const unsigned char *)o->via.bin.ptr,
                        (int)o->via.bin.size);
        v = json_pack("{s:s}", "$b64", b);
        free(b);
        return v;
    }
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
        return json_integer((json_int_t)o->via.u64);
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
        return json_integer(o->via.i64);
    case MSGPACK_OBJECT_BOOLEAN:
        return json_boolean(o->via.boolean);
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
        return json_real(o->via.f64);
    default:
        return json_null();
    }
}

static void
print_frame(const struct pd_msg *m)
{
    json_t *v = to_json(m->root);
    char *s;

    json_object_set_new(v, "t", json_string(pd_msg_type_name(m->type)));
    s = json_dumps(v, JSON_COMPACT | JSON_SORT_KEYS);
    printf("%s\n", s);
    fflush(stdout);
    free(s);
    json_decref(v);
}

/* ---- requests ---------------------------------------------------------- */

static void
send_call(void)
{
    struct pd_enc e;
    const char *k;
    json_t *x;

    pd_enc_begin(&e, cl.type, 1);
    json_object_foreach(cl.fields, k, x)
    {
        pd_enc_key(&e, k);
        if (pack_json(&e.pk, x) != 0) {
            fprintf(stderr, "pd-agent-client: bad $b64 value\n");
            pd_enc_discard(&e);
            finish(2);
            return;
        }
    }
    pd_conn_send(cl.conn, &e);
}

static void
send_exec(void)
{
    struct pd_enc e;
    size_t n = 0;

    pd_enc_begin(&e, PD_MSG_EXEC, 1);
    pd_enc_str(&e, "sandbox", cl.sandbox);
    if (cl.command != NULL) {
        pd_enc_str(&e, "command", cl.command);
    } else {
        while (cl.argv[n] != NULL)
            n++;
        pd_enc_strv(&e, "argv", (const char *const *)cl.argv, n);
    }
    if (cl.timeout_ms != 0)
        pd_enc_u64(&e, "timeout_ms", cl.timeout_ms);
    pd_conn_send(cl.conn, &e);
}

/* Sends file chunks while there is credit and the socket keeps up. */
static void
pump_put(void)
{
    static char buf[PD_CHUNK_MAX];

    while (!cl.eof_sent && cl.credit > 0 &&
           pd_conn_queued(cl.conn) < PD_CONN_HIGH_WATER) {
        size_t want = cl.credit < sizeof(buf) ? cl.credit : sizeof(buf);
        ssize_t n = read(cl.fd, buf, want);
        struct pd_enc e;

        if (n < 0) {
            fprintf(stderr, "pd-agent-client: read: %s\n", strerror(errno));
            finish(1);
            return;
        }
        pd_enc_begin(&e, PD_MSG_DATA, 1);
        pd_enc_bin(&e, "data", buf, (size_t)n);
        pd_enc_bool(&e, "eof", n == 0);
        pd_conn_send(cl.conn, &e);
        cl.credit -= (uint64_t)n;
        if (n == 0)
            cl.eof_sent = true;
    }
}

static void
send_file_req(void)
{
    struct pd_enc e;

    pd_enc_begin(&e, cl.mode == M_PUT ? PD_MSG_FILE_WRITE : PD_MSG_FILE_READ,
                 1);
    pd_enc_str(&e, "sandbox", cl.sandbox);
    pd_enc_str(&e, "path", cl.path);
    if (cl.mode == M_PUT)
        pd_enc_u64(&e, "mode", 0644);
    pd_conn_send(cl.conn, &e);
    if (cl.mode == M_PUT) {
        cl.credit = PD_STREAM_WINDOW;
        pump_put();
    }
}

static void
write_all(int fd, const void *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);

        if (w <= 0) {
            fprintf(stderr, "pd-agent-client: write: %s\n", strerror(errno));
            finish(1);
            return;
        }
        p = (const char *)p + w;
        n -= (size_t)w;
    }
}

static void
print_error(const struct pd_msg *m)
{
    char code[32] = "", msg[512] = "";

    pd_msg_cstr(m, "code", code, sizeof(code));
    pd_msg_cstr(m, "message", msg, sizeof(msg));
    fprintf(stderr, "pd-agent-client: %s: %s\n", code, msg);
}

static void
on_exec_msg(const struct pd_msg *m)
{
    const void *p;
    size_t n;
    int64_t code = 0;

    if (m->type == PD_MSG_ERROR) {
        print_error(m);
        finish(1);
        return;
    }
    if (m->type != PD_MSG_EXIT)
        return;
    if (pd_msg_bin(m, "stdout", &p, &n) == 0)
        write_all(1, p, n);
    if (pd_msg_bin(m, "stderr", &p, &n) == 0)
        write_all(2, p, n);
    pd_msg_i64(m, "exit_code", &code);
    finish(code >= 0 && code < 256 ? (int)code : 1);
}

static void
on_file_msg(const struct pd_msg *m)
{
    const void *p;
    size_t n;
    bool eof = false;
    uint64_t grant;
    struct pd_enc e;

    switch (m->type) {
    case PD_MSG_ERROR:
        print_error(m);
        finish(1);
        return;
    case PD_MSG_WINDOW:
        if (pd_msg_u64(m, "bytes", &grant) == 0)
            cl.credit += grant;
        pump_put();
        return;
    case PD_MSG_OK:
        if (cl.mode == M_PUT)
            finish(0);
        return;
    case PD_MSG_DATA:
        if (pd_msg_bin(m, "data", &p, &n) == 0 && n > 0) {
            write_all(cl.fd, p, n);
            pd_enc_begin(&e, PD_MSG_WINDOW, 1);
            pd_enc_u64(&e, "bytes", n);
            pd_conn_send(cl.conn, &e);
        }
        pd_msg_bool(m, "eof", &eof);
        if (eof)
            finish(0);
        return;
    default:
        return;
    }
}

static void
on_call_msg(const struct pd_msg *m)
{
    bool eof = false;

    print_frame(m);
    switch (m->type) {
    case PD_MSG_ERROR:
        finish(1);
        return;
    case PD_MSG_EXIT:
        finish(0);
        return;
    case PD_MSG_OK:
        if ((cl.type == PD_MSG_FILE_READ || cl.type == PD_MSG_TUNNEL_OPEN) &&
            !cl.opened) {
            cl.opened = true;
            return;
        }
        finish(0);
        return;
    case PD_MSG_DATA:
        pd_msg_bool(m, "eof", &eof);
        if (eof)
            finish(0);
        return;
    default:
        return;
    }
}

static void
on_msg(struct pd_conn *c, const struct pd_msg *m)
{
    (void)c;
    if (m->type == PD_MSG_HELLO) {
        cl.got_hello = true;
        switch (cl.mode) {
        case M_CALL:
            send_call();
            break;
        case M_EXEC:
            send_exec();
            break;
        default:
            send_file_req();
        }
        return;
    }
    if (m->id != 1)
        return;
    if (cl.mode == M_CALL)
        on_call_msg(m);
    else if (cl.mode == M_EXEC)
        on_exec_msg(m);
    else
        on_file_msg(m);
}

static void
on_drain(struct pd_conn *c)
{
    (void)c;
    if (cl.mode == M_PUT)
        pump_put();
}

static void
on_close(struct pd_conn *c, int reason)
{
    cl.conn = NULL;
    if (!cl.done) {
        fprintf(stderr, "pd-agent-client: connection closed: %s\n",
                pd_conn_error(c)[0] ? pd_conn_error(c) : "by peer");
        cl.done = true;
        cl.exit_code = cl.got_hello ? 1 : 3;
        (void)reason;
        uv_timer_stop(&cl.timer);
    }
    uv_close((uv_handle_t *)&cl.timer, NULL);
}

static void
on_connect(uv_connect_t *req, int status)
{
    static const struct pd_conn_cb cb = {
        .on_msg = on_msg,
        .on_close = on_close,
        .on_drain = on_drain,
    };
    SSL_CTX *ctx = req->data;
    struct pd_conn_opts o = {
        .role = "scheduler",
        .name = cl.name,
        .tls = ctx,
        .subject = "client",
    };

    if (status < 0) {
        fprintf(stderr, "pd-agent-client: connect %s: %s\n", cl.addr,
                uv_strerror(status));
        cl.done = true;
        uv_close((uv_handle_t *)req->handle, (uv_close_cb)free);
        uv_close((uv_handle_t *)&cl.timer, NULL);
        return;
    }
    cl.conn = pd_conn_new(req->handle, &o, &cb, NULL);
}

static void
on_timeout(uv_timer_t *t)
{
    (void)t;
    fprintf(stderr, "pd-agent-client: timed out\n");
    finish(4);
    cl.exit_code = 4;
}

static int
usage(void)
{
    fprintf(stderr,
            "usage: pd-agent-client [--addr A] [--cert C --key K] [--ca CA]"
            " [--name N] [--timeout-s S]\n"
            "         call TYPE JSON | exec SANDBOX [--timeout MS] -- ARGV"
            " | sh SANDBOX CMD\n"
            "         | put SANDBOX PATH LOCAL|- | get SANDBOX PATH "
            "LOCAL|-\n");
    return 2;
}

static int
parse_type(const char *s)
{
    uint64_t v;

    if (pd_parse_u64(s, &v) == 0)
        return v <= PD_MSG_TYPE_MAX ? (int)v : -1;
    for (unsigned t = 1; t <= PD_MSG_TYPE_MAX; t++)
        if (pd_msg_type_known(t) && strcmp(pd_msg_type_name(t), s) == 0)
            return (int)t;
    return -1;
}

static int
parse_args(int argc, char **argv)
{
    int i = 1;
    uint64_t secs = 300;

    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i += 2) {
        const char *k = argv[i] + 2, *v = i + 1 < argc ? argv[i + 1] : NULL;

        if (v == NULL)
            return -1;
        if (strcmp(k, "addr") == 0)
            cl.addr = v;
        else if (strcmp(k, "cert") == 0)
            cl.cert = v;
        else if (strcmp(k, "key") == 0)
            cl.key = v;
        else if (strcmp(k, "ca") == 0)
            cl.ca = v;
        else if (strcmp(k, "name") == 0)
            cl.name = v;
        else if (strcmp(k, "timeout-s") == 0 && pd_parse_u64(v, &secs) == 0)
            ;
        else
            return -1;
    }
    if (i >= argc)
        return -1;
    const char *cmd = argv[i++];

    if (strcmp(cmd, "call") == 0 && argc - i == 2) {
        int t = parse_type(argv[i]);
        json_error_t je;

        cl.mode = M_CALL;
        cl.fields = json_loads(argv[i + 1], 0, &je);
        if (t < 0 || !json_is_object(cl.fields))
            return -1;
        cl.type = (unsigned)t;
    } else if (strcmp(cmd, "exec") == 0 && argc - i >= 3) {
        cl.mode = M_EXEC;
        cl.sandbox = argv[i++];
        if (strcmp(argv[i], "--timeout") == 0 && i + 1 < argc) {
            if (pd_parse_u64(argv[i + 1], &cl.timeout_ms) != 0)
                return -1;
            i += 2;
        }
        if (i >= argc || strcmp(argv[i], "--") != 0 || i + 1 >= argc)
            return -1;
        cl.argv = argv + i + 1;
    } else if (strcmp(cmd, "sh") == 0 && argc - i == 2) {
        cl.mode = M_EXEC;
        cl.sandbox = argv[i];
        cl.command = argv[i + 1];
    } else if ((strcmp(cmd, "put") == 0 || strcmp(cmd, "get") == 0) &&
               argc - i == 3) {
        cl.mode = cmd[0] == 'p' ? M_PUT : M_GET;
        cl.sandbox = argv[i];
        cl.path = argv[i + 1];
        cl.local = argv[i + 2];
    } else {
        return -1;
    }
    cl.run_ms = secs * 1000;
    return 0;
}

int
main(int argc, char **argv)
{
    struct sockaddr_storage sa;
    uv_connect_t req;
    uv_tcp_t *tcp;
    SSL_CTX *ctx = NULL;
    char err[256] = "";
    uint64_t run_ms;
    char host[64], *colon;
    uint64_t port;

    pd_log_init("pd-agent-client", PD_LOG_ERROR);
    if (parse_args(argc, argv) != 0)
        return usage();
    run_ms = cl.run_ms;

    if (cl.mode == M_PUT)
        cl.fd = strcmp(cl.local, "-") == 0 ? 0
                                           : open(cl.local, O_RDONLY | O_CLOEXEC);
    else if (cl.mode == M_GET)
        cl.fd = strcmp(cl.local, "-") == 0
                    ? 1
                    : open(cl.local, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
                           0644);
    if ((cl.mode == M_PUT || cl.mode == M_GET) && cl.fd < 0) {
        fprintf(stderr, "pd-agent-client: %s: %s\n", cl.local,
                strerror(errno));
        return 2;
    }

    ctx = pd_tls_ctx_new(false, cl.cert, cl.key, cl.ca, err, sizeof(err));
    if (ctx == NULL) {
        fprintf(stderr, "pd-agent-client: tls: %s\n", err);
        return 2;
    }
    pd_strlcpy(host, cl.addr, sizeof(host));
    colon = strrchr(host, ':');
    if (colon == NULL || pd_parse_u64(colon + 1, &port) != 0) {
        fprintf(stderr, "pd-agent-client: --addr wants HOST:PORT\n");
        return 2;
    }
    *colon = '\0';
    if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)&sa) != 0) {
        fprintf(stderr, "pd-agent-client: --addr wants a numeric IPv4\n");
        return 2;
    }
    cl.loop = uv_default_loop();
    uv_timer_init(cl.loop, &cl.timer);
    uv_timer_start(&cl.timer, on_timeout, run_ms, 0);
    tcp = malloc(sizeof(*tcp));
    uv_tcp_init(cl.loop, tcp);
    req.data = ctx;
    uv_tcp_connect(&req, tcp, (struct sockaddr *)&sa, on_connect);
    uv_run(cl.loop, UV_RUN_DEFAULT);
    SSL_CTX_free(ctx);
    json_decref(cl.fields);
    return cl.exit_code;
}
