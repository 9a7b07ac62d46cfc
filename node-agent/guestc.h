/*
 * guestc: the host's client for one guest agent (paddock-guest), over the
 * unix socket QEMU exposes for the VM's virtio-serial port (see qemu.h).
 * One libuv loop, many requests at once on the one connection.
 *
 * Life cycle:
 *   g = guestc_connect(loop, sock, timeout_ms, &cb, data)
 *       connects (retrying while QEMU starts and creates the socket),
 *       sends HELLO and calls cb.on_ready once the guest's HELLO arrives.
 *       The guest agent only answers a host HELLO, so a reconnect (a node
 *       agent restarted and re-adopting its VMs) is just another
 *       guestc_connect: background processes in the guest survive it,
 *       requests of the old connection are aborted on the guest side.
 *   guestc_close(g)
 *       ends the connection; every open request gets on_error(ECONNRESET),
 *       then cb.on_close; g is freed after on_close returns. on_close also
 *       comes when the guest or QEMU goes away, or when the guest reports
 *       a protocol error (ERROR under id 0).
 *
 * Requests (the message fields are in proto/msgtypes.h):
 *   r = guestc_exec(g, &spec, &rcb, data) and the other helpers below, or
 *   any request via guestc_req_new + fields + guestc_req_submit.
 *   Callbacks, all optional but on_error:
 *     on_start   EXEC_START of a streamed exec, or the OK that opens a file
 *                read or a tunnel; more frames follow.
 *     on_data    output: GUESTC_STDOUT / GUESTC_STDERR chunks of an exec
 *                or of process logs, GUESTC_DATA chunks of a file read or
 *                tunnel (eof set on the last).
 *     on_reply   the final answer: OK, or EXIT for an exec. m is valid only
 *                during the call (read it with the pd_msg_* accessors). For
 *                a file read and a tunnel m is NULL (the end was DATA eof).
 *     on_error   ERROR from the guest (errnum is the guest's errno, e.g.
 *                ENOENT, ENOSPC) or the connection ended (ECONNRESET).
 *     on_writable  credit is available again for guestc_req_send_data.
 *   After on_reply or on_error the request is freed; never touch r again.
 *
 * Flow control (per stream, PD_STREAM_WINDOW bytes): by default guestc
 * grants the guest more credit as soon as on_data returns. A consumer that
 * forwards the bytes somewhere slower (an HTTP client) calls
 * guestc_req_manual_window(r) and then guestc_req_grant(r, n) as it really
 * consumes n bytes; the guest stops producing for that stream alone.
 * Sending (file write, tunnel, exec stdin): guestc_req_credit(r) says how
 * much may be sent now (stream credit and connection backpressure), and
 * on_writable fires when it grows. A large file therefore never sits whole
 * in memory on either side.
 *
 * Not thread-safe: call everything from the loop's thread.
 */
#ifndef AGENT_GUESTC_H
#define AGENT_GUESTC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "proto/frame.h"

struct guestc;
struct guestc_req;

struct guestc_cb {
    void (*on_ready)(struct guestc *g);
    /* reason: 0 after guestc_close, else a negative errno; why in words. */
    void (*on_close)(struct guestc *g, int reason, const char *why);
};

enum guestc_stream {
    GUESTC_STDOUT = 1,
    GUESTC_STDERR = 2,
    GUESTC_DATA = 3,
};

struct guestc_req_cb {
    void (*on_start)(struct guestc_req *r, const struct pd_msg *m);
    void (*on_data)(struct guestc_req *r, enum guestc_stream s,
                    const void *data, size_t len, bool eof);
    void (*on_reply)(struct guestc_req *r, const struct pd_msg *m);
    void (*on_error)(struct guestc_req *r, int errnum, const char *message);
    void (*on_writable)(struct guestc_req *r);
};

/* ---- connection ---------------------------------------------------------- */

/*
 * Starts connecting; NULL only when out of memory. Gives up with
 * on_close(-ETIMEDOUT) when no HELLO came within timeout_ms.
 */
struct guestc *guestc_connect(uv_loop_t *loop, const char *sock_path,
                              unsigned timeout_ms, const struct guestc_cb *cb,
                              void *data);
void guestc_close(struct guestc *g);
bool guestc_is_ready(const struct guestc *g);
void *guestc_data(const struct guestc *g);
/* The guest's HELLO name (its hostname, the sandbox id). */
const char *guestc_peer_name(const struct guestc *g);
/* Requests in flight. */
size_t guestc_pending(const struct guestc *g);

/* ---- generic requests ---------------------------------------------------- */

/*
 * Starts a request of the given type: *e is begun with the type and a fresh
 * id; add fields with pd_enc_* and then call guestc_req_submit. NULL when
 * the connection is not ready (or out of memory); e is then not begun.
 */
struct guestc_req *guestc_req_new(struct guestc *g, unsigned type,
                                  const struct guestc_req_cb *cb, void *data,
                                  struct pd_enc *e);
/* Sends the request. On failure on_error is called before it returns. */
void guestc_req_submit(struct guestc_req *r, struct pd_enc *e);

void *guestc_req_data(const struct guestc_req *r);
uint64_t guestc_req_id(const struct guestc_req *r);
/* Sends CANCEL and frees r at once; no callback follows. */
void guestc_req_cancel(struct guestc_req *r);

/* Receive-side flow control; see the top of this file. */
void guestc_req_manual_window(struct guestc_req *r);
void guestc_req_grant(struct guestc_req *r, size_t bytes);

/* Send side: bytes that may be sent now. */
size_t guestc_req_credit(const struct guestc_req *r);
/*
 * Sends bytes (DATA, or STDIN for an exec) within the credit, split into
 * chunks; eof ends this direction. -EAGAIN over the credit, -ENOTCONN
 * once the connection is closing.
 */
int guestc_req_send_data(struct guestc_req *r, const void *data, size_t len,
                         bool eof);

/* ---- typed helpers ------------------------------------------------------- */

struct guestc_exec {
    const char *const *argv;  /* NULL-terminated; or command */
    const char *command;      /* run with /bin/sh -c */
    const char *cwd;          /* NULL: /workspace */
    const char *const *env;   /* NULL-terminated "NAME=value" */
    const void *stdin_data;   /* whole stdin, or NULL */
    size_t stdin_len;
    uint64_t timeout_ms;      /* 0: none */
    uint64_t output_max;      /* collected bytes per stream; 0: default */
    bool stream;              /* STDOUT/STDERR as they come */
    bool stdin_stream;        /* stdin via guestc_req_send_data (stream) */
};

/* exec: on_reply gets EXIT {exit_code, signal, timed_out, truncated,
 * duration_ms, stdout, stderr (collected mode)}. */
struct guestc_req *guestc_exec(struct guestc *g, const struct guestc_exec *x,
                               const struct guestc_req_cb *cb, void *data);
/* Background process named proc (NULL: the guest picks one). OK {proc,
 * pid}. The exec fields used: argv/command, cwd, env. */
struct guestc_req *guestc_proc_start(struct guestc *g, const char *proc,
                                     const struct guestc_exec *x,
                                     const struct guestc_req_cb *cb,
                                     void *data);
struct guestc_req *guestc_proc_list(struct guestc *g,
                                    const struct guestc_req_cb *cb,
                                    void *data);
struct guestc_req *guestc_proc_get(struct guestc *g, const char *proc,
                                   const struct guestc_req_cb *cb,
                                   void *data);
struct guestc_req *guestc_proc_logs(struct guestc *g, const char *proc,
                                    bool follow,
                                    const struct guestc_req_cb *cb,
                                    void *data);
/* kill_after_ms: SIGKILL the whole cgroup if still running (0: never). */
struct guestc_req *guestc_proc_signal(struct guestc *g, const char *proc,
                                      int sig, uint64_t kill_after_ms,
                                      const struct guestc_req_cb *cb,
                                      void *data);
struct guestc_req *guestc_wait_port(struct guestc *g, unsigned port,
                                    uint64_t timeout_ms,
                                    const struct guestc_req_cb *cb,
                                    void *data);
/* File write: send the bytes with guestc_req_send_data, eof at the end;
 * on_reply gets OK {size}. */
struct guestc_req *guestc_file_write(struct guestc *g, const char *path,
                                     unsigned mode, bool append,
                                     const struct guestc_req_cb *cb,
                                     void *data);
/* File read: on_start gets OK {size, mode}, then on_data chunks. */
struct guestc_req *guestc_file_read(struct guestc *g, const char *path,
                                    const struct guestc_req_cb *cb,
                                    void *data);
struct guestc_req *guestc_file_stat(struct guestc *g, const char *path,
                                    const struct guestc_req_cb *cb,
                                    void *data);
struct guestc_req *guestc_file_list(struct guestc *g, const char *path,
                                    bool recursive,
                                    const struct guestc_req_cb *cb,
                                    void *data);
struct guestc_req *guestc_file_mkdir(struct guestc *g, const char *path,
                                     bool parents, unsigned mode,
                                     const struct guestc_req_cb *cb,
                                     void *data);
struct guestc_req *guestc_file_delete(struct guestc *g, const char *path,
                                      bool recursive,
                                      const struct guestc_req_cb *cb,
                                      void *data);
struct guestc_req *guestc_file_rename(struct guestc *g, const char *from,
                                      const char *to,
                                      const struct guestc_req_cb *cb,
                                      void *data);
/* Tunnel to 127.0.0.1:port in the guest: on_start when connected, then
 * DATA both ways; on_reply(NULL) once both directions reached eof. */
struct guestc_req *guestc_tunnel(struct guestc *g, unsigned port,
                                 const struct guestc_req_cb *cb, void *data);
/* PING: on_reply gets the PONG; a liveness check of the agent's loop. */
struct guestc_req *guestc_ping(struct guestc *g,
                               const struct guestc_req_cb *cb, void *data);
struct guestc_req *guestc_info(struct guestc *g,
                               const struct guestc_req_cb *cb, void *data);
/* OK, then the guest syncs and powers off (QEMU exits). */
struct guestc_req *guestc_shutdown(struct guestc *g,
                                   const struct guestc_req_cb *cb,
                                   void *data);

#endif
