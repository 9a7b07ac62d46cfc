#!/usr/bin/python3
"""Node agent benchmark: prints figures, passes or fails nothing.

  1. create-to-ready through the agent's RPC (sequential, N runs) beside two
     baselines measured in the same run on the same image: QEMU booting the
     guest image straight to the guest agent's HELLO (pd-guest boot, no node
     agent), and QEMU booting the same kernel with the trivial initramfs
     that powers off at once (kernel boot alone);
  2. the time for 8 sandboxes created at once to all be ready;
  3. host memory per idle sandbox (QEMU's RSS and PSS) beside its guest
     memory, and what the guest itself uses.

  PADDOCK_GUEST_DIR=/tmp/guest build/tests/bench/agent/bench_agent [--runs N]

Environment: PADDOCK_BUILD (default: the build tree this script sits in),
PADDOCK_GUEST_DIR (default <repo>/deploy/guest/out), PADDOCK_ACCEL (tcg,
kvm or auto; default tcg). Bounded: every wait has a deadline; the whole
run takes about 2-4 minutes under TCG on 2 cores.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def find_build():
    if os.environ.get("PADDOCK_BUILD"):
        return os.environ["PADDOCK_BUILD"]
    d = HERE
    for _ in range(4):
        if os.path.exists(os.path.join(d, "build.ninja")):
            return d
        d = os.path.dirname(d)
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        HERE))), "build")


BUILD = find_build()


def find_repo():
    try:
        with open(os.path.join(BUILD, "meson-info", "meson-info.json")) as f:
            return json.load(f)["directories"]["source"]
    except (OSError, KeyError, ValueError):
        return os.path.dirname(os.path.dirname(os.path.dirname(HERE)))


REPO = find_repo()
GUEST = os.environ.get("PADDOCK_GUEST_DIR",
                       os.path.join(REPO, "deploy", "guest", "out"))
ACCEL = os.environ.get("PADDOCK_ACCEL", "tcg")
AGENT = os.path.join(BUILD, "node-agent", "paddock-agent")
CLIENT = os.path.join(BUILD, "tests", "tools", "agent", "pd-agent-client")
PDGUEST = os.path.join(BUILD, "tests", "tools", "guest", "pd-guest")
QEMU = "qemu-system-x86_64"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.01)
    raise RuntimeError("timed out after %ds waiting for %s" % (timeout, what))


class Bench:
    def __init__(self, work):
        self.work = work
        self.pki = os.path.join(work, "pki")
        self.data = os.path.join(work, "data")
        self.port = free_port()
        self.agent = None

    def certs(self):
        subprocess.run([os.path.join(REPO, "deploy", "make-certs.sh"),
                        self.pki, "scheduler", "s1", "agent", "n1"],
                       check=True, capture_output=True, timeout=60)

    def start_agent(self):
        log = open(os.path.join(self.work, "agent.log"), "ab")
        self.agent = subprocess.Popen([
            AGENT, "--data_dir", self.data,
            "--rpc_listen", "127.0.0.1:%d" % self.port,
            "--node_id", "bench", "--accel", ACCEL,
            "--tls_cert", os.path.join(self.pki, "n1.pem"),
            "--tls_key", os.path.join(self.pki, "n1.key"),
            "--tls_ca", os.path.join(self.pki, "ca.pem"),
            "--kernel", os.path.join(GUEST, "vmlinuz"),
            "--initrd", os.path.join(GUEST, "initrd.img"),
            "--cpu_overcommit", "16", "--boot_timeout", "300s",
            "--log_level", "debug"],
            stdout=log, stderr=log, start_new_session=True)

        def up():
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return True
            except OSError:
                return self.agent.poll() is not None
        wait_for(up, 60, "the agent's RPC port")
        if self.agent.poll() is not None:
            raise RuntimeError("agent exited: see %s/agent.log" % self.work)

    def client_argv(self, *args, timeout=300):
        return [CLIENT, "--addr", "127.0.0.1:%d" % self.port,
                "--cert", os.path.join(self.pki, "s1.pem"),
                "--key", os.path.join(self.pki, "s1.key"),
                "--ca", os.path.join(self.pki, "ca.pem"),
                "--timeout-s", str(timeout)] + list(args)

    def call(self, t, timeout=300, **fields):
        p = subprocess.run(self.client_argv("call", t, json.dumps(fields),
                                            timeout=timeout),
                           capture_output=True, timeout=timeout + 30)
        lines = [json.loads(l) for l in p.stdout.decode().splitlines() if l]
        if p.returncode != 0 or not lines:
            raise RuntimeError("%s %s: %s %s" % (t, fields, lines,
                                                 p.stderr.decode()))
        return lines[-1]

    def create_many(self, specs):
        """Creates at once; returns (wall seconds, final frames)."""
        t0 = time.monotonic()
        ps = [subprocess.Popen(self.client_argv(
            "call", "SANDBOX_CREATE", json.dumps(dict(s, wait=True))),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for s in specs]
        out = []
        for p in ps:
            so, se = p.communicate(timeout=330)
            lines = [json.loads(l) for l in so.decode().splitlines() if l]
            if p.returncode != 0 or not lines:
                raise RuntimeError("create failed: %s %s" % (lines,
                                                            se.decode()))
            out.append(lines[-1])
        return time.monotonic() - t0, out

    def destroy(self, ids):
        ps = [subprocess.Popen(self.client_argv(
            "call", "SANDBOX_DESTROY", json.dumps({"sandbox": i}),
            timeout=60), stdout=subprocess.DEVNULL) for i in ids]
        for p in ps:
            p.wait(90)

    def stop(self):
        if self.agent is not None and self.agent.poll() is None:
            try:
                ids = [s["sandbox"] for s in
                       self.call("SANDBOX_LIST", timeout=30)["sandboxes"]]
                self.destroy(ids)
            except Exception as e:  # report, then clean up anyway
                print("bench: cleanup: %s" % e, file=sys.stderr)
            self.agent.send_signal(signal.SIGTERM)
            try:
                self.agent.wait(20)
            except subprocess.TimeoutExpired:
                self.agent.kill()
        for pid in qemu_pids_under(self.work):
            os.kill(pid, signal.SIGKILL)


def qemu_pids_under(path):
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
                any(path.encode() in a for a in argv):
            pids.append(int(d))
    return pids


def plain_hello_boot(work, i, mem):
    """pd-guest boot: the same argv builder, no node agent. Seconds to the
    guest agent's HELLO."""
    d = os.path.join(work, "plain-%d" % i)
    t0 = time.monotonic()
    p = subprocess.Popen([PDGUEST, "boot", "--kernel",
                          os.path.join(GUEST, "vmlinuz"), "--initrd",
                          os.path.join(GUEST, "initrd.img"), "--dir", d,
                          "--disk-mb", "64", "--id", "plain-%d" % i,
                          "--mem", str(mem), "--net", "--accel", ACCEL],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        wait_for(lambda: os.path.exists(os.path.join(d, "ready")) or
                 p.poll() is not None, 300, "pd-guest HELLO")
        took = time.monotonic() - t0
        if not os.path.exists(os.path.join(d, "ready")):
            raise RuntimeError("pd-guest boot failed (%s)" % p.returncode)
        return took
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        for pid in qemu_pids_under(d):
            os.kill(pid, signal.SIGKILL)


def tsc_khz():
    """The host TSC rate, as qemu.c passes it under TCG (the guest's PIT
    calibration fails on a loaded host and the kernel then hangs)."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    return 0


def kernel_only_boot(mem):
    """The same kernel with an initramfs that powers off at once: seconds
    until QEMU exits."""
    cmdline = "console=ttyS0 quiet panic=-1"
    if ACCEL != "kvm" and tsc_khz():
        cmdline += " tsc_early_khz=%d tsc=reliable" % tsc_khz()
    argv = [QEMU, "-M", "microvm,rtc=on", "-accel",
            "kvm" if ACCEL == "kvm" else "tcg,tb-size=128", "-cpu",
            "host" if ACCEL == "kvm" else "max", "-m", str(mem),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", os.path.join(GUEST, "vmlinuz"), "-initrd",
            os.path.join(GUEST, "trivial-initrd.img"), "-append",
            cmdline, "-serial", "null"]
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        p.wait(180)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)
        raise RuntimeError("the trivial image did not power off in 180 s")
    return time.monotonic() - t0


def smaps(pid):
    out = {}
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Rss", "Pss"):
                out[k] = int(v.split()[0]) / 1024.0
    return out


def guest_used_mb(b, sb):
    """MemTotal - MemAvailable inside the guest, or None (reported)."""
    try:
        r = b.call("EXEC", sandbox=sb, timeout=60, timeout_ms=30000,
                   command="grep -E '^(MemTotal|MemAvailable):' /proc/meminfo")
    except Exception as e:
        print("   %s: exec failed: %s" % (sb, e), file=sys.stderr)
        return None
    vals = [int(l.split()[1]) for l in r["stdout"].splitlines()]
    return (vals[0] - vals[1]) / 1024.0


def fmt(xs):
    return "median %6.2f s  min %6.2f s  max %6.2f s" % (
        statistics.median(xs), min(xs), max(xs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--mem", type=int, default=256)
    args = ap.parse_args()
    for f in (AGENT, CLIENT, PDGUEST, os.path.join(GUEST, "vmlinuz"),
              os.path.join(GUEST, "trivial-initrd.img")):
        if not os.path.exists(f):
            sys.exit("bench_agent: %s is missing (build, and run "
                     "deploy/guest/build.sh)" % f)
    work = tempfile.mkdtemp(prefix="paddock-bench-agent-")
    os.chmod(work, 0o711)
    b = Bench(work)
    keep = True  # until the run ends well
    try:
        b.certs()
        b.start_agent()
        print("node agent benchmark: accel %s, %d host CPUs, load %.2f, "
              "guest %s" % (ACCEL, os.cpu_count(), os.getloadavg()[0], GUEST))

        # 1. Sequential boots: the agent beside its two baselines,
        # interleaved so drift in host load hits all three alike.
        agent_s, ready_s, plain_s, kern_s = [], [], [], []
        for i in range(args.runs):
            kern_s.append(kernel_only_boot(args.mem))
            plain_s.append(plain_hello_boot(work, i, args.mem))
            took, (r,) = b.create_many([dict(sandbox="seq-%d" % i, cpus=1,
                                             memory_mb=args.mem,
                                             disk_mb=64)])
            agent_s.append(took)
            ready_s.append(r["ready_ms"] / 1000.0)
            b.destroy(["seq-%d" % i])
        print("\n1. create-to-ready, %d MiB guest, 1 vCPU, %d runs each" %
              (args.mem, args.runs))
        print("   agent RPC create (wait)    %s" % fmt(agent_s))
        print("     agent's own ready_ms     %s" % fmt(ready_s))
        print("   plain QEMU to guest HELLO  %s" % fmt(plain_s))
        print("   plain QEMU, kernel only    %s" % fmt(kern_s))
        print("   agent overhead over plain: %+.2f s (median)" % (
            statistics.median(agent_s) - statistics.median(plain_s)))

        # 2. Concurrent creates.
        n = args.concurrent
        specs = [dict(sandbox="con-%d" % i, cpus=1, memory_mb=args.mem,
                      disk_mb=64) for i in range(n)]
        took, replies = b.create_many(specs)
        per = [r["ready_ms"] / 1000.0 for r in replies]
        print("\n2. %d creates at once: all ready after %.2f s "
              "(per sandbox %s)" % (n, took, fmt(per)))
        print("   sequential equivalent (%d x median above): %.2f s" % (
            n, n * statistics.median(agent_s)))

        # 3. Memory of idle sandboxes: let the boots settle first.
        time.sleep(5)
        print("\n3. host memory per idle sandbox (%d MiB guest memory)" %
              args.mem)
        print("   %-7s %9s %9s %11s %11s" % ("sandbox", "RSS MiB", "PSS MiB",
                                          "guest used", "RSS-guest"))
        rss, pss = [], []
        for r in replies:
            m = smaps(r["pid"])
            used = guest_used_mb(b, r["sandbox"])
            rss.append(m["Rss"])
            pss.append(m["Pss"])
            print("   %-7s %9.1f %9.1f %11s %+11.1f" % (
                r["sandbox"], m["Rss"], m["Pss"],
                "%.1f" % used if used is not None else "n/a",
                m["Rss"] - args.mem))
        print("   median RSS %.1f MiB, PSS %.1f MiB for %d MiB of guest "
              "memory (cgroup limit: guest + %d MiB)" % (
                  statistics.median(rss), statistics.median(pss), args.mem,
                  b.call("AGENT_INFO")["memory_overhead_mb"]))
        b.destroy([s["sandbox"] for s in specs])
    except Exception:
        keep = True
        raise
    else:
        keep = bool(os.environ.get("PADDOCK_BENCH_KEEP"))
    finally:
        b.stop()
        if keep:
            print("bench_agent: logs kept in %s" % work, file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
