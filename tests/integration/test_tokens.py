"""Tokens, tenants and revocation on a real 3-scheduler cluster.

One agent runs the tenants' VMs (TCG). The bootstrap admin token exists
once, mode 0600; only admins mint, list and revoke; a tenant sees only its
own sandboxes (another tenant's is a 404 on every route, and never in its
list); a revoked token is refused by every scheduler as soon as it applied
the revocation; forged and expired tokens are refused with a reason; the
API rate limit answers 429 with Retry-After; key rotation keeps old tokens
working until the old key is retired; expired tokens are collected.
"""
import base64
import http.server
import json
import os
import stat
import threading
import time

import pytest

from conftest import Cluster, free_port, http_json, wait_for

GC_MS = 1000
SECRET = "real-secret-4711"


class Upstream:
    """An HTTP server on the host's loopback that records what it got."""

    def __init__(self):
        seen = self.seen = []

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append(dict(self.headers))
                body = b"upstream says hi\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.port = free_port()
        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", self.port),
                                                   H)
        self.t = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.t.start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture(scope="module")
def upstream():
    u = Upstream()
    yield u
    u.close()


@pytest.fixture(scope="module")
def cl(module_procs, module_workdir, guest_image, upstream):
    creds = os.path.join(module_workdir, "egress-credentials")
    with open(creds, "w") as f:
        f.write("# host Header: value\n127.0.0.1 X-Api-Key: %s\n" % SECRET)
    os.chmod(creds, 0o600)
    c = Cluster(module_procs, module_workdir, schedulers=3, agents=1,
                guest=guest_image,
                sched_env={"PADDOCK_TOKEN_GC_MS": str(GC_MS)},
                sched_args=["--rate_per_s", "20", "--rate_burst", "40"],
                agent_env={"PADDOCK_EGRESS_CREDENTIALS": creds})
    # A token that expires at once, minted first so that its 10 s of
    # leeway pass while the other tests run.
    st, _h, body = c.api("POST", "/v1/tokens", {"tenant": "shortlived",
                                                "ttl_s": 1})
    assert st == 201, body
    c.short = body
    yield c


def mint(c, tenant, role="tenant", ttl=600, at=None):
    st, _h, body = c.api("POST", "/v1/tokens", {"tenant": tenant,
                                                "role": role, "ttl_s": ttl},
                         at=at)
    assert st == 201, (st, body)
    assert body["tenant"] == tenant and body["role"] == role
    assert body["expires_at"] > time.time()
    tok = body["token"]
    # Followers accept it once they applied TOKEN_CREATE.
    for s in c.sched:
        wait_for(lambda: c.api("GET", "/v1/sandboxes", token=tok,
                               at=s)[0] != 401, 5,
                 "scheduler %d to know token %s" % (s["id"], body["jti"]))
    return body


def b64json(part):
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def test_bootstrap_admin_token_once(cl):
    files = [os.path.join(s["dir"], "admin.token") for s in cl.sched
             if os.path.exists(os.path.join(s["dir"], "admin.token"))]
    assert len(files) == 1, files
    assert stat.S_IMODE(os.stat(files[0]).st_mode) == 0o600
    for s in cl.sched:
        assert cl.api("GET", "/v1/nodes", at=s)[0] == 200
    st, _h, body = cl.api("GET", "/v1/tokens")
    admins = [t for t in body["tokens"] if t["role"] == "admin"]
    assert len(admins) == 1, body


def test_jwks_without_a_token(cl):
    hdr = b64json(cl.token.split(".")[0])
    assert hdr["alg"] == "ES256"
    for s in cl.sched:
        st, _h, body = http_json("GET", s["api"], "/.well-known/jwks.json")
        assert st == 200
        kids = [k["kid"] for k in body["keys"]]
        assert hdr["kid"] in kids
        assert all(k["kty"] == "EC" and k["crv"] == "P-256" and
                   "d" not in k for k in body["keys"])


def test_only_admins_mint_list_revoke(cl):
    t = mint(cl, "acme")
    for method, path, body in (("POST", "/v1/tokens", {"tenant": "x"}),
                               ("GET", "/v1/tokens", None),
                               ("DELETE", "/v1/tokens/" + t["jti"], None),
                               ("POST", "/v1/keys/rotate", None)):
        st, _h, b = cl.api(method, path, body, token=t["token"],
                           at=cl.follower())
        assert st == 403, (method, path, st, b)
        assert b["error"]["code"] == "forbidden"


def test_bad_mint_requests(cl):
    for body, field in (({"tenant": "Bad_Id"}, "tenant"),
                        ({"tenant": "ok", "role": "root"}, "role"),
                        ({"tenant": "ok", "ttl_s": 0}, "ttl_s"),
                        ({"tenant": "ok", "ttl_s": 10 ** 9}, "ttl_s"),
                        ({"tenant": "ok", "extra": 1}, "extra"),
                        ({}, "tenant")):
        st, _h, b = cl.api("POST", "/v1/tokens", body, at=cl.follower())
        assert st == 400, (body, st, b)
        assert field in b["error"]["message"], b
    st, _h, b = cl.api("POST", "/v1/tokens", "{not json", at=cl.sched[0])
    assert st == 400
    st, _h, b = cl.api("DELETE", "/v1/tokens/not-a-jti")
    assert st == 400
    st, _h, b = cl.api("DELETE", "/v1/tokens/" + "0" * 32)
    assert st == 404


def test_tenant_isolation(cl):
    a = mint(cl, "tenant-a")["token"]
    b = mint(cl, "tenant-b")["token"]
    st, _h, body = cl.api("POST", "/v1/sandboxes?wait=true", {
        "id": "iso-a", "cpus": 1, "memory_mb": 192, "disk_mb": 32},
        token=a, at=cl.follower(), timeout=180)
    assert st in (200, 201) and body["state"] == "running", body

    for s in cl.sched:
        st, _h, body = cl.api("GET", "/v1/sandboxes/iso-a", token=a, at=s)
        assert st == 200, body
        st, _h, body = cl.api("GET", "/v1/sandboxes", token=a, at=s)
        assert [x["id"] for x in body["sandboxes"]] == ["iso-a"]
        st, _h, body = cl.api("GET", "/v1/sandboxes", token=b, at=s)
        assert st == 200 and body["sandboxes"] == [], body

    nothing = cl.api("GET", "/v1/sandboxes/no-such-box", token=b)
    assert nothing[0] == 404
    for method, path, body in (
            ("GET", "/v1/sandboxes/iso-a", None),
            ("DELETE", "/v1/sandboxes/iso-a", None),
            ("POST", "/v1/sandboxes/iso-a/exec", {"argv": ["true"]}),
            ("GET", "/v1/sandboxes/iso-a/files?path=/etc/hostname", None),
            ("POST", "/v1/sandboxes/iso-a/ports", {"port": 80}),
            ("GET", "/v1/sandboxes/iso-a/processes", None)):
        st, _h, resp = cl.api(method, path, body, token=b, at=cl.follower())
        assert st == 404, (method, path, st, resp)
        assert resp["error"]["code"] == "not_found"
        if method == "GET" and path == "/v1/sandboxes/iso-a":
            # The same answer as for a sandbox that does not exist.
            assert json.dumps(resp).replace("iso-a", "X") == \
                json.dumps(nothing[2]).replace("no-such-box", "X")

    st, _h, body = cl.api("POST", "/v1/sandboxes/iso-a/exec",
                          {"argv": ["echo", "mine"]}, token=a)
    assert st == 200 and body["stdout"] == "mine\n", body
    # The admin sees every tenant's sandboxes.
    st, _h, body = cl.api("GET", "/v1/sandboxes")
    assert "iso-a" in [x["id"] for x in body["sandboxes"]]


def test_revocation_refused_on_every_scheduler(cl):
    t = mint(cl, "revokee")
    for s in cl.sched:
        assert cl.api("GET", "/v1/sandboxes", token=t["token"],
                      at=s)[0] == 200
    t0 = time.monotonic()
    st, _h, body = cl.api("DELETE", "/v1/tokens/" + t["jti"],
                          at=cl.follower())
    assert st == 200 and body["revoked"] is True, body
    for s in cl.sched:
        st, _h, body = wait_for(lambda: (lambda r: r if r[0] == 401 else
                                         None)(cl.api("GET", "/v1/sandboxes",
                                                      token=t["token"],
                                                      at=s)),
                                2, "scheduler %d to refuse" % s["id"])
        assert body["error"]["message"] == "token revoked", body
    assert time.monotonic() - t0 < 2
    st, _h, body = cl.api("GET", "/v1/tokens?tenant=revokee")
    assert [x["revoked"] for x in body["tokens"]] == [True]
    # Revoking again is fine and changes nothing.
    assert cl.api("DELETE", "/v1/tokens/" + t["jti"])[0] == 200


def test_forged_tokens_refused(cl):
    good = mint(cl, "forger")["token"]
    h, p, sig = good.split(".")
    def enc(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode() \
            .rstrip("=")
    claims = b64json(p)
    claims["role"] = "admin"
    header = b64json(h)
    cases = {
        enc(dict(header, alg="none")) + "." + p + ".": "algorithm",
        enc(dict(header, alg="HS256")) + "." + p + "." + sig: "algorithm",
        h + "." + enc(claims) + "." + sig: "signature",
        enc(dict(header, kid="A" * 43)) + "." + p + "." + sig: "unknown",
        h + "." + p: "malformed",
        "garbage": "malformed",
    }
    s = cl.follower()
    for tok, why in cases.items():
        st, _h, body = cl.api("GET", "/v1/sandboxes", token=tok, at=s)
        assert st == 401, (tok, body)
        assert why in body["error"]["message"], (why, body)
    st, hd, body = http_json("GET", s["api"], "/v1/sandboxes")
    assert st == 401 and "missing bearer token" in body["error"]["message"]
    st, hd, body = http_json("GET", s["api"], "/v1/sandboxes",
                             headers={"Authorization": "Basic eDp5"})
    assert st == 401 and "WWW-Authenticate" in hd
    # Nothing of a refused token is logged, but its subject is.
    log = s["proc"].log()
    assert sig not in log and "forger" in log


def test_rate_limit_per_token(cl):
    t = mint(cl, "chatty")["token"]
    other = mint(cl, "quiet")["token"]
    s = cl.sched[0]
    codes, retry = [], None
    for _ in range(80):
        st, hd, _b = cl.api("GET", "/v1/sandboxes", token=t, at=s)
        codes.append(st)
        if st == 429:
            retry = hd.get("Retry-After")
            break
    assert 429 in codes, codes
    assert retry is not None and int(retry) >= 1
    assert cl.api("GET", "/v1/sandboxes", token=other, at=s)[0] == 200


def test_expired_token_refused_then_collected(cl):
    tok, jti = cl.short["token"], cl.short["jti"]
    wait_for(lambda: time.time() > cl.short["expires_at"] + 11, 20,
             "the short token's leeway to pass", interval=0.2)
    for s in cl.sched:
        st, _h, body = cl.api("GET", "/v1/sandboxes", token=tok, at=s)
        assert st == 401, body
        assert body["error"]["message"] in ("token expired",) or \
            body["error"]["message"].startswith("token unknown"), body

    def collected():
        st, _h, body = cl.api("GET", "/v1/tokens?tenant=shortlived")
        return st == 200 and body["tokens"] == []
    wait_for(collected, 10, "TOKEN_GC to drop the expired token")


def guest_wget(cl, sb, url, header=None, token=None):
    cmd = "wget -q -O - %s %s" % (
        '--header "Proxy-Authorization: %s"' % header if header else "", url)
    st, _h, body = cl.api("POST", "/v1/sandboxes/%s/exec" % sb, {
        "command": cmd, "env": {"http_proxy": "http://10.0.2.100:3128"},
        "timeout_ms": 30000}, token=token, timeout=60)
    assert st == 200, body
    return body


def test_egress_sandbox_token_and_revocation(cl, upstream):
    """The sandbox's own token opens its egress proxy, which adds the
    operator's credential the guest never sees; revoked, it is refused."""
    t = mint(cl, "egress-t")["token"]
    st, _h, body = cl.api("POST", "/v1/sandboxes?wait=true", {
        "id": "eg1", "cpus": 1, "memory_mb": 192, "disk_mb": 32,
        "egress": "127.0.0.1:%d" % upstream.port}, token=t, timeout=180)
    assert st in (200, 201) and body["state"] == "running", body
    st, _h, body = cl.api("POST", "/v1/sandboxes/eg1/exec",
                          {"command": "env"}, token=t)
    env = dict(l.split("=", 1) for l in body["stdout"].splitlines()
               if "=" in l)
    tok = env["PADDOCK_TOKEN"]
    claims = b64json(tok.split(".")[1])
    assert claims["sandbox"] == "eg1" and claims["sub"] == "egress-t"
    assert claims["exp"] - time.time() <= 1800
    assert SECRET not in body["stdout"]
    # The API does not take a sandbox token, not even for its sandbox.
    st, _h, body = cl.api("GET", "/v1/sandboxes/eg1", token=tok)
    assert st == 403, body

    def routed():
        st, _h, b = cl.api("POST", "/v1/sandboxes/eg1/exec", {
            "command": "grep -q eth0 /proc/net/route"}, token=t)
        return st == 200 and b["exit_code"] == 0
    wait_for(routed, 30, "the guest's DHCP lease")

    url = "http://127.0.0.1:%d/hello" % upstream.port
    body = guest_wget(cl, "eg1", url, "Bearer $PADDOCK_TOKEN", token=t)
    assert body["exit_code"] == 0, body
    assert body["stdout"] == "upstream says hi\n"
    got = upstream.seen[-1]
    assert got.get("X-Api-Key") == SECRET, got
    assert not any(k.lower() == "proxy-authorization" for k in got), got

    n = len(upstream.seen)
    body = guest_wget(cl, "eg1", url, token=t)           # no token
    assert body["exit_code"] != 0 and "407" in body["stderr"], body
    body = guest_wget(cl, "eg1", url, "Bearer x.y.z", token=t)
    assert body["exit_code"] != 0 and "407" in body["stderr"], body
    assert len(upstream.seen) == n

    st, _h, body = cl.api("DELETE", "/v1/tokens/" + claims["jti"])
    assert st == 200, body
    agent = cl.agents[0]["proc"]
    wait_for(lambda: "token %s revoked" % claims["jti"] in agent.log(), 5,
             "the agent to learn the revocation")
    body = guest_wget(cl, "eg1", url, "Bearer $PADDOCK_TOKEN", token=t)
    assert body["exit_code"] != 0 and "407" in body["stderr"], body
    assert len(upstream.seen) == n
    assert "token revoked" in agent.log()


def test_key_rotation_then_retire(cl):
    old_kid = b64json(cl.token.split(".")[0])["kid"]
    before = mint(cl, "rotating")["token"]
    st, _h, body = cl.api("POST", "/v1/keys/rotate", at=cl.follower())
    assert st == 201, body
    new_kid = body["kid"]
    assert new_kid != old_kid
    # New tokens use the new key; old ones still verify.
    admin2 = mint(cl, "admin2", role="admin")["token"]
    assert b64json(admin2.split(".")[0])["kid"] == new_kid
    for s in cl.sched:
        assert cl.api("GET", "/v1/sandboxes", token=before, at=s)[0] == 200
        st, _h, body = http_json("GET", s["api"], "/.well-known/jwks.json")
        assert {old_kid, new_kid} <= {k["kid"] for k in body["keys"]}
    st, _h, body = cl.api("GET", "/v1/keys", token=admin2)
    assert [k["kid"] for k in body["keys"] if k["active"]] == [new_kid]

    st, _h, body = cl.api("DELETE", "/v1/keys/" + old_kid, token=admin2,
                          at=cl.follower())
    assert st == 200, body
    for s in cl.sched:
        wait_for(lambda: cl.api("GET", "/v1/sandboxes", token=before,
                                at=s)[0] == 401, 2,
                 "scheduler %d to drop the retired key" % s["id"])
        st, _h, body = cl.api("GET", "/v1/nodes", at=s)  # old admin token
        assert st == 401 and "retired" in body["error"]["message"], body
        assert cl.api("GET", "/v1/nodes", token=admin2, at=s)[0] == 200
    # The last key in use cannot be retired.
    st, _h, body = cl.api("DELETE", "/v1/keys/" + new_kid, token=admin2)
    assert st == 409, body
    cl.token = admin2
