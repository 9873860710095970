"""Several processes, GPUs and precision for a stage: through ``accelerate launch``, as the machine is configured.

``python -m flows stage <teacher|soft_labels|student|baseline>`` (what ``dvc.yaml`` runs) re-runs itself under
``accelerate launch`` when the machine asks for it, and exits with the group's status:

* an accelerate config file exists (``accelerate config`` writes it; ``ACCELERATE_CONFIG_FILE`` names another):
  the launcher reads it (processes, GPUs, mixed precision, dynamo, FSDP/DeepSpeed ...);
* ``DISTILL_NUM_PROCESSES=N``: N processes (overrides the file's count); ``DISTILL_LAUNCH_ARGS``: more
  ``accelerate launch`` arguments (shell syntax), e.g. the multi-machine flags.

The environment overrides the file: ``ACCELERATE_MIXED_PRECISION`` (and the dynamo variables) are passed on as
flags, because ``accelerate launch`` would otherwise overwrite them in its children from the file. A config
that asks for several CPU processes (``distributed_type: MULTI_CPU`` without an MPI host file, which accelerate
would run as one process) runs them as a torchrun group on the CPU. In the launched group the main process
runs the stage's Prefect flow and MLflow run; the other ranks run the bare stage, which does the same
collective work. ``data`` and ``evaluate`` always run in one process.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

__all__ = ["LAUNCHED_STAGES", "LaunchError", "Launch", "config_file", "launch_request", "launch_command", "launch",
           "check_launched_group", "is_main_process", "world_size"]

LAUNCHED_STAGES = ("teacher", "soft_labels", "student", "baseline")
# Set in the processes of a launched group (torchrun / accelerate launch / MPI), or by our own launch.
_RANK_VARS = ("RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "DISTILL_LAUNCHED")
# `accelerate launch` overwrites these variables in its children from its flags or config: pass them as flags.
_FLAGS_FROM_ENV = {"--mixed_precision": "ACCELERATE_MIXED_PRECISION", "--dynamo_backend": "ACCELERATE_DYNAMO_BACKEND",
                   "--dynamo_mode": "ACCELERATE_DYNAMO_MODE"}
# Arguments that choose accelerate's launcher themselves.
_LAUNCHER_ARGS = ("--multi_gpu", "--cpu", "--use_fsdp", "--use_deepspeed", "--use_megatron_lm", "--tpu",
                  "--mpirun_hostfile")


class LaunchError(ValueError):
    """The machine's multi-process request is malformed or was not honoured."""


@dataclass(frozen=True)
class Launch:
    """How to launch: the process count asked for (None: the config file's), more arguments, the config file."""

    processes: Optional[int] = None
    extra: list[str] = field(default_factory=list)
    config: Optional[Path] = None
    settings: dict[str, Any] = field(default_factory=dict)  # the config file's content


def _given(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def config_file(environ: Mapping[str, str] = os.environ) -> Optional[Path]:
    """The machine's accelerate config file, if there is one (``ACCELERATE_CONFIG_FILE``, else accelerate's default)."""
    named = environ.get("ACCELERATE_CONFIG_FILE")
    if named:
        if not Path(named).is_file():
            raise LaunchError(f"ACCELERATE_CONFIG_FILE={named!r} does not exist (write it with `accelerate config`)")
        return Path(named)
    from accelerate.commands.config import default_config_file

    return Path(default_config_file) if os.path.isfile(default_config_file) else None


def _read_config(path: Path) -> dict[str, Any]:
    import json

    import yaml

    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise LaunchError(f"accelerate config file {path} is unreadable ({err}); rewrite it with `accelerate config`") \
            from None
    if not isinstance(data, dict):
        raise LaunchError(f"accelerate config file {path} is not a mapping; rewrite it with `accelerate config`")
    return data


def launch_request(environ: Mapping[str, str] = os.environ) -> Optional[Launch]:
    """The launch the machine asks for, or None (one plain process). Nothing is launched from a launched process."""
    if any(v in environ for v in _RANK_VARS):
        return None
    raw = environ.get("DISTILL_NUM_PROCESSES", "").strip()
    try:
        processes = int(raw) if raw else None
    except ValueError:
        processes = 0
    if processes is not None and processes < 1:
        raise LaunchError(f"DISTILL_NUM_PROCESSES={raw!r} is not a positive integer (the number of processes)")
    extra = shlex.split(environ.get("DISTILL_LAUNCH_ARGS", ""))
    config = config_file(environ)
    if config is None and (processes or 1) == 1 and not extra:
        return None
    return Launch(processes=processes, extra=extra, config=config,
                  settings=_read_config(config) if config is not None else {})


def _cpu_group(launch: Launch, processes: int) -> bool:
    """Several processes that accelerate would not form into a group by itself: run them as torchrun on the CPU."""
    if processes < 2 or any(_given(launch.extra, a) for a in _LAUNCHER_ARGS) or launch.settings.get("mpirun_config"):
        return False
    if _given(launch.extra, "--config_file") and not launch.settings:  # a file we did not read decides
        return False
    kind = str(launch.settings.get("distributed_type", "NO")).upper()
    return kind in ("NO", "MULTI_CPU") or bool(launch.settings.get("use_cpu"))


def launch_command(argv: list[str], launch: Launch, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The ``accelerate launch ... -m flows <argv>`` command line for a launch."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if launch.config is not None and not _given(launch.extra, "--config_file"):
        cmd += ["--config_file", str(launch.config)]
    processes = launch.processes or int(launch.settings.get("num_processes", 1) or 1)
    if launch.processes and not _given(launch.extra, "--num_processes"):
        cmd += ["--num_processes", str(launch.processes)]
    torchrun = any(_given(launch.extra, a) for a in ("--multi_gpu", "--use_fsdp")) or \
        str(launch.settings.get("distributed_type", "")).upper() in ("MULTI_GPU", "FSDP")
    if _cpu_group(launch, processes):
        cmd.append("--multi_gpu")  # torchrun; without GPUs the ranks form a gloo group on the CPU
        torchrun = True
    one_machine = not _given(launch.extra, "--num_machines") and int(launch.settings.get("num_machines", 1) or 1) == 1
    if torchrun and one_machine and not _given(launch.extra, "--main_process_port"):
        cmd += ["--main_process_port", "0"]  # one machine: any free port (parallel launches do not collide)
    for flag, var in _FLAGS_FROM_ENV.items():
        if environ.get(var) and not _given(launch.extra, flag):
            cmd += [flag, environ[var].lower()]
    return [*cmd, *launch.extra, "-m", "flows", *argv]


def launch(argv: list[str], request: Launch, *, retries: int) -> int:
    """Run ``python -m flows <argv>`` under ``accelerate launch``; the exit status is the group's.

    A failed group is launched again ``retries`` times (training resumes from its last finished epoch): the stage
    flow's own Prefect retry is off in a group, where one rank cannot retry alone.
    """
    import torch

    processes = request.processes or int(request.settings.get("num_processes", 1) or 1)
    env = {**os.environ, "DISTILL_LAUNCHED": "1", "DISTILL_EXPECT_PROCESSES": str(processes)}
    if not torch.cuda.is_available():  # accelerate forms a multi-process group on the CPU only when told so
        env.setdefault("ACCELERATE_USE_CPU", "1")
    cmd = launch_command(argv, request)
    rc = 1
    for attempt in range(retries + 1):
        print(f"[flows] launching {processes} process(es): {shlex.join(cmd)}", file=sys.stderr, flush=True)
        rc = subprocess.call(cmd, env=env)
        if rc == 0:
            return 0
        print(f"[flows] `accelerate launch` exited with status {rc} (attempt {attempt + 1} of {retries + 1})",
              file=sys.stderr, flush=True)
    return rc


def is_main_process(environ: Mapping[str, str] = os.environ) -> bool:
    """True unless this is a non-zero rank started by ``accelerate launch`` / torchrun."""
    return environ.get("RANK", "0") == "0"


def world_size(environ: Mapping[str, str] = os.environ) -> int:
    return int(environ.get("WORLD_SIZE", "1") or 1)


def check_launched_group(environ: Mapping[str, str] = os.environ) -> None:
    """In a process started by :func:`launch`: fail if accelerate's group is not the size asked for."""
    expected = int(environ.get("DISTILL_EXPECT_PROCESSES", "1") or 1)
    world = world_size(environ)
    if expected > 1 and world != expected:
        raise LaunchError(
            f"{expected} processes were asked for but `accelerate launch` started a group of {world}: the accelerate "
            "config file chose another launcher or process count (`accelerate config`, or DISTILL_LAUNCH_ARGS)")
