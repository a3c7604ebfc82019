"""What `resnetlab train` is asked for, as one TrainConfig.

Every command-line flag arrives here as the --set pair it stands for (cli/run.py), so a
setting has one way in: defaults, a preset or a recipe sized from the data, a YAML file,
then --set pairs (config.resolve). With no preset and no config file, a data directory
holding an image folder gets the folder recipe (recipes.folder_recipe); anything else gets
the fashion-mnist preset, the README's first run.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import TrainConfig, named, resolve
from ..data.config import LAYOUT
from ..data.scan import FolderScan, looks_like_folder, scan_folder
from ..errors import ConfigError
from ..recipes import folder_recipe
from .finetune import read_source

DEFAULT_PRESET = "fashion-mnist"


def train_config(preset: str | None = None, config_file: str | None = None,
                 sets: Sequence[str] = ()) -> tuple[TrainConfig, FolderScan | None]:
    """The config to train, and the scan of the image folder it was sized from (if any)."""
    if preset or config_file:
        return resolve(preset, config_file, sets), None
    asked = named(sets)
    data_dir, dataset = asked.get("data.data_dir"), asked.get("data.dataset")
    if data_dir and dataset in (None, "folder") and looks_like_folder(data_dir):
        scan = scan_folder(data_dir)
        init = asked.get("finetune.init")
        arch = read_source(init)[2] if init else None
        return resolve(None, None, sets, settings=[folder_recipe(scan, asked, arch)]), scan
    if dataset == "folder":
        raise ConfigError(f"{data_dir or 'no data directory was given'}: not a folder of "
                          f"images in class sub-folders; lay them out as {LAYOUT}")
    return resolve(DEFAULT_PRESET, None, sets), None

