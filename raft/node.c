#include "raft/node.h"

#include <errno.h>
#include <raft/uv.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "raft/transport_tls.h"

struct raftnode {
    uv_loop_t *loop;
    struct fsm *fsm;
    struct raft_io io;
    struct raft_uv_transport transport;
    struct raft raft;
    bool io_ready, transport_ready, raft_ready, started;
    bool tls; /* transport is raft/transport_tls.c, not raft_uv_tcp */

    char dir[4096];
    char address[FSM_ADDR_MAX + 1];
    uint64_t id;
    struct raftnode_peer *bootstrap;
    size_t n_bootstrap;
    void (*on_state)(struct raftnode *n, int old_state, int new_state,
                     void *data);
    void *data;

    uv_timer_t poll;   /* state changes (raft 0.15 has no callback) */
    uv_timer_t defer;  /* work that must not run inside raft callbacks */
    int last_state;

    /* The one membership change in flight. */
    struct raft_change change;
    bool changing;
    int change_step; /* 1: raft_add sent, 2: raft_assign pending/sent */
    uint64_t change_id;
    raftnode_done_cb change_cb;
    void *change_data;

    struct raft_transfer transfer;
    bool transferring;
    raftnode_done_cb transfer_cb;
    void *transfer_data;

    /*
     * Proposals of this loop iteration, sent as one entry (a batch,
     * raft/cmd.h) from the idle handle, which also keeps the loop from
     * blocking while they wait. Proposals whose raft_apply failed wait
     * in failed for the same handle, so that their callbacks never run
     * inside someone's raftnode_propose.
     */
    uv_idle_t flush;
    void **q_enc;
    size_t *q_len;
    struct pitem *q_item;
    size_t q_n, q_cap, q_bytes;
    struct propose *failed;

    bool closing;
    bool close_transfer;
    int handles_open;
    void (*done)(void *data);
    void *done_data;

    char err[RAFT_ERRMSG_BUF_SIZE + 128];
};

/* One proposal: its request id and who waits for its result. */
struct pitem {
    struct fsm_rid rid;
    raftnode_apply_cb cb;
    void *data;
};

/* One Raft entry: a command, or a batch of count commands. */
struct propose {
    struct raft_apply req;
    struct raftnode *n;
    struct propose *next; /* on n->failed */
    int status;           /* why raft_apply refused it */
    size_t count;
    struct pitem items[];
};

struct barrier {
    struct raft_barrier req;
    raftnode_done_cb cb;
    void *data;
};

static void PD_PRINTF(2, 3)
set_err(struct raftnode *n, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(n->err, sizeof(n->err), fmt, ap);
    va_end(ap);
}

/* raft's codes as negative errno values. */
static int
map_rv(int rv)
{
    switch (rv) {
    case 0:
        return 0;
    case RAFT_NOTLEADER:
        return RAFTNODE_ENOTLEADER;
    case RAFT_LEADERSHIPLOST:
        return RAFTNODE_ELOST;
    case RAFT_SHUTDOWN:
    case RAFT_CANCELED:
        return RAFTNODE_ESHUTDOWN;
    case RAFT_CANTCHANGE:
    case RAFT_BUSY:
        return -EBUSY;
    case RAFT_DUPLICATEID:
    case RAFT_DUPLICATEADDRESS:
        return -EEXIST;
    case RAFT_BADID:
    case RAFT_NOTFOUND:
        return -ENOENT;
    case RAFT_NOMEM:
        return -ENOMEM;
    case RAFT_NOCONNECTION:
        return -ENOTCONN;
    case RAFT_BADROLE:
    case RAFT_INVALID:
        return -EINVAL;
    case RAFT_TOOBIG:
        return -EMSGSIZE;
    case RAFT_NAMETOOLONG:
        return -ENAMETOOLONG;
    default:
        return -EIO;
    }
}

const char *
raftnode_state_name(int state)
{
    switch (state) {
    case RAFT_FOLLOWER:
        return "follower";
    case RAFT_CANDIDATE:
        return "candidate";
    case RAFT_LEADER:
        return "leader";
    default:
        return "unavailable";
    }
}

/* ---- Creation ---------------------------------------------------------- */

static void
poll_cb(uv_timer_t *t)
{
    struct raftnode *n = t->data;
    int state = raft_state(&n->raft);
    int old = n->last_state;

    if (state == old)
        return;
    n->last_state = state;
    pd_trace("raft", "member %llu: %s -> %s", (unsigned long long)n->id,
             raftnode_state_name(old), raftnode_state_name(state));
    if (n->on_state != NULL)
        n->on_state(n, old, state, n->data);
}

static int
copy_config(struct raftnode *n, const struct raftnode_config *cfg)
{
    if (cfg->dir == NULL || cfg->address == NULL || cfg->id == 0) {
        set_err(n, "a data directory, an address and a non-zero id are "
                "required");
        return -EINVAL;
    }
    if (strlen(cfg->dir) >= sizeof(n->dir) ||
        strlen(cfg->address) >= sizeof(n->address)) {
        set_err(n, "data directory or address too long");
        return -ENAMETOOLONG;
    }
    strcpy(n->dir, cfg->dir);
    strcpy(n->address, cfg->address);
    n->id = cfg->id;
    n->on_state = cfg->on_state;
    n->data = cfg->data;
    if (cfg->n_bootstrap > 0) {
        n->bootstrap = calloc(cfg->n_bootstrap, sizeof(*n->bootstrap));
        if (n->bootstrap == NULL)
            return -ENOMEM;
        memcpy(n->bootstrap, cfg->bootstrap,
               cfg->n_bootstrap * sizeof(*n->bootstrap));
        n->n_bootstrap = cfg->n_bootstrap;
    }
    return 0;
}

static int
init_raft(struct raftnode *n, const struct raftnode_config *cfg)
{
    int rv;

    if (cfg->tls_server != NULL || cfg->tls_client != NULL) {
        rv = rtls_init(&n->transport, n->loop, cfg->tls_server,
                       cfg->tls_client, cfg->bind_address,
                       cfg->tls_handshake_ms, n->err, sizeof(n->err));
        if (rv != 0)
            return rv;
        n->tls = n->transport_ready = true;
    } else {
        rv = raft_uv_tcp_init(&n->transport, n->loop);
        if (rv != 0) {
            set_err(n, "raft transport: %s", raft_strerror(rv));
            return -EIO;
        }
        n->transport_ready = true;
    }
    if (cfg->bind_address != NULL && !n->tls) {
        rv = raft_uv_tcp_set_bind_address(&n->transport, cfg->bind_address);
        if (rv != 0) {
            set_err(n, "raft bind address %s: %s", cfg->bind_address,
                    raft_strerror(rv));
            return -EINVAL;
        }
    }
    rv = raft_uv_init(&n->io, n->loop, n->dir, &n->transport);
    if (rv != 0) {
        set_err(n, "raft log in %s: %s", n->dir, n->io.errmsg);
        return -EIO;
    }
    n->io_ready = true;
    /* Corruption must fail the start, not be "recovered" by renaming a
     * segment that holds committed entries (DESIGN.md 9). */
    raft_uv_set_auto_recovery(&n->io, false);

    rv = raft_init(&n->raft, &n->io, fsm_raft(n->fsm), n->id, n->address);
    if (rv != 0) {
        set_err(n, "raft_init: %s", raft_errmsg(&n->raft));
        return map_rv(rv);
    }
    n->raft_ready = true;
    n->raft.data = n;
    raft_set_election_timeout(&n->raft, cfg->election_timeout_ms != 0
                                            ? cfg->election_timeout_ms
                                            : 1000);
    raft_set_heartbeat_timeout(&n->raft, cfg->heartbeat_timeout_ms != 0
                                             ? cfg->heartbeat_timeout_ms
                                             : 100);
    raft_set_snapshot_threshold(&n->raft, cfg->snapshot_threshold != 0
                                              ? cfg->snapshot_threshold
                                              : 8192);
    raft_set_snapshot_trailing(&n->raft, cfg->snapshot_trailing != 0
                                             ? cfg->snapshot_trailing
                                             : 2048);
    return 0;
}

static void
close_transport(struct raftnode *n)
{
    if (n->tls)
        rtls_close(&n->transport);
    else
        raft_uv_tcp_close(&n->transport);
}

static void
free_node(struct raftnode *n)
{
    for (size_t i = 0; i < n->q_n; i++)
        free(n->q_enc[i]);
    free(n->q_enc);
    free(n->q_len);
    free(n->q_item);
    free(n->bootstrap);
    free(n);
}

int
raftnode_new(struct raftnode **out, uv_loop_t *loop, struct fsm *fsm,
             const struct raftnode_config *cfg, char *err, size_t errlen)
{
    struct raftnode *n = calloc(1, sizeof(*n));
    int rv;

    if (n == NULL) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    n->loop = loop;
    n->fsm = fsm;
    n->last_state = RAFT_UNAVAILABLE;
    rv = copy_config(n, cfg);
    if (rv == 0) {
        rv = pd_mkdir_p(n->dir, 0700);
        if (rv != 0)
            set_err(n, "data directory %s: %s", n->dir, strerror(-rv));
    }
    if (rv == 0)
        rv = init_raft(n, cfg);
    if (rv != 0) {
        snprintf(err, errlen, "%s", n->err);
        /* raft_init failed or never ran: nothing asynchronous is open. */
        if (n->io_ready)
            raft_uv_close(&n->io);
        if (n->transport_ready)
            close_transport(n);
        free_node(n);
        return rv;
    }
    uv_timer_init(loop, &n->poll);
    uv_timer_init(loop, &n->defer);
    uv_idle_init(loop, &n->flush);
    n->poll.data = n->defer.data = n;
    n->flush.data = n;
    n->handles_open = 3;
    *out = n;
    return 0;
}

int
raftnode_start(struct raftnode *n)
{
    struct raft_configuration conf;
    int rv = 0;

    if (n->started || n->closing)
        return -EALREADY;
    if (n->n_bootstrap > 0) {
        raft_configuration_init(&conf);
        for (size_t i = 0; i < n->n_bootstrap && rv == 0; i++)
            rv = raft_configuration_add(&conf, n->bootstrap[i].id,
                                        n->bootstrap[i].address,
                                        RAFT_VOTER);
        if (rv == 0)
            rv = raft_bootstrap(&n->raft, &conf);
        raft_configuration_close(&conf);
        /* Not pristine: a later start resumes from the log on disk. */
        if (rv == RAFT_CANTBOOTSTRAP)
            rv = 0;
        if (rv != 0) {
            set_err(n, "bootstrap: %s", raft_errmsg(&n->raft));
            return map_rv(rv);
        }
    }
    rv = raft_start(&n->raft);
    if (rv != 0) {
        set_err(n, "raft start in %s: %s", n->dir, raft_errmsg(&n->raft));
        return -EIO;
    }
    n->started = true;
    uv_timer_start(&n->poll, poll_cb, RAFTNODE_POLL_MS, RAFTNODE_POLL_MS);
    return 0;
}

/* ---- Proposals --------------------------------------------------------- */

static void
apply_done(struct raft_apply *req, int status, void *result)
{
    struct propose *p = req->data;
    int rv = map_rv(status);

    PD_UNUSED(result); /* results travel by request id (fsm.h) */
    for (size_t i = 0; i < p->count; i++) {
        struct pitem *it = &p->items[i];
        struct fsm_result res;
        int st = rv;

        if (st == 0) {
            st = fsm_result_get(p->n->fsm, &it->rid, &res);
            if (st != 0)
                set_err(p->n, "applied entry has no stored result");
        }
        it->cb(it->data, st, st == 0 ? &res : NULL);
    }
    free(p);
}

/* Calls back the proposals raft refused, outside any caller's call. */
static void
deliver_failed(struct raftnode *n)
{
    while (n->failed != NULL) {
        struct propose *p = n->failed;

        n->failed = p->next;
        for (size_t i = 0; i < p->count; i++)
            p->items[i].cb(p->items[i].data, p->status, NULL);
        free(p);
    }
}

/* The queue as one entry: the command itself when it is alone, so that a
 * quiet cluster's log looks as before; a batch otherwise. */
static int
queue_entry(struct raftnode *n, struct raft_buffer *buf)
{
    void *one = n->q_enc[0], *batch = NULL;
    size_t len = n->q_len[0];
    int rv;

    if (n->q_n > 1) {
        rv = fsm_batch_encode(n->q_enc, n->q_len, n->q_n, &batch, &len);
        if (rv != 0)
            return rv;
        one = batch;
    }
    /* raft owns the entry's memory once raft_apply succeeds and frees
     * it with raft_free, so it must come from raft_malloc. */
    buf->base = raft_malloc(len);
    if (buf->base != NULL)
        memcpy(buf->base, one, len);
    buf->len = len;
    free(batch);
    return buf->base != NULL ? 0 : -ENOMEM;
}

static void flush_cb(uv_idle_t *h);

/* Sends the queued proposals as one entry. */
static void
flush(struct raftnode *n)
{
    struct raft_buffer buf;
    struct propose *p;
    size_t count = n->q_n;
    int rv;

    if (count == 0)
        return;
    p = calloc(1, sizeof(*p) + count * sizeof(p->items[0]));
    rv = p != NULL ? queue_entry(n, &buf) : -ENOMEM;
    if (p != NULL) {
        memcpy(p->items, n->q_item, count * sizeof(p->items[0]));
        p->count = count;
        p->n = n;
        p->req.data = p;
    }
    for (size_t i = 0; i < count; i++)
        free(n->q_enc[i]);
    n->q_n = 0;
    n->q_bytes = 0;
    if (p == NULL) {
        /* Nothing to call back with: the items are lost with the memory;
         * say so loudly, as this cannot be reported per proposal. */
        set_err(n, "propose: out of memory; %zu proposals dropped", count);
        pd_error("raft", "member %llu: %s", (unsigned long long)n->id,
                 n->err);
        return;
    }
    if (rv == 0) {
        rv = raft_apply(&n->raft, &p->req, &buf, 1, apply_done);
        if (rv != 0) {
            set_err(n, "propose %zu commands: %s", count,
                    raft_errmsg(&n->raft));
            raft_free(buf.base);
            rv = map_rv(rv);
        }
    }
    if (rv != 0) {
        p->status = rv;
        p->next = n->failed;
        n->failed = p;
        uv_idle_start(&n->flush, flush_cb);
    }
}

static void
flush_cb(uv_idle_t *h)
{
    struct raftnode *n = h->data;

    uv_idle_stop(h);
    if (n->closing)
        return; /* close_now answers what is queued */
    flush(n);
    deliver_failed(n);
}

/* Answers every queued proposal with status (closing). */
static void
fail_queued(struct raftnode *n, int status)
{
    struct pitem *items = n->q_item;
    size_t count = n->q_n;

    for (size_t i = 0; i < count; i++)
        free(n->q_enc[i]);
    n->q_n = 0;
    n->q_bytes = 0;
    n->q_item = NULL;
    n->q_cap = 0;
    free(n->q_enc);
    free(n->q_len);
    n->q_enc = NULL;
    n->q_len = NULL;
    for (size_t i = 0; i < count; i++)
        items[i].cb(items[i].data, status, NULL);
    free(items);
    deliver_failed(n);
}

static int
queue_grow(struct raftnode *n)
{
    size_t cap = n->q_cap != 0 ? n->q_cap * 2 : 64;
    void **enc = realloc(n->q_enc, cap * sizeof(*enc));
    size_t *len;
    struct pitem *item;

    if (enc == NULL)
        return -ENOMEM;
    n->q_enc = enc;
    len = realloc(n->q_len, cap * sizeof(*len));
    if (len == NULL)
        return -ENOMEM;
    n->q_len = len;
    item = realloc(n->q_item, cap * sizeof(*item));
    if (item == NULL)
        return -ENOMEM;
    n->q_item = item;
    n->q_cap = cap;
    return 0;
}

/*
 * Queues the command for this iteration's entry. raft_apply happens in
 * flush_cb, after the callbacks of this loop iteration, so that a burst
 * of requests becomes one entry; the leader check here keeps the
 * synchronous RAFTNODE_ENOTLEADER of the contract.
 */
int
raftnode_propose(struct raftnode *n, const struct fsm_cmd *cmd,
                 raftnode_apply_cb cb, void *data)
{
    struct pitem *it;
    void *enc;
    size_t len;
    int rv;

    if (n->closing || !n->started)
        return RAFTNODE_ESHUTDOWN;
    if (raft_state(&n->raft) != RAFT_LEADER)
        return RAFTNODE_ENOTLEADER;
    rv = fsm_cmd_encode(cmd, &enc, &len);
    if (rv != 0)
        return rv;
    if (len > FSM_BATCH_BYTES / 2) {
        free(enc);
        return -EMSGSIZE;
    }
    /* A full batch goes now; this command starts the next one. */
    if (n->q_n == FSM_BATCH_MAX || n->q_bytes + len > FSM_BATCH_BYTES / 2)
        flush(n);
    if (n->q_n == n->q_cap && (rv = queue_grow(n)) != 0) {
        free(enc);
        return rv;
    }
    it = &n->q_item[n->q_n];
    it->rid = cmd->rid;
    it->cb = cb;
    it->data = data;
    n->q_enc[n->q_n] = enc;
    n->q_len[n->q_n] = len;
    n->q_n++;
    n->q_bytes += len + 8;
    uv_idle_start(&n->flush, flush_cb);
    return 0;
}

static void
barrier_done(struct raft_barrier *req, int status)
{
    struct barrier *b = req->data;
    int rv = map_rv(status);

    b->cb(b->data, rv, rv != 0 ? raft_strerror(status) : "");
    free(b);
}

int
raftnode_barrier(struct raftnode *n, raftnode_done_cb cb, void *data)
{
    struct barrier *b;
    int rv;

    if (n->closing || !n->started)
        return RAFTNODE_ESHUTDOWN;
    b = calloc(1, sizeof(*b));
    if (b == NULL)
        return -ENOMEM;
    b->req.data = b;
    b->cb = cb;
    b->data = data;
    rv = raft_barrier(&n->raft, &b->req, barrier_done);
    if (rv != 0) {
        set_err(n, "barrier: %s", raft_errmsg(&n->raft));
        free(b);
        return map_rv(rv);
    }
    return 0;
}

/* ---- Membership -------------------------------------------------------- */

static void change_cb(struct raft_change *req, int status);

static void
change_finish(struct raftnode *n, int status, const char *msg)
{
    raftnode_done_cb cb = n->change_cb;

    n->changing = false;
    n->change_step = 0;
    if (cb != NULL)
        cb(n->change_data, status, msg);
}

/* Step 2 of an add: runs from the defer timer, not inside raft's change
 * callback, since the configuration is still being finalised there. */
static void
assign_voter(struct raftnode *n)
{
    char msg[RAFT_ERRMSG_BUF_SIZE + 64];
    int rv;

    n->change.data = n;
    rv = raft_assign(&n->raft, &n->change, n->change_id, RAFT_VOTER,
                     change_cb);
    if (rv != 0) {
        snprintf(msg, sizeof(msg), "member %llu added as spare, promotion "
                 "to voter failed: %s", (unsigned long long)n->change_id,
                 raft_errmsg(&n->raft));
        set_err(n, "%s", msg);
        change_finish(n, map_rv(rv), msg);
    }
}

static void defer_cb(uv_timer_t *t);

static void
change_cb(struct raft_change *req, int status)
{
    struct raftnode *n = req->data;
    char msg[256];

    if (status != 0 && n->change_step == 2) {
        /* The spare stays in the configuration: say so, since the
         * caller has to remove it (or retry) by hand. */
        snprintf(msg, sizeof(msg), "member %llu added as spare, promotion "
                 "to voter failed: %s; remove it before adding it again",
                 (unsigned long long)n->change_id, raft_strerror(status));
        set_err(n, "%s", msg);
        change_finish(n, map_rv(status), msg);
        return;
    }
    if (status != 0) {
        snprintf(msg, sizeof(msg), "membership change for %llu failed: %s",
                 (unsigned long long)n->change_id, raft_strerror(status));
        set_err(n, "%s", msg);
        change_finish(n, map_rv(status), msg);
        return;
    }
    if (n->change_step == 1) {
        n->change_step = 2;
        uv_timer_start(&n->defer, defer_cb, 0, 0);
        return;
    }
    change_finish(n, 0, "");
}

static int
change_begin(struct raftnode *n, uint64_t id, raftnode_done_cb cb,
             void *data)
{
    if (n->closing || !n->started)
        return RAFTNODE_ESHUTDOWN;
    if (raft_state(&n->raft) != RAFT_LEADER)
        return RAFTNODE_ENOTLEADER;
    if (n->changing) {
        set_err(n, "another membership change (member %llu) is in "
                "progress; one change at a time",
                (unsigned long long)n->change_id);
        return -EBUSY;
    }
    if (id == 0) {
        set_err(n, "member id 0 is not valid");
        return -EINVAL;
    }
    n->changing = true;
    n->change_id = id;
    n->change_cb = cb;
    n->change_data = data;
    n->change.data = n;
    return 0;
}

static int
change_refused(struct raftnode *n, int rv, const char *what)
{
    n->changing = false;
    n->change_step = 0;
    if (rv == RAFT_CANTCHANGE)
        set_err(n, "%s member %llu: another configuration change is "
                "still being committed; retry when it is done", what,
                (unsigned long long)n->change_id);
    else
        set_err(n, "%s member %llu: %s", what,
                (unsigned long long)n->change_id, raft_errmsg(&n->raft));
    return map_rv(rv);
}

int
raftnode_add(struct raftnode *n, uint64_t id, const char *address,
             raftnode_done_cb cb, void *data)
{
    int rv = change_begin(n, id, cb, data);

    if (rv != 0)
        return rv;
    n->change_step = 1;
    rv = raft_add(&n->raft, &n->change, id, address, change_cb);
    if (rv != 0)
        return change_refused(n, rv, "add");
    return 0;
}

int
raftnode_remove(struct raftnode *n, uint64_t id, raftnode_done_cb cb,
                void *data)
{
    int rv = change_begin(n, id, cb, data);

    if (rv != 0)
        return rv;
    n->change_step = 3;
    rv = raft_remove(&n->raft, &n->change, id, change_cb);
    if (rv != 0)
        return change_refused(n, rv, "remove");
    return 0;
}

/* ---- Leadership transfer ----------------------------------------------- */

static void
transfer_cb(struct raft_transfer *req)
{
    struct raftnode *n = req->data;
    raftnode_done_cb cb = n->transfer_cb;
    bool moved = raft_state(&n->raft) != RAFT_LEADER;

    n->transferring = false;
    n->transfer_cb = NULL;
    if (cb != NULL)
        cb(n->transfer_data, moved ? 0 : -ETIMEDOUT,
           moved ? "" : "leadership did not move before the timeout");
}

static int
do_transfer(struct raftnode *n, uint64_t target, raftnode_done_cb cb,
            void *data)
{
    int rv;

    if (raft_state(&n->raft) != RAFT_LEADER)
        return RAFTNODE_ENOTLEADER;
    if (n->transferring)
        return -EALREADY;
    n->transfer.data = n;
    n->transfer_cb = cb;
    n->transfer_data = data;
    rv = raft_transfer(&n->raft, &n->transfer, target, transfer_cb);
    if (rv != 0) {
        set_err(n, "transfer leadership: %s", raft_errmsg(&n->raft));
        n->transfer_cb = NULL;
        return map_rv(rv);
    }
    n->transferring = true;
    return 0;
}

int
raftnode_transfer(struct raftnode *n, uint64_t target, raftnode_done_cb cb,
                  void *data)
{
    if (n->closing || !n->started)
        return RAFTNODE_ESHUTDOWN;
    return do_transfer(n, target, cb, data);
}

/* ---- Close ------------------------------------------------------------- */

static void
handle_closed(uv_handle_t *h)
{
    struct raftnode *n = h->data;
    void (*done)(void *) = n->done;
    void *data = n->done_data;

    if (--n->handles_open > 0)
        return;
    free_node(n);
    if (done != NULL)
        done(data);
}

static void
raft_closed(struct raft *r)
{
    struct raftnode *n = r->data;

    /* Order matters: raft_close has closed the I/O; now free it, then
     * the transport it used. */
    raft_uv_close(&n->io);
    close_transport(n);
    uv_close((uv_handle_t *)&n->poll, handle_closed);
    uv_close((uv_handle_t *)&n->defer, handle_closed);
    uv_close((uv_handle_t *)&n->flush, handle_closed);
}

static void
close_transfer_done(void *data, int status, const char *msg)
{
    struct raftnode *n = data;

    PD_UNUSED(status);
    PD_UNUSED(msg);
    n->close_transfer = false;
    uv_timer_start(&n->defer, defer_cb, 0, 0);
}

static unsigned
voters(struct raftnode *n)
{
    unsigned count = 0;

    for (unsigned i = 0; i < n->raft.configuration.n; i++)
        count += n->raft.configuration.servers[i].role == RAFT_VOTER;
    return count;
}

static void
close_now(struct raftnode *n)
{
    if (n->close_transfer && n->started &&
        raft_state(&n->raft) == RAFT_LEADER && voters(n) > 1 &&
        !n->transferring &&
        do_transfer(n, 0, close_transfer_done, n) == 0)
        return; /* close_transfer_done comes back here */
    n->close_transfer = false;
    uv_timer_stop(&n->poll);
    uv_timer_stop(&n->defer);
    uv_idle_stop(&n->flush);
    fail_queued(n, RAFTNODE_ESHUTDOWN);
    raft_close(&n->raft, raft_closed);
}

/* Everything that must not run inside a raft callback comes through here,
 * one loop iteration later. */
static void
defer_cb(uv_timer_t *t)
{
    struct raftnode *n = t->data;

    if (n->closing) {
        /* An add between its two steps would otherwise never call back:
         * raft knows nothing of the promotion not yet requested. */
        if (n->changing && n->change_step == 2)
            change_finish(n, RAFTNODE_ESHUTDOWN, "closing: the member was "
                          "added as a spare, not promoted to voter");
        if (!n->close_transfer || !n->transferring)
            close_now(n);
        return;
    }
    if (n->changing && n->change_step == 2)
        assign_voter(n);
}

void
raftnode_close(struct raftnode *n, bool transfer_first,
               void (*done)(void *data), void *data)
{
    if (n->closing)
        return;
    n->closing = true;
    n->close_transfer = transfer_first;
    n->done = done;
    n->done_data = data;
    uv_timer_start(&n->defer, defer_cb, 0, 0);
}

/* ---- State ------------------------------------------------------------- */

void
raftnode_status(struct raftnode *n, struct raftnode_status *out)
{
    uint64_t id;

    memset(out, 0, sizeof(*out));
    out->id = n->id;
    out->state = raft_state(&n->raft);
    out->term = n->raft.current_term;
    out->commit_index = n->raft.commit_index;
    out->last_applied = raft_last_applied(&n->raft);
    out->last_index = raft_last_index(&n->raft);
    raftnode_leader(n, &id, out->leader_address,
                    sizeof(out->leader_address));
    out->leader_id = id;
    out->voters = voters(n);
}

bool
raftnode_is_leader(struct raftnode *n)
{
    return raft_state(&n->raft) == RAFT_LEADER;
}

void
raftnode_leader(struct raftnode *n, uint64_t *id, char *address,
                size_t addrlen)
{
    raft_id lid = 0;
    const char *addr = NULL;

    raft_leader(&n->raft, &lid, &addr);
    *id = lid;
    if (address != NULL && addrlen > 0)
        pd_strlcpy(address, addr != NULL ? addr : "", addrlen);
}

int
raftnode_members(struct raftnode *n, struct raftnode_peer **out,
                 size_t *count)
{
    const struct raft_configuration *c = &n->raft.configuration;
    struct raftnode_peer *v = calloc(c->n + 1, sizeof(*v));

    if (v == NULL)
        return -ENOMEM;
    for (unsigned i = 0; i < c->n; i++) {
        v[i].id = c->servers[i].id;
        pd_strlcpy(v[i].address, c->servers[i].address,
                   sizeof(v[i].address));
        v[i].voter = c->servers[i].role == RAFT_VOTER;
    }
    *out = v;
    *count = c->n;
    return 0;
}

const char *
raftnode_errmsg(const struct raftnode *n)
{
    return n->err;
}

struct raft *
raftnode_raft(struct raftnode *n)
{
    return &n->raft;
}
