/* paddock-scheduler (being written). */
#include <stdio.h>

#include "scheduler/sched.h"

struct sched *sched_global;

int main(void)
{
    fprintf(stderr, "paddock-scheduler: not yet\n");
    return 1;
}
