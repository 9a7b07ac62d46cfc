/*
 * The mapping from parsed arguments to API requests (paths and JSON
 * bodies), kept apart from the network so unit tests can check it. Each
 * builder returns EXIT_OK or EXIT_USAGE with a message in err.
 */
#ifndef PD_CLI_REQUESTS_H
#define PD_CLI_REQUESTS_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "cli/args.h"

/* sandbox create ID [--cpus N] [--memory MB] [--disk MB] [--env K=V]...
 * [--label K=V]... [--egress none|all] [--no-wait | --wait-timeout DUR]
 * The scheduler waits for the boot 2 minutes by default and at most
 * CREATE_WAIT_MAX_MS (its wait_ms bound). */
#define CREATE_WAIT_DEFAULT_MS 120000
#define CREATE_WAIT_MAX_MS 600000
extern const struct cli_opt create_opts[];
extern const size_t create_nopts;
int req_create(const struct cli_args *a, json_t **body, char **path,
               char *err, size_t errlen);

/* sandbox list [--label K=V]... [--state S] */
extern const struct cli_opt list_opts[];
extern const size_t list_nopts;
int req_list(const struct cli_args *a, char **path, char *err,
             size_t errlen);

/* exec ID [--cwd D] [--env K=V]... [--timeout DUR] -- ARGV...
 * sh ID [--cwd D] [--env K=V]... [--timeout DUR] 'shell string'
 * start ID [--id NAME] [--cwd D] [--env K=V]... -- ARGV... */
extern const struct cli_opt exec_opts[];
extern const size_t exec_nopts;
int req_exec(const struct cli_args *a, bool shell, bool start,
             json_t **body, char *err, size_t errlen);

/* token create --tenant T [--role admin|tenant] [--ttl DUR] */
extern const struct cli_opt token_opts[];
extern const size_t token_nopts;
int req_token(const struct cli_args *a, json_t **body, char *err,
              size_t errlen);

/* cluster add-member ID RAFT_ADDR [--api ADDR] [--preview ADDR] */
extern const struct cli_opt member_opts[];
extern const size_t member_nopts;
int req_member(const struct cli_args *a, json_t **body, char *err,
               size_t errlen);

/* The value of an option by name, or NULL. */
const char *opt_val(const struct cli_args *a, const struct cli_opt *opts,
                    size_t nopts, const char *name);
bool opt_set(const struct cli_args *a, const struct cli_opt *opts,
             size_t nopts, const char *name);

#endif
