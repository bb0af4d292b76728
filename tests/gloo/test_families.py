"""Every common decoder family, dense and mixture-of-experts, from a `save_pretrained` directory, trains with LISA
on 2 gloo ranks on FSDP2 and on ZeRO-3: frozen layers stay bit-identical, trained ones move, and `final/` is
written in the layout `save_pretrained` writes and reloads with `from_pretrained` to the logits the trained shards
give."""

import os

import pytest
import torch
import transformers
from safetensors.torch import load_file

from tests.families import (ATTENTION, FAMILIES_BY_NAME, LAYERS, LEGACY_KEYS, MOE_FAMILIES, layer_index,
                            write_family)
from tests.helpers import (PARITY_ADALOMO_EPS1, assert_weights_close, parity_atol, run_distributed, start_trainer,
                           tiny_config)

os.environ.setdefault("DS_ACCELERATOR", "cpu")
STEPS = 4
ENGINES = ("fsdp2", "zero3")


def _probe(vocab_size: int) -> torch.Tensor:
    return torch.arange(2 * 24).reshape(2, 24) * 7 % vocab_size


def _families_worker(rank: int, world_size: int, dirs: dict[str, str], engine: str, output_dir: str) -> dict:
    out = {}
    for family, directory in dirs.items():
        config = tiny_config(f"{output_dir}/{engine}/{family}", engine={"name": engine},
                             lisa={"gamma": 1, "interval": 2},
                             model={"path": directory, "attn_implementation": ATTENTION.get(family, "sdpa")},
                             optim={"name": "adamw", "lr": 1e-2, "max_grad_norm": 1.0})
        trainer = start_trainer(config)
        records = [trainer.train_step(step) for step in range(STEPS)]
        trainer.core.model.eval()
        with torch.no_grad():
            logits = trainer.core.model(input_ids=_probe(trainer.source.hf_config.vocab_size)).logits.float()
        trainer.save_final()
        checkpoint = trainer.save(STEPS) if family in MOE_FAMILIES else None
        out[family] = {"losses": [r["loss"] for r in records], "tokens": [r["tokens"] for r in records],
                       "checkpoint": checkpoint,
                       "expert_tokens": [r.get("expert_tokens") for r in records],
                       "active": sorted({i for r in records for i in r["active_layers"]}),
                       "logits": logits, "tied": trainer.core.parts.tied_embeddings,
                       "final": trainer.output_dir / "final"}
        trainer.core.stepper.hooks.remove()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    dirs = {family: str(write_family(family, root / "models" / family)) for family in FAMILIES_BY_NAME}
    return dirs, {engine: run_distributed(_families_worker, 2, dirs=dirs, engine=engine, output_dir=str(root))[0]
                  for engine in ENGINES}


def test_the_legacy_head_key_is_a_directory_from_pretrained_loads(trained):
    dirs, _ = trained
    for family, renames in LEGACY_KEYS.items():
        stored = load_file(f"{dirs[family]}/model.safetensors")
        assert set(renames.values()) <= stored.keys() and not set(renames) & stored.keys()
        model = transformers.AutoModelForCausalLM.from_pretrained(dirs[family])
        for module_key, stored_key in renames.items():
            assert torch.equal(model.state_dict()[module_key], stored[stored_key])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("family", list(FAMILIES_BY_NAME))
def test_family_trains_with_lisa_and_final_reloads_to_the_same_logits(trained, family, engine):
    dirs, runs = trained
    obs = runs[engine][family]
    assert all(torch.isfinite(torch.tensor(obs["losses"]))), obs["losses"]
    before = transformers.AutoModelForCausalLM.from_pretrained(dirs[family]).state_dict()
    model = transformers.AutoModelForCausalLM.from_pretrained(obs["final"],
                                                              attn_implementation=ATTENTION.get(family, "sdpa"))
    after = model.state_dict()
    assert after.keys() == before.keys()
    spec = FAMILIES_BY_NAME[family]
    frozen = [i for i in range(spec.get("num_hidden_layers", spec.get("n_layer")))
              if i not in obs["active"]]
    assert frozen and obs["active"], (frozen, obs["active"])
    for name, tensor in before.items():
        layer = layer_index(name)
        if layer in frozen:
            assert torch.equal(after[name], tensor), f"{name}: a frozen layer changed"
        elif layer is not None and tensor.dim() >= 2:  # matrices, and MoE layers' 3-D experts
            assert not torch.equal(after[name], tensor), f"{name}: an active layer did not train"
    assert (obs["expert_tokens"][0] is None) == (family not in MOE_FAMILIES)
    assert obs["tied"] == (model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=_probe(model.config.vocab_size)).logits.float()
    # The same weights and the same unsharded computation in one process: equal to the last bit.
    assert torch.equal(logits, obs["logits"])


@pytest.mark.parametrize("engine", ENGINES)
def test_final_is_written_in_the_layout_save_pretrained_writes(trained, engine):
    """MoE experts one tensor per expert (or fused, as gpt-oss and GraniteMoE store them), the same keys as
    the source directory's (a legacy head key is written under its current name)."""
    dirs, runs = trained
    for family in FAMILIES_BY_NAME:
        if family in LEGACY_KEYS:
            continue
        source = load_file(f"{dirs[family]}/model.safetensors")
        final = load_file(f"{runs[engine][family]['final']}/model.safetensors")
        assert final.keys() == source.keys(), family
        assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in source.items()}, family


@pytest.mark.parametrize("engine", ENGINES)
def test_an_moe_step_checkpoint_exports_to_final(trained, engine, tmp_path):
    """`lisa-dist export` (in one process, without a process group) of the last step's checkpoint: FSDP2's whole
    experts per rank and ZeRO-3's partitions cutting them come back in save_pretrained's layout, equal to final/."""
    from lisa_dist.checkpoint import export_checkpoint

    _, runs = trained
    for family in MOE_FAMILIES:
        obs = runs[engine][family]
        export_checkpoint(obs["checkpoint"], tmp_path / family)
        exported = load_file(tmp_path / family / "model.safetensors")
        final = load_file(obs["final"] / "model.safetensors")
        assert exported.keys() == final.keys(), family
        for key, tensor in final.items():
            assert torch.equal(exported[key], tensor), f"{family}: {key}"


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_moe_engines_agree_on_the_loss_before_any_update(trained, family):
    """The same weights and the same data give the same forward on both engines; the losses differ only by
    the order of the float64 sum over 2 ranks of fp32 per-rank sums (relative 2^-52 per addition)."""
    _, runs = trained
    first = [runs[engine][family]["losses"][0] for engine in ENGINES]
    assert abs(first[0] - first[1]) <= 4 * 2.0 ** -52 * abs(first[0]), first


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_moe_steps_count_the_tokens_routed_to_each_expert(trained, family):
    """Each MoE layer routes every real token of the global batch to top-k experts, so its counts sum to k times
    the step's tokens; the same weights route alike on both engines (their first forwards are equal, above)."""
    _, runs = trained
    spec = MOE_FAMILIES[family]
    dense = spec.get("first_k_dense_replace", 0)
    for engine in ENGINES:
        obs = runs[engine][family]
        for counts, tokens in zip(obs["expert_tokens"], obs["tokens"]):
            assert list(counts) == [str(i) for i in range(dense, LAYERS)], (engine, counts.keys())
            for layer, row in counts.items():
                assert len(row) == 8 and sum(row) == spec["num_experts_per_tok"] * tokens, (engine, layer, row)
    assert runs["fsdp2"][family]["expert_tokens"][0] == runs["zero3"][family]["expert_tokens"][0]


# LOMO and AdaLomo on the MoE families whose experts load differently: stacked from per-expert tensors
# (Mixtral), stored fused with biases (gpt-oss), beside a dense first layer and a routing bias (DeepSeek-V3).
FUSED_FAMILIES = ("mixtral", "gpt_oss", "deepseek_v3")
FUSED_RUNS = {"lomo": dict(method="full", optim={"name": "lomo", "lr": 0.05, "max_grad_norm": 0.0}),
              "adalomo": dict(method="lisa", lisa={"gamma": 2, "interval": 2},
                              optim={"name": "adalomo", "lr": 0.01, "max_grad_norm": 0.0,
                                     "adalomo_eps": [PARITY_ADALOMO_EPS1, 1e-3]})}


def _fused_worker(rank: int, world_size: int, dirs: dict[str, str], engine: str, output_dir: str) -> dict:
    from tests.helpers import engine_weights

    out = {}
    for family in FUSED_FAMILIES:
        for key, run in FUSED_RUNS.items():
            config = tiny_config(f"{output_dir}/{engine}{world_size}/{family}/{key}", engine={"name": engine},
                                 model={"path": dirs[family], "attn_implementation": ATTENTION.get(family, "sdpa")},
                                 train={"micro_batch_size": 8 // world_size}, **run)
            trainer = start_trainer(config)
            records = [trainer.train_step(step) for step in range(STEPS)]
            out[family, key] = {"weights": engine_weights(trainer), "grad_norms": [r["grad_norm"] for r in records],
                                "state_bytes": trainer.core.optimizer.state_bytes()}
            trainer.core.stepper.hooks.remove()
    return out


@pytest.fixture(scope="module")
def fused_runs(trained, tmp_path_factory):
    dirs, _ = trained
    out = str(tmp_path_factory.mktemp("fused"))
    return {"zero3": run_distributed(_fused_worker, 2, dirs=dirs, engine="zero3", output_dir=out)[0],
            "fsdp2": run_distributed(_fused_worker, 2, dirs=dirs, engine="fsdp2", output_dir=out)[0],
            "one": run_distributed(_fused_worker, 1, dirs=dirs, engine="fsdp2", output_dir=out)[0]}


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_moe_families_train_with_lomo_and_adalomo_alike_on_every_sharding(fused_runs, family):
    """FSDP2 holds whole experts per rank, ZeRO-3 cuts them; one process holds all: the same weights within the
    rounding of another reduction order (tests.helpers.parity_atol), and LOMO keeps no state."""
    for key, run in FUSED_RUNS.items():
        obs = {name: result[family, key] for name, result in fused_runs.items()}
        norms = [n for o in obs.values() for n in o["grad_norms"]]
        atol = parity_atol(run["optim"], STEPS, max(norms))
        for name in ("zero3", "fsdp2"):
            assert_weights_close(obs[name]["weights"], obs["one"]["weights"], atol)
        assert obs["fsdp2"]["state_bytes"] == 0 if key == "lomo" else obs["fsdp2"]["state_bytes"] > 0


# Checkpoint layouts users have, each loaded on both engines: (stored dtype, train.dtype, sharded with an index).
LAYOUTS = {"bf16_sharded_fp32": (torch.bfloat16, "fp32", True), "fp16_as_bf16": (torch.float16, "bf16", False),
           "fp32_as_bf16": (torch.float32, "bf16", False)}
GENERATION = {"temperature": 0.3, "top_p": 0.7, "do_sample": True}


def _write_layout(directory, stored: torch.dtype, sharded: bool):
    import json

    write_family("llama", directory, dtype=stored)
    if sharded:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=stored)
        (directory / "model.safetensors").unlink()
        model.save_pretrained(directory, max_shard_size="40KB")
        assert (directory / "model.safetensors.index.json").is_file()
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config.pop("pad_token")  # as many base models ship: padding falls back to the eos token
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (directory / "generation_config.json").write_text(json.dumps(GENERATION))
    return str(directory)


def _layouts_worker(rank: int, world_size: int, dirs: dict[str, str], engine: str, output_dir: str) -> dict:
    from tests.helpers import engine_weights

    out = {}
    for name, directory in dirs.items():
        config = tiny_config(f"{output_dir}/{engine}/{name}", engine={"name": engine}, model={"path": directory},
                             train={"dtype": LAYOUTS[name][1]}, max_steps=1)
        trainer = start_trainer(config)
        loaded = engine_weights(trainer)
        loss = trainer.train_step(0)["loss"]
        trainer.save_final()
        out[name] = {"loaded": loaded, "loss": loss, "final": trainer.output_dir / "final"}
        trainer.core.stepper.hooks.remove()
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_checkpoint_layouts_load_in_any_stored_dtype_and_carry_the_generation_config(tmp_path, engine):
    import json

    from lisa_dist.models.build import DTYPES

    dirs = {name: _write_layout(tmp_path / name, stored, sharded) for name, (stored, _, sharded) in LAYOUTS.items()}
    ranks = run_distributed(_layouts_worker, 2, dirs=dirs, engine=engine, output_dir=str(tmp_path))
    for name, obs in ranks[0].items():
        stored = transformers.AutoModelForCausalLM.from_pretrained(dirs[name], dtype=LAYOUTS[name][0]).state_dict()
        train_dtype = DTYPES[LAYOUTS[name][1]]
        for key, tensor in obs["loaded"].items():  # stored values, rounded once to train.dtype
            assert torch.equal(tensor, stored[key].to(train_dtype).float()), f"{name}: {key}"
        assert torch.isfinite(torch.tensor(obs["loss"])), name
        assert json.loads((obs["final"] / "generation_config.json").read_text()).items() >= GENERATION.items()
