"""Fuzzing: no input makes decoding or config parsing hang or raise an undocumented error."""

import io
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from resnetlab.config import parse_set, resolve
from resnetlab.data.images import ImageError, load_image
from resnetlab.errors import ConfigError

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png_bytes()


@FAST
@given(data=st.binary(max_size=4096))
def test_random_bytes_decode_or_raise_image_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "f.png"
    path.write_bytes(data)
    try:
        assert load_image(path, "RGB").mode == "RGB"
    except ImageError as e:
        assert str(path) in str(e) and "\n" not in str(e)


@FAST
@given(cut=st.integers(0, len(PNG)), flips=st.lists(st.integers(0, len(PNG) - 1), max_size=8))
def test_damaged_png_decodes_or_raises_image_error(tmp_path: Path, cut: int,
                                                   flips: list[int]) -> None:
    data = bytearray(PNG)
    for i in flips:
        data[i] ^= 0xFF
    path = tmp_path / "damaged.png"
    path.write_bytes(bytes(data[:cut]))
    try:
        load_image(path, "L")
    except ImageError as e:
        assert str(path) in str(e)


keys = st.sampled_from(["seed", "batch_size", "optim.lr", "optim.nesterov", "schedule.kind",
                        "schedule.milestones", "data.dataset", "data.pad", "model.name",
                        "model.options", "nope", "optim", "optim.lr.x", ""])
values = st.text(alphabet=st.characters(codec="ascii", exclude_categories=["Cc"]),
                 max_size=20)


@FAST
@given(pairs=st.lists(st.tuples(keys, values), max_size=4))
def test_any_set_pairs_parse_or_raise_config_error(pairs: list[tuple[str, str]]) -> None:
    items = [f"{k}={v}" for k, v in pairs]
    try:
        cfg = resolve("smoke", sets=items)
    except ConfigError as e:
        assert "\n" not in str(e).strip()
    else:
        assert cfg.batch_size >= 1 and cfg.optim.lr > 0


@FAST
@given(text=st.text(max_size=200))
def test_any_yaml_file_loads_or_raises_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    try:
        resolve(None, str(path))
    except ConfigError as e:
        assert "\n" not in str(e).strip()


def test_parse_set_rejects_malformed_items() -> None:
    for bad in ("=1", "novalue", "a.b=[1"):
        try:
            parse_set([bad])
        except ConfigError:
            continue
        raise AssertionError(f"{bad!r} was accepted")
