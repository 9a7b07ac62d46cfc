/*
 * Background processes: started by name, kept with a bounded log of their
 * output, listed, followed, signalled. They belong to the VM, not to a host
 * session, so a node agent that reconnects finds them still there.
 *
 * Output is always read (into the ring), so a process never blocks on a
 * slow or absent reader; a follower reads the ring at its own pace and
 * skips ahead when it fell behind what the ring still holds. The OK that
 * ends PROC_LOGS carries, beside the process map, "skipped": the bytes
 * this reader never saw because the ring had dropped them.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "guest-agent/guest.h"

#define KILL_AFTER_DEFAULT_MS 5000
#define PORT_RETRY_MS 50

struct gproc {
    char name[PD_ID_MAX + 1];
    pid_t pid;
    char *cg;
    char **argv;
    bool running;
    int status;
    int open_pipes;
    int followers;
    uint64_t started_ms, ended_ms; /* wall clock */
    struct ring log;
    struct gwatch wout, werr;
    struct gtimer kill_timer;
    struct gproc *next;
};

static struct gproc *procs;
static unsigned nprocs;
static unsigned long auto_seq;

static struct gproc *
proc_find(const char *name)
{
    for (struct gproc *p = procs; p != NULL; p = p->next)
        if (strcmp(p->name, name) == 0)
            return p;
    return NULL;
}

static bool
proc_done(const struct gproc *p)
{
    return !p->running && p->open_pipes == 0;
}

static void
proc_free(struct gproc *p)
{
    for (struct gproc **pp = &procs; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == p) {
            *pp = p->next;
            nprocs--;
            break;
        }
    }
    timer_stop(&p->kill_timer);
    for (struct gwatch *w = &p->wout; w <= &p->werr; w++) {
        watch_del(w);
        if (w->fd >= 0)
            close(w->fd);
    }
    spawn_cgroup_release(p->cg);
    free(p->cg);
    pd_strv_free(p->argv);
    ring_free(&p->log);
    free(p);
}

/* Makes room for one more: the oldest finished process nobody follows. */
static bool
proc_evict_one(void)
{
    struct gproc *old = NULL;

    for (struct gproc *p = procs; p != NULL; p = p->next)
        if (proc_done(p) && p->followers == 0 &&
            (old == NULL || p->ended_ms <= old->ended_ms))
            old = p;
    if (old == NULL)
        return false;
    proc_free(old);
    return true;
}

/* ---- output ------------------------------------------------------------- */

static short
pipe_want(struct gwatch *w)
{
    return w->fd >= 0 ? POLLIN : 0;
}

static void
pipe_ready(struct gwatch *w, short rev)
{
    static unsigned char buf[65536];
    struct gproc *p = w->obj;
    ssize_t n = read(w->fd, buf, sizeof(buf));

    (void)rev;
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n <= 0) {
        watch_del(w);
        close(w->fd);
        w->fd = -1;
        p->open_pipes--;
        return;
    }
    if (ring_append(&p->log, w == &p->werr ? 2 : 1, buf, (size_t)n) != 0)
        pd_warn("proc", "%s: out of memory for its log, output dropped",
                p->name);
}

bool
proc_child_exited(pid_t pid, int status)
{
    for (struct gproc *p = procs; p != NULL; p = p->next) {
        if (p->pid != pid || !p->running)
            continue;
        p->running = false;
        p->status = status;
        p->ended_ms = pd_wall_ms();
        timer_stop(&p->kill_timer);
        pd_debug("proc", "%s: pid %d ended", p->name, (int)pid);
        /* Leftover grandchildren keep the cgroup; it goes when they do. */
        spawn_cgroup_release(p->cg);
        return true;
    }
    return false;
}

void
proc_kill_all(void)
{
    for (struct gproc *p = procs; p != NULL; p = p->next)
        if (p->running)
            spawn_kill_all(p->cg, p->pid, SIGKILL);
}

/* ---- replies ------------------------------------------------------------ */

static void
pack_kv_str(struct pd_enc *e, const char *k, const char *v)
{
    pd_enc_pack_str(e, k);
    pd_enc_pack_str(e, v);
}

static void
pack_kv_i64(struct pd_enc *e, const char *k, int64_t v)
{
    pd_enc_pack_str(e, k);
    msgpack_pack_int64(&e->pk, v);
}

/* One process as a map: the same fields in PROC_GET and PROC_LIST. */
static void
pack_proc(struct pd_enc *e, const struct gproc *p)
{
    size_t argc = 0;
    int code = -1, sig = 0;

    if (!p->running && WIFEXITED(p->status))
        code = WEXITSTATUS(p->status);
    if (!p->running && WIFSIGNALED(p->status))
        sig = WTERMSIG(p->status);
    while (p->argv[argc] != NULL)
        argc++;
    msgpack_pack_map(&e->pk, 8);
    pack_kv_str(e, "proc", p->name);
    pack_kv_i64(e, "pid", p->pid);
    pd_enc_pack_str(e, "running");
    if (p->running)
        msgpack_pack_true(&e->pk);
    else
        msgpack_pack_false(&e->pk);
    pack_kv_i64(e, "exit_code", code);
    pack_kv_i64(e, "signal", sig);
    pack_kv_i64(e, "started_ms", (int64_t)p->started_ms);
    pack_kv_i64(e, "ended_ms", (int64_t)p->ended_ms);
    pd_enc_pack_str(e, "argv");
    msgpack_pack_array(&e->pk, (uint32_t)argc);
    for (size_t i = 0; i < argc; i++)
        pd_enc_pack_str(e, p->argv[i]);
}

static int
proc_field(const struct pd_msg *m, struct gproc **out)
{
    char name[PD_ID_MAX + 1];
    int rv = pd_msg_cstr(m, "proc", name, sizeof(name));

    if (rv != 0 || !pd_id_valid(name)) {
        chan_error(m->id, EINVAL, "proc must be an id like [a-z0-9-]");
        return -EINVAL;
    }
    *out = proc_find(name);
    if (*out == NULL) {
        chan_error(m->id, ENOENT, "no process named %s", name);
        return -ENOENT;
    }
    return 0;
}

/* ---- requests ----------------------------------------------------------- */

void
proc_start_request(const struct pd_msg *m)
{
    char err[256] = "", name[PD_ID_MAX + 1] = "";
    struct gcmd cmd;
    struct gspawn sp;
    struct gproc *p, *old;
    int po[2] = {-1, -1}, pe[2] = {-1, -1};
    pid_t pid;
    int rv;

    rv = pd_msg_cstr(m, "proc", name, sizeof(name));
    if (rv == -ENOENT) {
        do {
            snprintf(name, sizeof(name), "p%lu", ++auto_seq);
        } while (proc_find(name) != NULL);
    } else if (rv != 0 || !pd_id_valid(name)) {
        chan_error(m->id, EINVAL, "proc must be an id like [a-z0-9-]");
        return;
    }
    old = proc_find(name);
    if (old != NULL && !proc_done(old)) {
        chan_error(m->id, EEXIST, "process %s is still running", name);
        return;
    }
    if (old != NULL && old->followers > 0) {
        chan_error(m->id, EBUSY, "process %s has followers", name);
        return;
    }
    if (old != NULL)
        proc_free(old);
    if (nprocs >= GUEST_PROCS_MAX && !proc_evict_one()) {
        chan_error(m->id, EAGAIN, "%d processes are running already",
                   GUEST_PROCS_MAX);
        return;
    }
    rv = gcmd_parse(m, &cmd, err, sizeof(err));
    if (rv != 0) {
        chan_error(m->id, -rv, "%s", err);
        return;
    }
    p = calloc(1, sizeof(*p));
    if (p == NULL || pipe2(po, O_CLOEXEC) != 0 || pipe2(pe, O_CLOEXEC) != 0) {
        rv = p == NULL ? ENOMEM : errno;
        goto fail;
    }
    sp.argv = cmd.argv;
    sp.envp = cmd.envp;
    sp.cwd = cmd.cwd;
    sp.stdin_fd = -1;
    sp.stdout_fd = po[1];
    sp.stderr_fd = pe[1];
    pid = spawn_child(&sp, &p->cg);
    if (pid < 0) {
        rv = (int)-pid;
        snprintf(err, sizeof(err), "cannot run %s: %s", cmd.argv[0],
                 strerror(rv));
        goto fail;
    }
    close(po[1]);
    close(pe[1]);
    pd_strlcpy(p->name, name, sizeof(p->name));
    p->pid = pid;
    p->argv = cmd.argv;
    cmd.argv = NULL;
    gcmd_free(&cmd);
    p->running = true;
    p->started_ms = pd_wall_ms();
    ring_init(&p->log, GUEST_RING_BYTES);
    p->kill_timer.slot = -1;
    p->kill_timer.obj = p;
    p->open_pipes = 2;
    p->wout = (struct gwatch){.fd = po[0], .want = pipe_want,
                              .ready = pipe_ready, .obj = p, .slot = -1};
    p->werr = (struct gwatch){.fd = pe[0], .want = pipe_want,
                              .ready = pipe_ready, .obj = p, .slot = -1};
    fd_nonblock(po[0]);
    fd_nonblock(pe[0]);
    watch_add(&p->wout);
    watch_add(&p->werr);
    p->next = procs;
    procs = p;
    nprocs++;
    pd_info("proc", "%s: started pid %d", p->name, (int)pid);

    struct pd_enc e;

    pd_enc_begin(&e, PD_MSG_OK, m->id);
    pd_enc_str(&e, "proc", p->name);
    pd_enc_u64(&e, "pid", (uint64_t)pid);
    chan_send(&e);
    return;

fail:
    for (int i = 0; i < 2; i++) {
        if (po[i] >= 0)
            close(po[i]);
        if (pe[i] >= 0)
            close(pe[i]);
    }
    chan_error(m->id, rv, "%s", err[0] ? err : strerror(rv));
    gcmd_free(&cmd);
    free(p);
}

void
proc_list_request(const struct pd_msg *m)
{
    struct pd_enc e;

    pd_enc_begin(&e, PD_MSG_OK, m->id);
    pd_enc_key(&e, "procs");
    msgpack_pack_array(&e.pk, nprocs);
    for (struct gproc *p = procs; p != NULL; p = p->next)
        pack_proc(&e, p);
    chan_send(&e);
}

void
proc_get_request(const struct pd_msg *m)
{
    struct gproc *p;
    struct pd_enc e;

    if (proc_field(m, &p) != 0)
        return;
    pd_enc_begin(&e, PD_MSG_OK, m->id);
    pd_enc_key(&e, "proc");
    pack_proc(&e, p);
    chan_send(&e);
}

static void
kill_fire(struct gtimer *t)
{
    struct gproc *p = t->obj;

    if (!p->running)
        return;
    pd_info("proc", "%s: still running after its grace time, killing it",
            p->name);
    spawn_kill_all(p->cg, p->pid, SIGKILL);
}

void
proc_signal_request(const struct pd_msg *m)
{
    struct gproc *p;
    int64_t sig = SIGTERM;
    uint64_t after = KILL_AFTER_DEFAULT_MS;
    int rv;

    if (proc_field(m, &p) != 0)
        return;
    rv = pd_msg_i64(m, "signal", &sig);
    if (rv == -EPROTO || sig < 1 || sig >= NSIG) {
        chan_error(m->id, EINVAL, "signal must be a number from 1 to %d",
                   NSIG - 1);
        return;
    }
    if (pd_msg_u64(m, "kill_after_ms", &after) == -EPROTO) {
        chan_error(m->id, EINVAL, "kill_after_ms must be a number");
        return;
    }
    if (!p->running) {
        chan_error(m->id, ESRCH, "process %s has ended", p->name);
        return;
    }
    /* The whole process group; SIGKILL reaches the whole cgroup. */
    spawn_kill_all(sig == SIGKILL ? p->cg : NULL, p->pid, (int)sig);
    if (sig != SIGKILL && after > 0) {
        p->kill_timer.fire = kill_fire;
        timer_arm(&p->kill_timer, after);
    }
    chan_ok(m->id);
}

/* ---- logs --------------------------------------------------------------- */

struct glogs {
    struct greq req;
    struct gproc *p;
    uint64_t seq;
    uint64_t skipped; /* bytes the ring dropped before this reader got them */
    bool follow;
    struct gwatch task;
};

static bool
logs_have(const struct glogs *l)
{
    return l->seq < l->p->log.end;
}

static short
logs_want(struct gwatch *w)
{
    struct glogs *l = w->obj;

    if (!chan_room())
        return 0;
    if (logs_have(l))
        return l->req.credit > 0 ? POLLIN : 0;
    /* Caught up: done unless following a live process. */
    return !l->follow || proc_done(l->p) ? POLLIN : 0;
}

static void
logs_free(struct glogs *l)
{
    watch_del(&l->task);
    l->p->followers--;
    free(l);
}

/*
 * Gathers the next run of one stream, contiguous in the output, into buf:
 * up to max bytes from l->seq on, across chunks. Returns its length and
 * sets *stream; bytes the ring dropped before l->seq caught up are counted
 * in l->skipped.
 */
static size_t
logs_gather(struct glogs *l, unsigned char *buf, size_t max, int *stream)
{
    const unsigned char *data;
    uint64_t at, seq = l->seq;
    size_t n = 0, len;
    int s;

    while (n < max) {
        at = ring_read(&l->p->log, seq, &s, &data, &len);
        if (len == 0 || (n > 0 && (s != *stream || at != seq)))
            break;
        if (n == 0) {
            l->skipped += at - seq;
            l->seq = at;
            *stream = s;
        }
        if (len > max - n)
            len = max - n;
        memcpy(buf + n, data, len);
        n += len;
        seq = at + len;
    }
    return n;
}

static void
logs_ready(struct gwatch *w, short rev)
{
    static unsigned char buf[GUEST_CHUNK];
    struct glogs *l = w->obj;
    struct pd_enc e;
    size_t max = sizeof(buf), len;
    int stream = 1;

    (void)rev;
    if (logs_have(l)) {
        if (max > l->req.credit)
            max = (size_t)l->req.credit;
        len = logs_gather(l, buf, max, &stream);
        if (len == 0)
            return;
        pd_enc_begin(&e, stream == 2 ? PD_MSG_STDERR : PD_MSG_STDOUT,
                     l->req.id);
        pd_enc_bin(&e, "data", buf, len);
        chan_send(&e);
        l->seq += len;
        l->req.credit -= len;
        return;
    }
    pd_enc_begin(&e, PD_MSG_OK, l->req.id);
    pd_enc_key(&e, "proc");
    pack_proc(&e, l->p);
    pd_enc_u64(&e, "skipped", l->skipped);
    chan_send(&e);
    greq_remove(&l->req);
    logs_free(l);
}

static void
logs_abort(struct greq *r)
{
    logs_free((struct glogs *)r);
}

static const struct greq_ops logs_ops = {.abort = logs_abort};

void
proc_logs_request(const struct pd_msg *m)
{
    struct gproc *p;
    struct glogs *l;

    if (proc_field(m, &p) != 0)
        return;
    l = calloc(1, sizeof(*l));
    if (l == NULL) {
        chan_error(m->id, ENOMEM, "out of memory");
        return;
    }
    l->p = p;
    if (pd_msg_bool(m, "follow", &l->follow) == -EPROTO) {
        free(l);
        chan_error(m->id, EINVAL, "follow must be a boolean");
        return;
    }
    l->seq = p->log.head != NULL ? p->log.head->seq : p->log.end;
    l->task = (struct gwatch){.fd = -1, .want = logs_want,
                              .ready = logs_ready, .obj = l, .slot = -1};
    p->followers++;
    watch_add(&l->task);
    greq_add(&l->req, m->id, m->type, &logs_ops);
}

/* ---- wait for a port ---------------------------------------------------- */

struct gwait {
    struct greq req;
    uint16_t port;
    uint64_t deadline;
    struct gwatch w;
    struct gtimer retry;
};

static void
wait_free(struct gwait *x)
{
    watch_del(&x->w);
    if (x->w.fd >= 0)
        close(x->w.fd);
    timer_stop(&x->retry);
    free(x);
}

static void
wait_end(struct gwait *x, int errnum)
{
    if (errnum == 0)
        chan_ok(x->req.id);
    else
        chan_error(x->req.id, errnum, "port %u did not accept a connection "
                   "in time", x->port);
    greq_remove(&x->req);
    wait_free(x);
}

static void wait_try(struct gtimer *t);

static void
wait_again(struct gwait *x)
{
    watch_del(&x->w);
    if (x->w.fd >= 0)
        close(x->w.fd);
    x->w.fd = -1;
    if (pd_now_ms() >= x->deadline) {
        wait_end(x, ETIMEDOUT);
        return;
    }
    timer_arm(&x->retry, PORT_RETRY_MS);
}

static short
wait_want(struct gwatch *w)
{
    return w->fd >= 0 ? POLLOUT : 0;
}

static void
wait_ready(struct gwatch *w, short rev)
{
    struct gwait *x = w->obj;
    int err = 0;
    socklen_t len = sizeof(err);

    (void)rev;
    if (getsockopt(w->fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0)
        wait_end(x, 0);
    else
        wait_again(x);
}

static void
wait_try(struct gtimer *t)
{
    struct gwait *x = t->obj;
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_port = htons(x->port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

    if (fd < 0) {
        wait_end(x, errno);
        return;
    }
    x->w.fd = fd;
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
        wait_end(x, 0);
        return;
    }
    if (errno != EINPROGRESS) {
        wait_again(x);
        return;
    }
    watch_add(&x->w);
}

static void
wait_abort(struct greq *r)
{
    wait_free((struct gwait *)r);
}

static const struct greq_ops wait_ops = {.abort = wait_abort};

void
proc_wait_port_request(const struct pd_msg *m)
{
    uint64_t port = 0, timeout = 30000;
    struct gwait *x;

    if (pd_msg_u64(m, "port", &port) != 0 || port == 0 || port > 65535) {
        chan_error(m->id, EINVAL, "port must be a number from 1 to 65535");
        return;
    }
    if (pd_msg_u64(m, "timeout_ms", &timeout) == -EPROTO) {
        chan_error(m->id, EINVAL, "timeout_ms must be a number");
        return;
    }
    x = calloc(1, sizeof(*x));
    if (x == NULL) {
        chan_error(m->id, ENOMEM, "out of memory");
        return;
    }
    x->port = (uint16_t)port;
    x->deadline = pd_now_ms() + timeout;
    x->w = (struct gwatch){.fd = -1, .want = wait_want, .ready = wait_ready,
                           .obj = x, .slot = -1};
    x->retry = (struct gtimer){.fire = wait_try, .obj = x, .slot = -1};
    greq_add(&x->req, m->id, m->type, &wait_ops);
    wait_try(&x->retry);
}
