"""ilora serve against hostile clients: the real server in a subprocess, driven over HTTP and raw sockets.

Entries nested 950 deep or naming two items, oversized headers, connections that send nothing or trickle
their head or body, clients that leave mid-request, unauthenticated requests with bad bodies or while the queue
is full, too many connections, a whitespace API key: each is answered with a 4xx and one sentence (or the
connection closed in bounded time), never a 5xx, a hang or a traceback in the log.
"""

from __future__ import annotations

import asyncio
import json
import re
import select
import socket
import time

import pytest

httpx = pytest.importorskip("httpx")

import test_serve  # noqa: E402
from ilora_cli.errors import UserError  # noqa: E402
from test_serve import AUTH, KEY, RUN, Server  # noqa: E402

from conftest import run_cli  # noqa: E402

home = test_serve.home  # the fixture with the trained run, shared with test_serve.py

READ_TIMEOUT = 1.0  # the guarded server's read_timeout_s: short, so that the slow-client tests are quick


@pytest.fixture(scope="module")
def guarded(home):
    """A server with the API key, a 1 s read timeout, 4 KiB of headers, and a queue of 2 that a batch waits
    1.5 s to fill (so that two requests hold it full)."""
    settings = ("read_timeout_s=1", "max_header_bytes=4096", "max_batch=8", "max_wait_ms=1500")
    s = Server(home, *settings, "max_queue=2", "max_users=2", env={"ILORA_API_KEY": KEY})
    s.wait_ready()
    yield s
    assert s.stop() == 0, s.stderr
    assert "Traceback" not in s.stderr and "Error" not in s.stderr, s.stderr


def _post(server, body, headers=AUTH, path="/v1/recommend"):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        server.url + path, content=content, headers={**headers, "Content-Type": "application/json"}, timeout=30
    )


def _one_sentence(resp, status: int, sentence: str) -> None:
    assert resp.status_code == status, resp.text
    assert set(resp.json()) == {"error"} and sentence in resp.json()["error"], resp.text
    assert "\n" not in resp.json()["error"]


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"1" + b"]" * depth


def test_a_body_nested_deeply_is_one_sentence(guarded):
    """950 deep reached the error sentence of the history entry, whose json.dumps raised RecursionError (500);
    the depth is now capped before the body is parsed (the entry's own sentence: test_recommend_entries.py)."""
    for body in (
        b'{"history": [' + _deep(950) + b"]}",
        b'{"history": [1], "candidates": [' + _deep(950) + b"]}",
        b'{"users": [{"history": [' + _deep(950) + b"]}]}",
        b'{"history": ' + _deep(100_000) + b"}",
    ):
        path = "/v1/recommend/batch" if body.startswith(b'{"users"') else "/v1/recommend"
        _one_sentence(_post(guarded, body, path=path), 422, "The request body is nested more than 32 levels deep.")
    # brackets in titles are not nesting; 30 levels are read (and refused as no history)
    _one_sentence(_post(guarded, {"history": ["[" * 500]}), 422, "Unknown title '[[[[")
    _one_sentence(_post(guarded, b'{"history": [' + _deep(30) + b"]}"), 422, "The history entry [[[[...]]]] is")


@pytest.mark.parametrize(
    "body,sentence",
    [
        (
            {"history": [{"item_id": 1, "title": "Item H7"}]},
            "The history entry names different items: item_id 1 is 'Item B1' and title 'Item H7' is id 7",
        ),
        (
            {"history": [{"id": 1, "item_id": 2}]},
            "The history entry names different items: item_id 2 is 'Item C2' and id 1 is 'Item B1'",
        ),
        ({"history": [{"item_id": 1, "title": "Painted Orchard"}]}, "Unknown title 'Painted Orchard'."),
        (
            {"history": [1], "candidates": [{"item_id": 3, "title": "Item E4"}, 5]},
            "The candidate names different items: item_id 3 is 'Item D3' and title 'Item E4' is id 4",
        ),
    ],
)
def test_an_entry_that_names_two_items_is_refused(guarded, body, sentence):
    _one_sentence(_post(guarded, body), 422, sentence)


def test_the_python_api_refuses_the_same_entries(home, monkeypatch):
    import ilora_cli

    monkeypatch.setenv("ILORA_HOME", str(home))
    with pytest.raises(UserError, match="The history entry names different items: item_id 2 is 'Item C2' and id 1"):
        ilora_cli.recommend(RUN, [[0, {"id": 1, "item_id": 2}]])


def test_authentication_comes_before_the_body_and_the_queue(guarded):
    """Without the key: 401 for a malformed body, one nested 5,000 deep, and while the queue is full (which a
    client with the key is told)."""
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for body in (b'{"history": [1,', b'{"history": ' + _deep(5000) + b"}", b"[" * 100_000):
            _one_sentence(_post(guarded, body, headers), 401, "A valid API key is needed")

    async def scenario():
        async with httpx.AsyncClient(timeout=30, headers=AUTH) as keyed, httpx.AsyncClient(timeout=30) as anonymous:
            url = guarded.url + "/v1/recommend"
            waiting = [asyncio.create_task(keyed.post(url, json={"history": [i]})) for i in (1, 2)]
            while guarded.metric("ilora_queue_length", AUTH) < 2:
                await asyncio.sleep(0.02)
            refused = [await anonymous.post(url, json={"history": [3]}), await anonymous.post(url + "/batch", json={})]
            busy = await keyed.post(url, json={"history": [3]})
            return refused, busy, await asyncio.gather(*waiting)

    refused, busy, answered = asyncio.run(scenario())
    for resp in refused:
        _one_sentence(resp, 401, "A valid API key is needed")
    _one_sentence(busy, 503, "The server is busy (2 users waiting)")
    assert [a.status_code for a in answered] == [200, 200]


def test_the_run_document_does_not_say_where_the_run_lies(guarded, home):
    info = httpx.get(guarded.url + "/v1/run", headers=AUTH).json()
    assert info["run"] == RUN and "path" not in info
    assert info["backbone"]["name"] == "tiny-backbone"  # a local folder, by its name
    assert str(home) not in json.dumps(info)


def test_a_batch_answers_its_good_users_and_names_the_bad_ones(guarded):
    resp = _post(guarded, {"users": [{"history": [1, 2]}, {"history": [1], "top_k": "x"}]}, path="/v1/recommend/batch")
    assert resp.status_code == 200, resp.text
    good, bad = resp.json()["results"]
    assert good["history"][-1]["item_id"] == 2 and good["recommendations"]
    assert bad == {"error": "users[1].top_k: input should be a valid integer; got 'x'."}

    resp = _post(guarded, {"users": [{"history": [1], "topk": 3}, 5]}, path="/v1/recommend/batch")
    assert resp.status_code == 200, resp.text
    assert resp.json()["results"] == [
        {"error": "Unknown field users[0].topk in the request; the fields are history, top_k, candidates, dataset."},
        {"error": "users[1] must be a JSON object; got 5."},
    ]
    # what is wrong with the request as a whole still refuses it
    _one_sentence(_post(guarded, {"users": "x"}, path="/v1/recommend/batch"), 422, "users: input should be")


def test_headers_are_capped(guarded):
    assert httpx.get(guarded.url + "/healthz", headers={"X-Pad": "a" * 3000}).status_code == 200
    resp = httpx.get(guarded.url + "/healthz", headers={"X-Pad": "a" * 6000})
    _one_sentence(resp, 431, "The request line and headers are larger than 4096 bytes.")
    resp = httpx.get(guarded.url + "/healthz?" + "q" * 6000)
    _one_sentence(resp, 431, "The request line and headers are larger than 4096 bytes.")
    # 100 KB: refused, by the app (431) if it arrives whole, or by the HTTP parser (400) while it arrives
    with _connect(guarded) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n")
        answer = _read_until_closed(sock)
    assert answer == b"" or re.match(rb"HTTP/1.1 (400|431) ", answer), answer[:200]


def _connect(server) -> socket.socket:
    return socket.create_connection((server.address["host"], server.address["port"]), timeout=10)


def _read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while data := sock.recv(65536):
            chunks.append(data)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def _seconds_until_closed(sock: socket.socket, trickle: bytes = b"", every: float = 0.2, limit: float = 6.0) -> float:
    """Seconds until the server closes ``sock`` (sending ``trickle`` every ``every`` seconds meanwhile)."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            if trickle:
                sock.sendall(trickle)
            if select.select([sock], [], [], every)[0] and not sock.recv(65536):
                return time.monotonic() - start
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start
    raise AssertionError(f"the server left the connection open for {limit} s")


def test_connections_that_do_not_send_a_request_in_time_are_closed(guarded):
    with _connect(guarded) as idle:
        assert READ_TIMEOUT * 0.9 <= _seconds_until_closed(idle) < READ_TIMEOUT + 3
    with _connect(guarded) as slow:  # a byte now and then does not restart the clock
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert _seconds_until_closed(slow, trickle=b"X-A: b\r\n") < READ_TIMEOUT + 3
    with _connect(guarded) as kept:  # after an answer, the next request is timed too
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(65536).startswith(b"HTTP/1.1 200 ")
        kept.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert _seconds_until_closed(kept, trickle=b"X-A: b\r\n") < READ_TIMEOUT + 3


def test_a_body_that_does_not_arrive_in_time_is_408(guarded):
    head = f"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    head += "Content-Type: application/json\r\nContent-Length: 50\r\n\r\n"
    with _connect(guarded) as sock:
        start = time.monotonic()
        sock.sendall(head.encode() + b'{"history": ')
        answer = _read_until_closed(sock)
        waited = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"error": "The request body did not arrive within 1 s."}
    assert READ_TIMEOUT * 0.9 <= waited < READ_TIMEOUT + 3
    assert re.search(r'^ilora_requests_total\{code="408",endpoint="/v1/recommend"\} [1-9]', _metrics(guarded), re.M)


def _metrics(server) -> str:
    return httpx.get(server.url + "/metrics", headers=AUTH).text


def test_a_client_that_leaves_before_its_body_is_not_a_server_error(guarded):
    head = f"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n"
    with _connect(guarded) as sock:
        sock.sendall(head.encode() + b'{"hist')
        time.sleep(0.1)  # the app is reading the body
    closed = r'^ilora_requests_total\{code="499",endpoint="/v1/recommend"\} [1-9]'
    deadline = time.monotonic() + 5
    while not re.search(closed, _metrics(guarded), re.M):
        assert time.monotonic() < deadline, _metrics(guarded)
        time.sleep(0.05)
    assert 'code="500"' not in _metrics(guarded)


def test_connections_are_capped(home):
    """max_connections=2: a request while two other connections are open gets 503, at one it is answered."""
    s = Server(home, "max_connections=2")
    try:
        s.wait_ready()
        with _connect(s):
            assert httpx.get(s.url + "/healthz").status_code == 200  # its own and one more
            with _connect(s):
                assert httpx.get(s.url + "/healthz").status_code == 503
        deadline = time.monotonic() + 5  # the server notices the closed connections at once, or nearly
        while httpx.get(s.url + "/healthz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        code = s.stop()
    assert code == 0, s.stderr


def test_an_api_key_of_whitespace_is_refused_at_start(home, monkeypatch):
    monkeypatch.setenv("ILORA_API_KEY", " \t ")
    r = run_cli("serve", "--run", RUN, "--port", "0", home=home, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        "error: $ILORA_API_KEY holds only whitespace; give a key, or unset it to serve without one."
    )
