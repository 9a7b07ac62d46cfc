/*
 * bench_guest: what the guest agent costs, each figure beside a baseline
 * measured in the same run on the same QEMU configuration.
 *
 *   boot      QEMU start to the agent's HELLO, beside the same kernel
 *             with the trivial initramfs (same QEMU argv and devices):
 *             start to its /init's console line, and to QEMU's exit after
 *             its poweroff; also the agent's own "ready in N ms" (PID 1
 *             start to serving).
 *   exec      round trip of EXEC `true`, p50 and p99, beside PING (the
 *             channel and the agent's loop without a process).
 *   files     FILE_WRITE and FILE_READ of --mb MiB in /workspace and in
 *             /tmp (tmpfs: the agent without the disk), beside the raw
 *             throughput of a second port on the same virtio-serial
 *             device (no framing, no agent: busybox dd copies between
 *             /dev/virtio-ports/org.paddock.raw and a tmpfs file, or
 *             /dev/null and /dev/zero, in 1 MiB blocks).
 *
 *   bench_guest [--kernel K] [--initrd I] [--trivial T] [--boots N]
 *               [--execs N] [--mb N] [--reps N] [--dir D]
 *
 * Defaults come from $PADDOCK_GUEST_DIR (else deploy/guest/out). Each
 * transfer runs --reps times and the best counts, since load from others
 * on the host only ever slows a run. Under TCG on 2 cores the defaults (3
 * boots each, 200 execs, 32 MiB, 3 reps) take about a minute; every wait
 * is bounded, so a hung guest ends the run with an error rather than
 * blocking it.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include "common/log.h"
#include "common/util.h"
#include "node-agent/guestc.h"
#include "node-agent/qemu.h"

#define BOOT_TIMEOUT_MS 120000
#define STEP_TIMEOUT_MS 120000
#define RAW_PORT "org.paddock.raw"

static struct {
    const char *kernel, *initrd, *trivial, *dir;
    int boots, execs, reps;
    unsigned mb;
} opt = {.boots = 3, .execs = 200, .reps = 3, .mb = 32};

static char sock_path[512], raw_path[512], disk_path[512], con_path[512];

/* ---- small helpers ------------------------------------------------------- */

static int
cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

/* The q-quantile (0..1) of n sorted values, nearest rank. */
static double
quantile(const uint64_t *v, int n, double q)
{
    int i = (int)(q * n + 0.999999) - 1;

    if (i < 0)
        i = 0;
    if (i >= n)
        i = n - 1;
    return (double)v[i];
}

static double
mean_ms(const uint64_t *v, int n)
{
    double s = 0;

    for (int i = 0; i < n; i++)
        s += (double)v[i];
    return n > 0 ? s / n : 0;
}

static double
mib_s(uint64_t bytes, uint64_t ns)
{
    return ns == 0 ? 0 : (double)bytes / (1 << 20) / ((double)ns / 1e9);
}

/* The QEMU running now, killed if the run ends early. */
static pid_t live_pid = -1;

static void __attribute__((noreturn))
die(const char *fmt, ...)
{
    va_list ap;

    if (live_pid > 0) {
        kill(live_pid, SIGKILL);
        waitpid(live_pid, NULL, 0);
    }

    va_start(ap, fmt);
    fputs("bench_guest: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

/* ---- QEMU ---------------------------------------------------------------- */

static pid_t
qemu_start(const char *initrd)
{
    static const char *const extra[] = {
        "-chardev", "socket,id=raw,path=RAW,server=on,wait=off",
        "-device", "virtserialport,chardev=raw,name=" RAW_PORT, NULL};
    char chardev[600], err[512];
    const char *args[6];
    struct agent_qemu_spec s = {
        .sandbox_id = "bench", .kernel = opt.kernel, .initrd = initrd,
        .disk_path = disk_path, .memory_mb = 512, .accel = AGENT_ACCEL_TCG,
        .guest_sock = sock_path, .console_log = con_path,
    };
    char **argv;
    pid_t pid;

    memcpy(args, extra, sizeof(extra));
    snprintf(chardev, sizeof(chardev),
             "socket,id=raw,path=%s,server=on,wait=off", raw_path);
    args[1] = chardev;
    s.extra_args = args;
    unlink(sock_path);
    unlink(raw_path);
    unlink(con_path);
    if (agent_qemu_argv(&s, &argv, err, sizeof(err)) != 0)
        die("qemu argv: %s", err);
    pid = fork();
    if (pid == 0) {
        int null = open("/dev/null", O_RDWR);

        dup2(null, 0);
        dup2(null, 1);
        execvp(argv[0], argv);
        _exit(127);
    }
    agent_argv_free(argv);
    if (pid < 0)
        die("fork: %s", strerror(errno));
    live_pid = pid;
    return pid;
}

/* Waits for pid to exit within timeout_ms; kills it past that. */
static int
qemu_reap(pid_t pid, unsigned timeout_ms)
{
    uint64_t end = pd_now_ms() + timeout_ms;
    int status;

    while (pd_now_ms() < end) {
        pid_t r = waitpid(pid, &status, WNOHANG);

        if (r == pid) {
            live_pid = -1;
            return 0;
        }
        usleep(2000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    live_pid = -1;
    return -ETIMEDOUT;
}

/* True once the console log holds text. */
static bool
console_has(const char *text)
{
    char *log = NULL;
    size_t len;
    bool found;

    if (pd_read_file(con_path, &log, &len, 1 << 20) != 0)
        return false;
    found = strstr(log, text) != NULL;
    free(log);
    return found;
}

/* "sandbox bench ready in N ms" from the agent's console line, or -1. */
static long
agent_ready_ms(void)
{
    char *text = NULL, *p;
    size_t len;
    long ms = -1;

    if (pd_read_file(con_path, &text, &len, 1 << 20) != 0)
        return -1;
    p = strstr(text, " ready in ");
    if (p != NULL)
        ms = strtol(p + 10, NULL, 10);
    free(text);
    return ms;
}

/* ---- boots --------------------------------------------------------------- */

static pid_t vm_pid = -1;

static void
bench_boots(void)
{
    uint64_t triv[16], triv_up[16], agent[16];
    long own[16];
    char err[512];

    for (int i = 0; i < opt.boots; i++) {
        uint64_t t0 = pd_now_ns();
        pid_t pid = qemu_start(opt.trivial);
        uint64_t end = pd_now_ms() + BOOT_TIMEOUT_MS;

        /* Its /init says it runs on the console, then powers off. */
        triv_up[i] = 0;
        while (pd_now_ms() < end && waitpid(pid, NULL, WNOHANG) == 0) {
            if (console_has("paddock-trivial: init runs")) {
                triv_up[i] = (pd_now_ns() - t0) / 1000000;
                break;
            }
            usleep(2000);
        }
        if (triv_up[i] == 0)
            die("the trivial image never said its init runs (rebuild it "
                "with deploy/guest/build.sh)");
        if (qemu_reap(pid, BOOT_TIMEOUT_MS) != 0)
            die("the trivial image did not power off in %d s",
                BOOT_TIMEOUT_MS / 1000);
        triv[i] = (pd_now_ns() - t0) / 1000000;

        t0 = pd_now_ns();
        pid = qemu_start(opt.initrd);
        if (agent_qemu_wait_hello(sock_path, BOOT_TIMEOUT_MS, err,
                                  sizeof(err)) != 0)
            die("agent boot: %s", err);
        agent[i] = (pd_now_ns() - t0) / 1000000;
        own[i] = agent_ready_ms();
        if (i + 1 < opt.boots) {
            kill(pid, SIGKILL);
            waitpid(pid, NULL, 0);
            live_pid = -1;
        } else {
            vm_pid = pid; /* the last one serves the rest of the run */
        }
    }
    qsort(triv, (size_t)opt.boots, sizeof(triv[0]), cmp_u64);
    qsort(triv_up, (size_t)opt.boots, sizeof(triv_up[0]), cmp_u64);
    qsort(agent, (size_t)opt.boots, sizeof(agent[0]), cmp_u64);
    printf("boot (%d each, TCG; median, min):\n", opt.boots);
    printf("  plain kernel, trivial init, start to init : %6.0f %6.0f ms\n",
           quantile(triv_up, opt.boots, 0.5), (double)triv_up[0]);
    printf("  plain kernel, trivial init, start to exit : %6.0f %6.0f ms\n",
           quantile(triv, opt.boots, 0.5), (double)triv[0]);
    printf("  guest image, start to agent HELLO         : %6.0f %6.0f ms\n",
           quantile(agent, opt.boots, 0.5), (double)agent[0]);
    printf("  difference to the trivial init (agent)    : %6.0f %6.0f ms\n",
           quantile(agent, opt.boots, 0.5) -
           quantile(triv_up, opt.boots, 0.5),
           (double)agent[0] - (double)triv_up[0]);
    printf("  agent's own init, PID 1 start to serving  : ");
    for (int i = 0; i < opt.boots; i++)
        printf("%s%ld", i ? ", " : "", own[i]);
    printf(" ms\n");
}

/* ---- the session: one step after another --------------------------------- */

/* The steps of the session, in order. */
enum {
    S_START,
    S_PING,
    S_EXEC,
    S_WRITE_WS, /* FILE_WRITE to /workspace (ext4 on virtio-blk) */
    S_READ_WS,
    S_WRITE_TMP, /* the same to /tmp (tmpfs): the agent without the disk */
    S_READ_TMP,
    S_RAW_IN_NULL, /* host to guest on the raw port, into /dev/null */
    S_RAW_IN_TMP,  /* the same into /tmp/raw.bin */
    S_RAW_OUT_TMP, /* and back out to the host */
    S_RAW_OUT_ZERO, /* guest to host from /dev/zero */
    S_REPORT,   /* print, then SHUTDOWN */
    S_OFF,
};

static uv_loop_t *loop;
static struct guestc *gc;
static uv_timer_t step_timer;
static int step;
static int count;
static uint64_t t_step, t_req;
static uint64_t *lat;
static uint64_t bytes;
static unsigned char *block;

static void next_step(void);

static void
step_timeout(uv_timer_t *t)
{
    (void)t;
    die("step %d took over %d s", step, STEP_TIMEOUT_MS / 1000);
}

static void
req_error(struct guestc_req *r, int errnum, const char *msg)
{
    (void)r;
    die("step %d: %s: %s", step, pd_errno_name(errnum), msg);
}

/* PING and EXEC `true` one at a time, each timed. */
static void rtt_one(void);

static void
rtt_reply(struct guestc_req *r, const struct pd_msg *m)
{
    (void)r;
    (void)m;
    lat[count++] = pd_now_ns() - t_req;
    if (count == opt.execs) {
        next_step();
        return;
    }
    rtt_one();
}

static void
rtt_one(void)
{
    static const struct guestc_req_cb cb = {.on_reply = rtt_reply,
                                            .on_error = req_error};
    static const char *const argv[] = {"true", NULL};
    struct guestc_exec x = {.argv = argv};

    t_req = pd_now_ns();
    if (step == S_PING)
        guestc_ping(gc, &cb, NULL);
    else
        guestc_exec(gc, &x, &cb, NULL);
}

static void
rtt_report(const char *what)
{
    qsort(lat, (size_t)count, sizeof(lat[0]), cmp_u64);
    printf("  %-32s: p50 %6.2f ms  p99 %6.2f ms  mean %6.2f ms\n", what,
           quantile(lat, count, 0.5) / 1e6, quantile(lat, count, 0.99) / 1e6,
           mean_ms(lat, count) / 1e6);
}

/* FILE_WRITE of opt.mb MiB from one block, as fast as credit allows. */
static void
write_pump(struct guestc_req *r)
{
    uint64_t total = (uint64_t)opt.mb << 20;

    while (bytes < total) {
        size_t n = guestc_req_credit(r), left = (size_t)(total - bytes);

        if (n == 0)
            return; /* on_writable resumes */
        if (n > 1u << 20)
            n = 1u << 20;
        if (n > left)
            n = left;
        if (guestc_req_send_data(r, block, n, false) != 0)
            return;
        bytes += n;
    }
    guestc_req_send_data(r, NULL, 0, true);
}

static void
step_done_reply(struct guestc_req *r, const struct pd_msg *m)
{
    (void)r;
    (void)m;
    next_step();
}

static void
read_data(struct guestc_req *r, enum guestc_stream s, const void *d,
          size_t n, bool eof)
{
    (void)r;
    (void)s;
    (void)d;
    (void)eof;
    bytes += n;
}

/* ---- the raw port, in a thread with blocking I/O ------------------------- */

static int raw_fd = -1;
static pthread_t raw_thread;
static uint64_t raw_done_ns;

static void *
raw_reader(void *arg)
{
    static unsigned char buf[1 << 16];
    uint64_t want = (uint64_t)opt.mb << 20, got = 0;

    (void)arg;
    while (got < want) {
        ssize_t n = read(raw_fd, buf, sizeof(buf));

        if (n <= 0)
            break;
        got += (uint64_t)n;
    }
    raw_done_ns = pd_now_ns();
    bytes = got;
    return NULL;
}

static void *
raw_writer(void *arg)
{
    uint64_t want = (uint64_t)opt.mb << 20, sent = 0;

    (void)arg;
    while (sent < want) {
        size_t n = want - sent < (1u << 20) ? (size_t)(want - sent) : 1u << 20;
        ssize_t k = write(raw_fd, block, n);

        if (k <= 0)
            break;
        sent += (uint64_t)k;
    }
    bytes = sent;
    return NULL;
}

static void
raw_connect(void)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};

    pd_strlcpy(sa.sun_path, raw_path, sizeof(sa.sun_path));
    raw_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (raw_fd < 0 || connect(raw_fd, (struct sockaddr *)&sa,
                              sizeof(sa)) != 0)
        die("connect %s: %s", raw_path, strerror(errno));
}

/* The raw steps' commands must succeed, or the thread would wait. */
static void
raw_reply(struct guestc_req *r, const struct pd_msg *m)
{
    int64_t code = -1;
    const void *e = NULL;
    size_t n = 0;

    (void)r;
    pd_msg_i64(m, "exit_code", &code);
    if (code != 0) {
        pd_msg_bin(m, "stderr", &e, &n);
        die("step %d: the raw port command failed (%lld): %.*s", step,
            (long long)code, (int)n, (const char *)e);
    }
    next_step();
}

/*
 * busybox dd moves the bytes in 1 MiB blocks (head's small buffers would
 * measure its own overhead): into /dev/null or a tmpfs file (in), from
 * /dev/zero or that file (out). The tmpfs variants pay the same file
 * system cost as the agent's /tmp rows, so what differs is the agent's
 * protocol and loop; the others show the channel alone.
 */
static void
raw_exec(int s)
{
    static const struct guestc_req_cb cb = {.on_reply = raw_reply,
                                            .on_error = req_error};
    unsigned long long n = (unsigned long long)opt.mb << 20;
    const char *file = s == S_RAW_IN_TMP || s == S_RAW_OUT_TMP ?
                       "/tmp/raw.bin" : NULL;
    char cmd[256];
    struct guestc_exec x = {.command = cmd};

    if (s == S_RAW_OUT_TMP || s == S_RAW_OUT_ZERO)
        snprintf(cmd, sizeof(cmd), "dd if=%s of=/dev/virtio-ports/" RAW_PORT
                 " bs=1048576 count=%llu iflag=count_bytes 2>/dev/null",
                 file != NULL ? file : "/dev/zero", n);
    else
        snprintf(cmd, sizeof(cmd), "dd if=/dev/virtio-ports/" RAW_PORT
                 " of=%s bs=1048576 count=%llu iflag=count_bytes,fullblock "
                 "2>/dev/null", file != NULL ? file : "/dev/null", n);
    guestc_exec(gc, &x, &cb, NULL);
}

static uint64_t took_ns[S_OFF], moved[S_OFF];
static int rep_no;

static const char *
step_path(void)
{
    return step <= S_READ_WS ? "/workspace/bench.bin" : "/tmp/bench.bin";
}

/* Records what the step that just ended measured. */
static void
step_end(void)
{
    uint64_t now = pd_now_ns();

    switch (step) {
    case S_PING:
        rtt_report("PING (channel and loop)");
        return;
    case S_EXEC:
        rtt_report("EXEC true (fork, exec, reap)");
        return;
    case S_RAW_OUT_TMP:
    case S_RAW_OUT_ZERO:
        pthread_join(raw_thread, NULL);
        now = raw_done_ns; /* when the last byte reached the host */
        break;
    case S_RAW_IN_NULL:
    case S_RAW_IN_TMP:
        pthread_join(raw_thread, NULL);
        break;
    default:
        break;
    }
    /* Best of the repetitions: other load on the host only slows a run. */
    if (took_ns[step] == 0 || now - t_step < took_ns[step]) {
        took_ns[step] = now - t_step;
        moved[step] = bytes;
    }
}

static void
row(const char *what, int s)
{
    printf("  %-36s: %7.1f MiB/s\n", what, mib_s(moved[s], took_ns[s]));
}

static void
report(void)
{
    printf("throughput (%u MiB each way, one transfer at a time, best of "
           "%d):\n", opt.mb, opt.reps);
    row("file write, host to /workspace", S_WRITE_WS);
    row("file write, host to /tmp (tmpfs)", S_WRITE_TMP);
    row("raw port, host to guest, to tmpfs", S_RAW_IN_TMP);
    row("raw port, host to guest, /dev/null", S_RAW_IN_NULL);
    row("file read, /workspace to host", S_READ_WS);
    row("file read, /tmp (tmpfs) to host", S_READ_TMP);
    row("raw port, guest to host, from tmpfs", S_RAW_OUT_TMP);
    row("raw port, guest to host, /dev/zero", S_RAW_OUT_ZERO);
}

static void
next_step(void)
{
    static const struct guestc_req_cb wcb = {.on_reply = step_done_reply,
                                             .on_error = req_error,
                                             .on_writable = write_pump};
    static const struct guestc_req_cb rcb = {.on_data = read_data,
                                             .on_reply = step_done_reply,
                                             .on_error = req_error};
    static const struct guestc_req_cb offcb = {.on_reply = step_done_reply,
                                               .on_error = req_error};
    struct guestc_req *r;

    if (step >= S_REPORT) {
        step = S_OFF; /* the OK of SHUTDOWN: the VM powers off next */
        return;
    }
    step_end();
    if (step >= S_WRITE_WS && step < S_REPORT && ++rep_no < opt.reps) {
        /* the same transfer again */
    } else {
        rep_no = 0;
        step++;
    }
    count = 0;
    bytes = 0;
    uv_timer_start(&step_timer, step_timeout, STEP_TIMEOUT_MS, 0);
    t_step = pd_now_ns();
    switch (step) {
    case S_PING:
        printf("round trips (%d each, one at a time):\n", opt.execs);
        rtt_one();
        return;
    case S_EXEC:
        rtt_one();
        return;
    case S_WRITE_WS:
    case S_WRITE_TMP:
        r = guestc_file_write(gc, step_path(), 0644, false, &wcb, NULL);
        if (r != NULL)
            write_pump(r);
        return;
    case S_READ_WS:
    case S_READ_TMP:
        guestc_file_read(gc, step_path(), &rcb, NULL);
        return;
    case S_RAW_IN_NULL:
    case S_RAW_IN_TMP:
        if (raw_fd < 0)
            raw_connect();
        pthread_create(&raw_thread, NULL, raw_writer, NULL);
        raw_exec(step);
        return;
    case S_RAW_OUT_TMP:
    case S_RAW_OUT_ZERO:
        pthread_create(&raw_thread, NULL, raw_reader, NULL);
        raw_exec(step);
        return;
    default:
        break;
    }
    report();
    uv_timer_stop(&step_timer);
    uv_close((uv_handle_t *)&step_timer, NULL);
    guestc_shutdown(gc, &offcb, NULL);
}

static void
on_ready(struct guestc *g)
{
    (void)g;
    next_step();
}

static void
on_close(struct guestc *g, int reason, const char *why)
{
    (void)g;
    if (reason != 0 && step < S_REPORT)
        die("connection to the guest closed: %s", why);
    gc = NULL;
}

static void
bench_session(void)
{
    static const struct guestc_cb cb = {.on_ready = on_ready,
                                        .on_close = on_close};

    lat = calloc((size_t)opt.execs, sizeof(*lat));
    block = malloc(1u << 20);
    if (lat == NULL || block == NULL)
        die("out of memory");
    for (size_t i = 0; i < 1u << 20; i++)
        block[i] = (unsigned char)(i * 131);
    loop = uv_default_loop();
    uv_timer_init(loop, &step_timer);
    gc = guestc_connect(loop, sock_path, 30000, &cb, NULL);
    if (gc == NULL)
        die("out of memory");
    uv_run(loop, UV_RUN_DEFAULT);
    if (gc != NULL)
        guestc_close(gc);
    uv_run(loop, UV_RUN_DEFAULT);
    if (raw_fd >= 0)
        close(raw_fd);
    if (qemu_reap(vm_pid, 30000) != 0)
        fprintf(stderr, "bench_guest: the VM did not power off; killed\n");
}

/* ---- main ---------------------------------------------------------------- */

static void
defaults(void)
{
    static char k[512], i[512], t[512];
    const char *dir = getenv("PADDOCK_GUEST_DIR");

    if (dir == NULL)
        dir = "deploy/guest/out";
    snprintf(k, sizeof(k), "%s/vmlinuz", dir);
    snprintf(i, sizeof(i), "%s/initrd.img", dir);
    snprintf(t, sizeof(t), "%s/trivial-initrd.img", dir);
    opt.kernel = k;
    opt.initrd = i;
    opt.trivial = t;
}

int
main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"kernel", 1, 0, 'k'}, {"initrd", 1, 0, 'i'}, {"trivial", 1, 0, 't'},
        {"boots", 1, 0, 'b'}, {"execs", 1, 0, 'e'}, {"mb", 1, 0, 'm'},
        {"dir", 1, 0, 'd'}, {"reps", 1, 0, 'r'}, {0, 0, 0, 0}};
    char tmpl[] = "/tmp/pd-bench-guest.XXXXXX", err[512];
    uint64_t t0 = pd_now_ms();
    int c;

    defaults();
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'k': opt.kernel = optarg; break;
        case 'i': opt.initrd = optarg; break;
        case 't': opt.trivial = optarg; break;
        case 'b': opt.boots = atoi(optarg); break;
        case 'e': opt.execs = atoi(optarg); break;
        case 'm': opt.mb = (unsigned)atoi(optarg); break;
        case 'd': opt.dir = optarg; break;
        case 'r': opt.reps = atoi(optarg); break;
        default:
            fprintf(stderr, "usage: see the top of bench_guest.c\n");
            return 2;
        }
    }
    if (opt.boots < 1 || opt.boots > 16 || opt.execs < 1 ||
        opt.execs > 100000 || opt.mb < 1 || opt.mb > 1024 || opt.reps < 1 ||
        opt.reps > 20)
        die("--boots 1-16, --execs 1-100000, --mb 1-1024, --reps 1-20");
    if (access(opt.kernel, R_OK) != 0 || access(opt.initrd, R_OK) != 0 ||
        access(opt.trivial, R_OK) != 0)
        die("guest image missing (%s, %s, %s): run deploy/guest/build.sh",
            opt.kernel, opt.initrd, opt.trivial);
    pd_log_init("bench_guest", PD_LOG_WARN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN);
    if (opt.dir == NULL && (opt.dir = mkdtemp(tmpl)) == NULL)
        die("mkdtemp: %s", strerror(errno));
    snprintf(sock_path, sizeof(sock_path), "%s/guest.sock", opt.dir);
    snprintf(raw_path, sizeof(raw_path), "%s/raw.sock", opt.dir);
    snprintf(disk_path, sizeof(disk_path), "%s/disk.img", opt.dir);
    snprintf(con_path, sizeof(con_path), "%s/console.log", opt.dir);
    unlink(disk_path);
    /* Formatted on the host, as the node agent does. */
    if (agent_qemu_disk_create(disk_path, opt.mb * 2 + 64, true, err,
                               sizeof(err)) != 0)
        die("%s", err);

    printf("bench_guest: kernel %s, initrd %s\n", opt.kernel, opt.initrd);
    bench_boots();
    bench_session();
    unlink(disk_path);
    unlink(sock_path);
    unlink(raw_path);
    unlink(con_path);
    if (strcmp(opt.dir, tmpl) == 0)
        rmdir(opt.dir);
    printf("bench_guest: done in %.1f s\n", (pd_now_ms() - t0) / 1000.0);
    return 0;
}
