/*
 * scheduler/preview_token.c and ratelimit.c: preview tokens (alphabet,
 * length, randomness, hashing, the constant-time check), the Host parser
 * against every malformed host of the issue, URLs; and the token buckets
 * under a fake clock (burst, refill, Retry-After, fractions, a clock that
 * goes backwards, peek, bounded memory with LRU eviction).
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <openssl/sha.h>

#include "common/util.h"
#include "scheduler/preview.h"
#include "scheduler/ratelimit.h"

#define DOM "preview.localhost"
#define TOK "abcdefghijklmnopqrstuvwxyz"

static void
test_token_new(void **state)
{
    char a[SCHED_PREVIEW_TOKEN_LEN + 1], b[SCHED_PREVIEW_TOKEN_LEN + 1];

    (void)state;
    assert_int_equal(sched_preview_token_new(a), 0);
    assert_int_equal(sched_preview_token_new(b), 0);
    assert_int_equal(strlen(a), SCHED_PREVIEW_TOKEN_LEN);
    assert_true(sched_preview_token_valid(a, strlen(a)));
    assert_string_not_equal(a, b);
    for (size_t i = 0; i < SCHED_PREVIEW_TOKEN_LEN; i++)
        assert_non_null(strchr("abcdefghijklmnopqrstuvwxyz234567", a[i]));
    assert_false(sched_preview_token_valid("abc", 3));
    assert_false(sched_preview_token_valid("ABCDEFGHIJKLMNOPQRSTUVWXYZ",
                                           26));
    assert_false(sched_preview_token_valid("abcdefghijklmnopqrstuvwxy1",
                                           26));
    assert_false(sched_preview_token_valid("abcdefghijklmnopqrstuvwxy8",
                                           26));
}

static void
test_hash_and_match(void **state)
{
    unsigned char d[SHA256_DIGEST_LENGTH];
    char hex[SCHED_PREVIEW_HASH_LEN + 1], want[SCHED_PREVIEW_HASH_LEN + 1];

    (void)state;
    sched_preview_token_hash(TOK, hex);
    SHA256((const unsigned char *)TOK, strlen(TOK), d);
    pd_hex(d, sizeof(d), want);
    assert_string_equal(hex, want);
    assert_true(sched_preview_token_matches(TOK, hex));
    assert_false(sched_preview_token_matches("bbcdefghijklmnopqrstuvwxyz",
                                             hex));
    assert_false(sched_preview_token_matches(TOK, ""));
    assert_false(sched_preview_token_matches(TOK, "zz"));
    assert_false(sched_preview_token_matches("short", hex));
    hex[0] = hex[0] == 'a' ? 'b' : 'a';
    assert_false(sched_preview_token_matches(TOK, hex));
}

static void
test_parse_good(void **state)
{
    struct sched_preview_host h;
    const char *host = "8080-my-box-1-" TOK "." DOM;

    (void)state;
    assert_int_equal(sched_preview_parse_host(host, strlen(host), DOM, &h),
                     0);
    assert_int_equal(h.port, 8080);
    assert_string_equal(h.sandbox, "my-box-1");
    assert_string_equal(h.token, TOK);
    host = "1-A-" "ABCDEFGHIJKLMNOPQRSTUVWXYZ" ".PREVIEW.LOCALHOST:8180";
    assert_int_equal(sched_preview_parse_host(host, strlen(host), DOM, &h),
                     0);
    assert_int_equal(h.port, 1);
    assert_string_equal(h.sandbox, "a");
    host = "65535-b-" TOK "." DOM;
    assert_int_equal(sched_preview_parse_host(host, strlen(host), DOM, &h),
                     0);
    assert_int_equal(h.port, 65535);
}

static void
test_parse_bad(void **state)
{
    struct sched_preview_host h;
    char big[SCHED_PREVIEW_HOST_MAX + 16];
    const char *bad[] = {
        "",
        DOM,
        "8080-box-" TOK,                          /* no domain */
        "x.8080-box-" TOK "." DOM,                /* extra label first */
        "8080-box-" TOK ".x." DOM,                /* extra label inside */
        "8080-box-" TOK "." DOM ".",              /* trailing dot */
        "8080-box-" TOK ".evil.com",
        "8080-box-" TOK "." DOM ".evil.com",
        "8080-box-" TOK ".xpreview.localhost",
        "0-box-" TOK "." DOM,
        "65536-box-" TOK "." DOM,
        "08080-box-" TOK "." DOM,
        "80a-box-" TOK "." DOM,
        "-box-" TOK "." DOM,
        "8080--" TOK "." DOM,                     /* empty id */
        "8080-" TOK "." DOM,                      /* no id at all */
        "8080--box-" TOK "." DOM,                 /* id starts with - */
        "8080-bo_x-" TOK "." DOM,
        "8080-box-" "abcdefghijklmnopqrstuvwxy" "." DOM,   /* 25 chars */
        "8080-box-" "abcdefghijklmnopqrstuvwxyz2" "." DOM, /* 27 chars */
        "8080-box-" "abcdefghijklmnopqrstuvwxy1" "." DOM,
        "8080-box" TOK "." DOM,                   /* no dash before token */
        "8080-box-" TOK "." DOM ":0",
        "8080-box-" TOK "." DOM ":99999",
        "8080-box-" TOK "." DOM ":80:80",
        "8080-box-" TOK "." DOM ":",
        "[::1]:8080",
        "8080-box-" TOK "." DOM " ",
        "8080-box-" TOK "." DOM "\r\nX: y",
    };

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int rc = sched_preview_parse_host(bad[i], strlen(bad[i]), DOM, &h);

        if (rc != -ENOENT)
            fail_msg("\"%s\" parsed (port %u, id %s)", bad[i], h.port,
                     h.sandbox);
        assert_int_equal(h.port, 0);
        assert_string_equal(h.sandbox, "");
    }
    /* Longer than the parser looks at. */
    memset(big, 'a', sizeof(big));
    big[sizeof(big) - 1] = '\0';
    assert_int_equal(sched_preview_parse_host(big, strlen(big), DOM, &h),
                     -ENOENT);
    /* A NUL inside the length is not the end of the host. */
    assert_int_equal(sched_preview_parse_host("8080-box-" TOK "\0." DOM,
                                              strlen("8080-box-" TOK) + 1 +
                                              strlen("." DOM), DOM, &h),
                     -ENOENT);
    assert_int_equal(sched_preview_parse_host(NULL, 0, DOM, &h), -ENOENT);
    assert_int_equal(sched_preview_parse_host("a", 1, "", &h), -ENOENT);
}

static void
test_url(void **state)
{
    char out[256];

    (void)state;
    assert_int_equal(sched_preview_url(out, sizeof(out), "http", 8080, "box",
                                       TOK, DOM, 8180),
                     (int)strlen("http://8080-box-" TOK "." DOM ":8180"));
    assert_string_equal(out, "http://8080-box-" TOK "." DOM ":8180");
    assert_int_equal(sched_preview_url(out, sizeof(out), "https", 1, "a",
                                       TOK, DOM, 0), (int)strlen(
                                           "https://1-a-" TOK "." DOM));
    assert_int_equal(sched_preview_url(out, 10, "http", 80, "box", TOK, DOM,
                                       0), -ENOSPC);
    assert_int_equal(sched_preview_url(out, sizeof(out), "http", 80, "BOX",
                                       TOK, DOM, 0), -EINVAL);
    assert_int_equal(sched_preview_url(out, sizeof(out), "http", 80, "box",
                                       "short", DOM, 0), -EINVAL);
    assert_int_equal(sched_preview_url(out, sizeof(out), "http", 0, "box",
                                       TOK, DOM, 0), -EINVAL);
}

/* ---- rate limiter ------------------------------------------------------- */

static void
test_rl_burst_and_refill(void **state)
{
    struct sched_ratelimit *rl;
    uint64_t t = 1000000;

    (void)state;
    assert_int_equal(sched_ratelimit_new(2.0, 3, 16, &rl), 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(sched_ratelimit_take(rl, "k", t), 0);
    assert_int_equal(sched_ratelimit_peek(rl, "k", t), 1);
    assert_int_equal(sched_ratelimit_take(rl, "k", t), 1);
    /* Another key has its own bucket. */
    assert_int_equal(sched_ratelimit_take(rl, "other", t), 0);
    assert_int_equal(sched_ratelimit_peek(rl, "unseen", t), 0);
    /* 2 per second: one token back after 500 ms. */
    assert_int_equal(sched_ratelimit_take(rl, "k", t + 499), 1);
    assert_int_equal(sched_ratelimit_take(rl, "k", t + 500), 0);
    assert_int_equal(sched_ratelimit_take(rl, "k", t + 500), 1);
    /* Full again after a long pause, never above the burst. */
    for (int i = 0; i < 3; i++)
        assert_int_equal(sched_ratelimit_take(rl, "k", t + 60000), 0);
    assert_int_equal(sched_ratelimit_take(rl, "k", t + 60000), 1);
    /* A clock that goes backwards refills nothing. */
    assert_int_equal(sched_ratelimit_take(rl, "k", t), 1);
    sched_ratelimit_free(rl);
}

static void
test_rl_retry_after(void **state)
{
    struct sched_ratelimit *rl;

    (void)state;
    assert_int_equal(sched_ratelimit_new(0.25, 1, 4, &rl), 0);
    assert_int_equal(sched_ratelimit_take(rl, "k", 0), 0);
    assert_int_equal(sched_ratelimit_take(rl, "k", 0), 4);
    assert_int_equal(sched_ratelimit_peek(rl, "k", 1000), 3);
    assert_int_equal(sched_ratelimit_take(rl, "k", 2500), 2);
    assert_int_equal(sched_ratelimit_take(rl, "k", 4000), 0);
    sched_ratelimit_free(rl);
    assert_int_equal(sched_ratelimit_new(0, 1, 4, &rl), -EINVAL);
    assert_int_equal(sched_ratelimit_new(1, 0, 4, &rl), -EINVAL);
    assert_int_equal(sched_ratelimit_new(1, 1, 0, &rl), -EINVAL);
}

static void
test_rl_bounded(void **state)
{
    struct sched_ratelimit *rl;
    char key[32];

    (void)state;
    assert_int_equal(sched_ratelimit_new(1.0, 1, 8, &rl), 0);
    for (int i = 0; i < 1000; i++) {
        snprintf(key, sizeof(key), "key-%d", i);
        assert_int_equal(sched_ratelimit_take(rl, key, 0), 0);
    }
    assert_int_equal(sched_ratelimit_size(rl), 8);
    assert_int_equal(sched_ratelimit_evictions(rl), 992);
    /* The most recent keys are still remembered... */
    assert_int_equal(sched_ratelimit_take(rl, "key-999", 0), 1);
    /* ...the oldest were forgotten (and forgiven). */
    assert_int_equal(sched_ratelimit_take(rl, "key-0", 0), 0);
    /* Keys longer than the cap are cut, not overrun. */
    char longkey[200];
    memset(longkey, 'x', sizeof(longkey) - 1);
    longkey[sizeof(longkey) - 1] = '\0';
    assert_int_equal(sched_ratelimit_take(rl, longkey, 0), 0);
    longkey[150] = 'y'; /* beyond the cap: the same bucket */
    assert_int_equal(sched_ratelimit_take(rl, longkey, 0), 1);
    sched_ratelimit_free(rl);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_token_new),
        cmocka_unit_test(test_hash_and_match),
        cmocka_unit_test(test_parse_good),
        cmocka_unit_test(test_parse_bad),
        cmocka_unit_test(test_url),
        cmocka_unit_test(test_rl_burst_and_refill),
        cmocka_unit_test(test_rl_retry_after),
        cmocka_unit_test(test_rl_bounded),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
