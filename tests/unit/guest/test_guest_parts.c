/*
 * The guest agent's parts that need no VM: path checks, the bounded log
 * ring of background processes, and the decoding of a command request
 * (argv | command, cwd, env) into what spawn_child runs.
 */
#include <errno.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "guest-agent/guest.h"

/* main.c is not in the library; these are its globals and hooks. */
char **guest_base_env;
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

/* ---- path_check ---------------------------------------------------------- */

static int
check(const char *p, size_t len, char *out, size_t outlen)
{
    char err[128] = "";
    int rv = path_check(p, len, out, outlen, err, sizeof(err));

    /* Every refusal explains itself. */
    if (rv != 0)
        assert_true(err[0] != '\0');
    return rv;
}

static void
test_path_accepts_and_anchors(void **state)
{
    static const char *const ok[] = {"/etc/passwd", "/", "...", "..a",
                                     "a..", "a/..b/c", ".hidden", "a/./b",
                                     "/workspace/x/", "a//b"};
    char out[PATH_MAX];

    (void)state;
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++)
        assert_int_equal(check(ok[i], strlen(ok[i]), out, sizeof(out)), 0);

    assert_int_equal(check("/etc/passwd", 11, out, sizeof(out)), 0);
    assert_string_equal(out, "/etc/passwd");
    /* Relative paths start at the sandbox's disk. */
    assert_int_equal(check("src/main.c", 10, out, sizeof(out)), 0);
    assert_string_equal(out, "/workspace/src/main.c");
    /* The length given is the path: bytes past it are not read. */
    assert_int_equal(check("abcdef", 3, out, sizeof(out)), 0);
    assert_string_equal(out, "/workspace/abc");
}

static void
test_path_refuses_dotdot_nul_and_empty(void **state)
{
    static const char *const bad[] = {"..", "../x", "x/..", "x/../y",
                                      "/workspace/../etc", "a/b/../../..",
                                      "../../etc/passwd", "/..", "x/../"};
    char out[PATH_MAX];

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(check(bad[i], strlen(bad[i]), out, sizeof(out)),
                         -EINVAL);
    assert_int_equal(check("", 0, out, sizeof(out)), -EINVAL);
    assert_int_equal(check("/etc\0/passwd", 12, out, sizeof(out)), -EINVAL);
    assert_int_equal(check("\0", 1, out, sizeof(out)), -EINVAL);
}

static void
test_path_refuses_long_paths(void **state)
{
    char *p = malloc(PATH_MAX + 10);
    char out[PATH_MAX], small[16];

    (void)state;
    assert_non_null(p);
    memset(p, 'a', PATH_MAX + 10);
    p[0] = '/';
    assert_int_equal(check(p, PATH_MAX, out, sizeof(out)), -ENAMETOOLONG);
    assert_int_equal(check(p, PATH_MAX + 10, out, sizeof(out)),
                     -ENAMETOOLONG);
    /* Fits alone, but not once anchored at /workspace. */
    assert_int_equal(check(p + 1, PATH_MAX - 5, out, sizeof(out)),
                     -ENAMETOOLONG);
    /* The caller's buffer is the limit too; it is never overrun. */
    assert_int_equal(check("/0123456789abcdef", 17, small, sizeof(small)),
                     -ENAMETOOLONG);
    assert_int_equal(check("/0123456789abcd", 15, small, sizeof(small)), 0);
    assert_string_equal(small, "/0123456789abcd");
    free(p);
}

/* ---- a decoded message from an encoder ---------------------------------- */

struct msgbuf {
    void *frame;
    struct pd_msg m;
};

static void
finish_msg(struct pd_enc *e, struct msgbuf *b)
{
    char err[160];
    size_t len;

    assert_int_equal(pd_enc_finish(e, &b->frame, &len), 0);
    assert_int_equal(pd_msg_decode((unsigned char *)b->frame + 4, len - 4,
                                   &b->m, err, sizeof(err)), 0);
}

static void
release_msg(struct msgbuf *b)
{
    pd_msg_release(&b->m);
    free(b->frame);
}

static void
test_path_field(void **state)
{
    char out[PATH_MAX], err[128];
    struct msgbuf b;
    struct pd_enc e;

    (void)state;
    pd_enc_begin(&e, PD_MSG_FILE_STAT, 1);
    pd_enc_str(&e, "path", "a/b");
    pd_enc_u64(&e, "num", 7);
    pd_enc_strn(&e, "nul", "a\0b", 3);
    finish_msg(&e, &b);
    assert_int_equal(path_field(&b.m, "path", out, sizeof(out), err,
                                sizeof(err)), 0);
    assert_string_equal(out, "/workspace/a/b");
    assert_int_equal(path_field(&b.m, "missing", out, sizeof(out), err,
                                sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "missing"));
    assert_int_equal(path_field(&b.m, "num", out, sizeof(out), err,
                                sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "not a string"));
    assert_int_equal(path_field(&b.m, "nul", out, sizeof(out), err,
                                sizeof(err)), -EINVAL);
    release_msg(&b);
}

/* ---- ring ---------------------------------------------------------------- */

/* Reads everything from seq on into buf; returns the bytes read. */
static size_t
drain(const struct ring *r, uint64_t seq, char *buf, size_t max,
      int *streams)
{
    size_t n = 0;

    for (;;) {
        const unsigned char *d;
        size_t len;
        int s;
        uint64_t at = ring_read(r, seq, &s, &d, &len);

        if (len == 0) {
            assert_int_equal(at, r->end);
            return n;
        }
        assert_true(at >= seq);
        assert_true(n + len <= max);
        memcpy(buf + n, d, len);
        if (streams != NULL)
            for (size_t i = 0; i < len; i++)
                streams[n + i] = s;
        n += len;
        seq = at + len;
    }
}

static void
test_ring_keeps_order_and_streams(void **state)
{
    char buf[64];
    int streams[64];
    struct ring r;

    (void)state;
    ring_init(&r, 1024);
    assert_int_equal(ring_append(&r, 1, "out1 ", 5), 0);
    assert_int_equal(ring_append(&r, 1, "out2 ", 5), 0);
    assert_int_equal(ring_append(&r, 2, "err ", 4), 0);
    assert_int_equal(ring_append(&r, 1, "out3", 4), 0);
    assert_int_equal(ring_append(&r, 1, "", 0), 0);
    assert_int_equal(r.end, 18);
    assert_int_equal(drain(&r, 0, buf, sizeof(buf), streams), 18);
    assert_memory_equal(buf, "out1 out2 err out3", 18);
    assert_int_equal(streams[0], 1);
    assert_int_equal(streams[9], 1);
    assert_int_equal(streams[10], 2);
    assert_int_equal(streams[13], 2);
    assert_int_equal(streams[14], 1);
    /* A reader in the middle of a run gets the rest of that run. */
    assert_int_equal(drain(&r, 7, buf, sizeof(buf), NULL), 11);
    assert_memory_equal(buf, "t2 err out3", 11);
    /* Caught up: nothing, at the end. */
    assert_int_equal(drain(&r, 18, buf, sizeof(buf), NULL), 0);
    assert_int_equal(drain(&r, 1000, buf, sizeof(buf), NULL), 0);
    ring_free(&r);
    ring_free(&r); /* twice is harmless */
}

static void
test_ring_small_writes_share_chunks(void **state)
{
    struct ring r;
    size_t chunks = 0;

    (void)state;
    ring_init(&r, 1 << 20);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(ring_append(&r, 1, "0123456789", 10), 0);
    for (struct ring_chunk *c = r.head; c != NULL; c = c->next)
        chunks++;
    /* 10,000 bytes: a grown 8 KiB chunk and the rest, not 1,000 chunks. */
    assert_int_equal(chunks, 2);
    ring_free(&r);
}

static void
test_ring_drops_oldest_beyond_cap(void **state)
{
    static char big[300000], buf[300000];
    struct ring r;
    size_t n;

    (void)state;
    for (size_t i = 0; i < sizeof(big); i++)
        big[i] = (char)('a' + i % 26);
    ring_init(&r, 64 << 10);
    for (size_t off = 0; off < sizeof(big); off += 1000)
        assert_int_equal(ring_append(&r, 1, big + off, 1000), 0);
    assert_true(r.bytes <= r.cap);
    assert_int_equal(r.end, sizeof(big));
    /* A reader that fell behind skips to the oldest byte kept. What is
     * kept is the cap less up to two chunks (the oldest goes whole). */
    n = drain(&r, 0, buf, sizeof(buf), NULL);
    assert_true(n >= (64 << 10) - 2 * RING_CHUNK_GROW - 1024);
    assert_true(n <= 64 << 10);
    assert_int_equal(r.head->seq, sizeof(big) - n);
    assert_memory_equal(buf, big + sizeof(big) - n, n);
    ring_free(&r);
}

static void
test_ring_write_larger_than_cap_keeps_its_tail(void **state)
{
    static char big[10000], buf[10000];
    struct ring r;
    size_t keep;

    (void)state;
    for (size_t i = 0; i < sizeof(big); i++)
        big[i] = (char)i;
    ring_init(&r, 4096);
    assert_int_equal(ring_append(&r, 1, "x", 1), 0);
    assert_int_equal(ring_append(&r, 2, big, sizeof(big)), 0);
    assert_int_equal(r.end, 1 + sizeof(big));
    assert_true(r.bytes <= r.cap);
    /* The cap includes the one chunk's header. */
    keep = 4096 - sizeof(struct ring_chunk);
    assert_int_equal(drain(&r, 0, buf, sizeof(buf), NULL), keep);
    assert_memory_equal(buf, big + sizeof(big) - keep, keep);
    ring_free(&r);
}

static void
test_ring_memory_is_bounded_under_alternating_streams(void **state)
{
    struct ring r;
    size_t room = 0;

    (void)state;
    /* One byte at a time, switching streams: every write opens a chunk,
     * and the cap counts what each costs, so memory stays under it. */
    ring_init(&r, 256 << 10);
    for (int i = 0; i < 100000; i++)
        assert_int_equal(ring_append(&r, 1 + (i & 1), "z", 1), 0);
    for (struct ring_chunk *c = r.head; c != NULL; c = c->next)
        room += sizeof(*c) + c->room;
    assert_int_equal(room, r.bytes);
    assert_true(r.bytes <= r.cap);
    assert_int_equal(r.end, 100000);
    ring_free(&r);
}

/* ---- gcmd_parse: argv | command, cwd, env -------------------------------- */

static char *base_env[] = {"PATH=/usr/bin:/bin", "HOME=/root", "LANG=C",
                           NULL};

static int
parse(struct pd_enc *e, struct gcmd *c, char *err, size_t errlen)
{
    struct msgbuf b;
    int rv;

    finish_msg(e, &b);
    err[0] = '\0';
    rv = gcmd_parse(&b.m, c, err, errlen);
    release_msg(&b);
    return rv;
}

static const char *
env_get(char **envp, const char *name)
{
    size_t n = strlen(name);

    for (; *envp != NULL; envp++)
        if (strncmp(*envp, name, n) == 0 && (*envp)[n] == '=')
            return *envp + n + 1;
    return NULL;
}

static void
test_cmd_argv_and_command(void **state)
{
    static const char *const argv[] = {"echo", "a b", "$HOME"};
    char err[256];
    struct pd_enc e;
    struct gcmd c;

    (void)state;
    guest_base_env = base_env;
    pd_enc_begin(&e, PD_MSG_EXEC, 1);
    pd_enc_strv(&e, "argv", argv, 3);
    assert_int_equal(parse(&e, &c, err, sizeof(err)), 0);
    assert_string_equal(c.argv[0], "echo");
    assert_string_equal(c.argv[1], "a b");
    assert_string_equal(c.argv[2], "$HOME");
    assert_null(c.argv[3]);
    assert_non_null(c.cwd);
    assert_string_equal(env_get(c.envp, "HOME"), "/root");
    gcmd_free(&c);
    gcmd_free(&c); /* cleared: harmless */

    pd_enc_begin(&e, PD_MSG_EXEC, 1);
    pd_enc_str(&e, "command", "echo $HOME | wc -c");
    pd_enc_str(&e, "cwd", "/tmp");
    assert_int_equal(parse(&e, &c, err, sizeof(err)), 0);
    assert_string_equal(c.argv[0], "/bin/sh");
    assert_string_equal(c.argv[1], "-c");
    assert_string_equal(c.argv[2], "echo $HOME | wc -c");
    assert_null(c.argv[3]);
    assert_string_equal(c.cwd, "/tmp");
    gcmd_free(&c);
}

static void
test_cmd_refuses_bad_shapes(void **state)
{
    static const char *const empty0[] = {""};
    char err[256];
    struct pd_enc e;
    struct gcmd c;

    (void)state;
    guest_base_env = base_env;

    pd_enc_begin(&e, PD_MSG_EXEC, 1); /* neither */
    assert_int_equal(parse(&e, &c, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "required"));

    pd_enc_begin(&e, PD_MSG_EXEC, 1); /* both */
    pd_enc_str(&e, "command", "true");
    pd_enc_strv(&e, "argv", empty0, 1);
    assert_int_equal(parse(&e, &c, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "not both"));

    pd_enc_begin(&e, PD_MSG_EXEC, 1); /* argv of the wrong type */
    pd_enc_u64(&e, "argv", 42);
    assert_int_equal(parse(&e, &c, err, sizeof(err)), -EINVAL);

    pd_enc_begin(&e, PD_MSG_EXEC, 1); /* empty array */
    pd_enc_strv(&e, "argv", empty0, 0);
    assert_int_equal(parse(&e, &c, err, sizeof(err)), -EINVAL);

    pd_enc_begin(&e, PD_MSG_EXEC, 1); /* empty program name */
    pd_enc_strv(&e, "argv", empty0, 1);
    assert_int_equal(parse(&e, &c, err, sizeof(err)), -EINVAL);

    pd_enc_begin(&e, PD_MSG_EXEC, 1); /* argv with a number inside */
    pd_enc_key(&e, "argv");
    msgpack_pack_array(&e.pk, 2);
    pd_enc_pack_str(&e, "echo");
    msgpack_pack_int(&e.pk, 5);
    assert_int_equal(parse(&e, &c, err, sizeof(err)), -EINVAL);

    pd_enc_begin(&e, PD_MSG_EXEC, 1); /* NUL in an argument */
    pd_enc_key(&e, "argv");
    msgpack_pack_array(&e.pk, 2);
    pd_enc_pack_str(&e, "echo");
    msgpack_pack_str(&e.pk, 3);
    msgpack_pack_str_body(&e.pk, "a\0b", 3);
    assert_int_equal(parse(&e, &c, err, sizeof(err)), -EINVAL);

    pd_enc_begin(&e, PD_MSG_EXEC, 1); /* NUL in a command */
    pd_enc_strn(&e, "command", "true\0rm -rf /", 13);
    assert_int_equal(parse(&e, &c, err, sizeof(err)), -EINVAL);

    pd_enc_begin(&e, PD_MSG_EXEC, 1); /* a cwd that climbs */
    pd_enc_str(&e, "command", "true");
    pd_enc_str(&e, "cwd", "../etc");
    assert_int_equal(parse(&e, &c, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, ".."));

    pd_enc_begin(&e, PD_MSG_EXEC, 1); /* cwd of the wrong type */
    pd_enc_str(&e, "command", "true");
    pd_enc_u64(&e, "cwd", 3);
    assert_int_equal(parse(&e, &c, err, sizeof(err)), -EINVAL);
}

static void
test_cmd_env_overrides_the_base(void **state)
{
    char err[256];
    struct pd_enc e;
    struct gcmd c;
    size_t n = 0;

    (void)state;
    guest_base_env = base_env;
    pd_enc_begin(&e, PD_MSG_EXEC, 1);
    pd_enc_str(&e, "command", "env");
    pd_enc_key(&e, "env");
    msgpack_pack_map(&e.pk, 2);
    pd_enc_pack_str(&e, "HOME");
    pd_enc_pack_str(&e, "/workspace");
    pd_enc_pack_str(&e, "FOO");
    pd_enc_pack_str(&e, "a=b c");
    assert_int_equal(parse(&e, &c, err, sizeof(err)), 0);
    assert_string_equal(env_get(c.envp, "HOME"), "/workspace");
    assert_string_equal(env_get(c.envp, "FOO"), "a=b c");
    assert_string_equal(env_get(c.envp, "PATH"), "/usr/bin:/bin");
    while (c.envp[n] != NULL)
        n++;
    assert_int_equal(n, 4); /* HOME once */
    gcmd_free(&c);
}

static void
test_cmd_env_refuses_bad_entries(void **state)
{
    char err[256];
    struct pd_enc e;
    struct gcmd c;

    (void)state;
    guest_base_env = base_env;

    pd_enc_begin(&e, PD_MSG_EXEC, 1); /* not a map */
    pd_enc_str(&e, "command", "env");
    pd_enc_str(&e, "env", "FOO=bar");
    assert_int_equal(parse(&e, &c, err, sizeof(err)), -EINVAL);

    pd_enc_begin(&e, PD_MSG_EXEC, 1); /* '=' in a name */
    pd_enc_str(&e, "command", "env");
    pd_enc_key(&e, "env");
    msgpack_pack_map(&e.pk, 1);
    pd_enc_pack_str(&e, "A=B");
    pd_enc_pack_str(&e, "c");
    assert_int_equal(parse(&e, &c, err, sizeof(err)), -EINVAL);

    pd_enc_begin(&e, PD_MSG_EXEC, 1); /* empty name */
    pd_enc_str(&e, "command", "env");
    pd_enc_key(&e, "env");
    msgpack_pack_map(&e.pk, 1);
    pd_enc_pack_str(&e, "");
    pd_enc_pack_str(&e, "c");
    assert_int_equal(parse(&e, &c, err, sizeof(err)), -EINVAL);

    pd_enc_begin(&e, PD_MSG_EXEC, 1); /* a number for a value */
    pd_enc_str(&e, "command", "env");
    pd_enc_key(&e, "env");
    msgpack_pack_map(&e.pk, 1);
    pd_enc_pack_str(&e, "N");
    msgpack_pack_int(&e.pk, 1);
    assert_int_equal(parse(&e, &c, err, sizeof(err)), -EINVAL);

    pd_enc_begin(&e, PD_MSG_EXEC, 1); /* NUL in a value */
    pd_enc_str(&e, "command", "env");
    pd_enc_key(&e, "env");
    msgpack_pack_map(&e.pk, 1);
    pd_enc_pack_str(&e, "N");
    msgpack_pack_str(&e.pk, 3);
    msgpack_pack_str_body(&e.pk, "a\0b", 3);
    assert_int_equal(parse(&e, &c, err, sizeof(err)), -EINVAL);

    pd_enc_begin(&e, PD_MSG_EXEC, 1); /* too many entries */
    pd_enc_str(&e, "command", "env");
    pd_enc_key(&e, "env");
    msgpack_pack_map(&e.pk, 1025);
    for (int i = 0; i < 1025; i++) {
        char k[16];

        snprintf(k, sizeof(k), "V%d", i);
        pd_enc_pack_str(&e, k);
        pd_enc_pack_str(&e, "x");
    }
    assert_int_equal(parse(&e, &c, err, sizeof(err)), -E2BIG);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_path_accepts_and_anchors),
        cmocka_unit_test(test_path_refuses_dotdot_nul_and_empty),
        cmocka_unit_test(test_path_refuses_long_paths),
        cmocka_unit_test(test_path_field),
        cmocka_unit_test(test_ring_keeps_order_and_streams),
        cmocka_unit_test(test_ring_small_writes_share_chunks),
        cmocka_unit_test(test_ring_drops_oldest_beyond_cap),
        cmocka_unit_test(test_ring_write_larger_than_cap_keeps_its_tail),
        cmocka_unit_test(test_ring_memory_is_bounded_under_alternating_streams),
        cmocka_unit_test(test_cmd_argv_and_command),
        cmocka_unit_test(test_cmd_refuses_bad_shapes),
        cmocka_unit_test(test_cmd_env_overrides_the_base),
        cmocka_unit_test(test_cmd_env_refuses_bad_entries),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
