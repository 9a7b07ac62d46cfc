/* common/: id validation, parsing of durations and sizes, config files
 * and flags with errors that name file, line and key. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/config.h"
#include "common/log.h"
#include "common/util.h"

static void
test_ids(void **state)
{
    char long_id[80];

    (void)state;
    assert_true(pd_id_valid("a"));
    assert_true(pd_id_valid("web-1"));
    assert_true(pd_id_valid("0abc-def"));
    assert_false(pd_id_valid(""));
    assert_false(pd_id_valid("-abc"));
    assert_false(pd_id_valid("Abc"));
    assert_false(pd_id_valid("a_b"));
    assert_false(pd_id_valid("a/../b"));
    assert_false(pd_id_valid("a b"));
    assert_false(pd_id_valid(NULL));
    memset(long_id, 'a', 63);
    long_id[63] = '\0';
    assert_true(pd_id_valid(long_id));
    long_id[63] = 'a';
    long_id[64] = '\0';
    assert_false(pd_id_valid(long_id));
    assert_false(pd_id_valid_n("ab\0c", 4));
}

static void
test_durations_sizes(void **state)
{
    uint64_t v;

    (void)state;
    assert_int_equal(pd_parse_duration_ms("1500ms", &v), 0);
    assert_int_equal(v, 1500);
    assert_int_equal(pd_parse_duration_ms("5s", &v), 0);
    assert_int_equal(v, 5000);
    assert_int_equal(pd_parse_duration_ms("7", &v), 0);
    assert_int_equal(v, 7000);
    assert_int_equal(pd_parse_duration_ms("1h", &v), 0);
    assert_int_equal(v, 3600000);
    assert_int_equal(pd_parse_duration_ms("2d", &v), 0);
    assert_int_equal(pd_parse_duration_ms("1x", &v), -EINVAL);
    assert_int_equal(pd_parse_duration_ms("", &v), -EINVAL);
    assert_int_equal(pd_parse_duration_ms("-1s", &v), -EINVAL);
    assert_int_equal(pd_parse_duration_ms("99999999999999999999h", &v),
                     -ERANGE);
    assert_int_equal(pd_parse_size("512M", &v), 0);
    assert_int_equal(v, 512u << 20);
    assert_int_equal(pd_parse_size("4GiB", &v), 0);
    assert_int_equal(v, 4ull << 30);
    assert_int_equal(pd_parse_size("10", &v), 0);
    assert_int_equal(v, 10);
    assert_int_equal(pd_parse_size("10Q", &v), -EINVAL);
    assert_int_equal(pd_parse_size("17179869184T", &v), -ERANGE);
}

static void
test_misc(void **state)
{
    unsigned char a[16], b[16];
    char hex[33], small[4];

    (void)state;
    assert_int_equal(pd_random_bytes(a, sizeof(a)), 0);
    memcpy(b, a, sizeof(a));
    assert_true(pd_ct_equal(a, b, sizeof(a)));
    b[15] ^= 1;
    assert_false(pd_ct_equal(a, b, sizeof(a)));
    pd_hex("\x01\xab", 2, hex);
    assert_string_equal(hex, "01ab");
    assert_int_equal(pd_strlcpy(small, "abcdef", sizeof(small)), 6);
    assert_string_equal(small, "abc");
    assert_true(pd_label_valid("team", 63));
    assert_false(pd_label_valid("a=b", 63));
    assert_false(pd_label_valid("", 63));
    assert_false(pd_label_valid("x y", 63));
}

struct cfg {
    char *name;
    int64_t count;
    uint64_t mem;
    uint64_t grace;
    bool on;
    char *list;
};

static struct cfg C;

static const struct pd_config_opt opts[] = {
    {"name", PD_CFG_STRING, &C.name, "a name"},
    {"count", PD_CFG_INT, &C.count, "a count"},
    {"memory-reserve", PD_CFG_SIZE, &C.mem, "memory"},
    {"grace", PD_CFG_DURATION, &C.grace, "grace period"},
    {"on", PD_CFG_BOOL, &C.on, "switch"},
    {"peer", PD_CFG_LIST, &C.list, "peers"},
    {NULL, 0, NULL, NULL},
};

static char *
write_tmp(const char *text)
{
    static char path[64];
    int fd;

    snprintf(path, sizeof(path), "/tmp/pd-cfg-XXXXXX");
    fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    return path;
}

static void
test_config(void **state)
{
    char err[512];
    char *path = write_tmp("# comment\n\nname = \"alpha\"\ncount=3\n"
                           "memory_reserve = 1G\ngrace = 5s\non = yes\n"
                           "peer = a\n");
    char *argv[] = {"prog", "--config", path, "--count", "9", "--on=false",
                    "--peer", "b", NULL};
    int rv;

    (void)state;
    memset(&C, 0, sizeof(C));
    rv = pd_config_load(opts, 8, argv, NULL, NULL, err, sizeof(err));
    assert_int_equal(rv, 0);
    assert_string_equal(C.name, "alpha");
    assert_int_equal(C.count, 9); /* the flag wins */
    assert_int_equal(C.mem, 1ull << 30);
    assert_int_equal(C.grace, 5000);
    assert_false(C.on);
    assert_string_equal(C.list, "a,b");
    pd_config_free(opts);
    unlink(path);
}

static void
test_config_errors(void **state)
{
    char err[512];
    char *path = write_tmp("name = x\ngrace = soon\n");
    char *argv[] = {"prog", "--config", path, NULL};
    char *argv2[] = {"prog", "--bogus", "1", NULL};
    char *argv3[] = {"prog", "--check-config", NULL};
    char *argv4[] = {"prog", "--count", NULL};
    int rv;

    (void)state;
    memset(&C, 0, sizeof(C));
    rv = pd_config_load(opts, 3, argv, NULL, NULL, err, sizeof(err));
    assert_true(rv < 0);
    assert_non_null(strstr(err, path));
    assert_non_null(strstr(err, ":2:"));
    assert_non_null(strstr(err, "grace"));
    unlink(path);

    path = write_tmp("nonsense line\n");
    argv[2] = path;
    assert_true(pd_config_load(opts, 3, argv, NULL, NULL, err,
                               sizeof(err)) < 0);
    assert_non_null(strstr(err, ":1:"));
    unlink(path);

    path = write_tmp("unknown_key = 1\n");
    argv[2] = path;
    assert_true(pd_config_load(opts, 3, argv, NULL, NULL, err,
                               sizeof(err)) < 0);
    assert_non_null(strstr(err, "unknown_key"));
    unlink(path);

    assert_true(pd_config_load(opts, 3, argv2, NULL, NULL, err,
                               sizeof(err)) < 0);
    assert_non_null(strstr(err, "--bogus"));
    assert_int_equal(pd_config_load(opts, 2, argv3, NULL, NULL, err,
                                    sizeof(err)), 1);
    assert_true(pd_config_load(opts, 2, argv4, NULL, NULL, err,
                               sizeof(err)) < 0);
    pd_config_free(opts);
}

static void
test_trace_env(void **state)
{
    (void)state;
    unsetenv("PADDOCK_TRACE");
    assert_false(pd_trace_on("placement"));
    setenv("PADDOCK_TRACE", "raft,placement", 1);
    assert_true(pd_trace_on("placement"));
    assert_true(pd_trace_on("raft"));
    assert_false(pd_trace_on("place"));
    setenv("PADDOCK_TRACE", "all", 1);
    assert_true(pd_trace_on("anything"));
    unsetenv("PADDOCK_TRACE");
}

/* Files whose size fstat does not know (/proc) are read whole; a file
 * over the cap is -EFBIG. */
static void
test_read_file(void **state)
{
    char path[] = "/tmp/pd-test-read-XXXXXX", *buf = NULL;
    size_t len = 0;
    int fd;

    (void)state;
    assert_int_equal(pd_read_file("/proc/self/status", &buf, &len, 1 << 20),
                     0);
    assert_true(len > 0);
    assert_non_null(strstr(buf, "Pid:"));
    assert_int_equal(strlen(buf), len);
    free(buf);

    fd = mkstemp(path);
    assert_true(fd >= 0);
    for (int i = 0; i < 3000; i++)
        assert_int_equal(write(fd, "0123456789", 10), 10);
    close(fd);
    assert_int_equal(pd_read_file(path, &buf, &len, 30000), 0);
    assert_int_equal(len, 30000);
    free(buf);
    assert_int_equal(pd_read_file(path, &buf, &len, 29999), -EFBIG);
    assert_int_equal(pd_read_file("/nonexistent/x", &buf, &len, 10),
                     -ENOENT);
    unlink(path);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ids),
        cmocka_unit_test(test_durations_sizes),
        cmocka_unit_test(test_misc),
        cmocka_unit_test(test_config),
        cmocka_unit_test(test_config_errors),
        cmocka_unit_test(test_trace_env),
        cmocka_unit_test(test_read_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
