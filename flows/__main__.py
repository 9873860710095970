"""Command line: ``python -m flows stage <name>``, ``python -m flows pipeline [-S key=value ...]``.

Thin by design: parameters come from ``params.yaml`` (validated); runtime flags (precision, CPU,
number of processes) come from accelerate's own config or environment.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request

# No telemetry from Prefect's temporary servers: it needs the network, and its writes race the server's
# own SQLite writes ("database is locked" noise in every stage log).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

LOCAL_PREFECT = "http://127.0.0.1:4200/api"


def _use_local_prefect_server() -> None:
    """Reuse a running local ``prefect server start`` instead of a temporary server per process."""
    if os.environ.get("PREFECT_API_URL"):
        return
    try:
        with urllib.request.urlopen(LOCAL_PREFECT + "/health", timeout=0.5) as resp:
            if resp.status == 200:
                os.environ["PREFECT_API_URL"] = LOCAL_PREFECT
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    from distill.stages import STAGES

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
            from flows.stages import STAGE_FLOWS, is_main_process, run_stage

            if args.no_prefect or not is_main_process():
                run_stage(args.name, params_path=args.params, track=not args.no_prefect)
            else:
                _use_local_prefect_server()
                STAGE_FLOWS[args.name](params_path=args.params, project_root=".")
        elif args.cmd == "pipeline":
            _use_local_prefect_server()
            from flows.pipeline import pipeline_flow

            pipeline_flow(overrides=args.overrides, project_root=".", exp_name=args.name, force=args.force)
        else:
            _use_local_prefect_server()
            from flows.seeds import seeds_flow

            seeds_flow(seeds=args.seeds, overrides=args.overrides, project_root=".")
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
