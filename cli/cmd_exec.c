#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "cli/requests.h"
#include "common/util.h"

#define STDIN_MAX (1u << 20)

/*
 * Output events (exec ?stream=true, logs ?follow=true) carry JSON data:
 * stdout/stderr {"data": base64} (or {"text": "..."}), exit {"exit_code"},
 * error {"error": {...}}. Plain text data is passed through as is.
 */
struct stream {
    struct cli_call *k;
    struct sse sse;
    bool exited;
    int exit_code;
    bool failed;
    bool not_sse;
    bool ndjson;    /* logs -f --json: one JSON line per event */
    char *json_buf; /* a JSON answer instead of events */
    size_t json_len;
};

static void
write_all(int fd, const void *p, size_t n)
{
    const char *b = p;

    while (n > 0) {
        ssize_t w = write(fd, b, n);

        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return; /* a closed pipe: the reader is gone */
        b += w;
        n -= (size_t)w;
    }
}

static void
emit_output(int fd, const char *data, size_t len)
{
    json_t *j = json_loadb(data, len, 0, NULL);
    const json_t *d = json_object_get(j, "data");
    const json_t *t = json_object_get(j, "text");

    if (json_is_string(d)) {
        size_t n = json_string_length(d), out = 0;
        unsigned char *buf = malloc(n * 3 / 4 + 4);

        if (buf != NULL &&
            b64_decode(json_string_value(d), n, buf, &out) == 0)
            write_all(fd, buf, out);
        free(buf);
    } else if (json_is_string(t)) {
        write_all(fd, json_string_value(t), json_string_length(t));
    } else if (j == NULL) {
        write_all(fd, data, len);
        write_all(fd, "\n", 1);
    }
    json_decref(j);
}

/* The command's status as an exit code of ours. */
static int
exit_of(const json_t *j)
{
    const json_t *code = json_object_get(j, "exit_code");
    const json_t *sig = json_object_get(j, "signal");

    if (json_is_integer(code) && json_integer_value(code) >= 0 &&
        json_integer_value(code) <= 255)
        return (int)json_integer_value(code);
    if (json_is_integer(sig) && json_integer_value(sig) > 0 &&
        json_integer_value(sig) < 64)
        return 128 + (int)json_integer_value(sig);
    return EXIT_EXEC_FAILED;
}

/* {"event": "stdout", "data": {...}} on one line of stdout; data that is
 * not JSON goes as a string. */
static void
print_event_line(const char *event, const char *data, size_t len)
{
    json_t *d = json_loadb(data, len, JSON_DECODE_ANY, NULL);
    json_t *line;

    if (d == NULL)
        d = json_stringn(data, len);
    line = json_pack("{s:s,s:o*}", "event", event, "data", d);
    if (line != NULL) {
        json_dumpf(line, stdout, JSON_COMPACT);
        fputc('\n', stdout);
    }
    json_decref(line);
}

static void
on_event(const char *event, const char *data, size_t len, void *arg)
{
    struct stream *s = arg;
    json_t *j;

    if (s->ndjson)
        print_event_line(event, data, len);
    if (s->ndjson && (strcmp(event, "stdout") == 0 ||
                      strcmp(event, "stderr") == 0 ||
                      strcmp(event, "message") == 0)) {
        /* printed as JSON above */
    } else if (strcmp(event, "stdout") == 0 ||
               strcmp(event, "message") == 0) {
        emit_output(1, data, len);
    } else if (strcmp(event, "stderr") == 0) {
        emit_output(2, data, len);
    } else if (strcmp(event, "exit") == 0) {
        j = json_loadb(data, len, 0, NULL);
        s->exited = true;
        s->exit_code = exit_of(j);
        if (json_is_true(json_object_get(j, "timed_out")))
            cli_errorf("the command timed out and was killed");
        if (json_is_true(json_object_get(j, "truncated")))
            cli_errorf("output was truncated by the sandbox's cap");
        json_decref(j);
    } else if (strcmp(event, "error") == 0) {
        const char *msg;

        j = json_loadb(data, len, 0, NULL);
        msg = error_message(j, NULL);
        if (msg == NULL)
            msg = json_string_value(json_object_get(j, "message"));
        cli_errorf("%s", msg != NULL ? msg : data);
        s->failed = true;
        json_decref(j);
    }
}

static size_t
on_stream_data(const char *p, size_t n, void *arg)
{
    struct stream *s = arg;

    if (strncmp(s->k->ctype, "text/event-stream", 17) != 0) {
        char *b = realloc(s->json_buf, s->json_len + n + 1);

        s->not_sse = true;
        if (b == NULL || s->json_len + n > (64u << 20))
            return 0;
        memcpy(b + s->json_len, p, n);
        s->json_len += n;
        b[s->json_len] = '\0';
        s->json_buf = b;
        return n;
    }
    if (sse_feed(&s->sse, p, n, on_event, s) < 0)
        return 0;
    fflush(stdout);
    return n;
}

/* A whole JSON answer {exit_code, stdout, stderr, ...}. */
static int
finish_json(struct stream *s)
{
    json_t *j = json_loadb(s->json_buf != NULL ? s->json_buf : "", s->json_len,
                           0, NULL);
    const json_t *o = json_object_get(j, "stdout");
    const json_t *e = json_object_get(j, "stderr");
    int rv;

    if (j == NULL) {
        /* Raw output (logs without follow may be plain text). */
        write_all(1, s->json_buf, s->json_len);
        return EXIT_OK;
    }
    if (json_is_string(o))
        write_all(1, json_string_value(o), json_string_length(o));
    if (json_is_string(e))
        write_all(2, json_string_value(e), json_string_length(e));
    if (json_is_true(json_object_get(j, "truncated")))
        cli_errorf("output was truncated by the sandbox's cap");
    rv = json_object_get(j, "exit_code") != NULL ? exit_of(j) : EXIT_OK;
    json_decref(j);
    return rv;
}

/* Buffered logs (no follow): the output, and 0 whatever the process's
 * code, since the process may still be running. */
static int
finish_logs(struct stream *s)
{
    json_t *j = json_loadb(s->json_buf != NULL ? s->json_buf : "", s->json_len,
                           0, NULL);
    const json_t *o = json_object_get(j, "stdout");
    const json_t *e = json_object_get(j, "stderr");

    if (j == NULL) {
        write_all(1, s->json_buf, s->json_len);
        return EXIT_OK;
    }
    if (json_is_string(o))
        write_all(1, json_string_value(o), json_string_length(o));
    if (json_is_string(e))
        write_all(2, json_string_value(e), json_string_length(e));
    if (json_is_true(json_object_get(j, "truncated")))
        cli_errorf("output was truncated by the sandbox's cap");
    json_decref(j);
    return EXIT_OK;
}

/*
 * Streams events from path. With is_exec (exec, sh, logs -f) the result
 * is the command's own exit code and paddock's failures are 125, so the
 * two never mix; otherwise paddock's usual exit codes.
 */
static int
run_stream(struct cli *c, const char *method, const char *path,
           json_t *body, bool is_exec)
{
    struct cli_call k = {.method = method, .path = path, .json = body};
    struct stream s = {.k = &k, .ndjson = c->json};
    int rv;

    sse_init(&s.sse);
    k.on_data = on_stream_data;
    k.arg = &s;
    rv = cli_do(c, &k);
    if (rv == EXIT_OK)
        rv = cli_check(c, &k);
    fflush(stdout);
    if (rv == EXIT_OK) {
        if (s.not_sse)
            rv = is_exec ? finish_json(&s) : finish_logs(&s);
        else if (s.failed)
            rv = is_exec ? EXIT_EXEC_FAILED : EXIT_SERVER;
        else if (s.exited)
            rv = is_exec ? s.exit_code : EXIT_OK;
        else if (is_exec) {
            cli_errorf("the output stream ended before the process "
                       "exited");
            rv = EXIT_EXEC_FAILED;
        }
    } else if (is_exec) {
        rv = EXIT_EXEC_FAILED;
    }
    sse_free(&s.sse);
    free(s.json_buf);
    cli_call_free(&k);
    return rv;
}

static int
read_stdin(json_t *body)
{
    char *buf = malloc(STDIN_MAX + 1);
    size_t n = 0, r;
    json_t *s;

    if (buf == NULL)
        return EXIT_LOCAL;
    while (n <= STDIN_MAX && (r = fread(buf + n, 1, STDIN_MAX + 1 - n,
                                        stdin)) > 0)
        n += r;
    if (n > STDIN_MAX) {
        free(buf);
        cli_errorf("--stdin takes at most %u bytes", STDIN_MAX);
        return EXIT_USAGE;
    }
    s = json_stringn(buf, n);
    free(buf);
    if (s == NULL) {
        cli_errorf("--stdin must be UTF-8 text");
        return EXIT_USAGE;
    }
    json_object_set_new(body, "stdin", s);
    return EXIT_OK;
}

int
cmd_exec(struct cli *c, int argc, char **argv, bool shell)
{
    struct cli_args a;
    char err[512];
    json_t *body = NULL, *resp;
    char *path;
    int rv;

    if (cli_args_parse(argc, argv, exec_opts, exec_nopts, &a, err,
                       sizeof(err)) < 0 ||
        req_exec(&a, shell, false, &body, err, sizeof(err)) != EXIT_OK) {
        usage_error("%s", err);
        return EXIT_EXEC_FAILED;
    }
    if (opt_set(&a, exec_opts, exec_nopts, "--stdin") &&
        read_stdin(body) != EXIT_OK) {
        json_decref(body);
        return EXIT_EXEC_FAILED;
    }
    if (c->json) {
        path = cli_path("/v1/sandboxes/%s/exec", a.pos[0]);
        rv = cli_json(c, "POST", path, body, &resp);
        if (rv == EXIT_OK) {
            print_json(resp);
            rv = exit_of(resp);
        } else {
            rv = EXIT_EXEC_FAILED;
        }
        json_decref(resp);
    } else {
        path = cli_path("/v1/sandboxes/%s/exec?stream=true", a.pos[0]);
        rv = run_stream(c, "POST", path, body, true);
    }
    free(path);
    json_decref(body);
    return rv;
}

static void
proc_row(struct table *t, const json_t *p, uint64_t now)
{
    char id[80], pid[24], state[16], code[16], cmd[512], age[16];
    const json_t *argv = json_object_get(p, "argv");
    const json_t *running = json_object_get(p, "running");
    const json_t *sig = json_object_get(p, "signal");
    const char *cells[6];

    json_text(p, "id", id, sizeof(id));
    json_text(p, "pid", pid, sizeof(pid));
    snprintf(state, sizeof(state), "%s", json_is_true(running) ? "running"
                                         : json_is_false(running)
                                             ? "exited"
                                             : "-");
    json_text(p, "exit_code", code, sizeof(code));
    if (json_is_integer(sig) && json_integer_value(sig) > 0 &&
        json_integer_value(sig) < 64 &&
        sigabbrev_np((int)json_integer_value(sig)) != NULL)
        snprintf(code, sizeof(code), "SIG%s",
                 sigabbrev_np((int)json_integer_value(sig)));
    if (json_is_array(argv)) {
        size_t i, n = 0;
        json_t *x;

        cmd[0] = '\0';
        json_array_foreach(argv, i, x) {
            n += (size_t)snprintf(cmd + n, n < sizeof(cmd) ? sizeof(cmd) - n
                                                           : 0,
                                  "%s%s", i > 0 ? " " : "",
                                  json_is_string(x) ? json_string_value(x)
                                                    : "?");
            if (n >= sizeof(cmd))
                break;
        }
    } else {
        json_text(p, "command", cmd, sizeof(cmd));
    }
    fmt_age(json_object_get(p, "started_at"), now, age, sizeof(age));
    cells[0] = id;
    cells[1] = pid;
    cells[2] = state;
    cells[3] = code;
    cells[4] = age;
    cells[5] = cmd;
    table_add(t, cells);
}

int
cmd_ps(struct cli *c, int argc, char **argv)
{
    static const char *const head[] = {"ID", "PID", "STATE", "EXIT", "AGE",
                                       "COMMAND"};
    json_t *resp, *items, *p;
    struct table t;
    char *path;
    size_t i;
    int rv;

    if (argc < 1 || argc > 2)
        return usage_error("usage: paddock ps ID [PROC]");
    if (!pd_id_valid(argv[0]))
        return usage_error("bad sandbox id '%s'", argv[0]);
    path = argc == 2 ? cli_path("/v1/sandboxes/%s/processes/%s", argv[0],
                                argv[1])
                     : cli_path("/v1/sandboxes/%s/processes", argv[0]);
    rv = cli_json(c, "GET", path, NULL, &resp);
    free(path);
    if (rv != EXIT_OK)
        return rv;
    if (c->json) {
        print_json(resp);
    } else if (argc == 2) {
        print_object(resp, stdout, 0);
    } else {
        items = list_items(resp, "processes");
        table_init(&t, 6, head);
        json_array_foreach(items, i, p)
            proc_row(&t, p, pd_wall_ms());
        table_print(&t, stdout);
        table_free(&t);
    }
    json_decref(resp);
    return EXIT_OK;
}

int
cmd_start(struct cli *c, int argc, char **argv)
{
    struct cli_args a;
    char err[512], id[80], pid[24];
    json_t *body = NULL, *resp;
    char *path;
    int rv;

    if (cli_args_parse(argc, argv, exec_opts, exec_nopts, &a, err,
                       sizeof(err)) < 0 ||
        req_exec(&a, false, true, &body, err, sizeof(err)) != EXIT_OK)
        return usage_error("%s", err);
    path = cli_path("/v1/sandboxes/%s/processes", a.pos[0]);
    rv = cli_json(c, "POST", path, body, &resp);
    free(path);
    json_decref(body);
    if (rv != EXIT_OK)
        return rv;
    json_text(resp, "id", id, sizeof(id));
    json_text(resp, "pid", pid, sizeof(pid));
    if (c->json)
        print_json(resp);
    else if (!c->quiet)
        printf("%s\n", id); /* alone on stdout, for scripts */
    if (!c->json && !c->quiet && c->tty)
        fprintf(stderr, "started process %s (pid %s)\n", id, pid);
    json_decref(resp);
    return EXIT_OK;
}

int
cmd_logs(struct cli *c, int argc, char **argv)
{
    static const struct cli_opt opts[] = {{"--follow", "-f", false, false}};
    struct cli_args a;
    char err[256];
    char *path;
    int rv;

    bool follow;

    /* With -f paddock waits for the process, so it exits like exec: with
     * the process's code, or 125 when paddock itself failed. */
    if (cli_args_parse(argc, argv, opts, 1, &a, err, sizeof(err)) < 0 ||
        a.npos != 2) {
        usage_error("%s", a.npos != 2 ? "usage: paddock logs ID PROC [-f]"
                                      : err);
        return a.set[0] ? EXIT_EXEC_FAILED : EXIT_USAGE;
    }
    follow = a.set[0];
    if (!pd_id_valid(a.pos[0])) {
        usage_error("bad sandbox id '%s'", a.pos[0]);
        return follow ? EXIT_EXEC_FAILED : EXIT_USAGE;
    }
    path = cli_path(a.set[0] ? "/v1/sandboxes/%s/processes/%s/logs"
                               "?follow=true"
                             : "/v1/sandboxes/%s/processes/%s/logs",
                    a.pos[0], a.pos[1]);
    if (c->json && !a.set[0]) {
        json_t *resp;

        rv = cli_json(c, "GET", path, NULL, &resp);
        if (rv == EXIT_OK)
            print_json(resp);
        json_decref(resp);
    } else {
        rv = run_stream(c, "GET", path, NULL, follow);
    }
    free(path);
    return rv;
}

int
cmd_kill(struct cli *c, int argc, char **argv)
{
    json_t *resp;
    char *path;
    int rv;

    if (argc < 2 || argc > 3)
        return usage_error("usage: paddock kill ID PROC [SIGNAL]");
    if (!pd_id_valid(argv[0]))
        return usage_error("bad sandbox id '%s'", argv[0]);
    if (argc == 3)
        path = cli_path("/v1/sandboxes/%s/processes/%s?signal=%s", argv[0],
                        argv[1], argv[2]);
    else
        path = cli_path("/v1/sandboxes/%s/processes/%s", argv[0], argv[1]);
    rv = cli_json(c, "DELETE", path, NULL, &resp);
    free(path);
    if (rv == EXIT_OK && c->json && resp != NULL)
        print_json(resp);
    json_decref(resp);
    return rv;
}
