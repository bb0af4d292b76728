r"""cProfile of rank 0 of a `lisa-dist train` run, or of another module's run (`-m MODULE`, such as the plain
FSDP2 baseline), the other ranks unprofiled, written when the run exits.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 scripts/profile_rank0.py OUT.prof train CONFIG [KEY=VALUE ...]
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 scripts/profile_rank0.py OUT.prof -m benchmarks.baselines \
        fsdp2_adamw CONFIG RESULT.json [KEY=VALUE ...]
    .venv/bin/python -c \
        "import pstats; pstats.Stats('OUT.prof').sort_stats('cumtime').print_stats('lisa_dist/optim', 12)"
"""

from __future__ import annotations

import cProfile
import os
import runpy
import sys

from lisa_dist.cli import main


def run(args: list[str]) -> int:
    if args[:1] == ["-m"]:  # as `python -m` would: from the working directory
        sys.path.insert(0, os.getcwd())
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__")
        return 0
    return main(args)


if __name__ == "__main__":
    out, args = sys.argv[1], sys.argv[2:]
    if os.environ.get("RANK", "0") != "0":
        sys.exit(run(args))
    profile = cProfile.Profile()
    exit_now = os._exit

    def dump_then_exit(code: int) -> None:  # `lisa-dist train` ends with os._exit, past any finally
        profile.disable()
        profile.dump_stats(out)
        exit_now(code)

    os._exit = dump_then_exit
    profile.enable()
    code = run(args)
    dump_then_exit(code)
