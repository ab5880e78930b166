"""Ray execution of a run: feature-extraction tasks, then one task per job.

Without an address the run starts a local Ray instance for itself (no dashboard, one
CPU slot per core) and shuts it down at the end. With ``--address`` it joins an
existing cluster (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``). A driver that is already
connected (``ray.is_initialized()``) keeps its connection.

Features are extracted into the shared feature cache once per (dataset, category,
backbone), by their own task. Each job task depends on its category's extraction task
and then reads the cache, together with the extras that methods cache through
``AnomalyMethod.cache_extras``. Each finished job is written to the run
directory by the driver as soon as its result arrives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from h2vlr.paths import default_cache_dir
from orchestration.job import JobResult, failed_result, get_backbone, library_versions, run_job
from orchestration.planning import ABLATED_METHOD, JobSpec, RunPlan
from results.report import plot_leaderboard, print_summary
from results.schema import STATUS_OK, SchemaError
from results.storage import FinalTables, RunStore, write_final_tables

logger = logging.getLogger(__name__)

_RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# Ray re-runs a task whose worker process died (not one that raised) at most this many
# times. Every seed comes from the JobSpec, so a re-run computes the same result.
MAX_TASK_RETRIES = 2
WAIT_SECONDS = 0.5  # how often the driver wakes up to collect finished jobs
EXTRACT_CHUNK = 64  # images per extraction call; bounds the memory of a feature task


class RayConnectionError(RuntimeError):
    """Raised when the run can neither start a local Ray instance nor join the cluster."""


class RunInterrupted(Exception):
    """Raised by ``run_benchmark`` after Ctrl-C, once ``run.json`` has status ``interrupted``."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"interrupted: {done} of {total} jobs done")
        self.done = done  # ok jobs of the plan in the run directory; a resume skips them
        self.total = total


@dataclass(frozen=True)
class FeatureGroup:
    """Images that share one feature-extraction task."""

    dataset: str
    category: str
    data_root: str
    backbone: str
    pretrained: str
    image_size: int
    device: str
    # (method, variant, options) of the run; methods with cached extras get them precomputed
    methods: tuple[tuple[str, str, tuple[tuple[str, Any], ...]], ...] = ()


@dataclass
class ExecutionSummary:
    """Counts of one execution, recorded in ``run.json``."""

    total: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # already done in the run directory before this execution
    images_encoded: int = 0  # by the feature-extraction tasks
    feature_cache_hits: int = 0  # in the feature-extraction tasks
    job_images_encoded: int = 0  # by the jobs themselves; 0 when the cache was complete
    feature_errors: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"total": self.total, "ok": self.ok, "failed": self.failed, "skipped": self.skipped}


# ----------------------------------------------------------------------------- Ray session


def _keep_local_instance_on_loopback() -> None:
    """Bind a run's own Ray instance to 127.0.0.1 instead of the host's network address.

    Ray 2.60 on Linux resolves a node's address to the host's interface address, so a
    purely local run would listen on the network. Its Windows/macOS switch makes every
    address loopback; Ray reads it from the environment at import time (hence the module
    attribute, a private name checked against ray 2.60) and hands the environment to
    the processes it starts. Joining a cluster with --address never comes here.
    """
    os.environ[_RAY_LOOPBACK_ENV] = "0"
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):  # another Ray layout: the variable still applies
        logger.debug("could not switch Ray's node address to loopback in this process")


@contextlib.contextmanager
def ray_session(address: str | None, runtime_env: dict[str, Any] | None = None) -> Iterator[None]:
    """Connect to Ray for the duration of a run.

    Args:
        address: ``None`` starts a local instance; ``auto``, ``HOST:PORT`` or
            ``ray://HOST:PORT`` joins a running cluster.
        runtime_env: passed to ``ray.init`` (for example environment variables).
    """
    if ray.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {
        "log_to_driver": False,  # worker logs stay in the Ray session directory
        "logging_level": logging.WARNING,
        "runtime_env": runtime_env,
    }
    try:
        if address is None:
            logger.info("starting a local Ray instance with %d CPUs", os.cpu_count() or 1)
            _keep_local_instance_on_loopback()
            # "local" always starts a new instance. Without it, ray.init would join a
            # cluster that someone else started on this machine with `ray start`.
            ray.init(
                address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, **kwargs
            )
        else:
            logger.info("joining the Ray cluster at %s", address)
            check_reachable(address)
            ray.init(address=address, **kwargs)
    except KeyboardInterrupt:
        ray.shutdown()  # a half-started local instance must not outlive the driver
        raise
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = "a local Ray instance" if address is None else f"the Ray cluster at {address!r}"
        raise RayConnectionError(
            f"could not start or join {where}: {exc}. Check --address (auto, HOST:PORT or "
            "ray://HOST:PORT) and that the cluster is running"
        ) from exc
    try:
        yield
    finally:
        ray.shutdown()


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast when ``HOST:PORT`` or ``ray://HOST:PORT`` accepts no TCP connection.

    ``ray.init`` keeps retrying an unreachable address for minutes; ``auto`` is left
    to Ray because it names no port.

    Raises:
        ConnectionError: nothing listens at the address.
    """
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"nothing accepts connections at {target} ({exc})") from exc


def resolved_cache_dir(plan: RunPlan) -> Path:
    """Return the absolute feature cache directory of a run.

    It is resolved on the driver because workers may not share its environment
    (``$H2VLR_CACHE_DIR``) or its working directory.
    """
    return (plan.options.cache_dir or default_cache_dir()).expanduser().absolute()


def task_resources(cpus_per_job: float, gpus_per_job: float) -> dict[str, float]:
    """Return the Ray resources of a task; GPUs are requested only when the cluster has some."""
    cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
    if cluster_gpus <= 0:
        return {"num_cpus": cpus_per_job, "num_gpus": 0}
    if gpus_per_job > cluster_gpus:
        logger.warning(
            "--gpus-per-job %s exceeds the %s GPUs of the cluster; jobs would never be scheduled, "
            "requesting %s instead",
            gpus_per_job,
            cluster_gpus,
            cluster_gpus,
        )
        gpus_per_job = cluster_gpus
    return {"num_cpus": cpus_per_job, "num_gpus": gpus_per_job}


# ----------------------------------------------------------------------------- tasks


def extract_category_features(group: FeatureGroup, cache_dir: str | None) -> dict[str, Any]:
    """Fill the feature cache with every support-pool and test image of one category.

    Returns:
        ``{"encoded": int, "cache_hits": int, "error": str}``; ``error`` is empty on success.
    """
    from h2vlr.data import get_dataset
    from h2vlr.features import FeatureCache, FeatureExtractor

    try:
        backbone = get_backbone(group.backbone, group.pretrained, group.image_size, group.device)
        data = get_dataset(group.dataset).load_category(Path(group.data_root), group.category)
        extractor = FeatureExtractor(backbone, FeatureCache(Path(cache_dir) if cache_dir else None))
        paths = [sample.path for sample in data.support_pool + data.test]
        for start in range(0, len(paths), EXTRACT_CHUNK):
            extractor.extract(paths[start : start + EXTRACT_CHUNK])  # features stay on disk
        for method, variant, options in group.methods:
            _precompute_extras(method, variant, options, backbone, extractor, paths)
        stats = extractor.stats
        return {
            "encoded": stats.encoded + stats.extra_computed,
            "cache_hits": stats.cache_hits + stats.extra_cache_hits,
            "error": "",
        }
    except Exception as exc:  # reported through every job of the category
        logger.exception("feature extraction of %s/%s failed", group.dataset, group.category)
        return {"encoded": 0, "cache_hits": 0, "error": f"{type(exc).__name__}: {exc}"}


def _precompute_extras(method, variant, options, backbone, extractor, paths) -> None:
    """Fill the cache with a method's per-image extras (for example WinCLIP windows)."""
    from h2vlr.methods import create_method

    instance = create_method(method, variant, dict(options))
    for start in range(0, len(paths), EXTRACT_CHUNK):
        instance.cache_extras(backbone, extractor, paths[start : start + EXTRACT_CHUNK])


def run_job_after_features(
    spec: JobSpec, cache_dir: str | None, features: dict[str, Any]
) -> JobResult:
    """Run a job once its category's features are cached; fail it if extraction failed."""
    if features["error"]:
        started = datetime.now(UTC)
        return failed_result(spec, f"feature extraction failed: {features['error']}", started)
    return run_job(spec, cache_dir)


_extract_task = ray.remote(max_retries=MAX_TASK_RETRIES)(extract_category_features)
_job_task = ray.remote(max_retries=MAX_TASK_RETRIES, retry_exceptions=False)(run_job_after_features)


def feature_group(spec: JobSpec, methods: tuple = ()) -> FeatureGroup:
    """Return the extraction task a job depends on; ``methods`` lists the run's methods."""
    return FeatureGroup(
        spec.dataset,
        spec.category,
        spec.data_root,
        spec.backbone,
        spec.pretrained,
        spec.image_size,
        spec.device,
        methods,
    )


# ----------------------------------------------------------------------------- driver


def execute(
    plan: RunPlan,
    store: RunStore,
    console: Console | None = None,
    summary: ExecutionSummary | None = None,
) -> ExecutionSummary:
    """Run every job of ``plan`` not already done in ``store``; write each as it finishes.

    ``summary``, when given, is filled in place, so its counts survive an interruption.
    """
    if summary is None:
        summary = ExecutionSummary()
    summary.total = len(plan.jobs)
    done = store.done_job_ids() & {spec.job_id for spec in plan.jobs}
    pending_specs = [spec for spec in plan.jobs if spec.job_id not in done]
    summary.skipped = len(done)
    if done:
        logger.info(
            "resuming %s: %d of %d jobs already done", store.run_dir, len(done), len(plan.jobs)
        )
    if not pending_specs:
        return summary

    options = plan.options
    cache_dir = str(resolved_cache_dir(plan))
    resources = task_resources(options.cpus_per_job, options.gpus_per_job)
    methods = tuple(sorted({(s.method, s.variant, s.options) for s in pending_specs}))
    groups = {spec: feature_group(spec, methods) for spec in pending_specs}
    feature_refs = _submit_feature_tasks(
        sorted(set(groups.values()), key=_group_order), cache_dir, resources
    )
    job_refs = {
        _job_task.options(**resources).remote(spec, cache_dir, feature_refs[groups[spec]]): spec
        for spec in pending_specs
    }
    _collect(job_refs, list(feature_refs.values()), store, summary, console or Console(stderr=True))
    _add_feature_stats(feature_refs, summary)
    return summary


def _group_order(group: FeatureGroup) -> tuple[str, str]:
    return group.dataset, group.category


def _submit_feature_tasks(groups: list[FeatureGroup], cache_dir: str, resources: dict[str, float]):
    logger.info("extracting features of %d dataset categories", len(groups))
    return {group: _extract_task.options(**resources).remote(group, cache_dir) for group in groups}


def _collect(
    job_refs: dict,
    feature_refs: list,
    store: RunStore,
    summary: ExecutionSummary,
    console: Console,
) -> None:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed [red]{task.fields[failed]}"),
        TimeElapsedColumn(),
        TextColumn("remaining"),
        TimeRemainingColumn(),
    )
    pending = dict(job_refs)
    with Progress(*columns, console=console, transient=False) as progress:
        features = progress.add_task("features", total=len(feature_refs), failed=0)
        bar = progress.add_task("jobs", total=summary.total, completed=summary.skipped, failed=0)
        extracting = list(feature_refs)
        while pending:
            if extracting:
                # Feature sets done (or failed: their jobs report the error) per category.
                done, extracting = ray.wait(extracting, num_returns=len(extracting), timeout=0)
                progress.update(features, advance=len(done))
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=WAIT_SECONDS)
            for ref in ready:
                spec = pending.pop(ref)
                row = _store_result(spec, _fetch(ref, spec), store)
                ok = row["status"] == STATUS_OK
                summary.ok += ok
                summary.failed += not ok
                summary.job_images_encoded += row["images_encoded"]
                progress.update(bar, advance=1, failed=summary.failed)
        # Every job has returned, so every feature task it waited on has too.
        progress.update(features, completed=len(feature_refs))


def _fetch(ref: ray.ObjectRef, spec: JobSpec) -> JobResult:
    """Return a job's result; a task Ray could not complete becomes a failed result."""
    started = datetime.now(UTC)
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:  # worker died past its retries, node lost, ...
        return failed_result(spec, f"{type(exc).__name__}: {exc}", started)


def _store_result(spec: JobSpec, result: JobResult, store: RunStore) -> dict[str, Any]:
    """Write a job's files; returns the job row as written."""
    try:
        store.write_job(result.job_row, result.score_rows)
    except SchemaError as exc:
        # A row that does not match the schema is a bug; keep the evidence as a failed row.
        result = failed_result(
            spec, f"result rejected by the schema: {exc}", result.job_row["started_at"]
        )
        store.write_job(result.job_row, result.score_rows)
    row = result.job_row
    if row["status"] != STATUS_OK:
        logger.error("job %s failed: %s", spec.job_id, row["error"])
    elif row["images_encoded"]:
        logger.warning(
            "job %s encoded %d images itself; the feature cache was incomplete",
            spec.job_id,
            row["images_encoded"],
        )
    return row


def _add_feature_stats(feature_refs: dict, summary: ExecutionSummary) -> None:
    for group, ref in feature_refs.items():
        try:
            stats = ray.get(ref)
        except ray.exceptions.RayError as exc:
            summary.feature_errors.append(f"{group.dataset}/{group.category}: {exc}")
            continue
        summary.images_encoded += stats["encoded"]
        summary.feature_cache_hits += stats["cache_hits"]
        if stats["error"]:
            summary.feature_errors.append(f"{group.dataset}/{group.category}: {stats['error']}")


# ----------------------------------------------------------------------------- whole run


@dataclass(frozen=True)
class RunOutcome:
    """Outcome of a finished run: its directory, tables and job counts."""

    run_dir: Path
    summary: ExecutionSummary
    tables: FinalTables
    exit_code: int  # 0 when every job is ok, 1 otherwise


def run_benchmark(
    plan: RunPlan,
    console: Console | None = None,
    runtime_env: dict[str, Any] | None = None,
) -> RunOutcome:
    """Execute a validated plan and write every table, ``run.json`` and the plot.

    The tables are written even when jobs failed; the exit code then is 1.

    Raises:
        RunInterrupted: Ctrl-C (KeyboardInterrupt) during the run; ``run.json`` then has
            status ``interrupted`` and Ray is shut down. Finished jobs stay for a resume.
    """
    console = console or Console(stderr=True)
    store = RunStore(plan.run_dir)
    started = datetime.now(UTC)
    if plan.random_weights:
        logger.warning(RANDOM_WEIGHTS_WARNING)
    cluster: dict[str, Any] = {}
    summary = ExecutionSummary(total=len(plan.jobs))
    try:
        with ray_session(plan.options.address, runtime_env):
            cluster = _cluster_info()
            store.write_run_json(_run_info(plan, started, None, summary, cluster))
            execute(plan, store, console, summary)
    except KeyboardInterrupt:
        raise _record_interruption(plan, store, started, summary, cluster) from None

    ablated = ABLATED_METHOD if plan.options.ablate else None
    tables = write_final_tables(store, [spec.job_id for spec in plan.jobs], ablated)
    finished = datetime.now(UTC)
    store.write_run_json(_run_info(plan, started, finished, summary, cluster))
    _plot(tables, plan.run_dir / "leaderboard.png")
    print_summary(console, tables.leaderboard, summary.counts())
    console.print(f"results: {plan.run_dir}")
    return RunOutcome(plan.run_dir, summary, tables, 0 if summary.failed == 0 else 1)


def _record_interruption(
    plan: RunPlan,
    store: RunStore,
    started: datetime,
    summary: ExecutionSummary,
    cluster: dict[str, Any],
) -> RunInterrupted:
    """Write ``run.json`` with status ``interrupted``; return the exception to raise.

    Its ``jobs`` counts cover this execution; ``jobs.done`` counts every ok job of the
    plan in the run directory, the ones a resume skips.
    """
    done = len(store.done_job_ids() & {spec.job_id for spec in plan.jobs})
    info = _run_info(plan, started, datetime.now(UTC), summary, cluster)
    info["status"] = "interrupted"
    info["jobs"]["done"] = done
    if (plan.run_dir / "run.json").exists():  # else Ray was still starting: nothing to record
        store.write_run_json(info)
    logger.warning("run %s interrupted: %d of %d jobs done", plan.run_name, done, len(plan.jobs))
    return RunInterrupted(done, len(plan.jobs))


def _plot(tables: FinalTables, path: Path) -> None:
    # The plot is a convenience: a plotting error must not turn a finished run into a crash.
    try:
        plot_leaderboard(tables.leaderboard, path)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        logger.error("could not plot the leaderboard to %s: %s", path, exc)


RANDOM_WEIGHTS_WARNING = (
    "pretrained is 'none': the backbone has random weights, so every score is a sanity "
    "figure, not a benchmark result"
)


def _cluster_info() -> dict[str, Any]:
    resources = ray.cluster_resources()
    return {
        "nodes": sum(1 for node in ray.nodes() if node.get("Alive")),
        "cpus": resources.get("CPU", 0.0),
        "gpus": resources.get("GPU", 0.0),
    }


def _run_info(
    plan: RunPlan,
    started: datetime,
    finished: datetime | None,
    summary: ExecutionSummary,
    cluster: dict[str, Any],
) -> dict[str, Any]:
    """Build the ``run.json`` payload."""
    return {
        "run_name": plan.run_name,
        "run_dir": str(plan.run_dir.absolute()),
        "command": "ablate" if plan.options.ablate else "run",
        "status": "running" if finished is None else "finished",
        "config": {**plan.effective_config(), "cache_dir": str(resolved_cache_dir(plan))},
        "random_weights": plan.random_weights,
        "warnings": [RANDOM_WEIGHTS_WARNING] if plan.random_weights else [],
        "versions": library_versions(),
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat() if finished else None,
        "wall_seconds": (finished - started).total_seconds() if finished else None,
        "jobs": summary.counts(),
        "features": {
            "images_encoded": summary.images_encoded,
            "cache_hits": summary.feature_cache_hits,
            "images_encoded_by_jobs": summary.job_images_encoded,
            "errors": summary.feature_errors,
        },
        "cluster": cluster,
    }
