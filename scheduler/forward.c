/* Writes on a follower go to the leader (being written). */
#include <errno.h>

#include "scheduler/sched.h"

int sched_forward_init(struct sched *s, char *err, size_t errlen)
{
    (void)s;
    (void)err;
    (void)errlen;
    return 0;
}

void sched_forward_close(struct sched *s)
{
    (void)s;
}

bool sched_forward_if_follower(struct sched_call *c, struct pd_http_req *r)
{
    (void)c;
    pd_http_respond_error(r, 501, "unavailable", "not yet");
    return true;
}

void sched_forward_serve(struct sched *s, struct pd_conn *c,
                         const struct pd_msg *m)
{
    (void)s;
    (void)c;
    (void)m;
}

const char *sched_leader_api_addr(struct sched *s)
{
    (void)s;
    return NULL;
}

const char *sched_leader_rpc_addr(struct sched *s)
{
    (void)s;
    return NULL;
}

void sched_forward_conn_closed(struct sched *s, struct pd_conn *c)
{
    (void)s;
    (void)c;
}
