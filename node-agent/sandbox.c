/*
 * Sandbox life cycle: one QEMU process per sandbox.
 *
 *   create:  check spec and capacity -> directory (0700, QEMU's user) ->
 *            sparse disk image -> mkfs.ext4 (child process) -> cgroup ->
 *            QEMU spawned from an argv -> QMP and guest sockets connected
 *            -> "running" when the guest agent's HELLO arrives
 *   destroy: guest SHUTDOWN -> QMP quit after stop_timeout -> SIGKILL after
 *            3 s more -> cgroup, disk and directory removed, row deleted
 *   crash:   QEMU exits on its own -> "failed" with the exit status, the
 *            last lines of its log and the cgroup's OOM kills; the disk is
 *            kept until destroy, the VM is never restarted blank
 *   restart: rows in sqlite are re-adopted when their pid still runs the
 *            same process (start time checked), else marked failed and
 *            their disks released
 *
 * Every host path is built from the data directory and an agent-chosen
 * random directory name; the sandbox id only names records and cgroups
 * (and is validated as [a-z0-9][a-z0-9-]{0,62} first).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <jansson.h>

#include "common/log.h"
#include "node-agent/agent.h"
#include "node-agent/egress.h"
#include "node-agent/qemu.h"
#include "node-agent/qmp.h"
#include "node-agent/state.h"

#define MIB (1024ULL * 1024ULL)
#define KILL_GRACE_MS 3000
#define SOCKET_RETRY_MS 50
#define LOG_TAIL 600
/* The slirp netdev of the argv qemu.c builds, for hostfwd_add. */
#define NETDEV_ID "net0"

static void vm_start(struct sandbox *sb);
static void sb_fail(struct sandbox *sb, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void destroy_step(struct sandbox *sb);
static void qmp_connect(struct sandbox *sb);

const char *
sb_state_name(enum sb_state s)
{
    static const char *const names[] = {"starting", "running", "stopping",
                                        "stopped", "failed"};

    return s <= SB_FAILED ? names[s] : "unknown";
}

static enum sb_state
state_from_name(const char *s)
{
    for (int i = SB_STARTING; i <= SB_FAILED; i++)
        if (strcmp(s, sb_state_name(i)) == 0)
            return i;
    return SB_FAILED;
}

struct sandbox *
sb_find(struct agent *a, const char *id)
{
    for (struct sandbox *sb = a->sandboxes; sb; sb = sb->next)
        if (strcmp(sb->id, id) == 0)
            return sb;
    return NULL;
}

/* A failed VM holds no CPU or memory; its disk until destroyed. */
void
sb_used(struct agent *a, struct agent_res *used)
{
    memset(used, 0, sizeof(*used));
    for (struct sandbox *sb = a->sandboxes; sb; sb = sb->next) {
        if (sb->state != SB_FAILED) {
            used->cpus += sb->cpus;
            used->memory_mb += sb->memory_mb + a->cfg.memory_overhead / MIB;
        }
        if (sb->dir[0] != '\0')
            used->disk_mb += sb->disk_mb;
    }
}

/* ---- persistence ------------------------------------------------------- */

static char *
spec_json(const struct sandbox *sb)
{
    json_t *o = json_pack("{s:i,s:I,s:I,s:s,s:s}", "cpus", sb->cpus,
                          "memory_mb", (json_int_t)sb->memory_mb, "disk_mb",
                          (json_int_t)sb->disk_mb, "egress", sb->egress,
                          "allow", sb->allow ? sb->allow : "");
    char *s;

    if (o == NULL)
        return NULL;
    if (sb->env_json != NULL)
        json_object_set_new(o, "env", json_loads(sb->env_json, 0, NULL));
    s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return s;
}

static char *
ports_json(const struct sandbox *sb)
{
    json_t *arr = json_array();
    char *s;

    for (const struct sb_port *p = sb->ports; p; p = p->next)
        json_array_append_new(arr, json_pack("{s:i,s:i}", "port", p->guest,
                                             "host_port", p->host));
    s = json_dumps(arr, JSON_COMPACT);
    json_decref(arr);
    return s;
}

static void
persist(struct sandbox *sb)
{
    char *spec = spec_json(sb), *ports = ports_json(sb);
    struct agent_state_row row = {
        .id = sb->id,
        .dir = sb->dir_name,
        .spec = spec,
        .state = sb_state_name(sb->state),
        .reason = sb->reason,
        .pid = sb->pid,
        .pid_start = sb->pid_start,
        .created_ms = sb->created_ms,
        .ports = ports,
    };

    if (spec == NULL || ports == NULL ||
        agent_state_put(sb->agent->state, &row) != 0)
        pd_error(sb->id, "cannot record the sandbox in the state: %s; an "
                 "agent restart may not re-adopt it",
                 agent_state_error(sb->agent->state));
    free(spec);
    free(ports);
}

static void
set_state(struct sandbox *sb, enum sb_state st)
{
    if (sb->state == st)
        return;
    sb->state = st;
    persist(sb);
    agent_report_state(sb->agent, sb);
}

/* ---- waiters ----------------------------------------------------------- */

static void
notify(struct sb_waiter **list, int status, const char *reason)
{
    struct sb_waiter *w = *list;

    *list = NULL;
    while (w != NULL) {
        struct sb_waiter *next = w->next;

        w->done(w->arg, status, reason);
        w = next;
    }
}

static void
add_waiter(struct sb_waiter **list, struct sb_waiter *w)
{
    if (w == NULL)
        return;
    w->next = *list;
    *list = w;
}

/* ---- process facts ----------------------------------------------------- */

/*
 * Reads a small /proc file whole. pd_read_file sizes its buffer with
 * fstat, and /proc files report a size of 0, so it reads nothing there.
 * Returns the length (NUL-terminated in buf) or -errno.
 */
static ssize_t
read_proc(const char *path, char *buf, size_t buflen)
{
    size_t got = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd < 0)
        return -errno;
    while (got + 1 < buflen) {
        ssize_t n = read(fd, buf + got, buflen - 1 - got);

        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    buf[got] = '\0';
    return (ssize_t)got;
}

/* Field 22 of /proc/<pid>/stat: the start time, in clock ticks. */
static int
proc_start_time(pid_t pid, uint64_t *out)
{
    char path[64], text[1024], *p;
    int field = 2;
    ssize_t n;

    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    n = read_proc(path, text, sizeof(text));
    if (n < 0)
        return (int)n;
    p = strrchr(text, ')'); /* the command name may hold spaces */
    for (; p != NULL && field < 22; field++)
        p = strchr(p + 1, ' ');
    return p != NULL && sscanf(p + 1, "%" SCNu64, out) == 1 ? 0 : -EPROTO;
}

/* True when pid's command line names the sandbox's directory: QEMU's
 * argv holds its socket paths, which no other process has. */
static bool
proc_names_dir(pid_t pid, const char *dir)
{
    char path[64], text[8192];
    size_t dl = strlen(dir);
    ssize_t n;

    snprintf(path, sizeof(path), "/proc/%d/cmdline", (int)pid);
    n = read_proc(path, text, sizeof(text));
    for (ssize_t i = 0; n > 0 && i + (ssize_t)dl < n; i++)
        if (memcmp(text + i, dir, dl) == 0 && text[i + (ssize_t)dl] == '/')
            return true;
    return false;
}

/* The last lines of one of the sandbox's logs (qemu.log: QEMU's own
 * stderr; console.log: the guest's serial console), on one line, for a
 * failure reason. */
static void
log_tail(const struct sandbox *sb, const char *name, char *out,
         size_t outlen)
{
    char path[PATH_MAX], buf[LOG_TAIL + 1];
    ssize_t n;
    off_t size;
    int fd;

    out[0] = '\0';
    snprintf(path, sizeof(path), "%s/%s", sb->dir, name);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    size = lseek(fd, 0, SEEK_END);
    n = pread(fd, buf, LOG_TAIL, size > LOG_TAIL ? size - LOG_TAIL : 0);
    close(fd);
    if (n <= 0)
        return;
    buf[n] = '\0';
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
        buf[--n] = '\0';
    for (ssize_t i = 0; i < n; i++)
        if (buf[i] == '\n' || buf[i] == '\r' || buf[i] == '\t')
            buf[i] = buf[i] == '\n' ? '|' : ' ';
    /* Start at a line boundary when we cut the log. */
    const char *start = buf;
    if (size > LOG_TAIL && strchr(buf, '|') != NULL)
        start = strchr(buf, '|') + 1;
    snprintf(out, outlen, "%s", start);
}

/* ---- handles ----------------------------------------------------------- */

static void
free_handle(uv_handle_t *h)
{
    free(h);
}

static void
stop_timer(struct sandbox *sb)
{
    if (sb->timer != NULL)
        uv_timer_stop(sb->timer);
}

static void
arm_timer(struct sandbox *sb, uint64_t ms, uv_timer_cb cb)
{
    if (sb->timer == NULL) {
        sb->timer = malloc(sizeof(*sb->timer));
        if (sb->timer == NULL)
            return;
        uv_timer_init(sb->agent->loop, sb->timer);
        sb->timer->data = sb;
    }
    uv_timer_start(sb->timer, cb, ms, 0);
}

/* Closes the QMP and guest links and the process watchers. */
static void
release_links(struct sandbox *sb, const char *why)
{
    relay_guest_close(sb, why);
    if (sb->qmp_timer != NULL)
        uv_timer_stop(sb->qmp_timer);
    if (sb->qmp != NULL) {
        struct agent_qmp *q = sb->qmp;

        /* Cleared first: the commands that fail inside the close must
         * not find it. */
        sb->qmp = NULL;
        agent_qmp_close(q);
    }
    if (sb->pidfd_poll != NULL) {
        uv_close((uv_handle_t *)sb->pidfd_poll, free_handle);
        sb->pidfd_poll = NULL;
    }
    if (sb->pidfd >= 0) {
        close(sb->pidfd);
        sb->pidfd = -1;
    }
    if (sb->egress_l != NULL) {
        agent_egress_unlisten(sb->egress_l);
        sb->egress_l = NULL;
    }
}

static void
free_sandbox(struct sandbox *sb)
{
    struct agent *a = sb->agent;

    for (struct sandbox **pp = &a->sandboxes; *pp; pp = &(*pp)->next) {
        if (*pp == sb) {
            *pp = sb->next;
            break;
        }
    }
    while (sb->ports != NULL) {
        struct sb_port *p = sb->ports;

        sb->ports = p->next;
        free(p);
    }
    if (sb->timer != NULL)
        uv_close((uv_handle_t *)sb->timer, free_handle);
    if (sb->qmp_timer != NULL)
        uv_close((uv_handle_t *)sb->qmp_timer, free_handle);
    free(sb->allow);
    free(sb->env_json);
    free(sb);
}

/* ---- exit and crash ---------------------------------------------------- */

static void
sb_fail(struct sandbox *sb, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(sb->reason, sizeof(sb->reason), fmt, ap);
    va_end(ap);
    pd_warn(sb->id, "failed: %s", sb->reason);
    stop_timer(sb);
    set_state(sb, SB_FAILED);
    notify(&sb->waiters, -EIO, sb->reason);
}

/* QEMU is gone: either the end of a destroy, or a crash. */
static void
vm_exited(struct sandbox *sb, int64_t status, int signum, bool known)
{
    char tail[LOG_TAIL + 1], why[128];
    uint64_t ooms = 0;

    agent_cg_oom_kills(&sb->agent->cg, sb->id, &ooms);
    release_links(sb, "the VM stopped");
    sb->pid = 0;
    sb->proc = NULL;
    agent_cg_remove(&sb->agent->cg, sb->id);
    if (sb->destroying) {
        destroy_step(sb);
        return;
    }
    if (ooms > sb->oom_before)
        snprintf(why, sizeof(why), "out of memory: the cgroup's OOM killer "
                 "killed QEMU (limit %llu MiB guest + %llu MiB overhead)",
                 (unsigned long long)sb->memory_mb,
                 (unsigned long long)(sb->agent->cfg.memory_overhead / MIB));
    else if (!known)
        snprintf(why, sizeof(why), "QEMU exited (status unknown: adopted "
                 "after an agent restart)");
    else if (signum != 0)
        snprintf(why, sizeof(why), "QEMU killed by signal %d (%s)", signum,
                 strsignal(signum));
    else if (status == 0)
        snprintf(why, sizeof(why), "the guest powered off or panicked "
                 "(QEMU exited with status 0)");
    else
        snprintf(why, sizeof(why), "QEMU exited with status %lld",
                 (long long)status);
    /* QEMU's stderr says why QEMU stopped; when it said nothing, the
     * console says why the guest did (a panic, a poweroff). */
    log_tail(sb, "qemu.log", tail, sizeof(tail));
    if (tail[0] == '\0' && known && signum == 0)
        log_tail(sb, "console.log", tail, sizeof(tail));
    sb_fail(sb, "%s%s%s", why, tail[0] ? "; last log: " : "", tail);
}

static void
on_proc_exit(uv_process_t *proc, int64_t status, int signum)
{
    struct sandbox *sb = proc->data;

    uv_close((uv_handle_t *)proc, free_handle);
    if (sb == NULL)
        return;
    vm_exited(sb, status, signum, true);
}

static void
on_pidfd(uv_poll_t *h, int status, int events)
{
    struct sandbox *sb = h->data;

    (void)status;
    (void)events;
    vm_exited(sb, 0, 0, false);
}

/* Watches a process we did not spawn (adopted): its pidfd turns readable
 * when it exits. */
static int
watch_pidfd(struct sandbox *sb)
{
    int fd = (int)syscall(SYS_pidfd_open, sb->pid, 0);

    if (fd < 0)
        return -errno;
    sb->pidfd = fd;
    sb->pidfd_poll = malloc(sizeof(*sb->pidfd_poll));
    if (sb->pidfd_poll == NULL)
        return -ENOMEM;
    uv_poll_init(sb->agent->loop, sb->pidfd_poll, fd);
    sb->pidfd_poll->data = sb;
    uv_poll_start(sb->pidfd_poll, UV_READABLE, on_pidfd);
    return 0;
}

static void
send_signal(struct sandbox *sb, int sig)
{
    if (sb->pid <= 0)
        return;
    if (sb->pidfd >= 0)
        syscall(SYS_pidfd_send_signal, sb->pidfd, sig, NULL, 0);
    else if (sb->proc != NULL)
        uv_process_kill(sb->proc, sig);
}

/* ---- boot -------------------------------------------------------------- */

static void
on_boot_timeout(uv_timer_t *t)
{
    struct sandbox *sb = t->data;
    char tail[LOG_TAIL + 1];

    if (sb->state != SB_STARTING)
        return;
    log_tail(sb, "qemu.log", tail, sizeof(tail));
    if (tail[0] == '\0')
        log_tail(sb, "console.log", tail, sizeof(tail));
    sb_fail(sb, "the guest agent did not answer within %llu s%s%s",
            (unsigned long long)(sb->agent->cfg.boot_timeout_ms / 1000),
            tail[0] ? "; last log: " : "", tail);
    send_signal(sb, SIGKILL);
}

/* Called by relay.c when the guest's HELLO arrives. */
void
sb_guest_ready(struct sandbox *sb)
{
    sb->guest_ready = true;
    if (sb->state != SB_STARTING)
        return;
    stop_timer(sb);
    sb->ready_ms = (pd_now_ns() - sb->start_ns) / 1000000;
    pd_info(sb->id, "running (%s, %u vCPUs, %llu MiB, %llu MiB disk) after "
            "%llu ms", sb->agent->accel, sb->cpus,
            (unsigned long long)sb->memory_mb,
            (unsigned long long)sb->disk_mb,
            (unsigned long long)sb->ready_ms);
    set_state(sb, SB_RUNNING);
    notify(&sb->waiters, 0, NULL);
}

/* Called by relay.c when the guest link drops while QEMU lives: the agent
 * keeps trying to reconnect while the sandbox is meant to run. */
void
sb_guest_lost(struct sandbox *sb)
{
    sb->guest_ready = false;
    if (sb->destroying || sb->state == SB_FAILED || sb->pid <= 0)
        return;
    relay_guest_connect(sb);
}

static void
on_qmp_close(void *arg, int reason)
{
    struct sandbox *sb = arg;

    sb->qmp = NULL;
    if (sb->destroying || sb->pid <= 0 || sb->state == SB_FAILED ||
        sb->agent->stopping)
        return;
    /* QEMU not listening yet (boot) or restarting the socket: retry. */
    if (reason == -ENOENT || reason == -ECONNREFUSED)
        qmp_connect(sb);
}

static void
qmp_retry(uv_timer_t *t)
{
    struct sandbox *sb = t->data;
    static const struct agent_qmp_cb cb = {.on_close = on_qmp_close};
    char path[PATH_MAX];

    if (sb->qmp != NULL || sb->pid <= 0 || sb->destroying)
        return;
    snprintf(path, sizeof(path), "%s/qmp.sock", sb->dir);
    agent_qmp_connect(sb->agent->loop, path, &cb, sb, &sb->qmp);
}

/* (Re)connects QMP shortly; the timer belongs to the sandbox, so it never
 * fires for a freed one. */
static void
qmp_connect(struct sandbox *sb)
{
    if (sb->qmp_timer == NULL) {
        sb->qmp_timer = malloc(sizeof(*sb->qmp_timer));
        if (sb->qmp_timer == NULL)
            return;
        uv_timer_init(sb->agent->loop, sb->qmp_timer);
        sb->qmp_timer->data = sb;
    }
    uv_timer_start(sb->qmp_timer, qmp_retry, SOCKET_RETRY_MS, 0);
}

static int
open_log(const struct sandbox *sb)
{
    char path[PATH_MAX];

    snprintf(path, sizeof(path), "%s/qemu.log", sb->dir);
    return open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
}

/*
 * The sandbox's QEMU argv (qemu.c). Every path is under the sandbox's
 * agent-named directory; the id only becomes the guest's hostname, and it
 * was validated before the sandbox existed.
 */
static int
build_argv(const struct sandbox *sb, char ***argv, char *err, size_t errlen)
{
    const struct agent *a = sb->agent;
    char disk[PATH_MAX], gsock[PATH_MAX], qsock[PATH_MAX], con[PATH_MAX];
    char esock[PATH_MAX];
    bool allow = strcmp(sb->egress, "allow") == 0;
    struct agent_qemu_spec s = {
        .qemu = a->cfg.qemu_binary,
        .sandbox_id = sb->id,
        .kernel = a->cfg.kernel,
        .initrd = a->cfg.initrd,
        .disk_path = disk,
        .vcpus = sb->cpus,
        .memory_mb = (unsigned)sb->memory_mb,
        .accel = strcmp(a->accel, "kvm") == 0 ? AGENT_ACCEL_KVM
                                              : AGENT_ACCEL_TCG,
        .guest_sock = gsock,
        .qmp_sock = qsock,
        .console_log = con,
        .net = true,
        .egress = strcmp(sb->egress, "all") == 0,
        .proxy_guest_port = allow ? AGENT_EGRESS_GUEST_PORT : 0,
        .proxy_unix = allow ? esock : NULL,
    };

    snprintf(disk, sizeof(disk), "%s/disk.img", sb->dir);
    snprintf(gsock, sizeof(gsock), "%s/guest.sock", sb->dir);
    snprintf(qsock, sizeof(qsock), "%s/qmp.sock", sb->dir);
    snprintf(con, sizeof(con), "%s/console.log", sb->dir);
    snprintf(esock, sizeof(esock), "%s/egress.sock", sb->dir);
    return agent_qemu_argv(&s, argv, err, errlen);
}

static void
vm_start(struct sandbox *sb)
{
    struct agent *a = sb->agent;
    uv_process_options_t o = {0};
    uv_stdio_container_t stdio[3];
    char err[512] = "";
    char **argv = NULL;
    int logfd, rv;

    rv = agent_cg_create(&a->cg, sb->id, sb->cpus,
                         (sb->memory_mb * MIB) + a->cfg.memory_overhead, err,
                         sizeof(err));
    if (rv != 0) {
        sb_fail(sb, "%s", err);
        return;
    }
    agent_cg_oom_kills(&a->cg, sb->id, &sb->oom_before);
    if (strcmp(sb->egress, "allow") == 0) {
        char path[PATH_MAX];

        snprintf(path, sizeof(path), "%s/egress.sock", sb->dir);
        rv = agent_egress_listen_unix(a->loop, path, sb->id, sb->allow,
                                      (int)a->qemu_uid, (int)a->qemu_gid,
                                      &sb->egress_l);
        if (rv != 0) {
            sb_fail(sb, "cannot listen for the egress proxy: %s",
                    strerror(-rv));
            return;
        }
    }
    rv = build_argv(sb, &argv, err, sizeof(err));
    if (rv != 0) {
        sb_fail(sb, "%s", err);
        return;
    }
    logfd = open_log(sb);
    if (logfd < 0) {
        rv = -errno;
        agent_argv_free(argv);
        sb_fail(sb, "cannot open the QEMU log: %s", strerror(-rv));
        return;
    }
    sb->proc = calloc(1, sizeof(*sb->proc));
    stdio[0].flags = UV_IGNORE;
    stdio[1].flags = UV_INHERIT_FD;
    stdio[1].data.fd = logfd;
    stdio[2].flags = UV_INHERIT_FD;
    stdio[2].data.fd = logfd;
    o.file = argv[0];
    o.args = argv;
    o.cwd = sb->dir;
    o.exit_cb = on_proc_exit;
    o.stdio = stdio;
    o.stdio_count = 3;
    /* Its own session: QEMU outlives an agent restart. */
    o.flags = UV_PROCESS_DETACHED;
    if (a->drop_privileges) {
        o.flags |= UV_PROCESS_SETUID | UV_PROCESS_SETGID;
        o.uid = a->qemu_uid;
        o.gid = a->qemu_gid;
    }
    rv = sb->proc ? uv_spawn(a->loop, sb->proc, &o) : UV_ENOMEM;
    close(logfd);
    agent_argv_free(argv);
    if (rv != 0) {
        free(sb->proc);
        sb->proc = NULL;
        agent_cg_remove(&a->cg, sb->id);
        sb_fail(sb, "cannot start %s: %s", a->cfg.qemu_binary,
                uv_strerror(rv));
        return;
    }
    sb->proc->data = sb;
    sb->pid = sb->proc->pid;
    /* TODO: a window of microseconds before the cgroup applies; clone3
     * with CLONE_INTO_CGROUP would close it, libuv cannot pass it. */
    if (agent_cg_attach(&a->cg, sb->id, sb->pid, err, sizeof(err)) != 0) {
        sb_fail(sb, "%s", err);
        send_signal(sb, SIGKILL);
        return;
    }
    proc_start_time(sb->pid, &sb->pid_start);
    persist(sb);
    pd_debug(sb->id, "QEMU started, pid %d", (int)sb->pid);
    qmp_connect(sb);
    relay_guest_connect(sb);
}

/* ---- disk image -------------------------------------------------------- */

/* The process handle comes first: free_handle frees the job. */
struct mkfs_job {
    uv_process_t proc;
};

static void
on_mkfs_exit(uv_process_t *proc, int64_t status, int signum)
{
    struct sandbox *sb = proc->data;

    uv_close((uv_handle_t *)proc, free_handle);
    if (sb == NULL)
        return;
    sb->proc = NULL;
    if (sb->destroying) {
        destroy_step(sb);
        return;
    }
    if (status != 0 || signum != 0) {
        sb_fail(sb, "mkfs.ext4 of the workspace failed (status %lld, "
                "signal %d): is the data disk full?",
                (long long)status, signum);
        return;
    }
    vm_start(sb);
}

/* A sparse, fixed-size image formatted as ext4 by a child process. */
static int
make_disk(struct sandbox *sb, char *err, size_t errlen)
{
    struct agent *a = sb->agent;
    char path[PATH_MAX];
    uv_process_options_t o = {0};
    uv_stdio_container_t stdio[3];
    struct mkfs_job *job;
    int fd, rv;

    snprintf(path, sizeof(path), "%s/disk.img", sb->dir);
    fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        rv = -errno;
        snprintf(err, errlen, "cannot create the disk image: %s",
                 strerror(errno));
        return rv;
    }
    rv = ftruncate(fd, (off_t)(sb->disk_mb * MIB)) == 0 ? 0 : -errno;
    if (rv == 0 && a->drop_privileges &&
        fchown(fd, a->qemu_uid, a->qemu_gid) != 0)
        rv = -errno;
    close(fd);
    if (rv != 0) {
        snprintf(err, errlen, "cannot size the disk image: %s",
                 strerror(-rv));
        return rv;
    }

    char *argv[] = {"mkfs.ext4", "-q", "-F", "-m", "0", "-L", "workspace",
                    "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                    path, NULL};
    job = calloc(1, sizeof(*job));
    if (job == NULL)
        return -ENOMEM;
    stdio[0].flags = UV_IGNORE;
    stdio[1].flags = UV_IGNORE;
    stdio[2].flags = UV_IGNORE;
    o.file = argv[0];
    o.args = argv;
    o.exit_cb = on_mkfs_exit;
    o.stdio = stdio;
    o.stdio_count = 3;
    rv = uv_spawn(a->loop, &job->proc, &o);
    if (rv != 0) {
        free(job);
        snprintf(err, errlen, "cannot run mkfs.ext4: %s", uv_strerror(rv));
        return -ENOENT;
    }
    job->proc.data = sb;
    sb->proc = &job->proc; /* so destroy can wait for it */
    return 0;
}

/* ---- create ------------------------------------------------------------ */

static int
check_spec(const struct agent_cfg *c, const struct sb_spec *s, char *err,
           size_t errlen)
{
    if (s->cpus < 1 || s->cpus > c->max_cpus) {
        snprintf(err, errlen, "cpus: want 1 to %llu, got %u",
                 (unsigned long long)c->max_cpus, s->cpus);
        return -EINVAL;
    }
    if (s->memory_mb < c->min_memory / MIB ||
        s->memory_mb > c->max_memory / MIB) {
        snprintf(err, errlen, "memory_mb: want %llu to %llu, got %llu",
                 (unsigned long long)(c->min_memory / MIB),
                 (unsigned long long)(c->max_memory / MIB),
                 (unsigned long long)s->memory_mb);
        return -EINVAL;
    }
    if (s->disk_mb < c->min_disk / MIB || s->disk_mb > c->max_disk / MIB) {
        snprintf(err, errlen, "disk_mb: want %llu to %llu, got %llu",
                 (unsigned long long)(c->min_disk / MIB),
                 (unsigned long long)(c->max_disk / MIB),
                 (unsigned long long)s->disk_mb);
        return -EINVAL;
    }
    return 0;
}

static bool
same_spec(const struct sandbox *sb, const struct sb_spec *s)
{
    const char *env = s->env_json ? s->env_json : "";

    return sb->cpus == s->cpus && sb->memory_mb == s->memory_mb &&
           sb->disk_mb == s->disk_mb && strcmp(sb->egress, s->egress) == 0 &&
           strcmp(sb->allow ? sb->allow : "", s->allow ? s->allow : "") ==
               0 &&
           strcmp(sb->env_json ? sb->env_json : "", env) == 0;
}

/* The data file system must keep its reserve free beside the images. */
static int
check_host_disk(struct agent *a, char *err, size_t errlen)
{
    struct statvfs v;
    uint64_t avail;

    if (statvfs(a->cfg.data_dir, &v) != 0)
        return 0;
    avail = (uint64_t)v.f_bavail * v.f_frsize;
    if (avail < a->cfg.reserve_disk + 64 * MIB) {
        snprintf(err, errlen,
                 "the agent's data disk is full: %llu MiB free, %llu MiB "
                 "reserved",
                 (unsigned long long)(avail / MIB),
                 (unsigned long long)(a->cfg.reserve_disk / MIB));
        return -ENOSPC;
    }
    return 0;
}

static struct sandbox *
sb_new(struct agent *a, const char *id)
{
    struct sandbox *sb = calloc(1, sizeof(*sb));

    if (sb == NULL)
        return NULL;
    sb->agent = a;
    sb->pidfd = -1;
    pd_strlcpy(sb->id, id, sizeof(sb->id));
    sb->next = a->sandboxes;
    a->sandboxes = sb;
    return sb;
}

static int
make_dir(struct sandbox *sb, char *err, size_t errlen)
{
    struct agent *a = sb->agent;
    uint8_t rnd[6];

    pd_random_bytes(rnd, sizeof(rnd));
    pd_hex(rnd, sizeof(rnd), sb->dir_name);
    snprintf(sb->dir, sizeof(sb->dir), "%s/vm/%s", a->cfg.data_dir,
             sb->dir_name);
    if (mkdir(sb->dir, 0700) != 0 ||
        (a->drop_privileges && chown(sb->dir, a->qemu_uid, a->qemu_gid) != 0)) {
        int rv = -errno;

        snprintf(err, errlen, "cannot create the sandbox directory: %s",
                 strerror(errno));
        pd_rm_rf(sb->dir);
        sb->dir[0] = '\0';
        return rv;
    }
    return 0;
}

int
sb_create(struct agent *a, const struct sb_spec *s, struct sb_waiter *w,
          char *err, size_t errlen)
{
    struct agent_res used, want;
    struct sandbox *sb = sb_find(a, s->id);
    int rv;

    if (a->stopping) {
        snprintf(err, errlen, "the agent is stopping");
        return -ESHUTDOWN;
    }
    if (sb != NULL) {
        if (!same_spec(sb, s) || sb->destroying) {
            snprintf(err, errlen, "sandbox %s already exists %s", s->id,
                     sb->destroying ? "and is being destroyed"
                                    : "with another spec");
            return -EEXIST;
        }
        if (sb->state == SB_RUNNING)
            w ? w->done(w->arg, 0, NULL) : (void)0;
        else if (sb->state == SB_FAILED)
            w ? w->done(w->arg, -EIO, sb->reason) : (void)0;
        else
            add_waiter(&sb->waiters, w);
        return 0;
    }
    rv = check_spec(&a->cfg, s, err, errlen);
    if (rv != 0)
        return rv;
    sb_used(a, &used);
    want.cpus = s->cpus;
    want.memory_mb = s->memory_mb + a->cfg.memory_overhead / MIB;
    want.disk_mb = s->disk_mb;
    rv = agent_capacity_check(&a->offer, &used, &want, err, errlen);
    if (rv == 0)
        rv = check_host_disk(a, err, errlen);
    if (rv != 0)
        return rv;

    sb = sb_new(a, s->id);
    if (sb == NULL)
        return -ENOMEM;
    sb->cpus = s->cpus;
    sb->memory_mb = s->memory_mb;
    sb->disk_mb = s->disk_mb;
    pd_strlcpy(sb->egress, s->egress, sizeof(sb->egress));
    sb->allow = strdup(s->allow ? s->allow : "");
    sb->env_json = s->env_json ? strdup(s->env_json) : NULL;
    sb->created_ms = pd_wall_ms();
    sb->start_ns = pd_now_ns();
    sb->state = SB_STARTING;
    rv = make_dir(sb, err, errlen);
    if (rv == 0)
        rv = make_disk(sb, err, errlen);
    if (rv != 0) {
        if (sb->dir[0] != '\0')
            pd_rm_rf(sb->dir);
        free_sandbox(sb);
        return rv;
    }
    add_waiter(&sb->waiters, w);
    persist(sb);
    agent_report_state(a, sb);
    arm_timer(sb, a->cfg.boot_timeout_ms, on_boot_timeout);
    pd_info(sb->id, "creating: %u vCPUs, %llu MiB, %llu MiB disk, egress %s",
            sb->cpus, (unsigned long long)sb->memory_mb,
            (unsigned long long)sb->disk_mb, sb->egress);
    return 0;
}

/* ---- destroy ----------------------------------------------------------- */

static void
on_kill_timeout(uv_timer_t *t)
{
    struct sandbox *sb = t->data;

    pd_warn(sb->id, "QEMU still running after quit, sending SIGKILL");
    send_signal(sb, SIGKILL);
}

static void
on_stop_timeout(uv_timer_t *t)
{
    struct sandbox *sb = t->data;

    pd_info(sb->id, "no clean poweroff within %llu ms, asking QEMU to quit",
            (unsigned long long)sb->agent->cfg.stop_timeout_ms);
    if (sb->qmp == NULL ||
        agent_qmp_cmd(sb->qmp, "quit", NULL, NULL, NULL) != 0)
        send_signal(sb, SIGTERM);
    arm_timer(sb, KILL_GRACE_MS, on_kill_timeout);
}

/* Runs until the process is gone, then removes everything. */
static void
destroy_step(struct sandbox *sb)
{
    struct agent *a = sb->agent;

    if (sb->pid > 0 || sb->proc != NULL)
        return; /* vm_exited or on_mkfs_exit calls again */
    stop_timer(sb);
    release_links(sb, "sandbox destroyed");
    agent_cg_remove(&a->cg, sb->id);
    if (sb->dir[0] != '\0' && pd_rm_rf(sb->dir) != 0)
        pd_warn(sb->id, "cannot remove %s, ignoring", sb->dir);
    if (agent_state_delete(a->state, sb->id) != 0)
        pd_warn(sb->id, "cannot delete the state row: %s, ignoring",
                agent_state_error(a->state));
    pd_info(sb->id, "destroyed");
    sb->state = SB_STOPPED;
    agent_report_state(a, sb);
    notify(&sb->waiters, -ECANCELED, "sandbox destroyed while starting");
    notify(&sb->destroy_waiters, 0, NULL);
    free_sandbox(sb);
}

int
sb_destroy(struct agent *a, const char *id, struct sb_waiter *w, char *err,
           size_t errlen)
{
    struct sandbox *sb = sb_find(a, id);

    if (sb == NULL) {
        snprintf(err, errlen, "no sandbox %s on this node", id);
        return -ENOENT;
    }
    add_waiter(&sb->destroy_waiters, w);
    if (sb->destroying)
        return 0;
    sb->destroying = true;
    pd_info(sb->id, "destroying");
    if (sb->state != SB_FAILED)
        set_state(sb, SB_STOPPING);
    if (sb->pid > 0) {
        if (sb->guest_ready && relay_guest_shutdown(sb) == 0) {
            arm_timer(sb, a->cfg.stop_timeout_ms, on_stop_timeout);
        } else {
            arm_timer(sb, 0, on_stop_timeout);
        }
        return 0;
    }
    if (sb->proc != NULL) /* mkfs still running */
        return 0;
    destroy_step(sb);
    return 0;
}

/* ---- ports ------------------------------------------------------------- */

struct port_op {
    struct sandbox *sb;
    unsigned guest, host;
    bool open;
    int tries;
    void (*done)(void *arg, int status, unsigned host_port, const char *err);
    void *arg;
};

static unsigned
free_loopback_port(void)
{
    struct sockaddr_in sa = {.sin_family = AF_INET};
    socklen_t len = sizeof(sa);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    unsigned port = 0;

    if (fd < 0)
        return 0;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
        getsockname(fd, (struct sockaddr *)&sa, &len) == 0)
        port = ntohs(sa.sin_port);
    close(fd);
    return port;
}

static void port_send(struct port_op *op);

static void
on_hostfwd(void *arg, int status, json_t *ret, const char *desc)
{
    struct port_op *op = arg;
    struct sandbox *sb = op->sb;
    const char *text = json_string_value(ret);

    /* hostfwd_add answers "" on success, hostfwd_remove "host forwarding
     * rule for ... removed"; anything else is an error text. */
    if (status == 0 && text != NULL && text[0] != '\0' &&
        (op->open || strstr(text, " removed") == NULL)) {
        status = -EIO;
        desc = text;
    }
    if (status != 0 && op->open && ++op->tries < 3) {
        port_send(op); /* the port was taken meanwhile: another one */
        return;
    }
    if (status == 0 && op->open) {
        struct sb_port *p = calloc(1, sizeof(*p));

        if (p != NULL) {
            p->guest = op->guest;
            p->host = op->host;
            p->next = sb->ports;
            sb->ports = p;
            persist(sb);
            pd_info(sb->id, "guest port %u forwarded from 127.0.0.1:%u",
                    op->guest, op->host);
        }
    } else if (status == 0) {
        for (struct sb_port **pp = &sb->ports; *pp; pp = &(*pp)->next) {
            if ((*pp)->guest == op->guest) {
                struct sb_port *p = *pp;

                *pp = p->next;
                free(p);
                break;
            }
        }
        persist(sb);
        pd_info(sb->id, "guest port %u no longer forwarded", op->guest);
    }
    op->done(op->arg, status, status == 0 && op->open ? op->host : 0,
             desc ? desc : "QMP failed");
    free(op);
}

static void
port_send(struct port_op *op)
{
    char cmd[128];

    if (op->open)
        op->host = free_loopback_port();
    if (op->open)
        snprintf(cmd, sizeof(cmd), "hostfwd_add %s tcp:127.0.0.1:%u-:%u",
                 NETDEV_ID, op->host, op->guest);
    else
        snprintf(cmd, sizeof(cmd), "hostfwd_remove %s tcp:127.0.0.1:%u",
                 NETDEV_ID, op->host);
    if (op->sb->qmp == NULL ||
        agent_qmp_hmp(op->sb->qmp, cmd, on_hostfwd, op) != 0)
        on_hostfwd(op, -ENOTCONN, NULL, "QEMU control socket not connected");
}

static int
port_op(struct sandbox *sb, unsigned guest, bool open,
        void (*done)(void *, int, unsigned, const char *), void *arg)
{
    struct port_op *op;
    struct sb_port *p;

    if (sb->state != SB_RUNNING || sb->qmp == NULL)
        return -ENOTCONN;
    for (p = sb->ports; p != NULL; p = p->next)
        if (p->guest == guest)
            break;
    if (open && p != NULL) {
        done(arg, 0, p->host, NULL);
        return 0;
    }
    if (!open && p == NULL)
        return -ENOENT;
    op = calloc(1, sizeof(*op));
    if (op == NULL)
        return -ENOMEM;
    op->sb = sb;
    op->guest = guest;
    op->host = p ? p->host : 0;
    op->open = open;
    op->done = done;
    op->arg = arg;
    port_send(op);
    return 0;
}

int
sb_port_open(struct sandbox *sb, unsigned guest_port,
             void (*done)(void *, int, unsigned, const char *), void *arg)
{
    return port_op(sb, guest_port, true, done, arg);
}

int
sb_port_close(struct sandbox *sb, unsigned guest_port,
              void (*done)(void *, int, unsigned, const char *), void *arg)
{
    return port_op(sb, guest_port, false, done, arg);
}

/* ---- restore after an agent restart ------------------------------------ */

static void
load_spec(struct sandbox *sb, const char *spec)
{
    json_t *o = json_loads(spec, 0, NULL), *env;
    const char *eg, *allow;

    if (o == NULL)
        return;
    sb->cpus = (unsigned)json_integer_value(json_object_get(o, "cpus"));
    sb->memory_mb = (uint64_t)json_integer_value(
        json_object_get(o, "memory_mb"));
    sb->disk_mb = (uint64_t)json_integer_value(json_object_get(o, "disk_mb"));
    eg = json_string_value(json_object_get(o, "egress"));
    pd_strlcpy(sb->egress, eg ? eg : "none", sizeof(sb->egress));
    allow = json_string_value(json_object_get(o, "allow"));
    sb->allow = strdup(allow ? allow : "");
    env = json_object_get(o, "env");
    if (json_is_object(env))
        sb->env_json = json_dumps(env, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(o);
}

static void
load_ports(struct sandbox *sb, const char *ports)
{
    json_t *arr = json_loads(ports, 0, NULL), *v;
    size_t i;

    json_array_foreach(arr, i, v)
    {
        struct sb_port *p = calloc(1, sizeof(*p));

        if (p == NULL)
            break;
        p->guest = (unsigned)json_integer_value(json_object_get(v, "port"));
        p->host =
            (unsigned)json_integer_value(json_object_get(v, "host_port"));
        p->next = sb->ports;
        sb->ports = p;
    }
    json_decref(arr);
}

/*
 * The recorded pid is still our QEMU: alive, started at the recorded time
 * (a recycled pid has another), and running with this sandbox's
 * directory in its argv. Both checks, because deleting the disk of a VM
 * that is in fact running would be far worse than keeping a dead one.
 */
static bool
still_ours(pid_t pid, uint64_t start, const char *dir)
{
    uint64_t now_start;

    if (pid <= 0 || kill(pid, 0) != 0 || !proc_names_dir(pid, dir))
        return false;
    return proc_start_time(pid, &now_start) == 0 && now_start == start;
}

static int
restore_one(void *arg, const struct agent_state_row *row)
{
    struct agent *a = arg;
    struct sandbox *sb;

    if (!pd_id_valid(row->id) || strlen(row->dir) != 12 ||
        strspn(row->dir, "0123456789abcdef") != 12) {
        pd_warn("agent", "state row \"%s\" is malformed, dropping it",
                row->id);
        agent_state_delete(a->state, row->id);
        return 0;
    }
    sb = sb_new(a, row->id);
    if (sb == NULL)
        return -ENOMEM;
    pd_strlcpy(sb->dir_name, row->dir, sizeof(sb->dir_name));
    snprintf(sb->dir, sizeof(sb->dir), "%s/vm/%s", a->cfg.data_dir,
             sb->dir_name);
    load_spec(sb, row->spec);
    load_ports(sb, row->ports);
    sb->state = state_from_name(row->state);
    pd_strlcpy(sb->reason, row->reason, sizeof(sb->reason));
    sb->created_ms = row->created_ms;
    sb->start_ns = pd_now_ns();
    sb->adopted = true;

    if (sb->state != SB_FAILED &&
        still_ours((pid_t)row->pid, row->pid_start, sb->dir)) {
        sb->pid = (pid_t)row->pid;
        sb->pid_start = row->pid_start;
        if (watch_pidfd(sb) != 0) {
            sb_fail(sb, "cannot watch QEMU pid %d after the restart",
                    (int)sb->pid);
            return 0;
        }
        agent_cg_oom_kills(&a->cg, sb->id, &sb->oom_before);
        pd_info(sb->id, "re-adopting the running VM (QEMU pid %d)",
                (int)sb->pid);
        if (strcmp(sb->egress, "allow") == 0) {
            char path[PATH_MAX];

            snprintf(path, sizeof(path), "%s/egress.sock", sb->dir);
            agent_egress_listen_unix(a->loop, path, sb->id, sb->allow,
                                     (int)a->qemu_uid, (int)a->qemu_gid,
                                     &sb->egress_l);
            /* The proxy knows the sandbox's token again: it is in the
             * environment kept in the state. */
            agent_egress_token_from_env(sb->id, sb->env_json);
        }
        if (sb->state == SB_STARTING)
            arm_timer(sb, a->cfg.boot_timeout_ms, on_boot_timeout);
        qmp_connect(sb);
        relay_guest_connect(sb);
        if (sb->state == SB_STOPPING)
            sb_destroy(a, sb->id, NULL, NULL, 0);
        return 0;
    }
    if (sb->state == SB_STOPPING) {
        /* A destroy was under way: finish it. */
        sb->destroying = true;
        destroy_step(sb);
        return 0;
    }
    if (sb->state != SB_FAILED) {
        snprintf(sb->reason, sizeof(sb->reason),
                 "QEMU (pid %lld) exited while the agent was down",
                 (long long)row->pid);
        pd_warn(sb->id, "%s; releasing its disk", sb->reason);
        sb->state = SB_FAILED;
    }
    /* A dead VM keeps its record (and reason) until destroyed, not its
     * disk: nothing would ever boot it again. */
    agent_cg_remove(&a->cg, sb->id);
    pd_rm_rf(sb->dir);
    sb->dir[0] = '\0';
    sb->pid = 0;
    persist(sb);
    return 0;
}

int
sb_restore(struct agent *a)
{
    int rv = agent_state_each(a->state, restore_one, a);

    if (rv != 0)
        pd_error("agent", "cannot load the sandboxes from the state: %s",
                 agent_state_error(a->state));
    return rv;
}

/* ---- agent exit -------------------------------------------------------- */

void
sb_shutdown_all(struct agent *a)
{
    struct sandbox *sb, *next;

    for (sb = a->sandboxes; sb != NULL; sb = next) {
        next = sb->next;
        if (a->cfg.stop_vms_on_exit && sb->pid > 0) {
            sb_destroy(a, sb->id, NULL, NULL, 0);
            continue;
        }
        /* Leave the VM running; let go of every handle. */
        stop_timer(sb);
        release_links(sb, "agent stopping");
        if (sb->proc != NULL) {
            sb->proc->data = NULL;
            uv_close((uv_handle_t *)sb->proc, free_handle);
            sb->proc = NULL;
        }
        free_sandbox(sb);
    }
}
