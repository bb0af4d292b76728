"""`lisa-dist train CONFIG.yaml [key=value ...]`, `lisa-dist estimate|plan CONFIG.yaml [key=value ...]
--world-size N`, `lisa-dist report OUTPUT_DIR [...]` and `lisa-dist export CHECKPOINT_DIR OUT_DIR`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lisa-dist", description=__doc__)
    # The deepspeed launcher puts --local_rank=N before the subcommand; the rank comes from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune a model (under torchrun, or as one process)")
    train.add_argument("config", help="YAML run configuration")
    train.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. lisa.gamma=4")
    train.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    _sizing_command(commands, "estimate", "run the real FSDP2 step on fake tensors at full scale: peak memory "
                    "per rank, and whether it fits")
    _sizing_command(commands, "plan", "analytic per-rank memory and traffic for fsdp2 or zero3, and the cheapest "
                    "settings that fit")
    report = commands.add_parser("report", help="PNG plots of a run: loss (and eval loss), throughput, per-rank "
                                 "peak memory, the trained layers per step, each layer's relative update; with "
                                 "several runs, their loss and per-layer updates side by side")
    report.add_argument("output_dir", nargs="+", help="a run's output_dir (holds metrics.jsonl); several to compare")
    report.add_argument("--out", default=None, help="where the PNGs go (default: OUTPUT_DIR/report, or "
                        "FIRST_OUTPUT_DIR/report/compare for several runs)")
    export = commands.add_parser("export", help="turn a step checkpoint into a Hugging Face model directory")
    export.add_argument("checkpoint_dir")
    export.add_argument("out_dir")
    return parser


def _sizing_command(commands: argparse._SubParsersAction, name: str, help: str) -> None:
    from lisa_dist.sizing.memory import CARD_24GB_GIB, RESERVE_GIB

    command = commands.add_parser(name, help=help)
    command.add_argument("config")
    command.add_argument("overrides", nargs="*")
    command.add_argument("--world-size", type=int, required=True, help="number of ranks")
    command.add_argument("--gpu-mem-gib", type=float, default=CARD_24GB_GIB, help="card memory (24 GB = 22.35 GiB)")
    command.add_argument("--reserve-gib", type=float, default=RESERVE_GIB,
                         help="left for the CUDA context and fragmentation")
    command.add_argument("--json", action="store_true", help="print one JSON object")


def _exit_now(code: int) -> None:
    """Leave without running static destructors: every file is closed and the process group destroyed,
    but C++ threads of the communication libraries sometimes abort the interpreter's teardown
    ("terminate called without an active exception"), which would turn a finished run into a failure."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow the options (`plan CONFIG --world-size 8 engine.split_layers=true`).
    if extra and (not hasattr(args, "overrides") or not all("=" in e and not e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    from lisa_dist.config import load_config
    from lisa_dist.errors import LisaDistError

    try:
        if args.command == "train":
            from lisa_dist.accelerate_config import read_accelerate_settings
            from lisa_dist.env import read_launch_env
            from lisa_dist.train import run_training

            env = read_launch_env()
            launcher = read_accelerate_settings(dict(env.accelerate))
            config = load_config(args.config, args.overrides, implied=launcher.config,
                                 implied_by="the accelerate config file")
            out = run_training(config, env, launcher)
            print(f"lisa-dist: training done; outputs in {out}", file=sys.stderr)
            _exit_now(0)
        elif args.command == "estimate":
            from lisa_dist.sizing.estimate import print_estimate, run_estimate

            config = load_config(args.config, args.overrides)
            result = run_estimate(config, args.world_size, args.gpu_mem_gib, args.reserve_gib)
            print_estimate(result, as_json=args.json)
        elif args.command == "plan":
            from lisa_dist.sizing.plan import print_plan, run_plan

            config = load_config(args.config, args.overrides)
            print_plan(run_plan(config, args.world_size, args.gpu_mem_gib, args.reserve_gib), as_json=args.json)
        elif args.command == "report":
            from lisa_dist.plots import write_report

            for path in write_report([Path(d) for d in args.output_dir], Path(args.out) if args.out else None):
                print(path)
        elif args.command == "export":
            from lisa_dist.checkpoint import export_checkpoint

            export_checkpoint(Path(args.checkpoint_dir), Path(args.out_dir))
            print(f"lisa-dist: exported {args.checkpoint_dir} to {args.out_dir}", file=sys.stderr)
    except LisaDistError as e:
        print(f"lisa-dist: {e.label}: {e}", file=sys.stderr)
        from lisa_dist.distributed import process_group_started

        if process_group_started():
            _exit_now(e.exit_code)
        return e.exit_code
    return 0
