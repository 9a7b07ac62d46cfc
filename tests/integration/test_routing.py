"""Sandbox traffic sent to any scheduler reaches the sandbox's agent.

Three schedulers and two agents with real VMs (TCG) on loopback; one
sandbox pinned to each agent by a label constraint. Every exec, process
and file call goes to a follower, which is neither the leader nor the
scheduler the agents hold their sessions with, so the only way to the
sandbox is the follower's own mutual-TLS link to the agent (agentc.c).
Shows: collected and streamed exec (output arrives before the command
ends), processes with followed logs, a 100 MiB upload and download with
matching checksums while the follower's RSS stays small, the guest's
errors as 4xx/507 statuses, strict input checks, and a client that goes
away mid-stream cancelling the guest side.
"""
import base64
import hashlib
import http.client
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from conftest import REPO, Cluster, http_json, wait_for

SANDBOXES = {"rt-a": "n1", "rt-b": "n2"}


@pytest.fixture(scope="module")
def cl(guest_image, module_procs, module_workdir):
    c = Cluster(module_procs, module_workdir, schedulers=3, agents=0)
    # Node ids name the agents' cgroups, shared by every run on this
    # machine: a suffix per run, as Cluster gives its own agents.
    suffix = os.urandom(3).hex()
    ids = {n: "%s-%s" % (n, suffix) for n in ("n1", "n2")}
    subprocess.run([os.path.join(REPO, "deploy", "make-certs.sh"), c.pki,
                    "agent"] + list(ids.values()), check=True,
                   capture_output=True)
    try:
        for n, node_id in ids.items():
            c.start_agent(node_id, guest_image, ["--labels", "name=" + n])
        wait_for(c._agents_ready, 120, "both agents ready")
        lead = c.leader()
        for sb, node in SANDBOXES.items():
            st, _h, body = c.api("POST", "/v1/sandboxes?wait=true", {
                "id": sb, "cpus": 1, "memory_mb": 256,
                "disk_mb": 384 if sb == "rt-a" else 48,
                "constraints": {"name": node}}, at=lead, timeout=180)
            assert st in (200, 201), body
            assert body["state"] == "running" and \
                body["node"] == ids[node], body
    except BaseException:
        print(module_procs.dump_logs())
        raise
    c.f = c.follower()
    yield c
    if any(not s["proc"].alive() for s in c.sched):
        print(module_procs.dump_logs())


def call(cl, method, path, body=None, at=None, **kw):
    return http_json(method, (at or cl.f)["api"], path, cl.token, body,
                     **kw)


def execj(cl, sb, body, at=None):
    st, _h, r = call(cl, "POST", "/v1/sandboxes/%s/exec" % sb, body, at=at,
                     timeout=60)
    assert st == 200, r
    return r


def sse(resp):
    """Yields (event, data) pairs of a text/event-stream response."""
    ev, data = None, []
    while True:
        line = resp.readline()
        if not line:
            return
        line = line.decode().rstrip("\n")
        if line == "":
            if ev is not None:
                yield ev, json.loads("\n".join(data))
            ev, data = None, []
        elif line.startswith("event: "):
            ev = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])


def open_stream(cl, method, path, body=None, at=None):
    host, port = (at or cl.f)["api"].rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=60)
    c.request(method, path, body=json.dumps(body) if body else None,
              headers={"Authorization": "Bearer " + cl.token})
    r = c.getresponse()
    assert r.status == 200, r.read()
    assert r.getheader("Content-Type").startswith("text/event-stream")
    return c, r


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class RssWatch:
    """Samples a process's RSS every 50 ms while the block runs."""

    def __init__(self, pid):
        self.pid, self.peak, self.base = pid, 0, rss_kib(pid)
        self.stop = threading.Event()

    def _run(self):
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, rss_kib(self.pid))

    def __enter__(self):
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join(5)


def guest_has(cl, sb, needle):
    """True when some process in the guest has needle in its command."""
    r = execj(cl, sb, {"command": "cat /proc/[0-9]*/cmdline 2>/dev/null | "
                                  "tr '\\0' ' '"})
    return needle in r["stdout"]


# ---- exec --------------------------------------------------------------------

def test_exec_reaches_both_agents_through_each_follower(cl):
    lead = cl.leader()
    for s in cl.sched:
        if s is lead:
            continue
        for sb in SANDBOXES:
            r = execj(cl, sb, {"argv": ["sh", "-c", "hostname; echo oops >&2;"
                                        " exit 3"]}, at=s)
            assert r["exit_code"] == 3
            assert r["stdout"] == sb + "\n"
            assert r["stderr"] == "oops\n"
            assert r["truncated"] is False and r["duration_ms"] >= 0


def test_concurrent_execs_share_the_follower_links(cl):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        sb = "rt-a" if i % 2 else "rt-b"
        return sb, i, execj(cl, sb, {"argv": ["sh", "-c",
                                             "sleep 0.2; echo %d" % i]})
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(32)))
    for sb, i, r in results:
        assert r["exit_code"] == 0 and r["stdout"] == "%d\n" % i, (sb, r)


def test_exec_argv_is_data_and_command_is_shell(cl):
    r = execj(cl, "rt-a", {"argv": ["echo", "$HOME; rm -rf /", "a  b"]})
    assert r["stdout"] == "$HOME; rm -rf / a  b\n"
    r = execj(cl, "rt-a", {"command": "echo $FOO; pwd", "env": {"FOO": "x"},
                           "cwd": "/tmp"})
    assert r["stdout"] == "x\n/tmp\n"
    r = execj(cl, "rt-a", {"argv": ["cat"], "stdin": "fed\n"})
    assert r["stdout"] == "fed\n"
    r = execj(cl, "rt-a", {"argv": ["sleep", "10"], "timeout_ms": 300})
    assert r["timed_out"] is True and r["exit_code"] is None


def test_streamed_output_arrives_before_the_command_ends(cl):
    t0 = time.monotonic()
    c, r = open_stream(cl, "POST", "/v1/sandboxes/rt-b/exec?stream=true",
                       {"command": "echo first; sleep 2; echo second >&2; "
                                   "exit 5"})
    seen = []
    try:
        for ev, data in sse(r):
            seen.append((time.monotonic() - t0, ev, data))
            if ev in ("exit", "error"):
                break
    finally:
        c.close()
    events = [e for _t, e, _d in seen]
    assert events == ["start", "stdout", "stderr", "exit"], seen
    t_first, t_exit = seen[1][0], seen[3][0]
    assert base64.b64decode(seen[1][2]["data"]) == b"first\n"
    assert base64.b64decode(seen[2][2]["data"]) == b"second\n"
    assert seen[3][2]["exit_code"] == 5
    assert t_exit - t_first >= 1.5, seen


def test_client_going_away_cancels_the_guest_exec(cl):
    c, r = open_stream(cl, "POST", "/v1/sandboxes/rt-a/exec?stream=true",
                       {"command": "echo started; sleep 37; echo late"})
    try:
        for ev, _data in sse(r):
            if ev == "stdout":
                break
        assert guest_has(cl, "rt-a", "sleep 37")
    finally:
        c.sock.shutdown(2)
        c.close()
    wait_for(lambda: not guest_has(cl, "rt-a", "sleep 37"), 15,
             "the guest to kill the abandoned exec")


# ---- processes ---------------------------------------------------------------

def test_process_start_list_follow_logs_and_signal(cl):
    base = "/v1/sandboxes/rt-b/processes"
    st, _h, r = call(cl, "POST", base, {
        "id": "ticker",
        "command": "for i in 1 2 3; do echo tick $i; sleep 0.3; done; "
                   "echo bye >&2; exit 4"})
    assert st in (200, 201) and r["id"] == "ticker" and r["pid"] > 0, r
    st, _h, r = call(cl, "GET", base)
    assert st == 200 and "ticker" in [p["id"] for p in r["processes"]]

    c, resp = open_stream(cl, "GET", base + "/ticker/logs?follow=true")
    out, err, end = b"", b"", None
    try:
        for ev, data in sse(resp):
            if ev == "stdout":
                out += base64.b64decode(data["data"])
            elif ev == "stderr":
                err += base64.b64decode(data["data"])
            elif ev in ("exit", "error"):
                end = (ev, data)
                break
    finally:
        c.close()
    assert out == b"tick 1\ntick 2\ntick 3\n" and err == b"bye\n"
    assert end == ("exit", {"exit_code": 4, "signal": None,
                            "running": False}), end

    st, _h, r = call(cl, "GET", base + "/ticker/logs")
    assert st == 200 and r["stdout"] == out.decode() and r["stderr"] == "bye\n"
    st, _h, r = call(cl, "GET", base + "/ticker")
    assert st == 200 and r["running"] is False and r["exit_code"] == 4

    st, _h, r = call(cl, "POST", base, {"id": "sleeper",
                                        "argv": ["sleep", "300"]})
    assert st in (200, 201), r
    # Following a silent process: the stream starts at once and ends with
    # the signal that ends the process.
    c, resp = open_stream(cl, "GET", base + "/sleeper/logs?follow=true")
    try:
        st, _h, r = call(cl, "DELETE", base + "/sleeper?signal=SIGTERM")
        assert st == 200, r
        end = next((e, d) for e, d in sse(resp) if e in ("exit", "error"))
        assert end == ("exit", {"exit_code": None, "signal": 15,
                                "running": False}), end
    finally:
        c.close()
    wait_for(lambda: call(cl, "GET", base + "/sleeper")[2]["running"] is
             False, 15, "the signalled process to end")
    st, _h, r = call(cl, "GET", base + "/sleeper")
    assert r["signal"] == 15, r
    st, _h, r = call(cl, "DELETE", base + "/sleeper")
    assert st == 409 and r["error"]["code"] == "conflict", r


# ---- files -------------------------------------------------------------------

def test_100mib_upload_and_download_through_a_follower(cl, module_workdir):
    size = 100 << 20
    local = os.path.join(module_workdir, "blob")
    h = hashlib.sha256()
    with open(local, "wb") as f:
        for _ in range(size >> 20):
            chunk = os.urandom(1 << 20)
            h.update(chunk)
            f.write(chunk)
    want = h.hexdigest()
    pid = cl.f["proc"].pid
    host, port = cl.f["api"].rsplit(":", 1)

    t0 = time.monotonic()
    with RssWatch(pid) as up, open(local, "rb") as f:
        c = http.client.HTTPConnection(host, int(port), timeout=120)
        c.request("PUT", "/v1/sandboxes/rt-a/files?path=/workspace/blob",
                  body=f, headers={"Authorization": "Bearer " + cl.token,
                                   "Content-Length": str(size)})
        r = c.getresponse()
        body = json.loads(r.read())
        c.close()
    assert r.status == 200 and body["size"] == size, body
    t_up = time.monotonic() - t0

    got = hashlib.sha256()
    t0 = time.monotonic()
    n = 0
    with RssWatch(pid) as down:
        c = http.client.HTTPConnection(host, int(port), timeout=120)
        c.request("GET", "/v1/sandboxes/rt-a/files?path=/workspace/blob",
                  headers={"Authorization": "Bearer " + cl.token})
        r = c.getresponse()
        assert r.status == 200
        assert int(r.getheader("Content-Length")) == size
        while True:
            chunk = r.read(1 << 20)
            if not chunk:
                break
            n += len(chunk)
            got.update(chunk)
        c.close()
    t_down = time.monotonic() - t0
    assert n == size and got.hexdigest() == want
    r = execj(cl, "rt-a", {"argv": ["sha256sum", "/workspace/blob"]})
    assert r["stdout"].split()[0] == want
    # Neither direction held the file: the follower grew by a few windows
    # at most.
    for w in (up, down):
        assert w.peak - w.base < 48 << 10, (w.base, w.peak)
    print("100 MiB via follower: up %.1f MiB/s, down %.1f MiB/s; RSS base "
          "%d KiB, peak %d KiB up, %d KiB down" % (
              100 / t_up, 100 / t_down, up.base, up.peak, down.peak))


def test_files_list_mkdir_rename_delete(cl):
    base = "/v1/sandboxes/rt-b/files"
    st, _h, r = call(cl, "PUT", base + "?path=/workspace/d/x.txt",
                     b"hello\n")
    assert st == 404, r  # no parent directory yet
    st, _h, r = call(cl, "POST", base + "/mkdir", {"path": "/workspace/d/e",
                                                   "parents": True})
    assert st == 200, r
    st, _h, r = call(cl, "PUT", base + "?path=/workspace/d/x.txt",
                     b"hello\n")
    assert st == 200 and r["size"] == 6, r
    st, _h, r = call(cl, "GET", base + "?path=/workspace/d/x.txt")
    assert st == 200 and r == b"hello\n"
    st, _h, r = call(cl, "GET", base + "/list?path=/workspace/d")
    assert st == 200
    entries = {e["name"]: e for e in r["entries"]}
    assert entries["x.txt"]["type"] == "file" and entries["x.txt"]["size"] == 6
    assert entries["e"]["type"] == "dir"
    st, _h, r = call(cl, "GET", base + "/list?path=/workspace&recursive=true")
    assert st == 200 and any(e["name"].endswith("x.txt") for e in r["entries"])
    st, _h, r = call(cl, "POST", base + "/rename", {"from": "/workspace/d/x.txt",
                                                    "to": "/workspace/d/e/y"})
    assert st == 200, r
    st, _h, r = call(cl, "GET", base + "?path=/workspace/d/e/y")
    assert st == 200 and r == b"hello\n"
    st, _h, r = call(cl, "DELETE", base + "?path=/workspace/d")
    assert st == 409 and r["error"]["code"] == "conflict", r
    st, _h, r = call(cl, "DELETE", base + "?path=/workspace/d&recursive=true")
    assert st == 200, r
    st, _h, r = call(cl, "GET", base + "?path=/workspace/d/e/y")
    assert st == 404


def test_guest_errors_become_statuses(cl):
    base = "/v1/sandboxes/rt-b/files"
    cases = [
        ("GET", base + "?path=/workspace/missing", None, 404, "not_found"),
        ("GET", base + "?path=/workspace", None, 400, "invalid_argument"),
        ("POST", base + "/mkdir", {"path": "/workspace"}, 409, "conflict"),
        ("DELETE", base + "?path=/workspace/missing", None, 404,
         "not_found"),
        ("GET", "/v1/sandboxes/rt-b/processes/nope", None, 404, "not_found"),
        ("POST", "/v1/sandboxes/rt-b/exec", {"argv": ["/no/such/tool"]},
         404, "not_found"),
    ]
    for method, path, body, status, code in cases:
        st, _h, r = call(cl, method, path, body)
        assert (st, r["error"]["code"]) == (status, code), (path, st, r)
        assert r["error"]["message"], r

    # A full disk: ENOSPC is 507 and leaves no partial file behind.
    execj(cl, "rt-b", {"command": "dd if=/dev/zero of=/workspace/fill "
                                  "bs=1M 2>/dev/null; sync; true"})
    try:
        st, _h, r = call(cl, "PUT", base + "?path=/workspace/more",
                         os.urandom(64 << 10), timeout=60)
        assert st == 507, (st, r)
        assert "space" in r["error"]["message"].lower(), r
        st, _h, r = call(cl, "GET", base + "?path=/workspace/more")
        assert st == 404
    finally:
        st, _h, r = call(cl, "DELETE", base + "?path=/workspace/fill")
        assert st == 200, r


def test_bad_input_gets_a_clear_4xx(cl):
    ex = "/v1/sandboxes/rt-a/exec"
    cases = [
        ("POST", ex, b"{not json", 400),
        ("POST", ex, {"argv": "ls"}, 400),
        ("POST", ex, {"argv": []}, 400),
        ("POST", ex, {"argv": ["ls"], "command": "ls"}, 400),
        ("POST", ex, {}, 400),
        ("POST", ex, {"argv": ["ls"], "surprise": 1}, 400),
        ("POST", ex, {"argv": ["ls"], "timeout_ms": -5}, 400),
        ("POST", ex, {"argv": ["ls"], "env": {"A=B": "c"}}, 400),
        ("POST", ex + "?stream=maybe", {"argv": ["ls"]}, 400),
        ("POST", ex + "?bogus=1", {"argv": ["ls"]}, 400),
        ("POST", "/v1/sandboxes/no-such/exec", {"argv": ["ls"]}, 404),
        ("POST", "/v1/sandboxes/BAD_ID/exec", {"argv": ["ls"]}, 400),
        ("GET", "/v1/sandboxes/rt-a/files", None, 400),
        ("GET", "/v1/sandboxes/rt-a/files?path=", None, 400),
        ("PUT", "/v1/sandboxes/rt-a/files?path=/x&mode=999", b"x", 400),
        ("POST", "/v1/sandboxes/rt-a/files/rename", {"from": "/a"}, 400),
        ("POST", "/v1/sandboxes/rt-a/processes", {"id": "Bad!",
                                                  "argv": ["ls"]}, 400),
        ("DELETE", "/v1/sandboxes/rt-a/processes/x?signal=NOPE", None, 400),
        ("GET", "/v1/sandboxes/rt-a/processes/UPPER", None, 400),
    ]
    for method, path, body, status in cases:
        st, _h, r = call(cl, method, path, body)
        assert st == status, (method, path, body, st, r)
        assert r["error"]["code"] and r["error"]["message"], r
    # The scheduler is still serving.
    assert execj(cl, "rt-a", {"argv": ["true"]})["exit_code"] == 0


def test_another_tenants_sandbox_is_not_found(cl):
    st, _h, r = call(cl, "POST", "/v1/tokens", {"tenant": "acme",
                                               "role": "tenant"},
                     at=cl.leader())
    assert st in (200, 201), r
    # The token reaches the follower by replication, a moment later.
    st, _h, body = wait_for(lambda: (lambda v: v if v[0] != 401 else None)(
        http_json("POST", cl.f["api"], "/v1/sandboxes/rt-a/exec",
                  r["token"], {"argv": ["true"]})), 10,
        "the follower to know the new token")
    assert st == 404 and body["error"]["code"] == "not_found", body
    st, _h, body = http_json("GET", cl.f["api"],
                             "/v1/sandboxes/rt-a/files?path=/etc/passwd",
                             r["token"])
    assert st == 404, body


def test_client_abandoning_transfers_leaves_no_file(cl):
    host, port = cl.f["api"].rsplit(":", 1)
    # An upload cut off after 8 of 64 MiB: the guest drops its temporary
    # file, so the target never appears.
    c = http.client.HTTPConnection(host, int(port), timeout=60)
    c.putrequest("PUT", "/v1/sandboxes/rt-a/files?path=/workspace/cut")
    c.putheader("Authorization", "Bearer " + cl.token)
    c.putheader("Content-Length", str(64 << 20))
    c.endheaders()
    for _ in range(8):
        c.send(os.urandom(1 << 20))
    c.sock.shutdown(2)
    c.close()
    # A download dropped after its first megabyte.
    c = http.client.HTTPConnection(host, int(port), timeout=60)
    c.request("GET", "/v1/sandboxes/rt-a/files?path=/workspace/blob",
              headers={"Authorization": "Bearer " + cl.token})
    r = c.getresponse()
    assert r.status == 200 and len(r.read(1 << 20)) == 1 << 20
    c.sock.shutdown(2)
    c.close()

    def clean():
        r = execj(cl, "rt-a", {"command": "ls -a /workspace"})
        return "cut" not in r["stdout"]
    wait_for(clean, 15, "the abandoned upload to leave nothing behind")
    st, _h, r = call(cl, "GET", "/v1/sandboxes/rt-a/files?path=/workspace/cut")
    assert st == 404, r
    assert execj(cl, "rt-a", {"argv": ["true"]})["exit_code"] == 0


# Last: freezes an agent, so the sandboxes pinned to it are gone after.
def test_frozen_agent_fails_open_streams_and_the_sandbox_moves(cl):
    st, _h, body = call(cl, "POST", "/v1/sandboxes?wait=true", {
        "id": "rt-c", "cpus": 1, "memory_mb": 256, "disk_mb": 32},
        at=cl.leader(), timeout=180)
    assert st in (200, 201) and body["state"] == "running", body
    old = body["node"]
    agent = next(a for a in cl.agents if a["name"] == old)
    c, r = open_stream(cl, "POST", "/v1/sandboxes/rt-c/exec?stream=true",
                       {"command": "echo up; sleep 120"})
    try:
        events = sse(r)
        assert next(events)[0] == "start"
        assert next(events)[0] == "stdout"
        agent["proc"].signal(signal.SIGSTOP)
        t0 = time.monotonic()
        ev, data = next(events)
        # The follower's link notices the silence, not a TCP error.
        assert ev == "error" and data["error"]["code"] == "unavailable", \
            (ev, data)
        assert time.monotonic() - t0 < 20
    finally:
        c.close()
    try:
        wait_for(lambda: any(n["id"] == old and n["state"] == "down"
                             for n in call(cl, "GET", "/v1/nodes")[2]
                             ["nodes"]), 30, "node %s down" % old)
        st, h, r = call(cl, "POST", "/v1/sandboxes/rt-c/exec",
                        {"argv": ["hostname"]}, timeout=180)
        assert st == 200 and r["stdout"] == "rt-c\n", r
        assert r.get("replaced") is True, r
        assert h.get("X-Paddock-Replaced") == "true", h
        st, _h, body = call(cl, "GET", "/v1/sandboxes/rt-c")
        assert body["node"] != old and body["state"] == "running", body
        r = execj(cl, "rt-c", {"argv": ["true"]})
        assert "replaced" not in r
    finally:
        agent["proc"].signal(signal.SIGCONT)
