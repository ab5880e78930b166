"""Run options, their validation, and the expansion of a run into job specifications.

A run is the product datasets x categories x shots x seeds x methods x variants.
Every option is parsed and checked here, on the driver, before any Ray task starts.
Unknown names are listed with the valid choices, and missing data roots and shots
larger than a category's support pool are rejected. The backbone weights are resolved
once, so a missing checkpoint fails in seconds instead of in every job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SHOT_FULL = "full"
DEFAULT_DATASETS: tuple[str, ...] = ("demo",)
DEFAULT_SHOTS: tuple[str, ...] = ("1", "4")
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
DEFAULT_METHODS: tuple[str, ...] = ("h2vlr",)
DEFAULT_BACKBONE = "ViT-B-16-plus-240"
DEFAULT_PRETRAINED = "laion400m_e32"
DEFAULT_OUT = Path("runs")
ABLATED_METHOD = "h2vlr"
DEVICES = ("auto", "cpu", "cuda")
_RUN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class PlanError(ValueError):
    """Raised when run options are invalid; the message lists every problem found."""


@dataclass(frozen=True)
class RunOptions:
    """Options of one ``run`` or ``ablate`` invocation, parsed but not yet checked."""

    datasets: tuple[str, ...] = DEFAULT_DATASETS  # dataset adapter names
    data_root: str | None = None  # PATH for every dataset, or "NAME=PATH,NAME=PATH"
    categories: tuple[str, ...] | None = None  # None selects every category
    shots: tuple[str, ...] = DEFAULT_SHOTS  # "1", "4", ... or "full"
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    methods: tuple[str, ...] = DEFAULT_METHODS
    variants: tuple[str, ...] | None = (
        None  # None: each method's default (run), every variant (ablate)
    )
    backbone: str = DEFAULT_BACKBONE  # open_clip model name or "tiny-test"
    pretrained: str = DEFAULT_PRETRAINED  # tag, checkpoint path, or "none"
    image_size: int | None = None  # S in pixels; None keeps the backbone's own size
    steps: int | None = None  # optimizer steps of methods that fit; None keeps their default
    support_lists: Path | None = None  # file of fixed support lists replacing the sampling
    out: Path = DEFAULT_OUT  # parent directory of run directories
    run_name: str | None = None  # None: a UTC timestamp
    address: str | None = None  # Ray cluster to join; None starts a local instance
    gpus_per_job: float = 1.0  # GPUs each job requests when the cluster has GPUs
    cpus_per_job: float = 1.0  # CPUs each job and feature task requests
    cache_dir: Path | None = None  # feature cache; None: $H2VLR_CACHE_DIR or ~/.cache/h2vlr-bench
    device: str = "auto"  # torch device of the jobs: auto, cpu or cuda
    resume: bool = False  # continue an existing run directory (same run name also resumes)
    ablate: bool = False  # set by the ablate command: h2vlr over variants, plus ablation.parquet


@dataclass(frozen=True, order=True)
class JobSpec:
    """Everything that determines one job's result; it travels to the Ray worker."""

    dataset: str
    category: str
    shot: str  # "1", "4", ... or "full"
    seed: int  # seed of the support sampling and of every random draw of the fit
    method: str
    variant: str  # base variant with optional +key=value overrides
    backbone: str  # open_clip model name or "tiny-test"
    pretrained: str  # as given to load_backbone: tag, checkpoint path or "none"
    weights: str  # resolved weights identity recorded in results
    image_size: int  # S in pixels: --image-size, else the backbone's input size
    options: tuple[tuple[str, Any], ...]  # method options, sorted by name
    data_root: str  # absolute dataset root, resolved on the driver
    support_lists: str | None  # absolute path of the support lists file, or None
    support_lists_sha256: str | None  # content hash of that file, part of the config hash
    device: str  # auto, cpu or cuda; not part of the config hash

    @property
    def config_hash(self) -> str:
        """SHA-256 over every field that can change the result (not paths or device)."""
        payload = {
            name: value
            for name, value in asdict(self).items()
            if name not in ("data_root", "support_lists", "device")
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def job_id(self) -> str:
        """Readable, file-name-safe id: the spec fields and 10 hex digits of the config hash."""
        parts = [self.dataset, self.category, f"{self.shot}shot", f"seed{self.seed}", self.method]
        if self.variant != "full":
            parts.append(self.variant)
        # "_" separates the fields, so it is replaced inside them like any other character.
        safe = "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", part) for part in parts)
        return f"{safe}_{self.config_hash[:10]}"

    def method_options(self) -> dict[str, Any]:
        return dict(self.options)


@dataclass(frozen=True)
class CategoryInfo:
    """A category the run uses, with the sizes validation needed."""

    dataset: str
    category: str
    root: Path  # resolved dataset root
    pool_size: int  # normal images available for the support set
    test_size: int


@dataclass(frozen=True)
class RunPlan:
    """Validated options and the jobs they expand to."""

    options: RunOptions
    run_name: str
    run_dir: Path
    weights: str  # resolved identity of the backbone weights
    categories: tuple[CategoryInfo, ...]
    jobs: tuple[JobSpec, ...] = field(default_factory=tuple)

    @property
    def random_weights(self) -> bool:
        return self.weights == "none"

    def effective_config(self) -> dict[str, Any]:
        """Return the options as plain JSON values, for ``run.json``.

        Besides the options it contains the resolved weights, the absolute root of each
        dataset and the support lists hash, which ``check_existing_run`` compares.
        """
        config = {name: _jsonable(value) for name, value in asdict(self.options).items()}
        config["run_name"] = self.run_name
        config["weights"] = self.weights
        config["data_roots"] = {info.dataset: str(info.root) for info in self.categories}
        config["support_lists_sha256"] = _support_lists_identity(self.options.support_lists)[1]
        return config


# ----------------------------------------------------------------------------- parsing


def split_list(text: str, option: str) -> tuple[str, ...]:
    """Split ``"a,b , c"`` into ``("a", "b", "c")``; empty items are an error."""
    items = tuple(item.strip() for item in text.split(","))
    if not items or any(not item for item in items):
        raise PlanError(f"invalid {option} {text!r}: expected a comma-separated list such as a,b")
    return items


def parse_shots(text: str, option: str = "--shots") -> tuple[str, ...]:
    """Parse ``"1,4,full"``: positive integers or ``full``, kept as the strings given.

    ``option`` names where the value came from in error messages.
    """
    shots = []
    for item in split_list(text, option):
        if item.lower() == SHOT_FULL:
            shots.append(SHOT_FULL)
        elif item.isdigit() and int(item) > 0:
            shots.append(str(int(item)))
        else:
            raise PlanError(
                f"invalid shot {item!r} in {option}: expected a positive integer or 'full'"
            )
    return tuple(dict.fromkeys(shots))


def parse_seeds(text: str, option: str = "--seeds") -> tuple[int, ...]:
    """Parse ``"0,1,2"`` or ranges such as ``"0-4"`` into non-negative integer seeds.

    ``option`` names where the value came from in error messages.
    """
    seeds: list[int] = []
    for item in split_list(text, option):
        low, sep, high = item.partition("-")
        if not (low.isdigit() and (not sep or high.isdigit())):
            raise PlanError(
                f"invalid seed {item!r} in {option}: expected integers such as 0,1,2 or 0-4"
            )
        first, last = int(low), int(high) if sep else int(low)
        if last < first:
            raise PlanError(f"invalid seed range {item!r} in {option}: the end is below the start")
        seeds.extend(range(first, last + 1))
    return tuple(dict.fromkeys(seeds))


def parse_data_roots(text: str | None, datasets: Sequence[str]) -> dict[str, Path | None]:
    """Map each dataset to its root: one PATH for all, or ``NAME=PATH`` pairs."""
    roots: dict[str, Path | None] = {name: None for name in datasets}
    if text is None:
        return roots
    items = split_list(text, "--data-root")
    if len(items) == 1 and "=" not in items[0]:
        return {name: Path(items[0]).expanduser() for name in datasets}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in roots:
            raise PlanError(
                f"invalid --data-root entry {item!r}: expected PATH or NAME=PATH with NAME one "
                f"of the selected datasets ({', '.join(datasets)})"
            )
        roots[name] = Path(path).expanduser()
    return roots


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML file whose keys are the option names (``shots = "1,4"``, ``seeds = [0, 1]``).

    Keys may use dashes or underscores. Lists are accepted where the flag takes a
    comma-separated value.

    Raises:
        PlanError: the file is missing, not TOML, or has unknown keys.
    """
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise PlanError(
            f"config file {path} not found; pass an existing TOML file to --config"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(f"config file {path} is not valid TOML: {exc}") from exc
    known = {f.name for f in fields(RunOptions)} - {"ablate"} | {"dataset"}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise PlanError(
                f"unknown key {key!r} in config file {path}; valid keys: {', '.join(sorted(known))}"
            )
        if isinstance(value, list):
            value = ",".join(str(item) for item in value)
        values["datasets" if name == "dataset" else name] = value
    return values


def build_options(
    values: Mapping[str, Any],
    ablate: bool = False,
    sources: Mapping[str, str] | None = None,
) -> RunOptions:
    """Turn raw option values (strings from flags or TOML, None when unset) into RunOptions.

    Args:
        values: option name -> raw value.
        ablate: set by the ``ablate`` command.
        sources: option name -> where its value came from, as error messages name it
            (e.g. ``"seeds (config file run.toml)"``); default the flag, ``--seeds``.

    Raises:
        PlanError: a value cannot be parsed.
    """
    provided = {key: value for key, value in values.items() if value is not None}
    labels = {"datasets": "--dataset", **dict(sources or {})}

    def label(name: str) -> str:
        return labels.get(name, "--" + name.replace("_", "-"))

    parsed: dict[str, Any] = {"ablate": ablate}
    for name in ("datasets", "categories", "methods", "variants"):
        if name in provided:
            parsed[name] = split_list(str(provided[name]), label(name))
    if "shots" in provided:
        parsed["shots"] = parse_shots(str(provided["shots"]), label("shots"))
    if "seeds" in provided:
        parsed["seeds"] = parse_seeds(str(provided["seeds"]), label("seeds"))
    for name in ("data_root", "backbone", "pretrained", "run_name", "address", "device"):
        if name in provided:
            parsed[name] = str(provided[name])
    for name in ("support_lists", "out", "cache_dir"):
        if name in provided:
            parsed[name] = Path(str(provided[name])).expanduser()
    for name, cast in (
        ("image_size", int),
        ("steps", int),
        ("gpus_per_job", float),
        ("cpus_per_job", float),
    ):
        if name in provided:
            parsed[name] = _cast(provided[name], cast, label(name))
    if "resume" in provided:
        parsed["resume"] = bool(provided["resume"])
    if ablate:
        parsed["methods"] = (ABLATED_METHOD,)
    return RunOptions(**parsed)


def _cast(value: Any, cast: type, option: str) -> Any:
    try:
        return cast(value)
    except (TypeError, ValueError) as exc:
        raise PlanError(f"invalid {option} {value!r}: expected a {cast.__name__}") from exc


# ----------------------------------------------------------------------------- validation


def validate(options: RunOptions, now: datetime | None = None) -> RunPlan:
    """Check every option against the registries, the data and the weights; expand the jobs.

    Raises:
        PlanError: one message listing every problem found.
    """
    errors: list[str] = []
    errors += _check_scalars(options)
    errors += _check_out(options.out, options.run_name)
    errors += _check_device(options.device, options.address)
    errors += _check_methods(options)
    categories = _check_datasets(options, errors)
    errors += _check_support_lists(options.support_lists)
    weights = _resolve_weights(options, errors)
    image_size = options.image_size or _default_image_size(options.backbone, errors)
    errors += _check_image_size(options.backbone, options.image_size)
    if weights:
        errors += _check_checkpoint(options.backbone, options.pretrained)
    if errors:
        raise PlanError("invalid run options:\n" + "\n".join(f"  - {e}" for e in errors))

    run_name = options.run_name or (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    plan = RunPlan(
        options=replace(options, image_size=image_size),
        run_name=run_name,
        run_dir=options.out / run_name,
        weights=weights,
        categories=tuple(categories),
    )
    plan = replace(plan, jobs=tuple(expand_jobs(plan)))
    if not plan.jobs:
        raise PlanError(
            "the options select no job; check --dataset, --data-root and --categories with "
            "`h2vlr-bench datasets check --dataset NAME --data-root PATH`"
        )
    _check_listed_support_sets(plan)
    check_existing_run(plan)
    return plan


def _check_listed_support_sets(plan: RunPlan) -> None:
    """Check every job's entry of the support lists file before a job starts.

    A listed set must name pool images and hold exactly ``shot`` of them; jobs the file
    does not list are sampled, which is logged once with their count.

    Raises:
        PlanError: listing every job whose entry is invalid.
    """
    from h2vlr.data import get_dataset, load_support_lists, sample_support

    path = plan.options.support_lists
    if path is None:
        return
    lists = load_support_lists(path)
    errors: list[str] = []
    sampled = 0
    loaded: dict[tuple[str, str, str], Any] = {}
    for job in plan.jobs:
        shot: int | str = job.shot if job.shot == SHOT_FULL else int(job.shot)
        if lists.lookup(job.dataset, job.category, shot, job.seed) is None:
            sampled += 1
            continue
        key = (job.dataset, job.data_root, job.category)
        if key not in loaded:
            loaded[key] = get_dataset(job.dataset).load_category(Path(job.data_root), job.category)
        try:
            sample_support(loaded[key], shot, job.seed, lists)
        except ValueError as exc:
            errors.append(f"{job.dataset}/{job.category} shot {job.shot} seed {job.seed}: {exc}")
    if errors:
        unique = list(dict.fromkeys(errors))
        raise PlanError(
            f"invalid entries in support lists file {path}:\n"
            + "\n".join(f"  - {e}" for e in unique)
        )
    if sampled:
        logger.warning(
            "support lists file %s has no entry for %d of %d jobs; those jobs sample their "
            "support sets (seeded), and their support_files column records the draw",
            path,
            sampled,
            len(plan.jobs),
        )


def _check_scalars(options: RunOptions) -> list[str]:
    errors = []
    if options.image_size is not None and options.image_size < 16:
        errors.append(f"invalid --image-size {options.image_size}: expected at least 16 pixels")
    if options.steps is not None and options.steps < 1:
        errors.append(
            f"invalid --steps {options.steps}: expected a positive number of optimizer steps"
        )
    if options.gpus_per_job < 0:
        errors.append(
            f"invalid --gpus-per-job {options.gpus_per_job}: expected 0 or more (fractions allowed)"
        )
    if options.cpus_per_job <= 0:
        errors.append(f"invalid --cpus-per-job {options.cpus_per_job}: expected a positive number")
    if options.device not in DEVICES:
        errors.append(f"invalid --device {options.device!r}; valid: {', '.join(DEVICES)}")
    if options.run_name is not None and not _RUN_NAME_PATTERN.match(options.run_name):
        errors.append(
            f"invalid --run-name {options.run_name!r}: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    if not options.seeds:
        errors.append("no seeds selected; pass --seeds such as 0,1,2")
    return errors


def _check_out(out: Path, run_name: str | None) -> list[str]:
    """Check that ``--out`` (and the run directory) can be directories; missing ones are fine."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                return [
                    f"invalid --out {out}: {path} is a file, not a directory; pass a directory "
                    "for the run directories (it is created when missing)"
                ]
            break
    run_dir = out / run_name if run_name else None
    if run_dir is not None and run_dir.exists() and not run_dir.is_dir():
        return [f"run directory {run_dir} is a file; pass another --run-name or --out"]
    return []


def _check_device(device: str, address: str | None) -> list[str]:
    """Reject ``cuda`` when the local jobs cannot have it; on a cluster only warn."""
    import torch

    if device != "cuda" or torch.cuda.is_available():
        return []
    if address is None:
        return [
            "--device cuda: CUDA is not available on this machine, where the local Ray "
            "instance runs the jobs; pass --device cpu, or --device auto to use a GPU when "
            "there is one"
        ]
    logger.warning(
        "--device cuda: this driver has no CUDA; every worker of the cluster at %s must have "
        "a GPU, or its jobs fail",
        address,
    )
    return []


def _check_methods(options: RunOptions) -> list[str]:
    from h2vlr.methods import create_method, list_methods
    from h2vlr.methods.registry import validate_variant

    errors = []
    valid = list_methods()
    for method in options.methods:
        if method not in valid:
            errors.append(f"unknown method {method!r}; valid: {', '.join(valid)}")
            continue
        variant_errors = []
        for variant in options.variants or ():
            try:
                validate_variant(method, variant)
            except ValueError as exc:
                variant_errors.append(str(exc))
        errors += variant_errors
        if variant_errors:
            continue
        # Building each method once checks override values (e.g. full+k_neighbors=0) now,
        # not in every job.
        chosen = dict(method_options(method, options))
        for variant in method_variants(method, options):
            try:
                create_method(method, variant, chosen)
            except (TypeError, ValueError) as exc:
                errors.append(f"invalid variant {variant!r} of method {method!r}: {exc}")
    return errors


def _check_datasets(options: RunOptions, errors: list[str]) -> list[CategoryInfo]:
    """Resolve roots and categories; check every shot against every support pool."""
    from h2vlr.data import get_dataset, list_datasets

    valid = list_datasets()
    unknown = [name for name in options.datasets if name not in valid]
    for name in unknown:
        errors.append(f"unknown dataset {name!r}; valid: {', '.join(valid)}")
    try:
        roots = parse_data_roots(options.data_root, options.datasets)
    except PlanError as exc:
        errors.append(str(exc))
        return []

    selected: list[CategoryInfo] = []
    found_names: set[str] = set()
    unselected: list[str] = []  # datasets none of whose categories --categories names
    for name in options.datasets:
        if name in unknown:
            continue
        adapter = get_dataset(name)
        try:
            root = adapter.resolve_root(roots[name])
            names = adapter.categories(root)
        except (OSError, ValueError) as exc:
            errors.append(str(exc))
            continue
        if not names:
            errors.append(_no_category_message(name, root, options))
            continue
        found_names.update(names)
        chosen = [c for c in names if options.categories is None or c in options.categories]
        if not chosen:
            unselected.append(f"{name} (categories: {', '.join(names)})")
        for category in chosen:
            selected.append(_category_info(adapter, root, category, options.shots, errors))
    unknown_categories = [c for c in options.categories or () if c not in found_names]
    for category in unknown_categories:
        errors.append(
            f"unknown category {category!r} for dataset(s) {', '.join(options.datasets)}; "
            f"valid: {', '.join(sorted(found_names)) or 'none'}"
        )
    if unselected and not unknown_categories:
        errors.append(
            f"--categories selects nothing of dataset {'; '.join(unselected)}; add one of its "
            "categories or drop it from --dataset"
        )
    return [info for info in selected if info is not None]


def _no_category_message(name: str, root: Path, options: RunOptions) -> str:
    message = (
        f"dataset {name!r} has no category under {root}; check the layout with "
        f"`h2vlr-bench datasets check --dataset {name} --data-root {root}` and pass the "
        "directory that holds the dataset itself"
    )
    shared_root = options.data_root is not None and "=" not in options.data_root
    if shared_root and len(options.datasets) > 1:
        message += (
            "; with several datasets, give each its own root: --data-root NAME=PATH,NAME=PATH"
        )
    return message


def _category_info(adapter, root: Path, category: str, shots: Sequence[str], errors: list[str]):
    try:
        data = adapter.load_category(root, category)
    except (OSError, ValueError) as exc:
        errors.append(str(exc))
        return None
    pool = len(data.support_pool)
    for shot in shots:
        if shot != SHOT_FULL and int(shot) > pool:
            errors.append(
                f"shot {shot} is larger than the support pool of {adapter.name}/{category} "
                f"({pool} normal images); choose --shots up to {pool}"
            )
    if pool == 0:
        errors.append(f"{adapter.name}/{category} has no normal images to draw a support set from")
    return CategoryInfo(adapter.name, category, root, pool, len(data.test))


def _default_image_size(backbone: str, errors: list[str]) -> int | None:
    """Return the input size of an open_clip model from its config, without building it."""
    import open_clip

    from h2vlr.backbone import register_model_configs

    register_model_configs()
    config = open_clip.get_model_config(backbone)
    if config is None:
        return None  # the unknown name is reported by the weights check
    size = config["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, list | tuple) else size)


def _check_image_size(backbone: str, image_size: int | None) -> list[str]:
    """Check that an explicit --image-size is a multiple of the backbone's patch size."""
    import open_clip

    from h2vlr.backbone import register_model_configs

    if image_size is None:
        return []
    register_model_configs()
    config = open_clip.get_model_config(backbone)
    if config is None:
        return []  # the unknown name is reported by the weights check
    patch = config["vision_cfg"]["patch_size"]
    patch = int(patch[0] if isinstance(patch, list | tuple) else patch)
    if image_size % patch:
        lower = max(patch, image_size - image_size % patch)
        return [
            f"invalid --image-size {image_size} for backbone {backbone!r}: expected a multiple "
            f"of its patch size {patch}, for example {lower} or {lower + patch}"
        ]
    return []


def _check_support_lists(path: Path | None) -> list[str]:
    """Check that a support lists file exists and parses; its entries are checked per job."""
    from h2vlr.data import load_support_lists

    if path is None:
        return []
    if not path.is_file():
        return [f"support lists file {path} not found; pass an existing JSON file"]
    try:
        load_support_lists(path)
    except ValueError as exc:
        return [str(exc)]
    return []


def _resolve_weights(options: RunOptions, errors: list[str]) -> str:
    from h2vlr.backbone import WeightsNotAvailableError, resolve_weights

    try:
        return resolve_weights(options.backbone, options.pretrained)
    except WeightsNotAvailableError as exc:
        errors.append(
            f"{exc} To check the pipeline without these weights, run with --backbone "
            "tiny-test --pretrained none (random weights: the scores are not meaningful)."
        )
    except ValueError as exc:
        errors.append(str(exc))
    return ""


def _check_checkpoint(backbone: str, pretrained: str) -> list[str]:
    """Load the backbone once on the CPU when ``pretrained`` is a checkpoint file.

    A file of the wrong model or format would otherwise fail inside every job.
    """
    from h2vlr.backbone import load_backbone

    path = Path(pretrained).expanduser()
    if not path.is_file():
        return []
    logger.info("checking checkpoint %s with backbone %s on the CPU", path, backbone)
    try:
        load_backbone(backbone, str(path), device="cpu")
    except Exception as exc:  # unpickling, key and shape errors all mean: not this model's file
        reason = _short_reason(exc, path)
        return [
            f"checkpoint {path} cannot be loaded into backbone {backbone!r} ({reason}); pass "
            f"an open_clip checkpoint of {backbone}, or the --backbone it was trained for"
        ]
    return []


_REASON_CHARS = 200  # maximum length of an exception excerpt in a checkpoint message


def _short_reason(exc: Exception, path: Path) -> str:
    """Summarise a checkpoint loading error in one line (torch's own text lists every key)."""
    import pickle

    text = str(exc).strip()
    unreadable = isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text
    if unreadable or not _looks_like_checkpoint(path):
        return "not a PyTorch checkpoint: torch.load cannot read it as saved tensors"
    details = []
    for line in (line.strip() for line in text.splitlines()):
        label, _, keys = line.partition(" in state_dict: ")
        if keys:  # 'Missing key(s) in state_dict: "a", "b"' and 'Unexpected key(s) ...'
            names = [name.strip().strip('".') for name in keys.split(",")]
            what = "missing" if label.startswith("Missing") else "unexpected"
            details.append(f"{len(names)} {what} keys such as {names[0]!r}")
        elif line.startswith("size mismatch"):
            details.append(line[:_REASON_CHARS].rstrip("."))
    if details:
        return "its weights do not fit the model: " + "; ".join(details)
    first = text.splitlines()[0] if text else "no details"
    return f"{type(exc).__name__}: {first[:_REASON_CHARS]}"


def _looks_like_checkpoint(path: Path) -> bool:
    """Return True for a zip archive (torch.save), a pickle or a safetensors file."""
    import zipfile

    if path.suffix == ".safetensors" or zipfile.is_zipfile(path):
        return True
    with path.open("rb") as handle:
        return handle.read(1) == b"\x80"  # the PROTO opcode that starts a binary pickle


# Settings in run.json that define a run's jobs, each with the older key it replaces.
# A run directory may only be continued with the same values.
PLAN_SETTINGS: tuple[tuple[str, str | None], ...] = (
    ("ablate", None),
    ("datasets", None),
    ("data_roots", "data_root"),
    ("categories", None),
    ("shots", None),
    ("seeds", None),
    ("methods", None),
    ("variants", None),
    ("backbone", None),
    ("weights", "pretrained"),
    ("image_size", None),
    ("steps", None),
    ("support_lists_sha256", "support_lists"),
)


def check_existing_run(plan: RunPlan) -> None:
    """Reject continuing a run directory whose ``run.json`` records other plan settings.

    Settings missing from that file (written by an older version) are not compared.

    Raises:
        PlanError: listing each differing setting, its value in the run and now.
    """
    path = plan.run_dir / "run.json"
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text()).get("config") or {}
    except (OSError, ValueError, AttributeError) as exc:
        raise PlanError(
            f"cannot read {path} of the existing run {plan.run_name!r} ({exc}); "
            "pass another --run-name to start a new run"
        ) from exc
    current = json.loads(json.dumps(plan.effective_config()))
    differences = []
    for key, older_key in PLAN_SETTINGS:
        name = key if key in stored else older_key
        if name is None or name not in stored:
            continue
        if _setting(name, stored[name]) != _setting(name, current.get(name)):
            differences.append(
                f"  - {name}: {_show(stored[name])} in the run, {_show(current.get(name))} now"
            )
    if differences:
        raise PlanError(
            f"run directory {plan.run_dir} contains a run with other settings:\n"
            + "\n".join(differences)
            + "\nPass another --run-name to start a new run, or the original options "
            f"(recorded in {path}) to continue this one"
        )


def _setting(name: str, value: Any) -> Any:
    """Normalise a recorded setting: unset --steps means the H2VLR default."""
    if name == "steps" and value is None:
        from h2vlr.config import H2VLRConfig

        return H2VLRConfig().steps
    return value


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(item) for item in value) or "(empty)"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "(empty)"
    return "(not set)" if value is None else str(value)


# ----------------------------------------------------------------------------- expansion


def method_variants(method: str, options: RunOptions) -> tuple[str, ...]:
    """Return the variants to run: the given ones, every variant (ablate) or the default."""
    from h2vlr.methods import get_method_class

    if options.variants:
        return options.variants
    cls = get_method_class(method)
    return tuple(cls.variants) if options.ablate else (cls.variants[0],)


def method_options(method: str, options: RunOptions) -> tuple[tuple[str, Any], ...]:
    """Return the method options set by run flags; ``--steps`` reaches methods that fit."""
    from h2vlr.methods import get_method_class

    cls = get_method_class(method)
    chosen: dict[str, Any] = {}
    if options.steps is not None and _accepts_option(cls, "steps", options.steps):
        chosen["steps"] = options.steps
    return tuple(sorted(chosen.items()))


def _accepts_option(cls: type, name: str, value: Any) -> bool:
    """Return True when ``cls`` can be built with option ``name``.

    Methods take ``**options`` and reject unknown names with a ValueError that names
    them, so building one with only this option is the reliable test.
    """
    try:
        cls(variant=cls.variants[0], **{name: value})
    except (TypeError, ValueError) as exc:
        if name in str(exc):
            return False
    return True


def expand_jobs(plan: RunPlan) -> list[JobSpec]:
    """Return one JobSpec per category, shot, seed, method and variant, in a stable order."""
    options = plan.options
    lists_path, lists_hash = _support_lists_identity(options.support_lists)
    jobs = []
    for info in plan.categories:
        for method in options.methods:
            method_opts = method_options(method, options)
            for variant in method_variants(method, options):
                for shot in options.shots:
                    for seed in options.seeds:
                        jobs.append(
                            JobSpec(
                                dataset=info.dataset,
                                category=info.category,
                                shot=shot,
                                seed=seed,
                                method=method,
                                variant=variant,
                                backbone=options.backbone,
                                pretrained=_absolute_if_file(options.pretrained),
                                weights=plan.weights,
                                image_size=options.image_size,
                                options=method_opts,
                                data_root=str(info.root),
                                support_lists=lists_path,
                                support_lists_sha256=lists_hash,
                                device=options.device,
                            )
                        )
    return jobs


def _absolute_if_file(pretrained: str) -> str:
    # Workers may run in another directory, so a checkpoint path must be absolute.
    candidate = Path(pretrained).expanduser()
    return str(candidate.resolve()) if candidate.is_file() else pretrained


def _support_lists_identity(path: Path | None) -> tuple[str | None, str | None]:
    if path is None:
        return None, None
    resolved = path.expanduser().resolve()
    return str(resolved), hashlib.sha256(resolved.read_bytes()).hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_jsonable(item) for item in value]
    return value
