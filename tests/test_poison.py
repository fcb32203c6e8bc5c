"""Poison messages through the real scripts: each is dead-lettered with a readable reason, valid tasks complete."""

from __future__ import annotations

import json

from cropchips.queue.kafka import KafkaSettings, read_topic
from cropchips.queue.messages import Result, decode
from helpers import WorkerProcess, final_summary, publish_area, send_records


def test_poison_messages_are_dead_lettered_while_valid_tasks_complete(broker, topics, sample_area, tmp_path):
    kafka = KafkaSettings(broker.bootstrap_servers)
    publish_area(sample_area, broker.bootstrap_servers, topics, "--run-id", "run-poison", "--chip-size", "32")
    raw = read_topic(kafka, topics["tasks"])[0].value

    def variant(change):
        body = json.loads(raw)
        change(body)
        return json.dumps(body).encode()

    poison = {
        "malformed": b'{"type": "task", "schema_version": 1, "cell": ',
        "version": variant(lambda b: b.update(schema_version=99)),
        "traversal": variant(lambda b: b["cell"].update(id="../../../etc/cron.d/x")),
        "forbidden": variant(lambda b: [s["assets"].update(B04="https://attacker.example.net/B04.tif")
                                        for s in b["scenes"]] and b.update(task_id=b["task_id"] + "-evil")),
    }
    send_records(kafka.bootstrap_servers, topics["tasks"], list(poison.values()), keys=[k.encode() for k in poison])

    worker = WorkerProcess(1, sample_area, tmp_path, broker.bootstrap_servers, topics,
                           "--burst", "--burst-idle", "5")
    assert worker.wait(timeout=180) == 0, worker.log[-3000:]
    assert "Traceback" not in worker.log

    dead = read_topic(kafka, topics["dlq"])
    reasons = [dict(r.headers)["error"].decode() for r in dead]
    assert len(dead) == 4, reasons
    joined = " | ".join(reasons)
    assert "not valid JSON" in joined
    assert "unsupported schema_version 99" in joined
    assert "not a safe identifier" in joined
    assert "https://attacker.example.net/B04.tif" in joined and "is not allowed" in joined
    for record in dead:  # the original bytes are kept for replay, with where they came from
        assert record.value in poison.values()
        assert dict(record.headers)["source"].decode().startswith(topics["tasks"] + "/")
    results = [m for m in (decode(r.value) for r in read_topic(kafka, topics["results"])) if isinstance(m, Result)]
    assert sorted(r.status for r in results) == ["failed"] * 4 + ["ok"] * 4
    code, summary = final_summary(broker.bootstrap_servers, topics, "run-poison")
    # The forbidden-href task carries the run id, so the monitor sees one failure in this run.
    assert code == 2 and summary["statuses"]["ok"] == 4 and summary["statuses"]["failed"] == 1
    assert not (tmp_path / "etc").exists() and not list(tmp_path.parent.glob("etc"))
