#include "common/util.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static bool
id_char(char c, bool first)
{
    if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'))
        return true;
    return !first && c == '-';
}

bool
pd_id_valid_n(const char *s, size_t len)
{
    if (s == NULL || len == 0 || len > PD_ID_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        if (!id_char(s[i], i == 0))
            return false;
    }
    return true;
}

bool
pd_id_valid(const char *s)
{
    return s != NULL && pd_id_valid_n(s, strnlen(s, PD_ID_MAX + 1));
}

bool
pd_label_valid(const char *s, size_t max)
{
    size_t n = 0;

    if (s == NULL || *s == '\0')
        return false;
    for (; s[n] != '\0'; n++) {
        unsigned char c = (unsigned char)s[n];

        if (n >= max || c < 0x21 || c > 0x7e || c == '=' || c == ',')
            return false;
    }
    return true;
}

uint64_t
pd_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t
pd_now_ms(void)
{
    return pd_now_ns() / 1000000u;
}

uint64_t
pd_wall_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

int
pd_parse_u64(const char *s, uint64_t *out)
{
    uint64_t v = 0;

    if (s == NULL || *s == '\0')
        return -EINVAL;
    for (; *s != '\0'; s++) {
        if (*s < '0' || *s > '9')
            return -EINVAL;
        if (v > (UINT64_MAX - (uint64_t)(*s - '0')) / 10)
            return -ERANGE;
        v = v * 10 + (uint64_t)(*s - '0');
    }
    *out = v;
    return 0;
}

/* Splits "123abc" into 123 and "abc"; the unit must follow directly. */
static int
split_number(const char *s, uint64_t *num, const char **unit)
{
    char digits[24];
    size_t n = 0;

    while (s[n] >= '0' && s[n] <= '9') {
        if (n + 1 >= sizeof(digits))
            return -ERANGE;
        digits[n] = s[n];
        n++;
    }
    if (n == 0)
        return -EINVAL;
    digits[n] = '\0';
    *unit = s + n;
    return pd_parse_u64(digits, num);
}

static int
mul_checked(uint64_t a, uint64_t b, uint64_t *out)
{
    if (b != 0 && a > UINT64_MAX / b)
        return -ERANGE;
    *out = a * b;
    return 0;
}

int
pd_parse_duration_ms(const char *s, uint64_t *out_ms)
{
    static const struct {
        const char *unit;
        uint64_t ms;
    } units[] = {{"ms", 1}, {"s", 1000}, {"", 1000}, {"m", 60000},
                 {"h", 3600000}, {"d", 86400000}};
    const char *unit;
    uint64_t n;
    int rv;

    if (s == NULL)
        return -EINVAL;
    rv = split_number(s, &n, &unit);
    if (rv != 0)
        return rv;
    for (size_t i = 0; i < PD_ARRAY_SIZE(units); i++) {
        if (strcmp(unit, units[i].unit) == 0)
            return mul_checked(n, units[i].ms, out_ms);
    }
    return -EINVAL;
}

int
pd_parse_size(const char *s, uint64_t *out)
{
    const char *unit;
    uint64_t n, mult;
    int rv;

    if (s == NULL)
        return -EINVAL;
    rv = split_number(s, &n, &unit);
    if (rv != 0)
        return rv;
    switch (toupper((unsigned char)unit[0])) {
    case '\0': mult = 1; break;
    case 'K': mult = 1ull << 10; break;
    case 'M': mult = 1ull << 20; break;
    case 'G': mult = 1ull << 30; break;
    case 'T': mult = 1ull << 40; break;
    default: return -EINVAL;
    }
    /* Accept "M", "MB", "MiB". */
    if (unit[0] != '\0' && unit[1] != '\0' && strcmp(unit + 1, "B") != 0 &&
        strcmp(unit + 1, "iB") != 0)
        return -EINVAL;
    return mul_checked(n, mult, out);
}

int
pd_random_bytes(void *buf, size_t len)
{
    unsigned char *p = buf;

    while (len > 0) {
        ssize_t n = getrandom(p, len, 0);

        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

void
pd_hex(const void *in, size_t len, char *out)
{
    static const char digits[] = "0123456789abcdef";
    const unsigned char *p = in;

    for (size_t i = 0; i < len; i++) {
        out[2 * i] = digits[p[i] >> 4];
        out[2 * i + 1] = digits[p[i] & 15];
    }
    out[2 * len] = '\0';
}

size_t
pd_strlcpy(char *dst, const char *src, size_t size)
{
    size_t n = strlen(src);

    if (size > 0) {
        size_t c = n < size - 1 ? n : size - 1;

        memcpy(dst, src, c);
        dst[c] = '\0';
    }
    return n;
}

int
pd_mkdir_p(const char *path, unsigned mode)
{
    char buf[4096];
    size_t n = pd_strlcpy(buf, path, sizeof(buf));

    if (n >= sizeof(buf))
        return -ENAMETOOLONG;
    for (char *p = buf + 1; *p != '\0'; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, mode) != 0 && errno != EEXIST)
            return -errno;
        *p = '/';
    }
    if (mkdir(buf, mode) != 0 && errno != EEXIST)
        return -errno;
    return 0;
}

static int
rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    PD_UNUSED(st);
    PD_UNUSED(flag);
    PD_UNUSED(ftw);
    if (remove(path) != 0 && errno != ENOENT)
        return -errno;
    return 0;
}

int
pd_rm_rf(const char *path)
{
    int rv = nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS);

    if (rv < 0 && errno == ENOENT)
        return 0;
    return rv < 0 ? -errno : rv;
}

int
pd_read_file(const char *path, char **out, size_t *out_len, size_t max)
{
    char *buf = NULL;
    size_t got = 0, cap = 0;
    int fd, rv = 0;

    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    /*
     * Read until end of file rather than trusting fstat's size: /proc and
     * cgroup files report a size of 0, and a file may grow meanwhile.
     */
    for (;;) {
        ssize_t n;

        if (got == cap) {
            size_t ncap = cap == 0 ? 4096 : cap * 2;
            char *p;

            if (cap > max) {
                rv = -EFBIG;
                goto out;
            }
            p = realloc(buf, ncap + 1);
            if (p == NULL) {
                rv = -ENOMEM;
                goto out;
            }
            buf = p;
            cap = ncap;
        }
        n = read(fd, buf + got, cap - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rv = -errno;
            goto out;
        }
        if (n == 0)
            break;
        got += (size_t)n;
        if (got > max) {
            rv = -EFBIG;
            goto out;
        }
    }
    buf[got] = '\0';
    *out = buf;
    buf = NULL;
    if (out_len != NULL)
        *out_len = got;
out:
    free(buf);
    close(fd);
    return rv;
}

int
pd_write_file_atomic(const char *path, const void *data, size_t len,
                     unsigned mode)
{
    char tmp[4096];
    const char *p = data;
    int fd, rv = 0;

    if ((size_t)snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= sizeof(tmp))
        return -ENAMETOOLONG;
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (fd < 0)
        return -errno;
    while (len > 0) {
        ssize_t n = write(fd, p, len);

        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rv = -errno;
            break;
        }
        p += n;
        len -= (size_t)n;
    }
    if (rv == 0 && fsync(fd) != 0)
        rv = -errno;
    close(fd);
    if (rv == 0 && rename(tmp, path) != 0)
        rv = -errno;
    if (rv != 0)
        unlink(tmp);
    return rv;
}

bool
pd_ct_equal(const void *a, const void *b, size_t len)
{
    const volatile unsigned char *x = a;
    const volatile unsigned char *y = b;
    unsigned char acc = 0;

    for (size_t i = 0; i < len; i++)
        acc |= x[i] ^ y[i];
    return acc == 0;
}
