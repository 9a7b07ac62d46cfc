/*
 * Exposing a sandbox's port as a preview URL.
 *
 *   POST   /v1/sandboxes/{id}/ports {port}  -> 201 {port, url, token}
 *   GET    /v1/sandboxes/{id}/ports         -> {ports: [{port, url,
 *                                               created_at}]}
 *   DELETE /v1/sandboxes/{id}/ports/{port}  -> {port, exposed: false}
 *
 * Expose draws a fresh preview token (preview_token.c: 130 bits from
 * getrandom, DNS-safe base32), commits PORT_EXPOSE with its SHA-256 only,
 * and shows the token once, inside the URL. The Raft log, the snapshots
 * and every scheduler's state hold the hash, so reading them never gives
 * a working URL. A port already exposed is a 409: the token cannot be
 * shown again, so the caller unexposes and exposes to get a new one.
 *
 * Unexpose commits PORT_UNEXPOSE: from the moment a scheduler applies it,
 * its preview listener answers 404 for that URL, and preview.c's sweep
 * closes the tunnels still open through it (WebSocket, SSE). Destroying a
 * sandbox removes its ports in the same SANDBOX_DELETE entry.
 *
 * The list cannot show working URLs (the tokens are not kept): each url
 * carries the literal placeholder "{token}".
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <openssl/sha.h>

#include "common/log.h"
#include "scheduler/auth.h"
#include "scheduler/preview.h"

struct portreq {
    struct sched *s;
    struct pd_http_req *r;
    char sandbox[PD_ID_MAX + 1];
    char tenant[PD_ID_MAX + 1];
    uint32_t port;
    char token[SCHED_PREVIEW_TOKEN_LEN + 1];
};

/* The preview listener's port, for the URL (0 when unknown). */
static uint16_t
preview_port(const struct sched *s)
{
    const char *a = s->cfg.preview_listen, *c;
    uint64_t v;

    if (a == NULL || (c = strrchr(a, ':')) == NULL ||
        pd_parse_u64(c + 1, &v) != 0 || v > 65535)
        return 0;
    return (uint16_t)v;
}

static const char *
scheme(const struct sched *s)
{
    return s->api_tls != NULL ? "https" : "http";
}

static const char *
domain(const struct sched *s)
{
    const char *d = s->cfg.preview_domain;

    return d != NULL && d[0] != '\0' ? d : "preview.localhost";
}

static bool
parse_port(const char *v, uint32_t *out)
{
    uint64_t n;

    if (v == NULL || v[0] == '0' || pd_parse_u64(v, &n) != 0 || n < 1 ||
        n > 65535)
        return false;
    *out = (uint32_t)n;
    return true;
}

static struct portreq *
portreq_new(struct sched_call *c, struct pd_http_req *r,
            const struct fsm_sandbox *sb)
{
    struct portreq *q = calloc(1, sizeof(*q));

    if (q == NULL) {
        pd_http_respond_error(r, 500, "internal", "out of memory");
        return NULL;
    }
    q->s = c->s;
    q->r = r;
    pd_strlcpy(q->sandbox, sb->id, sizeof(q->sandbox));
    pd_strlcpy(q->tenant, c->who.tenant, sizeof(q->tenant));
    return q;
}

static void
portreq_free(struct portreq *q)
{
    explicit_bzero(q->token, sizeof(q->token));
    free(q);
}

static void
portreq_fail(void *arg)
{
    portreq_free(arg);
}

/* ---- POST /v1/sandboxes/{id}/ports ------------------------------------- */

static const struct pd_json_field expose_fields[] = {
    {"port", PD_JSON_UINT, true},
};

static void
expose_applied(void *data, int status, const struct fsm_result *res)
{
    struct portreq *q = data;
    char url[512], subj[PD_ID_MAX + 16];
    int n;

    if (status != 0 || res->code != 0) {
        sched_auth_respond_errno(q->r, status != 0 ? status : res->code,
                                 status != 0 ? "the leader changed before "
                                 "the port was known exposed; retry"
                                             : res->message);
        portreq_free(q);
        return;
    }
    sched_auth_nudge(q->s);
    n = sched_preview_url(url, sizeof(url), scheme(q->s), (uint16_t)q->port,
                          q->sandbox, q->token, domain(q->s),
                          preview_port(q->s));
    if (n < 0)
        url[0] = '\0';
    snprintf(subj, sizeof(subj), "sandbox %s", q->sandbox);
    pd_info(subj, "port %u exposed by %s", q->port, q->tenant);
    pd_http_respond_json(q->r, 201, json_pack("{s:i, s:s, s:s}", "port",
                                              (int)q->port, "url", url,
                                              "token", q->token));
    portreq_free(q);
}

static void
expose_body(struct pd_http_req *r, json_t *body, void *arg)
{
    struct portreq *q = arg;
    json_int_t port = json_integer_value(json_object_get(body, "port"));
    struct fsm_cmd cmd;
    int rc;

    json_decref(body);
    if (port < 1 || port > 65535) {
        pd_http_respond_error(r, 400, "invalid_argument", "field 'port': "
                              "expected 1 to 65535");
        portreq_free(q);
        return;
    }
    q->port = (uint32_t)port;
    rc = sched_preview_token_new(q->token);
    if (rc == 0)
        rc = fsm_cmd_init(&cmd, FSM_CMD_PORT_EXPOSE);
    if (rc == 0) {
        pd_strlcpy(cmd.u.port.sandbox, q->sandbox,
                   sizeof(cmd.u.port.sandbox));
        cmd.u.port.port = q->port;
        SHA256((const unsigned char *)q->token, SCHED_PREVIEW_TOKEN_LEN,
               cmd.u.port.token_hash);
        rc = raftnode_propose(q->s->raft, &cmd, expose_applied, q);
    }
    if (rc != 0) {
        sched_auth_respond_errno(r, rc, NULL);
        portreq_free(q);
    }
}

static void
h_expose(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    struct sched_call *c = arg;
    struct fsm_sandbox sb;
    struct portreq *q;

    if (sched_sandbox_lookup(c, r, pd_http_param(p, "id"), &sb) != 0)
        return;
    if (sched_forward_if_follower(c, r)) {
        fsm_sandbox_clear(&sb);
        return;
    }
    q = portreq_new(c, r, &sb);
    fsm_sandbox_clear(&sb);
    if (q == NULL)
        return;
    if (sched_read_json(r, 4096, expose_fields, 1, expose_body,
                        portreq_fail, q) != 0) {
        pd_http_respond_error(r, 500, "internal", "cannot read the body");
        portreq_free(q);
    }
}

/* ---- GET /v1/sandboxes/{id}/ports -------------------------------------- */

static void
h_list(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    struct sched_call *c = arg;
    struct fsm_sandbox sb;
    struct fsm_port *v = NULL;
    size_t n = 0, i;
    uint16_t lp = preview_port(c->s);
    char url[512], lps[8] = "";
    json_t *arr;

    if (sched_sandbox_lookup(c, r, pd_http_param(p, "id"), &sb) != 0)
        return;
    if (fsm_port_list(c->s->fsm, sb.id, &v, &n) != 0) {
        fsm_sandbox_clear(&sb);
        pd_http_respond_error(r, 500, "internal", "cannot list ports: %s",
                              fsm_errmsg(c->s->fsm));
        return;
    }
    if (lp != 0)
        snprintf(lps, sizeof(lps), ":%u", (unsigned)lp);
    arr = json_array();
    for (i = 0; arr != NULL && i < n; i++) {
        snprintf(url, sizeof(url), "%s://%u-%s-{token}.%s%s", scheme(c->s),
                 v[i].port, sb.id, domain(c->s), lps);
        json_array_append_new(arr, json_pack(
            "{s:i, s:s, s:I}", "port", (int)v[i].port, "url", url,
            "created_at", (json_int_t)(v[i].created_ms / 1000)));
    }
    free(v);
    fsm_sandbox_clear(&sb);
    if (arr == NULL) {
        pd_http_respond_error(r, 500, "internal", "out of memory");
        return;
    }
    pd_http_respond_json(r, 200, json_pack("{s:o}", "ports", arr));
}

/* ---- DELETE /v1/sandboxes/{id}/ports/{port} ---------------------------- */

static void
unexpose_applied(void *data, int status, const struct fsm_result *res)
{
    struct portreq *q = data;

    if (status != 0 || res->code != 0) {
        sched_auth_respond_errno(q->r, status != 0 ? status : res->code,
                                 status != 0 ? "the leader changed before "
                                 "the port was known unexposed; retry"
                                             : res->message);
    } else {
        char subj[PD_ID_MAX + 16];

        sched_auth_nudge(q->s);
        snprintf(subj, sizeof(subj), "sandbox %s", q->sandbox);
        pd_info(subj, "port %u unexposed by %s", q->port, q->tenant);
        pd_http_respond_json(q->r, 200, json_pack("{s:i, s:b}", "port",
                                                  (int)q->port, "exposed",
                                                  0));
    }
    portreq_free(q);
}

static void
h_unexpose(struct pd_http_req *r, const struct pd_http_params *p, void *arg)
{
    struct sched_call *c = arg;
    struct fsm_sandbox sb;
    struct fsm_port fp;
    struct fsm_cmd cmd;
    struct portreq *q;
    uint32_t port;
    int rc;

    if (sched_sandbox_lookup(c, r, pd_http_param(p, "id"), &sb) != 0)
        return;
    if (!parse_port(pd_http_param(p, "port"), &port)) {
        fsm_sandbox_clear(&sb);
        pd_http_respond_error(r, 400, "invalid_argument", "a port is 1 to "
                              "65535");
        return;
    }
    if (fsm_port_get(c->s->fsm, sb.id, port, &fp) != 0) {
        pd_http_respond_error(r, 404, "not_found", "port %u of sandbox %s "
                              "is not exposed", port, sb.id);
        fsm_sandbox_clear(&sb);
        return;
    }
    if (sched_forward_if_follower(c, r)) {
        fsm_sandbox_clear(&sb);
        return;
    }
    q = portreq_new(c, r, &sb);
    fsm_sandbox_clear(&sb);
    if (q == NULL)
        return;
    q->port = port;
    rc = fsm_cmd_init(&cmd, FSM_CMD_PORT_UNEXPOSE);
    if (rc == 0) {
        pd_strlcpy(cmd.u.port.sandbox, q->sandbox,
                   sizeof(cmd.u.port.sandbox));
        cmd.u.port.port = port;
        rc = raftnode_propose(c->s->raft, &cmd, unexpose_applied, q);
    }
    if (rc != 0) {
        sched_auth_respond_errno(r, rc, NULL);
        portreq_free(q);
    }
}

const struct pd_http_route sched_port_routes[] = {
    {"POST", "/v1/sandboxes/{id}/ports", h_expose},
    {"GET", "/v1/sandboxes/{id}/ports", h_list},
    {"DELETE", "/v1/sandboxes/{id}/ports/{port}", h_unexpose},
};
const size_t sched_port_nroutes =
    sizeof(sched_port_routes) / sizeof(sched_port_routes[0]);
