/*
 * libFuzzer target for the Raft command decoder (raft/cmd.c), and for the
 * FSM behind it: every member applies whatever a log holds, so a command
 * that decodes must apply without a crash too.
 *
 * The first input byte picks the mode. 2 or 3: the rest is a sequence
 * of records (see sequence()) applied to a fresh FSM. Otherwise bit 0
 * picks the framing of one entry: clear, the rest is a whole entry
 * (length prefix and padding are the fuzzer's to get right); set, the
 * rest is the msgpack body and the harness adds a correct prefix and
 * padding, so mutations reach the fields instead of dying at the frame.
 *
 * On a successful decode the command is encoded again: that must succeed
 * and decode to the same bytes (the codec is a bijection on what it
 * accepts). A single entry is applied to two long-lived FSMs, replaced
 * every RESET_EVERY inputs to bound their memory: after each command the
 * capacity index must mirror the nodes table, and the two FSMs must give
 * the same result and, checked every 64 inputs, the same dump.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "raft/cmd.h"
#include "raft/fsm.h"

#define RESET_EVERY 2000

/* Two FSMs fed the same entries: they must stay equal (determinism).
 * Sequences get their own FSM, so the long-lived pair keeps its state. */
static struct fsm *live, *live_mirror, *seq_fsm;
static unsigned runs;

static unsigned char *
wrap(const uint8_t *body, size_t n, size_t *len)
{
    size_t padded = (4 + n + FSM_CMD_ALIGN - 1) / FSM_CMD_ALIGN * FSM_CMD_ALIGN;
    unsigned char *p = calloc(1, padded);

    if (p == NULL)
        abort();
    p[0] = (unsigned char)(n >> 24);
    p[1] = (unsigned char)(n >> 16);
    p[2] = (unsigned char)(n >> 8);
    p[3] = (unsigned char)n;
    memcpy(p + 4, body, n);
    *len = padded;
    return p;
}

static void
check_round_trip(const struct fsm_cmd *c)
{
    struct fsm_cmd d;
    void *a, *b;
    size_t alen, blen;
    char err[256];

    if (fsm_cmd_encode(c, &a, &alen) != 0)
        abort(); /* what decodes must encode */
    if (alen % FSM_CMD_ALIGN != 0 ||
        fsm_cmd_decode(a, alen, &d, err, sizeof(err)) != 0)
        abort();
    if (fsm_cmd_encode(&d, &b, &blen) != 0 || blen != alen ||
        memcmp(a, b, alen) != 0)
        abort();
    free(a);
    free(b);
    fsm_cmd_free(&d);
}

/* The capacity index mirrors the nodes table after every command. */
static void
check_index(struct fsm *f)
{
    const struct fsm_node_index *idx = fsm_node_index(f);
    struct fsm_node *v;
    size_t n;

    if (fsm_node_list(f, &v, &n) != 0 || n != idx->n)
        abort();
    for (size_t i = 0; i < n; i++) {
        const struct fsm_node_cap *c = &idx->v[i];

        if (strcmp(c->id, v[i].id) != 0 || c->cpus != v[i].cpus ||
            c->alloc_cpus != v[i].alloc_cpus ||
            c->alloc_memory_mb != v[i].alloc_memory_mb ||
            c->alloc_disk_mb != v[i].alloc_disk_mb ||
            c->ready != (v[i].state == FSM_NODE_READY) ||
            c->draining != v[i].draining || c->labels == NULL)
            abort();
    }
    fsm_nodes_free(v, n);
}

static void
check_same(struct fsm *fsm, struct fsm *mirror)
{
    char *a, *b;

    if (fsm_dump(fsm, &a) != 0 || fsm_dump(mirror, &b) != 0 ||
        strcmp(a, b) != 0)
        abort();
    free(a);
    free(b);
}

/* Replaces *a (and *b, when not NULL) with empty FSMs. */
static void
reset(struct fsm **a, struct fsm **b)
{
    char err[256];

    fsm_free(*a);
    if (fsm_new(a, err, sizeof(err)) != 0)
        abort();
    if (b == NULL)
        return;
    fsm_free(*b);
    if (fsm_new(b, err, sizeof(err)) != 0)
        abort();
}

static void
apply(struct fsm *fsm, struct fsm *mirror, const void *entry, size_t len)
{
    struct fsm_result res, res2;

    /* Only sqlite running out of memory may fail. */
    if (fsm_apply_buf(fsm, entry, len, &res) != 0)
        abort();
    check_index(fsm);
    if (mirror == NULL)
        return;
    if (fsm_apply_buf(mirror, entry, len, &res2) != 0 ||
        res.code != res2.code || strcmp(res.message, res2.message) != 0)
        abort();
}

/* Decodes, checks and applies one entry (owned by the caller). */
static void
one(struct fsm *a, struct fsm *b, const unsigned char *entry, size_t len)
{
    struct fsm_cmd c;
    char err[256];

    if (fsm_cmd_decode(entry, len, &c, err, sizeof(err)) != 0)
        return;
    check_round_trip(&c);
    fsm_cmd_free(&c);
    apply(a, b, entry, len);
}

/* Records of [2-byte big-endian length][body], each framed by wrap(),
 * applied in order to a fresh FSM: a whole history in one input, so a
 * crash reproduces from its input alone. (One FSM only, as creating one
 * costs milliseconds; determinism is checked by the other mode.) */
static void
sequence(const uint8_t *p, size_t n)
{
    reset(&seq_fsm, NULL);
    while (n >= 2) {
        size_t rec = (size_t)p[0] << 8 | p[1], len;
        unsigned char *entry;

        p += 2;
        n -= 2;
        if (rec > n)
            rec = n;
        entry = wrap(p, rec, &len);
        one(seq_fsm, NULL, entry, len);
        free(entry);
        p += rec;
        n -= rec;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    unsigned char *entry;
    size_t len;

    if (size < 1)
        return 0;
    if ((data[0] & 0xfe) == 2) {
        sequence(data + 1, size - 1);
        return 0;
    }
    if (live == NULL || ++runs % RESET_EVERY == 0)
        reset(&live, &live_mirror);
    if (data[0] & 1) {
        entry = wrap(data + 1, size - 1, &len);
    } else {
        /* An exact-size copy, so ASan sees any over-read. */
        len = size - 1;
        entry = malloc(len + 1);
        if (entry == NULL)
            abort();
        memcpy(entry, data + 1, len);
    }
    one(live, live_mirror, entry, len);
    if (runs % 64 == 0)
        check_same(live, live_mirror);
    free(entry);
    return 0;
}
