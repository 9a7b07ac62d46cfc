/*
 * paddock-agent: runs sandboxes as QEMU VMs on one worker host.
 *
 * Start-up order: configuration, data directory, sqlite state, cgroups,
 * capacity, TLS, the VM accelerator, re-adoption of the VMs recorded in
 * the state, the RPC listener, then the session with the leader. SIGTERM
 * and SIGINT stop the agent and leave the VMs running (a restarted agent
 * adopts them) unless stop_vms_on_exit is set.
 */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/config.h"
#include "common/log.h"
#include "node-agent/agent.h"
#include "node-agent/qemu.h"
#include "node-agent/session.h"
#include "node-agent/state.h"
#include "node-agent/tlsauth.h"

#define MIB (1024ULL * 1024ULL)

static struct agent agent;

static const struct pd_config_opt options[] = {
    {"data_dir", PD_CFG_STRING, &agent.cfg.data_dir,
     "state, disks and sockets (default /var/lib/paddock-agent)"},
    {"rpc_listen", PD_CFG_STRING, &agent.cfg.rpc_listen,
     "RPC listen address for the schedulers (default 127.0.0.1:7400)"},
    {"rpc_advertise", PD_CFG_STRING, &agent.cfg.rpc_advertise,
     "RPC address told to the schedulers (default: the bound one)"},
    {"tls_cert", PD_CFG_STRING, &agent.cfg.tls_cert,
     "this agent's certificate (PEM, from deploy/make-certs.sh)"},
    {"tls_key", PD_CFG_STRING, &agent.cfg.tls_key, "its private key"},
    {"tls_ca", PD_CFG_STRING, &agent.cfg.tls_ca, "the cluster CA (PEM)"},
    {"schedulers", PD_CFG_LIST, &agent.cfg.schedulers,
     "scheduler session addresses host:port,... (empty: run alone)"},
    {"node_id", PD_CFG_STRING, &agent.cfg.node_id,
     "node id [a-z0-9-] (default: kept in the state, else node-<random>)"},
    {"labels", PD_CFG_LIST, &agent.cfg.labels, "node labels k=v,..."},
    {"reserve_cpus", PD_CFG_UINT, &agent.cfg.reserve_cpus,
     "host CPUs kept for the host (default 0)"},
    {"reserve_memory", PD_CFG_SIZE, &agent.cfg.reserve_memory,
     "host memory kept for the host (default 512M)"},
    {"reserve_disk", PD_CFG_SIZE, &agent.cfg.reserve_disk,
     "disk kept free on the data file system (default 2G)"},
    {"cpu_overcommit", PD_CFG_UINT, &agent.cfg.cpu_overcommit,
     "vCPUs offered per host CPU (default 4; memory is never overcommitted)"},
    {"memory_overhead", PD_CFG_SIZE, &agent.cfg.memory_overhead,
     "per-VM memory allowed to QEMU beyond guest memory (default 256M)"},
    {"max_cpus", PD_CFG_UINT, &agent.cfg.max_cpus,
     "largest vCPU count of one sandbox (default 16)"},
    {"max_memory", PD_CFG_SIZE, &agent.cfg.max_memory,
     "largest memory of one sandbox (default 64G)"},
    {"min_memory", PD_CFG_SIZE, &agent.cfg.min_memory,
     "smallest memory of one sandbox (default 128M)"},
    {"max_disk", PD_CFG_SIZE, &agent.cfg.max_disk,
     "largest disk of one sandbox (default 1T)"},
    {"min_disk", PD_CFG_SIZE, &agent.cfg.min_disk,
     "smallest disk of one sandbox (default 16M)"},
    {"accel", PD_CFG_STRING, &agent.cfg.accel,
     "auto (probe KVM with a boot), kvm or tcg (default auto)"},
    {"kvm_probe_timeout", PD_CFG_DURATION, &agent.cfg.kvm_probe_timeout_ms,
     "accel auto: time for the probe VM to boot under KVM (default 15s)"},
    {"kernel", PD_CFG_STRING, &agent.cfg.kernel,
     "guest kernel (default deploy/guest/out/vmlinuz)"},
    {"initrd", PD_CFG_STRING, &agent.cfg.initrd,
     "guest initramfs (default deploy/guest/out/initrd.img)"},
    {"qemu_binary", PD_CFG_STRING, &agent.cfg.qemu_binary,
     "QEMU system emulator (default qemu-system-x86_64)"},
    {"qemu_user", PD_CFG_STRING, &agent.cfg.qemu_user,
     "user QEMU runs as when the agent is root (default paddock, else "
     "nobody)"},
    {"cgroup", PD_CFG_STRING, &agent.cfg.cgroup,
     "auto, v1, v2 or none (default auto)"},
    {"exec_timeout", PD_CFG_DURATION, &agent.cfg.exec_timeout_ms,
     "default exec timeout (default 60s)"},
    {"output_max", PD_CFG_SIZE, &agent.cfg.output_max,
     "default cap of collected exec output per stream (default 1M)"},
    {"heartbeat", PD_CFG_DURATION, &agent.cfg.heartbeat_ms,
     "heartbeat interval until the leader names one (default 1s)"},
    {"boot_timeout", PD_CFG_DURATION, &agent.cfg.boot_timeout_ms,
     "time for a VM to reach its guest agent (default 120s)"},
    {"stop_timeout", PD_CFG_DURATION, &agent.cfg.stop_timeout_ms,
     "time for a clean guest poweroff before QMP quit (default 10s)"},
    {"join_token_file", PD_CFG_STRING, &agent.cfg.join_token_file,
     "file holding this node's join token (paddock token create --role "
     "node --tenant NODE); sent when registering"},
    {"stop_vms_on_exit", PD_CFG_BOOL, &agent.cfg.stop_vms_on_exit,
     "stop every VM when the agent exits (default false: keep them)"},
    {"log_level", PD_CFG_STRING, &agent.cfg.log_level,
     "debug, info, warn or error (default info)"},
    {NULL, 0, NULL, NULL},
};

static void
set_defaults(struct agent_cfg *c)
{
    c->data_dir = "/var/lib/paddock-agent";
    c->rpc_listen = "127.0.0.1:7400";
    c->accel = "auto";
    c->qemu_binary = "qemu-system-x86_64";
    c->qemu_user = "paddock";
    c->cgroup = "auto";
    c->log_level = "info";
    c->kernel = "deploy/guest/out/vmlinuz";
    c->initrd = "deploy/guest/out/initrd.img";
    c->reserve_memory = 512 * MIB;
    c->reserve_disk = 2048 * MIB;
    c->cpu_overcommit = 4;
    c->memory_overhead = 256 * MIB;
    c->max_cpus = 16;
    c->max_memory = 64ULL << 30;
    c->min_memory = 128 * MIB;
    c->max_disk = 1ULL << 40;
    c->min_disk = 16 * MIB;
    c->exec_timeout_ms = 60000;
    c->output_max = 1 << 20;
    c->heartbeat_ms = 1000;
    c->boot_timeout_ms = 120000;
    c->stop_timeout_ms = 10000;
    c->kvm_probe_timeout_ms = 15000;
}

static int
check_config(const struct agent_cfg *c, char *err, size_t errlen)
{
    struct sockaddr_storage sa;

    if (c->data_dir[0] != '/') {
        snprintf(err, errlen, "data_dir must be an absolute path");
        return -EINVAL;
    }
    /* Socket paths (data_dir/vm/<12 hex>/guest.sock) must fit sun_path. */
    if (strlen(c->data_dir) > 70) {
        snprintf(err, errlen, "data_dir is longer than 70 characters");
        return -ENAMETOOLONG;
    }
    /* QEMU option values split at commas; its paths come from here. */
    if (strchr(c->data_dir, ',') != NULL || strchr(c->kernel, ',') != NULL ||
        strchr(c->initrd, ',') != NULL) {
        snprintf(err, errlen, "data_dir, kernel and initrd must not hold a "
                 "comma");
        return -EINVAL;
    }
    if (agent_parse_addr(c->rpc_listen, &sa) != 0) {
        snprintf(err, errlen, "rpc_listen: \"%s\" is not host:port",
                 c->rpc_listen);
        return -EINVAL;
    }
    if (strcmp(c->accel, "auto") != 0 && strcmp(c->accel, "kvm") != 0 &&
        strcmp(c->accel, "tcg") != 0) {
        snprintf(err, errlen, "accel: \"%s\" is not auto, kvm or tcg",
                 c->accel);
        return -EINVAL;
    }
    if (c->node_id != NULL && !pd_id_valid(c->node_id)) {
        snprintf(err, errlen, "node_id: \"%s\" is not [a-z0-9][a-z0-9-]*",
                 c->node_id);
        return -EINVAL;
    }
    if (c->cpu_overcommit == 0 || c->cpu_overcommit > 64 ||
        c->min_memory > c->max_memory || c->min_disk > c->max_disk ||
        c->max_cpus == 0) {
        snprintf(err, errlen,
                 "cpu_overcommit must be 1-64, and each min below its max");
        return -EINVAL;
    }
    if (c->labels != NULL && *c->labels != '\0') {
        for (const char *p = c->labels; *p;) {
            size_t n = strcspn(p, ",");
            const char *eq = memchr(p, '=', n);

            if (eq == NULL || eq == p) {
                snprintf(err, errlen, "labels: \"%.*s\" is not k=v", (int)n,
                         p);
                return -EINVAL;
            }
            p += n;
            if (*p == ',')
                p++;
        }
    }
    return 0;
}

/* Chooses the user QEMU runs as: never root when we are root. */
static int
pick_qemu_user(struct agent *a, char *err, size_t errlen)
{
    struct passwd *pw;

    if (geteuid() != 0) {
        a->drop_privileges = false;
        a->qemu_uid = geteuid();
        a->qemu_gid = getegid();
        return 0;
    }
    pw = getpwnam(a->cfg.qemu_user);
    if (pw == NULL && strcmp(a->cfg.qemu_user, "paddock") == 0) {
        pd_warn("agent", "no user \"paddock\" (create it with useradd "
                "--system paddock); QEMU runs as \"nobody\" instead");
        pw = getpwnam("nobody");
    }
    if (pw == NULL || pw->pw_uid == 0) {
        snprintf(err, errlen, "qemu_user \"%s\": no such unprivileged user",
                 a->cfg.qemu_user);
        return -ENOENT;
    }
    a->drop_privileges = true;
    a->qemu_uid = pw->pw_uid;
    a->qemu_gid = pw->pw_gid;
    return 0;
}

/*
 * QEMU runs as qemu_uid and opens its sockets and disk in data_dir/vm/X:
 * every directory on the way must let that user through. Checked here so
 * the failure names the directory, instead of every VM dying at start.
 */
static int
check_traversable(const struct agent *a, const char *dir, char *err,
                  size_t errlen)
{
    char path[PATH_MAX];
    struct stat st;

    if (!a->drop_privileges)
        return 0;
    pd_strlcpy(path, dir, sizeof(path));
    for (char *p = path + strlen(path); p > path;) {
        mode_t need;

        if (stat(path, &st) != 0)
            return 0;
        need = st.st_uid == a->qemu_uid   ? S_IXUSR
               : st.st_gid == a->qemu_gid ? S_IXGRP
                                          : S_IXOTH;
        if ((st.st_mode & need) == 0) {
            snprintf(err, errlen, "QEMU's user (uid %d) cannot enter %s "
                     "(mode %04o): use a data_dir it can reach",
                     (int)a->qemu_uid, path, (unsigned)(st.st_mode & 07777));
            return -EACCES;
        }
        p = strrchr(path, '/');
        if (p == NULL)
            break;
        *p = '\0';
    }
    return 0;
}

static int
open_state(struct agent *a, char *err, size_t errlen)
{
    char path[PATH_MAX], *saved = NULL;
    uint8_t rnd[4];
    char hex[9];
    int rv;

    rv = pd_mkdir_p(a->cfg.data_dir, 0711);
    if (rv == 0) {
        snprintf(path, sizeof(path), "%s/vm", a->cfg.data_dir);
        rv = pd_mkdir_p(path, 0711);
    }
    if (rv != 0) {
        snprintf(err, errlen, "data_dir %s: %s", a->cfg.data_dir,
                 strerror(-rv));
        return rv;
    }
    /* QEMU's user must traverse to its own 0700 directory. */
    chmod(a->cfg.data_dir, 0711);
    rv = check_traversable(a, path, err, errlen);
    if (rv != 0)
        return rv;
    snprintf(path, sizeof(path), "%s/agent.db", a->cfg.data_dir);
    rv = agent_state_open(path, &a->state, err, errlen);
    if (rv != 0)
        return rv;

    if (a->cfg.node_id != NULL) {
        pd_strlcpy(a->node, a->cfg.node_id, sizeof(a->node));
    } else if (agent_state_meta_get(a->state, "node_id", &saved) == 0 &&
               pd_id_valid(saved)) {
        pd_strlcpy(a->node, saved, sizeof(a->node));
    } else {
        pd_random_bytes(rnd, sizeof(rnd));
        pd_hex(rnd, sizeof(rnd), hex);
        snprintf(a->node, sizeof(a->node), "node-%s", hex);
    }
    free(saved);
    return agent_state_meta_set(a->state, "node_id", a->node);
}

static int
setup_cgroups(struct agent *a, char *err, size_t errlen)
{
    struct agent_cg_source src = {.want = a->cfg.cgroup};
    char child[PD_ID_MAX + 1];
    int rv;

    /* One parent per node: agents sharing a host (a local cluster, or an
     * old agent's VMs still running) never share a sandbox cgroup. */
    if (snprintf(child, sizeof(child), "paddock-%s", a->node) >=
        (int)sizeof(child))
        pd_strlcpy(child, "paddock", sizeof(child));
    src.child = child;
    rv = agent_cg_init(&a->cg, &src, err, errlen);

    if (rv != 0)
        return rv;
    if (a->cg.mode == AGENT_CG_NONE)
        pd_warn("agent", "no usable cgroup controllers (cgroup = %s): VMs "
                "are bounded by QEMU's -smp and -m only", a->cfg.cgroup);
    else
        pd_info("agent", "cgroups %s: sandboxes under %s",
                agent_cg_mode_name(&a->cg),
                a->cg.mode == AGENT_CG_V2 ? a->cg.v2_dir : a->cg.mem_dir);
    return 0;
}

/* The agent's own memory cgroup limit, which bounds what it can offer. */
static uint64_t
own_memory_limit(const struct agent *a)
{
    char path[PATH_MAX], text[64] = "";
    uint64_t v = 0;
    const char *dir = a->cg.mode == AGENT_CG_V2 ? a->cg.v2_dir : a->cg.mem_dir;
    char *slash;
    ssize_t n;
    int fd;

    if (a->cg.mode == AGENT_CG_NONE)
        return 0;
    pd_strlcpy(path, dir, sizeof(path));
    slash = strrchr(path, '/');
    if (slash == NULL)
        return 0;
    snprintf(slash, sizeof(path) - (size_t)(slash - path), "/%s",
             a->cg.mode == AGENT_CG_V2 ? "memory.max"
                                       : "memory.limit_in_bytes");
    /* Not pd_read_file: cgroup files report a size of 0 to fstat. */
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    n = read(fd, text, sizeof(text) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    text[n] = '\0';
    text[strcspn(text, "\n")] = '\0';
    /* "max" (v2) and v1's huge "unlimited" value mean no limit. */
    if (pd_parse_u64(text, &v) != 0 || v >= (1ULL << 62))
        v = 0;
    return v;
}

static int
setup_capacity(struct agent *a, char *err, size_t errlen)
{
    struct agent_capacity_cfg cc = {
        .data_dir = a->cfg.data_dir,
        .reserve_cpus = a->cfg.reserve_cpus,
        .reserve_memory = a->cfg.reserve_memory,
        .reserve_disk = a->cfg.reserve_disk,
        .cpu_overcommit = (double)a->cfg.cpu_overcommit,
        .cgroup_mem_limit = own_memory_limit(a),
    };
    int rv = agent_capacity_probe(&cc, &a->offer, err, errlen);

    if (rv == 0)
        pd_info("agent", "offering %llu vCPUs, %llu MiB memory, %llu MiB "
                "disk (each VM also costs %llu MiB of QEMU overhead)",
                (unsigned long long)a->offer.cpus,
                (unsigned long long)a->offer.memory_mb,
                (unsigned long long)a->offer.disk_mb,
                (unsigned long long)(a->cfg.memory_overhead / MIB));
    return rv;
}

static int
setup_tls(struct agent *a, char *err, size_t errlen)
{
    a->rpc_tls = agent_tls_ctx(true, a->cfg.tls_cert, a->cfg.tls_key,
                               a->cfg.tls_ca, err, errlen);
    if (a->rpc_tls == NULL)
        return -EINVAL;
    a->session_tls = agent_tls_ctx(false, a->cfg.tls_cert, a->cfg.tls_key,
                                   a->cfg.tls_ca, err, errlen);
    return a->session_tls == NULL ? -EINVAL : 0;
}

/* QEMU runs in the sandbox's directory: image paths must be absolute. */
static int
absolute(char **path)
{
    char *abs = realpath(*path, NULL);
    char err[64];

    if (abs == NULL)
        return -errno;
    pd_config_set(options, path == &agent.cfg.kernel ? "kernel" : "initrd",
                  abs, err, sizeof(err));
    free(abs);
    return 0;
}

/* Becomes QEMU's user (in a child process that is about to run QEMU). */
static int
become_qemu_user(const struct agent *a)
{
    if (!a->drop_privileges)
        return 0;
    if (setgroups(0, NULL) != 0 || setgid(a->qemu_gid) != 0 ||
        setuid(a->qemu_uid) != 0)
        return -errno;
    return 0;
}

/* True when QEMU's user can open /dev/kvm (tried in a child). */
static bool
kvm_opens_as_qemu_user(const struct agent *a)
{
    int status;
    pid_t pid = fork();

    if (pid == 0) {
        int fd;

        if (become_qemu_user(a) != 0)
            _exit(1);
        fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
        _exit(fd >= 0 ? 0 : 1);
    }
    if (pid < 0)
        return false;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return false;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

/*
 * Runs qemu.c's KVM probe as QEMU's user, in a child: the VMs will run as
 * that user, so KVM counts only if that user can use /dev/kvm (here it is
 * root's alone, mode 0600), and the probe's QEMU should not run as root
 * either. The probe's files go to data_dir/probe, owned by that user.
 */
static void
probe_as_qemu_user(struct agent *a, enum agent_accel *acc, char *why,
                   size_t whylen)
{
    struct {
        int acc;
        char why[480];
    } r = {AGENT_ACCEL_TCG, ""};
    char dir[PATH_MAX];
    int pfd[2], status;
    ssize_t n = 0;
    pid_t pid;

    snprintf(dir, sizeof(dir), "%s/probe", a->cfg.data_dir);
    pd_rm_rf(dir);
    if (mkdir(dir, 0700) != 0 ||
        (a->drop_privileges && chown(dir, a->qemu_uid, a->qemu_gid) != 0) ||
        pipe2(pfd, O_CLOEXEC) != 0) {
        snprintf(why, whylen, "tcg: probe not run: %s", strerror(errno));
        *acc = AGENT_ACCEL_TCG;
        return;
    }
    pid = fork();
    if (pid == 0) {
        enum agent_accel out = AGENT_ACCEL_TCG;

        close(pfd[0]);
        if (become_qemu_user(a) != 0)
            snprintf(r.why, sizeof(r.why), "tcg: cannot become uid %d",
                     (int)a->qemu_uid);
        else
            agent_qemu_probe(a->cfg.qemu_binary, a->cfg.kernel,
                             a->cfg.initrd, dir,
                             (unsigned)a->cfg.kvm_probe_timeout_ms, &out,
                             r.why, sizeof(r.why));
        r.acc = (int)out;
        _exit(write(pfd[1], &r, sizeof(r)) == (ssize_t)sizeof(r) ? 0 : 1);
    }
    close(pfd[1]);
    if (pid > 0) {
        while ((n = read(pfd[0], &r, sizeof(r))) < 0 && errno == EINTR)
            ;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
            ;
    }
    close(pfd[0]);
    if (pid < 0 || n != (ssize_t)sizeof(r)) {
        snprintf(why, whylen, "tcg: the probe process failed");
        *acc = AGENT_ACCEL_TCG;
        return;
    }
    r.why[sizeof(r.why) - 1] = '\0';
    *acc = r.acc == AGENT_ACCEL_KVM ? AGENT_ACCEL_KVM : AGENT_ACCEL_TCG;
    snprintf(why, whylen, "%s", r.why);
}

/*
 * The accelerator, once for the agent's life. accel=auto boots the guest
 * image under KVM (qemu.c's probe) because /dev/kvm can exist and still
 * abort or hang a real guest in nested setups; an ioctl check alone would
 * trust it.
 */
static int
choose_accel(struct agent *a, char *err, size_t errlen)
{
    enum agent_accel acc = AGENT_ACCEL_TCG;
    char why[512] = "";
    uint64_t t0;

    if (strcmp(a->cfg.accel, "tcg") == 0) {
        a->accel = "tcg";
        pd_info("agent", "accel tcg: forced by the configuration");
        return 0;
    }
    if (strcmp(a->cfg.accel, "kvm") == 0) {
        if (!kvm_opens_as_qemu_user(a)) {
            snprintf(err, errlen, "accel kvm: /dev/kvm is not usable by "
                     "uid %d", (int)a->qemu_uid);
            return -ENODEV;
        }
        a->accel = "kvm";
        pd_info("agent", "accel kvm: forced by the configuration");
        return 0;
    }
    t0 = pd_now_ms();
    probe_as_qemu_user(a, &acc, why, sizeof(why));
    a->accel = acc == AGENT_ACCEL_KVM ? "kvm" : "tcg";
    if (acc == AGENT_ACCEL_KVM)
        pd_info("agent", "accel kvm: probe as uid %d %s", (int)a->qemu_uid,
                why);
    else
        pd_warn("agent", "accel tcg after a %llu ms probe as uid %d: %s; "
                "VMs run emulated, much slower",
                (unsigned long long)(pd_now_ms() - t0), (int)a->qemu_uid,
                why);
    return 0;
}

static int
setup_accel(struct agent *a, char *err, size_t errlen)
{
    if (absolute(&a->cfg.kernel) != 0 || absolute(&a->cfg.initrd) != 0 ||
        access(a->cfg.kernel, R_OK) != 0 ||
        access(a->cfg.initrd, R_OK) != 0) {
        snprintf(err, errlen,
                 "guest image missing: %s, %s (run deploy/guest/build.sh)",
                 a->cfg.kernel, a->cfg.initrd);
        return -ENOENT;
    }
    return choose_accel(a, err, errlen);
}

static void
session_request(void *arg, struct pd_conn *c, const struct pd_msg *m)
{
    agent_rpc_dispatch(arg, c, m);
}

static void
session_closed(void *arg, struct pd_conn *c)
{
    agent_rpc_conn_closed(arg, c);
}

/*
 * The join token lives in a file, never on the command line, where every
 * local user could read it with ps.
 */
static int
load_join_token(struct agent *a, char *err, size_t errlen)
{
    char *tok = NULL;
    size_t len = 0;
    int rv;

    if (a->cfg.join_token_file == NULL || a->cfg.join_token_file[0] == '\0')
        return 0;
    rv = pd_read_file(a->cfg.join_token_file, &tok, &len, 16384);
    if (rv != 0) {
        snprintf(err, errlen, "join_token_file %s: %s",
                 a->cfg.join_token_file, strerror(-rv));
        return rv;
    }
    while (len > 0 && (tok[len - 1] == '\n' || tok[len - 1] == '\r' ||
                       tok[len - 1] == ' '))
        tok[--len] = '\0';
    if (len == 0 || strcspn(tok, " \t\r\n") != len) {
        snprintf(err, errlen, "join_token_file %s: want one token on one "
                 "line", a->cfg.join_token_file);
        free(tok);
        return -EINVAL;
    }
    a->join_token = tok;
    return 0;
}

static int
start_session(struct agent *a, char *err, size_t errlen)
{
    static const struct agent_session_cb cb = {
        .fill_register = agent_fill_register,
        .fill_heartbeat = agent_fill_heartbeat,
        .on_request = session_request,
        .on_conn_closed = session_closed,
    };
    struct agent_session_cfg sc = {
        .node = a->node,
        .addrs = a->cfg.schedulers,
        .tls = a->session_tls,
        .heartbeat_ms = a->cfg.heartbeat_ms,
    };
    int rv = agent_session_start(a->loop, &sc, &cb, a, &a->session, err,
                                 errlen);

    if (rv == 0 && a->session == NULL)
        pd_info("agent", "no scheduler configured: running alone, driven "
                "through the RPC port only");
    return rv;
}

static uv_signal_t sig_term, sig_int;

static void
on_signal(uv_signal_t *h, int signum)
{
    struct agent *a = h->data;

    if (a->stopping)
        return;
    a->stopping = true;
    pd_info("agent", "signal %d: stopping (%s)", signum,
            a->cfg.stop_vms_on_exit ? "stopping VMs too"
                                    : "VMs keep running for the next agent");
    agent_session_stop(a->session);
    a->session = NULL;
    sb_shutdown_all(a);
    agent_rpc_stop(a);
    uv_signal_stop(&sig_term);
    uv_signal_stop(&sig_int);
    uv_close((uv_handle_t *)&sig_term, NULL);
    uv_close((uv_handle_t *)&sig_int, NULL);
}

int
main(int argc, char **argv)
{
    struct agent *a = &agent;
    enum pd_log_level level;
    char err[512] = "";
    int rv;

    pd_log_init("paddock-agent", PD_LOG_INFO);
    set_defaults(&a->cfg);
    rv = pd_config_load(options, argc, argv, NULL, NULL, err, sizeof(err));
    if (rv == 0 || rv == 1) {
        int crv = check_config(&a->cfg, err, sizeof(err));

        if (crv != 0)
            rv = crv;
    }
    if (rv == 1)
        return 0;
    if (rv < 0) {
        fprintf(stderr, "paddock-agent: %s\n", err);
        return 2;
    }
    if (pd_log_parse_level(a->cfg.log_level, &level) != 0) {
        fprintf(stderr, "paddock-agent: log_level: \"%s\" is not debug, "
                "info, warn or error\n", a->cfg.log_level);
        return 2;
    }
    pd_log_set_level(level);
    signal(SIGPIPE, SIG_IGN);
    a->loop = uv_default_loop();

    if ((rv = pick_qemu_user(a, err, sizeof(err))) != 0 ||
        (rv = open_state(a, err, sizeof(err))) != 0 ||
        (rv = setup_cgroups(a, err, sizeof(err))) != 0 ||
        (rv = setup_capacity(a, err, sizeof(err))) != 0 ||
        (rv = setup_tls(a, err, sizeof(err))) != 0 ||
        (rv = load_join_token(a, err, sizeof(err))) != 0 ||
        (rv = setup_accel(a, err, sizeof(err))) != 0)
        pd_fatal("agent", "%s", err);
    pd_info("agent", "node %s, data in %s, QEMU as uid %d, accel %s",
            a->node, a->cfg.data_dir, (int)a->qemu_uid, a->accel);

    sb_restore(a);
    if ((rv = agent_rpc_listen(a, err, sizeof(err))) != 0 ||
        (rv = start_session(a, err, sizeof(err))) != 0)
        pd_fatal("agent", "%s", err);

    uv_signal_init(a->loop, &sig_term);
    uv_signal_init(a->loop, &sig_int);
    sig_term.data = a;
    sig_int.data = a;
    uv_signal_start(&sig_term, on_signal, SIGTERM);
    uv_signal_start(&sig_int, on_signal, SIGINT);

    uv_run(a->loop, UV_RUN_DEFAULT);
    agent_cg_fini(&a->cg);
    agent_state_close(a->state);
    free(a->join_token);
    SSL_CTX_free(a->rpc_tls);
    SSL_CTX_free(a->session_tls);
    pd_info("agent", "stopped");
    pd_config_free(options);
    return 0;
}
