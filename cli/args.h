/*
 * Command-line parsing for paddock: global options anywhere before "--",
 * then per-command options mixed with positional arguments.
 *
 * Options are "--name VALUE", "--name=VALUE" or a short alias ("-f").
 * "--" ends option parsing; what follows is kept apart (exec's argv).
 */
#ifndef PD_CLI_ARGS_H
#define PD_CLI_ARGS_H

#include <stdbool.h>
#include <stddef.h>

#define CLI_MAX_OPTS 16
#define CLI_MAX_POS  16
#define CLI_MAX_MULTI 64

struct cli_opt {
    const char *name;  /* "--cpus" */
    const char *alias; /* "-f", or NULL */
    bool has_arg;
    bool multi;        /* may repeat (--env K=V --env K2=V2) */
};

struct cli_args {
    int npos;
    char *pos[CLI_MAX_POS];
    bool set[CLI_MAX_OPTS];
    char *val[CLI_MAX_OPTS];  /* the last value */
    int nmulti[CLI_MAX_OPTS];
    char *multi[CLI_MAX_OPTS][CLI_MAX_MULTI];
    bool dashdash;            /* "--" was given */
    int nrest;
    char **rest;              /* after "--" */
};

struct cli_globals {
    const char *addr;   /* comma-separated */
    const char *token;
    const char *cacert;
    bool json;
    bool help;
    bool version;
    bool quiet;
};

/*
 * Takes the global options (--addr, --token, --cacert, --json, --help,
 * --version, --quiet) out of argv wherever they are before "--"; argv is
 * compacted in place and *argc updated. -EINVAL with a message in err.
 */
int cli_globals_parse(int *argc, char **argv, struct cli_globals *g,
                      char *err, size_t errlen);

/* Parses a command's arguments (argv[0] is the first argument, not the
 * command name). -EINVAL with a message in err. */
int cli_args_parse(int argc, char **argv, const struct cli_opt *opts,
                   size_t nopts, struct cli_args *a, char *err,
                   size_t errlen);

/* Index of the option called name in opts, for set/val lookups. */
int cli_opt_index(const struct cli_opt *opts, size_t nopts,
                  const char *name);

/* For an unknown option a (nlen bytes): the option it shares a prefix of
 * at least 3 letters with, e.g. "--cpus" for "--cpu"; NULL if none. */
const char *cli_opt_suggest(const struct cli_opt *opts, size_t nopts,
                            const char *a, size_t nlen);

/* Splits "K=V": key must be non-empty and without '='. */
int cli_split_kv(const char *s, char *key, size_t keylen,
                 const char **value);

/* Parses a whole positive number up to max. */
int cli_parse_uint(const char *s, unsigned long long max,
                   unsigned long long *out);

#endif
