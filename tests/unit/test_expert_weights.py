"""A mixture-of-experts checkpoint as `save_pretrained` writes it (one tensor per expert) is read expert by expert
through transformers' own stacking and concatenation rules: the rows a shard asks for equal `from_pretrained`'s
values bit for bit, and only those experts' bytes are read."""

import pytest
import torch
import transformers

from lisa_dist.models import build_meta_model
from lisa_dist.models.weights import SafetensorsReader
from tests.families import hf_config, write_family


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_expert_rows_equal_from_pretrained_and_read_only_those_experts(tmp_path, family):
    directory = write_family(family, tmp_path / family)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(directory).state_dict()
    reader = SafetensorsReader(directory, build_meta_model(hf_config(family), torch.float32, "eager"))
    experts = [n for n, t in loaded.items() if t.dim() == 3]
    assert experts, "the family's experts are 3-D parameters"
    for name in experts:
        assert reader.shape(name) == list(loaded[name].shape)
        before = reader.bytes_read
        rows = reader.read_rows(name, 2, 5)
        assert torch.equal(rows, loaded[name][2:5]), name
        assert reader.bytes_read - before == 3 * loaded[name][0].numel() * 4, name  # three experts, fp32
    buffers = [n for n in loaded if n.endswith("e_score_correction_bias")]
    assert bool(buffers) == (family == "deepseek_v3")
    for name in buffers:
        assert reader.has(name) and torch.equal(reader.read_rows(name, 0, loaded[name].shape[0]), loaded[name])
    reader.close()


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_a_partition_cutting_experts_reads_only_its_rows(tmp_path, family):
    """ZeRO-3's flat partitions: rows 5 to 43 of [8 x 32, cols] start inside expert 0 and end inside expert 1."""
    directory = write_family(family, tmp_path / family)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(directory).state_dict()
    reader = SafetensorsReader(directory, build_meta_model(hf_config(family), torch.float32, "eager"))
    for name in [n for n, t in loaded.items() if t.dim() == 3]:
        cols = loaded[name].shape[-1]
        before = reader.bytes_read
        rows = reader.read_expert_rows(name, 5, 43)
        assert torch.equal(rows, loaded[name].reshape(-1, cols)[5:43]), name
        assert reader.bytes_read - before == 38 * cols * 4, name  # the partition's rows alone, fp32


def test_a_missing_expert_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from lisa_dist.errors import WeightsError

    directory = write_family("mixtral", tmp_path / "mixtral")
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    model = build_meta_model(hf_config("mixtral"), torch.float32, "eager")
    reader = SafetensorsReader(directory, model)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    with pytest.raises(WeightsError, match=r"gate_up_proj is stored one tensor per expert, and expert 5 of "
                                           r"'\.experts\.\*\.w3\.weight' is missing"):
        reader.check(name, list(model.get_parameter(name).shape))
