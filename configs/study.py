"""The study's base config: the demo's task and cold-started model, shrunk so that the whole study
(es.py, then 5 arms x 5 seeds) runs in under 30 minutes on 2 CPU cores (python study.py).

The demo's 200 held-out prompts (never seen by the cold start) are the test set, eval_split: es.py
never touches it, and scores its candidates on es_eval_samples prompts carved off the training split
instead. The arms train on the training split and are scored on the test set.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import coldstart  # noqa: E402
import data  # noqa: E402
import tasks  # noqa: E402

_train, _test = data.load_examples("toy", max_samples=2000, eval_size=200, seed=0)  # the demo's split
model_name = coldstart.prepare(  # the demo's cold start (same arguments: same cached model)
    os.path.join(os.path.expanduser("~"), ".cache", "nmgrpo", "demo-coldstart-v4"),
    tasks.toy_task(3000, seed=1), exclude=[ex["prompt"] for ex in _test], steps=600, label_noise=0.7,
    layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16)
dataset_name = [{"prompt": ex["prompt"], "reference": ex["reference"]} for ex in _train + _test]
split = f"train[:{len(_train)}]"
eval_split = f"train[{len(_train)}:]"  # the test set
eval_size = len(_test)

device = "cpu"
precision = "fp32"
max_steps = 50  # the demo runs 150
batch_size = 8  # the demo: 16
num_generations = 8
learning_rate = 1e-4
lr_scheduler = "cosine"
warmup_steps = 5
temperature = 1.0
top_p = 1.0
max_prompt_length = 128
max_completion_length = 16
mirror_coefficient = 1.0  # weight of D (neural_mirror) and of prob_l2; at the default 1e-4 every run of an
# ES iteration scored the same (the penalty changes no greedy answer in 50 steps), so ES had nothing to learn from
reward_functions = ["math_correctness"]
loss_type = "grpo"  # what docs/study was measured with (the default is now AlignTune's dapo)
eval_steps = 0
eval_batch_size = 200
logging_steps = 10
save_steps = 0
log_completions = False
seed = 100

# the search: the defaults but for the population (10), inner steps (100) and iterations (15)
es_population = 6
es_inner_steps = 50
es_iterations = 8
es_eval_samples = 64
output_dir = "./output/study/es"
