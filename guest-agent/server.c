/*
 * The channel to the host: a virtio-serial port, its framing, and request
 * dispatch.
 *
 * Connection states. QEMU's end of the port is a unix socket (chardev
 * server=on,wait=off) that the node agent connects to. While no host is
 * connected, poll() on the port reports POLLHUP and read() returns 0. The
 * agent then stops polling the port (POLLHUP would fire forever) and checks
 * it every HANGUP_CHECK_MS instead. A host session starts with its HELLO;
 * the agent answers with its own. A second HELLO on a live link (the host
 * reconnected between two checks) starts a new session too.
 *
 * On hangup every request of the session is aborted (streams, transfers,
 * exec children killed); background processes survive for the next host.
 *
 * Bad input: a frame that does not decode is skipped and answered with
 * ERROR {EPROTO} under id 0; a length prefix over the cap desynchronises
 * the stream, so the agent then skips input until it finds a complete host
 * HELLO frame in it, which starts a new session. A reconnect is not enough
 * to end that state: when the host leaves and a new one connects faster
 * than the agent reads, the port never reports the hangup, and the new
 * host's HELLO arrives on what looks like the same stream. Either way the
 * agent goes on serving.
 *
 * A hung host (connected, but reading nothing): the port is non-blocking
 * and streams pause at the write queue's high water, so the agent never
 * waits on it; only replies still queue. When the queue has made no
 * progress for stall_ms (paddock.host_stall_ms, default 30 s), the agent
 * ends the session as if the host had gone, dropping the queue, and
 * skips input until a HELLO as above. Memory held for a dead reader is
 * thus bounded in time, and background processes go on.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "guest-agent/guest.h"

#define HANGUP_CHECK_MS 20
#define STALL_DEFAULT_MS 30000
#define READ_BUF (256u << 10)
/* Largest host HELLO the resync scan recognises (a real one is ~40). */
#define HELLO_MAX 256

struct qbuf {
    unsigned char *data;
    size_t len, off;
    struct qbuf *next;
};

static struct {
    int fd;
    char path[PATH_MAX];
    bool host_up;   /* QEMU's socket has a client */
    bool session;   /* that client said HELLO */
    bool broken;    /* input desynchronised until hangup */
    struct pd_decoder dec;
    struct qbuf *qhead, *qtail;
    size_t queued;
    struct greq *reqs;
    struct gwatch watch;
    struct gtimer check;
    struct gtimer stall;      /* watches a queue that does not move */
    uint64_t last_progress;   /* when the queue last moved (or filled) */
    unsigned stall_ms;
    unsigned char *rbuf;
    unsigned char *sync;    /* input scanned for a HELLO while out of step */
    size_t sync_len;
} chan = {.fd = -1, .stall_ms = STALL_DEFAULT_MS,
           .stall = {.slot = -1}};

/* ---- port discovery ---------------------------------------------------- */

/*
 * Finds the port named name under /sys/class/virtio-ports and, on the way,
 * links /dev/virtio-ports/<name> for every named port (there is no udev).
 */
static int
find_port(const char *name, char *dev, size_t devlen)
{
    DIR *d = opendir("/sys/class/virtio-ports");
    struct dirent *e;
    int found = -ENOENT;

    if (d == NULL)
        return -errno;
    mkdir("/dev/virtio-ports", 0755);
    while ((e = readdir(d)) != NULL) {
        char p[PATH_MAX], pname[128] = "", link[PATH_MAX], tgt[PATH_MAX];
        FILE *f;

        if (e->d_name[0] == '.')
            continue;
        snprintf(p, sizeof(p), "/sys/class/virtio-ports/%s/name", e->d_name);
        f = fopen(p, "re");
        if (f == NULL)
            continue;
        if (fgets(pname, sizeof(pname), f) == NULL)
            pname[0] = '\0';
        fclose(f);
        pname[strcspn(pname, "\n")] = '\0';
        if (pname[0] == '\0' || strchr(pname, '/') != NULL)
            continue;
        snprintf(link, sizeof(link), "/dev/virtio-ports/%s", pname);
        snprintf(tgt, sizeof(tgt), "../%s", e->d_name);
        (void)symlink(tgt, link);
        if (strcmp(pname, name) == 0) {
            if ((size_t)snprintf(dev, devlen, "/dev/%s", e->d_name) < devlen)
                found = 0;
        }
    }
    closedir(d);
    return found;
}

/* ---- write queue ------------------------------------------------------- */

bool
chan_up(void)
{
    return chan.host_up && chan.session && !chan.broken;
}

bool
chan_room(void)
{
    return chan_up() && chan.queued < GUEST_CHAN_HIGH;
}

static void
queue_frame(void *buf, size_t len)
{
    struct qbuf *q;

    if (!chan.host_up) {
        free(buf);
        return;
    }
    q = calloc(1, sizeof(*q));
    if (q == NULL) {
        pd_warn("channel", "out of memory queueing a %zu-byte frame, "
                "dropping it", len);
        free(buf);
        return;
    }
    q->data = buf;
    q->len = len;
    if (chan.qhead == NULL) {
        chan.last_progress = pd_now_ms();
        timer_arm(&chan.stall, chan.stall_ms);
    }
    if (chan.qtail != NULL)
        chan.qtail->next = q;
    else
        chan.qhead = q;
    chan.qtail = q;
    chan.queued += len;
}

void
chan_send(struct pd_enc *e)
{
    void *buf;
    size_t len;
    int rv = pd_enc_finish(e, &buf, &len);

    if (rv != 0) {
        pd_warn("channel", "cannot encode a reply: %s, dropping it",
                strerror(-rv));
        return;
    }
    queue_frame(buf, len);
}

void
chan_error(uint64_t id, int errnum, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    void *buf;
    size_t len;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    pd_debug("channel", "request %llu fails: %s: %s",
             (unsigned long long)id, pd_errno_name(errnum), msg);
    if (pd_enc_error(id, errnum, msg, &buf, &len) == 0)
        queue_frame(buf, len);
}

void
chan_ok(uint64_t id)
{
    struct pd_enc e;

    pd_enc_begin(&e, PD_MSG_OK, id);
    chan_send(&e);
}

void
chan_window(uint64_t id, uint64_t bytes)
{
    struct pd_enc e;

    pd_enc_begin(&e, PD_MSG_WINDOW, id);
    pd_enc_u64(&e, "bytes", bytes);
    chan_send(&e);
}

static void
queue_clear(void)
{
    while (chan.qhead != NULL) {
        struct qbuf *q = chan.qhead;

        chan.qhead = q->next;
        free(q->data);
        free(q);
    }
    chan.qtail = NULL;
    chan.queued = 0;
}

/* Writes what the port takes now; -errno on a hard error. */
static int
queue_write(void)
{
    while (chan.qhead != NULL) {
        struct qbuf *q = chan.qhead;
        ssize_t n = write(chan.fd, q->data + q->off, q->len - q->off);

        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno == EAGAIN ? 0 : -errno;
        }
        q->off += (size_t)n;
        chan.queued -= (size_t)n;
        chan.last_progress = pd_now_ms();
        if (q->off < q->len)
            continue;
        chan.qhead = q->next;
        if (chan.qhead == NULL)
            chan.qtail = NULL;
        free(q->data);
        free(q);
    }
    return 0;
}

void
chan_flush(int timeout_ms)
{
    uint64_t end = pd_now_ms() + (uint64_t)timeout_ms;

    while (chan.qhead != NULL && chan.host_up && pd_now_ms() < end) {
        struct pollfd p = {.fd = chan.fd, .events = POLLOUT};

        if (poll(&p, 1, 50) > 0 && (p.revents & POLLHUP))
            break;
        if (queue_write() < 0)
            break;
    }
}

/* ---- requests ----------------------------------------------------------- */

void
greq_add(struct greq *r, uint64_t id, unsigned type,
         const struct greq_ops *ops)
{
    r->id = id;
    r->type = type;
    r->ops = ops;
    r->credit = PD_STREAM_WINDOW;
    r->next = chan.reqs;
    chan.reqs = r;
}

void
greq_remove(struct greq *r)
{
    for (struct greq **pp = &chan.reqs; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == r) {
            *pp = r->next;
            r->next = NULL;
            return;
        }
    }
}

static struct greq *
greq_find(uint64_t id)
{
    for (struct greq *r = chan.reqs; r != NULL; r = r->next)
        if (r->id == id)
            return r;
    return NULL;
}

/*
 * Aborts every request of the session; abort() removes and frees each.
 * After a hangup the input and output buffers go too; when a new HELLO
 * ends the session, the bytes after it belong to the new one, and the
 * decoder is in use by the caller.
 */
static void
session_end(const char *why, bool hangup)
{
    int n = 0;

    while (chan.reqs != NULL) {
        struct greq *r = chan.reqs;

        greq_remove(r);
        r->ops->abort(r);
        n++;
    }
    if (chan.session)
        pd_info("channel", "host session ended (%s); %d request(s) "
                "aborted, background processes kept", why, n);
    chan.session = false;
    chan.broken = false;
    queue_clear();
    if (!hangup)
        return;
    pd_decoder_free(&chan.dec);
    pd_decoder_init(&chan.dec, PD_FRAME_MAX);
}

static void
send_hello(void)
{
    struct pd_enc e;
    char host[65] = "";

    gethostname(host, sizeof(host) - 1);
    pd_enc_begin(&e, PD_MSG_HELLO, 0);
    pd_enc_u64(&e, "v", PD_PROTO_VERSION);
    pd_enc_str(&e, "role", "guest");
    pd_enc_str(&e, "name", host);
    chan_send(&e);
}

static void
on_hello(const struct pd_msg *m)
{
    uint64_t v = 0;

    if (chan.session)
        session_end("the host said HELLO again", false);
    if (pd_msg_u64(m, "v", &v) != 0 || v != PD_PROTO_VERSION) {
        /* Answer in the host's terms, then wait for another host. */
        chan.session = true;
        chan_error(0, EPROTO, "protocol version %llu unsupported, this "
                   "guest speaks %d", (unsigned long long)v,
                   PD_PROTO_VERSION);
        chan.broken = true;
        chan.sync_len = 0;
        return;
    }
    chan.session = true;
    send_hello();
    pd_info("channel", "host session started");
}

/* Frames under the id of a live request. */
static void
stream_frame(const struct pd_msg *m)
{
    struct greq *r = greq_find(m->id);
    uint64_t bytes;

    if (r == NULL)
        return; /* the request just ended; late frames are harmless */
    switch (m->type) {
    case PD_MSG_WINDOW:
        if (pd_msg_u64(m, "bytes", &bytes) == 0 &&
            bytes <= PD_STREAM_WINDOW * 4ull)
            r->credit += bytes;
        break;
    case PD_MSG_CANCEL:
        greq_remove(r);
        r->ops->abort(r);
        break;
    default:
        if (r->ops->on_msg != NULL)
            r->ops->on_msg(r, m);
        break;
    }
}

static void
dispatch(const struct pd_msg *m)
{
    if (m->type == PD_MSG_HELLO) {
        on_hello(m);
        return;
    }
    if (!chan.session) {
        chan.session = true; /* so the error goes out */
        chan_error(m->id, EPROTO, "HELLO expected before %s",
                   pd_msg_type_name(m->type));
        chan.session = false;
        return;
    }
    switch (m->type) {
    case PD_MSG_PING: {
        struct pd_enc e;

        pd_enc_begin(&e, PD_MSG_PONG, m->id);
        chan_send(&e);
        return;
    }
    case PD_MSG_PONG:
    case PD_MSG_OK:
    case PD_MSG_ERROR:
        return;
    case PD_MSG_DATA:
    case PD_MSG_STDIN:
    case PD_MSG_WINDOW:
    case PD_MSG_CANCEL:
        stream_frame(m);
        return;
    default:
        break;
    }
    if (m->id == 0) {
        chan_error(0, EINVAL, "%s needs a request id",
                   pd_msg_type_name(m->type));
        return;
    }
    if (greq_find(m->id) != NULL) {
        chan_error(m->id, EBUSY, "request id %llu is in use",
                   (unsigned long long)m->id);
        return;
    }
    switch (m->type) {
    case PD_MSG_EXEC: exec_request(m); break;
    case PD_MSG_PROC_START: proc_start_request(m); break;
    case PD_MSG_PROC_LIST: proc_list_request(m); break;
    case PD_MSG_PROC_GET: proc_get_request(m); break;
    case PD_MSG_PROC_LOGS: proc_logs_request(m); break;
    case PD_MSG_PROC_SIGNAL: proc_signal_request(m); break;
    case PD_MSG_PROC_WAIT_PORT: proc_wait_port_request(m); break;
    case PD_MSG_FILE_WRITE: file_write_request(m); break;
    case PD_MSG_FILE_READ: file_read_request(m); break;
    case PD_MSG_FILE_STAT: file_stat_request(m); break;
    case PD_MSG_FILE_LIST: file_list_request(m); break;
    case PD_MSG_FILE_MKDIR: file_mkdir_request(m); break;
    case PD_MSG_FILE_DELETE: file_delete_request(m); break;
    case PD_MSG_FILE_RENAME: file_rename_request(m); break;
    case PD_MSG_TUNNEL_OPEN: tunnel_request(m); break;
    case PD_MSG_INFO: info_request(m); break;
    case PD_MSG_SHUTDOWN: shutdown_request(m); break;
    default:
        chan_error(m->id, ENOSYS, "%s is not a guest request",
                   pd_msg_type_name(m->type));
        break;
    }
}

/* Skips the frame the decoder refused, when its length is sane. */
static bool
skip_bad_frame(void)
{
    struct pd_decoder *d = &chan.dec;
    const unsigned char *p = d->buf + d->off;
    uint32_t flen;

    if (d->len - d->off < 4)
        return false;
    flen = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
           (uint32_t)p[2] << 8 | p[3];
    if (flen == 0 || flen > d->max_frame - 4 || d->len - d->off - 4 < flen)
        return false;
    d->off += 4 + (size_t)flen;
    return true;
}

static void
decode_all(void)
{
    const struct pd_msg *m;
    int rv;

    while (!chan.broken && (rv = pd_decoder_next(&chan.dec, &m)) != 0) {
        if (rv > 0) {
            dispatch(m);
            continue;
        }
        pd_warn("channel", "bad frame from the host: %s", chan.dec.err);
        chan.session = true;
        chan_error(0, EPROTO, "bad frame: %s", chan.dec.err);
        if (!skip_bad_frame()) {
            pd_warn("channel", "stream out of step; skipping input until "
                    "a host HELLO");
            chan.broken = true;
            chan.sync_len = 0;
        }
    }
}

/* ---- resync: finding a HELLO in a stream that is out of step ----------- */

static bool
map_header(unsigned char b)
{
    return (b >= 0x80 && b <= 0x8f) || b == 0xde || b == 0xdf;
}

/* A complete, valid HELLO frame at f, with len bytes available. */
static bool
hello_at(const unsigned char *f, size_t len)
{
    uint32_t flen;
    struct pd_msg m;
    char err[64];
    unsigned type;

    if (len < 5)
        return false;
    flen = (uint32_t)f[0] << 24 | (uint32_t)f[1] << 16 |
           (uint32_t)f[2] << 8 | f[3];
    if (flen < 8 || flen > HELLO_MAX || flen > len - 4 || !map_header(f[4]))
        return false;
    if (pd_msg_decode(f + 4, flen, &m, err, sizeof(err)) != 0)
        return false;
    type = m.type;
    pd_msg_release(&m);
    return type == PD_MSG_HELLO;
}

/*
 * Scans new input for a HELLO. The last HELLO_MAX + 4 bytes are kept
 * between reads, so a HELLO split across two reads is found too. On a
 * find, the decoder restarts at the HELLO and the session with it.
 */
static void
resync(const unsigned char *p, size_t n)
{
    size_t keep = HELLO_MAX + 4;

    memcpy(chan.sync + chan.sync_len, p, n);
    chan.sync_len += n;
    for (size_t i = 0; i + 5 <= chan.sync_len; i++) {
        if (!hello_at(chan.sync + i, chan.sync_len - i))
            continue;
        pd_info("channel", "a host HELLO in the input; back in step");
        pd_decoder_free(&chan.dec);
        pd_decoder_init(&chan.dec, PD_FRAME_MAX);
        chan.broken = false;
        if (pd_decoder_feed(&chan.dec, chan.sync + i,
                            chan.sync_len - i) != 0) {
            chan.broken = true;
            return;
        }
        chan.sync_len = 0;
        decode_all();
        return;
    }
    if (chan.sync_len > keep) {
        memmove(chan.sync, chan.sync + chan.sync_len - keep, keep);
        chan.sync_len = keep;
    }
}

/* ---- the port's watch -------------------------------------------------- */

static void
stall_check(struct gtimer *t)
{
    uint64_t idle;

    (void)t;
    if (chan.qhead == NULL || !chan.host_up)
        return;
    idle = pd_now_ms() - chan.last_progress;
    if (idle < chan.stall_ms) {
        timer_arm(&chan.stall, chan.stall_ms - idle);
        return;
    }
    pd_warn("channel", "host read nothing for %llu ms with %zu bytes "
            "queued; ending its session, input skipped until a HELLO",
            (unsigned long long)idle, chan.queued);
    session_end("the host stopped reading", false);
    chan.broken = true;
    chan.sync_len = 0;
}

void
server_set_stall_ms(unsigned ms)
{
    if (ms > 0)
        chan.stall_ms = ms;
}

static void
host_down(const char *why)
{
    chan.host_up = false;
    session_end(why, true);
    timer_arm(&chan.check, HANGUP_CHECK_MS);
}

static short
chan_want(struct gwatch *w)
{
    (void)w;
    if (chan.fd < 0 || !chan.host_up)
        return 0;
    return POLLIN | (chan.qhead != NULL ? POLLOUT : 0);
}

static void
chan_ready(struct gwatch *w, short rev)
{
    (void)w;
    if (rev & POLLIN) {
        for (int i = 0; i < 16; i++) {
            ssize_t n = read(chan.fd, chan.rbuf, READ_BUF);

            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0 && errno == EAGAIN)
                break;
            if (n <= 0) {
                host_down(n == 0 ? "host closed" : strerror(errno));
                return;
            }
            if (chan.broken) {
                resync(chan.rbuf, (size_t)n);
                if (!chan.host_up)
                    return;
                continue;
            }
            if (pd_decoder_feed(&chan.dec, chan.rbuf, (size_t)n) != 0) {
                pd_warn("channel", "out of memory buffering input");
                chan.broken = true;
                chan.sync_len = 0;
                continue;
            }
            decode_all();
            if (!chan.host_up)
                return;
        }
    }
    if ((rev & POLLHUP) && !(rev & POLLIN)) {
        host_down("hangup");
        return;
    }
    if (chan.qhead != NULL) {
        int rv = queue_write();

        if (rv < 0)
            pd_log_errno(PD_LOG_WARN, -rv, "channel", "write failed");
    }
}

/* While no host is connected: is one there now? */
static void
chan_check(struct gtimer *t)
{
    struct pollfd p = {.fd = chan.fd, .events = POLLIN};

    (void)t;
    if (poll(&p, 1, 0) >= 0 && !(p.revents & POLLHUP)) {
        chan.host_up = true;
        pd_debug("channel", "host connected");
        return;
    }
    timer_arm(&chan.check, HANGUP_CHECK_MS);
}

static void
serve(int fd)
{
    chan.watch.fd = fd;
    chan.watch.want = chan_want;
    chan.watch.ready = chan_ready;
    chan.watch.slot = -1;
    chan.check.fire = chan_check;
    chan.check.slot = -1;
    chan.stall.fire = stall_check;
    watch_add(&chan.watch);
    chan_check(&chan.check);
}

int
server_init(const char *port_name)
{
    uint64_t start = pd_now_ms();
    int rv;

    pd_decoder_init(&chan.dec, PD_FRAME_MAX);
    chan.rbuf = malloc(READ_BUF);
    chan.sync = malloc(READ_BUF + HELLO_MAX + 4);
    if (chan.rbuf == NULL || chan.sync == NULL)
        return -ENOMEM;

    /* The port appears once the host's control message is handled. */
    while ((rv = find_port(port_name, chan.path, sizeof(chan.path))) != 0) {
        if (pd_now_ms() - start > 5000 && (pd_now_ms() - start) % 5000 < 10)
            pd_warn("channel", "no virtio-serial port named %s yet, waiting",
                    port_name);
        usleep(5000);
    }
    for (;;) {
        chan.fd = open(chan.path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
        if (chan.fd >= 0)
            break;
        /* devtmpfs may lag behind sysfs by a moment. */
        if (errno != ENOENT || pd_now_ms() - start > 30000)
            return -errno;
        usleep(5000);
    }
    pd_info("channel", "serving on %s (%s)", chan.path, port_name);
    serve(chan.fd);
    return 0;
}

int
server_init_fd(int fd)
{
    int rv;

    pd_decoder_init(&chan.dec, PD_FRAME_MAX);
    chan.rbuf = malloc(READ_BUF);
    chan.sync = malloc(READ_BUF + HELLO_MAX + 4);
    if (chan.rbuf == NULL || chan.sync == NULL)
        return -ENOMEM;
    rv = fd_nonblock(fd);
    if (rv != 0)
        return rv;
    chan.fd = fd;
    pd_strlcpy(chan.path, "(inherited fd)", sizeof(chan.path));
    serve(fd);
    return 0;
}
