/*
 * INFO and SHUTDOWN.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/statvfs.h>
#include <sys/sysinfo.h>
#include <sys/utsname.h>
#include <unistd.h>

#include "common/log.h"
#include "guest-agent/guest.h"

void
info_request(const struct pd_msg *m)
{
    struct utsname u;
    struct sysinfo si;
    struct statvfs vfs;
    char kernel[sizeof(u.release) + sizeof(u.version) + 2] = "";
    char host[65] = "";
    uint64_t dtotal = 0, dused = 0;
    struct pd_enc e;

    if (uname(&u) == 0)
        snprintf(kernel, sizeof(kernel), "%s %s", u.release, u.version);
    memset(&si, 0, sizeof(si));
    sysinfo(&si);
    if (statvfs("/workspace", &vfs) == 0) {
        dtotal = (uint64_t)vfs.f_blocks * vfs.f_frsize;
        dused = (uint64_t)(vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize;
    }
    gethostname(host, sizeof(host) - 1);

    pd_enc_begin(&e, PD_MSG_OK, m->id);
    pd_enc_str(&e, "kernel", kernel);
    pd_enc_u64(&e, "mem_total", (uint64_t)si.totalram * si.mem_unit);
    pd_enc_u64(&e, "mem_free", (uint64_t)si.freeram * si.mem_unit);
    pd_enc_u64(&e, "cpus", (uint64_t)sysconf(_SC_NPROCESSORS_ONLN));
    pd_enc_u64(&e, "disk_total", dtotal);
    pd_enc_u64(&e, "disk_used", dused);
    pd_enc_u64(&e, "uptime_ms", (uint64_t)si.uptime * 1000);
    pd_enc_u64(&e, "procs", si.procs);
    pd_enc_str(&e, "hostname", host);
    chan_send(&e);
}

void
shutdown_request(const struct pd_msg *m)
{
    pd_info("guest", "shutdown requested by the host");
    chan_ok(m->id);
    chan_flush(1000);
    if (!guest_is_init) {
        pd_warn("guest", "not PID 1: not powering off, ignoring");
        return;
    }
    guest_poweroff();
}
