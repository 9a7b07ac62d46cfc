/*
 * guestc, the node agent's client, against the real guest agent loop on
 * this host: a forked child listens on a unix socket (as QEMU's chardev
 * does), takes one connection and serves it with server_init_fd. Proves
 * the client's request life cycle (replies, errors, streams, credit,
 * cancel, close) end to end without a VM; runs under ASan+UBSan too.
 * Every run of the loop is bounded by a timer.
 */
#include <errno.h>
#include <limits.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <uv.h>

#include "common/log.h"
#include "common/util.h"
#include "guest-agent/guest.h"
#include "node-agent/guestc.h"

#define WAIT_MS 15000
#define BIG (12u << 20) /* three stream windows */

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

static char *env[] = {"PATH=/usr/bin:/bin", "HOME=/", NULL};

struct fixture {
    char dir[64];
    char sock[128];
    pid_t agent;
    uv_loop_t loop;
    uv_timer_t guard;
    struct guestc *g;
    bool ready, closed, done;
    int close_reason;
};

static struct fixture *fx;

/* ---- the agent, behind a unix socket like QEMU's ------------------------- */

static void __attribute__((noreturn))
agent_main(int lfd)
{
    int fd;

    prctl(PR_SET_PDEATHSIG, SIGKILL);
    guest_base_env = env;
    pd_log_init("test-agent", PD_LOG_ERROR);
    signal(SIGPIPE, SIG_IGN);
    fd = accept(lfd, NULL, NULL);
    if (fd < 0)
        _exit(3);
    close(lfd);
    loop_init();
    if (server_init_fd(fd) != 0)
        _exit(4);
    loop_run();
}

/* ---- the loop, always bounded -------------------------------------------- */

static void
guard_fired(uv_timer_t *t)
{
    (void)t;
    fx->done = true; /* the test then fails on what it did not get */
    uv_stop(&fx->loop);
}

/* Runs the loop until *flag is set or WAIT_MS pass; asserts the flag. */
static void
run_until(bool *flag)
{
    fx->done = false;
    uv_timer_start(&fx->guard, guard_fired, WAIT_MS, 0);
    while (!*flag && !fx->done)
        uv_run(&fx->loop, UV_RUN_ONCE);
    uv_timer_stop(&fx->guard);
    assert_true(*flag);
}

static void
on_ready(struct guestc *g)
{
    (void)g;
    fx->ready = true;
}

static void
on_close(struct guestc *g, int reason, const char *why)
{
    (void)g;
    (void)why;
    fx->close_reason = reason;
    fx->closed = true;
    fx->g = NULL;
}

static int
setup(void **state)
{
    static const struct guestc_cb cb = {.on_ready = on_ready,
                                        .on_close = on_close};
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    int lfd;

    fx = calloc(1, sizeof(*fx));
    if (fx == NULL)
        return -1;
    pd_strlcpy(fx->dir, "/tmp/pd-guestc-unit.XXXXXX", sizeof(fx->dir));
    if (mkdtemp(fx->dir) == NULL)
        return -1;
    snprintf(fx->sock, sizeof(fx->sock), "%s/guest.sock", fx->dir);
    pd_strlcpy(sa.sun_path, fx->sock, sizeof(sa.sun_path));
    lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) != 0 ||
        listen(lfd, 1) != 0)
        return -1;
    fx->agent = fork();
    if (fx->agent < 0)
        return -1;
    if (fx->agent == 0)
        agent_main(lfd);
    close(lfd);
    uv_loop_init(&fx->loop);
    uv_timer_init(&fx->loop, &fx->guard);
    fx->g = guestc_connect(&fx->loop, fx->sock, WAIT_MS, &cb, NULL);
    if (fx->g == NULL)
        return -1;
    run_until(&fx->ready);
    assert_string_equal(guestc_peer_name(fx->g)[0] != '\0' ? "named" : "",
                        "named");
    *state = fx;
    return 0;
}

static int
teardown(void **state)
{
    int status;

    (void)state;
    if (fx->g != NULL) {
        guestc_close(fx->g);
        run_until(&fx->closed);
    }
    uv_close((uv_handle_t *)&fx->guard, NULL);
    uv_run(&fx->loop, UV_RUN_DEFAULT);
    uv_loop_close(&fx->loop);
    kill(fx->agent, SIGKILL);
    waitpid(fx->agent, &status, 0);
    pd_rm_rf(fx->dir);
    free(fx);
    return 0;
}

/* ---- one request's outcome ----------------------------------------------- */

struct outcome {
    bool started, replied, failed;
    int errnum;
    int64_t exit_code;
    uint64_t size;
    uint64_t bytes; /* on_data bytes */
    uint64_t fnv;   /* FNV-1a of them */
    char out[256];
    size_t outlen;
    bool manual; /* grant credit only when told */
};

static void
o_start(struct guestc_req *r, const struct pd_msg *m)
{
    struct outcome *o = guestc_req_data(r);

    (void)m;
    o->started = true;
}

static void
o_data(struct guestc_req *r, enum guestc_stream s, const void *d, size_t n,
       bool eof)
{
    struct outcome *o = guestc_req_data(r);
    size_t room = sizeof(o->out) - o->outlen;

    (void)s;
    (void)eof;
    if (o->bytes == 0)
        o->fnv = 14695981039346656037ull;
    for (size_t i = 0; i < n; i++)
        o->fnv = (o->fnv ^ ((const unsigned char *)d)[i]) * 1099511628211ull;
    memcpy(o->out + o->outlen, d, n < room ? n : room);
    o->outlen += n < room ? n : room;
    o->bytes += n;
}

static void
o_reply(struct guestc_req *r, const struct pd_msg *m)
{
    struct outcome *o = guestc_req_data(r);

    if (m != NULL) {
        pd_msg_i64(m, "exit_code", &o->exit_code);
        pd_msg_u64(m, "size", &o->size);
    }
    o->replied = true;
}

static void
o_error(struct guestc_req *r, int errnum, const char *msg)
{
    struct outcome *o = guestc_req_data(r);

    (void)msg;
    o->errnum = errnum;
    o->failed = true;
    o->replied = true;
}

static const struct guestc_req_cb ocb = {
    .on_start = o_start, .on_data = o_data, .on_reply = o_reply,
    .on_error = o_error};

/* ---- tests --------------------------------------------------------------- */

static void
test_ping_and_exec(void **state)
{
    static const char *const argv[] = {"/bin/sh", "-c", "echo hi; exit 4",
                                       NULL};
    struct guestc_exec x = {.argv = argv};
    struct outcome p = {0}, e = {0};

    (void)state;
    assert_non_null(guestc_ping(fx->g, &ocb, &p));
    assert_non_null(guestc_exec(fx->g, &x, &ocb, &e));
    assert_int_equal(guestc_pending(fx->g), 2);
    run_until(&e.replied);
    run_until(&p.replied);
    assert_false(p.failed);
    assert_false(e.failed);
    assert_int_equal(e.exit_code, 4);
    assert_int_equal(guestc_pending(fx->g), 0);
}

static void
test_errors_carry_the_guests_errno(void **state)
{
    static const char *const argv[] = {"/no/such/binary", NULL};
    struct guestc_exec x = {.argv = argv};
    struct outcome e = {0}, s = {0}, d = {0};
    char dir[PATH_MAX];

    (void)state;
    snprintf(dir, sizeof(dir), "%s/nope", fx->dir);
    guestc_exec(fx->g, &x, &ocb, &e);
    guestc_file_stat(fx->g, dir, &ocb, &s);
    guestc_file_delete(fx->g, "a/../../b", false, &ocb, &d);
    run_until(&e.replied);
    run_until(&s.replied);
    run_until(&d.replied);
    assert_int_equal(e.errnum, ENOENT);
    assert_int_equal(s.errnum, ENOENT);
    assert_int_equal(d.errnum, EINVAL);
}

static void
test_streamed_exec(void **state)
{
    struct guestc_exec x = {.command = "echo one; echo two >&2",
                            .stream = true};
    struct outcome e = {0};

    (void)state;
    guestc_exec(fx->g, &x, &ocb, &e);
    run_until(&e.replied);
    assert_true(e.started);
    assert_int_equal(e.exit_code, 0);
    assert_int_equal(e.bytes, 8);
}

/* Writes BIG bytes in chunks as credit allows, then reads them back. */
static size_t sent;
static unsigned char *pattern;

static void
w_pump(struct guestc_req *r)
{
    while (sent < BIG) {
        size_t n = guestc_req_credit(r);

        if (n == 0)
            return;
        if (n > 1u << 20)
            n = 1u << 20;
        if (n > BIG - sent)
            n = BIG - sent;
        assert_int_equal(guestc_req_send_data(r, pattern + sent, n, false),
                         0);
        sent += n;
    }
    guestc_req_send_data(r, NULL, 0, true);
}

static void
test_file_round_trip_beyond_the_window(void **state)
{
    static const struct guestc_req_cb wcb = {
        .on_reply = o_reply, .on_error = o_error, .on_writable = w_pump};
    struct outcome w = {0}, rd = {0};
    char path[PATH_MAX];
    struct guestc_req *r;
    struct stat st;

    (void)state;
    pattern = malloc(BIG);
    assert_non_null(pattern);
    for (size_t i = 0; i < BIG; i++)
        pattern[i] = (unsigned char)(i * 7 + (i >> 12));
    snprintf(path, sizeof(path), "%s/big.bin", fx->dir);
    sent = 0;
    r = guestc_file_write(fx->g, path, 0600, false, &wcb, &w);
    assert_non_null(r);
    w_pump(r);
    run_until(&w.replied);
    assert_false(w.failed);
    assert_int_equal(w.size, BIG);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_size, BIG);
    assert_int_equal(st.st_mode & 0777, 0600);

    guestc_file_read(fx->g, path, &ocb, &rd);
    run_until(&rd.replied);
    assert_false(rd.failed);
    assert_true(rd.started);
    assert_int_equal(rd.bytes, BIG);
    {
        uint64_t h = 14695981039346656037ull;

        for (size_t i = 0; i < BIG; i++)
            h = (h ^ pattern[i]) * 1099511628211ull;
        assert_true(h == rd.fnv);
    }
    free(pattern);
}

static void
test_cancel_and_close_fail_what_is_open(void **state)
{
    struct guestc_exec y = {.command = "yes", .stream = true};
    struct guestc_exec s = {.command = "sleep 30"};
    struct outcome a = {0}, b = {0}, p = {0};
    struct guestc_req *r;

    (void)state;
    r = guestc_exec(fx->g, &y, &ocb, &a);
    assert_non_null(r);
    guestc_req_manual_window(r);
    run_until(&a.started);
    guestc_req_cancel(r); /* no callback follows */
    guestc_ping(fx->g, &ocb, &p);
    run_until(&p.replied);
    assert_false(p.failed);

    guestc_exec(fx->g, &s, &ocb, &b);
    guestc_close(fx->g);
    run_until(&fx->closed);
    assert_true(b.failed);
    assert_int_equal(b.errnum, ECONNRESET);
    assert_int_equal(fx->close_reason, 0);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ping_and_exec),
        cmocka_unit_test(test_errors_carry_the_guests_errno),
        cmocka_unit_test(test_streamed_exec),
        cmocka_unit_test(test_file_round_trip_beyond_the_window),
        cmocka_unit_test(test_cancel_and_close_fail_what_is_open),
    };

    signal(SIGPIPE, SIG_IGN);
    pd_log_init("test-guestc", PD_LOG_ERROR);
    return cmocka_run_group_tests(tests, setup, teardown);
}
