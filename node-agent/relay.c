/*
 * Guest requests relayed between a scheduler and a sandbox's guest agent.
 *
 * Each sandbox has one guest link: a framed connection (proto/conn.h, no
 * TLS: it never leaves the host) on the virtio-serial chardev's unix
 * socket, where QEMU is the server so a restarted agent connects again.
 * The sandbox is ready when the guest's HELLO (role "guest") arrives.
 *
 * A scheduler's request 100-199 becomes a guest request under a fresh id
 * on that link, with the "sandbox" field removed and the agent's defaults
 * added (exec timeout and output cap, the sandbox's environment under the
 * request's own). Every later frame under either id is re-keyed and passed
 * on unchanged, WINDOW grants included, so flow control runs end to end:
 * the agent holds no stream beyond what one window allows and never a
 * whole file.
 *
 * A relay ends with ERROR, EXIT, CANCEL (either side), the final OK
 * (FILE_READ's OK opens its DATA stream and TUNNEL_OPEN's opens the
 * tunnel, so those end with DATA {eof} instead, both ways for a tunnel).
 * A scheduler that disconnects cancels its relays in the guest; a guest
 * link that drops fails its relays with ERROR ECONNRESET.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "common/log.h"
#include "node-agent/agent.h"
#include "proto/conn.h"
#include "proto/msgtypes.h"

#define RETRY_MS 50

struct guest_link {
    struct sandbox *sb;   /* NULL once the sandbox let go */
    struct pd_conn *conn;
    uv_pipe_t *connecting;
    uv_timer_t *retry;
    struct relay *relays;
};

struct relay {
    struct rpc_peer *peer;
    struct guest_link *link;
    uint64_t rpc_id;
    uint64_t guest_id;
    unsigned type;
    bool opened;          /* FILE_READ / TUNNEL_OPEN got their OK */
    bool eof_from_guest;
    bool eof_from_peer;
    struct relay *next;   /* in the peer's list */
    struct relay *lnext;  /* in the link's list */
};

static void link_try(struct guest_link *l);
static void on_retry_timer(uv_timer_t *t);

/* ---- relay bookkeeping ------------------------------------------------- */

static void
relay_free(struct relay *r)
{
    struct relay **pp;

    for (pp = &r->peer->relays; *pp; pp = &(*pp)->next) {
        if (*pp == r) {
            *pp = r->next;
            break;
        }
    }
    if (r->link != NULL) {
        for (pp = &r->link->relays; *pp; pp = &(*pp)->lnext) {
            if (*pp == r) {
                *pp = r->lnext;
                break;
            }
        }
    }
    rpc_peer_unref(r->peer);
    free(r);
}

/* Copies every field but t, id and the skipped ones into e. */
static int
copy_fields(struct pd_enc *e, const struct pd_msg *m, const char *skip1,
            const char *skip2)
{
    const msgpack_object_map *map = &m->root->via.map;
    char key[64];

    for (uint32_t i = 0; i < map->size; i++) {
        const msgpack_object *k = &map->ptr[i].key;

        if (k->type != MSGPACK_OBJECT_STR || k->via.str.size >= sizeof(key))
            return -EPROTO;
        memcpy(key, k->via.str.ptr, k->via.str.size);
        key[k->via.str.size] = '\0';
        if (strcmp(key, "t") == 0 || strcmp(key, "id") == 0 ||
            (skip1 && strcmp(key, skip1) == 0) ||
            (skip2 && strcmp(key, skip2) == 0))
            continue;
        pd_enc_key(e, key);
        msgpack_pack_object(&e->pk, map->ptr[i].val);
    }
    return 0;
}

/* The sandbox's default environment, overridden by the request's. */
static int
pack_env(struct pd_enc *e, const struct sandbox *sb, const struct pd_msg *m)
{
    json_t *env = json_loads(sb->env_json, 0, NULL);
    const msgpack_object_map *req;
    const char *k;
    json_t *v;

    if (!json_is_object(env)) {
        json_decref(env);
        return -EINVAL;
    }
    if (pd_msg_map(m, "env", &req) == 0) {
        for (uint32_t i = 0; i < req->size; i++) {
            const char *ks, *vs;
            size_t kl, vl;

            if (pd_obj_str(&req->ptr[i].key, &ks, &kl) != 0 ||
                pd_obj_str(&req->ptr[i].val, &vs, &vl) != 0) {
                json_decref(env);
                return -EINVAL;
            }
            json_object_setn_new(env, ks, kl, json_stringn(vs, vl));
        }
    }
    pd_enc_key(e, "env");
    msgpack_pack_map(&e->pk, json_object_size(env));
    json_object_foreach(env, k, v)
    {
        msgpack_pack_str_with_body(&e->pk, k, strlen(k));
        msgpack_pack_str_with_body(&e->pk, json_string_value(v),
                                   json_string_length(v));
    }
    json_decref(env);
    return 0;
}

static bool
ends_relay(struct relay *r, const struct pd_msg *m, bool from_guest)
{
    bool eof = false;

    switch (m->type) {
    case PD_MSG_ERROR:
    case PD_MSG_EXIT:
    case PD_MSG_CANCEL:
        return true;
    case PD_MSG_OK:
        if (!from_guest)
            return false;
        if ((r->type == PD_MSG_FILE_READ || r->type == PD_MSG_TUNNEL_OPEN) &&
            !r->opened) {
            r->opened = true;
            return false;
        }
        return true;
    case PD_MSG_DATA:
        if (pd_msg_bool(m, "eof", &eof) != 0 || !eof)
            return false;
        if (from_guest)
            r->eof_from_guest = true;
        else
            r->eof_from_peer = true;
        if (r->type == PD_MSG_FILE_READ)
            return from_guest;
        if (r->type == PD_MSG_TUNNEL_OPEN)
            return r->eof_from_guest && r->eof_from_peer;
        return false;
    default:
        return false;
    }
}

/* Re-keys m under id and sends it on c. */
static int
forward(struct pd_conn *c, const struct pd_msg *m, uint64_t id,
        const char *skip)
{
    struct pd_enc e;

    pd_enc_begin(&e, m->type, id);
    if (copy_fields(&e, m, skip, NULL) != 0) {
        pd_enc_discard(&e);
        return -EPROTO;
    }
    return pd_conn_send(c, &e);
}

/* ---- scheduler side ---------------------------------------------------- */

int
relay_start(struct rpc_peer *p, struct sandbox *sb, const struct pd_msg *m,
            char *err, size_t errlen)
{
    struct guest_link *l = sb->guest;
    const struct agent_cfg *cfg = &sb->agent->cfg;
    bool merge_env = sb->env_json != NULL &&
                     (m->type == PD_MSG_EXEC || m->type == PD_MSG_PROC_START);
    struct relay *r;
    struct pd_enc e;
    uint64_t v;
    int rv;

    if (l == NULL || l->conn == NULL || !sb->guest_ready) {
        snprintf(err, errlen, "sandbox %s: guest agent not connected",
                 sb->id);
        return -ENOTCONN;
    }
    for (r = p->relays; r != NULL; r = r->next) {
        if (r->rpc_id == m->id) {
            snprintf(err, errlen, "request id %llu is already in use",
                     (unsigned long long)m->id);
            return -EBUSY;
        }
    }
    r = calloc(1, sizeof(*r));
    if (r == NULL)
        return -ENOMEM;
    r->peer = p;
    r->link = l;
    r->rpc_id = m->id;
    r->guest_id = pd_conn_next_id(l->conn);
    r->type = m->type;

    pd_enc_begin(&e, m->type, r->guest_id);
    rv = copy_fields(&e, m, "sandbox", merge_env ? "env" : NULL);
    if (rv == 0 && merge_env)
        rv = pack_env(&e, sb, m);
    if (rv == 0 && m->type == PD_MSG_EXEC) {
        if (pd_msg_u64(m, "timeout_ms", &v) == -ENOENT)
            pd_enc_u64(&e, "timeout_ms", cfg->exec_timeout_ms);
        if (pd_msg_u64(m, "output_max", &v) == -ENOENT)
            pd_enc_u64(&e, "output_max", cfg->output_max);
    }
    if (rv != 0) {
        pd_enc_discard(&e);
        free(r);
        snprintf(err, errlen, "malformed request fields");
        return -EINVAL;
    }
    rv = pd_conn_send(l->conn, &e);
    if (rv != 0) {
        free(r);
        snprintf(err, errlen, "sandbox %s: guest link: %s", sb->id,
                 strerror(-rv));
        return rv;
    }
    p->refs++;
    r->next = p->relays;
    p->relays = r;
    r->lnext = l->relays;
    l->relays = r;
    return 0;
}

bool
relay_route(struct rpc_peer *p, const struct pd_msg *m)
{
    struct relay *r;

    for (r = p->relays; r != NULL; r = r->next)
        if (r->rpc_id == m->id)
            break;
    if (r == NULL)
        return false;
    if (r->link != NULL && r->link->conn != NULL)
        forward(r->link->conn, m, r->guest_id, "sandbox");
    if (ends_relay(r, m, false))
        relay_free(r);
    return true;
}

void
relay_peer_closed(struct rpc_peer *p)
{
    while (p->relays != NULL) {
        struct relay *r = p->relays;
        struct pd_enc e;

        if (r->link != NULL && r->link->conn != NULL) {
            pd_enc_begin(&e, PD_MSG_CANCEL, r->guest_id);
            pd_conn_send(r->link->conn, &e);
        }
        relay_free(r);
    }
}

/* ---- guest side -------------------------------------------------------- */

static void
link_on_msg(struct pd_conn *c, const struct pd_msg *m)
{
    struct guest_link *l = pd_conn_data(c);
    struct relay *r;

    if (l->sb == NULL)
        return;
    if (m->type == PD_MSG_HELLO) {
        if (strcmp(pd_conn_peer_role(c), "guest") != 0) {
            pd_conn_close(c, -EPROTO, "peer on the guest port says it is "
                          "a \"%s\"", pd_conn_peer_role(c));
            return;
        }
        pd_debug(l->sb->id, "guest agent %s connected",
                 pd_conn_peer_name(c));
        sb_guest_ready(l->sb);
        return;
    }
    for (r = l->relays; r != NULL; r = r->lnext)
        if (r->guest_id == m->id)
            break;
    if (r == NULL) {
        pd_trace("relay", "%s: %s for no relay (id %llu)", l->sb->id,
                 pd_msg_type_name(m->type), (unsigned long long)m->id);
        return;
    }
    if (r->peer->conn != NULL)
        forward(r->peer->conn, m, r->rpc_id, NULL);
    if (ends_relay(r, m, true))
        relay_free(r);
}

static void
fail_relays(struct guest_link *l, const char *why)
{
    while (l->relays != NULL) {
        struct relay *r = l->relays;

        if (r->peer->conn != NULL)
            pd_conn_send_error(r->peer->conn, r->rpc_id, ECONNRESET,
                               "guest link lost: %s", why);
        relay_free(r);
    }
}

static void
link_on_close(struct pd_conn *c, int reason)
{
    struct guest_link *l = pd_conn_data(c);
    struct sandbox *sb = l->sb;

    (void)reason;
    l->conn = NULL;
    fail_relays(l, pd_conn_error(c));
    if (sb == NULL) {
        if (l->retry == NULL && l->connecting == NULL)
            free(l);
        return;
    }
    pd_debug(sb->id, "guest link closed: %s", pd_conn_error(c));
    sb_guest_lost(sb);
}

static void
free_handle(uv_handle_t *h)
{
    free(h);
}

static void
on_retry_closed(uv_handle_t *h)
{
    struct guest_link *l = h->data;

    free(h);
    l->retry = NULL;
    if (l->sb == NULL && l->conn == NULL && l->connecting == NULL)
        free(l);
}

static void
on_link_connect(uv_connect_t *req, int status)
{
    struct guest_link *l = req->data;
    uv_pipe_t *pipe = (uv_pipe_t *)req->handle;
    static const struct pd_conn_cb cb = {
        .on_msg = link_on_msg,
        .on_close = link_on_close,
    };
    struct pd_conn_opts o = {.role = "agent", .name = "", .subject = "guest"};

    free(req);
    l->connecting = NULL;
    if (status < 0 || l->sb == NULL) {
        uv_close((uv_handle_t *)pipe, free_handle);
        if (l->sb == NULL) {
            if (l->retry == NULL && l->conn == NULL)
                free(l);
            return;
        }
        /* QEMU may not listen yet; retry while the VM lives. */
        if (l->retry != NULL)
            uv_timer_start(l->retry, on_retry_timer, RETRY_MS, 0);
        return;
    }
    o.name = l->sb->agent->node;
    o.subject = l->sb->id;
    l->conn = pd_conn_new((uv_stream_t *)pipe, &o, &cb, l);
}

static void
link_try(struct guest_link *l)
{
    char path[PATH_MAX];
    uv_connect_t *req;

    if (l->sb == NULL || l->conn != NULL || l->connecting != NULL)
        return;
    if (l->sb->pid <= 0 || l->sb->destroying)
        return;
    l->connecting = malloc(sizeof(*l->connecting));
    req = malloc(sizeof(*req));
    if (l->connecting == NULL || req == NULL) {
        free(l->connecting);
        free(req);
        l->connecting = NULL;
        return;
    }
    uv_pipe_init(l->sb->agent->loop, l->connecting, 0);
    req->data = l;
    snprintf(path, sizeof(path), "%s/guest.sock", l->sb->dir);
    uv_pipe_connect(req, l->connecting, path, on_link_connect);
}

static void
on_retry_timer(uv_timer_t *t)
{
    link_try(t->data);
}

int
relay_guest_connect(struct sandbox *sb)
{
    struct guest_link *l = sb->guest;

    if (l == NULL) {
        l = calloc(1, sizeof(*l));
        if (l == NULL)
            return -ENOMEM;
        l->sb = sb;
        l->retry = malloc(sizeof(*l->retry));
        if (l->retry == NULL) {
            free(l);
            return -ENOMEM;
        }
        uv_timer_init(sb->agent->loop, l->retry);
        l->retry->data = l;
        sb->guest = l;
    }
    uv_timer_start(l->retry, on_retry_timer, 0, 0);
    return 0;
}

void
relay_guest_close(struct sandbox *sb, const char *why)
{
    struct guest_link *l = sb->guest;

    if (l == NULL)
        return;
    sb->guest = NULL;
    sb->guest_ready = false;
    l->sb = NULL;
    fail_relays(l, why);
    if (l->retry != NULL)
        uv_close((uv_handle_t *)l->retry, on_retry_closed);
    if (l->conn != NULL)
        pd_conn_close(l->conn, 0, "%s", why);
    /* The last of retry, connect and conn callbacks frees l. */
}

int
relay_guest_shutdown(struct sandbox *sb)
{
    struct guest_link *l = sb->guest;
    struct pd_enc e;

    if (l == NULL || l->conn == NULL)
        return -ENOTCONN;
    pd_enc_begin(&e, PD_MSG_SHUTDOWN, pd_conn_next_id(l->conn));
    return pd_conn_send(l->conn, &e);
}
