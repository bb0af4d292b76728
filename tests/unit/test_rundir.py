import json

import pytest

from lisa_dist.checkpoint import check_resume_compatible
from lisa_dist.errors import CheckpointError
from lisa_dist.rundir import MetricsWriter
from tests.helpers import tiny_config


def test_resume_allows_bookkeeping_changes_and_refuses_training_changes(tmp_path):
    saved = tiny_config(tmp_path).to_dict()
    check_resume_compatible(saved, tiny_config(tmp_path / "elsewhere", save_every=5, max_steps=50))
    # where tensors live and how micro-batches split: another engine or world size resumes
    check_resume_compatible(saved, tiny_config(tmp_path, engine={"name": "zero3", "timeout_s": 5},
                                               train={"micro_batch_size": 1}, save_total_limit=2))
    with pytest.raises(CheckpointError, match=r"train.global_batch_size: 8 -> 16"):
        check_resume_compatible(saved, tiny_config(tmp_path, train={"global_batch_size": 16}))
    with pytest.raises(CheckpointError, match=r"lisa.gamma: 2 -> 3"):
        check_resume_compatible(saved, tiny_config(tmp_path, lisa={"gamma": 3}))
    cosine = tiny_config(tmp_path, optim={"schedule": "cosine"})
    with pytest.raises(CheckpointError, match="max_steps changed from 6 to 9 with the cosine schedule"):
        check_resume_compatible(cosine.to_dict(), tiny_config(tmp_path, max_steps=9, optim={"schedule": "cosine"}))


def test_metrics_are_cut_back_to_the_checkpoint_on_resume(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in range(1, 6):
        writer.write({"step": step})
    writer.keep_until(3)
    writer.write({"step": 4})
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
