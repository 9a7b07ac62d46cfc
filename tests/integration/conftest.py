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


_given_ports = set()


def free_port(host="127.0.0.1"):
    """A TCP port that was free a moment ago on host.

    Chosen below the kernel's ephemeral range (ip_local_port_range), so
    that the outgoing connections of the daemons already running cannot
    take it between this call and the daemon's bind; never the same port
    twice in one test run.
    """
    import random
    lo = 20000
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            eph = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        eph = 32768
    hi = max(lo + 1000, min(eph, 32768))
    for _ in range(1000):
        port = random.randrange(lo, hi)
        if port in _given_ports:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _given_ports.add(port)
        return port
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


def pids_under(path):
    """Pids of processes (not this one) whose argv names a path in path."""
    me, pids = os.getpid(), []
    needle = os.path.join(path, "").encode()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open("/proc/%s/cmdline" % d, "rb") as f:
                argv = f.read()
            with open("/proc/%s/stat" % d) as f:
                zombie = f.read().split(") ")[-1][0] == "Z"
        except OSError:
            continue
        if needle in argv and not zombie:
            pids.append(int(d))
    return pids


def sweep(path):
    """SIGKILLs whatever still runs from path (a QEMU its agent left when
    the agent was killed) and waits, bounded, for it to go; a leftover is a
    warning, so a leak shows without failing every later test."""
    import warnings
    left = pids_under(path)
    if not left:
        return
    warnings.warn("killed processes left running under %s: %s" % (
        path, left))
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + 10
    while pids_under(path) and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="paddock-test-")
    yield d
    sweep(d)
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
    sweep(d)
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


# ---- A Paddock cluster on loopback (appended by tokens) --------------------

def http_json(method, addr, path, token=None, body=None, headers=None,
              timeout=30.0, tls_ca=None):
    """One HTTP request to host:port (HTTPS verified against tls_ca when
    given); returns (status, headers, JSON or raw bytes). Never raises for
    an HTTP error status."""
    import http.client
    import json as _json
    import ssl
    host, port = addr.rsplit(":", 1)
    if tls_ca:
        c = http.client.HTTPSConnection(
            host, int(port), timeout=timeout,
            context=ssl.create_default_context(cafile=tls_ca))
    else:
        c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    h = dict(headers or {})
    if token:
        h["Authorization"] = "Bearer " + token
    data = None
    if body is not None:
        data = body if isinstance(body, (bytes, str)) else _json.dumps(body)
        h.setdefault("Content-Type", "application/json")
    try:
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        raw = r.read()
        try:
            val = _json.loads(raw) if raw else None
        except ValueError:
            val = raw
        return r.status, dict(r.getheaders()), val
    finally:
        c.close()


class Cluster:
    """Schedulers (and optionally agents) started by hand on loopback, with
    certificates from deploy/make-certs.sh. Every process is registered
    with procs, so the fixture that owns procs stops them all."""

    def __init__(self, procs, workdir, schedulers=3, agents=0,
                 guest=None, sched_env=None, agent_args=None,
                 sched_args=None, agent_env=None, tls_api=False):
        self.procs = procs
        self.dir = workdir
        self.pki = os.path.join(workdir, "pki")
        # QEMU runs as an unprivileged user when the agent is root: it must
        # be able to reach the agents' data directories inside workdir.
        os.chmod(workdir, 0o711)
        names = ["s%d" % i for i in range(1, schedulers + 1)]
        # Node ids (the certificates' CNs) name cgroups shared by every
        # agent on this machine: a suffix keeps concurrent test clusters
        # out of each other's way.
        suffix = os.urandom(3).hex()
        anames = ["n%d-%s" % (i, suffix) for i in range(1, agents + 1)]
        subprocess.run([os.path.join(REPO, "deploy", "make-certs.sh"),
                        self.pki, "scheduler"] + names + ["agent"] + anames,
                       check=True, capture_output=True)
        self.sched = []
        for i, n in enumerate(names, 1):
            self.sched.append({
                "id": i, "name": n,
                "raft": "127.0.0.1:%d" % free_port(),
                "api": "127.0.0.1:%d" % free_port(),
                "rpc": "127.0.0.1:%d" % free_port(),
                "preview": "127.0.0.1:%d" % free_port(),
                "dir": os.path.join(workdir, n)})
        # tls_api: the API and preview listeners use each scheduler's own
        # cluster certificate (its SANs cover 127.0.0.1).
        self.tls_ca = os.path.join(self.pki, "ca.pem") if tls_api else None
        boot = ",".join("%d=%s" % (s["id"], s["raft"]) for s in self.sched)
        for s in self.sched:
            s["proc"] = procs.start("scheduler-%d" % s["id"], [
                binary("paddock-scheduler"), "--id", s["id"],
                "--data_dir", s["dir"], "--raft_addr", s["raft"],
                "--api_listen", s["api"], "--rpc_listen", s["rpc"],
                "--preview_listen", s["preview"], "--bootstrap", boot,
                "--tls_cert", os.path.join(self.pki, s["name"] + ".pem"),
                "--tls_key", os.path.join(self.pki, s["name"] + ".key"),
                "--tls_ca", os.path.join(self.pki, "ca.pem"),
                "--election_timeout", "1s", "--grace", "5s"] +
                (["--api_tls_cert", os.path.join(self.pki, s["name"] + ".pem"),
                  "--api_tls_key", os.path.join(self.pki, s["name"] + ".key")]
                 if tls_api else []) +
                list(sched_args or []), env=sched_env)
        self.token = wait_for(self._admin_token, 60, "the admin token")
        wait_for(lambda: self.leader() is not None, 30, "a leader")
        for s in self.sched:
            wait_for(lambda: self.api("GET", "/v1/cluster", at=s)[0] == 200,
                     30, "scheduler %d to accept the admin token" % s["id"])
        self.agents = []
        self.agent_env = agent_env
        for n in anames:
            self.start_agent(n, guest, agent_args)
        if anames:
            wait_for(self._agents_ready, 120, "every agent ready")

    def _admin_token(self):
        for s in self.sched:
            p = os.path.join(s["dir"], "admin.token")
            if os.path.exists(p):
                with open(p) as f:
                    t = f.read().strip()
                if t:
                    return t
        return None

    def start_agent(self, name, guest, extra=None):
        kernel, initrd = guest
        a = {"name": name, "node": name, "rpc": "127.0.0.1:%d" % free_port(),
             "dir": os.path.join(self.dir, name)}
        a["proc"] = self.procs.start("agent-" + name, [
            binary("paddock-agent"), "--node_id", name,
            "--data_dir", a["dir"], "--rpc_listen", a["rpc"],
            "--schedulers", ",".join(s["rpc"] for s in self.sched),
            "--tls_cert", os.path.join(self.pki, name + ".pem"),
            "--tls_key", os.path.join(self.pki, name + ".key"),
            "--tls_ca", os.path.join(self.pki, "ca.pem"),
            "--kernel", kernel, "--initrd", initrd, "--accel", "tcg",
            "--reserve_memory", "0", "--reserve_disk", "0",
            "--stop_vms_on_exit"] + list(extra or []),
            env=getattr(self, "agent_env", None))
        self.agents.append(a)
        return a

    def _agents_ready(self):
        st, _h, body = self.api("GET", "/v1/nodes")
        if st != 200:
            return False
        ready = [n for n in body.get("nodes", []) if n.get("state") == "ready"]
        return len(ready) >= len(self.agents)

    def leader(self):
        """The leader's scheduler dict, as the schedulers see it."""
        for s in self.sched:
            if not s["proc"].alive():
                continue
            try:
                st, _h, body = http_json("GET", s["api"], "/v1/cluster",
                                         self.token, timeout=5,
                                         tls_ca=self.tls_ca)
            except OSError:
                continue
            if st == 200 and body.get("leader"):
                for t in self.sched:
                    if str(t["id"]) == str(body["leader"]):
                        return t
        return None

    def follower(self):
        lead = self.leader()
        return next(s for s in self.sched if s is not lead)

    def api(self, method, path, body=None, token=None, at=None, **kw):
        addr = (at or self.sched[0])["api"]
        kw.setdefault("tls_ca", self.tls_ca)
        return http_json(method, addr, path, token or self.token, body, **kw)
