/*
 * The schedulers' RPC into the agent: a TCP listener on a loopback (or
 * cluster) address, mutual TLS against the cluster CA with OU=scheduler
 * required of the client (tlsauth.c), then framed requests (proto/conn.h).
 *
 * Requests 200-299 are served here; guest requests 100-199 carry an extra
 * "sandbox" field and are relayed to that sandbox's guest agent
 * (relay.c). The same dispatch serves requests that arrive on the
 * agent's session with the leader.
 *
 * Failure modes: a client without a certificate, with one from another
 * CA, or with a non-scheduler certificate fails the handshake and is
 * closed; a garbage frame closes that connection only (proto/conn.c); a
 * request with bad fields gets ERROR {code, message} and the connection
 * stays; a peer that disconnects mid-stream cancels its relays in the
 * guest.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "common/log.h"
#include "node-agent/agent.h"
#include "node-agent/egress.h"
#include "node-agent/session.h"
#include "proto/conn.h"
#include "proto/msgtypes.h"

#define MIB (1024ULL * 1024ULL)
#define ALLOW_MAX 64
#define ENV_MAX 256

static struct rpc_peer *peers;

/* ---- peers ------------------------------------------------------------- */

static struct rpc_peer *
peer_get(struct agent *a, struct pd_conn *c)
{
    struct rpc_peer *p;

    for (p = peers; p != NULL; p = p->next)
        if (p->conn == c)
            return p;
    p = calloc(1, sizeof(*p));
    if (p == NULL)
        return NULL;
    p->agent = a;
    p->conn = c;
    p->refs = 1;
    p->next = peers;
    peers = p;
    return p;
}

void
rpc_peer_unref(struct rpc_peer *p)
{
    if (--p->refs > 0)
        return;
    free(p);
}

void
agent_rpc_conn_closed(struct agent *a, struct pd_conn *c)
{
    struct rpc_peer **pp;

    (void)a;
    for (pp = &peers; *pp != NULL; pp = &(*pp)->next) {
        struct rpc_peer *p = *pp;

        if (p->conn != c)
            continue;
        *pp = p->next;
        p->conn = NULL;
        relay_peer_closed(p);
        rpc_peer_unref(p);
        return;
    }
}

/* ---- replies ----------------------------------------------------------- */

static void
send_err(struct rpc_peer *p, uint64_t id, int errnum, const char *msg)
{
    if (p->conn != NULL)
        pd_conn_send_error(p->conn, id, errnum < 0 ? -errnum : errnum, "%s",
                           msg);
}

/* A key: a counted top-level field, or a raw key inside a nested map. */
static void
key(struct pd_enc *e, bool top, const char *k)
{
    if (top)
        pd_enc_key(e, k);
    else
        msgpack_pack_str_with_body(&e->pk, k, strlen(k));
}

static void
kstr(struct pd_enc *e, bool top, const char *k, const char *v)
{
    key(e, top, k);
    msgpack_pack_str_with_body(&e->pk, v, strlen(v));
}

static void
ku64(struct pd_enc *e, bool top, const char *k, uint64_t v)
{
    key(e, top, k);
    msgpack_pack_uint64(&e->pk, v);
}

/* The sandbox map of STATUS, LIST and NODE_REGISTER; top puts its fields
 * at the top level of the frame instead of in a nested map. */
static void
encode_sandbox(const struct sandbox *sb, struct pd_enc *e, bool top)
{
    size_t nports = 0;

    for (const struct sb_port *pt = sb->ports; pt; pt = pt->next)
        nports++;
    if (!top)
        msgpack_pack_map(&e->pk, 12);
    kstr(e, top, "sandbox", sb->id);
    kstr(e, top, "state", sb_state_name(sb->state));
    kstr(e, top, "reason", sb->reason);
    ku64(e, top, "cpus", sb->cpus);
    ku64(e, top, "memory_mb", sb->memory_mb);
    ku64(e, top, "disk_mb", sb->disk_mb);
    kstr(e, top, "egress", sb->egress);
    ku64(e, top, "created_ms", sb->created_ms);
    ku64(e, top, "ready_ms", sb->ready_ms);
    ku64(e, top, "pid", sb->pid > 0 ? (uint64_t)sb->pid : 0);
    kstr(e, top, "accel", sb->agent->accel ? sb->agent->accel : "");
    key(e, top, "ports");
    msgpack_pack_array(&e->pk, nports);
    for (const struct sb_port *pt = sb->ports; pt; pt = pt->next) {
        msgpack_pack_map(&e->pk, 2);
        ku64(e, false, "port", pt->guest);
        ku64(e, false, "host_port", pt->host);
    }
}

void
sb_encode(const struct sandbox *sb, struct pd_enc *e)
{
    encode_sandbox(sb, e, false);
}

static void
send_sandbox(struct rpc_peer *p, uint64_t id, const struct sandbox *sb)
{
    struct pd_enc e;

    if (p->conn == NULL)
        return;
    pd_enc_begin(&e, PD_MSG_OK, id);
    encode_sandbox(sb, &e, true);
    pd_conn_send(p->conn, &e);
}

/* ---- SANDBOX_CREATE ---------------------------------------------------- */

struct create_wait {
    struct sb_waiter w;
    struct rpc_peer *peer;
    uint64_t id;
    char sandbox[PD_ID_MAX + 1];
};

static void
create_done(void *arg, int status, const char *reason)
{
    struct create_wait *cw = arg;
    struct rpc_peer *p = cw->peer;
    struct sandbox *sb = sb_find(p->agent, cw->sandbox);

    if (status != 0)
        send_err(p, cw->id, status, reason);
    else if (sb != NULL)
        send_sandbox(p, cw->id, sb);
    else
        send_err(p, cw->id, ENOENT, "sandbox was destroyed while starting");
    rpc_peer_unref(p);
    free(cw);
}

/* Reads "allow" (array of host names) into a comma-separated string. */
static int
read_allow(const struct pd_msg *m, char *out, size_t outlen, char *err,
           size_t errlen)
{
    const msgpack_object_array *arr;
    size_t o = 0;
    int rv = pd_msg_array(m, "allow", &arr);

    out[0] = '\0';
    if (rv == -ENOENT)
        return 0;
    if (rv != 0 || arr->size > ALLOW_MAX) {
        snprintf(err, errlen, "allow: want at most %d host names",
                 ALLOW_MAX);
        return -EINVAL;
    }
    for (uint32_t i = 0; i < arr->size; i++) {
        const char *s;
        size_t n;

        if (pd_obj_str(&arr->ptr[i], &s, &n) != 0 || n == 0 || n > 260 ||
            o + n + 2 > outlen) {
            snprintf(err, errlen, "allow: entry %u is not a host name", i);
            return -EINVAL;
        }
        for (size_t j = 0; j < n; j++) {
            char ch = s[j];

            if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                  (ch >= '0' && ch <= '9') || ch == '.' || ch == '-' ||
                  ch == ':' || (ch == '*' && j == 0))) {
                snprintf(err, errlen, "allow: bad host name \"%.*s\"",
                         (int)n, s);
                return -EINVAL;
            }
        }
        if (o > 0)
            out[o++] = ',';
        memcpy(out + o, s, n);
        o += n;
        out[o] = '\0';
    }
    return 0;
}

/* Reads "env" (map of string to string) into a JSON object text. */
static int
read_env(const struct pd_msg *m, char **out, char *err, size_t errlen)
{
    const msgpack_object_map *map;
    json_t *obj;
    int rv = pd_msg_map(m, "env", &map);

    *out = NULL;
    if (rv == -ENOENT)
        return 0;
    if (rv != 0 || map->size > ENV_MAX) {
        snprintf(err, errlen, "env: want a map of at most %d strings",
                 ENV_MAX);
        return -EINVAL;
    }
    obj = json_object();
    for (uint32_t i = 0; i < map->size; i++) {
        const char *k, *v;
        size_t kl, vl;

        if (pd_obj_str(&map->ptr[i].key, &k, &kl) != 0 ||
            pd_obj_str(&map->ptr[i].val, &v, &vl) != 0 || kl == 0 ||
            kl > 256 || vl > 4096 || memchr(k, '=', kl) != NULL ||
            memchr(k, '\0', kl) != NULL || memchr(v, '\0', vl) != NULL) {
            json_decref(obj);
            snprintf(err, errlen, "env: entry %u is not NAME: value", i);
            return -EINVAL;
        }
        json_object_setn_new(obj, k, kl, json_stringn(v, vl));
    }
    *out = json_dumps(obj, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(obj);
    return *out ? 0 : -ENOMEM;
}

/* The sandbox-scoped token the leader put in the environment, for the
 * egress proxy (added by tokens). */
void
agent_egress_token_from_env(const char *id, const char *env_json)
{
    json_t *j = env_json != NULL ? json_loads(env_json, 0, NULL) : NULL;
    const char *tok = json_string_value(json_object_get(j, "PADDOCK_TOKEN"));

    if (agent_egress_set_token(id, tok) != 0)
        pd_warn("rpc", "sandbox %s: its PADDOCK_TOKEN is not a token; the "
                "egress proxy will refuse it", id);
    json_decref(j);
}

static void
do_create(struct rpc_peer *p, const struct pd_msg *m)
{
    struct agent *a = p->agent;
    char id[PD_ID_MAX + 1], egress[8] = "none", allow[4096], err[512] = "";
    uint64_t cpus = 0, mem = 0, disk = 0;
    bool wait = false;
    char *env = NULL;
    struct create_wait *cw = NULL;
    int rv;

    rv = pd_msg_cstr(m, "sandbox", id, sizeof(id));
    if (rv != 0 || !pd_id_valid(id)) {
        send_err(p, m->id, EINVAL,
                 "sandbox: want an id matching [a-z0-9][a-z0-9-]{0,62}");
        return;
    }
    if (pd_msg_u64(m, "cpus", &cpus) != 0 ||
        pd_msg_u64(m, "memory_mb", &mem) != 0 ||
        pd_msg_u64(m, "disk_mb", &disk) != 0) {
        send_err(p, m->id, EINVAL,
                 "cpus, memory_mb and disk_mb are required whole numbers");
        return;
    }
    rv = pd_msg_cstr(m, "egress", egress, sizeof(egress));
    if ((rv != 0 && rv != -ENOENT) ||
        (strcmp(egress, "none") != 0 && strcmp(egress, "all") != 0 &&
         strcmp(egress, "allow") != 0)) {
        send_err(p, m->id, EINVAL, "egress: want none, all or allow");
        return;
    }
    if (read_allow(m, allow, sizeof(allow), err, sizeof(err)) != 0 ||
        read_env(m, &env, err, sizeof(err)) != 0) {
        send_err(p, m->id, EINVAL, err);
        return;
    }
    if (strcmp(egress, "allow") == 0 && allow[0] == '\0') {
        free(env);
        send_err(p, m->id, EINVAL, "egress allow needs a non-empty allow list");
        return;
    }
    pd_msg_bool(m, "wait", &wait);

    struct sb_spec spec = {
        .id = id,
        .cpus = cpus > 1024 ? 1025 : (unsigned)cpus,
        .memory_mb = mem,
        .disk_mb = disk,
        .egress = egress,
        .allow = allow,
        .env_json = env,
    };
    if (wait) {
        cw = calloc(1, sizeof(*cw));
        if (cw == NULL) {
            free(env);
            send_err(p, m->id, ENOMEM, "out of memory");
            return;
        }
        cw->w.done = create_done;
        cw->w.arg = cw;
        cw->peer = p;
        cw->id = m->id;
        pd_strlcpy(cw->sandbox, id, sizeof(cw->sandbox));
        p->refs++;
    }
    rv = sb_create(a, &spec, cw ? &cw->w : NULL, err, sizeof(err));
    if (rv == 0)
        agent_egress_token_from_env(id, env);
    free(env);
    if (rv != 0) {
        if (cw != NULL) {
            rpc_peer_unref(p);
            free(cw);
        }
        send_err(p, m->id, rv, err);
        return;
    }
    if (cw == NULL)
        send_sandbox(p, m->id, sb_find(a, id));
}

/* ---- SANDBOX_DESTROY --------------------------------------------------- */

struct destroy_wait {
    struct sb_waiter w;
    struct rpc_peer *peer;
    uint64_t id;
};

static void
destroy_done(void *arg, int status, const char *reason)
{
    struct destroy_wait *dw = arg;
    struct rpc_peer *p = dw->peer;
    struct pd_enc e;

    if (status != 0) {
        send_err(p, dw->id, status, reason);
    } else if (p->conn != NULL) {
        pd_enc_begin(&e, PD_MSG_OK, dw->id);
        pd_conn_send(p->conn, &e);
    }
    rpc_peer_unref(p);
    free(dw);
}

static void
do_destroy(struct rpc_peer *p, const struct pd_msg *m)
{
    char id[PD_ID_MAX + 1], err[256] = "";
    struct destroy_wait *dw;
    int rv;

    if (pd_msg_cstr(m, "sandbox", id, sizeof(id)) != 0 || !pd_id_valid(id)) {
        send_err(p, m->id, EINVAL, "sandbox: want a sandbox id");
        return;
    }
    agent_egress_set_token(id, NULL); /* tokens: its token dies with it */
    dw = calloc(1, sizeof(*dw));
    if (dw == NULL) {
        send_err(p, m->id, ENOMEM, "out of memory");
        return;
    }
    dw->w.done = destroy_done;
    dw->w.arg = dw;
    dw->peer = p;
    dw->id = m->id;
    p->refs++;
    rv = sb_destroy(p->agent, id, &dw->w, err, sizeof(err));
    if (rv != 0) {
        rpc_peer_unref(p);
        free(dw);
        send_err(p, m->id, rv, err);
    }
}

/* ---- other requests ---------------------------------------------------- */

static struct sandbox *
find_from(struct rpc_peer *p, const struct pd_msg *m)
{
    char id[PD_ID_MAX + 1];
    struct sandbox *sb;

    if (pd_msg_cstr(m, "sandbox", id, sizeof(id)) != 0 || !pd_id_valid(id)) {
        send_err(p, m->id, EINVAL, "sandbox: want a sandbox id");
        return NULL;
    }
    sb = sb_find(p->agent, id);
    if (sb == NULL) {
        char msg[128];

        snprintf(msg, sizeof(msg), "no sandbox %s on this node", id);
        send_err(p, m->id, ENOENT, msg);
    }
    return sb;
}

static void
do_list(struct rpc_peer *p, const struct pd_msg *m)
{
    struct pd_enc e;
    size_t n = 0;

    for (struct sandbox *sb = p->agent->sandboxes; sb; sb = sb->next)
        n++;
    pd_enc_begin(&e, PD_MSG_OK, m->id);
    pd_enc_key(&e, "sandboxes");
    msgpack_pack_array(&e.pk, n);
    for (struct sandbox *sb = p->agent->sandboxes; sb; sb = sb->next)
        sb_encode(sb, &e);
    pd_conn_send(p->conn, &e);
}

static void
pack_res(struct pd_enc *e, const struct agent_res *r)
{
    msgpack_pack_map(&e->pk, 3);
    ku64(e, false, "cpus", r->cpus);
    ku64(e, false, "memory_mb", r->memory_mb);
    ku64(e, false, "disk_mb", r->disk_mb);
}

static void
do_info(struct rpc_peer *p, const struct pd_msg *m)
{
    struct agent *a = p->agent;
    struct agent_res used;
    struct pd_enc e;
    size_t n = 0;

    for (struct sandbox *sb = a->sandboxes; sb; sb = sb->next)
        n++;
    sb_used(a, &used);
    pd_enc_begin(&e, PD_MSG_OK, m->id);
    pd_enc_str(&e, "node", a->node);
    pd_enc_key(&e, "capacity");
    pack_res(&e, &a->offer);
    pd_enc_key(&e, "allocated");
    pack_res(&e, &used);
    pd_enc_u64(&e, "memory_overhead_mb", a->cfg.memory_overhead / MIB);
    pd_enc_u64(&e, "sandboxes", n);
    pd_enc_str(&e, "accel", a->accel);
    pd_enc_str(&e, "cgroup", agent_cg_mode_name(&a->cg));
    pd_enc_str(&e, "leader", agent_session_peer(a->session));
    pd_enc_bool(&e, "registered", agent_session_registered(a->session));
    pd_enc_u64(&e, "egress_requests", agent_egress_requests());
    pd_enc_u64(&e, "egress_denied", agent_egress_denied());
    pd_conn_send(p->conn, &e);
}

struct port_wait {
    struct rpc_peer *peer;
    uint64_t id;
};

static void
port_done(void *arg, int status, unsigned host_port, const char *err)
{
    struct port_wait *pw = arg;
    struct rpc_peer *p = pw->peer;
    struct pd_enc e;

    if (status != 0) {
        send_err(p, pw->id, status, err);
    } else if (p->conn != NULL) {
        pd_enc_begin(&e, PD_MSG_OK, pw->id);
        if (host_port != 0) {
            pd_enc_u64(&e, "host_port", host_port);
            pd_enc_str(&e, "host", "127.0.0.1");
        }
        pd_conn_send(p->conn, &e);
    }
    rpc_peer_unref(p);
    free(pw);
}

static void
do_port(struct rpc_peer *p, const struct pd_msg *m, bool open)
{
    struct sandbox *sb = find_from(p, m);
    struct port_wait *pw;
    uint64_t port;
    int rv;

    if (sb == NULL)
        return;
    if (pd_msg_u64(m, "port", &port) != 0 || port == 0 || port > 65535) {
        send_err(p, m->id, EINVAL, "port: want 1-65535");
        return;
    }
    pw = calloc(1, sizeof(*pw));
    if (pw == NULL) {
        send_err(p, m->id, ENOMEM, "out of memory");
        return;
    }
    pw->peer = p;
    pw->id = m->id;
    p->refs++;
    rv = open ? sb_port_open(sb, (unsigned)port, port_done, pw)
              : sb_port_close(sb, (unsigned)port, port_done, pw);
    if (rv != 0) {
        rpc_peer_unref(p);
        free(pw);
        send_err(p, m->id, rv,
                 rv == -ENOTCONN ? "sandbox is not running"
                 : rv == -ENOENT ? "port is not open"
                                 : "cannot change the port forward");
    }
}

static void
do_guest(struct rpc_peer *p, const struct pd_msg *m)
{
    struct sandbox *sb = find_from(p, m);
    char err[768] = "";
    int rv;

    if (sb == NULL)
        return;
    if (sb->state != SB_RUNNING || sb->guest == NULL) {
        snprintf(err, sizeof(err), "sandbox %s is %s%s%s", sb->id,
                 sb_state_name(sb->state), sb->reason[0] ? ": " : "",
                 sb->reason);
        send_err(p, m->id, sb->state == SB_STARTING ? EAGAIN : ENOTCONN,
                 err);
        return;
    }
    rv = relay_start(p, sb, m, err, sizeof(err));
    if (rv != 0)
        send_err(p, m->id, rv, err);
}

void
agent_rpc_dispatch(struct agent *a, struct pd_conn *c,
                   const struct pd_msg *m)
{
    struct rpc_peer *p = peer_get(a, c);
    struct pd_enc e;

    if (p == NULL) {
        pd_conn_close(c, -ENOMEM, "out of memory");
        return;
    }
    pd_trace("rpc", "%s %s id %llu", pd_conn_peer_name(c),
             pd_msg_type_name(m->type), (unsigned long long)m->id);
    switch (m->type) {
    case PD_MSG_HELLO:
    case PD_MSG_OK:
    case PD_MSG_ERROR:
    case PD_MSG_PONG:
        return;
    case PD_MSG_PING:
        pd_enc_begin(&e, PD_MSG_PONG, m->id);
        pd_conn_send(c, &e);
        return;
    case PD_MSG_SANDBOX_CREATE:
        do_create(p, m);
        return;
    case PD_MSG_SANDBOX_DESTROY:
        do_destroy(p, m);
        return;
    case PD_MSG_SANDBOX_STATUS: {
        struct sandbox *sb = find_from(p, m);

        if (sb != NULL)
            send_sandbox(p, m->id, sb);
        return;
    }
    case PD_MSG_SANDBOX_LIST:
        do_list(p, m);
        return;
    case PD_MSG_PORT_OPEN:
    case PD_MSG_PORT_CLOSE:
        do_port(p, m, m->type == PD_MSG_PORT_OPEN);
        return;
    case PD_MSG_AGENT_INFO:
        do_info(p, m);
        return;
    case PD_MSG_TOKEN_REVOKE: {
        /* The egress proxy refuses the token from now on (tokens). */
        char jti[64] = "";
        uint64_t exp = 0;

        pd_msg_u64(m, "exp", &exp);
        if (pd_msg_cstr(m, "jti", jti, sizeof(jti)) != 0 ||
            agent_egress_revoke(jti, exp) != 0) {
            send_err(p, m->id, EINVAL, "TOKEN_REVOKE: want {jti, exp}");
            return;
        }
        if (m->id != 0) {
            pd_enc_begin(&e, PD_MSG_OK, m->id);
            pd_conn_send(c, &e);
        }
        return;
    }
    case PD_MSG_CANCEL:
    case PD_MSG_WINDOW:
    case PD_MSG_DATA:
    case PD_MSG_STDIN:
        if (!relay_route(p, m))
            pd_debug("rpc", "%s for unknown request %llu, ignoring",
                     pd_msg_type_name(m->type), (unsigned long long)m->id);
        return;
    default:
        if (m->type >= 100 && m->type < 200) {
            do_guest(p, m);
            return;
        }
        send_err(p, m->id, ENOTSUP, "request type not served by an agent");
    }
}

/* ---- listener ---------------------------------------------------------- */

static void
rpc_on_msg(struct pd_conn *c, const struct pd_msg *m)
{
    agent_rpc_dispatch(pd_conn_data(c), c, m);
}

static void
rpc_on_close(struct pd_conn *c, int reason)
{
    struct agent *a = pd_conn_data(c);

    if (reason != 0)
        pd_info("rpc", "connection from %s closed: %s",
                pd_conn_peer_name(c)[0] ? pd_conn_peer_name(c) : "?",
                pd_conn_error(c));
    agent_rpc_conn_closed(a, c);
}

static void
on_rpc_conn(uv_stream_t *server, int status)
{
    struct agent *a = server->data;
    static const struct pd_conn_cb cb = {
        .on_msg = rpc_on_msg,
        .on_close = rpc_on_close,
    };
    struct pd_conn_opts o = {
        .role = "agent",
        .name = a->node,
        .tls = a->rpc_tls,
        .tls_server = true,
        .subject = "rpc",
    };
    struct rpc_peer *p;
    struct pd_conn *c;
    uv_tcp_t *tcp;

    if (status < 0)
        return;
    tcp = malloc(sizeof(*tcp));
    if (tcp == NULL)
        return;
    uv_tcp_init(a->loop, tcp);
    if (uv_accept(server, (uv_stream_t *)tcp) != 0) {
        uv_close((uv_handle_t *)tcp, (uv_close_cb)free);
        return;
    }
    uv_tcp_nodelay(tcp, 1);
    c = pd_conn_new((uv_stream_t *)tcp, &o, &cb, a);
    /* Known from the start, so agent_rpc_stop closes idle ones too. */
    if (c != NULL && (p = peer_get(a, c)) != NULL)
        p->rpc_port = true;
}

void
agent_rpc_stop(struct agent *a)
{
    /* pd_conn_close only starts the close; the list changes later. */
    for (struct rpc_peer *p = peers; p != NULL; p = p->next)
        if (p->rpc_port && p->conn != NULL)
            pd_conn_close(p->conn, 0, "agent stopping");
    uv_close((uv_handle_t *)&a->rpc_server, NULL);
}

int
agent_rpc_listen(struct agent *a, char *err, size_t errlen)
{
    struct sockaddr_storage sa, bound;
    int rv, blen = sizeof(bound);
    char host[48];

    agent_parse_addr(a->cfg.rpc_listen, &sa);
    uv_tcp_init(a->loop, &a->rpc_server);
    a->rpc_server.data = a;
    rv = uv_tcp_bind(&a->rpc_server, (struct sockaddr *)&sa, 0);
    if (rv == 0)
        rv = uv_listen((uv_stream_t *)&a->rpc_server, 128, on_rpc_conn);
    if (rv == 0)
        rv = uv_tcp_getsockname(&a->rpc_server, (struct sockaddr *)&bound,
                                &blen);
    if (rv != 0) {
        snprintf(err, errlen, "rpc_listen %s: %s", a->cfg.rpc_listen,
                 uv_strerror(rv));
        return -EADDRINUSE;
    }
    if (bound.ss_family == AF_INET) {
        uv_ip4_name((struct sockaddr_in *)&bound, host, sizeof(host));
        snprintf(a->rpc_addr, sizeof(a->rpc_addr), "%s:%u", host,
                 ntohs(((struct sockaddr_in *)&bound)->sin_port));
    } else {
        uv_ip6_name((struct sockaddr_in6 *)&bound, host, sizeof(host));
        snprintf(a->rpc_addr, sizeof(a->rpc_addr), "[%s]:%u", host,
                 ntohs(((struct sockaddr_in6 *)&bound)->sin6_port));
    }
    pd_info("rpc", "listening on %s (mutual TLS, schedulers only)",
            a->rpc_addr);
    return 0;
}

/* ---- session payloads -------------------------------------------------- */

/* labels were checked as k=v,k=v at start-up. */
static void
pack_labels(msgpack_packer *pk, const char *labels)
{
    size_t n = 0;

    for (const char *p = labels; p != NULL && *p != '\0';) {
        size_t len = strcspn(p, ",");

        n += len > 0;
        p += len + (p[len] == ',');
    }
    msgpack_pack_map(pk, n);
    for (const char *p = labels; p != NULL && *p != '\0';) {
        size_t len = strcspn(p, ",");
        const char *eq = memchr(p, '=', len);

        if (len > 0 && eq != NULL) {
            msgpack_pack_str_with_body(pk, p, (size_t)(eq - p));
            msgpack_pack_str_with_body(pk, eq + 1,
                                       len - (size_t)(eq - p) - 1);
        }
        p += len + (p[len] == ',');
    }
}

static void
fill_allocated(struct agent *a, struct pd_enc *e)
{
    struct agent_res used;
    size_t n = 0;

    for (struct sandbox *sb = a->sandboxes; sb; sb = sb->next)
        n++;
    sb_used(a, &used);
    pd_enc_u64(e, "cpus_used", used.cpus);
    pd_enc_u64(e, "memory_mb_used", used.memory_mb);
    pd_enc_u64(e, "disk_mb_used", used.disk_mb);
    pd_enc_u64(e, "sandbox_count", n);
}

void
agent_fill_register(void *arg, struct pd_enc *e)
{
    struct agent *a = arg;
    size_t n = 0;

    pd_enc_str(e, "rpc_addr", a->cfg.rpc_advertise ? a->cfg.rpc_advertise
                                                   : a->rpc_addr);
    pd_enc_u64(e, "cpus", a->offer.cpus);
    pd_enc_u64(e, "memory_mb", a->offer.memory_mb);
    pd_enc_u64(e, "disk_mb", a->offer.disk_mb);
    pd_enc_u64(e, "memory_overhead_mb", a->cfg.memory_overhead / MIB);
    pd_enc_str(e, "accel", a->accel);
    if (a->join_token != NULL)
        pd_enc_str(e, "token", a->join_token);
    pd_enc_key(e, "labels");
    pack_labels(&e->pk, a->cfg.labels);
    fill_allocated(a, e);
    for (struct sandbox *sb = a->sandboxes; sb; sb = sb->next)
        n++;
    pd_enc_key(e, "sandboxes");
    msgpack_pack_array(&e->pk, n);
    for (struct sandbox *sb = a->sandboxes; sb; sb = sb->next)
        sb_encode(sb, e);
}

void
agent_fill_heartbeat(void *arg, struct pd_enc *e)
{
    fill_allocated(arg, e);
}

void
agent_report_state(struct agent *a, const struct sandbox *sb)
{
    agent_session_report(a->session, sb->id, sb_state_name(sb->state),
                         sb->reason);
}
