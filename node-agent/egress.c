#include "node-agent/egress.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "common/log.h"
#include "common/util.h"

#define HEAD_MAX (16u << 10)
#define BUF_MAX (64u << 10)
#define QUEUE_HIGH (1u << 20)
#define READ_CHUNK (64u << 10)

static uint64_t stat_requests, stat_denied;

struct cred;

enum px_state { PX_HEAD, PX_RESOLVE, PX_CONNECT, PX_PIPE, PX_DONE };

struct pxconn {
    uv_loop_t *loop;
    uv_stream_t *client;
    uv_tcp_t *up;
    uv_getaddrinfo_t gai;
    uv_connect_t creq;
    enum px_state st;
    bool persistent;
    bool closing;
    bool client_paused;  /* client reads stopped for backpressure */
    bool up_paused;
    int refs;
    char sandbox[PD_ID_MAX + 1];
    char *allow;
    char buf[BUF_MAX];   /* request head, then early bytes after it */
    size_t len;
    size_t head_end;     /* bytes of the parsed head in buf */
    bool is_connect;
    char host[256];
    unsigned port;
    char *out;           /* rewritten head for plain HTTP */
    const struct cred *cred; /* header to add upstream (tokens), or NULL */
    size_t outlen;
    /* The listener that accepted it, until that one goes. */
    const struct agent_egress_listener *owner;
    struct pxconn *prev, *next; /* all_px */
};

/* Every connection being served, so a listener that goes can end the
 * persistent stream it accepted (it never ends on its own). */
static struct pxconn *all_px;

struct agent_egress_listener {
    uv_loop_t *loop;
    union {
        uv_pipe_t pipe;
        uv_tcp_t tcp;
    } h;
    bool is_pipe;
    char sandbox[PD_ID_MAX + 1];
    char *allow;
};

struct pxwrite {
    uv_write_t req;
    struct pxconn *px;
    char *data;
};

static void client_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b);
static void up_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b);
static void try_head(struct pxconn *px);

/* ---- allow list -------------------------------------------------------- */

static bool
host_eq(const char *a, size_t alen, const char *b)
{
    return strlen(b) == alen && strncasecmp(a, b, alen) == 0;
}

bool
agent_egress_allowed(const char *allow, const char *host, unsigned port)
{
    const char *p = allow;

    if (allow == NULL || host == NULL || *host == '\0')
        return false;
    while (*p != '\0') {
        size_t n = strcspn(p, ",");
        const char *entry = p, *colon;
        size_t hlen = n;
        bool port_ok;

        while (hlen > 0 && *entry == ' ') {
            entry++;
            hlen--;
        }
        colon = memchr(entry, ':', hlen);
        if (colon != NULL) {
            char num[8] = "";
            size_t nl = hlen - (size_t)(colon - entry) - 1;

            if (nl < sizeof(num))
                memcpy(num, colon + 1, nl);
            port_ok = nl > 0 && nl < sizeof(num) &&
                      strtoul(num, NULL, 10) == port;
            hlen = (size_t)(colon - entry);
        } else {
            port_ok = port == 80 || port == 443;
        }
        if (port_ok) {
            if (hlen > 2 && entry[0] == '*' && entry[1] == '.') {
                size_t sl = hlen - 1; /* ".domain" */
                size_t hl = strlen(host);

                if (hl > sl && strncasecmp(host + hl - sl, entry + 1, sl) == 0)
                    return true;
            } else if (host_eq(entry, hlen, host)) {
                return true;
            }
        }
        p += n;
        if (*p == ',')
            p++;
    }
    return false;
}

/* ---- sandbox tokens and upstream credentials (added by tokens) --------- */

/*
 * A sandbox with an allow list gets a sandbox-scoped token in its
 * environment (PADDOCK_TOKEN, minted by the leader at create). The guest
 * presents it as "Proxy-Authorization: Bearer <token>"; the proxy accepts
 * it only when it is exactly the token the scheduler handed this agent for
 * this sandbox (over mutual TLS, in SANDBOX_CREATE, compared in constant
 * time), it has not expired, and its jti is not in the revoked set that
 * the leader pushes (TOKEN_REVOKE, and the whole set at registration).
 * No signature check is needed: the agent never trusts a token it was not
 * given. A presented token that fails any check is a 407 for that request,
 * CONNECT included, so a revoked token stops working at once.
 *
 * Credentials: the operator lists, in the file named by
 * PADDOCK_EGRESS_CREDENTIALS (mode 0600, read once), lines of
 *     host Header-Name: value
 * For a plain-HTTP request to such a host with a valid token, the proxy
 * adds that header (replacing any the guest sent), so the sandbox uses the
 * credential without ever seeing it; without a valid token it answers
 * 407. CONNECT tunnels are opaque (TLS), so no header can be added there.
 */
#define TOKEN_MAX 4096
#define REVOKED_MAX 100000

struct sbtoken {
    char sandbox[PD_ID_MAX + 1];
    char *token;
    char jti[64];
    uint64_t exp_s;
    struct sbtoken *next;
};

struct revoked {
    char jti[64];
    uint64_t exp_s;
};

struct cred {
    char host[256];
    char *header;    /* "Name: value" */
    size_t name_len; /* of "Name" */
    struct cred *next;
};

static struct sbtoken *sbtokens;
static struct revoked *revoked_v;
static size_t revoked_n, revoked_cap;
static struct cred *creds;
static bool creds_loaded;
static uint64_t stat_token_refused;

static int
b64url_val(char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '-')
        return 62;
    if (c == '_')
        return 63;
    return -1;
}

/* Decodes unpadded base64url; the length, or -1. */
static long
b64url_decode(const char *in, size_t len, char *out, size_t outlen)
{
    uint32_t acc = 0;
    size_t o = 0;
    int bits = 0;

    for (size_t i = 0; i < len; i++) {
        int v = b64url_val(in[i]);

        if (v < 0)
            return -1;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (o >= outlen)
                return -1;
            out[o++] = (char)((acc >> bits) & 0xff);
        }
    }
    return (long)o;
}

/* jti and exp of a token's payload (the agent only reads what it was
 * given by the scheduler). */
static int
token_claims(const char *token, char *jti, size_t jtilen, uint64_t *exp_s)
{
    const char *d1 = strchr(token, '.'), *d2;
    char buf[2048];
    json_t *j;
    long n;
    int rv = -EINVAL;

    if (d1 == NULL || (d2 = strchr(d1 + 1, '.')) == NULL)
        return -EINVAL;
    n = b64url_decode(d1 + 1, (size_t)(d2 - d1 - 1), buf, sizeof(buf));
    if (n < 0 || (j = json_loadb(buf, (size_t)n, 0, NULL)) == NULL)
        return -EINVAL;
    if (json_is_string(json_object_get(j, "jti")) &&
        json_is_integer(json_object_get(j, "exp")) &&
        json_integer_value(json_object_get(j, "exp")) > 0) {
        pd_strlcpy(jti, json_string_value(json_object_get(j, "jti")),
                   jtilen);
        *exp_s = (uint64_t)json_integer_value(json_object_get(j, "exp"));
        rv = 0;
    }
    json_decref(j);
    return rv;
}

int
agent_egress_set_token(const char *sandbox, const char *token)
{
    struct sbtoken **pp, *t;
    char jti[64];
    uint64_t exp_s = 0;

    for (pp = &sbtokens; *pp != NULL; pp = &(*pp)->next) {
        if (strcmp((*pp)->sandbox, sandbox) == 0) {
            t = *pp;
            *pp = t->next;
            explicit_bzero(t->token, strlen(t->token));
            free(t->token);
            free(t);
            break;
        }
    }
    if (token == NULL || token[0] == '\0')
        return 0;
    if (strlen(token) > TOKEN_MAX ||
        token_claims(token, jti, sizeof(jti), &exp_s) != 0)
        return -EINVAL;
    t = calloc(1, sizeof(*t));
    if (t == NULL || (t->token = strdup(token)) == NULL) {
        free(t);
        return -ENOMEM;
    }
    pd_strlcpy(t->sandbox, sandbox, sizeof(t->sandbox));
    pd_strlcpy(t->jti, jti, sizeof(t->jti));
    t->exp_s = exp_s;
    t->next = sbtokens;
    sbtokens = t;
    return 0;
}

static bool
is_revoked(const char *jti)
{
    for (size_t i = 0; i < revoked_n; i++)
        if (strcmp(revoked_v[i].jti, jti) == 0)
            return true;
    return false;
}

int
agent_egress_revoke(const char *jti, uint64_t exp_s)
{
    uint64_t now = pd_wall_ms() / 1000;
    size_t i, k = 0;

    if (jti == NULL || jti[0] == '\0' || strlen(jti) >= 64)
        return -EINVAL;
    if (is_revoked(jti))
        return 0;
    /* Expired entries go: an expired token is refused anyway. */
    for (i = 0; i < revoked_n; i++)
        if (revoked_v[i].exp_s == 0 || revoked_v[i].exp_s + 60 > now)
            revoked_v[k++] = revoked_v[i];
    revoked_n = k;
    if (exp_s != 0 && exp_s + 60 <= now)
        return 0;
    if (revoked_n == revoked_cap) {
        size_t cap = revoked_cap ? revoked_cap * 2 : 64;
        struct revoked *v;

        if (cap > REVOKED_MAX)
            return -ENOSPC;
        v = realloc(revoked_v, cap * sizeof(*v));
        if (v == NULL)
            return -ENOMEM;
        revoked_v = v;
        revoked_cap = cap;
    }
    pd_strlcpy(revoked_v[revoked_n].jti, jti, sizeof(revoked_v[0].jti));
    revoked_v[revoked_n].exp_s = exp_s;
    revoked_n++;
    pd_info("egress", "token %s revoked; the proxy refuses it from now on",
            jti);
    return 0;
}

static bool
ct_streq(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    unsigned char d = la != lb;

    for (size_t i = 0; i < la && i < lb; i++)
        d |= (unsigned char)(a[i] ^ b[i]);
    return d == 0;
}

/* NULL when the sandbox's token is good, else why not. */
static const char *
token_check(const char *sandbox, const char *token)
{
    struct sbtoken *t;

    for (t = sbtokens; t != NULL; t = t->next)
        if (strcmp(t->sandbox, sandbox) == 0)
            break;
    if (t == NULL || !ct_streq(t->token, token))
        return "not this sandbox's token";
    if (pd_wall_ms() / 1000 >= t->exp_s)
        return "token expired";
    if (is_revoked(t->jti))
        return "token revoked";
    return NULL;
}

static void
creds_load(void)
{
    const char *path = getenv("PADDOCK_EGRESS_CREDENTIALS");
    struct stat st;
    char line[8192];
    FILE *f;

    creds_loaded = true;
    if (path == NULL || path[0] == '\0')
        return;
    f = fopen(path, "r");
    if (f == NULL) {
        pd_log_errno(PD_LOG_WARN, errno, "egress", "cannot read %s; no "
                     "credentials are injected", path);
        return;
    }
    if (fstat(fileno(f), &st) != 0 || (st.st_mode & 077) != 0) {
        pd_warn("egress", "%s is readable by group or others; no "
                "credentials are injected", path);
        fclose(f);
        return;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        char *sp, *colon, *end = line + strcspn(line, "\r\n");
        struct cred *c;

        *end = '\0';
        if (line[0] == '#' || line[0] == '\0')
            continue;
        sp = strchr(line, ' ');
        colon = sp ? strchr(sp + 1, ':') : NULL;
        if (sp == NULL || colon == NULL || (size_t)(sp - line) >= 256 ||
            colon == sp + 1) {
            pd_warn("egress", "%s: a line is not \"host Name: value\", "
                    "ignoring it", path);
            continue;
        }
        c = calloc(1, sizeof(*c));
        if (c == NULL || (c->header = strdup(sp + 1)) == NULL) {
            free(c);
            break;
        }
        memcpy(c->host, line, (size_t)(sp - line));
        c->name_len = (size_t)(colon - sp - 1);
        c->next = creds;
        creds = c;
    }
    fclose(f);
}

static const struct cred *
cred_for(const char *host)
{
    if (!creds_loaded)
        creds_load();
    for (const struct cred *c = creds; c != NULL; c = c->next)
        if (strcasecmp(c->host, host) == 0)
            return c;
    return NULL;
}

/* The bearer token of a Proxy-Authorization line in [h, end), or NULL;
 * copied into out. */
static const char *
proxy_bearer(const char *h, const char *end, char *out, size_t outlen)
{
    static const char name[] = "proxy-authorization:";

    for (const char *l = h; l < end;) {
        const char *nl = memchr(l, '\n', (size_t)(end - l));
        size_t ll = nl ? (size_t)(nl - l) : (size_t)(end - l);

        if (ll > sizeof(name) - 1 &&
            strncasecmp(l, name, sizeof(name) - 1) == 0) {
            const char *v = l + sizeof(name) - 1, *ve = l + ll;

            while (v < ve && (*v == ' ' || *v == '\t'))
                v++;
            while (ve > v && (ve[-1] == '\r' || ve[-1] == ' '))
                ve--;
            if ((size_t)(ve - v) > 7 && strncasecmp(v, "Bearer ", 7) == 0 &&
                (size_t)(ve - v - 7) < outlen) {
                memcpy(out, v + 7, (size_t)(ve - v - 7));
                out[ve - v - 7] = '\0';
                return out;
            }
            return "";
        }
        l += ll + 1;
    }
    return NULL;
}

uint64_t
agent_egress_token_refused(void)
{
    return stat_token_refused;
}

/* ---- connection life --------------------------------------------------- */

static void
unref(struct pxconn *px)
{
    if (--px->refs > 0)
        return;
    if (px->prev != NULL)
        px->prev->next = px->next;
    else if (all_px == px)
        all_px = px->next;
    if (px->next != NULL)
        px->next->prev = px->prev;
    free(px->allow);
    free(px->out);
    free(px);
}

static void
on_handle_closed(uv_handle_t *h)
{
    struct pxconn *px = h->data;

    if ((uv_stream_t *)h == px->client)
        px->client = NULL;
    if ((uv_tcp_t *)h == px->up)
        px->up = NULL;
    free(h);
    unref(px);
}

static void
px_close(struct pxconn *px)
{
    if (px->closing)
        return;
    px->closing = true;
    px->st = PX_DONE;
    if (px->client != NULL && !uv_is_closing((uv_handle_t *)px->client))
        uv_close((uv_handle_t *)px->client, on_handle_closed);
    if (px->up != NULL && !uv_is_closing((uv_handle_t *)px->up))
        uv_close((uv_handle_t *)px->up, on_handle_closed);
}

static void
on_client_shutdown(uv_shutdown_t *req, int status)
{
    struct pxconn *px = req->data;

    (void)status;
    free(req);
    px_close(px);
    unref(px);
}

/* Ends the connection after the replies queued to the client are sent
 * (uv_close alone would drop them). */
static void
px_finish(struct pxconn *px)
{
    uv_shutdown_t *req;

    if (px->closing || px->st == PX_DONE)
        return;
    px->st = PX_DONE;
    if (px->up != NULL && !uv_is_closing((uv_handle_t *)px->up))
        uv_close((uv_handle_t *)px->up, on_handle_closed);
    if (px->client == NULL) {
        px_close(px);
        return;
    }
    uv_read_stop(px->client);
    req = malloc(sizeof(*req));
    if (req == NULL) {
        px_close(px);
        return;
    }
    req->data = px;
    px->refs++;
    if (uv_shutdown(req, px->client, on_client_shutdown) != 0) {
        free(req);
        px->refs--;
        px_close(px);
    }
}

static void
alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)h;
    (void)suggested;
    buf->base = malloc(READ_CHUNK);
    buf->len = buf->base ? READ_CHUNK : 0;
}

static void
on_written(uv_write_t *req, int status)
{
    struct pxwrite *w = (struct pxwrite *)req;
    struct pxconn *px = w->px;
    uv_stream_t *dst = req->handle;

    free(w->data);
    free(w);
    if (status < 0) {
        if (status != UV_ECANCELED)
            px_close(px);
        unref(px);
        return;
    }
    /* The other side may read again once this side has drained. */
    if (!px->closing && uv_stream_get_write_queue_size(dst) < QUEUE_HIGH) {
        if (dst == (uv_stream_t *)px->up && px->client_paused) {
            px->client_paused = false;
            uv_read_start(px->client, alloc_cb, client_read);
        } else if (dst == px->client && px->up_paused && px->up != NULL) {
            px->up_paused = false;
            uv_read_start((uv_stream_t *)px->up, alloc_cb, up_read);
        }
    }
    unref(px);
}

/* Writes data (ownership taken) to dst. */
static int
px_write(struct pxconn *px, uv_stream_t *dst, char *data, size_t len)
{
    struct pxwrite *w = malloc(sizeof(*w));
    uv_buf_t b;

    if (w == NULL) {
        free(data);
        return -ENOMEM;
    }
    w->px = px;
    w->data = data;
    b = uv_buf_init(data, (unsigned)len);
    if (uv_write(&w->req, dst, &b, 1, on_written) != 0) {
        free(data);
        free(w);
        return -EPIPE;
    }
    px->refs++;
    return 0;
}

static int
px_write_copy(struct pxconn *px, uv_stream_t *dst, const void *data,
              size_t len)
{
    char *copy;

    if (len == 0)
        return 0;
    copy = malloc(len);
    if (copy == NULL)
        return -ENOMEM;
    memcpy(copy, data, len);
    return px_write(px, dst, copy, len);
}

/* Ends the current exchange: the next request, or the end. */
static void
exchange_done(struct pxconn *px)
{
    if (!px->persistent || px->client == NULL) {
        px_finish(px);
        return;
    }
    free(px->out);
    px->out = NULL;
    px->st = PX_HEAD;
    if (px->client_paused) {
        px->client_paused = false;
        uv_read_start(px->client, alloc_cb, client_read);
    }
    try_head(px);
}

static void
reply(struct pxconn *px, int code, const char *text, const char *body)
{
    char msg[512];
    int n;

    if (code == 403)
        stat_denied++;
    pd_debug("egress", "sandbox %s: %d %s for %s:%u", px->sandbox, code,
             text, px->host, px->port);
    n = snprintf(msg, sizeof(msg),
                 "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\n"
                 "Content-Length: %zu\r\nConnection: close\r\n\r\n%s",
                 code, text, strlen(body), body);
    if (px->client != NULL)
        px_write_copy(px, px->client, msg, (size_t)n);
    /* The refused head is consumed, or a persistent stream would parse
     * it again, and again; what follows it is the next request. Without
     * a complete head (too large) there is nothing to resync on. */
    if (px->head_end > 0 && px->head_end <= px->len) {
        memmove(px->buf, px->buf + px->head_end, px->len - px->head_end);
        px->len -= px->head_end;
    } else {
        px->len = 0;
    }
    px->head_end = 0;
    exchange_done(px);
}

/* ---- piping ------------------------------------------------------------ */

static void
on_up_closed(uv_handle_t *h)
{
    struct pxconn *px = h->data;

    free(h);
    px->up = NULL;
    px->up_paused = false;
    if (!px->closing)
        exchange_done(px);
    unref(px);
}

static void
up_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
    struct pxconn *px = s->data;

    if (n < 0 || px->client == NULL || px->closing) {
        free(b->base);
        if (!px->closing && !uv_is_closing((uv_handle_t *)s)) {
            if (px->persistent)
                uv_close((uv_handle_t *)s, on_up_closed);
            else
                px_finish(px);
        }
        return;
    }
    if (n == 0) {
        free(b->base);
        return;
    }
    if (px_write(px, px->client, b->base, (size_t)n) != 0) {
        px_close(px);
        return;
    }
    if (uv_stream_get_write_queue_size(px->client) >= QUEUE_HIGH) {
        px->up_paused = true;
        uv_read_stop(s);
    }
}

static void
on_up_connected(uv_connect_t *req, int status)
{
    struct pxconn *px = req->data;
    size_t extra;

    if (px->closing) {
        unref(px);
        return;
    }
    if (status < 0) {
        uv_close((uv_handle_t *)px->up, on_handle_closed);
        px->up = NULL;
        /* The request's reference keeps px alive through reply(). */
        reply(px, 502, "Bad Gateway", "paddock egress: upstream refused\n");
        unref(px);
        return;
    }
    px->st = PX_PIPE;
    stat_requests++;
    extra = px->len - px->head_end;
    if (px->is_connect) {
        static const char ok[] = "HTTP/1.1 200 Connection established\r\n\r\n";

        px_write_copy(px, px->client, ok, sizeof(ok) - 1);
    } else {
        px_write(px, (uv_stream_t *)px->up, px->out, px->outlen);
        px->out = NULL;
    }
    px_write_copy(px, (uv_stream_t *)px->up, px->buf + px->head_end, extra);
    px->len = 0;
    px->head_end = 0;
    uv_read_start((uv_stream_t *)px->up, alloc_cb, up_read);
    if (px->client_paused) {
        px->client_paused = false;
        uv_read_start(px->client, alloc_cb, client_read);
    }
    unref(px);
}

static void
on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    struct pxconn *px = req->data;

    if (px->closing) {
        uv_freeaddrinfo(res);
        unref(px);
        return;
    }
    if (status < 0 || res == NULL) {
        uv_freeaddrinfo(res);
        reply(px, 502, "Bad Gateway", "paddock egress: cannot resolve\n");
        unref(px);
        return;
    }
    px->up = malloc(sizeof(*px->up));
    if (px->up == NULL) {
        uv_freeaddrinfo(res);
        reply(px, 502, "Bad Gateway", "paddock egress: out of memory\n");
        unref(px);
        return;
    }
    uv_tcp_init(px->loop, px->up);
    px->up->data = px;
    px->refs++; /* the handle */
    px->creq.data = px;
    px->st = PX_CONNECT;
    if (uv_tcp_connect(&px->creq, px->up, res->ai_addr, on_up_connected) !=
        0) {
        uv_freeaddrinfo(res);
        px->refs++;
        on_up_connected(&px->creq, UV_ECONNREFUSED);
        unref(px);
        return;
    }
    uv_freeaddrinfo(res);
    /* The resolve reference now belongs to the connect request. */
}

/* ---- request head ------------------------------------------------------ */

static bool
valid_host(const char *h)
{
    if (*h == '\0' || strlen(h) > 253)
        return false;
    for (; *h; h++) {
        if (!isalnum((unsigned char)*h) && *h != '.' && *h != '-')
            return false;
    }
    return true;
}

/* Splits "host:port" (port required) or "host" with a default port. */
static int
split_hostport(const char *s, size_t len, unsigned dflt, char *host,
               size_t hostlen, unsigned *port)
{
    const char *colon = memchr(s, ':', len);
    size_t hl = colon ? (size_t)(colon - s) : len;
    char num[8];
    uint64_t p = dflt;

    if (hl == 0 || hl >= hostlen)
        return -EINVAL;
    memcpy(host, s, hl);
    host[hl] = '\0';
    if (colon != NULL) {
        size_t nl = len - hl - 1;

        if (nl == 0 || nl >= sizeof(num))
            return -EINVAL;
        memcpy(num, colon + 1, nl);
        num[nl] = '\0';
        if (pd_parse_u64(num, &p) != 0 || p == 0 || p > 65535)
            return -EINVAL;
    } else if (dflt == 0) {
        return -EINVAL;
    }
    *port = (unsigned)p;
    return valid_host(host) ? 0 : -EINVAL;
}

static bool
drop_header(const char *line, size_t len)
{
    static const char *const drop[] = {"proxy-", "connection:", "keep-alive:"};

    for (size_t i = 0; i < PD_ARRAY_SIZE(drop); i++) {
        size_t n = strlen(drop[i]);

        if (len >= n && strncasecmp(line, drop[i], n) == 0)
            return true;
    }
    return false;
}

/* Rewrites a plain HTTP request for the origin server. */
static int
rewrite_head(struct pxconn *px, const char *method, size_t mlen,
             const char *path, size_t plen, const char *version,
             const char *headers, const char *end)
{
    size_t cap = (size_t)(end - headers) + plen + mlen + 64 +
                 (px->cred != NULL ? strlen(px->cred->header) + 2 : 0);
    char *out = malloc(cap);
    size_t o = 0;

    if (out == NULL)
        return -ENOMEM;
    o += (size_t)snprintf(out, cap, "%.*s %.*s %.8s\r\n", (int)mlen, method,
                          (int)plen, path, version);
    for (const char *l = headers; l < end;) {
        const char *nl = memchr(l, '\n', (size_t)(end - l));
        size_t ll = nl ? (size_t)(nl - l) + 1 : (size_t)(end - l);

        if (!drop_header(l, ll) &&
            !(px->cred != NULL && ll > px->cred->name_len &&
              l[px->cred->name_len] == ':' &&
              strncasecmp(l, px->cred->header, px->cred->name_len) == 0)) {
            memcpy(out + o, l, ll);
            o += ll;
        }
        l += ll;
    }
    if (px->cred != NULL)
        o += (size_t)snprintf(out + o, cap - o, "%s\r\n", px->cred->header);
    o += (size_t)snprintf(out + o, cap - o, "Connection: close\r\n\r\n");
    free(px->out);
    px->out = out;
    px->outlen = o;
    return 0;
}

static void
start_upstream(struct pxconn *px)
{
    char port[8];
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM};

    if (!agent_egress_allowed(px->allow, px->host, px->port)) {
        pd_info("egress", "sandbox %s: %s:%u is not on its allow list, "
                "refusing", px->sandbox, px->host, px->port);
        reply(px, 403, "Forbidden",
              "paddock egress: host not on this sandbox's allow list\n");
        return;
    }
    snprintf(port, sizeof(port), "%u", px->port);
    px->st = PX_RESOLVE;
    px->gai.data = px;
    px->refs++;
    if (uv_getaddrinfo(px->loop, &px->gai, on_resolved, px->host, port,
                       &hints) != 0) {
        px->refs--;
        reply(px, 502, "Bad Gateway", "paddock egress: cannot resolve\n");
    }
}

/* The sandbox token and credential decision for one request (see
 * "sandbox tokens" above); false after answering 407. */
static bool
token_gate(struct pxconn *px, const char *headers, const char *end)
{
    char tok[TOKEN_MAX + 1], msg[512];
    const char *bearer = proxy_bearer(headers, end, tok, sizeof(tok));
    const struct cred *cred = cred_for(px->host);
    const char *why = NULL;
    int n;

    px->cred = NULL;
    if (bearer != NULL)
        why = bearer[0] != '\0' ? token_check(px->sandbox, bearer)
                                : "Proxy-Authorization is not Bearer <token>";
    else if (cred != NULL && !px->is_connect)
        why = "this host needs the sandbox token (Proxy-Authorization: "
              "Bearer $PADDOCK_TOKEN)";
    if (why == NULL) {
        if (!px->is_connect && bearer != NULL)
            px->cred = cred;
        return true;
    }
    stat_token_refused++;
    pd_info("egress", "sandbox %s: %s:%u refused: %s", px->sandbox,
            px->host, px->port, why);
    n = snprintf(msg, sizeof(msg),
                 "HTTP/1.1 407 Proxy Authentication Required\r\n"
                 "Proxy-Authenticate: Bearer realm=\"paddock\"\r\n"
                 "Content-Type: text/plain\r\nContent-Length: %zu\r\n"
                 "Connection: close\r\n\r\npaddock egress: %s\n",
                 strlen(why) + 17, why);
    if (px->client != NULL && n > 0 && (size_t)n < sizeof(msg))
        px_write_copy(px, px->client, msg, (size_t)n);
    /* As reply() does: the refused head goes, the next request follows. */
    if (px->head_end > 0 && px->head_end <= px->len) {
        memmove(px->buf, px->buf + px->head_end, px->len - px->head_end);
        px->len -= px->head_end;
    } else {
        px->len = 0;
    }
    px->head_end = 0;
    exchange_done(px);
    return false;
}

/* Parses a complete head in buf; replies and returns on bad input. */
static void
parse_head(struct pxconn *px, const char *end)
{
    const char *line_end = memmem(px->buf, (size_t)(end - px->buf), "\r\n", 2);
    const char *sp1, *sp2, *target, *version;
    size_t mlen, tlen;

    sp1 = memchr(px->buf, ' ', (size_t)(line_end - px->buf));
    sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(line_end - sp1 - 1)) : NULL;
    if (sp1 == NULL || sp2 == NULL ||
        (size_t)(line_end - sp2 - 1) != 8 ||
        strncmp(sp2 + 1, "HTTP/1.", 7) != 0) {
        reply(px, 400, "Bad Request", "paddock egress: bad request line\n");
        return;
    }
    mlen = (size_t)(sp1 - px->buf);
    target = sp1 + 1;
    tlen = (size_t)(sp2 - target);
    version = sp2 + 1;

    px->is_connect = mlen == 7 && strncmp(px->buf, "CONNECT", 7) == 0;
    if (px->is_connect) {
        if (split_hostport(target, tlen, 0, px->host, sizeof(px->host),
                           &px->port) != 0) {
            reply(px, 400, "Bad Request", "paddock egress: bad target\n");
            return;
        }
        if (!token_gate(px, line_end + 2, end))
            return;
    } else {
        const char *hp, *slash;

        if (tlen < 8 || strncasecmp(target, "http://", 7) != 0) {
            reply(px, 400, "Bad Request",
                  "paddock egress: want an absolute http:// URI or "
                  "CONNECT\n");
            return;
        }
        hp = target + 7;
        slash = memchr(hp, '/', tlen - 7);
        if (split_hostport(hp, slash ? (size_t)(slash - hp) : tlen - 7, 80,
                           px->host, sizeof(px->host), &px->port) != 0) {
            reply(px, 400, "Bad Request", "paddock egress: bad target\n");
            return;
        }
        if (!token_gate(px, line_end + 2, end))
            return;
        if (rewrite_head(px, px->buf, mlen, slash ? slash : "/",
                         slash ? (size_t)(target + tlen - slash) : 1,
                         version, line_end + 2, end - 2) != 0) {
            reply(px, 400, "Bad Request", "paddock egress: bad target\n");
            return;
        }
    }
    start_upstream(px);
}

static void
try_head(struct pxconn *px)
{
    const char *end;

    if (px->st != PX_HEAD || px->len == 0)
        return;
    end = memmem(px->buf, px->len, "\r\n\r\n", 4);
    if (end == NULL) {
        if (px->len >= HEAD_MAX)
            reply(px, 431, "Request Header Fields Too Large",
                  "paddock egress: request head too large\n");
        return;
    }
    px->head_end = (size_t)(end + 4 - px->buf);
    parse_head(px, end + 4);
}

static void
client_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
    struct pxconn *px = s->data;

    if (n < 0) {
        free(b->base);
        /* A client that half-closes after its request still gets the
         * answer; the exchange ends when the upstream does. */
        if (n == UV_EOF && !px->persistent &&
            (px->st == PX_RESOLVE || px->st == PX_CONNECT ||
             px->st == PX_PIPE)) {
            uv_read_stop(s);
            return;
        }
        px_close(px);
        return;
    }
    if (px->closing || px->st == PX_DONE || n == 0) {
        free(b->base);
        return;
    }
    if (px->st == PX_PIPE && px->up != NULL) {
        if (px_write(px, (uv_stream_t *)px->up, b->base, (size_t)n) != 0)
            px_close(px);
        else if (uv_stream_get_write_queue_size((uv_stream_t *)px->up) >=
                 QUEUE_HIGH) {
            px->client_paused = true;
            uv_read_stop(s);
        }
        return;
    }
    /* Head bytes, or early bytes while connecting: buffer them. */
    if ((size_t)n > sizeof(px->buf) - px->len) {
        free(b->base);
        reply(px, 431, "Request Header Fields Too Large",
              "paddock egress: request too large\n");
        return;
    }
    memcpy(px->buf + px->len, b->base, (size_t)n);
    px->len += (size_t)n;
    free(b->base);
    if (px->st == PX_HEAD)
        try_head(px);
    else if (px->len > sizeof(px->buf) / 2) {
        px->client_paused = true;
        uv_read_stop(s);
    }
}

static int
serve(uv_loop_t *loop, uv_stream_t *client, const char *sandbox,
      const char *allow, bool persistent,
      const struct agent_egress_listener *owner)
{
    struct pxconn *px = calloc(1, sizeof(*px));

    if (px == NULL || (px->allow = strdup(allow ? allow : "")) == NULL) {
        free(px);
        uv_close((uv_handle_t *)client, (uv_close_cb)free);
        return -ENOMEM;
    }
    px->loop = loop;
    px->client = client;
    px->persistent = persistent;
    px->refs = 1; /* the client handle */
    px->owner = owner;
    px->next = all_px;
    if (all_px != NULL)
        all_px->prev = px;
    all_px = px;
    pd_strlcpy(px->sandbox, sandbox, sizeof(px->sandbox));
    client->data = px;
    if (uv_read_start(client, alloc_cb, client_read) != 0) {
        px_close(px);
        return -EIO;
    }
    return 0;
}

/* ---- listeners --------------------------------------------------------- */

int
agent_egress_serve(uv_loop_t *loop, uv_stream_t *client,
                   const char *sandbox, const char *allow, bool persistent)
{
    return serve(loop, client, sandbox, allow, persistent, NULL);
}

static void
on_listener_conn(uv_stream_t *server, int status)
{
    struct agent_egress_listener *l = server->data;
    uv_stream_t *client;

    if (status < 0)
        return;
    client = malloc(l->is_pipe ? sizeof(uv_pipe_t) : sizeof(uv_tcp_t));
    if (client == NULL)
        return;
    if (l->is_pipe)
        uv_pipe_init(l->loop, (uv_pipe_t *)client, 0);
    else
        uv_tcp_init(l->loop, (uv_tcp_t *)client);
    if (uv_accept(server, client) != 0) {
        uv_close((uv_handle_t *)client, (uv_close_cb)free);
        return;
    }
    /* The unix socket is the guestfwd chardev: one stream, many requests. */
    serve(l->loop, client, l->sandbox, l->allow, l->is_pipe, l);
}

static struct agent_egress_listener *
listener_new(uv_loop_t *loop, const char *sandbox, const char *allow)
{
    struct agent_egress_listener *l = calloc(1, sizeof(*l));

    if (l == NULL)
        return NULL;
    l->allow = strdup(allow ? allow : "");
    if (l->allow == NULL) {
        free(l);
        return NULL;
    }
    l->loop = loop;
    pd_strlcpy(l->sandbox, sandbox, sizeof(l->sandbox));
    return l;
}

static void
free_listener(uv_handle_t *h)
{
    struct agent_egress_listener *l = h->data;

    free(l->allow);
    free(l);
}

int
agent_egress_listen_unix(uv_loop_t *loop, const char *path,
                         const char *sandbox, const char *allow,
                         int owner_uid, int owner_gid,
                         struct agent_egress_listener **out)
{
    struct agent_egress_listener *l = listener_new(loop, sandbox, allow);
    int rv;

    if (l == NULL)
        return -ENOMEM;
    l->is_pipe = true;
    uv_pipe_init(loop, &l->h.pipe, 0);
    l->h.pipe.data = l;
    unlink(path);
    rv = uv_pipe_bind(&l->h.pipe, path);
    if (rv == 0 && owner_uid >= 0 &&
        chown(path, (uid_t)owner_uid, (gid_t)owner_gid) != 0)
        rv = -errno;
    if (rv == 0)
        rv = chmod(path, 0600) == 0 ? 0 : -errno;
    if (rv == 0)
        rv = uv_listen((uv_stream_t *)&l->h.pipe, 16, on_listener_conn);
    if (rv != 0) {
        uv_close((uv_handle_t *)&l->h.pipe, free_listener);
        return rv;
    }
    *out = l;
    return 0;
}

int
agent_egress_listen_tcp(uv_loop_t *loop, const char *sandbox,
                        const char *allow, unsigned *port,
                        struct agent_egress_listener **out)
{
    struct agent_egress_listener *l = listener_new(loop, sandbox, allow);
    struct sockaddr_in sa;
    struct sockaddr_storage bound;
    int rv, blen = sizeof(bound);

    if (l == NULL)
        return -ENOMEM;
    uv_tcp_init(loop, &l->h.tcp);
    l->h.tcp.data = l;
    uv_ip4_addr("127.0.0.1", (int)*port, &sa);
    rv = uv_tcp_bind(&l->h.tcp, (const struct sockaddr *)&sa, 0);
    if (rv == 0)
        rv = uv_listen((uv_stream_t *)&l->h.tcp, 64, on_listener_conn);
    if (rv == 0)
        rv = uv_tcp_getsockname(&l->h.tcp, (struct sockaddr *)&bound, &blen);
    if (rv != 0) {
        uv_close((uv_handle_t *)&l->h.tcp, free_listener);
        return rv;
    }
    *port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
    *out = l;
    return 0;
}

void
agent_egress_unlisten(struct agent_egress_listener *l)
{
    if (l == NULL)
        return;
    for (struct pxconn *px = all_px; px != NULL; px = px->next) {
        if (px->owner != l)
            continue;
        px->owner = NULL;
        if (px->persistent)
            px_close(px);
    }
    uv_close((uv_handle_t *)&l->h, free_listener);
}

uint64_t
agent_egress_requests(void)
{
    return stat_requests;
}

uint64_t
agent_egress_denied(void)
{
    return stat_denied;
}
