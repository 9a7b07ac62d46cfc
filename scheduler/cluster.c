/*
 * The Raft member as seen by the rest of the scheduler: MEMBER_SET on
 * leadership, the membership API, leadership transfer before shutdown.
 * (Being written; see scheduler/sched.h.)
 */
#include "scheduler/sched.h"
