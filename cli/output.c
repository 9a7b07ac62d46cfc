#include "cli/output.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/util.h"

/* ---- tables ---- */

void
table_init(struct table *t, int ncols, const char *const *head)
{
    int i;

    memset(t, 0, sizeof(*t));
    t->ncols = ncols > TABLE_MAX_COLS ? TABLE_MAX_COLS : ncols;
    for (i = 0; i < t->ncols; i++) {
        t->head[i] = head[i];
        t->width[i] = strlen(head[i]);
    }
}

void
table_add(struct table *t, const char *const *cells)
{
    char **c = realloc(t->cells, (size_t)(t->nrows + 1) * (size_t)t->ncols *
                                     sizeof(*c));
    int i;

    if (c == NULL)
        return;
    t->cells = c;
    for (i = 0; i < t->ncols; i++) {
        const char *v = cells[i] != NULL && cells[i][0] != '\0' ? cells[i]
                                                                 : "-";
        char *d = strdup(v);
        size_t w = strlen(v);

        c[t->nrows * t->ncols + i] = d;
        if (w > t->width[i])
            t->width[i] = w;
    }
    t->nrows++;
}

static void
print_row(const struct table *t, const char *const *cells, FILE *f)
{
    int i;

    for (i = 0; i < t->ncols; i++) {
        const char *v = cells[i] != NULL ? cells[i] : "-";

        if (i == t->ncols - 1)
            fprintf(f, "%s\n", v);
        else
            fprintf(f, "%-*s  ", (int)t->width[i], v);
    }
}

void
table_print(const struct table *t, FILE *f)
{
    int r;

    print_row(t, t->head, f);
    for (r = 0; r < t->nrows; r++)
        print_row(t, (const char *const *)t->cells + r * t->ncols, f);
}

void
table_sort(struct table *t, int col)
{
    int r, q, i;

    if (col < 0 || col >= t->ncols)
        return;
    /* Insertion sort: stable, and tables are a screenful or so. */
    for (r = 1; r < t->nrows; r++) {
        for (q = r; q > 0; q--) {
            char **a = t->cells + (q - 1) * t->ncols;
            char **b = t->cells + q * t->ncols;

            if (strcmp(a[col], b[col]) <= 0)
                break;
            for (i = 0; i < t->ncols; i++) {
                char *x = a[i];

                a[i] = b[i];
                b[i] = x;
            }
        }
    }
}

void
table_free(struct table *t)
{
    int i;

    for (i = 0; i < t->nrows * t->ncols; i++)
        free(t->cells[i]);
    free(t->cells);
    t->cells = NULL;
    t->nrows = 0;
}

/* ---- formatting ---- */

void
fmt_bytes(uint64_t n, char *buf, size_t len)
{
    static const char units[] = "KMGTPE";
    double v = (double)n;
    int u = -1;

    if (n < 1024) {
        snprintf(buf, len, "%llu", (unsigned long long)n);
        return;
    }
    while (v >= 1024 && u < 5) {
        v /= 1024;
        u++;
    }
    if (v < 10 && v != (double)(uint64_t)v)
        snprintf(buf, len, "%.1f%c", v, units[u]);
    else
        snprintf(buf, len, "%.0f%c", v, units[u]);
}

void
fmt_mb(uint64_t mb, char *buf, size_t len)
{
    fmt_bytes(mb << 20, buf, len);
}

void
fmt_duration(uint64_t ms, char *buf, size_t len)
{
    if (ms < 1000)
        snprintf(buf, len, "%llums", (unsigned long long)ms);
    else if (ms < 120000)
        snprintf(buf, len, "%llus", (unsigned long long)(ms / 1000));
    else if (ms < 2 * 3600000ull)
        snprintf(buf, len, "%llum", (unsigned long long)(ms / 60000));
    else if (ms < 48 * 3600000ull)
        snprintf(buf, len, "%lluh", (unsigned long long)(ms / 3600000));
    else if (ms < 730 * 86400000ull)
        snprintf(buf, len, "%llud", (unsigned long long)(ms / 86400000));
    else
        snprintf(buf, len, "%lluy",
                 (unsigned long long)(ms / (365 * 86400000ull)));
}

/* "2026-01-02T03:04:05Z" (fraction and offset ignored but Z/UTC). */
static int
parse_rfc3339(const char *s, uint64_t *ms)
{
    struct tm tm;
    const char *end;

    memset(&tm, 0, sizeof(tm));
    end = strptime(s, "%Y-%m-%dT%H:%M:%S", &tm);
    if (end == NULL)
        return -EINVAL;
    *ms = (uint64_t)timegm(&tm) * 1000;
    return 0;
}

int
json_time_ms(const json_t *j, uint64_t *ms)
{
    uint64_t t;

    if (json_is_integer(j) && json_integer_value(j) >= 0) {
        t = (uint64_t)json_integer_value(j);
        /* Seconds or milliseconds since the epoch: tell them apart (ms
         * values below this are before 1973, seconds after 5138). */
        if (t < 100000000000ull)
            t *= 1000;
    } else if (!json_is_string(j) ||
               parse_rfc3339(json_string_value(j), &t) != 0) {
        return -EINVAL;
    }
    *ms = t;
    return 0;
}

void
fmt_age(const json_t *j, uint64_t now_ms, char *buf, size_t len)
{
    uint64_t t, d;

    if (json_time_ms(j, &t) < 0) {
        snprintf(buf, len, "-");
        return;
    }
    /* An age is whole seconds: "850ms" old reads as noise in a table. */
    d = now_ms > t ? now_ms - t : 0;
    if (d < 1000)
        snprintf(buf, len, "0s");
    else
        fmt_duration(d, buf, len);
}

void
fmt_until(const json_t *j, uint64_t now_ms, char *buf, size_t len)
{
    uint64_t t;
    char d[16];

    if (json_time_ms(j, &t) < 0) {
        snprintf(buf, len, "-");
        return;
    }
    if (t > now_ms) {
        /* Rounded up: a token with 500 ms left is not "in 0s". */
        fmt_duration(t - now_ms < 1000 ? 1000 : t - now_ms, d, sizeof(d));
        snprintf(buf, len, "in %s", d);
    } else {
        fmt_age(j, now_ms, d, sizeof(d));
        snprintf(buf, len, "expired %s ago", d);
    }
}

void
fmt_time(const json_t *j, uint64_t now_ms, char *buf, size_t len)
{
    uint64_t t;
    time_t secs;
    struct tm tm;
    char at[32], rel[16];

    if (json_time_ms(j, &t) < 0) {
        fmt_scalar(j, buf, len);
        return;
    }
    secs = (time_t)(t / 1000);
    if (gmtime_r(&secs, &tm) == NULL ||
        strftime(at, sizeof(at), "%Y-%m-%d %H:%M:%S UTC", &tm) == 0) {
        fmt_scalar(j, buf, len);
        return;
    }
    if (t <= now_ms) {
        fmt_age(j, now_ms, rel, sizeof(rel));
        snprintf(buf, len, "%s (%s ago)", at, rel);
    } else {
        fmt_until(j, now_ms, rel, sizeof(rel));
        snprintf(buf, len, "%s (%s)", at, rel);
    }
}

void
fmt_scalar(const json_t *j, char *buf, size_t len)
{
    switch (j != NULL ? json_typeof(j) : JSON_NULL) {
    case JSON_STRING:
        snprintf(buf, len, "%s", json_string_value(j));
        break;
    case JSON_INTEGER:
        snprintf(buf, len, "%lld", (long long)json_integer_value(j));
        break;
    case JSON_REAL:
        snprintf(buf, len, "%g", json_real_value(j));
        break;
    case JSON_TRUE:
        snprintf(buf, len, "true");
        break;
    case JSON_FALSE:
        snprintf(buf, len, "false");
        break;
    case JSON_NULL:
        snprintf(buf, len, "-");
        break;
    default: {
        char *s = json_dumps(j, JSON_COMPACT);

        snprintf(buf, len, "%s", s != NULL ? s : "?");
        free(s);
    }
    }
}

/* "created_at", "expires_at", ...: the API's timestamps by name. */
static bool
is_time_key(const char *k)
{
    size_t n = strlen(k);

    return (n > 3 && strcmp(k + n - 3, "_at") == 0) ||
           strcmp(k, "mtime") == 0;
}

/* An array of scalars as "a b c"; -EINVAL if any element is not one. */
static int
scalars_text(const json_t *a, char *buf, size_t len)
{
    size_t i, off = 0;
    const json_t *x;
    char one[512];

    buf[0] = '\0';
    json_array_foreach((json_t *)a, i, x) {
        if (json_is_object(x) || json_is_array(x))
            return -EINVAL;
        fmt_scalar(x, one, sizeof(one));
        if (off < len)
            off += (size_t)snprintf(buf + off, len - off, "%s%s",
                                    i > 0 ? " " : "", one);
    }
    return 0;
}

void
print_object(const json_t *o, FILE *f, int indent)
{
    const char *k;
    json_t *v;
    char buf[1024];

    json_object_foreach((json_t *)o, k, v) {
        if (json_is_object(v) && json_object_size(v) > 0) {
            fprintf(f, "%*s%s:\n", indent, "", k);
            print_object(v, f, indent + 2);
            continue;
        }
        if (is_time_key(k) && json_is_integer(v))
            fmt_time(v, pd_wall_ms(), buf, sizeof(buf));
        else if (json_is_array(v) && json_array_size(v) > 0 &&
                 scalars_text(v, buf, sizeof(buf)) == 0)
            ; /* argv, port numbers: space-separated */
        else if ((json_is_object(v) || json_is_array(v)) &&
                 json_object_size(v) == 0 && json_array_size(v) == 0)
            snprintf(buf, sizeof(buf), "-");
        else
            fmt_scalar(v, buf, sizeof(buf));
        fprintf(f, "%*s%s: %s\n", indent, "", k, buf);
    }
}

const char *
error_message(const json_t *j, const char **code)
{
    json_t *e = json_object_get(j, "error");
    const char *m;

    if (json_is_string(e))
        return json_string_value(e);
    if (!json_is_object(e))
        return NULL;
    m = json_string_value(json_object_get(e, "message"));
    if (code != NULL)
        *code = json_string_value(json_object_get(e, "code"));
    return m;
}

json_t *
list_items(json_t *body, const char *key)
{
    json_t *a;

    if (json_is_array(body))
        return body;
    a = json_object_get(body, key);
    if (json_is_array(a))
        return a;
    a = json_object_get(body, "items");
    return json_is_array(a) ? a : NULL;
}

/* ---- server-sent events ---- */

#define SSE_MAX (16u << 20)

void
sse_init(struct sse *s)
{
    memset(s, 0, sizeof(*s));
}

void
sse_free(struct sse *s)
{
    free(s->line);
    free(s->data);
    memset(s, 0, sizeof(*s));
}

static int
grow(char **p, size_t *cap, size_t need)
{
    char *n;
    size_t c = *cap > 0 ? *cap : 256;

    if (need <= *cap)
        return 0;
    if (need > SSE_MAX)
        return -EMSGSIZE;
    while (c < need)
        c *= 2;
    n = realloc(*p, c);
    if (n == NULL)
        return -ENOMEM;
    *p = n;
    *cap = c;
    return 0;
}

/* One complete line, without its terminator. */
static int
sse_line(struct sse *s, sse_cb cb, void *arg)
{
    char *l = s->line;
    size_t n = s->line_len;
    char *colon;
    const char *v;
    size_t vlen;

    if (n == 0) {
        if (s->has_data) {
            s->data[s->data_len] = '\0';
            cb(s->event[0] != '\0' ? s->event : "message", s->data,
               s->data_len, arg);
        }
        s->event[0] = '\0';
        s->data_len = 0;
        s->has_data = false;
        return 0;
    }
    if (l[0] == ':')
        return 0; /* comment */
    l[n] = '\0';
    colon = memchr(l, ':', n);
    if (colon != NULL) {
        *colon = '\0';
        v = colon + 1;
        if (*v == ' ')
            v++;
        vlen = n - (size_t)(v - l);
    } else {
        v = "";
        vlen = 0;
    }
    if (strcmp(l, "event") == 0) {
        snprintf(s->event, sizeof(s->event), "%.*s", (int)vlen, v);
    } else if (strcmp(l, "data") == 0) {
        size_t need = s->data_len + vlen + 2;
        int rv = grow(&s->data, &s->data_cap, need);

        if (rv < 0)
            return rv;
        if (s->has_data)
            s->data[s->data_len++] = '\n';
        memcpy(s->data + s->data_len, v, vlen);
        s->data_len += vlen;
        s->has_data = true;
    }
    return 0;
}

int
sse_feed(struct sse *s, const char *p, size_t n, sse_cb cb, void *arg)
{
    size_t i;
    int rv;

    for (i = 0; i < n; i++) {
        char ch = p[i];

        if (ch == '\n') {
            if (s->line_len > 0 && s->line[s->line_len - 1] == '\r')
                s->line_len--;
            rv = sse_line(s, cb, arg);
            if (rv < 0)
                return rv;
            s->line_len = 0;
            continue;
        }
        rv = grow(&s->line, &s->line_cap, s->line_len + 2);
        if (rv < 0)
            return rv;
        s->line[s->line_len++] = ch;
    }
    return 0;
}

/* ---- base64 ---- */

static int
b64val(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+' || c == '-')
        return 62;
    if (c == '/' || c == '_')
        return 63;
    return -1;
}

int
b64_decode(const char *in, size_t len, unsigned char *out, size_t *outlen)
{
    uint32_t acc = 0;
    int bits = 0;
    size_t i, o = 0;

    while (len > 0 && in[len - 1] == '=')
        len--;
    for (i = 0; i < len; i++) {
        int v = b64val((unsigned char)in[i]);

        if (v < 0)
            return -EINVAL;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(acc >> bits);
        }
    }
    if (bits >= 6)
        return -EINVAL; /* one leftover character cannot be data */
    *outlen = o;
    return 0;
}
