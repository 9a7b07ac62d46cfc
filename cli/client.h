/*
 * paddock's HTTP client over libcurl: scheduler addresses tried in turn,
 * bearer token, JSON requests, streamed uploads and downloads, progress
 * on a terminal, and the mapping of failures to exit codes.
 */
#ifndef PD_CLI_CLIENT_H
#define PD_CLI_CLIENT_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

/* Exit codes (documented in cli/README.md). */
enum {
    EXIT_OK = 0,
    EXIT_USAGE = 1,       /* bad arguments */
    EXIT_API = 2,         /* the API refused the request (4xx) */
    EXIT_NOTFOUND = 3,    /* 404: no such sandbox, node, file, ... */
    EXIT_UNREACHABLE = 4, /* no scheduler answered */
    EXIT_SERVER = 5,      /* 5xx, or a response paddock cannot read */
    EXIT_LOCAL = 6,       /* a local file could not be read or written */
    EXIT_AUTH = 7,        /* 401/403: missing, bad, revoked token */
    EXIT_TIMEOUT = 8,     /* a create's wait ended before the boot did */
    EXIT_EXEC_FAILED = 125, /* exec/sh: paddock itself failed */
};

#define CLI_MAX_ADDRS 16

struct cli {
    char *addrs[CLI_MAX_ADDRS]; /* base URLs, "http://host:port" */
    int naddrs;
    int cur;                    /* the address that answered last */
    const char *token;
    const char *cacert;
    bool json;
    bool quiet;
    bool tty;                   /* stderr is a terminal: show progress */
};

/*
 * Fills the address list from "a,b,c" (each "host:port" or a URL).
 * -EINVAL with a message in err.
 */
int cli_set_addrs(struct cli *c, const char *list, char *err, size_t errlen);
void cli_free(struct cli *c);

/* Builds "/v1/sandboxes/<id>/files?path=<P>" style paths: each %s in fmt
 * is replaced by the percent-encoded argument. Returns a malloc'd string. */
char *cli_path(const char *fmt, ...);

struct cli_call {
    const char *method;
    const char *path;           /* with the query, already encoded */
    json_t *json;               /* request body (borrowed), or NULL */
    FILE *upload;               /* raw request body, or NULL */
    int64_t upload_size;        /* -1 when unknown (sent chunked) */
    /* A 2xx response body goes here as it arrives (return n, or anything
     * else to stop); NULL collects it into resp_body. */
    size_t (*on_data)(const char *p, size_t n, void *arg);
    void *arg;
    const char *progress;       /* label for a progress line, or NULL */
    bool wait_progress;         /* elapsed time rather than bytes */
    long timeout_s;             /* 0 for none */

    /* Results. */
    long status;
    char ctype[128];
    char *resp_body;            /* NUL-terminated */
    size_t resp_len;
};

/*
 * Performs the call, trying each address in turn while the connection
 * itself fails. Returns EXIT_OK once a response arrived (any status), or
 * an exit code after printing a one-line message.
 */
int cli_do(struct cli *c, struct cli_call *k);

/*
 * For a finished call: EXIT_OK for 2xx, else prints the API's error
 * message and returns the exit code its status means.
 */
int cli_check(const struct cli *c, const struct cli_call *k);

/* cli_do + cli_check + JSON parse of the body (*out NULL when empty). */
int cli_json(struct cli *c, const char *method, const char *path,
             json_t *body, json_t **out);

void cli_call_free(struct cli_call *k);

/* Prints "paddock: <message>" on stderr. */
void cli_errorf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
