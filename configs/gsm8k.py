"""Qwen3-0.6B on GSM8K: NMGRPO with the math_correctness reward, held-out accuracy on the test split.

    python train.py --config configs/gsm8k.py
"""
model_name = "Qwen/Qwen3-0.6B"
dataset_name = "openai/gsm8k"  # preset: config "main", question -> prompt, the number after #### -> reference
eval_split = "test[:200]"
system_prompt = ("Solve the problem step by step. End with a line of the form '#### N' where N is the "
                 "final numeric answer.")
enable_thinking = False
max_steps = 500
batch_size = 8
num_generations = 8
gradient_accumulation_steps = 4
learning_rate = 1e-6
warmup_steps = 10
max_prompt_length = 256
max_completion_length = 256
max_seq_length = 512
temperature = 0.8
top_p = 0.9
mirror_coefficient = 1e-4
reward_functions = ["math_correctness"]
eval_steps = 50
eval_on_start = True
save_steps = 100
output_dir = "./output/gsm8k"
