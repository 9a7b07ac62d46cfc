/*
 * pd-guest: a developer and test tool that boots one Paddock VM and talks
 * to its guest agent with the node agent's own client (guestc).
 *
 *   pd-guest boot --kernel K --initrd I --dir D [--disk-mb N] [--mem MB]
 *                 [--cpus N] [--id ID] [--accel tcg|kvm|auto] [--net]
 *                 [--egress] [--fwd HOST:GUEST] [--guest-format]
 *                 [--extra ARG]... [--boot-timeout S] [--keep-disk]
 *       Starts QEMU, waits for the agent's HELLO, writes D/ready (boot ms)
 *       and prints "ready MS", then supervises QEMU until it exits or
 *       pd-guest gets SIGTERM/SIGINT (QEMU is then killed). The disk is
 *       D/disk.img, made anew with --disk-mb, or the existing one with
 *       --keep-disk (a reboot of the same sandbox).
 *
 * Client commands connect to --sock PATH (or --dir D: D/guest.sock), run
 * one request and print its answer as one JSON line; an ERROR prints
 * {"error": {...}} and exits 1:
 *   exec [--stream] [--timeout-ms N] [--cwd C] [--env K=V]... [--stdin-file F]
 *        [--stdin-stream] [--output-max N] -- ARGV...   (or --sh 'string')
 *   put PATH [LOCAL] [--append] [--mode OCT]   get PATH [LOCAL]
 *   stat|ls [-r]|mkdir [-p]|rm [-r] PATH   mv FROM TO
 *   start [--name N] -- ARGV...   ps   proc NAME   logs NAME [-f]
 *   kill NAME [--signal N] [--kill-after-ms N]
 *   wait-port PORT [--timeout-ms N]
 *   tunnel GUEST_PORT --listen HOST_PORT   (forwards until killed)
 *   info   shutdown   bad KIND   (see bad_kinds below)
 *
 * exec prints {"exit_code",...,"stdout","stderr"} (collected) or, with
 * --stream, one JSON event per line with t_ms since the request.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include "common/log.h"
#include "common/util.h"
#include "node-agent/guestc.h"
#include "node-agent/qemu.h"

#define MAX_ENV 64

static uv_loop_t *loop;
static struct guestc *gc;
static int exit_code = 1;
static uint64_t t_start;

/* ---- JSON output --------------------------------------------------------- */

static void
json_str(FILE *f, const char *s, size_t n)
{
    fputc('"', f);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];

        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c == '\n')
            fputs("\\n", f);
        else if (c < 0x20 || c >= 0x7f)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

static void
json_obj(FILE *f, const msgpack_object *o)
{
    switch (o->type) {
    case MSGPACK_OBJECT_NIL:
        fputs("null", f);
        break;
    case MSGPACK_OBJECT_BOOLEAN:
        fputs(o->via.boolean ? "true" : "false", f);
        break;
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
        fprintf(f, "%llu", (unsigned long long)o->via.u64);
        break;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
        fprintf(f, "%lld", (long long)o->via.i64);
        break;
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
        fprintf(f, "%g", o->via.f64);
        break;
    case MSGPACK_OBJECT_STR:
        json_str(f, o->via.str.ptr, o->via.str.size);
        break;
    case MSGPACK_OBJECT_BIN:
        json_str(f, o->via.bin.ptr, o->via.bin.size);
        break;
    case MSGPACK_OBJECT_ARRAY:
        fputc('[', f);
        for (uint32_t i = 0; i < o->via.array.size; i++) {
            if (i)
                fputc(',', f);
            json_obj(f, &o->via.array.ptr[i]);
        }
        fputc(']', f);
        break;
    case MSGPACK_OBJECT_MAP:
        fputc('{', f);
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            if (i)
                fputc(',', f);
            if (o->via.map.ptr[i].key.type == MSGPACK_OBJECT_STR)
                json_obj(f, &o->via.map.ptr[i].key);
            else
                fputs("\"?\"", f);
            fputc(':', f);
            json_obj(f, &o->via.map.ptr[i].val);
        }
        fputc('}', f);
        break;
    default:
        fputs("null", f);
    }
}

static void
print_msg(const struct pd_msg *m)
{
    if (m != NULL)
        json_obj(stdout, m->root);
    else
        fputs("{}", stdout);
    fputc('\n', stdout);
    fflush(stdout);
}

/* ---- connection ---------------------------------------------------------- */

static void (*ready_fn)(void);

static void
on_ready(struct guestc *g)
{
    (void)g;
    ready_fn();
}

static void
on_close(struct guestc *g, int reason, const char *why)
{
    (void)g;
    if (reason != 0 && exit_code == 1)
        fprintf(stderr, "pd-guest: connection: %s\n", why);
    gc = NULL;
}

static void
done(int code)
{
    exit_code = code;
    if (gc != NULL)
        guestc_close(gc);
}

static void
on_error(struct guestc_req *r, int errnum, const char *msg)
{
    (void)r;
    printf("{\"error\":{\"code\":\"%s\",\"errno\":%d,\"message\":",
           pd_errno_name(errnum), errnum);
    json_str(stdout, msg, strlen(msg));
    printf("}}\n");
    fflush(stdout);
    done(1);
}

static void
on_reply_print(struct guestc_req *r, const struct pd_msg *m)
{
    (void)r;
    print_msg(m);
    done(0);
}

static const struct guestc_req_cb print_cb = {
    .on_reply = on_reply_print,
    .on_error = on_error,
};

static int
run(const char *sock, unsigned timeout_ms, void (*fn)(void))
{
    static const struct guestc_cb cb = {.on_ready = on_ready,
                                        .on_close = on_close};

    ready_fn = fn;
    t_start = pd_now_ms();
    gc = guestc_connect(loop, sock, timeout_ms, &cb, NULL);
    if (gc == NULL)
        return 1;
    uv_run(loop, UV_RUN_DEFAULT);
    return exit_code;
}

/* ---- options shared by client commands ----------------------------------- */

static struct {
    const char *sock;
    unsigned timeout_ms;
    bool stream, stdin_stream, recursive, parents, follow, append;
    uint64_t exec_timeout, output_max, kill_after;
    int sig;
    unsigned mode;
    const char *cwd, *sh, *stdin_file, *name;
    const char *env[MAX_ENV + 1];
    int nenv;
    unsigned listen_port;
    char **args;
    int nargs;
} o = {.timeout_ms = 60000, .sig = SIGTERM, .kill_after = 5000};

/* ---- exec ---------------------------------------------------------------- */

static int stdin_fd = -1;
static struct guestc_req *pump_req;
static unsigned char pump_buf[256 << 10];

/* Sends local bytes (file write or exec stdin) within the credit. */
static void
pump(struct guestc_req *r)
{
    for (;;) {
        size_t credit = guestc_req_credit(r);
        ssize_t n;

        if (credit == 0)
            return;
        if (credit > sizeof(pump_buf))
            credit = sizeof(pump_buf);
        n = read(stdin_fd, pump_buf, credit);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            guestc_req_send_data(r, NULL, 0, true);
            return;
        }
        if (guestc_req_send_data(r, pump_buf, (size_t)n, false) != 0)
            return;
    }
}

static void
on_writable(struct guestc_req *r)
{
    pump(r);
}

static void
exec_start(struct guestc_req *r, const struct pd_msg *m)
{
    uint64_t pid = 0;

    (void)r;
    pd_msg_u64(m, "pid", &pid);
    printf("{\"event\":\"start\",\"pid\":%llu,\"t_ms\":%llu}\n",
           (unsigned long long)pid,
           (unsigned long long)(pd_now_ms() - t_start));
    fflush(stdout);
}

static void
exec_data(struct guestc_req *r, enum guestc_stream s, const void *d,
          size_t n, bool eof)
{
    (void)r;
    (void)eof;
    printf("{\"event\":\"%s\",\"t_ms\":%llu,\"data\":",
           s == GUESTC_STDERR ? "stderr" : "stdout",
           (unsigned long long)(pd_now_ms() - t_start));
    json_str(stdout, d, n);
    printf("}\n");
    fflush(stdout);
}

static void
exec_reply(struct guestc_req *r, const struct pd_msg *m)
{
    int64_t code = -1, sig = 0;

    (void)r;
    pd_msg_i64(m, "exit_code", &code);
    pd_msg_i64(m, "signal", &sig);
    if (o.stream)
        printf("{\"event\":\"exit\",\"t_ms\":%llu,\"exit\":",
               (unsigned long long)(pd_now_ms() - t_start));
    json_obj(stdout, m->root);
    printf(o.stream ? "}\n" : "\n");
    fflush(stdout);
    done(0);
}

static void
do_exec(void)
{
    static const struct guestc_req_cb cb = {
        .on_start = exec_start,
        .on_data = exec_data,
        .on_reply = exec_reply,
        .on_error = on_error,
        .on_writable = on_writable,
    };
    struct guestc_exec x = {0};
    char *input = NULL;
    size_t inlen = 0;

    if (o.sh != NULL)
        x.command = o.sh;
    else
        x.argv = (const char *const *)o.args;
    x.cwd = o.cwd;
    x.env = o.nenv > 0 ? o.env : NULL;
    x.timeout_ms = o.exec_timeout;
    x.output_max = o.output_max;
    x.stream = o.stream || o.stdin_stream;
    x.stdin_stream = o.stdin_stream;
    if (o.stdin_file != NULL &&
        pd_read_file(o.stdin_file, &input, &inlen, 64u << 20) == 0) {
        x.stdin_data = input;
        x.stdin_len = inlen;
    }
    pump_req = guestc_exec(gc, &x, &cb, NULL);
    free(input);
    if (pump_req != NULL && o.stdin_stream) {
        stdin_fd = 0;
        pump(pump_req);
    }
}

/* ---- files --------------------------------------------------------------- */

static int out_fd = 1;
static uint64_t xfer_bytes;

static void
put_reply(struct guestc_req *r, const struct pd_msg *m)
{
    uint64_t size = 0;
    uint64_t ms = pd_now_ms() - t_start;

    (void)r;
    pd_msg_u64(m, "size", &size);
    printf("{\"size\":%llu,\"ms\":%llu}\n", (unsigned long long)size,
           (unsigned long long)ms);
    fflush(stdout);
    done(0);
}

static void
do_put(void)
{
    static const struct guestc_req_cb cb = {
        .on_reply = put_reply,
        .on_error = on_error,
        .on_writable = on_writable,
    };
    struct guestc_req *r = guestc_file_write(gc, o.args[0], o.mode, o.append,
                                             &cb, NULL);

    if (r != NULL)
        pump(r);
}

static void
get_data(struct guestc_req *r, enum guestc_stream s, const void *d, size_t n,
         bool eof)
{
    const char *p = d;

    (void)r;
    (void)s;
    (void)eof;
    xfer_bytes += n;
    while (n > 0) {
        ssize_t k = write(out_fd, p, n);

        if (k <= 0) {
            if (errno == EINTR)
                continue;
            perror("pd-guest: write");
            done(1);
            return;
        }
        p += k;
        n -= (size_t)k;
    }
}

static void
get_reply(struct guestc_req *r, const struct pd_msg *m)
{
    (void)r;
    (void)m;
    if (out_fd != 1)
        printf("{\"size\":%llu,\"ms\":%llu}\n",
               (unsigned long long)xfer_bytes,
               (unsigned long long)(pd_now_ms() - t_start));
    fflush(stdout);
    done(0);
}

static void
do_get(void)
{
    static const struct guestc_req_cb cb = {
        .on_data = get_data,
        .on_reply = get_reply,
        .on_error = on_error,
    };

    guestc_file_read(gc, o.args[0], &cb, NULL);
}

static void do_stat(void) { guestc_file_stat(gc, o.args[0], &print_cb, NULL); }
static void do_ls(void)
{
    guestc_file_list(gc, o.args[0], o.recursive, &print_cb, NULL);
}
static void do_mkdir(void)
{
    guestc_file_mkdir(gc, o.args[0], o.parents, o.mode, &print_cb, NULL);
}
static void do_rm(void)
{
    guestc_file_delete(gc, o.args[0], o.recursive, &print_cb, NULL);
}
static void do_mv(void)
{
    guestc_file_rename(gc, o.args[0], o.args[1], &print_cb, NULL);
}
static void do_info(void) { guestc_info(gc, &print_cb, NULL); }
static void do_shutdown(void) { guestc_shutdown(gc, &print_cb, NULL); }
static void do_ps(void) { guestc_proc_list(gc, &print_cb, NULL); }
static void do_proc(void) { guestc_proc_get(gc, o.args[0], &print_cb, NULL); }
static void do_kill(void)
{
    guestc_proc_signal(gc, o.args[0], o.sig, o.kill_after, &print_cb, NULL);
}
static void do_wait_port(void)
{
    guestc_wait_port(gc, (unsigned)atoi(o.args[0]),
                     o.exec_timeout ? o.exec_timeout : 30000, &print_cb,
                     NULL);
}

static void
do_start(void)
{
    struct guestc_exec x = {0};

    if (o.sh != NULL)
        x.command = o.sh;
    else
        x.argv = (const char *const *)o.args;
    x.cwd = o.cwd;
    x.env = o.nenv > 0 ? o.env : NULL;
    guestc_proc_start(gc, o.name, &x, &print_cb, NULL);
}

static void
do_logs(void)
{
    static const struct guestc_req_cb cb = {
        .on_data = exec_data,
        .on_reply = on_reply_print,
        .on_error = on_error,
    };

    guestc_proc_logs(gc, o.args[0], o.follow, &cb, NULL);
}

/* ---- multi: many requests at once beside a stalled stream ---------------- */

/*
 * A streamed `yes` whose credit is never granted back uses up its window;
 * then n short execs run on the same connection beside the stalled stream.
 * Once all of them are answered, the stalled stream gets MULTI_RESUME bytes
 * of credit and must deliver them: it was paused by flow control, not
 * broken. stalled_bytes is what it sent before that (at most the window).
 */
#define MULTI_RESUME (1u << 20)

static int multi_left;
static uint64_t multi_max_ms;
static uint64_t multi_stalled;
static bool multi_resuming, multi_launched;
static struct guestc_req *flood;

static void multi_launch(void);

static void
multi_print(void)
{
    printf("{\"done\":%d,\"max_ms\":%llu,\"stalled_bytes\":%llu,"
           "\"resumed_bytes\":%llu}\n", atoi(o.args[0]),
           (unsigned long long)multi_max_ms,
           (unsigned long long)multi_stalled,
           (unsigned long long)(xfer_bytes - multi_stalled));
    fflush(stdout);
    done(exit_code == 3 ? 1 : 0);
}

static void
flood_data(struct guestc_req *r, enum guestc_stream s, const void *d,
           size_t n, bool eof)
{
    (void)s;
    (void)d;
    (void)eof;
    xfer_bytes += n; /* not granted back: the guest must stall it alone */
    if (!multi_launched && xfer_bytes >= PD_STREAM_WINDOW)
        multi_launch();
    if (multi_resuming && xfer_bytes - multi_stalled >= MULTI_RESUME) {
        guestc_req_cancel(r);
        flood = NULL;
        multi_print();
    }
}

static void
flood_end(struct guestc_req *r, const struct pd_msg *m)
{
    (void)r;
    (void)m;
    flood = NULL;
    if (!multi_launched)
        multi_launch();
}

static void
flood_err(struct guestc_req *r, int errnum, const char *msg)
{
    (void)r;
    (void)errnum;
    (void)msg;
    flood = NULL;
    if (!multi_launched)
        multi_launch();
}

static void
multi_reply(struct guestc_req *r, const struct pd_msg *m)
{
    uint64_t ms = pd_now_ms() - t_start;
    int64_t code = -1;

    (void)r;
    pd_msg_i64(m, "exit_code", &code);
    if (code != 0)
        exit_code = 3;
    if (ms > multi_max_ms)
        multi_max_ms = ms;
    if (--multi_left > 0)
        return;
    multi_stalled = xfer_bytes;
    if (flood == NULL) {
        multi_print();
        return;
    }
    multi_resuming = true;
    guestc_req_grant(flood, MULTI_RESUME);
}

static void
multi_launch(void)
{
    static const struct guestc_req_cb cb = {
        .on_reply = multi_reply,
        .on_error = on_error,
    };
    int n = atoi(o.args[0]);

    multi_launched = true;
    multi_left = n;
    for (int i = 0; i < n; i++) {
        struct guestc_exec x = {.command = "echo $$"};

        guestc_exec(gc, &x, &cb, NULL);
    }
}

static void
do_multi(void)
{
    static const struct guestc_req_cb fcb = {
        .on_data = flood_data,
        .on_reply = flood_end,
        .on_error = flood_err,
    };
    static const char *const yes[] = {"yes", NULL};
    struct guestc_exec fx = {.argv = yes, .stream = true};

    flood = guestc_exec(gc, &fx, &fcb, NULL);
    if (flood != NULL)
        guestc_req_manual_window(flood);
    else
        multi_launch();
}

/* ---- tunnel: a local listener whose connections go to a guest port ------- */

struct tconn {
    uv_tcp_t tcp;
    struct guestc_req *r;
    bool reading, closed;
};

static uv_tcp_t listener;

static void
tconn_closed(uv_handle_t *h)
{
    free(h->data);
}

static void
tconn_close(struct tconn *t)
{
    if (t->closed)
        return;
    t->closed = true;
    if (t->r != NULL) {
        guestc_req_cancel(t->r);
        t->r = NULL;
    }
    uv_close((uv_handle_t *)&t->tcp, tconn_closed);
}

static void
t_alloc(uv_handle_t *h, size_t s, uv_buf_t *b)
{
    (void)h;
    (void)s;
    b->base = malloc(65536);
    b->len = b->base ? 65536 : 0;
}

static void
t_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
    struct tconn *t = s->data;

    if (n < 0 && t->r != NULL) {
        guestc_req_send_data(t->r, NULL, 0, true);
        uv_read_stop(s);
        t->reading = false;
    } else if (n < 0) {
        tconn_close(t);
    } else if (n > 0 && t->r != NULL) {
        if (guestc_req_send_data(t->r, b->base, (size_t)n, false) != 0) {
            tconn_close(t);
        } else if (guestc_req_credit(t->r) < 65536) {
            uv_read_stop(s);
            t->reading = false;
        }
    }
    free(b->base);
}

static void
t_writable(struct guestc_req *r)
{
    struct tconn *t = guestc_req_data(r);

    if (!t->reading && !t->closed) {
        t->reading = true;
        uv_read_start((uv_stream_t *)&t->tcp, t_alloc, t_read);
    }
}

static void
tun_opened(struct guestc_req *r, const struct pd_msg *m)
{
    (void)m;
    t_writable(r);
}

struct twrite {
    uv_write_t w;
    struct guestc_req *r;
    size_t n;
    char data[];
};

static void
t_written(uv_write_t *w, int status)
{
    struct twrite *tw = (struct twrite *)w;
    struct tconn *t = w->data;

    if (status == 0 && t->r != NULL && !t->closed)
        guestc_req_grant(t->r, tw->n);
    free(tw);
}

static void
t_shutdown_done(uv_shutdown_t *s, int status)
{
    (void)status;
    free(s);
}

static void
t_data(struct guestc_req *r, enum guestc_stream s, const void *d, size_t n,
       bool eof)
{
    struct tconn *t = guestc_req_data(r);
    struct twrite *tw;
    uv_buf_t b;

    (void)s;
    if (n > 0 && (tw = malloc(sizeof(*tw) + n)) != NULL) {
        memcpy(tw->data, d, n);
        tw->n = n;
        tw->w.data = t;
        b = uv_buf_init(tw->data, (unsigned)n);
        uv_write(&tw->w, (uv_stream_t *)&t->tcp, &b, 1, t_written);
    }
    if (eof) {
        uv_shutdown_t *sh = malloc(sizeof(*sh));

        if (sh != NULL)
            uv_shutdown(sh, (uv_stream_t *)&t->tcp, t_shutdown_done);
    }
}

static void
t_end(struct guestc_req *r, const struct pd_msg *m)
{
    struct tconn *t = guestc_req_data(r);

    (void)m;
    t->r = NULL;
    tconn_close(t);
}

static void
t_error(struct guestc_req *r, int errnum, const char *msg)
{
    struct tconn *t = guestc_req_data(r);

    fprintf(stderr, "pd-guest: tunnel: %s: %s\n", pd_errno_name(errnum), msg);
    t->r = NULL;
    tconn_close(t);
}

static void
on_tcp_conn(uv_stream_t *srv, int status)
{
    static const struct guestc_req_cb cb = {
        .on_start = tun_opened,
        .on_data = t_data,
        .on_reply = t_end,
        .on_error = t_error,
        .on_writable = t_writable,
    };
    struct tconn *t;

    if (status != 0 || (t = calloc(1, sizeof(*t))) == NULL)
        return;
    uv_tcp_init(loop, &t->tcp);
    t->tcp.data = t;
    if (uv_accept(srv, (uv_stream_t *)&t->tcp) != 0 || gc == NULL) {
        tconn_close(t);
        return;
    }
    t->r = guestc_tunnel(gc, (unsigned)atoi(o.args[0]), &cb, t);
    if (t->r == NULL) {
        tconn_close(t);
        return;
    }
    guestc_req_manual_window(t->r);
}

static void
do_tunnel(void)
{
    struct sockaddr_in sa;

    uv_tcp_init(loop, &listener);
    uv_ip4_addr("127.0.0.1", (int)o.listen_port, &sa);
    if (uv_tcp_bind(&listener, (struct sockaddr *)&sa, 0) != 0 ||
        uv_listen((uv_stream_t *)&listener, 16, on_tcp_conn) != 0) {
        fprintf(stderr, "pd-guest: cannot listen on 127.0.0.1:%u\n",
                o.listen_port);
        uv_close((uv_handle_t *)&listener, NULL);
        done(1);
        return;
    }
    printf("{\"listening\":%u}\n", o.listen_port);
    fflush(stdout);
}

/* ---- bad input: raw bytes over a plain socket ---------------------------- */

/*
 * Each kind sends one piece of bad input on a raw connection and prints
 * every frame that comes back, until the answers it waits for came (an
 * ERROR, EXIT id 1 and OK id 2, as far as the kind allows) or 15 s went by,
 * then 200 ms more to catch stragglers. Around the bad input the same
 * connection carries good requests, to show the agent keeps serving them:
 * EXEC id 1 ("sleep 0.3; echo alive", in flight while the bad bytes
 * arrive) before it and INFO id 2 after it. "nohello" and "version" send
 * no good requests (the session never starts).
 */
static const char *const bad_kinds[] = {
    "garbage", "huge", "unknown", "badtype", "types", "nulpath", "dotdot",
    "noid", "dupid", "version", "nohello", NULL};

static void
raw_send(int fd, struct pd_enc *e)
{
    void *frame;
    size_t flen;

    if (pd_enc_finish(e, &frame, &flen) != 0)
        return;
    (void)!write(fd, frame, flen);
    free(frame);
}

static void
raw_hello(int fd, uint64_t version)
{
    struct pd_enc e;

    pd_enc_begin(&e, PD_MSG_HELLO, 0);
    pd_enc_u64(&e, "v", version);
    pd_enc_str(&e, "role", "agent");
    pd_enc_str(&e, "name", "bad");
    raw_send(fd, &e);
}

static void
raw_exec(int fd, uint64_t id, const char *command)
{
    struct pd_enc e;

    pd_enc_begin(&e, PD_MSG_EXEC, id);
    pd_enc_str(&e, "command", command);
    raw_send(fd, &e);
}

/* Writes the bad input of kind; returns false for an unknown kind. */
static bool
raw_bad(int fd, const char *kind)
{
    /* A sane length, then bytes that are no msgpack map. */
    static const unsigned char garbage[] = {0, 0, 0, 8, 0xc1, 0xc1, 0xc1,
                                            0xc1, 0xc1, 0xc1, 0xc1, 0xc1};
    struct pd_enc e;

    if (strcmp(kind, "garbage") == 0) {
        (void)!write(fd, garbage, sizeof(garbage));
    } else if (strcmp(kind, "huge") == 0) {
        /* "GET " read as a length is over the frame cap. */
        (void)!write(fd, "GET / HTTP/1.1\r\n\r\n", 18);
    } else if (strcmp(kind, "unknown") == 0) {
        /* A node agent request: known to the codec, not a guest one. */
        pd_enc_begin(&e, PD_MSG_SANDBOX_LIST, 7);
        raw_send(fd, &e);
    } else if (strcmp(kind, "badtype") == 0) {
        /* In the guest range but unassigned: the decoder refuses it. */
        pd_enc_begin(&e, 180, 7);
        raw_send(fd, &e);
    } else if (strcmp(kind, "types") == 0) {
        pd_enc_begin(&e, PD_MSG_EXEC, 9);
        pd_enc_u64(&e, "argv", 42);
        raw_send(fd, &e);
    } else if (strcmp(kind, "nulpath") == 0) {
        pd_enc_begin(&e, PD_MSG_FILE_STAT, 5);
        pd_enc_strn(&e, "path", "/etc\0/passwd", 12);
        raw_send(fd, &e);
    } else if (strcmp(kind, "dotdot") == 0) {
        pd_enc_begin(&e, PD_MSG_FILE_READ, 5);
        pd_enc_str(&e, "path", "a/b/../../../etc/passwd");
        raw_send(fd, &e);
    } else if (strcmp(kind, "noid") == 0) {
        pd_enc_begin(&e, PD_MSG_INFO, 0);
        raw_send(fd, &e);
    } else if (strcmp(kind, "dupid") == 0) {
        raw_exec(fd, 1, "echo twin");
    } else {
        return false;
    }
    return true;
}

static int
bad_input(const char *sock, const char *kind)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    bool session = strcmp(kind, "nohello") != 0 &&
                   strcmp(kind, "version") != 0;
    bool desync = strcmp(kind, "huge") == 0; /* no INFO answer */
    bool got_error = false, got_exit = false, got_info = false;
    bool all_in = false;
    unsigned char buf[65536];
    struct pd_decoder dec;
    const struct pd_msg *m;
    struct pd_enc e;
    uint64_t end;
    int fd, k;

    for (k = 0; bad_kinds[k] != NULL; k++)
        if (strcmp(bad_kinds[k], kind) == 0)
            break;
    if (bad_kinds[k] == NULL) {
        fprintf(stderr, "pd-guest: bad kinds:");
        for (k = 0; bad_kinds[k] != NULL; k++)
            fprintf(stderr, " %s", bad_kinds[k]);
        fprintf(stderr, "\n");
        return 2;
    }
    pd_strlcpy(sa.sun_path, sock, sizeof(sa.sun_path));
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        perror("pd-guest: connect");
        return 1;
    }
    if (strcmp(kind, "version") == 0) {
        raw_hello(fd, PD_PROTO_VERSION + 98);
    } else if (!session) {
        pd_enc_begin(&e, PD_MSG_INFO, 3);
        raw_send(fd, &e);
    } else {
        raw_hello(fd, PD_PROTO_VERSION);
        raw_exec(fd, 1, "sleep 0.3; echo alive");
        raw_bad(fd, kind);
        pd_enc_begin(&e, PD_MSG_INFO, 2);
        raw_send(fd, &e);
    }
    pd_decoder_init(&dec, PD_FRAME_MAX);
    end = pd_now_ms() + 15000;
    while (pd_now_ms() < end) {
        struct timeval tv = {0, 100000};
        ssize_t n;

        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        n = read(fd, buf, sizeof(buf));
        if (n == 0)
            break;
        if (n < 0)
            continue;
        pd_decoder_feed(&dec, buf, (size_t)n);
        while (pd_decoder_next(&dec, &m) > 0) {
            print_msg(m);
            got_error |= m->type == PD_MSG_ERROR;
            got_exit |= m->type == PD_MSG_EXIT && m->id == 1;
            got_info |= m->type == PD_MSG_OK && m->id == 2;
        }
        if (!all_in && got_error &&
            (!session || (got_exit && (got_info || desync)))) {
            all_in = true;
            end = pd_now_ms() + 200;
        }
    }
    pd_decoder_free(&dec);
    close(fd);
    return 0;
}

/* ---- boot ---------------------------------------------------------------- */

static pid_t qemu_pid;

static void
forward_term(int sig)
{
    (void)sig;
    if (qemu_pid > 0)
        kill(qemu_pid, SIGKILL);
}

static int
boot(int argc, char **argv)
{
    static const struct option opts[] = {
        {"kernel", 1, 0, 'k'}, {"initrd", 1, 0, 'i'}, {"dir", 1, 0, 'd'},
        {"disk-mb", 1, 0, 'D'}, {"mem", 1, 0, 'm'}, {"cpus", 1, 0, 'c'},
        {"id", 1, 0, 'I'}, {"accel", 1, 0, 'a'}, {"net", 0, 0, 'n'},
        {"egress", 0, 0, 'e'}, {"fwd", 1, 0, 'f'}, {"extra", 1, 0, 'x'},
        {"guest-format", 0, 0, 'g'}, {"boot-timeout", 1, 0, 't'},
        {"append", 1, 0, 'A'}, {"keep-disk", 0, 0, 'K'}, {0, 0, 0, 0}};
    struct agent_qemu_spec s = {.sandbox_id = "pd-guest", .net = false};
    struct agent_qemu_fwd fwds[8];
    const char *extra[17] = {0};
    const char *dir = NULL;
    char sock[512], disk[512], con[512], qmp[512], ready[512], err[512];
    char why[512];
    unsigned disk_mb = 0, boot_timeout = 120;
    bool guest_format = false, accel_auto = false, keep_disk = false;
    int nextra = 0, c, status;
    char **qargv;
    uint64_t t0;

    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'k': s.kernel = optarg; break;
        case 'i': s.initrd = optarg; break;
        case 'd': dir = optarg; break;
        case 'D': disk_mb = (unsigned)atoi(optarg); break;
        case 'm': s.memory_mb = (unsigned)atoi(optarg); break;
        case 'c': s.vcpus = (unsigned)atoi(optarg); break;
        case 'I': s.sandbox_id = optarg; break;
        case 'a':
            accel_auto = strcmp(optarg, "auto") == 0;
            s.accel = strcmp(optarg, "kvm") == 0 ? AGENT_ACCEL_KVM :
                      AGENT_ACCEL_TCG;
            break;
        case 'n': s.net = true; break;
        case 'e': s.egress = true; break;
        case 'f':
            if (s.nfwds < 8 &&
                sscanf(optarg, "%hu:%hu", &fwds[s.nfwds].host_port,
                       &fwds[s.nfwds].guest_port) == 2)
                s.nfwds++;
            break;
        case 'x':
            if (nextra < 16)
                extra[nextra++] = optarg;
            break;
        case 'g': guest_format = true; break;
        case 'K': keep_disk = true; break;
        case 't': boot_timeout = (unsigned)atoi(optarg); break;
        case 'A': s.cmdline_extra = optarg; break;
        default: return 2;
        }
    }
    if (s.kernel == NULL || s.initrd == NULL || dir == NULL) {
        fprintf(stderr, "pd-guest boot: --kernel, --initrd and --dir are "
                "required\n");
        return 2;
    }
    s.fwds = fwds;
    s.extra_args = extra;
    pd_mkdir_p(dir, 0700);
    snprintf(sock, sizeof(sock), "%s/guest.sock", dir);
    snprintf(disk, sizeof(disk), "%s/disk.img", dir);
    snprintf(con, sizeof(con), "%s/console.log", dir);
    snprintf(qmp, sizeof(qmp), "%s/qmp.sock", dir);
    snprintf(ready, sizeof(ready), "%s/ready", dir);
    unlink(sock);
    unlink(ready);
    if (accel_auto) {
        agent_qemu_probe(NULL, s.kernel, s.initrd, dir, 10000, &s.accel, why,
                         sizeof(why));
        fprintf(stderr, "pd-guest: accel %s\n", why);
    }
    if (keep_disk) {
        if (access(disk, R_OK | W_OK) != 0) {
            fprintf(stderr, "pd-guest: --keep-disk: %s: %s\n", disk,
                    strerror(errno));
            return 1;
        }
        s.disk_path = disk;
    } else if (disk_mb > 0) {
        unlink(disk);
        if (agent_qemu_disk_create(disk, disk_mb, !guest_format, err,
                                   sizeof(err)) != 0) {
            fprintf(stderr, "pd-guest: %s\n", err);
            return 1;
        }
        s.disk_path = disk;
    }
    s.guest_sock = sock;
    s.qmp_sock = qmp;
    s.console_log = con;
    if (agent_qemu_argv(&s, &qargv, err, sizeof(err)) != 0) {
        fprintf(stderr, "pd-guest: %s\n", err);
        return 2;
    }
    signal(SIGTERM, forward_term);
    signal(SIGINT, forward_term);
    t0 = pd_now_ms();
    qemu_pid = fork();
    if (qemu_pid == 0) {
        execvp(qargv[0], qargv);
        _exit(127);
    }
    agent_argv_free(qargv);
    if (qemu_pid < 0)
        return 1;
    if (agent_qemu_wait_hello(sock, boot_timeout * 1000, err,
                              sizeof(err)) != 0) {
        fprintf(stderr, "pd-guest: %s\n", err);
        kill(qemu_pid, SIGKILL);
        waitpid(qemu_pid, &status, 0);
        return 1;
    }
    {
        char msg[64];
        int n = snprintf(msg, sizeof(msg), "%llu\n",
                         (unsigned long long)(pd_now_ms() - t0));

        pd_write_file_atomic(ready, msg, (size_t)n, 0644);
        printf("ready %s", msg);
        fflush(stdout);
    }
    while (waitpid(qemu_pid, &status, 0) < 0 && errno == EINTR)
        ;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* ---- main ---------------------------------------------------------------- */

struct cmd {
    const char *name;
    int nargs; /* -1: rest of the line (argv) */
    void (*fn)(void);
};

static const struct cmd cmds[] = {
    {"exec", -1, do_exec},        {"put", 1, do_put},
    {"get", 1, do_get},           {"stat", 1, do_stat},
    {"ls", 1, do_ls},             {"mkdir", 1, do_mkdir},
    {"rm", 1, do_rm},             {"mv", 2, do_mv},
    {"info", 0, do_info},         {"shutdown", 0, do_shutdown},
    {"ps", 0, do_ps},             {"proc", 1, do_proc},
    {"start", -1, do_start},      {"logs", 1, do_logs},
    {"kill", 1, do_kill},         {"wait-port", 1, do_wait_port},
    {"tunnel", 1, do_tunnel},     {"multi", 1, do_multi},
};

int
main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"sock", 1, 0, 'S'}, {"dir", 1, 0, 'd'}, {"timeout", 1, 0, 'T'},
        {"stream", 0, 0, 's'}, {"stdin-stream", 0, 0, 'j'},
        {"timeout-ms", 1, 0, 'o'}, {"cwd", 1, 0, 'C'}, {"env", 1, 0, 'E'},
        {"stdin-file", 1, 0, 'F'}, {"output-max", 1, 0, 'O'},
        {"sh", 1, 0, 'H'}, {"name", 1, 0, 'N'}, {"signal", 1, 0, 'G'},
        {"kill-after-ms", 1, 0, 'K'}, {"mode", 1, 0, 'M'},
        {"append", 0, 0, 'a'}, {"listen", 1, 0, 'L'}, {0, 0, 0, 0}};
    static char sockbuf[512];
    const struct cmd *cmd = NULL;
    const char *local = NULL;
    int c;

    pd_log_init("pd-guest", PD_LOG_WARN);
    if (argc < 2) {
        fprintf(stderr, "usage: pd-guest boot|exec|put|get|stat|ls|mkdir|"
                "rm|mv|info|shutdown|ps|proc|start|logs|kill|wait-port|"
                "tunnel|bad ... (see the source header)\n");
        return 2;
    }
    if (strcmp(argv[1], "boot") == 0)
        return boot(argc - 1, argv + 1);
    signal(SIGPIPE, SIG_IGN);

    while ((c = getopt_long(argc, argv, "+rpf", opts, NULL)) != -1) {
        switch (c) {
        case 'S': o.sock = optarg; break;
        case 'd':
            snprintf(sockbuf, sizeof(sockbuf), "%s/guest.sock", optarg);
            o.sock = sockbuf;
            break;
        case 'T': o.timeout_ms = (unsigned)(atof(optarg) * 1000); break;
        case 's': o.stream = true; break;
        case 'j': o.stdin_stream = true; break;
        case 'o': o.exec_timeout = strtoull(optarg, NULL, 10); break;
        case 'C': o.cwd = optarg; break;
        case 'E':
            if (o.nenv < MAX_ENV)
                o.env[o.nenv++] = optarg;
            break;
        case 'F': o.stdin_file = optarg; break;
        case 'O': o.output_max = strtoull(optarg, NULL, 10); break;
        case 'H': o.sh = optarg; break;
        case 'N': o.name = optarg; break;
        case 'G': o.sig = atoi(optarg); break;
        case 'K': o.kill_after = strtoull(optarg, NULL, 10); break;
        case 'M': o.mode = (unsigned)strtoul(optarg, NULL, 8); break;
        case 'a': o.append = true; break;
        case 'L': o.listen_port = (unsigned)atoi(optarg); break;
        case 'r': o.recursive = true; break;
        case 'p': o.parents = true; break;
        case 'f': o.follow = true; break;
        default: return 2;
        }
        /* Options may follow the command word: restart after it. */
    }
    if (optind >= argc || o.sock == NULL) {
        fprintf(stderr, "pd-guest: a command and --sock or --dir are "
                "needed\n");
        return 2;
    }
    if (strcmp(argv[optind], "bad") == 0)
        return optind + 1 < argc ? bad_input(o.sock, argv[optind + 1]) : 2;
    for (size_t i = 0; i < PD_ARRAY_SIZE(cmds); i++)
        if (strcmp(cmds[i].name, argv[optind]) == 0)
            cmd = &cmds[i];
    if (cmd == NULL) {
        fprintf(stderr, "pd-guest: unknown command %s\n", argv[optind]);
        return 2;
    }
    /* Options after the command word, then its arguments. */
    {
        int sub_argc = argc - optind;
        char **sub_argv = argv + optind;

        /*
         * 0, not 1: glibc re-reads the option string only then. With 1 it
         * keeps the first pass's "+" (stop at the first operand), and
         * "logs NAME -f" silently lost its -f.
         */
        optind = 0;
        while ((c = getopt_long(sub_argc, sub_argv, "rpf", opts, NULL)) !=
               -1) {
            switch (c) {
            case 's': o.stream = true; break;
            case 'j': o.stdin_stream = true; break;
            case 'o': o.exec_timeout = strtoull(optarg, NULL, 10); break;
            case 'C': o.cwd = optarg; break;
            case 'E':
                if (o.nenv < MAX_ENV)
                    o.env[o.nenv++] = optarg;
                break;
            case 'F': o.stdin_file = optarg; break;
            case 'O': o.output_max = strtoull(optarg, NULL, 10); break;
            case 'H': o.sh = optarg; break;
            case 'N': o.name = optarg; break;
            case 'G': o.sig = atoi(optarg); break;
            case 'K': o.kill_after = strtoull(optarg, NULL, 10); break;
            case 'M': o.mode = (unsigned)strtoul(optarg, NULL, 8); break;
            case 'a': o.append = true; break;
            case 'L': o.listen_port = (unsigned)atoi(optarg); break;
            case 'r': o.recursive = true; break;
            case 'p': o.parents = true; break;
            case 'f': o.follow = true; break;
            default: return 2;
            }
        }
        o.args = sub_argv + optind;
        o.nargs = sub_argc - optind;
    }
    if (cmd->nargs >= 0 && o.nargs < cmd->nargs) {
        fprintf(stderr, "pd-guest %s: %d argument(s) needed\n", cmd->name,
                cmd->nargs);
        return 2;
    }
    if (cmd->nargs == -1 && o.nargs == 0 && o.sh == NULL) {
        fprintf(stderr, "pd-guest %s: give -- ARGV... or --sh STRING\n",
                cmd->name);
        return 2;
    }
    if (cmd->fn == do_tunnel && o.listen_port == 0) {
        fprintf(stderr, "pd-guest tunnel: --listen PORT is needed\n");
        return 2;
    }
    /* put/get: the local side, default stdin/stdout. */
    if (cmd->fn == do_put || cmd->fn == do_get) {
        local = o.nargs > 1 && strcmp(o.args[1], "-") != 0 ? o.args[1] : NULL;
        if (cmd->fn == do_put) {
            stdin_fd = local ? open(local, O_RDONLY | O_CLOEXEC) : 0;
            if (stdin_fd < 0) {
                perror(local);
                return 1;
            }
        } else if (local != NULL) {
            out_fd = open(local, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
                          0644);
            if (out_fd < 0) {
                perror(local);
                return 1;
            }
        }
    }
    loop = uv_default_loop();
    return run(o.sock, o.timeout_ms, cmd->fn);
}
