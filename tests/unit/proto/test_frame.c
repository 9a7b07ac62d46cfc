/* The frame codec: round trips, and every hostile input of the Foundation
 * issue rejected without a crash, an over-read or a large allocation. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "proto/frame.h"

static void
encode_exec(void **buf, size_t *len)
{
    static const char *const argv[] = {"/bin/echo", "hello", "world"};
    struct pd_enc e;

    pd_enc_begin(&e, PD_MSG_EXEC, 42);
    pd_enc_strv(&e, "argv", argv, 3);
    pd_enc_str(&e, "cwd", "/workspace");
    pd_enc_u64(&e, "timeout_ms", 30000);
    pd_enc_i64(&e, "neg", -5);
    pd_enc_bool(&e, "stream", true);
    pd_enc_bin(&e, "stdin", "in\0put", 6);
    pd_enc_nil(&e, "nothing");
    assert_int_equal(pd_enc_finish(&e, buf, len), 0);
}

static int
decode_all(const void *frame, size_t len, struct pd_decoder *d,
           const struct pd_msg **m)
{
    pd_decoder_init(d, 0);
    assert_int_equal(pd_decoder_feed(d, frame, len), 0);
    return pd_decoder_next(d, m);
}

static void
test_round_trip(void **state)
{
    const struct pd_msg *m;
    struct pd_decoder d;
    const msgpack_object_array *arr;
    const void *bin;
    char cwd[64], **argv = NULL;
    uint64_t u;
    int64_t i;
    bool b;
    size_t n, len;
    void *buf;

    (void)state;
    encode_exec(&buf, &len);
    assert_int_equal(decode_all(buf, len, &d, &m), 1);
    assert_int_equal(m->type, PD_MSG_EXEC);
    assert_int_equal(m->id, 42);
    assert_int_equal(pd_msg_array(m, "argv", &arr), 0);
    assert_int_equal(arr->size, 3);
    assert_int_equal(pd_obj_strv(pd_msg_field(m, "argv"), &argv, 16), 0);
    assert_string_equal(argv[2], "world");
    assert_null(argv[3]);
    pd_strv_free(argv);
    assert_int_equal(pd_msg_cstr(m, "cwd", cwd, sizeof(cwd)), 0);
    assert_string_equal(cwd, "/workspace");
    assert_int_equal(pd_msg_u64(m, "timeout_ms", &u), 0);
    assert_int_equal(u, 30000);
    assert_int_equal(pd_msg_i64(m, "neg", &i), 0);
    assert_int_equal(i, -5);
    assert_int_equal(pd_msg_bool(m, "stream", &b), 0);
    assert_true(b);
    assert_int_equal(pd_msg_bin(m, "stdin", &bin, &n), 0);
    assert_int_equal(n, 6);
    assert_memory_equal(bin, "in\0put", 6);
    assert_int_equal(pd_msg_u64(m, "nothing", &u), -ENOENT);
    assert_int_equal(pd_msg_u64(m, "absent", &u), -ENOENT);
    /* No second frame. */
    assert_int_equal(pd_decoder_next(&d, &m), 0);
    pd_decoder_free(&d);
    free(buf);
}

static void
test_wrong_types(void **state)
{
    const struct pd_msg *m;
    struct pd_decoder d;
    char small[4];
    uint64_t u;
    bool b;
    size_t len;
    void *buf;
    struct pd_enc e;
    const char *s;
    size_t n;

    (void)state;
    pd_enc_begin(&e, PD_MSG_FILE_READ, 1);
    pd_enc_str(&e, "timeout_ms", "soon");
    pd_enc_u64(&e, "path", 7);
    pd_enc_strn(&e, "nul", "a\0b", 3);
    pd_enc_str(&e, "long", "abcdefgh");
    pd_enc_i64(&e, "neg", -1);
    assert_int_equal(pd_enc_finish(&e, &buf, &len), 0);
    assert_int_equal(decode_all(buf, len, &d, &m), 1);
    assert_int_equal(pd_msg_u64(m, "timeout_ms", &u), -EPROTO);
    assert_int_equal(pd_msg_str(m, "path", &s, &n), -EPROTO);
    assert_int_equal(pd_msg_bool(m, "path", &b), -EPROTO);
    assert_int_equal(pd_msg_cstr(m, "nul", small, sizeof(small)), -EINVAL);
    assert_int_equal(pd_msg_cstr(m, "long", small, sizeof(small)),
                     -ENAMETOOLONG);
    assert_int_equal(pd_msg_u64(m, "neg", &u), -EPROTO);
    pd_decoder_free(&d);
    free(buf);
}

static void
test_frame_over_cap(void **state)
{
    /* A length prefix of 0xffffffff: refused from the 4 header bytes
     * alone, before anything is buffered for the body. */
    const unsigned char hdr[] = {0xff, 0xff, 0xff, 0xff, 0xdf};
    const struct pd_msg *m;
    struct pd_decoder d;

    (void)state;
    assert_int_equal(decode_all(hdr, sizeof(hdr), &d, &m), -EMSGSIZE);
    assert_non_null(strstr(d.err, "cap"));
    assert_true(d.cap < 64 * 1024);
    pd_decoder_free(&d);

    /* A zero-length frame is not a frame either. */
    const unsigned char zero[] = {0, 0, 0, 0};
    assert_int_equal(decode_all(zero, sizeof(zero), &d, &m), -EMSGSIZE);
    pd_decoder_free(&d);
}

static void
test_encoder_cap(void **state)
{
    size_t big = PD_FRAME_MAX;
    char *p = calloc(1, big);
    struct pd_enc e;
    void *buf;
    size_t len;

    (void)state;
    pd_enc_begin(&e, PD_MSG_DATA, 1);
    pd_enc_bin(&e, "data", p, big);
    assert_int_equal(pd_enc_finish(&e, &buf, &len), -EMSGSIZE);
    free(p);
}

static void
test_truncated_every_offset(void **state)
{
    const struct pd_msg *m;
    struct pd_decoder d;
    unsigned char *frame;
    size_t len;
    void *buf;

    (void)state;
    encode_exec(&buf, &len);
    frame = buf;

    /* A prefix of a good frame is never a frame: the decoder waits. */
    for (size_t cut = 0; cut < len; cut++) {
        assert_int_equal(decode_all(frame, cut, &d, &m), 0);
        pd_decoder_free(&d);
    }

    /* A body cut short at every offset, with a length prefix that matches
     * the cut, must be refused, never read past. Copies sized exactly so
     * ASan catches an over-read. */
    for (size_t cut = 1; cut < len - 4; cut++) {
        unsigned char *copy = malloc(4 + cut);

        memcpy(copy, frame, 4 + cut);
        copy[0] = (unsigned char)(cut >> 24);
        copy[1] = (unsigned char)(cut >> 16);
        copy[2] = (unsigned char)(cut >> 8);
        copy[3] = (unsigned char)cut;
        assert_true(decode_all(copy, 4 + cut, &d, &m) < 0);
        pd_decoder_free(&d);
        free(copy);
    }
    free(buf);
}

/* Builds a frame of a raw msgpack body. */
static unsigned char *
raw_frame(const unsigned char *body, size_t n, size_t *len)
{
    unsigned char *p = malloc(n + 4);

    p[0] = (unsigned char)(n >> 24);
    p[1] = (unsigned char)(n >> 16);
    p[2] = (unsigned char)(n >> 8);
    p[3] = (unsigned char)n;
    memcpy(p + 4, body, n);
    *len = n + 4;
    return p;
}

static void
expect_reject(const unsigned char *body, size_t n, const char *why)
{
    const struct pd_msg *m;
    struct pd_decoder d;
    unsigned char *f;
    size_t len;

    f = raw_frame(body, n, &len);
    assert_true(decode_all(f, len, &d, &m) < 0);
    if (why != NULL && strstr(d.err, why) == NULL)
        fail_msg("reason \"%s\" lacks \"%s\"", d.err, why);
    pd_decoder_free(&d);
    free(f);
}

static void
test_huge_counts(void **state)
{
    /* array32 claiming 4 billion elements with 3 bytes left. */
    const unsigned char arr32[] = {0xdd, 0xff, 0xff, 0xff, 0xff, 1, 2, 3};
    /* map32 claiming 2^31 pairs. */
    const unsigned char map32[] = {0xdf, 0x80, 0, 0, 0, 1, 2};
    /* A good map whose nested array16 lies about its count. */
    const unsigned char nested[] = {0x81, 0xa1, 'a', 0xdc, 0xff, 0xff, 1};
    /* str32 longer than the frame. */
    const unsigned char str32[] = {0x81, 0xa1, 'a', 0xdb, 0, 0, 1, 0, 'x'};

    (void)state;
    expect_reject(arr32, sizeof(arr32), "count exceeds");
    expect_reject(map32, sizeof(map32), "count exceeds");
    expect_reject(nested, sizeof(nested), "count exceeds");
    expect_reject(str32, sizeof(str32), "past the frame");
}

static void
test_nesting(void **state)
{
    unsigned char body[64];
    size_t n = 0;

    (void)state;
    /* {"t": 8, "id": 1, "x": [[[[[[[[[[1]]]]]]]]]]} */
    body[n++] = 0x83;
    body[n++] = 0xa1;
    body[n++] = 't';
    body[n++] = 8;
    body[n++] = 0xa2;
    body[n++] = 'i';
    body[n++] = 'd';
    body[n++] = 1;
    body[n++] = 0xa1;
    body[n++] = 'x';
    for (int i = 0; i < PD_NEST_MAX + 2; i++)
        body[n++] = 0x91;
    body[n++] = 1;
    expect_reject(body, n, "nesting");
}

static void
test_bad_shapes(void **state)
{
    /* Not a map. */
    const unsigned char arr[] = {0x92, 1, 2};
    /* Map without "t". */
    const unsigned char not[] = {0x81, 0xa2, 'i', 'd', 1};
    /* Unknown type 9999. */
    const unsigned char unk[] = {0x82, 0xa1, 't', 0xcd, 0x27, 0x0f,
                                 0xa2, 'i',  'd', 1};
    /* "t" of the wrong type. */
    const unsigned char tstr[] = {0x82, 0xa1, 't', 0xa1, 'x', 0xa2, 'i', 'd',
                                  1};
    /* Trailing bytes after the map. */
    const unsigned char trail[] = {0x82, 0xa1, 't', 8, 0xa2, 'i', 'd', 1, 0};
    /* Reserved byte and ext type. */
    const unsigned char c1[] = {0x81, 0xa1, 'a', 0xc1};
    const unsigned char ext[] = {0x81, 0xa1, 'a', 0xd4, 1, 1};

    (void)state;
    expect_reject(arr, sizeof(arr), "not a map");
    expect_reject(not, sizeof(not), "\"t\"");
    expect_reject(unk, sizeof(unk), "unknown message type");
    expect_reject(tstr, sizeof(tstr), "\"t\"");
    expect_reject(trail, sizeof(trail), "trailing");
    expect_reject(c1, sizeof(c1), "reserved");
    expect_reject(ext, sizeof(ext), "ext");
}

static void
test_many_frames_split(void **state)
{
    /* Ten frames fed one byte at a time come out whole and in order. */
    struct pd_decoder d;
    const struct pd_msg *m;
    unsigned char all[4096];
    size_t total = 0, got = 0;

    (void)state;
    for (int i = 0; i < 10; i++) {
        struct pd_enc e;
        void *buf;
        size_t len;

        pd_enc_begin(&e, PD_MSG_PING, (uint64_t)i + 1);
        assert_int_equal(pd_enc_finish(&e, &buf, &len), 0);
        memcpy(all + total, buf, len);
        total += len;
        free(buf);
    }
    pd_decoder_init(&d, 0);
    for (size_t i = 0; i < total; i++) {
        assert_int_equal(pd_decoder_feed(&d, all + i, 1), 0);
        while (pd_decoder_next(&d, &m) == 1) {
            got++;
            assert_int_equal(m->id, got);
        }
    }
    assert_int_equal(got, 10);
    pd_decoder_free(&d);
}

static void
test_random_garbage(void **state)
{
    /* Deterministic noise: never a crash, never more than a frame. */
    uint32_t x = 12345;
    unsigned char buf[512];

    (void)state;
    for (int round = 0; round < 20000; round++) {
        struct pd_decoder d;
        const struct pd_msg *m;
        size_t n = 8 + (x % 500);

        for (size_t i = 0; i < n; i++) {
            x = x * 1103515245u + 12345u;
            buf[i] = (unsigned char)(x >> 16);
        }
        /* Keep the length plausible half of the time. */
        if (round & 1) {
            buf[0] = buf[1] = 0;
            buf[2] = (unsigned char)((n - 4) >> 8);
            buf[3] = (unsigned char)(n - 4);
            buf[4] = 0x80 | (buf[4] & 0x0f);
        }
        pd_decoder_init(&d, 0);
        pd_decoder_feed(&d, buf, n);
        while (pd_decoder_next(&d, &m) > 0)
            ;
        pd_decoder_free(&d);
    }
}

static void
test_errno_names(void **state)
{
    (void)state;
    assert_string_equal(pd_errno_name(ENOENT), "ENOENT");
    assert_string_equal(pd_errno_name(-ENOSPC), "ENOSPC");
    assert_int_equal(pd_errno_from_name("EISDIR", 6), EISDIR);
    assert_int_equal(pd_errno_from_name("EBOGUS", 6), EIO);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_wrong_types),
        cmocka_unit_test(test_frame_over_cap),
        cmocka_unit_test(test_encoder_cap),
        cmocka_unit_test(test_truncated_every_offset),
        cmocka_unit_test(test_huge_counts),
        cmocka_unit_test(test_nesting),
        cmocka_unit_test(test_bad_shapes),
        cmocka_unit_test(test_many_frames_split),
        cmocka_unit_test(test_random_garbage),
        cmocka_unit_test(test_errno_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
