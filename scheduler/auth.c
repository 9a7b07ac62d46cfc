/*
 * Bearer tokens for the API (placeholder until the real module lands).
 */
#include <errno.h>

#include "scheduler/sched.h"

int sched_auth_init(struct sched *s, char *err, size_t errlen)
{
    (void)s;
    (void)err;
    (void)errlen;
    return 0;
}

void sched_auth_close(struct sched *s)
{
    (void)s;
}

void sched_auth_on_leader(struct sched *s)
{
    (void)s;
}

int sched_auth_request(struct sched *s, struct pd_http_req *r,
                       struct sched_principal *out)
{
    (void)s;
    (void)out;
    pd_http_respond_error(r, 501, "unavailable", "not yet");
    return -ENOSYS;
}

bool sched_auth_owns(const struct sched_principal *p, const char *tenant)
{
    (void)p;
    (void)tenant;
    return false;
}
