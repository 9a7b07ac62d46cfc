/*
 * bench_routing: the cost of routing an exec through a scheduler.
 *
 *   bench_routing --agent HOST:PORT --cert C --key K --ca CA --sandbox ID
 *                 [--api HOST:PORT --token T] [--n 200] [--warmup 10]
 *
 * In one run, execs `true` in the sandbox n times each way, alternating
 * between the two so that both see the same machine load:
 *   direct  straight to the owning agent's RPC port over mutual TLS, with
 *           the scheduler's own client (scheduler/agentc.c) on one link;
 *   routed  POST /v1/sandboxes/ID/exec to the scheduler at --api (point it
 *           at a follower away from the node), on one keep-alive HTTP
 *           connection.
 * Prints p50, p99, mean and max per path and the p50 difference: what the
 * HTTP API, auth, lookup and the extra hop add. Not a pass/fail test.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/log.h"
#include "proto/frame.h"
#include "proto/msgtypes.h"
#include "proto/tls.h"
#include "scheduler/sched.h"

static struct {
    const char *agent, *cert, *key, *ca, *sandbox, *api, *token;
    unsigned n, warmup;
} o = {.n = 200, .warmup = 10};

static int
cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

static uint64_t
pct(const uint64_t *v, unsigned n, unsigned p)
{
    unsigned i = (unsigned)(((uint64_t)n * p + 99) / 100);

    return v[i == 0 ? 0 : i - 1];
}

static uint64_t
report(const char *what, uint64_t *us, unsigned n)
{
    uint64_t sum = 0;

    qsort(us, n, sizeof(*us), cmp_u64);
    for (unsigned i = 0; i < n; i++)
        sum += us[i];
    printf("%-7s n=%u  p50 %.2f ms  p99 %.2f ms  mean %.2f ms  max %.2f ms\n",
           what, n, pct(us, n, 50) / 1000.0, pct(us, n, 99) / 1000.0,
           (double)sum / n / 1000.0, us[n - 1] / 1000.0);
    return pct(us, n, 50);
}

/* ---- direct: agentc --------------------------------------------------- */

static struct sched S;
static int ended, failed;

static void
d_frame(struct sched_areq *q, const struct pd_msg *m, void *data)
{
    (void)q;
    (void)m;
    (void)data;
}

static void
d_end(struct sched_areq *q, int status, const struct pd_msg *m, void *data)
{
    int64_t code = -1;

    (void)q;
    (void)data;
    if (m != NULL && m->type == PD_MSG_EXIT)
        pd_msg_i64(m, "exit_code", &code);
    if (status != 0 || code != 0) {
        fprintf(stderr, "bench_routing: direct exec failed: %d (exit %lld)\n",
                status, (long long)code);
        failed = 1;
    }
    ended = 1;
}

static int
direct_one(void)
{
    static const struct sched_areq_cb cb = {d_frame, d_end, NULL};
    static const char *const argv[] = {"true"};
    struct pd_enc e;

    ended = 0;
    pd_enc_begin(&e, PD_MSG_EXEC, 0);
    pd_enc_str(&e, "sandbox", o.sandbox);
    pd_enc_strv(&e, "argv", argv, 1);
    sched_agentc_send(&S, o.agent, &e, &cb, NULL);
    while (!ended)
        uv_run(S.loop, UV_RUN_ONCE);
    return failed ? -1 : 0;
}

static int
direct_open(void)
{
    char err[256];

    S.loop = uv_default_loop();
    S.cfg.id = 99;
    S.rpc_client_tls = pd_tls_ctx_new(false, o.cert, o.key, o.ca, err,
                                      sizeof(err));
    if (S.rpc_client_tls == NULL) {
        fprintf(stderr, "bench_routing: tls: %s\n", err);
        return -1;
    }
    return sched_agentc_init(&S, err, sizeof(err));
}

static void
direct_close(void)
{
    sched_agentc_close(&S);
    uv_run(S.loop, UV_RUN_DEFAULT);
    SSL_CTX_free(S.rpc_client_tls);
}

/* ---- routed: HTTP ----------------------------------------------------- */

static int
http_connect(const char *addr)
{
    char host[64];
    const char *colon = strrchr(addr, ':');
    struct sockaddr_in sa = {.sin_family = AF_INET};
    int fd, one = 1;

    if (colon == NULL || (size_t)(colon - addr) >= sizeof(host))
        return -1;
    memcpy(host, addr, (size_t)(colon - addr));
    host[colon - addr] = '\0';
    sa.sin_port = htons((uint16_t)atoi(colon + 1));
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
        return -1;
    fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;
}

/* One request; reads the response by its Content-Length. */
static int
routed_one(int fd)
{
    static const char body[] = "{\"argv\":[\"true\"]}";
    char req[1024], buf[16384];
    size_t have = 0;
    long clen = -1;
    char *hend = NULL;
    int n = snprintf(req, sizeof(req),
                     "POST /v1/sandboxes/%s/exec HTTP/1.1\r\n"
                     "Host: bench\r\nAuthorization: Bearer %s\r\n"
                     "Content-Type: application/json\r\n"
                     "Content-Length: %zu\r\n\r\n%s",
                     o.sandbox, o.token, sizeof(body) - 1, body);

    if (write(fd, req, (size_t)n) != n)
        return -1;
    for (;;) {
        ssize_t k = read(fd, buf + have, sizeof(buf) - 1 - have);

        if (k <= 0)
            return -1;
        have += (size_t)k;
        buf[have] = '\0';
        if (hend == NULL && (hend = strstr(buf, "\r\n\r\n")) != NULL) {
            char *cl = strcasestr(buf, "content-length:");

            if (strncmp(buf, "HTTP/1.1 200", 12) != 0) {
                fprintf(stderr, "bench_routing: routed exec: %.200s\n", buf);
                return -1;
            }
            clen = cl != NULL && cl < hend ? atol(cl + 15) : 0;
        }
        if (hend != NULL && have >= (size_t)(hend + 4 - buf) + (size_t)clen)
            break;
    }
    if (strstr(hend, "\"exit_code\":0") == NULL &&
        strstr(hend, "\"exit_code\": 0") == NULL) {
        fprintf(stderr, "bench_routing: routed exec: %.200s\n", hend + 4);
        return -1;
    }
    return 0;
}

/* Alternates one direct and one routed exec (routed only with --api). */
static int
bench(uint64_t *direct, uint64_t *routed)
{
    int fd = -1;

    if (o.api != NULL && (fd = http_connect(o.api)) < 0) {
        fprintf(stderr, "bench_routing: cannot connect to %s\n", o.api);
        return -1;
    }
    for (unsigned i = 0; i < o.warmup + o.n; i++) {
        uint64_t t0 = pd_now_ns(), t1;

        if (direct_one() != 0)
            goto fail;
        t1 = pd_now_ns();
        if (fd >= 0 && routed_one(fd) != 0)
            goto fail;
        if (i >= o.warmup) {
            direct[i - o.warmup] = (t1 - t0) / 1000;
            routed[i - o.warmup] = (pd_now_ns() - t1) / 1000;
        }
    }
    if (fd >= 0)
        close(fd);
    return 0;
fail:
    if (fd >= 0)
        close(fd);
    return -1;
}

static int
usage(void)
{
    fprintf(stderr, "usage: bench_routing --agent A --cert C --key K --ca CA "
            "--sandbox ID [--api A --token T] [--n N] [--warmup N]\n");
    return 2;
}

int
main(int argc, char **argv)
{
    uint64_t *direct, *routed, p50d, p50r;

    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];

        if (strcmp(k, "--agent") == 0)
            o.agent = v;
        else if (strcmp(k, "--cert") == 0)
            o.cert = v;
        else if (strcmp(k, "--key") == 0)
            o.key = v;
        else if (strcmp(k, "--ca") == 0)
            o.ca = v;
        else if (strcmp(k, "--sandbox") == 0)
            o.sandbox = v;
        else if (strcmp(k, "--api") == 0)
            o.api = v;
        else if (strcmp(k, "--token") == 0)
            o.token = v;
        else if (strcmp(k, "--n") == 0)
            o.n = (unsigned)atoi(v);
        else if (strcmp(k, "--warmup") == 0)
            o.warmup = (unsigned)atoi(v);
        else
            return usage();
    }
    if (o.agent == NULL || o.sandbox == NULL || o.n == 0 ||
        (o.api != NULL && o.token == NULL))
        return usage();
    pd_log_init("bench_routing", PD_LOG_WARN);
    direct = calloc(o.n, sizeof(*direct));
    routed = calloc(o.n, sizeof(*routed));
    if (direct_open() != 0 || bench(direct, routed) != 0)
        return 1;
    direct_close();
    p50d = report("direct", direct, o.n);
    if (o.api != NULL) {
        p50r = report("routed", routed, o.n);
        printf("routing overhead at p50: %.2f ms\n",
               ((double)p50r - (double)p50d) / 1000.0);
    }
    free(direct);
    free(routed);
    return 0;
}
