"""Shared harness for Paddock's integration tests.

Tests start the real daemons from the build tree and real VMs from the
guest image. Every process a test starts is registered with a Procs object
and is stopped (SIGTERM, then SIGKILL after a bounded wait) when the test or
module ends, even when it fails. Waits are bounded conditions, never bare
sleeps.

Environment:
  PADDOCK_BUILD      build directory (default: <repo>/build)
  PADDOCK_GUEST_DIR  guest image directory with vmlinuz and initrd.img
                     (default: <repo>/deploy/guest/out)
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("PADDOCK_BUILD", os.path.join(REPO, "build"))
GUEST_DIR = os.environ.get("PADDOCK_GUEST_DIR",
                           os.path.join(REPO, "deploy", "guest", "out"))


def binary(name):
    """Path of a built binary, by file name, searched in the build tree."""
    for sub in ("scheduler", "node-agent", "guest-agent", "cli", ""):
        p = os.path.join(BUILD, sub, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    for root, _dirs, files in os.walk(os.path.join(BUILD, "tests")):
        if name in files:
            return os.path.join(root, name)
    raise FileNotFoundError("%s not built under %s" % (name, BUILD))


def wait_for(cond, timeout=30.0, what="condition", interval=0.05):
    """Polls cond() until it returns a true value or timeout seconds pass.

    Returns the value; raises AssertionError naming `what` on timeout.
    """
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # the condition may fail until ready
            last_exc = e
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1fs waiting for %s%s" % (
                timeout, what, " (last error: %r)" % last_exc if last_exc else ""))
        time.sleep(interval)


def free_port(host="127.0.0.1"):
    """A TCP port that was free a moment ago on host."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Proc:
    def __init__(self, name, popen, log_path):
        self.name = name
        self.popen = popen
        self.log_path = log_path

    @property
    def pid(self):
        return self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def log(self):
        try:
            with open(self.log_path, "r", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def signal(self, sig):
        if self.alive():
            os.kill(self.popen.pid, sig)

    def stop(self, timeout=10.0):
        """SIGTERM, wait up to timeout, then SIGKILL. Returns exit status."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def kill(self):
        if self.alive():
            self.popen.kill()
            self.popen.wait(5)


class Procs:
    """Processes started by one test or module; all stopped at teardown."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.procs = []

    def start(self, name, argv, env=None, cwd=None):
        log_path = os.path.join(self.workdir, "%s.log" % name)
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        logf = open(log_path, "ab")
        p = subprocess.Popen([str(a) for a in argv], stdout=logf,
                             stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
                             start_new_session=True)
        logf.close()
        proc = Proc(name, p, log_path)
        self.procs.append(proc)
        return proc

    def stop_all(self):
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception:
                p.kill()

    def dump_logs(self, limit=4000):
        out = []
        for p in self.procs:
            text = p.log()
            out.append("---- %s (pid %d) ----\n%s" % (p.name, p.pid, text[-limit:]))
        return "\n".join(out)


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="paddock-test-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def procs(workdir, request):
    ps = Procs(workdir)
    yield ps
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(ps.dump_logs())
    ps.stop_all()


@pytest.fixture(scope="module")
def module_workdir():
    d = tempfile.mkdtemp(prefix="paddock-mod-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def module_procs(module_workdir):
    ps = Procs(module_workdir)
    yield ps
    ps.stop_all()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture(scope="session")
def guest_image():
    """(kernel, initrd) of the built guest image; skips nothing: fails if absent."""
    k = os.path.join(GUEST_DIR, "vmlinuz")
    i = os.path.join(GUEST_DIR, "initrd.img")
    assert os.path.isfile(k) and os.path.isfile(i), \
        "guest image missing in %s: run deploy/guest/build.sh" % GUEST_DIR
    return k, i
