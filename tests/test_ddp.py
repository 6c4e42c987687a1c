"""torchrun: two gloo processes on CPU give the parameters one process gives over the same global batch,
with DDP and with FSDP (fully_shard); FSDP's sharded checkpoints resume exactly."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH = json.dumps([{"type": "length", "params": {"target_length": 3}}])


def run(small, out, nproc, batch_size, loss_type, scale="group", extra=()):
    args = [os.path.join(REPO, "train.py"), "--model_name", small["model_name"], "--dataset_name",
            small["dataset_name"], "--column_mapping", json.dumps(small["column_mapping"]), "--rewards", LENGTH,
            "--eval_size", "8", "--eval_steps", "0", "--batch_size", str(batch_size), "--num_generations", "4",
            "--max_completion_length", "8", "--max_prompt_length", "64", "--device", "cpu", "--precision", "fp32",
            "--max_steps", "3", "--save_steps", "0", "--logging_steps", "1", "--loss_type", loss_type,
            "--gradient_accumulation_steps", "2", "--optimizer", "sgd", "--learning_rate", "0.1",
            "--scale_rewards", scale,
            "--output_dir", out, *extra]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = "adapter_model.safetensors" if "--use_lora" in extra else "model.safetensors"
    return load_file(os.path.join(out, "checkpoint-3", weights)), \
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


ADAMW = ["--optimizer", "adamw_torch", "--learning_rate", "0.01"]


def test_fsdp_matches_one_process(small, tmp_path):
    """The update, and the eval split over the processes: 5 prompts in batches of 2 are 2 batches on rank 0 and
    1 on rank 1, which samples a stand-in batch so that both gather as often."""
    evals = ["--eval_size", "5", "--eval_batch_size", "2"]
    one, m1 = run(small, str(tmp_path / "one"), 1, 4, "dapo", extra=[*ADAMW, *evals])
    two, m2 = run(small, str(tmp_path / "two"), 2, 2, "dapo", extra=[*ADAMW, *evals, "--distributed", "fsdp"])
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert m1[-1]["eval/reward"] == pytest.approx(m2[-1]["eval/reward"], abs=1e-6)
    ckpt = tmp_path / "two" / "checkpoint-3"
    assert sorted(os.listdir(ckpt / "shards")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    from transformers import AutoModelForCausalLM  # the whole weights load as any checkpoint does
    loaded = AutoModelForCausalLM.from_pretrained(str(ckpt)).state_dict()
    assert max((loaded[k] - two[k]).abs().max().item() for k in two) == 0
    with pytest.raises(AssertionError, match="holds FSDP shards: resume it under torchrun with distributed='fsdp'"):
        run(small, str(tmp_path / "two"), 1, 4, "dapo", extra=[*ADAMW, "--resume", "latest"])


def test_fsdp_resumes_exactly_and_checks_its_shards(small, tmp_path):
    lora = [*ADAMW, "--distributed", "fsdp", "--use_lora", "true", "--lora_r", "4", "--save_steps", "1"]
    straight, _ = run(small, str(tmp_path / "a"), 2, 2, "grpo", extra=lora)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoint-3")  # killed after step 2's checkpoint
    resumed, _ = run(small, str(tmp_path / "b"), 2, 2, "grpo", extra=[*lora, "--resume", "latest"])
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) == 0  # dropout and all
    shard = tmp_path / "b" / "checkpoint-3" / "shards" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    assert "shards/__1_0.distcp" in checkpoint.checkpoint_problem(str(tmp_path / "b" / "checkpoint-3"))


def test_fsdp_bf16_learns_saves_fp32_weights_and_resumes_exactly(small, tmp_path):
    """bf16 under FSDP (the groups gathered in bf16, see test_gpu_ready): two processes learn, the saved weights
    are fp32, and a run resumed from step 2 ends bitwise equal."""
    bf16 = [*ADAMW, "--distributed", "fsdp", "--precision", "bf16", "--save_steps", "1"]
    straight, rows = run(small, str(tmp_path / "a"), 2, 2, "dapo", extra=bf16)
    initial = load_file(os.path.join(small["model_name"], "model.safetensors"))
    assert all(v.dtype == initial[k].dtype for k, v in straight.items() if k in initial)
    assert max((straight[k] - initial[k]).abs().max().item() for k in straight if k in initial) > 1e-4
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoint-3")
    resumed, _ = run(small, str(tmp_path / "b"), 2, 2, "dapo", extra=[*bf16, "--resume", "latest"])
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) == 0
