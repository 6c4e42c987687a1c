"""NMGRPO training, top to bottom: prompts -> sample -> score -> advantages -> loss -> step.

    python train.py --config configs/demo.py
    python train.py --config configs/gsm8k.py --learning_rate=2e-6
    python train.py --config configs/nmgrpo_gsm8k.yaml      # AlignTune's YAML schema, its flags too
    python train.py plot OUTPUT_DIR                         # PNGs of a run's metrics

GRPO samples G completions per prompt, scores them, normalises the rewards within each group into
advantages and raises the clipped likelihood ratio of the good ones. NMGRPO regularises toward the
reference policy with the Bregman divergence of a neural mirror map (mirror.py) instead of a KL.
"""
import contextlib
import copy
import datetime
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time

import torch
from tqdm import tqdm

import config as config_lib
import data
import logs
import compat
import checkpoint as checkpoint_lib
import fsdp
import lora
import rewards as rewards_lib
from logprobs import completion_logprobs, completion_loss
from mirror import NeuralMirror, divergence
from sampler import sample

RANK = 0  # this process's rank and the number of processes: a single process is rank 0 of 1
WORLD = 1
QUIET = False  # log_level WARNING or ERROR: no progress lines


def log(msg, warning=False):
    """The one console path: rank 0 only, above the progress bar."""
    if RANK == 0 and (warning or not QUIET):
        tqdm.write(str(msg))


# ---------------------------------------------------------------------------- setup

def init_distributed(cfg):
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1): nccl on GPUs, gloo on CPU."""
    global RANK, WORLD
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed as dist
    if not dist.is_initialized():  # gloo also for the small CPU tensors of metrics and stop flags
        gpu = cfg.device != "cpu" and torch.cuda.is_available()
        dist.init_process_group("cpu:gloo,cuda:nccl" if gpu else "gloo", timeout=datetime.timedelta(hours=2))
    RANK, WORLD = dist.get_rank(), dist.get_world_size()


def all_reduce(x, op="sum"):
    """x (a tensor) summed (or maxed) over the processes; itself with one process."""
    if WORLD > 1:
        import torch.distributed as dist
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x


def resolve_device(cfg):
    """(device, autocast dtype or None); ValueError when the precision cannot run here."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but no CUDA GPU is visible: use device='cpu'")
    if device.type == "cuda" and WORLD > 1:  # one GPU per process, whatever index the config names
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' needs a CUDA GPU: use precision='bf16' or 'fp32' on CPU")
    return device, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_model(name, device, cfg, dtype=torch.float32):
    """A causal LM (weights in `dtype`) and its tokenizer through from_pretrained, with a clear error when missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name or name, cache_dir=cfg.cache_dir)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, cache_dir=cfg.cache_dir)
    except OSError as e:
        raise ValueError(f"model_name={name!r} could not be loaded ({str(e).splitlines()[0]}): give a local "
                         "folder with config.json and weights, or a Hub name while online") from None
    if cfg.chat_template == "none":
        tokenizer.chat_template = None  # plain text prompts
    elif cfg.chat_template not in (None, "auto"):
        tokenizer.chat_template = cfg.chat_template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    head = model.get_output_embeddings()
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(model.config, key, None) not in (None, 1, 1.0):
            raise ValueError(f"model_name={name!r} transforms its logits ({key}), which the log-prob kernel "
                             "does not apply yet: choose a model without it")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"model_name={name!r} has an lm_head bias, which the log-prob kernel does not apply "
                         "yet: choose a model without it")
    for m in model.modules():  # sampler and learner must see the same function of the weights
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0
    return model.to(device).train(), tokenizer


def resolve_rewards(cfg, device=None):
    """The config's rewards (rewards.resolve), math_correctness when it names none."""
    return rewards_lib.resolve(cfg.rewards, cfg.reward_functions or (None if cfg.rewards else ["math_correctness"]),
                               cfg.reward_function_weights, device=device)


def load_policy(cfg, device, amp_dtype, sharded=False):
    """The model to train (with its LoRA adapters when use_lora) and its tokenizer. Full fine-tuning keeps
    fp32 master weights under autocast; a frozen LoRA base is stored in bf16 when the run is bf16 (fp16 keeps
    it in fp32: fp16 weights overflow too easily; FSDP too: a shard group holds one dtype), adapters in fp32."""
    bf16_base = cfg.use_lora and amp_dtype == torch.bfloat16 and not sharded
    model, tokenizer = load_model(cfg.model_name, device, cfg, torch.bfloat16 if bf16_base else torch.float32)
    if cfg.use_lora:
        lora.inject(model, lora_targets(cfg), cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora)
    return model, tokenizer


def checked_prompt_cap(cfg, model):
    """The prompt tokens kept (cut from the left): min(max_prompt_length, max_seq_length - max_completion_length),
    checked against the model's context."""
    context = getattr(model.config, "max_position_embeddings", None)
    cap = min(cfg.max_prompt_length, cfg.max_seq_length - cfg.max_completion_length)
    if cap < cfg.max_prompt_length:
        log(f"note: prompts are cut to {cap} tokens (max_seq_length {cfg.max_seq_length} - "
            f"max_completion_length {cfg.max_completion_length}), below max_prompt_length={cfg.max_prompt_length}")
    if cap < 1:
        raise ValueError(f"max_seq_length={cfg.max_seq_length} leaves no room for prompts after "
                         f"max_completion_length={cfg.max_completion_length}: raise max_seq_length")
    if context and cap + cfg.max_completion_length > context:
        raise ValueError(f"prompt ({cap}) + completion ({cfg.max_completion_length}) tokens exceed the "
                         f"model's context of {context}: lower max_prompt_length or max_completion_length")
    return cap


def load_task(cfg, reward_fns, world=1):
    """(train examples, held-out examples), checked against the rewards' columns and the batch size."""
    train_set, eval_set = data.load_examples(
        cfg.dataset_name, config_name=cfg.dataset_config, split=cfg.split, eval_split=cfg.eval_split,
        eval_size=cfg.eval_size if cfg.eval_split is None else 0, max_samples=cfg.max_samples,
        column_mapping=cfg.column_mapping, processing_fn=cfg.processing_fn, seed=cfg.seed, cache_dir=cfg.cache_dir)
    rewards_lib.check_columns(reward_fns, train_set[0].keys() if train_set else ())
    if len(train_set) < cfg.batch_size * world:
        raise ValueError(f"{len(train_set)} training prompts cannot fill batch_size={cfg.batch_size} "
                         f"x {world} process(es): lower batch_size or add data")
    return train_set, eval_set


def lora_targets(cfg):
    """lora_target_modules as inject takes it: 'all-linear' or a list ('q_proj,v_proj' is split)."""
    t = cfg.lora_target_modules
    return t if t == "all-linear" else [x.strip() for x in t.split(",")] if isinstance(t, str) else list(t)


def stop_ids(model, tokenizer):
    """Every id that ends a completion: the tokenizer's EOS and the model's generation EOS."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


def build_optimizer(cfg, params):
    """The torch optimizer that cfg.optimizer names."""
    kind = cfg.optimizer
    if kind in ("adamw_torch", "adamw"):
        return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    if kind == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def setup(cfg, mirror=None, solo=False):
    """Everything a run needs, checked before anything is written: a dict `run`. `mirror` (a NeuralMirror)
    replaces the one the config describes; `solo` runs in this process alone even under torchrun (es.py)."""
    from transformers import get_scheduler
    global QUIET, RANK, WORLD
    QUIET = cfg.log_level in ("WARNING", "ERROR")
    logging.getLogger().setLevel(cfg.log_level)
    torch.manual_seed(cfg.seed)
    if solo:
        RANK, WORLD = 0, 1
    else:
        init_distributed(cfg)
    device, amp_dtype = resolve_device(cfg)
    resume = checkpoint_lib.resume_path(cfg, lambda msg: log(msg, warning=True)) if cfg.resume else None
    if not resume and cfg.resume != "latest" and (checkpoint_lib.checkpoints(cfg.output_dir) or
                                                  os.path.isfile(os.path.join(cfg.output_dir, "metrics.jsonl"))):
        raise ValueError(f"output_dir={cfg.output_dir!r} holds an earlier run: continue it with --resume=latest, "
                         "or give a new output_dir")
    reward_fns = resolve_rewards(cfg, device)
    sharded = cfg.distributed == "fsdp" and WORLD > 1
    if cfg.distributed == "fsdp" and WORLD == 1:
        log("note: distributed='fsdp' shards over torchrun's processes; this single process holds the whole model")
    model, tokenizer = load_policy(cfg, device, amp_dtype, sharded)
    prompt_cap = checked_prompt_cap(cfg, model)
    train_set, eval_set = load_task(cfg, reward_fns, WORLD)
    for ex in train_set + eval_set:
        ex["text"] = data.render_prompt(tokenizer, ex["prompt"], cfg.system_prompt, cfg.enable_thinking)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
        if cfg.use_lora:  # the frozen embeddings give no grad to checkpoint through otherwise
            model.enable_input_require_grads()
    ref_model = None
    if cfg.divergence_type != "none" and not cfg.use_lora:  # a frozen copy of the initial weights
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # (LoRA: the base, adapters off)
    roots = {id(m): fsdp.shard(m, frozen=m is ref_model) for m in (model, ref_model) if m is not None} \
        if sharded else {}
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(
        cfg.num_epochs * len(train_set) / (cfg.batch_size * WORLD))
    mirror = copy.deepcopy(mirror) if mirror is not None else NeuralMirror.load(cfg.mirror_path) if cfg.mirror_path \
        else NeuralMirror(cfg.mirror_init_scale, cfg.mirror_seed)
    optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    updates = total_steps * cfg.num_iterations
    warmup = math.ceil(cfg.warmup_ratio * updates) if cfg.warmup_ratio > 0 else cfg.warmup_steps
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=updates)
    run = dict(cfg=cfg, device=device, amp_dtype=amp_dtype, model=model, ref_model=ref_model,
                tokenizer=tokenizer, eos=stop_ids(model, tokenizer), prompt_cap=prompt_cap,
                roots=roots, optimizer=optimizer, scheduler=scheduler,
                scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
                mirror=mirror.to(device).requires_grad_(False),
                rewards=reward_fns, train_set=train_set, eval_set=eval_set, total_steps=total_steps,
                step=0, skipped_steps=0, resume=resume)
    if resume:  # read here, so that a checkpoint that does not fit stops the run before anything is written
        checkpoint_lib.load_checkpoint(run, resume, log)
    return run


def autocast(run):
    """Mixed precision for the forwards when the run asks for it."""
    if run["amp_dtype"] is None:
        return contextlib.nullcontext()
    return torch.autocast(run["device"].type, dtype=run["amp_dtype"])


# ---------------------------------------------------------------------------- one step

def group_advantages(rewards, group_size, scale="group"):
    """(r - mean of its group) / (std + 1e-4); rewards (B*G,) with each group contiguous."""
    r = rewards.view(-1, group_size)  # (B, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(dim=1, keepdim=True) + 1e-4)
    elif scale == "batch":
        adv = adv / (batch_std(rewards) + 1e-4)
    return adv.flatten()  # (B*G,)


def batch_std(x):
    """The (unbiased) std of x over every process's batch."""
    n_sum_sq = all_reduce(torch.stack([x.new_tensor(x.numel()), x.sum(), (x * x).sum()]).double())
    n, total, sq = n_sum_sq.tolist()
    return max((sq - total * total / n) / max(n - 1, 1), 0.0) ** 0.5


def score(run, examples, completions):
    """Rewards of decoded completions: total (N,) and each reward's column; the reference always goes in."""
    refs = [ex.get("reference") for ex in examples]
    rows = [{k: v for k, v in ex.items() if k not in ("reference", "text")} for ex in examples]
    total, columns = rewards_lib.score(run["rewards"], completions, refs, rows)
    return torch.tensor(total, dtype=torch.float32), columns


def rollout(run, examples, num_samples, generator=None, greedy=False):
    """Sample `num_samples` completions per example: prompt/completion ids and masks, the sampler's
    log-probs of its tokens, decoded texts."""
    cfg, tok = run["cfg"], run["tokenizer"]
    ids, mask, n_cut = data.encode_prompts(tok, [ex["text"] for ex in examples], run["prompt_cap"])
    ids, mask = ids.to(run["device"]), mask.to(run["device"])
    model = run["model"]
    was_training = model.training
    model.eval()
    with autocast(run), gathered(run, model):
        comp, comp_mask, *comp_logp = through(
            run, model, sample, ids, mask, max_new_tokens=cfg.max_completion_length, eos_token_id=run["eos"],
            pad_token_id=tok.pad_token_id, num_samples=num_samples, temperature=cfg.temperature, top_p=cfg.top_p,
            top_k=cfg.top_k, greedy=greedy, generator=generator, return_logprobs=not greedy,  # eval needs none
            compile=cfg.torch_compile, noise_rows=(RANK * len(examples) * num_samples,
                                                    WORLD * len(examples) * num_samples))
    model.train(was_training)
    texts = tok.batch_decode(comp.masked_fill(comp_mask == 0, tok.pad_token_id), skip_special_tokens=True)
    return dict(prompt_ids=ids.repeat_interleave(num_samples, 0), prompt_mask=mask.repeat_interleave(num_samples, 0),
                ids=comp, mask=comp_mask, sampler_logp=comp_logp[0] if comp_logp else None, texts=texts, prompts_cut=n_cut)


def through(run, model, fn, *args, **kwargs):
    """fn(model, ...); under FSDP, as the forward of the model's shard root, which gathers its weights."""
    root = run["roots"].get(id(model))
    return root(fn, *args, **kwargs) if root is not None else fn(model, *args, **kwargs)


def gathered(run, model):
    """The sharded model's weights whole for the block (the sampler's small forwards); nothing without FSDP."""
    root = run["roots"].get(id(model))
    return fsdp.gathered(root) if root is not None else contextlib.nullcontext()


def prompt_group(cfg, rows):
    """G when the slice `rows` holds whole groups, so each prompt's decoder pass can serve its G
    completions (not under gradient checkpointing, which runs without a cache); else 1."""
    g = cfg.num_generations
    return g if rows.start % g == 0 and (rows.stop - rows.start) % g == 0 and not cfg.gradient_checkpointing else 1


def batch_logprobs(run, model, batch, rows, grad=False):
    """Log-probs and entropies (n, T) of the completions `rows` (a slice) under `model`."""
    cfg = run["cfg"]
    with torch.set_grad_enabled(grad), autocast(run):
        return through(run, model, completion_logprobs, batch["prompt_ids"][rows], batch["prompt_mask"][rows],
                       batch["ids"][rows], batch["mask"][rows], cfg.temperature, cfg.logprob_chunk_size,
                       cfg.torch_compile, prompt_group(cfg, rows))


def clip_range(cfg):
    """(epsilon_low, epsilon_high) of the ratio clip."""
    return (cfg.epsilon if cfg.epsilon_low is None else cfg.epsilon_low,
            cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high)


def per_token_loss(run, logp, old_logp, ref_logp, adv):
    """-clipped surrogate + weighted regulariser of each token, its ratio and its divergence.

    Every argument is shaped like logp, or broadcasts to it (adv (n, 1) against (n, T)).
    """
    cfg = run["cfg"]
    lo, hi = clip_range(cfg)
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - lo, 1 + hi) * adv)
    div = divergence(cfg.divergence_type, logp, ref_logp, mirror=run["mirror"], coef=1.0, beta=1.0)
    weight = cfg.beta if cfg.divergence_type == "kl" else cfg.mirror_coefficient
    return -surrogate + weight * div, ratio, div


def token_weights(cfg, mask, norm, dtype=torch.float32):
    """Each token's weight in the step loss (n, T): loss_type's averaging over the loss mask, over `norm`."""
    m = mask.to(dtype)
    if cfg.loss_type == "grpo":  # mean over each sequence first
        m = m / m.sum(1, keepdim=True).clamp(min=1)
    return m / norm


@torch.no_grad()
def token_stats(cfg, ratio, div, adv, mask):
    """Per-token sums over the loss mask: clipped fractions, divergence, ratio."""
    lo, hi = clip_range(cfg)
    a, m = adv[:, None], mask.float()
    stats = dict(clip_low=((ratio < 1 - lo) & (a < 0)).float(), clip_high=((ratio > 1 + hi) & (a > 0)).float(),
                 divergence=div, ratio=ratio)
    return {k: (v.detach() * m).sum().item() for k, v in stats.items()}


def loss_terms(run, logp, old_logp, ref_logp, adv, mask, norm):
    """The micro-batch's share of the step loss through plain autograd, and its per-token statistics.

    logp, old_logp, ref_logp, mask: (n, T); adv: (n,). `norm` is the loss_type's denominator over the
    whole step batch, so the update does not depend on how the batch is cut into micro-batches.
    """
    per_token, ratio, div = per_token_loss(run, logp, old_logp, ref_logp, adv[:, None])  # (n, T)
    loss = (per_token * token_weights(run["cfg"], mask, norm, logp.dtype)).sum()
    return loss, token_stats(run["cfg"], ratio, div, adv, mask)


def fused_loss_terms(run, model, batch, rows, old_logp, ref_logp, adv, mask, norm):
    """The same loss, evaluated chunk by chunk inside the lm_head pass (logprobs.completion_loss).

    Returns (loss, logp (n, T), entropy (n, T), stats); old_logp None means the current log-probs.
    """
    cfg = run["cfg"]
    keep = batch["mask"][rows].bool()  # the tokens the kernel sees, in row-major order
    weights = token_weights(cfg, mask, norm)[keep]  # (M,)
    adv_tok = adv[:, None].expand(keep.shape)[keep]
    old, ref = (None if x is None else x[keep] for x in (old_logp, ref_logp))

    def loss_fn(lp, s):  # lp (C,): log-probs of the kept tokens s
        o = lp.detach() if old is None else old[s]
        return (per_token_loss(run, lp, o, None if ref is None else ref[s], adv_tok[s])[0] * weights[s]).sum()

    with autocast(run):
        loss, logp, ent = through(run, model, completion_loss, batch["prompt_ids"][rows], batch["prompt_mask"][rows],
                                  batch["ids"][rows], batch["mask"][rows], loss_fn, cfg.temperature,
                                  cfg.logprob_chunk_size, cfg.torch_compile, prompt_group(cfg, rows))
    with torch.no_grad():
        _, ratio, div = per_token_loss(run, logp, logp if old_logp is None else old_logp, ref_logp, adv[:, None])
    return loss, logp, ent, token_stats(cfg, ratio, div, adv, mask)


def normaliser(cfg, mask):
    """The denominator of loss_type over this step's loss mask (N, T), counted over every process."""
    if cfg.loss_type == "grpo":
        return mask.size(0) * WORLD
    if cfg.loss_type == "dr_grpo":
        return mask.size(0) * WORLD * cfg.max_completion_length
    return max(int(all_reduce(mask.sum()).item()), 1)  # bnpo, dapo: tokens in the step batch


def micro_slices(cfg, n):
    """The gradient_accumulation_steps row slices of a step batch of n completions."""
    micro = n // cfg.gradient_accumulation_steps
    return [slice(i, i + micro) for i in range(0, n, micro)]


@torch.no_grad()
def reference_logprobs(run, batch):
    """The reference policy's log-probs (N, T) of the sampled tokens: the frozen initial weights, or with
    LoRA the same model with its adapters off; None without a regulariser."""
    cfg, model = run["cfg"], run["model"]
    if cfg.divergence_type == "none":
        return None
    slices = micro_slices(cfg, batch["ids"].size(0))
    if not cfg.use_lora:
        return torch.cat([batch_logprobs(run, run["ref_model"], batch, s)[0] for s in slices])
    was_training = model.training
    try:
        with lora.adapters_off(model):
            model.eval()
            return torch.cat([batch_logprobs(run, model, batch, s)[0] for s in slices])
    finally:
        model.train(was_training)


def learn(run, batch, adv, loss_mask, ref_logp):
    """num_iterations optimizer updates on one sampled batch; per-token sums for the metrics."""
    cfg, model = run["cfg"], run["model"]
    slices = micro_slices(cfg, batch["ids"].size(0))
    old_logp = None
    if cfg.num_iterations > 1:
        old_logp = torch.cat([batch_logprobs(run, model, batch, s)[0] for s in slices])
    norm = normaliser(cfg, loss_mask)
    sums = dict(loss=0.0, entropy=0.0, clip_low=0.0, clip_high=0.0, divergence=0.0, ratio=0.0, grad_norm=0.0,
                logp_gap=0.0)
    for it in range(cfg.num_iterations):
        for s in slices:
            old = None if old_logp is None else old_logp[s]
            ref = None if ref_logp is None else ref_logp[s]
            if cfg.fused_loss:
                loss, logp, ent, stats = fused_loss_terms(run, model, batch, s, old, ref, adv[s], loss_mask[s], norm)
            else:
                logp, ent = batch_logprobs(run, model, batch, s, grad=True)
                loss, stats = loss_terms(run, logp, logp.detach() if old is None else old, ref, adv[s], loss_mask[s],
                                         norm)
            if it == 0:  # the sampler and the learner should agree on the weights they share
                sums["logp_gap"] += ((logp.detach() - batch["sampler_logp"][s]).abs() * batch["mask"][s]).sum().item()
            (run["scaler"].scale(loss) if run["scaler"] else loss).backward()
            sums["loss"] += loss.item() / cfg.num_iterations
            sums["entropy"] += (ent.detach() * batch["mask"][s]).sum().item() / cfg.num_iterations
            for k, v in stats.items():
                sums[k] += v / cfg.num_iterations
        sums["grad_norm"] += optimizer_step(run) / cfg.num_iterations
    return sums


def optimizer_step(run):
    """Clip, then step, unless the gradient is not finite: then the update is skipped and counted."""
    cfg, opt, scaler = run["cfg"], run["optimizer"], run["scaler"]
    params = [p for g in opt.param_groups for p in g["params"]]
    if WORLD > 1 and not run["roots"]:  # the step's gradient is the sum over processes (each loss is over the
        sync_grads(params)                 # global denominator); FSDP has summed its shards in backward
    if scaler:
        scaler.unscale_(opt)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP: a DTensor
    if math.isfinite(grad_norm):
        scaler.step(opt) if scaler else opt.step()
        run["scheduler"].step()
    else:
        run["skipped_steps"] += 1
        log(f"step {run['step'] + 1}: non-finite loss or gradient, update skipped "
            f"({run['skipped_steps']} so far)", warning=True)
    if scaler:
        scaler.update()
    opt.zero_grad(set_to_none=True)
    return grad_norm


@contextlib.contextmanager
def peak_memory(device, out, phase, enabled=True):
    """Record into out[phase] the peak memory of the block in MiB: CUDA memory allocated on a GPU, else
    the process's peak resident set (Linux, whose high-water mark can be reset); None where unknown.
    It resets the process's peak counters (CUDA peak stats; VmHWM and with it ru_maxrss)."""
    reset = enabled
    if enabled and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif enabled:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
        except OSError:
            reset = False  # no per-phase peak here (not Linux, or a kernel that refuses)
    try:
        yield
    finally:
        if reset:
            out[phase] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mib()


def _peak_rss_mib():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def reduce_metrics(m):
    """A step's metrics over every process: sums for the loss (each rank holds its share of the global loss),
    the prompts cut and the throughput; maxima for maxima and peak memory; the mean of the ranks' values for
    the rest (ranks hold equal batches; stds and ratios are averages of per-rank values); step, lr and
    counters are the same everywhere."""
    if WORLD == 1:
        return m
    keys = [k for k, v in m.items() if isinstance(v, (int, float)) and k not in ("step", "lr", "skipped_steps")]
    peak = [k for k in keys if k.endswith("_max") or k.startswith("memory/")]
    summed = [k for k in keys if k in ("loss", "prompts_cut", "tokens_per_s")]
    rest = [k for k in keys if k not in peak]
    sums = all_reduce(torch.tensor([float(m[k]) for k in rest], dtype=torch.float64)).tolist()
    maxes = all_reduce(torch.tensor([float(m[k]) for k in peak], dtype=torch.float64), op="max").tolist()
    return {**m, **{k: v if k in summed else v / WORLD for k, v in zip(rest, sums)}, **dict(zip(peak, maxes))}


def sync_grads(params, bucket=1 << 24):
    """Sum every gradient over the processes, in flat buckets of about `bucket` elements."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    i = 0
    while i < len(params):
        j, size = i, 0
        while j < len(params) and (size == 0 or size + params[j].numel() <= bucket):
            size, j = size + params[j].numel(), j + 1
        grads = [p.grad for p in params[i:j]]
        flat = all_reduce(torch.cat([g.reshape(-1) for g in grads]))
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
        i = j


def step_seed(cfg, step):
    """The sampling seed of (seed, step), the same on every process: each takes its own rows of the step's
    noise (sampler noise_rows), so runs reproduce, ranks never share noise, and N processes draw what one does."""
    return (cfg.seed * 1_000_003 + step * 10_007) % (2 ** 63)


def train_step(run):
    """Sample, score, learn: one step of the loop. Returns its metrics."""
    cfg, step = run["cfg"], run["step"]
    t0 = time.perf_counter()
    idx = data.batch_indices(len(run["train_set"]), cfg.batch_size, step, cfg.seed, RANK, WORLD)
    examples = [run["train_set"][i] for i in idx]
    gen = torch.Generator(run["device"]).manual_seed(step_seed(cfg, step))
    torch.manual_seed(step_seed(cfg, step) + 7919 * (RANK + 1))  # the global RNG (LoRA dropout), apart from the
    # sampler's stream: a resumed run draws the same on every process
    peaks = {}
    with peak_memory(run["device"], peaks, "sample", cfg.memory_metrics):
        batch = rollout(run, examples, cfg.num_generations, generator=gen)
    t1 = time.perf_counter()
    group = [ex for ex in examples for _ in range(cfg.num_generations)]
    reward, columns = score(run, group, batch["texts"])
    reward = reward.to(run["device"])
    adv = group_advantages(reward, cfg.num_generations, cfg.scale_rewards)
    lengths = batch["mask"].sum(1)  # (N,)
    truncated = ~torch.isin(batch["ids"], torch.tensor(run["eos"], device=run["device"])).any(1)
    loss_mask = batch["mask"] * (~truncated)[:, None] if cfg.mask_truncated_completions else batch["mask"]
    t2 = time.perf_counter()
    lr = run["scheduler"].get_last_lr()[0]  # the rate this step's first update uses
    with peak_memory(run["device"], peaks, "reference", cfg.memory_metrics):
        ref_logp = reference_logprobs(run, batch)
    with peak_memory(run["device"], peaks, "learn", cfg.memory_metrics):
        sums = learn(run, batch, adv, loss_mask, ref_logp)
    t3 = time.perf_counter()
    tokens = max(loss_mask.sum().item(), 1)
    gen_tokens = lengths.sum().item()
    groups_std = reward.view(-1, cfg.num_generations).std(1)
    m = dict(step=step + 1, reward=reward.mean().item(), reward_std=reward.std().item(),
             frac_zero_std_groups=(groups_std < 1e-6).float().mean().item(),
             completion_length=lengths.float().mean().item(), completion_length_max=lengths.max().item(),
             truncated_frac=truncated.float().mean().item(), prompts_cut=batch["prompts_cut"],
             loss=sums["loss"], entropy=sums["entropy"] / gen_tokens if gen_tokens else 0.0,
             clip_low=sums["clip_low"] / tokens, clip_high=sums["clip_high"] / tokens,
             ratio=sums["ratio"] / tokens, grad_norm=sums["grad_norm"],
             sampler_logp_gap=sums["logp_gap"] / gen_tokens if gen_tokens else 0.0,
             lr=lr, skipped_steps=run["skipped_steps"],
             tokens_per_s=gen_tokens / (t3 - t0), step_time=t3 - t0,
             time_sample=t1 - t0, time_score=t2 - t1, time_learn=t3 - t2,
             **{f"memory/{k}_mib": v for k, v in peaks.items() if v is not None})
    m[{"neural_mirror": "bregman", "kl": "kl", "prob_l2": "prob_l2", "none": "divergence"}[cfg.divergence_type]] = \
        sums["divergence"] / tokens
    for name, col in columns.items():
        col = torch.tensor(col)
        m[f"rewards/{name}"], m[f"rewards/{name}_std"] = col.mean().item(), col.std().item()
    if "math_correctness" in columns:
        m["accuracy"] = m["rewards/math_correctness"]
    m = reduce_metrics(m)
    run["step"] += 1
    per = [{name: col[i] for name, col in columns.items()} for i in range(len(group))]
    return m, [dict(step=step + 1, prompt=ex["prompt"] if isinstance(ex["prompt"], str) else ex["text"], completion=t,
                    reward=r, rewards=p, advantage=a)
               for ex, t, r, p, a in zip(group, batch["texts"], reward.tolist(), per, adv.tolist())]


@torch.no_grad()
def evaluate(run):
    """Greedy completions of the held-out prompts: accuracy for math, and the mean reward."""
    cfg, eval_set = run["cfg"], run["eval_set"]
    totals, correct = [], []
    for i in range(0, len(eval_set), cfg.eval_batch_size):
        examples = eval_set[i:i + cfg.eval_batch_size]
        batch = rollout(run, examples, 1, greedy=True)
        total, columns = score(run, examples, batch["texts"])
        totals += total.tolist()
        correct += columns.get("math_correctness", [])
    out = {"eval/reward": sum(totals) / len(totals)}
    if correct:
        out["eval/accuracy"] = sum(correct) / len(correct)
    return out


# ---------------------------------------------------------------------------- the loop

def append_jsonl(path, rows):
    """Append rows to a jsonl log (rank 0); a non-finite number is written as null."""
    if RANK == 0:
        with open(path, "a") as f:
            for row in rows:
                row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
                f.write(json.dumps(row) + "\n")


def truncate_jsonl(path, step):
    """Keep the rows of a jsonl log whose step is at most `step`."""
    def kept(line):
        try:
            return json.loads(line).get("step", 0) <= step
        except json.JSONDecodeError:  # a line cut short when the process was killed
            return False
    if RANK == 0 and os.path.isfile(path):
        with open(path) as f:
            rows = [line for line in f if kept(line)]
        with open(path, "w") as f:
            f.writelines(rows)


def train(cfg, mirror=None):
    """Run NMGRPO from a Config (and a given mirror); returns the final metrics, the output folder and the last
    checkpoint. backend='trl' trains in TRL's GRPOTrainer (trl_backend.py) instead."""
    if cfg.backend == "trl":
        if mirror is not None:
            raise ValueError("backend='trl' reads its mirror from the config: save it (NeuralMirror.save) and give "
                             "mirror_path")
        import trl_backend
        return trl_backend.train(cfg)
    return fit(setup(cfg, mirror))


def held_out_score(cfg, mirror=None, fitness="accuracy"):
    """Train from cfg (with `mirror`) in this process alone, then the final held-out eval/accuracy or
    eval/reward: the fitness of an ES candidate. Raises FloatingPointError when it is not finite,
    KeyboardInterrupt when a stop signal ended the run, ValueError for a config that cannot run."""
    out = fit(setup(cfg, mirror, solo=True), save_last=False)
    if out["stopped_by"]:
        raise KeyboardInterrupt(f"{out['stopped_by']}: the inner run stopped after step {out['steps']}")
    score = out["metrics"].get(f"eval/{fitness}")
    if score is None:
        raise ValueError(f"es_fitness={fitness!r}: the run logged no eval/{fitness} (accuracy needs the "
                         "math_correctness reward and eval_size > 0)")
    if not math.isfinite(score):
        raise FloatingPointError(f"eval/{fitness} = {score}")
    return score


def fit(run, save_last=True):
    """The loop over a prepared run (see setup); save_last=False skips the checkpoint of the last step."""
    cfg = run["cfg"]
    if run["resume"]:
        log(f"resumed from {run['resume']} at step {run['step']}")
    elif cfg.resume == "latest":
        log(f"resume='latest': no checkpoint in {cfg.output_dir} yet, starting at step 0")
    fresh = not os.path.isdir(cfg.output_dir)
    try:  # first, so that a logger that cannot start (wandb without a login) leaves nothing behind
        loggers = logs.open_loggers(cfg.loggers, cfg.output_dir, cfg.run_name or os.path.basename(
            os.path.abspath(cfg.output_dir)), config_lib.config_dict(cfg), cfg.wandb_project) if RANK == 0 else []
    except Exception as e:
        if fresh:
            shutil.rmtree(cfg.output_dir, ignore_errors=True)
        raise ValueError(f"loggers={cfg.loggers}: could not start ({type(e).__name__}: {e}); for wandb run "
                         "`wandb login` or set WANDB_MODE=offline") from None
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    samples_path = os.path.join(cfg.output_dir, "samples.jsonl")
    if RANK == 0:  # rank 0 alone writes logs, samples and checkpoints
        os.makedirs(cfg.output_dir, exist_ok=True)
        if cfg.resume:  # rows logged after the checkpoint (or with none, every row) will be logged again
            for path in (metrics_path, samples_path):
                truncate_jsonl(path, run["step"] if run["resume"] else -1)
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump(config_lib.config_dict(cfg), f, indent=1)
    log(f"{cfg.model_name}: {sum(p.numel() for p in run['model'].parameters()):,} parameters on {run['device']}, "
        f"{len(run['train_set'])} train / {len(run['eval_set'])} held-out prompts, {run['total_steps']} steps")

    def record(m, completions=()):
        append_jsonl(metrics_path, [m])
        if cfg.log_completions:
            append_jsonl(samples_path, completions)
        for logger in loggers:
            logger.log(m, m["step"])
        log(fmt(m))

    t0 = time.perf_counter()
    with stop_signals() as caught:
        try:
            out = loop(run, record, caught, save_last)
        finally:
            for logger in loggers:
                logger.close()
    evals, seconds = out.pop("evals"), time.perf_counter() - t0
    key = "eval/accuracy" if any("eval/accuracy" in e for e in evals) else "eval/reward"
    best = max(evals, key=lambda e: e.get(key, float("-inf")), default=None)
    pick = lambda e: e and {"step": e["step"], **{k: v for k, v in e.items() if k.startswith("eval/")}}  # noqa: E731
    log(logs.run_summary(run["step"], seconds, out.pop("tokens") / max(seconds, 1e-9), pick(best),
                         pick(evals[-1] if evals else None), out["checkpoint"], output_dir=cfg.output_dir))
    return {**out, "output_dir": cfg.output_dir, "steps": run["step"], "skipped_steps": run["skipped_steps"],
            "best_eval": pick(best)}


def loop(run, record, caught, save_last=True):
    """Steps until total_steps or a stop signal (then a checkpoint): the last metrics, the last checkpoint,
    every eval row, the tokens generated, and the signal that stopped the run (or None)."""
    cfg = run["cfg"]
    do_eval = len(run["eval_set"]) > 0
    last, ckpt, evals, tokens = {}, None, [], 0
    if do_eval and cfg.eval_on_start and run["step"] == 0:
        last = {"step": 0, **evaluate(run)}
        evals.append(last)
        record(last)
    bar = tqdm(total=run["total_steps"], initial=run["step"], disable=RANK != 0 or QUIET, desc="nmgrpo",
               dynamic_ncols=True)
    while run["step"] < run["total_steps"]:
        m, completions = train_step(run)
        step, tokens = run["step"], tokens + m["completion_length"] * len(completions)
        if m["truncated_frac"] > 0.5:
            m["warning"] = "over half the completions hit max_completion_length"
        if do_eval and (cfg.eval_steps and step % cfg.eval_steps == 0 or step == run["total_steps"]):
            m.update(evaluate(run))
            evals.append(m)
        stop = stopping(caught)  # every process decides together, or a collective would wait forever
        if step % cfg.logging_steps == 0 or "eval/reward" in m or step == run["total_steps"] or stop:
            record(m, completions)
            log(logs.completions_table(completions, width=min(shutil.get_terminal_size().columns, 160)))
        if cfg.save_steps and step % cfg.save_steps == 0 or (step == run["total_steps"] or stop) and save_last:
            ckpt = checkpoint_lib.save_checkpoint(run) if RANK == 0 or run["roots"] else None  # FSDP: every rank
        bar.set_postfix(reward=f"{m['reward']:.3f}", loss=f"{m['loss']:.4f}")
        bar.update(1)
        last = m
        if stop:
            log(f"{caught[0] if caught else 'a stop signal'}: stopped after step {step}; continue with "
                "--resume=latest", warning=True)
            break
    bar.close()
    return {"metrics": last, "checkpoint": ckpt, "evals": evals, "tokens": tokens,
            "stopped_by": caught[0] if caught else None}


def stopping(caught):
    """Whether any process caught a stop signal."""
    return bool(all_reduce(torch.tensor(len(caught)), op="max").item()) if WORLD > 1 else bool(caught)


@contextlib.contextmanager
def stop_signals():
    """Within the block, SIGTERM and SIGINT only append their name to the yielded list, so that the loop can
    finish its step, save and stop; a second SIGINT interrupts at once. Outside the main thread: no change."""
    caught = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum, frame):
        if caught and signum == signal.SIGINT:
            raise KeyboardInterrupt
        caught.append(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield caught
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------- AlignTune's entry point

class RLTrainer:
    """What create_rl_trainer returns: .train() runs NMGRPO and returns the results dict."""

    def __init__(self, cfg):
        self.cfg, self.run, self.results, self.trl = cfg, None, None, None

    def train(self):
        """Train; the results dict under AlignTune's names (and ours: output_dir, checkpoint, steps)."""
        t0 = time.perf_counter()
        if self.cfg.backend == "trl":  # TRL's GRPOTrainer (trl_backend.py), kept for evaluate and save_model
            import trl_backend
            self.trl = trl_backend.build_trainer(self.cfg)
            out = trl_backend.fit(self.trl, self.cfg)
        else:
            self.run = setup(self.cfg)
            out = fit(self.run)
        metrics = out["metrics"]
        self.results = {"training_time": time.perf_counter() - t0, "final_loss": metrics.get("loss"),
                        "total_steps": out["steps"], "model_path": out["checkpoint"], "metrics": metrics,
                        "num_reward_functions": len(self.cfg.rewards or self.cfg.reward_functions or [None]),
                        "mirror_coefficient": self.cfg.mirror_coefficient,
                        "mirror_init_scale": self.cfg.mirror_init_scale, "divergence_type": self.cfg.divergence_type,
                        **out}
        return self.results

    def evaluate(self):
        """Held-out metrics (eval/accuracy, eval/reward) of the current weights (backend 'trl': TRL's evaluation)."""
        if self.cfg.backend == "trl":
            import trl_backend
            self.trl = self.trl or trl_backend.build_trainer(self.cfg)
            self.trl.evaluate()
            return {k: v for k, v in self.trl.metrics_file.evals[-1].items() if k.startswith("eval/")}
        if self.run is None:
            self.run = setup(self.cfg)
        return evaluate(self.run)

    def save_model(self, path=None):
        """A checkpoint of the current weights (in output_dir unless `path`, a new or empty folder, or an
        earlier checkpoint); returns its folder. backend 'trl': TRL's save_model (output_dir unless `path`)."""
        if self.trl is not None:
            self.trl.save_model(path or self.cfg.output_dir)
            return path or self.cfg.output_dir
        if self.run is None:
            raise ValueError("save_model: nothing trained yet; call .train() first")
        busy = path and os.path.isdir(path) and os.listdir(path)
        if busy and not os.path.isfile(os.path.join(path, "trainer_state.json")):
            raise ValueError(f"save_model: {path!r} holds other files; give a new or empty folder")
        return checkpoint_lib.save_checkpoint(self.run, path)


def create_rl_trainer(model_name=None, dataset_name=None, algorithm="nmgrpo", backend="auto", config=None, **kwargs):
    """AlignTune's entry point: a trainer over our Config. `config` is a YAML/JSON path or a mapping (either
    schema); keyword arguments (our field names or AlignTune's) win over it. backend 'trl' trains in TRL's
    GRPOTrainer (trl_backend.py)."""
    values = {}
    if config is not None:
        values = config_lib.read_file(os.fspath(config)) if isinstance(config, (str, os.PathLike)) else dict(config)
        values = compat.from_nested(values) if compat.is_nested(values) else values
    if model_name is not None:
        values["model_name"] = model_name
    if dataset_name is not None:
        values["dataset_name"] = dataset_name
    for key, value in kwargs.items():
        values[compat.KWARGS.get(key, key)] = compat.column_mapping(value) if key == "column_mapping" else value
    for key, value in compat.algo_settings(algorithm).items():  # what the algorithm implies, unless set
        values.setdefault(key, value)
    if "num_epochs" in kwargs and "max_steps" not in kwargs:
        values.setdefault("max_steps", -1)
    values.setdefault("backend", backend)
    return RLTrainer(config_lib.make(values))


def fmt(m):
    """The console line of a metrics row."""
    keys = ("step", "reward", "accuracy", "loss", "bregman", "kl", "prob_l2", "entropy", "completion_length",
            "grad_norm", "lr", "step_time", "eval/accuracy", "eval/reward", "warning")
    return " ".join(f"{k}={m[k]:.4g}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in keys if k in m)


def main(argv):
    if argv[:1] == ["plot"]:
        return logs.main(argv[1:])
    if "-h" in argv or "--help" in argv:
        print(__doc__ + "\nEvery knob (--key=value or --key value; dashes or underscores):" + config_lib.describe()
              + "\n\nAlignTune's flags work too: --type/--algo NAME, "
              + ", ".join(f"--{k.replace('_', '-')} ({v})" for k, v in compat.FLAGS.items()))
        return 0
    cfg = None
    try:
        cfg = config_lib.load(argv)
        train(cfg)
    except ValueError as e:  # a run that cannot go on: one line that names the key and the fix
        if cfg is not None and cfg.log_level == "DEBUG":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
