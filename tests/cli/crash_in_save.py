"""`lisa-dist train` whose rank 1 is killed (SIGKILL) after writing its shards of the step-6 checkpoint,
before the checkpoint is complete: the state a crash in the middle of a save leaves on disk."""

import os
import signal
import sys

from lisa_dist import checkpoint
from lisa_dist.cli import main

CRASH_IN = "step_6.tmp"
original_save = checkpoint.save_shards


def save_then_die(engine, directory, optim_state):
    original_save(engine, directory, optim_state)
    if directory.name == CRASH_IN and engine.runtime.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)


checkpoint.save_shards = save_then_die
sys.exit(main())
