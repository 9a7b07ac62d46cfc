/*
 * Frame codec: encoding and bounded decoding of the frames in msgtypes.h.
 * No libuv here, so the guest agent and the fuzzer link it alone.
 *
 * Decoding order, for hostile input:
 *   1. the length prefix is checked against the cap before any allocation;
 *   2. only a complete frame is parsed;
 *   3. a validating walk checks every msgpack header against the bytes that
 *      remain and the nesting limit (msgpack-c would otherwise reserve
 *      memory for counts the frame cannot hold);
 *   4. only then msgpack-c unpacks it; the root must be a map with a known
 *      "t" and an "id".
 * A failure sets a reason in the decoder's err buffer; the caller logs it
 * and closes the connection.
 */
#ifndef PD_FRAME_H
#define PD_FRAME_H

#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proto/msgtypes.h"

/* ---- Encoding ---------------------------------------------------------- */

/*
 * An encoder builds one frame. Top-level fields are counted as they are
 * added and the map header and length are patched by pd_enc_finish. For a
 * nested value, call pd_enc_key and then pack the value with e->pk (the
 * caller gives nested counts itself).
 */
struct pd_enc {
    msgpack_sbuffer sbuf;
    msgpack_packer pk;
    uint32_t nfields;
    int err; /* first failure, reported by pd_enc_finish */
};

/* Starts a frame of the given type and request id. */
void pd_enc_begin(struct pd_enc *e, unsigned type, uint64_t id);

void pd_enc_key(struct pd_enc *e, const char *key);
void pd_enc_str(struct pd_enc *e, const char *key, const char *val);
void pd_enc_strn(struct pd_enc *e, const char *key, const char *val,
                 size_t len);
void pd_enc_u64(struct pd_enc *e, const char *key, uint64_t val);
void pd_enc_i64(struct pd_enc *e, const char *key, int64_t val);
void pd_enc_bool(struct pd_enc *e, const char *key, bool val);
void pd_enc_bin(struct pd_enc *e, const char *key, const void *data,
                size_t len);
void pd_enc_nil(struct pd_enc *e, const char *key);
/* An array of C strings. */
void pd_enc_strv(struct pd_enc *e, const char *key, const char *const *v,
                 size_t n);

/* Packs a string value (not a field) with e->pk; for nested values. */
void pd_enc_pack_str(struct pd_enc *e, const char *s);

/*
 * Patches the header and hands over the frame: *out is malloc'd and owned
 * by the caller. Returns 0, -ENOMEM, or -EMSGSIZE when over PD_FRAME_MAX.
 * The encoder is released either way.
 */
int pd_enc_finish(struct pd_enc *e, void **out, size_t *out_len);

/* Releases an encoder without finishing it. */
void pd_enc_discard(struct pd_enc *e);

/* Convenience: a complete ERROR frame {code, errno, message}. */
int pd_enc_error(unsigned long long id, int errnum, const char *message,
                 void **out, size_t *out_len);

/* ---- Decoding ---------------------------------------------------------- */

/* One decoded frame. Valid until the next pd_decoder_next/feed call. */
struct pd_msg {
    unsigned type;
    uint64_t id;
    const msgpack_object *root; /* the map */
    msgpack_unpacked up;        /* owns the parsed objects */
    bool live;
};

/* Validates a msgpack value; returns its size in bytes or -1 (reason). */
long pd_mp_check(const unsigned char *p, size_t len, int depth_max,
                 const char **reason);

/*
 * Decodes one frame body (without the length prefix). Returns 0 or a
 * negative errno with a reason in err.
 */
int pd_msg_decode(const void *body, size_t len, struct pd_msg *out,
                  char *err, size_t errlen);

/* Frees the parsed objects (not the bytes they point into). */
void pd_msg_release(struct pd_msg *m);

/*
 * Incremental decoder: feed the bytes read from a stream, then take frames
 * out while pd_decoder_next returns 1. Buffers at most one frame plus what
 * has been fed.
 */
struct pd_decoder {
    unsigned char *buf;
    size_t len;   /* bytes held */
    size_t off;   /* start of the next unparsed frame */
    size_t cap;
    size_t max_frame;
    struct pd_msg cur;
    char err[160];
};

void pd_decoder_init(struct pd_decoder *d, size_t max_frame);
void pd_decoder_free(struct pd_decoder *d);

/* Appends bytes. Returns 0 or -ENOMEM. */
int pd_decoder_feed(struct pd_decoder *d, const void *data, size_t len);

/*
 * Takes the next complete frame: 1 and *out set; 0 when more bytes are
 * needed; a negative errno (reason in d->err) when the stream is bad, after
 * which the connection must be closed. *out stays valid until the next call.
 */
int pd_decoder_next(struct pd_decoder *d, const struct pd_msg **out);

/* ---- Field access ------------------------------------------------------ */

/*
 * Each returns 0, -ENOENT when the field is absent (or nil), or -EPROTO
 * when it has the wrong type. Strings point into the frame and are not
 * NUL-terminated; pd_msg_cstr copies and rejects embedded NUL.
 */
const msgpack_object *pd_msg_field(const struct pd_msg *m, const char *key);
const msgpack_object *pd_obj_field(const msgpack_object *map,
                                   const char *key);

int pd_msg_u64(const struct pd_msg *m, const char *key, uint64_t *out);
int pd_msg_i64(const struct pd_msg *m, const char *key, int64_t *out);
int pd_msg_bool(const struct pd_msg *m, const char *key, bool *out);
int pd_msg_str(const struct pd_msg *m, const char *key, const char **ptr,
               size_t *len);
int pd_msg_bin(const struct pd_msg *m, const char *key, const void **ptr,
               size_t *len);
int pd_msg_array(const struct pd_msg *m, const char *key,
                 const msgpack_object_array **out);
int pd_msg_map(const struct pd_msg *m, const char *key,
               const msgpack_object_map **out);
/* Copies into buf; -ENAMETOOLONG when it does not fit, -EINVAL on NUL. */
int pd_msg_cstr(const struct pd_msg *m, const char *key, char *buf,
                size_t buflen);
/* malloc'd copy; -EINVAL on embedded NUL. */
int pd_msg_strdup(const struct pd_msg *m, const char *key, char **out);

/* Same, on a bare object (array element, nested map value). */
int pd_obj_u64(const msgpack_object *o, uint64_t *out);
int pd_obj_i64(const msgpack_object *o, int64_t *out);
int pd_obj_str(const msgpack_object *o, const char **ptr, size_t *len);
int pd_obj_strdup(const msgpack_object *o, char **out);
/* A NULL-terminated malloc'd argv from an array of strings (no NULs). */
int pd_obj_strv(const msgpack_object *o, char ***out, size_t max);
void pd_strv_free(char **v);

/* Maps a negative errno to its symbolic name ("ENOENT") and back. */
const char *pd_errno_name(int errnum);
int pd_errno_from_name(const char *name, size_t len);

#endif
