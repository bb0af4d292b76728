"""Activation offload: the saved-tensor round trip gives the same gradients and never copies parameters."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lisa_dist.offload as offload
from lisa_dist.offload import MIN_OFFLOAD_BYTES, offload_saved_tensors


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 3 * width)
        self.down = nn.Linear(3 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.silu(self.up(x)))


def _grads(model: nn.Module, x: torch.Tensor, use_offload: bool, recompute: bool) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with offload_saved_tensors(torch.device("cpu"), enabled=use_offload):
        h = x
        for block in model:
            h = checkpoint(block, h, use_reentrant=False) if recompute else block(h)
        loss = h.pow(2).mean()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_offloaded_activations_give_the_same_gradients_and_skip_parameters(monkeypatch):
    torch.manual_seed(0)
    width = 256
    model = nn.Sequential(*[_Block(width) for _ in range(3)])
    x = torch.randn(2048, width)  # 2 MiB activations: above the offload threshold
    copied: list[torch.Tensor] = []
    original = offload.to_host

    def recording(t, host, non_blocking=False):
        copied.append(t)
        return original(t, host, non_blocking)

    monkeypatch.setattr(offload, "to_host", recording)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for recompute in (False, True):
        copied.clear()
        plain = _grads(model, x, use_offload=False, recompute=recompute)
        assert not copied
        offloaded = _grads(model, x, use_offload=True, recompute=recompute)
        assert copied, "nothing was offloaded"
        assert all(t.untyped_storage().data_ptr() not in params for t in copied)
        assert all(t.numel() * t.element_size() >= MIN_OFFLOAD_BYTES for t in copied)
        for a, b in zip(plain, offloaded):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # with recomputation only each block's input is saved, plus the output the loss's pow keeps
    assert len(copied) == 4 and all(t.shape == x.shape for t in copied)


def _release(model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """What DeepSpeed ZeRO-3 does after a module's forward: each parameter's data becomes an empty tensor."""
    gathered = {p: p.data for p in model.parameters()}
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype)
    return gathered


def test_saved_parameter_views_by_reference_free_released_weights_and_give_the_same_gradients():
    """The transposed weight a linear saves keeps a released parameter's storage alive unless kept by
    reference; by reference, backward rebuilds it from the data gathered again, with the same gradients."""
    torch.manual_seed(0)
    model = _Block(64)
    x = torch.randn(32, 64, requires_grad=True)  # so that both linears save their weight for the input's gradient
    model(x).pow(2).sum().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    for by_reference in (False, True):
        model.zero_grad(set_to_none=True)
        with offload_saved_tensors(torch.device("cpu"), enabled=False, parameters_by_reference=by_reference):
            loss = model(x).pow(2).sum()
        gathered = _release(model)
        freed = {p: storage.untyped_storage()._weak_ref() for p, storage in gathered.items()}
        weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
        # restored as DeepSpeed gathers them again: a new tensor with the same values
        restored = {p: t.clone() for p, t in gathered.items()}
        del gathered
        alive = [not torch.UntypedStorage._expired(freed[p]) for p in weights]
        assert alive == [not by_reference] * len(weights)
        for p, t in restored.items():
            p.data = t
        loss.backward()
        for a, b in zip(reference, [p.grad for p in model.parameters()]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_parameter_released_before_its_backward_names_the_problem():
    model = _Block(16)
    with offload_saved_tensors(torch.device("cpu"), enabled=False, parameters_by_reference=True):
        loss = model(torch.randn(4, 16)).sum()
    _release(model)
    with pytest.raises(RuntimeError, match="released it before that module's backward"):
        loss.backward()


def test_an_in_place_change_to_a_saved_tensor_is_still_refused_under_the_hooks():
    """Autograd skips its version check for tensors that pass through saved-tensor hooks; the hooks do it."""
    x = torch.randn(8, requires_grad=True)
    with offload_saved_tensors(torch.device("cpu"), enabled=False, parameters_by_reference=True):
        y = x.exp()  # exp saves its output
        y.mul_(3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_a_view_of_data_the_parameter_no_longer_holds_is_kept_as_it_is():
    """A view saved before the engine swapped the parameter's data keeps its own values."""
    w = nn.Parameter(torch.arange(4.0))
    old = w.t()  # a view of the data w holds now
    w.data = torch.zeros(4)  # the engine swapped in other data
    x = torch.ones(4, requires_grad=True)
    with offload_saved_tensors(torch.device("cpu"), enabled=False, parameters_by_reference=True):
        loss = (x * old).sum()
    loss.backward()
    assert x.grad.tolist() == [0.0, 1.0, 2.0, 3.0]
