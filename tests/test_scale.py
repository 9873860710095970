"""Scale-out (docs/scaling.md): several processes, mixed precision, a real MLflow server, a DVC remote.

The multi-process tests run real ``accelerate launch`` groups of 2 processes on this CPU-only machine
(torchrun + gloo, one thread each). The stage runs are tiny (digits, 1-2 epochs, 2 soft-label views);
they check the plumbing and the arithmetic, not accuracy.

Tolerances, and why:

* Student, 2 processes x batch B vs 1 process x batch B x ``grad_accum: 2``: the same 2B images
  make each optimizer step (accelerate hands batch ``2s`` to rank 0 and ``2s+1`` to rank 1; one process
  accumulates the same two batches; B is chosen to give an even number of batches per epoch),
  ``scale_lr`` gives both the same learning rate (x2), the stored
  views depend on the image and epoch only, and DropPath is off. So the two runs are the same
  computation up to floating-point summation order (DDP's all-reduce vs accumulation). Measured: bit
  identical weights and metrics. Allowed: weights within 1e-4, ``val_loss`` within 1e-3, ``val_acc``
  within one validation image. ``train_loss`` within 0.05: without the reduction across processes in
  ``fit`` the main process logs the mean of its own batches only (half the data).
* Soft labels, 2 shards vs 1: view parameters are a function of (seed, image, view): exactly equal.
  Logits go through the same teacher with other batch boundaries, then fp16: equal within 2 fp16
  steps (relative 2e-3, absolute 2e-3 for logits near 0).
* bf16 autocast vs float32 teacher logits: within bf16's precision (8 significant bits).

The exact student comparison needs what makes any two runs comparable: the initial weights seeded
(``build_model(..., seed=params.seed)``) and the same thread count on both sides (``OMP_NUM_THREADS=1``).
What the teacher and the baseline draw per step (random crops, seeded by step *and process*) differs
between 1 and 2 processes, so their 2-process runs are equivalent in distribution, not in value; the
student test is the exact check of the multi-process arithmetic.

Two "machines" on this host (docs/scaling.md section 3): the student stage started twice at once with
``DISTILL_LAUNCH_ARGS="--num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1 ..."``, one process each,
gets the same weights as one machine with 2 processes (the same ranks, the same batches: within 1e-4).

Also here: the launch that ``python -m flows stage`` (what ``dvc.yaml`` runs) does when the environment
asks for several processes, bf16 autocast and ``torch.compile`` through accelerate on the CPU, a real
``mlflow server`` (SQLite + proxied artifacts), and a DVC local remote round trip.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from flows.prefect_api import healthy

from helpers import describe, free_port, set_param, stop_process_group

# Two single-threaded processes on a shared 2-core machine; torchrun's port chosen by accelerate.
GROUP_ENV = {"OMP_NUM_THREADS": "1", "DISTILL_PROGRESS": "0"}

# Loaded at start-up of every Python process of a run (``PYTHONPATH``): records each file the process
# opens for writing, renames onto or deletes under DISTILL_AUDIT_ROOT, with its RANK ("-": not launched).
# Python-level file operations only: the native writers of torch.save and safetensors are not seen, but
# every output of a stage is renamed into place (atomic writes), and renames are.
AUDIT_HOOK = r'''
import os, sys
_root = os.environ.get("DISTILL_AUDIT_ROOT")
if _root:
    _fd = os.open(os.path.join(os.environ["DISTILL_AUDIT_DIR"], f"writes-{os.getpid()}.tsv"),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    _rank = os.environ.get("RANK", "-")
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    os.write(_fd, f"{_rank}\tstarted\t\n".encode())

    def _note(op, path):
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            return
        path = os.path.abspath(path)
        if path.startswith(_root + os.sep) and "__pycache__" not in path:
            os.write(_fd, f"{_rank}\t{op}\t{os.path.relpath(path, _root)}\n".encode())

    def _hook(event, args):
        if event == "open" and isinstance(args[2], int) and args[2] & _WRITE:
            _note("write", args[0])
        elif event == "os.rename":
            _note("rename", args[1])
        elif event in ("os.remove", "os.rmdir") and args[1] is None or event == "shutil.rmtree":
            _note("delete", args[0])  # (rmtree's own removals are relative to a dir_fd: its event names the tree)

    sys.addaudithook(_hook)
'''


def _audit_env(tmp_path: Path, project: Path) -> tuple[dict[str, str], Path]:
    hook_dir, log_dir = tmp_path / "hook", tmp_path / "writes"
    hook_dir.mkdir()
    log_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(AUDIT_HOOK)
    return {"PYTHONPATH": str(hook_dir), "DISTILL_AUDIT_ROOT": str(project.resolve()),
            "DISTILL_AUDIT_DIR": str(log_dir)}, log_dir


def _writes_by_rank(log_dir: Path) -> dict[str, set[str]]:
    """Paths written by the processes of each rank; every process that started has its rank listed."""
    out: dict[str, set[str]] = {}
    for f in log_dir.glob("writes-*.tsv"):
        for line in f.read_text().splitlines():
            rank, op, path = line.split("\t")
            paths = out.setdefault(rank, set())
            if op != "started":
                paths.add(path)
    return out


def _sha256_tree(root: Path, *rels: str) -> dict[str, str]:
    files: dict[str, str] = {}
    for rel in rels:
        base = root / rel
        for f in sorted([base] if base.is_file() else base.rglob("*")):
            if f.is_file():
                files[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return files


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if wa[k].numel())


@pytest.fixture(scope="module")
def scale_project(tiny_project: Path, tmp_path_factory: pytest.TempPathFactory, run_cmd) -> Path:
    """A clone of the tiny project with data, a 1-epoch teacher and a 1-process soft-label store."""
    project = tmp_path_factory.mktemp("scale") / "project"
    run_cmd(["git", "clone", "-q", str(tiny_project), str(project)], tiny_project.parent)
    for dotted, value in {"teacher.train.epochs": 1, "teacher.train.warmup_epochs": 0,
                          "student.model.drop_path_rate": 0.0}.items():
        set_param(project, dotted, value)
    # Committed by content: a same-size rewrite within the clone's second passes git's stat check as unchanged.
    run_cmd(["git", "rm", "-q", "--cached", "params.yaml"], project)
    run_cmd(["git", "add", "params.yaml"], project)
    run_cmd(["git", "commit", "-q", "-m", "scale-out test params"], project)
    script = ("from flows.stage import run_tracked\n"
              "for s in ('data', 'teacher', 'soft_labels'): run_tracked(s, track=False)")
    run_cmd([sys.executable, "-c", script], project, env=GROUP_ENV, timeout=300)
    return project


@pytest.mark.slow
def test_two_processes_train_the_student_like_one_process_accumulating_two_batches(scale_project, run_cmd, tmp_path):
    project = scale_project
    # An even number of full batches per epoch. With an odd number, accelerate fills the last step of the
    # second process with images from the start of the epoch (even_batches) and one process takes a half step.
    n_train = _read_json(project / "metrics" / "data.json")["num_train"]
    set_param(project, "student.train.batch_size", next(b for b in range(64, 7, -1) if (n_train // b) % 2 == 0))
    set_param(project, "student.train.grad_accum", 2)
    one = run_cmd([sys.executable, "-m", "flows", "stage", "student", "--no-prefect"], project, env=GROUP_ENV,
                  timeout=300)
    ref_model, ref = tmp_path / "student-1proc.safetensors", _read_json(project / "metrics" / "student.json")
    ref_model.write_bytes((project / "models" / "student.safetensors").read_bytes())

    set_param(project, "student.train.grad_accum", 1)
    audit, log_dir = _audit_env(tmp_path, project)
    t0 = time.monotonic()
    two = run_cmd([sys.executable, "-m", "flows", "stage", "student", "--no-prefect"], project, timeout=300,
                  env={**GROUP_ENV, **audit, "DISTILL_NUM_PROCESSES": "2"})
    elapsed = time.monotonic() - t0
    got = _read_json(project / "metrics" / "student.json")

    # It went through accelerate launch, as a group of 2, and only the main process said it was done.
    assert "launching 2 process(es)" in two.stderr and "--multi_gpu" in two.stderr, describe(two)
    out = two.stdout + two.stderr
    assert out.count("[student] done") == 1 == (one.stdout + one.stderr).count("[student] done"), describe(two)

    # Only the main process wrote outputs; rank 1 at most its own part of the resume state.
    writes = _writes_by_rank(log_dir)
    assert {"models/student.safetensors", "metrics/student.json", "plots/student.csv"} <= writes["0"], writes
    assert all(p.startswith(".state/student/") for p in writes["1"]), writes
    assert not writes["-"], f"the launchers wrote {writes['-']}"

    num_val = _read_json(project / "metrics" / "data.json")["num_val"]
    diff = {"weights_max_abs": _max_weight_diff(ref_model, project / "models" / "student.safetensors"),
            **{k: abs(got[k] - ref[k]) for k in ("val_acc", "val_loss", "train_loss")}}
    print(f"\n1 vs 2 processes (student, {elapsed:.0f} s for the 2-process run): {diff}")
    assert got["epochs"] == ref["epochs"] == 2
    assert diff["weights_max_abs"] <= 1e-4, diff
    assert diff["val_loss"] <= 1e-3, diff
    assert diff["val_acc"] <= 1 / num_val + 1e-9, diff
    assert diff["train_loss"] <= 0.05, diff


def _even_batches(project: Path) -> None:
    """A batch size giving an even number of full batches per epoch (see the test above)."""
    n_train = _read_json(project / "metrics" / "data.json")["num_train"]
    set_param(project, "student.train.batch_size", next(b for b in range(64, 7, -1) if (n_train // b) % 2 == 0))
    set_param(project, "student.train.grad_accum", 1)


@pytest.mark.slow
def test_two_machines_train_the_student_like_one_machine_with_two_processes(scale_project, run_cmd, sub_env,
                                                                           tmp_path):
    """docs/scaling.md section 3 on one host: ``accelerate launch --num_machines 2 --machine_rank 0/1`` over gloo,
    one process per "machine", the same stage command on both at once; machine 1 runs bare (``--no-prefect``)."""
    project = scale_project
    _even_batches(project)
    run_cmd([sys.executable, "-m", "flows", "stage", "student", "--no-prefect"], project, timeout=300,
            env={**GROUP_ENV, "DISTILL_NUM_PROCESSES": "2"})
    ref_model = tmp_path / "student-1machine.safetensors"
    ref_model.write_bytes((project / "models" / "student.safetensors").read_bytes())
    (project / "models" / "student.safetensors").unlink()

    port = free_port()
    machines = []
    for rank in (0, 1):
        env = {**GROUP_ENV, "DISTILL_NUM_PROCESSES": "2", "DISTILL_LAUNCH_ARGS": (
            f"--num_machines 2 --machine_rank {rank} --main_process_ip 127.0.0.1 --main_process_port {port}")}
        log = open(tmp_path / f"machine-{rank}.log", "w")  # noqa: SIM115 - closed below
        machines.append((subprocess.Popen([sys.executable, "-m", "flows", "stage", "student", "--no-prefect"],
                                          cwd=project, env={**sub_env, **env}, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True), log))
    try:
        codes = [proc.wait(timeout=300) for proc, _ in machines]
    finally:
        for proc, log in machines:
            stop_process_group(proc)
            log.close()
    logs = [(tmp_path / f"machine-{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], "\n---\n".join(logs)
    assert all("--num_machines 2" in text for text in logs), logs  # each went through accelerate launch
    assert logs[0].count("[student] done") == 1 and "[student] done" not in logs[1], logs  # machine 0 writes
    diff = _max_weight_diff(ref_model, project / "models" / "student.safetensors")
    print(f"\n1 machine x 2 processes vs 2 machines x 1 process (student): max |dw| = {diff:.2e}")
    assert diff <= 1e-4, diff


@pytest.mark.slow
def test_two_processes_write_one_sharded_store_equal_to_the_one_process_store(scale_project, run_cmd, tmp_path):
    from distill.store import SoftLabelStore

    project = scale_project
    single = tmp_path / "store-1proc"
    (project / "soft_labels").rename(single)
    audit, log_dir = _audit_env(tmp_path, project)
    # Plain `accelerate launch`, as a user types it (ACCELERATE_USE_CPU: a gloo group on a machine without GPUs).
    run_cmd([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--main_process_port", "0", "-m", "flows", "stage", "soft_labels", "--no-prefect"], project, timeout=300,
            env={**GROUP_ENV, **audit, "ACCELERATE_USE_CPU": "1"})

    a = SoftLabelStore.open(single, verify_hashes=True)
    expect = {k: v for k, v in a.meta.to_dict().items() if k not in ("shards", "runtime")}
    b = SoftLabelStore.open(project / "soft_labels", expect=expect, verify_hashes=True)  # every metadata check
    n = a.num_images
    assert [(s["start"], s["stop"]) for s in b.meta.shards] == [(0, n // 2), (n // 2, n)]
    assert b.meta.runtime["processes"] == 2 and a.meta.runtime["processes"] == 1

    idx = np.repeat(np.arange(n), a.views)
    views = np.tile(np.arange(a.views), n)
    assert torch.equal(a.params(idx, views), b.params(idx, views))
    la, lb = a.logits(idx, views), b.logits(idx, views)
    print(f"\n1 vs 2 processes (soft labels): max |logit diff| {float((la - lb).abs().max()):.3g} "
          f"over {la.numel()} logits")
    torch.testing.assert_close(lb, la, rtol=2e-3, atol=2e-3)

    writes = _writes_by_rank(log_dir)
    assert writes["1"] and all(Path(p).name.lstrip(".").startswith("shard-00001.") for p in writes["1"]), writes
    assert any(Path(p).name == "meta.json" for p in writes["0"]), writes


# ------------------------------------------------------------------ the launch from `python -m flows stage`
@pytest.fixture
def no_accelerate_config(monkeypatch, tmp_path):
    """As on a machine where `accelerate config` never ran."""
    import accelerate.commands.config as config

    monkeypatch.setattr(config, "default_config_file", str(tmp_path / "none.yaml"))


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"DISTILL_NUM_PROCESSES": "1"}, None),
    ({"DISTILL_NUM_PROCESSES": "4"}, (4, [])),
    ({"DISTILL_LAUNCH_ARGS": "--config_file 'my fsdp.yaml'"}, (None, ["--config_file", "my fsdp.yaml"])),
    ({"DISTILL_NUM_PROCESSES": "4", "RANK": "1", "LOCAL_RANK": "1"}, None),  # already a launched rank
    ({"DISTILL_NUM_PROCESSES": "4", "DISTILL_LAUNCHED": "1"}, None),  # a group that accelerate started as one process
])
def test_launch_request_comes_from_the_environment(environ, expected, no_accelerate_config):
    from flows.launch import launch_request

    request = launch_request(environ)
    assert (request if request is None else (request.processes, request.extra)) == expected


@pytest.mark.parametrize("value", ["two", "0", "-1"])
def test_a_bad_process_count_is_an_error_naming_the_variable(value, no_accelerate_config):
    from flows.launch import LaunchError, launch_request

    with pytest.raises(LaunchError, match="DISTILL_NUM_PROCESSES"):
        launch_request({"DISTILL_NUM_PROCESSES": value})


def _accelerate_config(path: Path, **settings) -> Path:
    """An accelerate config file as ``accelerate config`` writes it for this machine."""
    base = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "NO", "num_processes": 1, "num_machines": 1,
            "machine_rank": 0, "mixed_precision": "no", "use_cpu": False, "gpu_ids": "all", "debug": False}
    path.write_text(yaml.safe_dump({**base, **settings}))
    return path


def test_the_machines_accelerate_config_file_is_followed_and_the_environment_overrides_it(tmp_path, monkeypatch):
    import accelerate.commands.config as config

    from flows.launch import launch_command, launch_request

    cfg = _accelerate_config(tmp_path / "default_config.yaml", distributed_type="MULTI_CPU", num_processes=2,
                             mixed_precision="bf16")
    monkeypatch.setattr(config, "default_config_file", str(cfg))
    request = launch_request({})
    assert request is not None and request.config == cfg and request.settings["num_processes"] == 2
    cmd = launch_command(["stage", "teacher"], request, {})
    # several CPU processes, which accelerate's own launcher would run as one: a torchrun group on the CPU
    assert cmd[3:-4] == ["--config_file", str(cfg), "--multi_gpu", "--main_process_port", "0"]
    cmd = launch_command(["stage", "teacher"], launch_request({"DISTILL_NUM_PROCESSES": "3"}),
                         {"ACCELERATE_MIXED_PRECISION": "no"})
    assert cmd[3:-4] == ["--config_file", str(cfg), "--num_processes", "3", "--multi_gpu", "--main_process_port", "0",
                         "--mixed_precision", "no"]
    gpus = _accelerate_config(tmp_path / "gpus.yaml", distributed_type="MULTI_GPU", num_processes=8)
    cmd = launch_command(["stage", "teacher"], launch_request({"ACCELERATE_CONFIG_FILE": str(gpus)}), {})
    assert cmd[3:-4] == ["--config_file", str(gpus), "--main_process_port", "0"]  # the file's launcher decides
    with pytest.raises(Exception, match="does not exist"):
        launch_request({"ACCELERATE_CONFIG_FILE": str(tmp_path / "none.yaml")})


def test_launch_command_uses_torchrun_a_free_port_and_the_environment_precision(no_accelerate_config):
    from flows.launch import launch_command, launch_request

    cmd = launch_command(["stage", "teacher"], launch_request({"DISTILL_NUM_PROCESSES": "2"}),
                         {"ACCELERATE_MIXED_PRECISION": "BF16"})
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[-4:] == ["-m", "flows", "stage", "teacher"]
    assert " ".join(cmd[3:-4]) == "--num_processes 2 --multi_gpu --main_process_port 0 --mixed_precision bf16"


def test_launch_command_leaves_launcher_and_port_to_a_config_or_multi_machine_flags(no_accelerate_config):
    from flows.launch import Launch, launch_command

    cmd = launch_command(["stage", "student"], Launch(processes=8, extra=["--config_file", "fsdp.yaml"]), {})
    assert "--multi_gpu" not in cmd and "--main_process_port" not in cmd and "--num_processes" in cmd
    nodes = ["--multi_gpu", "--num_machines", "2", "--machine_rank", "0", "--main_process_ip", "10.0.0.1",
             "--main_process_port", "29500"]
    cmd = launch_command(["stage", "student"], Launch(processes=16, extra=nodes), {})
    assert cmd.count("--multi_gpu") == 1 and cmd.count("--main_process_port") == 1
    assert cmd[3:-4] == ["--num_processes", "16", *nodes]


def test_a_failed_group_is_launched_once_more_and_its_status_returned(monkeypatch, no_accelerate_config):
    import flows.launch as launch

    calls = []
    monkeypatch.setattr(launch.subprocess, "call", lambda cmd, env: calls.append(env) or 3)
    assert launch.launch(["stage", "teacher"], launch.Launch(processes=2), retries=1) == 3
    assert len(calls) == 2 and calls[0]["DISTILL_LAUNCHED"] == "1" and calls[0]["DISTILL_EXPECT_PROCESSES"] == "2"


def test_a_launched_group_smaller_than_asked_for_is_an_error():
    from flows.launch import LaunchError, check_launched_group

    check_launched_group({"DISTILL_EXPECT_PROCESSES": "2", "WORLD_SIZE": "2"})
    check_launched_group({})
    with pytest.raises(LaunchError, match="group of 1"):
        check_launched_group({"DISTILL_EXPECT_PROCESSES": "2"})


@pytest.mark.slow
def test_an_accelerate_config_file_with_two_processes_runs_a_stage_on_two_cpu_processes(scale_project, run_cmd,
                                                                                        tmp_path):
    """`accelerate config` on a CPU machine: 2 processes, bf16. The stage follows it; the environment overrides it."""
    from distill.store import SoftLabelStore

    project = scale_project
    hf_home = tmp_path / "hf"
    (hf_home / "accelerate").mkdir(parents=True)
    _accelerate_config(hf_home / "accelerate" / "default_config.yaml", distributed_type="MULTI_CPU",
                       num_processes=2, mixed_precision="bf16", use_cpu=True)
    audit, log_dir = _audit_env(tmp_path, project)
    proc = run_cmd([sys.executable, "-m", "flows", "stage", "soft_labels", "--no-prefect"], project, timeout=300,
                   env={**GROUP_ENV, **audit, "HF_HOME": str(hf_home)})
    assert "launching 2 process(es)" in proc.stderr, describe(proc)
    runtime = SoftLabelStore.open(project / "soft_labels").meta.runtime
    assert (runtime["processes"], runtime["mixed_precision"]) == (2, "bf16"), runtime
    writes = _writes_by_rank(log_dir)
    assert set(writes) >= {"0", "1"}, writes  # two ranks ran: each wrote its own shard

    run_cmd([sys.executable, "-m", "flows", "stage", "soft_labels", "--no-prefect"], project, timeout=300,
            env={**GROUP_ENV, "HF_HOME": str(hf_home), "ACCELERATE_MIXED_PRECISION": "no"})
    runtime = SoftLabelStore.open(project / "soft_labels").meta.runtime
    assert (runtime["processes"], runtime["mixed_precision"]) == (2, "no"), runtime


# ------------------------------------------------------------------------- mixed precision, torch.compile
class _OutputDtypes:
    """Records the dtype of every output of ``module`` (forward hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seen: set[torch.dtype] = set()
        module.register_forward_hook(lambda _m, _i, out: self.seen.add(out.dtype))


@pytest.fixture
def fresh_accelerate(monkeypatch):
    """Run with accelerate's process-wide state rebuilt from this test's environment, then reset."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield monkeypatch
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_trains_teacher_and_student_and_generates_soft_labels(fresh_accelerate, tmp_path):
    from distill.augment import Augmenter, AugmentSpec
    from distill.data import Split
    from distill.engine import SupervisedTask, fit
    from distill.losses import DistillationLoss
    from distill.runtime import make_accelerator
    from distill.store import SoftLabelStore, StoredViews, StoreSpec, generate_store
    from distill.views import RandomViews

    from test_engine import PARAMS, Blobs, _deit, _teacher

    fresh_accelerate.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    acc = make_accelerator()
    assert acc.mixed_precision == "bf16"
    blobs = Blobs(n=32)
    aug = Augmenter(spec=AugmentSpec(), out_size=16, mean=[0.3], std=[0.3])
    params = PARAMS.model_copy(update={"epochs": 1, "warmup_epochs": 0})

    teacher = _teacher()
    teacher_dtypes = _OutputDtypes(teacher.fc)
    task = SupervisedTask(model=teacher, augmenter=aug, criterion=DistillationLoss(mode="none"), views=RandomViews(aug))
    res = fit(task, train_set=blobs, val_set=None, params=params, seed=0, accelerator=acc)
    assert torch.bfloat16 in teacher_dtypes.seen and np.isfinite(res.history[-1]["train_loss"])

    split = Split(images=blobs.images.numpy(), labels=blobs.labels.numpy(), ids=np.arange(len(blobs)))
    meta = generate_store(res.model, split, aug, out_dir=tmp_path / "sl", spec=StoreSpec(views=2, batch_size=16),
                          teacher_sha256="t" * 64, data_fingerprint="d" * 64, accelerator=acc)
    assert meta.runtime["mixed_precision"] == "bf16"
    store = SoftLabelStore.open(tmp_path / "sl")
    idx, views = np.arange(len(blobs)), np.zeros(len(blobs), dtype=np.int64)
    with torch.no_grad():  # the same views in float32
        fp32 = res.model.eval()(aug(blobs.images, store.params(idx, views))).float()
    torch.testing.assert_close(store.logits(idx, views), fp32, rtol=3e-2, atol=3e-2)

    student = _deit()
    student_dtypes = _OutputDtypes(student.head_dist)
    task = SupervisedTask(model=student, augmenter=aug, criterion=DistillationLoss(mode="soft", tau=2.0),
                          views=StoredViews(store, seed=0))
    res = fit(task, train_set=blobs, val_set=blobs, params=params, seed=0, accelerator=acc)
    assert torch.bfloat16 in student_dtypes.seen and np.isfinite(res.history[-1]["train_loss"])


def test_torch_compile_through_accelerate_keeps_checkpoints_and_soft_labels_plain(fresh_accelerate, tmp_path):
    """accelerate's dynamo backend (``--dynamo_backend``) compiles the trained models and the soft-label teacher.

    The ``eager`` backend runs dynamo's capture without a C++ compiler (inductor, the GPU choice, needs one).
    """
    from distill.augment import Augmenter, AugmentSpec
    from distill.checkpoint import save_model
    from distill.data import Split
    from distill.engine import SupervisedTask, fit
    from distill.losses import DistillationLoss
    from distill.runtime import make_accelerator
    from distill.store import SoftLabelStore, StoreSpec, generate_store
    from distill.teachers import load_teacher
    from distill.views import RandomViews

    from test_engine import PARAMS, Blobs, _teacher

    fresh_accelerate.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")
    acc = make_accelerator()
    blobs = Blobs(n=32)
    aug = Augmenter(spec=AugmentSpec(), out_size=16, mean=[0.3], std=[0.3])
    cfg = {"arch": "resnet_small", "num_classes": 4, "in_chans": 1, "width": 4, "blocks": 1}
    task = SupervisedTask(model=_teacher(), augmenter=aug, criterion=DistillationLoss(mode="none"),
                          views=RandomViews(aug))
    res = fit(task, train_set=blobs, val_set=None, params=PARAMS.model_copy(update={"epochs": 1, "warmup_epochs": 0}),
              seed=0, accelerator=acc)
    assert not any(k.startswith("_orig_mod.") for k in res.model.state_dict()), "fit returned the compiled wrapper"
    save_model(tmp_path / "t.safetensors", res.model, kind="teacher", config=cfg)
    teacher, _ = load_teacher(tmp_path / "t.safetensors")

    split = Split(images=blobs.images.numpy(), labels=blobs.labels.numpy(), ids=np.arange(len(blobs)))
    kw = {"spec": StoreSpec(views=2, batch_size=16), "teacher_sha256": "t" * 64, "data_fingerprint": "d" * 64}
    meta = generate_store(teacher, split, aug, out_dir=tmp_path / "compiled", accelerator=acc, **kw)
    generate_store(teacher, split, aug, out_dir=tmp_path / "plain", **kw)
    assert meta.runtime["dynamo_backend"] == "eager"
    compiled, plain = SoftLabelStore.open(tmp_path / "compiled"), SoftLabelStore.open(tmp_path / "plain")
    idx = np.repeat(np.arange(len(blobs)), 2)
    views = np.tile(np.arange(2), len(blobs))
    torch.testing.assert_close(compiled.logits(idx, views), plain.logits(idx, views), rtol=2e-3, atol=2e-3)


@pytest.fixture
def mlflow_server(base_env, tmp_path):
    """A real ``mlflow server``: SQLite backend store, proxied artifact root; yields (uri, artifacts folder)."""
    port, artifacts = free_port(), tmp_path / "mlflow-artifacts"
    uri = f"http://127.0.0.1:{port}"
    log = tmp_path / "mlflow-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                                 "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1"], env=base_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not healthy(uri):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield uri, artifacts
    finally:
        stop_process_group(proc)


@pytest.mark.slow
def test_a_two_process_stage_tracks_once_into_a_real_mlflow_server(scale_project, run_cmd, mlflow_server):
    """The whole route: dvc repro -> `python -m flows stage baseline` -> accelerate launch -> Prefect -> MLflow."""
    from mlflow import MlflowClient

    uri, artifacts = mlflow_server
    proc = run_cmd(["dvc", "repro", "--single-item", "baseline"], scale_project, timeout=400,
                   env={**GROUP_ENV, "DISTILL_NUM_PROCESSES": "2", "MLFLOW_TRACKING_URI": uri})
    assert "launching 2 process(es)" in proc.stderr + proc.stdout, describe(proc)

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("distill")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`distill.stage` = 'baseline'")
    assert len(runs) == 1, "one MLflow run per stage execution, from the main process only"
    run = runs[0]
    assert run.info.status == "FINISHED"
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])  # found through the launch: the dvc execution's
    assert parent.data.tags.get("distill.pipeline_key"), parent.data.tags
    history = client.get_metric_history(run.info.run_id, "val_acc")
    metrics = _read_json(scale_project / "metrics" / "baseline.json")
    # the baseline's epochs are the student's, each as many steps as the student's on 2 processes (budget: steps)
    from distill.data import load_prepared
    from distill.engine import steps_per_epoch

    p = yaml.safe_load((scale_project / "params.yaml").read_text())["student"]["train"]
    data = load_prepared(scale_project / "data" / "prepared")
    per_epoch = steps_per_epoch(len(data.train) + len(data.unlabeled), p["batch_size"], processes=2,
                                grad_accum=p["grad_accum"])
    assert metrics["epochs"] == p["epochs"] and metrics["steps"] == p["epochs"] * per_epoch
    assert sorted(m.step for m in history) == list(range(1, metrics["epochs"] + 1)), "each epoch logged once"
    assert run.data.metrics["final_val_acc"] == pytest.approx(metrics["val_acc"])
    # Artifacts went through the server into its artifact root.
    assert [a.path for a in client.list_artifacts(run.info.run_id, "params")] == ["params/params.yaml"]
    stored = list(artifacts.rglob("params.yaml"))
    assert len(stored) == 1 and stored[0].read_bytes() == (scale_project / "params.yaml").read_bytes()


@pytest.mark.slow
def test_checkpoints_and_soft_labels_round_trip_a_dvc_remote_byte_identical(scale_project, run_cmd, tmp_path):
    project, remote, clone = scale_project, tmp_path / "dvc-remote", tmp_path / "clone"
    outs = ("data/prepared", "models/teacher.safetensors", "soft_labels")
    # The stages ran outside DVC: record them. The cheap stages before `data` (the params check) are run.
    stages = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    for stage in stages[:stages.index("data")]:
        run_cmd(["dvc", "repro", "--single-item", stage], project)
    run_cmd(["dvc", "commit", "-f", "data", "teacher", "soft_labels"], project)
    run_cmd(["dvc", "remote", "add", "-d", "local", str(remote)], project)
    # What a user commits: the lock file, the outputs' .gitignore entries, the remote, and the metrics and
    # plots files (cache: false: they live in git).
    run_cmd(["git", "add", "params.yaml", "dvc.lock", ".gitignore", "data/.gitignore", "models/.gitignore",
             ".dvc/config", "metrics", "plots"], project)
    run_cmd(["git", "commit", "-q", "-m", "outputs of data, teacher, soft_labels; local remote"], project)
    run_cmd(["dvc", "push"], project)
    assert any(f.is_file() for f in remote.rglob("*")), "dvc push left the remote empty"

    run_cmd(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not any((clone / o).exists() for o in outs)
    run_cmd(["dvc", "pull", "data", "teacher", "soft_labels"], clone)
    original = _sha256_tree(project, *outs)
    assert len(original) > 5 and _sha256_tree(clone, *outs) == original

    from distill.store import SoftLabelStore
    from distill.teachers import load_teacher

    SoftLabelStore.open(clone / "soft_labels", verify_hashes=True)
    load_teacher(clone / "models" / "teacher.safetensors")
    # The clone's `dvc repro` reruns none of the pulled stages.
    repro = run_cmd(["dvc", "repro", "soft_labels"], clone)
    for stage in ("data", "teacher", "soft_labels"):
        assert f"Stage '{stage}' didn't change, skipping" in repro.stdout, describe(repro)
    assert _sha256_tree(clone, *outs) == original
