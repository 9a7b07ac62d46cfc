/*
 * Per-key token buckets for the API (keyed by token jti) and the preview
 * listener (keyed by client address, to slow down token guessing).
 *
 * Each key has a bucket of `burst` tokens refilled at `rate` tokens per
 * second; a request takes one token or is refused with the number of whole
 * seconds after which one will be there (the 429's Retry-After).
 *
 * Memory is bounded: the table holds at most max_keys buckets, allocated
 * once. When it is full, a new key takes the slot of the least recently
 * used bucket. A bucket untouched for burst / rate seconds is full again
 * and forgetting it loses nothing; forgetting a younger one forgives that
 * key's debt, so size max_keys above the number of keys active within
 * that window (64 bytes of key plus ~60 bytes per slot). A flood of
 * distinct keys can push other keys out but never grows memory; callers
 * that face unauthenticated keys add a second limiter with a single global
 * key. Keys hash with SipHash-2-4 under a random key, so chains cannot be
 * made long on purpose.
 *
 * Time is passed in by the caller (monotonic milliseconds, pd_now_ms()), so
 * tests drive a fake clock. Not thread-safe: one per event loop.
 */
#ifndef SCHED_RATELIMIT_H
#define SCHED_RATELIMIT_H

#include <stddef.h>
#include <stdint.h>

/* Longer keys are cut to this many bytes (a jti or an IPv6 text fits). */
#define SCHED_RL_KEY_MAX 64

struct sched_ratelimit;

/*
 * rate_per_s > 0 (fractions allowed: 0.5 is one per two seconds),
 * burst >= 1, max_keys >= 1. -EINVAL otherwise, -ENOMEM.
 */
int sched_ratelimit_new(double rate_per_s, unsigned burst, size_t max_keys,
                        struct sched_ratelimit **out);
void sched_ratelimit_free(struct sched_ratelimit *rl);

/*
 * Takes one token from key's bucket at now_ms. Returns 0 when the request
 * may go on, otherwise the seconds (>= 1) to put in Retry-After. A clock
 * that goes backwards refills nothing and never underflows.
 */
unsigned sched_ratelimit_take(struct sched_ratelimit *rl, const char *key,
                              uint64_t now_ms);

/*
 * Like take, without taking: 0 when a token is there, else the seconds to
 * wait. For limits on failures (the preview listener counts wrong guesses
 * with take and refuses a client whose bucket is empty before it looks at
 * the next guess).
 */
unsigned sched_ratelimit_peek(const struct sched_ratelimit *rl,
                              const char *key, uint64_t now_ms);

/* Buckets in use, and buckets evicted so far (for /metrics). */
size_t sched_ratelimit_size(const struct sched_ratelimit *rl);
uint64_t sched_ratelimit_evictions(const struct sched_ratelimit *rl);

#endif
