"""The HTML report: self-contained, charts true to the masks, rendered by a real browser; quicklook PNGs."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import warnings
from collections import Counter
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile

from cropchips.dataset.index import SplitPolicy, finalize
from cropchips.plan.grid import Grid
from cropchips.sources.hrefs import HrefPolicy
from cropchips.plan.plan import make_plan, record_params
from cropchips.sources.sentinel2 import BANDS
from cropchips.dataset.report import (
    OVERLAY_ALPHA,
    PALETTE,
    QUICKLOOK_GAP,
    QUICKLOOKS_DIR,
    STATUS_COLOURS,
    CellStatus,
    _subsample,
    build_report,
    cells_from_results,
    encode_png,
    grid_from_header,
    main,
    overlay_classes,
    quicklook,
    read_rgb,
    stretch_rgb,
)
from cropchips.raster.write import write_chip
from helpers import SpecProcessor

CHIP = 64
#: The neutral grey of label 255 (ignore), written out here rather than read from the palette.
IGNORE_GREY = "#9e9e9e"
GALLERY = 5
LAYERS = ("classes", "instances", "boundaries")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dataset(sample_area, sample_master_options, tmp_path_factory):
    """The sample area processed task by task (no Kafka) with all three label layers. The master splits
    blocks of one cell (2 km), so the four cells get train, val and test."""
    out = tmp_path_factory.mktemp("report")
    options = replace(sample_master_options, spec=replace(sample_master_options.spec, split_block_size=2000.0,
                                                          split_ratios=(0.5, 0.25, 0.25), chip_size=CHIP))
    plan = make_plan(options)
    grid = plan.grid
    processor = SpecProcessor("r@test", output_dir=out, gpkg=str(sample_area.gpkg), layer=sample_area.layer,
                              chip_size=CHIP, max_chips_per_cell=8, labels=LAYERS,
                              hrefs=HrefPolicy(local_dirs=(sample_area.root.resolve(),)))
    results = [processor.process(task) for task in plan.tasks]
    assert all(r.status == "ok" for r in results)
    finalize(out, policy=SplitPolicy(block_size_m=400, ratios=(0.5, 0.25, 0.25)))
    return out, grid, plan, results, plan.header(record_params(options, plan))


def wider_cells(grid: Grid) -> list[tuple]:
    """The sample's cells (ok) plus a column of each other status east of them (same grid id)."""
    wide = Grid(start_x=grid.start_x, start_y=grid.start_y, step=grid.step, x_cells=grid.x_cells + 2,
                y_cells=grid.y_cells)
    extra = iter([("no_scenes", "no Sentinel-2 scene covers the cell"), ("no_fields", None),
                  ("failed", "internal error: boom"), ("no_scenes", None)])
    cells = []
    for cell in wide.cells():
        status, error = ("ok", None) if cell.col < grid.x_cells else next(extra)
        cells.append((cell.id, cell.bbox, status, error))
    return cells


class Elements(HTMLParser):
    """Every start tag as (tag, attributes); the text of <title> elements inside SVG is not needed."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, tag: str, cls: str | None = None) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag and (cls is None or cls in a.get("class", "").split())]


def decode_png(data: bytes) -> np.ndarray:
    """A PNG decoded by GDAL (not by our encoder's own logic): (bands, rows, cols)."""
    assert data[:8] == PNG_SIGNATURE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile(data) as memfile, memfile.open() as src:
            assert src.driver == "PNG"
            return src.read()


def expected_class_pixels(out: Path, index: gpd.GeoDataFrame | None = None) -> Counter:
    """Pixels per mask value, counted from the mask files (of the index, else every mask in the folder)."""
    totals: Counter = Counter()
    paths = [out / rel for rel in index["mask"]] if index is not None else sorted((out / "masks").glob("*.tif"))
    for path in paths:
        with rasterio.open(path) as src:
            classes, counts = np.unique(src.read(1), return_counts=True)
        totals.update({int(c): int(n) for c, n in zip(classes, counts)})
    return totals


def section(text: str, section_id: str) -> str:
    """The HTML of one ``<section id=...>`` of the page."""
    match = re.search(rf'<section id="{section_id}"[^>]*>(.*?)</section>', text, re.S)
    assert match, section_id
    return match.group(1)


def plain(fragment: str) -> str:
    """The text of an HTML fragment: tags as spaces (none before , ; or a closing parenthesis), blanks
    (narrow no-break spaces too) collapsed."""
    text = " ".join(re.sub(r"<[^>]+>", " ", fragment).replace("\u202f", " ").split())
    return re.sub(r" ([,;)])", r"\1", text)


def class_rows(fragment: str) -> dict[int, str]:
    """The text of each ``<tr data-class=K>`` row of a table, by K."""
    return {int(k): plain(row) for k, row in re.findall(r'<tr[^>]*data-class="(\d+)"[^>]*>(.*?)</tr>', fragment, re.S)}


def summary_line(text: str, key: str) -> str | None:
    """The text of the summary's ``data-summary=KEY`` line, None when the summary has none."""
    match = re.search(rf'<p class="summary-line" data-summary="{key}">(.*?)</p>', section(text, "summary"), re.S)
    return plain(match.group(1)) if match else None


def copy_dataset(out: Path, to: Path, *also_ignored: str) -> Path:
    """A copy of the dataset folder without its report and quicklooks (and ``also_ignored``)."""
    shutil.copytree(out, to, ignore=shutil.ignore_patterns("report.html", QUICKLOOKS_DIR, *also_ignored))
    return to


def test_report_is_self_contained_and_true_to_the_masks(dataset):
    out, grid, _, _, _ = dataset
    cells = wider_cells(grid)
    path = build_report(out, cells=cells, run_summary={"run_id": "run-report", "tasks_total": 4, "tasks_done": 4,
                                                       "elapsed_s": 3.2, "failures": {}}, max_gallery=GALLERY)
    assert path == out / "report.html" and path.is_file()
    assert not list(out.glob(".tmp~*")) and not (out / QUICKLOOKS_DIR).exists()
    text = path.read_text()
    page = Elements(text)
    index = gpd.read_parquet(out / "index.parquet")
    assert set(index["split"]) == {"train", "val", "test"}

    # Nothing outside the file: no URL anywhere, no script, every src and href an inline data URI.
    assert not re.search(r"https?://", text) and not page.find("script") and not page.find("link")
    refs = [a[k] for _, a in page.elements for k in ("src", "href", "xlink:href") if k in a]
    assert refs and all(ref.startswith("data:image/png;base64,") for ref in refs)
    assert "url(" not in text and "@import" not in text

    # The gallery: GALLERY chips, each image a real PNG equal to the chip's quicklook.
    images = page.find("img", "quicklook")
    assert len(images) == GALLERY
    names = [a["alt"].split(":")[0] for a in images]
    assert names == sorted(names) and set(names) <= set(index["name"])
    assert len({n.rsplit("-chip", 1)[0] for n in names}) == index["cell_id"].nunique()  # every cell shown
    for img, name in zip(images, names, strict=True):
        pixels = decode_png(base64.b64decode(img["src"].split(",", 1)[1]))
        assert pixels.shape == (3, CHIP, 2 * CHIP + QUICKLOOK_GAP)
        assert (int(img["width"]), int(img["height"])) == (2 * CHIP + QUICKLOOK_GAP, CHIP)
        row = index[index["name"] == name].iloc[0]
        assert np.array_equal(pixels.transpose(1, 2, 0), quicklook(out / row["image"], out / row["mask"]))
    assert len(Elements(text).find("figure", "chip")) == GALLERY

    # One bar per class present, heights proportional to the pixel counts of the masks.
    expected = expected_class_pixels(out, index)
    bars = {int(a["data-class"]): a for a in page.find("rect", "bar")}
    assert set(bars) == {k for k, n in expected.items() if n > 0}
    peak = max(expected.values())
    tallest = max(float(a["height"]) for a in bars.values())
    for k, bar in bars.items():
        assert int(bar["data-pixels"]) == expected[k]
        assert float(bar["height"]) / tallest == pytest.approx(expected[k] / peak, abs=1e-4)
        assert bar["fill"] == PALETTE[k]
    # The legend uses the same colours.
    for k in bars:
        assert f'<tr data-class="{k}"><td><span class="swatch" style="background:{PALETTE[k]}">' in text

    # 255 (ignore) is counted, drawn and named like the classes, in its grey; 0 reads "no field".
    assert expected[255] > 0 and expected[0] > 0  # the sample has fields of no class, pixels without data
    assert bars[255]["fill"] == IGNORE_GREY and PALETTE[255] == IGNORE_GREY
    assert len(set(PALETTE.values())) == len(PALETTE)  # 0 (no field) and 255 (ignore) differ in colour
    balance = section(text, "class-balance")
    assert f'<tr data-class="255"><td><span class="swatch" style="background:{IGNORE_GREY}">' in balance
    rows = class_rows(balance)
    assert sorted(rows) == [*range(9), 255]
    whole = sum(expected.values())
    assert rows[255] == f"255 ignore: no class / no data {expected[255]:,} {100 * expected[255] / whole:.1f} %".replace(
        ",", " ")
    assert rows[0].startswith("0 no field ") and rows[5].startswith("5 cereals ")
    assert "unlabelled" not in text

    # Each split's class mix has its 255 row, the share of the split's mask pixels.
    mix = class_rows(section(text, "split-counts").split('id="split-classes"', 1)[1])
    assert 255 in mix and mix[255].startswith("255 ignore: no class / no data ")
    columns = [f"class_{k}_pixels" for k in (*range(9), 255)]
    shares = [f"{100 * part[columns[-1]].sum() / part[columns].to_numpy().sum():.1f} %"
              for part in (index[index["split"] == split] for split in ("train", "val", "test"))]
    assert mix[255] == "255 ignore: no class / no data " + " ".join(shares)

    # The gallery legend names 255 in its grey; 0 is never drawn, so it has no key there.
    gallery = section(text, "gallery")
    assert (f'<span class="key" data-class="255"><span class="swatch" style="background:{IGNORE_GREY}"></span>'
            '255 ignore: no class / no data</span>') in gallery
    assert 'data-class="0"' not in gallery and "255, ignore, in grey" in gallery

    # The summary names the label layers, each with the number of chips that have it; no time bins here.
    n = len(index)
    assert summary_line(text, "label-layers") == (f"Label layers: classes ({n} chips), instances ({n} chips), "
                                                  f"boundaries ({n} chips)")
    assert summary_line(text, "time-bins") is None

    # Chips per split, as in the index.
    split_rows = {a["data-split"] for a in page.find("tr") if "data-split" in a}
    assert split_rows >= {"train", "val", "test"}
    for split, n in index["split"].value_counts().items():
        assert re.search(rf'<tr data-split="{split}">.*?<td class="num count">{n}</td>', text)

    # The map: one shape per cell, in its status colour, and one footprint per chip.
    shapes = page.find("rect", "cell")
    assert len(shapes) == len(cells)
    by_id = {a["data-cell-id"]: a for a in shapes}
    for cell_id, _, status, _ in cells:
        assert by_id[cell_id]["data-status"] == status and by_id[cell_id]["fill"] == STATUS_COLOURS[status]
    assert len(page.find("polygon", "footprint")) == len(index)
    # Cells without chips are listed with their reasons.
    assert "internal error: boom" in text and 'id="problems"' in text


def test_report_renders_in_headless_chromium(dataset, tmp_path):
    browser = shutil.which("chromium")
    if browser is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed; CI needs it (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    out, grid, _, _, _ = dataset
    cells = wider_cells(grid)
    path = build_report(out, cells=cells, max_gallery=GALLERY)
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    env = {**os.environ, "HOME": str(tmp_path)}
    shot = tmp_path / "shot.png"
    done = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,2400", path.as_uri()],
                          check=False, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    dom = subprocess.run([*common, "--dump-dom", path.as_uri()], check=False, capture_output=True, text=True,
                         timeout=120, env=env)
    assert dom.returncode == 0, dom.stderr[-2000:]

    rendered = Elements(dom.stdout)
    assert len(rendered.find("img", "quicklook")) == GALLERY
    for section in ("summary", "class-balance", "split-counts", "cell-map", "gallery"):
        assert any(a.get("id") == section for _, a in rendered.elements), section
    assert rendered.find("svg", "chart") and rendered.find("svg", "map")
    assert len(rendered.find("rect", "bar")) > 1
    assert len(rendered.find("rect", "cell")) == len(cells)
    assert len(rendered.find("polygon", "footprint")) == len(gpd.read_parquet(out / "index.parquet"))

    pixels = decode_png(shot.read_bytes())
    assert pixels.shape[1:] == (2400, 1280)
    colours = np.unique(pixels[:3].reshape(3, -1).T, axis=0)
    assert len(colours) > 100 and pixels[:3].std() > 10  # text, charts and photos, not a blank page


def test_quicklooks_one_valid_png_per_chip(dataset, capsys, tmp_path):
    out = tmp_path / "dataset"
    shutil.copytree(dataset[0], out, ignore=shutil.ignore_patterns("report.html", QUICKLOOKS_DIR))
    assert main([str(out), "--quicklooks", "--max-gallery", "3"]) == 0
    assert '"report"' in capsys.readouterr().out
    index = gpd.read_parquet(out / "index.parquet")
    files = sorted((out / QUICKLOOKS_DIR).iterdir())
    assert [f.name for f in files] == sorted(f"{n}.png" for n in index["name"])  # nothing else: no .aux.xml, no temp
    for png in files:
        pixels = decode_png(png.read_bytes())
        assert pixels.shape == (3, CHIP, 2 * CHIP + QUICKLOOK_GAP)
        assert np.all(pixels[:, :, CHIP:CHIP + QUICKLOOK_GAP] == 255)  # the white gap between the halves
        assert pixels.std() > 0
    assert len(Elements((out / "report.html").read_text()).find("img", "quicklook")) == 3


def test_cells_default_to_the_chips_and_come_from_the_results(dataset):
    out, grid, plan, results, header = dataset
    index = gpd.read_parquet(out / "index.parquet")
    page = Elements(build_report(out, max_gallery=0).read_text())
    shapes = {a["data-cell-id"]: a for a in page.find("rect", "cell")}
    assert set(shapes) == set(index["cell_id"]) and {a["data-status"] for a in shapes.values()} == {"ok"}
    assert not page.find("img", "quicklook")

    # The monitor's view: statuses from the results, boxes from the grid in the run header.
    assert grid_from_header(header) == grid and grid_from_header(None) is None
    cells = cells_from_results(results, grid_from_header(header))
    assert cells == sorted((CellStatus(t.cell.id, t.cell.bbox, "ok") for t in plan.tasks), key=lambda c: c.cell_id)
    failed = results[0].__class__(run_id="run-report", task_id=results[0].task_id, cell_id=results[0].cell_id,
                                  worker_id="x@y", status="failed", error="disk full")
    worst = {c.cell_id: c for c in cells_from_results([*results, failed])}
    assert worst[results[0].cell_id] == CellStatus(results[0].cell_id, None, "failed", "disk full")
    page = Elements(build_report(out, cells=list(worst.values()), max_gallery=0).read_text())
    shapes = {a["data-cell-id"]: a for a in page.find("rect", "cell")}
    assert shapes[results[0].cell_id]["fill"] == STATUS_COLOURS["failed"] and len(shapes) == len(worst)


def test_report_without_an_index_or_chips(tmp_path, dataset):
    out, _, _, _, _ = dataset
    copy = tmp_path / "noindex"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("index.parquet", "report.html", QUICKLOOKS_DIR))
    text = build_report(copy, max_gallery=2).read_text()
    assert '<tr data-split="unindexed">' in text and len(Elements(text).find("img", "quicklook")) == 2
    # The sidecars' pixel counts, 255 among them, and label layers stand in for the index's.
    expected = expected_class_pixels(copy)
    assert expected[255] > 0
    bars = {int(a["data-class"]): int(a["data-pixels"]) for a in Elements(text).find("rect", "bar")}
    assert bars == {k: n for k, n in expected.items() if n}
    n = len(list((copy / "metadata").glob("*.json")))
    assert n == len(list((copy / "masks").glob("*.tif"))) > 0
    assert summary_line(text, "label-layers") == (f"Label layers: classes ({n} chips), instances ({n} chips), "
                                                  f"boundaries ({n} chips)")
    empty = tmp_path / "empty"
    (empty / "metadata").mkdir(parents=True)
    page = Elements(build_report(empty).read_text())
    assert not page.find("img", "quicklook") and not page.find("rect", "bar") and not page.find("rect", "cell")


def test_report_of_an_older_index_without_the_ignore_label(dataset, tmp_path):
    """An index written before 255 and the label layers (no class_255_pixels, label_layers, instances,
    boundaries nor bin_dates) still renders: 255 listed with 0 pixels, every chip with its classes mask."""
    out = dataset[0]
    copy = copy_dataset(out, tmp_path / "older")
    index = gpd.read_parquet(copy / "index.parquet")
    older = index.drop(columns=["class_255_pixels", "label_layers", "instances", "boundaries", "bin_dates"])
    older.to_parquet(copy / "index.parquet", index=False)
    text = build_report(copy, max_gallery=1).read_text()
    page = Elements(text)
    bars = {int(a["data-class"]): int(a["data-pixels"]) for a in page.find("rect", "bar")}
    assert 255 not in bars and bars == {k: int(index[f"class_{k}_pixels"].sum()) for k in range(9)
                                        if index[f"class_{k}_pixels"].sum() > 0}
    balance = section(text, "class-balance")
    assert '<tr class="absent" data-class="255">' in balance
    assert class_rows(balance)[255] == "255 ignore: no class / no data 0 0.0 %"
    assert 255 not in class_rows(section(text, "split-counts"))
    assert 'data-class="255"' in section(text, "gallery") and len(page.find("img", "quicklook")) == 1
    assert summary_line(text, "label-layers") == f"Label layers: classes ({len(index)} chips)"
    assert summary_line(text, "time-bins") is None


def test_report_lists_the_label_layers_and_time_bins_of_the_index(dataset, tmp_path):
    """Chips with fewer layers are counted per layer; a time series' bins (first days) are listed."""
    out = dataset[0]
    copy = copy_dataset(out, tmp_path / "bins")
    index = gpd.read_parquet(copy / "index.parquet").sort_values("name").reset_index(drop=True)
    n = len(index)
    assert n > 4
    layers = [["classes"]] * 3 + [["classes", "instances"]] + [list(v) for v in index["label_layers"][4:]]
    index["label_layers"] = layers
    index["bin_dates"] = [["2023-05-15", "2023-06-15"]] * n
    index.to_parquet(copy / "index.parquet", index=False)
    text = build_report(copy, max_gallery=0).read_text()
    assert summary_line(text, "label-layers") == (f"Label layers: classes ({n} chips), instances ({n - 3} chips), "
                                                  f"boundaries ({n - 4} chips)")
    assert summary_line(text, "time-bins") == "2 time bins: 2023-05-15, 2023-06-15"

    # Chips without bins, and with other bins, are said to be so.
    index["bin_dates"] = [[]] + [["2023-05-15"]] + [["2023-05-15", "2023-06-15"]] * (n - 2)
    index.to_parquet(copy / "index.parquet", index=False)
    text = build_report(copy, max_gallery=0).read_text()
    assert summary_line(text, "time-bins") == (f"2 time bins: 2023-05-15, 2023-06-15 (the chips have 2 different "
                                               f"sets of bins; {n - 1} of {n} chips are binned)")
    index["bin_dates"] = [["2023-07-01"]] * n
    index.to_parquet(copy / "index.parquet", index=False)
    assert summary_line(build_report(copy, max_gallery=0).read_text(), "time-bins") == "1 time bin: 2023-07-01"


def test_png_encoder_stretch_and_overlay(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(rgb)).transpose(1, 2, 0), rgb)
    grey = rng.integers(0, 256, (3, 11), dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(grey))[0], grey)
    with pytest.raises(ValueError):
        encode_png(rgb.astype(np.uint16))

    bands = np.stack([np.arange(1, 101, dtype=np.uint16).reshape(10, 10) * (i + 1) for i in range(3)])
    bands[:, 0, 0] = 0
    bands[1, 9, 9] = 0  # nodata in one band: black
    stretched = stretch_rgb(bands)
    assert stretched.shape == (10, 10, 3) and np.all(stretched[0, 0] == 0) and np.all(stretched[9, 9] == 0)
    assert stretched[..., 0].max() == 255 and stretched[1, 5, 0] < stretched[5, 5, 0]
    assert not stretch_rgb(np.zeros((3, 4, 4), dtype=np.uint16)).any()

    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[2, 3] = 5
    over = overlay_classes(stretched, mask)
    colour = np.array([int(PALETTE[5][i:i + 2], 16) for i in (1, 3, 5)])
    assert np.array_equal(over[2, 3], np.round((1 - OVERLAY_ALPHA) * stretched[2, 3] + OVERLAY_ALPHA * colour))
    assert np.array_equal(np.delete(over.reshape(-1, 3), 23, axis=0), np.delete(stretched.reshape(-1, 3), 23, axis=0))
    # 255 (ignore) is drawn in its neutral grey (0x9e each channel), 0 (no field) left clear.
    mask[7, 1] = 255
    over = overlay_classes(stretched, mask)
    assert np.array_equal(over[7, 1], np.round((1 - OVERLAY_ALPHA) * stretched[7, 1] + OVERLAY_ALPHA * 0x9E))
    assert np.array_equal(over[0, 0], stretched[0, 0]) and np.array_equal(over[4, 4], stretched[4, 4])

    # Gallery images of big chips are subsampled, both halves alike, the white gap kept.
    big = np.zeros((600, 2 * 600 + QUICKLOOK_GAP, 3), dtype=np.uint8)
    big[:, 600:600 + QUICKLOOK_GAP] = 255
    small = _subsample(big, 256)
    assert small.shape == (200, 2 * 200 + QUICKLOOK_GAP, 3) and np.all(small[:, 200:200 + QUICKLOOK_GAP] == 255)
    assert _subsample(small, 256) is small


def test_time_series_quicklook_uses_the_fullest_latest_date(tmp_path):
    dates = ("2023-05-20", "2023-06-09", "2023-06-29")
    image = np.full((len(dates) * len(BANDS), 8, 8), 500, dtype=np.uint16)
    for d in range(len(dates)):
        image[d * len(BANDS):(d + 1) * len(BANDS)] += 100 * d  # date d has DN 500 + 100 d
    image[2 * len(BANDS) + 2, :4] = 0  # the last date's B04 has a nodata half
    descriptions = tuple(f"{date} {band}" for date in dates for band in BANDS)
    write_chip(tmp_path, "stack-chip00", image, np.zeros((8, 8), dtype=np.uint8), crs="EPSG:32630",
               transform=Affine(10, 0, 500000, 0, -10, 4100000), descriptions=descriptions)
    rgb = read_rgb(tmp_path / "images" / "stack-chip00.tif")
    assert rgb.shape == (3, 8, 8) and np.all(rgb == 600)  # the second date: as full as the first, and later
