"""`lisa-dist train` (async_save=true) whose rank 1 is killed (SIGKILL) while its background writer writes the
step-6 checkpoint: the state a kill during an asynchronous save leaves on disk."""

import os
import signal
import sys

import torch.distributed.checkpoint.filesystem as dcp_filesystem

from lisa_dist.cli import main

CRASH_IN = "step_6.tmp"
original_write = dcp_filesystem._write_item


def write_then_die(transforms, stream, *args, **kwargs):
    result = original_write(transforms, stream, *args, **kwargs)
    if CRASH_IN in str(getattr(stream, "name", "")) and os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return result


dcp_filesystem._write_item = write_then_die
sys.exit(main())
