"""Session-wide test settings."""

import os

import pytest

# Tests run on 2-core CI machines; one intra-op thread per process keeps parallel
# Ray workers from oversubscribing the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _isolated_cache_dir(tmp_path_factory, monkeypatch):
    """Point the feature and dataset cache at a per-session temporary directory."""
    cache = tmp_path_factory.getbasetemp() / "h2vlr-cache"
    monkeypatch.setenv("H2VLR_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_backbone():
    """The ``tiny-test`` backbone with random weights on the CPU, built once per session."""
    from h2vlr.backbone import load_backbone

    return load_backbone("tiny-test", "none", device="cpu")
