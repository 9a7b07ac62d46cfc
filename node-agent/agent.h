/*
 * paddock-agent internals: the daemon's configuration, its global state,
 * and the sandbox record shared by the files of node-agent/.
 *
 *   main.c      configuration, start-up, signals
 *   sandbox.c   VM life cycle: create, boot, ready, stop, destroy, crash,
 *               re-adoption after an agent restart
 *   rpc.c       the schedulers' RPC (mutual TLS) and request dispatch
 *   relay.c     guest requests relayed between a scheduler and a VM
 *   session.c   the session with the scheduler leader
 *   cgroup.c    per-sandbox cgroups (v1/v2)
 *   capacity.c  what the host offers
 *   state.c     sqlite persistence
 *   qmp.c       QEMU control
 *   egress.c    HTTP egress proxy for allow-listed sandboxes
 */
#ifndef AGENT_H
#define AGENT_H

#include <limits.h>
#include <openssl/ssl.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include "common/util.h"
#include "node-agent/capacity.h"
#include "node-agent/cgroup.h"

struct agent_state;
struct agent_session;
struct agent_qmp;
struct agent_egress_listener;
struct pd_conn;
struct pd_msg;
struct relay;

struct agent_cfg {
    char *data_dir;
    char *rpc_listen;      /* loopback host:port */
    char *rpc_advertise;   /* address given to the schedulers */
    char *tls_cert, *tls_key, *tls_ca;
    char *schedulers;      /* comma-separated host:port */
    char *node_id;
    char *labels;          /* k=v,k=v */
    char *accel;           /* auto, kvm, tcg */
    char *kernel, *initrd;
    char *qemu_binary;
    char *qemu_user;
    char *cgroup;          /* auto, v1, v2, none */
    char *log_level;
    uint64_t reserve_cpus;
    uint64_t reserve_memory, reserve_disk;
    uint64_t cpu_overcommit;
    uint64_t memory_overhead;
    uint64_t max_cpus, max_memory, max_disk, min_memory, min_disk;
    uint64_t exec_timeout_ms, output_max;
    uint64_t heartbeat_ms;
    uint64_t boot_timeout_ms, stop_timeout_ms;
    uint64_t kvm_probe_timeout_ms;
    bool stop_vms_on_exit;
    char *join_token_file; /* a node token (role node) for NODE_REGISTER */
};

enum sb_state {
    SB_STARTING,
    SB_RUNNING,
    SB_STOPPING,
    SB_STOPPED,
    SB_FAILED,
};

struct sb_port {
    unsigned guest;
    unsigned host;
    struct sb_port *next;
};

/* Someone waiting for a sandbox to become ready (a create with wait). */
struct sb_waiter {
    void (*done)(void *arg, int status, const char *reason);
    void *arg;
    struct sb_waiter *next;
};

struct sandbox {
    struct agent *agent;
    char id[PD_ID_MAX + 1];
    char dir[112];        /* data_dir (<= 70) + "/vm/" + dir_name */
    char dir_name[32];    /* agent-chosen, never from user input */

    /* Spec, as created. */
    unsigned cpus;
    uint64_t memory_mb, disk_mb;
    char egress[8];       /* none, all, allow */
    char *allow;          /* comma-separated hosts for "allow" */
    char *env_json;       /* default environment for exec, JSON object */

    enum sb_state state;
    char reason[512];
    uint64_t created_ms;  /* wall clock */
    uint64_t start_ns;    /* monotonic, for create-to-ready */
    uint64_t ready_ms;    /* create-to-ready duration */

    pid_t pid;
    uint64_t pid_start;
    uv_process_t *proc;   /* when we spawned it */
    uv_poll_t *pidfd_poll; /* when adopted: pidfd readable at exit */
    int pidfd;
    uv_timer_t *timer;    /* boot and stop deadlines */
    struct agent_qmp *qmp;
    uv_timer_t *qmp_timer; /* QMP reconnects */
    void *guest;          /* the guest link (relay.c) */
    struct agent_egress_listener *egress_l;
    struct sb_port *ports;
    struct sb_waiter *waiters;
    bool adopted;
    bool destroying;
    bool guest_ready;
    uint64_t oom_before;
    struct sb_waiter *destroy_waiters;

    struct sandbox *next;
};

struct agent {
    uv_loop_t *loop;
    struct agent_cfg cfg;
    struct agent_cg cg;
    struct agent_state *state;
    struct agent_res offer;
    struct agent_session *session;
    SSL_CTX *rpc_tls;
    SSL_CTX *session_tls;
    uv_tcp_t rpc_server;
    char rpc_addr[64];     /* bound address */
    uid_t qemu_uid;
    gid_t qemu_gid;
    bool drop_privileges;
    const char *accel;     /* chosen: "kvm" or "tcg" */
    char node[PD_ID_MAX + 1];
    struct sandbox *sandboxes;
    bool stopping;
    char *join_token;      /* read from join_token_file, or NULL */
};

/* ---- sandbox.c --------------------------------------------------------- */

struct sb_spec {
    const char *id;
    unsigned cpus;
    uint64_t memory_mb, disk_mb;
    const char *egress;
    const char *allow;    /* comma-separated */
    const char *env_json; /* JSON object or NULL */
};

const char *sb_state_name(enum sb_state s);
struct sandbox *sb_find(struct agent *a, const char *id);

/* Resources held by all sandboxes (including overhead). */
void sb_used(struct agent *a, struct agent_res *used);

/*
 * Creates a sandbox. Validates the spec, checks capacity, and starts the
 * VM; done (optional) fires once it is ready or has failed. Returns 0,
 * -EEXIST for an existing id with another spec (the same spec is 0 and
 * waits on the existing one), or -errno with a reason in err.
 */
int sb_create(struct agent *a, const struct sb_spec *spec,
              struct sb_waiter *w, char *err, size_t errlen);

/* Stops the VM (guest shutdown, QMP quit, SIGKILL) and deletes its disk
 * and directory. w (optional, taken) fires when done. */
int sb_destroy(struct agent *a, const char *id, struct sb_waiter *w,
               char *err, size_t errlen);

/* Re-adopts or cleans up the VMs recorded in sqlite. */
int sb_restore(struct agent *a);

/* Opens / closes a loopback forward to a guest port. */
int sb_port_open(struct sandbox *sb, unsigned guest_port,
                 void (*done)(void *arg, int status, unsigned host_port,
                              const char *err),
                 void *arg);
int sb_port_close(struct sandbox *sb, unsigned guest_port,
                  void (*done)(void *arg, int status, unsigned host_port,
                               const char *err),
                  void *arg);

/* From the guest link (relay.c): HELLO received; link lost. */
void sb_guest_ready(struct sandbox *sb);
void sb_guest_lost(struct sandbox *sb);

/* Encodes the sandbox as a map value (for STATUS and LIST). */
struct pd_enc;
void sb_encode(const struct sandbox *sb, struct pd_enc *e);

/* Stops everything at agent exit (VMs keep running unless configured). */
void sb_shutdown_all(struct agent *a);

/* ---- rpc.c ------------------------------------------------------------- */

/* One connection carrying scheduler requests (RPC port or session). */
struct rpc_peer {
    struct agent *agent;
    struct pd_conn *conn; /* NULL once closed */
    int refs;
    struct relay *relays;
    bool rpc_port;        /* accepted on the RPC port (not the session) */
    struct rpc_peer *next;
};

void rpc_peer_unref(struct rpc_peer *p);

int agent_rpc_listen(struct agent *a, char *err, size_t errlen);
/* Stops listening and closes every RPC-port connection (agent exit). */
void agent_rpc_stop(struct agent *a);
/* A request from a scheduler on any connection (RPC port or session). */
void agent_rpc_dispatch(struct agent *a, struct pd_conn *c,
                        const struct pd_msg *m);
/* A connection carrying requests closed: cancel its relays. */
void agent_rpc_conn_closed(struct agent *a, struct pd_conn *c);
/* Hands the egress proxy the sandbox token found in a sandbox's
 * environment (PADDOCK_TOKEN), at create and at re-adoption. */
void agent_egress_token_from_env(const char *id, const char *env_json);
/* Reports a state change to the leader. */
void agent_report_state(struct agent *a, const struct sandbox *sb);
/* Fills NODE_REGISTER and NODE_HEARTBEAT fields. */
void agent_fill_register(void *arg, struct pd_enc *e);
void agent_fill_heartbeat(void *arg, struct pd_enc *e);

/* ---- relay.c ----------------------------------------------------------- */

/* Forwards a guest request (100-199) from a scheduler to the sandbox. */
int relay_start(struct rpc_peer *p, struct sandbox *sb,
                const struct pd_msg *m, char *err, size_t errlen);
/* A frame for an open relay (DATA, STDIN, WINDOW, CANCEL): true if used. */
bool relay_route(struct rpc_peer *p, const struct pd_msg *m);
/* The scheduler's connection closed: cancel its relays in the guests. */
void relay_peer_closed(struct rpc_peer *p);
/* Connects the sandbox's guest link; ready() when the guest says HELLO. */
int relay_guest_connect(struct sandbox *sb);
/* Drops the guest link; open relays end with an error. */
void relay_guest_close(struct sandbox *sb, const char *why);
/* Asks the guest to power off; done when it has answered (or failed). */
int relay_guest_shutdown(struct sandbox *sb);

#endif
