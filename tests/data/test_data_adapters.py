"""Every adapter on a synthetic tree of its native layout, the registry and the checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from h2vlr.data import (
    CategoryData,
    DatasetAdapter,
    DatasetError,
    get_dataset,
    list_datasets,
    register_dataset,
)
from h2vlr.data.folder import FolderAdapter
from h2vlr.registry import UnknownNameError

ALL_DATASETS = ["br35h", "brainmri", "btad", "demo", "folder", "headct", "mtd", "mvtec", "visa"]


def _assert_consistent(data: CategoryData) -> None:
    """Invariants of every CategoryData: sorted, disjoint, labels match defect types."""
    pool = [s.rel_path for s in data.support_pool]
    test = [s.rel_path for s in data.test]
    assert pool == sorted(pool)
    assert test == sorted(test)
    assert not set(pool) & set(test)
    for sample in data.support_pool + data.test:
        assert sample.path.is_absolute()
        assert sample.path == data.root / sample.rel_path
        assert (sample.label == 0) == (sample.defect_type == "good")
        if sample.label == 0:
            assert sample.mask_path is None
    assert all(s.label == 0 for s in data.support_pool)


def test_registry_lists_every_adapter() -> None:
    assert list_datasets() == ALL_DATASETS
    for name in ALL_DATASETS:
        adapter = get_dataset(name)
        assert adapter.name == name
        assert adapter.description


def test_registry_unknown_name_lists_valid() -> None:
    with pytest.raises(UnknownNameError, match="valid: br35h, brainmri") as info:
        get_dataset("mvtc")

    assert isinstance(info.value, KeyError)
    assert "Did you mean 'mvtec'" in str(info.value)


def test_registry_duplicate_name_raises() -> None:
    with pytest.raises(ValueError, match="'mvtec' is already registered"):
        register_dataset(FolderAdapter(name="mvtec"))


def test_mvtec_layout(mvtec_root: Path) -> None:
    adapter = get_dataset("mvtec")

    assert adapter.categories(mvtec_root) == ["bottle", "metal_nut"]
    data = adapter.load_category(mvtec_root, "metal_nut")

    _assert_consistent(data)
    assert data.class_name == "metal nut"
    assert data.has_masks
    assert len(data.support_pool) == 5
    assert len(data.test_normal) == 2
    assert len(data.test_anomalous) == 3
    assert data.defect_types == ("color", "scratch")
    scratch = next(s for s in data.test if s.rel_path == "metal_nut/test/scratch/001.png")
    assert scratch.label == 1
    assert scratch.mask_path == mvtec_root / "metal_nut/ground_truth/scratch/001_mask.png"


def test_mvtec_unknown_category(mvtec_root: Path) -> None:
    with pytest.raises(DatasetError, match="'screw' not found.*valid: bottle, metal_nut"):
        get_dataset("mvtec").load_category(mvtec_root, "screw")


def test_mvtec_missing_mask_reported(mvtec_root: Path) -> None:
    (mvtec_root / "metal_nut/ground_truth/color/000_mask.png").unlink()

    data = get_dataset("mvtec").load_category(mvtec_root, "metal_nut")
    report = get_dataset("mvtec").check(mvtec_root)

    color = next(s for s in data.test if s.defect_type == "color")
    assert color.mask_path is None
    assert report.usable
    assert report.categories["metal_nut"].masks == 2
    paths = [p.path for p in report.problems]
    assert str(mvtec_root / "metal_nut/test/color/000.png") in paths


def test_btad_layout(btad_root: Path) -> None:
    adapter = get_dataset("btad")

    assert adapter.categories(btad_root) == ["03"]
    data = adapter.load_category(btad_root, "03")

    _assert_consistent(data)
    assert data.class_name == "product 03"
    assert len(data.support_pool) == 4
    assert len(data.test_normal) == 2
    assert data.defect_types == ("ko",)
    for sample in data.test_anomalous:
        assert sample.mask_path == btad_root / "03/ground_truth/ko" / f"{sample.path.stem}.png"


def test_visa_layout(visa_root: Path) -> None:
    adapter = get_dataset("visa")

    assert adapter.categories(visa_root) == ["candle", "pcb1"]
    data = adapter.load_category(visa_root, "candle")

    _assert_consistent(data)
    assert [s.rel_path for s in data.support_pool] == [
        f"candle/Data/Images/Normal/000{i}.JPG" for i in range(3)
    ]
    assert [s.rel_path for s in data.test_normal] == ["candle/Data/Images/Normal/0003.JPG"]
    assert len(data.test_anomalous) == 2
    assert data.defect_types == ("anomaly",)
    assert data.test_anomalous[0].mask_path == visa_root / "candle/Data/Masks/Anomaly/000.png"


def test_visa_missing_split_file(tmp_path: Path) -> None:
    report = get_dataset("visa").check(tmp_path)

    assert not report.usable
    assert "split_csv/1cls.csv" in report.problems[0].message


def test_mtd_layout(mtd_root: Path) -> None:
    adapter = get_dataset("mtd")

    assert adapter.categories(mtd_root) == ["magnetic_tile"]
    data = adapter.load_category(mtd_root, "magnetic_tile")

    _assert_consistent(data)
    assert data.class_name == "magnetic tile"
    assert len(data.support_pool) == 5
    assert len(data.test_normal) == 5
    assert len(data.test_anomalous) == sum([3, 2, 1, 1, 2])
    assert data.defect_types == ("blowhole", "break", "crack", "fray", "uneven")
    for sample in data.test_anomalous:
        assert sample.mask_path == sample.path.with_suffix(".png")
    # The all-black MT_Free masks do not make test normals anomalous.
    assert all(s.label == 0 and s.mask_path is None for s in data.test_normal)


def test_brainmri_nested_layout(brainmri_root: Path) -> None:
    data = get_dataset("brainmri").load_category(brainmri_root, "brain_mri")

    _assert_consistent(data)
    assert data.class_name == "brain mri"
    assert not data.has_masks
    assert len(data.support_pool) + len(data.test_normal) == 7
    assert len(data.support_pool) == 3
    assert len(data.test_anomalous) == 5
    assert data.defect_types == ("tumor",)
    assert all(s.mask_path is None for s in data.test)
    assert all(s.rel_path.startswith("brain_tumor_dataset/no/") for s in data.support_pool)


def test_br35h_ignores_pred_folder(br35h_root: Path) -> None:
    data = get_dataset("br35h").load_category(br35h_root, "brain_mri")

    _assert_consistent(data)
    assert len(data.support_pool) == 3
    assert len(data.test_normal) == 3
    assert len(data.test_anomalous) == 6
    assert not any("pred" in s.rel_path for s in data.support_pool + data.test)


def test_headct_labels_csv(headct_root: Path) -> None:
    data = get_dataset("headct").load_category(headct_root, "head_ct")

    _assert_consistent(data)
    assert data.class_name == "head ct"
    assert [s.path.stem for s in data.test_anomalous] == ["000", "001", "002", "003"]
    assert data.defect_types == ("hemorrhage",)
    assert len(data.support_pool) + len(data.test_normal) == 6


def test_headct_unlabelled_image_reported(headct_root: Path, tree_writer) -> None:
    tree_writer.gray(headct_root / "head_ct/head_ct/042.png")

    report = get_dataset("headct").check(headct_root)

    assert report.usable
    assert [p.path for p in report.problems] == [str(headct_root / "head_ct/head_ct/042.png")]


def test_folder_layout(folder_root: Path) -> None:
    adapter = get_dataset("folder")

    assert adapter.categories(folder_root) == ["gadget", "widget"]
    widget = adapter.load_category(folder_root, "widget")
    gadget = adapter.load_category(folder_root, "gadget")

    _assert_consistent(widget)
    _assert_consistent(gadget)
    assert widget.has_masks
    assert widget.defect_types == ("crack", "dent")
    assert all(s.mask_path is not None for s in widget.test_anomalous)
    assert len(widget.support_pool) == 3
    assert not gadget.has_masks
    assert gadget.defect_types == ("anomalous",)
    assert len(gadget.support_pool) == 2


def test_folder_root_is_category(folder_root: Path) -> None:
    adapter = get_dataset("folder")
    root = folder_root / "widget"

    assert adapter.categories(root) == ["widget"]
    data = adapter.load_category(root, "widget")

    assert data.root == root
    assert all(s.rel_path.startswith(("normal/", "anomalous/")) for s in data.test)


def test_folder_custom_directory_names(tmp_path: Path, tree_writer) -> None:
    for i in range(4):
        tree_writer.image(tmp_path / "part" / "ok" / f"{i}.png")
    tree_writer.image(tmp_path / "part" / "ng" / "0.png", 10)
    tree_writer.mask(tmp_path / "part" / "gt" / "0_mask.png")
    adapter = FolderAdapter(normal_dir="ok", anomalous_dir="ng", mask_dir="gt", name="mine")

    data = adapter.load_category(tmp_path, "part")

    assert data.dataset == "mine"
    assert len(data.support_pool) == 2
    assert data.test_anomalous[0].mask_path == tmp_path / "part/gt/0_mask.png"


@pytest.mark.parametrize(
    ("name", "fixture", "category"),
    [
        ("mvtec", "mvtec_root", "bottle"),
        ("btad", "btad_root", "03"),
        ("visa", "visa_root", "pcb1"),
        ("mtd", "mtd_root", "magnetic_tile"),
        ("brainmri", "brainmri_root", "brain_mri"),
        ("br35h", "br35h_root", "brain_mri"),
        ("headct", "headct_root", "head_ct"),
        ("folder", "folder_root", "widget"),
    ],
)
def test_check_counts_match_load(name: str, fixture: str, category: str, request) -> None:
    root = request.getfixturevalue(fixture)
    adapter: DatasetAdapter = get_dataset(name)

    report = adapter.check(root)
    data = adapter.load_category(root, category)

    assert report.usable, report.problems
    assert report.problems == ()
    counts = report.categories[category]
    assert counts.support_pool == len(data.support_pool)
    assert counts.test_normal == len(data.test_normal)
    assert counts.test_anomalous == len(data.test_anomalous)
    assert counts.masks == sum(s.mask_path is not None for s in data.test_anomalous)
    assert counts.defect_types == data.defect_types


def test_check_missing_root(tmp_path: Path) -> None:
    report = get_dataset("mvtec").check(tmp_path / "absent")

    assert not report.usable
    assert report.problems[0].severity == "error"
    assert report.problems[0].path == str(tmp_path / "absent")


def test_check_no_root_for_non_demo() -> None:
    report = get_dataset("mtd").check(None)

    assert not report.usable
    assert "--data-root" in report.problems[0].message


def test_check_empty_root_has_no_categories(tmp_path: Path) -> None:
    report = get_dataset("mvtec").check(tmp_path)

    assert not report.usable
    assert "no categories found" in report.problems[0].message


def test_check_category_without_normals(mvtec_root: Path) -> None:
    for path in (mvtec_root / "bottle/train/good").iterdir():
        path.unlink()

    report = get_dataset("mvtec").check(mvtec_root)

    assert not report.usable
    errors = [p for p in report.problems if p.severity == "error"]
    assert [p.path for p in errors] == [str(mvtec_root / "bottle")]
    assert "support pool" in errors[0].message


def test_check_unreadable_image_named(mvtec_root: Path) -> None:
    broken = mvtec_root / "bottle/test/good/000.png"
    broken.write_bytes(b"truncated")

    report = get_dataset("mvtec").check(mvtec_root)

    assert not report.usable
    assert [p.path for p in report.problems] == [str(broken)]


def test_check_mask_size_mismatch_warns(mvtec_root: Path, tree_writer) -> None:
    from PIL import Image

    mask = mvtec_root / "bottle/ground_truth/broken_large/000_mask.png"
    Image.new("L", (5, 5), 255).save(mask)

    report = get_dataset("mvtec").check(mvtec_root)

    assert report.usable
    assert [(p.severity, p.path) for p in report.problems] == [("warning", str(mask))]


def test_check_json_form(mvtec_root: Path) -> None:
    result = get_dataset("mvtec").check(mvtec_root).to_dict()

    assert result["dataset"] == "mvtec"
    assert result["categories"]["bottle"] == {
        "support_pool": 3,
        "test_normal": 1,
        "test_anomalous": 1,
        "masks": 1,
        "defect_types": ["broken_large"],
    }


def test_visa_anomalous_train_row_skipped(visa_root: Path) -> None:
    split_file = visa_root / "split_csv" / "1cls.csv"
    row = "pcb1,train,anomaly,pcb1/Data/Images/Anomaly/000.JPG,pcb1/Data/Masks/Anomaly/000.png"
    split_file.write_text(split_file.read_text() + row + "\n")

    data = get_dataset("visa").load_category(visa_root, "pcb1")
    report = get_dataset("visa").check(visa_root)

    assert [s.rel_path for s in data.support_pool] == ["pcb1/Data/Images/Normal/0000.JPG"]
    assert [p.path for p in report.problems] == [
        str(visa_root / "pcb1/Data/Images/Anomaly/000.JPG")
    ]
