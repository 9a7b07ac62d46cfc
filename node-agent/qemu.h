/*
 * QEMU for one sandbox: the argv from a spec, the workspace disk, and the
 * KVM probe behind accel=auto.
 *
 * The VM is a `-M microvm` machine (virtio-mmio devices, no PCI, no
 * firmware), which boots fastest: a Debian cloud kernel and the busybox
 * initramfs of deploy/guest reach the guest agent in about 3 s under TCG.
 * Devices: virtio-serial with one port (org.paddock.guest) whose host end
 * is a unix socket QEMU listens on (server=on,wait=off: the node agent may
 * connect, leave and connect again); virtio-blk for the workspace disk;
 * virtio-net on a user-mode (slirp) stack of its own; virtio-rng. The
 * console goes to a log file and QMP to a second unix socket. QEMU runs
 * under its seccomp sandbox with -no-reboot, so a guest poweroff, reboot
 * or panic ends the process.
 *
 * Known traps (DESIGN.md 9): `-cpu host` aborts on nested KVM here, which
 * is why accel=auto boots the real image before trusting KVM. Under TCG a
 * loaded host makes the kernel's PIT calibration of the TSC fail, after
 * which the guest hangs; TCG's TSC runs at the host's rate, so the argv
 * passes the host's measured TSC frequency (tsc_early_khz) instead.
 *
 * Everything returns 0 or a negative errno, with a reason in err.
 */
#ifndef AGENT_QEMU_H
#define AGENT_QEMU_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum agent_accel {
    AGENT_ACCEL_TCG = 0,
    AGENT_ACCEL_KVM = 1,
};

/* Name of the guest agent's virtio-serial port. */
#define AGENT_GUEST_PORT "org.paddock.guest"

/* host 127.0.0.1:host_port -> guest:guest_port over TCP. */
struct agent_qemu_fwd {
    uint16_t host_port;
    uint16_t guest_port;
};

struct agent_qemu_spec {
    const char *qemu;        /* binary; NULL: "qemu-system-x86_64" */
    const char *sandbox_id;  /* guest hostname; must pass pd_id_valid */
    const char *kernel;
    const char *initrd;
    const char *cmdline_extra; /* appended to the kernel command line */
    const char *disk_path;   /* workspace image (raw); NULL: none */
    unsigned vcpus;          /* 0: 1 */
    unsigned memory_mb;      /* 0: 512 */
    enum agent_accel accel;
    const char *guest_sock;  /* unix socket of the guest agent's port */
    const char *qmp_sock;    /* NULL: no QMP */
    const char *console_log; /* NULL: console discarded */
    bool net;                /* a virtio-net device on slirp */
    bool egress;             /* false: restrict=on (no outbound traffic) */
    const struct agent_qemu_fwd *fwds; /* hostfwd, bound to 127.0.0.1 */
    size_t nfwds;
    /* Egress proxy: guest connections to 10.0.2.100:proxy_guest_port go to
     * 127.0.0.1:proxy_host_port on the host (works with restrict=on). */
    uint16_t proxy_guest_port;
    uint16_t proxy_host_port;
    /* Added by the node agent: with proxy_guest_port, guest connections
     * go to this unix socket instead (the agent listens on one per
     * sandbox, so the proxy knows the sandbox without trusting the guest).
     * The chardev reconnects, so a restarted agent serves it again. */
    const char *proxy_unix;
    bool no_seccomp;         /* leave out -sandbox (debugging only) */
    uint32_t tsc_khz;        /* TCG only; 0: measured on this host */
    const char *const *extra_args; /* NULL-terminated, appended verbatim */
};

/*
 * Builds the argv (NULL-terminated, malloc'd; free with agent_argv_free).
 * Checks the spec (ids, paths without commas, sizes) first.
 */
int agent_qemu_argv(const struct agent_qemu_spec *s, char ***out, char *err,
                    size_t errlen);
void agent_argv_free(char **argv);

/* The host TSC frequency in kHz (measured once, ~20 ms), or 0. */
uint32_t agent_qemu_tsc_khz(void);

/*
 * Creates a sparse raw image of size_mb at path (mode 0600, must not
 * exist). With format, runs mkfs.ext4 on it on the host, which is much
 * faster than the guest's first-boot format under TCG; the guest formats
 * a blank disk itself otherwise.
 */
int agent_qemu_disk_create(const char *path, uint64_t size_mb, bool format,
                           char *err, size_t errlen);

/*
 * accel=auto: decides between KVM and TCG. Uses KVM only when /dev/kvm
 * opens, answers KVM_GET_API_VERSION, and a real boot of kernel+initrd
 * under KVM reaches the guest agent's HELLO within timeout_ms. Blocks
 * (call it once at start-up). Sets *out and a one-line reason in why
 * ("kvm: guest agent answered in 812 ms" or "tcg: ..."). Returns 0, or a
 * negative errno when the probe itself could not run (then *out is TCG).
 * workdir holds the probe's sockets and console log.
 */
int agent_qemu_probe(const char *qemu, const char *kernel, const char *initrd,
                     const char *workdir, unsigned timeout_ms,
                     enum agent_accel *out, char *why, size_t whylen);

/*
 * Waits up to timeout_ms for a HELLO from the guest agent on the unix
 * socket at path (connecting as soon as QEMU creates it). Blocking; used by
 * the probe and by tools. Returns 0, -ETIMEDOUT or another -errno.
 */
int agent_qemu_wait_hello(const char *path, unsigned timeout_ms, char *err,
                          size_t errlen);

#endif
