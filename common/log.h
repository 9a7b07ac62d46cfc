/*
 * Logging for the daemons.
 *
 * Every line names its subject first ("sandbox abc", "node n2", "raft"), then
 * says what happened, the cause, and what happens next. Lines go to stderr;
 * a daemon run under systemd gets them in the journal from there.
 *
 * The debug tracer narrates decisions (why a node was rejected, why a vote
 * was refused). It is off unless PADDOCK_TRACE is set: "1" or "all" turns on
 * every subsystem, otherwise a comma-separated list of subsystem names
 * ("placement,raft") turns on those.
 *
 * Libraries (proto/, raft/ FSM code) do not log above debug; they return
 * errors with a message buffer and let the daemon layer decide.
 */
#ifndef PD_LOG_H
#define PD_LOG_H

#include <stdarg.h>
#include <stdbool.h>

#define PD_PRINTF(a, b) __attribute__((format(printf, a, b)))

enum pd_log_level {
    PD_LOG_DEBUG = 0,
    PD_LOG_INFO,
    PD_LOG_WARN,
    PD_LOG_ERROR,
};

/* Sets the program name printed on each line and the minimum level. */
void pd_log_init(const char *prog, enum pd_log_level level);

/* Sets the minimum level; lines below it are dropped. */
void pd_log_set_level(enum pd_log_level level);

/* Parses "debug", "info", "warn" or "error"; returns -EINVAL otherwise. */
int pd_log_parse_level(const char *s, enum pd_log_level *out);

/* Writes one line: "<time> <prog> <level> <subject>: <message>". */
void pd_log(enum pd_log_level level, const char *subject, const char *fmt, ...)
    PD_PRINTF(3, 4);
void pd_vlog(enum pd_log_level level, const char *subject, const char *fmt,
             va_list ap) PD_PRINTF(3, 0);

/* Like pd_log at warn level with ": <strerror(errnum)>" appended. */
void pd_log_errno(enum pd_log_level level, int errnum, const char *subject,
                  const char *fmt, ...) PD_PRINTF(4, 5);

/* True when PADDOCK_TRACE enables the named subsystem. */
bool pd_trace_on(const char *subsystem);

/* Writes a trace line when the subsystem is enabled. */
void pd_trace(const char *subsystem, const char *fmt, ...) PD_PRINTF(2, 3);

#define pd_debug(subj, ...) pd_log(PD_LOG_DEBUG, subj, __VA_ARGS__)
#define pd_info(subj, ...)  pd_log(PD_LOG_INFO, subj, __VA_ARGS__)
#define pd_warn(subj, ...)  pd_log(PD_LOG_WARN, subj, __VA_ARGS__)
#define pd_error(subj, ...) pd_log(PD_LOG_ERROR, subj, __VA_ARGS__)

/* Logs at error level and exits with status 1. Only for start-up. */
void pd_fatal(const char *subject, const char *fmt, ...) PD_PRINTF(2, 3)
    __attribute__((noreturn));

#endif
