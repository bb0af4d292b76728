"""`lisa-dist train` whose rank 1 is killed (SIGKILL) after writing its shards of the step-6 checkpoint,
before the checkpoint is complete: the state a crash in the middle of a save leaves on disk."""

import os
import signal
import sys

from lisa_dist.cli import main
from lisa_dist.engines.base import Engine

CRASH_IN = "step_6.tmp"
original_save = Engine.save


def save_then_die(self, directory, optim_state):
    original_save(self, directory, optim_state)
    if directory.name == CRASH_IN and self.runtime.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)


Engine.save = save_then_die
sys.exit(main())
