"""What `resnetlab train` is asked for, as one TrainConfig.

Every command-line flag arrives here as the --set pair it stands for (cli/run.py), so a
setting has one way in: defaults, a preset or a recipe sized from the data, a YAML file,
then --set pairs (config.resolve). With no preset and no config file, a data directory
holding an image folder gets the folder recipe (recipes.folder_recipe); no data directory,
or one holding IDX files, gets the fashion-mnist preset, the README's first run; any other
data directory is refused with what is wrong with its layout.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import TrainConfig, named, resolve
from ..data.config import LAYOUT
from ..data.scan import FolderScan, looks_like_folder, not_a_folder, scan_folder
from ..data.sources import holds_idx
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
    if dataset == "folder" and not data_dir:
        raise ConfigError(f"no data directory was given: lay your images out as {LAYOUT} "
                          "and run `resnetlab train DIR`")
    # A folder that is not laid out right, or not there, is told so, not taken for the
    # default data set's files (whose own error would send the user back here).
    if data_dir and (dataset == "folder" or (dataset is None and not holds_idx(data_dir))):
        raise ConfigError(not_a_folder(data_dir))
    return resolve(DEFAULT_PRESET, None, sets), None

