"""Train a small U-Net from scratch on a cropchips dataset (CPU is enough), then report per-class IoU on val.

    python -m examples.train_segmentation --root /data/chips --epochs 5 --batch-size 8

(from the repository's root, with ``-m``, so that ``cropchips`` imports without being installed;
``python examples/train_segmentation.py`` works once ``pip install '.[torch]'`` has installed it).

The images are standardised with the dataset's ``stats.json`` (written with the index) when it
has one, else scaled by 1e-4 (DN to reflectance). Time-series chips (T x C x H x W) are fed
as T*C channels. Mask pixels of 255 (a field of none of the classes, or no image data) are
ignored by the loss and by the IoU. Needs ``pip install 'cropchips[torch]'``.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cropchips.dataset.stats import STATS_NAME
from cropchips.errors import CropChipsError, InputDataError
from cropchips.output.storage import open_storage
from cropchips.torch import ChipDataset, collate

log = logging.getLogger("train_segmentation")

NUM_CLASSES = 9  # 0 no field, 1..8 crop classes
IGNORE_INDEX = 255


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="the dataset folder (or s3://bucket/prefix) with index.parquet")
    parser.add_argument("--epochs", type=int, default=5, help="passes over the train split (default 5)")
    parser.add_argument("--batch-size", type=int, default=8, help="chips per step (default 8)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in all (default: none)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    parser.add_argument("--width", type=int, default=16, help="channels of the first U-Net level (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the shuffling (default 0)")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "width"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max-steps must be >= 1")
    if not args.lr > 0:
        parser.error("--lr must be > 0")
    return args


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """A U-Net of two down- and two up-sampling levels (chip sides must be multiples of 4)."""

    def __init__(self, in_channels: int, num_classes: int = NUM_CLASSES, width: int = 16) -> None:
        super().__init__()
        self.enc1, self.enc2 = _block(in_channels, width), _block(width, 2 * width)
        self.bottom = _block(2 * width, 4 * width)
        self.pool = nn.MaxPool2d(2)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2), _block(4 * width, 2 * width)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2), _block(2 * width, width)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottom(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


def _inputs(image: torch.Tensor, normalized: bool) -> torch.Tensor:
    """B x C x H x W network input: a time series' T x C bands as T*C channels."""
    if image.ndim == 5:
        image = image.flatten(1, 2)
    return image if normalized else image * 1e-4


def _seed(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def confusion(model: nn.Module, loader: DataLoader, normalized: bool) -> np.ndarray:
    """NUM_CLASSES x NUM_CLASSES counts (true row, predicted column) over the pixels not ignored."""
    matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    model.eval()
    with torch.no_grad():
        for batch in loader:
            predicted = model(_inputs(batch["image"], normalized)).argmax(dim=1)
            truth = batch["mask"]
            keep = (truth != IGNORE_INDEX) & (truth < NUM_CLASSES)
            pairs = truth[keep] * NUM_CLASSES + predicted[keep]
            matrix += np.bincount(pairs.numpy(), minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)
    return matrix


def iou_per_class(matrix: np.ndarray) -> dict[int, float]:
    """IoU of each class; NaN for a class neither present nor predicted."""
    hits = np.diag(matrix).astype(np.float64)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - hits
    return {k: (float(hits[k] / union[k]) if union[k] else math.nan) for k in range(NUM_CLASSES)}


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train on the train split, evaluate on val; the losses (per step and per epoch) and the IoUs."""
    storage = open_storage(args.root)
    normalized = storage.exists(STATS_NAME)
    if not normalized:
        log.warning("%s has no %s: inputs scaled by 1e-4 instead of standardised", storage, STATS_NAME)
    generator = _seed(args.seed)
    train_set = ChipDataset(storage, split="train", normalize=normalized)
    if len(train_set) == 0:
        raise InputDataError(f"{storage} has no chip in its train split: nothing to train on (index more chips, "
                             "or check the spec's split_ratios)")
    first = train_set[0]
    channels = int(np.prod(first["image"].shape[:-2]))
    height, width = first["image"].shape[-2:]
    if height % 4 or width % 4:
        raise InputDataError(f"the chips are {height} x {width} px: this U-Net needs sides that are multiples of 4")
    model = UNet(channels, width=args.width)
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, collate_fn=collate, generator=generator)
    log.info("training on %d chips (%d channels, %d x %d px), %d epochs", len(train_set), channels, height, width,
             args.epochs)

    losses: list[float] = []
    epoch_losses: list[float] = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        seen = []
        for batch in loader:
            mask = batch["mask"]
            if bool((mask == IGNORE_INDEX).all()):
                continue  # nothing to learn in this batch (the loss would be NaN)
            optimiser.zero_grad()
            loss = loss_fn(model(_inputs(batch["image"], normalized)), mask)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            seen.append(losses[-1])
            if args.max_steps is not None and len(losses) >= args.max_steps:
                break
        if seen:
            epoch_losses.append(float(np.mean(seen)))
            log.info("epoch %d: mean loss %.4f over %d steps", epoch, epoch_losses[-1], len(seen))
        if args.max_steps is not None and len(losses) >= args.max_steps:
            log.info("stopping after %d steps (--max-steps)", len(losses))
            break

    val_set = ChipDataset(storage, split="val", normalize=normalized)
    if len(val_set) == 0:
        log.warning("%s has no val chip: no IoU to report", storage)
        ious = {k: math.nan for k in range(NUM_CLASSES)}
        matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    else:
        matrix = confusion(model, DataLoader(val_set, batch_size=args.batch_size, collate_fn=collate), normalized)
        ious = iou_per_class(matrix)
    return {"losses": losses, "epoch_losses": epoch_losses, "iou": ious, "confusion": matrix.tolist(),
            "train_chips": len(train_set), "val_chips": len(val_set), "steps": len(losses)}


def report(result: dict[str, Any]) -> str:
    """The IoU table: classes 1..8, then 0 (background); '-' where a class is absent from val."""
    from cropchips.fields.classes import CLASS_NAMES

    lines = [f"IoU on the val split ({result['val_chips']} chips):"]
    for k in [*range(1, NUM_CLASSES), 0]:
        value = result["iou"][k]
        name = CLASS_NAMES.get(k, str(k)) if k else "background (no field)"
        lines.append(f"  {k:>3} {name:<24} {'-' if math.isnan(value) else f'{value:.3f}'}")
    present = [v for v in result["iou"].values() if not math.isnan(v)]
    lines.append(f"  mean IoU over present classes: {np.mean(present):.3f}" if present else "  no class present")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the arguments, train, print the IoU table; return the result of :func:`train`.
    A dataset that cannot be trained on raises InputDataError (the script exits 2 with its message)."""
    args = parse_args(argv)
    result = train(args)
    sys.stdout.write(report(result) + "\n")  # the script's result, on stdout (its log goes to stderr)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        main()
    except CropChipsError as exc:
        log.error("%s", exc)
        sys.exit(2)
