"""The HTTP service: the Open Inference Protocol, a plain image endpoint, metrics, a web page.

Starlette routes the requests and uvicorn serves them (cli/serve.py); the batcher gathers
concurrent requests into one forward pass. Every request the service refuses gets a 4xx
(or 503 when overloaded) JSON body `{"error": ...}` naming the problem, the shape the
Open Inference Protocol gives its errors; no request can stop the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..data.images import ImageError
from .batcher import BatchStats, Overloaded
from .model import ServedModel
from .v2 import HEADER, VERSION, ProtocolError, encode_response, parse_infer

MB = 1 << 20
LATENCY_BUCKETS = (.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("resnetlab_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "code"], registry=r)
        self.errors = Counter("resnetlab_errors", "Refused or failed requests by kind",
                              ["kind"], registry=r)
        self.latency = Histogram("resnetlab_request_seconds", "Request latency",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("resnetlab_batch_size", "Images per forward pass", ["model"],
                               buckets=BATCH_BUCKETS, registry=r)
        self.queue = Gauge("resnetlab_queue_depth", "Images waiting for a forward pass",
                           ["model"], registry=r)

    def stats(self, model: str) -> BatchStats:
        return BatchStats(self.batch.labels(model).observe, self.queue.labels(model).set)


def endpoint(path: str) -> str:
    """A bounded label for a request path (model names and typos do not grow the metrics)."""
    if path.startswith("/v2/models/"):
        return "v2_infer" if path.endswith("/infer") else "v2_model"
    if path.startswith("/v2"):
        return "v2_health" if "/health/" in path else "v2_server"
    return {"/": "page", "/v1/predict": "v1_predict", "/v1/models": "v1_models",
            "/metrics": "metrics"}.get(path, "other")


class MetricsMiddleware:
    """Counts and times every HTTP request, whatever its outcome."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status, start = 500, time.perf_counter()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            name = endpoint(scope["path"])
            self.metrics.latency.labels(name).observe(time.perf_counter() - start)
            self.metrics.requests.labels(name, str(status)).inc()


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, decompressed where the client compressed it (tritonclient's
    `request_compression_algorithm`), refused with 413 as soon as it is known to pass
    `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ProtocolError(f"Content-Length must be a number of bytes, got {declared!r}")
        if int(declared) > limit:
            raise ProtocolError(f"the body's {int(declared):,} bytes are over the limit of "
                                f"{limit:,} (--max-body-mb)", 413, "too_large")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "deflate"):
        raise ProtocolError(f"Content-Encoding {encoding!r} is not accepted: send the body "
                            "uncompressed, or as gzip or deflate", 415, "encoding")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(f"the body is over the limit of {limit:,} bytes "
                                    "(--max-body-mb)", 413, "too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # nobody hears the answer; it only keeps the log clean
        raise ProtocolError("the client went away during the upload", 400,
                            "disconnected") from None
    body = b"".join(chunks)
    return body if encoding == "identity" else _inflate(body, encoding, limit)


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or zlib-wrapped deflate body, refused with 413 once past `limit` bytes (a
    small compressed body can inflate to gigabytes)."""
    inflater = zlib.decompressobj(wbits=32 + zlib.MAX_WBITS)  # either header, told apart
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise ProtocolError(f"the body is not valid {encoding} data ({e})") from None
    if len(out) > limit:
        raise ProtocolError(f"the body, decompressed, is over the limit of {limit:,} bytes "
                            "(--max-body-mb)", 413, "too_large")
    if not inflater.eof:
        raise ProtocolError(f"the {encoding} body is truncated")
    return out


async def uploads(request: Request, body: bytes, max_files: int) -> list[tuple[str, bytes]]:
    """The images of a /v1/predict body: multipart form files, or the body itself."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        return [("body", body)] if body else []

    async def once() -> AsyncGenerator[bytes, None]:
        yield body

    try:
        form = await MultiPartParser(request.headers, once(), max_files=max_files,
                                     max_fields=max_files).parse()
    except MultiPartException as e:
        raise ProtocolError(f"unreadable multipart body ({e.message})") from None
    files = []
    try:
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((value.filename or "upload", await value.read()))
    finally:
        await form.close()
    return files


class Service:
    """The models and the limits of one server."""

    def __init__(self, models: Sequence[ServedModel], metrics: Metrics,
                 max_body_mb: float = 32.0, topk: int = 5) -> None:
        self.models = {m.name: m for m in models}
        self.metrics, self.limit, self.topk = metrics, int(max_body_mb * MB), topk
        self.ready = False
        self._info: dict[str, dict[str, Any]] = {}

    def model(self, name: str | None, version: str | None = None) -> ServedModel:
        if name is None:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise ProtocolError(f"unknown model {name!r}; this server has "
                                f"{', '.join(self.models)}", 404, "unknown_model")
        if version not in (None, VERSION):
            raise ProtocolError(f"model {name!r} has version {VERSION} only, not {version!r}",
                                404, "unknown_model")
        return self.models[name]

    def asked(self, request: Request) -> ServedModel:
        """The model of a /v2/models/{name}[/versions/{version}] route."""
        return self.model(request.path_params["name"], request.path_params.get("version"))

    def info(self, name: str) -> dict[str, Any]:
        """The model panel: read from the run once; the thread choice as it stands now."""
        if name not in self._info:
            self._info[name] = self.models[name].info()
        return {**self._info[name], "threads": self.models[name].threads_info()}

    # -- Open Inference Protocol -------------------------------------------------------------
    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": "resnetlab", "version": __version__,
                             "extensions": ["binary_tensor_data"]})

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def health_ready(self, request: Request) -> Response:
        return JSONResponse({"ready": self.ready}, 200 if self.ready else 503)

    async def model_metadata(self, request: Request) -> Response:
        m = self.asked(request)
        return JSONResponse(m.signature.metadata(m.name, m.platform, m.preprocessing))

    async def model_ready(self, request: Request) -> Response:
        m = self.asked(request)
        return JSONResponse({"name": m.name, "ready": self.ready}, 200 if self.ready else 503)

    async def infer(self, request: Request) -> Response:
        m = self.asked(request)
        body = await read_body(request, self.limit)
        req = parse_infer(body, request.headers.get(HEADER), m.signature, m.batcher.max_queue)
        logits = await m.batcher.submit(req.images)
        content, headers = encode_response(m.name, req, logits)
        return Response(content, headers=headers)

    # -- plain images --------------------------------------------------------------------------
    async def predict(self, request: Request) -> Response:
        start = time.perf_counter()
        m = self.model(request.query_params.get("model"))
        k = request.query_params.get("topk", str(self.topk))
        if not (k.isascii() and k.isdigit() and len(k) < 10 and int(k) >= 1):
            raise ProtocolError(f"topk must be a positive integer, got {k!r}")
        body = await read_body(request, self.limit)
        files = await uploads(request, body, m.batcher.max_queue)
        if not files:
            raise ProtocolError("no image: send image files as multipart/form-data, or one "
                                "image as the body")
        images = [await run_in_threadpool(m.preprocess, data, name) for name, data in files]
        queued = time.perf_counter()
        logits = await m.batcher.submit(np.concatenate(images))
        done = time.perf_counter()
        return JSONResponse({
            "model": m.name,
            "predictions": [{"file": name, "top": m.top(row, int(k))}
                            for (name, _), row in zip(files, logits, strict=True)],
            "latency_ms": {"decode": round(1000 * (queued - start), 2),
                           "inference": round(1000 * (done - queued), 2),
                           "total": round(1000 * (done - start), 2)}})

    async def models_info(self, request: Request) -> Response:
        return JSONResponse([self.info(n) for n in self.models])

    async def scrape(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry),
                        headers={"content-type": CONTENT_TYPE_LATEST})

    async def page(self, request: Request) -> Response:
        return HTMLResponse(resources.files(__package__).joinpath("page.html").read_text())

    # -- errors ------------------------------------------------------------------------------
    def refuse(self, kind: str, status: int, message: str,
               headers: dict[str, str] | None = None) -> JSONResponse:
        self.metrics.errors.labels(kind).inc()
        return error(status, message, headers)

    async def on_protocol(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProtocolError)
        return self.refuse(exc.kind, exc.status, str(exc))

    async def on_image(self, request: Request, exc: Exception) -> Response:
        return self.refuse("bad_image", 400, str(exc))

    async def on_overload(self, request: Request, exc: Exception) -> Response:
        return self.refuse("overloaded", 503, f"the server is busy: {exc}; retry shortly",
                           {"retry-after": "1"})

    async def on_http(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        what = "no such route" if exc.status_code == 404 else exc.detail
        return self.refuse("route", exc.status_code,
                           f"{what}: {request.method} {request.url.path} (see GET / and /v2)",
                           dict(exc.headers or {}))  # a 405's Allow

    async def on_internal(self, request: Request, exc: Exception) -> Response:
        return self.refuse("internal", 500, f"internal error ({type(exc).__name__}); the "
                           "server goes on, and its log has the traceback")

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        for m in self.models.values():
            m.batcher.start()
        self.ready = True
        try:
            yield
        finally:
            self.ready = False
            await asyncio.gather(*(m.batcher.stop() for m in self.models.values()))


def build_app(models: Sequence[ServedModel], metrics: Metrics | None = None,
              max_body_mb: float = 32.0, topk: int = 5) -> Starlette:
    """The ASGI app serving `models`: what `resnetlab serve` runs under uvicorn.

    Args:
        models: the models to serve, each under its own name; the first is
            `/v1/predict`'s default.
        metrics: where the Prometheus metrics of `/metrics` are kept; None: a new set.
        max_body_mb: the largest request body accepted (larger: 413).
        topk: classes `/v1/predict` answers with by default.

    Returns:
        A Starlette app with the Open Inference Protocol at `/v2`, `/v1/predict`,
        `/metrics` and the web page at `/`.

    Raises:
        ValueError: no models, or two with the same name.

    Examples:
        >>> from resnetlab.serve import ServedModel, build_app
        >>> app = build_app([ServedModel("demo", "runs/demo")])  # doctest: +SKIP
        >>> # then: uvicorn.run(app), or `resnetlab serve runs/demo`
    """
    if not models:
        raise ValueError("a server needs at least one model")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must differ, got {names}")
    metrics = metrics or Metrics()
    inference = ThreadPoolExecutor(1, thread_name_prefix="inference")
    for m in models:
        m.batcher.stats = metrics.stats(m.name)
        m.batcher.pool = inference  # one pass at a time, whichever model it is for
    s = Service(models, metrics, max_body_mb, topk)
    routes = [
        Route("/", s.page), Route("/metrics", s.scrape),
        Route("/v2", s.server_metadata), Route("/v2/health/live", s.live),
        Route("/v2/health/ready", s.health_ready), Route("/v2/models/{name}", s.model_metadata),
        Route("/v2/models/{name}/ready", s.model_ready),
        Route("/v2/models/{name}/infer", s.infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}", s.model_metadata),
        Route("/v2/models/{name}/versions/{version}/ready", s.model_ready),
        Route("/v2/models/{name}/versions/{version}/infer", s.infer, methods=["POST"]),
        Route("/v1/predict", s.predict, methods=["POST"]),
        Route("/v1/models", s.models_info)]
    handlers = {ProtocolError: s.on_protocol, ImageError: s.on_image,
                Overloaded: s.on_overload, HTTPException: s.on_http, Exception: s.on_internal}
    app = Starlette(routes=routes, exception_handlers=handlers,  # type: ignore[arg-type]
                    lifespan=s.lifespan)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.service = s
    return app
