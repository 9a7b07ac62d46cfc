/* libFuzzer target for forwarding's codecs (scheduler/forward.c, included
 * whole for its static helpers): a FORWARD frame becomes at most one HTTP
 * request (never a smuggled second one), and OK frames and injected
 * responses decode without a crash, a leak or an over-read. */
#include "scheduler/forward.c"

#include <stdint.h>

/*
 * Byte 0 picks the decoder: 0 FORWARD frame to HTTP bytes, 1 OK frame to
 * a response, 2 the injected response parser on raw bytes. For 0 and 1
 * the rest is the msgpack body of a frame (no length prefix).
 */

static unsigned completes;

static int
count_complete(http_parser *p)
{
    (void)p;
    completes++;
    return 0;
}

/* The bytes a FORWARD frame became hold one request, or fail to parse. */
static void
check_one_request(const char *raw, size_t len)
{
    http_parser_settings st;
    http_parser p;
    size_t n;

    memset(&st, 0, sizeof(st));
    st.on_message_complete = count_complete;
    http_parser_init(&p, HTTP_REQUEST);
    completes = 0;
    n = http_parser_execute(&p, &st, raw, len);
    if (HTTP_PARSER_ERRNO(&p) != HPE_OK || p.upgrade)
        return; /* refused by the leader's server as a bad request */
    if (completes != 1 || n != len)
        abort(); /* a second request or a truncated one */
}

static void
forward(const uint8_t *data, size_t size)
{
    struct sbuf raw = {0};
    struct pd_msg m;
    char err[256], origin[128];

    if (pd_msg_decode(data, size, &m, err, sizeof(err)) != 0)
        return;
    if (frame_to_raw(&m, &raw, origin, sizeof(origin), err,
                     sizeof(err)) == 0) {
        if (raw.p == NULL)
            abort();
        check_one_request(raw.p, raw.len);
    }
    free(raw.p);
    pd_msg_release(&m);
}

static void
ok_frame(const uint8_t *data, size_t size)
{
    struct pd_msg m;
    struct resp x;
    char err[256];

    if (pd_msg_decode(data, size, &m, err, sizeof(err)) != 0)
        return;
    if (msg_to_resp(&m, &x) == 0) {
        if (x.status < 100 || x.status > 599)
            abort();
        for (size_t i = 0; i < x.nh; i++)
            if (strpbrk(x.hname[i], "\r\n") || strpbrk(x.hvalue[i], "\r\n"))
                abort(); /* a header that would split the answer */
        resp_free(&x);
    }
    pd_msg_release(&m);
}

static void
injected(const uint8_t *data, size_t size)
{
    struct resp x;

    /* These bytes come from this member's own server, so any status the
     * parser takes is passed on; the follower range-checks it in the OK
     * frame (msg_to_resp). */
    if (resp_parse((const char *)data, size, &x) == 0 && x.status <= 0)
        abort();
    resp_free(&x);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    switch (data[0] % 3) {
    case 0:
        forward(data + 1, size - 1);
        break;
    case 1:
        ok_frame(data + 1, size - 1);
        break;
    default:
        injected(data + 1, size - 1);
        break;
    }
    return 0;
}
