"""`resnetlab serve` (issue 19): the Open Inference Protocol as tritonclient speaks it, the
image endpoint, batching, metrics, refusals (4xx, 503) and a fuzz run that leaves the server
answering correctly."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.client
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from resnetlab.cli import main
from resnetlab.deploy.predict import Predictor
from resnetlab.serve import Metrics, ServedModel, best_batch, build_app
from resnetlab.serve.batcher import Batcher, BatchStats
from resnetlab.serve.model import ThreadChoice

from .test_eval_predict import _image_files

Reply = tuple[int, dict[str, str], bytes]


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def serving(models: list[ServedModel], **kw: Any) -> Iterator[str]:
    """The app on a free loopback port, in a thread; yields "127.0.0.1:PORT". Torch's
    thread count, which served models choose per batch size, is restored afterwards."""
    threads = torch.get_num_threads()
    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(build_app(models, **kw), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
        torch.set_num_threads(threads)


def request(addr: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> Reply:
    conn = http.client.HTTPConnection(addr, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, dict[str, str]]:
    boundary = "resnetlab-test-boundary"
    parts = [(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
              f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
             + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {
        "content-type": f"multipart/form-data; boundary={boundary}"}


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model(run_dir: Path) -> ServedModel:
    return ServedModel("smoke", run_dir, "torch", "fp32", max_batch=8, max_wait_ms=20)


@pytest.fixture(scope="module")
def addr(model: ServedModel) -> Iterator[str]:
    with serving([model], max_body_mb=1) as a:
        yield a


def test_tritonclient_speaks_to_the_server(addr: str, model: ServedModel,
                                           run_dir: Path) -> None:
    """A client library written for the Open Inference Protocol, not our own requests:
    metadata, readiness, and infer in binary and JSON tensors, equal to the model's logits."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(addr)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("smoke")
    meta = client.get_model_metadata("smoke")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {
        "logits": [-1, 10], "probabilities": [-1, 10]}
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    want = model.forward(x)
    for binary in (True, False):
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        outs = [triton.InferRequestedOutput(n, binary_data=binary)
                for n in ("logits", "probabilities")]
        res = client.infer("smoke", [inp], outputs=outs, request_id="r1")
        np.testing.assert_allclose(res.as_numpy("logits"), want, rtol=1e-5, atol=1e-5)
        probs = res.as_numpy("probabilities")
        np.testing.assert_allclose(probs, torch.from_numpy(want).softmax(1).numpy(), atol=1e-6)
        assert res.get_response()["id"] == "r1"
    # A version named, as tritonclient's model_version= sends it; a compressed body.
    assert client.is_model_ready("smoke", "1")
    assert client.get_model_metadata("smoke", "1")["name"] == "smoke"
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    for compression in (None, "gzip", "deflate"):
        res = client.infer("smoke", [inp], model_version="1",
                           request_compression_algorithm=compression)
        np.testing.assert_allclose(res.as_numpy("logits"), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(triton.InferenceServerException, match="unknown model 'nope'"):
        client.get_model_metadata("nope")
    client.close()


def test_predict_endpoint_agrees_with_predict(addr: str, run_dir: Path,
                                              tmp_path: Path) -> None:
    """Multipart files and a raw body get what `resnetlab predict` gives the same files:
    the same decoding (CMYK, 16-bit, EXIF, alpha...) and preprocessing."""
    files = _image_files(tmp_path)
    want = Predictor(run_dir, "torch", "fp32").predict([str(p) for p in files.values()], 3)
    body, headers = multipart([(n, p.read_bytes()) for n, p in files.items()])
    status, _, out = request(addr, "POST", "/v1/predict?topk=3", body, headers)
    assert status == 200, out
    got = json.loads(out)
    assert [p["file"] for p in got["predictions"]] == list(files)
    for pred, ref in zip(got["predictions"], want, strict=True):
        assert [t["label"] for t in pred["top"]] == ref.labels  # type: ignore[union-attr]
        assert [t["prob"] for t in pred["top"]] == pytest.approx(ref.probs, abs=1e-5)  # type: ignore[union-attr]
    assert got["latency_ms"]["total"] >= got["latency_ms"]["inference"] > 0
    status, _, out = request(addr, "POST", "/v1/predict", files["rgb.jpg"].read_bytes(),
                             {"content-type": "image/jpeg"})
    assert status == 200 and json.loads(out)["predictions"][0]["top"][0]["label"] == \
        want[0].labels[0]  # type: ignore[union-attr]


def _bad_requests(tmp_path: Path) -> list[tuple[str, str, bytes, dict[str, str], int, str]]:
    good = png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)))
    bomb = tmp_path / "bomb.png"
    Image.new("1", (30000, 30000)).save(bomb)
    v2 = "/v2/models/smoke/infer"

    def infer(shape: list[int], dtype: str = "FP32", data: Any = None) -> bytes:
        n = int(np.prod(shape)) if all(isinstance(d, int) and d > 0 for d in shape) else 1
        return json.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": dtype,
                                       "data": [0.0] * n if data is None else data}]}).encode()

    img = {"content-type": "image/png"}
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 8}}]}).encode()
    gz = {"content-encoding": "gzip", "content-type": "image/png"}
    return [
        ("/v1/predict", "POST", b"not an image", img, 400, "not a recognised image format"),
        ("/v1/predict", "POST", good[:len(good) // 2], img, 400, "truncated"),
        ("/v1/predict", "POST", b"", img, 400, "no image"),
        ("/v1/predict", "POST", bomb.read_bytes(), img, 400, "decompression bomb"),
        ("/v1/predict", "POST", b"\0" * (2 << 20), img, 413, "over the limit"),
        ("/v1/predict?topk=x", "POST", good, img, 400, "topk"),
        ("/v1/predict?topk=%C2%B2", "POST", good, img, 400, "topk"),  # '²' is a digit
        ("/v1/predict", "POST", gzip.compress(b"\0" * (2 << 20)), gz, 413, "decompressed"),
        ("/v1/predict", "POST", gzip.compress(good)[:-20], gz, 400, "truncated"),
        ("/v1/predict", "POST", good, {"content-encoding": "br"}, 415, "'br'"),
        ("/v1/predict?model=nope", "POST", good, img, 404, "unknown model"),
        ("/v1/predict", "POST", b"--x\r\nbroken", {"content-type": "multipart/form-data; "
                                                    "boundary=x"}, 400, "image"),
        (v2, "POST", infer([1, 3, 28, 28]), {}, 400, "shape must be [N, 1, 28, 28]"),
        (v2, "POST", infer([1, 1, 28, 28], "INT64"), {}, 400, "datatype must be FP32"),
        (v2, "POST", infer([1, 1, 28, 28], data=[1.0] * 5), {}, 400, "has 5"),
        (v2, "POST", infer([1, 1, 28, 28], data=["a"] * 784), {}, 400, "float32 numbers"),
        (v2, "POST", infer([1, 1, 28, 28]).replace(b"0.0", b"1" + b"0" * 400, 1), {}, 400,
         "float32 numbers"),
        (v2, "POST", b"[" * 100_000, {}, 400, "nested too deeply"),
        (v2, "POST", infer([0, 1, 28, 28]), {}, 400, "1 to"),
        (v2, "POST", infer([1, 1, 28, 28]).replace(b"0.0", b"NaN", 1), {}, 400, "NaN"),
        (v2, "POST", b"{", {}, 400, "not valid JSON"),
        (v2, "POST", b"[]", {}, 400, "JSON object"),
        (v2, "POST", infer([1, 1, 28, 28]), {"inference-header-content-length": "99999"},
         400, "outside the body"),
        (v2, "POST", json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28],
                                             "datatype": "FP32",
                                             "parameters": {"binary_data_size": 8}}]}).encode()
         + b"\0" * 8, {"inference-header-content-length": "0"}, 400, "JSON"),
        (v2, "POST", head + b"\0" * 8, {"inference-header-content-length": str(len(head))},
         400, "binary_data_size is 8"),
        ("/v2/models/smoke/versions/2/infer", "POST", infer([1, 1, 28, 28]), {}, 404,
         "version 1 only"),
        ("/v2/models/nope/infer", "POST", infer([1, 1, 28, 28]), {}, 404, "unknown model"),
        ("/v2/models/smoke/infer", "GET", b"", {}, 405, "GET"),
        ("/nowhere", "GET", b"", {}, 404, "no such route"),
    ]


def test_every_bad_request_is_a_4xx_naming_the_problem(addr: str, tmp_path: Path) -> None:
    for path, method, body, headers, status, words in _bad_requests(tmp_path):
        got, hdrs, out = request(addr, method, path, body, headers)
        assert got == status, (path, body[:40], out)
        assert hdrs["content-type"] == "application/json"
        assert words in json.loads(out)["error"], (path, out)
        if status == 405:
            assert "POST" in hdrs["allow"]
    assert request(addr, "GET", "/v2/health/live")[0] == 200


def test_json_beyond_its_limit_is_refused_before_it_is_parsed() -> None:
    """json.loads holds the event loop; a body of JSON floats larger than JSON_LIMIT is
    refused with 413 pointing at binary data, before any parsing (garbage would not parse)."""
    from resnetlab.serve.v2 import JSON_LIMIT, ProtocolError, Signature, parse_infer

    with pytest.raises(ProtocolError, match="binary data") as refused:
        parse_infer(b"x" * (JSON_LIMIT + 1), None, Signature((1, 28, 28), 10), 256)
    assert refused.value.status == 413
    with pytest.raises(ProtocolError, match="not valid JSON"):
        parse_infer(b"x" * JSON_LIMIT, None, Signature((1, 28, 28), 10), 256)


def _infer(addr: str, x: np.ndarray) -> np.ndarray:
    """The logits of one (1, C, H, W) input, sent as JSON data to /v2."""
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape),
                                   "datatype": "FP32", "data": x.ravel().tolist()}]}).encode()
    status, _, out = request(addr, "POST", "/v2/models/smoke/infer", body)
    assert status == 200, out
    return np.array(next(o for o in json.loads(out)["outputs"] if o["name"] == "logits")["data"])


def _ok(addr: str, model: ServedModel) -> None:
    """The server still answers a good request with the model's own logits."""
    x = np.ones((1, 1, 28, 28), np.float32)
    np.testing.assert_allclose(_infer(addr, x), model.forward(x)[0], rtol=1e-5, atol=1e-5)


def test_model_metadata_says_how_to_preprocess(addr: str, model: ServedModel,
                                                run_dir: Path) -> None:
    """The v2 metadata's parameters are the weights' own preprocessing (pretrained_cfg, the
    statistics of the run's training data): an image normalised by them alone, as
    docs/serving.md shows, gets the logits /v1/predict's preprocessing gives, where [0, 1]
    pixels do not."""
    from resnetlab.models.factory import load_model
    from resnetlab.runs import weights_dir

    p = json.loads(request(addr, "GET", "/v2/models/smoke")[2])["parameters"]
    assert all(isinstance(v, str | int | float | bool) for v in p.values())  # the protocol's
    cfg = load_model(weights_dir(run_dir)).pretrained_cfg
    mean, std = json.loads(p["mean"]), json.loads(p["std"])
    assert (mean, std) == (list(cfg["mean"]), list(cfg["std"]))
    assert (mean, std) == model.predictor.normalize.as_lists()  # what /v1/predict applies
    assert (1, p["input_size"], p["input_size"]) == cfg["input_size"]
    assert (p["crop_pct"], p["interpolation"]) == (cfg["crop_pct"], cfg["interpolation"])
    assert (p["layout"], p["datatype"], p["color"], p["pixel_range"]) == (
        "NCHW", "FP32", "L", "0-255")

    pixels = np.random.default_rng(5).integers(0, 256, (28, 28), np.uint8)
    want = model.forward(model.preprocess(png(Image.fromarray(pixels)), "x.png"))[0]
    chw = np.atleast_3d(pixels).transpose(2, 0, 1) / 255
    m, s = np.array(mean).reshape(-1, 1, 1), np.array(std).reshape(-1, 1, 1)
    x = ((chw - m) / s)[None].astype(np.float32)
    np.testing.assert_allclose(_infer(addr, x), want, rtol=1e-4, atol=1e-4)
    raw = _infer(addr, chw[None].astype(np.float32))  # what the client sent
    assert np.abs(raw - want).max() > 0.1


_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() |
                            st.text(max_size=8), lambda c: st.lists(c, max_size=4) |
                            st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
_bodies = st.one_of(
    st.binary(max_size=2048),
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"inputs": st.lists(st.fixed_dictionaries({
        "name": st.sampled_from(["input", "x"]),
        "shape": st.lists(st.integers(-2, 40), max_size=5),
        "datatype": st.sampled_from(["FP32", "FP16", "BYTES"]),
        "data": st.lists(st.floats(width=32), max_size=40)}), max_size=2),
        "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(
            ["logits", "probabilities", "other"])}), max_size=2)}).map(
        lambda v: json.dumps(v).encode()))
_headers = st.dictionaries(st.sampled_from(["content-type", "inference-header-content-length",
                                            "content-encoding"]),
                           st.text(st.characters(min_codepoint=33, max_codepoint=126),
                                   max_size=20), max_size=3)


@settings(max_examples=150, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=st.sampled_from(["/v2/models/smoke/infer", "/v1/predict", "/v1/predict?topk=2"]),
       body=_bodies, headers=_headers)
def test_fuzzed_bodies_and_headers_never_get_a_500(addr: str, path: str, body: bytes,
                                                   headers: dict[str, str]) -> None:
    _refused_cleanly(addr, path, body, headers)


def _refused_cleanly(addr: str, path: str, body: bytes, headers: dict[str, str]) -> None:
    status, hdrs, out = request(addr, "POST", path, body, headers)
    assert status < 500, (status, out)
    if status >= 400:
        assert hdrs["content-type"] == "application/json" and "error" in json.loads(out)


def test_the_server_answers_correctly_after_the_fuzz_run(addr: str, model: ServedModel,
                                                         tmp_path: Path) -> None:
    """Whatever ran before: its own bad requests first (every hand-written one, then 40
    fuzzed ones drawn the same way on every run), then a good request."""
    for path, method, body, headers, status, _ in _bad_requests(tmp_path):
        assert request(addr, method, path, body, headers)[0] == status, (path, body[:40])

    @settings(max_examples=40, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(path=st.sampled_from(["/v2/models/smoke/infer", "/v1/predict"]), body=_bodies,
           headers=_headers)
    def fuzz(path: str, body: bytes, headers: dict[str, str]) -> None:
        _refused_cleanly(addr, path, body, headers)

    fuzz()
    _ok(addr, model)


def test_concurrent_requests_share_batches_and_metrics_count_them(run_dir: Path) -> None:
    model = ServedModel("smoke", run_dir, "torch", "fp32", max_batch=16, max_wait_ms=50,
                        probe=False)
    metrics = Metrics()
    x = np.zeros((1, 1, 28, 28), np.float32)
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28],
                                   "datatype": "FP32", "data": x.ravel().tolist()}]}).encode()
    with serving([model], metrics=metrics) as a, ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: request(a, "POST", "/v2/models/smoke/infer", body),
                                range(32)))
        assert [r[0] for r in replies] == [200] * 32
        request(a, "POST", "/v1/predict", b"junk", {"content-type": "image/png"})
        text = request(a, "GET", "/metrics")[2].decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("resnetlab_requests_total", (("code", "200"), ("endpoint", "v2_infer")))] \
        == 32
    assert samples[("resnetlab_errors_total", (("kind", "bad_image"),))] == 1
    batches = samples[("resnetlab_batch_size_count", (("model", "smoke"),))]
    images = samples[("resnetlab_batch_size_sum", (("model", "smoke"),))]
    assert images == 32 and batches < 32  # some requests shared a forward pass
    assert samples[("resnetlab_queue_depth", (("model", "smoke"),))] == 0
    assert samples[("resnetlab_request_seconds_count", (("endpoint", "v2_infer"),))] == 32


def test_a_request_beyond_max_batch_runs_in_passes_of_max_batch() -> None:
    """10 images at max_batch 4: passes of 4, 4 and 2, and the outputs in request order."""
    sizes: list[int] = []

    async def one_request() -> np.ndarray:
        batcher = Batcher(lambda x: x.reshape(len(x), -1)[:, :1].copy(), max_batch=4,
                          stats=BatchStats(on_batch=sizes.append))
        batcher.start()
        try:
            return await batcher.submit(np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1))
        finally:
            await batcher.stop()

    out = asyncio.run(one_request())
    assert sizes == [4, 4, 2]
    assert out.ravel().tolist() == list(range(10))


def test_two_models_never_run_their_passes_at_once(run_dir: Path) -> None:
    """Each pass uses every core: two models of one server take turns."""
    models = [ServedModel(n, run_dir, "torch", "fp32", max_batch=1, probe=False, threads=1)
              for n in ("a", "b")]
    running, most = 0, 0
    lock = threading.Lock()
    for m in models:
        def forward(x: np.ndarray, inner: Any = m.batcher.forward) -> np.ndarray:
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)
            time.sleep(0.02)
            with lock:
                running -= 1
            return inner(x)
        m.batcher.forward = forward
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28],
                                   "datatype": "FP32", "data": [0.0] * 784}]}).encode()
    with serving(models) as a, ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: request(a, "POST", f"/v2/models/{'ab'[i % 2]}/infer",
                                                body)[0], range(16)))
    assert codes == [200] * 16 and most == 1


def test_a_batch_waits_only_for_the_clients_that_are_about() -> None:
    """8 clients, each sending its next request once answered: every batch holds all 8, and
    none waits out max_wait_ms for a 9th that never comes (with the 60 s wait, one such wait
    would run past the 10 s bound)."""
    sizes: list[int] = []

    async def clients() -> None:
        batcher = Batcher(lambda x: np.zeros((len(x), 2), np.float32), max_batch=32,
                          max_wait_ms=60_000, stats=BatchStats(on_batch=sizes.append))
        batcher.start()

        async def client() -> None:
            for _ in range(20):
                out = await batcher.submit(np.zeros((1, 1, 2, 2), np.float32))
                assert out.shape == (1, 2)

        try:
            await asyncio.wait_for(asyncio.gather(*(client() for _ in range(8))), 10)
        finally:
            await batcher.stop()

    asyncio.run(clients())
    assert sizes == [8] * 20


def test_served_batches_choose_their_thread_count(run_dir: Path) -> None:
    model = ServedModel("smoke", run_dir, "torch", "fp32", max_batch=4, probe=False)
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                   "data": [0.0] * 784}]}).encode()
    with serving([model]) as a:
        assert request(a, "GET", "/v1/models")[2] and model.threads_info() == "choosing"
        for _ in range(16):  # one client: batches of one, 8 tries of each option
            assert request(a, "POST", "/v2/models/smoke/infer", body)[0] == 200
        shown = json.loads(request(a, "GET", "/v1/models")[2])[0]["threads"]
    assert list(shown) == ["<=1"] and shown["<=1"] in (1, torch.get_num_threads())


def test_a_full_queue_answers_503_with_retry_after(run_dir: Path) -> None:
    model = ServedModel("smoke", run_dir, "torch", "fp32", max_batch=1, max_wait_ms=0,
                        max_queue=2, probe=False)
    forward = model.batcher.forward
    model.batcher.forward = lambda x: (time.sleep(0.2), forward(x))[1]
    x = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                "data": [0.0] * 784}]}).encode()
    with serving([model]) as a, ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda _: request(a, "POST", "/v2/models/smoke/infer", x),
                                range(12)))
    codes = sorted(r[0] for r in replies)
    assert set(codes) == {200, 503} and codes.count(200) >= 2
    for status, headers, out in replies:
        if status == 503:
            assert headers["retry-after"] == "1" and "busy" in json.loads(out)["error"]


def test_best_batch_measures_every_size_up_to_the_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a clock that only the forward passes move (a loaded machine's wake-ups would
    decide between sizes 5% apart), so each rate is the pass's nominal cost."""
    from resnetlab.serve import model as served

    class Clock:
        now = 0.0

        def perf_counter(self) -> float:
            return self.now

    clock, calls = Clock(), []
    monkeypatch.setattr(served, "time", clock)

    def forward(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        clock.now += 0.001 * (1 + (len(x) > 4) * len(x))  # sizes above 4 cost per image
        return x

    size, rates = best_batch(forward, (1, 2, 2), 12, seconds=0.01)
    assert list(rates) == [1, 2, 4, 8, 12] and set(calls) == {1, 2, 4, 8, 12}
    assert rates[4] == pytest.approx(4 / 0.001) and rates[8] == pytest.approx(8 / 0.009)
    assert size == 4  # the fastest per image here
    # Where sizes run about as fast per image, the largest is served: passes inside the
    # server pay per-pass costs that the timing loop does not see.

    def per_image(x: np.ndarray) -> None:
        clock.now += 0.002 * len(x)

    size, _ = best_batch(per_image, (1, 2, 2), 12, seconds=0.01)
    assert size == 12


def test_thread_choice_tries_both_then_keeps_the_faster_per_batch_size() -> None:
    choice = ThreadChoice(cores=2, trials=3)
    # batch 1 runs faster on one thread, batches of 5..8 on two (as resnet20 served here)
    cost = {(1, 1): 2.0, (1, 2): 4.0, (8, 1): 8.0, (8, 2): 5.0}
    tried: list[tuple[int, int]] = []
    for _ in range(6):
        for n in (1, 6):
            t = choice.pick(n)
            tried.append((n, t))
            choice.record(n, t, cost[(ThreadChoice.size_class(n), t)])
    assert sorted(tried) == sorted([(1, 1), (1, 2), (6, 1), (6, 2)] * 3)  # alternated
    assert choice.chosen == {1: 1, 8: 2}
    assert [choice.pick(n) for n in (1, 5, 8)] == [1, 2, 2]
    assert ThreadChoice(cores=1).pick(4) == 1  # one core: nothing to choose


def _infer_once(addr: str, body: bytes) -> str:
    """'ok' (a whole, correct response), 'refused' (no connection, or closed before a byte
    of response came back) or 'truncated' (a response cut short): never the last."""
    conn = http.client.HTTPConnection(addr, timeout=30)
    try:
        try:
            conn.request("POST", "/v2/models/smoke/infer", body)
            r = conn.getresponse()  # RemoteDisconnected: closed before a status line
        except (ConnectionRefusedError, BrokenPipeError, ConnectionResetError,
                http.client.RemoteDisconnected):
            return "refused"
        try:
            status, out = r.status, r.read()
        except (http.client.IncompleteRead, ConnectionResetError):
            return "truncated"
    finally:
        conn.close()
    reply = json.loads(out)  # a cut body would not parse
    if status != 200:
        return f"status {status}: {reply}"
    return "ok" if len(reply["outputs"][0]["data"]) == 10 else f"wrong outputs: {reply}"


def test_sigterm_finishes_in_flight_requests_and_exits_0(run_dir: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    addr = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnetlab", "serve", f"smoke={run_dir}", "--port", str(port),
         "--backend", "torch", "--precision", "fp32", "--no-batch-probe",
         "--max-wait-ms", "20"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()  # type: ignore[union-attr]
            try:
                if request(addr, "GET", "/v2/health/ready")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28],
                                       "datatype": "FP32", "data": [0.5] * 784}]}).encode()
        stop = time.monotonic() + 0.5
        outcomes: list[str] = []

        def client() -> None:
            while time.monotonic() < stop + 1.5:
                outcomes.append(_infer_once(addr, body))
                if outcomes[-1] == "refused" and time.monotonic() > stop:
                    return

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client) for _ in range(8)]
            time.sleep(stop - time.monotonic())
            proc.send_signal(signal.SIGTERM)
            for f in futures:
                f.result()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = proc.stdout.read().decode()  # type: ignore[union-attr]
    assert outcomes.count("ok") > 8 and "refused" in outcomes, outcomes
    assert set(outcomes) <= {"ok", "refused"}, outcomes
    assert f"serving at http://{addr}/ (page)" in out and "stopped" in out, out


def test_a_busy_port_is_a_one_line_error_and_nothing_is_announced(
        run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from resnetlab.cli import main

    with socket.socket() as busy:  # another server on the port, bound as uvicorn binds
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", f"smoke={run_dir}", "--port", str(port), "--backend", "torch",
                     "--precision", "fp32", "--no-batch-probe"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""  # not "serving at", nor the model it would have loaded
    assert err.count("\n") == 1 and f"port {port} on 127.0.0.1 is already in use" in err
    assert "choose another --port" in err
    # getaddrinfo wraps a port past 65535 round (70000 is 4464): refused, not served there
    assert main(["serve", f"smoke={run_dir}", "--port", "70000"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == "error: --port 70000: ports go up to 65535"


def chrome(width: int = 1280, height: int = 900) -> Any:
    """Debian's chromium, headless, through its chromedriver: nothing is downloaded."""
    import os
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver, "the browser test needs Debian's chromium and chromium-driver " \
        "(make test installs them with apt)"
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not fetch a browser
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(driver))


def test_the_page_classifies_an_uploaded_image_in_a_real_browser(
        addr: str, run_dir: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "shirt.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (28, 28), np.uint8)).save(image)
    want = Predictor(run_dir, "torch", "fp32").predict([str(image)], 5)[0]
    driver = chrome()
    try:
        driver.get(f"http://{addr}/")
        wait = WebDriverWait(driver, 30)
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "ready"))
        about = driver.find_element(By.ID, "about").text
        assert "resnet8" in about and "test accuracy" in about
        assert len(driver.find_elements(By.CSS_SELECTOR, "table.cm tr")) == 11  # header + 10
        assert driver.find_elements(By.CSS_SELECTOR, "#about svg path")  # the curves
        driver.find_element(By.ID, "files").send_keys(str(image))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".row.top")) == 5)
        labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".row.top .label")]
        probs = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".row.top .prob")]
        assert labels == want.labels  # type: ignore[union-attr]
        assert probs == [f"{100 * p:.1f}%" for p in want.probs]  # type: ignore[union-attr]
        assert "ms inference" in driver.find_element(By.CSS_SELECTOR, ".result").text
        shot = tmp_path / "page.png"
        driver.save_screenshot(str(shot))
        with Image.open(shot) as im:
            assert im.size[0] >= 1000
    finally:
        driver.quit()


def test_models_are_named_after_their_runs_or_as_told(run_dir: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    from resnetlab.cli.serve import model_name

    assert model_name(str(run_dir)) == (run_dir.name, str(run_dir))
    assert model_name(str(run_dir / "final")) == (run_dir.name, str(run_dir / "final"))
    assert model_name(f"my model={run_dir}") == ("my-model", str(run_dir))
    with pytest.raises(ValueError, match="names must differ"):
        m = ServedModel("a", run_dir, "torch", "fp32", probe=False)
        build_app([m, m])
    # The CLI says so before it binds a port or loads a model.
    assert main(["serve", str(run_dir), str(run_dir / "final"), "--port", "1"]) == 2
    assert f"two models would be served as {run_dir.name}" in capsys.readouterr().err


def test_the_bench_client_reads_statuses_and_reconnects(addr: str) -> None:
    """bench serve's load generator: each reply's status over one keep-alive connection,
    and an OSError (counted as an error) when the connection fails, then a new one."""
    from resnetlab.benchmarks.serve import Connection, infer_body

    body, headers = infer_body((1, 28, 28))
    good = Connection(addr, "/v2/models/smoke/infer", body, headers)
    bad = Connection(addr, "/v2/models/nobody/infer", body, headers)
    assert [good.call(), bad.call(), good.call()] == [200, 404, 200]
    sock = good.sock
    assert sock is not None
    sock.shutdown(socket.SHUT_WR)  # as if the server had gone: the reply never comes
    with pytest.raises(OSError):
        good.call()
    assert good.sock is None and good.call() == 200  # reconnected
    good.close()
    bad.close()


@pytest.mark.slow  # 27 s on 2 cores: `make test-slow`
def test_bench_serve_compares_batched_naive_and_bare(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`resnetlab bench serve` end to end at toy size: both servers answer every request,
    stop with exit 0 on SIGTERM, and the table holds each ratio the docs quote."""
    from resnetlab.benchmarks import serve as bench

    out = tmp_path / "serve.json"
    code = bench.main(["--models", "resnet20", "--clients", "1", "4", "--requests", "24",
                       "--seconds", "10", "--soak", "40", "--max-batch", "4",
                       "--json", str(out)])
    res = json.loads(out.read_text())["models"]["resnet20"]
    kinds = ("batched", "naive", "naive-default")
    assert code == 0 and [res[k]["exit_code"] for k in kinds] == [0, 0, 0]
    for kind in kinds:
        assert [(lv["clients"], lv["requests"], lv["errors"]) for lv in res[kind]["levels"]] \
            == [(1, 24, 0), (4, 24, 0)]
    assert res["batched"]["soak"]["requests"] == 40 and res["batched"]["soak"]["errors"] == 0
    assert res["naive-default"]["threads"] == torch.get_num_threads()  # as told: untuned
    assert list(res["naive"]["threads"]) == ["<=1"]  # batches of one, chosen by now
    assert sorted(res["bare"]["rates"], key=int) == ["1", "2", "4"]
    table = capsys.readouterr().out
    assert "(batched/naive)" in table and "(batched/it)" in table and "p50/bare b1" in table
    assert table.count("| resnet20") == 2
