/*
 * paddock-scheduler: configuration, start-up, signals and shutdown.
 *
 * Start-up order matters: everything a Raft state change may touch (auth,
 * agent sessions, the API, forwarding) exists before Raft starts, because
 * the first on_state callback can come on the first loop iteration.
 * Shutdown runs the other way: Raft first (handing leadership over when
 * this member leads, so the others need not wait out an election), then
 * the listeners and the modules, then the FSM once the loop is empty.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/config.h"
#include "common/log.h"
#include "proto/tls.h"
#include "scheduler/sched.h"

/* How long shutdown may take once Raft is closed before the loop is
 * stopped regardless of handles someone forgot to close. */
#define STOP_GRACE_MS 3000

struct sched *sched_global;

static struct sched sched;
static uv_signal_t sig_term, sig_int;
static uv_timer_t stop_timer;

static const struct pd_config_opt options[] = {
    {"data_dir", PD_CFG_STRING, &sched.cfg.data_dir,
     "Raft log, snapshots and admin.token (created 0700)"},
    {"id", PD_CFG_UINT, &sched.cfg.id, "this member's Raft id (non-zero)"},
    {"raft_addr", PD_CFG_STRING, &sched.cfg.raft_addr,
     "host:port of the Raft transport"},
    {"api_listen", PD_CFG_STRING, &sched.cfg.api_listen,
     "host:port of the HTTP API"},
    {"rpc_listen", PD_CFG_STRING, &sched.cfg.rpc_listen,
     "host:port for agents and schedulers (mutual TLS)"},
    {"preview_listen", PD_CFG_STRING, &sched.cfg.preview_listen,
     "host:port of the preview listener"},
    {"preview_domain", PD_CFG_STRING, &sched.cfg.preview_domain,
     "domain of preview URLs (default preview.localhost)"},
    {"bootstrap", PD_CFG_LIST, &sched.cfg.bootstrap,
     "initial members id=host:port,... (this one included); empty: join"},
    {"tls_cert", PD_CFG_STRING, &sched.cfg.tls_cert,
     "this scheduler's certificate (OU=scheduler, PEM)"},
    {"tls_key", PD_CFG_STRING, &sched.cfg.tls_key, "its private key"},
    {"tls_ca", PD_CFG_STRING, &sched.cfg.tls_ca, "the cluster CA (PEM)"},
    {"raft_tls", PD_CFG_BOOL, &sched.cfg.raft_tls,
     "Raft traffic over the cluster mutual TLS (default true)"},
    {"require_join_token", PD_CFG_BOOL, &sched.cfg.require_join_token,
     "agents must send a node join token when they register (default "
     "false: the certificate alone)"},
    {"api_tls_cert", PD_CFG_STRING, &sched.cfg.api_tls_cert,
     "optional HTTPS certificate for the API and preview listeners"},
    {"api_tls_key", PD_CFG_STRING, &sched.cfg.api_tls_key, "its key"},
    {"strategy", PD_CFG_STRING, &sched.cfg.strategy,
     "placement: binpack (default) or spread"},
    {"log_level", PD_CFG_STRING, &sched.cfg.log_level,
     "debug, info, warn or error (default info)"},
    {"heartbeat", PD_CFG_DURATION, &sched.cfg.heartbeat_ms,
     "agents' heartbeat interval (default 1s)"},
    {"grace", PD_CFG_DURATION, &sched.cfg.grace_ms,
     "a node silent this long is down (default 5s)"},
    {"election_timeout", PD_CFG_DURATION, &sched.cfg.election_timeout_ms,
     "Raft election timeout (default 1s)"},
    {"exec_timeout", PD_CFG_DURATION, &sched.cfg.exec_timeout_ms,
     "default exec timeout (default 60s)"},
    {"rate_per_s", PD_CFG_UINT, &sched.cfg.rate_per_s,
     "API requests per second per token (default 50)"},
    {"rate_burst", PD_CFG_UINT, &sched.cfg.rate_burst,
     "API burst per token (default 100)"},
    {"snapshot_threshold", PD_CFG_UINT, &sched.cfg.snapshot_threshold,
     "Raft entries between snapshots (default 8192)"},
    {NULL, 0, NULL, NULL},
};

static void
set_defaults(struct sched_cfg *c)
{
    c->data_dir = "/var/lib/paddock-scheduler";
    c->raft_addr = "127.0.0.1:7001";
    c->api_listen = "127.0.0.1:8080";
    c->rpc_listen = "127.0.0.1:7101";
    c->preview_listen = "127.0.0.1:8180";
    c->preview_domain = "preview.localhost";
    c->bootstrap = "";
    c->tls_cert = "";
    c->tls_key = "";
    c->tls_ca = "";
    c->api_tls_cert = "";
    c->raft_tls = true;
    c->api_tls_key = "";
    c->strategy = "binpack";
    c->log_level = "info";
    c->heartbeat_ms = 1000;
    c->grace_ms = 5000;
    c->election_timeout_ms = 1000;
    c->exec_timeout_ms = 60000;
    c->rate_per_s = 50;
    c->rate_burst = 100;
    c->snapshot_threshold = 8192;
}

/* "host:port" with a numeric port; the listeners check the host. */
static bool
addr_ok(const char *a)
{
    const char *colon = a != NULL ? strrchr(a, ':') : NULL;
    char *end;
    long port;

    if (colon == NULL || colon == a)
        return false;
    port = strtol(colon + 1, &end, 10);
    return *end == '\0' && colon[1] != '\0' && port >= 0 && port < 65536;
}

static int
check_config(struct sched_cfg *c, char *err, size_t errlen)
{
    const char *addrs[][2] = {
        {"raft_addr", c->raft_addr}, {"api_listen", c->api_listen},
        {"rpc_listen", c->rpc_listen}, {"preview_listen", c->preview_listen},
    };
    size_t i;

    if (c->id == 0) {
        snprintf(err, errlen, "id: must be a non-zero Raft id");
        return -EINVAL;
    }
    if (c->data_dir == NULL || c->data_dir[0] != '/') {
        snprintf(err, errlen, "data_dir: must be an absolute path");
        return -EINVAL;
    }
    for (i = 0; i < PD_ARRAY_SIZE(addrs); i++) {
        if (!addr_ok(addrs[i][1])) {
            snprintf(err, errlen, "%s: \"%s\" is not host:port", addrs[i][0],
                     addrs[i][1] != NULL ? addrs[i][1] : "");
            return -EINVAL;
        }
    }
    if (*c->tls_cert == '\0' || *c->tls_key == '\0' || *c->tls_ca == '\0') {
        snprintf(err, errlen, "tls_cert, tls_key, tls_ca: mutual TLS with "
                 "agents and schedulers needs all three "
                 "(deploy/make-certs.sh)");
        return -EINVAL;
    }
    {
        const char *files[][2] = {
            {"tls_cert", c->tls_cert}, {"tls_key", c->tls_key},
            {"tls_ca", c->tls_ca}, {"api_tls_cert", c->api_tls_cert},
            {"api_tls_key", c->api_tls_key},
        };

        for (i = 0; i < PD_ARRAY_SIZE(files); i++) {
            if (*files[i][1] != '\0' && access(files[i][1], R_OK) != 0) {
                snprintf(err, errlen, "%s: %s: %s", files[i][0],
                         files[i][1], strerror(errno));
                return -EINVAL;
            }
        }
    }
    if ((*c->api_tls_cert == '\0') != (*c->api_tls_key == '\0')) {
        snprintf(err, errlen, "api_tls_cert, api_tls_key: give both or "
                 "neither");
        return -EINVAL;
    }
    if (strcmp(c->strategy, "binpack") != 0 &&
        strcmp(c->strategy, "spread") != 0) {
        snprintf(err, errlen, "strategy: \"%s\" is not binpack or spread",
                 c->strategy);
        return -EINVAL;
    }
    if (c->heartbeat_ms == 0 || c->grace_ms <= c->heartbeat_ms) {
        snprintf(err, errlen, "grace: must be longer than heartbeat");
        return -EINVAL;
    }
    if (c->election_timeout_ms < 100 || c->election_timeout_ms > 60000) {
        snprintf(err, errlen, "election_timeout: must be 100ms to 60s");
        return -EINVAL;
    }
    if (sched_cluster_check(c, err, errlen) != 0)
        return -EINVAL;
    if (c->snapshot_threshold < 4 || c->snapshot_threshold > 1000000) {
        snprintf(err, errlen, "snapshot_threshold: must be 4 to 1000000");
        return -EINVAL;
    }
    return 0;
}

/* pd_config_load returns 1 for --help as for --check-config; only the
 * latter validates. */
static bool
asked_help(int argc, char **argv)
{
    int i;

    for (i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
            return true;
    return false;
}

static int
setup_tls(struct sched *s, char *err, size_t errlen)
{
    struct sched_cfg *c = &s->cfg;

    s->rpc_server_tls = pd_tls_ctx_new(true, c->tls_cert, c->tls_key,
                                       c->tls_ca, err, errlen);
    if (s->rpc_server_tls == NULL)
        return -EINVAL;
    s->rpc_client_tls = pd_tls_ctx_new(false, c->tls_cert, c->tls_key,
                                       c->tls_ca, err, errlen);
    if (s->rpc_client_tls == NULL)
        return -EINVAL;
    if (*c->api_tls_cert != '\0') {
        s->api_tls = pd_tls_ctx_new(true, c->api_tls_cert, c->api_tls_key,
                                    NULL, err, errlen);
        if (s->api_tls == NULL)
            return -EINVAL;
    }
    return 0;
}

static void
on_stop_timer(uv_timer_t *t)
{
    pd_warn("scheduler", "handles still open %d ms after shutdown, "
            "stopping the loop", STOP_GRACE_MS);
    uv_stop(t->loop);
}

static void
on_cluster_closed(void *data)
{
    PD_UNUSED(data);
    uv_close((uv_handle_t *)&sig_term, NULL);
    uv_close((uv_handle_t *)&sig_int, NULL);
    uv_timer_start(&stop_timer, on_stop_timer, STOP_GRACE_MS, 0);
    uv_unref((uv_handle_t *)&stop_timer);
}

/*
 * Leadership is handed over: close the listeners and the modules in the
 * reverse order of start-up, then Raft. s->stopping keeps Raft state
 * changes from reaching the closed modules meanwhile.
 */
static void
on_handed_over(void *data)
{
    struct sched *s = data;

    sched_preview_close(s);
    sched_api_close(s);
    sched_forward_close(s);
    sched_nodes_close(s);
    sched_agentc_close(s);
    sched_auth_close(s);
    sched_cluster_close(s, on_cluster_closed, s);
}

static void
on_signal(uv_signal_t *h, int signum)
{
    struct sched *s = h->data;

    if (s->stopping) {
        pd_info("scheduler", "second %s, exiting now", strsignal(signum));
        exit(1);
    }
    pd_info("scheduler", "%s: handing over leadership and shutting down",
            strsignal(signum));
    /* From here the API answers 503 and Raft state changes no longer
     * reach the modules, which are about to close. */
    s->stopping = true;
    sched_cluster_handover(s, on_handed_over, s);
}

static int
start(struct sched *s, char *err, size_t errlen)
{
    int rv;

    if (mkdir(s->cfg.data_dir, 0700) != 0 && errno != EEXIST) {
        snprintf(err, errlen, "data_dir %s: %s", s->cfg.data_dir,
                 strerror(errno));
        return -errno;
    }
    if ((rv = setup_tls(s, err, errlen)) != 0)
        return rv;
    if ((rv = sched_metrics_init(s)) != 0) {
        snprintf(err, errlen, "metrics: %s", strerror(-rv));
        return rv;
    }
    if ((rv = fsm_new(&s->fsm, err, errlen)) != 0 ||
        (rv = sched_auth_init(s, err, errlen)) != 0 ||
        (rv = sched_agentc_init(s, err, errlen)) != 0 ||
        (rv = sched_nodes_init(s, err, errlen)) != 0 ||
        (rv = sched_forward_init(s, err, errlen)) != 0 ||
        (rv = sched_api_init(s, err, errlen)) != 0 ||
        (rv = sched_preview_init(s, err, errlen)) != 0 ||
        (rv = sched_cluster_init(s, err, errlen)) != 0)
        return rv;
    return 0;
}

int
main(int argc, char **argv)
{
    struct sched *s = &sched;
    enum pd_log_level level;
    char err[512] = "";
    int rv;

    pd_log_init("paddock-scheduler", PD_LOG_INFO);
    set_defaults(&s->cfg);
    rv = pd_config_load(options, argc, argv, NULL, NULL, err, sizeof(err));
    if (rv == 1 && asked_help(argc, argv))
        return 0;
    if (rv == 0 || rv == 1) {
        int crv = check_config(&s->cfg, err, sizeof(err));

        if (crv != 0)
            rv = crv;
    }
    if (rv == 1)
        return 0;
    if (rv < 0) {
        fprintf(stderr, "paddock-scheduler: %s\n", err);
        return 2;
    }
    if (pd_log_parse_level(s->cfg.log_level, &level) != 0) {
        fprintf(stderr, "paddock-scheduler: log_level: \"%s\" is not "
                "debug, info, warn or error\n", s->cfg.log_level);
        return 2;
    }
    pd_log_set_level(level);
    signal(SIGPIPE, SIG_IGN);
    s->loop = uv_default_loop();
    s->strategy = strcmp(s->cfg.strategy, "spread") == 0 ? SCHED_SPREAD
                                                         : SCHED_BINPACK;
    sched_global = s;

    uv_signal_init(s->loop, &sig_term);
    uv_signal_init(s->loop, &sig_int);
    uv_timer_init(s->loop, &stop_timer);
    sig_term.data = sig_int.data = s;
    uv_signal_start(&sig_term, on_signal, SIGTERM);
    uv_signal_start(&sig_int, on_signal, SIGINT);

    if (start(s, err, sizeof(err)) != 0)
        pd_fatal("scheduler", "%s", err);
    pd_info("scheduler", "member %llu: API on %s, RPC on %s, Raft on %s, "
            "data in %s", (unsigned long long)s->cfg.id, s->cfg.api_listen,
            s->cfg.rpc_listen, s->cfg.raft_addr, s->cfg.data_dir);

    uv_run(s->loop, UV_RUN_DEFAULT);
    uv_close((uv_handle_t *)&stop_timer, NULL);
    uv_run(s->loop, UV_RUN_NOWAIT);
    sched_metrics_close(s);
    fsm_free(s->fsm);
    SSL_CTX_free(s->rpc_server_tls);
    SSL_CTX_free(s->rpc_client_tls);
    SSL_CTX_free(s->api_tls);
    pd_info("scheduler", "member %llu: stopped",
            (unsigned long long)s->cfg.id);
    pd_config_free(options);
    return 0;
}
