/*
 * File requests. Errors carry the errno of the failing call (ENOENT,
 * EISDIR, ENOSPC, ...) so the host can map them to HTTP statuses.
 *
 * Writes stream: FILE_WRITE opens a temporary file beside the target, each
 * DATA frame from the host is written through at once and granted back as
 * WINDOW credit, and the final DATA {eof} renames the file into place. A
 * failed or abandoned write removes the temporary file, so a full disk
 * (ENOSPC) leaves no partial file behind and its space is free again.
 * Append mode writes the target itself.
 *
 * Reads stream: OK {size, mode} first, then DATA chunks within the credit
 * the host grants, the last with eof. Neither side holds a whole file.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <libgen.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "guest-agent/guest.h"

static const char *
type_name(mode_t m)
{
    if (S_ISREG(m))
        return "file";
    if (S_ISDIR(m))
        return "dir";
    if (S_ISLNK(m))
        return "symlink";
    return "other";
}

static uint64_t
mtime_ms(const struct stat *st)
{
    return (uint64_t)st->st_mtim.tv_sec * 1000 +
           (uint64_t)st->st_mtim.tv_nsec / 1000000;
}

/* Reads a checked path field, answering the error itself. */
static int
req_path(const struct pd_msg *m, const char *key, char *out)
{
    char err[160];
    int rv = path_field(m, key, out, PATH_MAX, err, sizeof(err));

    if (rv != 0)
        chan_error(m->id, -rv, "%s: %s", key, err);
    return rv;
}

/*
 * Reads the optional flag bkey and number nkey (either may be NULL); a
 * field that is present with the wrong type, or a mode beyond 07777, is
 * answered with EINVAL here.
 */
static int
req_opts(const struct pd_msg *m, const char *bkey, bool *b, const char *nkey,
         uint64_t *n)
{
    if (bkey != NULL && pd_msg_bool(m, bkey, b) == -EPROTO) {
        chan_error(m->id, EINVAL, "%s must be a boolean", bkey);
        return -EINVAL;
    }
    if (nkey != NULL && (pd_msg_u64(m, nkey, n) == -EPROTO ||
                         *n > 07777)) {
        chan_error(m->id, EINVAL, "%s must be a mode from 0 to 07777",
                   nkey);
        return -EINVAL;
    }
    return 0;
}

/* ---- write -------------------------------------------------------------- */

struct gfwrite {
    struct greq req;
    int fd;
    bool append;
    uint64_t size;
    unsigned mode;
    char path[PATH_MAX];
    char tmp[PATH_MAX];
};

static void
fwrite_free(struct gfwrite *w, bool keep)
{
    if (w->fd >= 0)
        close(w->fd);
    if (!keep && w->tmp[0] != '\0')
        unlink(w->tmp);
    free(w);
}

static void
fwrite_fail(struct gfwrite *w, int errnum, const char *what)
{
    chan_error(w->req.id, errnum, "%s %s: %s", what, w->path,
               strerror(errnum));
    greq_remove(&w->req);
    fwrite_free(w, false);
}

static void
fwrite_on_msg(struct greq *r, const struct pd_msg *m)
{
    struct gfwrite *w = (struct gfwrite *)r;
    const unsigned char *p = NULL;
    size_t n = 0, off = 0;
    bool eof = false;
    struct pd_enc e;

    if (m->type != PD_MSG_DATA)
        return;
    pd_msg_bin(m, "data", (const void **)&p, &n);
    pd_msg_bool(m, "eof", &eof);
    while (off < n) {
        ssize_t k = write(w->fd, p + off, n - off);

        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            fwrite_fail(w, k < 0 ? errno : EIO, "write");
            return;
        }
        off += (size_t)k;
    }
    w->size += n;
    if (!eof) {
        if (n > 0)
            chan_window(r->id, n);
        return;
    }
    if (w->tmp[0] != '\0') {
        if (fchmod(w->fd, w->mode) != 0 || rename(w->tmp, w->path) != 0) {
            fwrite_fail(w, errno, "rename into");
            return;
        }
        w->tmp[0] = '\0';
    }
    pd_enc_begin(&e, PD_MSG_OK, r->id);
    pd_enc_u64(&e, "size", w->size);
    chan_send(&e);
    greq_remove(r);
    fwrite_free(w, true);
}

static void
fwrite_abort(struct greq *r)
{
    fwrite_free((struct gfwrite *)r, false);
}

static const struct greq_ops fwrite_ops = {
    .on_msg = fwrite_on_msg,
    .abort = fwrite_abort,
};

void
file_write_request(const struct pd_msg *m)
{
    struct gfwrite *w = calloc(1, sizeof(*w));
    uint64_t mode = 0644;
    struct stat st;
    char dir[PATH_MAX], base[PATH_MAX];

    if (w == NULL) {
        chan_error(m->id, ENOMEM, "out of memory");
        return;
    }
    w->fd = -1;
    if (req_path(m, "path", w->path) != 0) {
        free(w);
        return;
    }
    if (req_opts(m, "append", &w->append, "mode", &mode) != 0) {
        free(w);
        return;
    }
    w->mode = (unsigned)mode;
    if (stat(w->path, &st) == 0 && S_ISDIR(st.st_mode)) {
        chan_error(m->id, EISDIR, "%s is a directory", w->path);
        free(w);
        return;
    }
    if (w->append) {
        w->fd = open(w->path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC,
                     w->mode);
    } else {
        pd_strlcpy(dir, w->path, sizeof(dir));
        pd_strlcpy(base, w->path, sizeof(base));
        if ((size_t)snprintf(w->tmp, sizeof(w->tmp), "%s/.%s.pd%llu.tmp",
                             dirname(dir), basename(base),
                             (unsigned long long)m->id) >= sizeof(w->tmp)) {
            chan_error(m->id, ENAMETOOLONG, "path is too long");
            free(w);
            return;
        }
        w->fd = open(w->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
                     0600);
    }
    if (w->fd < 0) {
        int err = errno;

        w->tmp[0] = '\0';
        chan_error(m->id, err, "open %s: %s", w->path, strerror(err));
        free(w);
        return;
    }
    greq_add(&w->req, m->id, m->type, &fwrite_ops);
}

/* ---- read --------------------------------------------------------------- */

struct gfread {
    struct greq req;
    int fd;
    struct gwatch task;
};

static void
fread_free(struct gfread *f)
{
    watch_del(&f->task);
    close(f->fd);
    free(f);
}

static short
fread_want(struct gwatch *w)
{
    struct gfread *f = w->obj;

    return chan_room() && f->req.credit > 0 ? POLLIN : 0;
}

static void
fread_ready(struct gwatch *w, short rev)
{
    static unsigned char buf[GUEST_CHUNK];
    struct gfread *f = w->obj;
    size_t want = sizeof(buf);
    struct pd_enc e;
    ssize_t n;

    (void)rev;
    if (f->req.credit < want)
        want = (size_t)f->req.credit;
    do {
        n = read(f->fd, buf, want);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        chan_error(f->req.id, errno, "read: %s", strerror(errno));
        greq_remove(&f->req);
        fread_free(f);
        return;
    }
    pd_enc_begin(&e, PD_MSG_DATA, f->req.id);
    pd_enc_bin(&e, "data", buf, (size_t)n);
    pd_enc_bool(&e, "eof", n == 0);
    chan_send(&e);
    f->req.credit -= (uint64_t)n;
    if (n == 0) {
        greq_remove(&f->req);
        fread_free(f);
    }
}

static void
fread_abort(struct greq *r)
{
    fread_free((struct gfread *)r);
}

static const struct greq_ops fread_ops = {.abort = fread_abort};

void
file_read_request(const struct pd_msg *m)
{
    char path[PATH_MAX];
    struct gfread *f;
    struct stat st;
    struct pd_enc e;
    int fd;

    if (req_path(m, "path", path) != 0)
        return;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        chan_error(m->id, errno, "open %s: %s", path, strerror(errno));
        return;
    }
    if (fstat(fd, &st) != 0 || S_ISDIR(st.st_mode)) {
        int err = S_ISDIR(st.st_mode) ? EISDIR : errno;

        chan_error(m->id, err, "read %s: %s", path, strerror(err));
        close(fd);
        return;
    }
    f = calloc(1, sizeof(*f));
    if (f == NULL) {
        close(fd);
        chan_error(m->id, ENOMEM, "out of memory");
        return;
    }
    f->fd = fd;
    f->task = (struct gwatch){.fd = -1, .want = fread_want,
                              .ready = fread_ready, .obj = f, .slot = -1};
    pd_enc_begin(&e, PD_MSG_OK, m->id);
    pd_enc_u64(&e, "size", (uint64_t)st.st_size);
    pd_enc_u64(&e, "mode", st.st_mode & 07777);
    chan_send(&e);
    greq_add(&f->req, m->id, m->type, &fread_ops);
    watch_add(&f->task);
}

/* ---- metadata ----------------------------------------------------------- */

void
file_stat_request(const struct pd_msg *m)
{
    char path[PATH_MAX];
    struct stat st;
    struct pd_enc e;

    if (req_path(m, "path", path) != 0)
        return;
    if (stat(path, &st) != 0 && lstat(path, &st) != 0) {
        chan_error(m->id, errno, "stat %s: %s", path, strerror(errno));
        return;
    }
    pd_enc_begin(&e, PD_MSG_OK, m->id);
    pd_enc_str(&e, "type", type_name(st.st_mode));
    pd_enc_u64(&e, "size", (uint64_t)st.st_size);
    pd_enc_u64(&e, "mode", st.st_mode & 07777);
    pd_enc_u64(&e, "mtime_ms", mtime_ms(&st));
    chan_send(&e);
}

struct listing {
    msgpack_sbuffer sb;
    msgpack_packer pk;
    uint32_t count;
    bool truncated;
};

static void
pack_cstr(msgpack_packer *pk, const char *s)
{
    size_t n = strlen(s);

    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

static void
list_entry(struct listing *l, const char *name, const struct stat *st)
{
    msgpack_pack_map(&l->pk, 5);
    pack_cstr(&l->pk, "name");
    pack_cstr(&l->pk, name);
    pack_cstr(&l->pk, "type");
    pack_cstr(&l->pk, type_name(st->st_mode));
    pack_cstr(&l->pk, "size");
    msgpack_pack_uint64(&l->pk, (uint64_t)st->st_size);
    pack_cstr(&l->pk, "mode");
    msgpack_pack_uint64(&l->pk, st->st_mode & 07777);
    pack_cstr(&l->pk, "mtime_ms");
    msgpack_pack_uint64(&l->pk, mtime_ms(st));
    l->count++;
}

/*
 * Lists dir (rel is its name relative to the listed root) into l, depth
 * first when recursive; symlinks are reported, never followed. The array's
 * count is only known at the end, so entries are packed into a scratch
 * buffer first. The listing stops (truncated) well below the frame cap.
 */
static int
list_dir(struct listing *l, const char *dir, const char *rel, bool recursive,
         int depth)
{
    DIR *d = opendir(dir);
    struct dirent *de;

    if (d == NULL)
        return -errno;
    while ((de = readdir(d)) != NULL) {
        char full[PATH_MAX], name[PATH_MAX];
        struct stat st;

        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        if (l->count >= GUEST_LIST_MAX || l->sb.size > PD_FRAME_MAX / 2) {
            l->truncated = true;
            break;
        }
        if ((size_t)snprintf(full, sizeof(full), "%s/%s", dir, de->d_name) >=
                sizeof(full) ||
            (size_t)snprintf(name, sizeof(name), "%s%s%s", rel,
                             rel[0] ? "/" : "", de->d_name) >= sizeof(name))
            continue;
        if (lstat(full, &st) != 0)
            continue;
        list_entry(l, name, &st);
        if (recursive && S_ISDIR(st.st_mode) && depth < 64)
            list_dir(l, full, name, true, depth + 1);
    }
    closedir(d);
    return 0;
}

void
file_list_request(const struct pd_msg *m)
{
    char path[PATH_MAX];
    struct listing l = {0};
    bool recursive = false;
    struct pd_enc e;
    int rv;

    if (req_path(m, "path", path) != 0 ||
        req_opts(m, "recursive", &recursive, NULL, NULL) != 0)
        return;
    msgpack_sbuffer_init(&l.sb);
    msgpack_packer_init(&l.pk, &l.sb, msgpack_sbuffer_write);
    rv = list_dir(&l, path, "", recursive, 0);
    if (rv != 0) {
        msgpack_sbuffer_destroy(&l.sb);
        chan_error(m->id, -rv, "list %s: %s", path, strerror(-rv));
        return;
    }
    pd_enc_begin(&e, PD_MSG_OK, m->id);
    pd_enc_bool(&e, "truncated", l.truncated);
    pd_enc_key(&e, "entries");
    msgpack_pack_array(&e.pk, l.count);
    if (l.sb.size > 0 &&
        msgpack_sbuffer_write(&e.sbuf, l.sb.data, l.sb.size) != 0)
        e.err = -ENOMEM;
    msgpack_sbuffer_destroy(&l.sb);
    chan_send(&e);
}

void
file_mkdir_request(const struct pd_msg *m)
{
    char path[PATH_MAX];
    bool parents = false;
    uint64_t mode = 0755;
    struct stat st;
    int rv;

    if (req_path(m, "path", path) != 0 ||
        req_opts(m, "parents", &parents, "mode", &mode) != 0)
        return;
    if (parents) {
        rv = pd_mkdir_p(path, (unsigned)(mode & 07777));
        if (rv == 0 && (stat(path, &st) != 0 || !S_ISDIR(st.st_mode)))
            rv = -ENOTDIR;
    } else {
        rv = mkdir(path, (mode_t)(mode & 07777)) == 0 ? 0 : -errno;
    }
    if (rv != 0) {
        chan_error(m->id, -rv, "mkdir %s: %s", path, strerror(-rv));
        return;
    }
    chan_ok(m->id);
}

static int
rm_one(const char *p, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)ftw;
    if (flag == FTW_DP || flag == FTW_D)
        return rmdir(p) == 0 ? 0 : -errno;
    return unlink(p) == 0 ? 0 : -errno;
}

void
file_delete_request(const struct pd_msg *m)
{
    char path[PATH_MAX];
    bool recursive = false;
    struct stat st;
    int rv;

    if (req_path(m, "path", path) != 0 ||
        req_opts(m, "recursive", &recursive, NULL, NULL) != 0)
        return;
    if (strcmp(path, "/") == 0 || strspn(path, "/") == strlen(path)) {
        chan_error(m->id, EPERM, "refusing to delete /");
        return;
    }
    if (lstat(path, &st) != 0) {
        chan_error(m->id, errno, "delete %s: %s", path, strerror(errno));
        return;
    }
    if (!S_ISDIR(st.st_mode))
        rv = unlink(path) == 0 ? 0 : -errno;
    else if (!recursive)
        rv = rmdir(path) == 0 ? 0 : -errno;
    else
        rv = nftw(path, rm_one, 32, FTW_DEPTH | FTW_PHYS);
    if (rv == -1)
        rv = -errno;
    if (rv != 0) {
        chan_error(m->id, -rv, "delete %s: %s", path, strerror(-rv));
        return;
    }
    chan_ok(m->id);
}

/* Moves a regular file across file systems: copy, then unlink. */
static int
move_file(const char *from, const char *to)
{
    static unsigned char buf[65536];
    struct stat st;
    int in, out, rv = 0;
    ssize_t n;

    in = open(from, O_RDONLY | O_CLOEXEC);
    if (in < 0)
        return -errno;
    if (fstat(in, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(in);
        return -EXDEV;
    }
    out = open(to, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
               st.st_mode & 07777);
    if (out < 0) {
        rv = -errno;
        close(in);
        return rv;
    }
    while ((n = read(in, buf, sizeof(buf))) > 0) {
        if (write(out, buf, (size_t)n) != n) {
            rv = errno != 0 ? -errno : -EIO;
            break;
        }
    }
    if (n < 0)
        rv = -errno;
    close(in);
    if (close(out) != 0 && rv == 0)
        rv = -errno;
    if (rv != 0) {
        unlink(to);
        return rv;
    }
    return unlink(from) == 0 ? 0 : -errno;
}

void
file_rename_request(const struct pd_msg *m)
{
    char from[PATH_MAX], to[PATH_MAX];
    int rv;

    if (req_path(m, "from", from) != 0 || req_path(m, "to", to) != 0)
        return;
    rv = rename(from, to) == 0 ? 0 : -errno;
    if (rv == -EXDEV)
        rv = move_file(from, to);
    if (rv != 0) {
        chan_error(m->id, -rv, "rename %s to %s: %s", from, to,
                   strerror(-rv));
        return;
    }
    chan_ok(m->id);
}
