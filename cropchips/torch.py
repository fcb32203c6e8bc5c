"""A PyTorch ``Dataset`` over a cropchips dataset (its ``index.parquet``), after TorchGeo's conventions.

    from torch.utils.data import DataLoader
    from cropchips.torch import ChipDataset, collate

    train = ChipDataset("/data/chips", split="train", normalize=True)
    sample = train[0]   # {"image": float32 C x H x W, "mask": int64 H x W, "bounds": ..., "crs": ...}
    loader = DataLoader(train, batch_size=8, shuffle=True, collate_fn=collate)

The root is a folder or an object-store URL (``s3://bucket/prefix``, read through
:mod:`cropchips.output.storage` with the usual AWS settings). Each sample is a dict:

* ``image``: float32, ``C x H x W``; ``T x C x H x W`` when the image's bands are dated
  (``"2023-05-15 B02"``, a time series, bin-major), with ``dates`` (T ``YYYY-MM-DD`` strings).
  Raw uint16 DN, or standardised with ``stats.json`` (``normalize``), where no-data pixels (0)
  become 0, the band mean.
* ``mask``: int64 ``H x W`` classes: 0 no field, 1..8 crop classes, 255 ignore (use
  ``ignore_index=255`` in the loss); ``instances`` (field ids) and ``boundaries`` (0/1/2) as int64
  when ``layers`` asks for them.
* ``bounds``: float64 tensor ``(left, bottom, right, top)`` in ``crs`` (a string such as ``EPSG:32630``).

``transforms`` is called on that dict (as in TorchGeo). Needs the ``torch`` extra:
``pip install 'cropchips[torch]'`` (PyTorch; matplotlib for :meth:`ChipDataset.plot`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    import torch
    from torch.utils.data import Dataset
except ImportError as exc:  # the extra is optional: say how to get it
    raise ImportError(f"cropchips.torch needs PyTorch ({exc}); install it with: "
                      "pip install 'cropchips[torch]'") from exc

import numpy as np
import pandas as pd

from cropchips.dataset.stats import NODATA, image_descriptions, open_image, parse_band_description, read_stats
from cropchips.errors import ConfigError, InputDataError
from cropchips.output.storage import Storage, open_storage

log = logging.getLogger(__name__)

INDEX_NAME = "index.parquet"  # as cropchips.dataset.index writes it (not imported: that pulls in geopandas)
SPLITS = ("train", "val", "test")
#: Sample key -> the index column naming its file. ``mask`` is the classes layer.
LAYERS: dict[str, str] = {"mask": "mask", "instances": "instances", "boundaries": "boundaries"}
_REQUIRED = ("name", "image", "mask", "split", "crs", "left", "bottom", "right", "top")

#: Fixed colour per mask value (plots of different chips compare): 0..8, then 255 (ignore) grey.
CLASS_COLOURS: dict[int, str] = {
    0: "#000000",   # no field
    1: "#808000",   # olive plantations
    2: "#7b2d8b",   # vineyards
    3: "#e6194b",   # fruit
    4: "#8b4513",   # nuts, orchards, forest
    5: "#ffd700",   # cereals
    6: "#3cb44b",   # legumes
    7: "#f58231",   # vegetables
    8: "#d2b48c",   # fallow, bare arable
    255: "#9e9e9e",  # ignore
}
RGB_BANDS = ("B04", "B03", "B02")


class ChipDataset(Dataset):
    """The chips of a cropchips dataset (one split, or all), read on demand."""

    def __init__(self, root: str | Path | Storage, split: str | Sequence[str] | None = None,
                 transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 normalize: bool | str | Path = False, layers: Sequence[str] = ("mask",)) -> None:
        """``root``: the dataset folder or URL. ``split``: train, val, test, several of them, or None for
        every chip. ``normalize``: True to standardise with ``ROOT/stats.json``, or the path of a
        stats file. ``layers``: the label layers to load, of ``mask``, ``instances``, ``boundaries``."""
        self.root = root
        self.storage = open_storage(root)
        self.transforms = transforms
        if isinstance(layers, str):
            layers = (layers,)
        unknown = [layer for layer in layers if layer not in LAYERS]
        if unknown:
            raise ConfigError(f"layers {unknown} are not label layers; choose among {', '.join(LAYERS)}")
        self.layers = tuple(layers)

        index = self._read_index()
        splits = self._splits(split)
        rows = index if splits is None else index[index["split"].isin(splits)]
        self.chips: pd.DataFrame = rows.drop(columns=["geometry"], errors="ignore").sort_values("name").reset_index(
            drop=True)
        for layer in self.layers:
            column = LAYERS[layer]
            lacking = (len(self.chips) if column not in self.chips.columns
                       else int((self.chips[column].fillna("").astype(str) == "").sum()))
            if lacking:
                raise InputDataError(f"{lacking} of the {len(self.chips)} chips of {self.storage} have no {layer} "
                                     f"layer; make the dataset with labels: [classes, {layer}] in its spec, or "
                                     f"leave {layer!r} out of layers")
        self._records = self.chips.to_dict("records")

        self.stats: dict[str, Any] | None = None
        if normalize is not False and normalize is not None:
            self.stats = read_stats(self.storage if normalize is True else normalize)
        self._scales: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}

    # ------------------------------------------------------------------ the index

    def _read_index(self) -> pd.DataFrame:
        try:
            index = pd.read_parquet(self.storage.source(INDEX_NAME))
        except FileNotFoundError:
            raise InputDataError(f"{self.storage} has no {INDEX_NAME}: build it with `cropchips index --output-dir "
                                 f"{self.storage}` (or give the folder the workers wrote)") from None
        missing = [column for column in _REQUIRED if column not in index.columns]
        if missing:
            raise InputDataError(f"{self.storage.url(INDEX_NAME)} lacks the column(s) {missing}; rebuild it with "
                                 f"`cropchips index --output-dir {self.storage}`")
        return index

    @staticmethod
    def _splits(split: str | Sequence[str] | None) -> tuple[str, ...] | None:
        if split is None:
            return None
        chosen = (split,) if isinstance(split, str) else tuple(split)
        wrong = [s for s in chosen if s not in SPLITS]
        if wrong or not chosen:
            raise ConfigError(f"split must be one of {SPLITS} (or a list of them, or None for all), got {split!r}")
        return chosen

    @property
    def band_names(self) -> tuple[str, ...]:
        """The band names of the images (``B02``...; without dates), from the first chip."""
        if not self._records:
            return ()
        row = self._records[0]
        descriptions = row.get("bands")
        if descriptions is None or len(descriptions) == 0:
            with open_image(self.storage, row["image"]) as src:
                descriptions = image_descriptions(src)
        names: list[str] = []
        for text in descriptions:
            band = parse_band_description(str(text))[1]
            if band not in names:
                names.append(band)
        return tuple(names)

    def __len__(self) -> int:
        return len(self._records)

    # ------------------------------------------------------------------ samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"chip {index} of a dataset of {len(self)}")
        row = self._records[index]
        fallback = row.get("bands")
        with open_image(self.storage, row["image"]) as src:
            raw = src.read()
            descriptions = image_descriptions(src, None if fallback is None else list(fallback))
        image = raw.astype(np.float32)
        if self.stats is not None:
            mean, std = self._scale(tuple(descriptions))
            image = (image - mean[:, None, None]) / std[:, None, None]
            image[raw == NODATA] = 0.0  # no data sits at the mean, not at -mean/std
        sample: dict[str, Any] = {}
        dates = _dates(descriptions, row["image"])
        if dates is not None:
            image = image.reshape(len(dates), len(descriptions) // len(dates), *image.shape[1:])
            sample["dates"] = dates
        sample["image"] = torch.from_numpy(np.ascontiguousarray(image))
        for layer in self.layers:
            with open_image(self.storage, row[LAYERS[layer]]) as src:
                values = src.read(1)
            if values.shape != raw.shape[1:]:
                raise InputDataError(f"{self.storage.url(row[LAYERS[layer]])} is {values.shape}, its image "
                                     f"{raw.shape[1:]}: rewrite the chip (run its cell again with --force)")
            sample[layer] = torch.from_numpy(values.astype(np.int64))
        sample["bounds"] = torch.tensor([row["left"], row["bottom"], row["right"], row["top"]], dtype=torch.float64)
        sample["crs"] = str(row["crs"])
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample

    def _scale(self, descriptions: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std per image band from the stats: by description (band and date), else the band's
        statistics pooled over all dates (a stack whose dates the train split lacks)."""
        if descriptions in self._scales:
            return self._scales[descriptions]
        assert self.stats is not None
        exact = {b["description"]: b for b in self.stats["bands"]}
        pooled = {b["band"]: b for b in self.stats.get("pooled", ())}
        means, stds, empty = [], [], []
        for text in descriptions:
            entry = exact.get(text) or pooled.get(parse_band_description(text)[1])
            if entry is None:
                raise InputDataError(f"stats.json of {self.storage} has no statistics for band {text!r}; recompute "
                                     "them (cropchips index --output-dir ROOT) or pass normalize=False")
            if entry.get("mean") is None:
                empty.append(text)
            means.append(entry.get("mean") or 0.0)
            stds.append(entry.get("std") or 1.0)  # also for std 0: a constant band stays finite
        if empty:
            log.warning("%d bands have no valid pixel in the %s split of stats.json and are left unscaled: %s",
                        len(empty), self.stats.get("split"), ", ".join(empty))
        scale = np.array(means, np.float32), np.array(stds, np.float32)
        self._scales[descriptions] = scale
        return scale

    # ------------------------------------------------------------------ display

    def plot(self, sample: Mapping[str, Any], show_titles: bool = True, suptitle: str | None = None) -> Any:
        """A matplotlib Figure of the sample: the RGB image (B04, B03, B02, each stretched between its
        2nd and 98th percentile), the mask (a fixed colour per class, 255 grey), and ``prediction``
        when the sample has one. A time series shows its date with the most valid pixels."""
        try:
            from matplotlib.colors import ListedColormap
            from matplotlib.figure import Figure
            from matplotlib.patches import Patch
        except ImportError as exc:
            raise ImportError(f"ChipDataset.plot needs matplotlib ({exc}); install it with: "
                              "pip install 'cropchips[torch]'") from exc
        names = self.band_names
        missing = [band for band in RGB_BANDS if band not in names]
        if missing:
            raise ValueError(f"plot shows B04, B03, B02 as RGB; the images lack {missing} (their bands: {names})")
        image = np.asarray(sample["image"], dtype=np.float32)
        label = ""
        if image.ndim == 4:
            rgb_all = image[:, [names.index(b) for b in RGB_BANDS]]
            t = int(np.argmax((rgb_all != 0).any(axis=1).sum(axis=(1, 2))))
            rgb = rgb_all[t]
            label = f" ({sample['dates'][t]})" if "dates" in sample else f" (time step {t})"
        else:
            rgb = image[[names.index(b) for b in RGB_BANDS]]
        rgb = _stretch(rgb)

        panels = [("Image" + label, rgb, None)]
        colours = ListedColormap([CLASS_COLOURS[v] for v in sorted(CLASS_COLOURS)])
        for key, title in (("mask", "Mask"), ("prediction", "Prediction")):
            if key in sample:
                panels.append((title, _colour_index(np.asarray(sample[key])), colours))
        figure = Figure(figsize=(4 * len(panels), 4.4), layout="constrained")
        axes = figure.subplots(1, len(panels), squeeze=False)[0]
        present: set[int] = set()
        for axis, (title, data, cmap) in zip(axes, panels):
            if cmap is None:
                axis.imshow(data.transpose(1, 2, 0))
            else:
                axis.imshow(data, cmap=cmap, vmin=-0.5, vmax=len(CLASS_COLOURS) - 0.5, interpolation="nearest")
                present |= {sorted(CLASS_COLOURS)[i] for i in np.unique(data)}
            axis.set_axis_off()
            if show_titles:
                axis.set_title(title)
        if present:
            from cropchips.fields.classes import CLASS_NAMES

            handles = [Patch(color=CLASS_COLOURS[v], label=f"{v} {CLASS_NAMES.get(v, 'ignore')}")
                       for v in sorted(present)]
            axes[-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
        if suptitle:
            figure.suptitle(suptitle)
        return figure


def _dates(descriptions: Sequence[str], what: str) -> list[str] | None:
    """The bin dates of a dated (time-series) image, in order, or None for an undated one; the image
    must be bin-major with the same bands in each bin."""
    parsed = [parse_band_description(text) for text in descriptions]
    dated = [date is not None for date, _ in parsed]
    if not any(dated):
        return None
    if not all(dated):
        raise InputDataError(f"{what}: some band descriptions carry a date and some do not ({list(descriptions)}); "
                             "a time series names every band 'YYYY-MM-DD BAND'")
    dates = list(dict.fromkeys(date for date, _ in parsed))
    per_date = len(parsed) // len(dates)
    expected = [(date, band) for date in dates for _, band in parsed[:per_date]]
    if len(parsed) % len(dates) or parsed != expected:
        raise InputDataError(f"{what}: the bands are not bin-major with the same bands per date "
                             f"({list(descriptions)}); rewrite the chip with this version of cropchips")
    return dates  # type: ignore[return-value]


def _stretch(rgb: np.ndarray) -> np.ndarray:
    """Each channel scaled to 0..1 between its 2nd and 98th percentile over the valid pixels."""
    valid = (rgb != 0).any(axis=0)
    out = np.zeros_like(rgb, dtype=np.float32)
    for c in range(rgb.shape[0]):
        values = rgb[c][valid]
        if values.size == 0:
            continue
        lo, hi = np.percentile(values, (2, 98))
        out[c] = np.clip((rgb[c] - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    out[:, ~valid] = 0.0
    return out


def _colour_index(mask: np.ndarray) -> np.ndarray:
    """Mask values -> positions in the sorted CLASS_COLOURS (values without a colour show as ignore)."""
    values = sorted(CLASS_COLOURS)
    lookup = np.full(256, values.index(255), dtype=np.int64)
    for i, value in enumerate(values):
        lookup[value] = i
    clipped = np.where((mask >= 0) & (mask <= 255), mask, 255).astype(np.int64)
    return lookup[clipped]


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A batch for ``DataLoader(collate_fn=collate)``: tensors stacked (images must share a shape),
    ``crs`` and ``dates`` as lists, one entry per sample."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
