"""Parquet files of a run directory: atomic per-job files and the final tables.

Layout under ``RUN_DIR`` (``--out DIR/RUN_NAME``)::

    jobs/<job_id>.scores.parquet   one row per test image of the job
    jobs/<job_id>.job.parquet      the job's row; written last, so its presence marks the job done
    jobs.parquet  scores.parquet  leaderboard.parquet  leaderboard_by_category.parquet
    ablation.parquet (ablate only)  run.json  leaderboard.png

Every file is written to a temporary name in the same directory and renamed into
place, so a killed run leaves either the whole file or none of it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from results.schema import (
    ABLATION,
    JOBS,
    LEADERBOARD,
    LEADERBOARD_BY_CATEGORY,
    SCORES,
    STATUS_OK,
    SchemaError,
    TableSchema,
)

logger = logging.getLogger(__name__)

JOB_FILE_SUFFIX = ".job.parquet"
SCORES_FILE_SUFFIX = ".scores.parquet"


def write_parquet_atomic(table: pa.Table, path: Path) -> Path:
    """Write ``table`` to ``path`` through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(payload: Mapping[str, Any], path: Path) -> Path:
    """Write ``payload`` as indented JSON through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_table(path: Path, schema: TableSchema) -> pa.Table:
    """Read a Parquet file and cast it to ``schema``.

    Raises:
        SchemaError: the file's columns differ from the schema (for example a run
            directory written by another version of h2vlr-bench).
    """
    table = pq.read_table(path)
    if table.column_names != schema.names:
        raise SchemaError(
            f"{path} does not match table {schema.name!r}: columns {table.column_names}, "
            f"expected {schema.names}; write the run to a new --run-name"
        )
    return table.cast(schema.arrow_schema())


class RunStore:
    """Reads and writes the files of one run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.jobs_dir = self.run_dir / "jobs"

    def job_file(self, job_id: str) -> Path:
        return self.jobs_dir / f"{job_id}{JOB_FILE_SUFFIX}"

    def scores_file(self, job_id: str) -> Path:
        return self.jobs_dir / f"{job_id}{SCORES_FILE_SUFFIX}"

    def table_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.parquet"

    def write_job(
        self, job_row: Mapping[str, Any], score_rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """Check and write one finished job: its scores first, then its row.

        Raises:
            SchemaError: a row does not match the ``jobs`` or ``scores`` schema.
        """
        job_table = JOBS.table_from_rows([job_row])
        scores_table = SCORES.table_from_rows(score_rows)
        job_id = job_row["job_id"]
        write_parquet_atomic(scores_table, self.scores_file(job_id))
        write_parquet_atomic(job_table, self.job_file(job_id))

    def done_job_ids(self) -> set[str]:
        """Return the ids of jobs whose row is on disk with status ok.

        Failed jobs are not counted as done, so a resumed run runs them again.
        """
        done: set[str] = set()
        if not self.jobs_dir.is_dir():
            return done
        for path in self.jobs_dir.glob(f"*{JOB_FILE_SUFFIX}"):
            job_id = path.name[: -len(JOB_FILE_SUFFIX)]
            status = pq.read_table(path, columns=["status"]).column("status").to_pylist()
            if status == [STATUS_OK] and self.scores_file(job_id).exists():
                done.add(job_id)
        return done

    def collect(self, job_ids: Iterable[str]) -> tuple[pa.Table, pa.Table]:
        """Concatenate the per-job files of ``job_ids`` into the jobs and scores tables.

        Rows are sorted by job id (and by image path within a job), so the tables do
        not depend on the order in which jobs finished. Jobs without a file are left out.
        """
        job_tables: list[pa.Table] = []
        score_tables: list[pa.Table] = []
        for job_id in sorted(job_ids):
            job_path = self.job_file(job_id)
            if not job_path.exists():
                continue
            job_tables.append(read_table(job_path, JOBS))
            score_tables.append(read_table(self.scores_file(job_id), SCORES))
        jobs = pa.concat_tables(job_tables) if job_tables else JOBS.empty_table()
        scores = pa.concat_tables(score_tables) if score_tables else SCORES.empty_table()
        return jobs, scores.sort_by([("job_id", "ascending"), ("rel_path", "ascending")])

    def write_table(self, schema: TableSchema, data: pa.Table | pd.DataFrame) -> Path:
        """Check a final table against ``schema`` and write it as ``<name>.parquet``."""
        table = data if isinstance(data, pa.Table) else schema.table_from_frame(data)
        if table.schema != schema.arrow_schema():
            raise SchemaError(
                f"table {schema.name!r} has Arrow schema {table.schema}, expected "
                f"{schema.arrow_schema()}"
            )
        keys = table.select(list(schema.key)).to_pandas()
        duplicated = keys[keys.duplicated()]
        if not duplicated.empty:
            raise SchemaError(
                f"table {schema.name!r} has {len(duplicated)} duplicate rows of key "
                f"{schema.key}, first {duplicated.iloc[0].to_dict()}"
            )
        path = write_parquet_atomic(table, self.table_file(schema.name))
        logger.debug("wrote %s (%d rows)", path, table.num_rows)
        return path

    def write_run_json(self, payload: Mapping[str, Any]) -> Path:
        return write_json_atomic(payload, self.run_dir / "run.json")


@dataclass(frozen=True)
class FinalTables:
    """The tables of a finished run, as written to its directory."""

    jobs: pd.DataFrame
    scores: pd.DataFrame
    leaderboard: pd.DataFrame
    leaderboard_by_category: pd.DataFrame
    ablation: pd.DataFrame | None  # only for ablation runs


def write_final_tables(
    store: RunStore, job_ids: Iterable[str], ablated_method: str | None
) -> FinalTables:
    """Aggregate the per-job files of ``job_ids`` and write every final table.

    Args:
        store: the run directory.
        job_ids: the jobs of the current plan; files of other jobs in the directory
            (from an earlier plan under the same run name) are left out.
        ablated_method: method whose variants ``ablation.parquet`` compares, or None
            to write no ablation table.
    """
    from results.ablation import build_ablation
    from results.leaderboard import build_leaderboard, build_leaderboard_by_category

    jobs_table, scores_table = store.collect(job_ids)
    store.write_table(JOBS, jobs_table)
    store.write_table(SCORES, scores_table)
    jobs = jobs_table.to_pandas()
    leaderboard = build_leaderboard(jobs)
    by_category = build_leaderboard_by_category(jobs)
    store.write_table(LEADERBOARD, leaderboard)
    store.write_table(LEADERBOARD_BY_CATEGORY, by_category)
    ablation = None
    if ablated_method is not None:
        ablation = build_ablation(leaderboard, ablated_method)
        store.write_table(ABLATION, ablation)
    return FinalTables(jobs, scores_table.to_pandas(), leaderboard, by_category, ablation)
