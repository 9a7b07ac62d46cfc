/* libFuzzer target for what the guest agent does with the host's bytes
 * before anything runs (guest-agent/server.c included whole, path.c,
 * spawn.c, ring.c): frames through the channel's decoder and dispatch,
 * the HELLO resync scan, and the request checks (argv | command, cwd,
 * env, paths), plus the output ring; nothing is spawned and no file is
 * touched (those request types are checked, never dispatched). */
#include "guest-agent/server.c"

#include <limits.h>
#include <stdint.h>

/* main.c is not in the library; these are its globals and hooks. */
static char *base_env[] = {"PATH=/usr/bin:/bin", "HOME=/root", "LANG=C",
                           NULL};
char **guest_base_env = base_env;
bool guest_is_init;

void
child_exited(pid_t pid, int status)
{
    (void)pid;
    (void)status;
}

void
guest_poweroff(void)
{
    abort();
}

/*
 * Byte 0 picks the mode: 0 a frame stream (length-prefixed, as from the
 * port) whose frames go through the request checks, 1 the rest as a
 * single frame body (no prefix) for the same checks, 2 a path for
 * path_check, 3 ring operations.
 */

static void
check_request(const struct pd_msg *m)
{
    static const char *const keys[] = {"path", "from", "to", "cwd"};
    char out[PATH_MAX], err[256];
    struct gcmd c;

    err[0] = '\0';
    if (gcmd_parse(m, &c, err, sizeof(err)) == 0) {
        if (c.argv == NULL || c.argv[0] == NULL || c.envp == NULL)
            abort(); /* a parsed command always has something to run */
        gcmd_free(&c);
    } else if (err[0] == '\0') {
        abort(); /* every refusal explains itself */
    }
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        err[0] = '\0';
        if (path_field(m, keys[i], out, sizeof(out), err, sizeof(err)) ==
            0) {
            if (out[0] != '/' || strstr(out, "/../") != NULL)
                abort(); /* anchored, and never climbing */
        }
    }
}

/*
 * The request types the server may dispatch here: those that neither
 * spawn, touch files, open sockets, arm timers nor power off. With no host
 * up, every reply is dropped where it would be queued.
 */
static bool
safe_type(unsigned t)
{
    switch (t) {
    case PD_MSG_EXEC:
    case PD_MSG_PROC_START:
    case PD_MSG_PROC_WAIT_PORT:
    case PD_MSG_FILE_WRITE:
    case PD_MSG_FILE_READ:
    case PD_MSG_FILE_STAT:
    case PD_MSG_FILE_LIST:
    case PD_MSG_FILE_MKDIR:
    case PD_MSG_FILE_DELETE:
    case PD_MSG_FILE_RENAME:
    case PD_MSG_TUNNEL_OPEN:
    case PD_MSG_SHUTDOWN:
        return false;
    default:
        return true;
    }
}

static void
stream(const uint8_t *data, size_t size)
{
    struct pd_decoder d;
    const struct pd_msg *m;
    int rv;

    /* The resync scan, at every offset, as after a broken stream. */
    for (size_t i = 0; i + 5 <= size; i++)
        hello_at(data + i, size - i);

    pd_decoder_init(&d, PD_FRAME_MAX);
    if (pd_decoder_feed(&d, data, size) == 0) {
        while ((rv = pd_decoder_next(&d, &m)) != 0) {
            if (rv < 0) {
                /* As the server does: skip a refused frame if it can. */
                const unsigned char *p = d.buf + d.off;
                uint32_t flen;

                if (d.len - d.off < 4)
                    break;
                flen = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
                       (uint32_t)p[2] << 8 | p[3];
                if (flen == 0 || flen > d.max_frame - 4 ||
                    d.len - d.off - 4 < flen)
                    break;
                d.off += 4 + (size_t)flen;
                continue;
            }
            check_request(m);
            if (safe_type(m->type))
                dispatch(m);
        }
    }
    pd_decoder_free(&d);
    chan.session = false;
    chan.broken = false;
}

static void
body(const uint8_t *data, size_t size)
{
    struct pd_msg m;
    char err[128];

    if (pd_msg_decode(data, size, &m, err, sizeof(err)) != 0)
        return;
    check_request(&m);
    pd_msg_release(&m);
}

static void
path(const uint8_t *data, size_t size)
{
    char out[PATH_MAX], small[16], err[256] = "";

    if (path_check((const char *)data, size, out, sizeof(out), err,
                   sizeof(err)) == 0) {
        if (out[0] != '/' || strlen(out) >= sizeof(out))
            abort();
    } else if (err[0] == '\0') {
        abort();
    }
    path_check((const char *)data, size, small, sizeof(small), err,
               sizeof(err));
}

/* Records of [op, stream, len] bytes then data: appends and reads. */
static void
ring_ops(const uint8_t *data, size_t size)
{
    struct ring r;
    size_t off = 0;

    ring_init(&r, 1024 + (size > 0 ? data[0] * 16u : 0));
    while (off + 3 <= size) {
        unsigned op = data[off], st = data[off + 1] % 2 + 1;
        size_t n = data[off + 2];

        off += 3;
        if (n > size - off)
            n = size - off;
        if (op & 1) {
            const unsigned char *p;
            size_t len;
            int s;
            uint64_t seq = ring_read(&r, (uint64_t)op * 37, &s, &p, &len);
            volatile unsigned char last = len > 0 ? p[len - 1] : 0;

            (void)last;
            if (seq > r.end || (len > 0 && seq + len > r.end))
                abort();
        } else if (ring_append(&r, (int)st, data + off, n) == 0) {
            off += n;
        }
        if (r.bytes > r.cap && r.head != r.tail)
            abort(); /* only the newest chunk may stand over the cap */
    }
    ring_free(&r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static bool quiet;

    if (!quiet) {
        pd_log_init("fuzz_guest", PD_LOG_ERROR); /* HELLOs log at info */
        quiet = true;
    }
    if (size < 1)
        return 0;
    switch (data[0] % 4) {
    case 0:
        stream(data + 1, size - 1);
        break;
    case 1:
        body(data + 1, size - 1);
        break;
    case 2:
        path(data + 1, size - 1);
        break;
    default:
        ring_ops(data + 1, size - 1);
        break;
    }
    return 0;
}
