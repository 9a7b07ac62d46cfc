/*
 * Paths from the host. Inside the VM everything belongs to the sandbox, so
 * this is not a jail; it only refuses what is surely a mistake or an
 * attack on a naive caller: NUL bytes, ".." components, empty paths.
 * Relative paths start at /workspace, the sandbox's disk.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "guest-agent/guest.h"

#define WORKSPACE "/workspace"

int
path_check(const char *p, size_t len, char *out, size_t outlen, char *err,
           size_t errlen)
{
    size_t need;

    if (len == 0) {
        snprintf(err, errlen, "empty path");
        return -EINVAL;
    }
    if (memchr(p, '\0', len) != NULL) {
        snprintf(err, errlen, "path holds a NUL byte");
        return -EINVAL;
    }
    if (len >= PATH_MAX) {
        snprintf(err, errlen, "path of %zu bytes is too long", len);
        return -ENAMETOOLONG;
    }
    /* Any ".." component, wherever it is: "..", "../x", "x/..", "x/../y". */
    for (size_t i = 0; i + 1 < len; i++) {
        if (p[i] == '.' && p[i + 1] == '.' && (i == 0 || p[i - 1] == '/') &&
            (i + 2 == len || p[i + 2] == '/')) {
            snprintf(err, errlen, "path has a '..' component");
            return -EINVAL;
        }
    }
    need = p[0] == '/' ? len + 1 : sizeof(WORKSPACE) + 1 + len;
    if (need > outlen || need > PATH_MAX) {
        snprintf(err, errlen, "path is too long");
        return -ENAMETOOLONG;
    }
    if (p[0] == '/')
        snprintf(out, outlen, "%.*s", (int)len, p);
    else
        snprintf(out, outlen, WORKSPACE "/%.*s", (int)len, p);
    return 0;
}

int
path_field(const struct pd_msg *m, const char *key, char *out, size_t outlen,
           char *err, size_t errlen)
{
    const char *p;
    size_t len;
    int rv = pd_msg_str(m, key, &p, &len);

    if (rv == -ENOENT) {
        snprintf(err, errlen, "field '%s' is missing", key);
        return -EINVAL;
    }
    if (rv != 0) {
        snprintf(err, errlen, "field '%s' is not a string", key);
        return -EINVAL;
    }
    return path_check(p, len, out, outlen, err, errlen);
}
