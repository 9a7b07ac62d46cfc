/*
 * Client pool to the agents' RPC ports (see sched.h). Placeholder so that
 * the daemon links while the real client is written.
 */
#include <errno.h>
#include <stdio.h>

#include "scheduler/sched.h"

int sched_agentc_init(struct sched *s, char *err, size_t errlen)
{
    (void)s;
    (void)err;
    (void)errlen;
    return 0;
}

void sched_agentc_close(struct sched *s)
{
    (void)s;
}

struct sched_areq *sched_agentc_send(struct sched *s, const char *rpc_addr,
                                     struct pd_enc *e,
                                     const struct sched_areq_cb *cb,
                                     void *data)
{
    (void)s;
    (void)rpc_addr;
    (void)e;
    cb->on_end(NULL, -ENOSYS, NULL, data);
    return NULL;
}

int sched_areq_send(struct sched_areq *q, struct pd_enc *e)
{
    (void)q;
    (void)e;
    return -ENOSYS;
}

void sched_areq_cancel(struct sched_areq *q)
{
    (void)q;
}

void sched_areq_manual_window(struct sched_areq *q)
{
    (void)q;
}

void sched_areq_grant(struct sched_areq *q, size_t bytes)
{
    (void)q;
    (void)bytes;
}

uint64_t sched_areq_id(const struct sched_areq *q)
{
    (void)q;
    return 0;
}

size_t sched_areq_queued(const struct sched_areq *q)
{
    (void)q;
    return 0;
}
