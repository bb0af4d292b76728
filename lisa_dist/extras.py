"""The optional packages (`pip install 'lisa_dist[EXTRA]'`) and the check that names the extra a run needs.

A plain `pip install lisa_dist` trains on FSDP2 from JSON and JSON-lines data. DeepSpeed is needed only
for ZeRO-3, `datasets` only to read parquet files and `datasets.save_to_disk` directories; nothing imports
either unless the run asks for what needs it."""

from __future__ import annotations

import importlib.util

from lisa_dist.errors import ConfigError

EXTRAS = {"deepspeed": "deepspeed", "datasets": "datasets"}
"""Module name -> the extra that installs it."""


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require_extra(module: str, needed_for: str) -> None:
    """Raise ConfigError, before any work starts, if `module` is missing: `needed_for` says which setting
    needs it, and the message the extra to install."""
    if not is_installed(module):
        raise ConfigError(f"{needed_for} needs {module}, which is not installed: "
                          f"pip install 'lisa_dist[{EXTRAS[module]}]'")
