/*
 * Port exposure (placeholder until the real module lands).
 */
#include "scheduler/sched.h"

static void port_unavailable(struct pd_http_req *r,
                             const struct pd_http_params *p, void *arg)
{
    (void)p;
    (void)arg;
    pd_http_respond_error(r, 501, "unavailable", "not yet");
}

const struct pd_http_route sched_port_routes[] = {
    {"POST", "/v1/sandboxes/{id}/ports", port_unavailable},
    {"GET", "/v1/sandboxes/{id}/ports", port_unavailable},
    {"DELETE", "/v1/sandboxes/{id}/ports/{port}", port_unavailable},
};
const size_t sched_port_nroutes =
    sizeof(sched_port_routes) / sizeof(sched_port_routes[0]);
