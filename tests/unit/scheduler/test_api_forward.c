/*
 * Forwarding's codecs (scheduler/forward.c, included whole so its static
 * helpers can be tested): a FORWARD frame back into HTTP bytes refuses
 * anything that could smuggle a second request or a header, drops
 * hop-by-hop headers and gives a Host to requests without one; the
 * injected response parser handles Content-Length and chunked bodies and
 * refuses garbage; OK frames turn back into responses.
 */
#include "scheduler/forward.c"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

struct field {
    const char *key;
    int kind; /* 0 str, 1 bin, 2 headers, 3 u64 */
    const char *s;
    const char *const (*h)[2];
    size_t nh;
    uint64_t u;
};

/* Builds a frame of type t from fields and decodes it into *m. */
static void
frame(struct pd_msg *m, void **buf, unsigned t, const struct field *f,
      size_t n)
{
    struct pd_enc e;
    size_t len, i, k;
    char err[128];

    pd_enc_begin(&e, t, 9);
    for (i = 0; i < n; i++) {
        switch (f[i].kind) {
        case 0:
            pd_enc_str(&e, f[i].key, f[i].s);
            break;
        case 1:
            pd_enc_bin(&e, f[i].key, f[i].s, strlen(f[i].s));
            break;
        case 2:
            pd_enc_key(&e, f[i].key);
            msgpack_pack_array(&e.pk, f[i].nh);
            for (k = 0; k < f[i].nh; k++) {
                msgpack_pack_array(&e.pk, 2);
                pd_enc_pack_str(&e, f[i].h[k][0]);
                pd_enc_pack_str(&e, f[i].h[k][1]);
            }
            break;
        default:
            pd_enc_u64(&e, f[i].key, f[i].u);
        }
    }
    assert_int_equal(pd_enc_finish(&e, buf, &len), 0);
    assert_int_equal(pd_msg_decode((char *)*buf + 4, len - 4, m, err,
                                   sizeof(err)), 0);
}

static int
to_raw(const char *method, const char *path,
       const char *const (*h)[2], size_t nh, const char *body,
       struct sbuf *raw)
{
    struct field f[] = {
        {"method", 0, method, NULL, 0, 0},
        {"path", 0, path, NULL, 0, 0},
        {"origin", 0, "scheduler 2", NULL, 0, 0},
        {"headers", 2, NULL, h, nh, 0},
        {"body", 1, body, NULL, 0, 0},
    };
    struct pd_msg m;
    void *buf;
    char origin[64], err[160];
    int rv;

    frame(&m, &buf, PD_MSG_FORWARD, f, PD_ARRAY_SIZE(f));
    memset(raw, 0, sizeof(*raw));
    rv = frame_to_raw(&m, raw, origin, sizeof(origin), err, sizeof(err));
    pd_msg_release(&m);
    free(buf);
    return rv;
}

static void
test_frame_to_raw(void **state)
{
    static const char *const h[][2] = {
        {"Host", "a"}, {"Authorization", "Bearer t"},
        {"Transfer-Encoding", "chunked"}, {"Connection", "keep-alive"},
        {"X-Paddock-Internal", "member"},
    };
    static const char *const nohost[][2] = {{"Accept", "*/*"}};
    static const char *const crlf[][2] = {{"Host", "a\r\nX-Evil: 1"}};
    static const char *const colon[][2] = {{"Ho:st", "a"}};
    struct sbuf raw;

    (void)state;
    assert_int_equal(to_raw("POST", "/v1/sandboxes?wait=true", h, 5,
                            "{\"id\":\"a\"}", &raw), 0);
    assert_non_null(strstr(raw.p, "POST /v1/sandboxes?wait=true HTTP/1.1"
                           "\r\n"));
    assert_non_null(strstr(raw.p, "Authorization: Bearer t\r\n"));
    assert_null(strstr(raw.p, "Transfer-Encoding"));
    assert_null(strstr(raw.p, "keep-alive"));
    /* Kept on the leader's side: only the follower strips it from
     * clients (save_req), so a scheduler's own marker gets through. */
    assert_non_null(strstr(raw.p, "X-Paddock-Internal: member\r\n"));
    assert_non_null(strstr(raw.p, "Content-Length: 10\r\nConnection: close"
                           "\r\nX-Paddock-Forwarded-By: scheduler 2\r\n"
                           "\r\n{\"id\":\"a\"}"));
    free(raw.p);

    assert_int_equal(to_raw("GET", "/v1/x", nohost, 1, "", &raw), 0);
    assert_non_null(strstr(raw.p, "Host: paddock\r\n"));
    free(raw.p);

    assert_int_equal(to_raw("GET", "/v1/x", crlf, 1, "", &raw), -EPROTO);
    free(raw.p);
    assert_int_equal(to_raw("GET", "/v1/x", colon, 1, "", &raw), -EPROTO);
    free(raw.p);
    assert_int_equal(to_raw("GET /x HTTP/1.1\r\n", "/", h, 1, "", &raw),
                     -EPROTO);
    free(raw.p);
    assert_int_equal(to_raw("GET", "/a b", h, 1, "", &raw), -EPROTO);
    free(raw.p);
    assert_int_equal(to_raw("GET", "x", h, 1, "", &raw), -EPROTO);
    free(raw.p);
}

static void
test_resp_parse(void **state)
{
    static const char plain[] =
        "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
        "Retry-After: 1\r\nContent-Length: 7\r\nConnection: close\r\n\r\n"
        "{\"a\":1}";
    static const char chunked[] =
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        "3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n";
    struct resp x;
    size_t i;
    bool ra = false;

    (void)state;
    assert_int_equal(resp_parse(plain, strlen(plain), &x), 0);
    assert_int_equal(x.status, 201);
    assert_int_equal(x.body.len, 7);
    assert_memory_equal(x.body.p, "{\"a\":1}", 7);
    for (i = 0; i < x.nh; i++)
        ra |= strcmp(x.hname[i], "Retry-After") == 0 &&
              strcmp(x.hvalue[i], "1") == 0;
    assert_true(ra);
    resp_free(&x);

    assert_int_equal(resp_parse(chunked, strlen(chunked), &x), 0);
    assert_int_equal(x.status, 200);
    assert_int_equal(x.body.len, 7);
    assert_memory_equal(x.body.p, "abcdefg", 7);
    resp_free(&x);

    assert_int_equal(resp_parse("garbage", 7, &x), -EPROTO);
    resp_free(&x);
    assert_int_equal(resp_parse("", 0, &x), -EPROTO);
    resp_free(&x);
}

static void
test_msg_to_resp(void **state)
{
    static const char *const h[][2] = {
        {"Content-Type", "application/json"}, {"Bad\r\nName", "x"},
    };
    struct field ok[] = {
        {"status", 3, NULL, NULL, 0, 409},
        {"headers", 2, NULL, h, 2, 0},
        {"body", 1, "{}", NULL, 0, 0},
    };
    struct field bad[] = {
        {"status", 3, NULL, NULL, 0, 99},
        {"headers", 2, NULL, h, 0, 0},
    };
    struct pd_msg m;
    struct resp x;
    void *buf;

    (void)state;
    frame(&m, &buf, PD_MSG_OK, ok, PD_ARRAY_SIZE(ok));
    assert_int_equal(msg_to_resp(&m, &x), 0);
    assert_int_equal(x.status, 409);
    assert_int_equal(x.nh, 1); /* the header with CRLF is dropped */
    assert_string_equal(x.hname[0], "Content-Type");
    assert_int_equal(x.body.len, 2);
    resp_free(&x);
    pd_msg_release(&m);
    free(buf);

    frame(&m, &buf, PD_MSG_OK, bad, PD_ARRAY_SIZE(bad));
    assert_int_equal(msg_to_resp(&m, &x), -EPROTO);
    pd_msg_release(&m);
    free(buf);
}

static void
test_hop_headers(void **state)
{
    (void)state;
    assert_true(hop_header("Content-Length"));
    assert_true(hop_header("transfer-encoding"));
    assert_true(hop_header("X-Paddock-Forwarded-By"));
    assert_false(hop_header("Authorization"));
    assert_false(hop_header("Content-Type"));
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_frame_to_raw),
        cmocka_unit_test(test_resp_parse),
        cmocka_unit_test(test_msg_to_resp),
        cmocka_unit_test(test_hop_headers),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
