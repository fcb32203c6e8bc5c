"""One task end to end on the sample area: chips, and idempotent re-processing through manifests."""

import json
from dataclasses import replace

import numpy as np
import pytest
import rasterio

from cropchips.sources.hrefs import HrefPolicy
from cropchips.output.manifest import manifest_path
from cropchips.sources.sentinel2 import BANDS
from cropchips.spec import DatasetSpec
from helpers import SpecProcessor


@pytest.fixture(scope="module")
def task(sample_task):
    return sample_task


def processor(sample_area, out, **over):
    settings = {"chip_size": 32, **over}
    return SpecProcessor("p@test", output_dir=out, gpkg=str(sample_area.gpkg), layer=sample_area.layer,
                         hrefs=HrefPolicy(local_dirs=(sample_area.root.resolve(),)), **settings)


def files(out):
    return {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*.tif")}


def test_finished_task_is_re_reported_without_redoing_it(sample_area, task, tmp_path):
    first = processor(sample_area, tmp_path).process(task)
    assert first.status == "ok" and len(first.chips) == 5 and not first.reused
    assert (tmp_path / manifest_path(task.cell.id)).exists()
    before = files(tmp_path)
    again = processor(sample_area, tmp_path).process(task)
    assert again.reused and again.status == "ok"
    assert again.chips == first.chips and again.scenes_used == first.scenes_used
    assert files(tmp_path) == before  # nothing rewritten
    forced = processor(sample_area, tmp_path, force=True).process(task)
    assert not forced.reused and forced.chips == first.chips
    assert all(files(tmp_path)[k] > v for k, v in before.items())


def test_missing_file_or_other_settings_mean_redo(sample_area, task, tmp_path):
    first = processor(sample_area, tmp_path).process(task)
    (tmp_path / first.chips[2].mask).unlink()
    redo = processor(sample_area, tmp_path).process(task)
    assert not redo.reused and (tmp_path / first.chips[2].mask).exists()
    # Fewer chips per cell is another dataset: refused in this folder, nothing touched...
    before = files(tmp_path)
    refused = processor(sample_area, tmp_path, max_chips_per_cell=2).process(task)
    assert refused.status == "failed" and "max_chips_per_cell (2 here, 5 in the folder)" in refused.error
    assert "master.py --force" in refused.error and files(tmp_path) == before
    # ...unless forced: a redo, and the chips it no longer makes are removed.
    fewer = processor(sample_area, tmp_path, max_chips_per_cell=2, force=True).process(task)
    assert not fewer.reused and len(fewer.chips) == 2
    assert sorted(p.stem for p in (tmp_path / "images").glob("*.tif")) == [c.name for c in fewer.chips]
    assert sorted(p.stem for p in (tmp_path / "masks").glob("*.tif")) == [c.name for c in fewer.chips]


def test_other_scenes_mean_another_task_id_and_a_redo(sample_area, task, tmp_path):
    processor(sample_area, tmp_path).process(task)
    fewer_scenes = replace(task, scenes=task.scenes[:1], task_id=task.task_id + "x")
    result = processor(sample_area, tmp_path).process(fewer_scenes)
    assert not result.reused and result.scenes_used == (task.scenes[0].id,)


def test_least_cloudy_uses_one_scene(sample_area, task, tmp_path):
    result = processor(sample_area, tmp_path, composite="least-cloudy").process(task)
    assert result.status == "ok" and len(result.scenes_used) == 1
    # The sample's first date is the clear one.
    assert "_20230520_" in result.scenes_used[0]


# ---------------------------------------------------------------------- the task's spec decides


def test_the_first_task_records_its_spec_in_the_folder_and_chips_name_it(sample_area, task, tmp_path):
    worker = processor(sample_area, tmp_path, chip_size=24, bands=("B04", "B03", "B02"))
    result = worker.process(task)
    spec = worker.task(task).spec
    assert result.status == "ok"
    folder = DatasetSpec.from_yaml(tmp_path / "dataset.yaml")
    assert folder == spec and folder.chip_size == 24
    for chip in result.chips:
        assert chip.dataset_id == spec.dataset_id() != DatasetSpec().dataset_id()
        with rasterio.open(tmp_path / chip.image) as src:
            assert (src.width, src.height, src.count, src.descriptions) == (24, 24, 3, ("B04", "B03", "B02"))
        sidecar = json.loads((tmp_path / "metadata" / f"{chip.name}.json").read_text())
        assert sidecar["dataset_id"] == spec.dataset_id()


def test_the_band_subset_holds_the_same_pixels_as_the_full_image(sample_area, task, tmp_path):
    full = processor(sample_area, tmp_path / "full").process(task)
    some = processor(sample_area, tmp_path / "some", bands=("B08", "B02")).process(task)
    assert [c.name for c in some.chips] == [c.name for c in full.chips]
    with rasterio.open(tmp_path / "full" / full.chips[0].image) as a, \
            rasterio.open(tmp_path / "some" / some.chips[0].image) as b:
        assert (b.read(1) == a.read(BANDS.index("B08") + 1)).all() and (b.read(2) == a.read(1)).all()


def test_a_grown_area_is_the_same_dataset_and_reuses_finished_cells(sample_area, task, tmp_path):
    processor(sample_area, tmp_path).process(task)
    grown = replace(task, spec=replace(task.spec, x_cells=task.spec.x_cells + 3, min_polygons=1))
    again = processor(sample_area, tmp_path).process(grown)
    assert again.status == "ok" and again.reused  # only the area changed: the cell's chips stand


def test_a_worker_whose_geopackage_differs_from_the_masters_refuses_the_task(sample_area, task, tmp_path):
    planted = replace(task, spec=replace(task.spec, gpkg_fingerprint="0123456789abcdef"))
    result = processor(sample_area, tmp_path).process(planted)
    assert result.status == "failed"
    assert f"the GeoPackage {sample_area.gpkg}" in result.error and "0123456789abcdef" in result.error
    assert not (tmp_path / "images").exists() or not list((tmp_path / "images").iterdir())


def test_the_masters_plan_carries_the_fingerprint_of_the_geopackage(sample_plan, sample_area):
    from cropchips.fields.gpkg import layer_fingerprint, open_layer

    fingerprint = layer_fingerprint(open_layer(sample_area.gpkg, sample_area.layer))
    assert {t.spec.gpkg_fingerprint for t in sample_plan.tasks} == {fingerprint}
    assert {t.spec.layer for t in sample_plan.tasks} == {sample_area.layer}


@pytest.mark.parametrize("whole_cell", [False, True])
def test_the_processor_reads_through_an_injected_reader_and_asks_for_the_specs_bands(sample_area, task, tmp_path,
                                                                                     whole_cell):
    """By default the bands are read over the box of the chips (``bands(..., within=box)``), after the quality
    bands over the whole grid; with ``read_whole_cell`` (or a reader without those reads) through ``read``."""
    from cropchips.processing import ProcessingOptions, TaskProcessor
    from cropchips.raster.read import CogReader

    class Recording(CogReader):
        def __init__(self):
            super().__init__(threads=2)
            self.calls = []

        def read(self, scenes, grid, source, **kwargs):
            self.calls.append(("read", len(scenes), kwargs["bands"], kwargs["max_scenes"]))
            return super().read(scenes, grid, source, **kwargs)

        def quality(self, scenes, grid, source):
            self.calls.append(("quality", len(scenes), (grid.height, grid.width)))
            return super().quality(scenes, grid, source)

        def bands(self, scenes, grid, source, *, bands, within):
            self.calls.append(("bands", len(scenes), bands, within))
            return super().bands(scenes, grid, source, bands=bands, within=within)

    reader = Recording()
    processor = TaskProcessor(ProcessingOptions(output_dir=tmp_path, gpkg=str(sample_area.gpkg),
                                                hrefs=HrefPolicy(local_dirs=(sample_area.root.resolve(),)),
                                                read_whole_cell=whole_cell), "rec@test", reader=reader)
    spec = replace(task.spec, chip_size=32, bands=("B04", "B08"), max_scenes=2)
    result = processor.process(replace(task, spec=spec))
    assert result.status == "ok" and len(result.chips) >= 2
    if whole_cell:
        assert reader.calls == [("read", len(task.scenes), ("B04", "B08"), 2)]
    else:
        (q, n, shape), (b, m, bands, (row, col, height, width)) = reader.calls
        assert (q, n, b, m, bands) == ("quality", 2, "bands", 2, ("B04", "B08"))
        assert 0 <= row and row + height <= shape[0] and 0 <= col and col + width <= shape[1]
        assert 32 <= height * width < shape[0] * shape[1]  # the chips' box, not the grid
    processor.close()


def test_a_monthly_series_has_the_same_bins_in_every_chip_and_skips_chips_with_too_few_valid_bins(
        sample_area, task, tmp_path):
    spec = DatasetSpec(datetime=sample_area.datetime, temporal_period="P1M")
    bins = spec.bins()
    series = processor(sample_area, tmp_path / "series", temporal_period="P1M", max_chips_per_cell=6).process(task)
    assert series.status == "ok" and series.chips
    for chip in series.chips:
        sidecar = json.loads((tmp_path / "series" / "metadata" / f"{chip.name}.json").read_text())
        assert tuple(sidecar["bin_dates"]) == tuple(first for first, _ in bins) == chip.bin_dates
        assert chip.bands == tuple(f"{first} {band}" for first, _ in bins for band in BANDS)
        with rasterio.open(tmp_path / "series" / chip.image) as src:
            assert src.count == len(bins) * len(BANDS) and src.descriptions == chip.bands
        # A bin is valid where its clear share reaches min_clear_fraction (0.9).
        assert chip.bin_valid == tuple(f >= 0.9 for f in chip.bin_clear_fractions) and any(chip.bin_valid)
    # Asking for more valid bins than the cloudy sample gives everywhere skips chips, and says why.
    strict = processor(sample_area, tmp_path / "strict", temporal_period="P1M", max_chips_per_cell=6,
                       min_valid_bins=len(bins)).process(task)
    assert all(all(c.bin_valid) for c in strict.chips)
    assert strict.chips_skipped.get("too_few_valid_bins", 0) >= sum(not all(c.bin_valid) for c in series.chips) > 0


def test_a_cloud_buffer_only_lowers_clear_fractions_and_is_recorded(sample_area, task, tmp_path):
    task = replace(task, scenes=tuple(s for s in task.scenes if "_20230530_" in s.id))  # the cloudy date alone
    plain = processor(sample_area, tmp_path / "plain", min_clear_fraction=0.0).process(task)
    buffered = processor(sample_area, tmp_path / "buffered", min_clear_fraction=0.0, cloud_buffer_px=5).process(task)
    pairs = list(zip(plain.chips, buffered.chips))
    assert pairs and all(a.bounds == b.bounds for a, b in pairs)
    assert all(b.clear_fraction <= a.clear_fraction for a, b in pairs)
    assert any(b.clear_fraction < a.clear_fraction for a, b in pairs)  # the sample's cloudy date has clouds
    sidecar = json.loads((tmp_path / "buffered" / "metadata" / f"{buffered.chips[0].name}.json").read_text())
    assert sidecar["masking"] == {"quality_band": "SCL", "clear_classes": [4, 5, 6], "cloud_buffer_px": 5,
                                  "unmapped_label": 255}


def test_label_layers_are_written_and_fields_of_no_class_are_255(sample_area, sample_plan, tmp_path):
    worker = processor(sample_area, tmp_path, chip_size=64, labels=("classes", "instances", "boundaries"),
                       max_chips_per_cell=12)
    chips = [chip for task in sample_plan.tasks for chip in worker.process(task).chips]
    assert chips
    seen = set()
    for chip in chips:
        assert set(chip.layers) == {"classes", "instances", "boundaries"}
        with rasterio.open(tmp_path / chip.mask) as m, rasterio.open(tmp_path / chip.layers["instances"]) as i, \
                rasterio.open(tmp_path / chip.layers["boundaries"]) as b:
            mask, instances, boundaries = m.read(1), i.read(1), b.read(1)
        assert (mask > 0).tolist() == (instances > 0).tolist() == (boundaries > 0).tolist()
        ids = sorted(set(instances[instances > 0].tolist()))
        assert ids == list(range(1, len(ids) + 1))  # unique within the chip, numbered from 1
        seen |= set(mask.ravel().tolist())
        assert chip.class_pixels == {str(k): int((mask == k).sum()) for k in set(mask.ravel().tolist())}
    assert 255 in seen  # the sample's maize and pasture fields


@pytest.mark.parametrize("composite", ["median", "stack"])
def test_chips_are_the_same_pixels_without_the_half_chip_margin_of_before(sample_area, sample_plan, tmp_path,
                                                                          monkeypatch, composite):
    """Chips lie inside their cells, so the grid has one pixel of margin, not half a chip: every file of
    every chip is the same as with the margin of 0.2 (the old path, restored here), on 1.7x fewer pixels
    (64 px chips on 0.02 degree cells; 2.3x for 256 px chips on the default 0.05 degree cells)."""
    import cropchips.processing as processing

    settings = dict(chip_size=64, max_chips_per_cell=8, composite=composite,
                    labels=("classes", "instances", "boundaries"))
    new = processor(sample_area, tmp_path / "new", **settings)
    grids = {"new": [], "old": []}
    made = {}
    for name in ("new", "old"):
        if name == "old":
            monkeypatch.setattr(processing, "GRID_MARGIN_PX", 64 // 2 + 1)
        worker = new if name == "new" else processor(sample_area, tmp_path / "old", **settings)
        grid_of = worker.processor._grid
        monkeypatch.setattr(worker.processor, "_grid", lambda task, source, g=grid_of, n=name: (
            grids[n].append(g(task, source)) or grids[n][-1]))
        made[name] = [worker.process(task) for task in sample_plan.tasks]
    chips = {name: [c for r in results for c in r.chips] for name, results in made.items()}
    assert len(chips["new"]) == len(chips["old"]) >= 4
    for a, b in zip(chips["new"], chips["old"]):
        assert (a.name, a.bounds, a.class_pixels) == (b.name, b.bounds, b.class_pixels)
        for rel in (a.image, *a.layers.values()):
            with rasterio.open(tmp_path / "new" / rel) as x, rasterio.open(tmp_path / "old" / rel) as y:
                assert np.array_equal(x.read(), y.read()) and x.transform == y.transform, rel
    pixels = {n: sum(g.width * g.height for g in grids[n]) for n in grids}
    assert pixels["old"] > 1.6 * pixels["new"]


def test_a_task_rasterizes_only_once_the_background_import_of_geocube_has_ended(sample_area, task, tmp_path,
                                                                                 monkeypatch):
    """Importing the same packages from two threads at once failed a task (KeyError 'numpy.polynomial'): the
    processor's first task waits for its start-up import thread before it rasterizes."""
    import threading
    import time

    import cropchips.processing as processing

    loaded = threading.Event()

    def slow_load():
        time.sleep(1.0)
        loaded.set()

    seen = []
    real_labels = processing.cell_labels
    monkeypatch.setattr(processing, "load_rasterizer", slow_load)
    monkeypatch.setattr(processing, "cell_labels", lambda *a, **k: seen.append(loaded.is_set()) or real_labels(*a, **k))
    result = processor(sample_area, tmp_path).process(task)
    assert result.status == "ok" and seen and all(seen)


def _tree(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.parent.name in ("images", "masks", "instances", "boundaries")}


def test_chips_written_at_once_are_the_files_and_records_of_chips_written_one_by_one(sample_area, task, tmp_path):
    one, four = tmp_path / "one", tmp_path / "four"
    settings = {"labels": ("classes", "instances", "boundaries")}
    first = processor(sample_area, one, write_threads=1, **settings).process(task)
    second = processor(sample_area, four, write_threads=4, **settings).process(task)
    assert first.status == second.status == "ok" and len(first.chips) >= 2
    assert [c.name for c in first.chips] == [c.name for c in second.chips]
    assert first.chips == second.chips
    assert _tree(one) == _tree(four) and len(_tree(one)) == 4 * len(first.chips)
    manifests = [json.loads((out / manifest_path(task.cell.id)).read_text()) for out in (one, four)]
    assert [m["chips"] for m in manifests][0] == [m["chips"] for m in manifests][1]


def test_a_tasks_chips_are_written_concurrently(sample_area, task, tmp_path):
    """Two chips' images must be in the middle of being written at the same moment: the first two wait for
    each other (one after the other, the first would wait out the barrier's timeout and fail the task)."""
    import threading

    sp = processor(sample_area, tmp_path, write_threads=2)
    storage = sp.processor.storage
    real_publish = storage.publish
    together = threading.Barrier(2, timeout=60)
    waited = []

    def publish(rel, produce):
        if rel.startswith("images/") and len(waited) < 2:
            waited.append(rel)
            together.wait()
        real_publish(rel, produce)

    storage.publish = publish
    result = sp.process(task)
    assert result.status == "ok", result.error
    assert sorted(waited) == [f"images/{task.cell.id}-chip00.tif", f"images/{task.cell.id}-chip01.tif"]


def test_a_chip_that_cannot_be_written_fails_the_task_after_the_others_ended_and_writes_no_manifest(
        sample_area, task, tmp_path):
    import errno
    import threading

    sp = processor(sample_area, tmp_path, write_threads=4)
    storage = sp.processor.storage
    real_publish = storage.publish
    running, lock = [0], threading.Lock()
    bad = f"images/{task.cell.id}-chip01.tif"

    def publish(rel, produce):
        if rel == bad:
            raise PermissionError(errno.EACCES, "refused", rel)
        with lock:
            running[0] += 1
        try:
            real_publish(rel, produce)
        finally:
            with lock:
                running[0] -= 1

    storage.publish = publish
    result = sp.process(task)
    assert result.status == "failed" and "refused" in result.error
    assert running[0] == 0  # no chip still being written once the task has its result
    assert not (tmp_path / manifest_path(task.cell.id)).exists()


def test_a_redo_removes_the_stale_chips_of_its_cell_by_name_without_listing_the_chip_folders(
        sample_area, task, tmp_path):
    """The chip folders hold every cell's chips: a task must not read them whole. The stale chips it removes
    are those a killed run of the folder's spec may have left (numbers below max_chips_per_cell) and those
    the cell's manifest names."""
    first = processor(sample_area, tmp_path, max_chips_per_cell=8).process(task)
    assert first.status == "ok"
    made = {c.name for c in first.chips}
    cell = task.cell.id
    stale = {f"{cell}-chip{k:02d}" for k in range(8)} - made | {f"{cell}-chip31"}
    for name in stale:
        for folder, ext in (("images", "tif"), ("masks", "tif"), ("metadata", "json")):
            (tmp_path / folder / f"{name}.{ext}").write_bytes(b"left by an earlier run")
    manifest = tmp_path / manifest_path(cell)
    body = json.loads(manifest.read_text())
    body["chips"].append({**body["chips"][0], "name": f"{cell}-chip31"})
    manifest.write_text(json.dumps(body))
    sp = processor(sample_area, tmp_path, max_chips_per_cell=8)
    real_list = sp.processor.storage.list
    listed = []
    sp.processor.storage.list = lambda folder, prefix="": listed.append(folder) or real_list(folder, prefix)
    redo = sp.process(replace(task, task_id=task.task_id + "x"))
    assert redo.status == "ok" and not redo.reused and {c.name for c in redo.chips} == made
    for folder in ("images", "masks", "metadata"):
        assert {p.stem for p in (tmp_path / folder).iterdir()} == made
    assert not set(listed) & {"images", "masks", "instances", "boundaries", "metadata"}


_HUNG_WRITE = r"""
import sys, threading
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from cropchips.queue.messages import decode
from cropchips.sources.hrefs import HrefPolicy
from helpers import SpecProcessor

task = decode(open(sys.argv[2], "rb").read())
sp = SpecProcessor("p@test", output_dir=sys.argv[3], gpkg=sys.argv[4], layer=sys.argv[5], chip_size=32,
                   hrefs=HrefPolicy(local_dirs=(Path(sys.argv[6]),)), write_threads=2)
hung = threading.Event()
real_publish = sp.processor.storage.publish

def publish(rel, produce):
    if rel.endswith("-chip01.tif") and rel.startswith("images/"):
        hung.set()
        threading.Event().wait()  # a hard NFS mount that never answers
    real_publish(rel, produce)

sp.processor.storage.publish = publish
threading.Thread(target=sp.process, args=(task,), daemon=True).start()  # the worker's task thread is a daemon
assert hung.wait(60)
sp.processor.close()  # the worker gives the task up past its shutdown grace and exits
print("exiting")
"""


def test_a_chip_write_that_hangs_does_not_keep_the_worker_from_exiting(sample_area, task, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from cropchips.queue.messages import encode

    (tmp_path / "task.json").write_bytes(encode(task))
    tests = Path(__file__).resolve().parent
    proc = subprocess.run([sys.executable, "-c", _HUNG_WRITE, str(tests), str(tmp_path / "task.json"),
                           str(tmp_path / "out"), str(sample_area.gpkg), sample_area.layer,
                           str(sample_area.root.resolve())], capture_output=True, text=True, timeout=180,
                          cwd=tests.parent)
    assert proc.returncode == 0 and "exiting" in proc.stdout, proc.stderr[-2000:]
