"""Response-token cross-entropy, optionally over chunks of the sequence so the full-vocabulary logits of
the whole sequence never exist at once (32000 x seq_len x 4 bytes in fp32)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lisa_dist.models.moe import RouterAux


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


def loss_sum(model: nn.Module, head: nn.Module, batch: dict[str, Any], chunk_tokens: int,
             device: torch.device, model_inputs: tuple[str, ...] = ("input_ids",)) -> torch.Tensor:
    """Sum of token losses over the labelled tokens of one micro-batch (`loss_sum_and_router_aux`)."""
    return loss_sum_and_router_aux(model, head, batch, chunk_tokens, device, None, model_inputs)[0]


def loss_sum_and_router_aux(model: nn.Module, head: nn.Module, batch: dict[str, Any], chunk_tokens: int,
                            device: torch.device, router_aux: RouterAux | None,
                            model_inputs: tuple[str, ...] = ("input_ids",)) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum of token losses over the labelled tokens of one micro-batch (labels shifted by one), and with
    `router_aux` the micro-batch's router load-balancing loss (unweighted).

    By default no attention mask is passed (`lisa-dist train`): its sequences are right-padded and attention
    is causal, so no real token ever attends to padding, and padded positions carry no label. Without a mask,
    SDPA runs its causal flash/memory-efficient kernels instead of materializing seq_len x seq_len scores per
    head. `model_inputs` names the batch entries the model gets (a Trainer script's collator may pad left, or
    pack sequences into one row with their position ids and lengths)."""
    inputs = {key: batch[key].to(device) if isinstance(batch[key], torch.Tensor) else batch[key]
              for key in model_inputs if key in batch}
    labels = batch["labels"].to(device)
    routers = {} if router_aux is None else {"output_router_logits": True}
    if chunk_tokens <= 0:
        out = model(**inputs, use_cache=False, **routers)
        loss = logits_loss_sum(out.logits, labels)
    else:
        out = model.base_model(**inputs, use_cache=False, **routers)
        loss = _ChunkedHeadLoss(head, chunk_tokens)(out[0][:, :-1], labels[:, 1:])
    if router_aux is None:
        return loss, None
    # The routers' balance over the micro-batch's real tokens: padding is masked out here, though not from
    # the forward (right padding under causal attention changes no real token).
    mask = batch.get("attention_mask")
    return loss, router_aux.loss(out.router_logits, None if mask is None else mask.to(device))


def logits_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token losses of a forward's logits against the unshifted `labels`."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


class _ChunkedHeadLoss(nn.Module):
    """A module around the chunk loop, so module-level tools (FSDP2's memory tracker) see the repeated
    head calls nested in one forward rather than as separate iterations."""

    def __init__(self, head: nn.Module, chunk_tokens: int) -> None:
        super().__init__()
        self.head = [head]  # a list: not registered as a submodule, the model owns it
        self.chunk_tokens = chunk_tokens

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[1], self.chunk_tokens):
            end = start + self.chunk_tokens
            # Each chunk's logits are recomputed in backward, so only one chunk's logits live at a time.
            total = total + checkpoint(_chunk_loss, self.head[0], hidden[:, start:end], labels[:, start:end],
                                       use_reentrant=False)
        return total
