/*
 * The RPC listener: agent sessions, failure detection, redirects.
 * Placeholder bodies until the real ones land (so the daemon links).
 */
#include <errno.h>

#include "scheduler/sched.h"

int sched_nodes_init(struct sched *s, char *err, size_t errlen)
{
    PD_UNUSED(s);
    PD_UNUSED(err);
    PD_UNUSED(errlen);
    return 0;
}

void sched_nodes_close(struct sched *s)
{
    PD_UNUSED(s);
}

void sched_nodes_on_state(struct sched *s, bool leader)
{
    PD_UNUSED(s);
    PD_UNUSED(leader);
}

void sched_nodes_broadcast(struct sched *s, struct pd_enc *e)
{
    PD_UNUSED(s);
    PD_UNUSED(e);
}

bool
sched_nodes_alive(struct sched *s, const char *node)
{
    PD_UNUSED(s);
    PD_UNUSED(node);
    return false;
}
