/*
 * paddock-guest as PID 1: prepares the VM, then serves the host forever.
 *
 * Boot steps, in order: mount the pseudo file systems, take /dev/console
 * as stdio, read our settings from the kernel command line, load the
 * modules listed in /lib/modules/load.order (dependencies first, put there
 * by deploy/guest/build.sh; the PCI transport only when there is PCI;
 * paddock.log=debug times each), bring up loopback, set the hostname to the
 * sandbox id, mount cgroup2, mount the workspace disk (formatting a blank
 * one as ext4), start DHCP in the background, and open the virtio-serial
 * port. Nothing here may exit: PID 1 ending panics the kernel, so failures
 * are logged and the agent serves anyway with what it has.
 *
 * Kernel command line settings:
 *   paddock.id=ID          hostname and $PADDOCK_SANDBOX (default paddock)
 *   paddock.port=NAME      virtio-serial port name (org.paddock.guest)
 *   paddock.net=0|1        DHCP on eth0 when present (default 1)
 *   paddock.pids_max=N     process cap per exec or process (default 1024)
 *   paddock.log=LEVEL      debug, info, warn or error (default info)
 *   paddock.host_stall_ms=N  end the session of a host that reads nothing
 *                          for N ms while replies wait (default 30000)
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "guest-agent/guest.h"

#define DEFAULT_PORT "org.paddock.guest"
#define WORKSPACE_DEV "/dev/vda"

char **guest_base_env;
bool guest_is_init;

static struct {
    char id[PD_ID_MAX + 1];
    char port[64];
    bool net;
    unsigned pids_max;
    unsigned stall_ms;
    char log[16];
} cfg = {.id = "paddock", .port = DEFAULT_PORT, .net = true,
         .pids_max = 1024, .log = "info"};

static void
mount_one(const char *src, const char *dst, const char *type,
          unsigned long flags, const char *data)
{
    mkdir(dst, 0755);
    if (mount(src, dst, type, flags, data) != 0 && errno != EBUSY)
        pd_log_errno(PD_LOG_WARN, errno, "init", "mount %s on %s, going on",
                     type, dst);
}

static void
mount_basics(void)
{
    mount_one("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
              NULL);
    mount_one("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
              NULL);
    mount_one("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    mount_one("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
              "gid=5,mode=620,ptmxmode=666");
    mount_one("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV,
              "mode=1777");
    mount_one("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    mount_one("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
}

/* The kernel found no /dev/console in the initramfs: stdio is closed. */
static void
open_console(void)
{
    int fd = open("/dev/console", O_RDWR | O_NOCTTY);

    if (fd < 0)
        fd = open("/dev/null", O_RDWR);
    if (fd < 0)
        return;
    for (int i = 0; i < 3; i++)
        if (fd != i)
            dup2(fd, i);
    if (fd > 2)
        close(fd);
}

static void
read_cmdline(void)
{
    /* /proc files report size 0, so read it as a stream. */
    static char buf[4096];
    char *save = NULL;
    FILE *f = fopen("/proc/cmdline", "re");

    if (f == NULL)
        return;
    if (fgets(buf, sizeof(buf), f) == NULL)
        buf[0] = '\0';
    fclose(f);
    for (char *t = strtok_r(buf, " \n", &save); t != NULL;
         t = strtok_r(NULL, " \n", &save)) {
        if (strncmp(t, "paddock.id=", 11) == 0 && pd_id_valid(t + 11))
            pd_strlcpy(cfg.id, t + 11, sizeof(cfg.id));
        else if (strncmp(t, "paddock.port=", 13) == 0)
            pd_strlcpy(cfg.port, t + 13, sizeof(cfg.port));
        else if (strncmp(t, "paddock.net=", 12) == 0)
            cfg.net = strcmp(t + 12, "0") != 0;
        else if (strncmp(t, "paddock.pids_max=", 17) == 0)
            cfg.pids_max = (unsigned)strtoul(t + 17, NULL, 10);
        else if (strncmp(t, "paddock.host_stall_ms=", 22) == 0)
            cfg.stall_ms = (unsigned)strtoul(t + 22, NULL, 10);
        else if (strncmp(t, "paddock.log=", 12) == 0)
            pd_strlcpy(cfg.log, t + 12, sizeof(cfg.log));
    }
}

/* True when the machine has a PCI device (-M microvm has none). */
static bool
have_pci(void)
{
    DIR *d = opendir("/sys/bus/pci/devices");
    struct dirent *e;
    bool found = false;

    if (d == NULL)
        return false;
    while (!found && (e = readdir(d)) != NULL)
        found = e->d_name[0] != '.';
    closedir(d);
    return found;
}

/*
 * Loads /lib/modules/load.order, dependencies first. The virtio PCI
 * transport is left out on a machine without PCI: under TCG each module
 * costs tens of milliseconds of boot, and microvm only has virtio-mmio.
 */
static void
load_modules(void)
{
    FILE *f = fopen("/lib/modules/load.order", "re");
    bool pci = have_pci();
    char name[128];
    int n = 0;

    if (f == NULL) {
        pd_warn("init", "no /lib/modules/load.order; assuming a kernel with "
                "virtio built in");
        return;
    }
    while (fscanf(f, "%127s", name) == 1) {
        uint64_t t1 = pd_now_ms();
        char path[192];
        int fd;

        if (!pci && strncmp(name, "virtio_pci", 10) == 0) {
            pd_debug("init", "module %s: no PCI bus, skipped", name);
            continue;
        }
        snprintf(path, sizeof(path), "/lib/modules/%s.ko", name);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            pd_log_errno(PD_LOG_WARN, errno, "init", "module %s", name);
            continue;
        }
        if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST)
            pd_log_errno(PD_LOG_WARN, errno, "init",
                         "loading module %s, going on", name);
        else
            n++;
        close(fd);
        pd_debug("init", "module %s: %llu ms", name,
                 (unsigned long long)(pd_now_ms() - t1));
    }
    fclose(f);
    pd_debug("init", "%d modules loaded", n);
}

static void
iface_up(const char *name)
{
    struct ifreq ifr;
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);

    if (fd < 0)
        return;
    memset(&ifr, 0, sizeof(ifr));
    pd_strlcpy(ifr.ifr_name, name, sizeof(ifr.ifr_name));
    if (ioctl(fd, SIOCGIFFLAGS, &ifr) == 0) {
        ifr.ifr_flags |= IFF_UP;
        if (ioctl(fd, SIOCSIFFLAGS, &ifr) != 0)
            pd_log_errno(PD_LOG_WARN, errno, "init", "%s up", name);
    }
    close(fd);
}

/* Runs argv and waits for it; only at boot, before serving. */
static int
run_wait(char *const argv[])
{
    int status;
    pid_t pid = fork();

    if (pid < 0)
        return -errno;
    if (pid == 0) {
        execv(argv[0], argv);
        _exit(127);
    }
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return -errno;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

/* Blank: no ext superblock and the first 64 KiB all zero. */
static int
disk_state(const char *dev)
{
    unsigned char buf[65536];
    int fd = open(dev, O_RDONLY | O_CLOEXEC);
    ssize_t n;

    if (fd < 0)
        return -errno;
    n = pread(fd, buf, sizeof(buf), 0);
    close(fd);
    if (n != (ssize_t)sizeof(buf))
        return -EIO;
    if (buf[1080] == 0x53 && buf[1081] == 0xEF)
        return 1; /* ext2/3/4 */
    for (size_t i = 0; i < sizeof(buf); i++)
        if (buf[i] != 0)
            return 2; /* something else: never format it */
    return 0;
}

static void
mount_workspace(void)
{
    char *mkfs[] = {"/sbin/mke2fs", "-q", "-F", "-t", "ext4", "-m", "0",
                    "-L", "workspace", "-E",
                    "lazy_itable_init=1,lazy_journal_init=1",
                    WORKSPACE_DEV, NULL};
    struct stat st;
    int state;

    mkdir("/workspace", 0755);
    if (stat("/sys/block/vda", &st) != 0) {
        pd_info("init", "no workspace disk; /workspace is in memory");
        return;
    }
    for (int i = 0; i < 200 && stat(WORKSPACE_DEV, &st) != 0; i++)
        usleep(5000);
    state = disk_state(WORKSPACE_DEV);
    if (state < 0) {
        pd_log_errno(PD_LOG_ERROR, -state, "init",
                     "reading %s; /workspace stays in memory", WORKSPACE_DEV);
        return;
    }
    if (state == 2) {
        pd_error("init", "%s holds data but no ext4 file system; not "
                 "formatting it, /workspace stays in memory", WORKSPACE_DEV);
        return;
    }
    if (state == 0) {
        int rv = run_wait(mkfs);

        if (rv != 0) {
            pd_error("init", "mke2fs %s failed (%d); /workspace stays in "
                     "memory", WORKSPACE_DEV, rv);
            return;
        }
        pd_info("init", "formatted the blank workspace disk as ext4");
    }
    if (mount(WORKSPACE_DEV, "/workspace", "ext4", MS_NOATIME, "") != 0) {
        pd_log_errno(PD_LOG_ERROR, errno, "init",
                     "mount %s on /workspace; it stays in memory",
                     WORKSPACE_DEV);
        return;
    }
}

static void
start_dhcp(void)
{
    char *argv[] = {"/sbin/udhcpc", "-i", "eth0", "-s", "/etc/udhcpc.script",
                    "-q", "-f", "-n", "-t", "10", "-T", "1", NULL};
    struct stat st;
    pid_t pid;

    if (!cfg.net || stat("/sys/class/net/eth0", &st) != 0)
        return;
    iface_up("eth0");
    /* In the background: the agent serves while the lease comes. */
    pid = fork();
    if (pid == 0) {
        int null = open("/dev/null", O_RDWR);

        if (null >= 0) {
            dup2(null, 0);
            dup2(null, 1);
        }
        execv(argv[0], argv);
        _exit(127);
    }
    if (pid < 0)
        pd_log_errno(PD_LOG_WARN, errno, "init", "cannot start udhcpc");
}

static void
make_env(void)
{
    static char sandbox[PD_ID_MAX + 32];
    static char *env[] = {
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME=/root", "LANG=C.UTF-8", "SHELL=/bin/sh", sandbox, NULL};

    snprintf(sandbox, sizeof(sandbox), "PADDOCK_SANDBOX=%s", cfg.id);
    guest_base_env = env;
    /* The kernel starts init without PATH; mke2fs and udhcpc need none,
     * but anything the agent runs by name does. */
    setenv("PATH", env[0] + 5, 1);
}

void
child_exited(pid_t pid, int status)
{
    if (!exec_child_exited(pid, status))
        proc_child_exited(pid, status);
}

void
guest_poweroff(void)
{
    proc_kill_all();
    kill(-1, SIGTERM);
    usleep(200000);
    kill(-1, SIGKILL);
    sync();
    if (umount2("/workspace", 0) != 0)
        umount2("/workspace", MNT_DETACH);
    sync();
    reboot(RB_POWER_OFF);
    /* Without ACPI power-off, a reboot ends the VM (QEMU -no-reboot). */
    reboot(RB_AUTOBOOT);
    for (;;)
        pause();
}

int
main(int argc, char **argv)
{
    enum pd_log_level lvl = PD_LOG_INFO;
    uint64_t t0 = pd_now_ms();
    int rv;

    (void)argv;
    guest_is_init = getpid() == 1;
    if (!guest_is_init || argc > 1) {
        fprintf(stderr, "paddock-guest: the guest agent runs as PID 1 (/init) "
                "inside a Paddock VM; see guest-agent/README.md\n");
        return 2;
    }
    mount_basics();
    open_console();
    read_cmdline();
    pd_log_parse_level(cfg.log, &lvl);
    pd_log_init("paddock-guest", lvl);
    signal(SIGPIPE, SIG_IGN);

    load_modules();
    pd_debug("init", "modules loaded at %llu ms",
             (unsigned long long)(pd_now_ms() - t0));
    iface_up("lo");
    if (sethostname(cfg.id, strlen(cfg.id)) != 0)
        pd_log_errno(PD_LOG_WARN, errno, "init", "sethostname");
    rv = spawn_cgroup_init();
    if (rv != 0)
        pd_log_errno(PD_LOG_WARN, -rv, "init", "cgroup2 unavailable; "
                     "timeouts kill process groups only");
    spawn_set_pids_max(cfg.pids_max);
    /* The agent must outlive any memory hog the sandbox runs. */
    {
        int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);

        if (fd >= 0) {
            (void)!write(fd, "-1000", 5);
            close(fd);
        }
    }
    mount_workspace();
    pd_debug("init", "workspace ready at %llu ms",
             (unsigned long long)(pd_now_ms() - t0));
    make_env();
    start_dhcp();
    loop_init();

    server_set_stall_ms(cfg.stall_ms);
    rv = server_init(cfg.port);
    if (rv != 0)
        pd_log_errno(PD_LOG_ERROR, -rv, "init",
                     "cannot open the host channel; idling");
    pd_info("init", "sandbox %s ready in %llu ms", cfg.id,
            (unsigned long long)(pd_now_ms() - t0));
    loop_run();
}
