"""The node agent runs sandboxes as real VMs behind its mutual-TLS RPC.

One paddock-agent (TCG) is started for the module with certificates from
deploy/make-certs.sh and driven through pd-agent-client, standing in for
the scheduler, and through a small raw-frame client for what the tool would
never send (garbage, cut streams). Two sandboxes are shared by most tests;
eight more are created at once for the concurrency and crash checks. The
module proves: quotas seen from inside the guest and from the host's
cgroups, the hardening of the QEMU process, egress none versus all, exposed
ports, files and processes relayed to the guest, agent restarts that
re-adopt running VMs, a killed QEMU reported as crashed, TLS refusals,
the session with a (fake) leader, and a clear error for every bad input
without disturbing the other sandboxes.
"""
import hashlib
import http.server
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.request

import pytest

from conftest import REPO, binary, free_port, port_open, wait_for

MIB = 1 << 20
OVERHEAD_MB = 256       # the agent's default memory_overhead
Q1 = dict(sandbox="q1", cpus=2, memory_mb=384, disk_mb=64)
EA = dict(sandbox="ea", cpus=1, memory_mb=192, disk_mb=32, egress="all")
AL = dict(sandbox="al", cpus=1, memory_mb=128, disk_mb=16, egress="allow")
BOOT_S = 240            # TCG on a loaded 2-core host
# Unique per run: two runs of this file on one host (two engineers, or the
# suite beside a developer) must not share sandbox cgroups.
NODE = "agent-test-%s" % os.urandom(3).hex()


# ---- a minimal msgpack codec, for the raw-frame tests --------------------

def mp_pack(v):
    if v is None:
        return b"\xc0"
    if v is True:
        return b"\xc3"
    if v is False:
        return b"\xc2"
    if isinstance(v, int):
        if 0 <= v < 128:
            return bytes([v])
        if v >= 0:
            return b"\xcf" + struct.pack(">Q", v)
        return b"\xd3" + struct.pack(">q", v)
    if isinstance(v, str):
        b = v.encode()
        return b"\xdb" + struct.pack(">I", len(b)) + b
    if isinstance(v, (bytes, bytearray)):
        return b"\xc6" + struct.pack(">I", len(v)) + bytes(v)
    if isinstance(v, (list, tuple)):
        return b"\xdd" + struct.pack(">I", len(v)) + b"".join(
            mp_pack(x) for x in v)
    if isinstance(v, dict):
        return b"\xdf" + struct.pack(">I", len(v)) + b"".join(
            mp_pack(k) + mp_pack(x) for k, x in v.items())
    raise TypeError(type(v))


def mp_unpack(b, i=0):
    """Returns (value, next offset)."""
    c = b[i]
    i += 1
    if c < 0x80:
        return c, i
    if c >= 0xe0:
        return c - 256, i
    if 0x80 <= c <= 0x8f:
        return mp_map(b, i, c & 0x0f)
    if 0x90 <= c <= 0x9f:
        return mp_arr(b, i, c & 0x0f)
    if 0xa0 <= c <= 0xbf:
        n = c & 0x1f
        return b[i:i + n].decode(), i + n
    fixed = {0xc0: None, 0xc2: False, 0xc3: True}
    if c in fixed:
        return fixed[c], i
    sizes = {0xcc: ">B", 0xcd: ">H", 0xce: ">I", 0xcf: ">Q", 0xd0: ">b",
             0xd1: ">h", 0xd2: ">i", 0xd3: ">q", 0xca: ">f", 0xcb: ">d"}
    if c in sizes:
        n = struct.calcsize(sizes[c])
        return struct.unpack(sizes[c], b[i:i + n])[0], i + n
    lens = {0xc4: (">B", False), 0xc5: (">H", False), 0xc6: (">I", False),
            0xd9: (">B", True), 0xda: (">H", True), 0xdb: (">I", True)}
    if c in lens:
        fmt, text = lens[c]
        k = struct.calcsize(fmt)
        n = struct.unpack(fmt, b[i:i + k])[0]
        raw = b[i + k:i + k + n]
        return (raw.decode() if text else raw), i + k + n
    if c in (0xdc, 0xdd):
        k = 2 if c == 0xdc else 4
        return mp_arr(b, i + k, int.from_bytes(b[i:i + k], "big"))
    if c in (0xde, 0xdf):
        k = 2 if c == 0xde else 4
        return mp_map(b, i + k, int.from_bytes(b[i:i + k], "big"))
    raise ValueError("msgpack byte 0x%02x" % c)


def mp_arr(b, i, n):
    out = []
    for _ in range(n):
        v, i = mp_unpack(b, i)
        out.append(v)
    return out, i


def mp_map(b, i, n):
    out = {}
    for _ in range(n):
        k, i = mp_unpack(b, i)
        v, i = mp_unpack(b, i)
        out[k] = v
    return out, i


def frame(t, rid, **fields):
    body = mp_pack(dict(t=t, id=rid, **fields))
    return struct.pack(">I", len(body)) + body


HELLO, OK, ERROR, DATA = 1, 2, 3, 8
EXEC, EXIT, FILE_WRITE, FILE_READ = 100, 104, 120, 121
SANDBOX_STATUS, AGENT_INFO = 202, 206
NODE_REGISTER, NODE_HEARTBEAT, SANDBOX_STATE = 300, 301, 303


class Wire:
    """One framed connection (TLS) speaking the wire protocol by hand."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def send(self, raw):
        self.sock.sendall(raw)

    def recv(self, timeout=30.0):
        """The next frame as a dict, or None when the peer closed."""
        self.sock.settimeout(timeout)
        while True:
            if len(self.buf) >= 4:
                n = struct.unpack(">I", self.buf[:4])[0]
                if len(self.buf) >= 4 + n:
                    body, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    return mp_unpack(body)[0]
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionError, ssl.SSLError):
                return None
            if not chunk:
                return None
            self.buf += chunk

    def recv_until(self, pred, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.recv(max(0.1, deadline - time.monotonic()))
            if m is None:
                return None
            if pred(m):
                return m
        raise AssertionError("no matching frame in %.0fs" % timeout)

    def closed_by_peer(self, timeout=10.0):
        """True when the peer closes (frames before the close are skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.recv(deadline - time.monotonic()) is None:
                    return True
            except socket.timeout:
                return False
        return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ---- the agent under test ------------------------------------------------

class Agent:
    def __init__(self, procs, workdir, pki, kernel, initrd):
        self.procs = procs
        self.pki = pki
        self.data = os.path.join(workdir, "data")
        self.port = free_port()
        self.addr = "127.0.0.1:%d" % self.port
        self.base = [
            binary("paddock-agent"), "--data_dir", self.data,
            "--rpc_listen", self.addr, "--node_id", NODE,
            "--tls_cert", pki["n1"][0], "--tls_key", pki["n1"][1],
            "--tls_ca", pki["ca"], "--kernel", kernel, "--initrd", initrd,
            "--accel", "tcg", "--boot_timeout", "%ds" % BOOT_S,
            "--stop_timeout", "8s", "--exec_timeout", "60s",
            "--output_max", "64K", "--max_memory", "4T",
            "--cpu_overcommit", "8",  # 11 vCPUs at once on 2 cores
            "--max_cpus", "64",
            "--log_level", "debug"]
        self.proc = None
        self.starts = 0

    def start(self, *extra):
        self.starts += 1
        self.proc = self.procs.start("agent-%d" % self.starts,
                                     self.base + list(extra))
        wait_for(lambda: port_open(self.port) or not self.proc.alive(), 30,
                 "the agent's RPC port")
        assert self.proc.alive(), self.proc.log()[-3000:]

    def log(self):
        return "".join(p.log() for p in self.procs.procs
                       if p.name.startswith("agent-"))

    def client(self, *args, cert="s1", ca=None, timeout=300):
        argv = [binary("pd-agent-client"), "--addr", self.addr,
                "--ca", ca or self.pki["ca"], "--timeout-s", str(timeout)]
        if cert is not None:
            c, k = self.pki[cert] if isinstance(cert, str) else cert
            argv += ["--cert", c, "--key", k]
        return subprocess.run(argv + list(args), capture_output=True,
                              timeout=timeout + 30)

    def client_argv_call(self, t, fields, timeout=60):
        return [binary("pd-agent-client"), "--addr", self.addr, "--ca",
                self.pki["ca"], "--cert", self.pki["s1"][0], "--key",
                self.pki["s1"][1], "--timeout-s", str(timeout), "call", t,
                json.dumps(fields)]

    def call(self, t, timeout=300, **fields):
        """(exit status, reply frames) of one request."""
        p = self.client("call", t, json.dumps(fields), timeout=timeout)
        frames = [json.loads(l) for l in p.stdout.decode().splitlines() if l]
        return p.returncode, frames

    def ok(self, t, **fields):
        rc, frames = self.call(t, **fields)
        assert rc == 0 and frames and frames[-1]["t"] in ("OK", "EXIT"), \
            (t, fields, frames, rc)
        return frames[-1]

    def error(self, t, **fields):
        """The ERROR frame of a request that must fail."""
        rc, frames = self.call(t, **fields)
        assert rc == 1 and frames and frames[-1]["t"] == "ERROR", \
            (t, fields, frames)
        return frames[-1]

    def sh(self, sb, command, timeout_ms=60000):
        return self.ok("EXEC", sandbox=sb, command=command,
                       timeout_ms=timeout_ms)

    def status(self, sb):
        rc, frames = self.call("SANDBOX_STATUS", sandbox=sb, timeout=30)
        return frames[-1] if rc == 0 else None

    def wire(self, cert="s1"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(self.pki["ca"])
        ctx.load_cert_chain(*self.pki[cert])
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        w = Wire(ctx.wrap_socket(raw))
        w.send(frame(HELLO, 0, v=1, role="scheduler", name="raw-test"))
        hello = w.recv()
        assert hello and hello["t"] == HELLO, hello
        return w


def qemu_pids_under(path):
    """Pids of QEMU processes whose argv names a path under `path`."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % d, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and \
                any(path.encode() + b"/" in a for a in argv):
            pids.append(int(d))
    return pids


def sandbox_dir(agent, sb):
    """The sandbox's host directory, read from its QEMU's argv."""
    pid = agent.status(sb)["pid"]
    argv = open("/proc/%d/cmdline" % pid, "rb").read().decode().split("\0")
    sock = argv[argv.index("-chardev") + 1]
    path = [p for p in sock.split(",") if p.startswith("path=")][0][5:]
    return os.path.dirname(path)


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def pki(module_workdir):
    os.chmod(module_workdir, 0o711)  # QEMU (nobody) reaches data/vm
    d = os.path.join(module_workdir, "pki")
    other = os.path.join(module_workdir, "pki-other")
    mk = os.path.join(REPO, "deploy", "make-certs.sh")
    subprocess.run([mk, d, "scheduler", "s1", "agent", "n1"], check=True,
                   capture_output=True, timeout=60)
    subprocess.run([mk, other, "scheduler", "s1"], check=True,
                   capture_output=True, timeout=60)
    pair = lambda base, n: (os.path.join(base, n + ".pem"),
                            os.path.join(base, n + ".key"))
    return {"ca": os.path.join(d, "ca.pem"), "s1": pair(d, "s1"),
            "n1": pair(d, "n1"), "other-s1": pair(other, "s1"),
            "other-ca": os.path.join(other, "ca.pem")}


@pytest.fixture(scope="module")
def agent(guest_image, module_procs, module_workdir, pki):
    a = Agent(module_procs, module_workdir, pki, *guest_image)
    a.start()
    yield a
    # Destroy every sandbox so no VM outlives the module, then make sure:
    # any QEMU still running from our data directory is ours to kill.
    try:
        if a.proc.alive():
            rc, frames = a.call("SANDBOX_LIST", timeout=30)
            ids = [s["sandbox"] for s in frames[-1].get("sandboxes", [])]
            ps = [subprocess.Popen(
                [binary("pd-agent-client"), "--addr", a.addr, "--ca",
                 pki["ca"], "--cert", pki["s1"][0], "--key", pki["s1"][1],
                 "--timeout-s", "30", "call", "SANDBOX_DESTROY",
                 json.dumps({"sandbox": i})], stdout=subprocess.DEVNULL)
                  for i in ids]
            for p in ps:
                p.wait(60)
    finally:
        for pid in qemu_pids_under(a.data):
            os.kill(pid, signal.SIGKILL)


class Counter(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):
        Counter.hits += 1
        body = b"egress-ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def web():
    """A loopback HTTP server the guests reach at 10.0.2.2 through slirp."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Counter)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def create_all(agent, specs, timeout=BOOT_S):
    """Creates sandboxes at once (wait: true); returns their final frames."""
    ps = []
    for s in specs:
        argv = [binary("pd-agent-client"), "--addr", agent.addr, "--ca",
                agent.pki["ca"], "--cert", agent.pki["s1"][0], "--key",
                agent.pki["s1"][1], "--timeout-s", str(timeout), "call",
                "SANDBOX_CREATE", json.dumps(dict(s, wait=True))]
        ps.append(subprocess.Popen(argv, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE))
    out = []
    for p in ps:
        so, se = p.communicate(timeout=timeout + 30)
        lines = [json.loads(l) for l in so.decode().splitlines() if l]
        out.append(lines[-1] if lines else {"t": "none",
                                            "stderr": se.decode()})
    return out


@pytest.fixture(scope="module")
def vms(agent, web):
    al = dict(AL, allow=["localhost:%d" % web])
    replies = create_all(agent, [Q1, EA, al])
    for r in replies:
        assert r["t"] == "OK" and r["state"] == "running", \
            (r, agent.log()[-4000:])
    return {r["sandbox"]: r for r in replies}


# ---- TLS and bad input (no VM needed) -------------------------------------

def test_tls_refuses_no_certificate_wrong_ca_and_agent_certificates(agent,
                                                                    pki):
    assert agent.client("call", "AGENT_INFO", "{}").returncode == 0
    # No certificate, a certificate from another CA, and an agent's own
    # certificate (right CA, OU=agent): each fails the handshake (status 3).
    assert agent.client("call", "AGENT_INFO", "{}", cert=None,
                        timeout=20).returncode == 3
    assert agent.client("call", "AGENT_INFO", "{}", cert="other-s1",
                        timeout=20).returncode == 3
    assert agent.client("call", "AGENT_INFO", "{}", cert="n1",
                        timeout=20).returncode == 3
    assert "is not OU=scheduler" in agent.log()
    # Plain TCP without TLS gets nothing but a close.
    with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as s:
        s.sendall(frame(HELLO, 0, v=1, role="scheduler", name="plain"))
        s.settimeout(10)
        try:
            data = s.recv(4096)
        except ConnectionError:
            data = b""
        assert NODE.encode() not in data and b"role" not in data


BAD_SPECS = [
    dict(Q1, cpus=0), dict(Q1, cpus=65), dict(Q1, cpus="two"),
    dict(Q1, cpus=-1), dict(Q1, memory_mb=0), dict(Q1, memory_mb=64),
    dict(Q1, memory_mb=10 ** 12), dict(Q1, disk_mb=0), dict(Q1, disk_mb=1),
    dict(Q1, disk_mb=10 ** 12), {"sandbox": "x1", "cpus": 1},
    dict(Q1, egress="bogus"), dict(Q1, egress="allow"),
    dict(Q1, egress="allow", allow=["a b"]), dict(Q1, env="PATH=/"),
    dict(Q1, env={"A=B": "c"}),
]
BAD_IDS = ["", "A", "-a", "a" * 64, "a/b", "../x", "a b", "caf\u00e9", 7,
           "a\nb"]


@pytest.mark.parametrize("spec", BAD_SPECS, ids=[
    "cpus0", "cpus65", "cpus-str", "cpus-neg", "mem0", "mem64", "mem-huge",
    "disk0", "disk1", "disk-huge", "missing", "egress", "allow-empty",
    "allow-bad", "env-str", "env-key"])
def test_bad_spec_is_einval(agent, spec):
    spec = dict(spec, sandbox="bad-spec")
    e = agent.error("SANDBOX_CREATE", **spec)
    assert e["code"] == "EINVAL" and e["message"], e
    assert agent.status("bad-spec") is None


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_id_is_einval_everywhere(agent, bad):
    for t in ("SANDBOX_CREATE", "SANDBOX_STATUS", "SANDBOX_DESTROY", "EXEC",
              "PORT_OPEN"):
        fields = dict(Q1, sandbox=bad) if t == "SANDBOX_CREATE" else \
            {"sandbox": bad, "command": "true", "port": 80}
        e = agent.error(t, **fields)
        assert e["code"] == "EINVAL", (t, bad, e)


def test_unknown_sandbox_is_enoent(agent):
    for t in ("SANDBOX_STATUS", "SANDBOX_DESTROY", "EXEC", "FILE_READ"):
        e = agent.error(t, sandbox="no-such-sb", command="true", path="/x")
        assert e["code"] == "ENOENT" and "no-such-sb" in e["message"], e


def test_beyond_capacity_is_enospc(agent):
    info = agent.ok("AGENT_INFO")
    cap = info["capacity"]
    e = agent.error("SANDBOX_CREATE", **dict(
        Q1, sandbox="too-big", memory_mb=cap["memory_mb"] + 1))
    assert e["code"] == "ENOSPC" and "memory" in e["message"], e
    e = agent.error("SANDBOX_CREATE", **dict(Q1, sandbox="too-big",
                                             cpus=cap["cpus"] + 1))
    assert e["code"] == "ENOSPC" and "cpu" in e["message"].lower(), e
    assert agent.status("too-big") is None


# ---- the shared VMs --------------------------------------------------------

def test_quotas_seen_from_inside(agent, vms):
    r = agent.sh("q1", "nproc; grep MemTotal /proc/meminfo; "
                 "df -k /workspace | tail -1")
    nproc, mem, df = r["stdout"].splitlines()
    assert int(nproc) == Q1["cpus"]
    mem_kb = int(mem.split()[1])
    assert 0.75 * Q1["memory_mb"] * 1024 < mem_kb <= Q1["memory_mb"] * 1024
    total_kb = int(df.split()[1])
    assert 0.8 * Q1["disk_mb"] * 1024 < total_kb <= Q1["disk_mb"] * 1024
    r = agent.sh("ea", "nproc")
    assert int(r["stdout"]) == EA["cpus"]


def test_writing_past_the_disk_cap_is_enospc(agent, vms):
    r = agent.sh("q1", "dd if=/dev/zero of=/workspace/fill bs=1M count=%d "
                 "2>&1; echo rc=$?; sync" % (Q1["disk_mb"] + 16),
                 timeout_ms=120000)
    assert "No space left on device" in r["stdout"], r
    # The host image keeps its fixed size; written or not, it is sparse.
    st = os.stat(os.path.join(sandbox_dir(agent, "q1"), "disk.img"))
    assert st.st_size == Q1["disk_mb"] * MIB
    assert st.st_blocks * 512 <= st.st_size
    agent.sh("q1", "rm -f /workspace/fill; sync")


def cgroup_layout():
    """'v2' or 'v1' by looking at the mounts (never assumed)."""
    v1 = set()
    v2 = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ")
            fstype, _src, opts = right.split()[:3]
            mnt, root = left.split()[4], left.split()[3]
            if fstype == "cgroup2":
                v2 = mnt
            elif fstype == "cgroup":
                for c in ("cpu", "memory"):
                    if c in opts.split(","):
                        v1.add((c, mnt, root))
    if v2:
        try:
            ctl = open(os.path.join(v2, "cgroup.controllers")).read().split()
            if "cpu" in ctl and "memory" in ctl:
                return "v2", {"": (v2, "/")}
        except OSError:
            pass
    return "v1", {c: (m, r) for c, m, r in v1}


def cgroup_dir(pid, controller, mounts):
    mnt, root = mounts[controller]
    with open("/proc/%d/cgroup" % pid) as f:
        for line in f:
            _n, ctls, path = line.rstrip("\n").split(":", 2)
            if controller in ctls.split(",") or (controller == "" and
                                                 ctls == ""):
                rel = path[len(root):] if root != "/" and \
                    path.startswith(root) else path
                return mnt + rel
    raise AssertionError("pid %d has no %s cgroup" % (pid, controller))


def test_cgroup_limits_on_the_qemu_process(agent, vms):
    pid = agent.status("q1")["pid"]
    assert alive(pid)
    mode, mounts = cgroup_layout()
    info = agent.ok("AGENT_INFO")
    assert info["cgroup"] in (("v2",) if mode == "v2" else ("v1", "hybrid"))
    want_mem = (Q1["memory_mb"] + OVERHEAD_MB) * MIB
    if mode == "v2":
        d = cgroup_dir(pid, "", mounts)
        quota, period = open(d + "/cpu.max").read().split()
        mem = int(open(d + "/memory.max").read())
    else:
        d = cgroup_dir(pid, "cpu", mounts)
        quota = open(d + "/cpu.cfs_quota_us").read()
        period = open(d + "/cpu.cfs_period_us").read()
        mem = int(open(cgroup_dir(pid, "memory", mounts) +
                       "/memory.limit_in_bytes").read())
    assert d.endswith("/q1"), d
    assert int(quota) == Q1["cpus"] * int(period)
    assert mem == want_mem


def test_qemu_is_hardened(agent, vms):
    pid = agent.status("q1")["pid"]
    argv = open("/proc/%d/cmdline" % pid, "rb").read().split(b"\0")
    sandbox = argv[argv.index(b"-sandbox") + 1].decode()
    for opt in ("on", "obsolete=deny", "elevateprivileges=deny",
                "spawn=deny", "resourcecontrol=deny"):
        assert opt in sandbox.split(","), sandbox
    uid = [l for l in open("/proc/%d/status" % pid) if l.startswith("Uid:")]
    uids = uid[0].split()[1:]
    assert os.geteuid() != 0 or all(u != "0" for u in uids), uids
    # Every host path in the argv lies in the agent's own directories.
    for a in argv:
        for part in a.decode().replace("=", ",").split(","):
            if part.startswith("/"):
                assert part.startswith(agent.data) or \
                    part in (agent.base[agent.base.index("--kernel") + 1],
                             agent.base[agent.base.index("--initrd") + 1],
                             "/dev/urandom"), part
    for d in os.listdir(os.path.join(agent.data, "vm")):
        st = os.stat(os.path.join(agent.data, "vm", d))
        assert st.st_mode & 0o777 == 0o700


FETCH = "timeout 20 wget -q -O - http://10.0.2.2:%d/egress; echo rc=$?"
PROXIED = ("http_proxy=http://10.0.2.100:3128 timeout 20 wget -q -O - "
           "http://%s:%d/egress; echo rc=$?")


def network_up(agent, sb):
    # The guest configures eth0 just after its agent says hello.
    wait_for(lambda: "10.0.2.0/24" in agent.sh(sb, "ip route")["stdout"],
             30, "%s: guest network" % sb)


def test_egress_none_blocks_and_all_allows(agent, vms, web):
    for sb in ("q1", "ea"):
        network_up(agent, sb)
    before = Counter.hits
    r = agent.sh("q1", FETCH % web)
    assert "egress-ok" not in r["stdout"] and "rc=0" not in r["stdout"], r
    assert Counter.hits == before
    r = agent.sh("ea", FETCH % web)
    assert "egress-ok" in r["stdout"] and "rc=0" in r["stdout"], r
    assert Counter.hits == before + 1


def test_egress_allow_goes_through_the_proxy_only(agent, vms, web):
    network_up(agent, "al")
    before = Counter.hits
    r = agent.sh("al", FETCH % web)             # no direct way out
    assert "rc=0" not in r["stdout"], r
    r = agent.sh("al", PROXIED % ("localhost", web))
    assert "egress-ok" in r["stdout"] and "rc=0" in r["stdout"], r
    r = agent.sh("al", PROXIED % ("127.0.0.1", web))  # not on the list
    assert "rc=0" not in r["stdout"], r
    # A refusal leaves the proxy stream usable for the next request.
    r = agent.sh("al", PROXIED % ("localhost", web))
    assert "egress-ok" in r["stdout"] and "rc=0" in r["stdout"], r
    assert Counter.hits == before + 2
    assert agent.ok("AGENT_INFO")["egress_denied"] >= 1


def test_exposed_port_reachable_from_the_host(agent, vms):
    agent.ok("PROC_START", sandbox="q1", proc="web",
             command="mkdir -p /srv && echo from-guest > /srv/index.html && "
                     "exec httpd -f -p 8080 -h /srv")
    agent.ok("PROC_WAIT_PORT", sandbox="q1", port=8080, timeout_ms=30000)
    r = agent.ok("PORT_OPEN", sandbox="q1", port=8080)
    hp = r["host_port"]
    assert r["host"] == "127.0.0.1"
    body = urllib.request.urlopen("http://127.0.0.1:%d/" % hp,
                                  timeout=20).read()
    assert body == b"from-guest\n"
    # Bound to 127.0.0.1 only.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", hp), timeout=3).close()
    # Opening again is idempotent; the status lists the forward.
    assert agent.ok("PORT_OPEN", sandbox="q1", port=8080)["host_port"] == hp
    assert {"port": 8080, "host_port": hp} in agent.status("q1")["ports"]
    # A second port is opened and closed at run time.
    r2 = agent.ok("PORT_OPEN", sandbox="q1", port=8081)
    agent.ok("PORT_CLOSE", sandbox="q1", port=8081)
    wait_for(lambda: not port_open(r2["host_port"]), 10, "port closed")
    e = agent.error("PORT_CLOSE", sandbox="q1", port=8081)
    assert e["code"] == "ENOENT"
    e = agent.error("PORT_OPEN", sandbox="q1", port=70000)
    assert e["code"] == "EINVAL"


def test_tunnel_to_a_guest_port(agent, vms):
    """TUNNEL_OPEN: bytes both ways to the guest's 127.0.0.1:8080, relayed
    frame by frame (the web process of the port test serves it)."""
    w = agent.wire()
    try:
        w.send(frame(140, 11, sandbox="q1", port=8080))
        m = w.recv_until(lambda m: m.get("id") == 11)
        assert m["t"] == OK, m
        w.send(frame(DATA, 11, data=b"GET / HTTP/1.0\r\n\r\n", eof=False))
        got = b""
        while b"from-guest" not in got:
            # WINDOW grants for our bytes come too; the reply is < 4 MiB,
            # well inside the credit the guest starts with.
            m = w.recv_until(lambda m: m.get("id") == 11 and m["t"] != 5)
            assert m is not None and m["t"] == DATA, m
            got += m.get("data", b"")
            if m.get("eof"):
                break
        assert b"200" in got and b"from-guest" in got, got
        w.send(frame(DATA, 11, data=b"", eof=True))
        # A tunnel to a port nobody listens on is an error, not a hang.
        w.send(frame(140, 12, sandbox="q1", port=9))
        m = w.recv_until(lambda m: m.get("id") == 12 and m["t"] in (OK,
                                                                    ERROR))
        assert m["t"] == ERROR, m
    finally:
        w.close()


def test_files_processes_and_streams_relay_to_the_guest(agent, vms,
                                                        tmp_path):
    src = tmp_path / "blob"
    src.write_bytes(os.urandom(3 * MIB + 12345))
    p = agent.client("put", "q1", "/workspace/blob", str(src))
    assert p.returncode == 0, p.stderr
    dst = tmp_path / "back"
    p = agent.client("get", "q1", "/workspace/blob", str(dst))
    assert p.returncode == 0, p.stderr
    assert hashlib.sha256(dst.read_bytes()).digest() == \
        hashlib.sha256(src.read_bytes()).digest()
    entries = agent.ok("FILE_LIST", sandbox="q1", path="/workspace")
    assert any(e["name"] == "blob" and e["size"] == src.stat().st_size
               for e in entries["entries"]), entries
    # Paths the guest rejects come back as its errors.
    assert agent.error("FILE_READ", sandbox="q1",
                       path="/no/such")["code"] == "ENOENT"
    assert agent.error("FILE_READ", sandbox="q1",
                       path="../etc/passwd")["code"] == "EINVAL"
    # A streamed exec: EXEC_START, output frames, then EXIT.
    rc, frames = agent.call("EXEC", sandbox="q1", stream=True,
                            argv=["sh", "-c", "echo out; echo err >&2"])
    kinds = [f["t"] for f in frames]
    assert rc == 0 and kinds[0] == "EXEC_START" and kinds[-1] == "EXIT"
    assert "STDOUT" in kinds and "STDERR" in kinds
    # The agent's defaults apply: output capped at its output_max (64K).
    r = agent.sh("q1", "head -c 200000 /dev/zero | tr '\\0' a")
    assert r["truncated"] is True and len(r["stdout"]) == 64 * 1024
    # Background processes.
    agent.ok("PROC_START", sandbox="q1", proc="sleeper",
             argv=["sleep", "100000"])
    procs = agent.ok("PROC_LIST", sandbox="q1")["procs"]
    assert any(p["proc"] == "sleeper" and p["running"] for p in procs)


def test_duplicate_create(agent, vms):
    r = agent.ok("SANDBOX_CREATE", **Q1)
    assert r["state"] == "running" and r["pid"] == vms["q1"]["pid"]
    e = agent.error("SANDBOX_CREATE", **dict(Q1, cpus=1))
    assert e["code"] == "EEXIST" and "another spec" in e["message"], e
    assert agent.status("q1")["cpus"] == Q1["cpus"]


def test_garbage_frames_close_only_that_connection(agent, vms):
    # Each of these closes its own connection, nothing else.
    bad = [
        b"\xff\xff\xff\xff",                       # length over the cap
        struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1",  # not msgpack
        struct.pack(">I", 1) + b"\x93",            # not a map
        struct.pack(">I", 6) + b"\xdd\xff\xff\xff\xff\x00",  # huge array
        frame(999, 1),                             # unknown type
    ]
    for raw in bad:
        w = agent.wire()
        w.send(raw)
        assert w.closed_by_peer(), raw
        w.close()
    # A request before HELLO is refused too.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(agent.pki["ca"])
    ctx.load_cert_chain(*agent.pki["s1"])
    w = Wire(ctx.wrap_socket(socket.create_connection(
        ("127.0.0.1", agent.port), timeout=10)))
    w.send(frame(AGENT_INFO, 1))
    assert w.closed_by_peer()
    w.close()
    # A known message an agent does not serve is an ERROR; the link stays.
    w = agent.wire()
    w.send(frame(NODE_REGISTER, 5, node="x"))
    m = w.recv_until(lambda m: m.get("id") == 5)
    assert m["t"] == ERROR and m["code"] == "ENOTSUP"
    w.send(frame(SANDBOX_STATUS, 6, sandbox="q1"))
    m = w.recv_until(lambda m: m.get("id") == 6)
    assert m["t"] == OK and m["state"] == "running"
    # Disconnecting in the middle of a file write and of a file read.
    w.send(frame(FILE_WRITE, 7, sandbox="q1", path="/workspace/cut",
                 mode=0o644))
    w.send(frame(DATA, 7, data=b"x" * 100000, eof=False))
    w.send(frame(FILE_READ, 8, sandbox="q1", path="/workspace/blob"))
    w.recv_until(lambda m: m.get("id") == 8)
    w.close()
    # The agent and the sandboxes carry on.
    assert agent.sh("q1", "echo alive")["stdout"] == "alive\n"
    assert agent.sh("ea", "echo alive")["stdout"] == "alive\n"


def test_eight_concurrent_creates_then_a_killed_qemu(agent, vms):
    specs = [dict(sandbox="c%d" % i, cpus=1, memory_mb=128, disk_mb=16)
             for i in range(8)]
    t0 = time.monotonic()
    replies = create_all(agent, specs)
    took = time.monotonic() - t0
    assert [r.get("state") for r in replies] == ["running"] * 8, replies
    print("8 concurrent creates: %.1f s" % took)
    # Kill one QEMU: it is reported failed with the reason, never
    # restarted, and the others are untouched.
    victim = agent.status("c3")
    os.kill(victim["pid"], signal.SIGKILL)
    st = wait_for(lambda: (lambda s: s if s["state"] == "failed" else None)(
        agent.status("c3")), 30, "c3 reported failed")
    assert "signal 9" in st["reason"], st
    e = agent.error("EXEC", sandbox="c3", command="true")
    assert e["code"] == "ENOTCONN" and "failed" in e["message"], e
    for i in (0, 7):
        assert agent.sh("c%d" % i, "hostname")["stdout"] == "c%d\n" % i
    assert agent.status("q1")["state"] == "running"
    # Destroy seven at once (the failed one too): VMs, disks, directories
    # and cgroups go. c7 stays for the restart test.
    specs = specs[:7]
    pids = [r["pid"] for r in replies[:7]]
    before = set(os.listdir(os.path.join(agent.data, "vm")))
    ps = [subprocess.Popen(
        [binary("pd-agent-client"), "--addr", agent.addr, "--ca",
         agent.pki["ca"], "--cert", agent.pki["s1"][0], "--key",
         agent.pki["s1"][1], "--timeout-s", "60", "call", "SANDBOX_DESTROY",
         json.dumps({"sandbox": s["sandbox"]})]) for s in specs]
    assert [p.wait(90) for p in ps] == [0] * 7
    assert not any(alive(p) for p in pids)
    assert len(before) - len(os.listdir(os.path.join(agent.data, "vm"))) \
        == 7
    listed = [s["sandbox"] for s in agent.ok("SANDBOX_LIST")["sandboxes"]]
    assert sorted(listed) == ["al", "c7", "ea", "q1"]


def test_agent_restart_readopts_running_vms(agent, vms, web):
    agent.sh("q1", "echo kept > /workspace/keep.txt; sync")
    q1 = agent.status("q1")
    ea = agent.status("ea")
    hp = q1["ports"][0]["host_port"]
    # SIGTERM: the agent leaves at once (closing an idle scheduler
    # connection), the VMs stay.
    idle = agent.wire()
    t0 = time.monotonic()
    rc = agent.proc.stop()
    assert rc == 0, (rc, time.monotonic() - t0, agent.proc.log()[-3000:])
    assert idle.closed_by_peer(2)
    idle.close()
    assert alive(q1["pid"]) and alive(ea["pid"])
    assert urllib.request.urlopen("http://127.0.0.1:%d/" % hp,
                                  timeout=20).read() == b"from-guest\n"
    agent.start()
    for old in (q1, ea):
        st = wait_for(lambda: (lambda s: s if s and s["state"] == "running"
                               else None)(agent.status(old["sandbox"])),
                      30, "re-adopted")
        assert st["pid"] == old["pid"]
    wait_for(lambda: agent.call("EXEC", sandbox="q1", command="true",
                                timeout=30)[0] == 0, 30, "guest link back")
    assert agent.sh("q1", "cat /workspace/keep.txt")["stdout"] == "kept\n"
    p = agent.ok("PROC_GET", sandbox="q1", proc="sleeper")
    p = p["proc"] if isinstance(p.get("proc"), dict) else p
    assert p["running"] is True
    # The egress proxy's chardev reconnects to the new agent.
    r = wait_for(lambda: (lambda r: r if "egress-ok" in r["stdout"] else
                          None)(agent.sh("al", PROXIED % ("localhost", web))),
                 30, "proxy after the restart")
    assert agent.status("q1")["ports"] == q1["ports"]
    # SIGKILL (an agent crash) is no different; this time the data disk
    # is "full" (the reserve covers it), so a create is refused, and c7's
    # QEMU dies while no agent watches.
    c7 = agent.status("c7")
    c7_dir = sandbox_dir(agent, "c7")
    agent.proc.kill()
    os.kill(c7["pid"], signal.SIGKILL)
    wait_for(lambda: not alive(c7["pid"]), 10, "c7's QEMU gone")
    free = os.statvfs(agent.data)
    reserve = free.f_bavail * free.f_frsize - 32 * MIB
    agent.start("--reserve_disk", str(reserve))
    wait_for(lambda: agent.call("EXEC", sandbox="q1", command="true",
                                timeout=30)[0] == 0, 30, "guest link back")
    assert agent.sh("q1", "cat /workspace/keep.txt")["stdout"] == "kept\n"
    e = agent.error("SANDBOX_CREATE", sandbox="late", cpus=1, memory_mb=128,
                    disk_mb=16)
    assert e["code"] == "ENOSPC" and "disk" in e["message"], e
    assert agent.status("late") is None
    # The dead one is reported, its disk released, its record kept until
    # a destroy.
    st = agent.status("c7")
    assert st["state"] == "failed" and "agent was down" in st["reason"], st
    assert not os.path.exists(c7_dir)
    agent.ok("SANDBOX_DESTROY", sandbox="c7")
    assert agent.status("c7") is None


def leader_recv(w, pred, timeout=30.0):
    """The next frame matching pred, answering heartbeats meanwhile (a
    leader that stops answering is dropped after 5 intervals)."""
    def step(m):
        if m["t"] == NODE_HEARTBEAT:
            w.send(frame(OK, m["id"]))
        return pred(m)
    m = w.recv_until(step, timeout)
    assert m is not None, "the agent closed the session"
    return m


def accept_session(lsock, ctx, name):
    """Accepts the agent's session; returns (wire, NODE_REGISTER)."""
    conn, _ = lsock.accept()
    w = Wire(ctx.wrap_socket(conn, server_side=True))
    m = w.recv()
    assert m["t"] == HELLO and m["role"] == "agent", m
    w.send(frame(HELLO, 0, v=1, role="scheduler", name=name))
    reg = w.recv_until(lambda m: m["t"] == NODE_REGISTER)
    assert reg["node"] == NODE and reg["rpc_addr"] == AGENT_ADDR[0]
    w.send(frame(OK, reg["id"], heartbeat_ms=200))
    return w, reg


AGENT_ADDR = [None]


def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    s.settimeout(30)
    return s


def test_session_with_a_leader(agent, vms, pki):
    """A fake leader: registration, heartbeats, requests down the session,
    a redirect, and state reports."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*pki["s1"])
    ctx.load_verify_locations(pki["ca"])
    ctx.verify_mode = ssl.CERT_REQUIRED
    AGENT_ADDR[0] = agent.addr
    lsock, lsock2 = listener(), listener()
    destroy = None
    try:
        agent.proc.stop()
        agent.start("--schedulers", "127.0.0.1:%d" % lsock.getsockname()[1])
        w, reg = accept_session(lsock, ctx, "fake-leader")
        assert reg["cpus"] > 0 and reg["memory_mb"] > 0
        assert reg["disk_mb"] > 0
        states = {s["sandbox"]: s["state"] for s in reg["sandboxes"]}
        assert states == {"q1": "running", "ea": "running",
                          "al": "running"}
        for _ in range(2):
            hb = leader_recv(w, lambda m: m["t"] == NODE_HEARTBEAT)
            assert hb["node"] == NODE
        # The scheduler's requests arrive down the same connection.
        w.send(frame(SANDBOX_STATUS, 900, sandbox="ea"))
        m = leader_recv(w, lambda m: m.get("id") == 900 and
                        m["t"] in (OK, ERROR))
        assert m["t"] == OK and m["state"] == "running"
        w.send(frame(EXEC, 901, sandbox="ea", argv=["echo", "via-session"]))
        m = leader_recv(w, lambda m: m.get("id") == 901 and
                        m["t"] in (EXIT, ERROR))
        assert m["t"] == EXIT and m["stdout"] == b"via-session\n"
        # A follower's redirect: the agent registers with the leader named.
        w.send(frame(302, 0, leader_addr="127.0.0.1:%d" %
                     lsock2.getsockname()[1]))
        assert w.closed_by_peer(10)
        w.close()
        w, reg = accept_session(lsock2, ctx, "leader-2")
        # No wait for a heartbeat here: a state change right after the
        # registration (before its OK is read) must be reported too.
        # A destroy through the RPC port is reported on the session.
        destroy = subprocess.Popen(agent.client_argv_call(
            "SANDBOX_DESTROY", {"sandbox": "ea"}), stdout=subprocess.PIPE)
        seen = []
        leader_recv(w, lambda m: m["t"] == SANDBOX_STATE and
                    m["sandbox"] == "ea" and
                    (seen.append(m["state"]) or m["state"] == "stopped"), 60)
        assert seen[0] == "stopping" and seen[-1] == "stopped", seen
        assert destroy.wait(60) == 0
        w.close()
    finally:
        if destroy is not None and destroy.poll() is None:
            destroy.kill()
            destroy.wait()
        lsock.close()
        lsock2.close()


def test_destroy_powers_off_cleanly_and_removes_everything(agent, vms):
    st = agent.status("q1")
    vmdirs = set(os.listdir(os.path.join(agent.data, "vm")))
    mode, mounts = cgroup_layout()
    cgroups = [cgroup_dir(st["pid"], c, mounts)
               for c in ([""] if mode == "v2" else ["cpu", "memory"])]
    t0 = time.monotonic()
    agent.ok("SANDBOX_DESTROY", sandbox="q1")
    assert time.monotonic() - t0 < 8, "no clean poweroff before the timeout"
    assert not alive(st["pid"])
    assert agent.status("q1") is None
    assert len(os.listdir(os.path.join(agent.data, "vm"))) == len(vmdirs) - 1
    assert "q1: no clean poweroff" not in agent.log()
    for d in cgroups:
        assert not os.path.exists(d), d


def test_stop_vms_on_exit_takes_the_vms_along(agent, vms):
    """deploy/local-cluster's `stop`: SIGTERM with stop_vms_on_exit."""
    st = agent.status("al")
    assert st["state"] == "running"
    agent.proc.stop()
    agent.start("--stop_vms_on_exit", "true")
    wait_for(lambda: agent.status("al")["state"] == "running", 30,
             "al re-adopted")
    t0 = time.monotonic()
    rc = agent.proc.stop(timeout=30)
    assert rc == 0, (rc, agent.proc.log()[-3000:])
    assert time.monotonic() - t0 < 20
    assert not alive(st["pid"])
    assert qemu_pids_under(agent.data) == []
    assert os.listdir(os.path.join(agent.data, "vm")) == []
    # Nothing left to adopt.
    agent.start()
    assert agent.ok("SANDBOX_LIST")["sandboxes"] == []


def test_out_of_memory_is_the_reason(agent):
    """A QEMU killed by its cgroup's OOM killer says so. A tiny overhead
    leaves QEMU no room beside the guest's memory."""
    agent.proc.stop()
    agent.start("--memory_overhead", "8M")
    try:
        rc, frames = agent.call("SANDBOX_CREATE", sandbox="oom", cpus=1,
                                memory_mb=256, disk_mb=16, wait=True)
        if rc == 0:  # came up: make the guest touch its memory
            agent.call("EXEC", sandbox="oom", timeout=60, timeout_ms=30000,
                       command="head -c 200m /dev/zero > /tmp/fill")
        st = wait_for(lambda: (lambda s: s if s["state"] == "failed"
                               else None)(agent.status("oom")), 60,
                      "the OOM kill")
        assert "out of memory" in st["reason"], st
    finally:
        agent.call("SANDBOX_DESTROY", sandbox="oom", timeout=60)
        agent.proc.stop()
        agent.start()


def test_accel_auto_probes_and_says_why(agent, module_procs, module_workdir):
    """accel=auto decides by a probe and logs which and why."""
    d = os.path.join(module_workdir, "auto")
    port = free_port()
    argv = [a for a in agent.base]
    argv[argv.index("--accel") + 1] = "auto"
    argv[argv.index("--data_dir") + 1] = d
    argv[argv.index("--rpc_listen") + 1] = "127.0.0.1:%d" % port
    argv[argv.index("--node_id") + 1] = NODE + "-auto"
    p = module_procs.start("agent-auto", argv)
    try:
        wait_for(lambda: port_open(port) or not p.alive(), 60, "auto agent")
        assert p.alive(), p.log()[-2000:]
        log = p.log()
        line = [l for l in log.splitlines() if "agent: accel " in l]
        assert line and ("probe" in line[0]), log[-2000:]
        chosen = "kvm" if "accel kvm" in line[0] else "tcg"
        assert ("node %s-auto" % NODE) in log and \
            ("accel %s" % chosen) in log
    finally:
        assert p.stop() == 0
