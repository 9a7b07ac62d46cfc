/* libFuzzer target for the frame decoder: arbitrary bytes through the
 * incremental decoder (whole, and split in two at a byte the input picks),
 * then every accessor on whatever decodes. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "proto/frame.h"

static void
touch(const struct pd_msg *m)
{
    static const char *const keys[] = {"argv", "path", "data", "env",
                                       "timeout_ms", "stream", "v"};
    char buf[64], **argv = NULL, *dup = NULL;
    const msgpack_object_array *arr;
    const msgpack_object_map *map;
    const void *bin;
    const char *s;
    uint64_t u;
    int64_t i;
    bool b;
    size_t n;

    for (size_t k = 0; k < sizeof(keys) / sizeof(keys[0]); k++) {
        pd_msg_u64(m, keys[k], &u);
        pd_msg_i64(m, keys[k], &i);
        pd_msg_bool(m, keys[k], &b);
        pd_msg_str(m, keys[k], &s, &n);
        pd_msg_bin(m, keys[k], &bin, &n);
        pd_msg_array(m, keys[k], &arr);
        pd_msg_map(m, keys[k], &map);
        pd_msg_cstr(m, keys[k], buf, sizeof(buf));
        if (pd_msg_strdup(m, keys[k], &dup) == 0)
            free(dup);
        if (pd_obj_strv(pd_msg_field(m, keys[k]), &argv, 64) == 0)
            pd_strv_free(argv);
    }
}

static void
run(const uint8_t *data, size_t size, size_t split)
{
    struct pd_decoder d;
    const struct pd_msg *m;

    pd_decoder_init(&d, 1u << 16);
    pd_decoder_feed(&d, data, split);
    while (pd_decoder_next(&d, &m) == 1)
        touch(m);
    pd_decoder_feed(&d, data + split, size - split);
    while (pd_decoder_next(&d, &m) == 1)
        touch(m);
    pd_decoder_free(&d);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    run(data, size, size);
    if (size > 1)
        run(data + 1, size - 1, data[0] % (size - 1));
    return 0;
}
