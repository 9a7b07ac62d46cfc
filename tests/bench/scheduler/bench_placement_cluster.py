#!/usr/bin/env python3
"""Placement throughput and node-loss detection on a real 3-scheduler cluster.

Starts 3 paddock-schedulers on loopback, then:

  node loss   ROUNDS times: one simulated agent (pd-simnodes, one node)
              registers, is SIGKILLed, and the time until its node is
              committed down is measured (polling GET /v1/nodes every
              20 ms). Aim: within the grace period plus one heartbeat.
  placement   NODES simulated nodes register (pd-simnodes: sessions,
              heartbeats, assignments acknowledged at once as running, no
              VMs), then CREATES POST /v1/sandboxes from CONCURRENCY
              keep-alive clients spread over the three schedulers (the
              followers forward to the leader). Prints placements per
              second, create latency p50/p99, and the leader's RSS growth
              per 10,000 sandboxes. Aim: above Nomad's published 3,750/s.
              Baseline in the same run: plain one-command Raft writes
              (POST /v1/nodes/sim-0000/drain) through the same clients.

  bench_placement_cluster [--nodes 1000] [--creates 100000]
      [--concurrency 64] [--wait] [--leader-only] [--rounds 5] [--skip-loss]
      [--skip-placement] [--sched-arg=--KEY=VALUE ...] [--dir DIR] [--keep]

PADDOCK_BENCH_SCALE (e.g. 0.05) scales NODES and CREATES down for a quick
run; the defaults are the issue's. Binaries come from $PADDOCK_BUILD
(default: the build tree this script sits in). Every run is bounded in
time; every process it starts is stopped at the end. Not a test: it
prints figures.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


def find_repo():
    d = HERE
    while d != "/":
        if os.path.exists(os.path.join(d, "deploy", "make-certs.sh")):
            return d
        d = os.path.dirname(d)
    sys.exit("bench: cannot find deploy/make-certs.sh above " + HERE)


def find_build(repo):
    if os.environ.get("PADDOCK_BUILD"):
        return os.environ["PADDOCK_BUILD"]
    d = HERE
    while d != "/":
        if os.path.exists(os.path.join(d, "build.ninja")):
            return d
        d = os.path.dirname(d)
    return os.path.join(repo, "build")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(addr, method, path, token=None, body=None, timeout=5.0):
    req = urllib.request.Request("http://%s%s" % (addr, path), method=method)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, data, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None
    except (OSError, ValueError):
        return 0, None


def wait_for(cond, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise SystemExit("bench: timed out after %.0f s waiting for %s" %
                     (timeout, what))


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Bench:
    def __init__(self, args):
        self.repo = find_repo()
        self.build = find_build(self.repo)
        self.dir = args.dir or tempfile.mkdtemp(prefix="paddock-bench-")
        self.procs = []
        self.token = None
        self.sched = []
        self.sched_args = args.sched_arg or []

    def binary(self, *parts):
        p = os.path.join(self.build, *parts)
        if not os.access(p, os.X_OK):
            raise SystemExit("bench: %s not built" % p)
        return p

    def start(self, name, argv, stdout=None):
        log = open(os.path.join(self.dir, name + ".log"), "ab")
        p = subprocess.Popen([str(a) for a in argv],
                             stdout=stdout or log, stderr=log,
                             start_new_session=True)
        log.close()
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def start_cluster(self):
        pki = os.path.join(self.dir, "pki")
        subprocess.run([os.path.join(self.repo, "deploy", "make-certs.sh"),
                        pki, "scheduler", "s1", "s2", "s3"], check=True,
                       capture_output=True)
        self.pki = pki
        for i in (1, 2, 3):
            self.sched.append({
                "id": i, "raft": "127.0.0.1:%d" % free_port(),
                "api": "127.0.0.1:%d" % free_port(),
                "rpc": "127.0.0.1:%d" % free_port(),
                "preview": "127.0.0.1:%d" % free_port(),
                "dir": os.path.join(self.dir, "s%d" % i)})
        boot = ",".join("%d=%s" % (s["id"], s["raft"]) for s in self.sched)
        for s in self.sched:
            s["proc"] = self.start("scheduler-%d" % s["id"], [
                self.binary("scheduler", "paddock-scheduler"),
                "--id", s["id"], "--data_dir", s["dir"],
                "--raft_addr", s["raft"], "--api_listen", s["api"],
                "--rpc_listen", s["rpc"], "--preview_listen", s["preview"],
                "--bootstrap", boot,
                "--tls_cert", os.path.join(pki, "s%d.pem" % s["id"]),
                "--tls_key", os.path.join(pki, "s%d.key" % s["id"]),
                "--tls_ca", os.path.join(pki, "ca.pem"),
                "--rate_per_s", "100000000", "--rate_burst", "100000000",
                "--log_level", "warn"] + self.sched_args)
        self.token = wait_for(self.admin_token, 60, "the admin token")
        wait_for(self.leader, 30, "a leader")

    def admin_token(self):
        for s in self.sched:
            p = os.path.join(s["dir"], "admin.token")
            if os.path.exists(p):
                t = open(p).read().strip()
                if t:
                    return t
        return None

    def leader(self):
        for s in self.sched:
            st, body = http(s["api"], "GET", "/v1/cluster", self.token)
            if st == 200 and body and body.get("leader"):
                for t in self.sched:
                    if str(t["id"]) == str(body["leader"]):
                        return t
        return None

    def nodes(self):
        st, body = http(self.sched[0]["api"], "GET", "/v1/nodes",
                        self.token, timeout=30)
        return {n["id"]: n for n in body["nodes"]} if st == 200 else {}

    def simnodes(self, name, count, prefix):
        argv = [self.binary("tests", "tools", "scheduler", "pd-simnodes"),
                "nodes", "--schedulers",
                ",".join(s["rpc"] for s in self.sched),
                "--ca-cert", os.path.join(self.pki, "ca.pem"),
                "--ca-key", os.path.join(self.pki, "ca.key"),
                "--count", count, "--prefix", prefix]
        return self.start(name, argv, stdout=subprocess.PIPE)


def wait_line(proc, want, timeout):
    """Reads proc's stdout until a line equals want (bounded)."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        if not sel.select(max(0.0, deadline - time.monotonic())):
            break
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        buf += chunk
        if ("\n%s\n" % want).encode() in b"\n" + buf:
            return True
    raise SystemExit("bench: pd-simnodes never printed %r" % want)


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p / 100))]


def node_loss(b, rounds):
    times = []
    for i in range(rounds):
        name = "loss-%d" % i
        p = b.simnodes("simnodes-" + name, 1, name)
        wait_line(p, "registered 1", 60)
        node = name + "-0000"
        wait_for(lambda: b.nodes().get(node, {}).get("state") == "ready",
                 30, node + " ready")
        # Kill at a random point of the heartbeat interval, as a crash
        # would.
        time.sleep(0.1 + (i * 0.37) % 1.0)
        t0 = time.monotonic()
        p.kill()
        p.wait(5)
        wait_for(lambda: b.nodes().get(node, {}).get("state") == "down",
                 30, node + " down", interval=0.02)
        took = time.monotonic() - t0
        times.append(took)
        print("node loss round %d: committed down %.3f s after SIGKILL" %
              (i + 1, took), flush=True)
    print("node loss: %d rounds, p50 %.3f s, max %.3f s (grace 5 s + "
          "heartbeat 1 s = aim %.1f s)" % (len(times), pct(times, 50),
                                          max(times), 6.0), flush=True)


def placement(b, n_nodes, creates, conc, wait, leader_only):
    lead = b.leader()
    p = b.simnodes("simnodes", n_nodes, "sim")
    t0 = time.monotonic()
    wait_line(p, "registered %d" % n_nodes, 300)
    print("placement: %d simulated nodes registered in %.1f s" %
          (n_nodes, time.monotonic() - t0), flush=True)
    wait_for(lambda: sum(1 for n in b.nodes().values()
                         if n["state"] == "ready" and
                         n["id"].startswith("sim-")) >= n_nodes,
             120, "every simulated node ready", interval=0.5)
    apis = lead["api"] if leader_only else ",".join(s["api"]
                                                    for s in b.sched)

    def load(count, extra):
        out = subprocess.run(
            [b.binary("tests", "tools", "scheduler", "pd-simnodes"), "load",
             "--api", apis, "--token", b.token, "--count", str(count),
             "--concurrency", str(conc), "--timeout", "900"] + extra,
            capture_output=True, text=True, timeout=960)
        if out.returncode != 0 and not out.stdout:
            dead = ["scheduler %d exited %s" % (s["id"], s["proc"].poll())
                    for s in b.sched if s["proc"].poll() is not None]
            raise SystemExit("bench: load failed: %s %s" %
                             (out.stderr[-2000:], "; ".join(dead)))
        return json.loads(out.stdout.strip().splitlines()[-1])

    # Baseline, same run, same clients and path: a write that is one Raft
    # command and no placement (drain off on one node).
    base = load(min(creates, 20000), ["--drain-node", "sim-0000"])
    print("baseline: %d plain Raft writes (drain off) at %.0f/s, latency "
          "p50 %.1f ms, p99 %.1f ms, %d errors" %
          (base["count"], base["rate"], base["p50_ms"], base["p99_ms"],
           base["errors"]), flush=True)
    before = rss_kb(lead["proc"].pid)
    r = load(creates, ["--wait"] if wait else [])
    after = rss_kb(lead["proc"].pid)
    per10k = (after - before) / 1024.0 / max(1.0, r["ok"] / 10000.0)
    print("placement: %d creates (%s, %s), %d ok, %d errors in %.1f s" %
          (r["count"], "wait=true" if wait else "no wait",
           "to the leader" if leader_only else "to all 3 schedulers",
           r["ok"], r["errors"], r["seconds"]), flush=True)
    if r["first_error"]:
        print("placement: first error: " + r["first_error"])
    print("placement: %.0f placements/s (aim: above Nomad's 3,750/s), "
          "create latency p50 %.1f ms, p99 %.1f ms, max %.1f ms" %
          (r["rate"], r["p50_ms"], r["p99_ms"], r["max_ms"]), flush=True)
    print("placement: leader RSS %.1f MiB -> %.1f MiB, %.1f MiB per 10,000 "
          "sandboxes" % (before / 1024.0, after / 1024.0, per10k),
          flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--creates", type=int, default=100000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--wait", action="store_true",
                    help="creates with ?wait=true (until running)")
    ap.add_argument("--leader-only", action="store_true",
                    help="send every create to the leader (no forwarding)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-loss", action="store_true")
    ap.add_argument("--skip-placement", action="store_true")
    ap.add_argument("--sched-arg", action="append", metavar="ARG",
                    help="extra paddock-scheduler argument (repeatable), "
                    "e.g. --sched-arg=--snapshot_threshold=65536")
    ap.add_argument("--dir")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    scale = float(os.environ.get("PADDOCK_BENCH_SCALE", "1"))
    n_nodes = max(1, int(args.nodes * scale))
    creates = max(1, int(args.creates * scale))
    b = Bench(args)
    try:
        b.start_cluster()
        print("cluster: 3 schedulers, leader %d, data in %s" %
              (b.leader()["id"], b.dir), flush=True)
        if not args.skip_loss:
            node_loss(b, args.rounds)
        if not args.skip_placement:
            placement(b, n_nodes, creates, args.concurrency, args.wait,
                      args.leader_only)
    finally:
        b.stop_all()
        if not args.keep and not args.dir:
            shutil.rmtree(b.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
