/*
 * Per-sandbox cgroups: detection of the host's cgroup layout and the caps
 * on each QEMU process.
 *
 * Layouts, found by reading /proc/self/mountinfo (never assumed):
 *  - v2: a cgroup2 mount whose cgroup.controllers lists cpu and memory;
 *  - v1: separate "cgroup" mounts carrying the cpu and memory controllers;
 *  - hybrid: both, with the v2 mount holding no controllers (this is v1 for
 *    our purpose, and is reported as "hybrid" in the logs);
 *  - none: no usable controller; sandboxes then run uncapped by cgroups
 *    (QEMU's own -smp/-m still bound the guest) and the agent says so.
 *
 * Placement: sandbox cgroups live below the agent's own cgroup (read from
 * /proc/self/cgroup), in a "paddock" child, so the agent never escapes the
 * accounting its own supervisor set up. On v2 a cgroup that hands
 * controllers to children may hold no process itself ("no internal
 * processes"), so when the agent's cgroup is not the root the agent first
 * moves itself into an "agent" leaf beside "paddock": the layout systemd
 * expects from a unit with Delegate=yes.
 *
 * Caps: CPU quota = vCPUs x period (100 ms), so a VM uses at most as many
 * host CPUs as it has vCPUs; memory limit = guest memory + overhead (see
 * README.md for the overhead figure), swap off where the kernel allows.
 */
#ifndef AGENT_CGROUP_H
#define AGENT_CGROUP_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

enum agent_cg_mode {
    AGENT_CG_NONE = 0,
    AGENT_CG_V1,
    AGENT_CG_V2,
};

struct agent_cg {
    enum agent_cg_mode mode;
    bool hybrid;              /* v1 controllers beside an empty v2 mount */
    char cpu_dir[PATH_MAX];   /* v1: parent dir in the cpu hierarchy */
    char mem_dir[PATH_MAX];   /* v1: parent dir in the memory hierarchy */
    char v2_dir[PATH_MAX];    /* v2: parent dir of the sandbox cgroups */
};

/* Where to look; tests point these at fixture files and directories. */
struct agent_cg_source {
    const char *mountinfo;   /* default /proc/self/mountinfo */
    const char *self_cgroup; /* default /proc/self/cgroup */
    const char *root_prefix; /* prepended to mount points; default "" */
    const char *want;        /* "auto", "v1", "v2" or "none" */
    const char *child;       /* child under the agent's cgroup: "paddock" */
};

/*
 * Detects the layout and prepares the parent cgroups (creating them).
 * Returns 0, with cg->mode possibly AGENT_CG_NONE under "auto", or a
 * negative errno with a reason in err when the requested mode is missing
 * or the parent cannot be created.
 */
int agent_cg_init(struct agent_cg *cg, const struct agent_cg_source *src,
                  char *err, size_t errlen);

/* "v1", "v2", "hybrid" or "none", for logs and AGENT_INFO. */
const char *agent_cg_mode_name(const struct agent_cg *cg);

/*
 * Creates (or reuses) the cgroup for a sandbox and writes its limits.
 * name must be a valid sandbox id. With AGENT_CG_NONE this does nothing.
 */
int agent_cg_create(const struct agent_cg *cg, const char *name,
                    unsigned cpus, uint64_t mem_bytes, char *err,
                    size_t errlen);

/* Moves a process into the sandbox's cgroup. */
int agent_cg_attach(const struct agent_cg *cg, const char *name, pid_t pid,
                    char *err, size_t errlen);

/* Removes the sandbox's cgroup; it must hold no process. Missing is 0. */
int agent_cg_remove(const struct agent_cg *cg, const char *name);

/* Number of OOM kills inside the sandbox's cgroup so far (0 if unknown). */
int agent_cg_oom_kills(const struct agent_cg *cg, const char *name,
                       uint64_t *out);

/* The limits as read back: CPU quota in vCPU x 1000, memory bytes. */
int agent_cg_read_limits(const struct agent_cg *cg, const char *name,
                         uint64_t *cpu_millis, uint64_t *mem_bytes);

/* Removes the parent cgroups at agent exit when no sandbox is left in
 * them (best effort). */
void agent_cg_fini(const struct agent_cg *cg);

/* The directory of the sandbox's cgroup in the memory (or v2) hierarchy. */
int agent_cg_path(const struct agent_cg *cg, const char *name, bool cpu,
                  char *buf, size_t buflen);

#endif
