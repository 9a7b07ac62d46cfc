#include "node-agent/cgroup.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/util.h"

#define CPU_PERIOD_US 100000ULL

/* What mountinfo and /proc/self/cgroup told us. */
struct layout {
    char v1_cpu_mount[PATH_MAX];
    char v1_cpu_root[PATH_MAX];
    char v1_mem_mount[PATH_MAX];
    char v1_mem_root[PATH_MAX];
    char v2_mount[PATH_MAX];
    char v2_root[PATH_MAX];
    char own_cpu[PATH_MAX]; /* agent's cgroup path in each hierarchy */
    char own_mem[PATH_MAX];
    char own_v2[PATH_MAX];
};

/* Decodes mountinfo's octal escapes (\040 for a space) in place. */
static void
unescape(char *s)
{
    char *out = s;

    while (*s != '\0') {
        if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' &&
            s[2] <= '7' && s[3] >= '0' && s[3] <= '7') {
            *out++ = (char)((s[1] - '0') * 64 + (s[2] - '0') * 8 +
                            (s[3] - '0'));
            s += 4;
        } else {
            *out++ = *s++;
        }
    }
    *out = '\0';
}

/* True when the comma-separated list holds the exact token. */
static bool
has_token(const char *list, const char *tok)
{
    size_t n = strlen(tok);
    const char *p = list;

    while (p != NULL && *p != '\0') {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);

        if (len == n && strncmp(p, tok, n) == 0)
            return true;
        p = end ? end + 1 : NULL;
    }
    return false;
}

static void
copy(char *dst, const char *src)
{
    pd_strlcpy(dst, src, PATH_MAX);
}

/*
 * One mountinfo line: "id parent maj:min root mountpoint opts [tags] -
 * fstype source superopts".
 */
static void
parse_mount_line(char *line, struct layout *l)
{
    char *field[6] = {0}, *save = NULL, *tok, *fstype, *superopts;
    int i = 0;

    for (tok = strtok_r(line, " \n", &save); tok != NULL && i < 6;
         tok = strtok_r(NULL, " \n", &save))
        field[i++] = tok;
    if (i < 6)
        return;
    while (tok != NULL && strcmp(tok, "-") != 0)
        tok = strtok_r(NULL, " \n", &save);
    if (tok == NULL)
        return;
    fstype = strtok_r(NULL, " \n", &save);
    (void)strtok_r(NULL, " \n", &save); /* source */
    superopts = strtok_r(NULL, " \n", &save);
    if (fstype == NULL || superopts == NULL)
        return;
    unescape(field[3]);
    unescape(field[4]);

    if (strcmp(fstype, "cgroup2") == 0 && l->v2_mount[0] == '\0') {
        copy(l->v2_mount, field[4]);
        copy(l->v2_root, field[3]);
    } else if (strcmp(fstype, "cgroup") == 0) {
        if (has_token(superopts, "cpu") && l->v1_cpu_mount[0] == '\0') {
            copy(l->v1_cpu_mount, field[4]);
            copy(l->v1_cpu_root, field[3]);
        }
        if (has_token(superopts, "memory") && l->v1_mem_mount[0] == '\0') {
            copy(l->v1_mem_mount, field[4]);
            copy(l->v1_mem_root, field[3]);
        }
    }
}

/* "N:ctrl,ctrl:/path" lines; "0::/path" is the v2 one. */
static void
parse_self_line(char *line, struct layout *l)
{
    char *c1 = strchr(line, ':'), *c2, *nl;

    if (c1 == NULL || (c2 = strchr(c1 + 1, ':')) == NULL)
        return;
    *c2 = '\0';
    if ((nl = strchr(c2 + 1, '\n')) != NULL)
        *nl = '\0';
    if (c1[1] == '\0' && strncmp(line, "0:", 2) == 0)
        copy(l->own_v2, c2 + 1);
    if (has_token(c1 + 1, "cpu"))
        copy(l->own_cpu, c2 + 1);
    if (has_token(c1 + 1, "memory"))
        copy(l->own_mem, c2 + 1);
}

static int
read_lines(const char *path, void (*fn)(char *, struct layout *),
           struct layout *l)
{
    char line[4096];
    FILE *f = fopen(path, "re");

    if (f == NULL)
        return -errno;
    while (fgets(line, sizeof(line), f) != NULL)
        fn(line, l);
    fclose(f);
    return 0;
}

/*
 * The directory of the agent's own cgroup: mount point + own path, minus
 * the mount's root when the hierarchy is mounted from a sub-directory (as
 * inside a container).
 */
static int
own_dir(char *out, const char *prefix, const char *mount, const char *root,
        const char *own)
{
    size_t rl = strlen(root);
    int n;

    if (strcmp(root, "/") != 0 && strncmp(own, root, rl) == 0 &&
        (own[rl] == '/' || own[rl] == '\0'))
        own += rl;
    if (strcmp(own, "/") == 0)
        own = "";
    n = snprintf(out, PATH_MAX, "%s%s%s", prefix, mount, own);
    return n < PATH_MAX ? 0 : -ENAMETOOLONG;
}

static int
write_str(const char *dir, const char *file, const char *val)
{
    char path[PATH_MAX];
    ssize_t n;
    int fd, rv = 0;

    if (snprintf(path, sizeof(path), "%s/%s", dir, file) >= PATH_MAX)
        return -ENAMETOOLONG;
    fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    n = write(fd, val, strlen(val));
    if (n < 0)
        rv = -errno;
    else if ((size_t)n != strlen(val))
        rv = -EIO;
    close(fd);
    return rv;
}

static int
read_str(const char *dir, const char *file, char *buf, size_t buflen)
{
    char path[PATH_MAX];
    ssize_t n;
    int fd;

    if (snprintf(path, sizeof(path), "%s/%s", dir, file) >= PATH_MAX)
        return -ENAMETOOLONG;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    n = read(fd, buf, buflen - 1);
    close(fd);
    if (n < 0)
        return -errno;
    buf[n] = '\0';
    return 0;
}

static int
mkdir_one(const char *path)
{
    if (mkdir(path, 0755) == 0 || errno == EEXIST)
        return 0;
    return -errno;
}

static bool
v2_has_controllers(const char *dir)
{
    char buf[512];

    if (read_str(dir, "cgroup.controllers", buf, sizeof(buf)) != 0)
        return false;
    buf[strcspn(buf, "\n")] = '\0';
    for (char *p = buf; *p; p++)
        if (*p == ' ')
            *p = ',';
    return has_token(buf, "cpu") && has_token(buf, "memory");
}

/* Builds <own>/<child> for v2, moving the agent into a leaf if needed. */
static int
prepare_v2(struct agent_cg *cg, const char *own, const char *child,
           char *err, size_t errlen)
{
    char leaf[PATH_MAX];
    int rv;

    if (snprintf(cg->v2_dir, PATH_MAX, "%s/%s", own, child) >= PATH_MAX)
        return -ENAMETOOLONG;
    rv = mkdir_one(cg->v2_dir);
    if (rv != 0) {
        snprintf(err, errlen, "cgroup v2: mkdir %s: %s", cg->v2_dir,
                 strerror(-rv));
        return rv;
    }
    rv = write_str(own, "cgroup.subtree_control", "+cpu +memory");
    if (rv == -EBUSY) {
        /* Our cgroup holds processes (us): move into a leaf, retry. */
        if (snprintf(leaf, sizeof(leaf), "%s/agent", own) >= PATH_MAX)
            return -ENAMETOOLONG;
        rv = mkdir_one(leaf);
        if (rv == 0)
            rv = write_str(leaf, "cgroup.procs", "0");
        if (rv == 0)
            rv = write_str(own, "cgroup.subtree_control", "+cpu +memory");
    }
    if (rv == 0)
        rv = write_str(cg->v2_dir, "cgroup.subtree_control",
                       "+cpu +memory");
    if (rv != 0)
        snprintf(err, errlen,
                 "cgroup v2: cannot delegate cpu and memory below %s: %s "
                 "(does the agent's unit have Delegate=yes?)",
                 own, strerror(-rv));
    return rv;
}

static int
prepare_v1(struct agent_cg *cg, const char *cpu_own, const char *mem_own,
           const char *child, char *err, size_t errlen)
{
    int rv;

    if (snprintf(cg->cpu_dir, PATH_MAX, "%s/%s", cpu_own, child) >=
            PATH_MAX ||
        snprintf(cg->mem_dir, PATH_MAX, "%s/%s", mem_own, child) >= PATH_MAX)
        return -ENAMETOOLONG;
    rv = mkdir_one(cg->cpu_dir);
    if (rv == 0)
        rv = mkdir_one(cg->mem_dir);
    if (rv != 0) {
        snprintf(err, errlen, "cgroup v1: cannot create %s and %s: %s",
                 cg->cpu_dir, cg->mem_dir, strerror(-rv));
        return rv;
    }
    /* Children inherit hierarchical accounting only when asked (v1). */
    (void)write_str(cg->mem_dir, "memory.use_hierarchy", "1");
    return 0;
}

int
agent_cg_init(struct agent_cg *cg, const struct agent_cg_source *src,
              char *err, size_t errlen)
{
    const char *want = src->want ? src->want : "auto";
    const char *prefix = src->root_prefix ? src->root_prefix : "";
    const char *child = src->child ? src->child : "paddock";
    char cpu_own[PATH_MAX], mem_own[PATH_MAX], v2_own[PATH_MAX];
    struct layout *l;
    bool v1_ok, v2_ok;
    int rv;

    memset(cg, 0, sizeof(*cg));
    if (strcmp(want, "none") == 0)
        return 0;
    if (strcmp(want, "auto") != 0 && strcmp(want, "v1") != 0 &&
        strcmp(want, "v2") != 0) {
        snprintf(err, errlen, "cgroup: \"%s\" is not auto, v1, v2 or none",
                 want);
        return -EINVAL;
    }
    if (!pd_id_valid(child)) {
        snprintf(err, errlen, "cgroup: bad child name \"%s\"", child);
        return -EINVAL;
    }
    l = calloc(1, sizeof(*l));
    if (l == NULL)
        return -ENOMEM;
    rv = read_lines(src->mountinfo ? src->mountinfo : "/proc/self/mountinfo",
                    parse_mount_line, l);
    if (rv == 0)
        rv = read_lines(src->self_cgroup ? src->self_cgroup
                                         : "/proc/self/cgroup",
                        parse_self_line, l);
    if (rv != 0) {
        snprintf(err, errlen, "cgroup: cannot read mountinfo: %s",
                 strerror(-rv));
        goto out;
    }

    v2_ok = false;
    if (l->v2_mount[0] != '\0' &&
        own_dir(v2_own, prefix, l->v2_mount, l->v2_root,
                l->own_v2[0] ? l->own_v2 : "/") == 0)
        v2_ok = v2_has_controllers(v2_own);
    v1_ok = l->v1_cpu_mount[0] != '\0' && l->v1_mem_mount[0] != '\0' &&
            own_dir(cpu_own, prefix, l->v1_cpu_mount, l->v1_cpu_root,
                    l->own_cpu[0] ? l->own_cpu : "/") == 0 &&
            own_dir(mem_own, prefix, l->v1_mem_mount, l->v1_mem_root,
                    l->own_mem[0] ? l->own_mem : "/") == 0;

    if (v2_ok && strcmp(want, "v1") != 0) {
        cg->mode = AGENT_CG_V2;
        rv = prepare_v2(cg, v2_own, child, err, errlen);
    } else if (v1_ok && strcmp(want, "v2") != 0) {
        cg->mode = AGENT_CG_V1;
        cg->hybrid = l->v2_mount[0] != '\0';
        rv = prepare_v1(cg, cpu_own, mem_own, child, err, errlen);
    } else if (strcmp(want, "auto") == 0) {
        cg->mode = AGENT_CG_NONE;
    } else {
        snprintf(err, errlen,
                 "cgroup: %s requested but not mounted with cpu and memory "
                 "controllers (v1 cpu %s, v1 memory %s, v2 %s)",
                 want, l->v1_cpu_mount[0] ? "yes" : "no",
                 l->v1_mem_mount[0] ? "yes" : "no",
                 v2_ok ? "usable" : l->v2_mount[0] ? "no controllers" : "no");
        rv = -ENOENT;
    }
    if (rv != 0)
        cg->mode = AGENT_CG_NONE;
out:
    free(l);
    return rv;
}

const char *
agent_cg_mode_name(const struct agent_cg *cg)
{
    switch (cg->mode) {
    case AGENT_CG_V1:
        return cg->hybrid ? "hybrid" : "v1";
    case AGENT_CG_V2:
        return "v2";
    default:
        return "none";
    }
}

int
agent_cg_path(const struct agent_cg *cg, const char *name, bool cpu,
              char *buf, size_t buflen)
{
    const char *parent;

    if (!pd_id_valid(name))
        return -EINVAL;
    if (cg->mode == AGENT_CG_NONE)
        return -ENOENT;
    parent = cg->mode == AGENT_CG_V2 ? cg->v2_dir
             : cpu                   ? cg->cpu_dir
                                     : cg->mem_dir;
    if ((size_t)snprintf(buf, buflen, "%s/%s", parent, name) >= buflen)
        return -ENAMETOOLONG;
    return 0;
}

static int
fresh_dir(const char *path)
{
    if (rmdir(path) != 0 && errno != ENOENT)
        return -errno;
    return mkdir(path, 0755) == 0 ? 0 : -errno;
}

int
agent_cg_create(const struct agent_cg *cg, const char *name, unsigned cpus,
                uint64_t mem_bytes, char *err, size_t errlen)
{
    char cpu[PATH_MAX], mem[PATH_MAX], val[64];
    const char *step = "mkdir";
    int rv;

    if (cg->mode == AGENT_CG_NONE)
        return 0;
    if (cpus == 0 || mem_bytes == 0)
        return -EINVAL;
    rv = agent_cg_path(cg, name, true, cpu, sizeof(cpu));
    if (rv == 0)
        rv = agent_cg_path(cg, name, false, mem, sizeof(mem));
    if (rv != 0)
        return rv;

    /* A leftover from a VM that died while we were away is replaced. */
    rv = fresh_dir(cpu);
    if (rv == 0 && cg->mode == AGENT_CG_V1)
        rv = fresh_dir(mem);
    if (rv != 0)
        goto fail;

    if (cg->mode == AGENT_CG_V2) {
        step = "cpu.max";
        snprintf(val, sizeof(val), "%llu %llu",
                 (unsigned long long)cpus * CPU_PERIOD_US, CPU_PERIOD_US);
        rv = write_str(cpu, "cpu.max", val);
        if (rv == 0) {
            step = "memory.max";
            snprintf(val, sizeof(val), "%llu",
                     (unsigned long long)mem_bytes);
            rv = write_str(cpu, "memory.max", val);
        }
        /* Swap may be compiled out: then there is nothing to turn off. */
        if (rv == 0)
            (void)write_str(cpu, "memory.swap.max", "0");
    } else {
        step = "cpu.cfs_period_us";
        snprintf(val, sizeof(val), "%llu", CPU_PERIOD_US);
        rv = write_str(cpu, "cpu.cfs_period_us", val);
        if (rv == 0) {
            step = "cpu.cfs_quota_us";
            snprintf(val, sizeof(val), "%llu",
                     (unsigned long long)cpus * CPU_PERIOD_US);
            rv = write_str(cpu, "cpu.cfs_quota_us", val);
        }
        if (rv == 0) {
            step = "memory.limit_in_bytes";
            snprintf(val, sizeof(val), "%llu",
                     (unsigned long long)mem_bytes);
            rv = write_str(mem, "memory.limit_in_bytes", val);
        }
        /* memsw exists only with swap accounting; absent is fine. */
        if (rv == 0) {
            int r2 = write_str(mem, "memory.memsw.limit_in_bytes", val);

            if (r2 != 0 && r2 != -ENOENT) {
                step = "memory.memsw.limit_in_bytes";
                rv = r2;
            }
        }
    }
    if (rv == 0)
        return 0;
fail:
    snprintf(err, errlen, "cgroup %s: %s: %s", name, step, strerror(-rv));
    agent_cg_remove(cg, name);
    return rv;
}

int
agent_cg_attach(const struct agent_cg *cg, const char *name, pid_t pid,
                char *err, size_t errlen)
{
    char dir[PATH_MAX], val[32];
    int rv;

    if (cg->mode == AGENT_CG_NONE)
        return 0;
    snprintf(val, sizeof(val), "%d", (int)pid);
    for (int i = 0; i < (cg->mode == AGENT_CG_V1 ? 2 : 1); i++) {
        rv = agent_cg_path(cg, name, i == 0, dir, sizeof(dir));
        if (rv == 0)
            rv = write_str(dir, "cgroup.procs", val);
        if (rv != 0) {
            snprintf(err, errlen, "cgroup %s: attach pid %d to %s: %s", name,
                     (int)pid, dir, strerror(-rv));
            return rv;
        }
    }
    return 0;
}

int
agent_cg_remove(const struct agent_cg *cg, const char *name)
{
    char dir[PATH_MAX];
    int rv = 0;

    if (cg->mode == AGENT_CG_NONE)
        return 0;
    for (int i = 0; i < (cg->mode == AGENT_CG_V1 ? 2 : 1); i++) {
        if (agent_cg_path(cg, name, i == 0, dir, sizeof(dir)) != 0)
            return -EINVAL;
        if (rmdir(dir) != 0 && errno != ENOENT)
            rv = -errno;
    }
    return rv;
}

/* Finds "key N" in a flat-keyed cgroup file. */
static int
read_keyed(const char *dir, const char *file, const char *key, uint64_t *out)
{
    char buf[4096];
    size_t kl = strlen(key);
    int rv = read_str(dir, file, buf, sizeof(buf));

    if (rv != 0)
        return rv;
    for (char *line = buf; line != NULL && *line != '\0';) {
        char *nl = strchr(line, '\n');

        if (nl != NULL)
            *nl = '\0';
        if (strncmp(line, key, kl) == 0 && line[kl] == ' ')
            return pd_parse_u64(line + kl + 1, out);
        line = nl ? nl + 1 : NULL;
    }
    return -ENOENT;
}

int
agent_cg_oom_kills(const struct agent_cg *cg, const char *name,
                   uint64_t *out)
{
    char dir[PATH_MAX];
    int rv;

    *out = 0;
    if (cg->mode == AGENT_CG_NONE)
        return 0;
    rv = agent_cg_path(cg, name, false, dir, sizeof(dir));
    if (rv != 0)
        return rv;
    if (cg->mode == AGENT_CG_V2)
        return read_keyed(dir, "memory.events", "oom_kill", out);
    return read_keyed(dir, "memory.oom_control", "oom_kill", out);
}

static int
read_u64(const char *dir, const char *file, uint64_t *out)
{
    char buf[64];
    int rv = read_str(dir, file, buf, sizeof(buf));

    if (rv != 0)
        return rv;
    buf[strcspn(buf, "\n")] = '\0';
    return pd_parse_u64(buf, out);
}

int
agent_cg_read_limits(const struct agent_cg *cg, const char *name,
                     uint64_t *cpu_millis, uint64_t *mem_bytes)
{
    char cpu[PATH_MAX], mem[PATH_MAX], buf[64];
    uint64_t quota = 0, period = 0;
    int rv;

    if (cg->mode == AGENT_CG_NONE)
        return -ENOENT;
    rv = agent_cg_path(cg, name, true, cpu, sizeof(cpu));
    if (rv == 0)
        rv = agent_cg_path(cg, name, false, mem, sizeof(mem));
    if (rv != 0)
        return rv;
    if (cg->mode == AGENT_CG_V2) {
        char *sp;

        rv = read_str(cpu, "cpu.max", buf, sizeof(buf));
        if (rv != 0)
            return rv;
        buf[strcspn(buf, "\n")] = '\0';
        sp = strchr(buf, ' ');
        if (sp == NULL)
            return -EPROTO;
        *sp = '\0';
        if (pd_parse_u64(buf, &quota) != 0 ||
            pd_parse_u64(sp + 1, &period) != 0)
            return -EPROTO;
        rv = read_u64(mem, "memory.max", mem_bytes);
    } else {
        rv = read_u64(cpu, "cpu.cfs_quota_us", &quota);
        if (rv == 0)
            rv = read_u64(cpu, "cpu.cfs_period_us", &period);
        if (rv == 0)
            rv = read_u64(mem, "memory.limit_in_bytes", mem_bytes);
    }
    if (rv != 0)
        return rv;
    if (period == 0)
        return -EPROTO;
    *cpu_millis = quota * 1000 / period;
    return 0;
}

void
agent_cg_fini(const struct agent_cg *cg)
{
    /* Fails with EBUSY while VMs that outlive the agent remain: fine, the
     * next agent reuses the directory. */
    switch (cg->mode) {
    case AGENT_CG_V1:
        (void)rmdir(cg->cpu_dir);
        (void)rmdir(cg->mem_dir);
        break;
    case AGENT_CG_V2:
        (void)rmdir(cg->v2_dir);
        break;
    default:
        break;
    }
}
