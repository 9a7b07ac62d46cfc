/*
 * exec, processes and files routed to the owning agent (see sched.h).
 * Placeholder routes answering 501 while the real ones are written.
 */
#include "scheduler/sched.h"

static void io_not_yet(struct pd_http_req *r, const struct pd_http_params *p,
                       void *arg)
{
    (void)p;
    (void)arg;
    pd_http_respond_error(r, 501, "unavailable", "not yet");
}

const struct pd_http_route sched_io_routes[] = {
    { NULL, "/v1/sandboxes/{id}/exec", io_not_yet },
    { NULL, "/v1/sandboxes/{id}/processes", io_not_yet },
    { NULL, "/v1/sandboxes/{id}/processes/{proc}", io_not_yet },
    { NULL, "/v1/sandboxes/{id}/processes/{proc}/logs", io_not_yet },
    { NULL, "/v1/sandboxes/{id}/files", io_not_yet },
    { NULL, "/v1/sandboxes/{id}/files/list", io_not_yet },
    { NULL, "/v1/sandboxes/{id}/files/mkdir", io_not_yet },
    { NULL, "/v1/sandboxes/{id}/files/rename", io_not_yet },
};
const size_t sched_io_nroutes =
    sizeof(sched_io_routes) / sizeof(sched_io_routes[0]);
