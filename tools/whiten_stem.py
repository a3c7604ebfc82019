"""A whitened, frozen stem: a fast-training ingredient tried on the trainer without becoming
a setting of it (issue 32, docs/results/fast-recipe). It is patched into one `resnetlab
train` process, which then runs as usual, so its row of the ingredients table is
reproducible; it measured no gain, so it is not a config key.

The stem's 16 3x3 filters are set to the top 8 eigenvectors of the training images' 3x3
patch covariance, each scaled by 1/sqrt(eigenvalue + 0.01), and their negatives, then
frozen (the whitening layer of KellerJordan/cifar10-airbench, on a 1-channel stem).

    python tools/whiten_stem.py train --preset fashion-mnist-fast --out DIR [--set ...]
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F

import resnetlab.train.loop as loop
from resnetlab.cli import main
from resnetlab.train.setup import TrainState

PATCH_BATCHES = 40  # batches of training images whose patches the whitening is fitted on


def whiten() -> None:
    """Patch the trainer's `start` to whiten and freeze the stem of the model it builds."""
    start = loop.start

    def patched(*args: Any, **kwargs: Any) -> TrainState:
        s = start(*args, **kwargs)
        conv = s.core.stem.conv
        n, chans, k, _ = conv.weight.shape
        batches = zip(range(PATCH_BATCHES), s.data.train.batches(0), strict=False)
        x = torch.cat([b[0].float().contiguous() for _, b in batches])
        patches = F.unfold(x, k, padding=k // 2).transpose(1, 2).reshape(-1, chans * k * k)
        patches = patches - patches.mean(0)
        eigval, eigvec = torch.linalg.eigh(patches.T @ patches / len(patches))
        eigval, eigvec = eigval.flip(0)[:n // 2], eigvec.flip(1)[:, :n // 2]
        filters = (eigvec / (eigval + 1e-2).sqrt()).T.reshape(n // 2, chans, k, k)
        with torch.no_grad():
            conv.weight.copy_(torch.cat([filters, -filters]))
        conv.weight.requires_grad_(False)
        print(f"stem whitened from the patches of {len(x)} images", flush=True)
        return s

    loop.start = patched


if __name__ == "__main__":
    whiten()
    sys.exit(main(sys.argv[1:]))
