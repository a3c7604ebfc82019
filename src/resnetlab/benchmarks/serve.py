"""`resnetlab serve` under load: the batching server against a naive one, on loopback.

Each model is served by `resnetlab serve` in subprocesses, at the same backend and
precision: batched (--max-batch, batches up to the size measured fastest at start-up) and
naive (--max-batch 1: one request, one forward pass); both choose their intra-op threads
the same way (--threads auto), so that comparison is of batching alone. With the torch
backend a third server is naive with torch's own thread count, as a server written
without either would run. Clients send Open Inference Protocol requests of one image
(binary tensors, as tritonclient sends them) over keep-alive connections, 1, 8 and 32 at a
time, each level bounded in requests and seconds. The reference is the bare backend in
this process, in a hot loop: the best rate over batch sizes and thread counts, and its
best batch-1 latency. A soak of --soak requests at 32 clients checks that the server's
memory (RSS) stays flat. On loopback the clients share the machine's cores with the
server, equally for every server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httptools
import numpy as np
import torch

from ..models.factory import create_model, save_weights
from ..serve.model import ServedModel, best_batch
from ..tables import format_table
from .common import machine, new_file, save

# A CIFAR-style net at Fashion-MNIST size (per-call overhead dominates) and resnet50 at 224.
MODELS: dict[str, tuple[int, int]] = {"resnet20": (1, 28), "resnet50": (3, 224)}  # C, size


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """`resnetlab serve` in a subprocess, until stopped (SIGTERM, as a process manager does)."""

    def __init__(self, weights: Path, args: list[str]) -> None:
        self.port = _free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "resnetlab", "serve", f"m={weights}", "--port",
             str(self.port), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                c = http.client.HTTPConnection(self.addr, timeout=5)
                c.request("GET", "/v2/health/ready")
                if c.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"resnetlab serve did not start: {self.output}")

    output = ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(60)
        self.output = self.proc.stdout.read() if self.proc.stdout else ""
        return code


def infer_body(chw: tuple[int, ...]) -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(0).standard_normal((1, *chw)).astype("<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, *chw], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(x)}}],
                       "outputs": [{"name": "logits"}]}).encode()
    return head + x, {"inference-header-content-length": str(len(head)),
                      "content-type": "application/octet-stream"}


class Connection:
    """One keep-alive connection that sends a request prepared once and reads each reply
    with httptools' parser (uvicorn's own). On loopback the clients share the server's
    cores: with http.client, which builds and parses every message in Python, resnet20's
    servers (torch) answered 8-12% fewer requests at 32 clients, and up to 0.5 ms later
    (p50) at 1."""

    def __init__(self, addr: str, path: str, body: bytes, headers: dict[str, str]) -> None:
        host, port = addr.rsplit(":", 1)
        self.address = (host, int(port))
        head = "".join(f"{k}: {v}\r\n" for k, v in
                       {"host": addr, "content-length": str(len(body)), **headers}.items())
        self.request = f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + body
        self.sock: socket.socket | None = None
        self.complete = False  # set by the parser at the end of each reply

    def on_message_complete(self) -> None:
        self.complete = True

    def call(self) -> int:
        """The reply's status; OSError when the connection fails (it reconnects next call)."""
        try:
            if self.sock is None:
                self.sock = socket.create_connection(self.address, timeout=60)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.parser = httptools.HttpResponseParser(self)
            self.complete = False
            self.sock.sendall(self.request)
            while not self.complete:
                data = self.sock.recv(1 << 16)
                if not data:
                    raise ConnectionResetError("the server closed the connection")
                self.parser.feed_data(data)
            return int(self.parser.get_status_code())
        except (OSError, httptools.HttpParserError) as e:
            self.close()
            raise OSError(str(e)) from e

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def load(addr: str, body: bytes, headers: dict[str, str], clients: int, requests: int,
         seconds: float) -> dict[str, Any]:
    """`clients` threads, each on one keep-alive connection, until `requests` are sent or
    `seconds` pass: images/s, latency percentiles (ms) and errors."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    sent = [0]
    stop_at = time.monotonic() + seconds

    def client() -> None:
        conn = Connection(addr, "/v2/models/m/infer", body, headers)
        while True:
            with lock:
                if sent[0] >= requests or time.monotonic() > stop_at:
                    break
                sent[0] += 1
            t = time.perf_counter()
            try:
                ok = conn.call() == 200
            except OSError:
                ok = False
            dt = time.perf_counter() - t
            with lock:
                if ok:
                    latencies.append(dt)
                else:
                    errors[0] += 1
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    pick = (lambda q: 1000 * lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else \
        (lambda q: float("nan"))
    return {"clients": clients, "requests": len(lat) + errors[0], "errors": errors[0],
            "images_per_s": len(lat) / wall, "p50_ms": pick(0.5), "p99_ms": pick(0.99)}


def _served_threads(addr: str) -> Any:
    """The server's intra-op thread choice, as GET /v1/models shows it."""
    c = http.client.HTTPConnection(addr, timeout=30)
    try:
        c.request("GET", "/v1/models")
        return json.loads(c.getresponse().read())[0].get("threads")
    finally:
        c.close()


def bare(weights: Path, backend: str, precision: str, max_batch: int) -> dict[str, Any]:
    """The backend alone, in this process, in a hot loop: images/s by batch size and the
    batch-1 latency, each the best over one thread and all cores (torch backend)."""
    m = ServedModel("bare", weights, backend, precision, probe=False, threads=0)
    cores = torch.get_num_threads()
    x = np.zeros((1, *m.signature.chw), np.float32)
    rates: dict[int, float] = {}
    p50 = float("inf")
    for threads in sorted({1, cores}) if m.predictor.model.name == "torch" else [cores]:
        torch.set_num_threads(threads)
        _, r = best_batch(m.forward, m.signature.chw, max_batch, seconds=1.0)
        rates = {k: max(v, rates.get(k, 0.0)) for k, v in r.items()}
        times = []
        for _ in range(30):
            t = time.perf_counter()
            m.forward(x)
            times.append(time.perf_counter() - t)
        p50 = min(p50, 1000 * statistics.median(times))
    torch.set_num_threads(cores)
    best = max(rates, key=lambda k: rates[k])
    return {"rates": rates, "best_batch": best, "best_images_per_s": rates[best],
            "p50_ms_batch1": p50, "backend": m.platform, "chw": m.signature.chw}


def run_model(name: str, args: argparse.Namespace, say: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / name
        chans, size = MODELS[name]
        save_weights(create_model(name, in_chans=chans), weights, input_size=size,
                     mean=[0.5] * chans, std=[0.25] * chans)
        ref = bare(weights, args.backend, args.precision, args.max_batch)
        say(f"{name}: bare {ref['backend']}: {ref['best_images_per_s']:.0f} images/s at batch "
            f"{ref['best_batch']}, batch 1 p50 {ref['p50_ms_batch1']:.1f} ms")
        body, headers = infer_body(ref["chw"])
        common = ["--backend", args.backend, "--precision", args.precision]
        out: dict[str, Any] = {"bare": ref}
        naive = ["--max-batch", "1", "--max-wait-ms", "0", "--no-batch-probe"]
        servers = [("batched", ["--max-batch", str(args.max_batch)]), ("naive", naive)]
        if ref["backend"].startswith("resnetlab-torch"):  # torch's own threads, untuned
            servers.append(("naive-default", [*naive, "--threads", str(torch.get_num_threads())]))
        for kind, extra in servers:
            server = Server(weights, common + extra)
            try:
                load(server.addr, body, headers, 4, 50, 10)  # warm-up
                rows = []
                for clients in args.clients:
                    r = load(server.addr, body, headers, clients, args.requests, args.seconds)
                    say(f"{name} {kind:7s} {clients:2d} clients: {r['images_per_s']:.0f} "
                        f"images/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                        f"{r['errors']} errors")
                    rows.append(r)
                soak = None
                if kind == "batched" and args.soak:
                    before = _rss_mb(server.proc.pid)
                    s = load(server.addr, body, headers, 32, args.soak, 3600)
                    soak = {"requests": s["requests"], "errors": s["errors"],
                            "rss_mb_before": before, "rss_mb_after": _rss_mb(server.proc.pid)}
                    say(f"{name} soak: {s['requests']} requests, {s['errors']} errors, RSS "
                        f"{before:.0f} -> {soak['rss_mb_after']:.0f} MB")
                threads = _served_threads(server.addr)
                say(f"{name} {kind}: intra-op threads by batch size {threads}")
            finally:
                code = server.stop()
            out[kind] = {"levels": rows, "soak": soak, "threads": threads, "exit_code": code}
        return out


def report(res: dict[str, Any]) -> str:
    """One row per model and client count: the batched server's images/s against each naive
    server's and the bare backend's best, its latency against the bare batch-1 call, and
    the errors of every server at that level."""
    rows = []
    for name, r in res["models"].items():
        bare_best, bare_p50 = r["bare"]["best_images_per_s"], r["bare"]["p50_ms_batch1"]
        levels = {k: {lv["clients"]: lv for lv in r[k]["levels"]}
                  for k in ("naive", "naive-default") if k in r}
        for lv in r["batched"]["levels"]:
            row: list[Any] = [name, lv["clients"], f"{lv['images_per_s']:.0f}"]
            errors = lv["errors"]
            for k in ("naive", "naive-default"):
                n = levels.get(k, {}).get(lv["clients"])
                rate = lv["images_per_s"]
                row.append(f"{n['images_per_s']:.0f} ({rate / n['images_per_s']:.2f}x)"
                           if n else "—")
                errors += n["errors"] if n else 0
            rows.append([*row, f"{lv['images_per_s'] / bare_best:.2f}x",
                         f"{lv['p50_ms']:.1f} / {lv['p99_ms']:.1f}",
                         f"{lv['p50_ms'] / bare_p50:.2f}x", errors])
    return format_table(["model", "clients", "batched img/s", "naive img/s (batched/naive)",
                         "naive, torch's threads (batched/it)", "batched/bare best",
                         "p50 / p99 ms", "p50/bare b1", "errors"], rows, markdown=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="resnetlab bench serve", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=2000, help="most requests per level")
    p.add_argument("--seconds", type=float, default=20.0, help="most seconds per level")
    p.add_argument("--soak", type=int, default=10000,
                   help="requests of the RSS check at 32 clients (0: none)")
    p.add_argument("--backend", default="torch")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--json", type=new_file, help="write the results here (a new file)")
    args = p.parse_args(argv)
    res: dict[str, Any] = {"machine": machine(), "backend": args.backend,
                           "precision": args.precision, "models": {}}
    for name in args.models:
        res["models"][name] = run_model(name, args, lambda s: print(s, flush=True))
    print(f"\n{res['machine']}")
    print(report(res))
    save(args.json, res)
    return 0 if all(r[k]["exit_code"] == 0 for r in res["models"].values()
                    for k in ("batched", "naive", "naive-default") if k in r) else 1


if __name__ == "__main__":
    sys.exit(main())
