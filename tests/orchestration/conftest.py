"""Shared settings and the reference run of the orchestration tests.

Every Ray instance of these tests stays on this machine: Ray 2.60 on Linux replaces a
loopback node address with the host's interface address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is off, which keeps its nodes on 127.0.0.1. Ray
reads that variable when it is imported, so it is set here, before any test module
imports ray. One random token authenticates every driver and node of the session.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
from run_helpers import BASELINE_ARGS, RunResult, invoke_cli

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """The session's dataset and feature cache (the same directory tests/conftest.py sets)."""
    path = tmp_path_factory.getbasetemp() / "h2vlr-cache"
    os.environ["H2VLR_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def baseline(tmp_path_factory, cache_dir) -> RunResult:
    """An uninterrupted run (2 shots x 2 seeds x 2 methods) on a local Ray instance it starts."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    out = tmp_path_factory.mktemp("baseline")
    result = invoke_cli("run", BASELINE_ARGS, out, "baseline")
    assert result.exit_code == 0, result.output
    assert not ray.is_initialized(), "the run must shut down the Ray instance it started"
    return result
