"""The paddock CLI as a new user meets it, against a real cluster (3
schedulers, 1 agent, real VMs): progress only on a terminal, logs -f
exiting with the process's code, human times where a table had epoch
seconds, the scheduler's per-resource reason for a create that fits
nowhere, and create --wait-timeout. test_cli.py covers the commands
themselves, their exit codes, --json and failover; nothing here repeats it.

One cluster and one sandbox serve the whole module.
"""
import json
import os
import pty
import re
import subprocess
import threading

import pytest

from conftest import Cluster, binary, wait_for

SB = "uxsb"


def pd(c, *args, token=None, timeout=120, stderr=None):
    """Runs paddock; stderr=FD sends its stderr there (a terminal)."""
    env = dict(os.environ)
    env["PADDOCK_ADDR"] = c.addr
    env["PADDOCK_TOKEN"] = c.token if token is None else token
    return subprocess.run([binary("paddock")] + [str(a) for a in args],
                          stdout=subprocess.PIPE,
                          stderr=stderr if stderr is not None
                          else subprocess.PIPE,
                          env=env, timeout=timeout)


class PtyReader(threading.Thread):
    """Drains a pty master while paddock writes to the slave, so a long
    boot's progress lines never fill the pty and block paddock."""

    def __init__(self, fd):
        super().__init__(daemon=True)
        self.fd, self.data = fd, b""

    def run(self):
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO once the slave side is closed
                return
            if not chunk:
                return
            self.data += chunk


@pytest.fixture(scope="module")
def cl(module_procs, module_workdir, guest_image):
    c = Cluster(module_procs, module_workdir, schedulers=3, agents=1,
                guest=guest_image)
    c.addr = ",".join(s["api"] for s in c.sched)
    # The first create waits for a real boot with stderr on a terminal, so
    # it shows how progress looks to a person at one.
    master, slave = pty.openpty()
    reader = PtyReader(master)
    reader.start()
    try:
        r = pd(c, "sandbox", "create", SB, "--memory", "256", "--disk",
               "128", timeout=240, stderr=slave)
        os.close(slave)
        slave = None
        reader.join(10)
        c.create_tty = (r, reader.data)
        assert r.returncode == 0, c.create_tty[1]
    except BaseException:
        print(module_procs.dump_logs())
        raise
    finally:
        if slave is not None:
            os.close(slave)
        reader.join(10)
        os.close(master)
    yield c


def test_create_progress_only_on_a_terminal(cl):
    r, err = cl.create_tty
    # A TCG boot takes seconds: at least one progress line was drawn, and
    # erased before the summary (the summary itself goes to stdout).
    assert re.search(rb"\r\x1b\[Kcreating sandbox uxsb\.\.\. \d+s", err), err
    # After it, on the terminal only, a hint of what to do next.
    assert err.endswith(b"\r\x1b[Ktry: paddock exec uxsb -- uname -a\r\n"), \
        err
    out = r.stdout.decode()
    assert re.fullmatch(r"sandbox uxsb: running on node \S+ after "
                        r"\d+\.\ds\n", out), out
    # Piped, the same kind of wait draws nothing; the summary is the same.
    piped = pd(cl, "sandbox", "create", "uxpipe", "--memory", "128",
               "--disk", "64", timeout=240)
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == b"", piped.stderr
    assert piped.stdout.startswith(b"sandbox uxpipe: running on node ")
    # rm takes several ids; one unknown does not stop the others.
    rm = pd(cl, "sandbox", "rm", "uxnone", "uxpipe")
    assert rm.returncode == 3, rm.stderr
    assert rm.stdout == b"sandbox uxpipe removed\n"
    assert rm.stderr.decode().count("\n") == 1


def test_logs_follow_exits_with_the_process_code(cl):
    r = pd(cl, "start", SB, "--id", "five", "--", "sh", "-c",
           "echo out; sleep 1; echo err >&2; exit 5")
    assert r.returncode == 0, r.stderr
    f = pd(cl, "logs", SB, "five", "-f", timeout=60)
    assert f.returncode == 5, f.stderr
    assert f.stdout == b"out\n" and f.stderr == b"err\n"
    # Without -f the buffered output is read and the read succeeded.
    plain = pd(cl, "logs", SB, "five")
    assert plain.returncode == 0 and plain.stdout == b"out\n"
    # paddock's own failure under -f is 125, never a process's 3.
    gone = pd(cl, "logs", SB, "no-such-proc", "-f")
    assert gone.returncode == 125
    assert gone.stderr.decode().count("\n") == 1
    assert gone.stderr.startswith(b"paddock: ")
    # A killed process shows its signal in ps.
    assert pd(cl, "start", SB, "--id", "sleeper", "--", "sleep",
              "300").returncode == 0
    assert pd(cl, "kill", SB, "sleeper", "KILL").returncode == 0
    wait_for(lambda: re.search(rb"sleeper\s+\d+\s+exited\s+SIGKILL",
                               pd(cl, "ps", SB).stdout), 30,
             "ps to show the sleeper killed by SIGKILL")


def test_times_read_as_times(cl):
    r = pd(cl, "token", "create", "--tenant", "uxtenant", "--ttl", "1h")
    assert r.returncode == 0, r.stderr
    table = pd(cl, "token", "ls")
    assert table.returncode == 0, table.stderr
    row = [ln for ln in table.stdout.decode().splitlines()
           if "uxtenant" in ln]
    assert len(row) == 1
    assert re.search(r"\bin (59|60)m\s+no$", row[0]), row[0]
    assert not re.search(r"\b1\d{9}\b", table.stdout.decode())
    # --json keeps the API's raw epoch seconds.
    toks = json.loads(pd(cl, "--json", "token", "ls").stdout)["tokens"]
    assert all(isinstance(t["expires_at"], int) for t in toks)
    get = pd(cl, "sandbox", "get", SB).stdout.decode()
    assert re.search(r"^created_at: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC "
                     r"\(\d+[smh] ago\)$", get, re.M), get
    ages = pd(cl, "sandbox", "list").stdout.decode()
    assert not re.search(r"\b\d+ms\b", ages), ages


def test_capacity_refusal_says_why(cl):
    r = pd(cl, "sandbox", "create", "uxhuge", "--cpus", "64")
    assert r.returncode == 2
    err = r.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("paddock: "), err
    assert "no node fits" in err and "need 64" in err, err
    assert "no_capacity" in err, err


def test_wait_timeout_ends_the_wait_not_the_boot(cl):
    r = pd(cl, "sandbox", "create", "uxslow", "--memory", "128", "--disk",
           "64", "--wait-timeout", "1ms", timeout=60)
    try:
        assert r.returncode == 8, r.stderr
        assert b"still booting" in r.stderr
        assert r.stderr.decode().count("\n") == 1
        # The sandbox goes on booting; a plain create of the same spec
        # then waits for it (creates are idempotent).
        again = pd(cl, "sandbox", "create", "uxslow", "--memory", "128",
                   "--disk", "64", timeout=240)
        assert again.returncode == 0, again.stderr
        assert b"running" in again.stdout
    finally:
        pd(cl, "sandbox", "rm", "uxslow")


def test_cluster_status_and_missing_token(cl):
    st = pd(cl, "cluster", "status").stdout.decode()
    for s in cl.sched:
        assert s["api"] in st, st
    r = pd(cl, "sandbox", "list", token="")
    assert r.returncode == 7
    assert b"set PADDOCK_TOKEN" in r.stderr
