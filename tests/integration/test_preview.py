"""Preview URLs reach one exposed port of one sandbox through any scheduler.

A 3-scheduler, 2-agent cluster (spread placement, so the two sandboxes land
on different nodes) with real VMs under TCG; every scheduler's preview
listener serves both sandboxes, the leader's and the followers' alike, for
plain, chunked and streamed (SSE) responses, request bodies and WebSocket
upgrades, and passes the client's address in X-Forwarded-For. A wrong,
unexposed or unexposed-after-the-fact token and a Host with extra labels
get the same 404; a closed guest port a 502 that says so; a silent guest a
504; a smuggling attempt a 400; a guessing client a 429.
"""
import base64
import hashlib
import http.client
import os
import socket
import time

import pytest

from conftest import Cluster, http_json, wait_for

TIMEOUT_MS = 6000
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

ECHO_CGI = """#!/bin/sh
printf 'Content-Type: text/plain\\r\\n\\r\\n'
echo "xff=$HTTP_X_FORWARDED_FOR"
echo "host=$HTTP_HOST"
echo "method=$REQUEST_METHOD"
[ -n "$CONTENT_LENGTH" ] && head -c "$CONTENT_LENGTH"
exit 0
"""

SUM_CGI = """#!/bin/sh
printf 'Content-Type: text/plain\\r\\n\\r\\n'
head -c "$CONTENT_LENGTH" | md5sum
"""

SSE_CGI = """#!/bin/sh
printf 'Content-Type: text/event-stream\\r\\n\\r\\n'
i=0
while [ $i -lt 3 ]; do
  printf 'data: tick %d\\n\\n' $i
  i=$((i+1))
  sleep 1
done
"""

# Reads the request head byte by byte (sh's read on a socket), so nothing
# after it is consumed.
READ_HEAD = """while IFS= read -r line; do
  line=$(printf '%s' "$line" | tr -d '\\r')
  [ -z "$line" ] && break
  case "$line" in
    [Ss]ec-[Ww]eb[Ss]ocket-[Kk]ey:*) key=$(printf '%s' "${line#*:}" | tr -d ' ');;
  esac
done
"""

CHUNKED_SH = "#!/bin/sh\n" + READ_HEAD + (
    "printf 'HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\n"
    "Transfer-Encoding: chunked\\r\\n\\r\\n5\\r\\nhello\\r\\n"
    "6\\r\\n world\\r\\n0\\r\\n\\r\\n'\n")

WS_SH = "#!/bin/sh\nkey=''\n" + READ_HEAD + (
    "acc=$(printf '%s' \"${key}" + GUID + "\" | sha1sum | cut -d' ' -f1 "
    "| xxd -r -p | base64)\n"
    "printf 'HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\n"
    "Connection: Upgrade\\r\\nSec-WebSocket-Accept: %s\\r\\n\\r\\n' \"$acc\"\n"
    "exec cat\n")

SLOW_SH = "#!/bin/sh\nsleep 60\n"

PORTS = {"httpd": 8080, "chunked": 8082, "slow": 8083, "ws": 8090}


def put_file(c, sb, path, text, mode=None):
    st, _h, body = c.api("PUT", "/v1/sandboxes/%s/files?path=%s" % (sb, path),
                         text.encode(), headers={
                             "Content-Type": "application/octet-stream"})
    assert st in (200, 201, 204), (st, body)
    if mode:
        st, _h, body = c.api("POST", "/v1/sandboxes/%s/exec" % sb,
                             {"command": "chmod %s %s" % (mode, path)})
        assert st == 200 and body["exit_code"] == 0, body


def start(c, sb, command):
    st, _h, body = c.api("POST", "/v1/sandboxes/%s/processes" % sb,
                         {"command": command})
    assert st in (200, 201), (st, body)


def setup_guest(c, sb):
    c.api("POST", "/v1/sandboxes/%s/exec" % sb,
          {"command": "mkdir -p /workspace/www/cgi-bin"})
    put_file(c, sb, "/workspace/www/index.html", "hello from %s\n" % sb)
    put_file(c, sb, "/workspace/www/cgi-bin/echo", ECHO_CGI, "755")
    put_file(c, sb, "/workspace/www/cgi-bin/sse", SSE_CGI, "755")
    put_file(c, sb, "/workspace/www/cgi-bin/sum", SUM_CGI, "755")
    # About 9 MB of distinct lines: cheap to make under TCG, and any lost,
    # repeated or reordered chunk changes the checksum.
    c.api("POST", "/v1/sandboxes/%s/exec" % sb, {
        "command": "seq 1 1300000 > /workspace/www/big.bin"})
    put_file(c, sb, "/workspace/chunked.sh", CHUNKED_SH, "755")
    put_file(c, sb, "/workspace/ws.sh", WS_SH, "755")
    put_file(c, sb, "/workspace/slow.sh", SLOW_SH, "755")
    start(c, sb, "httpd -f -p %d -h /workspace/www" % PORTS["httpd"])
    for name in ("chunked", "slow", "ws"):
        start(c, sb, "nc -ll -p %d -e /workspace/%s.sh" % (PORTS[name], name))
    # Wait until each server listens (netstat in the guest).
    def listening():
        st, _h, body = c.api("POST", "/v1/sandboxes/%s/exec" % sb,
                             {"command": "netstat -ltn"})
        return st == 200 and all(":%d " % p in body["stdout"]
                                 for p in PORTS.values())
    wait_for(listening, 30, "the guest servers of %s to listen" % sb)


def expose(c, sb, port, at=None):
    st, _h, body = c.api("POST", "/v1/sandboxes/%s/ports" % sb,
                         {"port": port}, at=at)
    assert st == 201, (st, body)
    assert body["url"].startswith("http://%d-%s-%s." % (port, sb,
                                                        body["token"]))
    return body["url"].split("//", 1)[1].split(":", 1)[0]


@pytest.fixture(scope="module")
def cl(module_procs, module_workdir, guest_image):
    c = Cluster(module_procs, module_workdir, schedulers=3, agents=2,
                guest=guest_image,
                sched_env={"PADDOCK_PREVIEW_TIMEOUT_MS": str(TIMEOUT_MS)},
                sched_args=["--strategy", "spread"])
    try:
        for sb in ("pva", "pvb"):
            st, _h, body = c.api("POST", "/v1/sandboxes?wait=true", {
                "id": sb, "cpus": 1, "memory_mb": 256, "disk_mb": 64},
                timeout=180)
            assert st in (200, 201) and body["state"] == "running", body
        nodes = {c.api("GET", "/v1/sandboxes/" + sb)[2]["node"]
                 for sb in ("pva", "pvb")}
        assert len(nodes) == 2, "spread placed both sandboxes on %s" % nodes
        for sb in ("pva", "pvb"):
            setup_guest(c, sb)
        c.hosts = {sb: {name: expose(c, sb, port)
                        for name, port in PORTS.items()}
                   for sb in ("pva", "pvb")}
        for s in c.sched:
            for sb in ("pva", "pvb"):
                wait_for(lambda: pget(s, c.hosts[sb]["httpd"])[0] != 404, 5,
                         "scheduler %d to know the ports" % s["id"])
    except BaseException:
        print(module_procs.dump_logs())
        raise
    yield c


def pget(s, host, path="/", **kw):
    h = dict(kw.pop("headers", {}))
    h["Host"] = host
    return http_json(kw.pop("method", "GET"), s["preview"], path,
                     headers=h, **kw)


def raw(s, data, src="127.0.0.1", timeout=10.0):
    """Sends raw bytes to a preview listener; returns all it answers."""
    host, port = s["preview"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout,
                                  source_address=(src, 0)) as k:
        k.sendall(data)
        out = b""
        while True:
            try:
                b = k.recv(65536)
            except socket.timeout:
                break
            if not b:
                break
            out += b
    return out


def test_every_scheduler_serves_both_nodes(cl):
    """Leader and followers alike route to the sandbox on either node."""
    lead = cl.leader()
    assert any(s is not lead for s in cl.sched)
    for s in cl.sched:
        for sb in ("pva", "pvb"):
            st, _h, body = pget(s, cl.hosts[sb]["httpd"], "/index.html")
            assert st == 200, (s["id"], sb, st, body)
            assert body == ("hello from %s\n" % sb).encode()


def test_forwarded_for_and_request_body(cl):
    s = cl.follower()
    host = cl.hosts["pvb"]["httpd"]
    st, _h, body = pget(s, host, "/cgi-bin/echo", method="POST",
                        body=b"payload-123",
                        headers={"X-Forwarded-For": "6.6.6.6",
                                 "Content-Type": "text/plain"})
    assert st == 200, body
    text = body.decode()
    assert "xff=127.0.0.1\n" in text, text       # ours, not the client's
    assert "6.6.6.6" not in text
    assert "method=POST" in text
    assert "host=%s" % host in text
    assert text.endswith("payload-123"), text


def nc_get(s, host):
    """busybox `nc -ll` listens again only after its last child exited:
    a request in that window is refused (502), so it gets one retry."""
    return wait_for(lambda: (lambda r: r if r[0] != 502 else None)(
        pget(s, host, "/")), 3, "the nc server to listen again")


def test_large_bodies_both_ways(cl):
    """9 MB down and 6 MiB up: more than the 4 MiB stream window, so
    the agent's credit must come back as the client drains, and ours as
    the guest reads."""
    s = cl.follower()
    host = cl.hosts["pva"]["httpd"]
    st, _h, body = cl.api("POST", "/v1/sandboxes/pva/exec",
                          {"command": "md5sum /workspace/www/big.bin"})
    want = body["stdout"].split()[0]
    st, _h, body = pget(s, host, "/big.bin", timeout=120)
    assert st == 200 and len(body) > 8 << 20, (st, len(body))
    assert hashlib.md5(body).hexdigest() == want
    up = os.urandom(6 << 20)
    st, _h, body = pget(s, host, "/cgi-bin/sum", method="POST", body=up,
                        headers={"Content-Type": "application/octet-stream"},
                        timeout=120)
    assert st == 200, (st, body[:200])
    assert body.decode().split()[0] == hashlib.md5(up).hexdigest()
    st, h, body = pget(s, host, "/index.html", method="HEAD")
    assert st == 200 and body is None or body == b"", (st, body)


def test_chunked_response(cl):
    for s in cl.sched:
        st, h, body = nc_get(s, cl.hosts["pva"]["chunked"])
        assert st == 200 and body == b"hello world", (st, h, body)


def test_sse_streams(cl):
    """The first event arrives while the guest is still producing."""
    s = cl.follower()
    host, port = s["preview"].rsplit(":", 1)
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as k:
        k.sendall(("GET /cgi-bin/sse HTTP/1.1\r\nHost: %s\r\n\r\n" %
                   cl.hosts["pvb"]["httpd"]).encode())
        got = b""
        while b"tick 0" not in got:
            b = k.recv(4096)
            assert b, got
            got += b
        first = time.monotonic() - t0
        while b"tick 2" not in got:
            b = k.recv(4096)
            assert b, got
            got += b
        total = time.monotonic() - t0
    assert b"text/event-stream" in got
    assert first < total - 1.0, (first, total)


def ws_handshake(s, host, src="127.0.0.1"):
    key = base64.b64encode(os.urandom(16)).decode()
    k = socket.create_connection(tuple_addr(s["preview"]), timeout=10,
                                 source_address=(src, 0))
    k.sendall(("GET /chat HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n" % (host, key)).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        b = k.recv(1)
        if not b:
            break
        head += b
    return k, key, head


def tuple_addr(a):
    h, p = a.rsplit(":", 1)
    return h, int(p)


def ws_frame(text):
    mask = os.urandom(4)
    data = text.encode()
    assert len(data) < 126
    return (bytes([0x81, 0x80 | len(data)]) + mask +
            bytes(b ^ mask[i % 4] for i, b in enumerate(data))), mask


def recv_exact(k, n):
    out = b""
    while len(out) < n:
        b = k.recv(n - len(out))
        assert b, out
        out += b
    return out


def test_websocket_echo_through_follower(cl):
    """Upgrade through a follower to the sandbox on each node, echo both
    ways (the guest's echo returns the client's masked frame: unmask it)."""
    s = cl.follower()
    for sb in ("pva", "pvb"):
        k, key, head = ws_handshake(s, cl.hosts[sb]["ws"])
        with k:
            assert head.startswith(b"HTTP/1.1 101"), head
            want = base64.b64encode(hashlib.sha1(
                (key + GUID).encode()).digest()).decode()
            assert ("Sec-WebSocket-Accept: %s" % want).encode() in head, head
            for msg in ("hello", "second message", "x" * 100):
                frame, mask = ws_frame(msg)
                k.sendall(frame)
                back = recv_exact(k, len(frame))
                assert back[0] == 0x81 and back[1] & 0x7f == len(msg)
                m = back[2:6]
                got = bytes(b ^ m[i % 4] for i, b in enumerate(back[6:]))
                assert got.decode() == msg


def test_closed_port_is_502(cl):
    host = expose(cl, "pva", 9999)
    for s in cl.sched:
        # A follower knows the port once it applied the entry.
        st, _h, body = wait_for(lambda: (lambda r: r if r[0] != 404 else
                                         None)(pget(s, host)), 5,
                                "the port to replicate")
        assert st == 502, (st, body)
        assert "nothing is listening on port 9999" in \
            body["error"]["message"], body
    k, _key, head = ws_handshake(cl.follower(), host)
    k.close()
    assert head.startswith(b"HTTP/1.1 502"), head


def test_slow_guest_is_504(cl):
    s = cl.follower()
    t0 = time.monotonic()
    st, _h, body = pget(s, cl.hosts["pvb"]["slow"], timeout=30)
    took = time.monotonic() - t0
    assert st == 504, (st, body)
    assert "did not answer" in body["error"]["message"]
    assert TIMEOUT_MS / 1000.0 - 0.5 < took < TIMEOUT_MS / 1000.0 + 5, took


def test_wrong_tokens_get_the_same_404(cl):
    s = cl.follower()
    good = cl.hosts["pva"]["httpd"]
    label, domain = good.split(".", 1)
    port, rest = label.split("-", 1)
    sb, token = rest.rsplit("-", 1)
    flipped = ("a" if token[0] != "a" else "b") + token[1:]
    cases = [
        "%s-%s-%s.%s" % (port, sb, flipped, domain),       # wrong token
        "%s-%s-%s.%s" % (8081, sb, token, domain),          # not exposed
        "%s-%s-%s.%s" % (port, "pvb", token, domain),       # other sandbox
        "x.%s" % good,                                      # extra label
        "%s.evil.%s" % (label, domain),                     # label inside
        "%s.example.com" % label,                           # other domain
        good + ".",                                         # trailing dot
        "%s-%s-%s.%s" % (port, sb, token[:-1], domain),     # short token
        "localhost",
    ]
    bodies = set()
    for host in cases:
        st, _h, body = pget(s, host)
        assert st == 404, (host, st, body)
        bodies.add(repr(body))
    assert len(bodies) == 1, bodies
    # Logged with what was asked for, never with a token.
    log = s["proc"].log()
    assert "wrong token" in log and "port 8081 of sandbox pva" in log
    assert token not in log and flipped not in log
    # Case does not matter in host names.
    st, _h, _b = pget(s, good.upper(), "/index.html")
    assert st == 200


def test_smuggling_refused(cl):
    s = cl.follower()
    host = cl.hosts["pva"]["httpd"]
    attack = ("POST /cgi-bin/echo HTTP/1.1\r\nHost: %s\r\n"
              "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
              "0\r\n\r\nGET /index.html HTTP/1.1\r\nHost: %s\r\n\r\n"
              % (host, host)).encode()
    out = raw(s, attack)
    assert out.startswith(b"HTTP/1.1 400"), out
    assert out.count(b"HTTP/1.1") == 1, out   # no second response
    out = raw(s, ("GET / HTTP/1.1\r\nHost: %s\r\nContent-Length: 1\r\n"
                  "Content-Length: 2\r\n\r\nab" % host).encode())
    assert out.startswith(b"HTTP/1.1 400"), out
    out = raw(s, ("GET / HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: "
                  "gzip, chunked\r\n\r\n" % host).encode())
    assert out.startswith(b"HTTP/1.1 400"), out


def test_guessing_is_rate_limited(cl):
    """A client address that keeps guessing is slowed down (429), from its
    own address only (127.0.0.3 here; the other tests are unaffected)."""
    s = cl.sched[0]
    host = cl.hosts["pva"]["httpd"]
    label, domain = host.split(".", 1)
    codes = []
    for i in range(60):
        guess = label[:-6] + "%06d" % i
        guess = guess.replace("0", "a").replace("1", "b").replace(
            "8", "c").replace("9", "d")
        out = raw(s, ("GET / HTTP/1.1\r\nHost: %s.%s\r\nConnection: "
                      "close\r\n\r\n" % (guess, domain)).encode(),
                  src="127.0.0.3")
        codes.append(int(out.split(b" ", 2)[1]))
    assert codes[0] == 404
    assert 429 in codes, codes
    # A blocked address is refused even with the right token...
    out = raw(s, ("GET /index.html HTTP/1.1\r\nHost: %s\r\nConnection: "
                  "close\r\n\r\n" % host).encode(), src="127.0.0.3")
    assert out.startswith(b"HTTP/1.1 429") and b"Retry-After" in out, out
    # ...while another address is not.
    st, _h, _b = pget(s, host, "/index.html")
    assert st == 200


def test_bad_expose_requests(cl):
    for body in ({}, {"port": 0}, {"port": 70000}, {"port": "80"},
                 {"port": 80, "extra": 1}, "[1]", "{bad json"):
        st, _h, b = cl.api("POST", "/v1/sandboxes/pva/ports", body,
                           at=cl.follower())
        assert st == 400, (body, st, b)
    st, _h, b = cl.api("POST", "/v1/sandboxes/pva/ports",
                       {"port": PORTS["httpd"]})
    assert st == 409, b                      # already exposed
    for port in ("0", "x", "65536", "080"):
        st, _h, b = cl.api("DELETE", "/v1/sandboxes/pva/ports/" + port)
        assert st == 400, (port, st, b)
    st, _h, b = cl.api("POST", "/v1/sandboxes/no-such/ports", {"port": 80})
    assert st == 404, b


def test_tenant_cannot_expose_another_tenants_sandbox(cl):
    st, _h, body = cl.api("POST", "/v1/tokens", {"tenant": "mallory",
                                                 "ttl_s": 600})
    assert st == 201, body
    tok = body["token"]
    wait_for(lambda: cl.api("GET", "/v1/sandboxes", token=tok,
                            at=cl.follower())[0] == 200, 5,
             "the token to replicate")
    st, _h, body = cl.api("POST", "/v1/sandboxes/pva/ports",
                          {"port": 8080}, token=tok, at=cl.follower())
    assert st == 404, body
    st, _h, body = cl.api("GET", "/v1/sandboxes/pva/ports", token=tok)
    assert st == 404, body


def test_list_and_unexpose_kill_the_url_everywhere(cl):
    st, _h, body = cl.api("GET", "/v1/sandboxes/pvb/ports")
    assert st == 200
    listed = {p["port"] for p in body["ports"]}
    assert set(PORTS.values()) <= listed, body
    assert all("{token}" in p["url"] for p in body["ports"])

    host = cl.hosts["pvb"]["ws"]
    k, _key, head = ws_handshake(cl.sched[2], host)
    assert head.startswith(b"HTTP/1.1 101"), head
    st, _h, body = cl.api("DELETE", "/v1/sandboxes/pvb/ports/%d" %
                          PORTS["ws"], at=cl.follower())
    assert st == 200, body
    t0 = time.monotonic()
    for s in cl.sched:
        wait_for(lambda: pget(s, host)[0] == 404, 2,
                 "scheduler %d to refuse the unexposed URL" % s["id"])
    # The WebSocket that was open through it is closed by the sweep.
    k.settimeout(5)
    with k:
        assert k.recv(100) == b""
    assert time.monotonic() - t0 < 5
    st, _h, body = cl.api("DELETE", "/v1/sandboxes/pvb/ports/%d" %
                          PORTS["ws"])
    assert st == 404, body


def test_preview_and_api_over_tls(procs, workdir):
    """With api_tls_cert/key, both listeners speak HTTPS only (one
    scheduler, no VM: the TLS layer and the preview 404 are what count)."""
    import ssl
    c = Cluster(procs, workdir, schedulers=1, tls_api=True)
    ctx = ssl.create_default_context(cafile=os.path.join(c.pki, "ca.pem"))
    for addr, path, want in ((c.sched[0]["preview"], "/", 404),
                             (c.sched[0]["api"], "/v1/health", 200)):
        h, p = addr.rsplit(":", 1)
        k = http.client.HTTPSConnection(h, int(p), context=ctx, timeout=10)
        k.request("GET", path, headers={
            "Host": "8080-box-abcdefghijklmnopqrstuvwxyz.preview.localhost"
            if want == 404 else h})
        r = k.getresponse()
        assert r.status == want, (addr, r.status, r.read())
        k.close()
        # Plain HTTP on a TLS listener gets nothing useful back.
        out = raw({"preview": addr}, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                  timeout=5)
        assert not out.startswith(b"HTTP/1.1 2"), out


def test_destroy_unexposes_everything(cl):
    host = cl.hosts["pvb"]["httpd"]
    assert pget(cl.sched[0], host, "/index.html")[0] == 200
    st, _h, body = cl.api("DELETE", "/v1/sandboxes/pvb", timeout=60)
    assert st in (200, 202, 204), body
    for s in cl.sched:
        wait_for(lambda: pget(s, host)[0] == 404, 10,
                 "scheduler %d to refuse the destroyed sandbox's URL"
                 % s["id"])


def test_lost_sandbox_is_placed_again_by_a_preview_request(cl):
    """The node of pva goes away; the next preview request places pva
    again on the other node and reaches its fresh VM (no server there yet:
    502, from the new VM, not a hang)."""
    old = cl.api("GET", "/v1/sandboxes/pva")[2]["node"]
    agent = next(a for a in cl.agents if a["node"] == old)
    agent["proc"].stop()
    fol = cl.follower()
    # The scheduler that serves the request must know the node is gone
    # (before that, a running sandbox on a dead node is a 502 "node
    # unreachable", which is right too).
    wait_for(lambda: cl.api("GET", "/v1/sandboxes/pva", at=fol)[2]["state"]
             == "lost", 30, "pva to be lost with its node")
    host = cl.hosts["pva"]["httpd"]
    st, _h, body = pget(fol, host, "/index.html", timeout=120)
    assert st == 502, (st, body)
    assert "nothing is listening on port 8080" in body["error"]["message"]
    sb = cl.api("GET", "/v1/sandboxes/pva")[2]
    assert sb["state"] == "running" and sb["node"] != old, sb
