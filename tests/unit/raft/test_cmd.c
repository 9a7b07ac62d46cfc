/*
 * Raft command encoding (raft/cmd.c): every command type survives a round
 * trip byte for byte, every entry is padded to 8 bytes, and hostile entries
 * (cut at any offset, wrong types, oversized strings and lists, bad
 * padding) are rejected with an error, never a crash or an over-read.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <msgpack.h>

#include "raft/cmd.h"

/* ---- Building commands ------------------------------------------------- */

static struct fsm_kv *
kv_list(size_t n, const char *prefix)
{
    struct fsm_kv *kv = calloc(n + 1, sizeof(*kv));

    assert_non_null(kv);
    for (size_t i = 0; i < n; i++) {
        assert_true(asprintf(&kv[i].key, "%s%zu", prefix, i) > 0);
        assert_true(asprintf(&kv[i].value, "v%zu", i) > 0);
    }
    return kv;
}

/* A command of the given type with every field set to something that is
 * not a default, so a field the codec drops shows up in the comparison. */
static void
full_cmd(struct fsm_cmd *c, int type)
{
    assert_int_equal(fsm_cmd_init(c, type), 0);
    c->now_ms = 1700000000123ull;
    switch (type) {
    case FSM_CMD_MEMBER_SET:
        strcpy(c->u.member.raft_addr, "127.0.0.1:7001");
        strcpy(c->u.member.api_addr, "127.0.0.1:8001");
        strcpy(c->u.member.rpc_addr, "127.0.0.1:8101");
        strcpy(c->u.member.preview_addr, "127.0.0.1:8201");
        /* fall through */
    case FSM_CMD_MEMBER_REMOVE:
        c->u.member.id = 0x1122334455667788ull;
        break;
    case FSM_CMD_NODE_REGISTER:
        strcpy(c->u.node_register.node, "node-1");
        strcpy(c->u.node_register.rpc_addr, "127.0.0.1:9001");
        c->u.node_register.cpus = 64;
        c->u.node_register.memory_mb = 262144;
        c->u.node_register.disk_mb = 1ull << 40;
        c->u.node_register.labels = kv_list(3, "zone");
        c->u.node_register.n_labels = 3;
        break;
    case FSM_CMD_NODE_HEARTBEAT:
    case FSM_CMD_NODE_DOWN:
    case FSM_CMD_NODE_DRAIN:
        strcpy(c->u.node.node, "node-2");
        c->u.node.drain = true;
        strcpy(c->u.node.reason, "silent for 5 s");
        break;
    case FSM_CMD_SANDBOX_PLACE:
        strcpy(c->u.place.sandbox, "sb-1");
        strcpy(c->u.place.tenant, "acme");
        strcpy(c->u.place.node, "node-1");
        c->u.place.replace = true;
        c->u.place.spec.cpus = 2;
        c->u.place.spec.memory_mb = 2048;
        c->u.place.spec.disk_mb = 4096;
        strcpy(c->u.place.spec.egress, "all");
        c->u.place.spec.env = kv_list(2, "ENV");
        c->u.place.spec.n_env = 2;
        c->u.place.spec.labels = kv_list(1, "team");
        c->u.place.spec.n_labels = 1;
        break;
    case FSM_CMD_SANDBOX_STATE:
        strcpy(c->u.state.sandbox, "sb-1");
        c->u.state.state = FSM_SB_FAILED;
        strcpy(c->u.state.reason, "qemu exited with status 1");
        strcpy(c->u.state.node, "node-1");
        c->u.state.generation = 7;
        break;
    case FSM_CMD_SANDBOX_DELETE:
        strcpy(c->u.sandbox.sandbox, "sb-9");
        break;
    case FSM_CMD_PORT_EXPOSE:
        for (int i = 0; i < FSM_TOKEN_HASH_LEN; i++)
            c->u.port.token_hash[i] = (unsigned char)(i * 7 + 1);
        /* fall through */
    case FSM_CMD_PORT_UNEXPOSE:
        strcpy(c->u.port.sandbox, "sb-1");
        c->u.port.port = 8080;
        break;
    case FSM_CMD_TOKEN_CREATE:
    case FSM_CMD_TOKEN_REVOKE:
    case FSM_CMD_BOOTSTRAP_ADMIN:
        strcpy(c->u.token.jti, "jti-0123456789");
        strcpy(c->u.token.tenant, "acme");
        strcpy(c->u.token.role, "tenant");
        c->u.token.exp_ms = 1800000000000ull;
        break;
    case FSM_CMD_TOKEN_GC:
        break;
    case FSM_CMD_KEY_ADD:
        c->u.key.public_pem = strdup("-----BEGIN PUBLIC KEY-----\nAAAA\n");
        c->u.key.private_pem = strdup("-----BEGIN PRIVATE KEY-----\nBB\n");
        /* fall through */
    case FSM_CMD_KEY_RETIRE:
        strcpy(c->u.key.kid, "k1");
        strcpy(c->u.key.alg, "ES256");
        break;
    default:
        fail_msg("no builder for type %d", type);
    }
}

static void
encode_ok(const struct fsm_cmd *c, void **buf, size_t *len)
{
    assert_int_equal(fsm_cmd_encode(c, buf, len), 0);
    assert_true(*len > 4);
    assert_int_equal(*len % FSM_CMD_ALIGN, 0);
}

static int
decode(const void *buf, size_t len, struct fsm_cmd *out)
{
    char err[256] = "";
    int rv = fsm_cmd_decode(buf, len, out, err, sizeof(err));

    if (rv != 0) {
        static const struct fsm_cmd zero;

        assert_true(err[0] != '\0'); /* a failure always says why */
        assert_memory_equal(out, &zero, sizeof(zero));
    }
    return rv;
}

/* ---- Hand-made entries ------------------------------------------------- */

/*
 * A msgpack body under construction, for entries the encoder would never
 * produce. raw_entry adds the length prefix and the zero padding.
 */
struct raw {
    msgpack_sbuffer sb;
    msgpack_packer pk;
};

static void
raw_init(struct raw *r, uint32_t nfields)
{
    msgpack_sbuffer_init(&r->sb);
    msgpack_packer_init(&r->pk, &r->sb, msgpack_sbuffer_write);
    msgpack_pack_map(&r->pk, nfields);
}

static void
raw_key(struct raw *r, const char *k)
{
    msgpack_pack_str(&r->pk, strlen(k));
    msgpack_pack_str_body(&r->pk, k, strlen(k));
}

static void
raw_str(struct raw *r, const char *k, const char *v, size_t n)
{
    raw_key(r, k);
    msgpack_pack_str(&r->pk, n);
    msgpack_pack_str_body(&r->pk, v, n);
}

static void
raw_u64(struct raw *r, const char *k, uint64_t v)
{
    raw_key(r, k);
    msgpack_pack_uint64(&r->pk, v);
}

static void
raw_bin(struct raw *r, const char *k, const void *v, size_t n)
{
    raw_key(r, k);
    msgpack_pack_bin(&r->pk, n);
    msgpack_pack_bin_body(&r->pk, v, n);
}

/* The common header: t, id, rid, now (4 fields). */
static void
raw_header(struct raw *r, uint32_t nbody, uint64_t type)
{
    static const unsigned char rid[FSM_RID_LEN] = {1, 2, 3};

    raw_init(r, 4 + nbody);
    raw_u64(r, "t", type);
    raw_u64(r, "id", 0);
    raw_bin(r, "rid", rid, sizeof(rid));
    raw_u64(r, "now", 1);
}

static unsigned char *
entry_of(const void *body, size_t n, size_t *len)
{
    size_t padded = (4 + n + FSM_CMD_ALIGN - 1) / FSM_CMD_ALIGN * FSM_CMD_ALIGN;
    unsigned char *p = calloc(1, padded);

    assert_non_null(p);
    p[0] = (unsigned char)(n >> 24);
    p[1] = (unsigned char)(n >> 16);
    p[2] = (unsigned char)(n >> 8);
    p[3] = (unsigned char)n;
    memcpy(p + 4, body, n);
    *len = padded;
    return p;
}

static unsigned char *
raw_entry(struct raw *r, size_t *len)
{
    unsigned char *p = entry_of(r->sb.data, r->sb.size, len);

    msgpack_sbuffer_destroy(&r->sb);
    return p;
}

/* Decodes a hand-made entry and expects rv. */
static void
expect_raw(struct raw *r, int rv)
{
    struct fsm_cmd c;
    size_t len;
    unsigned char *p = raw_entry(r, &len);

    assert_int_equal(decode(p, len, &c), rv);
    if (rv == 0)
        fsm_cmd_free(&c);
    free(p);
}

/* ---- Round trips ------------------------------------------------------- */

/* Every type encodes to a padded entry that decodes to the same command:
 * re-encoding the decoded command gives the same bytes. */
static void
test_round_trip_every_type(void **state)
{
    (void)state;
    for (int t = 1; t <= FSM_CMD_TYPE_MAX; t++) {
        struct fsm_cmd c, d;
        void *a, *b;
        size_t alen, blen;

        full_cmd(&c, t);
        encode_ok(&c, &a, &alen);
        assert_int_equal(decode(a, alen, &d), 0);
        assert_int_equal(d.type, t);
        assert_memory_equal(d.rid.b, c.rid.b, FSM_RID_LEN);
        assert_int_equal(d.now_ms, c.now_ms);
        encode_ok(&d, &b, &blen);
        assert_int_equal(blen, alen);
        assert_memory_equal(a, b, alen);
        assert_string_not_equal(fsm_cmd_name(t), "UNKNOWN");
        free(a);
        free(b);
        fsm_cmd_free(&d);
        fsm_cmd_free(&c);
    }
}

/* The fields of the richest command, one by one. */
static void
test_round_trip_place_fields(void **state)
{
    struct fsm_cmd c, d;
    void *buf;
    size_t len;

    (void)state;
    full_cmd(&c, FSM_CMD_SANDBOX_PLACE);
    encode_ok(&c, &buf, &len);
    assert_int_equal(decode(buf, len, &d), 0);
    assert_string_equal(d.u.place.sandbox, "sb-1");
    assert_string_equal(d.u.place.tenant, "acme");
    assert_string_equal(d.u.place.node, "node-1");
    assert_true(d.u.place.replace);
    assert_int_equal(d.u.place.spec.cpus, 2);
    assert_int_equal(d.u.place.spec.memory_mb, 2048);
    assert_int_equal(d.u.place.spec.disk_mb, 4096);
    assert_string_equal(d.u.place.spec.egress, "all");
    assert_int_equal(d.u.place.spec.n_env, 2);
    assert_string_equal(d.u.place.spec.env[1].key, "ENV1");
    assert_string_equal(d.u.place.spec.env[1].value, "v1");
    assert_int_equal(d.u.place.spec.n_labels, 1);
    assert_string_equal(d.u.place.spec.labels[0].key, "team0");
    free(buf);
    fsm_cmd_free(&d);
    fsm_cmd_free(&c);
}

/* Strings and lists at their largest allowed sizes still round-trip. */
static void
test_round_trip_limits(void **state)
{
    struct fsm_cmd c, d;
    void *buf;
    size_t len;

    (void)state;
    full_cmd(&c, FSM_CMD_SANDBOX_PLACE);
    memset(c.u.place.sandbox, 'a', FSM_ID_MAX);
    c.u.place.sandbox[FSM_ID_MAX] = '\0';
    memset(c.u.place.spec.egress, 'e', FSM_EGRESS_MAX);
    c.u.place.spec.egress[FSM_EGRESS_MAX] = '\0';
    fsm_kv_free(c.u.place.spec.env, c.u.place.spec.n_env);
    c.u.place.spec.env = kv_list(FSM_KV_MAX, "K");
    c.u.place.spec.n_env = FSM_KV_MAX;
    free(c.u.place.spec.env[0].value);
    c.u.place.spec.env[0].value = malloc(FSM_VALUE_MAX + 1);
    memset(c.u.place.spec.env[0].value, 'x', FSM_VALUE_MAX);
    c.u.place.spec.env[0].value[FSM_VALUE_MAX] = '\0';
    encode_ok(&c, &buf, &len);
    assert_int_equal(decode(buf, len, &d), 0);
    assert_int_equal(d.u.place.spec.n_env, FSM_KV_MAX);
    assert_int_equal(strlen(d.u.place.spec.env[0].value), FSM_VALUE_MAX);
    assert_int_equal(strlen(d.u.place.sandbox), FSM_ID_MAX);
    free(buf);
    fsm_cmd_free(&d);
    fsm_cmd_free(&c);
}

/* ---- Encoder refusals -------------------------------------------------- */

static void
test_encode_refusals(void **state)
{
    struct fsm_cmd c;
    void *buf = NULL;
    size_t len;
    char *v;

    (void)state;
    /* Unknown type. */
    assert_int_equal(fsm_cmd_init(&c, 0), 0);
    assert_int_equal(fsm_cmd_encode(&c, &buf, &len), -EINVAL);
    c.type = FSM_CMD_TYPE_MAX + 1;
    assert_int_equal(fsm_cmd_encode(&c, &buf, &len), -EINVAL);

    /* Too many entries in a list. */
    full_cmd(&c, FSM_CMD_NODE_REGISTER);
    fsm_kv_free(c.u.node_register.labels, c.u.node_register.n_labels);
    c.u.node_register.labels = kv_list(FSM_KV_MAX + 1, "k");
    c.u.node_register.n_labels = FSM_KV_MAX + 1;
    assert_int_equal(fsm_cmd_encode(&c, &buf, &len), -E2BIG);

    fsm_cmd_free(&c);

    /* A NULL string in a list, and a list pointer that is NULL. */
    full_cmd(&c, FSM_CMD_NODE_REGISTER);
    free(c.u.node_register.labels[0].value);
    c.u.node_register.labels[0].value = NULL;
    assert_int_equal(fsm_cmd_encode(&c, &buf, &len), -EINVAL);
    fsm_cmd_free(&c);
    full_cmd(&c, FSM_CMD_NODE_REGISTER);
    fsm_kv_free(c.u.node_register.labels, c.u.node_register.n_labels);
    c.u.node_register.labels = NULL;
    assert_int_equal(fsm_cmd_encode(&c, &buf, &len), -EINVAL);
    c.u.node_register.n_labels = 0;
    assert_int_equal(fsm_cmd_encode(&c, &buf, &len), 0);
    free(buf);

    /* A value the decoder would refuse is refused here already, so the
     * proposer learns it instead of every member logging a bad entry. */
    full_cmd(&c, FSM_CMD_SANDBOX_PLACE);
    v = malloc(FSM_VALUE_MAX + 2);
    memset(v, 'x', FSM_VALUE_MAX + 1);
    v[FSM_VALUE_MAX + 1] = '\0';
    free(c.u.place.spec.env[0].value);
    c.u.place.spec.env[0].value = v;
    assert_int_equal(fsm_cmd_encode(&c, &buf, &len), -ENAMETOOLONG);
    fsm_cmd_free(&c);

    /* KEY_ADD without its PEMs. */
    full_cmd(&c, FSM_CMD_KEY_ADD);
    free(c.u.key.private_pem);
    c.u.key.private_pem = NULL;
    assert_int_equal(fsm_cmd_encode(&c, &buf, &len), -EINVAL);
    fsm_cmd_free(&c);

    /* A PEM over FSM_PEM_MAX. */
    full_cmd(&c, FSM_CMD_KEY_ADD);
    free(c.u.key.public_pem);
    c.u.key.public_pem = malloc(FSM_PEM_MAX + 2);
    memset(c.u.key.public_pem, 'p', FSM_PEM_MAX + 1);
    c.u.key.public_pem[FSM_PEM_MAX + 1] = '\0';
    assert_int_equal(fsm_cmd_encode(&c, &buf, &len), -ENAMETOOLONG);
    fsm_cmd_free(&c);
}

/* ---- Hostile entries --------------------------------------------------- */

/* Every prefix of every entry fails, both as raw bytes and re-framed with
 * a consistent length prefix and padding (a body cut mid-value). */
static void
test_truncated_everywhere(void **state)
{
    (void)state;
    for (int t = 1; t <= FSM_CMD_TYPE_MAX; t++) {
        struct fsm_cmd c, d;
        unsigned char *buf;
        size_t len, body;

        full_cmd(&c, t);
        encode_ok(&c, (void **)&buf, &len);
        body = (size_t)buf[0] << 24 | (size_t)buf[1] << 16 |
               (size_t)buf[2] << 8 | buf[3];
        for (size_t cut = 0; cut < len; cut++) {
            unsigned char *copy = malloc(cut + 1);
            size_t elen;
            unsigned char *e;

            /* An exact-size copy, so ASan sees any over-read. */
            memcpy(copy, buf, cut);
            assert_int_not_equal(decode(copy, cut, &d), 0);
            free(copy);
            if (cut < 4 || cut - 4 >= body)
                continue;
            e = entry_of(buf + 4, cut - 4, &elen);
            assert_int_not_equal(decode(e, elen, &d), 0);
            free(e);
        }
        free(buf);
        fsm_cmd_free(&c);
    }
}

static void
test_padding(void **state)
{
    struct fsm_cmd c, d;
    unsigned char *buf, *big;
    size_t len, body;

    (void)state;
    /* A sandbox id whose entry needs padding. */
    full_cmd(&c, FSM_CMD_SANDBOX_DELETE);
    for (;;) {
        encode_ok(&c, (void **)&buf, &len);
        body = (size_t)buf[2] << 8 | buf[3];
        if (4 + body < len)
            break;
        free(buf);
        strcat(c.u.sandbox.sandbox, "x");
    }

    /* Non-zero padding. */
    buf[len - 1] = 1;
    assert_int_equal(decode(buf, len, &d), -EPROTO);
    buf[len - 1] = 0;
    assert_int_equal(decode(buf, len, &d), 0);

    /* Lengths that are not a multiple of 8. */
    assert_int_equal(decode(buf, len - 1, &d), -EPROTO);
    big = calloc(1, len + 16);
    memcpy(big, buf, len);
    assert_int_equal(decode(big, len + 1, &d), -EPROTO);

    /* Eight more zero bytes: padding is at most 7. */
    assert_int_equal(decode(big, len + 8, &d), -EPROTO);

    /* A length prefix of 0, and one beyond the entry. */
    memset(big, 0, 4);
    assert_int_equal(decode(big, len, &d), -EPROTO);
    big[0] = 0xff;
    assert_int_equal(decode(big, len, &d), -EPROTO);
    free(big);

    /* Bytes after the map but inside the length. */
    buf[3] = (unsigned char)(body + 1);
    assert_int_equal(decode(buf, len, &d), -EPROTO);
    free(buf);
    fsm_cmd_free(&c);
}

static void
test_wrong_types(void **state)
{
    struct raw r;

    (void)state;
    /* "t" as a string. */
    raw_init(&r, 4);
    raw_str(&r, "t", "1", 1);
    raw_u64(&r, "id", 0);
    raw_bin(&r, "rid", "0123456789abcdef", 16);
    raw_u64(&r, "now", 1);
    expect_raw(&r, -EPROTO);

    /* Unknown types. */
    raw_header(&r, 0, 0);
    expect_raw(&r, -EPROTO);
    raw_header(&r, 0, FSM_CMD_TYPE_MAX + 1);
    expect_raw(&r, -EPROTO);
    raw_header(&r, 0, 1ull << 40);
    expect_raw(&r, -EPROTO);

    /* TOKEN_GC has no body: the header alone decodes. */
    raw_header(&r, 0, FSM_CMD_TOKEN_GC);
    expect_raw(&r, 0);

    /* rid of the wrong length, and as an integer. */
    raw_init(&r, 4);
    raw_u64(&r, "t", FSM_CMD_TOKEN_GC);
    raw_u64(&r, "id", 0);
    raw_bin(&r, "rid", "short", 5);
    raw_u64(&r, "now", 1);
    expect_raw(&r, -EPROTO);
    raw_init(&r, 4);
    raw_u64(&r, "t", FSM_CMD_TOKEN_GC);
    raw_u64(&r, "id", 0);
    raw_u64(&r, "rid", 16);
    raw_u64(&r, "now", 1);
    expect_raw(&r, -EPROTO);

    /* A missing field. */
    raw_header(&r, 0, FSM_CMD_SANDBOX_DELETE);
    expect_raw(&r, -EPROTO);

    /* A string field given as an integer. */
    raw_header(&r, 1, FSM_CMD_SANDBOX_DELETE);
    raw_u64(&r, "sandbox", 5);
    expect_raw(&r, -EPROTO);

    /* A number given as a string; a negative number for a u64. */
    raw_header(&r, 2, FSM_CMD_PORT_UNEXPOSE);
    raw_str(&r, "sandbox", "sb", 2);
    raw_str(&r, "port", "80", 2);
    expect_raw(&r, -EPROTO);
    raw_header(&r, 2, FSM_CMD_PORT_UNEXPOSE);
    raw_str(&r, "sandbox", "sb", 2);
    raw_key(&r, "port");
    msgpack_pack_int64(&r.pk, -80);
    expect_raw(&r, -EPROTO);

    /* A u32 field over 2^32 - 1. */
    raw_header(&r, 2, FSM_CMD_PORT_UNEXPOSE);
    raw_str(&r, "sandbox", "sb", 2);
    raw_u64(&r, "port", 1ull << 32);
    expect_raw(&r, -ERANGE);

    /* A state out of range. */
    raw_header(&r, 5, FSM_CMD_SANDBOX_STATE);
    raw_str(&r, "sandbox", "sb", 2);
    raw_u64(&r, "state", FSM_SB_NSTATES);
    raw_str(&r, "reason", "", 0);
    raw_str(&r, "node", "", 0);
    raw_u64(&r, "gen", 0);
    expect_raw(&r, -EPROTO);

    /* A token hash that is not 32 bytes. */
    raw_header(&r, 3, FSM_CMD_PORT_EXPOSE);
    raw_bin(&r, "hash", "abc", 3);
    raw_str(&r, "sandbox", "sb", 2);
    raw_u64(&r, "port", 80);
    expect_raw(&r, -EPROTO);

    /* A bool given as an integer. */
    raw_header(&r, 3, FSM_CMD_NODE_DRAIN);
    raw_str(&r, "node", "n1", 2);
    raw_u64(&r, "drain", 1);
    raw_str(&r, "reason", "", 0);
    expect_raw(&r, -EPROTO);

    /* The root is an array, not a map. */
    msgpack_sbuffer_init(&r.sb);
    msgpack_packer_init(&r.pk, &r.sb, msgpack_sbuffer_write);
    msgpack_pack_array(&r.pk, 1);
    msgpack_pack_uint64(&r.pk, 1);
    expect_raw(&r, -EPROTO);
}

static void
test_oversized(void **state)
{
    char big[FSM_PEM_MAX + 2];
    struct raw r;

    (void)state;
    memset(big, 'a', sizeof(big));

    /* A sandbox id one byte over its array. */
    raw_header(&r, 1, FSM_CMD_SANDBOX_DELETE);
    raw_str(&r, "sandbox", big, FSM_ID_MAX + 1);
    expect_raw(&r, -ENAMETOOLONG);
    raw_header(&r, 1, FSM_CMD_SANDBOX_DELETE);
    raw_str(&r, "sandbox", big, FSM_ID_MAX);
    expect_raw(&r, 0);

    /* An embedded NUL. */
    raw_header(&r, 1, FSM_CMD_SANDBOX_DELETE);
    raw_str(&r, "sandbox", "a\0b", 3);
    expect_raw(&r, -EINVAL);

    /* PEMs over FSM_PEM_MAX. */
    raw_header(&r, 4, FSM_CMD_KEY_ADD);
    raw_str(&r, "pub", big, FSM_PEM_MAX + 1);
    raw_str(&r, "priv", "p", 1);
    raw_str(&r, "kid", "k", 1);
    raw_str(&r, "alg", "ES256", 5);
    expect_raw(&r, -ENAMETOOLONG);
    raw_header(&r, 4, FSM_CMD_KEY_ADD);
    raw_str(&r, "pub", "p", 1);
    raw_str(&r, "priv", big, FSM_PEM_MAX + 1);
    raw_str(&r, "kid", "k", 1);
    raw_str(&r, "alg", "ES256", 5);
    expect_raw(&r, -ENAMETOOLONG);
}

/* A NODE_REGISTER whose labels are built by the caller. */
static void
raw_register(struct raw *r)
{
    raw_header(r, 6, FSM_CMD_NODE_REGISTER);
    raw_str(r, "node", "n1", 2);
    raw_str(r, "rpc", "127.0.0.1:1", 11);
    raw_u64(r, "cpus", 1);
    raw_u64(r, "mem", 1);
    raw_u64(r, "disk", 1);
    raw_key(r, "labels");
}

static void
test_kv_lists(void **state)
{
    char big[FSM_VALUE_MAX + 2];
    struct raw r;

    (void)state;
    memset(big, 'v', sizeof(big));

    /* Too many entries: refused from the count, before any allocation. */
    raw_register(&r);
    msgpack_pack_array(&r.pk, FSM_KV_MAX + 1);
    for (int i = 0; i <= FSM_KV_MAX; i++) {
        msgpack_pack_array(&r.pk, 2);
        msgpack_pack_str(&r.pk, 1);
        msgpack_pack_str_body(&r.pk, "k", 1);
        msgpack_pack_str(&r.pk, 1);
        msgpack_pack_str_body(&r.pk, "v", 1);
    }
    expect_raw(&r, -E2BIG);

    /* An array32 header claiming 2^32 - 1 entries (DESIGN.md 9). */
    raw_register(&r);
    msgpack_pack_array(&r.pk, UINT32_MAX);
    expect_raw(&r, -EPROTO);

    /* A pair that is not a pair. */
    raw_register(&r);
    msgpack_pack_array(&r.pk, 1);
    msgpack_pack_array(&r.pk, 3);
    for (int i = 0; i < 3; i++) {
        msgpack_pack_str(&r.pk, 1);
        msgpack_pack_str_body(&r.pk, "k", 1);
    }
    expect_raw(&r, -EPROTO);
    raw_register(&r);
    msgpack_pack_array(&r.pk, 1);
    msgpack_pack_str(&r.pk, 1);
    msgpack_pack_str_body(&r.pk, "k", 1);
    expect_raw(&r, -EPROTO);

    /* A key that is an integer; a value that is nil. */
    raw_register(&r);
    msgpack_pack_array(&r.pk, 1);
    msgpack_pack_array(&r.pk, 2);
    msgpack_pack_uint64(&r.pk, 1);
    msgpack_pack_str(&r.pk, 1);
    msgpack_pack_str_body(&r.pk, "v", 1);
    expect_raw(&r, -EPROTO);
    raw_register(&r);
    msgpack_pack_array(&r.pk, 1);
    msgpack_pack_array(&r.pk, 2);
    msgpack_pack_str(&r.pk, 1);
    msgpack_pack_str_body(&r.pk, "k", 1);
    msgpack_pack_nil(&r.pk);
    expect_raw(&r, -EPROTO);

    /* A value one byte over FSM_VALUE_MAX, after a good entry (the good
     * entry's strings must be freed: ASan checks). */
    raw_register(&r);
    msgpack_pack_array(&r.pk, 2);
    msgpack_pack_array(&r.pk, 2);
    msgpack_pack_str(&r.pk, 1);
    msgpack_pack_str_body(&r.pk, "a", 1);
    msgpack_pack_str(&r.pk, 1);
    msgpack_pack_str_body(&r.pk, "b", 1);
    msgpack_pack_array(&r.pk, 2);
    msgpack_pack_str(&r.pk, 1);
    msgpack_pack_str_body(&r.pk, "k", 1);
    msgpack_pack_str(&r.pk, FSM_VALUE_MAX + 1);
    msgpack_pack_str_body(&r.pk, big, FSM_VALUE_MAX + 1);
    expect_raw(&r, -ENAMETOOLONG);

    /* A key over FSM_KEY_MAX. */
    raw_register(&r);
    msgpack_pack_array(&r.pk, 1);
    msgpack_pack_array(&r.pk, 2);
    msgpack_pack_str(&r.pk, FSM_KEY_MAX + 1);
    msgpack_pack_str_body(&r.pk, big, FSM_KEY_MAX + 1);
    msgpack_pack_str(&r.pk, 1);
    msgpack_pack_str_body(&r.pk, "v", 1);
    expect_raw(&r, -ENAMETOOLONG);

    /* Labels given as a map. */
    raw_register(&r);
    msgpack_pack_map(&r.pk, 0);
    expect_raw(&r, -EPROTO);
}

/* Nesting deeper than the validator allows is refused before msgpack-c
 * sees it. */
static void
test_deep_nesting(void **state)
{
    struct raw r;

    (void)state;
    raw_register(&r);
    for (int i = 0; i < 64; i++)
        msgpack_pack_array(&r.pk, 1);
    msgpack_pack_nil(&r.pk);
    expect_raw(&r, -EPROTO);
}

static void
test_names(void **state)
{
    char hex[2 * FSM_RID_LEN + 1];
    struct fsm_rid a, b;

    (void)state;
    assert_string_equal(fsm_cmd_name(FSM_CMD_SANDBOX_PLACE), "SANDBOX_PLACE");
    assert_string_equal(fsm_cmd_name(0), "UNKNOWN");
    assert_string_equal(fsm_cmd_name(FSM_CMD_TYPE_MAX + 1), "UNKNOWN");
    for (int s = 0; s < FSM_SB_NSTATES; s++)
        assert_int_equal(fsm_sandbox_state_parse(fsm_sandbox_state_name(s)), s);
    assert_string_equal(fsm_sandbox_state_name(-1), "unknown");
    assert_string_equal(fsm_sandbox_state_name(FSM_SB_NSTATES), "unknown");
    assert_int_equal(fsm_sandbox_state_parse("unknown"), -EINVAL);
    assert_int_equal(fsm_sandbox_state_parse(""), -EINVAL);

    assert_int_equal(fsm_rid_new(&a), 0);
    assert_int_equal(fsm_rid_new(&b), 0);
    assert_memory_not_equal(a.b, b.b, FSM_RID_LEN);
    fsm_rid_hex(&a, hex);
    assert_int_equal(strlen(hex), 2 * FSM_RID_LEN);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip_every_type),
        cmocka_unit_test(test_round_trip_place_fields),
        cmocka_unit_test(test_round_trip_limits),
        cmocka_unit_test(test_encode_refusals),
        cmocka_unit_test(test_truncated_everywhere),
        cmocka_unit_test(test_padding),
        cmocka_unit_test(test_wrong_types),
        cmocka_unit_test(test_oversized),
        cmocka_unit_test(test_kv_lists),
        cmocka_unit_test(test_deep_nesting),
        cmocka_unit_test(test_names),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
