from pathlib import Path

import pytest

from lisa_dist.assets import TINY_ALPACA, TINY_MODEL_DIR
from lisa_dist.config import load_config
from lisa_dist.errors import ConfigError
from lisa_dist.validation import check_world_size
from tests.helpers import REPO


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


BASE = f"""
max_steps: 3
output_dir: out
model: {{path: {TINY_MODEL_DIR}}}
data: {{path: {TINY_ALPACA}, seq_len: 32}}
"""


def test_bundled_config_loads_with_contract_keys():
    c = load_config(REPO / "configs" / "tiny.yaml")
    assert c.method == "lisa" and c.engine.name == "fsdp2" and c.optim.name == "adamw"
    assert c.lisa.gamma >= 1 and c.lisa.interval >= 1 and c.train.global_batch_size >= 1


def test_dotted_overrides_are_typed(tmp_path):
    c = load_config(write(tmp_path, BASE), ["lisa.gamma=3", "optim.lr=2e-4", "method=full", "optim.betas=[0.8,0.9]"])
    assert c.lisa.gamma == 3 and c.optim.lr == pytest.approx(2e-4) and c.method == "full"
    assert c.optim.betas == [0.8, 0.9]


@pytest.mark.parametrize("override, message", [
    ("lisa.gama=2", "unknown config key lisa.gama (did you mean lisa.gamma?)"),
    ("optimizer.lr=1", "unknown config key optimizer"),
    ("method=lora", "method must be one of 'lisa', 'full'"),
    ("engine.name=zero2", "engine.name must be one of"),
    ("optim.name=adam", "optim.name must be one of 'adamw', 'sgd'"),
    ("lisa.gamma=two", "lisa.gamma must be an integer"),
    ("lisa.gamma=0", "lisa.gamma must be >= 1"),
    ("lisa.interval=0", "lisa.interval must be >= 1"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm must be >= 0"),
    ("train.micro_batch_size=3", "not divisible by train.micro_batch_size=3"),
    ("train.dtype=fp8", "train.dtype must be one of"),
    ("data.path=/nonexistent.jsonl", "data.path: file not found"),
    ("model.preset=tiny", "set exactly one of model.path, model.preset, model.config"),
    ("progress_bar=maybe", "progress_bar must be true or false"),
    ("lisa=3", "lisa must be a mapping"),
    ("novalue", "must look like dotted.key=value"),
    ("data.fields={q", "override 'data.fields={q': the value is not valid YAML"),
    ("optim.name=lomo optim.momentum=0.9", "LOMO keeps no optimizer state"),
    ("optim.stochastic_rounding=true train.dtype=fp32", "optim.stochastic_rounding needs train.dtype=bf16"),
    ("optim.name=lomo train.dtype=fp16 optim.fused_precheck=false", "needs optim.fused_precheck"),
    ("optim.fused_precheck=true", "optim.fused_precheck applies to lomo and adalomo"),
    ("optim.clip_grad_value=-1", "optim.clip_grad_value must be >= 0"),
    ("optim.adalomo_eps=[0.1]", "optim.adalomo_eps must be two positive numbers"),
    ("model.num_layers=0", "model.num_layers must be >= 1"),
    ("model.num_layers=2", "model.num_layers shortens a preset or config"),
    ("data.eval_fraction=1.5", "data.eval_fraction must be in [0, 1), got 1.5"),
    (f"data.eval_fraction=0.1 data.eval_path={TINY_ALPACA}", "set one of data.eval_path and data.eval_fraction"),
    ("data.eval_path=/nonexistent.jsonl", "data.eval_path: file not found"),
    ("eval_every=5", "eval_every=5 needs held-out data: set data.eval_path or data.eval_fraction"),
    ("eval_max_batches=2", "eval_max_batches=2 needs held-out data"),
    ('data.fields={"prompt":"q"}', "data.fields: unknown key prompt; a format's keys are instruction"),
    ("data.fields=[q]", "data.fields must be a mapping"),
    ("data.format=csv", "data.format must be one of 'auto', 'alpaca', 'chat', 'sharegpt', 'text'"),
    ("logging.log_every=0", "logging.log_every must be >= 1"),
    ("logging.report_to=[mlflow]", "logging.report_to[0] must be one of 'tensorboard', 'wandb'"),
    ("logging.report_to=[wandb,wandb]", "logging.report_to lists a tracker twice"),
    ("lisa.strategy=owl",
     "lisa.strategy must be one of 'uniform', 'weights', 'outlier', 'routing', 'grad_norm', 'cyclic'"),
    ("lisa.unit=module", "lisa.unit must be one of 'layer', 'block', 'expert'"),
    ("lisa.strategy=routing", "lisa.strategy=routing draws routed experts by their share of the tokens; it needs "
                              "lisa.unit=expert, got lisa.unit=layer"),
    ("lisa.cyclic_order=shuffled", "lisa.cyclic_order must be one of 'ascending', 'descending', 'random'"),
    ("lisa.layer_weights=[1,1,1,1,1,1,1,1]", "lisa.layer_weights=[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0] is read by "
                                             "lisa.strategy=weights only, but lisa.strategy=uniform"),
    ("lisa.strategy=cyclic lisa.outlier_threshold=5", "lisa.outlier_threshold=5.0 is read by lisa.strategy=outlier"),
    ("lisa.strategy=outlier lisa.grad_norm_decay=0.5", "lisa.grad_norm_decay=0.5 is read by lisa.strategy=grad_norm"),
    ("lisa.cyclic_order=ascending", "lisa.cyclic_order=ascending is read by lisa.strategy=cyclic only"),
    ("lisa.uniform_mix=0.5", "lisa.uniform_mix=0.5 is read by lisa.strategy=outlier/routing/grad_norm only"),
    ("lisa.strategy=weights", "lisa.strategy=weights needs lisa.layer_weights"),
    ("lisa.strategy=grad_norm lisa.uniform_mix=0", "lisa.uniform_mix must be in (0, 1] so every unit can be drawn"),
    ("lisa.strategy=grad_norm lisa.grad_norm_decay=1", "lisa.grad_norm_decay must be in [0, 1), got 1.0"),
    ("lisa.strategy=outlier lisa.outlier_threshold=0", "lisa.outlier_threshold must be a positive number"),
    ("method=full lisa.strategy=cyclic", "lisa.strategy=cyclic chooses what method=lisa trains; method=full trains"),
    ("method=full lisa.unit=block", "lisa.unit=block chooses what method=lisa trains"),
    ("method=full lisa.inactive_update=sgd", "lisa.inactive_update=sgd chooses what method=lisa trains"),
    ("lisa.inactive_update=adam", "lisa.inactive_update must be one of 'none', 'sgd', 'signsgd', 'adalomo'"),
    ("preempt.signals=[SIGTERN]", "preempt.signals: 'SIGTERN' is not a signal name (say SIGTERM, SIGUSR1)"),
    ("preempt.signals=[TERM]", "preempt.signals: 'TERM' is not a signal name"),
    ("preempt.signals=[SIGKILL]", "preempt.signals: SIGKILL cannot be caught by a process"),
    ("preempt.signals=[SIGTERM,SIGTERM]", "preempt.signals lists a signal twice"),
    ("preempt.exit_code=1", "preempt.exit_code must be in [3, 125] (0 is success, 1 and 2 are lisa-dist's errors"),
    ("preempt.exit_code=137", "preempt.exit_code must be in [3, 125]"),
    ("lisa.inactive_lr=0.1", "lisa.inactive_lr=0.1 is the rate of lisa.inactive_update, which is none"),
    ("lisa.inactive_update=sgd lisa.inactive_lr=0", "lisa.inactive_lr must be a positive number, got 0"),
    ("lisa.inactive_update=signsgd optim.name=lomo", "optim.name=lomo already updates every trained unit inside "
                                                    "backward: use optim.name adamw or sgd, or method=full"),
    ("lisa.inactive_update=adalomo lisa.unit=expert", "lisa.inactive_update=adalomo with lisa.unit=expert is not "
                                                      "supported"),
    ("lisa.inactive_update=sgd train.dtype=fp16", "lisa.inactive_update=sgd with train.dtype=fp16: fp16's loss "
                                                  "scaling skips a whole step"),
])
def test_bad_values_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE), override.split(" "))
    assert message in str(err.value)


def test_inactive_updates_reject_gradient_accumulation_with_the_reason(tmp_path):
    c = load_config(write(tmp_path, BASE), ["lisa.inactive_update=signsgd", "train.global_batch_size=8",
                                            "train.micro_batch_size=2"])
    check_world_size(c, 4)
    with pytest.raises(ConfigError, match="needs 2 accumulation steps, which would keep every unit's gradient; "
                                          "set train.micro_batch_size=4 or lisa.inactive_update=none"):
        check_world_size(c, 2)


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_full_lomo_rejects_gradient_accumulation_with_the_reason(tmp_path):
    c = load_config(write(tmp_path, BASE), ["method=full", "optim.name=lomo", "train.global_batch_size=8",
                                            "train.micro_batch_size=2"])
    check_world_size(c, 4)  # 8 / (2 x 4): one micro-batch, nothing to accumulate
    with pytest.raises(ConfigError, match="needs 2 accumulation steps, which would keep every gradient; "
                                          "set train.micro_batch_size=4 or use method=lisa"):
        check_world_size(c, 2)
    lisa = load_config(write(tmp_path, BASE), ["method=lisa", "optim.name=lomo", "train.global_batch_size=8",
                                               "train.micro_batch_size=2"])
    check_world_size(lisa, 2)


def test_world_size_must_divide_the_global_batch(tmp_path):
    c = load_config(write(tmp_path, BASE), ["train.global_batch_size=6", "train.micro_batch_size=2"])
    check_world_size(c, 3)
    with pytest.raises(ConfigError, match="world size 2"):
        check_world_size(c, 2)
    with pytest.raises(ConfigError, match="world size must be >= 1, got 0"):
        check_world_size(c, 0)


def test_num_layers_shortens_a_preset_and_refuses_more_than_it_has(tmp_path):
    from lisa_dist.models.build import load_hf_config, num_decoder_layers

    base = BASE.replace(f"model: {{path: {TINY_MODEL_DIR}}}", "model: {preset: llama2-7b}")
    shallow, _ = load_hf_config(load_config(write(tmp_path, base), ["model.num_layers=2"]))
    assert num_decoder_layers(shallow) == 2 and shallow.hidden_size == 4096
    with pytest.raises(ConfigError, match="model.num_layers=33 exceeds the model's 32 decoder layers"):
        load_hf_config(load_config(write(tmp_path, base), ["model.num_layers=33"]))
