/*
 * The paddock commands. Each takes the arguments after its own name and
 * returns an exit code (cli/client.h).
 */
#ifndef PD_CLI_COMMANDS_H
#define PD_CLI_COMMANDS_H

#include <jansson.h>

#include "cli/client.h"

int cmd_sandbox(struct cli *c, int argc, char **argv);
int cmd_exec(struct cli *c, int argc, char **argv, bool shell);
int cmd_ps(struct cli *c, int argc, char **argv);
int cmd_start(struct cli *c, int argc, char **argv);
int cmd_logs(struct cli *c, int argc, char **argv);
int cmd_kill(struct cli *c, int argc, char **argv);
int cmd_file(struct cli *c, int argc, char **argv);
int cmd_port(struct cli *c, int argc, char **argv);
int cmd_token(struct cli *c, int argc, char **argv);
int cmd_node(struct cli *c, int argc, char **argv);
int cmd_cluster(struct cli *c, int argc, char **argv);
int cmd_health(struct cli *c, int argc, char **argv);

/* sandbox create's exit code for the sandbox it answered (EXIT_SERVER
 * for failed, EXIT_TIMEOUT for still booting after a wait). */
int sandbox_create_exit(const json_t *s, bool waited);

/* Shared by the commands. */
void print_json(const json_t *j);
int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* A number found at the first of the dotted paths that exists. */
bool json_num_at(const json_t *o, double *out, const char *const *paths);
/* A string or number at a key, formatted; "-" when absent. */
const char *json_text(const json_t *o, const char *key, char *buf,
                      size_t len);

#endif
