#!/usr/bin/python3
"""Revocation propagation and preview proxy cost (prints figures; not a
pass/fail test).

    PADDOCK_BUILD=build PADDOCK_GUEST_DIR=deploy/guest/out \\
        tests/bench/tokens/bench_tokens.py [--rounds 50] [--n 300] [--c 8]

Starts 3 schedulers and 1 agent on loopback (tests/integration/conftest.py's
Cluster) and one sandbox running busybox httpd on port 8080, then:

  revocation: `rounds` times, mints a tenant token, waits until every
  scheduler accepts it, revokes it through a follower (forwarded to the
  leader) and polls every scheduler on its own keep-alive connection until
  each answers 401; prints p50/p99 of the time from sending the revoke to
  the last scheduler refusing, and of the revoke call itself.

  preview: `n` GETs of a 1 KiB page through a follower's preview listener
  (Host routing, token check, TUNNEL_OPEN via the agent, HTTP relay),
  versus the same GETs sent straight to the agent's forwarded port for the
  guest port (PORT_OPEN, QEMU's hostfwd), in the same run: sequentially
  (latency p50/p99, requests/s) and with `c` concurrent clients
  (requests/s). A new connection per request on both sides, since the
  guest's httpd closes after each answer anyway.

Everything it starts is stopped at the end.
"""
import argparse
import datetime
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "integration"))

from conftest import GUEST_DIR, Cluster, Procs, binary, wait_for  # noqa


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


def ms(x):
    return "%.2f ms" % (x * 1000.0)


class Poller:
    """One keep-alive connection to one scheduler's API."""

    def __init__(self, addr):
        h, p = addr.rsplit(":", 1)
        self.h, self.p = h, int(p)
        self.c = http.client.HTTPConnection(self.h, self.p, timeout=10)

    def status(self, token):
        for _ in range(2):
            try:
                self.c.request("GET", "/v1/sandboxes",
                               headers={"Authorization": "Bearer " + token})
                r = self.c.getresponse()
                r.read()
                return r.status
            except (http.client.HTTPException, OSError):
                self.c.close()
                self.c = http.client.HTTPConnection(self.h, self.p,
                                                    timeout=10)
        return 0


def agent_revoked_at(agent, jti, timeout=2.0):
    """Wall time (s) of the agent's "token JTI revoked" log line, or None."""
    needle = "token %s revoked" % jti
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in agent["proc"].log().splitlines():
            if needle in line:
                ts = line.split(" ", 1)[0]          # 2026-12-04T05:02:17.959Z
                return datetime.datetime.strptime(
                    ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                        tzinfo=datetime.timezone.utc).timestamp()
        time.sleep(0.01)
    return None


def bench_revocation(c, rounds):
    pollers = [Poller(s["api"]) for s in c.sched]
    fol = c.follower()
    total, call, agents = [], [], []
    for _ in range(rounds):
        st, _h, body = c.api("POST", "/v1/tokens",
                             {"tenant": "bench", "ttl_s": 600})
        assert st == 201, body
        tok, jti = body["token"], body["jti"]
        for p in pollers:
            wait_for(lambda: p.status(tok) == 200, 5, "token accepted",
                     interval=0.005)
        done = [None] * len(pollers)
        start = threading.Event()

        def watch(i):
            start.wait()
            while pollers[i].status(tok) != 401:
                pass
            done[i] = time.monotonic()

        ts = [threading.Thread(target=watch, args=(i,))
              for i in range(len(pollers))]
        for t in ts:
            t.start()
        t0 = time.monotonic()
        w0 = time.time()
        start.set()
        st, _h, body = c.api("DELETE", "/v1/tokens/" + jti, at=fol)
        t1 = time.monotonic()
        assert st == 200, body
        for t in ts:
            t.join(10)
        total.append(max(done) - t0)
        call.append(t1 - t0)
        if agents is not None:
            at = [agent_revoked_at(a, jti) for a in c.agents]
            if None in at:
                agents = None    # this agent build does not log them
            else:
                agents.append(max(at) - w0)
    print("revocation propagation over %d rounds (3 schedulers):" % rounds)
    print("  revoke to every scheduler refusing: p50 %s  p99 %s  max %s" % (
        ms(pct(total, 50)), ms(pct(total, 99)), ms(max(total))))
    print("  the revoke call itself (follower -> leader -> commit): "
          "p50 %s  p99 %s" % (ms(pct(call, 50)), ms(pct(call, 99))))
    if agents:
        print("  revoke to every agent's egress proxy refusing (from its "
              "log, 1 ms resolution): p50 %s  p99 %s" % (
                  ms(pct(agents, 50)), ms(pct(agents, 99))))
    else:
        print("  agents: this agent build does not report revocations")


def get(addr, host, path):
    h, p = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(h, int(p), timeout=30)
    try:
        c.request("GET", path, headers={"Host": host})
        r = c.getresponse()
        body = r.read()
        return r.status, body
    finally:
        c.close()


def run_seq(addr, host, n):
    lat = []
    t0 = time.monotonic()
    for _ in range(n):
        a = time.monotonic()
        st, body = get(addr, host, "/page.html")
        lat.append(time.monotonic() - a)
        assert st == 200 and len(body) == 1024, (st, len(body))
    return lat, n / (time.monotonic() - t0)


def run_conc(addr, host, n, conc):
    left = [n]
    lock = threading.Lock()
    errors = []

    def worker():
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            try:
                st, _b = get(addr, host, "/page.html")
                if st != 200:
                    errors.append(st)
            except OSError as e:
                errors.append(repr(e))

    ts = [threading.Thread(target=worker) for _ in range(conc)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    rate = n / (time.monotonic() - t0)
    assert not errors, errors[:5]
    return rate


def port_open(c, sb, port):
    agent = c.agents[0]
    pki = c.pki
    p = subprocess.run([
        binary("pd-agent-client"), "--addr", agent["rpc"],
        "--cert", os.path.join(pki, "s1.pem"),
        "--key", os.path.join(pki, "s1.key"),
        "--ca", os.path.join(pki, "ca.pem"), "call", "PORT_OPEN",
        json.dumps({"sandbox": sb, "port": port})],
        capture_output=True, timeout=30)
    for line in p.stdout.decode().splitlines():
        m = json.loads(line)
        if "host_port" in m:
            return m["host_port"]
    raise RuntimeError("PORT_OPEN failed: %s %s" % (p.stdout, p.stderr))


def bench_preview(c, n, conc):
    sb = "bench"
    st, _h, body = c.api("POST", "/v1/sandboxes?wait=true", {
        "id": sb, "cpus": 1, "memory_mb": 256, "disk_mb": 64}, timeout=180)
    assert st in (200, 201) and body["state"] == "running", body
    c.api("POST", "/v1/sandboxes/%s/exec" % sb, {
        "command": "mkdir -p /workspace/www && head -c 1024 /dev/zero | "
                   "tr '\\0' x > /workspace/www/page.html"})
    c.api("POST", "/v1/sandboxes/%s/processes" % sb,
          {"command": "httpd -f -p 8080 -h /workspace/www"})
    st, _h, body = c.api("POST", "/v1/sandboxes/%s/ports" % sb,
                         {"port": 8080})
    assert st == 201, body
    host = body["url"].split("//", 1)[1].split(":", 1)[0]
    fol = c.follower()
    wait_for(lambda: get(fol["preview"], host, "/page.html")[0] == 200, 30,
             "the preview URL to answer")
    direct = "127.0.0.1:%d" % port_open(c, sb, 8080)
    wait_for(lambda: get(direct, "x", "/page.html")[0] == 200, 30,
             "the forwarded port to answer")

    warm = max(10, n // 10)
    run_seq(direct, "x", warm)
    run_seq(fol["preview"], host, warm)
    d_lat, d_rate = run_seq(direct, "x", n)
    p_lat, p_rate = run_seq(fol["preview"], host, n)
    d_conc = run_conc(direct, "x", n, conc)
    p_conc = run_conc(fol["preview"], host, n, conc)
    print("preview proxy, %d GETs of 1 KiB, new connection each "
          "(guest under TCG):" % n)
    print("  %-34s p50 %-10s p99 %-10s %7.1f req/s; %d clients %7.1f req/s"
          % ("direct to the forwarded port:", ms(pct(d_lat, 50)),
             ms(pct(d_lat, 99)), d_rate, conc, d_conc))
    print("  %-34s p50 %-10s p99 %-10s %7.1f req/s; %d clients %7.1f req/s"
          % ("through a follower's preview URL:", ms(pct(p_lat, 50)),
             ms(pct(p_lat, 99)), p_rate, conc, p_conc))
    print("  added latency p50 %s; throughput ratio %.2f (sequential), "
          "%.2f (%d clients)" % (ms(pct(p_lat, 50) - pct(d_lat, 50)),
                                 p_rate / d_rate, p_conc / d_conc, conc))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--c", type=int, default=8)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="paddock-bench-tokens-")
    procs = Procs(work)
    guest = (os.path.join(GUEST_DIR, "vmlinuz"),
             os.path.join(GUEST_DIR, "initrd.img"))
    try:
        c = Cluster(procs, work, schedulers=3, agents=1, guest=guest,
                    sched_args=["--rate_per_s", "100000",
                                "--rate_burst", "100000"])
        bench_revocation(c, args.rounds)
        bench_preview(c, args.n, args.c)
    except BaseException:
        print(procs.dump_logs(3000))
        raise
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
