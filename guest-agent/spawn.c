/*
 * Starting children for exec and processes.
 *
 * Each child runs in its own session (so its pid names its process group)
 * and in a cgroup of its own under /sys/fs/cgroup/pd. The cgroup is what
 * makes "kill everything it started" true: a grandchild that called
 * setsid() leaves the process group but not the cgroup, and cgroup.kill
 * (Linux 5.14) ends all of them at once. pids.max in the same cgroup stops
 * a fork bomb before it takes the agent's share of the VM.
 *
 * Exec failures are reported through a close-on-exec pipe: the child writes
 * its errno there when execvpe fails, and the parent reads EOF on success.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/log.h"
#include "guest-agent/guest.h"

#define CG_ROOT "/sys/fs/cgroup"
#define CG_PARENT CG_ROOT "/pd"
#define ARGV_MAX 4096
#define ENV_MAX 1024

static bool have_cgroup;
static unsigned pids_max = 1024;
static unsigned long cg_seq;

int
fd_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);

    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -errno;
    if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
        return -errno;
    return 0;
}

static int
write_str(const char *path, const char *s)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    ssize_t n;

    if (fd < 0)
        return -errno;
    n = write(fd, s, strlen(s));
    close(fd);
    return n < 0 ? -errno : 0;
}

void
spawn_set_pids_max(unsigned n)
{
    pids_max = n;
}

int
spawn_cgroup_init(void)
{
    struct stat st;

    if (stat(CG_ROOT "/cgroup.controllers", &st) != 0) {
        mkdir(CG_ROOT, 0755);
        if (mount("cgroup2", CG_ROOT, "cgroup2", MS_NOSUID | MS_NODEV |
                  MS_NOEXEC, NULL) != 0)
            return -errno;
    }
    /* Controllers must be enabled on each level above the leaves. */
    write_str(CG_ROOT "/cgroup.subtree_control", "+pids +memory +cpu");
    if (mkdir(CG_PARENT, 0755) != 0 && errno != EEXIST)
        return -errno;
    write_str(CG_PARENT "/cgroup.subtree_control", "+pids +memory +cpu");
    have_cgroup = true;
    return 0;
}

static char *
cgroup_new(void)
{
    char path[128], val[32];

    if (!have_cgroup)
        return NULL;
    snprintf(path, sizeof(path), CG_PARENT "/c%lu", ++cg_seq);
    if (mkdir(path, 0755) != 0) {
        pd_log_errno(PD_LOG_WARN, errno, "spawn",
                     "cannot create cgroup %s, child runs without one", path);
        return NULL;
    }
    snprintf(val, sizeof(val), "%u", pids_max);
    {
        char f[160];

        snprintf(f, sizeof(f), "%s/pids.max", path);
        write_str(f, val);
    }
    return strdup(path);
}

void
spawn_kill_all(const char *cg, pid_t pgid, int sig)
{
    if (pgid > 0)
        kill(-pgid, sig);
    if (cg != NULL) {
        char f[160];

        if (sig == SIGKILL) {
            snprintf(f, sizeof(f), "%s/cgroup.kill", cg);
            if (write_str(f, "1") == 0)
                return;
        }
        /* Older kernels, or another signal: one by one from cgroup.procs. */
        snprintf(f, sizeof(f), "%s/cgroup.procs", cg);
        FILE *fp = fopen(f, "re");
        int pid;

        if (fp == NULL)
            return;
        while (fscanf(fp, "%d", &pid) == 1)
            kill(pid, sig);
        fclose(fp);
    }
}

bool
spawn_cgroup_release(const char *cg)
{
    if (cg == NULL)
        return true;
    return rmdir(cg) == 0 || errno == ENOENT;
}

/* In the child: never returns. */
static void __attribute__((noreturn))
child(const struct gspawn *s, const char *cg, int errfd)
{
    sigset_t none;
    int err;

    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (int sig = 1; sig < NSIG; sig++)
        signal(sig, SIG_DFL);
    setsid();
    if (cg != NULL) {
        char f[160];

        snprintf(f, sizeof(f), "%s/cgroup.procs", cg);
        write_str(f, "0");
    }
    /* Children must not inherit the agent's immunity to the OOM killer. */
    write_str("/proc/self/oom_score_adj", "0");

    int in = s->stdin_fd >= 0 ? s->stdin_fd : open("/dev/null", O_RDONLY);
    if (in < 0 || dup2(in, 0) < 0 || dup2(s->stdout_fd, 1) < 0 ||
        dup2(s->stderr_fd, 2) < 0)
        goto fail;
    if (s->cwd != NULL && chdir(s->cwd) != 0)
        goto fail;
    /* execvpe searches the caller's PATH, not envp's: use the command's. */
    for (char **e = s->envp; *e != NULL; e++)
        if (strncmp(*e, "PATH=", 5) == 0)
            setenv("PATH", *e + 5, 1);
    execvpe(s->argv[0], s->argv, s->envp);
fail:
    err = errno;
    (void)!write(errfd, &err, sizeof(err));
    _exit(127);
}

pid_t
spawn_child(const struct gspawn *s, char **cg_out)
{
    int ep[2], err = 0;
    char *cg = cgroup_new();
    pid_t pid;
    ssize_t n;

    *cg_out = NULL;
    if (pipe2(ep, O_CLOEXEC) != 0) {
        err = errno;
        spawn_cgroup_release(cg);
        free(cg);
        return -err;
    }
    pid = fork();
    if (pid < 0) {
        err = errno;
        close(ep[0]);
        close(ep[1]);
        spawn_cgroup_release(cg);
        free(cg);
        return -err;
    }
    if (pid == 0)
        child(s, cg, ep[1]);
    close(ep[1]);
    do {
        n = read(ep[0], &err, sizeof(err));
    } while (n < 0 && errno == EINTR);
    close(ep[0]);
    if (n == (ssize_t)sizeof(err)) {
        /* The child is gone; the loop's reaper collects it. */
        spawn_cgroup_release(cg);
        free(cg);
        return -(err != 0 ? err : EIO);
    }
    *cg_out = cg;
    return pid;
}

/* ---- request fields ---------------------------------------------------- */

static int
env_build(const struct pd_msg *m, char ***out, char *err, size_t errlen)
{
    const msgpack_object_map *map = NULL;
    size_t nbase = 0, n = 0;
    char **env;
    int rv = pd_msg_map(m, "env", &map);

    if (rv == -EPROTO) {
        snprintf(err, errlen, "env must be a map of strings");
        return -EINVAL;
    }
    while (guest_base_env != NULL && guest_base_env[nbase] != NULL)
        nbase++;
    if (map != NULL && map->size > ENV_MAX) {
        snprintf(err, errlen, "more than %d env entries", ENV_MAX);
        return -E2BIG;
    }
    env = calloc(nbase + (map ? map->size : 0) + 1, sizeof(*env));
    if (env == NULL)
        return -ENOMEM;
    for (size_t i = 0; map != NULL && i < map->size; i++) {
        const char *k, *v;
        size_t kl, vl;

        if (pd_obj_str(&map->ptr[i].key, &k, &kl) != 0 ||
            pd_obj_str(&map->ptr[i].val, &v, &vl) != 0 || kl == 0 ||
            memchr(k, '=', kl) != NULL || memchr(k, '\0', kl) != NULL ||
            memchr(v, '\0', vl) != NULL) {
            snprintf(err, errlen, "env entry %zu is not NAME=string", i);
            pd_strv_free(env);
            return -EINVAL;
        }
        if (asprintf(&env[n], "%.*s=%.*s", (int)kl, k, (int)vl, v) < 0) {
            env[n] = NULL;
            pd_strv_free(env);
            return -ENOMEM;
        }
        n++;
    }
    /* Base entries the request did not override. */
    for (size_t i = 0; i < nbase; i++) {
        size_t kl = strcspn(guest_base_env[i], "=");
        bool over = false;

        for (size_t j = 0; j < n && !over; j++)
            over = strncmp(env[j], guest_base_env[i], kl + 1) == 0;
        if (!over && (env[n] = strdup(guest_base_env[i])) != NULL)
            n++;
    }
    env[n] = NULL;
    *out = env;
    return 0;
}

int
gcmd_parse(const struct pd_msg *m, struct gcmd *c, char *err, size_t errlen)
{
    const msgpack_object *argv = pd_msg_field(m, "argv");
    char *cmd = NULL;
    char cwd[PATH_MAX];
    int rv;

    memset(c, 0, sizeof(*c));
    rv = pd_msg_strdup(m, "command", &cmd);
    if (rv == -EINVAL || rv == -EPROTO) {
        snprintf(err, errlen, "command must be a string without NUL");
        return -EINVAL;
    }
    if (rv == 0 && argv != NULL) {
        free(cmd);
        snprintf(err, errlen, "give argv or command, not both");
        return -EINVAL;
    }
    if (cmd != NULL) {
        c->argv = calloc(4, sizeof(char *));
        if (c->argv == NULL) {
            free(cmd);
            return -ENOMEM;
        }
        c->argv[0] = strdup("/bin/sh");
        c->argv[1] = strdup("-c");
        c->argv[2] = cmd;
        if (c->argv[0] == NULL || c->argv[1] == NULL) {
            gcmd_free(c);
            return -ENOMEM;
        }
    } else if (argv != NULL) {
        rv = pd_obj_strv(argv, &c->argv, ARGV_MAX);
        if (rv != 0 || c->argv[0] == NULL || c->argv[0][0] == '\0') {
            snprintf(err, errlen, "argv must be a non-empty array of "
                     "strings without NUL");
            gcmd_free(c);
            return rv == -ENOMEM ? rv : -EINVAL;
        }
    } else {
        snprintf(err, errlen, "argv or command is required");
        return -EINVAL;
    }

    rv = path_field(m, "cwd", cwd, sizeof(cwd), err, errlen);
    if (rv == 0) {
        c->cwd = strdup(cwd);
    } else if (pd_msg_field(m, "cwd") != NULL) {
        gcmd_free(c);
        return rv;
    } else {
        c->cwd = strdup(access("/workspace", X_OK) == 0 ? "/workspace" : "/");
    }
    if (c->cwd == NULL) {
        gcmd_free(c);
        return -ENOMEM;
    }
    rv = env_build(m, &c->envp, err, errlen);
    if (rv != 0) {
        gcmd_free(c);
        return rv;
    }
    return 0;
}

void
gcmd_free(struct gcmd *c)
{
    pd_strv_free(c->argv);
    pd_strv_free(c->envp);
    free(c->cwd);
    memset(c, 0, sizeof(*c));
}
