"""The engine interface is split by caller: the optimizer, the checkpoint code and the trainer's memory
figures each call only their own view (`lisa_dist/engines/interfaces.py`); `Engine` itself holds the life
cycle the core drives, and the base module imports no engine."""

import ast
import inspect

import pytest

from lisa_dist.engines import base
from lisa_dist.engines.base import Engine
from lisa_dist.engines.fsdp2 import FSDP2Engine
from lisa_dist.engines.interfaces import CheckpointLayout, MemoryProbe, ShardAccess
from tests.helpers import REPO


def _members(protocol: type) -> set[str]:
    return {name for name in vars(protocol) if not name.startswith("_")} | set(protocol.__annotations__)


def _used_through(path: str, holder: str) -> set[str]:
    """Attributes read through `holder` in a module: a plain name (`access.shard_info`) or an attribute of
    any object (`self.access.local_grad`)."""
    used = set()
    for node in ast.walk(ast.parse((REPO / path).read_text())):
        if isinstance(node, ast.Attribute):
            value = node.value
            if (isinstance(value, ast.Name) and value.id == holder) or \
                    (isinstance(value, ast.Attribute) and value.attr == holder):
                used.add(node.attr)
    return used


@pytest.mark.parametrize("path, holder, view", [
    ("lisa_dist/optim/sharded_optimizer.py", "access", ShardAccess),
    ("lisa_dist/optim/fused.py", "access", ShardAccess),
    ("lisa_dist/importance.py", "access", ShardAccess),
    ("lisa_dist/checkpoint.py", "access", ShardAccess),
    ("lisa_dist/checkpoint.py", "layout", CheckpointLayout),
    ("lisa_dist/train.py", "probe", MemoryProbe),
])
def test_each_caller_uses_only_its_view(path, holder, view):
    used = _used_through(path, holder)
    assert used, f"{path} reaches the engine through `{holder}`"
    assert used <= _members(view), used - _members(view)


def test_engine_itself_holds_only_the_life_cycle():
    own = {name for name, value in vars(Engine).items()
           if not name.startswith("_") and (callable(value) or isinstance(value, classmethod))}
    assert own == {"build", "adopt", "grad_units", "backward", "after_forward_only", "check_config", "world_mesh",
                   "group_sum"}
    for view in (ShardAccess, CheckpointLayout, MemoryProbe):
        assert view in FSDP2Engine.__mro__
    assert not FSDP2Engine.__abstractmethods__


def test_the_base_module_imports_no_engine():
    nodes = [n for n in ast.walk(ast.parse(inspect.getsource(base))) if isinstance(n, ast.Import | ast.ImportFrom)]
    imported = {alias.name if isinstance(node, ast.Import) else node.module for node in nodes for alias in node.names}
    assert {m for m in imported if m and m.startswith("lisa_dist.engines")} == {"lisa_dist.engines.interfaces"}
