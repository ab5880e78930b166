"""Run options that used to pass validation and fail later, or not at all, are rejected up front."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from run_helpers import BASE_ARGS
from typer.testing import CliRunner

from orchestration.cli import app
from orchestration.cli_run import _options
from orchestration.planning import PlanError, build_options, validate
from results.storage import RunStore

TINY = ["--backbone", "tiny-test", "--pretrained", "none"]
ONE_JOB = ["--categories", "checkered_tile", "--shots", "1", "--seeds", "0", *TINY]


def invoke(out: Path, *args: str) -> tuple[int, str]:
    # A wide console keeps long temporary paths on one line of the message.
    result = CliRunner().invoke(app, [*args, "--out", str(out)], env={"COLUMNS": "400"})
    return result.exit_code, " ".join(result.output.split())


def make_mtd(root: Path) -> Path:
    """Write a tiny Magnetic Tile layout: 8 defect-free images, 2 cracked ones with masks."""
    for directory, count in (("MT_Free", 8), ("MT_Crack", 2)):
        images = root / directory / "Imgs"
        images.mkdir(parents=True)
        for index in range(count):
            Image.new("L", (32, 32), 40 * index % 256).save(images / f"tile{index}.jpg")
            if directory == "MT_Crack":
                Image.new("L", (32, 32), 255).save(images / f"tile{index}.png")
    return root


# ----------------------------------------------------------------------------- data roots


def test_mtd_layout_of_the_tests_is_valid(tmp_path):
    root = make_mtd(tmp_path / "magnetic-tile")
    options = {"datasets": "mtd", "data_root": str(root), "shots": "1", "seeds": "0"}
    plan = validate(build_options({**options, "backbone": "tiny-test", "pretrained": "none"}))
    assert [(job.dataset, job.category) for job in plan.jobs] == [("mtd", "magnetic_tile")]


def test_parent_directory_as_data_root_rejected(tmp_path):
    make_mtd(tmp_path / "datasets" / "magnetic-tile")
    parent = tmp_path / "datasets"
    code, output = invoke(tmp_path / "runs", "run", "--dataset", "mtd", "--data-root", str(parent))
    assert code == 2
    assert f"dataset 'mtd' has no category under {parent}" in output
    assert f"h2vlr-bench datasets check --dataset mtd --data-root {parent}" in output
    assert not (tmp_path / "runs").exists()


def test_other_datasets_layout_rejected(tmp_path):
    root = make_mtd(tmp_path / "magnetic-tile")
    args = ["run", "--dataset", "mvtec", "--data-root", str(root), *TINY]
    code, output = invoke(tmp_path / "runs", *args)
    assert code == 2
    assert f"dataset 'mvtec' has no category under {root}" in output


def test_shared_root_without_categories_rejected(tmp_path):
    root = make_mtd(tmp_path / "magnetic-tile")
    args = ["run", "--dataset", "mtd,folder", "--data-root", str(root), *TINY]
    code, output = invoke(tmp_path / "runs", *args)
    assert code == 2
    assert f"dataset 'folder' has no category under {root}" in output
    assert "--data-root NAME=PATH,NAME=PATH" in output
    assert "dataset 'mtd' has no category" not in output


def test_dataset_left_without_categories_rejected(tmp_path):
    root = make_mtd(tmp_path / "magnetic-tile")
    args = ["--dataset", "mtd,demo", "--data-root", f"mtd={root}", "--categories", "magnetic_tile"]
    code, output = invoke(tmp_path / "runs", "run", *args, *TINY)
    assert code == 2
    assert "--categories selects nothing of dataset demo (categories: checkered_tile" in output


# ----------------------------------------------------------------------------- checkpoints


def test_text_file_as_checkpoint_rejected(tmp_path):
    checkpoint = tmp_path / "weights.bin"
    checkpoint.write_text("these are not weights\n")
    args = [*ONE_JOB[:-4], "--backbone", "tiny-test", "--pretrained", str(checkpoint)]
    code, output = invoke(tmp_path / "runs", "run", *args)
    assert code == 2
    assert f"checkpoint {checkpoint} cannot be loaded into backbone 'tiny-test'" in output
    assert "(not a PyTorch checkpoint" in output
    assert "pass an open_clip checkpoint of tiny-test, or the --backbone" in output
    assert "Traceback" not in output
    assert not (tmp_path / "runs").exists()


def test_checkpoint_of_other_keys_rejected(tmp_path):
    checkpoint = tmp_path / "other.bin"
    torch.save({"encoder.weight": torch.zeros(4, 4)}, checkpoint)
    args = [*ONE_JOB[:-4], "--backbone", "tiny-test", "--pretrained", str(checkpoint)]
    code, output = invoke(tmp_path / "runs", "run", *args)
    assert code == 2
    assert f"checkpoint {checkpoint} cannot be loaded into backbone 'tiny-test' (" in output
    assert "missing keys such as 'positional_embedding'" in output
    assert "1 unexpected keys such as 'encoder.weight'" in output
    assert "visual.transformer" not in output  # a summary, not torch's list of every key


def test_checkpoint_of_the_backbone_accepted(tmp_path):
    from h2vlr.backbone import load_backbone

    checkpoint = tmp_path / "tiny.bin"
    torch.save(load_backbone("tiny-test", "none", device="cpu").model.state_dict(), checkpoint)
    options = {"categories": "checkered_tile", "shots": "1", "seeds": "0"}
    plan = validate(build_options({**options, "backbone": "tiny-test", "pretrained": checkpoint}))
    assert plan.weights.startswith(f"file:{checkpoint.resolve()}@sha256:")
    assert len(plan.jobs) == 1


# ----------------------------------------------------------------------------- run names


def _start_run(out: Path, run_name: str, **values) -> Path:
    """Write the run.json a run with these options leaves behind when it starts."""
    base = {"categories": "checkered_tile", "backbone": "tiny-test", "pretrained": "none"}
    plan = validate(build_options({**base, "out": str(out), "run_name": run_name, **values}))
    RunStore(plan.run_dir).write_run_json({"status": "running", "config": plan.effective_config()})
    return plan.run_dir


def test_reused_run_name_with_other_options_rejected(tmp_path):
    run_dir = _start_run(tmp_path, "first", shots="1", seeds="0")
    before = (run_dir / "run.json").read_text()
    args = ["--categories", "checkered_tile", "--shots", "1,4", "--seeds", "0", *TINY]
    code, output = invoke(tmp_path, "run", *args, "--run-name", "first")
    assert code == 2
    assert f"run directory {run_dir} contains a run with other settings" in output
    assert "shots: 1 in the run, 1,4 now" in output
    assert "seeds:" not in output  # equal settings are not listed
    assert "Pass another --run-name to start a new run" in output
    assert (run_dir / "run.json").read_text() == before


def test_resume_of_latest_run_with_other_options_rejected(tmp_path):
    _start_run(tmp_path, "latest", shots="1", seeds="0", steps=2)
    args = ["--categories", "checkered_tile", "--shots", "1", "--seeds", "0", *TINY]
    code, output = invoke(tmp_path, "run", "--resume", *args, "--steps", "3")
    assert code == 2
    assert "steps: 2 in the run, 3 now" in output


def test_reused_run_name_with_same_options_accepted(tmp_path):
    _start_run(tmp_path, "same", shots="1", seeds="0,1", steps=2)
    values = {"categories": "checkered_tile", "backbone": "tiny-test", "pretrained": "none"}
    values.update(shots="1", seeds="0-1", steps="2", out=str(tmp_path), run_name="same")
    plan = validate(build_options(values))
    assert len(plan.jobs) == 2


def test_ablate_into_a_run_directory_rejected(tmp_path):
    _start_run(tmp_path, "plain", shots="1", seeds="0")
    code, output = invoke(tmp_path, "ablate", *ONE_JOB, "--run-name", "plain")
    assert code == 2
    assert "ablate: False in the run, True now" in output


# ----------------------------------------------------------------------------- out and device


def test_out_that_is_a_file_rejected(tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("not a directory")
    for out in (target, target / "runs"):
        code, output = invoke(out, "run", *ONE_JOB)
        assert code == 2
        assert f"invalid --out {out}: {target} is a file, not a directory" in output
        assert "NotADirectoryError" not in output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_gpu_rejected(tmp_path):
    code, output = invoke(tmp_path / "runs", "run", *ONE_JOB, "--device", "cuda")
    assert code == 2
    assert "--device cuda: CUDA is not available on this machine" in output
    assert "pass --device cpu, or --device auto" in output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_cluster_only_warned(caplog):
    values = {"categories": "checkered_tile", "backbone": "tiny-test", "pretrained": "none"}
    values.update(shots="1", seeds="0", device="cuda", address="127.0.0.1:6379")
    with caplog.at_level(logging.WARNING, logger="orchestration.planning"):
        plan = validate(build_options(values))
    assert {job.device for job in plan.jobs} == {"cuda"}
    assert "every worker of the cluster at 127.0.0.1:6379 must have a GPU" in caplog.text


# ----------------------------------------------------------------------------- wording


def test_datasets_check_counts_one_problem(tmp_path):
    result = CliRunner().invoke(
        app, ["datasets", "check", "--dataset", "mtd", "--data-root", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "1 problem\n" in result.output or "1 problem " in result.output
    assert "1 problems" not in result.output


def test_unavailable_weights_suggest_tiny_backbone(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))  # no cached checkpoints
    code, output = invoke(tmp_path / "runs", "run", "--categories", "checkered_tile")
    assert code == 2
    assert "run with --backbone tiny-test --pretrained none (random weights" in output


def test_bad_seed_in_config_file_names_the_file(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('seeds = "0,x"\n')
    from_file = {"seeds": None, "dataset": None, "config": config, "resume": False}
    with pytest.raises(PlanError, match=rf"invalid seed 'x' in seeds \(config file {config}\)"):
        _options(from_file, ablate=False)
    from_flag = {"seeds": "y", "dataset": None, "config": config, "resume": False}
    with pytest.raises(PlanError, match="invalid seed 'y' in --seeds:"):
        _options(from_flag, ablate=False)


def test_run_json_records_resolved_roots(tmp_path):
    root = make_mtd(tmp_path / "magnetic-tile")
    values = {"datasets": "mtd", "data_root": str(root), "shots": "1", "seeds": "0"}
    plan = validate(build_options({**values, "backbone": "tiny-test", "pretrained": "none"}))
    config = json.loads(json.dumps(plan.effective_config()))
    assert config["data_roots"] == {"mtd": str(root)}
    assert config["support_lists_sha256"] is None


# ----------------------------------------------------------------------------- interruption


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _group_commands(pgid: int) -> list[str]:
    listing = subprocess.run(["ps", "-o", "pgid=,args=", "-e"], capture_output=True, text=True)
    rows = (line.strip().split(maxsplit=1) for line in listing.stdout.splitlines())
    return [row[1] for row in rows if len(row) == 2 and row[0] == str(pgid)]


@pytest.mark.slow
def test_ctrl_c_records_interrupted_run(cache_dir, tmp_path):
    # 16 short jobs, one at a time (each takes every CPU): some finish before Ctrl-C
    # reaches the driver, which notices it within WAIT_SECONDS, and some after.
    cpus = str(os.cpu_count() or 1)
    args = [*BASE_ARGS, "--shots", "1", "--seeds", "0-7", "--methods", "h2vlr,patch-knn"]
    command = [sys.executable, "-m", "orchestration.cli", "run", *args, "--cpus-per-job", cpus]
    command += ["--out", str(tmp_path), "--run-name", "stopped"]
    run_dir = tmp_path / "stopped"
    # Its own session: the driver and the Ray processes it starts share one process group.
    driver = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and driver.poll() is None:
            if list((run_dir / "jobs").glob("*.job.parquet")):
                break
            time.sleep(0.05)
        ray_processes = [cmd for cmd in _group_commands(driver.pid) if "raylet" in cmd]
        driver.send_signal(signal.SIGINT)
        output, _ = driver.communicate(timeout=120)
        deadline = time.monotonic() + 60
        while _group_alive(driver.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _group_commands(driver.pid)
    finally:
        if _group_alive(driver.pid):
            os.killpg(driver.pid, signal.SIGKILL)

    assert ray_processes, "the driver did not start a local Ray instance in its process group"
    assert driver.returncode == 130, output
    info = json.loads((run_dir / "run.json").read_text())
    done = len(list((run_dir / "jobs").glob("*.job.parquet")))
    assert 0 < done < 16, "the run must be interrupted after some jobs and before all"
    assert f"interrupted: {done} of 16 jobs done; run the same command to continue" in " ".join(
        output.split()
    )
    assert info["status"] == "interrupted"
    assert info["jobs"]["done"] == done
    assert info["finished_at"] is not None
    assert not (run_dir / "jobs.parquet").exists()
    assert not left, f"Ray processes outlived the driver: {left}"


def test_image_size_off_patch_grid_rejected(tmp_path):
    code, output = invoke(tmp_path, "run", *ONE_JOB, "--image-size", "65")
    assert code == 2
    assert "invalid --image-size 65 for backbone 'tiny-test'" in output
    assert "patch size 8, for example 64 or 72" in output
    assert not any(tmp_path.iterdir())  # nothing started, no run directory


def test_resume_of_unknown_run_name_rejected(tmp_path):
    _start_run(tmp_path, "existing", shots="1", seeds="0")
    code, output = invoke(tmp_path, "run", *ONE_JOB, "--resume", "--run-name", "existnig")
    assert code == 2
    assert "--resume found no run named 'existnig'" in output
    assert not (tmp_path / "existnig").exists()


def test_default_steps_given_explicitly_accepted(tmp_path):
    from h2vlr.config import H2VLRConfig

    _start_run(tmp_path, "defaults", shots="1", seeds="0")
    values = {"categories": "checkered_tile", "backbone": "tiny-test", "pretrained": "none"}
    values.update(shots="1", seeds="0", out=str(tmp_path), run_name="defaults")
    values["steps"] = str(H2VLRConfig().steps)
    plan = validate(build_options(values))
    assert len(plan.jobs) == 1


def test_invalid_listed_support_set_rejected(tmp_path):
    lists = tmp_path / "support.json"
    missing = "checkered_tile/train/good/missing.png"
    lists.write_text(json.dumps({"demo": {"checkered_tile": {"1": {"0": [missing]}}}}))
    code, output = invoke(tmp_path / "runs", "run", *ONE_JOB, "--support-lists", str(lists))
    assert code == 2
    assert f"invalid entries in support lists file {lists}" in output
    assert "demo/checkered_tile shot 1 seed 0" in output
    assert missing in output
    assert not (tmp_path / "runs").exists()


def test_unlisted_jobs_logged_as_sampled(tmp_path, caplog):
    from h2vlr.data import get_dataset, sample_support

    data = get_dataset("demo").load_category(None, "checkered_tile")
    listed = [sample.rel_path for sample in sample_support(data, 1, 0)]
    lists = tmp_path / "support.json"
    lists.write_text(json.dumps({"demo": {"checkered_tile": {"1": {"0": listed}}}}))
    values = {"categories": "checkered_tile", "shots": "1", "seeds": "0,1"}
    values.update(backbone="tiny-test", pretrained="none", support_lists=str(lists))
    with caplog.at_level(logging.WARNING, logger="orchestration.planning"):
        plan = validate(build_options(values))
    assert len(plan.jobs) == 2
    assert "has no entry for 1 of 2 jobs" in caplog.text
