#include "proto/msgtypes.h"

#include <stddef.h>

static const struct {
    unsigned type;
    const char *name;
} names[] = {
    {PD_MSG_HELLO, "HELLO"},
    {PD_MSG_OK, "OK"},
    {PD_MSG_ERROR, "ERROR"},
    {PD_MSG_CANCEL, "CANCEL"},
    {PD_MSG_WINDOW, "WINDOW"},
    {PD_MSG_PING, "PING"},
    {PD_MSG_PONG, "PONG"},
    {PD_MSG_DATA, "DATA"},
    {PD_MSG_EXEC, "EXEC"},
    {PD_MSG_EXEC_START, "EXEC_START"},
    {PD_MSG_STDOUT, "STDOUT"},
    {PD_MSG_STDERR, "STDERR"},
    {PD_MSG_EXIT, "EXIT"},
    {PD_MSG_STDIN, "STDIN"},
    {PD_MSG_PROC_START, "PROC_START"},
    {PD_MSG_PROC_LIST, "PROC_LIST"},
    {PD_MSG_PROC_GET, "PROC_GET"},
    {PD_MSG_PROC_LOGS, "PROC_LOGS"},
    {PD_MSG_PROC_SIGNAL, "PROC_SIGNAL"},
    {PD_MSG_PROC_WAIT_PORT, "PROC_WAIT_PORT"},
    {PD_MSG_FILE_WRITE, "FILE_WRITE"},
    {PD_MSG_FILE_READ, "FILE_READ"},
    {PD_MSG_FILE_STAT, "FILE_STAT"},
    {PD_MSG_FILE_LIST, "FILE_LIST"},
    {PD_MSG_FILE_MKDIR, "FILE_MKDIR"},
    {PD_MSG_FILE_DELETE, "FILE_DELETE"},
    {PD_MSG_FILE_RENAME, "FILE_RENAME"},
    {PD_MSG_TUNNEL_OPEN, "TUNNEL_OPEN"},
    {PD_MSG_INFO, "INFO"},
    {PD_MSG_SHUTDOWN, "SHUTDOWN"},
    {PD_MSG_SANDBOX_CREATE, "SANDBOX_CREATE"},
    {PD_MSG_SANDBOX_DESTROY, "SANDBOX_DESTROY"},
    {PD_MSG_SANDBOX_STATUS, "SANDBOX_STATUS"},
    {PD_MSG_SANDBOX_LIST, "SANDBOX_LIST"},
    {PD_MSG_PORT_OPEN, "PORT_OPEN"},
    {PD_MSG_PORT_CLOSE, "PORT_CLOSE"},
    {PD_MSG_AGENT_INFO, "AGENT_INFO"},
    {PD_MSG_TOKEN_REVOKE, "TOKEN_REVOKE"},
    {PD_MSG_NODE_REGISTER, "NODE_REGISTER"},
    {PD_MSG_NODE_HEARTBEAT, "NODE_HEARTBEAT"},
    {PD_MSG_NODE_REDIRECT, "NODE_REDIRECT"},
    {PD_MSG_SANDBOX_STATE, "SANDBOX_STATE"},
    {PD_MSG_FORWARD, "FORWARD"},
    {PD_MSG_SANDBOX_ENSURE, "SANDBOX_ENSURE"},
};

const char *
pd_msg_type_name(unsigned long long t)
{
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (names[i].type == t)
            return names[i].name;
    }
    return "UNKNOWN";
}

int
pd_msg_type_known(unsigned long long t)
{
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (names[i].type == t)
            return 1;
    }
    return 0;
}
