#!/usr/bin/python3
"""Routing overhead: exec of `true` through a follower versus straight to
the owning agent, in the same run (prints figures; not a pass/fail test).

    PADDOCK_BUILD=build PADDOCK_GUEST_DIR=deploy/guest/out \\
        tests/bench/scheduler/bench_routing.py [--n 200]

Starts 3 schedulers and 1 agent on loopback (tests/integration/conftest.py's
Cluster), creates one sandbox, then runs bench_routing (bench_routing.c):
n sequential execs over the scheduler's own agent client (direct) and n
through a follower's HTTP API on one keep-alive connection (routed),
alternating so both see the same load.
Everything it starts is stopped at the end.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "integration"))

from conftest import (GUEST_DIR, Cluster, Procs, binary,  # noqa: E402
                      wait_for)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="paddock-bench-routing-")
    procs = Procs(work)
    guest = (os.path.join(GUEST_DIR, "vmlinuz"),
             os.path.join(GUEST_DIR, "initrd.img"))
    try:
        c = Cluster(procs, work, schedulers=3, agents=1, guest=guest)
        lead = c.leader()
        st, _h, body = c.api("POST", "/v1/sandboxes?wait=true", {
            "id": "bench", "cpus": 1, "memory_mb": 256, "disk_mb": 64},
            at=lead, timeout=180)
        assert st in (200, 201) and body["state"] == "running", body
        wait_for(lambda: c.api("POST", "/v1/sandboxes/bench/exec",
                               {"argv": ["true"]}, at=c.follower())[0] == 200,
                 30, "the follower to route")
        f = c.follower()
        agent = c.agents[0]
        print("bench_routing: follower %d (leader %d), agent %s, TCG guest"
              % (f["id"], lead["id"], agent["rpc"]))
        sys.stdout.flush()
        subprocess.run([binary("bench_routing"), "--agent", agent["rpc"],
                        "--cert", os.path.join(c.pki, "s1.pem"),
                        "--key", os.path.join(c.pki, "s1.key"),
                        "--ca", os.path.join(c.pki, "ca.pem"),
                        "--sandbox", "bench", "--api", f["api"],
                        "--token", c.token, "--n", str(args.n),
                        "--warmup", str(args.warmup)], check=True,
                       timeout=600)
    except BaseException:
        print(procs.dump_logs(2000))
        procs.stop_all()
        print("bench_routing: logs kept in %s" % work)
        raise
    procs.stop_all()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
