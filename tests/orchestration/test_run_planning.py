"""Option parsing, config files, validation and job expansion (no Ray)."""

from __future__ import annotations

import json

import pytest

from orchestration.cli_run import _options, resolve_resume
from orchestration.planning import (
    PlanError,
    build_options,
    load_config_file,
    parse_data_roots,
    parse_seeds,
    parse_shots,
    validate,
)

TINY = {"categories": "checkered_tile", "backbone": "tiny-test", "pretrained": "none"}


def test_parse_shots():
    assert parse_shots("1, 4,full") == ("1", "4", "full")
    assert parse_shots("04,4,FULL") == ("4", "full")
    for bad in ("0", "-1", "two", "1,,4"):
        with pytest.raises(PlanError, match="expected"):
            parse_shots(bad)


def test_parse_seeds_lists_and_ranges():
    assert parse_seeds("0-2,5") == (0, 1, 2, 5)
    assert parse_seeds("3") == (3,)
    with pytest.raises(PlanError, match="end is below the start"):
        parse_seeds("3-1")
    with pytest.raises(PlanError, match="invalid seed"):
        parse_seeds("a")


def test_parse_data_roots(tmp_path):
    assert parse_data_roots(None, ["mtd"]) == {"mtd": None}
    assert parse_data_roots(str(tmp_path), ["mtd", "mvtec"]) == {"mtd": tmp_path, "mvtec": tmp_path}
    roots = parse_data_roots(f"mtd={tmp_path}", ["mtd", "demo"])
    assert roots == {"mtd": tmp_path, "demo": None}
    with pytest.raises(PlanError, match="NAME one of the selected datasets"):
        parse_data_roots(f"visa={tmp_path}", ["mtd"])


def test_config_file_then_flags(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('shots = "1"\nseeds = [0, 1]\nmethods = "patch-knn"\nimage-size = 32\n')
    values = {name: None for name in ("shots", "seeds", "methods", "image_size", "dataset")}
    values.update(config=config, resume=False, seeds="3")

    options = _options(values, ablate=False)

    assert options.shots == ("1",)
    assert options.seeds == (3,)  # the flag wins over the file
    assert options.methods == ("patch-knn",)
    assert options.image_size == 32


def test_config_file_unknown_key_rejected(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("shot = 1\n")
    with pytest.raises(PlanError, match="unknown key 'shot'.*valid keys: .*shots"):
        load_config_file(config)
    with pytest.raises(PlanError, match="not found"):
        load_config_file(tmp_path / "missing.toml")


def test_defaults_match_documented():
    options = build_options({})
    assert options.datasets == ("demo",)
    assert options.shots == ("1", "4")
    assert options.seeds == (0, 1, 2, 3, 4)
    assert options.methods == ("h2vlr",)
    assert options.backbone == "ViT-B-16-plus-240"
    assert options.pretrained == "laion400m_e32"
    assert str(options.out) == "runs"


def test_validate_expands_jobs():
    plan = validate(
        build_options(
            {**TINY, "methods": "h2vlr,patch-knn", "shots": "1,4", "seeds": "0-2", "steps": 3}
        )
    )

    assert len(plan.jobs) == 2 * 2 * 3
    assert len({job.job_id for job in plan.jobs}) == len(plan.jobs)
    assert {job.image_size for job in plan.jobs} == {64}
    assert plan.random_weights
    by_method = {job.method: job.method_options() for job in plan.jobs}
    assert by_method == {"h2vlr": {"steps": 3}, "patch-knn": {}}  # patch-knn has no steps option
    assert plan.run_dir.parent.name == "runs"


def test_job_id_depends_on_settings():
    first = validate(build_options({**TINY, "shots": "1", "seeds": "0", "steps": 2})).jobs[0]
    again = validate(build_options({**TINY, "shots": "1", "seeds": "0", "steps": 2})).jobs[0]
    other = validate(build_options({**TINY, "shots": "1", "seeds": "0", "steps": 3})).jobs[0]
    assert first.job_id == again.job_id
    assert first.job_id != other.job_id
    assert first.job_id.startswith("demo_checkered-tile_1shot_seed0_h2vlr_")


def test_ablate_runs_every_variant():
    from h2vlr.methods import get_method_class

    plan = validate(build_options({**TINY, "shots": "1", "seeds": "0"}, ablate=True))
    assert [job.variant for job in plan.jobs] == list(get_method_class("h2vlr").variants)
    assert {job.method for job in plan.jobs} == {"h2vlr"}


def test_validate_lists_every_problem():
    options = build_options({**TINY, "methods": "nope", "shots": "99", "device": "tpu"})
    with pytest.raises(PlanError) as caught:
        validate(options)
    message = str(caught.value)
    assert "unknown method 'nope'; valid: clip-zeroshot, h2vlr" in message
    assert (
        "shot 99 is larger than the support pool of demo/checkered_tile (16 normal images)"
        in message
    )
    assert "invalid --device 'tpu'; valid: auto, cpu, cuda" in message


def test_invalid_variant_override_rejected():
    options = build_options({**TINY, "variants": "full+k_neighbors=0"}, ablate=True)
    with pytest.raises(PlanError, match="k_neighbors"):
        validate(options)


def test_resume_picks_latest_run(tmp_path):
    for name in ("old", "new"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps({}))
    options = build_options({"resume": True, "out": str(tmp_path)})
    assert resolve_resume(options).run_name == "new"
    with pytest.raises(PlanError, match="found no run"):
        resolve_resume(build_options({"resume": True, "out": str(tmp_path / "empty")}))


def test_invalid_support_lists_rejected(tmp_path):
    lists = tmp_path / "lists.json"
    lists.write_text(json.dumps({"demo": {"checkered_tile": {"1": {"0": "not-a-list"}}}}))
    with pytest.raises(PlanError, match="invalid support lists file"):
        validate(build_options({**TINY, "support_lists": str(lists)}))
    with pytest.raises(PlanError, match="not found"):
        validate(build_options({**TINY, "support_lists": str(tmp_path / "missing.json")}))
