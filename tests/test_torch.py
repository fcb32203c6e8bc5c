"""cropchips.torch.ChipDataset and examples/train_segmentation.py on datasets the real pipeline writes.

The sample area (cropchips.demo.sample: Sentinel-2 COGs, Earth Search items, EuroCrops fields)
is planned with one split block per cell, so the master gives its four cells train, val and
test; the worker's processing writes 32 px chips with every label layer, and finalize writes the
index, stats.json and the catalog. A second dataset is a binned time series (P15D medians).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import rasterio
from conftest import IN_CI, REPO

if IN_CI:
    import torch  # CI installs requirements-dev.txt: these tests must run there, never skip
else:
    torch = pytest.importorskip("torch", reason="cropchips.torch needs PyTorch: pip install 'cropchips[torch]'")

from cropchips.dataset.index import finalize
from cropchips.dataset.stats import STATS_NAME
from cropchips.errors import ConfigError, InputDataError
from cropchips.output.storage import open_storage
from cropchips.plan.plan import make_plan
from cropchips.sources.hrefs import HrefPolicy
from cropchips.torch import CLASS_COLOURS, ChipDataset, collate
from helpers import SpecProcessor

CHIP = 32
SPLITS = ("train", "val", "test")
S2 = ("B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12")


def _matplotlib():
    if IN_CI:
        import matplotlib
        return matplotlib
    return pytest.importorskip("matplotlib", reason="ChipDataset.plot needs matplotlib: pip install 'cropchips[torch]'")


def _build(sample_area, sample_master_options, out, *, chips_per_cell, **settings):
    """Plan the sample area with one split block per cell, process every task, finalize."""
    spec = replace(sample_master_options.spec, split_block_size=2000.0)  # ~1 cell (0.02 deg) per block
    plan = make_plan(replace(sample_master_options, spec=spec))
    assert sorted({t.split for t in plan.tasks}) == sorted(SPLITS)  # four blocks: every split once
    processor = SpecProcessor("t@test", output_dir=out, gpkg=str(sample_area.gpkg), layer=sample_area.layer,
                              chip_size=CHIP, max_chips_per_cell=chips_per_cell,
                              hrefs=HrefPolicy(local_dirs=(sample_area.root.resolve(),)), **settings)
    assert all(processor.process(task).status == "ok" for task in plan.tasks)
    finalize(out)
    return out, pd.read_parquet(out / "index.parquet")


@pytest.fixture(scope="module")
def chips(sample_area, sample_master_options, tmp_path_factory):
    """One image per chip, with classes, instances and boundaries."""
    return _build(sample_area, sample_master_options, tmp_path_factory.mktemp("torch-chips"), chips_per_cell=12,
                  labels=("classes", "instances", "boundaries"))


@pytest.fixture(scope="module")
def series(sample_area, sample_master_options, tmp_path_factory):
    """A time series: the season cut into 15-day bins, one median per bin."""
    return _build(sample_area, sample_master_options, tmp_path_factory.mktemp("torch-series"), chips_per_cell=3,
                  composite="median", temporal_period="P15D")


def _read(path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def test_length_follows_the_index_per_split(chips):
    root, index = chips
    counts = index["split"].value_counts()
    assert all(counts.get(s, 0) > 0 for s in SPLITS)
    for split in SPLITS:
        dataset = ChipDataset(root, split=split)
        assert len(dataset) == counts[split]
        assert list(dataset.chips["name"]) == sorted(index.loc[index["split"] == split, "name"])
    assert len(ChipDataset(root)) == len(index) == 48
    assert len(ChipDataset(root, split=["val", "test"])) == counts["val"] + counts["test"]


def test_samples_hold_the_chips_pixels_labels_and_place(chips):
    root, index = chips
    dataset = ChipDataset(root, split="train", layers=("mask", "instances", "boundaries"))
    rows = index.set_index("name")
    seen_classes: set[int] = set()
    for i in range(len(dataset)):
        sample = dataset[i]
        row = rows.loc[dataset.chips["name"][i]]
        assert set(sample) == {"image", "mask", "instances", "boundaries", "bounds", "crs"}
        assert sample["image"].dtype == torch.float32 and tuple(sample["image"].shape) == (10, CHIP, CHIP)
        np.testing.assert_array_equal(sample["image"].numpy(), _read(root / row["image"]).astype(np.float32))
        for key, column in (("mask", "mask"), ("instances", "instances"), ("boundaries", "boundaries")):
            assert sample[key].dtype == torch.int64 and tuple(sample[key].shape) == (CHIP, CHIP)
            np.testing.assert_array_equal(sample[key].numpy(), _read(root / row[column])[0])
        seen_classes |= set(np.unique(sample["mask"].numpy()).tolist())
        assert set(np.unique(sample["boundaries"].numpy()).tolist()) <= {0, 1, 2}
        # A field pixel has an instance id; a no-field pixel has none.
        assert not ((sample["mask"] == 0) & (sample["instances"] > 0)).any()
        assert sample["bounds"].dtype == torch.float64
        assert sample["bounds"].tolist() == [row["left"], row["bottom"], row["right"], row["top"]]
        assert sample["crs"] == row["crs"] and sample["crs"].startswith("EPSG:326")
    assert seen_classes <= set(range(9)) | {255} and len(seen_classes - {0, 255}) >= 2
    assert dataset.band_names == S2
    # Batches of a DataLoader.
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate)
    batch = next(iter(loader))
    assert tuple(batch["image"].shape) == (4, 10, CHIP, CHIP) and tuple(batch["mask"].shape) == (4, CHIP, CHIP)
    assert tuple(batch["bounds"].shape) == (4, 4) and len(batch["crs"]) == 4


def test_normalize_standardises_with_stats_json(chips, tmp_path):
    root, index = chips
    stats = json.loads((root / STATS_NAME).read_text())
    # stats.json (by finalize) describes the train images: B02's mean and std, recomputed here with numpy.
    train = index[index["split"] == "train"]
    b02 = np.concatenate([_read(root / rel)[0].ravel() for rel in train["image"]])
    b02 = b02[b02 != 0].astype(np.float64)
    entry = stats["bands"][0]
    assert entry["description"] == "B02" and stats["chips"] == len(train)
    assert entry["mean"] == pytest.approx(b02.mean(), rel=1e-12) and entry["std"] == pytest.approx(b02.std(), rel=1e-9)

    mean = np.array([b["mean"] for b in stats["bands"]], np.float32)
    std = np.array([b["std"] for b in stats["bands"]], np.float32)
    for normalize in (True, str(root / STATS_NAME)):
        dataset = ChipDataset(root, split="val", normalize=normalize)
        for i in (0, len(dataset) - 1):
            raw = _read(root / dataset.chips["image"][i]).astype(np.float32)
            expected = (raw - mean[:, None, None]) / std[:, None, None]
            expected[raw == 0] = 0.0
            np.testing.assert_allclose(dataset[i]["image"].numpy(), expected, rtol=1e-5, atol=1e-5)
    values = ChipDataset(root, split="train", normalize=True)[0]["image"]
    assert abs(float(values.mean())) < 3 and 0.05 < float(values.std()) < 5  # standardised, not raw DN

    # No stats file: a clear error, not silently raw pixels.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "index.parquet").write_bytes((root / "index.parquet").read_bytes())
    with pytest.raises(InputDataError, match="compute the statistics first"):
        ChipDataset(bare, normalize=True)


def test_a_time_series_gives_t_by_c_images_with_their_dates(series):
    root, index = series
    dataset = ChipDataset(root, split="train", normalize=False)
    stats = json.loads((root / STATS_NAME).read_text())
    for i in range(len(dataset)):
        sample = dataset[i]
        row = index.set_index("name").loc[dataset.chips["name"][i]]
        dates = list(row["bin_dates"])
        assert dates == ["2023-05-15", "2023-05-30", "2023-06-14", "2023-06-29"]
        assert sample["dates"] == dates
        assert tuple(sample["image"].shape) == (4, 10, CHIP, CHIP)
        raw = _read(root / row["image"]).astype(np.float32)
        np.testing.assert_array_equal(sample["image"].numpy(), raw.reshape(4, 10, CHIP, CHIP))
        assert sample["mask"].dtype == torch.int64 and tuple(sample["mask"].shape) == (CHIP, CHIP)
    # Standardised per band and per bin, each with its own statistics. The sample's scenes are of
    # 2023-05-20, -05-30 and -06-09: the last two bins have no data, stay 0 and have null statistics.
    assert [b["count"] > 0 for b in stats["bands"][::10]] == [True, True, False, False]
    normalized = ChipDataset(root, split="train", normalize=True)
    b8a = S2.index("B8A")
    for t in (0, 1):
        entry = stats["bands"][10 * t + b8a]
        assert (entry["date"], entry["band"]) == (dates[t], "B8A")
        raw = _read(root / dataset.chips["image"][0])[10 * t + b8a].astype(np.float32)
        got = normalized[0]["image"][t, b8a].numpy()
        assert (raw != 0).any()
        np.testing.assert_allclose(got[raw != 0], ((raw - entry["mean"]) / entry["std"])[raw != 0], rtol=1e-5,
                                   atol=1e-5)
    assert not normalized[0]["image"][2:].any()
    assert dataset.band_names == S2


def test_transforms_layers_and_bad_roots_are_handled(chips, series, tmp_path):
    root, _ = chips
    doubled = ChipDataset(root, split="val", transforms=lambda s: {**s, "image": s["image"] * 2})
    plain = ChipDataset(root, split="val")
    assert torch.equal(doubled[1]["image"], plain[1]["image"] * 2)
    assert set(ChipDataset(root, split="val", layers=("boundaries",))[0]) == {"image", "boundaries", "bounds", "crs"}
    with pytest.raises(InputDataError, match=r"have no instances layer.*labels: \[classes, instances\]"):
        ChipDataset(series[0], layers=("mask", "instances"))
    with pytest.raises(ConfigError, match="not label layers"):
        ChipDataset(root, layers=("classes",))
    with pytest.raises(ConfigError, match="split must be one of"):
        ChipDataset(root, split="training")
    with pytest.raises(InputDataError, match="has no index.parquet.*cropchips index --output-dir"):
        ChipDataset(tmp_path)
    with pytest.raises(IndexError):
        plain[len(plain)]


def test_a_dataset_in_an_object_store_reads_like_the_folder(chips, s3_bucket):
    root, index = chips
    url = f"s3://{s3_bucket}/chips"
    store = open_storage(url)
    val = index[index["split"] == "val"]
    for rel in ["index.parquet", STATS_NAME, *val["image"], *val["mask"], *val["instances"]]:
        store.write_bytes(rel, (root / rel).read_bytes())
    remote = ChipDataset(url, split="val", normalize=True, layers=("mask", "instances"))
    local = ChipDataset(root, split="val", normalize=True, layers=("mask", "instances"))
    assert len(remote) == len(local) == len(val)
    for i in (0, len(local) - 1):
        a, b = remote[i], local[i]
        assert a.keys() == b.keys() and a["crs"] == b["crs"]
        for key in ("image", "mask", "instances", "bounds"):
            assert torch.equal(a[key], b[key])


def test_plot_draws_rgb_and_a_fixed_colour_per_class(chips, series):
    matplotlib = _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgba

    root, _ = chips
    dataset = ChipDataset(root, split="train")
    sample = dataset[0]
    figure = dataset.plot(sample)
    assert isinstance(figure, matplotlib.figure.Figure)
    image_axis, mask_axis = figure.axes[:2]
    assert [image_axis.get_title(), mask_axis.get_title()] == ["Image", "Mask"]
    rgb = image_axis.images[0].get_array()
    assert rgb.shape == (CHIP, CHIP, 3) and 0 <= rgb.min() and rgb.max() <= 1 and rgb.max() > 0.9
    # The mask panel: each pixel drawn in its class's colour, 255 in grey.
    shown = mask_axis.images[0]
    mask = sample["mask"].numpy()
    colours = shown.cmap(shown.norm(shown.get_array()))
    for value in np.unique(mask):
        assert np.allclose(colours[mask == value], to_rgba(CLASS_COLOURS[int(value)]))
    assert to_rgba(CLASS_COLOURS[255])[:3] == pytest.approx((0.62, 0.62, 0.62), abs=0.01)
    FigureCanvasAgg(figure).draw()  # renders without a display

    with_prediction = dataset.plot({**sample, "prediction": torch.full((CHIP, CHIP), 255)}, show_titles=False)
    assert len(with_prediction.axes) >= 3 and with_prediction.axes[0].get_title() == ""
    in_time = ChipDataset(series[0], split="val")
    figure = in_time.plot(in_time[0])
    assert figure.axes[0].get_title().startswith("Image (2023-")


def test_plot_without_matplotlib_says_how_to_install_it(chips, monkeypatch):
    root, _ = chips
    dataset = ChipDataset(root, split="val")
    sample = dataset[0]
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'cropchips\[torch\]'"):
        dataset.plot(sample)


def test_importing_without_torch_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as if not installed
    monkeypatch.delitem(sys.modules, "cropchips.torch")
    with pytest.raises(ImportError, match=r"pip install 'cropchips\[torch\]'"):
        importlib.import_module("cropchips.torch")


# --- examples/train_segmentation.py -------------------------------------------------------------

def _example():
    spec = importlib.util.spec_from_file_location("train_segmentation", REPO / "examples" / "train_segmentation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_trains_a_unet_whose_loss_falls(chips):
    root, index = chips
    result = _example().main(["--root", str(root), "--epochs", "10", "--batch-size", "4", "--max-steps", "30",
                              "--lr", "3e-3"])
    losses = result["losses"]
    assert len(losses) == result["steps"] == 30 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert len(result["epoch_losses"]) == 5  # 24 train chips / 4 = 6 steps an epoch
    assert result["train_chips"] == int((index["split"] == "train").sum())
    assert result["val_chips"] == int((index["split"] == "val").sum())
    assert sorted(result["iou"]) == list(range(9))
    assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in result["iou"].values())
    # A class absent from val (neither true nor predicted) is NaN, not 0.
    matrix = np.array(result["confusion"])
    for k, value in result["iou"].items():
        assert math.isnan(value) == (matrix[k].sum() + matrix[:, k].sum() == 0)


def test_the_example_exits_non_zero_without_index_or_train_chips(chips, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "examples" / "train_segmentation.py"), "--root", str(tmp_path),
                           "--max-steps", "1"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 2 and "has no index.parquet" in done.stderr
    root, index = chips
    index[index["split"] != "train"].to_parquet(tmp_path / "index.parquet")
    with pytest.raises(InputDataError, match="no chip in its train split"):
        _example().main(["--root", str(tmp_path)])


def test_the_readmes_ten_lines_from_dataset_to_training_loop_run(chips):
    """The README's training snippet, as printed there, on a dataset the pipeline wrote."""
    import re

    readme = (REPO / "README.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "cropchips.torch" in block]
    root, index = chips
    assert '"demo-output/dataset"' in code and "ignore_index=255" in code
    namespace: dict = {}
    exec(compile(code.replace('"demo-output/dataset"', repr(str(root))), "README.md", "exec"), namespace)
    assert len(namespace["train"]) == int((index["split"] == "train").sum())
    assert namespace["sample"]["image"].shape == (10, CHIP, CHIP) and namespace["loss"].item() > 0
