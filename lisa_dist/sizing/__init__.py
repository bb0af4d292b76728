"""Sizing a run before it starts: `plan` (closed-form memory and communication), `estimate` (the real FSDP2
step at full scale on tensors with shapes and no values), and the tensor-storage accounting CPU runs use
for their measured peaks (`memory`). `shapes.ShapesOnly` is the one place that knows tensors may have no
values; the core reads through it (`lisa_dist.values`)."""
