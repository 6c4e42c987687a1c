"""Offline demo: NMGRPO on a tiny Qwen3 and the toy arithmetic task, on CPU in a few minutes.

    python train.py --config configs/demo.py

A short cold start (configs/coldstart.py, cached) teaches the random model the answer format from
careless demonstrations (70% report one more than their own result); the held-out accuracy is
measured before the first RL step and after the last, so the rise is the RL's.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import coldstart  # noqa: E402
import data  # noqa: E402
import tasks  # noqa: E402

dataset_name = "toy"
max_samples = 2000
eval_size = 200
seed = 0
_, _held_out = data.load_examples(dataset_name, max_samples=max_samples, eval_size=eval_size, seed=seed)
model_name = coldstart.prepare(
    os.path.join(os.path.expanduser("~"), ".cache", "nmgrpo", "demo-coldstart-v4"),
    tasks.toy_task(3000, seed=1), exclude=[ex["prompt"] for ex in _held_out], steps=600, label_noise=0.7,
    layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16)

device = "cpu"
precision = "fp32"
max_steps = 150
batch_size = 16
num_generations = 8
learning_rate = 1e-4
lr_scheduler = "cosine"
warmup_steps = 5
temperature = 1.0
top_p = 1.0
max_prompt_length = 128
max_completion_length = 16
mirror_coefficient = 1e-4
loss_type = "grpo"  # the demo's own choice (the default is AlignTune's dapo: 0.79 at step 150 here)
reward_functions = ["math_correctness"]
eval_on_start = True
eval_steps = 25
eval_batch_size = 200
logging_steps = 10
save_steps = 0
output_dir = "./output/demo"
