#include "node-agent/session.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "proto/msgtypes.h"

#define MAX_ADDRS 16
#define MISSED_BEATS 5

struct agent_session {
    uv_loop_t *loop;
    struct agent_session_cb cb;
    void *arg;
    char node[PD_ID_MAX + 1];
    SSL_CTX *tls;
    struct sockaddr_storage addrs[MAX_ADDRS];
    char addr_text[MAX_ADDRS][64];
    size_t naddrs;
    size_t next;             /* next address in the rotation */
    struct sockaddr_storage redirect;
    char redirect_text[64];
    bool have_redirect;
    unsigned redirects;      /* in a row, without registering */

    uv_timer_t retry;        /* back-off before the next attempt */
    uv_timer_t beat;         /* heartbeats */
    uv_tcp_t *connecting;    /* TCP handle while connecting */
    struct pd_conn *conn;
    char peer[64];
    uint64_t register_id;
    bool registered;
    uint64_t heartbeat_ms;
    uint64_t default_hb_ms;
    uint64_t last_ack_ms;
    uint64_t backoff_ms;
    uint64_t backoff_min, backoff_max;
    bool stopping;
    int open_handles;        /* timers still to close when stopping */
};

struct connect_req {
    uv_connect_t req;
    struct agent_session *s;
};

static void try_connect(struct agent_session *s);

/* Drops one of the references that stop waits for; frees at zero. */
static void
release(struct agent_session *s)
{
    if (--s->open_handles == 0)
        free(s);
}

int
agent_parse_addr(const char *text, struct sockaddr_storage *out)
{
    char host[64];
    const char *colon;
    uint64_t port;
    size_t hl;

    memset(out, 0, sizeof(*out));
    if (text[0] == '[') {
        const char *end = strchr(text, ']');

        if (end == NULL || end[1] != ':')
            return -EINVAL;
        hl = (size_t)(end - text - 1);
        if (hl >= sizeof(host))
            return -EINVAL;
        memcpy(host, text + 1, hl);
        host[hl] = '\0';
        colon = end + 1;
    } else {
        colon = strrchr(text, ':');
        if (colon == NULL)
            return -EINVAL;
        hl = (size_t)(colon - text);
        if (hl == 0 || hl >= sizeof(host))
            return -EINVAL;
        memcpy(host, text, hl);
        host[hl] = '\0';
    }
    if (pd_parse_u64(colon + 1, &port) != 0 || port == 0 || port > 65535)
        return -EINVAL;
    if (strcmp(host, "localhost") == 0)
        strcpy(host, "127.0.0.1");
    if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)out) == 0)
        return 0;
    if (uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)out) == 0)
        return 0;
    return -EINVAL;
}

static void
on_retry_timer(uv_timer_t *t)
{
    try_connect(t->data);
}

static void
schedule_retry(struct agent_session *s, bool now)
{
    uint64_t delay = 0, jitter = 0;

    if (s->stopping)
        return;
    if (!now) {
        delay = s->backoff_ms;
        pd_random_bytes(&jitter, sizeof(jitter));
        delay += jitter % (delay / 4 + 1);
        s->backoff_ms *= 2;
        if (s->backoff_ms > s->backoff_max)
            s->backoff_ms = s->backoff_max;
    }
    uv_timer_start(&s->retry, on_retry_timer, delay, 0);
}

static void
send_register(struct agent_session *s)
{
    struct pd_enc e;

    s->register_id = pd_conn_next_id(s->conn);
    pd_enc_begin(&e, PD_MSG_NODE_REGISTER, s->register_id);
    pd_enc_str(&e, "node", s->node);
    s->cb.fill_register(s->arg, &e);
    if (pd_conn_send(s->conn, &e) != 0)
        pd_conn_close(s->conn, -EIO, "cannot send NODE_REGISTER");
}

static void
on_beat(uv_timer_t *t)
{
    struct agent_session *s = t->data;
    struct pd_enc e;

    if (s->conn == NULL || !s->registered)
        return;
    if (pd_now_ms() - s->last_ack_ms > MISSED_BEATS * s->heartbeat_ms) {
        pd_warn("session", "leader %s silent for %d heartbeats, reconnecting",
                s->peer, MISSED_BEATS);
        pd_conn_close(s->conn, -ETIMEDOUT, "heartbeats unanswered");
        return;
    }
    pd_enc_begin(&e, PD_MSG_NODE_HEARTBEAT, pd_conn_next_id(s->conn));
    pd_enc_str(&e, "node", s->node);
    s->cb.fill_heartbeat(s->arg, &e);
    pd_conn_send(s->conn, &e);
}

static void
on_redirect(struct agent_session *s, const struct pd_msg *m)
{
    char leader[64] = "";

    pd_msg_cstr(m, "leader_addr", leader, sizeof(leader));
    s->registered = false;
    if (leader[0] == '\0' || ++s->redirects > AGENT_SESSION_MAX_REDIRECTS ||
        agent_parse_addr(leader, &s->redirect) != 0) {
        pd_info("session", "%s redirected us to \"%s\", backing off",
                s->peer, leader);
        s->have_redirect = false;
        pd_conn_close(s->conn, -EAGAIN, "redirect without usable leader");
        return;
    }
    pd_info("session", "%s is not the leader, following it to %s", s->peer,
            leader);
    pd_strlcpy(s->redirect_text, leader, sizeof(s->redirect_text));
    s->have_redirect = true;
    pd_conn_close(s->conn, 0, "redirected to %s", leader);
}

static void
on_msg(struct pd_conn *c, const struct pd_msg *m)
{
    struct agent_session *s = pd_conn_data(c);
    uint64_t hb;
    char msg[256] = "";

    switch (m->type) {
    case PD_MSG_HELLO:
        if (strcmp(pd_conn_peer_role(c), "scheduler") != 0) {
            pd_conn_close(c, -EPROTO, "peer says it is a \"%s\"",
                          pd_conn_peer_role(c));
        }
        return;
    case PD_MSG_OK:
        s->last_ack_ms = pd_now_ms();
        if (m->id != s->register_id || s->registered)
            return;
        s->registered = true;
        s->redirects = 0;
        s->backoff_ms = s->backoff_min;
        s->heartbeat_ms = s->default_hb_ms;
        if (pd_msg_u64(m, "heartbeat_ms", &hb) == 0 && hb >= 50 &&
            hb <= 60000)
            s->heartbeat_ms = hb;
        pd_info("session", "registered with leader %s (%s), heartbeat %llu ms",
                s->peer, pd_conn_peer_name(c),
                (unsigned long long)s->heartbeat_ms);
        uv_timer_start(&s->beat, on_beat, s->heartbeat_ms, s->heartbeat_ms);
        return;
    case PD_MSG_NODE_REDIRECT:
        on_redirect(s, m);
        return;
    case PD_MSG_ERROR:
        pd_msg_cstr(m, "message", msg, sizeof(msg));
        if (m->id == s->register_id && !s->registered) {
            pd_warn("session", "%s refused our registration: %s; retrying",
                    s->peer, msg);
            pd_conn_close(c, -EPERM, "registration refused");
        } else {
            pd_debug("session", "%s: error for request %llu: %s", s->peer,
                     (unsigned long long)m->id, msg);
        }
        return;
    default:
        if (m->type >= 100 && m->type < 300) {
            s->cb.on_request(s->arg, c, m);
            return;
        }
        pd_debug("session", "%s sent %s, ignoring", s->peer,
                 pd_msg_type_name(m->type));
    }
}

static void
on_close(struct pd_conn *c, int reason)
{
    struct agent_session *s = pd_conn_data(c);
    bool was = s->registered;

    if (s->cb.on_conn_closed != NULL)
        s->cb.on_conn_closed(s->arg, c);
    s->conn = NULL;
    s->registered = false;
    uv_timer_stop(&s->beat);
    if (s->stopping) {
        release(s);
        return;
    }
    if (was || reason != 0)
        pd_info("session", "connection to %s ended (%s), reconnecting",
                s->peer, pd_conn_error(c)[0] ? pd_conn_error(c) : "closed");
    schedule_retry(s, reason == 0 && s->have_redirect);
}

static void
free_tcp(uv_handle_t *h)
{
    free(h);
}

static void
on_connect(uv_connect_t *req, int status)
{
    struct connect_req *cr = (struct connect_req *)req;
    struct agent_session *s = cr->s;
    uv_tcp_t *tcp = (uv_tcp_t *)req->handle;
    static const struct pd_conn_cb cb = {
        .on_msg = on_msg,
        .on_close = on_close,
    };
    struct pd_conn_opts o = {
        .role = "agent",
        .name = s->node,
        .tls = s->tls,
        .tls_server = false,
        .subject = "session",
    };

    free(cr);
    if (s->stopping) {
        release(s);
        return;
    }
    s->connecting = NULL;
    if (status < 0) {
        if (status != UV_ECANCELED) {
            pd_debug("session", "connect to %s: %s", s->peer,
                     uv_strerror(status));
            uv_close((uv_handle_t *)tcp, free_tcp);
            schedule_retry(s, false);
        }
        return;
    }
    uv_tcp_nodelay(tcp, 1);
    s->conn = pd_conn_new((uv_stream_t *)tcp, &o, &cb, s);
    if (s->conn == NULL) {
        schedule_retry(s, false);
        return;
    }
    s->last_ack_ms = pd_now_ms();
    send_register(s);
}

static void
try_connect(struct agent_session *s)
{
    const struct sockaddr *sa;
    struct connect_req *cr;
    uv_tcp_t *tcp;
    int rv;

    if (s->stopping || s->conn != NULL || s->connecting != NULL)
        return;
    if (s->have_redirect) {
        s->have_redirect = false;
        sa = (const struct sockaddr *)&s->redirect;
        pd_strlcpy(s->peer, s->redirect_text, sizeof(s->peer));
    } else {
        sa = (const struct sockaddr *)&s->addrs[s->next];
        pd_strlcpy(s->peer, s->addr_text[s->next], sizeof(s->peer));
        s->next = (s->next + 1) % s->naddrs;
    }
    tcp = malloc(sizeof(*tcp));
    cr = malloc(sizeof(*cr));
    if (tcp == NULL || cr == NULL) {
        free(tcp);
        free(cr);
        schedule_retry(s, false);
        return;
    }
    uv_tcp_init(s->loop, tcp);
    cr->s = s;
    rv = uv_tcp_connect(&cr->req, tcp, sa, on_connect);
    if (rv != 0) {
        pd_debug("session", "connect to %s: %s", s->peer, uv_strerror(rv));
        free(cr);
        uv_close((uv_handle_t *)tcp, free_tcp);
        schedule_retry(s, false);
        return;
    }
    s->connecting = tcp;
}

int
agent_session_start(uv_loop_t *loop, const struct agent_session_cfg *cfg,
                    const struct agent_session_cb *cb, void *arg,
                    struct agent_session **out, char *err, size_t errlen)
{
    struct agent_session *s;
    const char *p = cfg->addrs;

    *out = NULL;
    if (p == NULL || *p == '\0')
        return 0;
    s = calloc(1, sizeof(*s));
    if (s == NULL)
        return -ENOMEM;
    while (*p != '\0') {
        size_t n = strcspn(p, ",");
        char one[64];

        if (n == 0 || n >= sizeof(one) || s->naddrs == MAX_ADDRS) {
            snprintf(err, errlen, "schedulers: bad address list \"%s\"",
                     cfg->addrs);
            free(s);
            return -EINVAL;
        }
        memcpy(one, p, n);
        one[n] = '\0';
        if (agent_parse_addr(one, &s->addrs[s->naddrs]) != 0) {
            snprintf(err, errlen,
                     "schedulers: \"%s\" is not host:port (numeric IP or "
                     "localhost)",
                     one);
            free(s);
            return -EINVAL;
        }
        pd_strlcpy(s->addr_text[s->naddrs++], one, 64);
        p += n;
        if (*p == ',')
            p++;
    }
    s->loop = loop;
    s->cb = *cb;
    s->arg = arg;
    s->tls = cfg->tls;
    pd_strlcpy(s->node, cfg->node, sizeof(s->node));
    s->default_hb_ms = cfg->heartbeat_ms ? cfg->heartbeat_ms : 1000;
    s->heartbeat_ms = s->default_hb_ms;
    s->backoff_min = cfg->backoff_min_ms ? cfg->backoff_min_ms : 100;
    s->backoff_max = cfg->backoff_max_ms ? cfg->backoff_max_ms : 5000;
    s->backoff_ms = s->backoff_min;
    uv_timer_init(loop, &s->retry);
    uv_timer_init(loop, &s->beat);
    s->retry.data = s;
    s->beat.data = s;
    s->open_handles = 2;
    *out = s;
    try_connect(s);
    return 0;
}

void
agent_session_report(struct agent_session *s, const char *sandbox,
                     const char *state, const char *reason)
{
    struct pd_enc e;

    /* NODE_REGISTER goes first on every connection, so a report sent
     * before its OK arrives follows it in order; dropping it instead would
     * leave the leader with the state the registration carried. */
    if (s == NULL || s->conn == NULL)
        return;
    pd_enc_begin(&e, PD_MSG_SANDBOX_STATE, pd_conn_next_id(s->conn));
    pd_enc_str(&e, "node", s->node);
    pd_enc_str(&e, "sandbox", sandbox);
    pd_enc_str(&e, "state", state);
    pd_enc_str(&e, "reason", reason ? reason : "");
    pd_conn_send(s->conn, &e);
}

bool
agent_session_registered(const struct agent_session *s)
{
    return s != NULL && s->registered;
}

const char *
agent_session_peer(const struct agent_session *s)
{
    return s != NULL && s->conn != NULL ? s->peer : "";
}

static void
on_timer_closed(uv_handle_t *h)
{
    release(h->data);
}

void
agent_session_stop(struct agent_session *s)
{
    if (s == NULL || s->stopping)
        return;
    s->stopping = true;
    if (s->connecting != NULL) {
        /* The pending connect completes with UV_ECANCELED. */
        s->open_handles++;
        uv_close((uv_handle_t *)s->connecting, free_tcp);
        s->connecting = NULL;
    }
    if (s->conn != NULL) {
        s->open_handles++;
        pd_conn_close(s->conn, 0, "agent stopping");
    }
    uv_close((uv_handle_t *)&s->retry, on_timer_closed);
    uv_close((uv_handle_t *)&s->beat, on_timer_closed);
}
