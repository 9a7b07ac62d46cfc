/*
 * A minimal QMP client (QEMU's JSON control protocol) on the VM's unix
 * socket, for what the agent controls through QEMU rather than the guest:
 * quit, host port forwards, status.
 *
 * QEMU is the socket's server, so a restarted agent connects again to a
 * running VM. The client reads the greeting, negotiates capabilities, then
 * sends commands; each carries an "id" that the answer echoes. Events are
 * passed on by name. Lines longer than 1 MiB close the connection.
 */
#ifndef AGENT_QMP_H
#define AGENT_QMP_H

#include <jansson.h>
#include <uv.h>

struct agent_qmp;

/* status 0 with ret (borrowed) or a negative errno with a description. */
typedef void (*agent_qmp_done)(void *arg, int status, json_t *ret,
                               const char *desc);

struct agent_qmp_cb {
    void (*on_ready)(void *arg);                  /* capabilities done */
    void (*on_event)(void *arg, const char *name, json_t *data);
    void (*on_close)(void *arg, int reason);      /* once, then freed */
};

int agent_qmp_connect(uv_loop_t *loop, const char *path,
                      const struct agent_qmp_cb *cb, void *arg,
                      struct agent_qmp **out);

/*
 * Sends a command; args (may be NULL) is consumed. done may be NULL.
 * Returns -ENOTCONN when the connection is closing; done is then not
 * called.
 */
int agent_qmp_cmd(struct agent_qmp *q, const char *execute, json_t *args,
                  agent_qmp_done done, void *arg);

/* A human monitor command line through QMP (hostfwd_add, ...). */
int agent_qmp_hmp(struct agent_qmp *q, const char *cmdline,
                  agent_qmp_done done, void *arg);

/*
 * Closes from our side: pending commands complete with -ECONNRESET before
 * it returns, and on_close is not called (it reports closes the agent did
 * not ask for: QEMU gone, a protocol error). q is freed later.
 */
void agent_qmp_close(struct agent_qmp *q);

#endif
