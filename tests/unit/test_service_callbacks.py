"""Callback addresses (SSRF) and Standard Webhooks signatures, without the network.

The delivery test runs a real HTTP server on 127.0.0.1, allowed on purpose, and checks that
the request arrives at the address that was checked, signed, and that redirects are refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, ClassVar

import pytest

from app.callbacks import AllowList, CallbackRefused, check_url, deliver, resolve, sign, signed_request, verify
from app.errors import BadInput

NONE = AllowList()


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:a9fe:a9fe]/",
    "http://0x7f000001/",
    "http://2130706433/",
    "http://0177.0.0.1/",
    "http://127.1/",
    "http://localhost:5432/",
    "http://sub.localhost/",
    "http://10.0.0.1/",
    "http://172.16.3.4/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://[::1]/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://224.0.0.1/",
    "http://[ff02::1]/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    "http://[2002:7f00:1::]/",
    "http://user:pw@example.com/",
    "ftp://example.com/",
    "http://example.com/\x00",
    # Unicode digits and full stops that a resolver maps to a loopback address.
    "http://\u2460\u2461\u2466.0.0.1/",
    "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/",
    "http://127\u30020\u30020\u30021/",
    "http://127\uff0e0\uff0e0\uff0e1/",
    "http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/",
])
def test_non_public_callback_urls_are_refused_at_submission(url: str) -> None:
    with pytest.raises(BadInput) as info:
        check_url(url, NONE)
    assert info.value.code == "invalid_callback_url"


@pytest.mark.parametrize("url", ["https://hooks.example.com/cdi", "http://93.184.215.14:8080/x",
                                 "https://[2606:4700::1111]/", "https://b\u00fccher.example/hook"])
def test_public_callback_urls_are_accepted(url: str) -> None:
    check_url(url, NONE)


def test_the_operator_can_allow_networks_and_hosts() -> None:
    allow = AllowList.parse("10.0.0.0/8, hooks.internal ,::1")
    check_url("http://10.1.2.3/", allow)
    check_url("http://[::1]:9000/", allow)
    check_url("http://hooks.internal/", allow)
    with pytest.raises(BadInput):
        check_url("http://192.168.0.1/", allow)


def test_delivery_resolves_and_refuses_any_private_answer() -> None:
    # A name that resolves to a public and to a private address (DNS rebinding) is refused.
    with pytest.raises(CallbackRefused):
        resolve("http://evil.example/", NONE, lambda host, port: ["93.184.215.14", "127.0.0.1"])
    with pytest.raises(CallbackRefused):
        resolve("http://evil.example/", NONE, lambda host, port: ["::ffff:10.0.0.1"])
    target, host = resolve("https://ok.example:8443/p?q=1", NONE, lambda host, port: ["93.184.215.14"])
    assert (target, host) == ("https://93.184.215.14:8443/p?q=1", "ok.example")
    target, _ = resolve("http://ok.example/", NONE, lambda host, port: ["2606:4700::1111"])
    assert target == "http://[2606:4700::1111]/"


def test_signature_is_standard_webhooks() -> None:
    # The example of the Standard Webhooks specification's reference implementation.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    msg_id, ts = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330
    body = b'{"test": 2432232314}'
    assert sign(secret, msg_id, ts, body) == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = base64.b64encode(hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()).decode()
    assert sign(secret, msg_id, ts, body) == f"v1,{mac}"
    body2, headers = signed_request(secret, msg_id, {"a": 1}, timestamp=ts)
    assert verify(secret, headers, body2, now=ts + 10)
    assert not verify(secret, headers, body2 + b" ", now=ts + 10)
    assert not verify(secret, headers, body2, now=ts + 1000)


class _Receiver(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        _Receiver.seen.append({"path": self.path, "headers": dict(self.headers.items()), "body": body})
        if self.path == "/redirect":
            self.send_response(307)
            self.send_header("Location", "http://169.254.169.254/")
        else:
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_delivery_signs_connects_to_the_checked_address_and_never_redirects() -> None:
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    port = server.server_address[1]
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    try:
        _Receiver.seen.clear()
        # Not allowed: loopback is refused without a request.
        ok, reason, retry = deliver(f"http://127.0.0.1:{port}/hook", {"state": "done"}, secret=secret,
                                    msg_id="msg_a_done", allow=NONE, timeout=5)
        assert (ok, retry) == (False, False) and "refused" in reason and _Receiver.seen == []
        # A name resolving to a public address first and the server second would be refused too;
        # here the resolver answers the allowed address for a made-up name: the request must go
        # there with the name in the Host header.
        allow = AllowList.parse("127.0.0.1")
        ok, reason, _ = deliver(f"http://hooks.test:{port}/hook", {"state": "done"}, secret=secret,
                                msg_id="msg_00000000-0000-0000-0000-000000000001_done", allow=allow, timeout=5,
                                resolver=lambda host, p: ["127.0.0.1"])
        assert ok, reason
        got = _Receiver.seen[-1]
        assert got["headers"]["Host"] == f"hooks.test:{port}"
        headers = {k.lower(): v for k, v in got["headers"].items()}
        assert verify(secret, headers, got["body"])
        assert json.loads(got["body"]) == {"state": "done"}
        ok, reason, retry = deliver(f"http://127.0.0.1:{port}/redirect", {}, secret=secret, msg_id="msg_b_done",
                                    allow=allow, timeout=5)
        assert not ok and not retry and "redirect" in reason and len(_Receiver.seen) == 2
    finally:
        server.shutdown()
