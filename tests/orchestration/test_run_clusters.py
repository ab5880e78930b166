"""Runs against multi-node and separately started Ray clusters, and a killed driver."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
from ray.cluster_utils import Cluster
from run_helpers import BASE_ARGS, comparable, invoke_cli

from orchestration.execution import task_resources
from orchestration.job import FAULT_DIR_ENV

pytestmark = pytest.mark.slow

SMALL_ARGS = [*BASE_ARGS, "--shots", "1", "--seeds", "0,1", "--methods", "h2vlr,patch-knn"]
TABLES = ("jobs", "scores", "leaderboard_by_category")


def _baseline_rows(baseline, name: str, job_ids: set[str]) -> pd.DataFrame:
    """Return the baseline rows of the 1-shot jobs ``job_ids`` (or of every 1-shot group)."""
    frame = baseline.table(name)
    selected = frame["job_id"].isin(job_ids) if "job_id" in frame else frame["shot"] == "1"
    return comparable(frame[selected], name)


def test_two_node_cluster_run(baseline, tmp_path):
    # Each node declares one GPU, a logical Ray resource with no device behind it. So the
    # jobs take the GPU request path, half a GPU each, spread over both nodes.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
    cluster.add_node(num_cpus=1, num_gpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([node for node in ray.nodes() if node["Alive"]]) == 2
        assert task_resources(1.0, 0.5) == {"num_cpus": 1.0, "num_gpus": 0.5}
        assert task_resources(1.0, 4.0) == {"num_cpus": 1.0, "num_gpus": 2.0}  # capped
        args = [*SMALL_ARGS, "--gpus-per-job", "0.5"]
        result = invoke_cli("run", args, tmp_path, "two-nodes")
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert result.exit_code == 0, result.output
    jobs = result.table("jobs")
    assert len(jobs) == 4
    assert (jobs["images_encoded"] == 0).all()
    ids = set(jobs["job_id"])
    for name in TABLES[:2]:
        expected = _baseline_rows(baseline, name, ids)
        pd.testing.assert_frame_equal(comparable(result.table(name), name), expected)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def fault_dir(tmp_path_factory) -> Path:
    """Directory of the job test hooks, seen by every worker of the separately started head."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture
def ray_head(fault_dir):
    """A head started with `ray start` in its own process group, killed as a group afterwards.

    Its own short temporary directory keeps socket paths short and leaves the machine's
    default cluster address file (/tmp/ray/ray_current_cluster) to other users.
    """
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray_bin = Path(sys.executable).with_name("ray")
    command = [
        str(ray_bin),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    # Workers inherit the raylet's environment, which comes from this `ray start`.
    env = {**os.environ, FAULT_DIR_ENV: str(fault_dir)}
    head = subprocess.Popen(
        command,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        output, _ = head.communicate(timeout=120)
        assert head.returncode == 0, output
        yield f"127.0.0.1:{port}"
    finally:
        # Every process of the head (GCS, raylet, workers) shares the group of `ray start`.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(2)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _job_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "jobs").glob("*.job.parquet"))


def test_driver_killed_and_resumed(baseline, ray_head, fault_dir, tmp_path):
    args = [*SMALL_ARGS, "--address", ray_head, "--cpus-per-job", "2"]  # one job at a time
    command = [sys.executable, "-m", "orchestration.cli", "run", *args]
    command += ["--out", str(tmp_path), "--run-name", "killed"]
    run_dir = tmp_path / "killed"
    hold = fault_dir / "hold"
    hold.touch()  # the first job runs, the others wait until the driver is gone
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not _job_files(run_dir) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    hold.unlink()
    done_before = {path.name for path in _job_files(run_dir)}
    assert len(done_before) == 1, "the driver must be killed after exactly one job"
    assert not (run_dir / "jobs.parquet").exists()

    result = invoke_cli("run", ["--resume", *args], tmp_path, "killed")

    assert result.exit_code == 0, result.output
    info = json.loads((run_dir / "run.json").read_text())
    assert info["jobs"]["skipped"] == len(done_before)
    assert info["jobs"]["ok"] == 4 - len(done_before)
    jobs = result.table("jobs")
    assert jobs["job_id"].is_unique
    assert len(jobs) == 4
    for name in TABLES:
        expected = _baseline_rows(baseline, name, set(jobs["job_id"]))
        pd.testing.assert_frame_equal(comparable(result.table(name), name), expected)
