/*
 * The output log of a background process: a list of chunks with a byte
 * cap. Each chunk remembers its position (seq) in the whole output, so a
 * follower that fell behind the oldest kept chunk skips ahead instead of
 * blocking the process, and one that is caught up waits for new chunks.
 *
 * A program that writes line by line makes many small reads. They go into
 * the tail chunk while it holds the same stream, growing it (doubling, up
 * to RING_CHUNK_GROW), so the list stays short and a follower sends few,
 * large frames. The cap counts what the chunks cost (header and room), so
 * even alternating one-byte writes to stdout and stderr, one chunk each,
 * cannot grow memory past it.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "guest-agent/guest.h"

static size_t
cost(size_t room)
{
    return sizeof(struct ring_chunk) + room;
}

void
ring_init(struct ring *r, size_t cap)
{
    memset(r, 0, sizeof(*r));
    r->cap = cap;
}

void
ring_free(struct ring *r)
{
    while (r->head != NULL) {
        struct ring_chunk *c = r->head;

        r->head = c->next;
        free(c);
    }
    r->tail = r->tail_prev = NULL;
    r->bytes = 0;
}

/* Grows the tail chunk so that it has room for more bytes, when it may. */
static void
grow_tail(struct ring *r, size_t more, size_t max)
{
    struct ring_chunk *c = r->tail, *n;
    size_t room = c->room * 2;

    if (c->room >= RING_CHUNK_GROW || c->room - c->len >= more)
        return;
    if (room < c->len + more)
        room = c->len + more;
    if (room > RING_CHUNK_GROW)
        room = RING_CHUNK_GROW;
    if (room > max)
        room = max;
    if (room <= c->room)
        return;
    n = realloc(c, sizeof(*c) + room);
    if (n == NULL)
        return; /* the bytes go to a new chunk instead */
    r->bytes += room - n->room;
    n->room = (uint32_t)room;
    if (r->tail_prev != NULL)
        r->tail_prev->next = n;
    else
        r->head = n;
    r->tail = n;
}

static void
evict(struct ring *r)
{
    while (r->bytes > r->cap && r->head != r->tail) {
        struct ring_chunk *old = r->head;

        r->head = old->next;
        if (r->tail_prev == old)
            r->tail_prev = NULL;
        r->bytes -= cost(old->room);
        free(old);
    }
}

int
ring_append(struct ring *r, int stream, const void *data, size_t len)
{
    const unsigned char *p = data;
    struct ring_chunk *c = r->tail;
    size_t max = r->cap > cost(0) ? r->cap - cost(0) : 1;

    if (len == 0)
        return 0;
    /* A single write larger than the ring keeps only its tail. */
    if (len > max) {
        r->end += len - max;
        p += len - max;
        len = max;
    }
    /* Into the tail chunk first, as far as it holds the same stream and
     * has (or may grow) room; the rest opens a new chunk. */
    if (c != NULL && c->stream == stream) {
        size_t take;

        grow_tail(r, len, max);
        c = r->tail;
        take = c->room - c->len < len ? c->room - c->len : len;
        memcpy(c->data + c->len, p, take);
        c->len += (uint32_t)take;
        r->end += take;
        p += take;
        len -= take;
        if (len == 0) {
            evict(r);
            return 0;
        }
    }
    c = malloc(sizeof(*c) + len);
    if (c == NULL)
        return -ENOMEM;
    c->seq = r->end;
    c->len = (uint32_t)len;
    c->room = (uint32_t)len;
    c->stream = (uint8_t)stream;
    c->next = NULL;
    memcpy(c->data, p, len);
    r->tail_prev = r->tail;
    if (r->tail != NULL)
        r->tail->next = c;
    else
        r->head = c;
    r->tail = c;
    r->bytes += cost(len);
    r->end += len;
    evict(r);
    return 0;
}

uint64_t
ring_read(const struct ring *r, uint64_t seq, int *stream,
          const unsigned char **data, size_t *len)
{
    *len = 0;
    *data = NULL;
    *stream = 0;
    for (const struct ring_chunk *c = r->head; c != NULL; c = c->next) {
        uint64_t skip;

        if (c->seq + c->len <= seq)
            continue;
        skip = seq > c->seq ? seq - c->seq : 0;
        *stream = c->stream;
        *data = c->data + skip;
        *len = c->len - (size_t)skip;
        return c->seq + skip;
    }
    return r->end;
}
