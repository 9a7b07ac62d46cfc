/*
 * What this host offers to sandboxes, and the check that refuses work
 * beyond it.
 *
 * Offered = host resources minus a reserve kept for the host itself:
 *  - CPUs: online CPUs (the agent's affinity mask) minus the reserve, times
 *    an overcommit ratio (CPU time is compressible and every VM is capped
 *    at its vCPUs by its cgroup, so a ratio above 1 is safe; memory and
 *    disk are never overcommitted);
 *  - memory: MemTotal, or the agent's own cgroup limit when lower, minus
 *    the reserve; each sandbox costs its guest memory plus the per-VM
 *    overhead that its cgroup allows QEMU;
 *  - disk: the size of the file system holding the data directory minus
 *    the reserve; each sandbox costs its full image size although images
 *    are sparse, so written data can never exceed the disk.
 */
#ifndef AGENT_CAPACITY_H
#define AGENT_CAPACITY_H

#include <stddef.h>
#include <stdint.h>

struct agent_res {
    uint64_t cpus;      /* vCPUs */
    uint64_t memory_mb; /* guest memory + overhead */
    uint64_t disk_mb;
};

struct agent_capacity_cfg {
    const char *data_dir;
    const char *meminfo;     /* default /proc/meminfo (tests override) */
    uint64_t reserve_cpus;
    uint64_t reserve_memory; /* bytes */
    uint64_t reserve_disk;   /* bytes */
    double cpu_overcommit;   /* >= 1 */
    uint64_t host_cpus;      /* 0: probe */
    uint64_t cgroup_mem_limit; /* bytes, 0: none */
};

/* Probes the host and computes the offer. -errno with a reason in err
 * when the reserve leaves nothing to offer. */
int agent_capacity_probe(const struct agent_capacity_cfg *cfg,
                         struct agent_res *offer, char *err, size_t errlen);

/*
 * Checks that want fits beside used within offer. Returns 0 or -ENOSPC
 * with the first resource short of it named in err ("memory: 512 MiB
 * wanted, 300 MiB free of 2048 MiB").
 */
int agent_capacity_check(const struct agent_res *offer,
                         const struct agent_res *used,
                         const struct agent_res *want, char *err,
                         size_t errlen);

#endif
