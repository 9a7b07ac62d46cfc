/*
 * EXEC: run one command and report its end.
 *
 * Collected mode reads stdout and stderr to the end whatever their size,
 * keeping at most output_max bytes of each (truncated says some were
 * dropped), so a flood never blocks the command. Streamed mode sends
 * EXEC_START {pid}, then STDOUT/STDERR chunks as they come, within the
 * stream's credit: with no credit the pipes are not read and the command
 * blocks on its own output, which slows only this stream.
 *
 * The command ends when its first process exits and both pipes reach EOF.
 * A grandchild that keeps a pipe open gets EXIT_GRACE_MS before the exec is
 * reported anyway. Whatever the command started is killed when the exec
 * ends (long-lived work belongs in processes, proc.c). A timeout kills the
 * whole cgroup (process group and any grandchildren that left it) with
 * SIGKILL.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "guest-agent/guest.h"

#define EXIT_GRACE_MS 300
#define LEFTOVER_RETRY_MS 1000

struct obuf {
    unsigned char *data;
    size_t len, cap;
};

struct gexec {
    struct greq req;
    pid_t pid;
    char *cg;
    bool stream, exited, timed_out, truncated, stdin_stream, stdin_eof;
    int status;
    size_t output_max;
    uint64_t start_ms;
    struct gwatch win, wout, werr;
    struct obuf in, out, err;
    size_t in_off;
    struct gtimer timeout, grace;
    struct gexec *next;
};

static struct gexec *execs;

/* Cgroups whose last processes outlived their exec; removed when empty. */
static char **leftovers;
static size_t nleftovers;
static struct gtimer leftover_timer = {.slot = -1};

static void
leftover_sweep(struct gtimer *t)
{
    size_t j = 0;

    (void)t;
    for (size_t i = 0; i < nleftovers; i++) {
        if (spawn_cgroup_release(leftovers[i]))
            free(leftovers[i]);
        else
            leftovers[j++] = leftovers[i];
    }
    nleftovers = j;
    if (nleftovers > 0)
        timer_arm(&leftover_timer, LEFTOVER_RETRY_MS);
}

static void
leftover_add(char *cg)
{
    char **v;

    if (cg == NULL)
        return;
    if (spawn_cgroup_release(cg)) {
        free(cg);
        return;
    }
    v = realloc(leftovers, (nleftovers + 1) * sizeof(*v));
    if (v == NULL) {
        free(cg);
        return;
    }
    leftovers = v;
    leftovers[nleftovers++] = cg;
    leftover_timer.fire = leftover_sweep;
    timer_arm(&leftover_timer, LEFTOVER_RETRY_MS);
}

static void
close_watch(struct gwatch *w)
{
    watch_del(w);
    if (w->fd >= 0)
        close(w->fd);
    w->fd = -1;
}

static void
exec_free(struct gexec *x)
{
    for (struct gexec **pp = &execs; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == x) {
            *pp = x->next;
            break;
        }
    }
    close_watch(&x->win);
    close_watch(&x->wout);
    close_watch(&x->werr);
    timer_stop(&x->timeout);
    timer_stop(&x->grace);
    /* An exec ends with everything it started (daemons belong in
     * processes): this is also what stops a fork bomb whose first shell
     * returned at once. */
    spawn_kill_all(x->cg, x->cg == NULL ? x->pid : 0, SIGKILL);
    leftover_add(x->cg);
    free(x->in.data);
    free(x->out.data);
    free(x->err.data);
    free(x);
}

static void
exec_finish(struct gexec *x)
{
    struct pd_enc e;
    int code = -1, sig = 0;

    if (WIFEXITED(x->status))
        code = WEXITSTATUS(x->status);
    else if (WIFSIGNALED(x->status))
        sig = WTERMSIG(x->status);
    pd_enc_begin(&e, PD_MSG_EXIT, x->req.id);
    pd_enc_i64(&e, "exit_code", code);
    pd_enc_i64(&e, "signal", sig);
    pd_enc_bool(&e, "timed_out", x->timed_out);
    pd_enc_bool(&e, "truncated", x->truncated);
    pd_enc_u64(&e, "duration_ms", pd_now_ms() - x->start_ms);
    pd_enc_u64(&e, "pid", (uint64_t)x->pid);
    if (!x->stream) {
        pd_enc_bin(&e, "stdout", x->out.data, x->out.len);
        pd_enc_bin(&e, "stderr", x->err.data, x->err.len);
    }
    chan_send(&e);
    greq_remove(&x->req);
    exec_free(x);
}

static void
maybe_finish(struct gexec *x)
{
    if (!x->exited)
        return;
    if (x->wout.fd < 0 && x->werr.fd < 0) {
        exec_finish(x);
        return;
    }
    if (x->grace.slot < 0)
        timer_arm(&x->grace, EXIT_GRACE_MS);
}

static void
grace_fire(struct gtimer *t)
{
    struct gexec *x = t->obj;

    /* Output still waiting for the host's credit is not cut short. */
    if (x->stream && x->req.credit == 0 && chan_up()) {
        timer_arm(&x->grace, EXIT_GRACE_MS);
        return;
    }
    exec_finish(x);
}

static void
timeout_fire(struct gtimer *t)
{
    struct gexec *x = t->obj;

    x->timed_out = true;
    pd_debug("exec", "pid %d timed out, killing its cgroup", (int)x->pid);
    spawn_kill_all(x->cg, x->pid, SIGKILL);
}

/* ---- output ------------------------------------------------------------- */

static short
out_want(struct gwatch *w)
{
    struct gexec *x = w->obj;

    if (w->fd < 0)
        return 0;
    if (x->stream && (x->req.credit == 0 || !chan_room()))
        return 0;
    return POLLIN;
}

static void
collect(struct gexec *x, struct obuf *b, const unsigned char *p, size_t n)
{
    size_t take = n;

    if (b->len + take > x->output_max) {
        take = x->output_max - b->len;
        x->truncated = true;
    }
    if (take == 0)
        return;
    if (b->len + take > b->cap) {
        size_t cap = b->cap ? b->cap : 16384;
        unsigned char *d;

        while (cap < b->len + take)
            cap *= 2;
        if (cap > x->output_max)
            cap = x->output_max;
        d = realloc(b->data, cap);
        if (d == NULL) {
            x->truncated = true;
            return;
        }
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, take);
    b->len += take;
}

static void
out_ready(struct gwatch *w, short rev)
{
    static unsigned char buf[GUEST_CHUNK];
    struct gexec *x = w->obj;
    bool is_err = w == &x->werr;
    size_t want = sizeof(buf);
    ssize_t n;

    (void)rev;
    if (x->stream && x->req.credit < want)
        want = (size_t)x->req.credit;
    n = read(w->fd, buf, want);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n <= 0) {
        close_watch(w);
        maybe_finish(x);
        return;
    }
    if (x->stream) {
        struct pd_enc e;

        pd_enc_begin(&e, is_err ? PD_MSG_STDERR : PD_MSG_STDOUT, x->req.id);
        pd_enc_bin(&e, "data", buf, (size_t)n);
        chan_send(&e);
        x->req.credit -= (uint64_t)n;
    } else {
        collect(x, is_err ? &x->err : &x->out, buf, (size_t)n);
    }
}

/* ---- input -------------------------------------------------------------- */

static short
in_want(struct gwatch *w)
{
    struct gexec *x = w->obj;

    if (w->fd < 0)
        return 0;
    if (x->in_off < x->in.len)
        return POLLOUT;
    if (x->stdin_eof) {
        close_watch(w);
        return 0;
    }
    return 0;
}

static void
in_ready(struct gwatch *w, short rev)
{
    struct gexec *x = w->obj;
    ssize_t n;

    if (rev & (POLLERR | POLLHUP)) {
        /* The command closed its stdin: drop what it will never read. */
        x->in_off = x->in.len = 0;
        x->stdin_eof = true;
        close_watch(w);
        return;
    }
    n = write(w->fd, x->in.data + x->in_off, x->in.len - x->in_off);
    if (n < 0) {
        if (errno != EAGAIN && errno != EINTR) {
            x->in_off = x->in.len = 0;
            x->stdin_eof = true;
            close_watch(w);
        }
        return;
    }
    x->in_off += (size_t)n;
    if (x->stdin_stream)
        chan_window(x->req.id, (uint64_t)n);
    if (x->in_off == x->in.len) {
        x->in_off = x->in.len = 0;
        if (x->stdin_eof)
            close_watch(w);
    }
}

static void
exec_on_msg(struct greq *r, const struct pd_msg *m)
{
    struct gexec *x = (struct gexec *)r;
    const void *p;
    size_t n;
    bool eof = false;

    if (m->type != PD_MSG_STDIN || !x->stdin_stream || x->stdin_eof)
        return;
    pd_msg_bool(m, "eof", &eof);
    if (pd_msg_bin(m, "data", &p, &n) == 0 && n > 0 && x->win.fd >= 0) {
        /* Bounded by the window the host honours; a host that ignores it
         * is cut off at twice the window. */
        if (x->in.len + n > 2ull * PD_STREAM_WINDOW) {
            chan_error(r->id, ENOBUFS, "stdin sent beyond the window");
            x->stdin_eof = true;
            return;
        }
        size_t keep = x->in.len;

        if (keep + n > x->in.cap) {
            size_t cap = (keep + n) * 2;
            unsigned char *d = realloc(x->in.data, cap);

            if (d == NULL)
                return;
            x->in.data = d;
            x->in.cap = cap;
        }
        memcpy(x->in.data + keep, p, n);
        x->in.len += n;
    }
    if (eof)
        x->stdin_eof = true;
}

static void
exec_abort(struct greq *r)
{
    struct gexec *x = (struct gexec *)r;

    if (!x->exited)
        spawn_kill_all(x->cg, x->pid, SIGKILL);
    exec_free(x);
}

static const struct greq_ops exec_ops = {
    .on_msg = exec_on_msg,
    .abort = exec_abort,
};

bool
exec_child_exited(pid_t pid, int status)
{
    for (struct gexec *x = execs; x != NULL; x = x->next) {
        if (x->pid != pid || x->exited)
            continue;
        x->exited = true;
        x->status = status;
        maybe_finish(x);
        return true;
    }
    return false;
}

static void
watch_init(struct gwatch *w, int fd, struct gexec *x,
           short (*want)(struct gwatch *),
           void (*ready)(struct gwatch *, short))
{
    w->fd = fd;
    w->want = want;
    w->ready = ready;
    w->obj = x;
    w->slot = -1;
    if (fd >= 0)
        watch_add(w);
}

void
exec_request(const struct pd_msg *m)
{
    struct gcmd cmd;
    struct gexec *x;
    struct gspawn sp;
    int po[2] = {-1, -1}, pe[2] = {-1, -1}, pi[2] = {-1, -1};
    char err[256] = "";
    uint64_t timeout = 0, omax = GUEST_OUTPUT_DEFAULT;
    const void *in = NULL;
    size_t inlen = 0;
    pid_t pid;
    int rv;

    x = calloc(1, sizeof(*x));
    if (x == NULL) {
        chan_error(m->id, ENOMEM, "out of memory");
        return;
    }
    /* Absent fields keep their defaults; present ones must be typed. */
    if (pd_msg_bool(m, "stream", &x->stream) == -EPROTO ||
        pd_msg_bool(m, "stdin_stream", &x->stdin_stream) == -EPROTO ||
        pd_msg_u64(m, "timeout_ms", &timeout) == -EPROTO ||
        pd_msg_u64(m, "output_max", &omax) == -EPROTO ||
        pd_msg_bin(m, "stdin", &in, &inlen) == -EPROTO) {
        free(x);
        chan_error(m->id, EINVAL, "stream and stdin_stream must be "
                   "booleans, timeout_ms and output_max unsigned numbers, "
                   "stdin binary");
        return;
    }
    x->stdin_stream = x->stdin_stream && x->stream;
    x->output_max = omax > GUEST_OUTPUT_MAX ? GUEST_OUTPUT_MAX : omax;
    rv = gcmd_parse(m, &cmd, err, sizeof(err));
    if (rv != 0) {
        free(x);
        chan_error(m->id, -rv, "%s", err[0] ? err : strerror(-rv));
        return;
    }

    if (pipe2(po, O_CLOEXEC) != 0 || pipe2(pe, O_CLOEXEC) != 0 ||
        ((inlen > 0 || x->stdin_stream) && pipe2(pi, O_CLOEXEC) != 0)) {
        rv = -errno;
        goto fail;
    }
    fcntl(po[0], F_SETPIPE_SZ, 1 << 20);
    if (inlen > 0) {
        x->in.data = malloc(inlen);
        if (x->in.data == NULL) {
            rv = -ENOMEM;
            goto fail;
        }
        memcpy(x->in.data, in, inlen);
        x->in.len = x->in.cap = inlen;
        x->stdin_eof = !x->stdin_stream;
    }
    sp.argv = cmd.argv;
    sp.envp = cmd.envp;
    sp.cwd = cmd.cwd;
    sp.stdin_fd = pi[0];
    sp.stdout_fd = po[1];
    sp.stderr_fd = pe[1];
    x->start_ms = pd_now_ms();
    pid = spawn_child(&sp, &x->cg);
    if (pid < 0) {
        rv = (int)pid;
        snprintf(err, sizeof(err), "cannot run %s: %s", cmd.argv[0],
                 strerror(-rv));
        goto fail;
    }
    close(po[1]);
    close(pe[1]);
    if (pi[0] >= 0)
        close(pi[0]);
    gcmd_free(&cmd);
    x->pid = pid;
    fd_nonblock(po[0]);
    fd_nonblock(pe[0]);
    if (pi[1] >= 0)
        fd_nonblock(pi[1]);
    watch_init(&x->wout, po[0], x, out_want, out_ready);
    watch_init(&x->werr, pe[0], x, out_want, out_ready);
    watch_init(&x->win, pi[1], x, in_want, in_ready);
    x->timeout.fire = timeout_fire;
    x->timeout.obj = x;
    x->timeout.slot = -1;
    x->grace.fire = grace_fire;
    x->grace.obj = x;
    x->grace.slot = -1;
    if (timeout > 0)
        timer_arm(&x->timeout, timeout);
    greq_add(&x->req, m->id, m->type, &exec_ops);
    x->next = execs;
    execs = x;

    if (x->stream) {
        struct pd_enc e;

        pd_enc_begin(&e, PD_MSG_EXEC_START, m->id);
        pd_enc_u64(&e, "pid", (uint64_t)pid);
        chan_send(&e);
    }
    return;

fail:
    for (int i = 0; i < 2; i++) {
        if (po[i] >= 0)
            close(po[i]);
        if (pe[i] >= 0)
            close(pe[i]);
        if (pi[i] >= 0)
            close(pi[i]);
    }
    chan_error(m->id, -rv, "%s", err[0] ? err : strerror(-rv));
    gcmd_free(&cmd);
    free(x->in.data);
    free(x);
}
