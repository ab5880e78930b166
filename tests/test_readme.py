"""The README's set-up commands: CI runs the test command, and the offline run works."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)


def _command_lines() -> list[str]:
    return [line.strip() for block in _bash_blocks() for line in block.splitlines()]


def test_ci_runs_readme_test_command():
    install_and_test = [line for line in _command_lines() if "pytest" in line]
    assert len(install_and_test) == 1, "the README must show exactly one test command"
    test_command = install_and_test[0].split("&&")[-1].strip()
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_readme_main_command_uses_console_script():
    main = [line for line in _command_lines() if line.startswith("python3 -m venv")]
    assert any(line.endswith("h2vlr-bench run --shots 1,4") for line in main)


@pytest.mark.slow
def test_readme_offline_run_command(tmp_path):
    offline = [line for line in _command_lines() if "--pretrained none" in line]
    assert offline, "the README must show the offline (random weights) run"
    words = shlex.split(offline[0])
    assert words[0] == ".venv/bin/h2vlr-bench"
    # The venv of this interpreter replaces the README's .venv.
    script = Path(sys.executable).with_name("h2vlr-bench")
    command = [str(script), *words[1:], "--out", str(tmp_path), "--run-name", "readme"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)

    assert completed.returncode == 0, completed.stderr[-4000:]
    jobs = pd.read_parquet(tmp_path / "readme" / "jobs.parquet")
    assert (jobs["status"] == "ok").all()
    assert set(jobs["shot"]) == {"1", "4"}
    assert set(jobs["seed"]) == {0, 1}
    assert jobs["random_weights"].all()
    board = pd.read_parquet(tmp_path / "readme" / "leaderboard.parquet")
    assert len(board) == 2  # one method, two shots
    assert (tmp_path / "readme" / "leaderboard.png").stat().st_size > 0
