"""The ``run`` and ``ablate`` commands: plan, validate, execute on Ray, write the tables.

Option values come from three places, later ones winning: the built-in defaults, a
TOML file given with ``--config`` (same keys as the flags, e.g. ``shots = "1,4"``),
and the flags themselves.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from orchestration.logging_setup import LOG_LEVELS, configure_logging
from orchestration.planning import (
    PlanError,
    RunOptions,
    build_options,
    load_config_file,
    validate,
)

logger = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130  # the shell's status for a process ended by SIGINT (128 + 2)

DatasetOpt = Annotated[
    str | None,
    typer.Option(
        "--dataset",
        help="Dataset name, or several as NAME,NAME. Default: demo (built in, generated on first use).",
    ),
]
DataRootOpt = Annotated[
    str | None,
    typer.Option(
        "--data-root",
        help="Directory of the dataset; with several datasets, NAME=PATH,NAME=PATH. Not needed for demo.",
    ),
]
CategoriesOpt = Annotated[
    str | None,
    typer.Option(
        "--categories", help="Categories to run, as A,B. Default: every category of the dataset."
    ),
]
ShotsOpt = Annotated[
    str | None,
    typer.Option(
        "--shots",
        help="Support-set sizes in images, as 1,4,full ('full' uses every normal training image). Default: 1,4.",
    ),
]
SeedsOpt = Annotated[
    str | None,
    typer.Option(
        "--seeds", help="Seeds of support sampling and fitting, as 0,1,2 or 0-4. Default: 0-4."
    ),
]
MethodsOpt = Annotated[
    str | None,
    typer.Option("--methods", help="Methods to run, as h2vlr,winclip-plus. Default: h2vlr."),
]
VariantsOpt = Annotated[
    str | None,
    typer.Option(
        "--variants",
        help="H2VLR variants to compare, as full,no-hsr or full+k_neighbors=1. Default: every ablation variant.",
    ),
]
BackboneOpt = Annotated[
    str | None,
    typer.Option(
        "--backbone", help="open_clip model name, or tiny-test. Default: ViT-B-16-plus-240."
    ),
]
PretrainedOpt = Annotated[
    str | None,
    typer.Option(
        "--pretrained",
        help="Backbone weights: a pretrained tag, a checkpoint file, or none (random weights). Default: laion400m_e32.",
    ),
]
ImageSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--image-size",
        help="Evaluation resolution in pixels (square). Default: the backbone's input size.",
    ),
]
StepsOpt = Annotated[
    int | None,
    typer.Option(
        "--steps", help="Optimizer steps of methods that fit (h2vlr). Default: the method's own."
    ),
]
SupportListsOpt = Annotated[
    Path | None,
    typer.Option(
        "--support-lists",
        help="JSON file of fixed support sets (dataset/category/shot/seed -> relative paths); jobs it lists use them instead of sampling.",
    ),
]
OutOpt = Annotated[
    Path | None, typer.Option("--out", help="Parent directory of run directories. Default: runs.")
]
RunNameOpt = Annotated[
    str | None,
    typer.Option(
        "--run-name",
        help="Name of the run directory under --out. Default: a UTC timestamp. An existing name resumes that run.",
    ),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT. Default: start a local Ray instance.",
    ),
]
GpusOpt = Annotated[
    float | None,
    typer.Option(
        "--gpus-per-job",
        help="GPUs per job, fractions allowed (0.5 runs two jobs per GPU); ignored on clusters without GPUs. Default: 1.",
    ),
]
CpusOpt = Annotated[
    float | None,
    typer.Option(
        "--cpus-per-job", help="CPU cores per job and per feature-extraction task. Default: 1."
    ),
]
CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Feature cache directory; must be shared by every node of a cluster. Default: $H2VLR_CACHE_DIR or ~/.cache/h2vlr-bench.",
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", help="Torch device of the jobs: auto, cpu or cuda. Default: auto."),
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue a run: skip jobs already done. Without --run-name, the latest run under --out.",
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", help="TOML file with the same keys as the options; flags override it."
    ),
]
LogLevelOpt = Annotated[
    str, typer.Option("--log-level", help=f"Logging level: {', '.join(LOG_LEVELS)}.")
]


def register_run_commands(app: typer.Typer) -> None:
    """Add the ``run`` and ``ablate`` commands to the root app."""
    app.command("run", help="Benchmark methods over datasets, shots and seeds as Ray jobs.")(
        run_command
    )
    app.command("ablate", help="Run H2VLR over its ablation variants and write ablation.parquet.")(
        ablate_command
    )


def run_command(
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = None,
    categories: CategoriesOpt = None,
    shots: ShotsOpt = None,
    seeds: SeedsOpt = None,
    methods: MethodsOpt = None,
    backbone: BackboneOpt = None,
    pretrained: PretrainedOpt = None,
    image_size: ImageSizeOpt = None,
    steps: StepsOpt = None,
    support_lists: SupportListsOpt = None,
    out: OutOpt = None,
    run_name: RunNameOpt = None,
    address: AddressOpt = None,
    gpus_per_job: GpusOpt = None,
    cpus_per_job: CpusOpt = None,
    cache_dir: CacheDirOpt = None,
    device: DeviceOpt = None,
    resume: ResumeOpt = False,
    config: ConfigOpt = None,
    log_level: LogLevelOpt = "INFO",
) -> None:
    values = dict(locals())
    _execute(values, ablate=False)


def ablate_command(
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = None,
    categories: CategoriesOpt = None,
    shots: ShotsOpt = None,
    seeds: SeedsOpt = None,
    variants: VariantsOpt = None,
    backbone: BackboneOpt = None,
    pretrained: PretrainedOpt = None,
    image_size: ImageSizeOpt = None,
    steps: StepsOpt = None,
    support_lists: SupportListsOpt = None,
    out: OutOpt = None,
    run_name: RunNameOpt = None,
    address: AddressOpt = None,
    gpus_per_job: GpusOpt = None,
    cpus_per_job: CpusOpt = None,
    cache_dir: CacheDirOpt = None,
    device: DeviceOpt = None,
    resume: ResumeOpt = False,
    config: ConfigOpt = None,
    log_level: LogLevelOpt = "INFO",
) -> None:
    values = dict(locals())
    _execute(values, ablate=True)


def _execute(values: dict[str, Any], ablate: bool) -> None:
    """Validate everything, then run.

    Exits 2 on invalid options, 1 when a job failed, 130 when interrupted (Ctrl-C).
    """
    from orchestration.execution import RayConnectionError, RunInterrupted, run_benchmark

    console = Console(stderr=True)
    try:
        configure_logging(values.pop("log_level"))
        plan = validate(_options(values, ablate))
    except (PlanError, ValueError) as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("interrupted before any job started", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    logger.info("run %s: %d jobs, results in %s", plan.run_name, len(plan.jobs), plan.run_dir)
    try:
        outcome = run_benchmark(plan, console)
    except RayConnectionError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    except RunInterrupted as exc:
        # Without --run-name a new command would start a new timestamped run.
        again = "the same command"
        if plan.options.run_name is None:
            again += f" with --run-name {plan.run_name}"
        console.print(
            f"interrupted: {exc.done} of {exc.total} jobs done; run {again} to continue "
            f"(finished jobs are kept in {plan.run_dir})",
            highlight=False,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    raise typer.Exit(outcome.exit_code)


def _options(values: dict[str, Any], ablate: bool) -> RunOptions:
    config = values.pop("config")
    merged = load_config_file(config) if config is not None else {}
    # Error messages name the config file for the values that come from it.
    sources = {key: f"{key} (config file {config})" for key in merged}
    values["datasets"] = values.pop("dataset")
    for key, value in values.items():
        # An unset flag is None (False for --resume) and leaves the config file's value.
        if value is not None and value is not False:
            merged[key] = value
            sources.pop(key, None)
    return resolve_resume(build_options(merged, ablate=ablate, sources=sources))


def resolve_resume(options: RunOptions) -> RunOptions:
    """With ``--resume`` and no run name, pick the most recent run directory under ``--out``.

    Raises:
        PlanError: no run directory exists to resume, or none of the given name.
    """
    from dataclasses import replace

    if not options.resume:
        return options
    if options.run_name is not None:
        if not (options.out / options.run_name / "run.json").is_file():
            raise PlanError(
                f"--resume found no run named {options.run_name!r} under {options.out}; check "
                "the name, or drop --resume to start it as a new run"
            )
        return options
    runs = sorted(options.out.glob("*/run.json"), key=lambda path: path.stat().st_mtime)
    if not runs:
        raise PlanError(
            f"--resume found no run to continue under {options.out}; pass --run-name NAME "
            "or start a new run without --resume"
        )
    return replace(options, run_name=runs[-1].parent.name)
