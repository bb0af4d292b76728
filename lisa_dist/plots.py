"""`lisa-dist report OUTPUT_DIR [OUTPUT_DIR ...]`: PNG plots of runs from their `metrics.jsonl`.

One run: loss.png (training loss per step, and the held-out loss where evaluated), throughput.png
(tokens/s), memory.png (each rank's peak per step), layers.png (which decoder layers trained at each step:
the LISA schedule as a heatmap) and layer_updates.png (each layer's mean relative weight change
||dW|| / ||W|| over the steps it trained, the LISA paper's per-layer view); for a mixture-of-experts model,
experts.png (each MoE layer's tokens per expert over the run, against an even share, and the most loaded
expert's share per step: the first thing to look at when an MoE fine-tune goes wrong). Several runs: loss.png and
layer_updates.png with one line per run, to compare, say, a LISA run with a full one.
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


def step_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "loss" in r]


def eval_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "eval_loss" in r]


def mean_layer_updates(records: list[dict[str, Any]], layers: int) -> list[float]:
    """Per decoder layer, the mean of its relative update over the steps that trained it (NaN: never)."""
    sums, counts = [0.0] * layers, [0] * layers
    for record in step_records(records):
        for layer, ratio in zip(record.get("active_layers", []), record.get("layer_update_ratio", [])):
            if layer < layers:
                sums[layer] += ratio
                counts[layer] += 1
    return [total / count if count else float("nan") for total, count in zip(sums, counts)]


def num_layers(run_dir: Path, records: list[dict[str, Any]]) -> int:
    """From the exported model's config when there is one, else the highest layer index seen."""
    config = run_dir / "final" / "config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("num_hidden_layers")
        if isinstance(value, int):
            return value
    return 1 + max((i for r in step_records(records) for i in r.get("active_layers", [])), default=0)


def active_matrix(records: list[dict[str, Any]], layers: int) -> list[list[int]]:
    """[layer][step index] = 1 where the layer trained in that step."""
    records = step_records(records)
    matrix = [[0] * len(records) for _ in range(layers)]
    for column, record in enumerate(records):
        for layer in record.get("active_layers", []):
            matrix[layer][column] = 1
    return matrix


def _layer_order(name: str) -> list[int]:
    return [int(part) for part in name.split(".")]


def expert_load(records: list[dict[str, Any]]) -> tuple[list[str], list[list[float]]]:
    """Per MoE layer (by its index), each expert's tokens over the run divided by an even share (1.0: as many
    as every other expert; 0.0: none routed to it)."""
    totals: dict[str, list[float]] = {}
    for record in step_records(records):
        for name, row in (record.get("expert_tokens") or {}).items():
            total = totals.setdefault(name, [0.0] * len(row))
            totals[name] = [a + b for a, b in zip(total, row)]
    names = sorted(totals, key=_layer_order)
    return names, [[count * len(row) / sum(row) if sum(row) else 0.0 for count in row]
                   for row in (totals[name] for name in names)]


def max_expert_load(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """Per step with counts: the most loaded expert of any MoE layer, as a multiple of an even share."""
    out = []
    for record in step_records(records):
        rows = [row for row in (record.get("expert_tokens") or {}).values() if sum(row)]
        if rows:
            out.append((record["step"], max(max(row) * len(row) / sum(row) for row in rows)))
    return out


def write_report(run_dirs: Path | list[Path], out_dir: Path | None = None) -> list[Path]:
    """The PNGs of one run (in RUN/report by default), or the comparison of several (RUN_A/report/compare)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run_dirs] if isinstance(run_dirs, Path) else list(run_dirs)
    loaded = [(run, load_metrics(run)) for run in runs]
    out_dir = out_dir or runs[0] / "report" / ("compare" if len(runs) > 1 else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)

    save(_loss_figure(plt, loaded), "loss.png")
    save(_layer_updates_figure(plt, loaded), "layer_updates.png")
    if len(runs) == 1:
        run_dir, records = loaded[0]
        for name, figure in (("throughput.png", _throughput_figure), ("memory.png", _memory_figure)):
            save(figure(plt, step_records(records)), name)
        save(_schedule_figure(plt, step_records(records), num_layers(run_dir, records)), "layers.png")
        if max_expert_load(records):
            save(_experts_figure(plt, records), "experts.png")
    return written


def _loss_figure(plt: Any, loaded: list[tuple[Path, list[dict[str, Any]]]]) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4))
    for run_dir, records in loaded:
        steps = step_records(records)
        prefix = f"{run_dir.name}: " if len(loaded) > 1 else ""
        line, = ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], marker=".", label=f"{prefix}train")
        evals = eval_records(records)
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], marker="o", linestyle="--",
                    color=line.get_color(), label=f"{prefix}eval")
    title = f"loss: {loaded[0][0].name}" if len(loaded) == 1 else f"loss: {' vs '.join(r.name for r, _ in loaded)}"
    ax.set(xlabel="step", ylabel="loss (mean over response tokens)", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _layer_updates_figure(plt: Any, loaded: list[tuple[Path, list[dict[str, Any]]]]) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4))
    for run_dir, records in loaded:
        means = mean_layer_updates(records, num_layers(run_dir, records))
        ax.plot(range(len(means)), means, marker="o", label=run_dir.name)
    ax.set(xlabel="decoder layer", ylabel="mean ||dW|| / ||W|| per step trained", yscale="log",
           title="relative weight change per layer")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _throughput_figure(plt: Any, records: list[dict[str, Any]]) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["tokens_per_s"] for r in records], marker=".")
    ax.set(xlabel="step", ylabel="tokens / s (all ranks)", title="throughput")
    ax.grid(alpha=0.3)
    return fig


def _memory_figure(plt: Any, records: list[dict[str, Any]]) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records]
    per_rank = [r.get("peak_mem_gib_per_rank") or [r["peak_mem_gib"]] for r in records]
    for rank in range(max(len(p) for p in per_rank)):
        label = f"rank {rank}" if records[0].get("peak_mem_gib_per_rank") else "max over ranks"
        ax.plot(steps, [p[rank] * 1024 if rank < len(p) else float("nan") for p in per_rank], marker=".",
                label=label)
    ax.plot(steps, [r["optim_state_gib"] * 1024 for r in records], linestyle="--", label="optimizer state (max)")
    ax.set(xlabel="step", ylabel="MiB", title="peak memory per rank")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _schedule_figure(plt: Any, records: list[dict[str, Any]], layers: int) -> Any:
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.25 * layers + 1.5)))
    ax.imshow(active_matrix(records, layers), aspect="auto", interpolation="nearest", cmap="Greens",
              origin="lower", extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, layers - 0.5))
    ax.set(xlabel="step", ylabel="decoder layer", title="trained layers per step (LISA schedule)")
    return fig


def _experts_figure(plt: Any, records: list[dict[str, Any]]) -> Any:
    names, shares = expert_load(records)
    fig, (heat, line) = plt.subplots(1, 2, figsize=(11, max(3.0, 0.25 * len(names) + 1.5)),
                                     gridspec_kw={"width_ratios": [3, 2]})
    image = heat.imshow(shares, aspect="auto", interpolation="nearest", cmap="magma", origin="lower", vmin=0.0,
                        vmax=max(2.0, max(max(row) for row in shares)))
    heat.set_yticks(range(len(names)), names if len(names) <= 32 else [""] * len(names))
    heat.set(xlabel="expert", ylabel="MoE layer", title="tokens per expert over the run / even share")
    fig.colorbar(image, ax=heat)
    steps, peaks = zip(*max_expert_load(records))
    line.plot(steps, peaks, marker=".")
    line.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    line.set(xlabel="step", ylabel="most loaded expert / even share", title="worst expert load per step")
    line.grid(alpha=0.3)
    return fig
