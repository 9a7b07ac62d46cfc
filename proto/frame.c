#include "proto/frame.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/*
 * Most objects one frame may unpack into. msgpack-c allocates one
 * msgpack_object (24 bytes) per element, so this bounds its zone at a few
 * MiB whatever the frame holds.
 */
#define OBJ_MAX 262144

/* Room for the length prefix and a map32 header, patched at finish. */
#define HDR_LEN 9

/* ---- Encoding ---------------------------------------------------------- */

static int
sbuf_write(void *data, const char *buf, size_t len)
{
    struct pd_enc *e = data;

    if (e->err != 0)
        return -1;
    if (msgpack_sbuffer_write(&e->sbuf, buf, len) != 0) {
        e->err = -ENOMEM;
        return -1;
    }
    return 0;
}

void
pd_enc_begin(struct pd_enc *e, unsigned type, uint64_t id)
{
    static const char placeholder[HDR_LEN];

    msgpack_sbuffer_init(&e->sbuf);
    msgpack_packer_init(&e->pk, e, sbuf_write);
    e->nfields = 0;
    e->err = 0;
    sbuf_write(e, placeholder, sizeof(placeholder));
    pd_enc_u64(e, "t", type);
    pd_enc_u64(e, "id", id);
}

void
pd_enc_key(struct pd_enc *e, const char *key)
{
    size_t n = strlen(key);

    e->nfields++;
    msgpack_pack_str(&e->pk, n);
    msgpack_pack_str_body(&e->pk, key, n);
}

void
pd_enc_pack_str(struct pd_enc *e, const char *s)
{
    size_t n = s != NULL ? strlen(s) : 0;

    msgpack_pack_str(&e->pk, n);
    msgpack_pack_str_body(&e->pk, s != NULL ? s : "", n);
}

void
pd_enc_str(struct pd_enc *e, const char *key, const char *val)
{
    pd_enc_key(e, key);
    pd_enc_pack_str(e, val);
}

void
pd_enc_strn(struct pd_enc *e, const char *key, const char *val, size_t len)
{
    pd_enc_key(e, key);
    msgpack_pack_str(&e->pk, len);
    msgpack_pack_str_body(&e->pk, val, len);
}

void
pd_enc_u64(struct pd_enc *e, const char *key, uint64_t val)
{
    pd_enc_key(e, key);
    msgpack_pack_uint64(&e->pk, val);
}

void
pd_enc_i64(struct pd_enc *e, const char *key, int64_t val)
{
    pd_enc_key(e, key);
    msgpack_pack_int64(&e->pk, val);
}

void
pd_enc_bool(struct pd_enc *e, const char *key, bool val)
{
    pd_enc_key(e, key);
    if (val)
        msgpack_pack_true(&e->pk);
    else
        msgpack_pack_false(&e->pk);
}

void
pd_enc_bin(struct pd_enc *e, const char *key, const void *data, size_t len)
{
    pd_enc_key(e, key);
    msgpack_pack_bin(&e->pk, len);
    msgpack_pack_bin_body(&e->pk, data, len);
}

void
pd_enc_nil(struct pd_enc *e, const char *key)
{
    pd_enc_key(e, key);
    msgpack_pack_nil(&e->pk);
}

void
pd_enc_strv(struct pd_enc *e, const char *key, const char *const *v,
            size_t n)
{
    pd_enc_key(e, key);
    msgpack_pack_array(&e->pk, n);
    for (size_t i = 0; i < n; i++)
        pd_enc_pack_str(e, v[i]);
}

static void
put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

int
pd_enc_finish(struct pd_enc *e, void **out, size_t *out_len)
{
    unsigned char *p;
    size_t len = e->sbuf.size;
    int rv = e->err;

    if (rv == 0 && len > PD_FRAME_MAX)
        rv = -EMSGSIZE;
    if (rv != 0) {
        msgpack_sbuffer_destroy(&e->sbuf);
        return rv;
    }
    p = (unsigned char *)msgpack_sbuffer_release(&e->sbuf);
    put_be32(p, (uint32_t)(len - 4));
    p[4] = 0xdf; /* map32: the count is known only now */
    put_be32(p + 5, e->nfields);
    *out = p;
    *out_len = len;
    return 0;
}

void
pd_enc_discard(struct pd_enc *e)
{
    msgpack_sbuffer_destroy(&e->sbuf);
}

int
pd_enc_error(unsigned long long id, int errnum, const char *message,
             void **out, size_t *out_len)
{
    struct pd_enc e;

    if (errnum < 0)
        errnum = -errnum;
    pd_enc_begin(&e, PD_MSG_ERROR, id);
    pd_enc_str(&e, "code", pd_errno_name(errnum));
    pd_enc_i64(&e, "errno", errnum);
    pd_enc_str(&e, "message", message != NULL ? message : "");
    return pd_enc_finish(&e, out, out_len);
}

/* ---- Validation -------------------------------------------------------- */

struct walk {
    const unsigned char *p;
    size_t left;
    long objects;
    int depth_max;
    const char *reason;
};

static int
need(struct walk *w, size_t n)
{
    if (w->left < n) {
        w->reason = "truncated value";
        return -1;
    }
    return 0;
}

static uint32_t
be(const unsigned char *p, int n)
{
    uint32_t v = 0;

    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

static int walk_value(struct walk *w, int depth);

/* Skips a header of hlen bytes and a body of blen bytes. */
static int
skip(struct walk *w, size_t hlen, size_t blen)
{
    if (need(w, hlen) != 0 || w->left - hlen < blen) {
        w->reason = "length runs past the frame";
        return -1;
    }
    w->p += hlen + blen;
    w->left -= hlen + blen;
    return 0;
}

static int
walk_container(struct walk *w, int depth, size_t hlen, uint32_t count,
               bool map)
{
    uint64_t items = map ? (uint64_t)count * 2 : count;

    w->p += hlen;
    w->left -= hlen;
    /* Every element takes at least one byte: a count larger than what
     * remains is a lie, caught before msgpack-c reserves memory for it. */
    if (items > w->left) {
        w->reason = "array or map count exceeds the remaining bytes";
        return -1;
    }
    if (depth + 1 > w->depth_max) {
        w->reason = "nesting too deep";
        return -1;
    }
    w->objects += (long)items;
    if (w->objects > OBJ_MAX) {
        w->reason = "too many objects in one frame";
        return -1;
    }
    for (uint64_t i = 0; i < items; i++) {
        if (walk_value(w, depth + 1) != 0)
            return -1;
    }
    return 0;
}

static int
walk_value(struct walk *w, int depth)
{
    unsigned char b;

    if (need(w, 1) != 0)
        return -1;
    b = w->p[0];
    w->objects++;
    if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3)
        return skip(w, 1, 0);
    if (b >= 0x80 && b <= 0x8f)
        return walk_container(w, depth, 1, b & 0x0f, true);
    if (b >= 0x90 && b <= 0x9f)
        return walk_container(w, depth, 1, b & 0x0f, false);
    if (b >= 0xa0 && b <= 0xbf)
        return skip(w, 1, b & 0x1f);

    switch (b) {
    case 0xc4: case 0xd9: /* bin8, str8 */
        if (need(w, 2) != 0)
            return -1;
        return skip(w, 2, w->p[1]);
    case 0xc5: case 0xda: /* bin16, str16 */
        if (need(w, 3) != 0)
            return -1;
        return skip(w, 3, be(w->p + 1, 2));
    case 0xc6: case 0xdb: /* bin32, str32 */
        if (need(w, 5) != 0)
            return -1;
        return skip(w, 5, be(w->p + 1, 4));
    case 0xca: return skip(w, 5, 0);
    case 0xcb: return skip(w, 9, 0);
    case 0xcc: case 0xd0: return skip(w, 2, 0);
    case 0xcd: case 0xd1: return skip(w, 3, 0);
    case 0xce: case 0xd2: return skip(w, 5, 0);
    case 0xcf: case 0xd3: return skip(w, 9, 0);
    case 0xdc: case 0xde: /* array16, map16 */
        if (need(w, 3) != 0)
            return -1;
        return walk_container(w, depth, 3, be(w->p + 1, 2), b == 0xde);
    case 0xdd: case 0xdf: /* array32, map32 */
        if (need(w, 5) != 0)
            return -1;
        return walk_container(w, depth, 5, be(w->p + 1, 4), b == 0xdf);
    default:
        /* 0xc1 is never used; ext types are not part of the protocol. */
        w->reason = b == 0xc1 ? "reserved byte 0xc1" : "ext types not allowed";
        return -1;
    }
}

long
pd_mp_check(const unsigned char *p, size_t len, int depth_max,
            const char **reason)
{
    struct walk w = {.p = p, .left = len, .depth_max = depth_max};

    if (walk_value(&w, 0) != 0) {
        if (reason != NULL)
            *reason = w.reason;
        return -1;
    }
    return (long)(len - w.left);
}

/* ---- Decoding ---------------------------------------------------------- */

int
pd_msg_decode(const void *body, size_t len, struct pd_msg *out, char *err,
              size_t errlen)
{
    const char *reason = NULL;
    size_t off = 0;
    long used;
    uint64_t t, id;
    int rv;

    memset(out, 0, sizeof(*out));
    used = pd_mp_check(body, len, PD_NEST_MAX, &reason);
    if (used < 0) {
        snprintf(err, errlen, "bad msgpack: %s", reason);
        return -EPROTO;
    }
    if ((size_t)used != len) {
        snprintf(err, errlen, "%zu trailing bytes after the frame's map",
                 len - (size_t)used);
        return -EPROTO;
    }
    msgpack_unpacked_init(&out->up);
    if (msgpack_unpack_next(&out->up, body, len, &off) !=
            MSGPACK_UNPACK_SUCCESS ||
        off != len) {
        msgpack_unpacked_destroy(&out->up);
        snprintf(err, errlen, "msgpack unpack failed");
        return -EPROTO;
    }
    out->live = true;
    out->root = &out->up.data;
    if (out->root->type != MSGPACK_OBJECT_MAP) {
        snprintf(err, errlen, "frame is not a map");
        rv = -EPROTO;
        goto fail;
    }
    rv = pd_msg_u64(out, "t", &t);
    if (rv != 0) {
        snprintf(err, errlen, "frame has no valid \"t\" (message type)");
        goto fail;
    }
    if (!pd_msg_type_known(t)) {
        snprintf(err, errlen, "unknown message type %llu",
                 (unsigned long long)t);
        rv = -EPROTO;
        goto fail;
    }
    rv = pd_msg_u64(out, "id", &id);
    if (rv != 0) {
        snprintf(err, errlen, "frame has no valid \"id\" (request id)");
        goto fail;
    }
    out->type = (unsigned)t;
    out->id = id;
    return 0;
fail:
    if (rv == -ENOENT)
        rv = -EPROTO;
    pd_msg_release(out);
    return rv;
}

void
pd_msg_release(struct pd_msg *m)
{
    if (m->live)
        msgpack_unpacked_destroy(&m->up);
    m->live = false;
    m->root = NULL;
}

void
pd_decoder_init(struct pd_decoder *d, size_t max_frame)
{
    memset(d, 0, sizeof(*d));
    d->max_frame = max_frame != 0 ? max_frame : PD_FRAME_MAX;
}

void
pd_decoder_free(struct pd_decoder *d)
{
    pd_msg_release(&d->cur);
    free(d->buf);
    d->buf = NULL;
    d->len = d->off = d->cap = 0;
}

int
pd_decoder_feed(struct pd_decoder *d, const void *data, size_t len)
{
    pd_msg_release(&d->cur);
    /* Nothing to add: d->buf may still be NULL, and memcpy must never see
     * a NULL pointer, even for zero bytes. */
    if (len == 0)
        return 0;
    if (d->off > 0) {
        memmove(d->buf, d->buf + d->off, d->len - d->off);
        d->len -= d->off;
        d->off = 0;
    }
    if (d->len + len > d->cap) {
        size_t cap = d->cap != 0 ? d->cap : 4096;
        unsigned char *p;

        while (cap < d->len + len)
            cap *= 2;
        p = realloc(d->buf, cap);
        if (p == NULL)
            return -ENOMEM;
        d->buf = p;
        d->cap = cap;
    }
    memcpy(d->buf + d->len, data, len);
    d->len += len;
    return 0;
}

int
pd_decoder_next(struct pd_decoder *d, const struct pd_msg **out)
{
    size_t avail = d->len - d->off;
    uint32_t flen;
    int rv;

    pd_msg_release(&d->cur);
    if (avail < 4)
        return 0;
    flen = be(d->buf + d->off, 4);
    /* Checked before any byte of the body is buffered for it. */
    if (flen == 0 || (size_t)flen > d->max_frame - 4) {
        snprintf(d->err, sizeof(d->err),
                 "frame of %u bytes over the %zu-byte cap", flen,
                 d->max_frame);
        return -EMSGSIZE;
    }
    if (avail - 4 < flen)
        return 0;
    rv = pd_msg_decode(d->buf + d->off + 4, flen, &d->cur, d->err,
                       sizeof(d->err));
    if (rv != 0)
        return rv;
    d->off += 4 + (size_t)flen;
    *out = &d->cur;
    return 1;
}

/* ---- Field access ------------------------------------------------------ */

const msgpack_object *
pd_obj_field(const msgpack_object *map, const char *key)
{
    size_t n = strlen(key);

    if (map == NULL || map->type != MSGPACK_OBJECT_MAP)
        return NULL;
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object_kv *kv = &map->via.map.ptr[i];

        if (kv->key.type == MSGPACK_OBJECT_STR &&
            kv->key.via.str.size == n &&
            memcmp(kv->key.via.str.ptr, key, n) == 0) {
            if (kv->val.type == MSGPACK_OBJECT_NIL)
                return NULL;
            return &kv->val;
        }
    }
    return NULL;
}

const msgpack_object *
pd_msg_field(const struct pd_msg *m, const char *key)
{
    return pd_obj_field(m->root, key);
}

int
pd_obj_u64(const msgpack_object *o, uint64_t *out)
{
    if (o == NULL)
        return -ENOENT;
    if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        return -EPROTO;
    *out = o->via.u64;
    return 0;
}

int
pd_obj_i64(const msgpack_object *o, int64_t *out)
{
    if (o == NULL)
        return -ENOENT;
    if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
        *out = o->via.i64;
        return 0;
    }
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER &&
        o->via.u64 <= INT64_MAX) {
        *out = (int64_t)o->via.u64;
        return 0;
    }
    return -EPROTO;
}

int
pd_obj_str(const msgpack_object *o, const char **ptr, size_t *len)
{
    if (o == NULL)
        return -ENOENT;
    if (o->type != MSGPACK_OBJECT_STR)
        return -EPROTO;
    *ptr = o->via.str.ptr;
    *len = o->via.str.size;
    return 0;
}

int
pd_obj_strdup(const msgpack_object *o, char **out)
{
    const char *p;
    size_t n;
    char *s;
    int rv = pd_obj_str(o, &p, &n);

    if (rv != 0)
        return rv;
    if (memchr(p, '\0', n) != NULL)
        return -EINVAL;
    s = malloc(n + 1);
    if (s == NULL)
        return -ENOMEM;
    memcpy(s, p, n);
    s[n] = '\0';
    *out = s;
    return 0;
}

void
pd_strv_free(char **v)
{
    if (v == NULL)
        return;
    for (char **p = v; *p != NULL; p++)
        free(*p);
    free(v);
}

int
pd_obj_strv(const msgpack_object *o, char ***out, size_t max)
{
    char **v;
    uint32_t n;
    int rv;

    if (o == NULL)
        return -ENOENT;
    if (o->type != MSGPACK_OBJECT_ARRAY)
        return -EPROTO;
    n = o->via.array.size;
    if (n > max)
        return -E2BIG;
    v = calloc((size_t)n + 1, sizeof(*v));
    if (v == NULL)
        return -ENOMEM;
    for (uint32_t i = 0; i < n; i++) {
        rv = pd_obj_strdup(&o->via.array.ptr[i], &v[i]);
        if (rv != 0) {
            pd_strv_free(v);
            return rv;
        }
    }
    *out = v;
    return 0;
}

int
pd_msg_u64(const struct pd_msg *m, const char *key, uint64_t *out)
{
    return pd_obj_u64(pd_msg_field(m, key), out);
}

int
pd_msg_i64(const struct pd_msg *m, const char *key, int64_t *out)
{
    return pd_obj_i64(pd_msg_field(m, key), out);
}

int
pd_msg_bool(const struct pd_msg *m, const char *key, bool *out)
{
    const msgpack_object *o = pd_msg_field(m, key);

    if (o == NULL)
        return -ENOENT;
    if (o->type != MSGPACK_OBJECT_BOOLEAN)
        return -EPROTO;
    *out = o->via.boolean;
    return 0;
}

int
pd_msg_str(const struct pd_msg *m, const char *key, const char **ptr,
           size_t *len)
{
    return pd_obj_str(pd_msg_field(m, key), ptr, len);
}

int
pd_msg_bin(const struct pd_msg *m, const char *key, const void **ptr,
           size_t *len)
{
    const msgpack_object *o = pd_msg_field(m, key);

    if (o == NULL)
        return -ENOENT;
    if (o->type == MSGPACK_OBJECT_BIN) {
        *ptr = o->via.bin.ptr;
        *len = o->via.bin.size;
        return 0;
    }
    if (o->type == MSGPACK_OBJECT_STR) {
        *ptr = o->via.str.ptr;
        *len = o->via.str.size;
        return 0;
    }
    return -EPROTO;
}

int
pd_msg_array(const struct pd_msg *m, const char *key,
             const msgpack_object_array **out)
{
    const msgpack_object *o = pd_msg_field(m, key);

    if (o == NULL)
        return -ENOENT;
    if (o->type != MSGPACK_OBJECT_ARRAY)
        return -EPROTO;
    *out = &o->via.array;
    return 0;
}

int
pd_msg_map(const struct pd_msg *m, const char *key,
           const msgpack_object_map **out)
{
    const msgpack_object *o = pd_msg_field(m, key);

    if (o == NULL)
        return -ENOENT;
    if (o->type != MSGPACK_OBJECT_MAP)
        return -EPROTO;
    *out = &o->via.map;
    return 0;
}

int
pd_msg_cstr(const struct pd_msg *m, const char *key, char *buf,
            size_t buflen)
{
    const char *p;
    size_t n;
    int rv = pd_msg_str(m, key, &p, &n);

    if (rv != 0)
        return rv;
    if (memchr(p, '\0', n) != NULL)
        return -EINVAL;
    if (n >= buflen)
        return -ENAMETOOLONG;
    memcpy(buf, p, n);
    buf[n] = '\0';
    return 0;
}

int
pd_msg_strdup(const struct pd_msg *m, const char *key, char **out)
{
    return pd_obj_strdup(pd_msg_field(m, key), out);
}

/* ---- errno names ------------------------------------------------------- */

#define E(x) {x, #x}
static const struct {
    int num;
    const char *name;
} errnames[] = {
    E(EPERM), E(ENOENT), E(ESRCH), E(EINTR), E(EIO), E(E2BIG),
    E(ENOEXEC), E(EBADF), E(ECHILD), E(EAGAIN), E(ENOMEM), E(EACCES),
    E(EFAULT), E(EBUSY), E(EEXIST), E(EXDEV), E(ENODEV), E(ENOTDIR),
    E(EISDIR), E(EINVAL), E(ENFILE), E(EMFILE), E(ETXTBSY), E(EFBIG),
    E(ENOSPC), E(ESPIPE), E(EROFS), E(EMLINK), E(EPIPE), E(ERANGE),
    E(EDEADLK), E(ENAMETOOLONG), E(ENOSYS), E(ENOTEMPTY), E(ELOOP),
    E(EPROTO), E(EBADMSG), E(EOVERFLOW), E(EMSGSIZE), E(ENOTSUP),
    E(EADDRINUSE), E(ENETUNREACH), E(ECONNABORTED), E(ECONNRESET),
    E(ENOTCONN), E(ETIMEDOUT), E(ECONNREFUSED), E(EHOSTUNREACH),
    E(EALREADY), E(EINPROGRESS), E(EDQUOT), E(ECANCELED), E(EOWNERDEAD),
    E(ENOTRECOVERABLE), E(ENOKEY), E(EKEYREVOKED), E(EKEYEXPIRED),
    E(EREMOTE), E(ESHUTDOWN), E(ESTALE), E(EADDRNOTAVAIL),
};
#undef E

const char *
pd_errno_name(int errnum)
{
    if (errnum < 0)
        errnum = -errnum;
    for (size_t i = 0; i < sizeof(errnames) / sizeof(errnames[0]); i++) {
        if (errnames[i].num == errnum)
            return errnames[i].name;
    }
    return "EIO";
}

int
pd_errno_from_name(const char *name, size_t len)
{
    for (size_t i = 0; i < sizeof(errnames) / sizeof(errnames[0]); i++) {
        if (strlen(errnames[i].name) == len &&
            memcmp(errnames[i].name, name, len) == 0)
            return errnames[i].num;
    }
    return EIO;
}
