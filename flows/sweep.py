"""Sweeps: a grid of overrides times seeds, one DVC experiment per variant, the shared stages computed once.

``python -m flows sweep -S student.alpha=0.5,0.7,0.9 -S student.distillation=soft,hard --seeds 100-104``

* **A variant** is one point of the grid with one seed: one ``dvc exp run --temp`` (through
  :func:`flows.pipeline.pipeline_flow`, so one Prefect flow run and one MLflow parent run with its stage runs). The
  workspace's ``params.yaml``, ``dvc.lock`` and outputs never change; the variants hold the workspace lock shared
  (:mod:`flows.workspace`), so they run side by side while a pipeline in the workspace is refused.
* **Where they run.** ``--pool NAME``: each variant is a flow run of the ``distill-pipeline/variant`` deployment
  (prefect.yaml), started with ``run_deployment(..., timeout=0)``, on that work pool; any number of
  ``prefect worker start --pool NAME --limit 1``, one per machine, share them. At most ``--window`` flow runs wait at
  once (Prefect's queues congest beyond about 200 waiting runs, PrefectHQ/prefect#19403), and no Prefect
  concurrency limit is used (slots held by dead runs, #17415): each worker's ``--limit 1`` is the limit. A flow run
  whose worker died stops sending heartbeats and Prefect's zombie automation (created here, Prefect's documented
  recipe) marks it Crashed; the sweep then submits it again, and a live worker runs it. Without a pool, the
  variants run here, ``--jobs`` at a time (Prefect tasks on a thread pool, each calling the pipeline flow).
* **Shared stages once.** Variants that agree on every param a stage and its upstream stages read share that stage.
  Before the variants fan out, each teacher, soft-label store and baseline that two or more variants share is
  computed once, by one ``dvc exp run --temp ... teacher soft_labels baseline`` per first variant that shares them
  (an alpha sweep: one run; wave 2 only for a store on a teacher another run computes); the variants then find them
  in DVC's run-cache (``Stage 'teacher' is cached - skipping run``), so no two runs ever compute the same stage.
  One variant at a time here (``--jobs 1``, no pool) needs no shared runs: nothing runs beside a variant, so the
  first that needs a shared stage computes it and the later ones restore it (one DVC run fewer per shared run). With a
  DVC remote (``--remote``, the project's default remote), every run pulls what it can restore from it (``dvc exp
  run --pull``: run-cache entries and their outputs) and pushes its outputs and the run-cache after.
* **Gathered in one place.** The sweep id (``sweep-<hash>`` of the grid, the seeds, the base overrides, the commit
  and ``params.yaml``; or ``--id``) is the tag ``distill.sweep`` on every run of the sweep, all under one MLflow
  parent run. Results come from MLflow, not from Prefect's result API (unreliable there: #14397, #17557): each
  variant's parent run carries ``val.student``, ``val.baseline`` and ``val.gain`` (validation accuracy, from
  ``metrics/student.json`` and ``metrics/baseline.json``). ``reports/sweep.md``, ``reports/sweep.json`` and
  ``reports/figures/sweep_val.png`` rank the grid points by the student's validation accuracy, mean and 95 %
  interval over seeds. The test split is not read: ``python -m flows seeds --confirm`` runs the best one on held-out
  seeds (>= 1000) and reports its test figures.
* **Faults.** A variant that fails is run once more; it resumes from its last finished epoch, whose state lives
  outside the temporary copy (``.state/sweeps/<variant>``, ``DISTILL_STATE_DIR``). The others go on, and the report
  names what failed. The same sweep again runs only the variants without a finished MLflow run. Ctrl-C or SIGTERM
  of the sweep cancels its variants (flow runs set to Cancelling, or DVC interrupted here).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from distill.config import ParamsError, apply_overrides, dvc_stages, load_raw, parse_params
from flows.pipeline import (
    SWEEP_TAG,
    VARIANT_TAG,
    check_remote,
    flow_run_holder,
    interrupt_dvc,
    pipeline_flow,
)
from flows.workspace import top_level, workspace_lock

__all__ = ["SweepError", "Job", "Plan", "split_values", "parse_axis", "parse_seeds", "make_plan", "sweep_flow",
           "rank", "write_report", "DEPLOYMENT", "CONFIRM_SEEDS"]

DEPLOYMENT = "distill-pipeline/variant"
#: The stages a sweep computes once for the variants that share them, in dependency order.
SHARED_STAGES = ("teacher", "soft_labels", "baseline")
#: What a variant runs: the stages that write the validation accuracies (evaluate, which reads the test split, and
#: what follows it are for a confirmation).
VARIANT_TARGETS = ("student", "baseline")
#: Seeds for a confirmation on held-out seeds start here: a sweep's seeds are below.
CONFIRM_SEEDS = 1000
ATTEMPTS = 2  # a variant that fails is run once more
ZOMBIE_AUTOMATION = "distill: crash flow runs without heartbeats"
HEARTBEAT_S = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the variants' flow runs (Prefect's minimum)


class SweepError(ParamsError):
    """A grid or seed list that cannot be read."""


# ------------------------------------------------------------------------- the grid
def split_values(text: str) -> list[str]:
    """``0.5,0.7`` -> ``["0.5", "0.7"]``; commas inside brackets or quotes stay (``[0.2, 1.0],[0.5, 1.0]``)."""
    bounds = [-1, *(i for i, ch in top_level(text) if ch == ","), len(text)]
    return [text[a + 1:b].strip() for a, b in zip(bounds, bounds[1:])]


def parse_axis(item: str) -> tuple[str, list[str]]:
    """``student.alpha=0.5,0.7`` -> ``("student.alpha", ["0.5", "0.7"])``.

    Raises:
        SweepError: no ``=``, an empty key or value, or a value given twice.
    """
    key, sep, values = item.partition("=")
    key = key.strip()
    parsed = split_values(values) if sep else []
    if not key or not parsed or any(not v for v in parsed):
        raise SweepError(f"cannot read the sweep axis {item!r}: write -S key=value1,value2 (e.g. "
                         "-S student.alpha=0.5,0.7)")
    if len(set(parsed)) != len(parsed):
        raise SweepError(f"the sweep axis {item!r} lists a value twice")
    return key, parsed


def parse_seeds(text: str) -> list[int]:
    """``100-104`` -> 100..104; ``1,3,5``; ``100-102,200``.

    Raises:
        SweepError: anything else, or a seed given twice.
    """
    seeds: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            low, sep, high = part.partition("-")
            seeds += list(range(int(low), int(high) + 1)) if sep else [int(low)]
    except ValueError:
        raise SweepError(f"cannot read the seeds {text!r}: write 100-104, or 1,3,5") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SweepError(f"the seeds {text!r} are empty or list a seed twice")
    return seeds


@dataclass(frozen=True)
class Job:
    """One ``dvc exp run --temp`` of a sweep: a variant (one grid point, one seed), or a shared stage's run."""

    name: str  # the DVC experiment's name and the MLflow parent run's; the variant's key in the sweep
    overrides: tuple[str, ...]  # every -S of the run, the seed's included
    config: str  # the grid point ("student.alpha=0.5 student.tau=2"; "" for the default params)
    seed: int
    targets: tuple[str, ...] = ()  # the stages to run (with what they depend on); () the whole pipeline
    needs: tuple[str, ...] = ()  # the shared runs this one reuses

    def sweep(self, sweep_id: str, parent: str, remote: Optional[str], attempt: int = 1) -> dict[str, Any]:
        """The ``sweep`` parameter of :func:`flows.pipeline.pipeline_flow` for this job."""
        out: dict[str, Any] = {"id": sweep_id, "variant": self.name, "parent": parent, "config": self.config,
                               "seed": self.seed}
        if self.targets:
            out["targets"] = list(self.targets)
        if remote:
            out["remote"] = remote
        return out

    def parameters(self, sweep_id: str, parent: str, remote: Optional[str], attempt: int = 1) -> dict[str, Any]:
        """The pipeline flow's parameters; a second attempt gets a DVC name of its own (``-a2``)."""
        return {"overrides": list(self.overrides), "project_root": ".", "temp": True,
                "exp_name": self.name if attempt == 1 else f"{self.name}-a{attempt}",
                "sweep": self.sweep(sweep_id, parent, remote)}


@dataclass
class Plan:
    """What a sweep runs: its variants, and the shared stages' runs in waves (each wave after the one before)."""

    sweep_id: str
    configs: list[tuple[str, ...]]
    seeds: list[int]
    variants: list[Job]
    waves: list[list[Job]] = field(default_factory=list)
    base: list[str] = field(default_factory=list)  # the overrides every variant has (not part of their names)

    def waves_for(self, pending: list[Job]) -> list[list[Job]]:
        """The shared runs that the ``pending`` variants need (none for variants that are all done)."""
        needed = {n for job in pending for n in job.needs}
        return [w for w in ([j for j in wave if j.name in needed] for wave in self.waves) if w]


def _grid(axes: list[tuple[str, list[str]]]) -> list[tuple[str, ...]]:
    if len({k for k, _ in axes}) != len(axes):
        raise SweepError("a key is swept twice: give each key one -S key=v1,v2")
    return [tuple(f"{k}={v}" for (k, _), v in zip(axes, values))
            for values in itertools.product(*(vals for _, vals in axes))]


def sweep_id_of(root: Path, configs: list[tuple[str, ...]], seeds: list[int], base: list[str]) -> str:
    """``sweep-<8 hex>``: the same grid, seeds and base overrides on the same commit and params.yaml, the same id."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                            check=False).stdout.strip()
    h = hashlib.sha256(json.dumps([configs, seeds, base, commit]).encode())
    h.update((root / "params.yaml").read_bytes())
    return f"sweep-{h.hexdigest()[:8]}"


def variant_name(sweep_id: str, overrides: list[str], seed: int) -> str:
    """``<sweep>-<6 hex of the overrides>-s<seed>``: named by what it runs, not by its place in the grid, so a sweep
    given the same ``--id`` with values added or removed finds its finished variants and no other (a grid index
    would name another grid point after the change)."""
    return f"{sweep_id}-{hashlib.sha256(' '.join(overrides).encode()).hexdigest()[:6]}-s{seed}"


def make_plan(root: Path, axes: list[tuple[str, list[str]]], seeds: list[int], base: Optional[list[str]] = None,
              sweep_id: Optional[str] = None, targets: tuple[str, ...] = VARIANT_TARGETS) -> Plan:
    """The variants of ``axes`` x ``seeds`` (every one validated) and the shared runs they need.

    ``targets``: the stages a variant runs (with what they depend on); by default up to the student and the baseline,
    whose metrics hold the validation accuracies, so no variant reads the test split. ``()``: the whole pipeline.

    Raises:
        SweepError: a key swept twice, a seed swept and given as ``seed=``; ParamsError: a value the schema refuses.
    """
    base = list(base or [])
    if any(o.partition("=")[0].strip() == "seed" for o in base) or any(k == "seed" for k, _ in axes):
        raise SweepError("give the seeds with --seeds, not as -S seed=...")
    configs = _grid(axes)
    sweep_id = sweep_id or sweep_id_of(root, configs, seeds, base)
    raw = load_raw(root / "params.yaml")
    stages = dvc_stages(root / "dvc.yaml")
    variants, keys = [], []
    for config, seed in itertools.product(configs, seeds):
        overrides = (*base, *config, f"seed={seed}")
        resolved = apply_overrides(raw, list(overrides))
        parse_params(resolved, source=f"params.yaml with -S {' -S '.join(overrides)}")
        keys.append(stage_keys(stages, resolved))
        variants.append(Job(variant_name(sweep_id, [*base, *config], seed), overrides, " ".join(config), seed,
                            targets=targets))
    plan = Plan(sweep_id, configs, seeds, variants, base=base)
    _plan_shared(plan, keys)
    return plan


def _plan_shared(plan: Plan, keys: list[dict[str, str]]) -> None:
    """The shared runs: each stage result that two or more variants share, computed once, in as few runs as can be.

    A shared result's run is that of its first variant (in grid order): the teacher, store and baseline that one
    variant shares with others are one DVC run (an alpha sweep's whole shared work is one run, not three). Wave 1:
    the runs that compute their own teacher, or need none (a baseline reads no teacher); wave 2: a store on a
    teacher that a wave-1 run computes (a sweep over the store's own params).
    """
    groups: dict[tuple[str, str], list[int]] = {}
    for i, k in enumerate(keys):
        for stage in SHARED_STAGES:
            groups.setdefault((stage, k[stage]), []).append(i)
    by_first: dict[int, list[tuple[str, str]]] = {}
    for group, members in groups.items():
        if len(members) > 1:
            by_first.setdefault(members[0], []).append(group)
    needs: dict[str, list[str]] = {v.name: [] for v in plan.variants}
    waves: list[list[Job]] = [[], []]
    for n, (first, shared) in enumerate(sorted(by_first.items()), 1):
        rep = plan.variants[first]
        stages = tuple(stage for stage, _ in shared)
        job = Job(f"{plan.sweep_id}-shared{n}", rep.overrides, rep.config, rep.seed, targets=stages)
        waves["soft_labels" in stages and "teacher" not in stages].append(job)
        for group in shared:
            for i in groups[group]:
                needs[plan.variants[i].name].append(job.name)
    plan.waves = [wave for wave in waves if wave]
    plan.variants = [Job(v.name, v.overrides, v.config, v.seed, v.targets, tuple(dict.fromkeys(needs[v.name])))
                     for v in plan.variants]


def _upstream(stages: dict[str, dict[str, Any]], stage: str) -> list[str]:
    """``stage`` and every stage whose outputs it depends on, transitively."""
    outs = {}
    for name, spec in stages.items():
        for out in [*(spec.get("outs") or []), *(spec.get("metrics") or []), *(spec.get("plots") or [])]:
            outs[next(iter(out)) if isinstance(out, dict) else out] = name
    seen, todo = [], [stage]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        todo += [outs[d] for d in (stages[current].get("deps") or []) if isinstance(d, str) and d in outs]
    return seen


def stage_keys(stages: dict[str, dict[str, Any]], resolved: dict[str, Any]) -> dict[str, str]:
    """For each shared stage, a hash of every param it and its upstream stages read: equal keys, one result."""
    out = {}  # the keys as dvc.yaml lists them: a group stands for all of its keys
    for stage in SHARED_STAGES:
        values = {}
        for name in _upstream(stages, stage):
            for entry in stages[name].get("params") or []:
                for key in ([entry] if isinstance(entry, str) else [k for d in entry.values() for k in d]):
                    values[key] = _lookup(resolved, key)
        out[stage] = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()
    return out


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


# ------------------------------------------------------------------------- running the jobs
@task(name="sweep variant", task_run_name="{name}", retries=ATTEMPTS - 1, retry_delay_seconds=2,
      persist_result=False, cache_policy=NO_CACHE)
def variant_task(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """One job here, as the pipeline flow; a retry resumes from the variant's state, under a DVC name of its own."""
    attempt = task_run.run_count or 1
    if attempt > 1:
        parameters = {**parameters, "exp_name": f"{parameters['exp_name']}-a{attempt}"}
    return pipeline_flow(**parameters)


def _threads_each(at_once: int) -> Optional[int]:
    """The CPU threads of each of ``at_once`` variants side by side here: the cores shared out, so that two
    variants on a 2-core machine do not run 2 torch threads each (``None``: one at a time, torch's default)."""
    if at_once <= 1:
        return None
    return max(1, len(os.sched_getaffinity(0)) // at_once)


def run_here(jobs: list[Job], parameters: Callable[[Job, int], dict[str, Any]],
             threads: Optional[int] = None) -> dict[str, str]:
    """Run ``jobs`` in this process, as many at once as the flow's task runner allows (``--jobs``); with
    ``threads``, each job's stages run with that many CPU threads (``OMP_NUM_THREADS``, unless it is set).

    Returns:
        ``{name: why}`` for the jobs that failed on their last attempt.
    """
    from prefect.futures import wait

    try:
        futures = {job.name: variant_task.submit(job.name, _with_threads(parameters(job, 1), threads))
                   for job in jobs}
        wait(list(futures.values()))
    except BaseException:
        interrupt_dvc()  # Ctrl-C or SIGTERM: the variants' DVC commands stop as on Ctrl-C
        raise
    return {name: f.state.message or f.state.name for name, f in futures.items() if not f.state.is_completed()}


def _with_threads(params: dict[str, Any], threads: Optional[int]) -> dict[str, Any]:
    return {**params, "sweep": {**params["sweep"], "threads": threads}} if threads else params


def run_on_pool(jobs: list[Job], parameters: Callable[[Job, int], dict[str, Any]], *, window: int,
                poll_s: float = 5.0) -> dict[str, str]:
    """Run ``jobs`` as flow runs of the variant deployment, at most ``window`` submitted and not finished at once.

    A flow run that ends in any other state than Completed (Failed, Crashed: its worker died, Cancelled) is
    submitted once more. Results are not read from Prefect: they are in MLflow (:func:`gather`).

    Returns:
        ``{name: why}`` for the jobs that did not complete on their last attempt.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    queue, active, failures = [(job, 1) for job in jobs], {}, {}
    logger = get_run_logger()
    try:
        while queue or active:
            while queue and len(active) < window:
                job, attempt = queue.pop(0)
                params = parameters(job, attempt)
                run = run_deployment(DEPLOYMENT, parameters=params, timeout=0, flow_run_name=params["exp_name"],
                                     tags=["distill", f"sweep:{params['sweep']['id']}", f"variant:{job.name}"],
                                     job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}})
                active[run.id] = (job, attempt)
                logger.info("%s: flow run %s (attempt %d)", job.name, run.id, attempt)
            time.sleep(poll_s)
            with get_client(sync_client=True) as client:
                for run_id, (job, attempt) in list(active.items()):
                    state = client.read_flow_run(run_id).state
                    if state is None or not state.is_final():
                        continue
                    del active[run_id]
                    if state.is_completed():
                        continue
                    if attempt < ATTEMPTS:
                        logger.warning("%s: flow run %s ended %s (%s); submitted again", job.name, run_id,
                                       state.name, state.message)
                        queue.append((job, attempt + 1))
                    else:
                        failures[job.name] = f"{state.name}: {state.message or ''}".strip()
    except BaseException:
        _cancel(list(active))
        raise
    return failures


def check_deployment(pool: str) -> None:
    """The variant deployment exists and runs on ``pool``.

    Raises:
        SweepError: naming how to deploy it.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    how = (f"deploy it on that pool from the project: `DISTILL_PROJECT_DIR=$PWD prefect deploy --name variant "
           f"--pool {pool}` (README \"Sweeps\")")
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(DEPLOYMENT)
        except ObjectNotFound:
            raise SweepError(f"the Prefect server has no deployment {DEPLOYMENT}: {how}") from None
    if deployment.work_pool_name != pool:
        raise SweepError(f"the deployment {DEPLOYMENT} runs on work pool {deployment.work_pool_name!r}, not "
                         f"{pool!r}: {how}, or pass --pool {deployment.work_pool_name}")


def _cancel(run_ids: list[Any]) -> None:
    """Cancel the sweep's flow runs that have not finished: their workers stop them (Prefect's Cancelling state)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        for run_id in run_ids:
            try:
                client.set_flow_run_state(run_id, Cancelling(message="the sweep was stopped"), force=True)
            except Exception as err:  # noqa: BLE001 - cancel the others
                print(f"WARNING: could not cancel flow run {run_id}: {err}", flush=True)


def ensure_zombie_automation(after_s: int) -> None:
    """Prefect's documented recipe for zombie flow runs: one whose heartbeats stop (its worker or machine died) for
    ``after_s`` seconds is marked Crashed, so the sweep submits it again. Created once per Prefect server."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        Automation.read(name=ZOMBIE_AUTOMATION)
        return
    except ValueError:
        pass
    ends = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    Automation(name=ZOMBIE_AUTOMATION, trigger=EventTrigger(
        after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *ends},
        match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
        for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1, within=timedelta(seconds=after_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {after_s} s: its worker or machine is gone")]).create()


# ------------------------------------------------------------------------- gathering
def sweep_parent_run(client: Any, experiment_id: str, root: Path, plan: Plan) -> str:
    """The sweep's MLflow parent run (the same one when the sweep is submitted again)."""
    from distill.tracking import create_pipeline_run

    found = client.search_runs([experiment_id], filter_string=(
        f"tags.`{SWEEP_TAG}` = '{plan.sweep_id}' and tags.`distill.role` = 'sweep'"), max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    return create_pipeline_run(client, experiment_id, root, run_name=plan.sweep_id, tags={
        "distill.role": "sweep", SWEEP_TAG: plan.sweep_id, "distill.grid": json.dumps(plan.configs),
        "distill.seeds": json.dumps(plan.seeds)})


def gather(client: Any, experiment_id: str, plan: Plan) -> dict[str, dict[str, Any]]:
    """The finished variants of the sweep, from MLflow: ``{variant: {"config", "seed", "val": {...}, "run_id"}}``."""
    names = {v.name: v for v in plan.variants}
    found: dict[str, dict[str, Any]] = {}
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.`{SWEEP_TAG}` = '{plan.sweep_id}' and tags.`distill.role` = 'pipeline' "
        "and attributes.status = 'FINISHED'"), max_results=5000)
    for run in runs:
        variant = names.get(run.data.tags.get(VARIANT_TAG, ""))
        val = {k.split(".", 1)[1]: v for k, v in run.data.metrics.items() if k.startswith("val.")}
        if variant is not None and "student" in val and variant.name not in found:
            found[variant.name] = {"config": variant.config, "seed": variant.seed, "val": val,
                                   "run_id": run.info.run_id, "experiment": run.data.tags.get("dvc_exp_name", "")}
    return found


def rank(plan: Plan, found: dict[str, dict[str, Any]], failures: dict[str, str]) -> list[dict[str, Any]]:
    """The grid points, best first by the student's mean validation accuracy over their finished seeds."""
    from distill.stats import aggregate_runs

    rows = []
    for grid_point in plan.configs:
        config = " ".join(grid_point)
        runs = {v.seed: found[v.name]["val"] for v in plan.variants if v.config == config and v.name in found}
        agg = aggregate_runs(list(runs.values())) if runs else {}
        rows.append({"config": config, "overrides": [*plan.base, *grid_point], "seeds": sorted(runs),
                     **{m: agg[m] for m in ("student", "baseline", "gain") if m in agg},
                     "failed": {v.name: failures[v.name] for v in plan.variants
                                if v.config == config and v.name in failures},
                     "missing": [v.name for v in plan.variants
                                 if v.config == config and v.name not in found and v.name not in failures]})
    rows.sort(key=lambda r: -(r["student"]["mean"] if "student" in r else float("-inf")))
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


def _cell(stat: Optional[dict[str, Any]], signed: bool = False) -> str:
    if not stat:
        return "-"
    low, high = stat.get("ci95") or [float("nan")] * 2
    sign = "+" if signed else ""
    interval = "" if low != low else f" [{100 * low:{sign}.2f}, {100 * high:{sign}.2f}]"
    return f"{100 * stat['mean']:{sign}.2f}{interval}"


def write_report(out_dir: Path, plan: Plan, rows: list[dict[str, Any]]) -> str:
    """``sweep.md``, ``sweep.json`` and ``figures/sweep_val.png`` in ``out_dir``; returns the Markdown."""
    from distill.io import atomic_write_json, atomic_write_text

    lines = [f"# Sweep {plan.sweep_id}: {len(plan.configs)} grid points x {len(plan.seeds)} seeds "
             f"({', '.join(map(str, plan.seeds))})", "",
             "Ranked by the student's VALIDATION accuracy (metrics/student.json val_acc), mean and 95 % interval "
             "over seeds (Student's t); the test split is not read here: confirm the best on held-out seeds with "
             f"`python -m flows seeds --confirm` (seeds >= {CONFIRM_SEEDS}).", "",
             "| rank | variant | seeds | student val acc (%) | baseline val acc (%) | gain (points) |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['rank']} | {r['config'] or '(params.yaml)'} | {len(r['seeds'])}/{len(plan.seeds)} | "
                     f"{_cell(r.get('student'))} | {_cell(r.get('baseline'))} | {_cell(r.get('gain'), True)} |")
    failed = {n: why for r in rows for n, why in r["failed"].items()}
    missing = [n for r in rows for n in r["missing"]]
    if failed or missing:
        lines += ["", "Not in the ranking:"] + [f"- {n}: failed ({why})" for n, why in failed.items()] + [
            f"- {n}: not finished" for n in missing]
    lines += ["", f"MLflow: the runs with tag `{SWEEP_TAG}` = `{plan.sweep_id}` (search: "
              f"`tags.\"{SWEEP_TAG}\" = '{plan.sweep_id}'`), compare `val.student`, `val.baseline`, `val.gain`."]
    text = "\n".join(lines) + "\n"
    atomic_write_json(out_dir / "sweep.json", {"sweep": plan.sweep_id, "split": "validation", "seeds": plan.seeds,
                                               "ranking": rows})
    atomic_write_text(out_dir / "sweep.md", text)
    _plot(rows, out_dir / "figures" / "sweep_val.png")
    return text


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    """The student's validation accuracy per grid point, best on top, with its interval over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if "student" in r][::-1]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.4 * max(1, len(shown))))
    for i, r in enumerate(shown):
        mean, (low, high) = 100 * r["student"]["mean"], r["student"].get("ci95") or [float("nan")] * 2
        err = [[mean - 100 * low], [100 * high - mean]] if low == low else None
        ax.errorbar([mean], [i], xerr=err, fmt="o", color="C0", capsize=3)
    ax.set_yticks(range(len(shown)), [r["config"] or "(params.yaml)" for r in shown])
    ax.set_xlabel("student validation accuracy (%), mean and 95 % interval over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------- the flow
@flow(name="distill-sweep", log_prints=True, persist_result=False)
def sweep_flow(plan: Plan, project_root: str = ".", pool: Optional[str] = None, remote: Optional[str] = None,
               window: int = 50, jobs: int = 1) -> dict[str, Any]:
    """Run a sweep's shared stages, then its variants, here (the flow's task runner, ``jobs`` at once) or on
    ``pool``; report.

    Returns:
        ``{"sweep", "ranking", "failed", "ran"}``: ``ran`` the jobs this call started.
    """
    from distill.tracking import MlflowTracker, open_experiment, tracking_uri

    root = Path(project_root).resolve()
    with workspace_lock(root, flow_run_holder("distill-sweep"), shared=True):  # held already under the CLI
        client, experiment_id = open_experiment(root)
        parent = sweep_parent_run(client, experiment_id, root, plan)
        pending = [v for v in plan.variants if v.name not in gather(client, experiment_id, plan)]
        print(f"{plan.sweep_id}: {len(plan.variants)} variants, {len(plan.variants) - len(pending)} finished before, "
              f"{len(pending)} to run", flush=True)
        failures, ran = _run_all(plan, pending, lambda job, attempt: job.parameters(
            plan.sweep_id, parent, remote, attempt), pool=pool, window=window, jobs=jobs)
        found = gather(client, experiment_id, plan)
        rows = rank(plan, found, failures)
        text = write_report(root / "reports", plan, rows)
        best = next((r for r in rows if "student" in r), None)
        tracker = MlflowTracker(parent, uri=tracking_uri(root))
        if best:
            tracker.set_tags({"distill.best": best["config"]})
            tracker.log_metrics({"best.val.student": best["student"]["mean"]})
        tracker.terminate("FINISHED" if not failures else "FAILED")
    print(text)
    return {"sweep": plan.sweep_id, "ranking": rows, "failed": failures, "ran": ran, "variants": found}


def _run_all(plan: Plan, pending: list[Job], parameters: Callable[[Job, int], dict[str, Any]], *,
             pool: Optional[str], window: int, jobs: int = 1) -> tuple[dict[str, str], list[str]]:
    """The shared waves the pending variants need, then those variants whose shared runs all finished.

    One variant at a time here (``jobs`` 1, no pool): no shared runs. Nothing runs beside a variant, so none can race
    another to a stage: the first variant that needs a shared stage computes it, and the later ones find it in
    DVC's run-cache, with one DVC run fewer per shared run (each costs a temporary copy, its pre-flight, its
    commit and its Prefect and MLflow bookkeeping).
    """
    if pool:
        check_deployment(pool)
        ensure_zombie_automation(int(os.environ.get("DISTILL_SWEEP_ZOMBIE_S", 3 * HEARTBEAT_S)))
    serial = not pool and jobs == 1
    run = (lambda batch: run_on_pool(batch, parameters, window=window)) if pool else (
        lambda batch: run_here(batch, parameters, threads=_threads_each(min(jobs, len(batch)))))
    failures: dict[str, str] = {}
    ran: list[str] = []
    for wave in ([] if serial else plan.waves_for(pending)):
        ran += [j.name for j in wave]
        failures.update(run(wave))
    ready = [v for v in pending if not set(v.needs) & set(failures)]
    for v in pending:
        if v not in ready:
            failures[v.name] = f"its shared stages failed ({', '.join(sorted(set(v.needs) & set(failures)))})"
    ran += [v.name for v in ready]
    failures.update(run(ready) if ready else {})
    return failures, ran


def plan_from_cli(root: Path, sets: list[str], seeds: str, sweep_id: Optional[str] = None) -> Plan:
    """The plan of ``python -m flows sweep -S k=v1,v2 ... --seeds 100-104``: a key with one value is fixed (in
    every variant, not in their names), a key with several is an axis of the grid."""
    axes, base = [], []
    for item in sets:
        key, values = parse_axis(item)
        if len(values) == 1:
            base.append(f"{key}={values[0]}")
        else:
            axes.append((key, values))
    return make_plan(root, axes, parse_seeds(seeds), base, sweep_id)


def run_sweep(plan: Plan, *, project_root: str = ".", pool: Optional[str] = None, jobs: int = 1,
              remote: Optional[str] = None, window: int = 50) -> dict[str, Any]:
    """Run ``plan`` as the sweep flow, ``jobs`` variants at a time here, or on the work pool ``pool``."""
    from prefect.task_runners import ThreadPoolTaskRunner

    if jobs < 1 or window < 1:
        raise SweepError(f"--jobs and --window must be at least 1 (got {jobs} and {window})")
    if remote:
        check_remote(Path(project_root).resolve(), remote)
    runner = sweep_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=jobs),
                                     flow_run_name=plan.sweep_id)
    return runner(plan=plan, project_root=project_root, pool=pool, remote=remote, window=window, jobs=jobs)


def best_overrides(report: Path) -> list[str]:
    """The overrides of the best grid point of a sweep's ``sweep.json`` (what a confirmation runs).

    Raises:
        SweepError: no report, or no finished grid point in it.
    """
    try:
        rows = json.loads(report.read_text())["ranking"]
    except (OSError, ValueError, KeyError) as err:
        raise SweepError(f"cannot read the sweep report {report} ({err}): run `python -m flows sweep` first") from None
    best = next((r for r in rows if "student" in r), None)
    if best is None:
        raise SweepError(f"{report} ranks no finished variant: nothing to confirm")
    return list(best["overrides"])
