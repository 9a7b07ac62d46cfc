#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "common/util.h"

/*
 * Files stream both ways: put reads the local file (or stdin) as curl
 * sends it, get writes each piece as it arrives, so neither side holds a
 * whole file. A download goes to LOCAL.paddock-part first and is renamed
 * into place only when complete.
 */

static int
put(struct cli *c, const char *id, const char *path, const char *local)
{
    struct cli_call k = {.method = "PUT"};
    char label[300];
    struct stat st;
    FILE *f;
    int rv;

    if (local == NULL || strcmp(local, "-") == 0) {
        f = stdin;
    } else {
        f = fopen(local, "rb");
        if (f == NULL) {
            cli_errorf("%s: %s", local, strerror(errno));
            return EXIT_LOCAL;
        }
    }
    k.upload = f;
    k.upload_size = -1;
    if (fstat(fileno(f), &st) == 0 && S_ISREG(st.st_mode))
        k.upload_size = st.st_size;
    k.path = cli_path("/v1/sandboxes/%s/files?path=%s", id, path);
    snprintf(label, sizeof(label), "uploading %s", path);
    k.progress = label;
    rv = cli_do(c, &k);
    if (rv == EXIT_OK)
        rv = cli_check(c, &k);
    if (rv == EXIT_OK && c->json) {
        json_t *j = k.resp_len > 0 ? json_loads(k.resp_body, 0, NULL)
                                   : NULL;

        if (j == NULL)
            j = json_pack("{s:s}", "path", path);
        print_json(j);
        json_decref(j);
    } else if (rv == EXIT_OK && c->tty && !c->quiet) {
        /* The progress line was erased: say what arrived. Scripts (no
         * terminal) get silence, as from cp. */
        json_t *j = k.resp_len > 0 ? json_loads(k.resp_body, 0, NULL)
                                   : NULL;
        char size[16];

        if (json_is_integer(json_object_get(j, "size"))) {
            fmt_bytes((uint64_t)json_integer_value(json_object_get(j,
                                                                   "size")),
                      size, sizeof(size));
            fprintf(stderr, "wrote %s to %s:%s\n", size, id, path);
        }
        json_decref(j);
    }
    if (f != stdin)
        fclose(f);
    free((char *)k.path);
    cli_call_free(&k);
    return rv;
}

struct sink {
    FILE *f;
    const char *tmp;
    bool failed;
};

static size_t
sink_data(const char *p, size_t n, void *arg)
{
    struct sink *s = arg;

    if (s->f == NULL) {
        s->f = fopen(s->tmp, "wb");
        if (s->f == NULL) {
            cli_errorf("%s: %s", s->tmp, strerror(errno));
            s->failed = true;
            return 0;
        }
    }
    if (fwrite(p, 1, n, s->f) != n) {
        s->failed = true;
        return 0;
    }
    return n;
}

static int
get(struct cli *c, const char *id, const char *path, const char *local)
{
    struct cli_call k = {.method = "GET"};
    bool to_stdout = local == NULL || strcmp(local, "-") == 0;
    struct sink s = {0};
    struct stat st;
    char *tmp = NULL, label[300], size[16];
    int rv;

    if (to_stdout) {
        s.f = stdout;
    } else if (asprintf(&tmp, "%s.paddock-part", local) < 0) {
        return EXIT_LOCAL;
    }
    s.tmp = tmp;
    k.path = cli_path("/v1/sandboxes/%s/files?path=%s", id, path);
    k.on_data = sink_data;
    k.arg = &s;
    snprintf(label, sizeof(label), "downloading %s", path);
    k.progress = to_stdout && isatty(1) ? NULL : label;
    rv = cli_do(c, &k);
    if (rv == EXIT_OK)
        rv = cli_check(c, &k);
    if (s.failed)
        rv = EXIT_LOCAL;
    if (!to_stdout) {
        if (rv == EXIT_OK && s.f == NULL)
            s.f = fopen(tmp, "wb"); /* an empty file */
        if (s.f != NULL && fclose(s.f) != 0 && rv == EXIT_OK) {
            cli_errorf("%s: %s", tmp, strerror(errno));
            rv = EXIT_LOCAL;
        }
        if (rv == EXIT_OK && rename(tmp, local) != 0) {
            cli_errorf("%s: %s", local, strerror(errno));
            rv = EXIT_LOCAL;
        }
        if (rv != EXIT_OK)
            unlink(tmp);
        if (rv == EXIT_OK && c->tty && !c->quiet && !c->json &&
            stat(local, &st) == 0) {
            fmt_bytes((uint64_t)st.st_size, size, sizeof(size));
            fprintf(stderr, "saved %s to %s\n", size, local);
        }
    } else if (fflush(stdout) != 0 && rv == EXIT_OK) {
        rv = EXIT_LOCAL;
    }
    free(tmp);
    free((char *)k.path);
    cli_call_free(&k);
    return rv;
}

static void
mode_text(const json_t *e, char *buf, size_t len)
{
    const json_t *m = json_object_get(e, "mode");

    if (json_is_integer(m))
        snprintf(buf, len, "%04llo",
                 (unsigned long long)json_integer_value(m) & 07777);
    else
        fmt_scalar(m, buf, len);
}

static int
ls(struct cli *c, const char *id, const char *path, bool recursive)
{
    static const char *const head[] = {"TYPE", "MODE", "SIZE", "MODIFIED",
                                       "NAME"};
    json_t *resp, *items, *e;
    struct table t;
    char *p;
    size_t i;
    int rv;

    p = cli_path(recursive ? "/v1/sandboxes/%s/files/list?path=%s"
                             "&recursive=true"
                           : "/v1/sandboxes/%s/files/list?path=%s",
                 id, path);
    rv = cli_json(c, "GET", p, NULL, &resp);
    free(p);
    if (rv != EXIT_OK)
        return rv;
    if (c->json) {
        print_json(resp);
        json_decref(resp);
        return EXIT_OK;
    }
    items = list_items(resp, "entries");
    table_init(&t, 5, head);
    json_array_foreach(items, i, e) {
        char type[16], mode[16], size[16], age[16], name[1024];
        const char *cells[5] = {type, mode, size, age, name};
        const json_t *sz = json_object_get(e, "size");

        json_text(e, "type", type, sizeof(type));
        mode_text(e, mode, sizeof(mode));
        if (json_is_integer(sz))
            fmt_bytes((uint64_t)json_integer_value(sz), size, sizeof(size));
        else
            snprintf(size, sizeof(size), "-");
        fmt_age(json_object_get(e, "mtime"), pd_wall_ms(), age, sizeof(age));
        json_text(e, "name", name, sizeof(name));
        table_add(&t, cells);
    }
    table_sort(&t, 4); /* the guest lists in directory order, as ls does not */
    table_print(&t, stdout);
    table_free(&t);
    json_decref(resp);
    return EXIT_OK;
}

static int
simple(struct cli *c, const char *method, char *path, json_t *body)
{
    json_t *resp;
    int rv = cli_json(c, method, path, body, &resp);

    if (rv == EXIT_OK && c->json && resp != NULL)
        print_json(resp);
    json_decref(resp);
    json_decref(body);
    free(path);
    return rv;
}

int
cmd_file(struct cli *c, int argc, char **argv)
{
    static const struct cli_opt opts[] = {
        {"--recursive", "-r", false, false},
        {"--parents", "-p", false, false},
    };
    const char *sub = argc > 0 ? argv[0] : "";
    struct cli_args a;
    char err[256];

    if (cli_args_parse(argc - 1, argv + 1, opts, 2, &a, err,
                       sizeof(err)) < 0)
        return usage_error("%s", err);
    if (a.npos >= 1 && !pd_id_valid(a.pos[0]))
        return usage_error("bad sandbox id '%s'", a.pos[0]);
    if (a.npos >= 2 && a.pos[1][0] == '\0')
        return usage_error("empty path");
    if (strcmp(sub, "put") == 0 && (a.npos == 2 || a.npos == 3))
        return put(c, a.pos[0], a.pos[1], a.npos == 3 ? a.pos[2] : NULL);
    if (strcmp(sub, "get") == 0 && (a.npos == 2 || a.npos == 3))
        return get(c, a.pos[0], a.pos[1], a.npos == 3 ? a.pos[2] : NULL);
    if (strcmp(sub, "ls") == 0 && (a.npos == 1 || a.npos == 2))
        return ls(c, a.pos[0], a.npos == 2 ? a.pos[1] : "/workspace",
                  a.set[0]);
    if (strcmp(sub, "rm") == 0 && a.npos == 2)
        return simple(c, "DELETE",
                      cli_path(a.set[0] ? "/v1/sandboxes/%s/files?path=%s"
                                          "&recursive=true"
                                        : "/v1/sandboxes/%s/files?path=%s",
                               a.pos[0], a.pos[1]),
                      NULL);
    if (strcmp(sub, "mkdir") == 0 && a.npos == 2)
        return simple(c, "POST",
                      cli_path("/v1/sandboxes/%s/files/mkdir", a.pos[0]),
                      json_pack("{s:s,s:b}", "path", a.pos[1], "parents",
                                a.set[1]));
    if ((strcmp(sub, "mv") == 0 || strcmp(sub, "rename") == 0) &&
        a.npos == 3)
        return simple(c, "POST",
                      cli_path("/v1/sandboxes/%s/files/rename", a.pos[0]),
                      json_pack("{s:s,s:s}", "from", a.pos[1], "to",
                                a.pos[2]));
    return usage_error("usage: paddock file put ID PATH [LOCAL|-] | get ID "
                       "PATH [LOCAL|-] | ls ID [PATH] [-r] | rm ID PATH "
                       "[-r] | mkdir ID PATH [-p] | mv ID FROM TO");
}
