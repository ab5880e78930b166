"""The procedural demo dataset: layout, determinism, concurrent generation, separability."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import h2vlr
from h2vlr.data import demo, get_dataset, load_image, load_mask, sample_support
from h2vlr.data.demo import DEMO_CATEGORIES, DEMO_VERSION, ensure_demo, write_demo_tree


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.png"))
    }


def test_demo_default_root_in_cache(_isolated_cache_dir: Path) -> None:
    adapter = get_dataset("demo")

    root = adapter.resolve_root(None)

    assert root == _isolated_cache_dir / "datasets" / "demo" / DEMO_VERSION
    assert adapter.categories(None) == sorted(DEMO_CATEGORIES)


@pytest.mark.parametrize("category", sorted(DEMO_CATEGORIES))
def test_demo_category_counts_and_masks(category: str) -> None:
    data = get_dataset("demo").load_category(None, category)

    assert data.class_name == category.replace("_", " ")
    assert data.has_masks
    assert len(data.support_pool) == 16
    assert len(data.test_normal) == 8
    assert len(data.test_anomalous) == 12
    assert data.defect_types == tuple(sorted(DEMO_CATEGORIES[category].defects))
    for sample in data.test_anomalous:
        image = load_image(sample.path)
        mask = load_mask(sample.mask_path)
        assert image.size == (128, 128)
        assert mask.shape == (128, 128)
        assert mask.sum() >= 40, sample.rel_path


@pytest.mark.parametrize("category", sorted(DEMO_CATEGORIES))
def test_demo_defects_inside_masks(category: str) -> None:
    data = get_dataset("demo").load_category(None, category)
    normal = np.mean([np.asarray(load_image(s.path), dtype=float) for s in data.support_pool], 0)

    for sample in data.test_anomalous:
        diff = np.abs(np.asarray(load_image(sample.path), dtype=float) - normal).max(axis=2)
        mask = load_mask(sample.mask_path)
        changed = diff > 40  # far beyond the noise and brightness variation of normals
        assert changed[mask].mean() > 0.5, sample.rel_path
        assert not changed[~mask].any(), sample.rel_path

    for sample in data.test_normal:
        diff = np.abs(np.asarray(load_image(sample.path), dtype=float) - normal)
        assert diff.max() < 40, sample.rel_path


def test_demo_generation_deterministic(tmp_path: Path) -> None:
    write_demo_tree(tmp_path / "a")
    write_demo_tree(tmp_path / "b")

    first = _digests(tmp_path / "a")
    assert len(first) == 3 * (16 + 8 + 12 + 12)
    assert first == _digests(tmp_path / "b")


@pytest.mark.slow
def test_demo_concurrent_generation(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "demo" / DEMO_VERSION
    script = (
        "import sys; from pathlib import Path; from h2vlr.data.demo import ensure_demo; "
        "print(ensure_demo(Path(sys.argv[1])))"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0].decode().strip() for p in processes]

    assert [p.returncode for p in processes] == [0, 0, 0]
    assert outputs == [str(target)] * 3
    assert sorted(p.name for p in target.parent.iterdir()) == [DEMO_VERSION]
    reference = tmp_path / "reference"
    write_demo_tree(reference)
    assert _digests(target) == _digests(reference)


def test_demo_lost_race_keeps_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "demo" / DEMO_VERSION
    real_write = demo.write_demo_tree

    def write_while_another_process_wins(staging: Path) -> None:
        real_write(staging)
        real_write(target)  # the other process renames its tree into place first

    monkeypatch.setattr(demo, "write_demo_tree", write_while_another_process_wins)

    assert ensure_demo(target) == target
    assert sorted(p.name for p in target.parent.iterdir()) == [DEMO_VERSION]
    assert len(_digests(target)) == 3 * (16 + 8 + 12 + 12)


def test_demo_explicit_root_generated(tmp_path: Path) -> None:
    report = get_dataset("demo").check(tmp_path / "mine")

    assert report.usable
    assert sorted(report.categories) == sorted(DEMO_CATEGORIES)
    assert (tmp_path / "mine" / "metal_washer" / "train" / "good" / "000.png").is_file()


def _tiny_clip_patch_tokens(paths: list[Path]) -> torch.Tensor:
    """Patch tokens ``[B, N, W]`` of a random-weight tiny CLIP at 64x64, L2-normalised."""
    import open_clip

    config_path = Path(h2vlr.__file__).parent / "model_configs" / "tiny-test.json"
    config = json.loads(config_path.read_text())
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=config["embed_dim"], vision_cfg=config["vision_cfg"], text_cfg=config["text_cfg"]
    ).eval()
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    size = config["vision_cfg"]["image_size"]
    pixels = [
        torch.tensor(np.array(load_image(p).resize((size, size)))).permute(2, 0, 1) / 255.0
        for p in paths
    ]
    batch = (torch.stack(pixels) - mean) / std
    with torch.no_grad():
        out = model.visual.forward_intermediates(
            batch, indices=[3], output_fmt="NLC", intermediates_only=True
        )
    return torch.nn.functional.normalize(out["image_intermediates"][0], dim=-1)


@pytest.mark.slow
@pytest.mark.parametrize("category", sorted(DEMO_CATEGORIES))
def test_demo_separable_by_random_clip_knn(category: str) -> None:
    data = get_dataset("demo").load_category(None, category)
    support = _tiny_clip_patch_tokens([s.path for s in sample_support(data, 1, 0)])
    queries = _tiny_clip_patch_tokens([s.path for s in data.test])

    memory = support.reshape(-1, support.shape[-1])
    distances = 1.0 - queries @ memory.T  # [B, N, k*N] cosine distance
    scores = distances.min(dim=-1).values.max(dim=-1).values.numpy()

    labels = [s.label for s in data.test]
    assert roc_auc_score(labels, scores) == 1.0


def test_demo_root_is_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "demo.txt"
    path.write_text("not a directory")

    report = get_dataset("demo").check(path)

    assert not report.usable
    assert "is a file" in report.problems[0].message
