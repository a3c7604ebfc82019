"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) for an image classifier.

One input, `input`: FP32 [-1, C, H, W], the preprocessed images (the model's mean/std
applied, as `resnetlab predict` does before its forward pass). Two outputs: `logits` and
`probabilities`, FP32 [-1, classes]. Tensors travel as JSON `data` (flat or nested) or,
with the binary tensor data extension, as raw little-endian bytes after the JSON header
(`Inference-Header-Content-Length`), which is what tritonclient sends by default.
Everything a request can get wrong raises ProtocolError, which the app answers with a 4xx.
The model metadata's `parameters` say how to preprocess (layout, mean, std, pixel range...),
as the protocol's parameters allow: strings, numbers and booleans, mean and std as JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

HEADER = "inference-header-content-length"
JSON_LIMIT = 8 << 20  # bytes of JSON a request may hold: about 0.2 s of parsing
VERSION = "1"  # the one version each model has
INPUT = "input"
OUTPUTS = ("logits", "probabilities")


class ProtocolError(Exception):
    """A request the protocol (or this model) cannot accept; `status` is the HTTP code."""

    def __init__(self, message: str, status: int = 400, kind: str = "bad_request") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclass(frozen=True)
class Signature:
    """The model's tensors: input (C, H, W) and the number of classes."""

    chw: tuple[int, int, int]
    classes: int

    def metadata(self, name: str, platform: str, parameters: dict[str, Any]
                 ) -> dict[str, Any]:
        return {"name": name, "versions": [VERSION], "platform": platform,
                "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, *self.chw]}],
                "outputs": [{"name": o, "datatype": "FP32", "shape": [-1, self.classes]}
                            for o in OUTPUTS],
                "parameters": parameters}


@dataclass
class InferRequest:
    images: np.ndarray  # (n, C, H, W) float32
    id: str | None
    outputs: list[tuple[str, bool]]  # (name, as binary) in the order asked


def _json_header(body: bytes, header_length: str | None) -> tuple[Any, bytes]:
    if header_length is None:
        split = len(body)
    else:
        try:
            split = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER} must be an integer, got {header_length!r}") from None
        if not 0 <= split <= len(body):
            raise ProtocolError(f"{HEADER} {split} is outside the body's {len(body)} bytes")
    if split > JSON_LIMIT:  # json.loads holds the event loop (and the GIL) while it parses
        raise ProtocolError(f"the JSON part of the request is {split:,} bytes, over "
                            f"{JSON_LIMIT:,}: send the tensor as binary data (the binary "
                            "tensor data extension, tritonclient's default)", 413, "too_large")
    try:
        return json.loads(body[:split]), body[split:]
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"the request is not valid JSON ({e})") from None
    except RecursionError:
        raise ProtocolError("the request's JSON is nested too deeply") from None


def _shape(spec: Any, sig: Signature, max_images: int) -> tuple[int, ...]:
    if not isinstance(spec, list) or len(spec) != 4 or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in spec):
        raise ProtocolError(f"input shape must be [N, {', '.join(map(str, sig.chw))}], "
                            f"got {spec!r}")
    if tuple(spec[1:]) != sig.chw:
        raise ProtocolError(f"input shape must be [N, {', '.join(map(str, sig.chw))}] for "
                            f"this model, got {spec}")
    if not 1 <= spec[0] <= max_images:
        raise ProtocolError(f"a request holds 1 to {max_images} images, got {spec[0]}",
                            413 if spec[0] > max_images else 400, "too_large")
    return tuple(spec)


def parse_infer(body: bytes, header_length: str | None, sig: Signature,
                max_images: int) -> InferRequest:
    """The images and wanted outputs of an infer request, or a ProtocolError saying why not."""
    req, binary = _json_header(body, header_length)
    if not isinstance(req, dict):
        raise ProtocolError("the request must be a JSON object with an 'inputs' list")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(f"'inputs' must be a list of one tensor, named {INPUT!r}")
    inp = inputs[0]
    if inp.get("name") != INPUT:
        raise ProtocolError(f"unknown input {inp.get('name')!r}; this model's input is "
                            f"{INPUT!r}")
    if inp.get("datatype") != "FP32":
        raise ProtocolError(f"input datatype must be FP32, got {inp.get('datatype')!r}")
    shape = _shape(inp.get("shape"), sig, max_images)
    count = math.prod(shape)
    params = inp.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("input 'parameters' must be an object")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if size != 4 * count or len(binary) != size:
            raise ProtocolError(f"binary input of shape {list(shape)} takes {4 * count} bytes; "
                                f"binary_data_size is {size!r}, {len(binary)} bytes follow")
        arr = np.frombuffer(binary, dtype="<f4").astype(np.float32)
    else:
        if binary:
            raise ProtocolError("bytes follow the JSON header but no input has "
                                "binary_data_size")
        try:
            arr = np.asarray(inp.get("data"), dtype=np.float32)
        except (ValueError, TypeError, OverflowError):
            raise ProtocolError("input 'data' must be float32 numbers (flat or nested lists)"
                                ) from None
        if arr.size != count:
            raise ProtocolError(f"input shape {list(shape)} holds {count} values; 'data' has "
                                f"{arr.size}")
    if not np.isfinite(arr).all():
        raise ProtocolError("input holds NaN or infinite values")
    return InferRequest(arr.reshape(shape), _request_id(req), _outputs(req))


def _request_id(req: dict[str, Any]) -> str | None:
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise ProtocolError("'id' must be a string")
    return rid


def _outputs(req: dict[str, Any]) -> list[tuple[str, bool]]:
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("request 'parameters' must be an object")
    all_binary = params.get("binary_data_output") is True
    asked = req.get("outputs")
    if asked is None:
        return [(o, all_binary) for o in OUTPUTS]
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise ProtocolError("'outputs' must be a list of objects with a 'name'")
    out = []
    for o in asked:
        if o.get("name") not in OUTPUTS:
            raise ProtocolError(f"unknown output {o.get('name')!r}; this model has "
                                f"{', '.join(OUTPUTS)}")
        p = o.get("parameters") or {}
        out.append((o["name"], p.get("binary_data", all_binary) is True if isinstance(p, dict)
                    else all_binary))
    return out


def encode_response(name: str, req: InferRequest, logits: np.ndarray
                    ) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (binary outputs follow the JSON)."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    tensors = {"logits": logits.astype(np.float32),
               "probabilities": (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)}
    outputs, blobs = [], []
    for out_name, binary in req.outputs:
        t = tensors[out_name]
        entry: dict[str, Any] = {"name": out_name, "datatype": "FP32", "shape": list(t.shape)}
        if binary:
            blob = t.astype("<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = t.ravel().tolist()
        outputs.append(entry)
    head: dict[str, Any] = {"model_name": name, "model_version": VERSION, "outputs": outputs}
    if req.id is not None:
        head["id"] = req.id
    text = json.dumps(head).encode()
    if not blobs:
        return text, {"content-type": "application/json"}
    return text + b"".join(blobs), {"content-type": "application/octet-stream",
                                    HEADER: str(len(text))}
