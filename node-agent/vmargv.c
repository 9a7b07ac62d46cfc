#include "node-agent/vmargv.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/log.h"
#include "node-agent/agent.h"
#include "node-agent/egress.h"

#define ARGV_MAX 64
#define PROBE_MS 20000

struct argv_b {
    char *v[ARGV_MAX];
    int n;
    int err;
};

static void
add(struct argv_b *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
add(struct argv_b *b, const char *fmt, ...)
{
    va_list ap;
    char *s = NULL;

    if (b->err != 0)
        return;
    va_start(ap, fmt);
    if (vasprintf(&s, fmt, ap) < 0)
        s = NULL;
    va_end(ap);
    if (s == NULL || b->n >= ARGV_MAX - 1) {
        free(s);
        b->err = -ENOMEM;
        return;
    }
    b->v[b->n++] = s;
}

/* Common part: machine, kernel, console. */
static void
base(struct argv_b *b, const struct agent *a, const char *accel,
     unsigned cpus, unsigned long long mem_mb, const char *id)
{
    add(b, "%s", a->cfg.qemu_binary);
    add(b, "-M");
    add(b, "microvm,rtc=on");
    add(b, "-accel");
    /* A smaller translation cache keeps an idle TCG VM's memory low. */
    add(b, "%s", strcmp(accel, "kvm") == 0 ? "kvm" : "tcg,tb-size=64");
    add(b, "-cpu");
    add(b, "%s", strcmp(accel, "kvm") == 0 ? "qemu64" : "max");
    add(b, "-smp");
    add(b, "%u", cpus);
    add(b, "-m");
    add(b, "%llu", mem_mb);
    add(b, "-nodefaults");
    add(b, "-no-user-config");
    add(b, "-no-reboot");
    add(b, "-display");
    add(b, "none");
    add(b, "-serial");
    add(b, "stdio");
    add(b, "-kernel");
    add(b, "%s", a->cfg.kernel);
    add(b, "-initrd");
    add(b, "%s", a->cfg.initrd);
    add(b, "-append");
    add(b, "console=ttyS0 quiet panic=-1 paddock.id=%s paddock.port=%s", id,
        VM_GUEST_PORT);
}

int
vm_argv(const struct sandbox *sb, char ***out, char *err, size_t errlen)
{
    const struct agent *a = sb->agent;
    struct argv_b b = {0};
    char **v;

    base(&b, a, a->accel, sb->cpus, (unsigned long long)sb->memory_mb,
         sb->id);
    add(&b, "-sandbox");
    add(&b, "on,obsolete=deny,elevateprivileges=deny,spawn=deny,"
            "resourcecontrol=deny");
    add(&b, "-drive");
    add(&b, "file=%s/disk.img,format=raw,if=none,id=ws,discard=unmap",
        sb->dir);
    add(&b, "-device");
    add(&b, "virtio-blk-device,drive=ws");
    add(&b, "-netdev");
    if (strcmp(sb->egress, "allow") == 0)
        add(&b, "user,id=%s,restrict=on,guestfwd=tcp:%s:%d-unix:%s/egress.sock",
            VM_NETDEV_ID, AGENT_EGRESS_GUEST_ADDR, AGENT_EGRESS_GUEST_PORT,
            sb->dir);
    else
        add(&b, "user,id=%s,restrict=%s", VM_NETDEV_ID,
            strcmp(sb->egress, "all") == 0 ? "off" : "on");
    add(&b, "-device");
    add(&b, "virtio-net-device,netdev=%s", VM_NETDEV_ID);
    add(&b, "-device");
    add(&b, "virtio-serial-device");
    add(&b, "-chardev");
    add(&b, "socket,id=pdg,path=%s/guest.sock,server=on,wait=off", sb->dir);
    add(&b, "-device");
    add(&b, "virtserialport,chardev=pdg,name=%s", VM_GUEST_PORT);
    add(&b, "-qmp");
    add(&b, "unix:%s/qmp.sock,server=on,wait=off", sb->dir);
    if (b.err != 0) {
        for (int i = 0; i < b.n; i++)
            free(b.v[i]);
        snprintf(err, errlen, "cannot build the QEMU command line");
        return b.err;
    }
    v = calloc((size_t)b.n + 1, sizeof(*v));
    if (v == NULL) {
        for (int i = 0; i < b.n; i++)
            free(b.v[i]);
        return -ENOMEM;
    }
    memcpy(v, b.v, (size_t)b.n * sizeof(*v));
    *out = v;
    return 0;
}

void
vm_argv_free(char **argv)
{
    if (argv == NULL)
        return;
    for (char **p = argv; *p; p++)
        free(*p);
    free(argv);
}

/*
 * Boots the guest image under KVM and waits for the guest agent's "ready"
 * line on the console. /dev/kvm can exist yet hang or abort real guests
 * (nested setups), hence a real boot rather than an ioctl check.
 */
static int
probe_kvm(const struct agent *a, char *why, size_t whylen)
{
    struct argv_b b = {0};
    int pfd[2], status, rv = -ETIMEDOUT;
    char buf[4096], seen[8192] = "";
    size_t seen_len = 0;
    uint64_t deadline;
    pid_t pid;

    if (access("/dev/kvm", R_OK | W_OK) != 0) {
        snprintf(why, whylen, "/dev/kvm: %s", strerror(errno));
        return -ENODEV;
    }
    base(&b, a, "kvm", 1, 256, "kvm-probe");
    add(&b, "-device");
    add(&b, "virtio-serial-device");
    if (b.err != 0 || pipe2(pfd, O_CLOEXEC) != 0)
        return -ENOMEM;
    pid = fork();
    if (pid == 0) {
        dup2(pfd[1], 1);
        dup2(pfd[1], 2);
        execvp(b.v[0], b.v);
        _exit(127);
    }
    close(pfd[1]);
    for (int i = 0; i < b.n; i++)
        free(b.v[i]);
    deadline = pd_now_ms() + PROBE_MS;
    while (pid > 0) {
        struct pollfd p = {.fd = pfd[0], .events = POLLIN};
        uint64_t now = pd_now_ms();
        ssize_t n;

        if (now >= deadline) {
            snprintf(why, whylen, "no guest agent after %d s under KVM",
                     PROBE_MS / 1000);
            break;
        }
        if (poll(&p, 1, (int)(deadline - now)) <= 0)
            continue;
        n = read(pfd[0], buf, sizeof(buf) - 1);
        if (n <= 0) {
            snprintf(why, whylen, "QEMU with KVM exited: %.200s", seen);
            rv = -EIO;
            break;
        }
        buf[n] = '\0';
        if (seen_len + (size_t)n < sizeof(seen)) {
            memcpy(seen + seen_len, buf, (size_t)n + 1);
            seen_len += (size_t)n;
        }
        if (strstr(seen, " ready in ") != NULL) {
            rv = 0;
            break;
        }
    }
    close(pfd[0]);
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return rv;
}

int
agent_choose_accel(struct agent *a, char *err, size_t errlen)
{
    char why[256] = "";

    if (strcmp(a->cfg.accel, "tcg") == 0) {
        a->accel = "tcg";
        pd_info("agent", "accel tcg: forced by the configuration");
        return 0;
    }
    if (strcmp(a->cfg.accel, "kvm") == 0) {
        if (access("/dev/kvm", R_OK | W_OK) != 0) {
            snprintf(err, errlen, "accel kvm: /dev/kvm: %s",
                     strerror(errno));
            return -ENODEV;
        }
        a->accel = "kvm";
        pd_info("agent", "accel kvm: forced by the configuration");
        return 0;
    }
    if (probe_kvm(a, why, sizeof(why)) == 0) {
        a->accel = "kvm";
        pd_info("agent", "accel kvm: the probe VM booted under KVM");
    } else {
        a->accel = "tcg";
        pd_warn("agent", "accel tcg: KVM probe failed (%s); VMs run "
                "emulated, much slower", why);
    }
    return 0;
}
