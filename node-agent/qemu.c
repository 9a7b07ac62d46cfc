/*
 * QEMU argv, workspace disks and the KVM probe. See qemu.h.
 */
#include "node-agent/qemu.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

#include "common/util.h"
#include "proto/frame.h"

struct vec {
    char **v;
    size_t n, cap;
    int err;
};

static void
vadd(struct vec *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
vadd(struct vec *a, const char *fmt, ...)
{
    va_list ap;
    char *s;

    if (a->err != 0)
        return;
    if (a->n + 2 > a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 64;
        char **v = realloc(a->v, cap * sizeof(*v));

        if (v == NULL) {
            a->err = -ENOMEM;
            return;
        }
        a->v = v;
        a->cap = cap;
    }
    va_start(ap, fmt);
    if (vasprintf(&s, fmt, ap) < 0) {
        a->err = -ENOMEM;
        va_end(ap);
        return;
    }
    va_end(ap);
    a->v[a->n++] = s;
    a->v[a->n] = NULL;
}

void
agent_argv_free(char **argv)
{
    if (argv == NULL)
        return;
    for (char **p = argv; *p != NULL; p++)
        free(*p);
    free(argv);
}

/* QEMU splits option values at commas; our paths never need one. */
static bool
path_ok(const char *p)
{
    return p != NULL && p[0] != '\0' && strchr(p, ',') == NULL &&
           strchr(p, '\n') == NULL;
}

uint32_t
agent_qemu_tsc_khz(void)
{
    static uint32_t khz;
    struct timespec a, b, d = {0, 20 * 1000 * 1000};
    uint64_t t0, t1, ns;

    if (khz != 0)
        return khz;
    clock_gettime(CLOCK_MONOTONIC, &a);
    t0 = __rdtsc();
    nanosleep(&d, NULL);
    t1 = __rdtsc();
    clock_gettime(CLOCK_MONOTONIC, &b);
    ns = (uint64_t)(b.tv_sec - a.tv_sec) * 1000000000ull +
         (uint64_t)(b.tv_nsec - a.tv_nsec);
    if (ns == 0 || t1 <= t0)
        return 0;
    khz = (uint32_t)((t1 - t0) * 1000000ull / ns);
    return khz;
}

static int
check_spec(const struct agent_qemu_spec *s, char *err, size_t errlen)
{
    if (s->sandbox_id == NULL || !pd_id_valid(s->sandbox_id)) {
        snprintf(err, errlen, "bad sandbox id");
        return -EINVAL;
    }
    if (!path_ok(s->kernel) || !path_ok(s->initrd) ||
        !path_ok(s->guest_sock) ||
        (s->disk_path != NULL && !path_ok(s->disk_path)) ||
        (s->qmp_sock != NULL && !path_ok(s->qmp_sock)) ||
        (s->console_log != NULL && !path_ok(s->console_log)) ||
        (s->proxy_unix != NULL && !path_ok(s->proxy_unix))) {
        snprintf(err, errlen, "kernel, initrd and socket paths must be set "
                 "and hold no comma");
        return -EINVAL;
    }
    if (s->vcpus > 64 || s->memory_mb > (1u << 20) ||
        (s->memory_mb != 0 && s->memory_mb < 64)) {
        snprintf(err, errlen, "vcpus must be 1-64 and memory 64 MB-1 TB");
        return -EINVAL;
    }
    if (s->cmdline_extra != NULL && strchr(s->cmdline_extra, '\n')) {
        snprintf(err, errlen, "kernel command line holds a newline");
        return -EINVAL;
    }
    for (size_t i = 0; i < s->nfwds; i++) {
        if (s->fwds[i].host_port == 0 || s->fwds[i].guest_port == 0) {
            snprintf(err, errlen, "port forward %zu has a zero port", i);
            return -EINVAL;
        }
    }
    if (s->nfwds > 0 && !s->net) {
        snprintf(err, errlen, "port forwards need the network device");
        return -EINVAL;
    }
    return 0;
}

int
agent_qemu_argv(const struct agent_qemu_spec *s, char ***out, char *err,
                size_t errlen)
{
    struct vec a = {0};
    bool kvm = s->accel == AGENT_ACCEL_KVM;
    uint32_t tsc = s->tsc_khz != 0 ? s->tsc_khz : agent_qemu_tsc_khz();
    int rv = check_spec(s, err, errlen);

    *out = NULL;
    if (rv != 0)
        return rv;

    vadd(&a, "%s", s->qemu != NULL ? s->qemu : "qemu-system-x86_64");
    vadd(&a, "-M");
    vadd(&a, "microvm,rtc=on");
    vadd(&a, "-accel");
    /* TCG reserves a 1 GiB translation cache by default; 128 MiB is
     * plenty for one small guest and keeps many VMs per host cheap. */
    vadd(&a, "%s", kvm ? "kvm" : "tcg,tb-size=128");
    vadd(&a, "-cpu");
    vadd(&a, "%s", kvm ? "host" : "max");
    vadd(&a, "-smp");
    vadd(&a, "%u", s->vcpus ? s->vcpus : 1);
    vadd(&a, "-m");
    vadd(&a, "%u", s->memory_mb ? s->memory_mb : 512);
    vadd(&a, "-nodefaults");
    vadd(&a, "-no-user-config");
    vadd(&a, "-nographic");
    vadd(&a, "-no-reboot");
    if (!s->no_seccomp) {
        vadd(&a, "-sandbox");
        vadd(&a, "on,obsolete=deny,elevateprivileges=deny,spawn=deny,"
             "resourcecontrol=deny");
    }
    vadd(&a, "-kernel");
    vadd(&a, "%s", s->kernel);
    vadd(&a, "-initrd");
    vadd(&a, "%s", s->initrd);
    vadd(&a, "-append");
    /* panic=-1: a guest panic reboots at once, which ends QEMU. */
    if (!kvm && tsc != 0)
        vadd(&a, "console=ttyS0 quiet panic=-1 tsc_early_khz=%u "
             "tsc=reliable paddock.id=%s paddock.port=%s%s%s", tsc,
             s->sandbox_id, AGENT_GUEST_PORT, s->cmdline_extra ? " " : "",
             s->cmdline_extra ? s->cmdline_extra : "");
    else
        vadd(&a, "console=ttyS0 quiet panic=-1 paddock.id=%s "
             "paddock.port=%s%s%s", s->sandbox_id, AGENT_GUEST_PORT,
             s->cmdline_extra ? " " : "",
             s->cmdline_extra ? s->cmdline_extra : "");
    vadd(&a, "-serial");
    if (s->console_log != NULL)
        vadd(&a, "file:%s", s->console_log);
    else
        vadd(&a, "null");

    vadd(&a, "-device");
    vadd(&a, "virtio-serial-device,max_ports=4");
    vadd(&a, "-chardev");
    vadd(&a, "socket,id=pdguest,path=%s,server=on,wait=off", s->guest_sock);
    vadd(&a, "-device");
    vadd(&a, "virtserialport,chardev=pdguest,name=%s", AGENT_GUEST_PORT);

    if (s->disk_path != NULL) {
        vadd(&a, "-drive");
        vadd(&a, "id=ws,file=%s,format=raw,if=none,discard=unmap,"
             "cache=writeback", s->disk_path);
        vadd(&a, "-device");
        vadd(&a, "virtio-blk-device,drive=ws");
    }
    if (s->net) {
        char *nd = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&nd, &len);

        if (f == NULL) {
            rv = -ENOMEM;
            goto fail;
        }
        fprintf(f, "user,id=net0,restrict=%s", s->egress ? "off" : "on");
        for (size_t i = 0; i < s->nfwds; i++)
            fprintf(f, ",hostfwd=tcp:127.0.0.1:%u-:%u", s->fwds[i].host_port,
                    s->fwds[i].guest_port);
        /* ",," is a literal comma inside one -netdev value. */
        if (s->proxy_guest_port != 0 && s->proxy_unix != NULL)
            fprintf(f, ",guestfwd=tcp:10.0.2.100:%u-unix:%s,,reconnect=1",
                    s->proxy_guest_port, s->proxy_unix);
        else if (s->proxy_guest_port != 0 && s->proxy_host_port != 0)
            fprintf(f, ",guestfwd=tcp:10.0.2.100:%u-tcp:127.0.0.1:%u",
                    s->proxy_guest_port, s->proxy_host_port);
        fclose(f);
        vadd(&a, "-netdev");
        vadd(&a, "%s", nd != NULL ? nd : "");
        free(nd);
        vadd(&a, "-device");
        vadd(&a, "virtio-net-device,netdev=net0");
    }
    vadd(&a, "-object");
    vadd(&a, "rng-random,id=rng0,filename=/dev/urandom");
    vadd(&a, "-device");
    vadd(&a, "virtio-rng-device,rng=rng0");
    if (s->qmp_sock != NULL) {
        vadd(&a, "-qmp");
        vadd(&a, "unix:%s,server=on,wait=off", s->qmp_sock);
    }
    for (size_t i = 0; s->extra_args != NULL && s->extra_args[i]; i++)
        vadd(&a, "%s", s->extra_args[i]);
    if (a.err != 0) {
        rv = a.err;
        goto fail;
    }
    *out = a.v;
    return 0;

fail:
    snprintf(err, errlen, "out of memory building the QEMU argv");
    agent_argv_free(a.v);
    return rv;
}

/* ---- disks --------------------------------------------------------------- */

int
agent_qemu_disk_create(const char *path, uint64_t size_mb, bool format,
                       char *err, size_t errlen)
{
    static const char *const mkfs[] = {"/sbin/mkfs.ext4",
                                       "/usr/sbin/mkfs.ext4"};
    const char *tool = NULL;
    int fd, status;
    pid_t pid;

    if (size_mb < 16 || size_mb > (16ull << 20)) {
        snprintf(err, errlen, "disk size %llu MB is outside 16 MB-16 TB",
                 (unsigned long long)size_mb);
        return -EINVAL;
    }
    fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(err, errlen, "create %s: %s", path, strerror(errno));
        return -errno;
    }
    if (ftruncate(fd, (off_t)(size_mb << 20)) != 0) {
        int e = errno;

        close(fd);
        unlink(path);
        snprintf(err, errlen, "size %s: %s", path, strerror(e));
        return -e;
    }
    close(fd);
    if (!format)
        return 0;
    for (size_t i = 0; i < PD_ARRAY_SIZE(mkfs) && tool == NULL; i++)
        if (access(mkfs[i], X_OK) == 0)
            tool = mkfs[i];
    if (tool == NULL)
        return 0; /* the guest formats the blank disk at first boot */
    pid = fork();
    if (pid < 0) {
        snprintf(err, errlen, "fork: %s", strerror(errno));
        return -errno;
    }
    if (pid == 0) {
        int null = open("/dev/null", O_RDWR);

        if (null >= 0) {
            dup2(null, 0);
            dup2(null, 1);
        }
        execl(tool, tool, "-q", "-F", "-t", "ext4", "-m", "0", "-L",
              "workspace", "-E",
              "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
              path, (char *)NULL);
        _exit(127);
    }
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return -errno;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        snprintf(err, errlen, "%s %s failed with status %d", tool, path,
                 status);
        unlink(path);
        return -EIO;
    }
    return 0;
}

/* ---- waiting for the guest ----------------------------------------------- */

static int
send_hello(int fd)
{
    struct pd_enc e;
    void *buf;
    size_t len;
    int rv;

    pd_enc_begin(&e, PD_MSG_HELLO, 0);
    pd_enc_u64(&e, "v", PD_PROTO_VERSION);
    pd_enc_str(&e, "role", "agent");
    pd_enc_str(&e, "name", "probe");
    rv = pd_enc_finish(&e, &buf, &len);
    if (rv != 0)
        return rv;
    rv = write(fd, buf, len) == (ssize_t)len ? 0 : -EIO;
    free(buf);
    return rv;
}

/* Waits for HELLO; also gives up when child (if > 0) exits. */
static int
wait_hello(const char *path, unsigned timeout_ms, pid_t child, int *status,
           char *err, size_t errlen)
{
    uint64_t end = pd_now_ms() + timeout_ms;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    struct pd_decoder dec;
    int fd = -1, rv = -ETIMEDOUT;

    if (strlen(path) >= sizeof(sa.sun_path)) {
        snprintf(err, errlen, "socket path too long");
        return -ENAMETOOLONG;
    }
    memcpy(sa.sun_path, path, strlen(path) + 1);
    pd_decoder_init(&dec, PD_FRAME_MAX);
    while (pd_now_ms() < end) {
        if (child > 0 && waitpid(child, status, WNOHANG) == child) {
            snprintf(err, errlen, "QEMU exited with status %d", *status);
            rv = -ECHILD;
            break;
        }
        if (fd < 0) {
            fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (fd < 0) {
                rv = -errno;
                break;
            }
            if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 ||
                send_hello(fd) != 0) {
                close(fd);
                fd = -1;
                usleep(20000);
                continue;
            }
        }
        struct pollfd p = {.fd = fd, .events = POLLIN};
        unsigned char buf[4096];
        const struct pd_msg *m;
        ssize_t n;

        if (poll(&p, 1, 50) <= 0)
            continue;
        n = read(fd, buf, sizeof(buf));
        if (n <= 0) {
            close(fd);
            fd = -1;
            continue;
        }
        if (pd_decoder_feed(&dec, buf, (size_t)n) != 0) {
            rv = -ENOMEM;
            break;
        }
        int got = pd_decoder_next(&dec, &m);

        if (got < 0) {
            snprintf(err, errlen, "bad frame from the guest: %s", dec.err);
            rv = -EPROTO;
            break;
        }
        if (got > 0 && m->type == PD_MSG_HELLO) {
            rv = 0;
            break;
        }
    }
    if (rv == -ETIMEDOUT)
        snprintf(err, errlen, "no HELLO from the guest agent in %u ms",
                 timeout_ms);
    pd_decoder_free(&dec);
    if (fd >= 0)
        close(fd);
    return rv;
}

int
agent_qemu_wait_hello(const char *path, unsigned timeout_ms, char *err,
                      size_t errlen)
{
    return wait_hello(path, timeout_ms, 0, NULL, err, errlen);
}

static int
kvm_usable(char *why, size_t whylen)
{
    int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    int v;

    if (fd < 0) {
        snprintf(why, whylen, "/dev/kvm: %s", strerror(errno));
        return -errno;
    }
    v = ioctl(fd, KVM_GET_API_VERSION, 0);
    close(fd);
    if (v != KVM_API_VERSION) {
        snprintf(why, whylen, "/dev/kvm answers API version %d", v);
        return -ENODEV;
    }
    return 0;
}

int
agent_qemu_probe(const char *qemu, const char *kernel, const char *initrd,
                 const char *workdir, unsigned timeout_ms,
                 enum agent_accel *out, char *why, size_t whylen)
{
    struct agent_qemu_spec s = {0};
    char sock[256], log[256], err[256] = "";
    char **argv = NULL;
    uint64_t t0;
    int rv, status = 0;
    pid_t pid;

    *out = AGENT_ACCEL_TCG;
    if (kvm_usable(err, sizeof(err)) != 0) {
        snprintf(why, whylen, "tcg: %s", err);
        return 0;
    }
    snprintf(sock, sizeof(sock), "%s/kvm-probe.sock", workdir);
    snprintf(log, sizeof(log), "%s/kvm-probe.log", workdir);
    unlink(sock);
    s.qemu = qemu;
    s.sandbox_id = "kvm-probe";
    s.kernel = kernel;
    s.initrd = initrd;
    s.accel = AGENT_ACCEL_KVM;
    s.guest_sock = sock;
    s.console_log = log;
    s.memory_mb = 256;
    s.cmdline_extra = "paddock.net=0";
    rv = agent_qemu_argv(&s, &argv, err, sizeof(err));
    if (rv != 0) {
        snprintf(why, whylen, "tcg: probe not run: %s", err);
        return rv;
    }
    t0 = pd_now_ms();
    pid = fork();
    if (pid < 0) {
        rv = -errno;
        agent_argv_free(argv);
        snprintf(why, whylen, "tcg: probe not run: fork: %s",
                 strerror(-rv));
        return rv;
    }
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);

        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execvp(argv[0], argv);
        _exit(127);
    }
    agent_argv_free(argv);
    rv = wait_hello(sock, timeout_ms, pid, &status, err, sizeof(err));
    if (rv != -ECHILD) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
    }
    unlink(sock);
    if (rv == 0) {
        *out = AGENT_ACCEL_KVM;
        snprintf(why, whylen, "kvm: guest agent answered in %llu ms",
                 (unsigned long long)(pd_now_ms() - t0));
    } else {
        /* Typical here: -cpu host aborts, or the guest hangs silently. */
        snprintf(why, whylen, "tcg: KVM exists but a real guest failed: "
                 "%s (console in %s)", err, log);
    }
    return 0;
}
