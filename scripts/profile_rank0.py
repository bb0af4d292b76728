r"""cProfile of rank 0 of a `lisa-dist train` run (the other ranks run unprofiled), written when the run exits.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 scripts/profile_rank0.py OUT.prof train CONFIG [KEY=VALUE ...]
    .venv/bin/python -c \
        "import pstats; pstats.Stats('OUT.prof').sort_stats('cumtime').print_stats('lisa_dist/optim', 12)"
"""

from __future__ import annotations

import cProfile
import os
import sys

from lisa_dist.cli import main

if __name__ == "__main__":
    out, args = sys.argv[1], sys.argv[2:]
    if os.environ.get("RANK", "0") != "0":
        sys.exit(main(args))
    profile = cProfile.Profile()
    exit_now = os._exit

    def dump_then_exit(code: int) -> None:  # `lisa-dist train` ends with os._exit, past any finally
        profile.disable()
        profile.dump_stats(out)
        exit_now(code)

    os._exit = dump_then_exit
    profile.enable()
    sys.exit(main(args))
