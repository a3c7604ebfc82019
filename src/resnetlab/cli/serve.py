"""`resnetlab serve`: a thin wrapper that loads the models and runs uvicorn."""

from __future__ import annotations

import argparse
import errno
import re
import signal
import socket
from pathlib import Path

from ..deploy.backends import backend_names, canonical
from ..errors import ConfigError
from ..runs import RunDir
from .run import BACKEND_HELP, add_precision_args

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
BACKLOG = 2048  # uvicorn's default
MAX_CONNECTIONS = 64  # at once, beyond which uvicorn answers 503: bounds the bodies held


def add_serve_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("serve", parents=[common], help="serve models over HTTP (with a web page)",
                       description="The Open Inference Protocol (KServe v2 / Triton REST) at "
                       "/v2, images at POST /v1/predict, Prometheus metrics at /metrics and a "
                       "web page at /. Concurrent requests are batched. SIGTERM or Ctrl-C stops "
                       "accepting, finishes what is in flight, and exits 0. docs/serving.md")
    s.add_argument("weights", nargs="+", help="run or weights directories (NAME=DIR names one)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    s.add_argument("--backend", choices=backend_names(), default="auto", help=BACKEND_HELP)
    add_precision_args(s)
    s.add_argument("--max-batch", type=int, default=32,
                   help="most images per forward pass; the server times batch sizes up to "
                   "this at start-up and batches up to the largest within 5%% of the fastest")
    s.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a batch waits at most for the requests it expects (as "
                   "many as were about when the last pass ended); a lone client never waits")
    s.add_argument("--max-queue", type=int, default=256,
                   help="images waiting at most; beyond, requests get 503 with Retry-After")
    s.add_argument("--max-body-mb", type=float, default=32.0,
                   help="largest request body accepted (larger: 413)")
    s.add_argument("--topk", type=int, default=5, help="classes /v1/predict returns by default")
    s.add_argument("--no-batch-probe", dest="probe", action="store_false",
                   help="batch up to --max-batch without measuring at start-up")
    s.add_argument("--threads", type=_threads, default=None, metavar="auto|N",
                   help="the torch backend's intra-op threads (default auto: one or all "
                   "cores for each batch size, whichever ran faster in the first batches "
                   "served)")
    s.set_defaults(func=cmd_serve)


def _threads(value: str) -> int | None:
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give auto or a number of threads >= 1")
    return int(value)


def model_name(spec: str) -> tuple[str, str]:
    """NAME=DIR, or DIR named after its run (runs/demo/final -> demo)."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
    else:
        path = spec
        run = RunDir.around(path)
        name = (run.path if run is not None else Path(path)).resolve().name
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", name)
    if not name:
        raise ConfigError(f"{spec}: give the model a name, as NAME={spec}")
    return name, path


def bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address `host` resolves to, as uvicorn would bind them, or a
    ConfigError saying why not. Bound here rather than by uvicorn so that a port in use is
    a one-line error before the models load. They listen only once the server is about to
    start: until then a client is refused, not left waiting while the models load."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: {e.strerror}; give an address or a name this "
                          "machine resolves") from None
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):  # a hosts file may repeat one
            if port == 0 and socks:  # every address on the one port the system chose
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            # As uvicorn: a restarted server need not wait out its predecessor's TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # "::" must not also claim the IPv4 port
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
    except OSError as e:
        for sock in socks:
            sock.close()
        raise ConfigError(_bind_error(host, port, e)) from None
    return socks


def _bind_error(host: str, port: int, e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return (f"port {port} on {host} is already in use (another server?): stop it, or "
                "choose another --port")
    if e.errno == errno.EACCES:
        return f"no permission to listen on port {port}: choose a --port from 1024 up"
    if e.errno == errno.EADDRNOTAVAIL:
        return (f"--host {host} is not an address of this machine: give one of its "
                "addresses, or 0.0.0.0 for all of them")
    return f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port or --host"


def cmd_serve(args: argparse.Namespace) -> int:
    try:  # the serving stack loads only for this command
        import uvicorn

        from ..serve import Metrics, ServedModel, build_app
    except ImportError as e:
        raise ConfigError(f"resnetlab serve needs {e.name}: pip install 'resnetlab[serve]'"
                          ) from None
    from ..evaluation.run import test_images

    for flag in ("max_batch", "max_queue", "topk", "port"):
        if getattr(args, flag) < (0 if flag == "port" else 1):
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive")
    if args.port > 65535:  # getaddrinfo would wrap it round to another port
        raise ConfigError(f"--port {args.port}: ports go up to 65535")
    specs = [model_name(w) for w in args.weights]
    names = [name for name, _ in specs]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"two models would be served as {', '.join(twice)}: name them, "
                          "as NAME=DIR")
    socks = bind(args.host, args.port)
    try:
        models = []
        backend, precision = canonical(args.backend, args.precision)  # as predict does
        for name, path in specs:
            check = test_images(path) if precision != "fp32" else None
            models.append(ServedModel(name, path, backend, precision, check,
                                      args.max_batch, args.max_wait_ms, args.max_queue,
                                      probe=args.probe, threads=args.threads,
                                      min_agreement=args.min_agreement))
            m = models[-1]
            print(f"{name}: {m.config.architecture} from {m.weights} on {m.platform}, "
                  f"batches of up to {m.batcher.max_batch}")
        app = build_app(models, Metrics(), args.max_body_mb, args.topk)
        host = f"[{args.host}]" if ":" in args.host else args.host
        url = f"http://{host}:{socks[0].getsockname()[1]}"  # the port --port 0 was given
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                               timeout_graceful_shutdown=30,
                                               limit_concurrency=MAX_CONNECTIONS))
        try:
            for sock in socks:
                sock.listen(BACKLOG)
        except OSError as e:  # another server, as ours with SO_REUSEADDR, listens meanwhile
            raise ConfigError(_bind_error(args.host, args.port, e)) from None
        print(f"serving at {url}/ (page), {url}/v2/models/{models[0].name}/infer, "
              f"{url}/v1/predict, {url}/metrics")
        # uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again for the
        # handler it found; a no-op one lets a requested stop end as a success (exit 0).
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in STOP_SIGNALS}
        try:
            server.run(sockets=socks)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        for sock in socks:
            sock.close()
    print("stopped")
    return 0
