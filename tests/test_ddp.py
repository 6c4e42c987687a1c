"""torchrun: two gloo processes on CPU give the parameters one process gives over the same global batch."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH = json.dumps([{"type": "length", "params": {"target_length": 3}}])


def run(small, out, nproc, batch_size, loss_type, scale="group"):
    args = [os.path.join(REPO, "train.py"), "--model_name", small["model_name"], "--dataset_name",
            small["dataset_name"], "--column_mapping", json.dumps(small["column_mapping"]), "--rewards", LENGTH,
            "--eval_size", "8", "--eval_steps", "0", "--batch_size", str(batch_size), "--num_generations", "4",
            "--max_completion_length", "8", "--max_prompt_length", "64", "--device", "cpu", "--precision", "fp32",
            "--max_steps", "3", "--save_steps", "0", "--logging_steps", "1", "--loss_type", loss_type,
            "--gradient_accumulation_steps", "2", "--optimizer", "sgd", "--learning_rate", "0.1",
            "--scale_rewards", scale,
            "--output_dir", out]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(os.path.join(out, "checkpoint-3", "model.safetensors")), \
        [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.parametrize("loss_type, scale", [("grpo", "group"), ("bnpo", "group"), ("dr_grpo", "group"),
                                              ("dapo", "group"), ("dapo", "batch")])
def test_two_processes_match_one(small, tmp_path, loss_type, scale):
    one, m1 = run(small, str(tmp_path / "one"), 1, 4, loss_type, scale)
    two, m2 = run(small, str(tmp_path / "two"), 2, 2, loss_type, scale)
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-5, worst
    initial = load_file(os.path.join(small["model_name"], "model.safetensors"))
    assert max((one[k] - initial[k]).abs().max().item() for k in one if k in initial) > 1e-4  # it did learn
    for a, b in zip(m1, m2):  # metrics are reduced over the processes
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
        assert a["completion_length"] == pytest.approx(b["completion_length"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # the summed gradient
