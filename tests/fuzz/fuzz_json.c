/* libFuzzer target for strict JSON bodies (proto/http.c pd_json_parse and
 * pd_json_check) under the API's schemas: what is accepted has exactly the
 * declared fields and types, survives a dump and re-parse, and the value
 * checks the handlers run next (ids, labels, parse helpers) never crash. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "proto/http.h"

/*
 * Byte 0 picks the schema (the shapes of the tables in scheduler/api.c,
 * io.c and cluster.c) and, in bit 7, whether an empty body counts as {}.
 * The rest is the body.
 */
struct schema {
    const struct pd_json_field *f;
    size_t n;
};

#define N(a) (sizeof(a) / sizeof((a)[0]))

static const struct pd_json_field create_fields[] = {
    {"id", PD_JSON_STRING, true},
    {"cpus", PD_JSON_UINT, false},
    {"memory_mb", PD_JSON_UINT, false},
    {"disk_mb", PD_JSON_UINT, false},
    {"env", PD_JSON_STRING_MAP, false},
    {"labels", PD_JSON_STRING_MAP, false},
    {"egress", PD_JSON_STRING, false},
    {"constraints", PD_JSON_STRING_MAP, false},
};

static const struct pd_json_field exec_fields[] = {
    {"argv", PD_JSON_STRINGS, false},
    {"command", PD_JSON_STRING, false},
    {"cwd", PD_JSON_STRING, false},
    {"env", PD_JSON_STRING_MAP, false},
    {"stdin", PD_JSON_STRING, false},
    {"timeout_ms", PD_JSON_UINT, false},
};

static const struct pd_json_field member_fields[] = {
    {"id", PD_JSON_ANY, true},
    {"raft_addr", PD_JSON_STRING, true},
    {"api_addr", PD_JSON_STRING, false},
};

static const struct pd_json_field misc_fields[] = {
    {"drain", PD_JSON_BOOL, false},
    {"offset", PD_JSON_INT, false},
    {"spec", PD_JSON_OBJECT, false},
    {"list", PD_JSON_ARRAY, false},
};

static const struct schema schemas[] = {
    {create_fields, N(create_fields)},
    {exec_fields, N(exec_fields)},
    {member_fields, N(member_fields)},
    {misc_fields, N(misc_fields)},
};

static const struct pd_json_field *
field(const struct schema *s, const char *name)
{
    for (size_t i = 0; i < s->n; i++)
        if (strcmp(s->f[i].name, name) == 0)
            return &s->f[i];
    return NULL;
}

/* Accepted means: only known fields, each of its declared type. */
static void
check_types(const struct schema *s, json_t *obj)
{
    const struct pd_json_field *f;
    const char *k;
    json_t *v, *e;
    size_t i;

    json_object_foreach(obj, k, v) {
        if ((f = field(s, k)) == NULL)
            abort();
        switch (f->type) {
        case PD_JSON_STRING:
            if (!json_is_string(v))
                abort();
            /* What the handlers do next with a string. */
            pd_id_valid(json_string_value(v));
            pd_label_valid(json_string_value(v), 63);
            break;
        case PD_JSON_UINT:
            if (!json_is_integer(v) || json_integer_value(v) < 0)
                abort();
            break;
        case PD_JSON_INT:
            if (!json_is_integer(v))
                abort();
            break;
        case PD_JSON_BOOL:
            if (!json_is_boolean(v))
                abort();
            break;
        case PD_JSON_STRINGS:
            json_array_foreach(v, i, e)
                if (!json_is_string(e))
                    abort();
            break;
        case PD_JSON_STRING_MAP: {
            const char *mk;

            json_object_foreach(v, mk, e) {
                if (!json_is_string(e))
                    abort();
                pd_label_valid(mk, 63);
            }
            break;
        }
        default:
            break;
        }
    }
    for (i = 0; i < s->n; i++)
        if (s->f[i].required && json_object_get(obj, s->f[i].name) == NULL)
            abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const struct schema *s;
    char msg[300], msg2[300];
    json_t *j = NULL, *j2 = NULL;
    char *dump;
    bool emptyok;
    int rv;

    if (size < 1)
        return 0;
    s = &schemas[(data[0] & 0x7f) % N(schemas)];
    emptyok = (data[0] & 0x80) != 0;
    msg[0] = '\0';
    rv = pd_json_parse((const char *)data + 1, size - 1, emptyok, s->f, s->n,
                       &j, msg, sizeof(msg));
    if (rv != 0) {
        if ((rv != -EINVAL && rv != -EBADMSG) || msg[0] == '\0' || j != NULL)
            abort(); /* a failure always says why and returns nothing */
        return 0;
    }
    check_types(s, j);
    if (pd_json_check(j, s->f, s->n, msg, sizeof(msg)) != 0)
        abort();

    /* The dump of an accepted body is accepted again, and equal. */
    dump = json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY);
    if (dump == NULL)
        abort();
    if (pd_json_parse(dump, strlen(dump), false, s->f, s->n, &j2, msg2,
                      sizeof(msg2)) != 0 ||
        !json_equal(j, j2))
        abort();
    free(dump);
    json_decref(j2);
    json_decref(j);
    return 0;
}
