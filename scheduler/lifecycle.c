/*
 * Sandbox life cycle on the leader: create, destroy, ensure.
 * Placeholder bodies until the real ones land (so the daemon links).
 */
#include <errno.h>

#include "scheduler/sched.h"

int sched_sandbox_create(struct sched *s, const struct sched_create_req *req,
                         sched_sandbox_cb cb, void *data)
{
    PD_UNUSED(s);
    PD_UNUSED(req);
    PD_UNUSED(cb);
    PD_UNUSED(data);
    return -ENOSYS;
}

int sched_sandbox_destroy(struct sched *s, const char *id,
                          sched_sandbox_cb cb, void *data)
{
    PD_UNUSED(s);
    PD_UNUSED(id);
    PD_UNUSED(cb);
    PD_UNUSED(data);
    return -ENOSYS;
}

void sched_sandbox_ensure(struct sched *s, const char *id,
                          sched_ensure_cb cb, void *data)
{
    PD_UNUSED(s);
    PD_UNUSED(id);
    cb(data, -ENOSYS, "not yet", NULL, false);
}
