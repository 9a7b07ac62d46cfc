/*
 * The output log of a background process: a list of chunks with a byte
 * cap. Each chunk remembers its position (seq) in the whole output, so a
 * follower that fell behind the oldest kept chunk skips ahead instead of
 * blocking the process, and one that is caught up waits for new chunks.
 *
 * A program that writes line by line makes many small reads; they share
 * chunks of at least RING_CHUNK_MIN bytes (same stream only), so the list
 * stays short and a follower sends few, large frames. The cap counts the
 * chunks' allocated room, not just the bytes in them, so even alternating
 * one-byte writes to stdout and stderr cannot grow memory past it.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "guest-agent/guest.h"

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
    r->tail = NULL;
    r->bytes = 0;
}

/* Room for a new chunk of len bytes: small writes share chunks. */
static size_t
chunk_room(size_t len, size_t cap)
{
    size_t room = len < RING_CHUNK_MIN ? RING_CHUNK_MIN : len;

    return room > cap ? cap : room;
}

int
ring_append(struct ring *r, int stream, const void *data, size_t len)
{
    struct ring_chunk *c = r->tail;
    size_t room;

    if (len == 0)
        return 0;
    /* A single write larger than the ring keeps only its tail. */
    if (len > r->cap) {
        r->end += len - r->cap;
        data = (const unsigned char *)data + (len - r->cap);
        len = r->cap;
    }
    /* Into the tail chunk first, as far as it is the same stream and has
     * room; the rest opens a new chunk. */
    if (c != NULL && c->stream == stream && c->len < c->room) {
        size_t take = c->room - c->len < len ? c->room - c->len : len;

        memcpy(c->data + c->len, data, take);
        c->len += (uint32_t)take;
        r->end += take;
        data = (const unsigned char *)data + take;
        len -= take;
        if (len == 0)
            return 0;
    }
    room = chunk_room(len, r->cap);
    c = malloc(sizeof(*c) + room);
    if (c == NULL)
        return -ENOMEM;
    c->seq = r->end;
    c->len = (uint32_t)len;
    c->room = (uint32_t)room;
    c->stream = (uint8_t)stream;
    c->next = NULL;
    memcpy(c->data, data, len);
    if (r->tail != NULL)
        r->tail->next = c;
    else
        r->head = c;
    r->tail = c;
    r->bytes += room;
    r->end += len;

    while (r->bytes > r->cap && r->head != c) {
        struct ring_chunk *old = r->head;

        r->head = old->next;
        r->bytes -= old->room;
        free(old);
    }
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
