/*
 * paddock: the command-line client of a Paddock cluster (DESIGN.md
 * section 4). Reads PADDOCK_ADDR and PADDOCK_TOKEN; --addr and --token
 * override them. Exit codes are listed in cli/README.md.
 */
#include <curl/curl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/args.h"
#include "cli/commands.h"

static const char usage[] =
    "usage: paddock [--addr HOST:PORT,...] [--token T] [--cacert PEM]\n"
    "               [--json] [-q] COMMAND ...\n"
    "\n"
    "  sandbox create [ID] [--cpus N] [--memory MB] [--disk MB] [--env K=V]\n"
    "                      [--label K=V] [--egress none|all]\n"
    "                      [--no-wait | --wait-timeout 2m]\n"
    "  sandbox list [--label K=V] [--state S] | get ID | rm ID...\n"
    "  exec ID [--cwd D] [--env K=V] [--timeout 30s] [-i] -- ARGV...\n"
    "  sh ID [--cwd D] [--env K=V] [--timeout 30s] [-i] 'shell string'\n"
    "  file put ID PATH [LOCAL|-] | get ID PATH [LOCAL|-] | ls ID [PATH]\n"
    "       | rm ID PATH [-r] | mkdir ID PATH [-p] | mv ID FROM TO\n"
    "  ps ID [PROC] | start ID [--id NAME] -- ARGV... | logs ID PROC [-f]\n"
    "       | kill ID PROC [SIGNAL]\n"
    "  port expose ID PORT | unexpose ID PORT | ls ID\n"
    "  token create --tenant T [--role admin|tenant] [--ttl 1h]\n"
    "        | revoke JTI | ls [--tenant T]\n"
    "  node ls | drain NODE\n"
    "  cluster status | add-member ID RAFT_ADDR [--api A] [--preview A]\n"
    "          | remove-member ID\n"
    "  health | version\n"
    "\n"
    "environment: PADDOCK_ADDR (comma-separated, tried in turn),\n"
    "             PADDOCK_TOKEN, PADDOCK_CACERT\n"
    "exit codes: 0 ok, 1 usage, 2 refused (4xx), 3 not found, "
    "4 unreachable,\n"
    "            5 server error, 6 local file error, 7 unauthorized,\n"
    "            8 create's wait ended first; exec, sh and logs -f exit\n"
    "            with the process's code, or 125 if paddock failed\n";

static int
run(struct cli *c, int argc, char **argv)
{
    const char *cmd = argv[0];

    argc--;
    argv++;
    if (strcmp(cmd, "sandbox") == 0 || strcmp(cmd, "sandboxes") == 0)
        return cmd_sandbox(c, argc, argv);
    if (strcmp(cmd, "exec") == 0)
        return cmd_exec(c, argc, argv, false);
    if (strcmp(cmd, "sh") == 0)
        return cmd_exec(c, argc, argv, true);
    if (strcmp(cmd, "file") == 0 || strcmp(cmd, "files") == 0)
        return cmd_file(c, argc, argv);
    if (strcmp(cmd, "ps") == 0)
        return cmd_ps(c, argc, argv);
    if (strcmp(cmd, "start") == 0)
        return cmd_start(c, argc, argv);
    if (strcmp(cmd, "logs") == 0)
        return cmd_logs(c, argc, argv);
    if (strcmp(cmd, "kill") == 0)
        return cmd_kill(c, argc, argv);
    if (strcmp(cmd, "port") == 0 || strcmp(cmd, "ports") == 0)
        return cmd_port(c, argc, argv);
    if (strcmp(cmd, "token") == 0 || strcmp(cmd, "tokens") == 0)
        return cmd_token(c, argc, argv);
    if (strcmp(cmd, "node") == 0 || strcmp(cmd, "nodes") == 0)
        return cmd_node(c, argc, argv);
    if (strcmp(cmd, "cluster") == 0)
        return cmd_cluster(c, argc, argv);
    if (strcmp(cmd, "health") == 0)
        return cmd_health(c, argc, argv);
    return usage_error("unknown command '%s' (see paddock --help)", cmd);
}

int
main(int argc, char **argv)
{
    struct cli_globals g = {0};
    struct cli c = {0};
    char err[512];
    const char *addr;
    int rv;

    argc--;
    argv++;
    if (cli_globals_parse(&argc, argv, &g, err, sizeof(err)) < 0)
        return usage_error("%s", err);
    if (g.version || (argc == 1 && strcmp(argv[0], "version") == 0)) {
        printf("paddock 0.1.0\n");
        return 0;
    }
    if (g.help || argc == 0) {
        fputs(usage, g.help ? stdout : stderr);
        return g.help ? 0 : 1;
    }
    /* A closed pipe (paddock ... | head) ends quietly, not by signal. */
    signal(SIGPIPE, SIG_IGN);
    addr = g.addr != NULL ? g.addr : getenv("PADDOCK_ADDR");
    if (cli_set_addrs(&c, addr != NULL ? addr : "", err, sizeof(err)) < 0) {
        cli_free(&c);
        return usage_error("%s", err);
    }
    c.token = g.token != NULL ? g.token : getenv("PADDOCK_TOKEN");
    c.cacert = g.cacert != NULL ? g.cacert : getenv("PADDOCK_CACERT");
    c.json = g.json;
    c.quiet = g.quiet;
    c.tty = isatty(2);
    if (curl_global_init(CURL_GLOBAL_ALL) != 0) {
        cli_free(&c);
        return usage_error("libcurl failed to start");
    }
    rv = run(&c, argc, argv);
    curl_global_cleanup();
    cli_free(&c);
    return rv;
}
