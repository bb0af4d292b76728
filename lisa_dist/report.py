"""`lisa-dist report OUTPUT_DIR`: PNG plots of a run from its `metrics.jsonl`.

loss.png (loss per step), throughput.png (tokens/s), memory.png (each rank's peak per step) and
layers.png (which decoder layers trained at each step: the LISA schedule as a heatmap).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lisa_dist.errors import ReportError
from lisa_dist.rundir import METRICS


def load_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS
    if not path.is_file():
        raise ReportError(f"{run_dir} has no {METRICS}; pass a run's output_dir")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{number}: not JSON ({e.msg})") from None
    if not records:
        raise ReportError(f"{path} holds no steps yet")
    return records


def num_layers(run_dir: Path, records: list[dict[str, Any]]) -> int:
    """From the exported model's config when there is one, else the highest layer index seen."""
    config = run_dir / "final" / "config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("num_hidden_layers")
        if isinstance(value, int):
            return value
    return 1 + max((i for r in records for i in r.get("active_layers", [])), default=0)


def active_matrix(records: list[dict[str, Any]], layers: int) -> list[list[int]]:
    """[layer][step index] = 1 where the layer trained in that step."""
    matrix = [[0] * len(records) for _ in range(layers)]
    for column, record in enumerate(records):
        for layer in record.get("active_layers", []):
            matrix[layer][column] = 1
    return matrix


def write_report(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = load_metrics(run_dir)
    out_dir = out_dir or run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in records]
    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], marker=".")
    ax.set(xlabel="step", ylabel="loss (mean over response tokens)", title=f"loss: {run_dir.name}")
    ax.grid(alpha=0.3)
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["tokens_per_s"] for r in records], marker=".")
    ax.set(xlabel="step", ylabel="tokens / s (all ranks)", title="throughput")
    ax.grid(alpha=0.3)
    save(fig, "throughput.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    per_rank = [r.get("peak_mem_gib_per_rank") or [r["peak_mem_gib"]] for r in records]
    for rank in range(max(len(p) for p in per_rank)):
        label = f"rank {rank}" if records[0].get("peak_mem_gib_per_rank") else "max over ranks"
        ax.plot(steps, [p[rank] * 1024 if rank < len(p) else float("nan") for p in per_rank], marker=".",
                label=label)
    ax.plot(steps, [r["optim_state_gib"] * 1024 for r in records], linestyle="--", label="optimizer state (max)")
    ax.set(xlabel="step", ylabel="MiB", title="peak memory per rank")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "memory.png")

    layers = num_layers(run_dir, records)
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.25 * layers + 1.5)))
    ax.imshow(active_matrix(records, layers), aspect="auto", interpolation="nearest", cmap="Greens",
              origin="lower", extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, layers - 0.5))
    ax.set(xlabel="step", ylabel="decoder layer", title="trained layers per step (LISA schedule)")
    save(fig, "layers.png")
    return written
