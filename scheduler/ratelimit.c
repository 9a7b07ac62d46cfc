/*
 * Token buckets in a fixed table: an open hash with chaining over a slot
 * array, plus a doubly linked LRU list through the same slots. Nothing is
 * allocated after sched_ratelimit_new.
 */
#include "scheduler/ratelimit.h"

#include <errno.h>
#include <math.h> /* isfinite is a macro: no libm needed */
#include <stdlib.h>
#include <string.h>

#include "common/util.h"

#define NIL UINT32_MAX

struct slot {
    char key[SCHED_RL_KEY_MAX];
    uint8_t key_len;
    uint32_t hnext;                   /* next in the hash chain */
    uint32_t prev, next;              /* LRU list, head = most recent */
    double tokens;
    uint64_t last_ms;
};

struct sched_ratelimit {
    double rate_ms;                   /* tokens per millisecond */
    double burst;
    uint32_t nslots, nused;
    uint32_t nbuckets;                /* power of two */
    struct slot *slots;
    uint32_t *buckets;                /* heads of the hash chains */
    uint32_t lru_head, lru_tail;
    uint64_t sip[2];
    uint64_t evictions;
};

/* --- SipHash-2-4 (Aumasson and Bernstein), over the key bytes --------- */

#define ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))

static void
sip_round(uint64_t v[4])
{
    v[0] += v[1];
    v[1] = ROTL(v[1], 13);
    v[1] ^= v[0];
    v[0] = ROTL(v[0], 32);
    v[2] += v[3];
    v[3] = ROTL(v[3], 16);
    v[3] ^= v[2];
    v[0] += v[3];
    v[3] = ROTL(v[3], 21);
    v[3] ^= v[0];
    v[2] += v[1];
    v[1] = ROTL(v[1], 17);
    v[1] ^= v[2];
    v[2] = ROTL(v[2], 32);
}

static uint64_t
load_le64(const unsigned char *p)
{
    uint64_t x = 0;

    for (int i = 7; i >= 0; i--)
        x = x << 8 | p[i];
    return x;
}

static uint64_t
siphash(const uint64_t k[2], const void *data, size_t len)
{
    const unsigned char *p = data;
    uint64_t v[4] = {
        k[0] ^ 0x736f6d6570736575ULL, k[1] ^ 0x646f72616e646f6dULL,
        k[0] ^ 0x6c7967656e657261ULL, k[1] ^ 0x7465646279746573ULL,
    };
    unsigned char last[8] = {0};
    size_t whole = len & ~(size_t)7;
    uint64_t m;

    for (size_t i = 0; i < whole; i += 8) {
        m = load_le64(p + i);
        v[3] ^= m;
        sip_round(v);
        sip_round(v);
        v[0] ^= m;
    }
    memcpy(last, p + whole, len - whole);
    last[7] = (unsigned char)len;
    m = load_le64(last);
    v[3] ^= m;
    sip_round(v);
    sip_round(v);
    v[0] ^= m;
    v[2] ^= 0xff;
    for (int i = 0; i < 4; i++)
        sip_round(v);
    return v[0] ^ v[1] ^ v[2] ^ v[3];
}

/* --- table --------------------------------------------------------------- */

int
sched_ratelimit_new(double rate_per_s, unsigned burst, size_t max_keys,
                    struct sched_ratelimit **out)
{
    struct sched_ratelimit *rl;
    uint32_t nb = 1;
    int rc;

    if (!(rate_per_s > 0) || !isfinite(rate_per_s) || burst == 0 ||
        max_keys == 0 || max_keys >= (1u << 30))
        return -EINVAL;
    while (nb < max_keys)
        nb <<= 1;

    rl = calloc(1, sizeof(*rl));
    if (rl == NULL)
        return -ENOMEM;
    rl->rate_ms = rate_per_s / 1000.0;
    rl->burst = burst;
    rl->nslots = (uint32_t)max_keys;
    rl->nbuckets = nb;
    rl->slots = calloc(max_keys, sizeof(*rl->slots));
    rl->buckets = malloc(nb * sizeof(*rl->buckets));
    if (rl->slots == NULL || rl->buckets == NULL) {
        sched_ratelimit_free(rl);
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < nb; i++)
        rl->buckets[i] = NIL;
    rl->lru_head = rl->lru_tail = NIL;
    rc = pd_random_bytes(rl->sip, sizeof(rl->sip));
    if (rc < 0) {
        sched_ratelimit_free(rl);
        return rc;
    }
    *out = rl;
    return 0;
}

void
sched_ratelimit_free(struct sched_ratelimit *rl)
{
    if (rl == NULL)
        return;
    free(rl->slots);
    free(rl->buckets);
    free(rl);
}

static void
lru_unlink(struct sched_ratelimit *rl, uint32_t i)
{
    struct slot *s = &rl->slots[i];

    if (s->prev != NIL)
        rl->slots[s->prev].next = s->next;
    else
        rl->lru_head = s->next;
    if (s->next != NIL)
        rl->slots[s->next].prev = s->prev;
    else
        rl->lru_tail = s->prev;
}

static void
lru_push_front(struct sched_ratelimit *rl, uint32_t i)
{
    struct slot *s = &rl->slots[i];

    s->prev = NIL;
    s->next = rl->lru_head;
    if (rl->lru_head != NIL)
        rl->slots[rl->lru_head].prev = i;
    rl->lru_head = i;
    if (rl->lru_tail == NIL)
        rl->lru_tail = i;
}

static uint32_t
bucket_of(const struct sched_ratelimit *rl, const char *key, size_t len)
{
    return (uint32_t)siphash(rl->sip, key, len) & (rl->nbuckets - 1);
}

/* Removes slot i from its hash chain. */
static void
chain_unlink(struct sched_ratelimit *rl, uint32_t i)
{
    struct slot *s = &rl->slots[i];
    uint32_t *pp = &rl->buckets[bucket_of(rl, s->key, s->key_len)];

    while (*pp != i)
        pp = &rl->slots[*pp].hnext;
    *pp = s->hnext;
}

/* A free slot, or the least recently used one, detached from both lists. */
static uint32_t
slot_take(struct sched_ratelimit *rl)
{
    uint32_t i;

    if (rl->nused < rl->nslots)
        return rl->nused++;
    i = rl->lru_tail;
    chain_unlink(rl, i);
    lru_unlink(rl, i);
    rl->evictions++;
    return i;
}

unsigned
sched_ratelimit_take(struct sched_ratelimit *rl, const char *key,
                     uint64_t now_ms)
{
    size_t len = strnlen(key, SCHED_RL_KEY_MAX);
    uint32_t b = bucket_of(rl, key, len);
    uint32_t i = rl->buckets[b];
    struct slot *s;
    double wait_s;

    while (i != NIL && !(rl->slots[i].key_len == len &&
                         memcmp(rl->slots[i].key, key, len) == 0))
        i = rl->slots[i].hnext;

    if (i == NIL) {
        i = slot_take(rl);
        s = &rl->slots[i];
        memcpy(s->key, key, len);
        s->key_len = (uint8_t)len;
        s->tokens = rl->burst;
        s->last_ms = now_ms;
        s->hnext = rl->buckets[b];
        rl->buckets[b] = i;
    } else {
        s = &rl->slots[i];
        lru_unlink(rl, i);
        if (now_ms > s->last_ms) {
            s->tokens += (double)(now_ms - s->last_ms) * rl->rate_ms;
            if (s->tokens > rl->burst)
                s->tokens = rl->burst;
            s->last_ms = now_ms;
        }
    }
    lru_push_front(rl, i);

    if (s->tokens >= 1.0) {
        s->tokens -= 1.0;
        return 0;
    }
    /* Rounded up by hand: no libm for one ceil(). */
    wait_s = (1.0 - s->tokens) / (rl->rate_ms * 1000.0);
    if (wait_s > 86400)
        return 86400;
    if (wait_s <= 1.0)
        return 1;
    return (unsigned)wait_s + ((double)(unsigned)wait_s < wait_s ? 1 : 0);
}

unsigned
sched_ratelimit_peek(const struct sched_ratelimit *rl, const char *key,
                     uint64_t now_ms)
{
    size_t len = strnlen(key, SCHED_RL_KEY_MAX);
    uint32_t i = rl->buckets[bucket_of(rl, key, len)];
    const struct slot *s;
    double tokens, wait_s;

    while (i != NIL && !(rl->slots[i].key_len == len &&
                         memcmp(rl->slots[i].key, key, len) == 0))
        i = rl->slots[i].hnext;
    if (i == NIL)
        return 0;
    s = &rl->slots[i];
    tokens = s->tokens;
    if (now_ms > s->last_ms)
        tokens += (double)(now_ms - s->last_ms) * rl->rate_ms;
    if (tokens >= 1.0)
        return 0;
    wait_s = (1.0 - tokens) / (rl->rate_ms * 1000.0);
    if (wait_s > 86400)
        return 86400;
    if (wait_s <= 1.0)
        return 1;
    return (unsigned)wait_s + ((double)(unsigned)wait_s < wait_s ? 1 : 0);
}

size_t
sched_ratelimit_size(const struct sched_ratelimit *rl)
{
    return rl->nused;
}

uint64_t
sched_ratelimit_evictions(const struct sched_ratelimit *rl)
{
    return rl->evictions;
}
