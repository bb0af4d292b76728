from lisa_dist.optim.rules import AdamW, Sgd, UpdateRule, make_rule
from lisa_dist.optim.schedule import lr_at
from lisa_dist.optim.sharded_optimizer import ShardedOptimizer

__all__ = ["AdamW", "Sgd", "ShardedOptimizer", "UpdateRule", "lr_at", "make_rule"]
