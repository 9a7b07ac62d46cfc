/*
 * What paddock prints: aligned tables, human sizes and times, and the
 * decoders its streams need (server-sent events, base64).
 */
#ifndef PD_CLI_OUTPUT_H
#define PD_CLI_OUTPUT_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* ---- tables ---- */

#define TABLE_MAX_COLS 10

struct table {
    int ncols;
    const char *head[TABLE_MAX_COLS];
    size_t width[TABLE_MAX_COLS];
    int nrows;
    char **cells; /* nrows * ncols, malloc'd strings */
};

void table_init(struct table *t, int ncols, const char *const *head);
/* Adds a row of ncols cells; NULL cells print as "-". Copies them. */
void table_add(struct table *t, const char *const *cells);
/* Prints with two spaces between columns; the last column unpadded. */
void table_print(const struct table *t, FILE *f);
/* Orders the rows by one column's text (stable), e.g. names in file ls. */
void table_sort(struct table *t, int col);
void table_free(struct table *t);

/* ---- formatting ---- */

/* 1536 -> "1.5K", 0 -> "0"; powers of 1024. */
void fmt_bytes(uint64_t n, char *buf, size_t len);
/* A megabyte count as "512M" or "2G". */
void fmt_mb(uint64_t mb, char *buf, size_t len);
/* A duration in ms as "850ms", "42s", "5m", "3h", "2d". */
void fmt_duration(uint64_t ms, char *buf, size_t len);
/* Age of a timestamp (ms since the epoch, or an RFC 3339 string in j)
 * relative to now_ms; "-" when absent. */
void fmt_age(const json_t *j, uint64_t now_ms, char *buf, size_t len);
/* A timestamp (seconds or ms since the epoch, or RFC 3339) in ms; -EINVAL
 * when j is none of these. */
int json_time_ms(const json_t *j, uint64_t *ms);
/* A deadline relative to now_ms: "in 59m", "expired 3h ago"; "-". */
void fmt_until(const json_t *j, uint64_t now_ms, char *buf, size_t len);
/* "2026-12-04 05:31:42 UTC (8s ago)" or "(in 59m)"; other JSON as
 * fmt_scalar. */
void fmt_time(const json_t *j, uint64_t now_ms, char *buf, size_t len);
/* Any JSON scalar as text; "-" for null or absent. */
void fmt_scalar(const json_t *j, char *buf, size_t len);
/* Prints an object as "key: value" lines, nested objects indented,
 * timestamps (keys ending in "_at", "mtime") as fmt_time, arrays of
 * scalars space-separated, and empty objects and arrays as "-". */
void print_object(const json_t *o, FILE *f, int indent);
/* The error message from {"error": {"code", "message"}}, or NULL. */
const char *error_message(const json_t *j, const char **code);
/* The array in a list response: the body itself or body[key]. */
json_t *list_items(json_t *body, const char *key);

/* ---- server-sent events ---- */

typedef void (*sse_cb)(const char *event, const char *data, size_t len,
                       void *arg);

struct sse {
    char *line;
    size_t line_len, line_cap;
    char event[64];
    char *data;
    size_t data_len, data_cap;
    bool has_data;
    bool overflow;
};

void sse_init(struct sse *s);
/* Feeds bytes; cb for each complete event. -EMSGSIZE past 16 MiB. */
int sse_feed(struct sse *s, const char *p, size_t n, sse_cb cb, void *arg);
void sse_free(struct sse *s);

/* ---- base64 ---- */

/* Decodes standard base64 (padding optional); out needs len*3/4+3. */
int b64_decode(const char *in, size_t len, unsigned char *out,
               size_t *outlen);

#endif
