#include "common/log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *log_prog = "paddock";
static enum pd_log_level log_min = PD_LOG_INFO;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void
pd_log_init(const char *prog, enum pd_log_level level)
{
    if (prog != NULL)
        log_prog = prog;
    log_min = level;
}

void
pd_log_set_level(enum pd_log_level level)
{
    log_min = level;
}

int
pd_log_parse_level(const char *s, enum pd_log_level *out)
{
    for (int i = 0; i <= PD_LOG_ERROR; i++) {
        if (strcmp(s, level_names[i]) == 0) {
            *out = (enum pd_log_level)i;
            return 0;
        }
    }
    return -EINVAL;
}

/* The format attribute lets -Wformat-nonliteral (clang, -Wformat=2) see
 * that fmt comes from a checked caller. */
static void __attribute__((format(printf, 3, 0)))
write_line(const char *level, const char *subject, const char *fmt,
           va_list ap, const char *suffix)
{
    char stamp[32];
    char msg[2048];
    struct timespec ts;
    struct tm tm;

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &tm);
    vsnprintf(msg, sizeof(msg), fmt, ap);

    /* One fprintf per line so concurrent writers do not interleave. */
    fprintf(stderr, "%s.%03ldZ %s %s %s: %s%s\n", stamp,
            ts.tv_nsec / 1000000, log_prog, level,
            subject != NULL ? subject : "-", msg,
            suffix != NULL ? suffix : "");
}

void
pd_vlog(enum pd_log_level level, const char *subject, const char *fmt,
        va_list ap)
{
    if (level < log_min || level > PD_LOG_ERROR)
        return;
    write_line(level_names[level], subject, fmt, ap, NULL);
}

void
pd_log(enum pd_log_level level, const char *subject, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    pd_vlog(level, subject, fmt, ap);
    va_end(ap);
}

void
pd_log_errno(enum pd_log_level level, int errnum, const char *subject,
             const char *fmt, ...)
{
    char suffix[256];
    va_list ap;

    if (level < log_min || level > PD_LOG_ERROR)
        return;
    if (errnum < 0)
        errnum = -errnum;
    snprintf(suffix, sizeof(suffix), ": %s", strerror(errnum));
    va_start(ap, fmt);
    write_line(level_names[level], subject, fmt, ap, suffix);
    va_end(ap);
}

bool
pd_trace_on(const char *subsystem)
{
    const char *env = getenv("PADDOCK_TRACE");
    size_t n;
    const char *p;

    if (env == NULL || *env == '\0' || strcmp(env, "0") == 0)
        return false;
    if (strcmp(env, "1") == 0 || strcmp(env, "all") == 0)
        return true;
    n = strlen(subsystem);
    for (p = env; *p != '\0';) {
        const char *end = strchr(p, ',');
        size_t len = end != NULL ? (size_t)(end - p) : strlen(p);

        if (len == n && strncmp(p, subsystem, n) == 0)
            return true;
        if (end == NULL)
            break;
        p = end + 1;
    }
    return false;
}

void
pd_trace(const char *subsystem, const char *fmt, ...)
{
    va_list ap;

    if (!pd_trace_on(subsystem))
        return;
    va_start(ap, fmt);
    write_line("trace", subsystem, fmt, ap, NULL);
    va_end(ap);
}

void
pd_fatal(const char *subject, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    write_line("error", subject, fmt, ap, NULL);
    va_end(ap);
    exit(1);
}
