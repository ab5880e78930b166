"""Per-job files, resume bookkeeping and final tables of a run directory."""

from __future__ import annotations

import pandas as pd
import pytest
from results_rows import job_row

from results.report import format_mean_std, plot_leaderboard
from results.schema import JOBS, SCORES, SchemaError
from results.storage import RunStore, write_final_tables


def score_rows(row: dict) -> list[dict]:
    keys = [name for name in SCORES.names if name in JOBS.names]
    base = {key: row[key] for key in keys}
    return [
        {
            **base,
            "rel_path": f"{row['category']}/test/{i:03d}.png",
            "label": i % 2,
            "defect_type": "crack" if i % 2 else "good",
            "image_score": i / 10,
        }
        for i in range(3)
    ]


def test_write_job_then_done(tmp_path):
    store = RunStore(tmp_path / "run")
    ok = job_row(seed=0, metrics={"image_auroc": 0.9})
    failed = job_row(seed=1, status="failed")
    store.write_job(ok, score_rows(ok))
    store.write_job(failed, [])

    assert store.done_job_ids() == {ok["job_id"]}  # failed jobs run again on resume
    assert sorted(p.name for p in store.jobs_dir.iterdir()) == sorted(
        [
            f"{ok['job_id']}.job.parquet",
            f"{ok['job_id']}.scores.parquet",
            f"{failed['job_id']}.job.parquet",
            f"{failed['job_id']}.scores.parquet",
        ]
    )


def test_invalid_row_writes_nothing(tmp_path):
    store = RunStore(tmp_path / "run")
    row = job_row()
    row["seed"] = "zero"
    with pytest.raises(SchemaError, match="column 'seed'"):
        store.write_job(row, [])
    assert not store.jobs_dir.exists()


def test_final_tables_read_back(tmp_path):
    store = RunStore(tmp_path / "run")
    rows = [job_row(seed=seed, metrics={"image_auroc": 0.5 + seed / 10}) for seed in (1, 0)]
    for row in rows:
        store.write_job(row, score_rows(row))
    stray = job_row(seed=7, metrics={"image_auroc": 0.1})  # from another plan: left out
    store.write_job(stray, score_rows(stray))

    tables = write_final_tables(store, [r["job_id"] for r in rows], ablated_method=None)

    jobs = pd.read_parquet(tmp_path / "run" / "jobs.parquet")
    assert list(jobs.columns) == JOBS.names
    assert jobs["seed"].tolist() == [0, 1]  # sorted by job id
    assert len(pd.read_parquet(tmp_path / "run" / "scores.parquet")) == 6
    board = pd.read_parquet(tmp_path / "run" / "leaderboard.parquet")
    assert board["image_auroc_mean"].tolist() == pytest.approx([0.55])
    assert tables.ablation is None
    assert not (tmp_path / "run" / "ablation.parquet").exists()
    pd.testing.assert_frame_equal(board, tables.leaderboard, check_dtype=False)


def test_plot_writes_png(tmp_path):
    from results.leaderboard import build_leaderboard

    rows = [
        job_row(seed=s, shot=shot, method=m, metrics={"image_auroc": 0.5 + s / 10})
        for s in (0, 1)
        for shot in ("1", "4")
        for m in ("h2vlr", "patch-knn")
    ]
    path = plot_leaderboard(build_leaderboard(pd.DataFrame(rows)), tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_format_mean_std():
    assert format_mean_std(0.8731, 0.0123) == "87.3 ± 1.2"
    assert format_mean_std(0.5, float("nan")) == "50.0"
    assert format_mean_std(float("nan"), float("nan")) == "-"


def test_duplicate_key_rejected(tmp_path):
    from results.schema import JOBS as JOBS_SCHEMA

    store = RunStore(tmp_path / "run")
    row = job_row()
    table = JOBS_SCHEMA.table_from_rows([row, row])
    with pytest.raises(SchemaError, match="duplicate rows"):
        store.write_table(JOBS_SCHEMA, table)
    assert not (tmp_path / "run" / "jobs.parquet").exists()
