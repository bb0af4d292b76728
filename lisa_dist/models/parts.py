"""Find a causal LM's decoder stack, embeddings, final norm and head from its structure."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lisa_dist.errors import UnsupportedModelError
from lisa_dist.models.moe import expert_modules


# model_type -> dotted path of the final norm, where the structural search would be ambiguous.
_FINAL_NORM = {
    "llama": "model.norm",
    "mistral": "model.norm",
    "qwen2": "model.norm",
    "qwen3": "model.norm",
    "gpt2": "transformer.ln_f",
}


@dataclass(frozen=True, slots=True)
class ModelParts:
    layers: list[nn.Module]
    """Decoder layers in order; LISA samples among these."""
    embeddings: list[nn.Module]
    """Input (and position) embeddings."""
    norm: nn.Module | None
    head: nn.Module | None
    tied_embeddings: bool

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _num_layers_from_config(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _find_decoder_stack(model: nn.Module) -> nn.ModuleList:
    expected = _num_layers_from_config(model)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            # ZeRO-3 partitioned parameters hold no data outside forward; ds_numel is their real size.
            if len(kinds) == 1 and any(getattr(p, "ds_numel", p.numel()) for p in module.parameters()):
                candidates.append((name, module))
    if expected is not None:
        candidates = [(n, m) for n, m in candidates if len(m) == expected]
    if len(candidates) != 1:
        found = ", ".join(f"{n} ({len(m)})" for n, m in candidates) or "none"
        raise UnsupportedModelError(
            f"cannot find the decoder stack of {type(model).__name__}: expected one ModuleList of "
            f"{expected} identical layers, found {found}")
    return candidates[0][1]


def _find_final_norm(model: nn.Module, stack: nn.ModuleList) -> nn.Module | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _FINAL_NORM:
        return model.get_submodule(_FINAL_NORM[model_type])
    in_stack = {id(m) for m in stack.modules()}
    norms = [m for n, m in model.named_modules()
             if "norm" in type(m).__name__.lower() and id(m) not in in_stack and n.count(".") <= 1]
    return norms[-1] if norms else None


def find_parts(model: nn.Module) -> ModelParts:
    stack = _find_decoder_stack(model)
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        raise UnsupportedModelError(f"{type(model).__name__} is not a Hugging Face causal LM (no get_input_embeddings)")
    embed = get_in()
    head = get_out()
    embeddings = [embed]
    position = getattr(getattr(model, "transformer", None), "wpe", None)
    if isinstance(position, nn.Embedding):
        embeddings.append(position)
    tied = head is not None and head.weight is embed.weight
    parts = ModelParts(layers=list(stack), embeddings=embeddings, norm=_find_final_norm(model, stack),
                       head=head, tied_embeddings=tied)
    _check_coverage(model, parts)
    return parts


def _check_coverage(model: nn.Module, parts: ModelParts) -> None:
    covered = set()
    modules = [*parts.layers, *parts.embeddings, parts.norm, parts.head]
    for module in modules:
        if module is not None:
            covered.update(id(p) for p in module.parameters())
    stray = [n for n, p in model.named_parameters() if id(p) not in covered]
    if stray:
        raise UnsupportedModelError(
            f"{type(model).__name__} has parameters outside the decoder stack, embeddings, final norm and head: "
            f"{', '.join(stray[:5])}")


def layer_blocks(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """A decoder layer's blocks: its children holding at least a tenth of its parameters (attention and MLP;
    the norms are too small). These are FSDP2's `engine.split_layers` units and `lisa.unit=block`'s."""
    def numel(module: nn.Module) -> int:  # ZeRO-3 partitioned parameters hold no data; ds_numel is their size
        return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())

    total = numel(layer)
    return [(name, child) for name, child in layer.named_children() if numel(child) * 10 >= total]


@dataclass(frozen=True, slots=True, eq=False)
class SampledUnit:
    """What LISA samples: a whole decoder layer, one block of it (`lisa.unit=block`), or one routed expert of it or
    the rest of it (`lisa.unit=expert`)."""

    name: str
    """"3" for layer 3; "3.self_attn", "3.mlp" for its blocks; "3.e5" for its expert 5 (and "3" for the rest)."""
    layer: int
    module: nn.Module
    expert: int | None = None
    """lisa.unit=expert: the routed expert this unit trains, of each of `routed`; None for the rest of the layer."""
    routed: tuple[nn.Parameter, ...] = ()
    """lisa.unit=expert: the layer's parameters stacked by routed expert ([experts, ...])."""

    def parameters(self) -> list[nn.Parameter]:
        """The parameters this unit trains (an expert: its slice of each; the rest of a layer: all but `routed`)."""
        if self.expert is not None:
            return list(self.routed)
        skip = {id(p) for p in self.routed}
        return [p for p in self.module.parameters() if id(p) not in skip]

    def numel(self) -> int:
        """Elements this unit trains (ZeRO-3 partitioned parameters hold no data; ds_numel is their size)."""
        sizes = [getattr(p, "ds_numel", p.numel()) for p in self.parameters()]
        if self.expert is None:
            return sum(sizes)
        return sum(size // _shape(p)[0] for size, p in zip(sizes, self.routed))

    def gradient_numel(self) -> int:
        """Elements that get gradients while this unit trains: its own, or for an expert every expert's of its
        layer (autograd differentiates a stacked parameter whole)."""
        if self.expert is None:
            return self.numel()
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.routed)


def _shape(p: nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def routed_parameters(layer: nn.Module) -> tuple[nn.Parameter, ...]:
    """A layer's parameters stacked by routed expert: those of its experts modules (3-D weights) whose leading
    dimension is the experts' count, biases per expert included; () for a dense layer."""
    own = [p for m in expert_modules(layer) for p in m.parameters(recurse=False)]
    experts = next((_shape(p)[0] for p in own if len(_shape(p)) == 3), None)
    return tuple(p for p in own if len(_shape(p)) >= 2 and _shape(p)[0] == experts)


def sampling_units(parts: ModelParts, unit: str) -> list[SampledUnit]:
    if unit == "layer":
        return [SampledUnit(str(i), i, layer) for i, layer in enumerate(parts.layers)]
    if unit == "expert":
        return _expert_units(parts)
    units = []
    for i, layer in enumerate(parts.layers):
        blocks = layer_blocks(layer)
        if len(blocks) < 2:
            raise UnsupportedModelError(
                f"lisa.unit=block: decoder layer {i} of {type(layer).__name__} has {len(blocks)} block(s) "
                "holding a tenth of its parameters or more, not separate attention and MLP blocks; use lisa.unit=layer")
        units += [SampledUnit(f"{i}.{name}", i, block) for name, block in blocks]
    return units


def _expert_units(parts: ModelParts) -> list[SampledUnit]:
    """Per layer, the rest of it (attention, router, shared experts, norms), then each routed expert."""
    units = []
    for i, layer in enumerate(parts.layers):
        routed = routed_parameters(layer)
        units.append(SampledUnit(str(i), i, layer, routed=routed))
        experts = _shape(routed[0])[0] if routed else 0
        units += [SampledUnit(f"{i}.e{e}", i, layer, expert=e, routed=routed) for e in range(experts)]
    if len(units) == len(parts.layers):
        raise UnsupportedModelError(
            f"lisa.unit=expert: {type(parts.layers[0]).__name__} layers hold no routed experts (parameters stacked "
            "by expert); it is a dense model: use lisa.unit=layer or block")
    return units


def set_trainable_units(parts: ModelParts, units: list[SampledUnit], active: tuple[int, ...],
                        train_embeddings: bool, train_norm: bool, train_head: bool,
                        frozen: tuple[nn.Module, ...] = ()) -> dict[int, tuple[int, ...]]:
    """Flip requires_grad so only the active units (and the always-trained parts) get gradients. With block
    units, a layer's parameters outside its blocks (its norms) train while any of its blocks does; with expert
    units, a layer's stacked parameters train while any of its experts does. `frozen` modules (the routers, with
    model.freeze_routers) never train. Returns, by id of each stacked parameter that trains, its active experts
    (the optimizer keeps state for those only)."""
    active_layers = {units[u].layer for u in active}
    for i, layer in enumerate(parts.layers):
        layer.requires_grad_(i in active_layers)
    experts: dict[int, tuple[int, ...]] = {}
    if any(unit.routed for unit in units):
        on = {id(p) for u in active for p in units[u].parameters()}
        for unit in units:
            for p in unit.parameters():
                p.requires_grad_(id(p) in on)
        for u in sorted(active, key=lambda u: units[u].expert or 0):
            if units[u].expert is not None:
                for p in units[u].routed:
                    experts[id(p)] = (*experts.get(id(p), ()), units[u].expert)
    elif len(units) != len(parts.layers):
        for u, unit in enumerate(units):
            unit.module.requires_grad_(u in active)
    for modules, on in ((parts.embeddings, train_embeddings), ([parts.norm], train_norm), ([parts.head], train_head)):
        for module in modules:
            if module is not None:
                module.requires_grad_(on)
    if parts.tied_embeddings and (train_embeddings or train_head):
        parts.embeddings[0].weight.requires_grad_(True)
    for module in frozen:
        module.requires_grad_(False)
    return experts
