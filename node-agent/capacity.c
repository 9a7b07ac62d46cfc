#include "node-agent/capacity.h"

#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#define MIB (1024ULL * 1024ULL)

static uint64_t
host_cpus(void)
{
    cpu_set_t set;

    if (sched_getaffinity(0, sizeof(set), &set) == 0)
        return (uint64_t)CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (uint64_t)n : 1;
}

static int
mem_total(const char *path, uint64_t *out)
{
    char line[256];
    unsigned long long kb;
    FILE *f = fopen(path, "re");

    if (f == NULL)
        return -errno;
    while (fgets(line, sizeof(line), f) != NULL) {
        if (sscanf(line, "MemTotal: %llu kB", &kb) == 1) {
            fclose(f);
            *out = (uint64_t)kb * 1024;
            return 0;
        }
    }
    fclose(f);
    return -ENOENT;
}

int
agent_capacity_probe(const struct agent_capacity_cfg *cfg,
                     struct agent_res *offer, char *err, size_t errlen)
{
    uint64_t cpus, mem = 0, disk;
    struct statvfs vfs;
    int rv;

    cpus = cfg->host_cpus ? cfg->host_cpus : host_cpus();
    rv = mem_total(cfg->meminfo ? cfg->meminfo : "/proc/meminfo", &mem);
    if (rv != 0) {
        snprintf(err, errlen, "capacity: cannot read MemTotal: %s",
                 strerror(-rv));
        return rv;
    }
    if (cfg->cgroup_mem_limit != 0 && cfg->cgroup_mem_limit < mem)
        mem = cfg->cgroup_mem_limit;
    if (statvfs(cfg->data_dir, &vfs) != 0) {
        rv = -errno;
        snprintf(err, errlen, "capacity: statvfs %s: %s", cfg->data_dir,
                 strerror(errno));
        return rv;
    }
    disk = (uint64_t)vfs.f_blocks * vfs.f_frsize;

    if (cpus <= cfg->reserve_cpus || mem <= cfg->reserve_memory ||
        disk <= cfg->reserve_disk) {
        snprintf(err, errlen,
                 "capacity: the reserve (%llu CPUs, %llu MiB memory, %llu "
                 "MiB disk) leaves nothing of %llu CPUs, %llu MiB, %llu MiB",
                 (unsigned long long)cfg->reserve_cpus,
                 (unsigned long long)(cfg->reserve_memory / MIB),
                 (unsigned long long)(cfg->reserve_disk / MIB),
                 (unsigned long long)cpus, (unsigned long long)(mem / MIB),
                 (unsigned long long)(disk / MIB));
        return -ENOSPC;
    }
    double ratio = cfg->cpu_overcommit >= 1.0 ? cfg->cpu_overcommit : 1.0;

    offer->cpus = (uint64_t)((double)(cpus - cfg->reserve_cpus) * ratio);
    offer->memory_mb = (mem - cfg->reserve_memory) / MIB;
    offer->disk_mb = (disk - cfg->reserve_disk) / MIB;
    return 0;
}

static int
short_of(const char *what, const char *unit, uint64_t want, uint64_t used,
         uint64_t offer, char *err, size_t errlen)
{
    uint64_t free_ = used < offer ? offer - used : 0;

    snprintf(err, errlen,
             "not enough %s on this node: %llu%s wanted, %llu%s free of "
             "%llu%s",
             what, (unsigned long long)want, unit, (unsigned long long)free_,
             unit, (unsigned long long)offer, unit);
    return -ENOSPC;
}

int
agent_capacity_check(const struct agent_res *offer,
                     const struct agent_res *used,
                     const struct agent_res *want, char *err, size_t errlen)
{
    /* Written as subtraction so huge requests cannot wrap around. */
    if (used->cpus > offer->cpus || want->cpus > offer->cpus - used->cpus)
        return short_of("CPUs", "", want->cpus, used->cpus, offer->cpus, err,
                        errlen);
    if (used->memory_mb > offer->memory_mb ||
        want->memory_mb > offer->memory_mb - used->memory_mb)
        return short_of("memory", " MiB", want->memory_mb, used->memory_mb,
                        offer->memory_mb, err, errlen);
    if (used->disk_mb > offer->disk_mb ||
        want->disk_mb > offer->disk_mb - used->disk_mb)
        return short_of("disk", " MiB", want->disk_mb, used->disk_mb,
                        offer->disk_mb, err, errlen);
    return 0;
}
