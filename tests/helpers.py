"""Helpers for tests that run the scripts as separate processes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

from conftest import REPO, SAMPLE_CHIP_SIZE, run_script
from cropchips.queue.kafka import KafkaSettings, make_producer


def send_records(bootstrap, topic, values, *, keys=None, partitions=None, headers=None, **producer_settings):
    """Send ``values`` to ``topic`` one at a time, each acknowledged before the next (so a partition holds
    them in the order given), with ``keys[i]``, to ``partitions[i]`` and with ``headers[i]`` where given
    (else no key, the producer's partition, no headers); return each record's partition."""
    producer = make_producer(KafkaSettings(bootstrap), **producer_settings)
    try:
        return [producer.send(topic, value=value, key=None if keys is None else keys[i],
                              partition=None if partitions is None else partitions[i],
                              headers=headers[i] if headers else []).get(timeout=30).partition
                for i, value in enumerate(values)]
    finally:
        producer.close()


def kafka_args(bootstrap, topics):
    return ["--bootstrap-servers", bootstrap, "--tasks-topic", topics["tasks"], "--results-topic", topics["results"],
            "--dlq-topic", topics["dlq"]]


def publish_area(sample, bootstrap, topics, *extra):
    result = run_script("master.py", "--gpkg", str(sample.gpkg), "--layer", sample.layer,
                        "--start-x", str(sample.start_x), "--start-y", str(sample.start_y),
                        "--grid-step", str(sample.grid_step), "--x-cells", str(sample.x_cells),
                        "--y-cells", str(sample.y_cells), "--stac-items", str(sample.items),
                        "--datetime", sample.datetime, "--max-cloud", "100", "--min-polygons", "1",
                        "--chip-size", str(SAMPLE_CHIP_SIZE), *kafka_args(bootstrap, topics), *extra)
    assert result.returncode == 0, result.stderr
    return result


class WorkerProcess:
    """worker.py N as a child process whose output is collected in the background."""

    def __init__(self, n, sample, output, bootstrap, topics, *extra, wrap: list[str] | None = None,
                 env: dict[str, str] | None = None):
        self.n = n
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [*(wrap or []), sys.executable, str(REPO / "worker.py"), str(n), "--gpkg", str(sample.gpkg),
             "--output-dir", str(output), "--local-scenes-dir", str(sample.root), "--group-id", topics["group"],
             *kafka_args(bootstrap, topics), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text, timeout=60.0):
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"worker {self.n} never logged {text!r}:\n{self.log[-3000:]}")
            time.sleep(0.05)

    def wait(self, timeout=180.0) -> int:
        """The exit code; a worker still running after ``timeout`` is killed and fails the test
        with the end of its log (what it was doing is the whole diagnosis)."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            self.reader.join(timeout=5)
            raise AssertionError(f"worker {self.n} still running after {timeout:.0f} s:\n{self.log[-6000:]}") from None
        self.reader.join(timeout=5)
        return code


def final_summary(bootstrap, topics, run_id=None):
    args = ["--exit-when-done", "--json", "--no-progress", "--timeout", "60", *kafka_args(bootstrap, topics)]
    if run_id:
        args += ["--run-id", run_id]
    done = run_script("monitor.py", *args, timeout=120)
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}


def kill_at_random(workers: dict, restart, kafka, results_topic: str, *, tasks: int, rng, pause: tuple[float, float],
                   seconds: float, max_kills: int | None = None) -> int:
    """SIGKILL a random live worker every ``pause`` (low, high) seconds and start ``restart(n)``
    in its place, until ``tasks`` results are in, every worker has exited, ``seconds`` have
    passed or ``max_kills`` is reached. Returns the number of kills."""
    import signal

    from cropchips.queue.kafka import read_topic
    from cropchips.queue.messages import decode

    kills = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (max_kills is None or kills < max_kills):
        time.sleep(rng.uniform(*pause))
        done = {decode(r.value).task_id for r in read_topic(kafka, results_topic, idle_s=0.3)
                if r.value and b'"type":"result"' in r.value}
        if len(done) >= tasks or all(w.proc.poll() is not None for w in workers.values()):
            break
        victim = rng.choice([n for n, w in workers.items() if w.proc.poll() is None] or [next(iter(workers))])
        workers[victim].proc.send_signal(signal.SIGKILL)
        workers[victim].wait(timeout=30)
        kills += 1
        workers[victim] = restart(victim)
    return kills


def http_items(sample, server, path):
    """The sample's STAC items with every asset href pointing at the HTTP server (a CogServer)."""
    doc = json.loads(sample.items.read_text())
    for item in doc["features"]:
        for asset in item["assets"].values():
            asset["href"] = server.href(asset["href"])
    path.write_text(json.dumps(doc))
    return path


class SpecProcessor:
    """A TaskProcessor whose tasks get these dataset settings in their spec (as if the master had
    published them so): host settings (output_dir, gpkg, hrefs, ...) go to the worker's options,
    the rest (chip_size, composite, layer, ...) into each task's spec; ``force`` into the task."""

    def __init__(self, worker_id: str, *, force: bool = False, **settings):
        from dataclasses import fields

        from cropchips.processing import ProcessingOptions, TaskProcessor

        host = {f.name for f in fields(ProcessingOptions)}
        self.spec_changes = {k: v for k, v in settings.items() if k not in host}
        self.force = force
        self.processor = TaskProcessor(ProcessingOptions(**{k: v for k, v in settings.items() if k in host}),
                                       worker_id)

    def task(self, task):
        from dataclasses import replace

        return replace(task, spec=replace(task.spec, **self.spec_changes), force=self.force or task.force)

    def process(self, task):
        return self.processor.process(self.task(task))

    def __getattr__(self, name):
        return getattr(self.processor, name)
