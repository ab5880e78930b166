"""The run and ablate commands reject bad values before any job starts."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from orchestration.cli import app

TINY = ["--backbone", "tiny-test", "--pretrained", "none"]


def invoke(tmp_path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "runs")])
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "--dataset", "nope", *TINY], "unknown dataset 'nope'; valid: br35h, brainmri"),
        (
            ["run", "--methods", "h2vlr,bogus", *TINY],
            "unknown method 'bogus'; valid: clip-zeroshot, h2vlr, patch-knn, winclip, winclip-plus",
        ),
        (
            ["ablate", "--variants", "full,bogus", *TINY],
            "unknown variant 'bogus' of method 'h2vlr'; valid: full, no-dsi",
        ),
        (
            ["run", "--categories", "bogus", *TINY],
            "unknown category 'bogus' for dataset(s) demo; valid: checkered_tile, metal_washer, striped_fabric",
        ),
        (["run", "--dataset", "mtd", "--data-root", "/nonexistent/mtd", *TINY], "/nonexistent/mtd"),
        (["run", "--dataset", "mtd", *TINY], "needs a data root"),
        (
            ["run", "--shots", "1,17", "--categories", "checkered_tile", *TINY],
            "shot 17 is larger than the support pool",
        ),
        (["run", "--shots", "one", *TINY], "invalid shot 'one'"),
        (["run", "--run-name", "../escape", *TINY], "invalid --run-name '../escape'"),
        (["run", "--backbone", "tiny-tst", "--pretrained", "none"], "unknown backbone 'tiny-tst'"),
    ],
)
def test_bad_value_rejected(tmp_path, args, expected):
    code, output = invoke(tmp_path, *args)
    assert code == 2
    assert expected in output
    assert not (tmp_path / "runs").exists()  # nothing started


def test_unavailable_weights_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))  # no cached checkpoints
    code, output = invoke(tmp_path, "run", "--categories", "checkered_tile")
    assert code == 2
    assert (
        "weights for backbone 'ViT-B-16-plus-240' with pretrained tag 'laion400m_e32' are not available"
        in output
    )


def test_help_states_units(tmp_path):
    code, output = invoke(tmp_path, "run", "--help")
    assert code == 0
    for text in ("--gpus-per-job", "fractions allowed", "in pixels", "--resume", "--config"):
        assert text in output


def test_unreachable_address_rejected(tmp_path):
    import socket

    with socket.socket() as probe:  # a free port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["run", "--categories", "checkered_tile", "--shots", "1", "--seeds", "0", *TINY]
    code, output = invoke(tmp_path, *args, "--address", f"127.0.0.1:{port}")
    assert code == 2
    assert f"could not start or join the Ray cluster at '127.0.0.1:{port}'" in output
