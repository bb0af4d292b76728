"""Sharding engines. `base.Engine` is the interface the training core uses; `fsdp2.py` and `zero3.py` implement it
and are the only modules importing FSDP or DeepSpeed. An engine is a module named in `ENGINES`, imported only
when a run asks for it, so an FSDP2 run never imports DeepSpeed."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lisa_dist.errors import ConfigError
from lisa_dist.extras import require_extra
from lisa_dist.values import READ, Values

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from lisa_dist.config import Config
    from lisa_dist.distributed import Runtime
    from lisa_dist.engines.base import Engine

ENGINES = {"fsdp2": ("lisa_dist.engines.fsdp2", "FSDP2Engine", None),
           "zero3": ("lisa_dist.engines.zero3", "Zero3Engine", "deepspeed")}
"""engine.name: (module, class, the extra it needs)."""


def engine_class(name: str) -> type[Engine]:
    if name not in ENGINES:
        raise ConfigError(f"engine.name must be one of {', '.join(map(repr, ENGINES))}, got {name!r}")
    module, cls, extra = ENGINES[name]
    if extra is not None:
        require_extra(extra, f"engine.name={name}")
    return getattr(importlib.import_module(module), cls)


def create_engine(config: Config, runtime: Runtime, mesh: DeviceMesh | None = None,
                  values: Values = READ) -> Engine:
    return engine_class(config.engine.name)(config, runtime, mesh=mesh, values=values)
