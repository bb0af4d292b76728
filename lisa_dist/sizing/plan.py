"""`lisa-dist plan`: an analytic per-rank memory and communication model for FSDP2 and ZeRO-3.

Parameter counts come from the real model built on the meta device (any architecture `find_parts`
supports); activation sizes from its config. The peak is the largest of three moments of a step:

- a decoder layer's backward (the usual peak): resident state, the checkpointed layer inputs, the
  layer gathered with the next one prefetched, the previous unit's reduce-scatter still in flight, and
  the layer's weight and activation gradients;
- the head and loss: the gathered head and the full-vocabulary logits of one chunk;
- the post-backward update (adamw, sgd): every trainable gradient shard plus one shard's temporaries.

Checked against `lisa-dist estimate` and against measured runs (tests/fakepg/test_plan.py, docs/plan.md).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from dataclasses import dataclass
from typing import Any

from lisa_dist.config import Config
from lisa_dist.models.moe import router_aux, router_modules, routed_experts
from lisa_dist.sizing.memory import GIB, RESERVE_GIB, print_categories
from lisa_dist.sizing.shapes import UnitSize, draw_elements, heaviest_draw, rank_trained_elements, unit_sizes
from lisa_dist.validation import check_world_size


PCIE_GIB_S = 25.0
"""A PCIe 4.0 x16 link's practical rate in each direction (32 GB/s raw), for the time `plan` prints beside
the host-device bytes: the two directions run at once, and FSDP2 overlaps its copies with compute."""

# Levers in the order `plan` tries them: cheapest in speed first (docs/estimate.md measures each cost).
LEVERS: list[tuple[str, Any]] = [
    ("train.reduce_dtype", "param"),  # half the gradient traffic, bf16 summation
    ("train.loss_chunk_tokens", 1024),  # one more head matmul per chunk in backward
    ("model.activation_checkpointing", True),  # about one more forward per step
    ("engine.split_layers", True),  # more, smaller all-gathers and reduce-scatters per layer
    ("model.activation_offload", True),  # two host-device copies of each layer input per step
    ("optim.offload_state", True),  # two host-device copies of the active optimizer state per step
    ("engine.offload_params", True),  # FSDP2: every all-gather's shards from the host, the update on its processor
]


@dataclass(frozen=True, slots=True)
class ModelShape:
    total: int
    """All parameters."""
    layers: list[int]
    """Parameters of each decoder layer."""
    units: list[UnitSize]
    """Each unit `lisa.unit` samples (layers; attention and MLP blocks with their layer's norms, counted with every
    block as an upper bound; or each layer's routed experts and the rest of it). `plan` counts the heaviest draw
    of gamma of them (`heaviest_draw`), as `estimate` trains it."""
    largest_block: int
    """Parameters of the largest child block of a layer (the MLP for LLaMA)."""
    largest_param: int
    embeddings: int
    head: int
    """0 when tied to the embeddings."""
    norm: int
    hidden: int
    intermediate: int
    """The MLP width a token passes through in the widest layer: a dense layer's intermediate size; in a
    mixture-of-experts layer, top-k experts' and the shared experts' (from their parameters)."""
    vocab: int
    experts: int = 0
    """Routed experts per MoE layer (0: a dense model)."""
    top_k: int = 0
    """Experts each token is routed to."""
    router_aux_layers: int = 0
    """MoE layers whose router logits the load-balancing loss takes (0: the loss is off)."""

    @classmethod
    def of(cls, config: Config, hf_config: Any = None) -> ModelShape:
        """Counts from the model built on the meta device; `hf_config` when the caller already loaded it."""
        from lisa_dist.models import build_meta_model, find_parts
        from lisa_dist.models.build import DTYPES, load_hf_config

        hf_config = hf_config or load_hf_config(config)[0]
        model = build_meta_model(hf_config, DTYPES[config.train.dtype], config.model.attn_implementation,
                                 config.model.experts_implementation)
        parts = find_parts(model)

        def count(modules: list[Any]) -> int:
            return sum(p.numel() for m in modules if m is not None for p in m.parameters())

        layers = [count([layer]) for layer in parts.layers]
        units = _unit_sizes(parts, config.lisa.unit if config.method == "lisa" else "layer", layers)
        blocks = [count([child]) for layer in parts.layers[:1] for child in layer.children()]
        hidden = int(getattr(hf_config, "hidden_size", 0) or hf_config.n_embd)
        intermediate = int(getattr(hf_config, "intermediate_size", 0) or getattr(hf_config, "n_inner", 0)
                           or 4 * hidden)
        experts, top_k = routed_experts(hf_config), int(getattr(hf_config, "num_experts_per_tok", 0) or 0)
        aux_layers = sum(bool(router_modules(layer)) for layer in parts.layers) if router_aux(config, model) else 0
        if experts and top_k:
            intermediate = max(_routed_width(layer, hidden, experts, top_k, intermediate) for layer in parts.layers)
        return cls(total=sum(p.numel() for p in model.parameters()), layers=layers, units=units,
                   largest_block=max(blocks, default=layers[0]),
                   largest_param=max(p.numel() for p in model.parameters()),
                   embeddings=count(parts.embeddings),
                   head=0 if parts.tied_embeddings else count([parts.head]), norm=count([parts.norm]),
                   hidden=hidden, intermediate=intermediate, vocab=int(hf_config.vocab_size),
                   experts=experts if experts and top_k else 0, top_k=top_k if experts else 0,
                   router_aux_layers=aux_layers)

    def trainable(self, config: Config) -> int:
        """Elements updated in the heaviest draw (optimizer state and fp32 masters exist for these)."""
        return self._draw(config)[0]

    def with_gradients(self, config: Config) -> int:
        """Elements that get gradients in the heaviest draw: the trainable ones, with expert units every
        expert of a layer any of whose experts trains, with lisa.inactive_update every decoder layer's."""
        return self._draw(config)[1]

    def _draw(self, config: Config) -> tuple[int, int]:
        if config.method == "full":
            return self.total, self.total
        lisa = config.lisa
        trained, gradients = draw_elements(self.units, _heaviest(tuple(self.units), lisa.gamma))
        if lisa.inactive_update != "none":
            gradients = sum(self.layers)
        always = self.embeddings * lisa.train_embeddings + self.head * lisa.train_head + self.norm * lisa.train_norm
        return trained + always, gradients + always

    def rank_trainable(self, config: Config, world_size: int) -> tuple[float, int]:
        """`trainable` on the rank that holds the most of it (`rank_trained_elements`): (the elements spread
        evenly, the drawn experts', which sit whole on a rank)."""
        if config.method == "full":
            return self.total / world_size, 0
        lisa = config.lisa
        always = self.embeddings * lisa.train_embeddings + self.head * lisa.train_head + self.norm * lisa.train_norm
        spread, experts = rank_trained_elements(self.units, _heaviest(tuple(self.units), lisa.gamma), world_size)
        return spread + always / world_size, experts

    def active_share(self, config: Config) -> float:
        """The share of decoder-layer parameters with gradients in the heaviest draw (1 without LISA, or with
        lisa.inactive_update)."""
        if config.method == "full" or config.lisa.inactive_update != "none":
            return 1.0
        return draw_elements(self.units, _heaviest(tuple(self.units), config.lisa.gamma))[1] / sum(self.layers)


@functools.lru_cache(maxsize=16)
def _heaviest(units: tuple[UnitSize, ...], gamma: int) -> tuple[int, ...]:
    """`heaviest_draw`, once per model and gamma: `suggest_levers` plans a config many times, and a draw over
    thousands of expert units is not free."""
    return heaviest_draw(list(units), gamma)


def _unit_sizes(parts: Any, unit: str, layers: list[int]) -> list[UnitSize]:
    """What each unit `lisa.unit` samples holds; a block counts its layer's parameters outside every block (its
    norms), which train while any of its blocks does."""
    from lisa_dist.models import sampling_units

    units = sampling_units(parts, unit)
    if unit != "block":
        return unit_sizes(units)
    blocks = [u.numel() for u in units]
    rest = {i: layers[i] - sum(b for b, u in zip(blocks, units) if u.layer == i) for i in range(len(layers))}
    return [UnitSize(b + rest[u.layer], u.name, b + rest[u.layer]) for b, u in zip(blocks, units)]


def _routed_width(layer: Any, hidden: int, experts: int, top_k: int, dense: int) -> int:
    """The MLP width a token passes through in `layer`: with a router, top-k of the experts' (their 3-D
    parameters) plus the shared experts' (the rest of the router's parent but the router), as gated MLPs of
    3 x hidden x width; a dense layer's `dense`."""
    routers = router_modules(layer)
    if not routers:
        return dense
    mlp = next(m for m in layer.modules() if any(child is routers[0] for child in m.children()))
    routed = sum(p.numel() for p in mlp.parameters() if p.dim() == 3)
    rest = sum(p.numel() for p in mlp.parameters()) - routed - sum(p.numel() for p in routers[0].parameters())
    return round((top_k * routed / experts + rest) / (3 * hidden))


def _state_bytes_per_param(config: Config) -> float:
    """Optimizer state plus fp32 master, per trainable parameter (AdaLomo's factored state is negligible)."""
    low_precision = config.train.dtype != "fp32"
    name = config.optim.name
    if name == "adamw":
        return 8 + 4 * low_precision
    if name == "sgd":
        return 4 * (config.optim.momentum > 0) + 4 * low_precision
    return 0


def _element_bytes(config: Config) -> tuple[int, int]:
    """(bytes per parameter element, bytes per reduced gradient element)."""
    p = 2 if config.train.dtype in ("bf16", "fp16") else 4
    return p, 4 if config.train.reduce_dtype == "fp32" else p


def _backward_passes(config: Config, world_size: int) -> int:
    """Forward-backward passes per optimizer step on each rank: its micro-batches, twice with LOMO's precheck."""
    micro_batches = config.train.global_batch_size // (config.train.micro_batch_size * world_size)
    return micro_batches * (2 if config.optim.name in ("lomo", "adalomo") and config.optim.fused_precheck else 1)


def _gathers_per_pass(config: Config) -> int:
    """All-gathers of each parameter per pass: forward, and backward again once resharded."""
    return 2 if config.engine.reshard_after_forward or config.engine.name == "zero3" else 1


def _zero3_settings(config: Config, world_size: int, total: int, layer: int) -> tuple[int, int, bool, int | None]:
    """Parameters DeepSpeed holds gathered beyond the current layer: (prefetched, kept for reuse), whether
    it offloads parameters to the host, and the engine's gradient bucket (`reduce_bucket_size`, None for
    its default: the largest decoder-layer parameter).

    Backward prefetches up to `stage3_prefetch_bucket_size` parameters ahead; from the second step on,
    parameters whose next use is within `stage3_max_reuse_distance` stay gathered, up to
    `stage3_max_live_parameters` (with the defaults, the last layers and head across the
    forward-backward turn; a small model stays gathered whole). The two overlap: measured on 2 CPU ranks,
    the larger of them is held, plus one more prefetch bucket in flight (`plan_memory`, docs/zero3.md)."""
    from lisa_dist.engines.deepspeed_config import load_deepspeed_config

    zero = load_deepspeed_config(config, world_size).get("zero_optimization", {})
    offload = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
    rest = total - layer
    prefetch = min(int(zero.get("stage3_prefetch_bucket_size", 50_000_000)), rest)
    reuse = min(int(zero.get("stage3_max_live_parameters", 1_000_000_000)),
                int(zero.get("stage3_max_reuse_distance", 1_000_000_000)) // 2, rest)
    return prefetch, reuse, offload, zero.get("reduce_bucket_size")


def _saved_activations(c: Config, shape: ModelShape, tokens: int, p: int) -> tuple[float, float]:
    """(bytes of saved activations per layer, layers whose saved activations are held at the peak)."""
    # Without checkpointing, what a LLaMA layer keeps per token: norm inputs and fp32 statistics, q/k/v,
    # the attention output, four MLP-wide tensors; a frozen LISA layer's linears keep no inputs (no
    # weight gradient), about 3h + I less. Fitted to `estimate` at 7B, 13B and 70B shapes (docs/plan.md).
    per_token = 12 * shape.hidden + 4 * shape.intermediate
    frozen_saves = 3 * shape.hidden + shape.intermediate
    if shape.experts:
        # Routing keeps each token's copies for its top-k experts (their input, and their output before it is
        # weighted), and the router's fp32 probabilities; a frozen layer's experts keep no inputs.
        per_token += 2 * shape.top_k * shape.hidden + shape.experts * 4 / p
        frozen_saves += shape.top_k * shape.hidden
    if c.method == "lisa":
        per_token -= (1 - shape.active_share(c)) * frozen_saves
    if c.model.activation_checkpointing:  # only the layer input, and every one of them is still held
        return tokens * shape.hidden * p, len(shape.layers)
    # at the peak, in an early backward layer, about 1.5 layers' saved tensors are already released
    return tokens * per_token * p, max(len(shape.layers) - 1.5, 0.5)


def _gradient_bytes(c: Config, shape: ModelShape, n: int, p: int) -> tuple[float, float]:
    """(all gradient shards, those alive in a layer's backward) for post-backward optimizers.

    They are kept until the update (plus an fp32 sum when accumulating); in a layer's backward those of
    the head and, on average, half of the trainable layers exist. Experts' parts keep only their fp32 sums
    (`ShardedOptimizer.stash_grad`), whole on the rank that holds them."""
    if c.optim.name in ("lomo", "adalomo"):
        return 0.0, 0.0
    accumulation = c.train.global_batch_size // (c.train.micro_batch_size * n)
    per_element = p + (4 if accumulation > 1 else 0)
    spread, experts = shape.rank_trainable(c, n)
    full = c.method == "full"
    head = ((shape.head + shape.norm) if full or c.lisa.train_head else 0) / n
    embeddings = (shape.embeddings if full or c.lisa.train_embeddings else 0) / n
    return (spread * per_element + 4 * experts,
            (head + (spread - head - embeddings) / 2) * per_element + 4 * experts / 2)


def plan_memory(config: Config, shape: ModelShape, world_size: int) -> dict[str, float]:
    """Per-rank bytes by category at the peak moment of a step, plus `peak`, `phase` and `host`."""
    c, n = config, world_size
    p, r = _element_bytes(c)
    tokens = c.train.micro_batch_size * c.data.seq_len
    state_bytes = sum(shape.rank_trainable(c, n)) * _state_bytes_per_param(c)
    layer, block = max(shape.layers), shape.largest_block
    zero3 = c.engine.name == "zero3"
    gathered = _zero3_settings(c, n, shape.total, layer) if zero3 else (layer, 0, False, None)
    prefetch, kept, offload_params, bucket = gathered
    # FSDP2's parameter offload keeps the shards in host memory, and with them their gradients, the
    # optimizer state and each update (FSDP2 copies gradients to the host after the reduce-scatter); the
    # device holds one unit's shards copied in for its all-gather.
    fsdp2_offload = c.engine.offload_params and not zero3
    per_layer, held_layers = _saved_activations(c, shape, tokens, p)
    checkpoints = 0.0 if c.model.activation_offload else held_layers * per_layer
    all_grads, mid_backward_grads = _gradient_bytes(c, shape, n, p)
    host_grads = all_grads if fsdp2_offload else 0.0
    if fsdp2_offload:
        all_grads = mid_backward_grads = 0.0
    state_on_host = c.optim.offload_state or fsdp2_offload
    resident = {"sharded_params": 0.0 if offload_params or fsdp2_offload else shape.total * p / n,
                "optimizer_state": 0.0 if state_on_host else state_bytes}
    if fsdp2_offload:
        unit = block if c.engine.split_layers else layer
        resident["host_to_device_copies"] = max(unit, shape.embeddings, shape.head + shape.norm) * p / n

    # A layer's backward: the gathered layer, the next one prefetched (FSDP2 without split: a whole layer;
    # ZeRO-3: its prefetch bucket or what it keeps for reuse), the previous unit's reduce-scatter input
    # (ZeRO-3: a gradient bucket, by default the largest layer parameter's, so within a block; at most a layer),
    # and the weight gradients of the block being differentiated with the MLP-wide activation gradients.
    # ZeRO-3 also holds the flat buffer of a prefetch bucket in flight: its coalesced all-gather lands every
    # rank's partitions in one buffer and copies each parameter out of it, so the bucket exists twice until
    # the last copy (docs/zero3.md). Saved weights cost nothing extra: the engine keeps them by reference.
    split = c.engine.split_layers and not zero3
    gathered_next = max(prefetch, kept) + prefetch if zero3 else 0 if split or not c.engine.backward_prefetch else layer
    recomputed = tokens * (shape.hidden + shape.intermediate) * p if c.model.activation_checkpointing else 0
    phases = {"layer backward": {
        "sharded_grads": mid_backward_grads, "unsharded_params": layer * p,
        "all_gather_buffers": gathered_next * p,
        "reduce_scatter_buffers": 0 if split else (min(layer, max(block, bucket or 0)) if zero3 else layer) * r,
        "temporaries": block * p + 4 * tokens * shape.intermediate * p, "activations": checkpoints + recomputed}}
    # The head and loss: logits, their fp32 copy and the saved fp32 log-softmax (offloaded with activations).
    chunk = min(c.train.loss_chunk_tokens or tokens, tokens)
    head = shape.head or shape.embeddings
    # The router load-balancing loss over every MoE layer's fp32 logits: their concatenation and softmax, and
    # transformers' int64 one-hot of each token's top-k experts.
    router_loss = shape.router_aux_layers * tokens * shape.experts * (8 + 8 * shape.top_k)
    phases["head and loss"] = {
        "unsharded_params": head * p, "reduce_scatter_buffers": head * r, "activations": checkpoints,
        "temporaries": chunk * shape.vocab * (p + 4 + 4 * (not c.model.activation_offload)) + router_loss}
    if all_grads:  # the post-backward update: fp32 gradient and rule temporaries of the largest shard
        staged = 12 if c.optim.offload_state else 0  # its state brought from the host
        phases["update"] = {"sharded_grads": all_grads, "temporaries": shape.largest_param / n * (12 + staged)}
    totals = {name: sum(terms.values()) for name, terms in phases.items()}
    phase = max(totals, key=totals.get)
    host = ((shape.total * p / n if offload_params or fsdp2_offload else 0) + (state_bytes if state_on_host else 0)
            + host_grads + (len(shape.layers) * per_layer if c.model.activation_offload else 0))
    return {**resident, **phases[phase], "peak": sum(resident.values()) + totals[phase], "phase": phase,
            "host": host}


def plan_communication(config: Config, shape: ModelShape, world_size: int) -> dict[str, float]:
    """Bytes each rank sends per optimizer step (ring collectives: (n-1)/n of the full tensor each)."""
    c, n = config, world_size
    p, r = _element_bytes(c)
    ring = (n - 1) / n
    passes = _backward_passes(c, n)
    all_gather = ring * shape.total * p * _gathers_per_pass(c) * passes
    reduce_scatter = ring * shape.with_gradients(c) * r * passes
    return {"all_gather": all_gather, "reduce_scatter": reduce_scatter, "total": all_gather + reduce_scatter}


def plan_host_traffic(config: Config, shape: ModelShape, world_size: int) -> dict[str, float]:
    """Bytes each rank copies between host and device memory per optimizer step (PCIe on a GPU machine):
    offloaded parameter shards to the device for every all-gather, with FSDP2 their gradient shards back
    after every reduce-scatter; offloaded activations both ways; offloaded optimizer state both ways for
    each update (not with FSDP2's parameter offload, where the update runs on the host)."""
    c, n = config, world_size
    p, r = _element_bytes(c)
    zero3 = c.engine.name == "zero3"
    passes = _backward_passes(c, n)
    offload_params = _zero3_settings(c, n, shape.total, max(shape.layers))[2] if zero3 else c.engine.offload_params
    to_device = to_host = 0.0
    if offload_params:
        to_device += shape.total * p / n * _gathers_per_pass(c) * passes
        to_host += 0.0 if zero3 else shape.with_gradients(c) * r / n * passes
    if c.model.activation_offload:
        per_layer = _saved_activations(c, shape, c.train.micro_batch_size * c.data.seq_len, p)[0]
        to_device += len(shape.layers) * per_layer * passes
        to_host += len(shape.layers) * per_layer * passes
    if c.optim.offload_state and not (offload_params and not zero3):
        state = sum(shape.rank_trainable(c, n)) * _state_bytes_per_param(c)
        to_device, to_host = to_device + state, to_host + state
    return {"to_device": to_device, "to_host": to_host, "total": to_device + to_host}


def run_plan(config: Config, world_size: int, gpu_mem_gib: float, reserve_gib: float = RESERVE_GIB,
             suggest: bool = True) -> dict[str, Any]:
    from lisa_dist.models.build import check_against_model, load_hf_config

    check_world_size(config, world_size)
    hf_config = load_hf_config(config)[0]
    check_against_model(config, hf_config)
    shape = ModelShape.of(config, hf_config)
    budget = gpu_mem_gib - reserve_gib
    memory = plan_memory(config, shape, world_size)
    comm = plan_communication(config, shape, world_size)
    traffic = plan_host_traffic(config, shape, world_size)
    result: dict[str, Any] = {
        "engine": config.engine.name, "method": config.method, "optim": config.optim.name,
        "world_size": world_size, "parameters": shape.total, "trainable": shape.trainable(config),
        "peak_gib": memory["peak"] / GIB, "fits": memory["peak"] / GIB <= budget, "budget_gib": budget,
        "gpu_mem_gib": gpu_mem_gib, "reserve_gib": reserve_gib, "peak_phase": memory["phase"],
        "host_offload_gib": memory["host"] / GIB,
        "categories": {k: v / GIB for k, v in memory.items() if k not in ("peak", "phase", "host")},
        "send_gib_per_step": {k: v / GIB for k, v in comm.items()},
        "host_device_gib_per_step": {k: v / GIB for k, v in traffic.items()},
    }
    if suggest:
        result["suggestion"] = suggest_levers(config, shape, world_size, budget)
    return result


def suggest_levers(config: Config, shape: ModelShape, world_size: int, budget_gib: float) -> dict[str, Any] | None:
    """The cheapest set of levers (fewest, then cheapest by LEVERS order) under which the plan fits.
    Parameter offload is the last resort, tried only when nothing without it fits: it copies every shard
    to the device for each all-gather and runs the update on the host."""
    available = [(key, value) for key, value in LEVERS if _get(config, key) != value
                 and not (key in ("engine.split_layers", "engine.offload_params") and config.engine.name == "zero3")]
    cheap = [lever for lever in available if lever[0] != "engine.offload_params"]
    last_resort = [lever for lever in available if lever[0] == "engine.offload_params"]
    ordered = [combo for size in range(len(cheap) + 1) for combo in itertools.combinations(cheap, size)]
    for combo in ordered + [(*combo, *last_resort) for combo in ordered if last_resort]:
        candidate = config
        for key, value in combo:
            candidate = _set(candidate, key, value)
        memory = plan_memory(candidate, shape, world_size)
        if memory["peak"] / GIB <= budget_gib:
            return {"overrides": [f"{key}={json.dumps(value)}" for key, value in combo],
                    "peak_gib": memory["peak"] / GIB, "host_offload_gib": memory["host"] / GIB}
    return None


def _get(config: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def _set(config: Config, key: str, value: Any) -> Config:
    section, name = key.split(".")
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **{name: value})})


def print_plan(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    print(f"{result['method']} + {result['optim']} on {result['engine']}, {result['world_size']} ranks "
          f"({result['parameters'] / 1e9:.2f} B parameters, {result['trainable'] / 1e9:.2f} B trainable): "
          f"peak {result['peak_gib']:.2f} GiB per rank in {result['peak_phase']}; budget "
          f"{result['budget_gib']:.2f} GiB: {'fits' if result['fits'] else 'does NOT fit'}")
    print_categories(result["categories"])
    if result["host_offload_gib"]:
        print(f"  host memory (offloaded)  {result['host_offload_gib']:9.3f} GiB")
    send = result["send_gib_per_step"]
    print(f"sends per rank per step: {send['total']:.2f} GiB (all-gather {send['all_gather']:.2f}, "
          f"reduce-scatter {send['reduce_scatter']:.2f})")
    copies = result["host_device_gib_per_step"]
    if copies["total"]:
        print(f"host-device copies per rank per step: {copies['to_device']:.2f} GiB to the device, "
              f"{copies['to_host']:.2f} GiB to the host (at least "
              f"{max(copies['to_device'], copies['to_host']) / PCIE_GIB_S:.1f} s on a PCIe 4.0 x16 link, "
              f"{PCIE_GIB_S:g} GiB/s each way)")
    suggestion = result.get("suggestion")
    if not result["fits"]:
        if suggestion is None:
            print("no combination of levers fits: add ranks (--world-size) or use a larger card")
        else:
            host = (f", {suggestion['host_offload_gib']:.2f} GiB of host memory per rank"
                    if suggestion["host_offload_gib"] else "")
            print(f"cheapest settings that fit ({suggestion['peak_gib']:.2f} GiB{host}): "
                  f"{' '.join(suggestion['overrides'])}")
