"""Bad input to `lisa-dist train`: each case is a clear error (exit 2, no traceback) raised before any
process starts, and the run already in output_dir (checkpoints, final model, metrics) is left byte for byte
as it was. `python -m tests.cli.test_bad_input` prints the table in docs/reliability.md."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lisa_dist.assets import TINY_MODEL_DIR
from lisa_dist.cli import main
from tests.helpers import COMMON, REPO

TINY_YAML = str(REPO / "configs" / "tiny.yaml")
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS")


@dataclass(frozen=True)
class Case:
    what: str
    """The bad input, as the table in docs/reliability.md names it."""
    make: Callable[[Path], list[str]]
    """Writes what the case needs under a scratch folder; returns the command-line overrides."""
    message: str
    """A part of the error the user sees."""
    env: dict[str, str] = field(default_factory=dict)
    """Launcher variables (a torchrun world of 3, an accelerate launch)."""
    config: Callable[[Path], str] = lambda t: TINY_YAML
    """The run configuration file, written under the scratch folder when the case is about it."""
    resume: bool = True
    """Point at the existing run with resume=auto, so a checkpoint is at stake."""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _model_copy(tmp: Path, drop: tuple[str, ...] = (), int8: bool = False) -> Path:
    model = tmp / "model"
    shutil.copytree(TINY_MODEL_DIR, model)
    for name in drop:
        (model / name).unlink()
    if int8:
        weights = load_file(model / "model.safetensors")
        save_file({k: v.to(torch.int8) for k, v in weights.items()}, model / "model.safetensors")
    return model


def _truncated(tmp: Path) -> list[str]:
    model = _model_copy(tmp)
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return [f"model.path={model}"]


def _sharded_missing_file(tmp: Path) -> list[str]:
    model = _model_copy(tmp)
    weights = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    save_file({k: weights[k] for k in halves["model-00001-of-00002.safetensors"]},
              model / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}
    _write(model / "model.safetensors.index.json", json.dumps(index))
    return [f"model.path={model}"]


def _config_dir(tmp: Path, model_type: str, **spec) -> list[str]:
    """A config.json to build with random weights (model.config), for architectures rejected before start."""
    import transformers

    from tests.families import FAMILIES_BY_NAME

    spec = {k: v for k, v in FAMILIES_BY_NAME.get(model_type, FAMILIES_BY_NAME["llama"]).items()
            if k != "model_type"} | spec
    transformers.AutoConfig.for_model(model_type, **spec).save_pretrained(tmp / model_type)
    return [f"model.config={tmp / model_type}", "model.path=null"]


def _data(tmp: Path, name: str, text: str) -> list[str]:
    return [f"data.path={_write(tmp / name, text)}"]


def _deepspeed(tmp: Path, settings: dict | str) -> list[str]:
    text = settings if isinstance(settings, str) else json.dumps(settings)
    return ["engine.name=zero3", f"engine.deepspeed_config={_write(tmp / 'ds.json', text)}"]


ALPACA_LINE = '{"instruction": "a", "input": "", "output": "b"}\n'
CASES = {
    "unknown_key": Case("a misspelt config key", lambda t: ["lisa.gama=2"], "unknown config key lisa.gama"),
    "gamma_zero": Case("lisa.gamma below 1", lambda t: ["lisa.gamma=0"], "lisa.gamma must be >= 1, got 0"),
    "gamma_too_large": Case("lisa.gamma larger than the layer count", lambda t: ["lisa.gamma=9"],
                            "lisa.gamma=9 exceeds the model's 8 decoder layers"),
    "block_gamma_too_large": Case("lisa.gamma larger than the block count (lisa.unit=block)",
                                  lambda t: ["lisa.unit=block", "lisa.gamma=17"],
                                  "lisa.gamma=17 exceeds the model's 16 attention and MLP blocks (lisa.unit=block)"),
    "expert_units_on_a_dense_model": Case("lisa.unit=expert on a model without routed experts",
                                          lambda t: ["lisa.unit=expert"],
                                          "lisa.unit=expert: LlamaDecoderLayer layers hold no routed experts"),
    "strategy_option_unread": Case("a strategy option for another strategy",
                                   lambda t: ["lisa.strategy=cyclic", "lisa.outlier_threshold=5"],
                                   "lisa.outlier_threshold=5.0 is read by lisa.strategy=outlier only"),
    "interval_zero": Case("lisa.interval 0", lambda t: ["lisa.interval=0"], "lisa.interval must be >= 1, got 0"),
    "wrong_type": Case("a value of the wrong type", lambda t: ["lisa.interval=often"], "lisa.interval must be"),
    "unknown_choice": Case("a value outside the allowed choices", lambda t: ["optim.name=adam"],
                           "optim.name must be one of"),
    "negative_lr": Case("a negative learning rate", lambda t: ["optim.lr=-1"], "optim.lr must be"),
    "layer_weights_length": Case("lisa.layer_weights of the wrong length", lambda t: ["lisa.strategy=weights",
                                                                                     "lisa.layer_weights=[1,2]"],
                                 "lisa.layer_weights"),
    "layer_weights_nonfinite": Case("a non-finite layer weight", lambda t: [
        "lisa.strategy=weights", "lisa.layer_weights=[1,1,1,1,1,1,1,.inf]"],
                                    "lisa.layer_weights must be finite"),
    "bad_override": Case("an override without `=`", lambda t: ["lisa.gamma"], "must look like dotted.key=value"),
    "missing_config": Case("a config file that does not exist", lambda t: [], "config file not found",
                           config=lambda t: str(t / "missing.yaml")),
    "malformed_yaml": Case("a config file that is not YAML", lambda t: [], "not valid YAML",
                           config=lambda t: str(_write(t / "bad.yaml", "lisa: [gamma: 2\n"))),
    "yaml_not_mapping": Case("a config file whose top level is a list", lambda t: [],
                             "the top level must be a mapping", config=lambda t: str(_write(t / "list.yaml", "- 1\n"))),
    "model_missing": Case("a model path that does not exist", lambda t: [f"model.path={t / 'nowhere'}"],
                          "model.path"),
    "model_without_weights": Case("a model directory without weights",
                                  lambda t: [f"model.path={_model_copy(t, drop=('model.safetensors',))}"],
                                  "has no *.safetensors weights"),
    "model_int8": Case("a model stored in a non-floating dtype", lambda t: [f"model.path={_model_copy(t, int8=True)}"],
                       "is stored as torch.int8, not a floating-point type"),
    "model_truncated": Case("a truncated model.safetensors (an interrupted download)", _truncated,
                            "model.safetensors: not a readable safetensors file"),
    "model_shard_missing": Case("a sharded checkpoint whose index names a missing file", _sharded_missing_file,
                                "lists 1 shard file(s) missing"),
    "model_quantized": Case("a model stored quantized (gpt-oss's MXFP4 release)",
                            lambda t: _config_dir(t, "gpt_oss", quantization_config={"quant_method": "mxfp4"}),
                            "GptOssForCausalLM is stored quantized (mxfp4)"),
    "router_loss_without_one": Case("a router loss coefficient for a model without one (DeepSeek-V3)",
                                    lambda t: [*_config_dir(t, "deepseek_v3"), "model.router_aux_loss_coef=0.1"],
                                    "DeepseekV3ForCausalLM has no router load-balancing loss"),
    "outlier_on_moe": Case("lisa.strategy=outlier on a mixture of experts (Mixtral)",
                           lambda t: [*_config_dir(t, "mixtral"), "lisa.strategy=outlier"],
                           "MixtralForCausalLM's routed experts are not linear modules"),
    "experts_kernel_on_a_dense_model": Case(
        "model.experts_implementation for a model without routed experts",
        lambda t: ["model.experts_implementation=eager"],
        "model.experts_implementation=eager: LlamaForCausalLM has no routed experts"),
    "model_no_sdpa": Case("model.attn_implementation=sdpa for a model without an SDPA path (Gemma 2)",
                          lambda t: _config_dir(t, "gemma2"), "set model.attn_implementation=eager"),
    "tokenizer_missing": Case("a model directory without a tokenizer",
                              lambda t: ["model.path="
                                         f"{_model_copy(t, drop=('tokenizer.json', 'tokenizer_config.json'))}"],
                              "tokenizer"),
    "seq_too_long": Case("sequences longer than the model allows", lambda t: ["data.seq_len=4096"],
                         "data.seq_len=4096 exceeds the model's 512 positions"),
    "data_missing": Case("a data file that does not exist", lambda t: [f"data.path={t / 'none.jsonl'}"],
                         "data.path: file not found"),
    "data_malformed": Case("a malformed JSONL line",
                           lambda t: _data(t, "bad.jsonl", ALPACA_LINE + "{oops}\n"),
                           "bad.jsonl:2:"),
    "data_empty": Case("an empty JSONL file", lambda t: _data(t, "empty.jsonl", ""), "empty.jsonl"),
    "data_unknown_format": Case("JSONL records of neither format",
                                lambda t: _data(t, "odd.jsonl", '{"prompt": "hi"}\n'),
                                "odd.jsonl"),
    "data_too_small": Case("fewer examples than one global batch", lambda t: ["train.global_batch_size=4096"],
                           "fewer than one global batch"),
    "batch_not_divisible": Case("a global batch the micro-batch does not divide",
                                lambda t: ["train.global_batch_size=7"], "not divisible"),
    "world_not_dividing": Case("a world size the batch does not divide", lambda t: [], "not divisible",
                               env={"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "3",
                                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999", "TORCHELASTIC_RUN_ID": "x"}),
    "deepspeed_contradiction": Case("a DeepSpeed JSON that contradicts the config",
                                    lambda t: _deepspeed(t, {"zero_optimization": {"stage": 3},
                                                             "train_micro_batch_size_per_gpu": 4}),
                                    "train_micro_batch_size_per_gpu"),
    "deepspeed_stage2": Case("a DeepSpeed JSON asking for ZeRO-2",
                             lambda t: _deepspeed(t, {"zero_optimization": {"stage": 2}}), "stage"),
    "deepspeed_malformed": Case("a DeepSpeed file that is not JSON", lambda t: _deepspeed(t, "{stage: 3"),
                                "engine.deepspeed_config"),
    "accelerate_fsdp1": Case("an accelerate config asking for FSDP1", lambda t: [], "FSDP",
                             env={"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_FSDP": "true",
                                  "FSDP_VERSION": "1"}),
    "offload_on_zero3": Case("engine.offload_params with ZeRO-3", lambda t: ["engine.name=zero3",
                                                                             "engine.offload_params=true"],
                             "engine.offload_params=true applies to engine.name=fsdp2"),
    "split_on_zero3": Case("an FSDP2-only engine option with ZeRO-3", lambda t: ["engine.name=zero3",
                                                                              "engine.split_layers=true"],
                           "engine.split_layers=true applies to engine.name=fsdp2"),
    "deepspeed_file_on_fsdp2": Case("a DeepSpeed config with engine fsdp2",
                                    lambda t: [f"engine.deepspeed_config={_write(t / 'ds.json', '{}')}"],
                                    "applies to engine.name=zero3, not fsdp2"),
    "output_is_file": Case("an output_dir that is a file", lambda t: [f"output_dir={_write(t / 'file', 'x')}"],
                           "exists and is not a directory", resume=False),
    "output_not_writable": Case("an output_dir that is not writable",
                                lambda t: ["output_dir=/proc/lisa_dist_cannot_write"], "is not writable"),
    "output_holds_run": Case("an output_dir that already holds another run", lambda t: [],
                             "already holds a run; pass resume=auto to continue it", resume=False),
    "resume_not_checkpoint": Case("resume= a directory that is not a checkpoint",
                                  lambda t: [f"resume={TINY_MODEL_DIR}"], "not a complete checkpoint directory"),
}


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def attempt(case: Case, scratch: Path, run_dir: Path, monkeypatch, capsys) -> tuple[int, str]:
    """Run `lisa-dist train` in this process as the user would; return (exit code, stderr)."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    overrides = [f"output_dir={run_dir}", "overwrite=false", *(["resume=auto"] if case.resume else []),
                 *case.make(scratch)]
    capsys.readouterr()
    code = main(["train", case.config(scratch), *COMMON, *overrides])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("key", CASES)
def test_bad_input_is_a_clear_error_and_leaves_the_run_untouched(key, run, tmp_path, monkeypatch, capsys):
    case = CASES[key]
    if key == "model_no_sdpa" and _gemma2_has_sdpa():
        pytest.skip(f"transformers {transformers.__version__} gives Gemma 2 an SDPA path (5.24 has none)")
    before = snapshot(run)
    code, err = attempt(case, tmp_path, run, monkeypatch, capsys)
    assert code == 2, err
    assert err.startswith("lisa-dist: error: ") and case.message in err, err
    assert "Traceback" not in err
    assert snapshot(run) == before


def _gemma2_has_sdpa() -> bool:
    from transformers.models.gemma2.modeling_gemma2 import Gemma2ForCausalLM

    return Gemma2ForCausalLM._supports_sdpa


def print_table() -> None:
    """The table in docs/reliability.md: every case run in this process, with the error as printed."""
    import contextlib
    import io
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        run_dir = Path(root) / "run"
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
        print("| # | bad input | exit | what the user sees (stderr) |\n|---|---|---|---|")
        for i, (key, case) in enumerate(CASES.items(), 1):
            scratch = Path(root) / key
            scratch.mkdir()
            saved = dict(os.environ)
            for name in LAUNCH_VARIABLES:
                os.environ.pop(name, None)
            os.environ.update(case.env)
            overrides = [f"output_dir={run_dir}", "overwrite=false", *(["resume=auto"] if case.resume else []),
                         *case.make(scratch)]
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(["train", case.config(scratch), *COMMON, *overrides])
            os.environ.clear()
            os.environ.update(saved)
            text = " ".join(err.getvalue().split()).replace(root, "…").replace("|", "\\|")
            print(f"| {i} | {case.what} | {code} | {text} |")


if __name__ == "__main__":
    print_table()
