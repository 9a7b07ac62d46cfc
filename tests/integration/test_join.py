"""Node join tokens: with require_join_token, an agent registers only with a
token of role node minted for its own node id; none, another node's, a
tenant's or a revoked one is refused, and the refusal says why.

3 schedulers; the agents boot no VM (registration only).
"""
import os
import subprocess

import pytest

from conftest import REPO, Cluster, wait_for


@pytest.fixture(scope="module")
def cl(module_procs, module_workdir, guest_image):
    c = Cluster(module_procs, module_workdir, schedulers=3, agents=0,
                sched_args=["--require_join_token"])
    c.guest = guest_image
    subprocess.run([os.path.join(REPO, "deploy", "make-certs.sh"), c.pki,
                    "agent", "j1", "j2", "j3", "j4", "j5", "j6"], check=True,
                   capture_output=True)
    yield c


def mint(c, tenant, role):
    st, _h, body = c.api("POST", "/v1/tokens",
                         {"tenant": tenant, "role": role, "ttl_s": 600},
                         at=c.leader())
    assert st in (200, 201), (st, body)
    return body


def token_file(c, name, token):
    p = os.path.join(c.dir, name + ".join")
    with open(p, "w") as f:
        f.write(token + "\n")
    os.chmod(p, 0o600)
    return p


def node_state(c, node):
    st, _h, body = c.api("GET", "/v1/nodes")
    assert st == 200, body
    for n in body["nodes"]:
        if n["id"] == node:
            return n["state"]
    return None


def start(c, name, token=None):
    extra = ["--join_token_file", token_file(c, name, token)] if token else []
    return c.start_agent(name, c.guest, extra)


def refused(c, agent, words):
    wait_for(lambda: words in agent["proc"].log(), 30,
             "the agent to log its refusal (%s)" % words)
    assert node_state(c, agent["name"]) is None


def test_agent_with_its_own_node_token_registers(cl):
    tok = mint(cl, "j1", "node")["token"]
    start(cl, "j1", tok)
    wait_for(lambda: node_state(cl, "j1") == "ready", 60, "node j1 ready")


def test_agent_without_a_token_is_refused(cl):
    a = start(cl, "j2")
    refused(cl, a, "requires a join token")


def test_another_nodes_token_is_refused(cl):
    tok = mint(cl, "j1", "node")["token"]
    a = start(cl, "j3", tok)
    refused(cl, a, "it is for node j1")


def test_a_tenant_token_is_refused(cl):
    tok = mint(cl, "j4", "tenant")["token"]
    a = start(cl, "j4", tok)
    refused(cl, a, "is not node")


def test_a_revoked_token_is_refused(cl):
    body = mint(cl, "j5", "node")
    st, _h, _b = cl.api("DELETE", "/v1/tokens/" + body["jti"],
                        at=cl.leader())
    assert st in (200, 204)
    a = start(cl, "j5", body["token"])
    refused(cl, a, "join token refused")


def test_a_bad_token_file_stops_the_agent_at_once(cl):
    p = os.path.join(cl.dir, "two.join")
    with open(p, "w") as f:
        f.write("one two\n")
    a = cl.start_agent("j6", cl.guest, ["--join_token_file", p])
    wait_for(lambda: not a["proc"].alive(), 30, "the agent to exit")
    assert "want one token on one line" in a["proc"].log()
