"""One task end to end on the sample area: chips, and idempotent re-processing through manifests."""

from dataclasses import replace

import pytest

from cropchips.hrefs import HrefPolicy
from cropchips.manifest import manifest_path
from cropchips.processing import ProcessingOptions, TaskProcessor


@pytest.fixture(scope="module")
def task(sample_task):
    return sample_task


def processor(sample_area, out, **over):
    options = ProcessingOptions(output_dir=out, gpkg=str(sample_area.gpkg), layer=sample_area.layer, chip_size=32,
                                hrefs=HrefPolicy(local_dirs=(sample_area.root.resolve(),)), **over)
    return TaskProcessor(options, worker_id="p@test")


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
    # Fewer chips per cell: a redo, and the chips it no longer makes are removed.
    fewer = processor(sample_area, tmp_path, max_chips_per_cell=2).process(task)
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
