"""Message schemas: round trips, determinism, and readable rejection of bad messages."""

import json
from dataclasses import replace

import pytest

from cropchips.errors import InputDataError, MessageError
from cropchips.spec import DatasetSpec
from cropchips.queue.messages import ChipRecord, Cell, Result, RunHeader, Scene, Task, check_safe_id, decode, encode
from cropchips.sources.sentinel2 import BANDS, SCENE_ASSETS, Sentinel2L2A


def make_scene(scene_id="S2A_30SUG_20230520_0_L2A", **over):
    fields = dict(id=scene_id, collection="sentinel-2-l2a", datetime="2023-05-20T11:00:00Z", cloud_cover=3.5,
                  epsg=32630, assets={b: f"https://example.com/{scene_id}/{b}.tif" for b in SCENE_ASSETS},
                  bbox=(-6.0, 37.0, -4.8, 38.0), processing_baseline="05.09", offsets={"B02": -0.1})
    fields.update(over)
    return Scene(**fields)


def make_task(run_id="run-1"):
    cell = Cell(id="gabc123-r000-c001", row=0, col=1, bbox=(-5.75, 37.2, -5.7, 37.25))
    scenes = (make_scene(),)
    return Task(run_id=run_id, task_id=Task.make_id(cell, scenes), cell=cell, scenes=scenes, spec=DatasetSpec())


def test_band_order_is_the_seed_order():
    assert BANDS == ("B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12")


def test_task_round_trip_and_deterministic_bytes():
    task = make_task()
    raw = encode(task)
    assert decode(raw) == task
    assert encode(decode(raw)) == raw
    assert json.loads(raw)["type"] == "task" and json.loads(raw)["schema_version"] == 3


def test_task_id_ignores_run_but_follows_scenes():
    a, b = make_task("run-1"), make_task("run-2")
    assert a.task_id == b.task_id
    other = Task.make_id(a.cell, (make_scene("S2B_30SUG_20230525_0_L2A"),))
    assert other != a.task_id and other.startswith(a.cell.id)


def test_result_and_header_round_trip():
    chip = ChipRecord(name="c-chip00", image="images/c-chip00.tif", mask="masks/c-chip00.tif", crs="EPSG:32630",
                      bounds=(0.0, 0.0, 10.0, 10.0), class_pixels={"0": 5, "5": 95}, field_id="7")
    result = Result(run_id="run-1", task_id="t-1", cell_id="c", worker_id="1@host", status="ok", chips=(chip,),
                    scenes_used=("S",), seconds={"total": 1.5})
    assert decode(encode(result)) == result
    assert result.class_pixels() == {0: 5, 5: 95}
    header = RunHeader(run_id="run-1", task_count=3, created_at="2026-01-01T00:00:00Z", cells_dropped={"x": 1})
    assert decode(encode(header)) == header


@pytest.mark.parametrize("raw, needle", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"type": "task", "schema_version": 99}).encode(), "unsupported schema_version 99"),
    (json.dumps({"type": "weird", "schema_version": 3}).encode(), "unknown message type"),
    (json.dumps({"type": "result", "schema_version": 3, "run_id": "r", "task_id": "t", "cell_id": "c",
                 "worker_id": "w", "status": "great"}).encode(), "status must be one of"),
])
def test_bad_messages_are_rejected_with_a_reason(raw, needle):
    with pytest.raises(MessageError, match=needle):
        decode(raw)


def test_task_with_traversal_cell_id_is_rejected():
    body = json.loads(encode(make_task()))
    body["cell"]["id"] = "../../etc"
    with pytest.raises(MessageError, match="not a safe identifier"):
        decode(json.dumps(body).encode())


def test_task_with_unknown_field_or_missing_asset_is_rejected():
    body = json.loads(encode(make_task()))
    body["surprise"] = 1
    with pytest.raises(MessageError, match="unknown fields"):
        decode(json.dumps(body).encode())
    # Which assets a scene needs is its source's to say: the message is well-formed, the source refuses it.
    body = json.loads(encode(make_task()))
    del body["scenes"][0]["assets"]["SCL"]
    scene = decode(json.dumps(body).encode()).scenes[0]
    with pytest.raises(InputDataError, match=r"lacks the assets \['SCL'\] that sentinel-2-l2a scenes carry"):
        Sentinel2L2A().check_scene(scene)
    body["scenes"][0]["assets"] = {}
    with pytest.raises(MessageError, match="scene assets must be an object of 1..64"):
        decode(json.dumps(body).encode())


@pytest.mark.parametrize("value", ["", "..", "a/b", "/abs", "a..b", ".hidden", "x" * 200, None, 5])
def test_unsafe_ids(value):
    with pytest.raises(MessageError):
        check_safe_id(value, "id")


def test_bad_cell_bbox():
    with pytest.raises(MessageError, match="not a valid lon/lat box"):
        Cell(id="c", row=0, col=0, bbox=(1.0, 1.0, 0.0, 2.0))


# ---------------------------------------------------------------------- the spec in tasks (schema 2)


def test_a_task_carries_its_spec_and_round_trips_it():
    spec = DatasetSpec(chip_size=64, composite="least-cloudy", bands=("B04", "B08"), clear_classes=(4, 5))
    task = replace(make_task(), spec=spec, force=True)
    back = decode(encode(task))
    assert back == task and back.spec == spec and back.spec.digest() == spec.digest() and back.force


def _task_body(**spec_changes):
    body = json.loads(encode(make_task()))
    body["spec"].update(spec_changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize("changes, needle", [
    ({"spec_version": 3}, "spec_version 3 is newer than this cropchips reads"),
    ({"class_map_file": "/etc/passwd"}, "class_map_file is not allowed here"),
    ({"chip_sise": 64}, "unknown spec key 'chip_sise': did you mean 'chip_size'"),
    ({"chip_size": "64"}, "chip_size must be an integer"),
    ({"composite": "mean"}, "composite (--composite) must be one of"),
])
def test_a_spec_a_worker_cannot_honour_is_a_message_error_that_says_why(changes, needle):
    with pytest.raises(MessageError, match="task carries a dataset spec this worker cannot honour") as info:
        decode(_task_body(**changes))
    assert needle in str(info.value)


def test_a_task_without_a_spec_or_of_schema_1_is_refused():
    body = json.loads(encode(make_task()))
    del body["spec"]
    with pytest.raises(MessageError, match="missing or invalid fields"):
        decode(json.dumps(body).encode())
    body = json.loads(encode(make_task()))
    body["schema_version"] = 1
    with pytest.raises(MessageError, match="unsupported schema_version 1"):
        decode(json.dumps(body).encode())


def test_the_run_header_carries_the_spec():
    header = RunHeader(run_id="run-1", task_count=3, created_at="2026-12-01T00:00:00Z", spec=DatasetSpec(chip_size=32))
    assert decode(encode(header)).spec.chip_size == 32


def test_kafka_checks_record_checksums_in_c_and_agrees_with_its_pure_python_code():
    # Every task and result is checksummed by kafka-python when written and read; in pure Python that
    # is 0.16 CPU us a byte (the master published 5000 tasks in 6.1 CPU s instead of 0.9).
    from kafka.record import util as record_util
    from kafka.record._crc32c import crc as pure_python_crc32c

    from cropchips.queue.kafka import check_fast_checksums

    assert record_util.crc32c_c is not None, "install the crc32c package (requirements.txt)"
    assert check_fast_checksums()
    data = encode(make_task())
    assert record_util.calc_crc32c(data) == pure_python_crc32c(data) == record_util.crc32c_c(data)


def test_a_missing_crc32c_package_is_said_once_with_what_to_install(monkeypatch, caplog):
    from kafka.record import util as record_util

    import cropchips.queue.kafka as kafka_helpers

    monkeypatch.setattr(record_util, "crc32c_c", None)
    monkeypatch.setattr(kafka_helpers, "_WARNED_SLOW_CRC", False)
    with caplog.at_level("WARNING", logger="cropchips.queue.kafka"):
        assert not kafka_helpers.check_fast_checksums()
        assert not kafka_helpers.check_fast_checksums()
    warnings = [r.getMessage() for r in caplog.records if "crc32c" in r.getMessage()]
    assert len(warnings) == 1 and "pip install 'crc32c" in warnings[0]
