/* Counters and histograms for /metrics (being written). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "scheduler/sched.h"

int sched_metrics_init(struct sched *s)
{
    (void)s;
    return 0;
}

void sched_metrics_close(struct sched *s)
{
    (void)s;
}

void sched_metrics_api(struct sched *s, const char *route, int status,
                       uint64_t duration_us)
{
    (void)s;
    (void)route;
    (void)status;
    (void)duration_us;
}

void sched_metrics_inc(struct sched *s, const char *counter, uint64_t n)
{
    (void)s;
    (void)counter;
    (void)n;
}

char *sched_metrics_render(struct sched *s)
{
    (void)s;
    return strdup("");
}
