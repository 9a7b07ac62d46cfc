/*
 * The Raft member as seen by the rest of the scheduler: MEMBER_SET on
 * leadership, the membership API, leadership transfer before shutdown.
 * (Being written; see scheduler/sched.h.)
 */
#include <errno.h>

#include "scheduler/sched.h"

int sched_cluster_init(struct sched *s, char *err, size_t errlen)
{
    (void)s;
    (void)err;
    (void)errlen;
    return -ENOSYS;
}

void sched_cluster_close(struct sched *s, void (*done)(void *data),
                         void *data)
{
    (void)s;
    done(data);
}

const struct pd_http_route sched_cluster_routes[] = {
    {NULL, NULL, NULL},
};
const size_t sched_cluster_nroutes = 0;
