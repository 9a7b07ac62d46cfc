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

int
sched_lifecycle_init(struct sched *s, char *err, size_t errlen)
{
    PD_UNUSED(s);
    PD_UNUSED(err);
    PD_UNUSED(errlen);
    return 0;
}

void
sched_lifecycle_close(struct sched *s)
{
    PD_UNUSED(s);
}

void
sched_lifecycle_serve(struct sched *s, struct pd_conn *c,
                      const struct pd_msg *m)
{
    PD_UNUSED(s);
    PD_UNUSED(c);
    PD_UNUSED(m);
}

void
sched_lifecycle_conn_closed(struct sched *s, struct pd_conn *c)
{
    PD_UNUSED(s);
    PD_UNUSED(c);
}

bool
sched_lifecycle_busy(struct sched *s, const char *id)
{
    PD_UNUSED(s);
    PD_UNUSED(id);
    return false;
}
