"""The paddock CLI against a real cluster: 3 schedulers and 1 agent with a
real VM, every command of DESIGN.md section 4, its exit codes, --json, and
address failover when the first address is dead.

One cluster and one sandbox serve the whole module.
"""
import json
import os
import subprocess

import pytest

from conftest import Cluster, binary, free_port, wait_for

SB = "clisb"


@pytest.fixture(scope="module")
def cl(module_procs, module_workdir, guest_image):
    c = Cluster(module_procs, module_workdir, schedulers=3, agents=1,
                guest=guest_image)
    c.addr = ",".join(s["api"] for s in c.sched)
    try:
        r = pd(c, "sandbox", "create", SB, "--cpus", "1", "--memory", "256",
               "--disk", "128", "--env", "GREETING=hi", "--label", "team=cli",
               timeout=240)
        assert r.returncode == 0, r.stderr
    except BaseException:
        print(module_procs.dump_logs())
        raise
    yield c


def pd(c, *args, addr=None, token=None, stdin=None, timeout=120):
    env = dict(os.environ)
    env["PADDOCK_ADDR"] = addr or c.addr
    env["PADDOCK_TOKEN"] = c.token if token is None else token
    return subprocess.run([binary("paddock")] + [str(a) for a in args],
                          input=stdin, capture_output=True, env=env,
                          timeout=timeout)


def pdj(c, *args, **kw):
    r = pd(c, "--json", *args, **kw)
    assert r.returncode == 0, (args, r.returncode, r.stderr)
    return json.loads(r.stdout)


def test_sandbox_get_list_and_filters(cl):
    # Reads are served from each member's local state: a follower may show
    # the create a heartbeat later than the leader that answered it.
    sb = wait_for(lambda: (lambda j: j if j["state"] == "running" else None)(
        pdj(cl, "sandbox", "get", SB)), 10, "every member to see it running")
    assert sb["id"] == SB
    assert sb["cpus"] == 1 and sb["memory_mb"] == 256
    listed = pdj(cl, "sandbox", "list", "--label", "team=cli")
    ids = [s["id"] for s in listed.get("sandboxes", listed)]
    assert ids == [SB]
    none = pdj(cl, "sandbox", "list", "--label", "team=other")
    assert none.get("sandboxes", none) == []
    table = pd(cl, "sandbox", "list")
    assert table.returncode == 0 and SB in table.stdout.decode()


def test_exec_passes_output_and_exit_code_through(cl):
    r = pd(cl, "exec", SB, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert r.returncode == 7
    assert r.stdout == b"out\n" and r.stderr == b"err\n"
    r = pd(cl, "sh", SB, 'echo "$GREETING from $(hostname)"')
    assert r.returncode == 0 and r.stdout == b"hi from %s\n" % SB.encode()
    r = pd(cl, "exec", SB, "--env", "X=1", "--cwd", "/tmp", "--", "sh", "-c",
           "echo $X $(pwd)")
    assert r.stdout == b"1 /tmp\n"
    j = pdj(cl, "exec", SB, "--", "echo", "json")
    assert j["exit_code"] == 0 and j["stdout"] == "json\n"


def test_exec_stdin_and_timeout(cl):
    r = pd(cl, "exec", SB, "-i", "--", "wc", "-c", stdin=b"12345")
    assert r.returncode == 0 and r.stdout.strip() == b"5"
    r = pd(cl, "exec", SB, "--timeout", "1s", "--", "sleep", "30")
    assert r.returncode != 0
    r = pd(cl, "exec", SB, "--", "/no/such/binary")
    assert r.returncode != 0


def test_files_put_get_ls_mkdir_mv_rm(cl, tmp_path):
    local = tmp_path / "blob"
    data = os.urandom(3 * 1024 * 1024 + 17)
    local.write_bytes(data)
    assert pd(cl, "file", "mkdir", SB, "/workspace/d/e", "-p").returncode == 0
    r = pd(cl, "file", "put", SB, "/workspace/d/e/blob", str(local))
    assert r.returncode == 0, r.stderr
    back = tmp_path / "back"
    r = pd(cl, "file", "get", SB, "/workspace/d/e/blob", str(back))
    assert r.returncode == 0 and back.read_bytes() == data
    r = pd(cl, "file", "put", SB, "/workspace/d/piped", "-", stdin=b"piped\n")
    assert r.returncode == 0, r.stderr
    assert pd(cl, "file", "get", SB, "/workspace/d/piped", "-").stdout == \
        b"piped\n"
    ls = pdj(cl, "file", "ls", SB, "/workspace/d")
    names = {e["name"]: e for e in ls.get("entries", ls)}
    assert names["piped"]["type"] == "file" and names["piped"]["size"] == 6
    assert names["e"]["type"] == "dir"
    r = pd(cl, "file", "mv", SB, "/workspace/d/piped", "/workspace/d/moved")
    assert r.returncode == 0, r.stderr
    assert pd(cl, "file", "get", SB, "/workspace/d/piped", "-").returncode == 3
    assert pd(cl, "file", "rm", SB, "/workspace/d", "-r").returncode == 0
    assert pd(cl, "file", "ls", SB, "/workspace/d").returncode == 3


def test_processes_start_ps_logs_kill(cl):
    r = pd(cl, "start", SB, "--id", "ticker", "--", "sh", "-c",
           "echo one; echo two; sleep 600")
    assert r.returncode == 0, r.stderr
    ps = pdj(cl, "ps", SB)
    procs = {p["id"]: p for p in ps.get("processes", ps)}
    assert procs["ticker"]["running"] is True
    wait_for(lambda: b"two" in pd(cl, "logs", SB, "ticker").stdout, 30,
             "the process's output in its logs")
    assert pd(cl, "kill", SB, "ticker", "KILL").returncode == 0
    wait_for(lambda: pdj(cl, "ps", SB, "ticker")["running"] is False, 30,
             "the process to end")
    r = pd(cl, "start", SB, "--id", "short", "--", "sh", "-c",
           "echo a; sleep 1; echo b")
    assert r.returncode == 0
    r = pd(cl, "logs", SB, "short", "-f", timeout=60)
    assert r.returncode == 0 and r.stdout == b"a\nb\n"


def test_ports_expose_ls_unexpose(cl):
    r = pd(cl, "port", "expose", SB, "8080")
    assert r.returncode == 0, r.stderr
    url = r.stdout.decode().strip()
    assert url.startswith("http://8080-%s-" % SB) and "preview" in url
    ls = pdj(cl, "port", "ls", SB)
    assert [p["port"] for p in ls.get("ports", ls)] == [8080]
    assert pd(cl, "port", "unexpose", SB, "8080").returncode == 0
    ls = pdj(cl, "port", "ls", SB)
    assert ls.get("ports", ls) == []


def test_tokens_create_use_revoke(cl):
    r = pd(cl, "token", "create", "--tenant", "clitenant", "--role",
           "tenant", "--ttl", "10m")
    assert r.returncode == 0, r.stderr
    tok = r.stdout.decode().strip()
    # The tenant sees none of the admin's sandboxes.
    j = pdj(cl, "sandbox", "list", token=tok)
    assert j.get("sandboxes", j) == []
    assert pd(cl, "sandbox", "get", SB, token=tok).returncode == 3
    toks = pdj(cl, "token", "ls", "--tenant", "clitenant")
    jti = toks.get("tokens", toks)[0]["jti"]
    assert pd(cl, "token", "revoke", jti).returncode == 0
    wait_for(lambda: pd(cl, "sandbox", "list", token=tok).returncode == 7,
             10, "the revoked token to be refused")


def test_node_and_cluster_status(cl):
    nodes = pdj(cl, "node", "ls")
    ns = nodes.get("nodes", nodes)
    assert len(ns) == 1 and ns[0]["state"] == "ready"
    st = pdj(cl, "cluster", "status")
    assert len(st["members"]) == 3 and st["leader"]
    r = pd(cl, "cluster", "status")
    assert r.returncode == 0 and b"leader" in r.stdout


def test_failover_to_the_next_address(cl):
    dead = "127.0.0.1:%d" % free_port()
    r = pd(cl, "sandbox", "get", SB, addr=dead + "," + cl.sched[1]["api"])
    assert r.returncode == 0 and SB in r.stdout.decode()
    r = pd(cl, "sandbox", "get", SB, addr=dead)
    assert r.returncode == 4 and r.stderr.decode().count("\n") == 1


def test_errors_exit_codes_and_one_line(cl):
    r = pd(cl, "sandbox", "get", "no-such-sandbox")
    assert r.returncode == 3
    assert r.stderr.decode().startswith("paddock: ")
    assert pd(cl, "sandbox", "get", SB, token="garbage").returncode == 7
    assert pd(cl, "sandbox", "create", "Bad_Id").returncode in (1, 2)
    assert pd(cl, "frobnicate").returncode == 1
    assert pd(cl, "sandbox", "create", "huge", "--cpus", "4096").returncode \
        == 1
    # Valid, but more than any node has: refused with the reason per
    # resource.
    r = pd(cl, "sandbox", "create", "huge", "--cpus", "512")
    assert r.returncode == 2, r.stderr
    assert b"cpu" in r.stderr.lower(), r.stderr
    assert pd(cl, "exec", "no-such-sandbox", "--", "true").returncode == 125
    assert pd(cl, "health").returncode == 0


def test_sandbox_rm_last(cl):
    assert pd(cl, "sandbox", "rm", SB).returncode == 0
    wait_for(lambda: pd(cl, "sandbox", "get", SB).returncode == 3, 60,
             "the sandbox to be gone")
