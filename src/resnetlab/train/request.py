"""What `resnetlab train` is asked for, as one TrainConfig.

Every command-line flag arrives here as the --set pair it stands for (cli/run.py), so a
setting has one way in: defaults, a preset or a recipe sized from the data, a YAML file,
then --set pairs (config.resolve). With no preset and no config file, a data directory
holding an image folder gets the folder recipe (recipes.folder_recipe); anything else gets
the fashion-mnist preset, the README's first run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import TrainConfig, parse_set, resolve
from ..data.scan import FolderScan, looks_like_folder, scan_folder
from ..errors import ConfigError
from ..recipes import folder_recipe
from .finetune import read_source

DEFAULT_PRESET = "fashion-mnist"
LAYOUT = "DIR/train/<class>/*.jpg (and optionally DIR/val/<class>/), or DIR/<class>/*.jpg"


def train_config(preset: str | None = None, config_file: str | None = None,
                 sets: Sequence[str] = ()) -> tuple[TrainConfig, FolderScan | None]:
    """The config to train, and the scan of the image folder it was sized from (if any)."""
    if preset or config_file:
        return resolve(preset, config_file, sets), None
    asked = parse_set(sets)
    data, tune = _section(asked, "data"), _section(asked, "finetune")
    data_dir, dataset = data.get("data_dir"), data.get("dataset")
    if data_dir and dataset in (None, "folder") and looks_like_folder(data_dir):
        scan = scan_folder(data_dir)
        arch = read_source(tune["init"])[2] if tune.get("init") else None
        return resolve(None, None, sets, settings=[folder_recipe(scan, asked, arch)]), scan
    if dataset == "folder":
        raise ConfigError(f"{data_dir or 'no data directory was given'}: not a folder of "
                          f"images in class sub-folders; lay them out as {LAYOUT}")
    return resolve(DEFAULT_PRESET, None, sets), None


def _section(asked: dict[str, Any], name: str) -> dict[str, Any]:
    """One section of the --set pairs; a malformed one is left for `resolve` to refuse."""
    found = asked.get(name)
    return found if isinstance(found, dict) else {}
