/*
 * Small helpers shared by every component: validation of user-supplied
 * names, time, parsing of durations and sizes, randomness, files.
 *
 * Functions return 0 or a negative errno value unless said otherwise.
 */
#ifndef PD_UTIL_H
#define PD_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PD_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define PD_UNUSED(x)     ((void)(x))

/* Longest sandbox id: [a-z0-9][a-z0-9-]{0,62}. */
#define PD_ID_MAX 63

/* True when s is a valid sandbox (or node, process) id. */
bool pd_id_valid(const char *s);

/* Same check for a string that is not NUL-terminated. */
bool pd_id_valid_n(const char *s, size_t len);

/* True when the label key or value is printable, short and has no '='. */
bool pd_label_valid(const char *s, size_t max);

/* Milliseconds and nanoseconds on the monotonic clock. */
uint64_t pd_now_ms(void);
uint64_t pd_now_ns(void);

/* Milliseconds since the Unix epoch. */
uint64_t pd_wall_ms(void);

/*
 * Parses a duration: a number with a unit of ms, s, m, h or d ("1500ms",
 * "30s", "1h"). A bare number is seconds. Result in milliseconds.
 */
int pd_parse_duration_ms(const char *s, uint64_t *out_ms);

/* Parses a size: a number with an optional K, M, G or T (powers of 1024). */
int pd_parse_size(const char *s, uint64_t *out);

/* Parses a whole unsigned decimal number that fits in uint64_t. */
int pd_parse_u64(const char *s, uint64_t *out);

/* Fills buf from the OS CSPRNG (getrandom). */
int pd_random_bytes(void *buf, size_t len);

/* Lower-case hex of len bytes into out, which holds 2 * len + 1 bytes. */
void pd_hex(const void *in, size_t len, char *out);

/* Copies at most size - 1 bytes and always terminates; returns strlen(src). */
size_t pd_strlcpy(char *dst, const char *src, size_t size);

/* mkdir -p with the given mode for the directories it creates. */
int pd_mkdir_p(const char *path, unsigned mode);

/* Removes a directory tree; a missing path is not an error. */
int pd_rm_rf(const char *path);

/* Reads a whole small file into a malloc'd NUL-terminated buffer. */
int pd_read_file(const char *path, char **out, size_t *out_len, size_t max);

/* Writes a file atomically (temporary file, fsync, rename). */
int pd_write_file_atomic(const char *path, const void *data, size_t len,
                         unsigned mode);

/* Constant-time comparison of two byte strings of the same length. */
bool pd_ct_equal(const void *a, const void *b, size_t len);

#endif
