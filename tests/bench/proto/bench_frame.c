/*
 * Frame codec throughput: encode and decode of a typical exec request and
 * of a 1 MiB file chunk, in frames/s and MB/s, beside a plain memcpy of the
 * same bytes measured in the same run (the floor any codec pays).
 *
 *   build/tests/bench/proto/bench_frame [seconds-per-case, default 1]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "proto/frame.h"

static double secs = 1.0;

static void *
enc_exec(size_t *len)
{
    static const char *const argv[] = {"python3", "-c",
                                       "print('hello from the sandbox')"};
    struct pd_enc e;
    void *buf;

    pd_enc_begin(&e, PD_MSG_EXEC, 12345);
    pd_enc_str(&e, "sandbox", "web-frontend-7");
    pd_enc_strv(&e, "argv", argv, 3);
    pd_enc_str(&e, "cwd", "/workspace/app");
    pd_enc_key(&e, "env");
    msgpack_pack_map(&e.pk, 3);
    pd_enc_pack_str(&e, "PATH");
    pd_enc_pack_str(&e, "/usr/local/bin:/usr/bin:/bin");
    pd_enc_pack_str(&e, "HOME");
    pd_enc_pack_str(&e, "/workspace");
    pd_enc_pack_str(&e, "LANG");
    pd_enc_pack_str(&e, "C.UTF-8");
    pd_enc_u64(&e, "timeout_ms", 30000);
    pd_enc_bool(&e, "stream", false);
    pd_enc_u64(&e, "output_max", 1 << 20);
    if (pd_enc_finish(&e, &buf, len) != 0)
        abort();
    return buf;
}

static const char *chunk_src;

static void *
enc_chunk(size_t *len)
{
    struct pd_enc e;
    void *buf;

    pd_enc_begin(&e, PD_MSG_DATA, 777);
    pd_enc_bin(&e, "data", chunk_src, PD_CHUNK_MAX);
    pd_enc_bool(&e, "eof", false);
    if (pd_enc_finish(&e, &buf, len) != 0)
        abort();
    return buf;
}

struct result {
    double fps, mbps;
};

static struct result
measure_encode(void *(*enc)(size_t *), size_t *flen)
{
    uint64_t start = pd_now_ns(), end = start + (uint64_t)(secs * 1e9);
    uint64_t n = 0, bytes = 0, now;

    do {
        for (int i = 0; i < 16; i++) {
            size_t len;
            void *b = enc(&len);

            bytes += len;
            *flen = len;
            free(b);
            n++;
        }
        now = pd_now_ns();
    } while (now < end);
    double el = (double)(now - start) / 1e9;
    return (struct result){n / el, bytes / el / 1e6};
}

static struct result
measure_decode(const void *frame, size_t len)
{
    uint64_t start = pd_now_ns(), end = start + (uint64_t)(secs * 1e9);
    uint64_t n = 0, now;
    struct pd_decoder d;
    const struct pd_msg *m;

    pd_decoder_init(&d, 0);
    do {
        for (int i = 0; i < 16; i++) {
            const void *p;
            size_t plen;

            pd_decoder_feed(&d, frame, len);
            if (pd_decoder_next(&d, &m) != 1)
                abort();
            /* Touch the payload as a real consumer would. */
            if (pd_msg_bin(m, "data", &p, &plen) != 0)
                pd_msg_str(m, "cwd", (const char **)&p, &plen);
            n++;
        }
        now = pd_now_ns();
    } while (now < end);
    pd_decoder_free(&d);
    double el = (double)(now - start) / 1e9;
    return (struct result){n / el, (double)n * len / el / 1e6};
}

static struct result
measure_memcpy(size_t len)
{
    char *src = malloc(len), *dst = malloc(len);
    uint64_t start = pd_now_ns(), end = start + (uint64_t)(secs * 1e9);
    uint64_t n = 0, now;

    memset(src, 7, len);
    do {
        for (int i = 0; i < 16; i++) {
            memcpy(dst, src, len);
            __asm__ __volatile__("" : : "r"(dst) : "memory");
            n++;
        }
        now = pd_now_ns();
    } while (now < end);
    free(src);
    free(dst);
    double el = (double)(now - start) / 1e9;
    return (struct result){n / el, (double)n * len / el / 1e6};
}

static void
report(const char *name, void *(*enc)(size_t *))
{
    size_t len;
    struct result e = measure_encode(enc, &len);
    void *frame = enc(&len);
    struct result d = measure_decode(frame, len);
    struct result m = measure_memcpy(len);

    printf("%-12s frame %8zu B | encode %10.0f frames/s %8.1f MB/s | "
           "decode %10.0f frames/s %8.1f MB/s | memcpy %8.1f MB/s | "
           "encode/memcpy %.2f decode/memcpy %.2f\n",
           name, len, e.fps, e.mbps, d.fps, d.mbps, m.mbps,
           e.mbps / m.mbps, d.mbps / m.mbps);
    free(frame);
}

int
main(int argc, char **argv)
{
    char *src;

    if (argc > 1)
        secs = atof(argv[1]);
    if (secs <= 0)
        secs = 1.0;
    src = malloc(PD_CHUNK_MAX);
    memset(src, 'x', PD_CHUNK_MAX);
    chunk_src = src;
    report("exec-request", enc_exec);
    report("file-chunk", enc_chunk);
    free(src);
    return 0;
}
