"""End-to-end runs on demo with the tiny random backbone, on local Ray instances."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import ray
from run_helpers import BASE_ARGS, BASELINE_ARGS, comparable, copy_run, invoke_cli
from sklearn.metrics import average_precision_score, roc_auc_score

from orchestration.job import FAULT_DIR_ENV
from orchestration.planning import build_options, validate
from results.report import RANDOM_WEIGHTS_NOTE
from results.schema import JOBS, METRIC_NAMES, TABLES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray(baseline, tmp_path_factory):
    """One local Ray instance for the module; its workers see the fault-injection directory."""
    fault_dir = tmp_path_factory.mktemp("faults")
    os.environ[FAULT_DIR_ENV] = str(fault_dir)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield fault_dir
    ray.shutdown()
    del os.environ[FAULT_DIR_ENV]


def _expected_dtype(column) -> str:
    import pyarrow as pa

    if pa.types.is_timestamp(column.dtype):
        return "datetime64[us, UTC]"
    if pa.types.is_list(column.dtype):
        return "object"
    if pa.types.is_string(column.dtype):
        return "str"
    return {"int64": "int64", "double": "float64", "bool": "bool"}[str(column.dtype)]


def test_run_writes_every_table(baseline):
    for name in ("jobs", "scores", "leaderboard", "leaderboard_by_category"):
        frame = baseline.table(name)
        schema = TABLES[name]
        assert list(frame.columns) == schema.names
        for column in schema.columns:
            assert str(frame[column.name].dtype) == _expected_dtype(column), (name, column.name)
    assert not (baseline.run_dir / "ablation.parquet").exists()
    assert (baseline.run_dir / "leaderboard.png").stat().st_size > 0
    assert RANDOM_WEIGHTS_NOTE in " ".join(baseline.output.split())  # Rich may wrap it


def test_run_jobs_table_rows(baseline):
    jobs = baseline.table("jobs")
    assert len(jobs) == 8  # 2 shots x 2 seeds x 2 methods, one category
    assert jobs["job_id"].is_unique
    assert (jobs["status"] == "ok").all()
    assert sorted(set(zip(jobs["shot"], jobs["seed"], jobs["method"], strict=True))) == sorted(
        (shot, seed, method)
        for shot in ("1", "4")
        for seed in (0, 1)
        for method in ("h2vlr", "patch-knn")
    )
    assert (jobs["n_support"] == jobs["shot"].astype(int)).all()
    assert jobs["support_files"].map(len).tolist() == jobs["n_support"].tolist()
    assert (jobs["backbone"] == "tiny-test").all()
    assert (jobs["pretrained"] == "none").all()
    assert jobs["random_weights"].all()
    assert (jobs["image_size"] == 64).all()
    assert (jobs["pixel_images_excluded"] == 0).all()  # every demo anomaly has a mask
    # The feature tasks filled the cache, so no job encoded a dataset image.
    assert (jobs["images_encoded"] == 0).all()
    assert (jobs["feature_cache_hits"] > 0).all()
    h2vlr_options = jobs.loc[jobs["method"] == "h2vlr", "options"].map(json.loads)
    assert all(options == {"steps": 2} for options in h2vlr_options)


def test_run_metrics_match_scores_table(baseline):
    jobs = baseline.table("jobs").set_index("job_id")
    scores = baseline.table("scores")
    assert len(scores) == 8 * 20  # 20 test images in the demo category
    for job_id, rows in scores.groupby("job_id"):
        labels, values = rows["label"].to_numpy(), rows["image_score"].to_numpy()
        assert jobs.at[job_id, "image_auroc"] == pytest.approx(roc_auc_score(labels, values))
        assert jobs.at[job_id, "image_ap"] == pytest.approx(average_precision_score(labels, values))
        assert jobs.at[job_id, "n_test_anomalous"] == labels.sum()
        for name in ("backbone", "pretrained", "random_weights", "image_size", "n_support"):
            assert (rows[name] == jobs.at[job_id, name]).all(), name


def test_run_leaderboard_matches_jobs(baseline):
    jobs = baseline.table("jobs")
    leaderboard = baseline.table("leaderboard")
    assert len(leaderboard) == 4
    assert leaderboard["shot"].tolist() == ["1", "4", "1", "4"]
    for _, row in leaderboard.iterrows():
        group = jobs[(jobs["method"] == row["method"]) & (jobs["shot"] == row["shot"])]
        for metric in METRIC_NAMES:
            values = group[metric].to_numpy()
            assert row[f"{metric}_mean"] == pytest.approx(values.mean())
            assert row[f"{metric}_std"] == pytest.approx(values.std(ddof=1))
            assert row[f"{metric}_n_seeds"] == 2
            assert row[f"{metric}_n_categories"] == 1
        assert row["n_jobs_ok"] == 2
        assert row["n_jobs_failed"] == 0
    assert leaderboard["random_weights"].all()
    by_category = baseline.table("leaderboard_by_category")
    assert len(by_category) == 4
    assert (by_category["category"] == "checkered_tile").all()
    assert by_category["random_weights"].all()


def test_run_json_records_counts(baseline):
    info = json.loads((baseline.run_dir / "run.json").read_text())
    assert info["jobs"] == {"total": 8, "ok": 8, "failed": 0, "skipped": 0}
    assert info["status"] == "finished"
    assert info["random_weights"] is True
    assert info["warnings"]
    assert info["features"]["images_encoded_by_jobs"] == 0
    assert info["config"]["backbone"] == "tiny-test"
    assert info["versions"]["torch"]


def test_no_gpu_requested_without_gpus(local_ray):
    from orchestration.execution import task_resources

    assert task_resources(2.0, 1.0) == {"num_cpus": 2.0, "num_gpus": 0}


def test_failed_job_recorded(local_ray, baseline, tmp_path):
    args = [*BASE_ARGS, "--shots", "1", "--seeds", "0,1", "--methods", "patch-knn"]
    values = {"categories": "checkered_tile", "shots": "1", "seeds": "0,1"}
    values.update(methods="patch-knn", backbone="tiny-test", pretrained="none")
    failing = next(job for job in validate(build_options(values)).jobs if job.seed == 1)
    marker = local_ray / f"{failing.job_id}.raise"
    marker.touch()
    try:
        result = invoke_cli("run", args, tmp_path, "faulty")
    finally:
        marker.unlink()

    assert result.exit_code == 1
    jobs = result.table("jobs").set_index("seed")
    assert jobs.at[1, "status"] == "failed"
    assert jobs.at[1, "error"] == f"RuntimeError: test hook: job {failing.job_id} raises on request"
    assert "Traceback" in jobs.at[1, "traceback"]
    assert np.isnan(jobs.at[1, "image_auroc"])
    assert jobs.at[1, "image_auroc_reason"] == "job failed"
    assert jobs.at[0, "status"] == "ok"
    reference = baseline.table("jobs")
    reference = reference[(reference["method"] == "patch-knn") & (reference["shot"] == "1")]
    expected = reference.set_index("seed").at[0, "image_auroc"]
    assert jobs.at[0, "image_auroc"] == expected
    leaderboard = result.table("leaderboard")
    assert leaderboard["n_jobs_failed"].tolist() == [1]
    assert leaderboard["n_jobs_ok"].tolist() == [1]
    assert set(result.table("scores")["seed"]) == {0}


def test_worker_killed_mid_job_retried(local_ray, baseline, tmp_path):
    args = [*BASE_ARGS, "--shots", "1", "--seeds", "0", "--methods", "h2vlr"]
    plan = validate(
        build_options(
            {
                "categories": "checkered_tile",
                "shots": "1",
                "seeds": "0",
                "backbone": "tiny-test",
                "pretrained": "none",
                "steps": 2,
            }
        )
    )
    (job,) = plan.jobs
    marker = local_ray / f"{job.job_id}.exit"
    marker.touch()

    result = invoke_cli("run", args, tmp_path, "killed")

    assert not marker.exists(), "the worker never reached the exit hook"
    assert result.exit_code == 0, result.output
    actual = comparable(result.table("jobs"), "jobs")
    reference = baseline.table("jobs")
    expected = comparable(reference[reference["job_id"] == job.job_id], "jobs")
    pd.testing.assert_frame_equal(actual, expected)


def test_ablate_writes_ablation_table(local_ray, tmp_path):
    args = [*BASE_ARGS, "--shots", "1", "--seeds", "0", "--variants", "full,no-hsr,no-margin"]
    result = invoke_cli("ablate", args, tmp_path, "ablation")

    assert result.exit_code == 0, result.output
    ablation = result.table("ablation")
    leaderboard = result.table("leaderboard").set_index("variant")
    assert ablation["variant"].tolist() == ["full", "no-hsr", "no-margin"]
    assert (ablation["method"] == "h2vlr").all()
    assert (ablation["backbone"] == "tiny-test").all()
    assert (ablation["pretrained"] == "none").all()
    assert ablation["random_weights"].all()
    for _, row in ablation.iterrows():
        for metric in METRIC_NAMES:
            expected = (
                leaderboard.at[row["variant"], f"{metric}_mean"]
                - leaderboard.at["full", f"{metric}_mean"]
            )
            assert row[f"{metric}_delta"] == pytest.approx(expected, nan_ok=True)
    assert (ablation.loc[ablation["variant"] == "full", "image_auroc_delta"] == 0).all()


def test_resume_skips_done_jobs(local_ray, baseline, tmp_path):
    run_dir = copy_run(baseline.run_dir, tmp_path / "resumed")
    job_files = sorted((run_dir / "jobs").glob("*.job.parquet"))
    unchanged = {path: path.stat().st_mtime_ns for path in job_files[:5]}
    for path in job_files[5:]:
        path.unlink()
    for name in ("jobs", "scores", "leaderboard", "leaderboard_by_category"):
        (run_dir / f"{name}.parquet").unlink()

    result = invoke_cli("run", ["--resume", *BASELINE_ARGS], tmp_path, "resumed")

    assert result.exit_code == 0, result.output
    info = json.loads((run_dir / "run.json").read_text())
    assert info["jobs"]["skipped"] == 5
    assert info["jobs"]["ok"] == 3
    assert {path: path.stat().st_mtime_ns for path in unchanged} == unchanged
    for name in ("jobs", "scores", "leaderboard", "leaderboard_by_category"):
        pd.testing.assert_frame_equal(
            comparable(result.table(name), name), comparable(baseline.table(name), name)
        )
    assert result.table("jobs")["job_id"].is_unique
    assert list(result.table("jobs").columns) == JOBS.names


def test_window_methods_encode_nothing_in_jobs(local_ray, tmp_path):
    args = [*BASE_ARGS, "--shots", "1", "--seeds", "0", "--methods", "winclip,winclip-plus"]
    result = invoke_cli("run", args, tmp_path, "windows")

    assert result.exit_code == 0, result.output
    jobs = result.table("jobs")
    assert (jobs["status"] == "ok").all()
    assert jobs["images_encoded"].tolist() == [0, 0]
    assert (jobs["feature_cache_hits"] > 0).all()
