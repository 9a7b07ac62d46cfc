/* node-agent cgroups: layout detection from mountinfo fixtures (v1, v2,
 * hybrid, none, containers), and real limits on this host's hierarchy
 * when the test runs as root with cpu and memory controllers. */
#include <errno.h>
#include <limits.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/util.h"
#include "node-agent/cgroup.h"

struct fx {
    char root[64];
    char mountinfo[PATH_MAX];
    char self[PATH_MAX];
};

static void
put(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");

    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void
mk(struct fx *fx, const char *rel)
{
    char p[PATH_MAX];

    snprintf(p, sizeof(p), "%s%s", fx->root, rel);
    assert_int_equal(pd_mkdir_p(p, 0755), 0);
}

static void
putf(struct fx *fx, const char *rel, const char *text)
{
    char p[PATH_MAX];

    snprintf(p, sizeof(p), "%s%s", fx->root, rel);
    put(p, text);
}

static int
setup(void **state)
{
    struct fx *fx = calloc(1, sizeof(*fx));

    strcpy(fx->root, "/tmp/pd-cg-XXXXXX");
    assert_non_null(mkdtemp(fx->root));
    snprintf(fx->mountinfo, sizeof(fx->mountinfo), "%s/mountinfo", fx->root);
    snprintf(fx->self, sizeof(fx->self), "%s/self", fx->root);
    *state = fx;
    return 0;
}

static int
teardown(void **state)
{
    struct fx *fx = *state;

    pd_rm_rf(fx->root);
    free(fx);
    return 0;
}

static const char v1_mounts[] =
    "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755\n"
    "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup "
    "rw,cpu,cpuacct\n"
    "34 31 0:31 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";

/* v1 controllers with the agent in a nested memory cgroup: the sandbox
 * parent is created below the agent's own cgroup in each hierarchy. */
static void
test_detect_v1(void **state)
{
    struct fx *fx = *state;
    struct agent_cg cg;
    struct agent_cg_source src = {fx->mountinfo, fx->self, fx->root, "auto",
                                  "paddock"};
    char err[256] = "", want[PATH_MAX];
    struct stat st;

    put(fx->mountinfo, v1_mounts);
    put(fx->self, "4:memory:/svc/x\n2:cpu,cpuacct:/\n1:cpuset:/\n");
    mk(fx, "/sys/fs/cgroup/cpu,cpuacct");
    mk(fx, "/sys/fs/cgroup/memory/svc/x");
    assert_int_equal(agent_cg_init(&cg, &src, err, sizeof(err)), 0);
    assert_int_equal(cg.mode, AGENT_CG_V1);
    assert_false(cg.hybrid);
    assert_string_equal(agent_cg_mode_name(&cg), "v1");
    snprintf(want, sizeof(want), "%s/sys/fs/cgroup/memory/svc/x/paddock",
             fx->root);
    assert_string_equal(cg.mem_dir, want);
    assert_int_equal(stat(want, &st), 0);
    snprintf(want, sizeof(want), "%s/sys/fs/cgroup/cpu,cpuacct/paddock",
             fx->root);
    assert_string_equal(cg.cpu_dir, want);

    /* Sandbox names are ids: nothing else reaches a path. */
    assert_int_equal(agent_cg_path(&cg, "../x", false, want, sizeof(want)),
                     -EINVAL);
}

/* v1 controllers beside a cgroup2 mount with no controllers (this
 * machine's layout): v1, reported as hybrid. v2 is refused by name. */
static void
test_detect_hybrid(void **state)
{
    struct fx *fx = *state;
    struct agent_cg cg;
    struct agent_cg_source src = {fx->mountinfo, fx->self, fx->root, "auto",
                                  "paddock"};
    char err[256] = "", mi[1024];

    snprintf(mi, sizeof(mi), "%s%s", v1_mounts,
             "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n");
    put(fx->mountinfo, mi);
    put(fx->self, "4:memory:/\n2:cpu,cpuacct:/\n0::/\n");
    mk(fx, "/sys/fs/cgroup/cpu,cpuacct");
    mk(fx, "/sys/fs/cgroup/memory");
    mk(fx, "/sys/fs/cgroup/unified");
    putf(fx, "/sys/fs/cgroup/unified/cgroup.controllers", "\n");
    assert_int_equal(agent_cg_init(&cg, &src, err, sizeof(err)), 0);
    assert_int_equal(cg.mode, AGENT_CG_V1);
    assert_string_equal(agent_cg_mode_name(&cg), "hybrid");

    src.want = "v2";
    assert_int_equal(agent_cg_init(&cg, &src, err, sizeof(err)), -ENOENT);
    assert_non_null(strstr(err, "no controllers"));
}

/* A pure v2 host, agent at the root: controllers are delegated to the
 * "paddock" child. */
static void
test_detect_v2(void **state)
{
    struct fx *fx = *state;
    struct agent_cg cg;
    struct agent_cg_source src = {fx->mountinfo, fx->self, fx->root, "auto",
                                  "paddock"};
    char err[256] = "", want[PATH_MAX], buf[64];
    FILE *f;

    put(fx->mountinfo,
        "24 1 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n");
    put(fx->self, "0::/\n");
    mk(fx, "/sys/fs/cgroup/paddock");
    putf(fx, "/sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory\n");
    putf(fx, "/sys/fs/cgroup/cgroup.subtree_control", "");
    putf(fx, "/sys/fs/cgroup/paddock/cgroup.subtree_control", "");
    assert_int_equal(agent_cg_init(&cg, &src, err, sizeof(err)), 0);
    assert_int_equal(cg.mode, AGENT_CG_V2);
    snprintf(want, sizeof(want), "%s/sys/fs/cgroup/paddock", fx->root);
    assert_string_equal(cg.v2_dir, want);
    snprintf(want, sizeof(want), "%s/sys/fs/cgroup/cgroup.subtree_control",
             fx->root);
    f = fopen(want, "r");
    assert_non_null(fgets(buf, sizeof(buf), f));
    fclose(f);
    assert_string_equal(buf, "+cpu +memory");

    /* Forced v1 on a v2-only host is a clear error. */
    src.want = "v1";
    assert_int_equal(agent_cg_init(&cg, &src, err, sizeof(err)), -ENOENT);
}

/* A container that sees its hierarchy mounted from /lxc/c1: the agent's
 * path in /proc/self/cgroup is relative to the host root and is mapped
 * back under the mount point. */
static void
test_detect_container_root(void **state)
{
    struct fx *fx = *state;
    struct agent_cg cg;
    struct agent_cg_source src = {fx->mountinfo, fx->self, fx->root, "v1",
                                  "paddock"};
    char err[256] = "", want[PATH_MAX];

    put(fx->mountinfo,
        "32 31 0:29 /lxc/c1 /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
        "35 31 0:32 /lxc/c1 /sys/fs/cgroup/mem\\040ory rw - cgroup cgroup "
        "rw,memory\n");
    put(fx->self, "4:memory:/lxc/c1/a\n2:cpu:/lxc/c1\n");
    mk(fx, "/sys/fs/cgroup/cpu");
    mk(fx, "/sys/fs/cgroup/mem ory/a");
    assert_int_equal(agent_cg_init(&cg, &src, err, sizeof(err)), 0);
    snprintf(want, sizeof(want), "%s/sys/fs/cgroup/mem ory/a/paddock",
             fx->root);
    assert_string_equal(cg.mem_dir, want);
    snprintf(want, sizeof(want), "%s/sys/fs/cgroup/cpu/paddock", fx->root);
    assert_string_equal(cg.cpu_dir, want);
}

/* No cgroup mounts: auto runs uncapped (mode none), v1 fails; a bad mode
 * name is rejected. */
static void
test_detect_none(void **state)
{
    struct fx *fx = *state;
    struct agent_cg cg;
    struct agent_cg_source src = {fx->mountinfo, fx->self, fx->root, "auto",
                                  "paddock"};
    char err[256] = "";

    put(fx->mountinfo, "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n");
    put(fx->self, "");
    assert_int_equal(agent_cg_init(&cg, &src, err, sizeof(err)), 0);
    assert_int_equal(cg.mode, AGENT_CG_NONE);
    assert_int_equal(agent_cg_create(&cg, "a", 1, 1 << 20, err, sizeof(err)),
                     0);
    src.want = "v1";
    assert_int_equal(agent_cg_init(&cg, &src, err, sizeof(err)), -ENOENT);
    src.want = "v3";
    assert_int_equal(agent_cg_init(&cg, &src, err, sizeof(err)), -EINVAL);
}

/* On this host, as root: a real cgroup caps a real process; the limits
 * read back are the ones asked for. */
static void
test_real_limits(void **state)
{
    struct agent_cg cg;
    struct agent_cg_source src = {NULL, NULL, NULL, "auto", "paddock-unit"};
    char err[256] = "", name[32];
    uint64_t cpu_millis, mem, ooms;
    pid_t pid;
    int st;

    (void)state;
    if (geteuid() != 0 || agent_cg_init(&cg, &src, err, sizeof(err)) != 0 ||
        cg.mode == AGENT_CG_NONE) {
        skip();
        return;
    }
    snprintf(name, sizeof(name), "unit-%d", (int)getpid());
    assert_int_equal(
        agent_cg_create(&cg, name, 2, 300ULL << 20, err, sizeof(err)), 0);
    pid = fork();
    if (pid == 0) {
        pause();
        _exit(0);
    }
    assert_int_equal(agent_cg_attach(&cg, name, pid, err, sizeof(err)), 0);
    assert_int_equal(agent_cg_read_limits(&cg, name, &cpu_millis, &mem), 0);
    assert_int_equal(cpu_millis, 2000);
    assert_int_equal(mem, 300ULL << 20);
    assert_int_equal(agent_cg_oom_kills(&cg, name, &ooms), 0);
    assert_int_equal(ooms, 0);
    /* Not removable while the process lives. */
    assert_int_equal(agent_cg_remove(&cg, name), -EBUSY);
    kill(pid, SIGKILL);
    waitpid(pid, &st, 0);
    assert_int_equal(agent_cg_remove(&cg, name), 0);
    rmdir(cg.cpu_dir);
    rmdir(cg.mem_dir);
    rmdir(cg.v2_dir);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_detect_v1, setup, teardown),
        cmocka_unit_test_setup_teardown(test_detect_hybrid, setup, teardown),
        cmocka_unit_test_setup_teardown(test_detect_v2, setup, teardown),
        cmocka_unit_test_setup_teardown(test_detect_container_root, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_detect_none, setup, teardown),
        cmocka_unit_test(test_real_limits),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
