#include "cli/client.h"

#include <curl/curl.h>
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/output.h"
#include "common/util.h"

#define ERR_BODY_MAX (64u << 10)

void
cli_errorf(const char *fmt, ...)
{
    va_list ap;
    char buf[2048];
    size_t i;

    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    /* One line, always: a server's message or a file name may hold a
     * newline or an escape sequence; neither reaches the terminal. */
    for (i = 0; buf[i] != '\0'; i++)
        if ((unsigned char)buf[i] < 0x20 || buf[i] == 0x7f)
            buf[i] = ' ';
    fprintf(stderr, "paddock: %s\n", buf);
}

int
cli_set_addrs(struct cli *c, const char *list, char *err, size_t errlen)
{
    const char *p = list;

    while (*p != '\0') {
        const char *comma = strchr(p, ',');
        size_t n = comma != NULL ? (size_t)(comma - p) : strlen(p);
        char *a;

        while (n > 0 && (*p == ' ')) {
            p++;
            n--;
        }
        while (n > 0 && p[n - 1] == '/')
            n--;
        if (n > 0) {
            if (c->naddrs >= CLI_MAX_ADDRS) {
                snprintf(err, errlen, "more than %d addresses",
                         CLI_MAX_ADDRS);
                return -EINVAL;
            }
            if (n > 7 && (strncmp(p, "http://", 7) == 0 ||
                          strncmp(p, "https://", 8) == 0)) {
                a = strndup(p, n);
            } else if (memchr(p, '/', n) != NULL) {
                snprintf(err, errlen, "bad address '%.*s' (want host:port "
                         "or http(s)://host:port)", (int)n, p);
                return -EINVAL;
            } else if (asprintf(&a, "http://%.*s", (int)n, p) < 0) {
                a = NULL;
            }
            if (a == NULL) {
                snprintf(err, errlen, "out of memory");
                return -ENOMEM;
            }
            c->addrs[c->naddrs++] = a;
        }
        if (comma == NULL)
            break;
        p = comma + 1;
    }
    if (c->naddrs == 0) {
        snprintf(err, errlen, "no scheduler address: set PADDOCK_ADDR or "
                 "pass --addr host:port");
        return -EINVAL;
    }
    return 0;
}

void
cli_free(struct cli *c)
{
    int i;

    for (i = 0; i < c->naddrs; i++)
        free(c->addrs[i]);
    c->naddrs = 0;
}

char *
cli_path(const char *fmt, ...)
{
    va_list ap;
    size_t cap = strlen(fmt) + 1, n = 0;
    char *out = malloc(cap);
    const char *f;

    if (out == NULL)
        return NULL;
    va_start(ap, fmt);
    for (f = fmt; *f != '\0'; f++) {
        const char *piece = f;
        size_t plen = 1;
        char *enc = NULL;

        if (f[0] == '%' && f[1] == 's') {
            const char *arg = va_arg(ap, const char *);

            enc = curl_easy_escape(NULL, arg, (int)strlen(arg));
            piece = enc != NULL ? enc : "";
            plen = strlen(piece);
            f++;
        } else if (f[0] == '%' && f[1] == 'd') {
            static char num[24];

            snprintf(num, sizeof(num), "%d", va_arg(ap, int));
            piece = num;
            plen = strlen(num);
            f++;
        }
        if (n + plen + 1 > cap) {
            char *o;

            cap = (n + plen + 1) * 2;
            o = realloc(out, cap);
            if (o == NULL) {
                free(out);
                curl_free(enc);
                va_end(ap);
                return NULL;
            }
            out = o;
        }
        memcpy(out + n, piece, plen);
        n += plen;
        curl_free(enc);
    }
    va_end(ap);
    out[n] = '\0';
    return out;
}

/* ---- transfer callbacks ---- */

struct xfer {
    struct cli *c;
    struct cli_call *k;
    CURL *h;
    bool error_body; /* non-2xx: collect for the message */
    bool decided;
    bool stopped;
    uint64_t started;
    uint64_t last_progress;
    bool progress_shown;
};

static int
collect(struct cli_call *k, const char *p, size_t n, size_t max)
{
    char *b;

    if (k->resp_len + n > max)
        return -EMSGSIZE;
    b = realloc(k->resp_body, k->resp_len + n + 1);
    if (b == NULL)
        return -ENOMEM;
    memcpy(b + k->resp_len, p, n);
    k->resp_len += n;
    b[k->resp_len] = '\0';
    k->resp_body = b;
    return 0;
}

static size_t
on_write(char *p, size_t sz, size_t n, void *arg)
{
    struct xfer *x = arg;
    struct cli_call *k = x->k;
    size_t len = sz * n;

    if (!x->decided) {
        char *ct = NULL;

        curl_easy_getinfo(x->h, CURLINFO_RESPONSE_CODE, &k->status);
        curl_easy_getinfo(x->h, CURLINFO_CONTENT_TYPE, &ct);
        if (ct != NULL)
            pd_strlcpy(k->ctype, ct, sizeof(k->ctype));
        x->error_body = k->status < 200 || k->status >= 300;
        x->decided = true;
    }
    if (x->error_body || k->on_data == NULL) {
        /* Error bodies are small; a collected 2xx body is bounded only by
         * what the caller asked for (JSON answers). */
        if (collect(k, p, len, x->error_body ? ERR_BODY_MAX
                                             : (256u << 20)) < 0)
            return x->error_body ? len : 0;
        return len;
    }
    if (k->on_data(p, len, k->arg) != len) {
        x->stopped = true;
        return 0;
    }
    return len;
}

/*
 * Ctrl-C while a progress line is drawn: erase it and say what happens,
 * then die by the signal as usual. Only write(2) here (signal context).
 */
static volatile sig_atomic_t progress_drawn;
static volatile sig_atomic_t progress_waiting;

static void
on_sigint(int sig)
{
    static const char erase[] = "\r\033[K";
    static const char goes_on[] = "paddock: interrupted; the cluster goes on "
                                  "with the request\n";
    ssize_t w;

    if (progress_drawn) {
        w = write(2, erase, sizeof(erase) - 1);
        if (progress_waiting)
            w = write(2, goes_on, sizeof(goes_on) - 1);
        (void)w;
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

static void
clear_progress(struct xfer *x)
{
    if (x->progress_shown) {
        fputs("\r\033[K", stderr);
        fflush(stderr);
        x->progress_shown = false;
        progress_drawn = 0;
    }
}

static int
on_progress(void *arg, curl_off_t dltotal, curl_off_t dlnow,
            curl_off_t ultotal, curl_off_t ulnow)
{
    struct xfer *x = arg;
    struct cli_call *k = x->k;
    uint64_t now = pd_now_ms(), el = now - x->started;
    char a[32], b[32], rate[32];

    if (k->progress == NULL || !x->c->tty || x->c->quiet || x->c->json)
        return 0;
    if (now - x->last_progress < 250 || el < 500)
        return 0;
    x->last_progress = now;
    if (k->wait_progress) {
        fprintf(stderr, "\r\033[K%s... %llus", k->progress,
                (unsigned long long)(el / 1000));
    } else {
        bool up = ultotal > 0 || ulnow > 0;
        curl_off_t done = up ? ulnow : dlnow, total = up ? ultotal
                                                           : dltotal;

        fmt_bytes((uint64_t)done, a, sizeof(a));
        fmt_bytes((uint64_t)(done * 1000 / (curl_off_t)(el > 0 ? el : 1)),
                  rate, sizeof(rate));
        if (total > 0) {
            fmt_bytes((uint64_t)total, b, sizeof(b));
            fprintf(stderr, "\r\033[K%s %s / %s (%d%%) %s/s", k->progress,
                    a, b, (int)(done * 100 / total), rate);
        } else {
            fprintf(stderr, "\r\033[K%s %s %s/s", k->progress, a, rate);
        }
    }
    fflush(stderr);
    x->progress_shown = true;
    progress_waiting = k->wait_progress;
    progress_drawn = 1;
    return 0;
}

static size_t
on_read(char *p, size_t sz, size_t n, void *arg)
{
    struct cli_call *k = arg;
    size_t got = fread(p, 1, sz * n, k->upload);

    if (got == 0 && ferror(k->upload))
        return CURL_READFUNC_ABORT;
    return got;
}

static bool
connect_failure(CURLcode rc)
{
    return rc == CURLE_COULDNT_CONNECT || rc == CURLE_COULDNT_RESOLVE_HOST ||
           rc == CURLE_COULDNT_RESOLVE_PROXY;
}

/* One attempt against one address. */
static CURLcode
attempt(struct cli *c, struct cli_call *k, const char *base, char *cerr,
        struct curl_slist *hdrs, const char *body)
{
    struct xfer x = {.c = c, .k = k, .started = pd_now_ms()};
    void (*prev)(int) = SIG_DFL;
    char *url = NULL;
    CURL *h = curl_easy_init();
    CURLcode rc;

    if (h == NULL || asprintf(&url, "%s%s", base, k->path) < 0) {
        curl_easy_cleanup(h);
        return CURLE_OUT_OF_MEMORY;
    }
    x.h = h;
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, k->method);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &x);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, cerr);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, 5L);
    curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(h, CURLOPT_XFERINFODATA, &x);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    if (k->timeout_s > 0)
        curl_easy_setopt(h, CURLOPT_TIMEOUT, k->timeout_s);
    if (c->cacert != NULL)
        curl_easy_setopt(h, CURLOPT_CAINFO, c->cacert);
    if (strcmp(k->method, "HEAD") == 0)
        curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
    if (k->upload != NULL) {
        curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
        curl_easy_setopt(h, CURLOPT_READFUNCTION, on_read);
        curl_easy_setopt(h, CURLOPT_READDATA, k);
        if (k->upload_size >= 0)
            curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE,
                             (curl_off_t)k->upload_size);
    } else if (body != NULL) {
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
    } else if (strcmp(k->method, "POST") == 0 ||
               strcmp(k->method, "PUT") == 0) {
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, "");
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, 0L);
    }
    if (k->progress != NULL && c->tty)
        prev = signal(SIGINT, on_sigint);
    rc = curl_easy_perform(h);
    clear_progress(&x);
    if (k->progress != NULL && c->tty)
        signal(SIGINT, prev);
    if (!x.decided)
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &k->status);
    if (rc == CURLE_WRITE_ERROR && x.stopped)
        rc = CURLE_OK; /* the sink asked to stop: not a network error */
    curl_easy_cleanup(h);
    free(url);
    return rc;
}

int
cli_do(struct cli *c, struct cli_call *k)
{
    struct curl_slist *hdrs = NULL;
    char *body = NULL, *auth = NULL;
    char cerr[CURL_ERROR_SIZE] = "";
    CURLcode rc = CURLE_COULDNT_CONNECT;
    int i, rv = EXIT_UNREACHABLE;

    if (c->token != NULL && c->token[0] != '\0') {
        if (asprintf(&auth, "Authorization: Bearer %s", c->token) < 0)
            return EXIT_LOCAL;
        hdrs = curl_slist_append(hdrs, auth);
    }
    if (k->json != NULL) {
        body = json_dumps(k->json, JSON_COMPACT);
        hdrs = curl_slist_append(hdrs, "Content-Type: application/json");
    } else if (k->upload != NULL) {
        hdrs = curl_slist_append(hdrs,
                                 "Content-Type: application/octet-stream");
    }
    hdrs = curl_slist_append(hdrs, "Accept: application/json, "
                                   "text/event-stream, */*");
    for (i = 0; i < c->naddrs; i++) {
        int idx = (c->cur + i) % c->naddrs;

        cerr[0] = '\0';
        free(k->resp_body);
        k->resp_body = NULL;
        k->resp_len = 0;
        k->status = 0;
        rc = attempt(c, k, c->addrs[idx], cerr, hdrs, body);
        if (connect_failure(rc))
            continue; /* nothing was sent: the next one may answer */
        c->cur = idx;
        break;
    }
    if (rc == CURLE_OK) {
        rv = EXIT_OK;
    } else if (connect_failure(rc)) {
        cli_errorf("no scheduler answered (tried %d address%s; last: %s)",
                   c->naddrs, c->naddrs == 1 ? "" : "es",
                   cerr[0] != '\0' ? cerr : curl_easy_strerror(rc));
        rv = EXIT_UNREACHABLE;
    } else if (rc == CURLE_ABORTED_BY_CALLBACK || rc == CURLE_READ_ERROR) {
        cli_errorf("reading the local input failed");
        rv = EXIT_LOCAL;
    } else if (rc == CURLE_WRITE_ERROR) {
        cli_errorf("writing the output failed");
        rv = EXIT_LOCAL;
    } else if (rc == CURLE_OPERATION_TIMEDOUT && k->status == 0) {
        cli_errorf("%s: %s", c->addrs[c->cur],
                   cerr[0] != '\0' ? cerr : curl_easy_strerror(rc));
        rv = EXIT_UNREACHABLE;
    } else {
        cli_errorf("%s %s: %s", k->method, c->addrs[c->cur],
                   cerr[0] != '\0' ? cerr : curl_easy_strerror(rc));
        rv = k->status == 0 ? EXIT_UNREACHABLE : EXIT_SERVER;
    }
    curl_slist_free_all(hdrs);
    free(body);
    free(auth);
    return rv;
}

int
cli_check(const struct cli *c, const struct cli_call *k)
{
    json_t *j;
    const char *msg = NULL, *code = NULL;
    int rv;

    if (k->status >= 200 && k->status < 300)
        return EXIT_OK;
    j = k->resp_body != NULL ? json_loads(k->resp_body, 0, NULL) : NULL;
    if (j != NULL)
        msg = error_message(j, &code);
    if (k->status == 401 && (c->token == NULL || c->token[0] == '\0'))
        /* The commonest first-hour mistake: say what fixes it. */
        cli_errorf("no token: set PADDOCK_TOKEN or pass --token (HTTP 401%s"
                   "%s)", code != NULL ? " " : "", code != NULL ? code : "");
    else if (msg != NULL)
        cli_errorf("%s (HTTP %ld%s%s)", msg, k->status,
                   code != NULL ? " " : "", code != NULL ? code : "");
    else
        cli_errorf("HTTP %ld from the scheduler%s%.200s", k->status,
                   k->resp_len > 0 ? ": " : "",
                   k->resp_body != NULL ? k->resp_body : "");
    json_decref(j);
    if (k->status == 404)
        rv = EXIT_NOTFOUND;
    else if (k->status == 401 || k->status == 403)
        rv = EXIT_AUTH;
    else if (k->status >= 400 && k->status < 500)
        rv = EXIT_API;
    else
        rv = EXIT_SERVER;
    return rv;
}

int
cli_json(struct cli *c, const char *method, const char *path, json_t *body,
         json_t **out)
{
    struct cli_call k = {.method = method, .path = path, .json = body,
                         .timeout_s = 0};
    json_error_t je;
    int rv = cli_do(c, &k);

    *out = NULL;
    if (rv == EXIT_OK)
        rv = cli_check(c, &k);
    if (rv == EXIT_OK && k.resp_len > 0) {
        *out = json_loadb(k.resp_body, k.resp_len, 0, &je);
        if (*out == NULL) {
            cli_errorf("the scheduler sent bad JSON: %s", je.text);
            rv = EXIT_SERVER;
        }
    }
    cli_call_free(&k);
    return rv;
}

void
cli_call_free(struct cli_call *k)
{
    free(k->resp_body);
    k->resp_body = NULL;
    k->resp_len = 0;
}
