"""Command line: ``python -m flows stage <name>``, ``python -m flows pipeline [-S key=value ...]``.

Thin by design: parameters come from ``params.yaml`` (validated); runtime flags (precision, CPU,
number of processes) come from accelerate's own config or environment.

Several processes (docs/scaling.md): with ``DISTILL_NUM_PROCESSES=N`` (N > 1) or
``DISTILL_LAUNCH_ARGS`` in the environment, ``python -m flows stage <teacher|soft_labels|student|baseline>``
(what ``dvc.yaml`` runs) re-runs itself under ``accelerate launch`` (torchrun: one process per GPU, or
gloo processes on a CPU-only machine) and exits with its status. In the launched group the main
process runs the stage's Prefect flow and MLflow run; the other ranks run the bare stage function, which
does the same collective work. ``data`` and ``evaluate`` always run in one process.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Optional

# No telemetry from Prefect's temporary servers: it needs the network, and its writes race the server's
# own SQLite writes ("database is locked" noise in every stage log).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# --------------------------------------------------------------------------------- multi-process launch
LAUNCHED_STAGES = ("teacher", "soft_labels", "student", "baseline")
# Set in the processes of a launched group (torchrun / accelerate launch / MPI), or by our own launch.
_RANK_VARS = ("RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "DISTILL_LAUNCHED")
# `accelerate launch` overwrites these variables in its children from its own flags (default: off), so
# values given in the environment are passed on as flags.
_FLAGS_FROM_ENV = {"--mixed_precision": "ACCELERATE_MIXED_PRECISION", "--dynamo_backend": "ACCELERATE_DYNAMO_BACKEND",
                   "--dynamo_mode": "ACCELERATE_DYNAMO_MODE"}
# Arguments that choose accelerate's launcher themselves (else: --multi_gpu, i.e. torchrun).
_LAUNCHER_ARGS = ("--config_file", "--multi_gpu", "--cpu", "--use_fsdp", "--use_deepspeed", "--use_megatron_lm",
                  "--tpu", "--mpirun_hostfile")


class LaunchError(ValueError):
    """The environment's multi-process request is malformed or was not honoured."""


def _given(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def launch_request(environ: Mapping[str, str] = os.environ) -> Optional[tuple[int, list[str]]]:
    """``(processes, extra accelerate-launch args)`` when the environment asks for a launch, else None.

    ``DISTILL_NUM_PROCESSES``: the total number of processes (all machines); ``DISTILL_LAUNCH_ARGS``: more
    ``accelerate launch`` arguments (shell syntax), e.g. ``--config_file fsdp.yaml`` or the multi-machine
    flags. Nothing is launched from inside an already launched process.
    """
    if any(v in environ for v in _RANK_VARS):
        return None
    raw = environ.get("DISTILL_NUM_PROCESSES", "").strip()
    try:
        processes = int(raw) if raw else 1
    except ValueError:
        processes = 0
    if processes < 1:
        raise LaunchError(f"DISTILL_NUM_PROCESSES={raw!r} is not a positive integer (the number of processes)")
    extra = shlex.split(environ.get("DISTILL_LAUNCH_ARGS", ""))
    if processes == 1 and not extra:
        return None
    return processes, extra


def launch_command(argv: list[str], processes: int, extra: list[str],
                   environ: Mapping[str, str] = os.environ) -> list[str]:
    """The ``accelerate launch ... -m flows <argv>`` command line for a launch request."""
    from accelerate.commands.config import default_config_file

    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if processes > 1 and not _given(extra, "--num_processes"):
        cmd += ["--num_processes", str(processes)]
    config_in_play = os.path.isfile(default_config_file) or _given(extra, "--config_file")
    torchrun = _given(extra, "--multi_gpu") or _given(extra, "--use_fsdp")
    if processes > 1 and not config_in_play and not any(_given(extra, a) for a in _LAUNCHER_ARGS):
        cmd.append("--multi_gpu")  # torchrun; on a machine without GPUs the ranks form a gloo group on the CPU
        torchrun = True
    if torchrun and not _given(extra, "--num_machines") and not _given(extra, "--main_process_port"):
        cmd += ["--main_process_port", "0"]  # one machine: any free port (parallel launches do not collide)
    for flag, var in _FLAGS_FROM_ENV.items():
        if environ.get(var) and not _given(extra, flag):
            cmd += [flag, environ[var].lower()]
    return [*cmd, *extra, "-m", "flows", *argv]


def _launch(argv: list[str], processes: int, extra: list[str], *, retries: int) -> int:
    """Run ``python -m flows <argv>`` under ``accelerate launch``; the exit status is the group's.

    A failed group is launched again ``retries`` times (training resumes from its last finished epoch):
    the stage flow's own Prefect retry is off in a group, where one rank cannot retry alone.
    """
    import torch

    env = {**os.environ, "DISTILL_LAUNCHED": "1", "DISTILL_EXPECT_PROCESSES": str(processes)}
    if not torch.cuda.is_available():  # accelerate forms a multi-process group on the CPU only when told so
        env.setdefault("ACCELERATE_USE_CPU", "1")
    cmd = launch_command(argv, processes, extra)
    for attempt in range(retries + 1):
        print(f"[flows] launching {processes} process(es): {shlex.join(cmd)}", file=sys.stderr, flush=True)
        rc = subprocess.call(cmd, env=env)
        if rc == 0:
            return 0
        print(f"[flows] `accelerate launch` exited with status {rc} (attempt {attempt + 1} of {retries + 1})",
              file=sys.stderr, flush=True)
    return rc


def check_launched_group(environ: Mapping[str, str] = os.environ) -> None:
    """In a process started by :func:`_launch`: fail if accelerate's group is not the size asked for."""
    expected = int(environ.get("DISTILL_EXPECT_PROCESSES", "1") or 1)
    world = _world_size(environ)
    if expected > 1 and world != expected:
        raise LaunchError(
            f"DISTILL_NUM_PROCESSES={expected} but `accelerate launch` started a group of {world}: an accelerate "
            "config file chose another launcher or process count (`accelerate config`, or pass "
            "DISTILL_LAUNCH_ARGS='--multi_gpu' or '--config_file ...')")


@contextmanager
def _warm_stages() -> Iterator[None]:
    """A stage server (flows/stage_server.py) for the flows this process runs, named in its environment."""
    from flows.stage_server import warm_stages

    with warm_stages(Path.cwd()) as extra:
        os.environ.update(extra)
        try:
            yield
        finally:
            for key in extra:
                os.environ.pop(key, None)


def _open_tracking_store_in_background() -> None:
    """Open the MLflow store (creating its tables on first use, about 3 s) while Prefect starts its server.

    The flow opens it again, for real: an error here (a tracking server down) is left for it to report.
    """
    def work() -> None:
        try:
            from distill.tracking import open_experiment

            open_experiment(Path.cwd())
        except Exception:  # noqa: BLE001 - reported by the flow itself
            pass

    threading.Thread(target=work, name="open-mlflow-store", daemon=True).start()


def _world_size(environ: Mapping[str, str] = os.environ) -> int:
    return int(environ.get("WORLD_SIZE", "1") or 1)


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["stage"]:
        from flows.stage_server import delegate

        served = delegate(list(sys.argv[1:] if argv is None else argv))  # a warm worker of the pipeline's server
        if served is not None:
            return served
    from distill.config import STAGES

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="the parameters file (default: params.yaml)")
    overridable = argparse.ArgumentParser(add_help=False, parents=[common])
    overridable.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="parameter override, DVC's -S syntax; runs DVC experiments (repeatable)")
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stage", parents=[common], help="run one stage as a Prefect flow (what dvc.yaml calls)")
    st.add_argument("name", choices=STAGES)
    st.add_argument("--no-prefect", action="store_true", help="run the stage function without Prefect")
    pl = sub.add_parser("pipeline", parents=[overridable], help="run the whole pipeline through DVC as one Prefect flow")
    pl.add_argument("--name", default=None, help="DVC experiment name")
    pl.add_argument("-f", "--force", action="store_true", help="rerun every stage")
    sd = sub.add_parser("seeds", parents=[overridable],
                        help="run the pipeline for several seeds (DVC experiments) and report mean ± std")
    sd.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args(argv)

    from distill.config import ParamsError, apply_overrides, load_params, parse_params

    try:
        # Fail on bad params or overrides before any work (and before Prefect starts).
        params = load_params(args.params)
        if getattr(args, "overrides", None):
            parse_params(apply_overrides(params.model_dump(mode="json"), args.overrides), source="the -S overrides")
        if args.cmd == "stage":
            request = launch_request() if args.name in LAUNCHED_STAGES else None
            if request is not None:
                return _launch(list(sys.argv[1:] if argv is None else argv), *request,
                               retries=0 if args.no_prefect else 1)
            check_launched_group()
            from flows.stages import STAGE_FLOWS, is_main_process, run_stage

            if args.no_prefect or not is_main_process():
                run_stage(args.name, params_path=args.params, track=not args.no_prefect)
            else:
                from flows.prefect_api import use_local_server

                use_local_server()
                stage_flow = STAGE_FLOWS[args.name]
                if _world_size() > 1:  # rank 0 cannot retry alone: the launcher retries the whole group
                    stage_flow = stage_flow.with_options(retries=0)
                stage_flow(params_path=args.params, project_root=".")
        else:
            # Started first, they come up while this process imports: the Prefect API (flows/prefect_api.py),
            # the stage server (flows/stage_server.py) and the MLflow store.
            from flows.prefect_api import PrivateServer, use_local_server

            prefect_server = None if use_local_server() else PrivateServer()  # stops at exit
            with _warm_stages():
                from flows.pipeline import pipeline_flow
                from flows.seeds import seeds_flow

                _open_tracking_store_in_background()
                if prefect_server is not None:
                    prefect_server.wait()
                if args.cmd == "pipeline":
                    pipeline_flow(overrides=args.overrides, project_root=".", exp_name=args.name, force=args.force)
                else:
                    seeds_flow(seeds=args.seeds, overrides=args.overrides, project_root=".")
    except (ParamsError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
