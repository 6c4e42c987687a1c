"""backend='trl': the same NMGRPO inside TRL's GRPOTrainer, for runs that stay on TRL.

    pip install "trl>=1.16,<1.17"
    python train.py --config configs/gsm8k.py --backend trl

Our parts, TRL's loop. data.py loads the examples and renders each prompt as the native loop does (the
dataset TRL reads holds that text as `prompt`, the reference and every other column); rewards.py scores
the completions, each reward wrapped as a TRL reward function; NMGRPOTrainer adds mirror.divergence of
the sampled tokens against the reference policy to TRL's own clipped loss (GRPOConfig.beta is 0, so TRL
adds no KL of its own). The reference is never the current weights: with LoRA (lora.py) it is the base
with the adapters off, without LoRA a frozen copy of the initial weights in TRL's ref_model slot.
grpo_config maps our knobs onto GRPOConfig; a knob TRL cannot honour stops with a ValueError.
"""
import copy
import math
import os

import torch
from packaging.version import Version
from transformers import TrainerCallback

import checkpoint as checkpoint_lib
import common
import load
import logs
import lora
import rewards as rewards_lib
from mirror import NeuralMirror, divergence

INSTALL = 'pip install "trl>=1.16,<1.17"'
try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
    from trl.models import prepare_deepspeed, prepare_fsdp
    from trl.trainer.utils import add_fused_lm_head
except ImportError:  # trl is an optional extra
    raise ValueError(f"backend='trl' needs TRL: {INSTALL}") from None
if not Version("1.16") <= Version(trl.__version__) < Version("1.17"):
    raise ValueError(f"backend='trl' is tested with trl 1.16, found {trl.__version__}: {INSTALL}")

TRL_KWARGS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")  # not dataset columns
RENAME = {"learning_rate": "lr", "frac_reward_zero_std": "frac_zero_std_groups",
          "completions/mean_length": "completion_length", "completions/max_length": "completion_length_max",
          "completions/clipped_ratio": "truncated_frac", "clip_ratio/low_mean": "clip_low",
          "clip_ratio/high_mean": "clip_high"}


class NMGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss adds divergence_weight * mirror.divergence(divergence_type) of the sampled tokens
    against the reference policy, aggregated the way loss_type aggregates TRL's own per-token loss.

    `model` is a model instance. With our LoRA adapters on it (lora.inject) the reference is the same model with
    them off; otherwise a frozen copy of its weights as given. `prompt_cap` cuts text prompts from the left to
    that many tokens, as the native loop does. Use it with GRPOConfig(beta=0.0).
    """

    def __init__(self, model, *args, divergence_type="neural_mirror", divergence_weight=1e-4, mirror=None,
                 prompt_cap=None, **kwargs):
        frozen = None
        if divergence_type != "none" and not lora.is_lora(model):
            frozen = copy.deepcopy(model).eval().requires_grad_(False)
        super().__init__(model, *args, **kwargs)
        if self.beta != 0.0:
            raise ValueError(f"GRPOConfig.beta={self.beta}: NMGRPOTrainer adds its own regulariser; use beta=0.0")
        if divergence_type == "neural_mirror" and mirror is None:
            mirror = NeuralMirror()
        self.divergence_type, self.divergence_weight, self.prompt_cap = divergence_type, divergence_weight, prompt_cap
        self.mirror = None if mirror is None else mirror.to(self.accelerator.device).requires_grad_(False)
        self._policy_logps = None
        if frozen is not None:  # set up as TRL sets up its own reference model
            add_fused_lm_head(frozen, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
            if self.is_deepspeed_enabled:
                self.ref_model = prepare_deepspeed(frozen, self.accelerator)
            elif self.is_fsdp_enabled:
                self.ref_model = prepare_fsdp(frozen, self.accelerator)
            else:
                self.ref_model = self.accelerator.prepare_model(frozen, evaluation_mode=True)

    def _tokenize_prompts(self, prompts):
        """Rendered prompt texts to ids as the native loop tokenises them: no special tokens added, cut from the left."""
        if not isinstance(prompts[0], str):
            return super()._tokenize_prompts(prompts)
        ids = self.processing_class(text=prompts, add_special_tokens=False)["input_ids"]
        return [x[-self.prompt_cap:] if self.prompt_cap else x for x in ids], None, {}

    def _generate_single_turn(self, *args, **kwargs):
        """TRL's sampling with the model in eval mode: no LoRA dropout while sampling, as in the native sampler."""
        with common.eval_mode(self.accelerator.unwrap_model(self.model)):
            return super()._generate_single_turn(*args, **kwargs)

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.divergence_type != "none":
            out["ref_per_token_logps"] = self._reference_logps(out)
        return out

    @torch.no_grad()
    def _reference_logps(self, batch):
        """Log-probs (N, T) of the sampled tokens under the reference policy."""
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (N, P+T)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)  # (N, P+T)
        size = self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
        keep = batch["completion_ids"].size(1)
        if self.ref_model is not None:
            return self._get_per_token_logps_and_entropies(self.ref_model, ids, mask, keep, batch_size=size)[0]
        with lora.adapters_off(self.accelerator.unwrap_model(self.model)):
            return self._get_per_token_logps_and_entropies(self.model, ids, mask, keep, batch_size=size)[0]

    def _get_per_token_logps_and_entropies(self, *args, compute_entropy=False, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, compute_entropy=compute_entropy, **kwargs)
        if compute_entropy:  # the learner's pass in _compute_loss: its log-probs (B, T) feed the regulariser
            self._policy_logps = out[0]
        return out

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)  # TRL's clipped surrogate, aggregated by loss_type
        logp, self._policy_logps = self._policy_logps, None  # (B, T), with grad
        if self.divergence_type == "none":
            return loss
        div = divergence(self.divergence_type, logp, inputs["ref_per_token_logps"], mirror=self.mirror, coef=1.0,
                         beta=1.0)  # (B, T), unweighted
        mask = inputs["completion_mask"]  # (B, T)
        totals = self.accelerator.reduce(torch.stack([(div.detach() * mask).sum(), mask.sum().float()]), "sum")
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][logs.DIVERGENCE_METRIC[self.divergence_type]].append((totals[0] / totals[1].clamp(min=1.0)).item())
        return loss + self.divergence_weight * self._aggregate(div, mask, inputs)

    def _aggregate(self, x, mask, inputs):
        """x (B, T) over the loss mask with the denominator loss_type gives TRL's per-token loss."""
        accumulation = self.current_gradient_accumulation_steps if self.model.training else 1.0
        if self.loss_type == "grpo":
            return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if self.loss_type == "bnpo":
            return (x * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":
            return (x * mask).sum() / (x.size(0) * self.max_completion_length) / accumulation
        if self.loss_type == "dapo":
            norm = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if self.model.training:
                norm = norm * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return (x * mask).sum() / norm
        raise ValueError(f"loss_type={self.loss_type!r}: the regulariser aggregates grpo, bnpo, dr_grpo and dapo")

    def _save(self, output_dir=None, state_dict=None):
        """TRL's save, except that a model with our LoRA saves its adapter alone in PEFT's layout; the mirror goes
        along (mirror.safetensors)."""
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if not lora.is_lora(model):
            super()._save(output_dir, state_dict)
        elif self.args.should_save:  # the base as a path that still resolves from elsewhere, as native checkpoints
            base = model.config.name_or_path
            lora.save_adapter(model, output_dir, os.path.abspath(base) if os.path.isdir(base) else base)
            self.processing_class.save_pretrained(output_dir)
        if self.args.should_save and self.mirror is not None:
            self.mirror.save(os.path.join(output_dir, "mirror.safetensors"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.accelerator.unwrap_model(model or self.model)
        if lora.is_lora(model):
            lora.load_adapter(model, resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)


def reward_function(reward, originals):
    """One of our resolved rewards as a TRL reward function: the reference and the row's columns come from TRL's
    kwargs (the dataset's columns), the row's `prompt` is the example's own prompt (`originals`: rendered text ->
    prompt); the values are unweighted (GRPOConfig.reward_weights weighs them)."""
    def score(prompts, completions, **kwargs):
        columns = {k: v for k, v in kwargs.items() if k not in TRL_KWARGS}  # one list per dataset column
        refs = columns.pop("reference", [None] * len(completions))
        rows = [{"prompt": originals.get(p, p), **{k: v[i] for k, v in columns.items()}} for i, p in enumerate(prompts)]
        return rewards_lib.score([reward], completions, refs, rows)[1][reward.name]
    score.__name__ = reward.name  # TRL logs rewards/<name>/mean
    return score


def check(cfg, device):
    """ValueError for a knob TRL cannot honour."""
    if cfg.torch_compile:
        raise ValueError("torch_compile=True compiles the native sampler and log-prob kernel, which backend='trl' "
                         "does not run: set torch_compile=False")
    if cfg.load_in_4bit or cfg.load_in_8bit:
        raise ValueError("load_in_4bit / load_in_8bit: transformers' Trainer (under TRL) trains a quantized model "
                         "only through PEFT's adapters, not ours: use backend='native'")
    if cfg.distributed != "ddp":
        raise ValueError(f"distributed={cfg.distributed!r}: backend='trl' shards through accelerate's own config "
                         "(accelerate launch --config_file ...); leave distributed='ddp'")
    if device.type == "cuda" and cfg.device not in ("auto", "cuda", "cuda:0"):
        raise ValueError(f"device={cfg.device!r}: backend='trl' runs where accelerate puts it; pick the GPU with "
                         "CUDA_VISIBLE_DEVICES and set device='cuda'")
    load.check_fresh(cfg)
    resume_from(cfg)


def grpo_config(cfg, total_steps, device, amp_dtype, reward_weights, has_eval, **grpo_args):
    """Our knobs as a GRPOConfig, plus `grpo_args`: GRPOConfig fields no knob sets (use_vllm, push_to_hub, ...).
    TRL counts optimizer updates where we count sampling steps, so step knobs are multiplied by num_iterations;
    its batch is completions per micro-batch, ours prompts per step."""
    mu = cfg.num_iterations
    eps_low = cfg.epsilon if cfg.epsilon_low is None else cfg.epsilon_low
    loggers = [name for name in cfg.loggers if name in ("tensorboard", "wandb")]
    ours = dict(
        output_dir=cfg.output_dir, run_name=cfg.run_name or os.path.basename(os.path.abspath(cfg.output_dir)),
        seed=cfg.seed, data_seed=load.data_seed(cfg), use_cpu=device.type == "cpu", bf16=amp_dtype == torch.bfloat16,
        fp16=amp_dtype == torch.float16, activation_checkpointing=cfg.gradient_checkpointing,
        max_steps=total_steps * mu, num_generations=cfg.num_generations,
        per_device_train_batch_size=cfg.batch_size * cfg.num_generations // cfg.gradient_accumulation_steps,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio if cfg.warmup_ratio > 0 else cfg.warmup_steps,
        weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon, max_grad_norm=max(cfg.max_grad_norm, 0.0),
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
        top_k=cfg.top_k, epsilon=eps_low, epsilon_high=cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high,
        num_iterations=mu, loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards,
        mask_truncated_completions=cfg.mask_truncated_completions, beta=0.0, reward_weights=reward_weights,
        report_to=loggers or "none", project=cfg.wandb_project or "nmgrpo",
        logging_steps=cfg.logging_steps * mu, log_completions=cfg.log_completions,
        log_level=cfg.log_level.lower(), disable_tqdm=cfg.log_level in ("WARNING", "ERROR"),
        save_strategy="steps", save_steps=(cfg.save_steps or total_steps) * mu, save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if has_eval and cfg.eval_steps else "no", eval_steps=max(cfg.eval_steps, 1) * mu,
        eval_on_start=has_eval and cfg.eval_on_start, per_device_eval_batch_size=cfg.eval_batch_size,
        num_generations_eval=1)
    clash = sorted(set(grpo_args) & set(ours))
    if clash:
        raise ValueError(f"GRPOConfig field {clash[0]!r} is set from the config's knobs (see the mapping table in "
                         "docs/trl.md): set the knob instead")
    if grpo_args.get("use_vllm") and cfg.use_lora:
        raise ValueError("use_vllm=True syncs the weights by name, which our LoRA layers do not match: use vLLM with "
                         "full fine-tuning (use_lora=False)")
    return GRPOConfig(**ours, **grpo_args)


def build_trainer(cfg, callbacks=(), **grpo_args):
    """An NMGRPOTrainer for a Config, checked before anything is written; its MetricsFile callback is
    trainer.metrics_file. `callbacks`: your TRL callbacks; `grpo_args`: GRPOConfig fields no knob sets, e.g.
    build_trainer(cfg, use_vllm=True, vllm_mode="colocate") or push_to_hub=True, hub_model_id=..."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    world = int(os.environ.get("WORLD_SIZE", "1"))  # accelerate's processes
    common.configure_logging(cfg.log_level, int(os.environ.get("RANK", "0")))
    torch.manual_seed(cfg.seed)  # the LoRA initialisation, as the native loop seeds it
    device, amp_dtype = load.device_and_dtype(cfg, world)  # under torchrun the process's own GPU, set as default
    check(cfg, device)
    reward_fns = load.reward_fns(cfg, device)
    model, tokenizer = load.policy(cfg, device, amp_dtype)
    prompt_cap = load.prompt_cap(cfg, model)
    train_set, eval_set = load.task(cfg, tokenizer, reward_fns, world)
    originals = {ex["text"]: ex["prompt"] for ex in train_set + eval_set}

    def dataset(examples):  # the rendered prompt as `prompt`; the reference and every other column as they are
        rows = [{**{k: v for k, v in ex.items() if k != "text"}, "prompt": ex["text"]} for ex in examples]
        return Dataset.from_list(rows) if rows else None

    total_steps = load.total_steps(cfg, len(train_set), world)
    metrics = MetricsFile(os.path.join(cfg.output_dir, "metrics.jsonl"), cfg.num_iterations)
    trainer = NMGRPOTrainer(
        model, reward_funcs=[reward_function(r, originals) for r in reward_fns],
        args=grpo_config(cfg, total_steps, device, amp_dtype, [r.weight for r in reward_fns], bool(eval_set),
                         **grpo_args),
        train_dataset=dataset(train_set), eval_dataset=dataset(eval_set), processing_class=tokenizer,
        optimizers=(load.optimizer(cfg, model), None), callbacks=[metrics, *callbacks],
        divergence_type=cfg.divergence_type, mirror=load.mirror(cfg), prompt_cap=prompt_cap,
        divergence_weight=cfg.beta if cfg.divergence_type == "kl" else cfg.mirror_coefficient)
    trainer.metrics_file = metrics
    if cfg.log_level in ("WARNING", "ERROR"):  # no metrics lines on the console
        trainer.remove_callback(PrinterCallback)
    return trainer


class MetricsFile(TrainerCallback):
    """TRL's logs under train.py's metric names, one row per log appended to metrics.jsonl (so `python train.py
    plot` draws a TRL run); `step` counts sampling steps. Keeps the last training row and every eval row."""

    def __init__(self, path, num_iterations=1):
        self.path, self.num_iterations, self.last, self.evals = path, num_iterations, {}, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "train_runtime" in logs:  # the run's closing summary
            return
        row = {"step": math.ceil(state.global_step / self.num_iterations), **{ours(k): v for k, v in logs.items()}}
        for prefix in ("", "eval/"):
            if f"{prefix}rewards/math_correctness" in row:
                row[f"{prefix}accuracy"] = row[f"{prefix}rewards/math_correctness"]
        if state.is_world_process_zero:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            common.append_jsonl(self.path, [row])
        if "eval/reward" in row:
            self.evals.append(row)
            self.last.update(row)
        else:
            self.last = row


def ours(key):
    """A TRL metric's name in train.py's terms: learning_rate -> lr, rewards/x/mean -> rewards/x, eval_x -> eval/x."""
    prefix, key = ("eval/", key[5:]) if key.startswith("eval_") else ("", key)
    key = RENAME.get(key, key)
    if key.startswith("rewards/") and key.endswith("/mean"):
        key = key[:-len("/mean")]
    elif key.startswith("rewards/") and key.endswith("/std"):
        key = key[:-len("/std")] + "_std"
    return prefix + key


def resume_from(cfg):
    """The TRL checkpoint folder a run continues from: cfg.resume's, or with 'latest' the newest in output_dir
    (None when there is none yet)."""
    if cfg.resume == "latest":
        found = checkpoint_lib.checkpoints(cfg.output_dir)
        return found[-1] if found else None
    if cfg.resume and not os.path.isfile(os.path.join(cfg.resume, "trainer_state.json")):
        raise ValueError(f"resume={cfg.resume!r} is not a checkpoint folder (no trainer_state.json): give a "
                         "checkpoint-N folder or resume='latest'")
    return cfg.resume


def train(cfg):
    """Train with TRL's GRPOTrainer: fit(build_trainer(cfg), cfg)."""
    return fit(build_trainer(cfg), cfg)


def fit(trainer, cfg):
    """trainer.train() (continuing from cfg.resume), then the held-out prompts once at the end when TRL's eval
    schedule is off (eval_steps 0; otherwise TRL evaluates the last step); the result dict train.fit returns: the last metrics row, the last checkpoint (TRL's
    checkpoint-N folder, N counting optimizer updates), steps, best eval."""
    resume = resume_from(cfg)
    if cfg.resume and trainer.accelerator.is_main_process:  # rows after the checkpoint are logged again
        step = int(os.path.basename(resume).split("-")[-1]) // cfg.num_iterations if resume else -1
        common.truncate_jsonl(os.path.join(cfg.output_dir, "metrics.jsonl"), "step", step)
    trainer.accelerator.wait_for_everyone()
    trainer.train(resume_from_checkpoint=resume)
    updates = trainer.state.global_step
    if trainer.eval_dataset is not None and trainer.args.eval_strategy == "no":  # else TRL evaluated the last step
        trainer.evaluate()
    last = checkpoint_lib.checkpoints(cfg.output_dir)
    return {"metrics": trainer.metrics_file.last, "checkpoint": last[-1] if last else None,
            "output_dir": cfg.output_dir, "steps": updates // cfg.num_iterations, "skipped_steps": 0,
            "best_eval": load.best_eval(trainer.metrics_file.evals), "stopped_by": None}
