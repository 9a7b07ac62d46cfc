/*
 * The whole guest agent loop, forked on this host and serving one end of a
 * socketpair (server_init_fd): the session rules, request decoding and
 * its errors, and a few requests end to end (exec, files, flow control).
 * Commands run on the host here, without cgroups; paths are under a fresh
 * temporary directory. Every wait is bounded by WAIT_MS.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/log.h"
#include "common/util.h"
#include "guest-agent/guest.h"

#define WAIT_MS 10000

/* main.c is not in the library; these are its globals and hooks. */
char **guest_base_env;
bool guest_is_init;

void
child_exited(pid_t pid, int status)
{
    if (!exec_child_exited(pid, status))
        proc_child_exited(pid, status);
}

void
guest_poweroff(void)
{
    _exit(0);
}

struct agent {
    pid_t pid;
    int fd;
    int log_fd; /* the agent's stderr, when a test reads its log */
    struct pd_decoder dec;
    char dir[64];
};

/* ---- the agent under test ----------------------------------------------- */

static char *env[] = {"PATH=/usr/bin:/bin", "HOME=/", NULL};

static void __attribute__((noreturn))
agent_main(int fd, unsigned stall_ms, bool log)
{
    int rv;

    /* A failed test may skip its teardown: never outlive the test. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    guest_base_env = env;
    pd_log_init("test-agent", log ? PD_LOG_WARN : PD_LOG_ERROR);
    signal(SIGPIPE, SIG_IGN);
    loop_init();
    server_set_stall_ms(stall_ms);
    rv = server_init_fd(fd);
    if (rv != 0)
        _exit(3);
    loop_run();
}

static void
agent_stop(struct agent *a)
{
    int status;

    if (a->pid > 0) {
        kill(a->pid, SIGKILL);
        waitpid(a->pid, &status, 0);
    }
    if (a->fd >= 0)
        close(a->fd);
    if (a->log_fd >= 0)
        close(a->log_fd);
    pd_decoder_free(&a->dec);
    if (a->dir[0] != '\0')
        pd_rm_rf(a->dir);
    free(a);
}

/*
 * Starts an agent; with hello, also does the HELLO exchange. stall_ms 0
 * keeps the default; with log, the agent's stderr goes to a->log_fd.
 */
static struct agent *
agent_start_with(bool hello, unsigned stall_ms, bool log);

static struct agent *
agent_start(bool hello)
{
    return agent_start_with(hello, 0, false);
}

static int
setup(void **state)
{
    *state = agent_start(true);
    return *state == NULL ? -1 : 0;
}

static int
teardown(void **state)
{
    agent_stop(*state);
    return 0;
}

/* ---- the host's side ---------------------------------------------------- */

static void
send_enc(struct agent *a, struct pd_enc *e)
{
    void *frame;
    size_t len;

    assert_int_equal(pd_enc_finish(e, &frame, &len), 0);
    assert_int_equal(write(a->fd, frame, len), (ssize_t)len);
    free(frame);
}

static void
send_raw(struct agent *a, const void *p, size_t len)
{
    assert_int_equal(write(a->fd, p, len), (ssize_t)len);
}

/* The next frame from the agent, or NULL after WAIT_MS (test fails). */
static const struct pd_msg *
next_msg(struct agent *a)
{
    uint64_t end = pd_now_ms() + WAIT_MS;
    const struct pd_msg *m;
    unsigned char buf[65536];

    for (;;) {
        int rv = pd_decoder_next(&a->dec, &m);
        struct pollfd p = {.fd = a->fd, .events = POLLIN};
        ssize_t n;

        assert_true(rv >= 0);
        if (rv == 1)
            return m;
        if (pd_now_ms() >= end)
            fail_msg("no frame from the agent within %d ms", WAIT_MS);
        if (poll(&p, 1, 100) <= 0)
            continue;
        n = read(a->fd, buf, sizeof(buf));
        if (n <= 0)
            fail_msg("the agent closed its end");
        assert_int_equal(pd_decoder_feed(&a->dec, buf, (size_t)n), 0);
    }
}

/* The next frame, which must have this type and id. */
static const struct pd_msg *
expect(struct agent *a, unsigned type, uint64_t id)
{
    const struct pd_msg *m = next_msg(a);

    if (m->type != type || m->id != id)
        fail_msg("expected %s id %llu, got %s id %llu",
                 pd_msg_type_name(type), (unsigned long long)id,
                 pd_msg_type_name(m->type), (unsigned long long)m->id);
    return m;
}

/* An ERROR under id with the given errno name. */
static void
expect_error(struct agent *a, uint64_t id, const char *code)
{
    const struct pd_msg *m = expect(a, PD_MSG_ERROR, id);
    char got[32] = "", msg[256] = "";

    pd_msg_cstr(m, "code", got, sizeof(got));
    pd_msg_cstr(m, "message", msg, sizeof(msg));
    if (strcmp(got, code) != 0)
        fail_msg("expected %s, got %s (%s)", code, got, msg);
    /* Every error says why in words. */
    assert_true(msg[0] != '\0');
}

static void
hello(struct agent *a, uint64_t version)
{
    struct pd_enc e;

    pd_enc_begin(&e, PD_MSG_HELLO, 0);
    pd_enc_u64(&e, "v", version);
    pd_enc_str(&e, "role", "agent");
    pd_enc_str(&e, "name", "test");
    send_enc(a, &e);
}

static void
ping(struct agent *a, uint64_t id)
{
    struct pd_enc e;

    pd_enc_begin(&e, PD_MSG_PING, id);
    send_enc(a, &e);
    expect(a, PD_MSG_PONG, id);
}

static struct agent *
agent_start_with(bool with_hello, unsigned stall_ms, bool log)
{
    struct agent *a = calloc(1, sizeof(*a));
    int sv[2], lp[2] = {-1, -1};

    assert_non_null(a);
    a->fd = -1;
    a->log_fd = -1;
    if (log)
        assert_int_equal(pipe2(lp, O_CLOEXEC), 0);
    pd_decoder_init(&a->dec, PD_FRAME_MAX);
    pd_strlcpy(a->dir, "/tmp/pd-guest-unit.XXXXXX", sizeof(a->dir));
    assert_non_null(mkdtemp(a->dir));
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv),
                     0);
    a->pid = fork();
    assert_true(a->pid >= 0);
    if (a->pid == 0) {
        close(sv[0]);
        if (log)
            dup2(lp[1], 2);
        agent_main(sv[1], stall_ms, log);
    }
    close(sv[1]);
    a->fd = sv[0];
    if (log) {
        close(lp[1]);
        a->log_fd = lp[0];
    }
    if (with_hello) {
        const struct pd_msg *m;
        char role[16] = "";
        uint64_t v = 0;

        hello(a, PD_PROTO_VERSION);
        m = expect(a, PD_MSG_HELLO, 0);
        assert_int_equal(pd_msg_u64(m, "v", &v), 0);
        assert_int_equal(v, PD_PROTO_VERSION);
        pd_msg_cstr(m, "role", role, sizeof(role));
        assert_string_equal(role, "guest");
    }
    return a;
}

static void
path_in(const struct agent *a, const char *name, char *out, size_t len)
{
    snprintf(out, len, "%s/%s", a->dir, name);
}

/* ---- session rules ------------------------------------------------------- */

static void
test_request_before_hello_is_refused(void **state)
{
    struct agent *a = agent_start(false);
    struct pd_enc e;

    (void)state;
    pd_enc_begin(&e, PD_MSG_INFO, 3);
    send_enc(a, &e);
    expect_error(a, 3, "EPROTO");
    /* The HELLO still starts a session afterwards. */
    hello(a, PD_PROTO_VERSION);
    expect(a, PD_MSG_HELLO, 0);
    ping(a, 4);
    agent_stop(a);
}

static void
test_wrong_version_is_refused(void **state)
{
    struct agent *a = agent_start(false);

    (void)state;
    hello(a, PD_PROTO_VERSION + 1);
    expect_error(a, 0, "EPROTO");
    agent_stop(a);
}

static void
test_a_second_hello_restarts_the_session(void **state)
{
    struct agent *a = *state;

    hello(a, PD_PROTO_VERSION);
    expect(a, PD_MSG_HELLO, 0);
    ping(a, 50);
}

/* Waits up to WAIT_MS for the agent's log to hold text. */
static void
expect_log(struct agent *a, const char *text)
{
    uint64_t end = pd_now_ms() + WAIT_MS;
    static char log[65536];
    size_t len = 0;

    while (pd_now_ms() < end) {
        struct pollfd p = {.fd = a->log_fd, .events = POLLIN};
        ssize_t n;

        if (poll(&p, 1, 100) <= 0)
            continue;
        n = read(a->log_fd, log + len, sizeof(log) - 1 - len);
        if (n <= 0)
            break;
        len += (size_t)n;
        log[len] = '\0';
        if (strstr(log, text) != NULL)
            return;
    }
    fail_msg("the agent never logged \"%s\"; its log: %s", text, log);
}

/* A host that stops reading loses its session after the stall time;
 * the agent neither blocks nor keeps the queue. */
static void
test_host_that_stops_reading_loses_its_session(void **state)
{
    struct agent *a = agent_start_with(true, 300, true);
    struct pd_enc e;
    uint64_t end;

    (void)state;
    /* A collected exec whose 1.5 MiB reply overfills the socketpair. */
    pd_enc_begin(&e, PD_MSG_EXEC, 5);
    pd_enc_str(&e, "command", "head -c 3000000 /dev/zero");
    pd_enc_u64(&e, "output_max", 3u << 19);
    send_enc(a, &e);
    expect_log(a, "host read nothing");
    /* What was sent is only the start of that reply; nothing follows,
     * and input is ignored until a reconnect. */
    pd_enc_begin(&e, PD_MSG_PING, 6);
    send_enc(a, &e);
    end = pd_now_ms() + 1000;
    while (pd_now_ms() < end) {
        const struct pd_msg *m;
        unsigned char buf[65536];
        struct pollfd p = {.fd = a->fd, .events = POLLIN};
        ssize_t n;

        assert_true(pd_decoder_next(&a->dec, &m) >= 0);
        if (poll(&p, 1, 50) <= 0)
            continue;
        n = read(a->fd, buf, sizeof(buf));
        if (n <= 0)
            break;
        assert_int_equal(pd_decoder_feed(&a->dec, buf, (size_t)n), 0);
        while (pd_decoder_next(&a->dec, &m) == 1)
            fail_msg("%s id %llu arrived after the session ended",
                     pd_msg_type_name(m->type), (unsigned long long)m->id);
    }
    agent_stop(a);
}

/* Nothing at all arrives within ms. */
static void
expect_silence(struct agent *a, unsigned ms)
{
    uint64_t end = pd_now_ms() + ms;
    const struct pd_msg *m;

    while (pd_now_ms() < end) {
        unsigned char buf[4096];
        struct pollfd p = {.fd = a->fd, .events = POLLIN};
        ssize_t n;

        if (poll(&p, 1, 50) <= 0)
            continue;
        n = read(a->fd, buf, sizeof(buf));
        assert_true(n > 0);
        assert_int_equal(pd_decoder_feed(&a->dec, buf, (size_t)n), 0);
        if (pd_decoder_next(&a->dec, &m) == 1)
            fail_msg("%s id %llu arrived", pd_msg_type_name(m->type),
                     (unsigned long long)m->id);
    }
}

/* A length over the cap puts the stream out of step: input is skipped
 * until a host HELLO, even one split across writes, starts over. */
static void
test_out_of_step_stream_resyncs_on_hello(void **state)
{
    struct agent *a = agent_start(true);
    struct pd_enc e;
    void *frame;
    size_t len;

    (void)state;
    send_raw(a, "GET / HTTP/1.1\r\n\r\n", 18);
    expect_error(a, 0, "EPROTO");
    pd_enc_begin(&e, PD_MSG_PING, 7);
    send_enc(a, &e);
    expect_silence(a, 300);
    send_raw(a, "more junk \xc1\xc1", 12);
    pd_enc_begin(&e, PD_MSG_HELLO, 0);
    pd_enc_u64(&e, "v", PD_PROTO_VERSION);
    pd_enc_str(&e, "role", "agent");
    assert_int_equal(pd_enc_finish(&e, &frame, &len), 0);
    send_raw(a, frame, 5);
    expect_silence(a, 100);
    send_raw(a, (unsigned char *)frame + 5, len - 5);
    free(frame);
    expect(a, PD_MSG_HELLO, 0);
    ping(a, 8);
    /* A HELLO with another version also leaves the stream waiting. */
    hello(a, PD_PROTO_VERSION + 1);
    expect_error(a, 0, "EPROTO");
    pd_enc_begin(&e, PD_MSG_PING, 9);
    send_enc(a, &e);
    expect_silence(a, 200);
    hello(a, PD_PROTO_VERSION);
    expect(a, PD_MSG_HELLO, 0);
    ping(a, 10);
    agent_stop(a);
}

/* ---- bad frames ---------------------------------------------------------- */

static void
test_garbage_frame_is_skipped(void **state)
{
    static const unsigned char junk[] = {0, 0, 0, 4, 0xc1, 0xc1, 0xc1, 0xc1};
    static const unsigned char not_a_map[] = {0, 0, 0, 1, 0x05};
    struct agent *a = *state;

    send_raw(a, junk, sizeof(junk));
    expect_error(a, 0, "EPROTO");
    send_raw(a, not_a_map, sizeof(not_a_map));
    expect_error(a, 0, "EPROTO");
    ping(a, 60);
}

static void
test_unknown_and_misnumbered_requests(void **state)
{
    struct agent *a = *state;
    struct pd_enc e;

    pd_enc_begin(&e, PD_MSG_SANDBOX_LIST, 61); /* not a guest request */
    send_enc(a, &e);
    expect_error(a, 61, "ENOSYS");
    pd_enc_begin(&e, 180, 62); /* no such type */
    send_enc(a, &e);
    expect_error(a, 0, "EPROTO");
    pd_enc_begin(&e, PD_MSG_INFO, 0); /* a request needs an id */
    send_enc(a, &e);
    expect_error(a, 0, "EINVAL");
    /* Replies from the host are ignored, not answered. */
    pd_enc_begin(&e, PD_MSG_OK, 63);
    send_enc(a, &e);
    ping(a, 64);
}

static void
test_request_id_in_use_is_busy(void **state)
{
    struct agent *a = *state;
    struct pd_enc e;

    pd_enc_begin(&e, PD_MSG_EXEC, 70);
    pd_enc_str(&e, "command", "sleep 0.3");
    send_enc(a, &e);
    pd_enc_begin(&e, PD_MSG_INFO, 70);
    send_enc(a, &e);
    expect_error(a, 70, "EBUSY");
    expect(a, PD_MSG_EXIT, 70);
}

static void
test_field_types_are_checked(void **state)
{
    struct agent *a = *state;
    struct pd_enc e;

    pd_enc_begin(&e, PD_MSG_EXEC, 80);
    pd_enc_u64(&e, "argv", 42);
    send_enc(a, &e);
    expect_error(a, 80, "EINVAL");
    pd_enc_begin(&e, PD_MSG_EXEC, 86);
    pd_enc_str(&e, "command", "true");
    pd_enc_str(&e, "timeout_ms", "soon");
    send_enc(a, &e);
    expect_error(a, 86, "EINVAL");
    pd_enc_begin(&e, PD_MSG_EXEC, 87);
    pd_enc_str(&e, "command", "true");
    pd_enc_i64(&e, "output_max", -1);
    send_enc(a, &e);
    expect_error(a, 87, "EINVAL");
    pd_enc_begin(&e, PD_MSG_FILE_MKDIR, 88);
    pd_enc_str(&e, "path", "/tmp/x");
    pd_enc_u64(&e, "mode", 0100000);
    send_enc(a, &e);
    expect_error(a, 88, "EINVAL");
    pd_enc_begin(&e, PD_MSG_FILE_DELETE, 89);
    pd_enc_str(&e, "path", "/tmp/x");
    pd_enc_str(&e, "recursive", "yes");
    send_enc(a, &e);
    expect_error(a, 89, "EINVAL");
    pd_enc_begin(&e, PD_MSG_FILE_STAT, 81);
    pd_enc_u64(&e, "path", 1);
    send_enc(a, &e);
    expect_error(a, 81, "EINVAL");
    pd_enc_begin(&e, PD_MSG_FILE_STAT, 82);
    pd_enc_strn(&e, "path", "/etc\0/passwd", 12);
    send_enc(a, &e);
    expect_error(a, 82, "EINVAL");
    pd_enc_begin(&e, PD_MSG_PROC_SIGNAL, 83);
    pd_enc_str(&e, "proc", "../x");
    send_enc(a, &e);
    expect_error(a, 83, "EINVAL");
    pd_enc_begin(&e, PD_MSG_PROC_WAIT_PORT, 84);
    pd_enc_u64(&e, "port", 70000);
    send_enc(a, &e);
    expect_error(a, 84, "EINVAL");
    pd_enc_begin(&e, PD_MSG_TUNNEL_OPEN, 85);
    pd_enc_str(&e, "port", "http");
    send_enc(a, &e);
    expect_error(a, 85, "EINVAL");
}

/* ---- requests end to end ------------------------------------------------- */

static void
test_exec_collects_output_and_status(void **state)
{
    static const char *const argv[] = {"/bin/sh", "-c",
                                       "echo out; echo err >&2; exit 3"};
    struct agent *a = *state;
    const struct pd_msg *m;
    const void *p;
    struct pd_enc e;
    int64_t code;
    size_t n;

    pd_enc_begin(&e, PD_MSG_EXEC, 90);
    pd_enc_strv(&e, "argv", argv, 3);
    send_enc(a, &e);
    m = expect(a, PD_MSG_EXIT, 90);
    assert_int_equal(pd_msg_i64(m, "exit_code", &code), 0);
    assert_int_equal(code, 3);
    assert_int_equal(pd_msg_bin(m, "stdout", &p, &n), 0);
    assert_int_equal(n, 4);
    assert_memory_equal(p, "out\n", 4);
    assert_int_equal(pd_msg_bin(m, "stderr", &p, &n), 0);
    assert_memory_equal(p, "err\n", 4);

    pd_enc_begin(&e, PD_MSG_EXEC, 91);
    pd_enc_strv(&e, "argv", (const char *const[]){"/no/such/binary"}, 1);
    send_enc(a, &e);
    expect_error(a, 91, "ENOENT");
}

static void
test_exec_timeout_and_output_cap(void **state)
{
    struct agent *a = *state;
    const struct pd_msg *m;
    struct pd_enc e;
    bool timed_out = false, truncated = false;
    int64_t sig = 0;
    const void *p;
    size_t n;

    pd_enc_begin(&e, PD_MSG_EXEC, 100);
    pd_enc_str(&e, "command", "sleep 30");
    pd_enc_u64(&e, "timeout_ms", 200);
    send_enc(a, &e);
    m = expect(a, PD_MSG_EXIT, 100);
    pd_msg_bool(m, "timed_out", &timed_out);
    pd_msg_i64(m, "signal", &sig);
    assert_true(timed_out);
    assert_int_equal(sig, SIGKILL);

    pd_enc_begin(&e, PD_MSG_EXEC, 101);
    pd_enc_str(&e, "command", "head -c 200000 /dev/zero");
    pd_enc_u64(&e, "output_max", 1000);
    send_enc(a, &e);
    m = expect(a, PD_MSG_EXIT, 101);
    pd_msg_bool(m, "truncated", &truncated);
    assert_true(truncated);
    assert_int_equal(pd_msg_bin(m, "stdout", &p, &n), 0);
    assert_int_equal(n, 1000);
}

/* A streamed exec stops at its window and resumes on a WINDOW grant. */
static void
test_streamed_exec_respects_the_window(void **state)
{
    struct agent *a = *state;
    const struct pd_msg *m;
    struct pd_enc e;
    uint64_t got = 0;

    pd_enc_begin(&e, PD_MSG_EXEC, 110);
    pd_enc_strv(&e, "argv", (const char *const[]){"yes"}, 1);
    pd_enc_bool(&e, "stream", true);
    send_enc(a, &e);
    expect(a, PD_MSG_EXEC_START, 110);
    while (got < PD_STREAM_WINDOW) {
        const void *p;
        size_t n;

        m = expect(a, PD_MSG_STDOUT, 110);
        assert_int_equal(pd_msg_bin(m, "data", &p, &n), 0);
        got += n;
    }
    assert_int_equal(got, PD_STREAM_WINDOW);
    /* Stalled: other requests still get through. */
    ping(a, 111);
    pd_enc_begin(&e, PD_MSG_WINDOW, 110);
    pd_enc_u64(&e, "bytes", 1000);
    send_enc(a, &e);
    m = expect(a, PD_MSG_STDOUT, 110);
    pd_enc_begin(&e, PD_MSG_CANCEL, 110);
    send_enc(a, &e);
    ping(a, 112);
}

static void
test_file_write_read_and_errors(void **state)
{
    struct agent *a = *state;
    char path[PATH_MAX], dir[PATH_MAX];
    const struct pd_msg *m;
    struct pd_enc e;
    uint64_t size = 0;
    const void *p;
    bool eof = false;
    size_t n;

    path_in(a, "f.txt", path, sizeof(path));
    pd_enc_begin(&e, PD_MSG_FILE_WRITE, 120);
    pd_enc_str(&e, "path", path);
    send_enc(a, &e);
    pd_enc_begin(&e, PD_MSG_DATA, 120);
    pd_enc_bin(&e, "data", "hello ", 6);
    send_enc(a, &e);
    expect(a, PD_MSG_WINDOW, 120);
    pd_enc_begin(&e, PD_MSG_DATA, 120);
    pd_enc_bin(&e, "data", "world", 5);
    pd_enc_bool(&e, "eof", true);
    send_enc(a, &e);
    m = expect(a, PD_MSG_OK, 120);
    assert_int_equal(pd_msg_u64(m, "size", &size), 0);
    assert_int_equal(size, 11);

    pd_enc_begin(&e, PD_MSG_FILE_READ, 121);
    pd_enc_str(&e, "path", path);
    send_enc(a, &e);
    m = expect(a, PD_MSG_OK, 121);
    assert_int_equal(pd_msg_u64(m, "size", &size), 0);
    assert_int_equal(size, 11);
    m = expect(a, PD_MSG_DATA, 121);
    assert_int_equal(pd_msg_bin(m, "data", &p, &n), 0);
    assert_int_equal(n, 11);
    assert_memory_equal(p, "hello world", 11);
    pd_msg_bool(m, "eof", &eof);
    if (!eof) {
        m = expect(a, PD_MSG_DATA, 121);
        pd_msg_bool(m, "eof", &eof);
        assert_true(eof);
    }

    pd_strlcpy(dir, a->dir, sizeof(dir));
    pd_enc_begin(&e, PD_MSG_FILE_READ, 122);
    pd_enc_str(&e, "path", dir);
    send_enc(a, &e);
    expect_error(a, 122, "EISDIR");
    path_in(a, "nope", path, sizeof(path));
    pd_enc_begin(&e, PD_MSG_FILE_STAT, 123);
    pd_enc_str(&e, "path", path);
    send_enc(a, &e);
    expect_error(a, 123, "ENOENT");
    path_in(a, "nope/f", path, sizeof(path));
    pd_enc_begin(&e, PD_MSG_FILE_WRITE, 124);
    pd_enc_str(&e, "path", path);
    send_enc(a, &e);
    expect_error(a, 124, "ENOENT");
    pd_enc_begin(&e, PD_MSG_FILE_READ, 125);
    pd_enc_str(&e, "path", "x/../../etc/passwd");
    send_enc(a, &e);
    expect_error(a, 125, "EINVAL");
}

/* An abandoned write (CANCEL) leaves no file behind. */
static void
test_cancelled_write_leaves_nothing(void **state)
{
    struct agent *a = *state;
    char path[PATH_MAX];
    struct pd_enc e;
    struct stat st;

    path_in(a, "partial.bin", path, sizeof(path));
    pd_enc_begin(&e, PD_MSG_FILE_WRITE, 130);
    pd_enc_str(&e, "path", path);
    send_enc(a, &e);
    pd_enc_begin(&e, PD_MSG_DATA, 130);
    pd_enc_bin(&e, "data", "part", 4);
    send_enc(a, &e);
    expect(a, PD_MSG_WINDOW, 130);
    pd_enc_begin(&e, PD_MSG_CANCEL, 130);
    send_enc(a, &e);
    ping(a, 131);
    assert_int_equal(stat(path, &st), -1);
    assert_int_equal(errno, ENOENT);
}

static void
test_processes_logs_and_signals(void **state)
{
    struct agent *a = *state;
    const struct pd_msg *m;
    const msgpack_object *proc;
    struct pd_enc e;
    char data[64] = "";
    const void *p;
    size_t n, got = 0;

    pd_enc_begin(&e, PD_MSG_PROC_START, 140);
    pd_enc_str(&e, "proc", "web");
    pd_enc_str(&e, "command", "echo up; exec sleep 30");
    send_enc(a, &e);
    expect(a, PD_MSG_OK, 140);
    pd_enc_begin(&e, PD_MSG_PROC_START, 141);
    pd_enc_str(&e, "proc", "web");
    pd_enc_str(&e, "command", "true");
    send_enc(a, &e);
    expect_error(a, 141, "EEXIST");

    /* Follow until the output arrives, then end it with a signal. */
    pd_enc_begin(&e, PD_MSG_PROC_LOGS, 142);
    pd_enc_str(&e, "proc", "web");
    pd_enc_bool(&e, "follow", true);
    send_enc(a, &e);
    m = expect(a, PD_MSG_STDOUT, 142);
    assert_int_equal(pd_msg_bin(m, "data", &p, &n), 0);
    memcpy(data, p, n < sizeof(data) - 1 ? n : sizeof(data) - 1);
    got = n;
    assert_int_equal(got, 3);
    assert_string_equal(data, "up\n");
    pd_enc_begin(&e, PD_MSG_PROC_SIGNAL, 143);
    pd_enc_str(&e, "proc", "web");
    pd_enc_i64(&e, "signal", SIGTERM);
    send_enc(a, &e);
    expect(a, PD_MSG_OK, 143);
    /* The follower ends with the process, and says how it ended. */
    m = expect(a, PD_MSG_OK, 142);
    proc = pd_msg_field(m, "proc");
    assert_non_null(proc);
    {
        const msgpack_object *sig = pd_obj_field(proc, "signal");
        int64_t v = 0;

        assert_non_null(sig);
        assert_int_equal(pd_obj_i64(sig, &v), 0);
        assert_int_equal(v, SIGTERM);
    }
    pd_enc_begin(&e, PD_MSG_PROC_SIGNAL, 144);
    pd_enc_str(&e, "proc", "web");
    pd_enc_i64(&e, "signal", SIGTERM);
    send_enc(a, &e);
    expect_error(a, 144, "ESRCH");
    pd_enc_begin(&e, PD_MSG_PROC_GET, 145);
    pd_enc_str(&e, "proc", "ghost");
    send_enc(a, &e);
    expect_error(a, 145, "ENOENT");
}

/* A listening socket on 127.0.0.1; sets *port. */
static int
listen_loopback(unsigned *port)
{
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(sa);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(listen(fd, 4), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
    *port = ntohs(sa.sin_port);
    return fd;
}

/* Bytes carried both ways, then both sides end with EOF. */
static void
test_tunnel_carries_bytes_both_ways(void **state)
{
    struct agent *a = *state;
    unsigned port, closed_port;
    int lfd = listen_loopback(&port), cfd, gone;
    const struct pd_msg *m;
    struct pollfd p;
    struct pd_enc e;
    char buf[16];
    const void *d;
    size_t n;
    bool eof = false;

    pd_enc_begin(&e, PD_MSG_TUNNEL_OPEN, 150);
    pd_enc_u64(&e, "port", port);
    send_enc(a, &e);
    p = (struct pollfd){.fd = lfd, .events = POLLIN};
    assert_int_equal(poll(&p, 1, WAIT_MS), 1);
    cfd = accept(lfd, NULL, NULL);
    assert_true(cfd >= 0);
    expect(a, PD_MSG_OK, 150);

    pd_enc_begin(&e, PD_MSG_DATA, 150);
    pd_enc_bin(&e, "data", "ping", 4);
    send_enc(a, &e);
    p = (struct pollfd){.fd = cfd, .events = POLLIN};
    assert_int_equal(poll(&p, 1, WAIT_MS), 1);
    assert_int_equal(read(cfd, buf, sizeof(buf)), 4);
    assert_memory_equal(buf, "ping", 4);
    expect(a, PD_MSG_WINDOW, 150);

    assert_int_equal(write(cfd, "pong", 4), 4);
    m = expect(a, PD_MSG_DATA, 150);
    assert_int_equal(pd_msg_bin(m, "data", &d, &n), 0);
    assert_int_equal(n, 4);
    assert_memory_equal(d, "pong", 4);
    close(cfd);
    m = expect(a, PD_MSG_DATA, 150);
    pd_msg_bool(m, "eof", &eof);
    assert_true(eof);
    pd_enc_begin(&e, PD_MSG_DATA, 150);
    pd_enc_bool(&e, "eof", true);
    send_enc(a, &e);
    ping(a, 151);
    /* Both directions ended, so the tunnel is gone and its id is free. */
    pd_enc_begin(&e, PD_MSG_INFO, 150);
    send_enc(a, &e);
    expect(a, PD_MSG_OK, 150);

    /* A port nobody listens on: the connect's own errno. */
    gone = listen_loopback(&closed_port);
    close(gone);
    pd_enc_begin(&e, PD_MSG_TUNNEL_OPEN, 152);
    pd_enc_u64(&e, "port", closed_port);
    send_enc(a, &e);
    expect_error(a, 152, "ECONNREFUSED");
    close(lfd);
}

int
main(void)
{
    const struct CMUnitTest alone[] = {
        cmocka_unit_test(test_request_before_hello_is_refused),
        cmocka_unit_test(test_wrong_version_is_refused),
        cmocka_unit_test(test_host_that_stops_reading_loses_its_session),
        cmocka_unit_test(test_out_of_step_stream_resyncs_on_hello),
    };
    const struct CMUnitTest shared[] = {
        cmocka_unit_test(test_a_second_hello_restarts_the_session),
        cmocka_unit_test(test_garbage_frame_is_skipped),
        cmocka_unit_test(test_unknown_and_misnumbered_requests),
        cmocka_unit_test(test_request_id_in_use_is_busy),
        cmocka_unit_test(test_field_types_are_checked),
        cmocka_unit_test(test_exec_collects_output_and_status),
        cmocka_unit_test(test_exec_timeout_and_output_cap),
        cmocka_unit_test(test_streamed_exec_respects_the_window),
        cmocka_unit_test(test_file_write_read_and_errors),
        cmocka_unit_test(test_cancelled_write_leaves_nothing),
        cmocka_unit_test(test_processes_logs_and_signals),
        cmocka_unit_test(test_tunnel_carries_bytes_both_ways),
    };
    int failed;

    signal(SIGPIPE, SIG_IGN);
    failed = cmocka_run_group_tests_name("alone", alone, NULL, NULL);
    failed += cmocka_run_group_tests_name("one agent", shared, setup,
                                          teardown);
    return failed;
}
