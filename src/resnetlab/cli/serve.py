"""`resnetlab serve`: a thin wrapper that loads the models and runs uvicorn."""

from __future__ import annotations

import argparse
import re
import signal
from pathlib import Path

from ..deploy.backends import backend_names
from ..errors import ConfigError
from ..train.rundir import RunDir
from .run import BACKEND_HELP, add_precision_args

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def add_serve_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("serve", parents=[common], help="serve models over HTTP (with a web page)",
                       description="The Open Inference Protocol (KServe v2 / Triton REST) at "
                       "/v2, images at POST /v1/predict, Prometheus metrics at /metrics and a "
                       "web page at /. Concurrent requests are batched. SIGTERM or Ctrl-C stops "
                       "accepting, finishes what is in flight, and exits 0. docs/serving.md")
    s.add_argument("weights", nargs="+", help="run or weights directories (NAME=DIR names one)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
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
    s.add_argument("--max-body-mb", type=float, default=32.0)
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
    specs = [model_name(w) for w in args.weights]
    models = []
    for name, path in specs:
        check = test_images(path) if args.precision == "auto" else None
        models.append(ServedModel(name, path, args.backend, args.precision, check,
                                  args.max_batch, args.max_wait_ms, args.max_queue,
                                  probe=args.probe, threads=args.threads))
        m = models[-1]
        print(f"{name}: {m.config.architecture} from {m.weights} on {m.platform}, batches of "
              f"up to {m.batcher.max_batch}")
    app = build_app(models, Metrics(), args.max_body_mb, args.topk)
    url = f"http://{args.host}:{args.port}"
    print(f"serving at {url}/ (page), {url}/v2/models/{models[0].name}/infer, "
          f"{url}/v1/predict, {url}/metrics")
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level="warning", timeout_graceful_shutdown=30))
    # uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again for the
    # handler it found; a no-op one lets a requested stop end as a success (exit 0).
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in STOP_SIGNALS}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped")
    return 0
