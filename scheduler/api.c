/* The HTTP API listener (being written). */
#include <errno.h>

#include "scheduler/sched.h"

int sched_api_init(struct sched *s, char *err, size_t errlen)
{
    (void)s;
    (void)err;
    (void)errlen;
    return 0;
}

void sched_api_close(struct sched *s)
{
    (void)s;
}

int sched_sandbox_lookup(struct sched_call *c, struct pd_http_req *r,
                         const char *id, struct fsm_sandbox *out)
{
    (void)c;
    (void)id;
    (void)out;
    pd_http_respond_error(r, 501, "unavailable", "not yet");
    return -ENOSYS;
}
