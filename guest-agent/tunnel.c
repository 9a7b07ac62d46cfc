/*
 * TUNNEL_OPEN: a TCP connection to 127.0.0.1:port inside the guest,
 * carried over the channel, so the host reaches guest services without
 * any network device.
 *
 * OK answers once the connection is up. Then bytes flow as DATA both ways:
 * guest to host within the credit the host grants; host to guest written
 * through and granted back with WINDOW as the socket takes them. DATA
 * {eof} half-closes a direction; when both are closed the tunnel ends. A
 * reset or connect failure is an ERROR; CANCEL from the host drops it.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/log.h"
#include "guest-agent/guest.h"

struct gtun {
    struct greq req;
    uint16_t port;
    bool connected, rd_eof, wr_eof_pending, wr_eof;
    unsigned char *out;  /* host bytes waiting for the socket */
    size_t out_len, out_off, out_cap;
    struct gwatch w;
};

static void
tun_free(struct gtun *t)
{
    watch_del(&t->w);
    if (t->w.fd >= 0)
        close(t->w.fd);
    free(t->out);
    free(t);
}

static void
tun_end(struct gtun *t, int errnum)
{
    if (errnum != 0)
        chan_error(t->req.id, errnum, "tunnel to port %u: %s", t->port,
                   strerror(errnum));
    greq_remove(&t->req);
    tun_free(t);
}

static short
tun_want(struct gwatch *w)
{
    struct gtun *t = w->obj;
    short ev = 0;

    if (!t->connected)
        return POLLOUT;
    if (!t->rd_eof && t->req.credit > 0 && chan_room())
        ev |= POLLIN;
    if (t->out_off < t->out_len)
        ev |= POLLOUT;
    return ev;
}

static void
tun_read(struct gtun *t)
{
    static unsigned char buf[GUEST_CHUNK];
    size_t want = sizeof(buf);
    struct pd_enc e;
    ssize_t n;

    if (t->req.credit < want)
        want = (size_t)t->req.credit;
    n = read(t->w.fd, buf, want);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n < 0) {
        tun_end(t, errno);
        return;
    }
    pd_enc_begin(&e, PD_MSG_DATA, t->req.id);
    pd_enc_bin(&e, "data", buf, (size_t)n);
    pd_enc_bool(&e, "eof", n == 0);
    chan_send(&e);
    t->req.credit -= (uint64_t)n;
    if (n == 0) {
        t->rd_eof = true;
        if (t->wr_eof)
            tun_end(t, 0);
    }
}

/* Returns false when t was freed. */
static bool
tun_write(struct gtun *t)
{
    ssize_t n = write(t->w.fd, t->out + t->out_off, t->out_len - t->out_off);

    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return true;
        tun_end(t, errno);
        return false;
    }
    t->out_off += (size_t)n;
    chan_window(t->req.id, (uint64_t)n);
    if (t->out_off == t->out_len) {
        t->out_off = t->out_len = 0;
        if (t->wr_eof_pending && !t->wr_eof) {
            t->wr_eof = true;
            shutdown(t->w.fd, SHUT_WR);
            if (t->rd_eof) {
                tun_end(t, 0);
                return false;
            }
        }
    }
    return true;
}

static void
tun_ready(struct gwatch *w, short rev)
{
    struct gtun *t = w->obj;

    if (!t->connected) {
        int err = 0;
        socklen_t len = sizeof(err);

        getsockopt(w->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0) {
            tun_end(t, err);
            return;
        }
        t->connected = true;
        chan_ok(t->req.id);
        /* The host may have ended its direction before the connect. */
        if (t->wr_eof_pending && t->out_off == t->out_len) {
            t->wr_eof = true;
            shutdown(w->fd, SHUT_WR);
        }
        return;
    }
    if ((rev & POLLOUT) && !tun_write(t))
        return;
    /* With no credit a read of 0 bytes would look like EOF. */
    if ((rev & (POLLIN | POLLHUP | POLLERR)) && !t->rd_eof &&
        t->req.credit > 0)
        tun_read(t);
}

static void
tun_on_msg(struct greq *r, const struct pd_msg *m)
{
    struct gtun *t = (struct gtun *)r;
    const void *p;
    size_t n;
    bool eof = false;

    if (m->type != PD_MSG_DATA || t->wr_eof_pending)
        return;
    pd_msg_bool(m, "eof", &eof);
    if (pd_msg_bin(m, "data", &p, &n) == 0 && n > 0) {
        if (t->out_len + n > 2ull * PD_STREAM_WINDOW) {
            tun_end(t, ENOBUFS);
            return;
        }
        if (t->out_len + n > t->out_cap) {
            size_t cap = (t->out_len + n) * 2;
            unsigned char *d = realloc(t->out, cap);

            if (d == NULL) {
                tun_end(t, ENOMEM);
                return;
            }
            t->out = d;
            t->out_cap = cap;
        }
        memcpy(t->out + t->out_len, p, n);
        t->out_len += n;
    }
    if (eof) {
        t->wr_eof_pending = true;
        if (t->connected && t->out_len == t->out_off) {
            t->wr_eof = true;
            shutdown(t->w.fd, SHUT_WR);
            if (t->rd_eof)
                tun_end(t, 0);
        }
    }
}

static void
tun_abort(struct greq *r)
{
    tun_free((struct gtun *)r);
}

static const struct greq_ops tun_ops = {
    .on_msg = tun_on_msg,
    .abort = tun_abort,
};

void
tunnel_request(const struct pd_msg *m)
{
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    uint64_t port = 0;
    struct gtun *t;
    int fd;

    if (pd_msg_u64(m, "port", &port) != 0 || port == 0 || port > 65535) {
        chan_error(m->id, EINVAL, "port must be a number from 1 to 65535");
        return;
    }
    fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        chan_error(m->id, errno, "socket: %s", strerror(errno));
        return;
    }
    sa.sin_port = htons((uint16_t)port);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 &&
        errno != EINPROGRESS) {
        int err = errno;

        close(fd);
        chan_error(m->id, err, "connect to port %llu: %s",
                   (unsigned long long)port, strerror(err));
        return;
    }
    t = calloc(1, sizeof(*t));
    if (t == NULL) {
        close(fd);
        chan_error(m->id, ENOMEM, "out of memory");
        return;
    }
    t->port = (uint16_t)port;
    t->w = (struct gwatch){.fd = fd, .want = tun_want, .ready = tun_ready,
                           .obj = t, .slot = -1};
    greq_add(&t->req, m->id, m->type, &tun_ops);
    watch_add(&t->w);
}
