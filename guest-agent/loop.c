/*
 * The agent's single poll loop: watches, timers and child reaping.
 * See guest.h for the model.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "guest-agent/guest.h"

struct slots {
    void **v;
    int n, cap;
};

static struct slots watches, timers;
static int sigchld_fd = -1;

static int
slots_add(struct slots *s, void *p)
{
    if (s->n == s->cap) {
        int cap = s->cap ? s->cap * 2 : 32;
        void **v = realloc(s->v, (size_t)cap * sizeof(*v));

        if (v == NULL)
            return -ENOMEM;
        s->v = v;
        s->cap = cap;
    }
    s->v[s->n] = p;
    return s->n++;
}

/* Drops the emptied slots and renumbers the rest. */
static void
compact(struct slots *s, int is_watch)
{
    int j = 0;

    for (int i = 0; i < s->n; i++) {
        if (s->v[i] == NULL)
            continue;
        s->v[j] = s->v[i];
        if (is_watch)
            ((struct gwatch *)s->v[j])->slot = j;
        else
            ((struct gtimer *)s->v[j])->slot = j;
        j++;
    }
    s->n = j;
}

int
watch_add(struct gwatch *w)
{
    int slot = slots_add(&watches, w);

    if (slot < 0)
        return slot;
    w->slot = slot;
    return 0;
}

void
watch_del(struct gwatch *w)
{
    if (w->slot >= 0 && w->slot < watches.n && watches.v[w->slot] == w)
        watches.v[w->slot] = NULL;
    w->slot = -1;
}

int
timer_arm(struct gtimer *t, uint64_t delay_ms)
{
    int slot;

    t->at_ms = pd_now_ms() + delay_ms;
    if (t->slot >= 0 && t->slot < timers.n && timers.v[t->slot] == t)
        return 0;
    slot = slots_add(&timers, t);
    if (slot < 0)
        return slot;
    t->slot = slot;
    return 0;
}

void
timer_stop(struct gtimer *t)
{
    if (t->slot >= 0 && t->slot < timers.n && timers.v[t->slot] == t)
        timers.v[t->slot] = NULL;
    t->slot = -1;
}

void
loop_init(void)
{
    sigset_t set;

    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigprocmask(SIG_BLOCK, &set, NULL);
    sigchld_fd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sigchld_fd < 0)
        pd_log_errno(PD_LOG_ERROR, errno, "loop",
                     "signalfd failed; children reaped by polling");
}

/* Reaps every exited child; orphans re-parented to PID 1 included. */
static void
reap(void)
{
    struct signalfd_siginfo si;
    int status;
    pid_t pid;

    while (sigchld_fd >= 0 && read(sigchld_fd, &si, sizeof(si)) > 0)
        ;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
        child_exited(pid, status);
}

static int
next_timeout(bool have_task)
{
    uint64_t now, min = UINT64_MAX;

    if (have_task)
        return 0;
    for (int i = 0; i < timers.n; i++) {
        struct gtimer *t = timers.v[i];

        if (t != NULL && t->at_ms < min)
            min = t->at_ms;
    }
    /* Without a signalfd, poll for exited children every 100 ms. */
    if (sigchld_fd < 0 && min > pd_now_ms() + 100)
        min = pd_now_ms() + 100;
    if (min == UINT64_MAX)
        return -1;
    now = pd_now_ms();
    if (min <= now)
        return 0;
    return min - now > 60000 ? 60000 : (int)(min - now);
}

static void
fire_timers(void)
{
    uint64_t now = pd_now_ms();
    int n = timers.n;

    for (int i = 0; i < n; i++) {
        struct gtimer *t = timers.v[i];

        if (t == NULL || t->at_ms > now)
            continue;
        timers.v[i] = NULL;
        t->slot = -1;
        t->fire(t);
    }
}

/* Grows both arrays to n; on failure they stay as they were. */
static int
grow_poll_set(struct pollfd **pfd, int **idx, int *cap, int n)
{
    struct pollfd *p = realloc(*pfd, (size_t)n * sizeof(**pfd));
    int *q;

    if (p == NULL)
        return -ENOMEM;
    *pfd = p;
    q = realloc(*idx, (size_t)n * sizeof(**idx));
    if (q == NULL)
        return -ENOMEM;
    *idx = q;
    *cap = n;
    return 0;
}

void
loop_run(void)
{
    struct pollfd *pfd = NULL;
    int *idx = NULL;
    int cap = 0;

    for (;;) {
        int n = 0, ntask = 0, rv;

        compact(&watches, 1);
        compact(&timers, 0);
        if (cap < watches.n + 1 && grow_poll_set(&pfd, &idx, &cap,
                                                 watches.n + 32) != 0) {
            /* PID 1 must not exit (the kernel would panic): wait for
             * memory to come back, reaping meanwhile. */
            pd_warn("loop", "out of memory for a poll set of %d, retrying",
                    watches.n + 1);
            usleep(10000);
            reap();
            continue;
        }
        for (int i = 0; i < watches.n; i++) {
            struct gwatch *w = watches.v[i];
            short ev = w->want != NULL ? w->want(w) : POLLIN;

            if (ev == 0)
                continue;
            if (w->fd < 0) {
                ntask++;
                continue;
            }
            pfd[n].fd = w->fd;
            pfd[n].events = ev;
            pfd[n].revents = 0;
            idx[n++] = i;
        }
        if (sigchld_fd >= 0) {
            pfd[n].fd = sigchld_fd;
            pfd[n].events = POLLIN;
            pfd[n].revents = 0;
            idx[n++] = -1;
        }

        rv = poll(pfd, (nfds_t)n, next_timeout(ntask > 0));
        if (rv < 0 && errno != EINTR)
            pd_log_errno(PD_LOG_WARN, errno, "loop", "poll failed, retrying");

        for (int i = 0; rv > 0 && i < n; i++) {
            struct gwatch *w;

            if (pfd[i].revents == 0)
                continue;
            if (idx[i] < 0) {
                reap();
                continue;
            }
            w = watches.v[idx[i]];
            if (w != NULL)
                w->ready(w, pfd[i].revents);
        }
        /* Tasks: fd-less watches that asked to run. */
        for (int i = 0; ntask > 0 && i < watches.n; i++) {
            struct gwatch *w = watches.v[i];

            if (w != NULL && w->fd < 0 && w->want(w) != 0)
                w->ready(w, POLLIN);
        }
        if (sigchld_fd < 0)
            reap();
        fire_timers();
    }
}
