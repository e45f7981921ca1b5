"""Service hardening (issue 12): the fault-battery cases, each as a request that once got a 5xx, a
200 with garbage, or a connection held open, plus a schemathesis fuzz run over the OpenAPI schema.

Retrieval answers are checked against brute force over the same vectors (as in test_serve.py);
connection behaviour against a real uvicorn server on 127.0.0.1 and raw sockets.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_serve import (  # noqa: F401 - `world` and `client` are fixtures
    IMAGE_DIM,
    OUT_DIM,
    TOKEN,
    FakeImageEncoder,
    FakeTextEncoder,
    adapt,
    auth,
    brute_force,
    client,
    message,
    world,
)

from itemsage.index.versions import current_version
from itemsage.serve import app as serve


def post_raw(client, path: str, raw: bytes, headers: dict | None = None):
    return client.post(path, content=raw, headers={"content-type": "application/json", **(headers or {})})


# ---- 1. no 5xx: lone surrogates, long version names ----------------------------------------------

SURROGATE_BODIES = [
    ("/v1/embed", b'{"product": {"title": "chair \\ud800"}}', "title"),
    ("/v1/embed", b'{"product": {"title": ["ok", "\\udfff x"]}}', "title"),
    ("/v1/embed", b'{"product": {"product_id": "p\\ud800", "title": "chair"}}', "product_id"),
    ("/v1/embed", b'{"product": {"brand": "\\ud83d"}}', "brand"),
    ("/v1/embed", b'{"product": {"\\ud800": "x"}}', "product"),  # the key itself
    ("/v1/search", b'{"text": "chair \\ud800"}', "text"),
    ("/v1/closeup", b'{"product_id": "\\ud800"}', "product_id"),
    ("/v1/home", b'{"history": ["p01", "\\udc00"]}', "history"),
    ("/admin/reload", b'{"version": "v\\ud800"}', "version"),
]


@pytest.mark.parametrize("path,raw,text", SURROGATE_BODIES, ids=[f"{p}-{i}" for i, (p, *_) in enumerate(SURROGATE_BODIES)])
def test_lone_surrogates_get_a_422_that_encodes(client, path, raw, text):
    r = post_raw(client, path, raw, auth())
    assert r.status_code == 422, r.text
    assert text in message(r)
    r.content.decode("utf-8")  # the response itself is valid UTF-8


def test_a_valid_surrogate_pair_is_text(client):
    r = post_raw(client, "/v1/embed", b'{"product": {"title": "chair \\ud83e\\ude91"}}')  # U+1FA91 CHAIR
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("version", ["v" * 256, "v" * 5000])
def test_reload_with_a_long_version_name_is_422(client, version):
    r = client.post("/admin/reload", json={"version": version}, headers=auth())
    assert r.status_code == 422, r.text
    assert "255" in message(r)


def test_unknown_field_named_with_a_surrogate_is_reported(client):
    r = post_raw(client, "/v1/search", b'{"text": "chair", "\\ud800x": 1}')
    assert r.status_code == 422, r.text
    r.content.decode("utf-8")


# ---- 2. no 200 with garbage: huge vectors are scaled, or refused with a reason -------------------


@pytest.mark.parametrize("scale", [1e19, 1e30, 3e38])
def test_huge_query_vectors_search_like_their_direction(client, world, scale):
    """A vector and the same vector times 1e19..3e38 are one direction: the same answer (once: zeros)."""
    ids, vectors = world["ids"], world["vectors"]["v1"]
    rng = np.random.default_rng(3)
    for path, width, surface in (("/v1/search", 384, "search"), ("/v1/closeup", IMAGE_DIM, "closeup")):
        v = rng.standard_normal(width)
        v = v / np.abs(v).max()  # largest |value| 1, so v * scale stays within float32
        r = client.post(path, json={"vector": (v * scale).tolist(), "k": 5})
        assert r.status_code == 200, r.text
        want_ids, want_scores = brute_force(vectors, ids, adapt(world, surface, v), 5)
        assert r.json()["ids"] == want_ids
        np.testing.assert_allclose(r.json()["scores"], want_scores, rtol=1e-4, atol=1e-5)
    h = rng.standard_normal((3, OUT_DIM))
    h = h / np.abs(h).max(axis=1, keepdims=True)
    r = client.post("/v1/home", json={"vectors": (h * scale).tolist(), "k": 4, "max_clusters": 1})
    assert r.status_code == 200, r.text
    small = client.post("/v1/home", json={"vectors": h.tolist(), "k": 4, "max_clusters": 1}).json()
    assert r.json()["ids"] == small["ids"] and max(r.json()["scores"]) > 0.1
    np.testing.assert_allclose(r.json()["scores"], small["scores"], rtol=1e-4, atol=1e-5)


def test_embed_with_image_values_too_large_for_the_model_is_422(client):
    r = client.post("/v1/embed", json={"product": {"title": "chair", "image_embeddings": [[1e30] * IMAGE_DIM]}})
    assert r.status_code == 422, r.text
    assert "image_embeddings" in message(r) and "too large" in message(r)


def test_embed_answers_are_finite_unit_vectors_or_refused(client):
    for value in (1e4, 1e10, 1e19, 1e25, 3e38):
        r = client.post("/v1/embed", json={"product": {"title": "chair", "image_embeddings": [[value] * IMAGE_DIM]}})
        assert r.status_code in (200, 422), r.text
        if r.status_code == 200:
            v = np.array(r.json()["vector"], dtype=np.float64)  # a null would make this an object array
            assert np.all(np.isfinite(v)) and abs(np.linalg.norm(v) - 1) < 1e-4


# ---- 4. decompression bombs: refused from the header, before decoding ----------------------------


def png_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")  # 1 bit per pixel: compresses to almost nothing
    return buf.getvalue()


def test_an_image_over_the_pixel_limit_is_413_without_decoding(world, monkeypatch):
    app = serve.create_app(world["model_dir"], world["root"], max_image_pixels=1_000_000,
                           image_encoder=FakeImageEncoder())
    from PIL import ImageFile

    bomb = png_bytes(2000, 1000)  # 2,000,000 pixels, ~1 KB
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self, *a, **k: decoded.append(self.size))
    with TestClient(app) as c:
        r = c.post("/v1/closeup", json={"image": base64.b64encode(bomb).decode()})
    assert r.status_code == 413, r.text
    assert "2,000,000" in message(r) and "1,000,000" in message(r)
    assert decoded == []


# ---- 7. strict request models --------------------------------------------------------------------

STRICT = [
    ("/v1/search", {"vector": [True] + [1.0] * 383}, "vector"),
    ("/v1/search", {"vector": [False] * 384}, "vector"),
    ("/v1/search", {"vector": ["1.5"] + [1.0] * 383}, "vector"),
    ("/v1/closeup", {"vector": ["1"] * IMAGE_DIM}, "vector"),
    ("/v1/closeup", {"product_id": "p01", "exclude_self": "yes"}, "exclude_self"),
    ("/v1/closeup", {"product_id": "p01", "exclude_self": 1}, "exclude_self"),
    ("/v1/home", {"vectors": [["0.5"] * OUT_DIM]}, "vectors"),
    ("/v1/embed", {"product": {"image_embeddings": [[True] * IMAGE_DIM]}}, "image_embeddings"),
    ("/v1/closeup", {"product_id": 12}, "product_id"),
]


@pytest.mark.parametrize("path,body,text", STRICT, ids=[f"{p}-{i}" for i, (p, *_) in enumerate(STRICT)])
def test_request_models_are_strict(client, path, body, text):
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert text in message(r)


def test_integers_are_still_numbers(client):
    assert client.post("/v1/closeup", json={"vector": [1] * IMAGE_DIM, "k": 3}).status_code == 200


# ---- 1 and 3: a real server: keep-alive after a 500, slow bodies, idle connections ---------------


@contextlib.contextmanager
def live_server(app, **settings):
    """Run `app` under uvicorn with the service's settings on 127.0.0.1 (an ephemeral port)."""
    import uvicorn

    server = uvicorn.Server(serve.uvicorn_config(app, host="127.0.0.1", port=0, log_level="warning", **settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(15)


def test_the_connection_stays_open_after_a_500(world, monkeypatch):
    app = serve.create_app(world["model_dir"], world["root"], text_encoder=FakeTextEncoder())

    def broken(req):
        raise RuntimeError("a bug")

    monkeypatch.setattr(app.state.service, "search", broken)
    with live_server(app) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/search", body=json.dumps({"text": "chair"}), headers={"content-type": "application/json"})
        r = conn.getresponse()
        assert r.status == 500 and "internal error" in json.loads(r.read())["detail"]
        assert (r.getheader("connection") or "").lower() != "close"
        sock = conn.sock
        assert sock is not None
        conn.request("GET", "/healthz")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
        assert conn.sock is sock  # the same TCP connection answered
        conn.close()


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection; (bytes, seconds it took)."""
    start = time.monotonic()
    sock.settimeout(limit_s)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            raise AssertionError(f"the server held the connection for over {limit_s} s; got {data!r}") from None
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start


def test_a_body_shorter_than_its_content_length_times_out(world):
    app = serve.create_app(world["model_dir"], world["root"], text_encoder=FakeTextEncoder(), body_timeout_s=0.5)
    with live_server(app, keep_alive_s=1.0) as port:
        socks = []
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n" + b'{"text": "chair"')  # 16 of 1,000 bytes
            socks.append(s)
        for s in socks:
            data, seconds = read_until_closed(s, 10)
            assert data.startswith(b"HTTP/1.1 408"), data
            assert b"1000" in data and b"0.5" in data
            s.close()
        # A body that arrives in slow pieces, each within the timeout, is read in full.
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        body = json.dumps({"text": "chair", "k": 2}).encode()
        s.sendall(b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        for i in range(0, len(body), 10):
            time.sleep(0.2)
            s.sendall(body[i:i + 10])
        data, _ = read_until_closed(s, 10)
        assert data.startswith(b"HTTP/1.1 200"), data
        s.close()


def test_idle_keep_alive_connections_are_closed(world):
    app = serve.create_app(world["model_dir"], world["root"], text_encoder=FakeTextEncoder())
    with live_server(app, keep_alive_s=1.0) as port:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data, seconds = read_until_closed(s, 10)
        assert data.startswith(b"HTTP/1.1 200") and 0.5 < seconds < 5, (data, seconds)
        s.close()


# ---- 6. a reload to a named version survives a restart -------------------------------------------


def test_reload_persists_current_unless_asked_not_to(world, tmp_path):
    import shutil

    root = tmp_path / "index"
    shutil.copytree(world["root"], root)
    (root / "CURRENT").write_text("v1\n")
    app = serve.create_app(world["model_dir"], root, reload_token=TOKEN)
    with TestClient(app) as c:
        r = c.post("/admin/reload", json={"version": "v2", "persist": False}, headers=auth())
        assert r.status_code == 200 and r.json()["index_version"] == "v2"
        assert current_version(root).name == "v1"  # a trial swap: a restart serves v1 again
        r = c.post("/admin/reload", json={"version": "v2"}, headers=auth())
        assert r.status_code == 200 and r.json()["index_version"] == "v2"
    assert current_version(root).name == "v2"
    restarted = serve.create_app(world["model_dir"], root)
    with TestClient(restarted) as c:
        assert c.get("/readyz").json()["index_version"] == "v2"
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temp file left


# ---- fuzz: schemathesis over the OpenAPI schema, no response >= 500 ------------------------------


def fuzz(app, examples: int) -> dict[int, int]:
    """Drive `examples` schemathesis cases (valid and invalid, every operation) through the ASGI app."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    statuses: dict[int, int] = {}
    failures: list[str] = []

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=cases, with_token=st.booleans())
    def one(case, with_token):
        headers = dict(auth()) if with_token else {}
        response = case.call(headers=headers)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code >= 500 and len(failures) < 5:
            failures.append(f"{case.method} {case.path} {case.body!r:.300} -> {response.status_code} {response.text[:200]}")

    one()
    assert not failures, failures
    return statuses


def fuzz_app(world, tmp_path):
    import shutil

    root = tmp_path / "index"
    shutil.copytree(world["root"], root)  # reloads may move CURRENT: a copy keeps the module's world intact
    return serve.create_app(world["model_dir"], root, reload_token=TOKEN, max_k=50,
                            text_encoder=FakeTextEncoder(), image_encoder=FakeImageEncoder())


def test_fuzz_the_api_briefly(world, tmp_path):
    statuses = fuzz(fuzz_app(world, tmp_path), 100)
    assert sum(statuses.values()) >= 100 and not any(s >= 500 for s in statuses)
    assert statuses.get(200, 0) > 0 and statuses.get(422, 0) > 0  # both valid and invalid requests ran


@pytest.mark.slow
def test_fuzz_the_api_at_length(world, tmp_path, capsys):
    statuses = fuzz(fuzz_app(world, tmp_path), 6000)
    with capsys.disabled():
        print(f"\nfuzz: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= 5000 and not any(s >= 500 for s in statuses)
