/*
 * The preview listener (placeholder until the real module lands).
 */
#include "scheduler/sched.h"

int sched_preview_init(struct sched *s, char *err, size_t errlen)
{
    (void)s;
    (void)err;
    (void)errlen;
    return 0;
}

void sched_preview_close(struct sched *s)
{
    (void)s;
}
