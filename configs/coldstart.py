"""The demo's cold start: a tiny Qwen3 learns the toy task's answer format by a short supervised pass.

The demonstrations come from a careless annotator: most of them end with a final answer one more
than the result their own working shows ("7 + 5 = 12 / #### 13"). Imitation copies the mistake;
the verifiable reward of the RL run that follows is what corrects it. This is kept apart from the
trainer and cached: the first `python train.py --config configs/demo.py` builds it (about a minute
on 2 CPU cores), later runs load it from the cache folder.
"""
import fcntl
import os
import random
import shutil
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import tiny  # noqa: E402


def sft(model, tokenizer, rows, steps, batch_size=64, lr=3e-3, seed=0):
    """Teacher-forced cross-entropy on the answers of `rows` (the prompt tokens are not scored)."""
    gen = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token
    texts = [(data.render_prompt(tokenizer, r["question"]), r["answer"] + eos) for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    model.train()
    for _ in tqdm(range(steps), desc="cold start", leave=False):
        pick = torch.randint(len(texts), (batch_size,), generator=gen).tolist()
        prompts = [tokenizer(texts[i][0], add_special_tokens=False)["input_ids"] for i in pick]
        answers = [tokenizer(texts[i][1], add_special_tokens=False)["input_ids"] for i in pick]
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)  # (B, L), right padded
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for j, (p, a) in enumerate(zip(prompts, answers)):
            ids[j, :len(p) + len(a)] = torch.tensor(p + a)
            labels[j, len(p):len(p) + len(a)] = torch.tensor(a)
            mask[j, :len(p) + len(a)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return model


def careless(rows, rate, seed=0):
    """The rows as a careless annotator writes them: a `rate` share report one more than the result."""
    rng = random.Random(seed)
    out = []
    for r in rows:
        work, answer = r["answer"].rsplit("#### ", 1)
        wrong = rng.random() < rate
        out.append({**r, "answer": f"{work}#### {int(answer) + 1 if wrong else answer}"})
    return out


def prepare(folder, rows, exclude=(), steps=300, seed=0, label_noise=0.0, **sizes):
    """Build (once) a tokenizer and model, cold-start them on `rows` minus the `exclude` questions, save.

    label_noise: the share of demonstrations whose final answer is off by one (see careless). Processes that
    start together (torchrun) take turns on a lock file: one builds, the others then find it built."""
    os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
        exclude = set(exclude)
        rows = careless([r for r in rows if r["question"] not in exclude], label_noise, seed)
        tokenizer = tiny.build_tokenizer([r["question"] + "\n" + r["answer"] for r in rows], vocab_size=512, seed=seed)
        model = tiny.build_model(tokenizer, seed=seed, **sizes)
        sft(model, tokenizer, rows, steps, seed=seed)
        tmp = folder + ".tmp"
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # no "Writing model shards" bar after the cold start's own
        shutil.rmtree(tmp, ignore_errors=True)  # left by a build that was killed
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    return folder
