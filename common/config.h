/*
 * Daemon configuration: a table of options, filled from a config file and
 * then from command-line flags (flags win).
 *
 * The file holds "key = value" lines; '#' starts a comment; blank lines are
 * ignored; values may be double-quoted. Every key is also a flag: "--key
 * value" or "--key=value"; a bool flag given without a value means true.
 * "--config FILE" names the file; "--check-config" validates and makes
 * pd_config_load return 1 so the daemon can exit 0. Errors name the file,
 * line and key ("agent.conf:12: memory_reserve: not a size").
 */
#ifndef PD_CONFIG_H
#define PD_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum pd_config_type {
    PD_CFG_STRING, /* char *, malloc'd; default kept if never set */
    PD_CFG_INT,    /* int64_t */
    PD_CFG_UINT,   /* uint64_t */
    PD_CFG_BOOL,   /* bool */
    PD_CFG_DURATION, /* uint64_t milliseconds: "500ms", "5s", "1h" */
    PD_CFG_SIZE,   /* uint64_t bytes: "512M", "4G" */
    PD_CFG_LIST,   /* char *, comma-separated; repeated flags append */
};

struct pd_config_opt {
    const char *name;
    enum pd_config_type type;
    void *ptr;
    const char *help;
};

/*
 * Parses argv against opts (terminated by an entry with a NULL name).
 * Returns 0 to run, 1 when --check-config or --help asked to exit
 * successfully, or a negative errno with a message in err.
 * Positional arguments are left in *rest / *nrest when those are non-NULL;
 * otherwise a positional argument is an error.
 */
int pd_config_load(const struct pd_config_opt *opts, int argc, char **argv,
                   char ***rest, int *nrest, char *err, size_t errlen);

/* Sets one option from text; used by the loader and by tests. */
int pd_config_set(const struct pd_config_opt *opts, const char *key,
                  const char *value, char *err, size_t errlen);

/* Parses a config file; err names file and line. */
int pd_config_file(const struct pd_config_opt *opts, const char *path,
                   char *err, size_t errlen);

/* Prints the options and their help to stdout. */
void pd_config_usage(const char *prog, const struct pd_config_opt *opts);

/* Frees the strings that the loader allocated. */
void pd_config_free(const struct pd_config_opt *opts);

#endif
