"""NMGRPO training, top to bottom: the run and its setup, the RL math, one step, evaluation, the loop, main.

    python train.py --config configs/demo.py
    python train.py --config configs/gsm8k.py --learning_rate=2e-6
    torchrun --nproc_per_node 2 train.py --config configs/nmgrpo_gsm8k.yaml    # AlignTune's YAML works too

GRPO samples G completions per prompt, normalises their rewards within the group into advantages and
raises the clipped likelihood ratio of the good ones. NMGRPO regularises toward the reference policy with
the Bregman divergence of a neural mirror map (mirror.py) instead of a KL. The choices made here:
- The regulariser is a penalty on each sampled token, with p its probability under the policy and p_ref
  under the reference: neural_mirror adds mirror_coefficient * D_h(p || p_ref); kl adds beta times the k3
  estimator p_ref/p - log(p_ref/p) - 1; prob_l2 adds mirror_coefficient * (p - p_ref)^2. The reference
  is a frozen copy of the initial weights or, with LoRA, the same model with its adapters off.
- loss_type sets each token's weight: grpo averages each sequence, then the sequences; bnpo and dapo divide
  by the step's tokens; dr_grpo by sequences x max_completion_length. The denominators count the whole step
  (every forward and process), so the learner's forwards may hold rows of similar length, each cut to its
  longest (logprobs.length_chunks), and the update stays the same.
- The clip may be asymmetric (epsilon_low/high). With num_iterations = 1 the ratio is exp(logp - logp.detach()),
  1 in value; with more, the old log-probs are taken once, before the first update. A non-finite update is skipped.
- fused_loss (the default) evaluates the same per-token objective inside the chunked lm_head pass
  (logprobs.completion_loss): no (tokens, vocab) logits are held, none are recomputed in backward. Its
  gradients form in the forward, so fp16's loss scale multiplies the loss itself, not its backward.
"""
import contextlib
import copy
import dataclasses
import math
import sys
import time
from typing import Optional

import torch
from tqdm import tqdm

import checkpoint
import common
import config as config_lib
import configurator
import data
import fsdp
import load
import logs
import lora
import rewards
from common import all_reduce, log
from logprobs import completion_logprobs, completion_loss, length_chunks
from mirror import NeuralMirror, divergence
from sampler import sample


# ---------------------------------------------------------------------------- the run and its setup

@dataclasses.dataclass
class Run:
    """Everything a run holds, built by setup; train_step advances step and skipped_steps."""
    cfg: config_lib.Config
    device: torch.device
    amp_dtype: Optional[torch.dtype]  # autocast's dtype; None: fp32
    model: torch.nn.Module
    ref_model: Optional[torch.nn.Module]  # a frozen copy of the initial weights; None with LoRA or no regulariser
    tokenizer: object
    mirror: NeuralMirror
    rewards: list  # rewards.Reward
    train_set: list  # examples: {"prompt", "reference", "text" (the rendered prompt), **other columns}
    eval_set: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: Optional[torch.amp.GradScaler]  # fp16 only
    total_steps: int
    prompt_cap: int  # prompt tokens kept, cut from the left
    eos: list  # every id that ends a completion
    rank: int = 0
    world: int = 1
    roots: dict = dataclasses.field(default_factory=dict)  # FSDP: id(model) -> its shard root
    resume: Optional[str] = None  # the checkpoint the run continues from
    step: int = 0
    skipped_steps: int = 0


def setup(cfg, mirror=None, solo=False):
    """A Run, checked before anything is written. `mirror` (a NeuralMirror) replaces the config's; `solo` runs in
    this process alone even under torchrun (es.py's inner runs)."""
    rank, world = (0, 1) if solo else common.init_distributed(cfg.device)
    common.configure_logging(cfg.log_level, rank)
    torch.manual_seed(cfg.seed)
    device, amp_dtype = load.device_and_dtype(cfg, world)
    resume = checkpoint.resume_path(cfg) if cfg.resume else None
    load.check_fresh(cfg)
    reward_list = load.reward_fns(cfg, device)
    sharded = cfg.distributed == "fsdp" and world > 1
    model, tokenizer = load.policy(cfg, device, amp_dtype, sharded)
    prompt_cap = load.prompt_cap(cfg, model)
    train_set, eval_set = load.task(cfg, tokenizer, reward_list, world)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    roots = {id(model): fsdp.shard(model, dtype=amp_dtype, device=device)} if sharded else {}  # moves it there
    ref_model = load.reference(cfg, model, device, amp_dtype, sharded)  # None with LoRA: the base, adapters off
    if ref_model is not None and sharded:
        roots[id(ref_model)] = fsdp.shard(ref_model, frozen=True, dtype=amp_dtype, device=device)
    steps, opt = load.total_steps(cfg, len(train_set), world), load.optimizer(cfg, model)
    run = Run(cfg=cfg, device=device, amp_dtype=amp_dtype, model=model, ref_model=ref_model, tokenizer=tokenizer,
              mirror=copy.deepcopy(load.mirror(cfg) if mirror is None else mirror).to(device).requires_grad_(False),
              rewards=reward_list, train_set=train_set, eval_set=eval_set, optimizer=opt,
              scheduler=load.scheduler(cfg, opt, steps),
              scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None, total_steps=steps,
              prompt_cap=prompt_cap, eos=load.stop_ids(model, tokenizer), rank=rank, world=world, roots=roots,
              resume=resume)
    if resume:  # read here, so that a checkpoint that does not fit stops the run before anything is written
        checkpoint.load_checkpoint(run, resume)
    return run


def autocast(run):
    """Mixed precision for the forwards when the run asks for it."""
    return torch.autocast(run.device.type, dtype=run.amp_dtype) if run.amp_dtype else contextlib.nullcontext()


# ---------------------------------------------------------------------------- the RL math

def group_advantages(rewards, group_size, scale="group", world=1):
    """(r - mean of its group) / (std + 1e-4): rewards (B*G,), each group contiguous -> (B*G,)."""
    r = rewards.view(-1, group_size)  # (B, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(dim=1, keepdim=True) + 1e-4)
    elif scale == "batch":  # the std over every process's batch
        n, total, sq = all_reduce(torch.stack([rewards.new_tensor(rewards.numel()), rewards.sum(),
                                               (rewards * rewards).sum()]).double(), world).tolist()
        adv = adv / (max((sq - total * total / n) / max(n - 1, 1), 0.0) ** 0.5 + 1e-4)
    return adv.flatten()


def objective(run, logp, old_logp, ref_logp, adv):
    """The per-token loss -min(rho*A, clip(rho)*A) + weight * divergence, and for the metrics the ratio rho, the
    divergence and where the clip binds. Each argument is shaped like logp ((n, T), or the kernel's kept tokens
    (C,)) or broadcasts to it."""
    cfg = run.cfg
    lo = cfg.epsilon if cfg.epsilon_low is None else cfg.epsilon_low
    hi = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - lo, 1 + hi) * adv)
    div = divergence(cfg.divergence_type, logp, ref_logp, mirror=run.mirror, coef=1.0, beta=1.0)
    weight = cfg.beta if cfg.divergence_type == "kl" else cfg.mirror_coefficient
    return -surrogate + weight * div, dict(ratio=ratio, divergence=div, clip_low=(ratio < 1 - lo) & (adv < 0),
                                           clip_high=(ratio > 1 + hi) & (adv > 0))


def token_weights(cfg, mask, world=1, dtype=torch.float32):
    """Each token's weight (N, T) in the step's loss over its loss mask (N, T): loss_type's averaging and
    denominator, counted over every process."""
    m = mask.to(dtype)
    if cfg.loss_type == "grpo":  # the mean of each sequence, then over the sequences
        return m / m.sum(1, keepdim=True).clamp(min=1) / (mask.size(0) * world)
    if cfg.loss_type == "dr_grpo":
        return m / (mask.size(0) * world * cfg.max_completion_length)
    return m / max(int(all_reduce(mask.sum(), world).item()), 1)  # bnpo, dapo: the step's tokens


def learn(run, batch, adv, loss_mask, ref_logp):
    """num_iterations optimizer updates on one sampled batch, each accumulated over its forwards (batch["chunks"]);
    per-token sums for the metrics. adv (N,); loss_mask, ref_logp (N, T)."""
    cfg, model = run.cfg, run.model
    old_logp = step_logprobs(run, batch) if cfg.num_iterations > 1 else None  # (N, T)
    weights = token_weights(cfg, loss_mask, run.world)  # (N, T)
    scale = run.scaler.scale(torch.ones((), device=run.device)) if run.scaler else 1.0  # fp16 (see fused_loss)
    sums = dict.fromkeys("loss entropy clip_low clip_high divergence ratio grad_norm logp_gap".split(), 0.0)
    for it in range(cfg.num_iterations):
        for c in batch["chunks"]:
            def cut(x):  # (N, T) -> this forward's (n, t)
                return None if x is None else x[c.rows, :c.length]
            keep = cut(batch["mask"]).bool()  # (n, t): the tokens the kernel sees, in row-major order
            old, ref = (None if x is None else cut(x)[keep] for x in (old_logp, ref_logp))  # (M,)
            adv_tok, w = adv[c.rows, None].expand(keep.shape)[keep], cut(weights)[keep]  # (M,)

            def loss_fn(lp, k=slice(None)):  # lp (C,): log-probs of the kept tokens k
                o = lp.detach() if old is None else old[k]
                return (objective(run, lp, o, None if ref is None else ref[k], adv_tok[k])[0] * w[k]).sum() * scale

            if cfg.fused_loss:  # the same objective, chunk by chunk inside the lm_head pass
                loss, logp, ent = forward(run, model, completion_loss, batch, c, loss_fn)
            else:
                logp, ent = forward(run, model, completion_logprobs, batch, c)  # (n, t)
                loss = loss_fn(logp[keep])
            loss.backward()
            with torch.no_grad():  # per-token sums for the metrics
                logp, m, loss = logp.detach(), cut(loss_mask).float(), loss / scale
                _, stats = objective(run, logp, logp if old_logp is None else cut(old_logp), cut(ref_logp),
                                     adv[c.rows, None])
                for k, v in dict(loss=loss, entropy=ent * keep, **{k: v.float() * m for k, v in stats.items()}).items():
                    sums[k] += v.sum() / cfg.num_iterations  # on the device: read once, at the end
                if it == 0:  # the sampler and the learner should agree on the weights they share
                    sums["logp_gap"] += ((logp - cut(batch["sampler_logp"])).abs() * keep).sum()
        sums["grad_norm"] += optimizer_step(run) / cfg.num_iterations
    return {k: float(v) for k, v in sums.items()}


# ---------------------------------------------------------------------------- one step

def optimizer_step(run):
    """Sum the gradients over the processes, clip, step and schedule; an update whose gradient is not finite is
    skipped and counted. Returns the gradient norm before clipping."""
    opt, scaler = run.optimizer, run.scaler
    params = [p for g in opt.param_groups for p in g["params"]]
    if run.world > 1 and not run.roots:  # each loss is over the global denominator; FSDP summed its shards
        common.sum_grads(params, run.world)
    if scaler:
        scaler.unscale_(opt)
    max_norm = run.cfg.max_grad_norm if run.cfg.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP: a DTensor
    if math.isfinite(grad_norm):
        scaler.step(opt) if scaler else opt.step()
        run.scheduler.step()
    else:
        run.skipped_steps += 1
        log.warning(f"step {run.step + 1}: non-finite loss or gradient, update skipped ({run.skipped_steps} so far)")
    if scaler:
        scaler.update()
    opt.zero_grad(set_to_none=True)
    return grad_norm


def forward(run, model, fn, batch, c, *args):
    """fn(model, prompt and completion ids and masks of the Chunk c, *args, ...): logprobs.completion_logprobs or
    completion_loss, under autocast and, with FSDP, inside the model's shard root."""
    p = batch["prompt_ids"].size(1) - c.prompt  # the prompts are left padded, the completions right padded
    with autocast(run):
        return fsdp.call(run.roots, model, fn, batch["prompt_ids"][c.rows, p:], batch["prompt_mask"][c.rows, p:],
                         batch["ids"][c.rows, :c.length], batch["mask"][c.rows, :c.length], *args,
                         run.cfg.temperature, run.cfg.logprob_chunk_size, run.cfg.torch_compile, c.share)


@torch.no_grad()
def step_logprobs(run, batch, reference=False):
    """Log-probs (N, T) of the sampled tokens, forward by forward: the model's, or the reference policy's (the
    frozen initial weights, or with LoRA the same model with its adapters off)."""
    model = run.ref_model if reference and run.ref_model is not None else run.model
    out = torch.zeros(batch["ids"].shape, device=run.device)
    with lora.adapters_off(model) if reference and run.ref_model is None else contextlib.nullcontext(), \
            common.eval_mode(model) if reference else contextlib.nullcontext():
        for c in batch["chunks"]:
            out[c.rows, :c.length] = forward(run, model, completion_logprobs, batch, c)[0]
    return out


def rollout(run, examples, num_samples, generator=None, greedy=False):
    """num_samples completions per example from the current weights: prompt ids and mask (N, P), completion ids
    and mask (N, T), the sampler's log-probs of its tokens (N, T) and the decoded texts."""
    cfg, tok, model = run.cfg, run.tokenizer, run.model
    ids, mask, n_cut = data.encode_prompts(tok, [ex["text"] for ex in examples], run.prompt_cap)  # (B, P)
    ids, mask, n = ids.to(run.device), mask.to(run.device), len(examples) * num_samples
    with autocast(run), fsdp.gathered(run.roots, model), common.eval_mode(model):
        out = fsdp.call(run.roots, model, sample, ids, mask, max_new_tokens=cfg.max_completion_length,
                        eos_token_id=run.eos, pad_token_id=tok.pad_token_id, num_samples=num_samples,
                        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, greedy=greedy,
                        generator=generator, return_logprobs=not greedy, compile=cfg.torch_compile,
                        noise_rows=(run.rank * n, run.world * n))  # eval (greedy) needs no log-probs
    texts = tok.batch_decode(out[0].masked_fill(out[1] == 0, tok.pad_token_id), skip_special_tokens=True)
    return dict(prompt_ids=ids.repeat_interleave(num_samples, 0), prompt_mask=mask.repeat_interleave(num_samples, 0),
                ids=out[0], mask=out[1], sampler_logp=out[2] if not greedy else None, texts=texts, prompts_cut=n_cut)


def forwards(run, batch):
    """The learner's forwards over a step batch (logprobs.length_chunks); under FSDP as many on every process."""
    cfg, lengths, prompts = run.cfg, batch["mask"].sum(1), batch["prompt_mask"].sum(1)  # (N,)
    args = (lengths, prompts, len(lengths) // cfg.gradient_accumulation_steps,
            1 if cfg.gradient_checkpointing else cfg.num_generations)  # checkpointing keeps no prompt cache
    most = all_reduce(torch.tensor(len(length_chunks(*args)), device=run.device), run.world, "max") if run.roots else 1
    return length_chunks(*args, count=int(most))


def score(run, examples, completions):
    """Rewards of decoded completions: total (N,) and each reward's column; the reference always goes in."""
    refs = [ex.get("reference") for ex in examples]
    rows = [{k: v for k, v in ex.items() if k not in ("reference", "text")} for ex in examples]
    total, columns = rewards.score(run.rewards, completions, refs, rows)
    return torch.tensor(total, dtype=torch.float32, device=run.device), columns


def train_step(run):
    """Sample, score, learn: one step of the loop. Returns its metrics and its completions."""
    cfg, step = run.cfg, run.step
    t0 = time.perf_counter()
    examples = [run.train_set[i] for i in data.batch_indices(len(run.train_set), cfg.batch_size, step,
                                                                load.data_seed(cfg), run.rank, run.world)]
    seed = (cfg.seed * 1_000_003 + step * 10_007) % (2 ** 63)  # the same on every process, which takes its own
    gen = torch.Generator(run.device).manual_seed(seed)  # rows of the noise (sampler noise_rows): none are shared
    torch.manual_seed(seed + 7919 * (run.rank + 1))  # the global RNG (LoRA dropout), apart from the sampler's
    peaks = {}
    with logs.peak_memory(run.device, peaks, "sample", cfg.memory_metrics):
        batch = rollout(run, examples, cfg.num_generations, generator=gen)
        batch["chunks"] = forwards(run, batch)
    t1 = time.perf_counter()
    group = [ex for ex in examples for _ in range(cfg.num_generations)]
    reward, columns = score(run, group, batch["texts"])  # (N,)
    adv = group_advantages(reward, cfg.num_generations, cfg.scale_rewards, run.world)  # (N,)
    truncated = ~torch.isin(batch["ids"], torch.tensor(run.eos, device=run.device)).any(1)  # (N,)
    loss_mask = batch["mask"] * (~truncated)[:, None] if cfg.mask_truncated_completions else batch["mask"]
    t2 = time.perf_counter()
    lr = run.scheduler.get_last_lr()[0]  # the rate this step's first update uses
    with logs.peak_memory(run.device, peaks, "reference", cfg.memory_metrics):
        ref_logp = step_logprobs(run, batch, reference=True) if cfg.divergence_type != "none" else None
    with logs.peak_memory(run.device, peaks, "learn", cfg.memory_metrics):
        sums = learn(run, batch, adv, loss_mask, ref_logp)
    t3 = time.perf_counter()
    m = logs.step_metrics(step + 1, reward.view(-1, cfg.num_generations), columns, batch["mask"], loss_mask, truncated,
                          sums, logs.DIVERGENCE_METRIC[cfg.divergence_type], batch["prompts_cut"], lr,
                          run.skipped_steps, (t0, t1, t2, t3), peaks)
    run.step += 1
    return common.reduce_metrics(m, run.world), logs.completion_rows(step + 1, group, batch["texts"], reward, columns,
                                                                     adv)


# ---------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(run):
    """Greedy completions of the held-out prompts, split over the processes: eval/accuracy (math), mean reward."""
    totals, correct, mine, size = [], [], run.eval_set[run.rank::run.world], run.cfg.eval_batch_size
    for i in range(0, len(run.eval_set[::run.world]), size):  # as many batches on every process (FSDP gathers)
        examples, keep = mine[i:i + size] or run.eval_set[:1], len(mine[i:i + size])  # none left: a stand-in
        total, columns = score(run, examples, rollout(run, examples, 1, greedy=True)["texts"])
        totals += total.tolist()[:keep]
        correct += columns.get("math_correctness", [])[:keep]
    r, n, c, m = all_reduce(torch.tensor([sum(totals), len(totals), sum(correct), len(correct)], dtype=torch.float64,
                                         device=run.device), run.world).tolist()
    return {"eval/reward": r / n, **({"eval/accuracy": c / m} if m else {})}


# ---------------------------------------------------------------------------- the loop

def fit(run, save_last=True):
    """Steps until total_steps or a stop signal (then a checkpoint), with logs, evals and checkpoints on their
    schedule; save_last=False skips the last step's checkpoint. Returns the last metrics, the last checkpoint,
    the output folder, steps, skipped steps, the best eval and the signal that stopped the run (or None)."""
    cfg, main = run.cfg, run.rank == 0
    do_eval, last, ckpt, evals, tokens, t0 = len(run.eval_set) > 0, {}, None, [], 0, time.perf_counter()
    with logs.open_run(cfg, config_lib.config_dict(cfg), main, run.step if run.resume else None) as record, \
            common.stop_signals() as caught, tqdm(total=run.total_steps, initial=run.step, disable=common.quiet(),
                                                  desc="nmgrpo", dynamic_ncols=True) as bar:
        log.info(f"{cfg.model_name}: {load.parameter_count(run.model):,} parameters on {run.device}, "
                 f"{len(run.train_set)} train / {len(run.eval_set)} held-out prompts, {run.total_steps} steps")
        if do_eval and cfg.eval_on_start and run.step == 0:
            evals.append(last := {"step": 0, **evaluate(run)})
            record(last)
        while run.step < run.total_steps:
            m, completions = train_step(run)
            step, tokens = run.step, tokens + m["completion_length"] * len(completions)
            if m["truncated_frac"] > 0.5:
                m["warning"] = "over half the completions hit max_completion_length"
            if do_eval and (cfg.eval_steps and step % cfg.eval_steps == 0 or step == run.total_steps):
                m.update(evaluate(run))
                evals.append(m)
            stop = common.stopping(caught, run.world)  # every process decides together
            if step % cfg.logging_steps == 0 or "eval/reward" in m or step == run.total_steps or stop:
                record(m, completions)
            if cfg.save_steps and step % cfg.save_steps == 0 or (step == run.total_steps or stop) and save_last:
                ckpt = checkpoint.save_checkpoint(run) if main or run.roots else None  # FSDP: every rank
            bar.set_postfix(reward=f"{m['reward']:.3f}", loss=f"{m['loss']:.4f}")
            bar.update(1)
            last = m
            if stop:
                log.warning(f"{caught[0] if caught else 'a stop signal'}: stopped after step {step}; continue with "
                            "--resume=latest")
                break
    seconds, best = time.perf_counter() - t0, load.best_eval(evals)
    log.info(logs.run_summary(run.step, seconds, tokens / max(seconds, 1e-9), best,
                              load.eval_row(evals[-1] if evals else None), ckpt, output_dir=cfg.output_dir))
    return {"metrics": last, "checkpoint": ckpt, "output_dir": cfg.output_dir, "steps": run.step,
            "skipped_steps": run.skipped_steps, "best_eval": best, "stopped_by": caught[0] if caught else None}


def train(cfg, mirror=None):
    """fit(setup(cfg, mirror)): its result dict; backend='trl' trains in TRL's GRPOTrainer (trl_backend.py)."""
    if cfg.backend != "trl":
        return fit(setup(cfg, mirror))
    if mirror is not None:
        raise ValueError("backend='trl' reads its mirror from the config: NeuralMirror.save it, give mirror_path")
    import trl_backend
    return trl_backend.train(cfg)


def main(argv):
    if "-h" in argv or "--help" in argv:
        print(__doc__ + "\nEvery knob (--key=value or --key value; dashes or underscores):" + configurator.describe())
        return 0
    cfg = None
    try:
        cfg = configurator.load(argv)
        train(cfg)
    except ValueError as e:  # a run that cannot go on: one line that names the key and the fix
        if cfg is not None and cfg.log_level == "DEBUG":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
