"""``h2vlr-bench datasets list`` and ``check`` through the real root app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from h2vlr.data import list_datasets
from orchestration.cli import app

runner = CliRunner()

# <repo root>/../shared/datasets/magnetic-tile, where CI and development machines keep it.
MTD_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "magnetic-tile"


def test_list_shows_every_adapter() -> None:
    result = runner.invoke(app, ["datasets", "list"], env={"COLUMNS": "200"})

    assert result.exit_code == 0, result.output
    for name in list_datasets():
        assert name in result.output
    assert "MVTec AD layout" in result.output


def test_check_json_counts(mvtec_root: Path) -> None:
    args = ["datasets", "check", "--dataset", "mvtec", "--data-root", str(mvtec_root), "--json"]

    result = runner.invoke(app, args)

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dataset"] == "mvtec"
    assert sorted(report["categories"]) == ["bottle", "metal_nut"]
    assert report["categories"]["metal_nut"] == {
        "support_pool": 5,
        "test_normal": 2,
        "test_anomalous": 3,
        "masks": 3,
        "defect_types": ["color", "scratch"],
    }


def test_check_table_output(btad_root: Path) -> None:
    args = ["datasets", "check", "--dataset", "btad", "--data-root", str(btad_root)]

    result = runner.invoke(app, args, env={"COLUMNS": "200"})

    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "03" in line and "ko" in line)
    assert [cell.strip() for cell in row.split("│")[2:6]] == ["4", "2", "3", "3"]
    assert "usable" in result.output


def test_check_problem_names_file(mvtec_root: Path) -> None:
    broken = mvtec_root / "bottle" / "test" / "good" / "000.png"
    broken.write_bytes(b"not a png")
    args = ["datasets", "check", "--dataset", "mvtec", "--data-root", str(mvtec_root)]

    table = runner.invoke(app, args, env={"COLUMNS": "300"})
    as_json = runner.invoke(app, [*args, "--json"])

    assert table.exit_code == 1
    assert str(broken) in table.output
    assert "not usable" in table.output
    assert as_json.exit_code == 1
    problems = json.loads(as_json.stdout)["problems"]
    assert [(p["severity"], p["path"]) for p in problems] == [("error", str(broken))]


def test_check_missing_root_fails(tmp_path: Path) -> None:
    args = ["datasets", "check", "--dataset", "visa", "--data-root", str(tmp_path / "none")]

    result = runner.invoke(app, [*args, "--json"])

    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["categories"] == {}
    assert report["problems"][0]["path"] == str(tmp_path / "none")


def test_check_no_categories_fails(tmp_path: Path) -> None:
    args = ["datasets", "check", "--dataset", "folder", "--data-root", str(tmp_path), "--json"]

    result = runner.invoke(app, args)

    assert result.exit_code == 1
    assert "no categories found" in json.loads(result.stdout)["problems"][0]["message"]


def test_check_unknown_dataset_usage_error() -> None:
    result = runner.invoke(app, ["datasets", "check", "--dataset", "mvtc"])

    assert result.exit_code == 2
    assert "mvtec" in result.output


def test_check_demo_without_root() -> None:
    result = runner.invoke(app, ["datasets", "check", "--dataset", "demo", "--json"])

    assert result.exit_code == 0, result.output
    categories = json.loads(result.stdout)["categories"]
    assert categories["metal_washer"]["defect_types"] == ["missing_part", "scratch", "stain"]
    assert all(c["masks"] == c["test_anomalous"] == 12 for c in categories.values())


@pytest.mark.skipif(not MTD_ROOT.is_dir(), reason=f"Magnetic Tile data not found at {MTD_ROOT}")
def test_check_real_magnetic_tile() -> None:
    args = ["datasets", "check", "--dataset", "mtd", "--data-root", str(MTD_ROOT), "--json"]

    result = runner.invoke(app, args)

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    tile = report["categories"]["magnetic_tile"]
    assert tile["support_pool"] + tile["test_normal"] == 952
    assert tile["test_anomalous"] == 392
    assert tile["masks"] == 392
    assert tile["defect_types"] == ["blowhole", "break", "crack", "fray", "uneven"]
    assert report["problems"] == []
