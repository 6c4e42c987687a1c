"""Qwen2.5-Coder-0.5B-Instruct on MBPP: NMGRPO with sandboxed unit tests as the reward.

    python train.py --config configs/mbpp.py

The MBPP preset turns each task into a prompt that names the function and shows its first test;
code_correctness runs the completion's code against all of the task's asserts in a sandboxed process
(the reward is in rewards_code.py, the sandbox in sandbox.py; see docs/rewards.md), and code_syntax adds a
small shaping term for code that at least parses.
"""
model_name = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
dataset_name = "google-research-datasets/mbpp"  # preset: "full" config, prompt naming the function, tests kept
eval_split = "validation"
system_prompt = "You are an expert Python programmer. Answer with code only, in one ```python block."
max_steps = 300
batch_size = 8
num_generations = 8
gradient_accumulation_steps = 4
learning_rate = 1e-6
warmup_steps = 10
max_prompt_length = 384
max_completion_length = 384
max_seq_length = 768
temperature = 0.8
top_p = 0.95
mirror_coefficient = 1e-4
rewards = [
    {"type": "code_correctness", "weight": 1.0, "params": {"timeout": 5.0}},
    {"type": "code_syntax", "weight": 0.1},
]
eval_steps = 50
save_steps = 100
output_dir = "./output/mbpp"
