#include "raft/cmd.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto/frame.h"

static const char *const cmd_names[] = {
    [FSM_CMD_MEMBER_SET] = "MEMBER_SET",
    [FSM_CMD_MEMBER_REMOVE] = "MEMBER_REMOVE",
    [FSM_CMD_NODE_REGISTER] = "NODE_REGISTER",
    [FSM_CMD_NODE_HEARTBEAT] = "NODE_HEARTBEAT",
    [FSM_CMD_NODE_DOWN] = "NODE_DOWN",
    [FSM_CMD_NODE_DRAIN] = "NODE_DRAIN",
    [FSM_CMD_SANDBOX_PLACE] = "SANDBOX_PLACE",
    [FSM_CMD_SANDBOX_STATE] = "SANDBOX_STATE",
    [FSM_CMD_SANDBOX_DELETE] = "SANDBOX_DELETE",
    [FSM_CMD_PORT_EXPOSE] = "PORT_EXPOSE",
    [FSM_CMD_PORT_UNEXPOSE] = "PORT_UNEXPOSE",
    [FSM_CMD_TOKEN_CREATE] = "TOKEN_CREATE",
    [FSM_CMD_TOKEN_REVOKE] = "TOKEN_REVOKE",
    [FSM_CMD_TOKEN_GC] = "TOKEN_GC",
    [FSM_CMD_KEY_ADD] = "KEY_ADD",
    [FSM_CMD_KEY_RETIRE] = "KEY_RETIRE",
    [FSM_CMD_BOOTSTRAP_ADMIN] = "BOOTSTRAP_ADMIN",
};

static const char *const state_names[FSM_SB_NSTATES] = {
    "pending", "starting", "running", "stopping", "stopped", "lost", "failed",
};

const char *
fsm_cmd_name(int type)
{
    if (type < 1 || type > FSM_CMD_TYPE_MAX)
        return "UNKNOWN";
    return cmd_names[type];
}

const char *
fsm_sandbox_state_name(int state)
{
    if (state < 0 || state >= FSM_SB_NSTATES)
        return "unknown";
    return state_names[state];
}

int
fsm_sandbox_state_parse(const char *name)
{
    for (int i = 0; i < FSM_SB_NSTATES; i++) {
        if (strcmp(name, state_names[i]) == 0)
            return i;
    }
    return -EINVAL;
}

int
fsm_rid_new(struct fsm_rid *rid)
{
    return pd_random_bytes(rid->b, sizeof(rid->b));
}

void
fsm_rid_hex(const struct fsm_rid *rid, char *out)
{
    pd_hex(rid->b, sizeof(rid->b), out);
}

int
fsm_cmd_init(struct fsm_cmd *cmd, int type)
{
    memset(cmd, 0, sizeof(*cmd));
    cmd->type = type;
    cmd->now_ms = pd_wall_ms();
    return fsm_rid_new(&cmd->rid);
}

void
fsm_kv_free(struct fsm_kv *kv, size_t n)
{
    if (kv == NULL)
        return;
    for (size_t i = 0; i < n; i++) {
        free(kv[i].key);
        free(kv[i].value);
    }
    free(kv);
}

void
fsm_cmd_free(struct fsm_cmd *cmd)
{
    switch (cmd->type) {
    case FSM_CMD_NODE_REGISTER:
        fsm_kv_free(cmd->u.node_register.labels,
                    cmd->u.node_register.n_labels);
        cmd->u.node_register.labels = NULL;
        cmd->u.node_register.n_labels = 0;
        break;
    case FSM_CMD_SANDBOX_PLACE:
        fsm_kv_free(cmd->u.place.spec.env, cmd->u.place.spec.n_env);
        fsm_kv_free(cmd->u.place.spec.labels, cmd->u.place.spec.n_labels);
        cmd->u.place.spec.env = NULL;
        cmd->u.place.spec.labels = NULL;
        cmd->u.place.spec.n_env = cmd->u.place.spec.n_labels = 0;
        break;
    case FSM_CMD_KEY_ADD:
        free(cmd->u.key.public_pem);
        free(cmd->u.key.private_pem);
        cmd->u.key.public_pem = cmd->u.key.private_pem = NULL;
        break;
    default:
        break;
    }
}

/* ---- Encoding ---------------------------------------------------------- */

/* A list of pairs as a msgpack array of [key, value] arrays: an array
 * rather than a map keeps the order the caller gave. Sizes the decoder
 * would refuse are refused here, so that the proposer gets the error
 * rather than every member logging a malformed entry. */
static int
enc_kv(struct pd_enc *e, const char *key, const struct fsm_kv *kv, size_t n)
{
    if (n > FSM_KV_MAX)
        return -E2BIG;
    if (n > 0 && kv == NULL)
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        if (kv[i].key == NULL || kv[i].value == NULL)
            return -EINVAL;
        if (strlen(kv[i].key) > FSM_KEY_MAX ||
            strlen(kv[i].value) > FSM_VALUE_MAX)
            return -ENAMETOOLONG;
    }
    pd_enc_key(e, key);
    msgpack_pack_array(&e->pk, n);
    for (size_t i = 0; i < n; i++) {
        msgpack_pack_array(&e->pk, 2);
        pd_enc_pack_str(e, kv[i].key);
        pd_enc_pack_str(e, kv[i].value);
    }
    return 0;
}

static int
enc_body(struct pd_enc *e, const struct fsm_cmd *c)
{
    const struct fsm_spec *s;
    int rv = 0;

    switch (c->type) {
    case FSM_CMD_MEMBER_SET:
        pd_enc_str(e, "raft", c->u.member.raft_addr);
        pd_enc_str(e, "api", c->u.member.api_addr);
        pd_enc_str(e, "rpc", c->u.member.rpc_addr);
        pd_enc_str(e, "preview", c->u.member.preview_addr);
        /* fall through */
    case FSM_CMD_MEMBER_REMOVE:
        pd_enc_u64(e, "member", c->u.member.id);
        break;
    case FSM_CMD_NODE_REGISTER:
        pd_enc_str(e, "node", c->u.node_register.node);
        pd_enc_str(e, "rpc", c->u.node_register.rpc_addr);
        pd_enc_u64(e, "cpus", c->u.node_register.cpus);
        pd_enc_u64(e, "mem", c->u.node_register.memory_mb);
        pd_enc_u64(e, "disk", c->u.node_register.disk_mb);
        rv = enc_kv(e, "labels", c->u.node_register.labels,
                    c->u.node_register.n_labels);
        break;
    case FSM_CMD_NODE_HEARTBEAT:
    case FSM_CMD_NODE_DOWN:
    case FSM_CMD_NODE_DRAIN:
        pd_enc_str(e, "node", c->u.node.node);
        pd_enc_bool(e, "drain", c->u.node.drain);
        pd_enc_str(e, "reason", c->u.node.reason);
        break;
    case FSM_CMD_SANDBOX_PLACE:
        s = &c->u.place.spec;
        pd_enc_str(e, "sandbox", c->u.place.sandbox);
        pd_enc_str(e, "tenant", c->u.place.tenant);
        pd_enc_str(e, "node", c->u.place.node);
        pd_enc_bool(e, "replace", c->u.place.replace);
        pd_enc_u64(e, "cpus", s->cpus);
        pd_enc_u64(e, "mem", s->memory_mb);
        pd_enc_u64(e, "disk", s->disk_mb);
        pd_enc_str(e, "egress", s->egress);
        rv = enc_kv(e, "env", s->env, s->n_env);
        if (rv == 0)
            rv = enc_kv(e, "labels", s->labels, s->n_labels);
        break;
    case FSM_CMD_SANDBOX_STATE:
        pd_enc_str(e, "sandbox", c->u.state.sandbox);
        pd_enc_i64(e, "state", c->u.state.state);
        pd_enc_str(e, "reason", c->u.state.reason);
        pd_enc_str(e, "node", c->u.state.node);
        pd_enc_u64(e, "gen", c->u.state.generation);
        break;
    case FSM_CMD_SANDBOX_DELETE:
        pd_enc_str(e, "sandbox", c->u.sandbox.sandbox);
        break;
    case FSM_CMD_PORT_EXPOSE:
        pd_enc_bin(e, "hash", c->u.port.token_hash,
                   sizeof(c->u.port.token_hash));
        /* fall through */
    case FSM_CMD_PORT_UNEXPOSE:
        pd_enc_str(e, "sandbox", c->u.port.sandbox);
        pd_enc_u64(e, "port", c->u.port.port);
        break;
    case FSM_CMD_TOKEN_CREATE:
    case FSM_CMD_TOKEN_REVOKE:
    case FSM_CMD_BOOTSTRAP_ADMIN:
        pd_enc_str(e, "jti", c->u.token.jti);
        pd_enc_str(e, "tenant", c->u.token.tenant);
        pd_enc_str(e, "role", c->u.token.role);
        pd_enc_u64(e, "exp", c->u.token.exp_ms);
        break;
    case FSM_CMD_TOKEN_GC:
        break;
    case FSM_CMD_KEY_ADD:
        if (c->u.key.public_pem == NULL || c->u.key.private_pem == NULL)
            return -EINVAL;
        if (strlen(c->u.key.public_pem) > FSM_PEM_MAX ||
            strlen(c->u.key.private_pem) > FSM_PEM_MAX)
            return -ENAMETOOLONG;
        pd_enc_str(e, "pub", c->u.key.public_pem);
        pd_enc_str(e, "priv", c->u.key.private_pem);
        /* fall through */
    case FSM_CMD_KEY_RETIRE:
        pd_enc_str(e, "kid", c->u.key.kid);
        pd_enc_str(e, "alg", c->u.key.alg);
        break;
    default:
        return -EINVAL;
    }
    return rv;
}

int
fsm_cmd_encode(const struct fsm_cmd *cmd, void **out, size_t *out_len)
{
    struct pd_enc e;
    unsigned char *p, *q;
    size_t len, padded;
    int rv;

    pd_enc_begin(&e, (unsigned)cmd->type, 0);
    pd_enc_bin(&e, "rid", cmd->rid.b, sizeof(cmd->rid.b));
    pd_enc_u64(&e, "now", cmd->now_ms);
    rv = enc_body(&e, cmd);
    if (rv != 0) {
        pd_enc_discard(&e);
        return rv;
    }
    rv = pd_enc_finish(&e, (void **)&p, &len);
    if (rv != 0)
        return rv;

    padded = (len + FSM_CMD_ALIGN - 1) / FSM_CMD_ALIGN * FSM_CMD_ALIGN;
    q = realloc(p, padded);
    if (q == NULL) {
        free(p);
        return -ENOMEM;
    }
    memset(q + len, 0, padded - len);
    *out = q;
    *out_len = padded;
    return 0;
}

/* ---- Decoding ---------------------------------------------------------- */

struct dec {
    struct pd_msg m;
    char *err;
    size_t errlen;
    int rv; /* first failure */
};

static void
dec_fail(struct dec *d, int rv, const char *key, const char *what)
{
    if (d->rv != 0)
        return;
    d->rv = rv;
    snprintf(d->err, d->errlen, "field \"%s\": %s", key, what);
}

static void
dec_check(struct dec *d, int rv, const char *key)
{
    switch (rv) {
    case 0:
        return;
    case -ENOENT:
        dec_fail(d, -EPROTO, key, "missing");
        break;
    case -ENAMETOOLONG:
        dec_fail(d, rv, key, "too long");
        break;
    case -EINVAL:
        dec_fail(d, rv, key, "embedded NUL");
        break;
    case -E2BIG:
        dec_fail(d, rv, key, "too many entries");
        break;
    default:
        dec_fail(d, rv < 0 ? rv : -EPROTO, key, "wrong type");
        break;
    }
}

static void
dec_str(struct dec *d, const char *key, char *buf, size_t buflen)
{
    dec_check(d, pd_msg_cstr(&d->m, key, buf, buflen), key);
}

static void
dec_u64(struct dec *d, const char *key, uint64_t *out)
{
    dec_check(d, pd_msg_u64(&d->m, key, out), key);
}

static void
dec_u32(struct dec *d, const char *key, uint32_t *out)
{
    uint64_t v = 0;
    int rv = pd_msg_u64(&d->m, key, &v);

    if (rv == 0 && v > UINT32_MAX)
        rv = -ERANGE;
    if (rv == -ERANGE) {
        dec_fail(d, rv, key, "out of range");
        return;
    }
    dec_check(d, rv, key);
    *out = (uint32_t)v;
}

static void
dec_bool(struct dec *d, const char *key, bool *out)
{
    dec_check(d, pd_msg_bool(&d->m, key, out), key);
}

static void
dec_pem(struct dec *d, const char *key, char **out)
{
    const char *p;
    size_t n;
    int rv = pd_msg_str(&d->m, key, &p, &n);

    if (rv == 0 && n > FSM_PEM_MAX)
        rv = -ENAMETOOLONG;
    if (rv == 0)
        rv = pd_msg_strdup(&d->m, key, out);
    dec_check(d, rv, key);
}

static int
kv_str(const msgpack_object *o, size_t max, char **out)
{
    if (o->type != MSGPACK_OBJECT_STR)
        return -EPROTO;
    if (o->via.str.size > max)
        return -ENAMETOOLONG;
    return pd_obj_strdup(o, out);
}

static void
dec_kv(struct dec *d, const char *key, struct fsm_kv **out, size_t *out_n)
{
    const msgpack_object_array *a;
    struct fsm_kv *kv;
    int rv = pd_msg_array(&d->m, key, &a);

    if (rv == 0 && a->size > FSM_KV_MAX)
        rv = -E2BIG;
    if (rv != 0) {
        dec_check(d, rv, key);
        return;
    }
    kv = calloc(a->size + 1, sizeof(*kv));
    if (kv == NULL) {
        dec_fail(d, -ENOMEM, key, "out of memory");
        return;
    }
    for (uint32_t i = 0; i < a->size && rv == 0; i++) {
        const msgpack_object *pair = &a->ptr[i];

        if (pair->type != MSGPACK_OBJECT_ARRAY || pair->via.array.size != 2) {
            rv = -EPROTO;
            break;
        }
        rv = kv_str(&pair->via.array.ptr[0], FSM_KEY_MAX, &kv[i].key);
        if (rv == 0)
            rv = kv_str(&pair->via.array.ptr[1], FSM_VALUE_MAX,
                        &kv[i].value);
    }
    if (rv != 0) {
        fsm_kv_free(kv, a->size);
        dec_check(d, rv == -ENOENT ? -EPROTO : rv, key);
        return;
    }
    *out = kv;
    *out_n = a->size;
}

static void
dec_body(struct dec *d, struct fsm_cmd *c)
{
    struct fsm_spec *s;
    const void *p;
    size_t n;
    int64_t st = 0;
    int rv;

    switch (c->type) {
    case FSM_CMD_MEMBER_SET:
        dec_str(d, "raft", c->u.member.raft_addr, FSM_ADDR_MAX + 1);
        dec_str(d, "api", c->u.member.api_addr, FSM_ADDR_MAX + 1);
        dec_str(d, "rpc", c->u.member.rpc_addr, FSM_ADDR_MAX + 1);
        dec_str(d, "preview", c->u.member.preview_addr, FSM_ADDR_MAX + 1);
        /* fall through */
    case FSM_CMD_MEMBER_REMOVE:
        dec_u64(d, "member", &c->u.member.id);
        break;
    case FSM_CMD_NODE_REGISTER:
        dec_str(d, "node", c->u.node_register.node, FSM_ID_MAX + 1);
        dec_str(d, "rpc", c->u.node_register.rpc_addr, FSM_ADDR_MAX + 1);
        dec_u32(d, "cpus", &c->u.node_register.cpus);
        dec_u64(d, "mem", &c->u.node_register.memory_mb);
        dec_u64(d, "disk", &c->u.node_register.disk_mb);
        if (d->rv == 0)
            dec_kv(d, "labels", &c->u.node_register.labels,
                   &c->u.node_register.n_labels);
        break;
    case FSM_CMD_NODE_HEARTBEAT:
    case FSM_CMD_NODE_DOWN:
    case FSM_CMD_NODE_DRAIN:
        dec_str(d, "node", c->u.node.node, FSM_ID_MAX + 1);
        dec_bool(d, "drain", &c->u.node.drain);
        dec_str(d, "reason", c->u.node.reason, FSM_REASON_MAX + 1);
        break;
    case FSM_CMD_SANDBOX_PLACE:
        s = &c->u.place.spec;
        dec_str(d, "sandbox", c->u.place.sandbox, FSM_ID_MAX + 1);
        dec_str(d, "tenant", c->u.place.tenant, FSM_ID_MAX + 1);
        dec_str(d, "node", c->u.place.node, FSM_ID_MAX + 1);
        dec_bool(d, "replace", &c->u.place.replace);
        dec_u32(d, "cpus", &s->cpus);
        dec_u64(d, "mem", &s->memory_mb);
        dec_u64(d, "disk", &s->disk_mb);
        dec_str(d, "egress", s->egress, FSM_EGRESS_MAX + 1);
        if (d->rv == 0)
            dec_kv(d, "env", &s->env, &s->n_env);
        if (d->rv == 0)
            dec_kv(d, "labels", &s->labels, &s->n_labels);
        break;
    case FSM_CMD_SANDBOX_STATE:
        dec_str(d, "sandbox", c->u.state.sandbox, FSM_ID_MAX + 1);
        dec_check(d, pd_msg_i64(&d->m, "state", &st), "state");
        if (d->rv == 0 && (st < 0 || st >= FSM_SB_NSTATES))
            dec_fail(d, -EPROTO, "state", "out of range");
        c->u.state.state = (int)st;
        dec_str(d, "reason", c->u.state.reason, FSM_REASON_MAX + 1);
        dec_str(d, "node", c->u.state.node, FSM_ID_MAX + 1);
        dec_u64(d, "gen", &c->u.state.generation);
        break;
    case FSM_CMD_SANDBOX_DELETE:
        dec_str(d, "sandbox", c->u.sandbox.sandbox, FSM_ID_MAX + 1);
        break;
    case FSM_CMD_PORT_EXPOSE:
        rv = pd_msg_bin(&d->m, "hash", &p, &n);
        if (rv == 0 && n != FSM_TOKEN_HASH_LEN)
            dec_fail(d, -EPROTO, "hash", "not 32 bytes");
        else if (rv == 0)
            memcpy(c->u.port.token_hash, p, n);
        dec_check(d, rv, "hash");
        /* fall through */
    case FSM_CMD_PORT_UNEXPOSE:
        dec_str(d, "sandbox", c->u.port.sandbox, FSM_ID_MAX + 1);
        dec_u32(d, "port", &c->u.port.port);
        break;
    case FSM_CMD_TOKEN_CREATE:
    case FSM_CMD_TOKEN_REVOKE:
    case FSM_CMD_BOOTSTRAP_ADMIN:
        dec_str(d, "jti", c->u.token.jti, FSM_JTI_MAX + 1);
        dec_str(d, "tenant", c->u.token.tenant, FSM_ID_MAX + 1);
        dec_str(d, "role", c->u.token.role, FSM_ROLE_MAX + 1);
        dec_u64(d, "exp", &c->u.token.exp_ms);
        break;
    case FSM_CMD_TOKEN_GC:
        break;
    case FSM_CMD_KEY_ADD:
        dec_pem(d, "pub", &c->u.key.public_pem);
        dec_pem(d, "priv", &c->u.key.private_pem);
        /* fall through */
    case FSM_CMD_KEY_RETIRE:
        dec_str(d, "kid", c->u.key.kid, FSM_KID_MAX + 1);
        dec_str(d, "alg", c->u.key.alg, FSM_ALG_MAX + 1);
        break;
    default:
        dec_fail(d, -EPROTO, "t", "unknown command type");
        break;
    }
}

static uint32_t
get_be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
           (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

/* Checks the length prefix and the padding; returns the map's length. */
static int
check_frame(const unsigned char *p, size_t len, size_t *map_len, char *err,
            size_t errlen)
{
    size_t n, end;

    if (len < 4 || len % FSM_CMD_ALIGN != 0) {
        snprintf(err, errlen, "entry of %zu bytes is not a padded command",
                 len);
        return -EPROTO;
    }
    n = get_be32(p);
    end = 4 + n;
    if (n == 0 || n > len - 4 || len - end >= FSM_CMD_ALIGN) {
        snprintf(err, errlen, "length prefix %zu does not match an entry "
                 "of %zu bytes", n, len);
        return -EPROTO;
    }
    for (size_t i = end; i < len; i++) {
        if (p[i] != 0) {
            snprintf(err, errlen, "non-zero padding");
            return -EPROTO;
        }
    }
    *map_len = n;
    return 0;
}

int
fsm_cmd_decode(const void *buf, size_t len, struct fsm_cmd *out, char *err,
               size_t errlen)
{
    const unsigned char *p = buf;
    const char *reason = NULL;
    struct dec d = {.err = err, .errlen = errlen};
    const void *rid;
    size_t map_len, off = 0, rid_len;
    uint64_t t = 0;
    long used;
    int rv;

    memset(out, 0, sizeof(*out));
    rv = check_frame(p, len, &map_len, err, errlen);
    if (rv != 0)
        return rv;

    /* Validate the msgpack before msgpack-c sees it (DESIGN.md 9). */
    used = pd_mp_check(p + 4, map_len, PD_NEST_MAX, &reason);
    if (used < 0 || (size_t)used != map_len) {
        snprintf(err, errlen, "bad msgpack: %s",
                 reason != NULL ? reason : "trailing bytes");
        return -EPROTO;
    }
    msgpack_unpacked_init(&d.m.up);
    if (msgpack_unpack_next(&d.m.up, (const char *)p + 4, map_len, &off) !=
            MSGPACK_UNPACK_SUCCESS ||
        d.m.up.data.type != MSGPACK_OBJECT_MAP) {
        msgpack_unpacked_destroy(&d.m.up);
        snprintf(err, errlen, "command is not a msgpack map");
        return -EPROTO;
    }
    d.m.root = &d.m.up.data;
    d.m.live = true;

    dec_u64(&d, "t", &t);
    if (d.rv == 0 && (t < 1 || t > FSM_CMD_TYPE_MAX))
        dec_fail(&d, -EPROTO, "t", "unknown command type");
    out->type = (int)t;
    rv = pd_msg_bin(&d.m, "rid", &rid, &rid_len);
    if (rv == 0 && rid_len != FSM_RID_LEN)
        dec_fail(&d, -EPROTO, "rid", "not 16 bytes");
    else if (rv == 0)
        memcpy(out->rid.b, rid, FSM_RID_LEN);
    dec_check(&d, rv, "rid");
    dec_u64(&d, "now", &out->now_ms);
    if (d.rv == 0)
        dec_body(&d, out);

    pd_msg_release(&d.m);
    if (d.rv != 0) {
        fsm_cmd_free(out);
        memset(out, 0, sizeof(*out)); /* no half-decoded fields */
        return d.rv;
    }
    return 0;
}

/* ---- Batches ----------------------------------------------------------- */

static const unsigned char batch_magic[4] = {'P', 'D', 'B', '1'};

#define BATCH_HDR 8 /* magic, count */
#define PART_HDR 8  /* length, 4 zero bytes */

static void
put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

bool
fsm_batch_is(const void *buf, size_t len)
{
    return len >= BATCH_HDR && memcmp(buf, batch_magic, 4) == 0;
}

int
fsm_batch_encode(void *const *parts, const size_t *lens, size_t n,
                 void **out, size_t *out_len)
{
    unsigned char *p;
    size_t total = BATCH_HDR, off;

    if (n == 0 || n > FSM_BATCH_MAX)
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        if (lens[i] == 0 || lens[i] % FSM_CMD_ALIGN != 0)
            return -EINVAL;
        if (lens[i] > FSM_BATCH_BYTES - total - PART_HDR)
            return -EMSGSIZE;
        total += PART_HDR + lens[i];
    }
    p = malloc(total);
    if (p == NULL)
        return -ENOMEM;
    memcpy(p, batch_magic, 4);
    put_be32(p + 4, (uint32_t)n);
    off = BATCH_HDR;
    for (size_t i = 0; i < n; i++) {
        put_be32(p + off, (uint32_t)lens[i]);
        memset(p + off + 4, 0, 4);
        memcpy(p + off + PART_HDR, parts[i], lens[i]);
        off += PART_HDR + lens[i];
    }
    *out = p;
    *out_len = total;
    return 0;
}

/* The container's shape, before any part is looked at. */
static int
batch_check(const unsigned char *p, size_t len, uint32_t *count, char *err,
            size_t errlen)
{
    size_t off = BATCH_HDR;
    uint32_t n;

    if (!fsm_batch_is(p, len) || len % FSM_CMD_ALIGN != 0) {
        snprintf(err, errlen, "not a padded batch (%zu bytes)", len);
        return -EPROTO;
    }
    n = get_be32(p + 4);
    if (n == 0 || n > FSM_BATCH_MAX) {
        snprintf(err, errlen, "batch of %u parts", n);
        return -EPROTO;
    }
    for (uint32_t i = 0; i < n; i++) {
        size_t plen;

        if (len - off < PART_HDR) {
            snprintf(err, errlen, "part %u: truncated header", i);
            return -EPROTO;
        }
        plen = get_be32(p + off);
        if (plen == 0 || plen % FSM_CMD_ALIGN != 0 ||
            get_be32(p + off + 4) != 0 || plen > len - off - PART_HDR) {
            snprintf(err, errlen, "part %u: bad length %zu", i, plen);
            return -EPROTO;
        }
        off += PART_HDR + plen;
    }
    if (off != len) {
        snprintf(err, errlen, "%zu bytes after the last part", len - off);
        return -EPROTO;
    }
    *count = n;
    return 0;
}

int
fsm_batch_each(const void *buf, size_t len,
               int (*fn)(void *arg, const void *part, size_t part_len),
               void *arg, char *err, size_t errlen)
{
    const unsigned char *p = buf;
    size_t off = BATCH_HDR;
    uint32_t n;
    int rv;

    rv = batch_check(p, len, &n, err, errlen);
    if (rv != 0)
        return rv;
    for (uint32_t i = 0; i < n; i++) {
        size_t plen = get_be32(p + off);

        rv = fn(arg, p + off + PART_HDR, plen);
        if (rv != 0)
            return rv;
        off += PART_HDR + plen;
    }
    return 0;
}
