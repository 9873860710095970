"""Command line: ``python -m flows stage <name>``, ``pipeline [-S key=value ...] [--apply]``, ``seeds``, ``sweep``.

Thin by design: parameters come from ``params.yaml`` (validated before anything starts); runtime flags
(precision, CPU, number of processes) come from accelerate's config file or the environment
(:mod:`flows.launch`). Every stage is a fresh process: the one DVC starts.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Optional


def _defaults() -> None:
    """Settings of this project's processes, unless the user set them (read when Prefect/MLflow start)."""
    # No telemetry from Prefect's servers: it needs the network, and its writes race the server's own SQLite
    # writes ("database is locked" noise in every stage log).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The library's own log records (per-epoch figures) go to the flow run's log in the Prefect UI only.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "distill")
    from distill.tracking import set_defaults

    set_defaults()  # MLflow: no telemetry, short HTTP retries, quiet on the terminal


_QUIET_CONSOLE = False
# Set when the Prefect API is gone after a stage's work: what Prefect still has queued cannot reach it, and its exit
# hooks would retry it for minutes (without a timeout), so the process ends before them.
_NOTHING_MORE_TO_SEND = [False]


def _stage_defaults() -> None:
    """A stage shows a progress bar and one line when it ends, or its error once; Prefect's records go to its UI.

    Unless the user asked for Prefect's records on the terminal (``PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL``). And
    a stage's Prefect client retries a request 3 times (2 + 4 + 8 s), not 5 (about a minute): a Prefect API that
    dies after a stage's work then stalls the stage's end for seconds, not minutes (unless the user set it).
    """
    global _QUIET_CONSOLE
    _QUIET_CONSOLE = "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL" not in os.environ
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "3")


def _exit_on_hangup_and_term() -> None:
    """SIGTERM and SIGHUP end the command like Ctrl-C does: cleanup runs (the private Prefect server stops)."""
    def handler(signum: int, _frame: Any) -> NoReturn:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="the parameters file (default: params.yaml)")
    overridable = argparse.ArgumentParser(add_help=False, parents=[common])
    overridable.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="parameter override, DVC's -S syntax (repeatable)")
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # argparse %-formats help strings: a literal percent sign is written %%
    sub = parser.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stage", parents=[common], help="run one stage as a Prefect flow (what dvc.yaml calls)")
    st.add_argument("name", help="the stage (distill/stages/<name>.py)")
    st.add_argument("--no-prefect", action="store_true", help="run the stage without Prefect and MLflow")
    pl = sub.add_parser("pipeline", parents=[overridable],
                        help="run the whole pipeline as a DVC experiment (`dvc exp run`), as one Prefect flow; with "
                             "-S, a variant in a temporary copy that leaves the workspace as it is")
    pl.add_argument("--name", default=None, help="the DVC experiment's name (default: a new one)")
    pl.add_argument("-f", "--force", action="store_true", help="rerun every stage")
    pl.add_argument("--apply", action="store_true",
                    help="write the -S values into params.yaml (its formatting kept) and run in the workspace; the "
                         "file is put back as it was if the run fails")
    sd = sub.add_parser("seeds", parents=[overridable],
                        help="run the pipeline for several seeds (a sweep over seeds): mean, per-seed values, 95 %% CI "
                             "on the test split")
    sd.add_argument("--seeds", nargs="+", default=None, metavar="SEEDS",
                    help="seeds or ranges (0 1 2, 100-104; default 0-4, with --confirm 1000-1004)")
    sd.add_argument("--confirm", action="store_true",
                    help="the confirmation of a sweep: its best grid point (reports/sweep.json, ranked on validation) "
                         "on held-out seeds >= 1000")
    _fan_out_arguments(sd)
    sw = sub.add_parser("sweep", parents=[common],
                        help="a grid of overrides times seeds, one DVC experiment per variant, shared stages computed "
                             "once; ranked on validation accuracy (reports/sweep.md)")
    sw.add_argument("-S", "--set", dest="axes", action="append", default=[], metavar="KEY=V1,V2",
                    help="an axis of the grid (repeatable); one value: fixed for every variant")
    sw.add_argument("--seeds", default="100-102", help="seeds: 100-104, or 1,3,5 (default 100-102)")
    sw.add_argument("--id", default=None, help="the sweep's id (default: sweep-<hash> of the grid, seeds, commit, "
                                               "params.yaml: the same sweep again runs only what is missing)")
    sw.add_argument("--remote", default=None, help="the project's default DVC remote: every run pulls the stages "
                                                   "other machines computed from it and pushes its own")
    sw.add_argument("--window", type=int, default=50, help="with --pool: flow runs submitted and not finished at "
                                                           "most (default 50)")
    _fan_out_arguments(sw)
    return parser


def _fan_out_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=1, help="variants at once on this machine (default 1)")
    parser.add_argument("--pool", default=None, help="run each variant as a flow run of the deployment "
                                                     "distill-pipeline/variant on this Prefect work pool")


def _stage(args: argparse.Namespace, argv: list[str]) -> int:
    from flows.launch import LAUNCHED_STAGES, check_launched_group, is_main_process, launch, launch_request
    from flows.lifetime import command_pids, stop_with

    _exit_on_hangup_and_term()
    stop_with(command_pids())  # the stage ends with the command it runs under (the pipeline, DVC), however that ends
    # A private server stops at exit, after Prefect's own exit hooks have sent the stage's logs and events to it.
    server = None if args.no_prefect or not is_main_process() else _stage_server()
    request = launch_request() if args.name in LAUNCHED_STAGES else None
    if request is not None:
        if server is not None:
            server.wait()  # the launched processes find it up (or, if it cannot start, no API: Prefect's own)
        return launch(argv, request, retries=0 if args.no_prefect else 1)
    check_launched_group()
    try:
        _run_stage(args, server)
    except Exception as err:  # noqa: BLE001 - reported once, here
        from flows.stage import COMPLETED

        if args.name in COMPLETED:  # the outputs are complete: DVC must record the stage, not retrain it
            print(f"[{args.name}] WARNING: the stage's outputs are complete, but recording the run afterwards "
                  f"failed ({type(err).__name__}: {err}); its Prefect flow run may show the wrong state",
                  file=sys.stderr, flush=True)
            _NOTHING_MORE_TO_SEND[0] = True
            return 0
        _report_failure(args.name, err)
        return 1
    except KeyboardInterrupt:
        print(f"[{args.name}] interrupted; a training stage keeps the state of its last finished epoch",
              file=sys.stderr, flush=True)
        return 130
    return 0


def _stage_server() -> Any:
    """The stage's own private Prefect server when no API is configured (under plain ``dvc repro``), else None.

    Started at once, so that it comes up while the stage imports. It stops with the stage however the stage ends,
    SIGKILL included (Prefect's own temporary server outlived a killed stage, and died with the stage on Ctrl-C,
    which left the stage retrying it for minutes).
    """
    from flows.prefect_api import PrivateServer, use_local_server

    return None if use_local_server() else PrivateServer()


def _run_stage(args: argparse.Namespace, server: Any) -> None:
    from flows.prefect_api import api_settings
    from flows.stage import is_main_process, run_stage_flow, run_tracked

    t0 = time.perf_counter()
    if args.no_prefect or not is_main_process():
        run_tracked(args.name, params_path=args.params, track=not args.no_prefect)
    else:
        if _QUIET_CONSOLE:
            _run_records_to_the_ui_only()
        with api_settings(server):
            run_stage_flow(args.name, params_path=args.params)
    if is_main_process():
        print(f"[{args.name}] done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def _run_records_to_the_ui_only() -> None:
    """Prefect's flow- and task-run records (a failure's traceback among them) go to the Prefect UI, not here."""
    import logging

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).propagate = False


def _report_failure(stage: str, err: Exception) -> None:
    """A failed stage's error, once: the message of a fault the product names, the traceback of anything else."""
    if type(err).__module__.split(".")[0] in ("distill", "flows"):
        print(f"[{stage}] error: {err}", file=sys.stderr, flush=True)
    else:
        import traceback

        traceback.print_exception(err)
        print(f"[{stage}] failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)


def _orchestrate(args: argparse.Namespace, params: Any) -> int:
    """``pipeline``, ``seeds``, ``sweep``: one at a time in a workspace (:mod:`flows.workspace`), before anything else.

    The lock comes first: a second command stops at once naming the first, whatever its params; then what a
    stage would reject, before DVC deletes any stage's outputs.
    """
    from flows.workspace import WorkspaceBusy, command_line, workspace_lock

    _exit_on_hangup_and_term()
    try:  # a sweep's variants (seeds too) run in temporary copies: they share the workspace (flows/workspace.py)
        with workspace_lock(".", command_line(), shared=args.cmd in ("sweep", "seeds")):
            if args.cmd == "sweep":  # the same check, in a process of its own beside the sweep's start-up
                return _orchestrate_locked(args, _start_preflight(args.params))
            from distill.preflight import preflight

            preflight(params, ".", source=args.params)
            return _orchestrate_locked(args)
    except WorkspaceBusy as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _start_preflight(params_file: str) -> subprocess.Popen[str]:
    """``python -m distill.preflight`` started now: it imports torch (about 2.5 s), which the sweep's own process
    never needs, so on another core it costs the sweep's start-up nothing; the sweep waits for it before any
    variant runs (:func:`_preflight_failed`)."""
    return subprocess.Popen([sys.executable, "-m", "distill.preflight", params_file], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _preflight_failed(check: subprocess.Popen[str]) -> bool:
    """Wait for :func:`_start_preflight`'s check; print what it found wrong (``error: ...``), if anything."""
    _, err = check.communicate()
    if check.returncode:
        print(err.strip() or f"error: the pre-flight check of the params exited {check.returncode}", file=sys.stderr)
    return check.returncode != 0


def _orchestrate_locked(args: argparse.Namespace,
                        preflight_check: Optional[subprocess.Popen[str]] = None) -> int:
    from flows.prefect_api import PrivateServer, use_local_server

    # Started now, so that it comes up while this imports. It stops at exit, after Prefect's own exit hooks have
    # sent the flow's last logs and events to it (PrivateServer registers its stop with atexit before any of them).
    server = None if use_local_server() else PrivateServer()
    from flows.pipeline import pipeline_flow
    from flows.prefect_api import api_settings
    from flows.seeds import seeds_flow

    with api_settings(server):
        if args.cmd == "pipeline":
            pipeline_flow(overrides=args.overrides, project_root=".", exp_name=args.name, force=args.force,
                          apply=args.apply)
        elif args.cmd == "seeds":
            seeds_flow(**_seeds_arguments(args), project_root=".", jobs=args.jobs, pool=args.pool)
        else:
            from flows.sweep import plan_from_cli, run_sweep

            plan = plan_from_cli(Path(".").resolve(), args.axes, args.seeds, args.id)
            if preflight_check is not None and _preflight_failed(preflight_check):
                return 2
            done = run_sweep(plan, pool=args.pool, jobs=args.jobs, remote=args.remote, window=args.window)
            return 1 if done["failed"] else 0
    return 0


def _seeds_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The seeds and overrides of ``seeds``; with ``--confirm``, the sweep's best grid point on held-out seeds."""
    from flows.seeds import confirmation
    from flows.sweep import CONFIRM_SEEDS, parse_seeds

    default = f"{CONFIRM_SEEDS}-{CONFIRM_SEEDS + 4}" if args.confirm else "0-4"
    seeds = parse_seeds(",".join(args.seeds or [default]))
    overrides = confirmation(Path("reports") / "sweep.json", seeds, args.overrides) if args.confirm else args.overrides
    return {"seeds": seeds, "overrides": overrides}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    _defaults()
    if args.cmd == "stage":
        _stage_defaults()
    from distill.config import ParamsError, apply_overrides, load_params, parse_params
    from flows.launch import LaunchError

    try:
        # Bad params or overrides fail here, before any work and before Prefect starts.
        params = load_params(args.params)
        if getattr(args, "overrides", None):
            params = parse_params(apply_overrides(params.model_dump(mode="json"), args.overrides),
                                  source="the -S overrides")
        return _stage(args, argv) if args.cmd == "stage" else _orchestrate(args, params)
    except (ParamsError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


_EXIT_STATUS = [1]  # what the process exits with; 1 unless main() returned (an uncaught exception)


def _skip_interpreter_teardown() -> None:
    """The last ``atexit`` hook (registered first): end the process without the interpreter's teardown.

    By then every library's own exit hooks have run: Prefect has sent its queued logs and events, the private
    Prefect server has stopped, MLflow has ended its runs, the outputs are written. What is skipped is 1 to 3 s of
    freeing torch, Prefect and MLflow objects per stage process.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[0])


if __name__ == "__main__":
    atexit.register(_skip_interpreter_teardown)  # before any library registers its own: it runs after them all
    try:
        _EXIT_STATUS[0] = main()
        if _NOTHING_MORE_TO_SEND[0]:
            _skip_interpreter_teardown()
    except SystemExit as stop:  # --help, SIGTERM or SIGHUP (an exit with 128 + the signal)
        _EXIT_STATUS[0] = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        raise
    except KeyboardInterrupt:
        _EXIT_STATUS[0] = 130
        raise
    sys.exit(_EXIT_STATUS[0])
