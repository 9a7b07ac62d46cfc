"""The guest agent serves every operation of a real VM under QEMU.

One VM (TCG here) is booted from deploy/guest/out for the whole module and
driven through pd-guest, the node agent's own client library. Every pd-guest
call is a new host connection, so the suite also proves that the agent
serves one host after another and keeps background processes between them.
The workspace disk starts blank, so the guest formats it at boot. At the
end the VM powers off (the disk, read on the host, proves the sync), boots
again on the same disk (kept, not formatted), and once more on a disk of
random bytes (never formatted): three short boots in all.
"""
import hashlib
import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from conftest import binary, free_port, wait_for

DISK_MB = 192


def run(vm, *args, stdin=None, timeout=120, check=True):
    """Runs one pd-guest client command; returns its JSON lines."""
    p = subprocess.run([binary("pd-guest"), "--dir", vm["dir"]] + list(args),
                       stdin=stdin, capture_output=True, timeout=timeout)
    lines = [json.loads(l) for l in p.stdout.decode().splitlines() if l]
    if check and p.returncode != 0 and not any("error" in l for l in lines):
        raise AssertionError("pd-guest %s failed (%d): %s" % (
            args, p.returncode, p.stderr.decode()[-2000:]))
    return lines


def one(vm, *args, **kw):
    lines = run(vm, *args, **kw)
    assert len(lines) == 1, lines
    return lines[0]


def err_code(reply):
    assert "error" in reply, reply
    return reply["error"]["code"]


def sh(vm, cmd, *extra, **kw):
    return one(vm, "exec", "--sh", cmd, *extra, **kw)


@pytest.fixture(scope="module")
def vm(guest_image, module_procs, module_workdir):
    kernel, initrd = guest_image
    d = os.path.join(module_workdir, "vm1")
    p = module_procs.start("vm1", [binary("pd-guest"), "boot",
                                    "--kernel", kernel, "--initrd", initrd,
                                    "--dir", d, "--disk-mb", DISK_MB,
                                    "--id", "sbx-test", "--net",
                                    "--guest-format", "--mem", 512])
    try:
        wait_for(lambda: os.path.exists(os.path.join(d, "ready")), 180,
                 "the guest agent's HELLO")
    except AssertionError:
        con = os.path.join(d, "console.log")
        print(p.log(), open(con).read() if os.path.exists(con) else "")
        raise
    con = open(os.path.join(d, "console.log"), errors="replace").read()
    assert "formatted the blank workspace disk" in con, con[-3000:]
    return {"dir": d, "proc": p}


def test_image_records_what_went_in(guest_image):
    kernel, initrd = guest_image
    lines = open(os.path.join(os.path.dirname(initrd), "versions.txt")
                 ).read().splitlines()
    pkgs = dict(l.split(" ", 1) for l in lines)
    for name in ("linux-image-cloud-amd64", "busybox-static", "e2fsprogs"):
        assert name in pkgs, lines
    assert pkgs["modules"].split()[:2] == ["virtio_ring", "virtio"]
    digest = hashlib.sha256(open(initrd, "rb").read()).hexdigest()
    assert pkgs["initrd.img"] == "sha256 " + digest


def test_info_names_the_sandbox_and_its_disk(vm):
    info = one(vm, "info")
    assert info["hostname"] == "sbx-test"
    assert info["kernel"].startswith("6.")
    assert info["cpus"] >= 1
    assert 0.8 * (DISK_MB << 20) < info["disk_total"] <= DISK_MB << 20
    assert info["mem_total"] > 256 << 20
    assert info["uptime_ms"] > 0
    # DHCP from QEMU's user network runs in the background after boot.
    wait_for(lambda: "inet 10.0.2.15/" in sh(vm, "ip -4 addr show eth0")[
        "stdout"], 30, "a DHCP lease on eth0")
    assert sh(vm, "mount")["stdout"].count("/dev/vda on /workspace type "
                                             "ext4") == 1


def test_exec_argv_and_shell(vm):
    r = one(vm, "exec", "--", "echo", "a b", "$HOME")
    assert r["exit_code"] == 0 and r["stdout"] == "a b $HOME\n"
    r = sh(vm, "echo out; echo err >&2; pwd; echo $FOO; exit 7",
           "--env", "FOO=bar")
    assert r["exit_code"] == 7
    assert r["stdout"] == "out\n/workspace\nbar\n"
    assert r["stderr"] == "err\n"
    assert r["timed_out"] is False and r["truncated"] is False
    assert 0 <= r["duration_ms"] < 30000
    r = one(vm, "exec", "--cwd", "/tmp", "--", "pwd")
    assert r["stdout"] == "/tmp\n"


def test_exec_stdin(vm, tmp_path):
    f = tmp_path / "in.txt"
    f.write_bytes(b"line1\nline2\n")
    r = one(vm, "exec", "--stdin-file", str(f), "--", "wc", "-l")
    assert r["stdout"].strip() == "2"
    # Streamed stdin: the bytes flow through STDIN frames until EOF.
    lines = run(vm, "exec", "--stdin-stream", "--", "tr", "a-z", "A-Z",
                stdin=open(f, "rb"))
    out = "".join(l.get("data", "") for l in lines
                  if l.get("event") == "stdout")
    assert out == "LINE1\nLINE2\n"


def test_exec_bad_inputs(vm):
    assert err_code(one(vm, "exec", "--", "/no/such/binary")) == "ENOENT"
    assert err_code(one(vm, "exec", "--", "/etc/passwd")) == "EACCES"
    assert err_code(one(vm, "exec", "--cwd", "/nope", "--", "true")) == "ENOENT"
    assert err_code(one(vm, "exec", "--cwd", "../x", "--", "true")) == "EINVAL"
    r = sh(vm, "kill -9 $$")
    assert r["signal"] == 9 and r["exit_code"] == -1


def test_exec_timeout_kills_grandchildren(vm):
    # The grandchild leaves the process group with setsid; the cgroup
    # still holds it, so the timeout ends it too.
    t0 = time.monotonic()
    r = sh(vm, "setsid sh -c 'sleep 300' & sleep 301", "--timeout-ms", "1500")
    assert r["timed_out"] is True and r["signal"] == 9
    assert time.monotonic() - t0 < 20
    ps = sh(vm, "ps -o args")["stdout"]
    assert "sleep 300" not in ps and "sleep 301" not in ps, ps


def test_host_leaving_ends_its_execs_but_not_processes(vm):
    one(vm, "start", "--name", "keeper", "--", "sleep", "1002")
    # QEMU's socket takes one host at a time: the streamed exec itself
    # says when it runs, then its host vanishes.
    client = subprocess.Popen([binary("pd-guest"), "--dir", vm["dir"],
                               "exec", "--stream", "--timeout-ms", "60000",
                               "--sh", "echo running; exec sleep 1003"],
                              stdout=subprocess.PIPE)
    running = False
    try:
        # Bounded: the exec's own timeout ends the stream at worst.
        for line in client.stdout:
            if json.loads(line).get("data") == "running\n":
                running = True
                break
    finally:
        client.kill()
        client.wait()
    assert running
    wait_for(lambda: "sleep 1003" not in sh(vm, "ps -o args")["stdout"], 60,
             "the exec of the vanished host to be killed")
    assert one(vm, "proc", "keeper")["proc"]["running"] is True
    one(vm, "kill", "keeper", "--signal", "9")


def test_orphans_are_reaped(vm):
    # Background children outlive their shell; PID 1 must reap them.
    sh(vm, "for i in 1 2 3 4 5; do (sleep 0.2 &) ; done")
    wait_for(lambda: " Z " not in sh(vm, "ps -o pid,stat,args")["stdout"],
             60, "no zombie processes")


def test_exec_output_is_capped(vm):
    r = sh(vm, "head -c 3000000 /dev/zero | tr '\\0' x", "--output-max",
           "100000")
    assert r["exit_code"] == 0 and r["truncated"] is True
    assert len(r["stdout"]) == 100000
    # A flood never blocks the command: the timeout ends it.
    r = one(vm, "exec", "--timeout-ms", "2000", "--", "yes")
    assert r["timed_out"] is True and r["truncated"] is True


def test_streamed_exec_output_arrives_before_the_end(vm):
    lines = run(vm, "exec", "--stream", "--sh",
                "echo first; sleep 2; echo second >&2; exit 4")
    kinds = [l["event"] for l in lines]
    assert kinds[0] == "start" and kinds[-1] == "exit"
    first = next(l for l in lines if l["event"] == "stdout")
    second = next(l for l in lines if l["event"] == "stderr")
    end = lines[-1]
    assert first["data"] == "first\n" and second["data"] == "second\n"
    assert end["t_ms"] - first["t_ms"] >= 1500
    assert end["exit"]["exit_code"] == 4


def test_many_requests_beside_a_stalled_stream(vm):
    # One connection: a `yes` stream whose reader never grants credit, and
    # 20 execs that must all finish regardless.
    # Once all 20 are answered, the stalled stream must resume when given
    # credit: flow control paused it, nothing broke it.
    r = one(vm, "multi", "20", timeout=120)
    assert r["done"] == 20
    assert r["stalled_bytes"] == 4 << 20
    assert r["resumed_bytes"] == 1 << 20


def test_processes_logs_and_signals(vm):
    r = one(vm, "start", "--name", "stubborn", "--sh",
            "trap '' TERM; echo started; while true; do sleep 1; done")
    assert r["proc"] == "stubborn" and r["pid"] > 1
    assert err_code(one(vm, "start", "--name", "stubborn", "--", "true")) \
        == "EEXIST"
    names = [p["proc"] for p in one(vm, "ps")["procs"]]
    assert "stubborn" in names
    wait_for(lambda: "started" in "".join(
        l.get("data", "") for l in run(vm, "logs", "stubborn")), 60,
        "the process's output in its log")
    # SIGTERM is ignored; the grace time ends with SIGKILL.
    one(vm, "kill", "stubborn", "--signal", "15", "--kill-after-ms", "1000")
    p = wait_for(lambda: (lambda x: x if not x["running"] else None)(
        one(vm, "proc", "stubborn")["proc"]), 60, "the process to be killed")
    assert p["signal"] == 9
    assert err_code(one(vm, "kill", "stubborn")) == "ESRCH"
    assert err_code(one(vm, "proc", "nobody")) == "ENOENT"
    assert err_code(one(vm, "start", "--name", "Bad Name!", "--", "true")) \
        == "EINVAL"
    assert err_code(one(vm, "start", "--", "/no/such/tool")) == "ENOENT"


def test_signal_reaches_the_whole_process_group(vm):
    one(vm, "start", "--name", "family", "--sh",
        "sleep 1000 & sleep 1001 & wait")
    wait_for(lambda: "sleep 1001" in sh(vm, "ps -o args")["stdout"], 60,
             "the children to start")
    one(vm, "kill", "family", "--signal", "15")
    wait_for(lambda: "sleep 100" not in sh(vm, "ps -o args")["stdout"], 60,
             "every process of the group to end")
    p = one(vm, "proc", "family")["proc"]
    assert p["running"] is False and p["signal"] == 15


def test_logs_ring_is_bounded(vm):
    # 1 MB of output: the log keeps about its last 256 KiB.
    one(vm, "start", "--name", "loud", "--sh",
        "head -c 1000000 /dev/zero | tr '\\0' y; echo; echo last")
    wait_for(lambda: not one(vm, "proc", "loud")["proc"]["running"], 60,
             "the process to end")
    lines = run(vm, "logs", "loud")
    out = "".join(l.get("data", "") for l in lines if "data" in l)
    assert 200 << 10 <= len(out) <= 256 << 10, len(out)
    assert out.endswith("y\nlast\n")


def test_logs_follow_until_the_process_ends(vm):
    one(vm, "start", "--name", "counter", "--sh",
        "for i in 1 2 3; do echo n$i; sleep 0.5; done; exit 5")
    lines = run(vm, "logs", "counter", "-f", timeout=60)
    out = "".join(l.get("data", "") for l in lines if "data" in l)
    assert out == "n1\nn2\nn3\n"
    assert lines[-1]["proc"]["running"] is False
    assert lines[-1]["proc"]["exit_code"] == 5
    assert lines[-1]["skipped"] == 0


def test_follower_keeps_up_with_a_line_by_line_writer(vm):
    # 7000 small writes of ~43 bytes, more than the ring holds (256 KiB): a
    # follower that keeps up sees every line in order, nothing skipped.
    pad = "." * 32
    one(vm, "start", "--name", "lines", "--sh",
        "i=0; while [ $i -lt 7000 ]; do echo line $i %s; i=$((i+1)); done"
        % pad)
    lines = run(vm, "logs", "lines", "-f", timeout=120)
    out = "".join(l.get("data", "") for l in lines if "data" in l)
    assert len(out) > 256 << 10
    assert out == "".join("line %d %s\n" % (i, pad) for i in range(7000))
    assert lines[-1]["skipped"] == 0


def test_wait_port_and_tunnel(vm):
    run(vm, "mkdir", "-p", "/workspace/www")
    subprocess.run([binary("pd-guest"), "--dir", vm["dir"], "put",
                    "/workspace/www/index.html", "-"],
                   input=b"hello through the tunnel\n", check=True,
                   capture_output=True)
    r = one(vm, "wait-port", "8080", "--timeout-ms", "300")
    assert err_code(r) == "ETIMEDOUT"
    one(vm, "start", "--name", "web", "--", "httpd", "-f", "-p", "8080",
        "-h", "/workspace/www")
    assert one(vm, "wait-port", "8080", "--timeout-ms", "10000") == \
        {"t": 2, "id": 1}
    port = free_port()
    tun = subprocess.Popen([binary("pd-guest"), "--dir", vm["dir"],
                            "tunnel", "8080", "--listen", str(port)],
                           stdout=subprocess.PIPE)
    try:
        assert json.loads(tun.stdout.readline()) == {"listening": port}
        for _ in range(3):
            body = urllib.request.urlopen(
                "http://127.0.0.1:%d/index.html" % port, timeout=20).read()
            assert body == b"hello through the tunnel\n"
    finally:
        tun.kill()
        tun.wait()
    one(vm, "kill", "web", "--signal", "9")
    r = one(vm, "exec", "--", "true")  # the channel is free again
    assert r["exit_code"] == 0


def test_file_operations_and_errors(vm, tmp_path):
    assert one(vm, "mkdir", "-p", "/workspace/d1/d2") == {"t": 2, "id": 1}
    assert err_code(one(vm, "mkdir", "/workspace/d1")) == "EEXIST"
    src = tmp_path / "small"
    src.write_bytes(b"0123456789")
    assert one(vm, "put", "d1/d2/f.txt", str(src))["size"] == 10
    st = one(vm, "stat", "/workspace/d1/d2/f.txt")
    assert st["type"] == "file" and st["size"] == 10 and st["mode"] == 0o644
    ents = one(vm, "ls", "-r", "/workspace/d1")["entries"]
    assert sorted(e["name"] for e in ents) == ["d2", "d2/f.txt"]
    one(vm, "put", "--append", "/workspace/d1/d2/f.txt", str(src))
    assert one(vm, "stat", "/workspace/d1/d2/f.txt")["size"] == 20
    one(vm, "mv", "/workspace/d1/d2/f.txt", "/tmp/moved.txt")  # across fs
    assert err_code(one(vm, "stat", "/workspace/d1/d2/f.txt")) == "ENOENT"
    out = tmp_path / "back"
    one(vm, "get", "/tmp/moved.txt", str(out))
    assert out.read_bytes() == b"0123456789" * 2
    assert err_code(one(vm, "rm", "/workspace/d1")) == "ENOTEMPTY"
    one(vm, "rm", "-r", "/workspace/d1")
    assert err_code(one(vm, "ls", "/workspace/d1")) == "ENOENT"
    # Bad paths and kinds.
    assert err_code(one(vm, "get", "/workspace")) == "EISDIR"
    assert err_code(one(vm, "get", "/no/such")) == "ENOENT"
    assert err_code(one(vm, "put", "/workspace", str(src))) == "EISDIR"
    assert err_code(one(vm, "put", "/no/dir/f", str(src))) == "ENOENT"
    assert err_code(one(vm, "stat", "../../etc/passwd")) == "EINVAL"
    assert err_code(one(vm, "stat", "/workspace/../etc")) == "EINVAL"
    assert err_code(one(vm, "rm", "-r", "/")) == "EPERM"


def test_100mib_round_trip(vm, tmp_path):
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        f.write(os.urandom(100 << 20))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    r = one(vm, "put", "/workspace/big.bin", str(src), timeout=300)
    assert r["size"] == 100 << 20
    print("write 100 MiB: %d ms" % r["ms"])
    r = sh(vm, "sha256sum /workspace/big.bin", timeout=300)
    assert r["stdout"].split()[0] == digest
    back = tmp_path / "back.bin"
    r = one(vm, "get", "/workspace/big.bin", str(back), timeout=300)
    print("read 100 MiB: %d ms" % r["ms"])
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    one(vm, "rm", "/workspace/big.bin")
    # Neither side held the file: the agent's peak memory stays small.
    hwm = sh(vm, "grep VmHWM /proc/1/status")["stdout"].split()[1]
    assert int(hwm) < 32 << 10, hwm


def test_write_larger_than_the_disk_is_enospc(vm):
    with open("/dev/zero", "rb") as zero:
        r = one(vm, "put", "/workspace/fill.bin", "-", stdin=zero,
                timeout=300)
    assert err_code(r) == "ENOSPC"
    # The partial file is gone and the disk is usable again.
    ents = one(vm, "ls", "/workspace")["entries"]
    assert not any("fill" in e["name"] for e in ents), ents
    assert one(vm, "info")["disk_used"] < 32 << 20
    assert sh(vm, "echo ok > /workspace/after && cat /workspace/after")[
        "stdout"] == "ok\n"


def test_fork_bomb_is_contained(vm):
    t0 = time.monotonic()
    r = sh(vm, "bomb() { bomb | bomb & }; bomb", "--timeout-ms", "4000",
           timeout=120)
    assert "exit_code" in r
    r = one(vm, "exec", "--", "true", timeout=60)
    assert r["exit_code"] == 0
    assert time.monotonic() - t0 < 90
    wait_for(lambda: int(sh(vm, "ls /proc | grep -c '^[0-9]'")["stdout"])
             < 100, 30, "the bomb's processes to be gone")


@pytest.mark.parametrize("kind,code", [
    ("garbage", "EPROTO"), ("huge", "EPROTO"), ("unknown", "ENOSYS"),
    ("badtype", "EPROTO"), ("types", "EINVAL"), ("nulpath", "EINVAL"),
    ("dotdot", "EINVAL"), ("noid", "EINVAL"), ("dupid", "EBUSY"),
    ("version", "EPROTO")])
def test_bad_host_input_gets_an_error_and_the_agent_goes_on(vm, kind, code):
    # pd-guest sends an exec (id 1) before the bad input and an info (id 2)
    # after it, on the same connection. A request before any HELLO is not
    # here: when a host reconnects faster than the agent reads, the port
    # shows no hangup, so the agent may rightly take it for the previous
    # session; tests/unit/guest covers it on a fresh stream.
    lines = run(vm, "bad", kind)
    assert any(l.get("t") == 3 and l.get("code") == code for l in lines), \
        lines
    if kind != "version":
        # The exec in flight finishes; EXIT is type 104.
        assert any(l.get("t") == 104 and l.get("id") == 1 and
                   l.get("stdout") == "alive\n" for l in lines), lines
        # After a length over the cap the stream is out of step, so the
        # agent ignores the rest of that connection; otherwise it serves.
        served = any(l.get("t") == 2 and l.get("id") == 2 for l in lines)
        assert served == (kind != "huge"), lines
    assert one(vm, "exec", "--", "true")["exit_code"] == 0


def test_shutdown_syncs_and_powers_off(vm):
    # Written just before the poweroff, through the page cache only.
    sh(vm, "echo synced > /workspace/last.txt")
    one(vm, "start", "--name", "daemon", "--", "sleep", "1000")
    assert one(vm, "shutdown") == {"t": 2, "id": 1}
    wait_for(lambda: not vm["proc"].alive(), 60, "QEMU to exit")
    disk = os.path.join(vm["dir"], "disk.img")
    debugfs = shutil.which("debugfs") or "/sbin/debugfs"
    out = subprocess.run([debugfs, "-R", "cat /last.txt", disk],
                         capture_output=True, timeout=30).stdout
    assert out == b"synced\n"
    dump = subprocess.run([shutil.which("dumpe2fs") or "/sbin/dumpe2fs",
                           "-h", disk], capture_output=True, timeout=30)
    assert b"Filesystem state:         clean" in dump.stdout, dump.stdout


def test_reboot_keeps_the_workspace(vm, guest_image, module_procs):
    # The same disk boots again: found as ext4, not formatted, data kept.
    assert not vm["proc"].alive()
    kernel, initrd = guest_image
    os.unlink(os.path.join(vm["dir"], "ready"))
    p = module_procs.start("vm1-again", [
        binary("pd-guest"), "boot", "--kernel", kernel, "--initrd", initrd,
        "--dir", vm["dir"], "--keep-disk", "--id", "sbx-test", "--mem", 256])
    wait_for(lambda: os.path.exists(os.path.join(vm["dir"], "ready")), 180,
             "the guest agent's HELLO after the reboot")
    assert sh(vm, "cat /workspace/last.txt")["stdout"] == "synced\n"
    con = open(os.path.join(vm["dir"], "console.log"),
               errors="replace").read()
    assert "formatted the blank workspace disk" not in con, con[-3000:]
    assert one(vm, "shutdown") == {"t": 2, "id": 1}
    wait_for(lambda: not p.alive(), 60, "QEMU to exit")


def test_a_disk_holding_something_else_is_never_formatted(vm, guest_image,
                                                          module_procs):
    kernel, initrd = guest_image
    disk = os.path.join(vm["dir"], "disk.img")
    junk = os.urandom(64 << 10)
    with open(disk, "r+b") as f:
        f.write(junk)
    os.unlink(os.path.join(vm["dir"], "ready"))
    p = module_procs.start("vm1-junk", [
        binary("pd-guest"), "boot", "--kernel", kernel, "--initrd", initrd,
        "--dir", vm["dir"], "--keep-disk", "--id", "sbx-test", "--mem", 256])
    wait_for(lambda: os.path.exists(os.path.join(vm["dir"], "ready")), 180,
             "the guest agent's HELLO with a foreign disk")
    con = open(os.path.join(vm["dir"], "console.log"),
               errors="replace").read()
    assert "holds data but no ext4 file system" in con, con[-3000:]
    # The agent still serves, with /workspace in memory.
    assert "/dev/vda" not in sh(vm, "mount")["stdout"]
    assert sh(vm, "echo ok > /workspace/x && cat /workspace/x")[
        "stdout"] == "ok\n"
    assert one(vm, "shutdown") == {"t": 2, "id": 1}
    wait_for(lambda: not p.alive(), 60, "QEMU to exit")
    with open(disk, "rb") as f:
        assert f.read(64 << 10) == junk
