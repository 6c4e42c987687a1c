"""Side-by-side benchmarks: each row times one of ours against its peer, same run, same inputs.

    python bench.py                              # quick set (its sampler and step rows: 10 minutes on 2 cores)
    python bench.py --rows sampler,logprobs      # some rows only
    python bench.py --full                       # the full shapes (several times longer)

Rows (ratio = ours / peer, in the row's unit):
  sampler   sampler.sample, eager and compiled (the compile happens in the warmup and is reported,
            not timed) vs HF generate: temperature 0.8, top_p 0.9, top_k 0, fp32, random Qwen3s, ~32-token
            left-padded prompts; 128 new tokens (no row stops), or realistic lengths: row r stops after
            exactly realistic_lengths()[r] tokens (log-normal, median 96, 20 to 256: a GSM8K-like batch with
            its long tail), its stop token made certain at that step and impossible before on both sides
            (sample's processor, generate's logits_processor); real (unpadded) tokens/s.
  logprobs  logprobs.token_logprobs and the fused loss logprobs.token_loss (eager and compiled), and a
            selective log-softmax (logits.gather - logsumexp, as TRL) vs naive
            log_softmax(h @ W.T / T).gather; forward + backward with a random upstream grad on the
            log-probs (the fused loss: sum(grad * logp)) into hidden and lm_head weight; seconds.
  mirror    mirror.divergence("neural_mirror") vs logprobs.token_logprobs, forward + backward over
            the same tokens (logprobs at the quick shape); microseconds per token. Target: < 0.05. And at
            131,072 tokens, its forward + backward vs a plain float32 loop over the 126 units (forward
            only; target <= 5x) and vs the autograd form it replaced (bench.bregman_autograd; target: peak
            memory <= 1/20); seconds and the memory each adds.
  step      train.train_step vs one optimizer step of TRL's GRPOTrainer (needs `pip install trl`):
            the same saved random Qwen3 and tokenizer, 8 prompts x 8 completions of exactly 32 or 128
            tokens or of realistic lengths (as the sampler row, max_completion_length 256), temperature 1,
            fp32, no reference model (divergence none / beta 0), loss grpo, AdamW, the `length` reward;
            seconds per step. Ours eager and with torch_compile=True (the compile happens in the warmup and
            is reported, not timed). At realistic lengths also NMGRPO (neural_mirror against a frozen copy)
            vs TRL with its KL (beta 0.04, its reference model): both sides run a reference pass.
  lora      train.train_step with LoRA (r 16 on q/k/v/o, the base as reference with adapters off) vs
            full fine-tuning (a frozen copy as reference), both ours with the neural_mirror
            regulariser: the `small` random Qwen3, 8 x 8 completions of exactly 32 tokens, fp32; on
            CUDA also a Qwen3-1.7B shape in bf16 at 8 and 16 generations, 256 and 1024 tokens
            (micro-batches of 64 completions); seconds per step, and peak memory including the setup
            (model, reference, optimizer).
  qlora     train.train_step with QLoRA (load_in_4bit: nf4, double quantization, r 16 on q/k/v/o) vs LoRA (r 16)
            and vs full fine-tuning, all ours with the neural_mirror regulariser, on a random Qwen3-0.6B shape
            (needs `pip install bitsandbytes accelerate`): on CPU fp32, 2 prompts x 4 completions of exactly 16
            tokens; on CUDA bf16, 8 x 8 x 256; seconds per step, and peak memory including the setup (loading
            the model, saved once by the parent: its build is not counted).
  gpu       (CUDA only) the compiled sampler vs HF generate on a random Qwen3-0.6B shape in bf16 at batch 1
            and 64, tokens/s, and its memory-bandwidth use: the weight bytes its decode steps read per second
            over a device-to-device copy's bytes per second (ratio = the fraction of the copy bandwidth);
            the compiled fused loss vs naive log-probs at Liger's shape (16 x 1024 tokens, hidden 4096,
            vocab 128256, bf16), seconds and peak memory. --full adds the eager sampler, batch 64 with
            realistic lengths, and the eager log-probs and fused loss.
  trl       the same NMGRPO step (neural_mirror, full fine-tuning against a frozen copy) on its two backends:
            train.train_step (native) vs one optimizer step of backend='trl' (trl_backend.build_trainer, TRL's
            GRPOTrainer with our regulariser, rewards and data), from one Config: 8 prompts x 8 completions of
            exactly 32 tokens (--full: also 128, and the mid model), temperature 1, fp32; seconds per step.

Method: every case runs in a fresh subprocess (`python bench.py --case SPEC`) that builds its
model and inputs, then runs 1 warmup and `--repeats` timed calls and reports the median. Peak
memory is what the case adds on top of its setup (imports, model, inputs): on CUDA,
max_memory_allocated minus memory_allocated after setup; on CPU (Linux), the peak RSS at the end
(ru_maxrss) minus the RSS after setup. It covers the warmup and every repeat, and includes the
gradients the case leaves behind. Timings on CUDA synchronize around each call. Threads: torch's default.
"""
import argparse
import atexit
import functools
import importlib.util
import itertools
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM, TrainerCallback  # noqa: E402

import common  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import logprobs  # noqa: E402
import rewards  # noqa: E402
import sampler  # noqa: E402
import tasks  # noqa: E402
import tiny  # noqa: E402
import train  # noqa: E402
import mirror as mirror_lib  # noqa: E402
from mirror import NeuralMirror, divergence  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NEW_TOKENS = 128
REAL_MAX, REAL_MEDIAN, REAL_SIGMA = 256, 96, 0.6  # realistic lengths: log-normal, clipped to [20, REAL_MAX]
TEMPERATURE, TOP_P = 0.8, 0.9
# Qwen3 shapes: intermediate 4*hidden, tied embeddings (as tiny.build_model), random weights
MODELS = {
    "tiny": dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, vocab=1024),
    "mid": dict(layers=4, hidden=256, heads=8, kv_heads=4, head_dim=32, vocab=8192),
    "small": dict(layers=8, hidden=512, heads=8, kv_heads=4, head_dim=64, vocab=16384),
    "qwen3-0.6b": dict(layers=28, hidden=1024, heads=16, kv_heads=8, head_dim=128, vocab=151936, intermediate=3072),
    "qwen3-1.7b": dict(layers=28, hidden=2048, heads=16, kv_heads=8, head_dim=128, vocab=151936, intermediate=6144),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LOGPROB_SHAPES = {"quick": dict(tokens=1024, hidden=256, vocab=32768),
                  "full": dict(tokens=4096, hidden=896, vocab=151936),
                  "liger": dict(tokens=16 * 1024, hidden=4096, vocab=128256, dtype="bf16")}  # Liger's own shape


# ----------------------------------------------------------------------------- cases (in the subprocess)

def qwen3_config(layers, hidden, heads, kv_heads, head_dim, vocab, intermediate=None):
    return Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=head_dim, max_position_embeddings=2048, tie_word_embeddings=True,
                       eos_token_id=None, pad_token_id=0, bos_token_id=None)


def build_qwen3(**sizes):
    config = qwen3_config(**sizes)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(DEVICE).eval()
    # eos = vocab is never produced, so every row runs the full 128 tokens on both sides
    model.generation_config = GenerationConfig(eos_token_id=config.vocab_size, pad_token_id=0)
    return model


def prompts(batch, vocab, length=32, seed=0):
    """Random left-padded prompts of 24..32 tokens: ids and mask (batch, length)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    real = torch.randint(length - 8, length + 1, (batch, 1), generator=g)
    mask = (torch.arange(length) >= length - real).long()
    return ids.masked_fill(mask == 0, 0).to(DEVICE), mask.to(DEVICE)


def realistic_lengths(n, seed=0):
    """(n,) completion lengths like a GRPO batch on GSM8K: log-normal around REAL_MEDIAN tokens with a long tail,
    clipped to [20, REAL_MAX] (about 5% of the rows run to REAL_MAX); seeded, so every side gets the same."""
    g = torch.Generator().manual_seed(seed)
    lengths = (math.log(REAL_MEDIAN) + REAL_SIGMA * torch.randn(n, generator=g)).exp().round()
    return lengths.clamp(20, REAL_MAX).long()


def forced(logits, rows, t, lengths, eos):
    """Row r's logits with its stop token impossible before step lengths[r] - 1 and certain at it (t: the step of
    the token chosen, rows (n,): which rows these are)."""
    last = (lengths.to(logits.device)[rows] == t + 1)[:, None]  # (n, 1)
    is_eos = torch.arange(logits.size(-1), device=logits.device) == eos  # (V,)
    return logits.masked_fill(is_eos & ~last | ~is_eos & last, float("-inf"))


class ForcedStops(transformers.LogitsProcessor):
    """forced() for HF generate: row r of the batch stops after exactly lengths[r] new tokens."""

    def __init__(self, lengths, eos, prompt_length):
        self.lengths, self.eos, self.prompt_length = lengths, eos, prompt_length

    def __call__(self, input_ids, scores):
        rows = torch.arange(input_ids.size(0))
        return forced(scores, rows, input_ids.size(1) - self.prompt_length, self.lengths, self.eos)


def stopped_at(ids, eos):
    """(N,) tokens up to and including each row's first `eos` in completions ids (N, T) (T if none)."""
    hit = ids == eos
    return torch.where(hit.any(1), hit.int().argmax(1) + 1, ids.size(1)).cpu()


def case_sampler(spec):
    """(step, work): one call samples for every row, NEW_TOKENS each, or with spec["lengths"] == "real" each row
    its realistic_lengths (the stop token made certain at that step on both sides); work is the real tokens."""
    model = build_qwen3(**MODELS[spec["model"]]).to(DTYPES[spec.get("dtype", "fp32")])
    vocab, batch = model.config.vocab_size, spec["batch"]
    ids, mask = prompts(batch, vocab)
    seed = itertools.count()  # a fresh seed per call
    real = spec.get("lengths") == "real"
    lengths = realistic_lengths(batch) if real else torch.full((batch,), NEW_TOKENS)
    eos = vocab - 1 if real else vocab  # real: a token the processors forbid until its step; else never drawn
    new_tokens = REAL_MAX if real else NEW_TOKENS

    def ours(**kw):
        gen = torch.Generator(DEVICE).manual_seed(next(seed))
        out = sampler.sample(model, ids, mask, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=0,
                             temperature=TEMPERATURE, top_p=TOP_P, top_k=0, generator=gen,
                             processor=(lambda x, rows, t: forced(x, rows, t, lengths, eos)) if real else None, **kw)
        return out[1].sum(1).cpu()

    def hf():
        torch.manual_seed(next(seed))
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE, top_p=TOP_P,
                             top_k=0, max_new_tokens=new_tokens, min_new_tokens=0 if real else new_tokens,
                             eos_token_id=eos, pad_token_id=0,
                             logits_processor=[ForcedStops(lengths, eos, ids.size(1))] if real else None)
        return stopped_at(out[:, ids.size(1):], eos)

    side = {"ours": ours, "compiled": lambda: ours(compile=True), "hf": hf}[spec["side"]]

    def step():
        got = side()
        assert torch.equal(got, lengths), f"completion lengths {got.tolist()}, not {lengths.tolist()}"

    return step, int(lengths.sum())


def logprob_inputs(tokens, hidden, vocab, dtype="fp32"):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).to(DEVICE, DTYPES[dtype]).requires_grad_()
    w = (0.02 * torch.randn(vocab, hidden, generator=g)).to(DEVICE, DTYPES[dtype]).requires_grad_()
    targets = torch.randint(vocab, (tokens,), generator=g).to(DEVICE)
    return h, w, targets, torch.randn(tokens, generator=g).to(DEVICE)  # upstream grad into logp


def case_logprobs(spec):
    """(step, work): forward + backward of one log-prob method; work is the token count."""
    h, w, targets, grad = logprob_inputs(**spec["shape"])

    def ours():
        return logprobs.token_logprobs(h, w, targets, TEMPERATURE)[0]

    def compiled():
        return logprobs.token_logprobs(h, w, targets, TEMPERATURE, compile=True)[0]

    def fused():  # the per-token loss sum(grad * logp) evaluated inside the pass
        return logprobs.token_loss(h, w, targets, lambda lp, s: (lp * grad[s]).sum(), TEMPERATURE)[0]

    def fused_compiled():
        return logprobs.token_loss(h, w, targets, lambda lp, s: (lp * grad[s]).sum(), TEMPERATURE, compile=True)[0]

    def naive():
        return torch.log_softmax(h @ w.T / TEMPERATURE, dim=-1).gather(-1, targets[:, None]).squeeze(-1)

    def selective():
        logits = h @ w.T / TEMPERATURE  # (N, V)
        return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    method = {"ours": ours, "compiled": compiled, "fused": fused, "fused_compiled": fused_compiled, "naive": naive,
              "selective": selective}[spec["side"]]

    def step():
        h.grad = w.grad = None
        out = method()
        out.backward(grad if out.dim() else None)

    return step, h.size(0)


def case_mirror(spec):
    """(step, work): forward + backward of the neural-mirror divergence over N sampled tokens."""
    g = torch.Generator().manual_seed(0)
    n = spec["shape"]["tokens"]
    logp = (-5 * torch.rand(n, generator=g)).to(DEVICE).requires_grad_()  # (N,) policy log-probs
    ref_logp = (logp.detach() + 0.1 * torch.randn(n, generator=g).to(DEVICE)).clamp(max=0)
    grad = torch.randn(n, generator=g).to(DEVICE)
    mirror = NeuralMirror().to(DEVICE).requires_grad_(False)  # ES moves it, not the gradient (as in train.py)

    def step():
        logp.grad = None
        if spec.get("side") == "naive":  # the forward alone, float32, unit by unit
            with torch.no_grad():
                bregman_naive32(mirror, logp.exp(), ref_logp.exp())
        elif spec.get("side") == "autograd":
            (1e-4 * bregman_autograd(mirror, logp.double().exp(), ref_logp.double().exp())).float().backward(grad)
        else:
            divergence("neural_mirror", logp, ref_logp, mirror=mirror, coef=1e-4).backward(grad)

    return step, n


def bregman_autograd(mirror, y, y0):
    """D(y || y0) as mirror.py computed it before its custom autograd Function: the same closed form, every
    (tokens, 6, 21) float64 intermediate kept by autograd for backward. The reference of the mirror row and tests."""
    y, y0, out = mirror_lib._prep(y, y0)
    v, w, b, a, c = mirror._params()
    d = y - y0
    u, u0, e = w * y[..., None, None] + b, w * y0[..., None, None] + b, w * d[..., None, None]
    units = (mirror_lib._excess(u, u0, e) * v).sum((-2, -1))
    return (d * (units + a * d / 2 + c * mirror_lib._xlogx_excess(y, y0, d))).to(out)


def bregman_naive32(mirror, y, y0):
    """h(y) - h(y0) - phi_inv(y0) * (y - y0) in float32, one unit at a time, H_j = F_j(u_j) / w_j: the plain
    loop the custom Function is timed against (it cancels catastrophically where w_j is tiny)."""
    eps, log = mirror_lib.LOG_EPS, torch.log
    F = (lambda u: u ** 4 / 4, lambda u: u ** 3 / 3, lambda u: 2 / 3 * u ** 1.5, lambda u: 3 / 4 * u ** (4 / 3),
         lambda u: (u + eps) * log(u + eps) - (u + eps), torch.exp)
    act = (lambda u: u ** 3, lambda u: u ** 2, torch.sqrt, lambda u: u ** (1 / 3), lambda u: log(u + eps), torch.exp)
    a, c = mirror.a[0].item(), mirror.c[0].item()
    d = y - y0
    D = a * d ** 2 / 2 + c * (y * log(y / y0) - d)
    for j, (v, w, b) in enumerate(zip(mirror.v.tolist(), mirror.w.tolist(), mirror.b.tolist())):
        u, u0 = w * y + b, w * y0 + b
        D += v * ((F[j // 21](u) - F[j // 21](u0)) / w - act[j // 21](u0) * d)
    return D


STEP_PROMPTS, STEP_GENERATIONS = 8, 8
STEP_COMMON = dict(temperature=1.0, top_p=1.0, top_k=0, learning_rate=1e-5, max_grad_norm=1.0, weight_decay=0.0,
                   loss_type="grpo", num_iterations=1, gradient_accumulation_steps=1)


def save_step_model(folder, model):
    """A random Qwen3 of MODELS[model] and a 1024-token BPE tokenizer, saved to folder; the 8 questions."""
    rows = tasks.toy_task(300, seed=0)
    if os.path.isdir(folder):  # saved by the parent (rows_qlora): its build is not in this process's memory
        return [r["question"] for r in rows[:STEP_PROMPTS]]
    tokenizer = tiny.build_tokenizer([r["question"] + "\n" + r["answer"] for r in rows], vocab_size=1024)
    net = build_qwen3(**MODELS[model]).cpu()
    net.config.eos_token_id, net.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    net.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    net.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return [r["question"] for r in rows[:STEP_PROMPTS]]


def step_config(folder, questions, length, out, **knobs):
    """The Config of a step case: the 8 prompts (batch_size 8), the `length` reward, fp32, constant lr."""
    return config.make(**{**dict(
        model_name=folder, dataset_name=[{"prompt": q} for q in questions], eval_size=0, batch_size=STEP_PROMPTS,
        num_generations=STEP_GENERATIONS, max_steps=1000, max_completion_length=length, max_prompt_length=128,
        max_seq_length=128 + length, divergence_type="none", reward_functions=["length"], precision="fp32",
        device=DEVICE.type, lr_scheduler="constant", warmup_steps=0, seed=0, output_dir=os.path.join(out, "ours"),
        memory_metrics=False, log_completions=False, log_level="WARNING"), **STEP_COMMON, **knobs})


def step_ours(folder, questions, length, out, lengths=None, **knobs):
    """train.train_step over the 8 prompts (batch_size 8): sample, score, learn, optimizer step. Every row runs
    `length` tokens, or row r exactly lengths[r] (its stop token made certain at that step)."""
    run = train.setup(step_config(folder, questions, length, out, **knobs))
    if lengths is None:
        run.eos = [run.model.config.vocab_size]  # an id never drawn: every row runs `length` tokens
    else:
        eos = run.eos[0]
        run.eos = [eos]
        train.sample = functools.partial(sampler.sample, processor=lambda x, rows, t: forced(x, rows, t, lengths, eos))
    return lambda: train.train_step(run)[0]["completion_length"]


class Gate(TrainerCallback):
    """Parks trainer.train() (run in a thread) at the start and after each optimizer step."""

    def __init__(self):
        self.go, self.done, self.error = threading.Semaphore(0), threading.Semaphore(0), None

    def on_train_begin(self, args, state, control, **kwargs):
        self.go.acquire()

    def on_step_end(self, args, state, control, **kwargs):
        self.done.release()
        self.go.acquire()


def step_trl(folder, questions, length, out, lengths=None, beta=0.0):
    """One real GRPOTrainer optimizer step per call: trainer.train() runs in a thread that a callback
    releases for exactly one step, so the step is TRL's own loop (generate 64 completions with HF
    generate, score, loss, backward, clip, AdamW), nothing re-implemented. Every row runs `length` tokens,
    or row r exactly lengths[r] (its generate calls get the ForcedStops processor)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = [data.render_prompt(tokenizer, q) for q in questions]  # the text train.py renders
    args = GRPOConfig(
        output_dir=os.path.join(out, "trl"), use_cpu=DEVICE.type == "cpu", bf16=False, fp16=False,
        activation_checkpointing=False, per_device_train_batch_size=STEP_PROMPTS * STEP_GENERATIONS,
        num_generations=STEP_GENERATIONS, max_completion_length=length,
        generation_kwargs={} if lengths is not None else {"min_new_tokens": length},  # EOS masked until `length`
        beta=beta, scale_rewards="group", shuffle_dataset=False, max_steps=1000, lr_scheduler_type="constant",
        warmup_steps=0, optim="adamw_torch", report_to="none", logging_strategy="no", save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, seed=0, **STEP_COMMON)
    trainer = GRPOTrainer(model=folder, reward_funcs=lambda completions, **kw: [rewards.length(c) for c in completions],
                          args=args, train_dataset=Dataset.from_list([{"prompt": t} for t in texts] * 1000),
                          processing_class=tokenizer)
    if lengths is not None:
        generate = trainer.model.generate

        def forced_generate(*a, **kw):
            stops = ForcedStops(lengths, tokenizer.eos_token_id, kw["input_ids"].size(1))
            return generate(*a, logits_processor=transformers.LogitsProcessorList([stops]), **kw)
        trainer.model.generate = forced_generate
    return gated(trainer)


def step_backend_trl(folder, questions, length, out, **knobs):
    """One optimizer step of backend='trl' (trl_backend.build_trainer) on step_ours's config."""
    import trl_backend
    trainer = trl_backend.build_trainer(step_config(folder, questions, length, out, **knobs))
    trainer.generation_config.min_new_tokens = length  # EOS masked until `length`, as in step_trl
    return gated(trainer)


def gated(trainer):
    """step(): one real optimizer step of trainer.train(), run in a thread that a Gate callback releases for
    exactly one step; returns the step's mean completion length."""
    gate = Gate()
    trainer.add_callback(gate)
    threads = torch.get_num_threads()

    def target():
        torch.set_num_threads(threads)
        try:
            trainer.train()
        except BaseException as e:  # noqa: BLE001 - handed to the caller of step()
            gate.error = e
        gate.done.release()

    threading.Thread(target=target, daemon=True).start()

    def step():
        gate.go.release()
        gate.done.acquire()
        if gate.error is not None:
            raise gate.error
        return trainer._metrics["train"]["completions/mean_length"][-1]

    return step


def case_step(spec):
    """(step, work): one optimizer step of a whole GRPO loop, 8 prompts x 8 completions of exactly spec["length"]
    tokens, or with spec["lengths"] == "real" of realistic_lengths (no reference model for the ours and trl sides,
    a frozen copy for nmgrpo and trl_kl); work is the completions per step."""
    out = tempfile.mkdtemp(prefix="nmgrpo-bench-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    folder = spec.get("folder") or os.path.join(out, "model")
    questions = save_step_model(folder, spec["model"])
    prompts, generations = spec.get("prompts", STEP_PROMPTS), spec.get("generations", STEP_GENERATIONS)
    lengths = realistic_lengths(prompts * generations) if spec.get("lengths") == "real" else None
    length = REAL_MAX if lengths is not None else spec["length"]
    if spec["side"] in ("lora", "full", "qlora"):  # micro-batches of at most 64 completions
        one = step_ours(folder, questions, length, out, divergence_type="neural_mirror",
                        use_lora=spec["side"] != "full", load_in_4bit=spec["side"] == "qlora", lora_r=16,
                        lora_alpha=32, lora_dropout=0.0, batch_size=prompts, num_generations=generations,
                        precision=spec.get("precision", "fp32"),
                        gradient_accumulation_steps=max(1, prompts * generations // 64))
    elif spec["side"] in ("native", "backend_trl"):  # NMGRPO, full fine-tuning against a frozen copy
        one = {"native": step_ours, "backend_trl": step_backend_trl}[spec["side"]](
            folder, questions, length, out, divergence_type="neural_mirror")
    elif spec["side"] == "compiled":  # the sampler's decode step and the loss kernel torch.compile'd
        one = step_ours(folder, questions, length, out, lengths, torch_compile=True)
    elif spec["side"] == "nmgrpo":  # the neural mirror against a frozen copy of the initial weights
        one = step_ours(folder, questions, length, out, lengths, divergence_type="neural_mirror")
    elif spec["side"] == "trl_kl":  # TRL's KL (beta 0.04, its reference model)
        one = step_trl(folder, questions, length, out, lengths, beta=0.04)
    else:
        one = {"ours": step_ours, "trl": step_trl}[spec["side"]](folder, questions, length, out, lengths)
    mean = float(lengths.float().mean()) if lengths is not None else float(length)

    def step():
        got = one()
        assert abs(got - mean) < 1e-3, f"completions of {got} tokens on average, not {mean}"

    return step, prompts * generations


def case_copy(spec):
    """(step, work): a device-to-device copy of spec["mib"] MiB, the memory bandwidth a decode step can hope
    for; work is the bytes read and written."""
    src = torch.empty(spec["mib"] << 20, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src), 2 * src.numel()


CASES = {"sampler": case_sampler, "logprobs": case_logprobs, "mirror": case_mirror, "step": case_step,
         "copy": case_copy}


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def memory_now():
    if DEVICE.type == "cuda":
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_peak():
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_case(spec):
    """Set up one case, time it, print its result as one JSON line (spec["setup_counts"]: peak memory
    counts the setup too)."""
    before = memory_now()
    step, work = CASES[spec["case"]](spec)
    sync()
    if DEVICE.type == "cuda" and not spec.get("setup_counts"):
        torch.cuda.reset_peak_memory_stats()
    base = before if spec.get("setup_counts") else memory_now()
    times = []
    for _ in range(1 + spec["repeats"]):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        if common._FAILED:  # a compiled side that fell back to eager is not a compiled timing
            sys.exit(f"torch.compile failed for {sorted(fn.__name__ for fn in common._FAILED)}")
    print("RESULT " + json.dumps(dict(seconds=statistics.median(times[1:]), warmup=times[0], work=work,
                                      peak=memory_peak() - base)))


# ----------------------------------------------------------------------------- rows (in the parent)

_results = {}


def measure(**spec):
    """Run one case in a fresh subprocess (memoised within this run); returns its result dict, or None when it
    failed (its error goes to stderr and the other cases still run)."""
    key = json.dumps(spec, sort_keys=True)
    if key not in _results:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", key],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        _results[key] = json.loads(lines[-1][len("RESULT "):]) if lines and not proc.returncode else None
        print(f"  {key}: {_results[key] or 'FAILED: ' + proc.stderr[-3000:]}", file=sys.stderr)
    return _results[key]


def row(name, shape, unit, ours, peer, value):
    if ours is None or peer is None:
        return dict(row=name, shape=shape, unit=unit, failed=True)
    a, b = value(ours), value(peer)
    return dict(row=name, shape=shape, unit=unit, ours=a, peer=b, ratio=a / b, mem_ours=ours["peak"] / 2**20,
                mem_peer=peer["peak"] / 2**20)


def rows_sampler(full, repeats):
    sizes = [(m, b, n) for n in ("fixed", "real") for m in ("tiny", "mid") for b in (16, 64)]
    if not full:
        sizes = [s for s in sizes if s[1] == (16 if s[2] == "fixed" else 64)]
    mean = float(realistic_lengths(64).float().mean())
    for model, batch, lengths in sizes:
        spec = dict(case="sampler", model=model, batch=batch, repeats=repeats,
                    **({"lengths": "real"} if lengths == "real" else {}))
        hf = measure(**spec, side="hf")
        shape = f"{model}, batch {batch}" + (f", realistic lengths (mean {mean:.0f}, max {REAL_MAX})"
                                             if lengths == "real" else "")
        for side, name in (("ours", "sampler vs HF generate"), ("compiled", "sampler compiled vs HF generate")):
            ours = measure(**spec, side=side)
            extra = f" (compile {ours['warmup'] - ours['seconds']:.0f} s, untimed)" if side == "compiled" and ours else ""
            yield row(name + extra, shape, "tokens/s", ours, hf, lambda r: r["work"] / r["seconds"])


def rows_logprobs(full, repeats):
    shape = LOGPROB_SHAPES["full" if full else "quick"]
    naive = measure(case="logprobs", side="naive", shape=shape, repeats=repeats)
    text = f"{shape['tokens']} tok, hidden {shape['hidden']}, vocab {shape['vocab']}"
    for side, name in (("ours", "token_logprobs vs naive"), ("compiled", "token_logprobs compiled vs naive"),
                       ("fused", "fused loss vs naive"), ("fused_compiled", "fused loss compiled vs naive"),
                       ("selective", "selective log-softmax vs naive")):
        ours = measure(case="logprobs", side=side, shape=shape, repeats=repeats)
        yield row(name, text, "s", ours, naive, lambda r: r["seconds"])


def rows_step(full, repeats):
    if importlib.util.find_spec("trl") is None:
        print("step rows skipped: TRL is not installed (pip install trl, a bench-only extra)", file=sys.stderr)
        return
    sizes = [(m, n) for m in ("tiny", "mid") for n in (32, 128, "real")] if full else [("tiny", 32), ("tiny", "real")]
    mean = float(realistic_lengths(STEP_PROMPTS * STEP_GENERATIONS).float().mean())
    for model, length in sizes:
        spec = dict(case="step", model=model, repeats=repeats,
                    **({"lengths": "real"} if length == "real" else {"length": length}))
        shape = f"{model}, 8 x 8 x " + (f"realistic lengths (mean {mean:.0f}, max {REAL_MAX})" if length == "real"
                                        else f"{length} tok")
        trl_ = measure(**spec, side="trl")
        for side, name in (("ours", "GRPO step vs TRL GRPOTrainer"), ("compiled", "GRPO step compiled vs TRL GRPOTrainer")):
            if side == "compiled" and length == "real" and not full:
                continue
            ours = measure(**spec, side=side)
            extra = f" (compile {ours['warmup'] - ours['seconds']:.0f} s, untimed)" if side == "compiled" and ours else ""
            yield row(name + extra, shape, "s/step", ours, trl_, lambda r: r["seconds"])
        if length == "real":
            ours, trl_kl = (measure(**spec, side=side) for side in ("nmgrpo", "trl_kl"))
            yield row("NMGRPO step (neural_mirror) vs TRL GRPOTrainer (KL, beta 0.04)", shape, "s/step", ours, trl_kl,
                      lambda r: r["seconds"])


def rows_lora(full, repeats):
    sizes = [("small", 8, 32, "fp32")]
    if DEVICE.type == "cuda":  # the large shape: a Qwen3-1.7B in bf16
        sizes += [("qwen3-1.7b", g, n, "bf16") for g in (8, 16) for n in (256, 1024)]
    for model, generations, length, precision in sizes:
        full_ft, lora_ = (measure(case="step", side=s, model=model, length=length, generations=generations,
                                  precision=precision, repeats=repeats, setup_counts=True) for s in ("full", "lora"))
        yield row("LoRA r16 vs full fine-tuning (ours)", f"{model} {precision}, 8 x {generations} x {length} tok",
                  "s/step", lora_, full_ft, lambda r: r["seconds"])


def rows_qlora(full, repeats):
    if importlib.util.find_spec("bitsandbytes") is None:
        print("qlora rows skipped: pip install bitsandbytes accelerate (bench-only extras)", file=sys.stderr)
        return
    cuda = DEVICE.type == "cuda"
    prompts, generations, length, precision = (8, 8, 256, "bf16") if cuda else (2, 4, 16, "fp32")
    folder = tempfile.mkdtemp(prefix="nmgrpo-bench-")  # one saved model for the three sides, built here
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    save_step_model(os.path.join(folder, "model"), "qwen3-0.6b")
    spec = dict(case="step", model="qwen3-0.6b", prompts=prompts, generations=generations, length=length,
                precision=precision, repeats=repeats, setup_counts=True, folder=os.path.join(folder, "model"))
    full_ft, lora_, qlora = (measure(**spec, side=s) for s in ("full", "lora", "qlora"))
    shape = f"qwen3-0.6b {precision}, {prompts} x {generations} x {length} tok"
    for peer, name in ((lora_, "LoRA r16"), (full_ft, "full fine-tuning")):
        yield row(f"QLoRA-4bit r16 vs {name} (ours)", shape, "s/step", qlora, peer, lambda r: r["seconds"])


def rows_mirror(full, repeats):
    shape = LOGPROB_SHAPES["quick"]
    ours = measure(case="mirror", shape=dict(tokens=shape["tokens"]), repeats=repeats)
    peer = measure(case="logprobs", side="ours", shape=shape, repeats=repeats)
    yield row("neural_mirror divergence vs token_logprobs", f"{shape['tokens']} tok", "us/token", ours, peer,
              lambda r: 1e6 * r["seconds"] / r["work"])
    tokens = dict(tokens=16 * 32 * 256)  # a step of 16 prompts x 32 samples x 256 tokens
    ours, before, naive = (measure(case="mirror", shape=tokens, side=side, repeats=repeats)
                           for side in ("ours", "autograd", "naive"))
    yield row("Bregman fwd+bwd vs naive float32 per-unit loop fwd", "131072 tok", "s", ours, naive,
              lambda r: r["seconds"])
    yield row("Bregman fwd+bwd: custom Function vs autograd (before)", "131072 tok", "s", ours, before,
              lambda r: r["seconds"])


def rows_trl(full, repeats):
    if importlib.util.find_spec("trl") is None:
        print("trl rows skipped: TRL is not installed (pip install \"trl>=1.16,<1.17\")", file=sys.stderr)
        return
    sizes = [(m, n) for m in ("tiny", "mid") for n in (32, 128)] if full else [("tiny", 32)]
    for model, length in sizes:
        native, trl_ = (measure(case="step", side=s, model=model, length=length, repeats=repeats)
                        for s in ("native", "backend_trl"))
        yield row("NMGRPO step, native vs backend='trl'", f"{model}, 8 x 8 x {length} tok, neural_mirror", "s/step",
                  native, trl_, lambda r: r["seconds"])


def weight_bytes(model, dtype):
    """The bytes of a MODELS entry's weights in `dtype`: what each decode step reads at least once."""
    with torch.device("meta"):
        net = Qwen3ForCausalLM(qwen3_config(**MODELS[model]))
    return sum(p.numel() for p in net.parameters()) * DTYPES[dtype].itemsize


def rows_gpu(full, repeats):
    if DEVICE.type != "cuda":
        print("gpu rows skipped: no CUDA device", file=sys.stderr)
        return
    copy = measure(case="copy", mib=4096, repeats=repeats)
    for batch, lengths in ((1, "fixed"), (64, "fixed"), (64, "real"))[: 3 if full else 2]:
        spec = dict(case="sampler", model="qwen3-0.6b", batch=batch, dtype="bf16", repeats=repeats,
                    **({"lengths": "real"} if lengths == "real" else {}))
        hf = measure(**spec, side="hf")
        shape = f"qwen3-0.6b bf16, batch {batch}" + (", realistic lengths" if lengths == "real" else "")
        for side in ("ours", "compiled") if full else ("compiled",):
            ours = measure(**spec, side=side)
            yield row(f"sampler {side} vs HF generate", shape, "tokens/s", ours, hf, lambda r: r["work"] / r["seconds"])
            if lengths == "real":
                continue
            read = weight_bytes("qwen3-0.6b", "bf16") * NEW_TOKENS  # every decode step reads the weights once
            yield row(f"sampler {side}: weight bytes read vs a device copy", f"qwen3-0.6b bf16, batch {batch}",
                      "GB/s", ours and {**ours, "bytes": read}, copy and {**copy, "bytes": copy["work"]},
                      lambda r: r["bytes"] / r["seconds"] / 1e9)
    shape = LOGPROB_SHAPES["liger"]
    naive = measure(case="logprobs", side="naive", shape=shape, repeats=repeats)
    for side in ("ours", "fused", "fused_compiled") if full else ("fused_compiled",):
        ours = measure(case="logprobs", side=side, shape=shape, repeats=repeats)
        yield row(f"{side} vs naive log-probs", "16 x 1024 tok, hidden 4096, vocab 128256, bf16", "s", ours, naive,
                  lambda r: r["seconds"])


ROWS = {"sampler": rows_sampler, "logprobs": rows_logprobs, "mirror": rows_mirror, "step": rows_step,
        "lora": rows_lora, "qlora": rows_qlora, "trl": rows_trl, "gpu": rows_gpu}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--full", action="store_true", help="the full shapes (slow on a CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case (median), after 1 warmup")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, JSON spec
    args = parser.parse_args()
    if args.case:
        return run_case(json.loads(args.case))
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{'full' if args.full else 'quick'} set; {device}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; median of {args.repeats} after 1 warmup; ratio = ours / peer\n")
    print("| row | shape | unit | ours | peer | ratio | peak MiB ours | peak MiB peer |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        for r in ROWS[name](args.full, args.repeats):
            if r.get("failed"):  # its error is on stderr
                print(f"| {r['row']} | {r['shape']} | {r['unit']} | failed | | | | |", flush=True)
                continue
            print(f"| {r['row']} | {r['shape']} | {r['unit']} | {r['ours']:.4g} | {r['peer']:.4g} | {r['ratio']:.3f} "
                  f"| {r['mem_ours']:.0f} | {r['mem_peer']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
