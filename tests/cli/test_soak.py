"""scripts/soak.py, the random-kill soak, for one job (scripts/soak.sh N runs more): the job loses a
rank to kill -9 at a moment drawn from its seed and must end with the uninterrupted run's weights and every step
logged once; the script's own check must also catch a run that did not."""

import torch
from safetensors.torch import load_file, save_file

from scripts.soak import check, main


def test_a_killed_job_ends_with_the_uninterrupted_runs_weights(tmp_path, capsys):
    assert main(["1", "--seed", "100", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("same weights, every step once") == 1 and "1 of 1 jobs ended as the uninterrupted run did" in out
    # the check can fail: a job whose metrics lost a step, or whose weights differ
    job = tmp_path / "job_100"
    lines = (job / "metrics.jsonl").read_text().splitlines()
    (job / "metrics.jsonl").write_text("\n".join(lines[:3] + lines[4:]) + "\n")
    assert check(job, tmp_path / "reference") == "metrics.jsonl steps [1, 2, 3, 5, 6, 7, 8]"
    (job / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert check(job, tmp_path / "reference") is None
    weights = load_file(job / "final" / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = torch.nextafter(weights[name], weights[name] + 1)  # one ulp
    save_file(weights, job / "final" / "model.safetensors")
    assert check(job, tmp_path / "reference") == f"final weights differ: {name}"
