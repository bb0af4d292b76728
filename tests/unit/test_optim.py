import pytest
import torch
from torch import nn

from lisa_dist.config import LisaConfig, OptimConfig
from lisa_dist.optim import ShardedOptimizer, lr_at, make_rule
from lisa_dist.optim.rules import AdaLomo, Sgd, SignSgd, inactive_lr, make_inactive_rule
from lisa_dist.optim.shard_info import ShardInfo, local_shard_info
from lisa_dist.optim.sharded_optimizer import UpdateOptions


class _Unsharded:
    """Shard access for plain tensors in one process."""

    def local_shard(self, param):
        return param.data

    def local_grad(self, param):
        return param.grad

    def shard_info(self, param):
        return local_shard_info(param)

    def release_grad(self, param):
        param.grad = None


PLAIN = _Unsharded()


@pytest.mark.parametrize("name, kwargs, reference", [
    ("adamw", {"weight_decay": 0.1}, lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)),
    ("sgd", {"weight_decay": 0.01}, lambda ps: torch.optim.SGD(ps, lr=1e-2, weight_decay=0.01)),
    ("sgd", {"momentum": 0.9}, lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9)),
])
def test_rules_match_torch_optimizers(name, kwargs, reference):
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(5, 3)) for _ in range(2)]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = ShardedOptimizer(make_rule(OptimConfig(name=name, lr=1e-2, **kwargs)), PLAIN)
    opt.set_trainable({f"p{i}": p for i, p in enumerate(ours)})
    ref_opt = reference(ref)
    for _ in range(5):
        grads = [torch.randn(5, 3) for _ in ours]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step(UpdateOptions(lr=1e-2))
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.data, q.data, rtol=1e-6, atol=1e-7)


def test_bf16_parameters_get_fp32_masters_and_state_is_freed_when_a_parameter_leaves():
    a = nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    b = nn.Parameter(torch.randn(8, 4, dtype=torch.bfloat16))
    opt = ShardedOptimizer(make_rule(OptimConfig(name="adamw", lr=1e-3)), PLAIN)
    opt.set_trainable({"a": a, "b": b})
    assert opt.slots["a"].master.dtype == torch.float32
    assert opt.state_bytes() == (16 + 32) * 4 * 3  # master, exp_avg, exp_avg_sq in fp32
    entered, left = opt.set_trainable({"b": b})
    assert (entered, left) == ([], ["a"])
    assert opt.state_bytes() == 32 * 4 * 3


def test_state_dict_round_trip_restores_moments_steps_and_masters():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16)) for _ in range(2)]
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    grads = [[torch.randn(4, 4, dtype=torch.bfloat16) for _ in params] for _ in range(3)]

    def optimizer(ps):
        opt = ShardedOptimizer(make_rule(OptimConfig(name="adamw", lr=1e-2)), PLAIN)
        opt.set_trainable({f"p{i}": p for i, p in enumerate(ps)})
        return opt

    first, second = optimizer(params), optimizer(copies)
    for step in grads[:2]:
        for p, g in zip(params, step):
            p.grad = g.clone()
        first.step(UpdateOptions(lr=1e-2))
    second.load_state_dict({n: {k: t.clone() for k, t in s.items()} for n, s in first.state_dict().items()})
    assert all(torch.equal(p, q) for p, q in zip(params, copies))  # the shards follow the loaded masters
    for opt, ps in ((first, params), (second, copies)):
        for p, g in zip(ps, grads[2]):
            p.grad = g.clone()
        opt.step(UpdateOptions(lr=1e-2))
    assert all(torch.equal(p, q) for p, q in zip(params, copies))
    with pytest.raises(ValueError, match="does not match the trainable parameters"):
        optimizer(copies[:1]).load_state_dict(first.state_dict())


def test_small_updates_accumulate_in_the_fp32_master():
    p = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = ShardedOptimizer(make_rule(OptimConfig(name="sgd", lr=1.0)), PLAIN)
    opt.set_trainable({"p": p})
    for _ in range(100):
        p.grad = torch.full((4,), 1e-4, dtype=torch.bfloat16)
        opt.step(UpdateOptions(lr=1.0))
    # each step alone is below bf16 resolution at 1.0, but the master keeps the sum
    assert float(p.data[0]) == pytest.approx(0.99, abs=4e-3)


def test_lr_schedules():
    c = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(c, 0, 20) == pytest.approx(0.25)
    assert lr_at(c, 3, 20) == pytest.approx(1.0)
    assert lr_at(c, 4, 20) == pytest.approx(1.0)
    assert lr_at(c, 20, 20) == pytest.approx(0.1)
    linear = OptimConfig(lr=1.0, schedule="linear")
    assert lr_at(linear, 5, 10) == pytest.approx(0.5)
    assert lr_at(OptimConfig(lr=0.3), 7, 10) == pytest.approx(0.3)


def test_low_precision_gradients_accumulate_in_fp32():
    p = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    opt = ShardedOptimizer(make_rule(OptimConfig(name="sgd", lr=1.0)), PLAIN)
    opt.set_trainable({"p": p})
    p.grad = torch.ones(4, dtype=torch.bfloat16)
    opt.stash_grad("p")
    for _ in range(99):
        p.grad = torch.full((4,), 1e-3, dtype=torch.bfloat16)
        opt.stash_grad("p")
        assert p.grad is None
    p.grad = torch.full((4,), 1e-3, dtype=torch.bfloat16)
    total = opt.full_grad(opt.slots["p"])
    # in bf16, 1 + 1e-3 rounds back to 1 every time; the fp32 accumulator keeps all hundred
    assert total.dtype == torch.float32
    assert float(total[0]) == pytest.approx(1.0 + 100 * float(torch.tensor(1e-3, dtype=torch.bfloat16)), rel=1e-6)


def test_the_last_micro_batch_counts_once_when_the_norm_is_taken_before_the_update():
    """Post-backward path with accumulation: `grad_sq_sum` (for clipping) and then `step` both ask for the
    accumulated gradient; the last micro-batch's gradient must be added once."""
    p = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    opt = ShardedOptimizer(make_rule(OptimConfig(name="sgd", lr=1.0)), PLAIN)
    opt.set_trainable({"p": p})
    p.grad = torch.ones(4, dtype=torch.bfloat16)
    opt.stash_grad("p")
    p.grad = torch.ones(4, dtype=torch.bfloat16)
    assert float(opt.grad_sq_sum()) == 16.0  # (1 + 1)^2 over 4 elements
    opt.step(UpdateOptions(lr=1.0))
    assert p.data.tolist() == [-2.0] * 4


def test_adamw_over_many_shards_at_once_is_torchs_multi_tensor_adamw_bit_for_bit():
    """Shards of three sizes, updated in groups (of at most the largest shard's elements) through
    torch._foreach_*: the same numbers as torch.optim.AdamW(foreach=True), and as one shard at a time."""
    torch.manual_seed(0)
    shapes = [(64, 8), (8,), (16, 8), (3, 5), (64, 8)]
    ours = [nn.Parameter(torch.randn(*s)) for s in shapes]
    alone = [nn.Parameter(p.detach().clone()) for p in ours]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    config = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1)
    opt = ShardedOptimizer(make_rule(config), PLAIN)
    opt.set_trainable({f"p{i}": p for i, p in enumerate(ours)})
    one_by_one = ShardedOptimizer(make_rule(config), PLAIN)
    one_by_one.set_trainable({f"p{i}": p for i, p in enumerate(alone)})
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=True)
    groups = []
    opt.apply_many = lambda slots, grads, options, guard=False: (
        groups.append([s.shard.numel() for s in slots]),
        ShardedOptimizer.apply_many(opt, slots, grads, options, guard))[1]
    for _ in range(4):
        grads = [torch.randn(*s) for s in shapes]
        for params in (ours, alone, ref):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        opt.step(UpdateOptions(lr=1e-2))
        for slot in one_by_one.slots.values():
            one_by_one.apply(slot, one_by_one.full_grad(slot), UpdateOptions(lr=1e-2))
        ref_opt.step()
    assert groups[:3] == [[512], [8, 128, 15], [512]]  # in order, each group up to 512 elements, the largest shard
    for p, q, r in zip(ours, alone, ref):
        assert torch.equal(p.data, q.data) and torch.equal(p.data, r.data)


class _RowShards(_Unsharded):
    """Dim-0 shards of `rank` among `world` ranks, as FSDP2 cuts them (ceil rows per rank; the last may get fewer)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def local_shard(self, param):
        rows = -(-param.shape[0] // self.world)
        return param.data[self.rank * rows:(self.rank + 1) * rows]

    def shard_info(self, param):
        shard = self.local_shard(param)
        return ShardInfo(tuple(param.shape), self.rank * -(-param.shape[0] // self.world) * param.shape[1],
                         shard.numel(), lambda t: None)


def test_update_runs_are_cut_the_same_on_every_rank_when_shards_split_unevenly():
    """Rows 3, 2, 2 on 2 ranks: rank 0 holds 2, 1, 1 rows and rank 1 holds 1, 1, 1. Cut by their own
    shards the ranks would disagree ([A] [B, C] against [A] [B] [C]), and a rule reducing per run (AdaLomo)
    would issue different collectives on each: runs follow whole parameters' sizes."""
    params = {name: nn.Parameter(torch.zeros(rows, 4)) for name, rows in (("a", 3), ("b", 2), ("c", 2))}
    cuts = []
    for rank in (0, 1):
        opt = ShardedOptimizer(make_rule(OptimConfig(name="adalomo", lr=1e-2)), _RowShards(rank, 2))
        opt.set_trainable(params)
        assert [s.shard.numel() for s in opt.slots.values()] == ([8, 4, 4] if rank == 0 else [4, 4, 4])
        cuts.append([(run.start, run.stop) for run in opt.update_runs(list(opt.slots.values()))])
    assert cuts[0] == cuts[1] == [(0, 1), (1, 2), (2, 3)]



COMMIT_RULES = {"adamw": {"weight_decay": 0.1}, "sgd": {"momentum": 0.9, "weight_decay": 0.01}, "plain_sgd": {},
                "adalomo": {"weight_decay": 0.01}, "lomo": {}}
HELD, ABSENT = False, "absent"


def _flagged_steps(name: str, dtype: torch.dtype, commits: list) -> tuple[list, dict, ShardedOptimizer]:
    """Steps from the same start and gradients, each under `commits[i]` (None: no flag; HELD: False, with a NaN
    gradient element as a non-finite step has; ABSENT: not run). Returns the weights, the state and the optimizer."""
    torch.manual_seed(0)
    params = {f"p{i}": nn.Parameter(torch.randn(*shape).to(dtype)) for i, shape in enumerate([(6, 4), (5,)])}
    grads = [[torch.randn(*p.shape) for p in params.values()] for _ in commits]
    config = OptimConfig(name="sgd" if name == "plain_sgd" else name, lr=1e-2, **COMMIT_RULES[name])
    opt = ShardedOptimizer(make_rule(config), PLAIN)
    opt.set_trainable(params)
    for step, (commit, step_grads) in enumerate(zip(commits, grads)):
        if commit is ABSENT:
            continue
        for p, g in zip(params.values(), step_grads):
            p.grad = g.to(dtype)
            if commit is HELD:
                p.grad.view(-1)[0] = float("nan")
        generator = torch.Generator().manual_seed(step) if dtype == torch.bfloat16 else None
        options = UpdateOptions(lr=1e-2, grad_scale=torch.tensor(0.5), generator=generator,
                                commit=None if commit is None else torch.tensor(commit))
        if opt.rule.fused:
            for slot in opt.slots.values():
                opt.apply(slot, opt.full_grad(slot), options)
                opt.access.release_grad(slot.param)
        else:
            opt.step(options)
        opt.zero_grad(nn.ModuleList())
        opt.settle(committed=commit is not HELD)
    state = {n: {k: t.clone() for k, t in s.items()} for n, s in opt.state_dict().items()}
    return [p.detach().clone() for p in params.values()], state, opt


def _same(a: tuple[list, dict, ShardedOptimizer], b: tuple[list, dict, ShardedOptimizer]) -> bool:
    weights = all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    states = a[1].keys() == b[1].keys() and all(
        a[1][n].keys() == b[1][n].keys() and all(torch.equal(a[1][n][k], b[1][n][k]) for k in a[1][n]) for n in a[1])
    counts = [s.updates for s in a[2].slots.values()] == [s.updates for s in b[2].slots.values()]
    return weights and states and counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(COMMIT_RULES))
def test_an_update_held_back_on_the_device_changes_nothing_and_a_standing_one_is_unchanged(name, dtype):
    """`UpdateOptions.commit` False (a non-finite step found without a host read): weights, fp32 masters, the
    rule's state and, once settled, the update counts end as if the step had not run, bit for bit (in bf16 with
    stochastic rounding too: a held-back shard keeps its rounding). True: the same numbers as no flag at all."""
    assert _same(_flagged_steps(name, dtype, [None] * 3), _flagged_steps(name, dtype, [True] * 3))
    held = _flagged_steps(name, dtype, [True, HELD, True])
    assert _same(held, _flagged_steps(name, dtype, [True, ABSENT, True]))
    assert not _same(held, _flagged_steps(name, dtype, [True, True, True]))  # the flag is what made the difference
    assert all(slot.updates == 2 and int(slot.step) == 2 for slot in held[2].slots.values())


def test_an_experts_part_of_a_shard_is_where_its_elements_are():
    """[3 experts, 4, 5]: a flat shard [27, 60) (cut inside expert 1, as ZeRO-3 may) holds expert 1's elements
    7..19 at its start, all of expert 2 after them, and none of expert 0."""
    from lisa_dist.optim.shard_info import expert_part

    info = ShardInfo((3, 4, 5), 27, 33, lambda t: None)
    assert expert_part(info, 1) == (slice(0, 13), ShardInfo((4, 5), 7, 13, info.reduce_sum))
    assert expert_part(info, 2) == (slice(13, 33), ShardInfo((4, 5), 0, 20, info.reduce_sum))
    part, empty = expert_part(info, 0)
    assert empty.numel == 0 and part.stop - part.start == 0


def test_state_for_chosen_experts_only_and_their_updates_are_adamws_on_each_expert():
    """A stacked parameter trained for experts 0 and 2 only: state for those two experts' elements, expert 1
    bit-identical, and experts 0 and 2 bit-identical to AdamW on each as a parameter of its own."""
    torch.manual_seed(0)
    stacked = nn.Parameter(torch.randn(3, 4, 5))
    alone = [nn.Parameter(stacked.detach()[e].clone()) for e in (0, 2)]
    start = stacked.detach().clone()
    config = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1)
    opt, ref = ShardedOptimizer(make_rule(config), PLAIN), ShardedOptimizer(make_rule(config), PLAIN)
    opt.set_trainable({"w": stacked}, {"w": (0, 2)})
    ref.set_trainable({"e0": alone[0], "e2": alone[1]})
    assert sorted(opt.slots) == ["w#0", "w#2"] and opt.state_bytes() == 2 * 2 * 20 * 4
    for _ in range(3):
        grad = torch.randn(3, 4, 5)
        stacked.grad, alone[0].grad, alone[1].grad = grad.clone(), grad[0].clone(), grad[2].clone()
        opt.step(UpdateOptions(lr=1e-2))
        ref.step(UpdateOptions(lr=1e-2))
        opt.zero_grad(nn.ModuleList())
    assert torch.equal(stacked.detach()[1], start[1])
    assert torch.equal(stacked.detach()[0], alone[0].detach()) and torch.equal(stacked.detach()[2], alone[1].detach())
    opt.set_trainable({"w": stacked}, {"w": (1,)})
    assert sorted(opt.slots) == ["w#1"] and opt.state_bytes() == 2 * 20 * 4


def _fused_steps(opt: ShardedOptimizer, grads: list[torch.Tensor], lr: float,
                 generator: torch.Generator | None = None) -> None:
    """Each gradient applied inside "backward", as the hooks do: measured, applied, freed."""
    (slot,) = opt.slots.values()
    for grad in grads:
        slot.param.grad = grad.to(slot.param.dtype)
        opt.apply(slot, opt.full_grad(slot), UpdateOptions(lr=lr, generator=generator))
        opt.access.release_grad(slot.param)


def test_signsgd_moves_each_element_by_lr_against_its_gradients_sign():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(6, 5))
    start = p.detach().clone()
    grads = [torch.randn(6, 5) for _ in range(3)]
    grads[1][0] = 0.0  # a zero gradient moves nothing
    opt = ShardedOptimizer(SignSgd(), PLAIN)
    opt.set_trainable({"p": p})
    assert opt.state_bytes() == 0 and opt.slots["p"].master is None
    _fused_steps(opt, grads, lr=0.01)
    expected = start.clone()
    for grad in grads:
        expected -= 0.01 * grad.sign()  # the same fp32 operations, in the same order
    assert torch.equal(p.data, expected)


def test_state_free_bf16_updates_below_half_a_step_accumulate_with_stochastic_rounding():
    """4096 bf16 weights at 1.0 take 100 signSGD steps of 1e-3, each below half a bf16 step there (2^-9): rounded to
    nearest they never move; rounded stochastically each rounding is unbiased, so the mean lands at 0.9 within
    5 standard deviations: one rounding's error is at most a step below 1 (2^-8), so over 100 independent roundings an
    element's variance is at most 100 x 2^-16 / 4, and the mean's at most that / 4096: sd <= 3.1e-4."""
    def run(generator: torch.Generator | None) -> torch.Tensor:
        p = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = ShardedOptimizer(SignSgd(), PLAIN)
        opt.set_trainable({"p": p})
        _fused_steps(opt, [torch.ones(4096)] * 100, lr=1e-3, generator=generator)
        return p.data.float()

    assert torch.equal(run(None), torch.ones(4096))
    rounded = run(torch.Generator().manual_seed(0))
    assert float(rounded.mean()) == pytest.approx(0.9, abs=5 * (100 * 2 ** -16 / 4 / 4096) ** 0.5)
    assert len(rounded.unique()) > 1  # weights took different roundings, not one shared value


@pytest.mark.parametrize("rule, factor", [("sgd", 300.0), ("signsgd", 1.0), ("adalomo", 10.0)])
def test_inactive_rules_keep_no_state_but_adalomos_statistics_and_default_to_a_multiple_of_optim_lr(rule, factor):
    lisa, optim = LisaConfig(inactive_update=rule), OptimConfig(name="adamw", lr=2e-3, weight_decay=0.1)
    made = make_inactive_rule(lisa, optim)
    assert made.fused and isinstance(made, {"sgd": Sgd, "signsgd": SignSgd, "adalomo": AdaLomo}[rule])
    assert getattr(made, "weight_decay", 0.0) == 0.0 and getattr(made, "momentum", 0.0) == 0.0
    assert inactive_lr(lisa, optim) == pytest.approx(2e-3 * factor)
    assert inactive_lr(LisaConfig(inactive_update=rule, inactive_lr=0.5), optim) == 0.5
    p = nn.Parameter(torch.randn(8, 4))
    opt = ShardedOptimizer(made, PLAIN)
    opt.set_trainable({"p": p})
    assert opt.state_bytes() == (4 * (8 + 4) if rule == "adalomo" else 0)  # AdaLomo: a row and a column vector
    assert make_inactive_rule(LisaConfig(), optim) is None
