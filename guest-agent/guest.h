/*
 * paddock-guest internals: one poll loop, one channel to the host, and the
 * requests it serves (exec, processes, files, tunnels, info).
 *
 * The loop (loop.c) knows three kinds of event sources, all registered by
 * the modules that own them:
 *   - watches: a file descriptor and a want() callback that says, every
 *     iteration, which poll events it wants now (0 = none). Producers that
 *     must respect flow control simply want nothing while they have no
 *     credit or while the channel's write queue is above its high water.
 *     A watch with fd -1 whose want() returns POLLIN is a task: it runs
 *     without polling (regular files are always "readable").
 *   - timers: a deadline on the monotonic clock.
 *   - the SIGCHLD signalfd, handled by the loop itself (reaping).
 * Deleting a watch or timer during dispatch is safe; the slot is emptied
 * and compacted between iterations.
 *
 * The channel (server.c) is the virtio-serial port. Requests (struct greq)
 * are bound to one host connection: when the host goes away they are
 * aborted, but background processes and their logs stay for the next host
 * (a restarted node agent re-adopts the VM).
 */
#ifndef GUEST_H
#define GUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "proto/frame.h"

/* Channel write queue: producers pause above high water. */
#define GUEST_CHAN_HIGH (1u << 20)
/* Payload of one DATA/STDOUT/STDERR frame sent by the guest. */
#define GUEST_CHUNK (128u << 10)
/* Default and largest collected output per stream of an exec. */
#define GUEST_OUTPUT_DEFAULT (1u << 20)
#define GUEST_OUTPUT_MAX (3u << 19)
/* Bytes of output kept per background process. */
#define GUEST_RING_BYTES (256u << 10)
#define GUEST_PROCS_MAX 256
#define GUEST_LIST_MAX 20000

/* ---- loop.c ------------------------------------------------------------ */

struct gwatch {
    int fd;
    short (*want)(struct gwatch *w);
    void (*ready)(struct gwatch *w, short revents);
    void *obj;
    int slot; /* -1 when not registered */
};

struct gtimer {
    uint64_t at_ms;
    void (*fire)(struct gtimer *t);
    void *obj;
    int slot;
};

void loop_init(void);
int watch_add(struct gwatch *w);
void watch_del(struct gwatch *w);
int timer_arm(struct gtimer *t, uint64_t delay_ms);
void timer_stop(struct gtimer *t);
/* Runs forever. */
void loop_run(void) __attribute__((noreturn));

/* Called by the loop for every reaped child: exec and proc claim theirs. */
void child_exited(pid_t pid, int status);

/* ---- server.c: the channel and request registry ------------------------ */

struct greq;

struct greq_ops {
    /* A frame under this request's id (DATA, STDIN, WINDOW, CANCEL). */
    void (*on_msg)(struct greq *r, const struct pd_msg *m);
    /* The host went away or cancelled: release everything. */
    void (*abort)(struct greq *r);
};

struct greq {
    uint64_t id;
    unsigned type;
    const struct greq_ops *ops;
    uint64_t credit; /* bytes this side may still send under id */
    struct greq *next;
};

/* Opens the port and registers it with the loop. */
int server_init(const char *port_name);
/*
 * Serves on an open stream instead (one end of a socketpair), so unit tests
 * run the whole agent without a VM. A peer that closes it is a hangup for
 * good: unlike QEMU's port, a socketpair never comes back.
 */
int server_init_fd(int fd);
/* How long a queue the host does not read may sit before its session ends
 * (see server.c). */
void server_set_stall_ms(unsigned ms);

/* Registers or forgets a live request of the current connection. */
void greq_add(struct greq *r, uint64_t id, unsigned type,
              const struct greq_ops *ops);
void greq_remove(struct greq *r);

/* True while a host is connected and said HELLO. */
bool chan_up(void);
/* True when a producer may queue another chunk now. */
bool chan_room(void);
/* Finishes e and queues it; drops it silently when no host is connected. */
void chan_send(struct pd_enc *e);
void chan_error(uint64_t id, int errnum, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void chan_ok(uint64_t id);
/* Grants the host credit for a stream it sends on (WINDOW {bytes}). */
void chan_window(uint64_t id, uint64_t bytes);
/* Writes the queue out synchronously, for at most timeout_ms. */
void chan_flush(int timeout_ms);

/* Request handlers, one per module. Each answers or registers a greq. */
void exec_request(const struct pd_msg *m);
void proc_start_request(const struct pd_msg *m);
void proc_list_request(const struct pd_msg *m);
void proc_get_request(const struct pd_msg *m);
void proc_logs_request(const struct pd_msg *m);
void proc_signal_request(const struct pd_msg *m);
void proc_wait_port_request(const struct pd_msg *m);
void file_write_request(const struct pd_msg *m);
void file_read_request(const struct pd_msg *m);
void file_stat_request(const struct pd_msg *m);
void file_list_request(const struct pd_msg *m);
void file_mkdir_request(const struct pd_msg *m);
void file_delete_request(const struct pd_msg *m);
void file_rename_request(const struct pd_msg *m);
void tunnel_request(const struct pd_msg *m);
void info_request(const struct pd_msg *m);
void shutdown_request(const struct pd_msg *m);

/* ---- spawn.c: children in their own session and cgroup ----------------- */

struct gspawn {
    char **argv;  /* NULL-terminated */
    char **envp;  /* NULL-terminated, complete environment */
    const char *cwd;
    int stdin_fd; /* -1: /dev/null */
    int stdout_fd;
    int stderr_fd;
};

/* Options shared by exec and processes, parsed from a request. */
struct gcmd {
    char **argv;
    char **envp;
    char *cwd;
};

/*
 * Parses argv | command, cwd and env from m into c. Returns 0 or a negative
 * errno with a reason in err.
 */
int gcmd_parse(const struct pd_msg *m, struct gcmd *c, char *err,
               size_t errlen);
void gcmd_free(struct gcmd *c);

/*
 * Forks and execs s in a new session (its pid is its process group) and in
 * a fresh cgroup named by *cg_out (malloc'd, NULL without cgroups). Returns
 * the pid or a negative errno: exec failures of the child (ENOENT, EACCES)
 * are reported here, not as an exit code.
 */
pid_t spawn_child(const struct gspawn *s, char **cg_out);

/* Kills every process of the cgroup, or the process group without one. */
void spawn_kill_all(const char *cg, pid_t pgid, int sig);
/* Removes the cgroup when empty; returns false while it is still busy. */
bool spawn_cgroup_release(const char *cg);
/* Sets the per-cgroup process cap (fork bombs stop there). */
void spawn_set_pids_max(unsigned n);
/* Mounts cgroup2 and prepares the parent cgroup. */
int spawn_cgroup_init(void);

/* Makes fd non-blocking and close-on-exec. */
int fd_nonblock(int fd);

/* ---- path.c ------------------------------------------------------------ */

/*
 * Checks a path from the host and makes it absolute in out: relative paths
 * are taken from /workspace. Rejects empty paths, NUL bytes and any ".."
 * component (EINVAL), and paths longer than PATH_MAX (ENAMETOOLONG).
 */
int path_check(const char *p, size_t len, char *out, size_t outlen,
               char *err, size_t errlen);

/* Reads field key of m as a checked path. */
int path_field(const struct pd_msg *m, const char *key, char *out,
               size_t outlen, char *err, size_t errlen);

/* ---- ring.c: bounded log of a process's output ------------------------ */

/* Small writes of one stream grow the tail chunk up to this size. */
#define RING_CHUNK_GROW (8u << 10)

struct ring_chunk {
    uint64_t seq;  /* offset of the first byte in the whole output */
    uint32_t len;
    uint32_t room;  /* bytes allocated in data */
    uint8_t stream; /* 1 stdout, 2 stderr */
    struct ring_chunk *next;
    unsigned char data[];
};

struct ring {
    struct ring_chunk *head, *tail;
    struct ring_chunk *tail_prev; /* to relink a tail that grew */
    size_t bytes;   /* cost of the chunks held (header and room), <= cap */
    size_t cap;
    uint64_t end; /* seq after the last byte ever appended */
};

void ring_init(struct ring *r, size_t cap);
void ring_free(struct ring *r);
/*
 * Appends; drops the oldest chunks beyond cap (the newest chunk always
 * stays). Returns 0 or -ENOMEM.
 */
int ring_append(struct ring *r, int stream, const void *data, size_t len);
/*
 * Finds the bytes at or after seq: sets *stream, *data and *len to the
 * longest run of one stream starting at max(seq, oldest kept) and returns
 * its seq, or returns r->end with *len 0 when nothing is left.
 */
uint64_t ring_read(const struct ring *r, uint64_t seq, int *stream,
                   const unsigned char **data, size_t *len);

/* ---- proc.c / exec.c lifecycle ----------------------------------------- */

/* Ends everything started for the host (shutdown). */
void proc_kill_all(void);
bool exec_child_exited(pid_t pid, int status);
bool proc_child_exited(pid_t pid, int status);

/* ---- main.c ------------------------------------------------------------- */

/* The environment every child starts from (PATH, HOME, ...). */
extern char **guest_base_env;
/* Whether this process is PID 1 (else a development run on a host). */
extern bool guest_is_init;
/* Syncs, unmounts and powers off; never returns. */
void guest_poweroff(void) __attribute__((noreturn));

#endif
