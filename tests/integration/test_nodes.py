"""Node sessions, failure detection and the sandbox life cycle on the leader.

Proves, with 3 real schedulers and real agents running VMs under TCG: an
agent that connects to a follower is redirected and registers with the
leader; a create that fits nowhere says why per resource; a drained node
gets no new sandbox while its sandbox keeps running; SIGKILL of an agent
has its node committed down within the grace period plus a heartbeat and
its sandboxes lost; the next exec places a lost sandbox again (fresh disk)
and says so; the killed agent, restarted, has its stale VM destroyed.

The cluster is shared by the test cases of this module, which run in order.
"""
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import REPO, Cluster, binary, free_port, wait_for

GRACE_S = 5.0
HEARTBEAT_S = 1.0


@pytest.fixture(scope="module")
def cluster(module_procs, module_workdir, guest_image):
    c = Cluster(module_procs, module_workdir, schedulers=3, agents=1,
                guest=guest_image,
                sched_args=["--rate_per_s", "1000", "--rate_burst", "1000"])
    c.guest = guest_image
    # Node ids carry the cluster's suffix (conftest: cgroups are shared
    # machine-wide); n2 is started by the first test, knowing a follower.
    c.n1 = c.agents[0]["name"]
    c.n2 = "n2" + c.n1[2:]
    subprocess.run([os.path.join(REPO, "deploy", "make-certs.sh"), c.pki,
                    "agent", c.n2], check=True, capture_output=True)
    try:
        yield c
    finally:
        # A SIGKILLed agent leaves its QEMU running (that is the point:
        # a restarted agent re-adopts it). Stop any left in our directory.
        module_procs.stop_all()
        kill_strays(module_workdir)


def kill_strays(workdir):
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if workdir.encode() in cmd and b"qemu" in cmd:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


def start_agent(c, name, schedulers):
    """Cluster.start_agent, but knowing only the given schedulers."""
    kernel, initrd = c.guest
    a = {"name": name, "rpc": "127.0.0.1:%d" % free_port(),
         "dir": os.path.join(c.dir, name)}
    a["proc"] = c.procs.start("agent-%s-%d" % (name, len(c.procs.procs)), [
        binary("paddock-agent"), "--node_id", name,
        "--data_dir", a["dir"], "--rpc_listen", a["rpc"],
        "--schedulers", ",".join(s["rpc"] for s in schedulers),
        "--tls_cert", os.path.join(c.pki, name + ".pem"),
        "--tls_key", os.path.join(c.pki, name + ".key"),
        "--tls_ca", os.path.join(c.pki, "ca.pem"),
        "--kernel", kernel, "--initrd", initrd, "--accel", "tcg",
        "--reserve_memory", "0", "--reserve_disk", "0",
        "--stop_vms_on_exit"])
    c.agents.append(a)
    return a


def nodes(c, at=None):
    st, _h, body = c.api("GET", "/v1/nodes", at=at)
    assert st == 200, body
    return {n["id"]: n for n in body["nodes"]}


def sandbox(c, sid, at=None):
    st, _h, body = c.api("GET", "/v1/sandboxes/" + sid, at=at)
    return body if st == 200 else None


def test_agent_on_a_follower_is_redirected_to_the_leader(cluster):
    lead = cluster.leader()
    fol = cluster.follower()
    # n2 knows only a follower: the redirect is what brings it to the
    # leader.
    n2 = cluster.n2
    a = start_agent(cluster, n2, [fol])
    wait_for(lambda: nodes(cluster).get(n2, {}).get("state") == "ready",
             60, "n2 registered")
    log = a["proc"].log()
    assert "is not the leader, following it to " + lead["rpc"] in log, log
    # Every scheduler sees the node (the registration is replicated).
    for s in cluster.sched:
        wait_for(lambda: n2 in nodes(cluster, at=s), 10,
                 "n2 on scheduler %d" % s["id"])


def test_create_that_fits_nowhere_says_why_per_resource(cluster):
    st, _h, body = cluster.api("POST", "/v1/sandboxes", {
        "id": "too-big", "cpus": 64, "memory_mb": 64, "disk_mb": 16})
    assert st == 409, body
    assert body["error"]["code"] == "no_capacity"
    msg = body["error"]["message"]
    assert "no node fits" in msg and "CPU" in msg, msg
    assert "2 nodes" in msg, msg

    st, _h, body = cluster.api("POST", "/v1/sandboxes", {
        "id": "too-big", "cpus": 1, "memory_mb": 1048576, "disk_mb": 16})
    assert st == 409, body
    msg = body["error"]["message"]
    assert "memory" in msg and "CPU" not in msg, msg
    # Nothing was created.
    assert sandbox(cluster, "too-big") is None


def test_create_on_a_follower_runs_and_is_idempotent(cluster):
    fol = cluster.follower()
    spec = {"id": "sb-a", "cpus": 1, "memory_mb": 128, "disk_mb": 64}
    st, _h, body = cluster.api("POST", "/v1/sandboxes?wait=true", spec,
                               at=fol, timeout=180)
    assert st in (200, 201), body
    assert body["state"] == "running", body
    assert body["node"] in (cluster.n1, cluster.n2)
    # Same id and spec: the same sandbox; another spec: a conflict.
    st, _h, again = cluster.api("POST", "/v1/sandboxes", spec, at=fol)
    assert st in (200, 201) and again["node"] == body["node"], again
    st, _h, other = cluster.api("POST", "/v1/sandboxes",
                                dict(spec, cpus=2), at=fol)
    assert st == 409 and other["error"]["code"] == "conflict", other


def test_a_booting_sandbox_shows_starting_then_running(cluster):
    st, _h, body = cluster.api("POST", "/v1/sandboxes", {
        "id": "sb-b", "cpus": 1, "memory_mb": 128, "disk_mb": 64})
    assert st in (200, 201, 202), body
    assert body["state"] in ("pending", "starting"), body
    seen = []

    def running():
        sb = sandbox(cluster, "sb-b")
        if sb and (not seen or seen[-1] != sb["state"]):
            seen.append(sb["state"])
        return sb and sb["state"] == "running"
    wait_for(running, 120, "sb-b running", interval=0.05)
    assert "starting" in seen, seen
    st, _h, body = cluster.api("DELETE", "/v1/sandboxes/sb-b", timeout=60)
    assert st in (200, 202, 204), body


def test_drain_keeps_sandboxes_and_refuses_new_ones(cluster):
    for n in (cluster.n1, cluster.n2):
        st, _h, body = cluster.api("POST", "/v1/nodes/%s/drain" % n, {})
        assert st in (200, 202, 204), body
    wait_for(lambda: all(n["draining"] for n in nodes(cluster).values()),
             10, "both nodes draining")
    st, _h, body = cluster.api("POST", "/v1/sandboxes", {
        "id": "sb-drained", "cpus": 1, "memory_mb": 128, "disk_mb": 64})
    assert st == 409 and body["error"]["code"] == "no_capacity", body
    assert "draining" in body["error"]["message"], body
    assert sandbox(cluster, "sb-a")["state"] == "running"
    for n in (cluster.n1, cluster.n2):
        st, _h, body = cluster.api("POST", "/v1/nodes/%s/drain" % n,
                                   {"drain": False})
        assert st in (200, 202, 204), body
    wait_for(lambda: not any(n["draining"] for n in nodes(cluster).values()),
             10, "drain off")


def test_sigkill_of_an_agent_commits_its_node_down_and_sandboxes_lost(
        cluster):
    sb = sandbox(cluster, "sb-a")
    victim = next(a for a in cluster.agents if a["name"] == sb["node"])
    t0 = time.monotonic()
    victim["proc"].signal(signal.SIGKILL)
    victim["proc"].popen.wait(5)
    wait_for(lambda: nodes(cluster)[victim["name"]]["state"] == "down",
             GRACE_S + HEARTBEAT_S + 5, "node %s down" % victim["name"],
             interval=0.02)
    took = time.monotonic() - t0
    print("node %s committed down %.2f s after SIGKILL" % (victim["name"],
                                                          took))
    # The last heartbeat may have come up to one interval before the kill;
    # allow the detector's period and the commit on top.
    assert took <= GRACE_S + HEARTBEAT_S + 1.0, took
    assert took >= GRACE_S - HEARTBEAT_S - 0.5, took
    lost = sandbox(cluster, "sb-a")
    assert lost["state"] == "lost", lost
    assert victim["name"] in lost.get("reason", ""), lost
    # A follower agrees (the state is replicated).
    wait_for(lambda: sandbox(cluster, "sb-a",
                             at=cluster.follower())["state"] == "lost",
             5, "lost on a follower")
    cluster.victim = victim


def test_next_exec_places_a_lost_sandbox_again_and_says_so(cluster):
    fol = cluster.follower()
    st, h, body = cluster.api("POST", "/v1/sandboxes/sb-a/exec",
                              {"argv": ["sh", "-c", "ls /workspace | wc -l;"
                                        " echo hi"]},
                              at=fol, timeout=240)
    assert st == 200, body
    assert body.get("replaced") is True or \
        h.get("X-Paddock-Replaced") == "true", (h, body)
    assert body["exit_code"] == 0 and "hi" in body["stdout"], body
    sb = sandbox(cluster, "sb-a")
    assert sb["state"] == "running", sb
    assert sb["node"] != cluster.victim["name"], sb
    assert sb["generation"] == 2, sb
    # Running again: the next exec is not a re-placement.
    st, h, body = cluster.api("POST", "/v1/sandboxes/sb-a/exec",
                              {"argv": ["true"]}, at=fol, timeout=60)
    assert st == 200 and not body.get("replaced"), body


def test_restarted_agent_has_its_stale_vm_destroyed(cluster):
    v = cluster.victim
    cluster.agents.remove(v)
    a = start_agent(cluster, v["name"], cluster.sched)
    wait_for(lambda: nodes(cluster)[v["name"]]["state"] == "ready", 60,
             "%s back" % v["name"])
    # The agent re-adopts the VM that survived its SIGKILL; the leader
    # finds it lost (placed again elsewhere) and destroys it there.
    wait_for(lambda: re.search(r"sb-a.*destroyed", a["proc"].log()), 60,
             "the stale sb-a destroyed on %s" % v["name"])
    assert sandbox(cluster, "sb-a")["node"] != v["name"]


def test_destroy_removes_the_row(cluster):
    st, _h, body = cluster.api("DELETE", "/v1/sandboxes/sb-a", timeout=60)
    assert st in (200, 202, 204), body
    wait_for(lambda: sandbox(cluster, "sb-a") is None, 10, "sb-a gone")
    for s in cluster.sched:
        wait_for(lambda: sandbox(cluster, "sb-a", at=s) is None, 10,
                 "sb-a gone on scheduler %d" % s["id"])


def test_bad_input_on_the_rpc_port_is_refused(cluster):
    # No client certificate: the TLS handshake fails and the scheduler
    # keeps serving.
    import socket
    import ssl
    ctx = ssl.create_default_context(cafile=os.path.join(cluster.pki,
                                                         "ca.pem"))
    ctx.check_hostname = False
    host, port = cluster.sched[0]["rpc"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, OSError)):
            with ctx.wrap_socket(raw) as s:
                s.sendall(b"\x00\x00\x00\x05hello")
                s.recv(10)
    assert nodes(cluster)[cluster.n2]["state"] == "ready"


def test_new_leader_keeps_nodes_up_and_takes_their_sessions(cluster):
    # Last: it stops a scheduler for good. A graceful stop hands the
    # leadership over; the old leader, now a follower, redirects its
    # sessions, the agents register with the new leader, and the new
    # leader (which heard no heartbeat before its election) gives every
    # node a full grace period instead of judging it at once.
    old = cluster.leader()
    logs_before = {a["name"]: len(a["proc"].log()) for a in cluster.agents}
    old["proc"].stop()
    rest = [s for s in cluster.sched if s is not old]
    new = wait_for(lambda: cluster.leader(), 30, "a new leader")
    assert new is not old
    deadline = time.monotonic() + GRACE_S + 2 * HEARTBEAT_S
    while time.monotonic() < deadline:
        ns = nodes(cluster, at=new)
        assert all(n["state"] == "ready" for n in ns.values()), ns
        time.sleep(0.2)
    for a in cluster.agents:
        tail = a["proc"].log()[logs_before[a["name"]]:]
        assert "registered with leader " + new["rpc"] in tail, tail
    # Writes still work on the new leader (drain on and off).
    st, _h, body = cluster.api("POST", "/v1/nodes/%s/drain" % cluster.n2,
                               {"drain": False}, at=rest[0])
    assert st in (200, 202, 204), body


# ---- the RPC port's checks, spoken by hand ---------------------------------

def mp_pack(v):
    """Enough msgpack for the frames below: maps, str, int, bool, lists."""
    import struct
    if isinstance(v, bool):
        return b"\xc3" if v else b"\xc2"
    if isinstance(v, int):
        return b"\xcf" + struct.pack(">Q", v)
    if isinstance(v, str):
        b = v.encode()
        return b"\xd9" + bytes([len(b)]) + b
    if isinstance(v, list):
        return b"\xdc" + struct.pack(">H", len(v)) + \
            b"".join(mp_pack(x) for x in v)
    if isinstance(v, dict):
        return b"\xde" + struct.pack(">H", len(v)) + b"".join(
            mp_pack(k) + mp_pack(x) for k, x in v.items())
    raise TypeError(v)


def mp_unpack(b, i=0):
    """Returns (value, next index) for the types the schedulers send."""
    import struct
    c = b[i]
    if c <= 0x7f:
        return c, i + 1
    if 0x80 <= c <= 0x8f or c in (0xde, 0xdf):
        n, i = (c & 0x0f, i + 1) if c <= 0x8f else \
            (struct.unpack(">H", b[i + 1:i + 3])[0], i + 3) if c == 0xde \
            else (struct.unpack(">I", b[i + 1:i + 5])[0], i + 5)
        d = {}
        for _ in range(n):
            k, i = mp_unpack(b, i)
            d[k], i = mp_unpack(b, i)
        return d, i
    if 0x90 <= c <= 0x9f:
        out, i = [], i + 1
        for _ in range(c & 0x0f):
            x, i = mp_unpack(b, i)
            out.append(x)
        return out, i
    if 0xa0 <= c <= 0xbf or c in (0xd9, 0xda):
        n, i = (c & 0x1f, i + 1) if c <= 0xbf else \
            (b[i + 1], i + 2) if c == 0xd9 else \
            (struct.unpack(">H", b[i + 1:i + 3])[0], i + 3)
        return b[i:i + n].decode(), i + n
    if c in (0xc2, 0xc3):
        return c == 0xc3, i + 1
    if c == 0xc0:
        return None, i + 1
    sizes = {0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8, 0xd0: 1, 0xd1: 2, 0xd2: 4,
             0xd3: 8}
    if c in sizes:
        n = sizes[c]
        return int.from_bytes(b[i + 1:i + 1 + n], "big",
                              signed=c >= 0xd0), i + 1 + n
    if c >= 0xe0:
        return c - 256, i + 1
    raise ValueError("msgpack type 0x%02x" % c)


class RpcClient:
    def __init__(self, c, addr, cert):
        import socket
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(os.path.join(c.pki, "ca.pem"))
        ctx.load_cert_chain(os.path.join(c.pki, cert + ".pem"),
                            os.path.join(c.pki, cert + ".key"))
        host, port = addr.rsplit(":", 1)
        raw = socket.create_connection((host, int(port)), timeout=10)
        self.s = ctx.wrap_socket(raw)
        self.buf = b""

    def send(self, frame):
        body = mp_pack(frame)
        self.s.sendall(len(body).to_bytes(4, "big") + body)

    def recv(self):
        """The next frame, or None once the scheduler closed."""
        while True:
            if len(self.buf) >= 4:
                n = int.from_bytes(self.buf[:4], "big")
                if len(self.buf) >= 4 + n:
                    v, _ = mp_unpack(self.buf[4:4 + n])
                    self.buf = self.buf[4 + n:]
                    return v
            try:
                chunk = self.s.recv(65536)
            except OSError:
                return None
            if not chunk:
                return None
            self.buf += chunk

    def close(self):
        self.s.close()


def register_frame(node, **kw):
    f = {"t": 300, "id": 7, "node": node, "rpc_addr": "127.0.0.1:1",
         "cpus": 1, "memory_mb": 64, "disk_mb": 64, "labels": {},
         "sandboxes": []}
    f.update(kw)
    return f


def test_rpc_peer_must_be_who_its_certificate_says(cluster):
    lead = cluster.leader()
    # An agent certificate claiming the scheduler role is closed.
    n1, n2 = cluster.n1, cluster.n2
    cl = RpcClient(cluster, lead["rpc"], n1)
    cl.send({"t": 1, "id": 0, "v": 1, "role": "scheduler", "name": "x"})
    cl.send({"t": 400, "id": 1, "method": "GET", "path": "/v1/cluster"})
    frames = []
    while True:
        f = cl.recv()
        if f is None:
            break
        frames.append(f)
    assert all(f["t"] == 1 for f in frames), frames  # only its HELLO
    cl.close()

    # An agent may register only the node its certificate names; bad
    # fields get an ERROR and the session stays.
    cl = RpcClient(cluster, lead["rpc"], n1)
    cl.send({"t": 1, "id": 0, "v": 1, "role": "agent", "name": n1})
    assert cl.recv()["t"] == 1
    cl.send(register_frame(n2))
    err = cl.recv()
    assert err["t"] == 3 and "CN=%s may not register node %s" % (n1, n2) \
        in err["message"], err
    cl.send(register_frame("NOT VALID"))
    err = cl.recv()
    assert err["t"] == 3 and err["code"] == "EINVAL", err
    cl.send(register_frame(n1, cpus=0))
    err = cl.recv()
    assert err["t"] == 3 and "cpus" in err["message"], err
    cl.send({"t": 6, "id": 9})
    assert cl.recv()["t"] == 7  # PONG: still served
    cl.close()
    assert nodes(cluster, at=lead)[n1]["state"] == "ready"
