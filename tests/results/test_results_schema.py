"""Row checks of the result schema and Parquet round trips."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pandas as pd
import pytest

from results.schema import JOBS, METRIC_NAMES, SCORES, TABLES, SchemaError
from results.storage import write_parquet_atomic


def score_row(**changes) -> dict:
    row = {
        "job_id": "job-a",
        "dataset": "demo",
        "category": "tile",
        "shot": "1",
        "seed": 0,
        "method": "patch-knn",
        "variant": "full",
        "backbone": "ViT-B-16-plus-240",
        "pretrained": "laion400m_e32",
        "random_weights": False,
        "image_size": 240,
        "n_support": 4,
        "rel_path": "tile/test/good/000.png",
        "label": 0,
        "defect_type": "good",
        "image_score": 0.25,
    }
    row.update(changes)
    return row


def test_schema_declares_every_metric():
    for metric in METRIC_NAMES:
        column = JOBS.column(metric)
        assert column.higher_is_better is True
        assert JOBS.column(f"{metric}_reason").dtype.equals(JOBS.column("error").dtype)


def test_schema_column_names_unique():
    for schema in TABLES.values():
        assert len(schema.names) == len(set(schema.names)), schema.name
        assert set(schema.key) <= set(schema.names)


def test_rows_roundtrip_through_parquet(tmp_path):
    rows = [
        score_row(),
        score_row(
            rel_path="tile/test/crack/001.png", label=1, defect_type="crack", image_score=0.9
        ),
    ]
    path = write_parquet_atomic(SCORES.table_from_rows(rows), tmp_path / "scores.parquet")

    frame = pd.read_parquet(path)

    assert frame.to_dict("records") == rows
    assert str(frame["seed"].dtype) == "int64"
    assert str(frame["image_score"].dtype) == "float64"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seed": "0"}, "column 'seed'"),
        ({"label": True}, "column 'label'"),
        ({"image_score": "high"}, "column 'image_score'"),
        ({"defect_type": None}, "is null"),
    ],
)
def test_row_with_wrong_value_rejected(changes, message):
    with pytest.raises(SchemaError, match=message):
        SCORES.table_from_rows([score_row(**changes)])


def test_row_with_missing_or_extra_column_rejected():
    row = score_row()
    del row["label"]
    with pytest.raises(SchemaError, match=r"missing columns \['label'\]"):
        SCORES.table_from_rows([row])
    with pytest.raises(SchemaError, match=r"unexpected columns \['extra'\]"):
        SCORES.table_from_rows([score_row(extra=1)])


def test_nan_allowed_in_float_columns():
    table = SCORES.table_from_rows([score_row(image_score=math.nan)])
    assert math.isnan(table.column("image_score")[0].as_py())


def test_frame_with_wrong_columns_rejected():
    frame = pd.DataFrame([score_row()]).drop(columns="label")
    with pytest.raises(SchemaError, match="missing columns"):
        SCORES.table_from_frame(frame)


def test_describe_lists_every_column():
    from results.schema import describe

    text = describe()
    for schema in TABLES.values():
        for name in schema.names:
            assert f"`{name}`" in text


def test_timestamp_must_be_timezone_aware():
    from results.schema import TIMESTAMP, Column, TableSchema

    schema = TableSchema("t", (Column("at", TIMESTAMP, "time"),), key=("at",))
    schema.table_from_rows([{"at": datetime(2026, 1, 1, tzinfo=UTC)}])
    with pytest.raises(SchemaError, match="column 'at'"):
        schema.table_from_rows([{"at": datetime(2026, 1, 1)}])


def test_every_table_flags_random_weights():
    for schema in TABLES.values():
        for name in ("backbone", "pretrained", "random_weights", "image_size"):
            assert schema.column(name).dtype.equals(JOBS.column(name).dtype), (schema.name, name)


def test_scores_carry_the_job_spec():
    for name in ("backbone", "pretrained", "random_weights", "image_size", "n_support"):
        assert SCORES.column(name).dtype.equals(JOBS.column(name).dtype), name
    assert JOBS.column("pixel_images_excluded").dtype.equals(JOBS.column("n_test").dtype)


def test_docs_list_the_jobs_and_scores_columns():
    from pathlib import Path

    from results.schema import describe

    docs = Path(__file__).resolve().parents[2] / "docs" / "results.md"
    assert describe([JOBS, SCORES]) in docs.read_text()
