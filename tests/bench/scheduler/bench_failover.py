#!/usr/bin/env python3
"""Leader failover: how long writes fail after the leader is SIGKILLed.

Starts a local cluster of 3 schedulers (no agents: the write is a token
mint, POST /v1/tokens, which needs only Raft), then 20 times: SIGKILL the
leader, send writes to the two survivors in turn until one succeeds, and
record the time from the kill to that success (and to the moment a
survivor first reports itself leader); restart the killed member and wait
until it is a follower again. Prints every round and p50/p99/max. First,
as a baseline for forwarding, the latency of the same write sent to the
leader and through a follower.

  bench_failover [--rounds N] [--election-timeout MS] [--dir DIR]

Binaries come from $PADDOCK_BUILD (default: the build directory this
script sits in). Not a test: it prints figures.
"""
import argparse
import json
import os
import shutil
import signal
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
        if os.path.exists(os.path.join(d, "deploy", "local-cluster")):
            return d
        d = os.path.dirname(d)
    sys.exit("bench_failover: cannot find deploy/local-cluster above %s" %
             HERE)


def find_build(repo):
    if os.environ.get("PADDOCK_BUILD"):
        return os.environ["PADDOCK_BUILD"]
    d = HERE
    while d != "/":
        if os.path.exists(os.path.join(d, "build.ninja")):
            return d
        d = os.path.dirname(d)
    return os.path.join(repo, "build")


def http(port, method, path, token=None, body=None, timeout=2.0):
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path),
                                 method=method)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, data=data, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}


def pct(v, p):
    v = sorted(v)
    k = min(len(v) - 1, max(0, int(round(p / 100.0 * len(v) + 0.5)) - 1))
    return v[k]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--election-timeout", type=int, default=1000)
    ap.add_argument("--writes", type=int, default=100,
                    help="writes for the forwarding overhead figure")
    ap.add_argument("--dir")
    a = ap.parse_args()
    repo = find_repo()
    env = dict(os.environ, PADDOCK_BUILD=find_build(repo))
    lc = os.path.join(repo, "deploy", "local-cluster")
    d = a.dir or tempfile.mkdtemp(prefix="pd-bench-fo-")

    def run(*args):
        r = subprocess.run([lc] + list(args) + ["--dir", d], env=env,
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            sys.exit("local-cluster %s failed: %s" % (args[0], r.stderr))
        return r.stdout

    out = run("up", "--schedulers", "3", "--agents", "0",
              "--election-timeout", str(a.election_timeout))
    token = [l.split("=", 1)[1] for l in out.splitlines()
             if l.startswith("export PADDOCK_TOKEN=")][0]
    with open(os.path.join(d, "cluster.json")) as f:
        ports = {n: m["api"] for n, m in json.load(f)["members"].items()}

    def state(n):
        try:
            st, j = http(ports[n], "GET", "/v1/health", timeout=0.5)
            return j.get("state") if st == 200 else None
        except OSError:
            return None

    def leader():
        for n in ports:
            if state(n) == "leader":
                return n
        return None

    writes, elections = [], []
    try:
        # Forwarding overhead first: the same write on the leader and
        # through a follower (read-your-writes included), same run.
        lead = None
        while lead is None:
            lead = leader()
        fol = [n for n in sorted(ports) if n != lead][0]
        lat = {}
        for who, n in (("leader", lead), ("follower", fol)):
            ts = []
            for k in range(a.writes):
                t = time.monotonic()
                st, _ = http(ports[n], "POST", "/v1/tokens", token,
                             {"tenant": "lat-%d" % k, "ttl_s": 60})
                ts.append(time.monotonic() - t)
                if not 200 <= st < 300:
                    sys.exit("write through the %s failed: %d" % (who, st))
                # Paced under the per-token API rate limit (a forwarded
                # request is counted by the follower and the leader).
                time.sleep(0.05)
            lat[who] = ts
        for who in ("leader", "follower"):
            print("write (token mint) through the %-8s p50 %.1f ms  "
                  "p99 %.1f ms  (%d writes)" % (
                      who, pct(lat[who], 50) * 1e3, pct(lat[who], 99) * 1e3,
                      len(lat[who])))
        sys.stdout.flush()
        for i in range(a.rounds):
            deadline = time.monotonic() + 30
            while leader() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            old = leader()
            if old is None:
                sys.exit("round %d: no leader within 30 s" % i)
            rest = [n for n in sorted(ports) if n != old]
            with open(os.path.join(d, old + ".pid")) as f:
                pid = int(f.read())
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            elected = None
            k = 0
            while time.monotonic() - t0 < 30:
                n = rest[k % 2]
                k += 1
                if elected is None and state(n) == "leader":
                    elected = time.monotonic() - t0
                try:
                    st, _ = http(ports[n], "POST", "/v1/tokens", token,
                                 {"tenant": "bench-%d" % i, "ttl_s": 60})
                except OSError:
                    st = 0
                if 200 <= st < 300:
                    break
            else:
                sys.exit("round %d: writes failed for 30 s" % i)
            w = time.monotonic() - t0
            writes.append(w)
            elections.append(elected if elected is not None else w)
            print("round %2d: killed %s, writes back after %.3f s "
                  "(leader seen after %.3f s)" % (i + 1, old, w,
                                                  elections[-1]))
            sys.stdout.flush()
            run("start", old)
            deadline = time.monotonic() + 30
            while state(old) != "follower" and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        run("down")
        if not a.dir:
            shutil.rmtree(d, ignore_errors=True)
    print("leader failover, %d rounds, election timeout %d ms:" % (
        len(writes), a.election_timeout))
    print("  writes succeed again: p50 %.3f s  p99 %.3f s  max %.3f s" % (
        pct(writes, 50), pct(writes, 99), max(writes)))
    print("  new leader visible:   p50 %.3f s  p99 %.3f s  max %.3f s" % (
        pct(elections, 50), pct(elections, 99), max(elections)))


if __name__ == "__main__":
    main()
