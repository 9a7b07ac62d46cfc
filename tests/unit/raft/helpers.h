/*
 * Command builders shared by the raft/ unit tests: each fills a struct
 * fsm_cmd with a fresh request id and a fixed clock, so tests read as a
 * list of cluster events.
 */
#ifndef PD_TEST_RAFT_HELPERS_H
#define PD_TEST_RAFT_HELPERS_H

#include <string.h>

#include "common/util.h"
#include "raft/cmd.h"
#include "raft/fsm.h"

/* Every command of a test happens at this wall-clock time (ms). */
static uint64_t test_now_ms = 1700000000000ull;

static inline void
cmd_new(struct fsm_cmd *c, int type)
{
    fsm_cmd_init(c, type);
    c->now_ms = test_now_ms;
}

static inline void
mk_register(struct fsm_cmd *c, const char *node, uint32_t cpus,
            uint64_t mem, uint64_t disk)
{
    cmd_new(c, FSM_CMD_NODE_REGISTER);
    pd_strlcpy(c->u.node_register.node, node, FSM_ID_MAX + 1);
    snprintf(c->u.node_register.rpc_addr, FSM_ADDR_MAX + 1,
             "127.0.0.1:%u", 7000 + (unsigned)strlen(node));
    c->u.node_register.cpus = cpus;
    c->u.node_register.memory_mb = mem;
    c->u.node_register.disk_mb = disk;
}

static inline void
mk_node(struct fsm_cmd *c, int type, const char *node)
{
    cmd_new(c, type);
    pd_strlcpy(c->u.node.node, node, FSM_ID_MAX + 1);
}

static inline void
mk_place(struct fsm_cmd *c, const char *sb, const char *tenant,
         const char *node, uint32_t cpus, uint64_t mem, uint64_t disk)
{
    cmd_new(c, FSM_CMD_SANDBOX_PLACE);
    pd_strlcpy(c->u.place.sandbox, sb, FSM_ID_MAX + 1);
    pd_strlcpy(c->u.place.tenant, tenant, FSM_ID_MAX + 1);
    pd_strlcpy(c->u.place.node, node, FSM_ID_MAX + 1);
    c->u.place.spec.cpus = cpus;
    c->u.place.spec.memory_mb = mem;
    c->u.place.spec.disk_mb = disk;
    strcpy(c->u.place.spec.egress, "none");
}

static inline void
mk_state(struct fsm_cmd *c, const char *sb, int state, const char *reason)
{
    cmd_new(c, FSM_CMD_SANDBOX_STATE);
    pd_strlcpy(c->u.state.sandbox, sb, FSM_ID_MAX + 1);
    c->u.state.state = state;
    pd_strlcpy(c->u.state.reason, reason, FSM_REASON_MAX + 1);
}

static inline void
mk_sandbox(struct fsm_cmd *c, const char *sb)
{
    cmd_new(c, FSM_CMD_SANDBOX_DELETE);
    pd_strlcpy(c->u.sandbox.sandbox, sb, FSM_ID_MAX + 1);
}

static inline void
mk_port(struct fsm_cmd *c, int type, const char *sb, uint32_t port)
{
    cmd_new(c, type);
    pd_strlcpy(c->u.port.sandbox, sb, FSM_ID_MAX + 1);
    c->u.port.port = port;
    memset(c->u.port.token_hash, 0xab, FSM_TOKEN_HASH_LEN);
}

static inline void
mk_token(struct fsm_cmd *c, int type, const char *jti, const char *tenant,
         const char *role, uint64_t exp_ms)
{
    cmd_new(c, type);
    pd_strlcpy(c->u.token.jti, jti, FSM_JTI_MAX + 1);
    pd_strlcpy(c->u.token.tenant, tenant, FSM_ID_MAX + 1);
    pd_strlcpy(c->u.token.role, role, FSM_ROLE_MAX + 1);
    c->u.token.exp_ms = exp_ms;
}

static inline void
mk_member(struct fsm_cmd *c, uint64_t id)
{
    cmd_new(c, FSM_CMD_MEMBER_SET);
    c->u.member.id = id;
    snprintf(c->u.member.raft_addr, FSM_ADDR_MAX + 1, "127.0.0.1:%llu",
             9000 + (unsigned long long)id);
    snprintf(c->u.member.api_addr, FSM_ADDR_MAX + 1, "127.0.0.1:%llu",
             8000 + (unsigned long long)id);
    snprintf(c->u.member.rpc_addr, FSM_ADDR_MAX + 1, "127.0.0.1:%llu",
             8100 + (unsigned long long)id);
    snprintf(c->u.member.preview_addr, FSM_ADDR_MAX + 1, "127.0.0.1:%llu",
             8200 + (unsigned long long)id);
}

#endif
