"""The one declaration of every result column: name, Arrow dtype, meaning, direction.

Every table a run writes (``jobs``, ``scores``, ``leaderboard``,
``leaderboard_by_category``, ``ablation``) is built from a :class:`TableSchema` below.
Rows are checked against it before they are written; a row with a missing, extra or
mistyped column raises :class:`SchemaError` instead of being coerced.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from h2vlr.metrics import METRIC_NAMES

METRIC_MEANINGS: dict[str, str] = {
    "image_auroc": "area under the ROC curve of the image scores",
    "image_ap": "average precision of the image scores",
    "image_f1_max": "best F1 over all thresholds of the image scores",
    "pixel_auroc": "area under the ROC curve of the anomaly-map pixels",
    "pixel_ap": "average precision of the anomaly-map pixels",
    "pixel_f1_max": "best F1 over all thresholds of the anomaly-map pixels",
    "pixel_aupro": "per-region overlap integrated up to a false positive rate of 0.3, divided by 0.3",
}

STATUS_OK = "ok"
STATUS_FAILED = "failed"

TIMESTAMP = pa.timestamp("us", tz="UTC")


class SchemaError(ValueError):
    """Raised when rows or a data frame do not match their table's schema."""


@dataclass(frozen=True)
class Column:
    """One column of a result table."""

    name: str
    dtype: pa.DataType  # Arrow type written to Parquet
    meaning: str  # one line, with the unit where there is one
    higher_is_better: bool | None = None  # None where the column is not a score
    nullable: bool = False  # True where null is a legal value (never for metrics: NaN is used)
    reproducible: bool = True  # False for values that change between identical runs (times, host)


@dataclass(frozen=True)
class TableSchema:
    """The ordered columns of one table and the checks applied to its rows."""

    name: str  # file stem, e.g. "jobs" for jobs.parquet
    columns: tuple[Column, ...]
    key: tuple[str, ...]  # columns that identify a row; RunStore.write_table rejects duplicates

    @property
    def names(self) -> list[str]:
        return [column.name for column in self.columns]

    def column(self, name: str) -> Column:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(f"table {self.name!r} has no column {name!r}; columns: {self.names}")

    def reproducible_names(self) -> list[str]:
        """Return the columns whose values depend only on the job specifications."""
        return [column.name for column in self.columns if column.reproducible]

    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.dtype, nullable=c.nullable) for c in self.columns])

    def table_from_rows(self, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
        """Check ``rows`` (dicts keyed by column name) and build an Arrow table.

        Raises:
            SchemaError: a row has missing or extra keys, or a value of the wrong type.
        """
        for index, row in enumerate(rows):
            self._check_row(index, row)
        columns = {c.name: [row[c.name] for row in rows] for c in self.columns}
        return pa.Table.from_pydict(columns, schema=self.arrow_schema())

    def table_from_frame(self, frame: pd.DataFrame) -> pa.Table:
        """Check a data frame's columns and convert it to an Arrow table of this schema."""
        missing = [name for name in self.names if name not in frame.columns]
        extra = [name for name in frame.columns if name not in self.names]
        if missing or extra:
            raise SchemaError(
                f"data frame for table {self.name!r} does not match its schema: "
                f"missing columns {missing}, unexpected columns {extra}"
            )
        return self.table_from_rows(frame[self.names].to_dict("records"))

    def empty_table(self) -> pa.Table:
        return self.arrow_schema().empty_table()

    def _check_row(self, index: int, row: Mapping[str, Any]) -> None:
        missing = [name for name in self.names if name not in row]
        extra = [key for key in row if key not in self.names]
        if missing or extra:
            raise SchemaError(
                f"row {index} of table {self.name!r} does not match its schema: "
                f"missing columns {missing}, unexpected columns {extra}"
            )
        for column in self.columns:
            _check_value(self.name, index, column, row[column.name])


def _check_value(table: str, index: int, column: Column, value: Any) -> None:
    if value is None or (isinstance(value, float) and math.isnan(value) and not _is_float(column)):
        if column.nullable:
            return
        raise SchemaError(
            f"row {index} of table {table!r}: column {column.name!r} is null but the schema "
            f"does not allow nulls ({column.meaning})"
        )
    if not _matches(column.dtype, value):
        raise SchemaError(
            f"row {index} of table {table!r}: column {column.name!r} contains {value!r} of type "
            f"{type(value).__name__}; expected Arrow type {column.dtype}"
        )


def _is_float(column: Column) -> bool:
    return pa.types.is_floating(column.dtype)


def _matches(dtype: pa.DataType, value: Any) -> bool:
    # bool is a subclass of int in Python, so it is excluded from integer columns.
    if pa.types.is_boolean(dtype):
        return isinstance(value, bool)
    if pa.types.is_integer(dtype):
        return _is_integer(value)
    if pa.types.is_floating(dtype):
        return _is_integer(value) or _is_real(value)
    if pa.types.is_string(dtype):
        return isinstance(value, str)
    if pa.types.is_timestamp(dtype):
        return isinstance(value, datetime) and value.tzinfo is not None
    if pa.types.is_list(dtype):
        return isinstance(value, list | tuple | np.ndarray) and all(
            _matches(dtype.value_type, item) for item in value
        )
    raise TypeError(f"no value check for Arrow type {dtype}; extend _matches")


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (hasattr(value, "dtype") and value.dtype.kind in "iu")


def _is_real(value: Any) -> bool:
    return isinstance(value, float) or (hasattr(value, "dtype") and value.dtype.kind == "f")


def _metric_columns() -> list[Column]:
    columns: list[Column] = []
    for metric in METRIC_NAMES:
        columns.append(Column(metric, pa.float64(), METRIC_MEANINGS[metric], True))
        columns.append(
            Column(
                f"{metric}_reason",
                pa.string(),
                f"why {metric} is NaN; empty where it is defined",
            )
        )
    return columns


def _select(columns: Sequence[Column], names: Sequence[str]) -> tuple[Column, ...]:
    by_name = {column.name: column for column in columns}
    return tuple(by_name[name] for name in names)


# Columns that identify the backbone behind a result, repeated in every table.
BACKBONE_NAMES: tuple[str, ...] = ("backbone", "pretrained", "random_weights", "image_size")

SPEC_COLUMNS: tuple[Column, ...] = (
    Column(
        "job_id", pa.string(), "identifier of the job: readable spec and a hash of its settings"
    ),
    Column("dataset", pa.string(), "dataset adapter name"),
    Column("category", pa.string(), "category within the dataset"),
    Column("shot", pa.string(), 'requested support size as given: "1", "4" or "full"'),
    Column("seed", pa.int64(), "seed of the support sampling and of every random draw of the fit"),
    Column("method", pa.string(), "method name"),
    Column("variant", pa.string(), "method variant, with any +key=value overrides"),
    Column("backbone", pa.string(), "open_clip model name of the frozen backbone"),
    Column(
        "pretrained", pa.string(), 'backbone weights: tag, "file:<path>@sha256:<hex>" or "none"'
    ),
    Column(
        "random_weights", pa.bool_(), 'true when pretrained is "none": scores are sanity figures'
    ),
    Column("image_size", pa.int64(), "evaluation resolution S in pixels (square input side)"),
)

JOBS = TableSchema(
    name="jobs",
    key=("job_id",),
    columns=(
        *SPEC_COLUMNS,
        Column("n_support", pa.int64(), "number of support images actually used"),
        Column("status", pa.string(), f'"{STATUS_OK}" or "{STATUS_FAILED}"'),
        Column("error", pa.string(), "exception type and message of a failed job; empty when ok"),
        Column(
            "traceback", pa.string(), "last lines of the traceback of a failed job; empty when ok"
        ),
        *_metric_columns(),
        Column("n_test", pa.int64(), "number of test images scored"),
        Column("n_test_anomalous", pa.int64(), "number of anomalous test images"),
        Column(
            "pixel_images_excluded",
            pa.int64(),
            "anomalous test images without a mask, left out of the pixel metrics; 0 normally",
        ),
        Column(
            "support_files",
            pa.list_(pa.string()),
            "support images, paths relative to the dataset root, in sampling order",
        ),
        Column("options", pa.string(), "method options as sorted JSON, before variant overrides"),
        Column("fit_stats", pa.string(), "statistics the method returned from fit, as JSON"),
        Column("config_hash", pa.string(), "SHA-256 of the job specification and its settings"),
        Column(
            "images_encoded",
            pa.int64(),
            "dataset images the job encoded itself; 0 when every feature came from the cache",
        ),
        Column(
            "feature_cache_hits", pa.int64(), "images whose features the job read from the cache"
        ),
        Column(
            "fit_seconds",
            pa.float64(),
            "wall time of building and fitting the method, support features read from the cache included, seconds",
            False,
            reproducible=False,
        ),
        Column(
            "score_seconds",
            pa.float64(),
            "wall time of scoring the test split, seconds",
            False,
            reproducible=False,
        ),
        Column(
            "images_per_second",
            pa.float64(),
            "test images scored per second of score_seconds",
            True,
            reproducible=False,
        ),
        Column("host", pa.string(), "host name of the worker that ran the job", reproducible=False),
        Column(
            "device",
            pa.string(),
            'torch device of the job, e.g. "cpu" or "cuda:0"',
            reproducible=False,
        ),
        Column(
            "versions",
            pa.string(),
            "library versions of the worker as JSON (python, torch, open_clip, ...)",
            reproducible=False,
        ),
        Column("started_at", TIMESTAMP, "start of the job, UTC", reproducible=False),
        Column("finished_at", TIMESTAMP, "end of the job, UTC", reproducible=False),
    ),
)

SCORES = TableSchema(
    name="scores",
    key=("job_id", "rel_path"),
    columns=(
        Column("job_id", pa.string(), "job that produced the score; joins jobs.job_id"),
        Column("dataset", pa.string(), "dataset adapter name"),
        Column("category", pa.string(), "category within the dataset"),
        Column("shot", pa.string(), 'requested support size as given: "1", "4" or "full"'),
        Column("seed", pa.int64(), "seed of the job"),
        Column("method", pa.string(), "method name"),
        Column("variant", pa.string(), "method variant"),
        *_select(SPEC_COLUMNS, BACKBONE_NAMES),
        Column("n_support", pa.int64(), "number of support images the job used"),
        Column("rel_path", pa.string(), "test image, path relative to the dataset root"),
        Column("label", pa.int64(), "ground truth: 0 normal, 1 anomalous"),
        Column("defect_type", pa.string(), '"good" for normal images, else the defect class'),
        Column(
            "image_score", pa.float64(), "anomaly score of the image; higher means more anomalous"
        ),
    ),
)

GROUP_COLUMNS: tuple[Column, ...] = (
    Column("dataset", pa.string(), "dataset adapter name"),
    Column("method", pa.string(), "method name"),
    Column("variant", pa.string(), "method variant"),
    Column("shot", pa.string(), 'requested support size as given: "1", "4" or "full"'),
    Column("backbone", pa.string(), "open_clip model name of the frozen backbone"),
    Column("pretrained", pa.string(), 'backbone weights, "none" for random weights'),
    Column(
        "random_weights", pa.bool_(), 'true when pretrained is "none": scores are sanity figures'
    ),
    Column("image_size", pa.int64(), "evaluation resolution S in pixels"),
)


def _summary_columns(per_category: bool) -> list[Column]:
    """Mean, std and counts of each metric over seeds (and categories unless per category)."""
    over = "seeds" if per_category else "seeds, of the per-seed category averages"
    columns: list[Column] = []
    for metric in METRIC_NAMES:
        columns += [
            Column(f"{metric}_mean", pa.float64(), f"mean over {over} of {metric}", True),
            Column(
                f"{metric}_std",
                pa.float64(),
                f"sample standard deviation (ddof=1) over {over} of {metric}; NaN with one seed",
            ),
            Column(f"{metric}_n_seeds", pa.int64(), f"seeds with a defined {metric}"),
        ]
        if not per_category:
            columns.append(
                Column(
                    f"{metric}_n_categories",
                    pa.int64(),
                    f"categories with a defined {metric} in at least one seed",
                )
            )
    columns += [
        Column("n_jobs_ok", pa.int64(), "jobs of the group that finished"),
        Column(
            "n_jobs_failed", pa.int64(), "jobs of the group that failed (left out of the means)"
        ),
    ]
    return columns


LEADERBOARD = TableSchema(
    name="leaderboard",
    key=("dataset", "method", "variant", "shot"),
    columns=(*GROUP_COLUMNS, *_summary_columns(per_category=False)),
)

LEADERBOARD_BY_CATEGORY = TableSchema(
    name="leaderboard_by_category",
    key=("dataset", "category", "method", "variant", "shot"),
    columns=(
        GROUP_COLUMNS[0],
        Column("category", pa.string(), "category within the dataset"),
        *GROUP_COLUMNS[1:],
        *_summary_columns(per_category=True),
    ),
)


def _ablation_columns() -> list[Column]:
    columns: list[Column] = []
    for metric in METRIC_NAMES:
        columns += [
            Column(
                f"{metric}_mean", pa.float64(), f"leaderboard {metric}_mean of the variant", True
            ),
            Column(f"{metric}_std", pa.float64(), f"leaderboard {metric}_std of the variant"),
            Column(
                f"{metric}_delta",
                pa.float64(),
                f'{metric}_mean minus that of variant "full" at the same dataset, shot, '
                'backbone, weights and image size; NaN when "full" was not run',
                True,
            ),
        ]
    return columns


ABLATION = TableSchema(
    name="ablation",
    key=("dataset", "method", "variant", "shot"),
    columns=(
        Column("dataset", pa.string(), "dataset adapter name"),
        Column("method", pa.string(), "method name (the ablated method)"),
        Column("variant", pa.string(), "ablation variant"),
        Column("shot", pa.string(), 'requested support size as given: "1", "4" or "full"'),
        *_select(GROUP_COLUMNS, BACKBONE_NAMES),
        *_ablation_columns(),
        Column("n_jobs_ok", pa.int64(), "jobs of the variant and shot that finished"),
        Column("n_jobs_failed", pa.int64(), "jobs of the variant and shot that failed"),
    ),
)

TABLES: dict[str, TableSchema] = {
    schema.name: schema for schema in (JOBS, SCORES, LEADERBOARD, LEADERBOARD_BY_CATEGORY, ABLATION)
}


def describe(schemas: Iterable[TableSchema] = TABLES.values()) -> str:
    """Render every column as Markdown tables: name, dtype, higher-is-better, meaning."""
    lines: list[str] = []
    for schema in schemas:
        lines += [
            f"### `{schema.name}.parquet`",
            "",
            "| column | dtype | higher is better | meaning |",
        ]
        lines.append("|---|---|---|---|")
        for c in schema.columns:
            direction = {True: "yes", False: "no", None: ""}[c.higher_is_better]
            lines.append(f"| `{c.name}` | {c.dtype} | {direction} | {c.meaning} |")
        lines.append("")
    return "\n".join(lines)
