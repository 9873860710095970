"""What the recipe benchmarks share (imported as a sibling: ``python bench/<name>.py`` puts ``bench/`` first on
``sys.path``): the seed policy, running the pipeline's own stages in a folder (resumable), scoring the trained
models on a split, and the worker pool.

Seed policy (docs/benchmarks.md): seeds below :data:`HELD_OUT` are for choosing, on the validation split only;
seeds from :data:`HELD_OUT` on are for confirming a claim, once, on the test split.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

HELD_OUT = 1000  # seeds from here on are never used while choosing
SPLITS = ("val", "test")


def check_seeds(split: str, seeds: Sequence[int]) -> str | None:
    """The seed policy: an error message, or None when ``seeds`` may be used on ``split``."""
    if split == "val" and max(seeds) >= HELD_OUT:
        return (f"--split val is for choosing: seeds >= {HELD_OUT} are kept for the held-out confirmation "
                "(--split test); use screening seeds 100-999")
    if split == "test" and min(seeds) < HELD_OUT:
        return (f"--split test confirms a claim on held-out seeds (>= {HELD_OUT}); seeds below are for choosing "
                "(--split val)")
    return None


def machine(jobs: int, threads: int) -> str:
    import torch

    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{jobs} job(s) x {threads} torch thread(s), torch {torch.__version__}")


def run_stages(params: Any, workdir: Path, stages: Iterable[str]) -> dict[str, float]:
    """Run the pipeline's stages by name in ``workdir`` (the runner, the params ``dvc.yaml`` declares for each).

    Resumable: a stage that finished leaves ``<stage>.done`` and is not run again; a training stage that was
    interrupted resumes from its last finished epoch (the engine's state in ``workdir/.state``).

    Returns:
        Wall seconds of each stage run now (0 for one found done).
    """
    from distill.config import Paths
    from distill.stages.runner import run_stage

    paths = Paths(workdir)
    (workdir / "data" / "raw").mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    for stage in stages:
        done = workdir / f"{stage}.done"
        if done.is_file():
            times[stage] = 0.0
            continue
        t0 = time.perf_counter()
        run_stage(stage, params, paths, dvc_yaml=ROOT / "dvc.yaml")
        times[stage] = time.perf_counter() - t0
        done.write_text(f"{times[stage]:.1f} s\n")
    return times


def score(workdir: Path, split: str, models: Sequence[str] = ("teacher", "baseline", "student"),
          ece_bins: int = 15) -> dict[str, dict[str, float]]:
    """Top-1, ECE and NLL of each trained model in ``workdir`` on ``split`` (the eval view; a DeiT's eval output
    is the mean of its two heads), plus, for every DeiT with two heads, each head's top-1."""
    import torch
    from torch.utils.data import DataLoader

    from distill.augment import eval_augmenter
    from distill.config import Paths
    from distill.data import ArrayDataset, load_prepared
    from distill.evaluation import classification_metrics
    from distill.inference import predict
    from distill.models.deit import load_deit
    from distill.runtime import make_accelerator
    from distill.teachers import load_teacher

    paths = Paths(workdir)
    data = load_prepared(paths.data)
    meta = data.meta
    accelerator = make_accelerator()
    aug = eval_augmenter(meta.image_size, meta.mean, meta.std)
    loader = accelerator.prepare(DataLoader(ArrayDataset(data.split(split)), batch_size=512))
    out: dict[str, dict[str, float]] = {}
    for name in models:
        model, _ = (load_teacher if name == "teacher" else load_deit)(paths.model(name))
        model = model.to(accelerator.device).eval()
        with torch.no_grad():
            res = predict(_heads(model), loader, accelerator, aug)
        outputs = res["outputs"]
        logits = sum(outputs) / len(outputs)  # a distilled DeiT's eval output: the mean of its two heads
        m = classification_metrics(logits, res["labels"], n_bins=ece_bins)
        row = {k: m[k] for k in ("top1", "ece", "nll")}
        if len(outputs) == 2:
            row["top1_cls_head"], row["top1_dist_head"] = (float((o.argmax(-1) == res["labels"]).float().mean())
                                                           for o in outputs)
        out[name] = row
    return out


def _heads(model: Any) -> Callable[[Any], tuple]:
    """A forward that returns every head of a model separately: a DeiT's (cls, dist) or (cls,), else (logits,)."""
    if hasattr(model, "forward_heads"):
        return lambda x: tuple(h for h in model.forward_heads(x) if h is not None)
    return lambda x: (model(x),)


def gain_and_gap(scores: dict[str, dict[str, float]], student: str = "student", baseline: str = "baseline",
                 teacher: str = "teacher") -> dict[str, float]:
    """The paired differences of one seed: distillation gain (student - baseline) and gap (teacher - student)."""
    return {"distillation_gain": scores[student]["top1"] - scores[baseline]["top1"],
            "gap_to_teacher": scores[teacher]["top1"] - scores[student]["top1"]}


def _die_with_parent() -> None:
    """In a worker, before it runs: Linux sends it SIGTERM when the benchmark that started it dies, however it dies
    (a resumed benchmark must not race an orphan over the same folder). Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def _init_worker(threads: int, die_with_parent: bool = True) -> None:
    if die_with_parent:
        _die_with_parent()
    os.environ.setdefault("DISTILL_PROGRESS", "0")
    import torch

    torch.set_num_threads(threads)


def run_jobs(fn: Callable[..., Any], jobs: list[tuple], *, workers: int, threads: int,
             on_result: Callable[[tuple, Any], None]) -> None:
    """``fn(*job)`` for every job, ``workers`` at a time, calling ``on_result(job, result)`` as each finishes. A
    failure stops the benchmark (its finished jobs are kept).

    One worker: in this process. More: a Prefect flow run (``bench-<script>``) whose task runs are the jobs, on
    Prefect's ``ProcessPoolTaskRunner`` (fresh spawned interpreters, each set up by :func:`_init_worker`: torch
    threads, and the end of the worker when the benchmark dies), so a benchmark's jobs show in the Prefect UI like
    the pipeline's stages. Without ``PREFECT_API_URL`` Prefect starts a temporary server for the run.
    """
    if workers <= 1:
        _init_worker(threads, die_with_parent=False)
        for job in jobs:
            on_result(job, fn(*job))
        return
    # Prefect's temporary server otherwise tries to send telemetry, which this offline machine logs as errors
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.futures import as_completed
    from prefect.task_runners import ProcessPoolTaskRunner

    job_task = task(fn, name=fn.__name__, persist_result=False, cache_policy=NO_CACHE)
    runner = ProcessPoolTaskRunner(max_workers=workers, initializer=_init_worker, initargs=(threads,))

    @flow(name=f"bench-{Path(sys.argv[0]).stem}", task_runner=runner, persist_result=False, log_prints=True)
    def bench_flow() -> None:
        futures = {job_task.submit(*job): job for job in jobs}
        for fut in as_completed(list(futures)):
            on_result(futures[fut], fut.result())

    bench_flow()


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically (a benchmark killed while writing keeps the previous file)."""
    from distill.io import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), json.dumps(data, indent=1, default=str) + "\n")
