/*
 * The token API (placeholder until the real module lands).
 */
#include "scheduler/sched.h"

static void tok_unavailable(struct pd_http_req *r,
                            const struct pd_http_params *p, void *arg)
{
    (void)p;
    (void)arg;
    pd_http_respond_error(r, 501, "unavailable", "not yet");
}

const struct pd_http_route sched_token_routes[] = {
    {"POST", "/v1/tokens", tok_unavailable},
    {"GET", "/v1/tokens", tok_unavailable},
    {"DELETE", "/v1/tokens/{jti}", tok_unavailable},
};
const size_t sched_token_nroutes =
    sizeof(sched_token_routes) / sizeof(sched_token_routes[0]);
