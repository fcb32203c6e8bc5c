"""admin.py against a real broker: topics create/list/reset, group lag, results tail, dead letters, doctor."""

import argparse
import json
import os
import re
import uuid
from collections import Counter

import pytest
from conftest import REPO, run_script, shared_data
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.structs import OffsetAndMetadata

import admin as admin_script
from cropchips.queue import admin
from cropchips.cli.options import env_table
from cropchips.demo.broker import free_port
from cropchips.errors import BrokerError
from cropchips.queue.kafka import KafkaSettings, read_topic
from cropchips.spec import DatasetSpec
from cropchips.queue.messages import ChipRecord, Result, RunHeader, encode
from helpers import send_records


def kafka_args(broker, topics):
    return ["--bootstrap-servers", broker.bootstrap_servers, "--tasks-topic", topics["tasks"],
            "--results-topic", topics["results"], "--dlq-topic", topics["dlq"], "--broker-wait", "10"]


def admin_run(*args, env=None):
    done = run_script("admin.py", *args, timeout=120, env=env)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def partition_counts(broker, names):
    client = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    try:
        return {t["name"]: len(t["partitions"]) for t in client.describe_topics(names) if t["error_code"] == 0}
    finally:
        client.close()


def publish(broker, topic, values, partitions=None, headers=None):
    """Send ``values`` (to partition ``partitions[i]`` if given); return the records' partitions."""
    return send_records(broker.bootstrap_servers, topic, values, partitions=partitions, headers=headers)


def fresh_names():
    n = uuid.uuid4().hex[:8]
    return {"tasks": f"adm-tasks-{n}", "results": f"adm-results-{n}", "dlq": f"adm-dlq-{n}"}


# --------------------------------------------------------------------------- topics


def test_topics_create_makes_the_three_topics_once_with_their_partition_counts(broker):
    names = fresh_names()
    args = ["topics", "create", *kafka_args(broker, names)]
    first = admin_run(*args, env={"CROPCHIPS_TASKS_PARTITIONS": "6"})  # the env twin of --tasks-partitions
    assert first.returncode == 0, first.stderr
    assert partition_counts(broker, list(names.values())) == {names["tasks"]: 6, names["results"]: 1,
                                                              names["dlq"]: 1}
    assert re.search(rf"created\s+{names['tasks']}\s+6 partitions", first.stdout)
    assert re.search(rf"created\s+{names['results']}\s+1 partition\b", first.stdout)

    second = admin_run(*args, "--tasks-partitions", "6")
    assert second.returncode == 0, second.stderr
    assert "created" not in second.stdout
    assert len(re.findall(r"^exists\s", second.stdout, re.MULTILINE)) == 3
    assert partition_counts(broker, list(names.values()))[names["tasks"]] == 6


def test_create_reports_an_existing_topic_with_the_wrong_partition_count(broker):
    names = fresh_names()
    client = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    client.create_topics([NewTopic(names["tasks"], 4, 1)])  # e.g. auto-created by a careless client
    client.close()
    states = admin.create_topics(KafkaSettings(broker.bootstrap_servers),
                                 admin.pipeline_topics(names["tasks"], names["results"], names["dlq"], 10), wait=10)
    tasks = states[0]
    assert (tasks.name, tasks.created, tasks.partitions, tasks.wanted) == (names["tasks"], False, 4, 10)
    assert "wanted 10" in admin.format_created(states)
    assert [s.created for s in states[1:]] == [True, True]


def test_topics_list_counts_records_per_partition(broker, topics):
    published = publish(broker, topics["tasks"], [b"t"] * 7, partitions=[0, 0, 0, 3, 3, 9, 9])
    publish(broker, topics["results"], [b"r"] * 2)
    done = admin_run("topics", "list", "--json", *kafka_args(broker, topics))
    assert done.returncode == 0, done.stderr
    by_name = {t["name"]: t for t in json.loads(done.stdout)}
    expected = {str(p): Counter(published).get(p, 0) for p in range(10)}
    assert by_name[topics["tasks"]]["records"] == expected
    assert by_name[topics["tasks"]]["partitions"] == 10 and by_name[topics["tasks"]]["role"] == "tasks"
    assert by_name[topics["results"]]["records"] == {"0": 2} and by_name[topics["dlq"]]["total"] == 0
    table = admin.format_topic_list(admin.list_topics(KafkaSettings(broker.bootstrap_servers),
                                                      admin.pipeline_topics(topics["tasks"], topics["results"],
                                                                            topics["dlq"], 10), wait=10))
    assert re.search(rf"{topics['tasks']}\s+10\s+7\s+tasks\s+0:3 1:0 2:0 3:2", table)


def test_reset_without_yes_exits_2_and_changes_nothing(broker, topics):
    publish(broker, topics["tasks"], [b"task"] * 5)
    done = admin_run("topics", "reset", *kafka_args(broker, topics))
    assert done.returncode == 2
    assert "would delete" in done.stdout and "--yes" in done.stdout
    assert len(read_topic(KafkaSettings(broker.bootstrap_servers), topics["tasks"])) == 5
    assert partition_counts(broker, [topics["tasks"]]) == {topics["tasks"]: 10}


def test_reset_with_yes_empties_the_tasks_topic_and_keeps_10_partitions(broker, topics):
    publish(broker, topics["tasks"], [b"task"] * 5)
    # A group that committed on the old topic must not skip tasks of the new one.
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, group_id=topics["group"],
                             enable_auto_commit=False)
    consumer.commit({TopicPartition(topics["tasks"], 0): OffsetAndMetadata(1, "", -1)})
    consumer.close()
    done = admin_run("topics", "reset", "--yes", "--group-id", topics["group"], *kafka_args(broker, topics))
    assert done.returncode == 0, done.stderr
    assert re.search(rf"deleted\s+{topics['tasks']}\s+10 partitions, 5 records", done.stdout)
    assert partition_counts(broker, [topics["tasks"]]) == {topics["tasks"]: 10}
    assert read_topic(KafkaSettings(broker.bootstrap_servers), topics["tasks"], idle_s=0.5) == []
    client = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    committed = client.list_group_offsets({topics["group"]: [TopicPartition(topics["tasks"], 0)]})
    client.close()
    assert all(om.offset <= 0 for om in committed.get(topics["group"], {}).values())
    # The new topic works: what is published now is there.
    publish(broker, topics["tasks"], [b"new"])
    records = read_topic(KafkaSettings(broker.bootstrap_servers), topics["tasks"], idle_s=0.5)
    assert [r.value for r in records] == [b"new"]


# --------------------------------------------------------------------------- group


def test_group_describe_shows_members_committed_offsets_and_lag(broker, topics):
    published = publish(broker, topics["tasks"], [f"t{i}".encode() for i in range(7)],
                        partitions=[i % 3 for i in range(7)])
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, group_id=topics["group"],
                             client_id="admin-test-worker", enable_auto_commit=False, auto_offset_reset="earliest",
                             session_timeout_ms=6000, heartbeat_interval_ms=1000)
    try:
        consumer.subscribe([topics["tasks"]])
        for _ in range(200):
            consumer.poll(timeout_ms=100)
            if consumer.assignment():
                break
        commits = {0: 2, 1: 1}  # 3 of the 7 tasks done
        consumer.commit({TopicPartition(topics["tasks"], p): OffsetAndMetadata(o, "", -1) for p, o in commits.items()})
        per_partition = Counter(published)
        expected = {p: per_partition.get(p, 0) - commits.get(p, 0) for p in range(10)}

        done = admin_run("group", "describe", "--json", "--group-id", topics["group"], *kafka_args(broker, topics))
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["state"] == "Stable"
        assert [m["client_id"] for m in report["members"]] == ["admin-test-worker"]
        rows = {r["partition"]: r for r in report["partitions"]}
        assert {p: r["lag"] for p, r in rows.items()} == expected
        assert {p: r["committed"] for p, r in rows.items() if r["committed"] is not None} == commits
        assert {p: r["end"] for p, r in rows.items()} == {p: per_partition.get(p, 0) for p in range(10)}
        assert report["total_lag"] == 7 - 3 == sum(expected.values())
    finally:
        consumer.close()
    table = admin.format_group(admin.describe_group(KafkaSettings(broker.bootstrap_servers), topics["group"],
                                                    topics["tasks"], wait=10))
    assert "TOTAL LAG  4" in table and re.search(r"\n\s+0\s+2\s+3\s+1\n", table)


def test_group_describe_of_a_missing_topic_is_a_clear_error(broker):
    with pytest.raises(BrokerError, match="does not exist"):
        admin.describe_group(KafkaSettings(broker.bootstrap_servers), "nobody", f"missing-{uuid.uuid4().hex}", wait=5)


# --------------------------------------------------------------------------- results and dead letters


def result(i, status="ok", chips=0):
    records = tuple(ChipRecord(name=f"c{i}-chip{k:02d}", image=f"images/c{i}-chip{k:02d}.tif",
                               mask=f"masks/c{i}-chip{k:02d}.tif", crs="EPSG:32630", bounds=(0, 0, 1, 1),
                               class_pixels={"5": 1}) for k in range(chips))
    return Result(run_id="run-a", task_id=f"task-{i}", cell_id=f"c{i}", worker_id=f"{i % 2 + 1}@host",
                  status=status, chips=records, error="no scene readable" if status == "failed" else None,
                  finished_at=f"2026-01-01T00:00:{i:02d}Z")


def test_results_tail_shows_the_last_n_results_in_order(broker, topics):
    m, n = 9, 4
    messages = [encode(RunHeader(run_id="run-a", task_count=m, created_at="x"))]
    messages += [encode(result(i, "failed" if i == 7 else "ok", chips=i % 3)) for i in range(m)]
    publish(broker, topics["results"], messages + [b"not json"])
    done = admin_run("results", "tail", "-n", str(n), *kafka_args(broker, topics))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split()[1] for line in lines] == [f"task-{i}" for i in range(m - n, m)]
    assert lines[0].startswith("2026-01-01T00:00:05Z  task-5  ok") and "worker=2@host" in lines[0]
    assert "chips=2" in lines[0]
    assert "failed" in lines[2] and "error=no scene readable" in lines[2]
    as_json = admin_run("results", "tail", "--json", *kafka_args(broker, topics), env={"CROPCHIPS_LAST": "2"})
    assert [json.loads(line)["task_id"] for line in as_json.stdout.splitlines()] == ["task-7", "task-8"]


def test_dlq_list_shows_the_error_worker_and_source_headers(broker, topics):
    values = [b'{"type": "task", "schema_version": 99}', b"\xff\xfe not json"]
    headers = [[("error", b"unsupported schema_version 99"), ("worker", b"1@w1"), ("source", b"tasks/3/17")],
               [("error", b"message is not valid JSON"), ("worker", b"2@w2"), ("source", b"tasks/0/4")]]
    publish(broker, topics["dlq"], values, headers=headers)
    done = admin_run("dlq", "list", *kafka_args(broker, topics))
    assert done.returncode == 0, done.stderr
    assert "error: unsupported schema_version 99" in done.stdout and "worker=1@w1" in done.stdout
    assert "source=tasks/3/17" in done.stdout and '"schema_version": 99' in done.stdout
    assert "error: message is not valid JSON" in done.stdout
    letters = admin.dead_letters(KafkaSettings(broker.bootstrap_servers), topics["dlq"], last=1, wait=10)
    assert [(d.error, d.worker, d.source) for d in letters] == [("message is not valid JSON", "2@w2", "tasks/0/4")]


def test_dlq_replay_republishes_valid_tasks_and_skips_poison(broker, topics):
    from cropchips.queue.messages import Cell, Task, decode

    cells = [Cell(id=f"replay-{i}", row=0, col=i, bbox=(float(i), 0.0, i + 0.5, 0.5)) for i in range(3)]
    tasks = [Task(run_id="run-r", task_id=f"replay-{i}-abc", cell=c, scenes=(), spec=DatasetSpec()) for i, c in enumerate(cells)]
    values = [encode(tasks[0]), b"{not json", encode(tasks[1]), encode(tasks[2])[:40], encode(tasks[2])]
    headers = [[("error", b"reading B04 failed 3 times: HTTP 503")], [("error", b"not valid JSON")],
               [("error", b"crashed 3 workers")], [("error", b"unknown fields"), ("truncated", b"900000")],
               [("error", b"HTTP 503")]]
    publish(broker, topics["dlq"], values, headers=headers)
    kafka = KafkaSettings(broker.bootstrap_servers)

    dry = admin_run("dlq", "replay", *kafka_args(broker, topics))
    assert dry.returncode == 2, dry.stdout + dry.stderr
    assert "3 task(s) would be published" in dry.stdout and "add --yes" in dry.stdout
    assert read_topic(kafka, topics["tasks"]) == []  # nothing published without --yes

    some = admin_run("dlq", "replay", "--offsets", "0-1", "--yes", *kafka_args(broker, topics))
    assert some.returncode == 0, some.stdout + some.stderr
    assert "replayed 1 task(s)" in some.stdout and "skipped       offset 1" in some.stdout
    assert [decode(r.value).task_id for r in read_topic(kafka, topics["tasks"])] == ["replay-0-abc"]

    rest = admin_run("dlq", "replay", "--offsets", "2-4", "--yes", *kafka_args(broker, topics))
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert "only the start of the message was kept" in rest.stdout
    replayed = [r for r in read_topic(kafka, topics["tasks"])]
    assert sorted(decode(r.value).task_id for r in replayed) == ["replay-0-abc", "replay-1-abc", "replay-2-abc"]
    # Unchanged bytes, keyed by cell like the master's tasks.
    assert {r.value for r in replayed} == {encode(t) for t in tasks}
    assert {r.key for r in replayed} == {c.id.encode() for c in cells}
    bad = admin_run("dlq", "replay", "--offsets", "x-y", *kafka_args(broker, topics))
    assert bad.returncode == 1 and "--offsets" in bad.stderr


# --------------------------------------------------------------------------- doctor


def test_doctor_passes_on_a_good_setup(broker, topics, tmp_path):
    gpkg = f"zip://{shared_data('eurocrops', 'SI_2021.zip')}"
    done = admin_run("doctor", "--output-dir", str(tmp_path), "--gpkg", gpkg, *kafka_args(broker, topics))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAIL" not in done.stdout and "all checks passed" in done.stdout
    for name in ("broker", f"topic {topics['tasks']}", f"topic {topics['results']}", "output-writable", "gpkg"):
        assert re.search(rf"^OK\s+{re.escape(name)}\s", done.stdout, re.MULTILINE), (name, done.stdout)
    assert broker.bootstrap_servers in done.stdout and "EC_hcat_c" in done.stdout
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_doctor_fails_with_a_fix_for_each_problem(tmp_path):
    if os.geteuid() == 0:  # root writes through any permission bits: use a file where a folder should be
        output = tmp_path / "not-a-folder"
        output.write_text("x")
    else:
        output = tmp_path / "read-only"
        output.mkdir()
        output.chmod(0o500)
    try:
        done = admin_run("doctor", "--bootstrap-servers", f"127.0.0.1:{free_port()}", "--broker-wait", "1",
                         "--output-dir", str(output), "--gpkg", str(tmp_path / "missing.gpkg"))
    finally:
        if output.is_dir():
            output.chmod(0o700)
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    for check in ("broker", "output-" if output.is_dir() else "output-dir", "gpkg"):
        block = re.search(rf"^FAIL\s+{check}\S*\s+(.*)\n\s+fix: (.+)$", out, re.MULTILINE)
        assert block, (check, out)
    assert re.search(r"^SKIP\s+topics", out, re.MULTILINE)
    assert "not reachable" in out and "--bootstrap-servers" in out
    assert "GeoPackage not found" in out and "--gpkg" in out
    assert "3 check(s) failed" in out


def test_doctor_checks_the_mount_point_and_skips_what_it_is_told(tmp_path):
    options = admin.DoctorOptions(kafka=KafkaSettings("127.0.0.1:1"), topics=[], output_dir=str(tmp_path),
                                  gpkg="unused", expect_mount=True, skip=admin.parse_skip("broker, gpkg"))
    checks = {c.name: c for c in admin.doctor(options)}
    assert checks["broker"].ok is None and checks["gpkg"].ok is None
    assert checks["output-mount"].ok is False and "mount_worker_nfs.sh" in checks["output-mount"].fix
    assert checks["output-writable"].ok is True
    with pytest.raises(ValueError, match="unknown check"):
        admin.parse_skip("gpkg,typo")


# --------------------------------------------------------------------------- errors and documentation


def test_an_unreachable_broker_is_one_clear_line_and_exit_1():
    done = admin_run("topics", "list", "--bootstrap-servers", f"127.0.0.1:{free_port()}", "--broker-wait", "1")
    assert done.returncode == 1
    assert "cannot reach the Kafka broker" in done.stderr


def test_usage_errors_exit_2():
    assert admin_run().returncode == 2
    assert admin_run("topics").returncode == 2
    assert admin_run("results", "tail", "-n", "0").returncode == 2


def leaf_parsers(parser):
    """Every subcommand's parser (the ones that hold the options)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for sub in subs for child in dict.fromkeys(sub.choices.values()) for leaf in leaf_parsers(child)]


def test_every_admin_flag_has_an_env_twin_documented():
    # docs/admin.md is the admin section until it is merged into the README; the Kafka options are in the README.
    fragment = REPO / "docs" / "admin.md"
    doc = (REPO / "README.md").read_text() + (fragment.read_text() if fragment.exists() else "")
    leaves = leaf_parsers(admin_script.build_parser(env={}))
    assert len(leaves) == 8
    for leaf in leaves:
        for flag, env in env_table(leaf):
            assert re.search(rf"`{re.escape(flag)}` \| `{env}`", doc), f"{flag} / {env} not documented"
    args = admin_script.build_parser(env={"CROPCHIPS_GROUP_ID": "g2", "CROPCHIPS_DOCTOR_SKIP": "gpkg"})
    assert args.parse_args(["group", "describe"]).group_id == "g2"
    assert args.parse_args(["doctor"]).skip == "gpkg"

