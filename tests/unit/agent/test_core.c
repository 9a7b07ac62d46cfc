/* node-agent core pieces without a VM: the egress allow-list matcher and
 * the proxy's one persistent stream (a refused request must not be parsed
 * again), the capacity offer and its refusals, and the sqlite state that
 * re-adoption reads back. */
#include <errno.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <uv.h>

#include "common/util.h"
#include "node-agent/capacity.h"
#include "node-agent/egress.h"
#include "node-agent/state.h"

#define MIB (1024ULL * 1024ULL)

static void
tmpdir(char *buf, size_t len)
{
    snprintf(buf, len, "/tmp/pd-agent-core-XXXXXX");
    assert_non_null(mkdtemp(buf));
}

/* ---- egress allow list ------------------------------------------------- */

static void
test_allow_list(void **state)
{
    static const struct {
        const char *allow, *host;
        unsigned port;
        bool want;
    } cases[] = {
        {"example.com", "example.com", 443, true},
        {"example.com", "EXAMPLE.com", 80, true},
        {"example.com", "example.com", 8080, false},
        {"example.com:8080", "example.com", 8080, true},
        {"example.com:8080", "example.com", 80, false},
        {"*.example.com", "api.example.com", 443, true},
        {"*.example.com", "example.com", 443, false},
        {"*.example.com", "evilexample.com", 443, false},
        {"a.org, b.org", "b.org", 80, true},
        {"example.com", "example.com.evil.org", 443, false},
        {"", "example.com", 443, false},
        {"example.com", "", 443, false},
    };

    (void)state;
    for (size_t i = 0; i < PD_ARRAY_SIZE(cases); i++) {
        bool got = agent_egress_allowed(cases[i].allow, cases[i].host,
                                        cases[i].port);

        if (got != cases[i].want)
            fail_msg("case %zu: \"%s\" %s:%u gave %d", i, cases[i].allow,
                     cases[i].host, cases[i].port, got);
    }
}

/* ---- egress persistent stream ------------------------------------------ */

/* One loop: a tiny upstream HTTP server, the agent's proxy on a unix
 * socket (as for a QEMU guestfwd chardev), and a client writing two
 * requests on one stream: a refused one, then an allowed one. */
struct px_fx {
    uv_loop_t loop;
    uv_tcp_t upstream;
    unsigned up_port;
    uv_pipe_t client;
    uv_connect_t creq;
    uv_timer_t deadline;
    char reply[8192];
    size_t len;
    bool timed_out;
    char reqs[512];
    struct agent_egress_listener *l;
};

static void
on_alloc(uv_handle_t *h, size_t n, uv_buf_t *b)
{
    (void)h;
    b->base = malloc(n);
    b->len = b->base ? n : 0;
}

static void
free_handle(uv_handle_t *h)
{
    free(h);
}

static void
on_up_written(uv_write_t *w, int status)
{
    (void)status;
    uv_close((uv_handle_t *)w->handle, free_handle);
    free(w);
}

static void
on_up_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
    static char ok[] = "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n"
                       "Connection: close\r\n\r\nupstream!";
    uv_buf_t out = uv_buf_init(ok, sizeof(ok) - 1);
    uv_write_t *w;

    free(b->base);
    if (n <= 0)
        return;
    /* Any request head is answered once, then the connection ends. */
    uv_read_stop(s);
    w = malloc(sizeof(*w));
    uv_write(w, s, &out, 1, on_up_written);
}

static void
on_up_conn(uv_stream_t *server, int status)
{
    uv_tcp_t *c = malloc(sizeof(*c));

    assert_int_equal(status, 0);
    uv_tcp_init(server->loop, c);
    assert_int_equal(uv_accept(server, (uv_stream_t *)c), 0);
    uv_read_start((uv_stream_t *)c, on_alloc, on_up_read);
}

static void
finish(struct px_fx *fx)
{
    uv_timer_stop(&fx->deadline);
    if (!uv_is_closing((uv_handle_t *)&fx->client))
        uv_close((uv_handle_t *)&fx->client, NULL);
    uv_close((uv_handle_t *)&fx->upstream, NULL);
    uv_close((uv_handle_t *)&fx->deadline, NULL);
    agent_egress_unlisten(fx->l);
    fx->l = NULL;
}

static void
on_client_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
    struct px_fx *fx = s->data;

    if (n > 0 && fx->len + (size_t)n < sizeof(fx->reply)) {
        memcpy(fx->reply + fx->len, b->base, (size_t)n);
        fx->len += (size_t)n;
        fx->reply[fx->len] = '\0';
    }
    free(b->base);
    if (n < 0 || strstr(fx->reply, "upstream!") != NULL)
        finish(fx);
}

static void
on_client_connect(uv_connect_t *req, int status)
{
    struct px_fx *fx = req->data;
    uv_buf_t b = uv_buf_init(fx->reqs, (unsigned)strlen(fx->reqs));
    static uv_write_t w;

    assert_int_equal(status, 0);
    uv_write(&w, (uv_stream_t *)&fx->client, &b, 1, NULL);
    uv_read_start((uv_stream_t *)&fx->client, on_alloc, on_client_read);
}

static void
on_deadline(uv_timer_t *t)
{
    struct px_fx *fx = t->data;

    fx->timed_out = true;
    finish(fx);
}

static void
test_refused_request_on_a_persistent_stream(void **state)
{
    struct px_fx *fx = calloc(1, sizeof(*fx));
    struct sockaddr_in sa;
    int salen = sizeof(sa);
    char dir[64], path[PATH_MAX], allow[64];
    uint64_t denied = agent_egress_denied();

    (void)state;
    tmpdir(dir, sizeof(dir));
    snprintf(path, sizeof(path), "%s/egress.sock", dir);
    uv_loop_init(&fx->loop);

    uv_tcp_init(&fx->loop, &fx->upstream);
    uv_ip4_addr("127.0.0.1", 0, &sa);
    assert_int_equal(uv_tcp_bind(&fx->upstream, (struct sockaddr *)&sa, 0),
                     0);
    assert_int_equal(uv_listen((uv_stream_t *)&fx->upstream, 8, on_up_conn),
                     0);
    uv_tcp_getsockname(&fx->upstream, (struct sockaddr *)&sa, &salen);
    fx->up_port = ntohs(sa.sin_port);

    snprintf(allow, sizeof(allow), "127.0.0.1:%u", fx->up_port);
    assert_int_equal(agent_egress_listen_unix(&fx->loop, path, "sb-test",
                                              allow, (int)getuid(),
                                              (int)getgid(), &fx->l),
                     0);
    snprintf(fx->reqs, sizeof(fx->reqs),
             "GET http://127.0.0.2:%u/ HTTP/1.1\r\nHost: 127.0.0.2\r\n\r\n"
             "GET http://127.0.0.1:%u/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
             fx->up_port, fx->up_port);

    uv_pipe_init(&fx->loop, &fx->client, 0);
    fx->client.data = fx;
    fx->creq.data = fx;
    uv_pipe_connect(&fx->creq, &fx->client, path, on_client_connect);
    uv_timer_init(&fx->loop, &fx->deadline);
    fx->deadline.data = fx;
    uv_timer_start(&fx->deadline, on_deadline, 10000, 0);

    uv_run(&fx->loop, UV_RUN_DEFAULT);
    assert_false(fx->timed_out);
    assert_non_null(strstr(fx->reply, "403 Forbidden"));
    assert_non_null(strstr(fx->reply, "upstream!"));
    assert_int_equal(agent_egress_denied(), denied + 1);
    assert_int_equal(uv_loop_close(&fx->loop), 0);
    unlink(path);
    rmdir(dir);
    free(fx);
}

/* ---- capacity ------------------------------------------------------------ */

static void
test_capacity_offer_and_refusals(void **state)
{
    char dir[64], meminfo[PATH_MAX], err[256] = "";
    struct agent_res offer, used = {0}, want;
    FILE *f;
    struct agent_capacity_cfg c = {
        .meminfo = meminfo,
        .reserve_cpus = 1,
        .reserve_memory = 1024 * MIB,
        .reserve_disk = 0,
        .cpu_overcommit = 2.0,
        .host_cpus = 4,
    };

    (void)state;
    tmpdir(dir, sizeof(dir));
    c.data_dir = dir;
    snprintf(meminfo, sizeof(meminfo), "%s/meminfo", dir);
    f = fopen(meminfo, "w");
    assert_non_null(f);
    fputs("MemFree:  100 kB\nMemTotal:  8388608 kB\n", f);
    fclose(f);

    assert_int_equal(agent_capacity_probe(&c, &offer, err, sizeof(err)), 0);
    assert_int_equal(offer.cpus, 6);
    assert_int_equal(offer.memory_mb, 7168);
    assert_true(offer.disk_mb > 0);

    /* The agent's own cgroup limit bounds the memory offered. */
    c.cgroup_mem_limit = 4096 * MIB;
    assert_int_equal(agent_capacity_probe(&c, &offer, err, sizeof(err)), 0);
    assert_int_equal(offer.memory_mb, 3072);

    want = (struct agent_res){.cpus = 2, .memory_mb = 3072, .disk_mb = 1};
    assert_int_equal(agent_capacity_check(&offer, &used, &want, err,
                                          sizeof(err)), 0);
    used.memory_mb = 1;
    assert_int_equal(agent_capacity_check(&offer, &used, &want, err,
                                          sizeof(err)), -ENOSPC);
    assert_non_null(strstr(err, "memory"));
    used = (struct agent_res){.cpus = 5};
    assert_int_equal(agent_capacity_check(&offer, &used, &want, err,
                                          sizeof(err)), -ENOSPC);
    assert_non_null(strcasestr(err, "cpu"));

    /* A reserve that leaves nothing is an error at start-up. */
    c.reserve_memory = 8192 * MIB;
    c.cgroup_mem_limit = 0;
    assert_true(agent_capacity_probe(&c, &offer, err, sizeof(err)) < 0);
    unlink(meminfo);
    rmdir(dir);
}

/* ---- sqlite state -------------------------------------------------------- */

struct seen {
    int n;
    char ids[4][16];
    int64_t pid[4];
    uint64_t start[4];
};

static int
collect(void *arg, const struct agent_state_row *row)
{
    struct seen *s = arg;

    if (s->n < 4) {
        pd_strlcpy(s->ids[s->n], row->id, sizeof(s->ids[0]));
        s->pid[s->n] = row->pid;
        s->start[s->n] = row->pid_start;
    }
    s->n++;
    return 0;
}

static void
test_state_survives_a_reopen(void **state)
{
    char dir[64], path[PATH_MAX], err[256] = "", *v = NULL;
    struct agent_state *st;
    struct seen seen = {0};
    struct agent_state_row a = {
        .id = "sb-a", .dir = "0123456789ab", .spec = "{\"cpus\":1}",
        .state = "running", .reason = "", .pid = 4242,
        .pid_start = 123456789012ULL, .created_ms = 1, .ports = "[]",
    };
    struct agent_state_row b = a;

    (void)state;
    tmpdir(dir, sizeof(dir));
    snprintf(path, sizeof(path), "%s/agent.db", dir);
    assert_int_equal(agent_state_open(path, &st, err, sizeof(err)), 0);
    b.id = "sb-b";
    b.created_ms = 2;
    b.state = "failed";
    b.reason = "QEMU killed by signal 9";
    assert_int_equal(agent_state_put(st, &a), 0);
    assert_int_equal(agent_state_put(st, &b), 0);
    a.state = "stopping"; /* a put replaces */
    assert_int_equal(agent_state_put(st, &a), 0);
    assert_int_equal(agent_state_meta_set(st, "node_id", "n-7"), 0);
    agent_state_close(st);

    assert_int_equal(agent_state_open(path, &st, err, sizeof(err)), 0);
    assert_int_equal(agent_state_each(st, collect, &seen), 0);
    assert_int_equal(seen.n, 2);
    assert_string_equal(seen.ids[0], "sb-a");
    assert_int_equal(seen.pid[0], 4242);
    assert_true(seen.start[0] == 123456789012ULL);
    assert_int_equal(agent_state_meta_get(st, "node_id", &v), 0);
    assert_string_equal(v, "n-7");
    free(v);
    assert_int_equal(agent_state_meta_get(st, "nope", &v), -ENOENT);
    assert_int_equal(agent_state_delete(st, "sb-a"), 0);
    seen.n = 0;
    assert_int_equal(agent_state_each(st, collect, &seen), 0);
    assert_int_equal(seen.n, 1);
    assert_string_equal(seen.ids[0], "sb-b");
    agent_state_close(st);
    pd_rm_rf(dir);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_allow_list),
        cmocka_unit_test(test_refused_request_on_a_persistent_stream),
        cmocka_unit_test(test_capacity_offer_and_refusals),
        cmocka_unit_test(test_state_survives_a_reopen),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
