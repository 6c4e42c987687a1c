"""Every knob of a run: the Config dataclass (each knob's default, one-line doc and group), make and validate.

    cfg = config.make(model_name="Qwen/Qwen3-0.6B", dataset_name="openai/gsm8k", learning_rate=2e-6)

Config files and flags come in through configurator.py. Defaults follow AlignTune's NMGRPO documentation.
"""
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from common import did_you_mean, warn_once


def _f(default, doc, group):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, "group": group})
    return field(default=default, metadata={"doc": doc, "group": group})


@dataclass
class Config:
    # model
    model_name: str = _f("Qwen/Qwen3-0.6B", "Hub name or local folder of a causal LM (from_pretrained)", "model")
    tokenizer_name: Optional[str] = _f(None, "tokenizer to load, if not the model's", "model")
    precision: str = _f("auto", "auto / fp32 / bf16 / fp16 (auto: bf16 where the device supports it, else fp32)", "model")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory", "model")
    max_seq_length: int = _f(512, "longest prompt+completion the model is asked to handle (checked against its context)", "model")
    enable_thinking: Optional[bool] = _f(False, "passed to the chat template (Qwen3's thinking mode; off, as AlignTune); None leaves the template's default", "model")
    device: str = _f("auto", "auto / cpu / cuda / cuda:N", "model")
    deterministic: bool = _f(False, "CUDA: deterministic kernels (torch.use_deterministic_algorithms, warn only; "
                                    "CUBLAS_WORKSPACE_CONFIG), slower; CPU runs are already", "model")
    # lora
    use_lora: bool = _f(False, "train LoRA adapters instead of every weight; the reference policy is the base with adapters off", "lora")
    lora_r: int = _f(64, "adapter rank", "lora")
    lora_alpha: float = _f(64, "adapter scale numerator: scaling = alpha / r (alpha / sqrt(r) with use_rslora)", "lora")
    lora_dropout: float = _f(0.05, "dropout on the adapter's input while learning (the sampler runs without it, so > 0 adds noise to the ratio)", "lora")
    lora_target_modules: Any = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "Linear leaf names to adapt, or 'all-linear' (every Linear but lm_head)", "lora")
    use_rslora: bool = _f(False, "rank-stabilised scaling alpha / sqrt(r)", "lora")
    load_in_4bit: bool = _f(False, "QLoRA: load the frozen base in 4 bits (bitsandbytes); needs use_lora", "lora")
    load_in_8bit: bool = _f(False, "load the frozen base in 8 bits (bitsandbytes LLM.int8); needs use_lora", "lora")
    bnb_4bit_quant_type: str = _f("nf4", "4-bit data type: nf4 (QLoRA's) or fp4", "lora")
    bnb_4bit_use_double_quant: bool = _f(True, "quantize the 4-bit blocks' scales too (QLoRA's double quantization)", "lora")
    bnb_4bit_compute_dtype: str = _f("auto", "dtype the 4-bit matmuls run in: auto (the run's precision) / fp32 / bf16 / fp16", "lora")
    # data
    dataset_name: Any = _f("openai/gsm8k", "Hub name, local file/folder (json/jsonl/csv/parquet), 'toy', or a list of dicts", "data")
    dataset_config: Optional[str] = _f(None, "dataset config name (gsm8k's is 'main'; presets fill it)", "data")
    split: str = _f("train", "training split in HF syntax, e.g. 'train[:1%]'", "data")
    eval_split: Optional[str] = _f(None, "held-out split, used whole (e.g. 'test[:200]'); None: the first eval_size rows of the dataset's own test (else validation) split, or, without one, eval_size prompts carved off train; 'carve': always carve", "data")
    eval_size: int = _f(64, "held-out prompts when eval_split is None or 'carve'; a carve never leaves fewer than one batch of training prompts; 0: no eval", "data")
    max_samples: Optional[int] = _f(None, "cap on training examples", "data")
    column_mapping: dict = _f({}, "dataset column -> role ('prompt', 'reference'), e.g. {'question': 'prompt'}", "data")
    system_prompt: Optional[str] = _f(None, "system message put before every prompt", "data")
    chat_template: Optional[str] = _f("auto", "'auto' or None: the tokenizer's own; 'none': plain text; else a Jinja template", "data")
    cache_dir: Optional[str] = _f(None, "where Hugging Face models and datasets are cached (None: their default)", "data")
    processing_fn: Any = _f(None, "callable row -> row (or 'module:function') applied before mapping", "data")
    processing_batched: bool = _f(False, "processing_fn takes and returns a batch (a dict of lists), as datasets.map(batched=True)", "data")
    data_seed: Optional[int] = _f(None, "seed of the data order and the eval carve (None: seed)", "data")
    # training
    num_epochs: int = _f(1, "passes over the training prompts (used when max_steps <= 0)", "training")
    max_steps: int = _f(1600, "sampling steps; > 0 overrides num_epochs (--epochs alone sets it to -1)", "training")
    batch_size: int = _f(16, "prompts per device per step", "training")
    num_generations: int = _f(32, "completions sampled per prompt (the group size G)", "training")
    gradient_accumulation_steps: int = _f(1, "the learner's forwards hold at most B*G / this completions each",
                                          "training")
    learning_rate: float = _f(1e-5, "peak learning rate", "training")
    weight_decay: float = _f(0.0, "decoupled weight decay", "training")
    adam_beta1: float = _f(0.9, "Adam beta1", "training")
    adam_beta2: float = _f(0.999, "Adam beta2", "training")
    adam_epsilon: float = _f(1e-8, "Adam epsilon", "training")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (<= 0: no clipping)", "training")
    optimizer: str = _f("adamw_torch", "adamw_torch / adamw / adam / sgd (the Adams fused into one kernel on CUDA)", "training")
    lr_scheduler: str = _f("cosine", "any transformers scheduler: linear, cosine, constant, constant_with_warmup, ...", "training")
    warmup_steps: int = _f(10, "optimizer updates of linear warmup", "training")
    warmup_ratio: float = _f(0.0, "warmup as a fraction of the updates (when > 0, it replaces warmup_steps)", "training")
    seed: int = _f(42, "seed of everything random: data order, sampling, the model's initial RNG", "training")
    logprob_chunk_size: int = _f(1024, "tokens per chunk of the log-prob kernel (memory is chunk x vocab)", "training")
    fused_loss: bool = _f(True, "evaluate the per-token loss inside the chunked lm_head pass (logits computed once); False: log-probs, then the loss through autograd", "training")
    distributed: str = _f("ddp", "with torchrun: 'ddp' (every process holds the whole model) or 'fsdp' (torch's fully_shard: parameters, gradients and optimizer state sharded, sharded checkpoints)", "training")
    torch_compile: bool = _f(False, "torch.compile the sampler's decode step (a fixed-size KV cache) and the log-prob kernel's softmax math: one-off compile cost, eager if it fails", "training")
    # GRPO
    epsilon: float = _f(0.2, "clip range of the ratio", "grpo")
    epsilon_low: Optional[float] = _f(None, "lower clip range (default: epsilon)", "grpo")
    epsilon_high: Optional[float] = _f(None, "upper clip range (default: epsilon; DAPO uses 0.28)", "grpo")
    num_iterations: int = _f(1, "optimizer passes over each sampled batch (mu); > 1 uses old log-probs", "grpo")
    loss_type: str = _f("dapo", "grpo (per-sequence mean) / bnpo (tokens of this process) / dr_grpo / dapo (tokens of all processes)", "grpo")
    scale_rewards: str = _f("group", "divide advantages by the std of: group / batch / none (Dr. GRPO)", "grpo")
    mask_truncated_completions: bool = _f(False, "drop completions that hit max_completion_length from the loss", "grpo")
    # regulariser
    divergence_type: str = _f("neural_mirror", "neural_mirror / kl / prob_l2 / none", "mirror")
    mirror_coefficient: float = _f(1e-4, "weight of the Bregman divergence (neural_mirror, prob_l2)", "mirror")
    mirror_init_scale: float = _f(0.01, "mirror parameters start as uniform(0, 1) * this", "mirror")
    mirror_seed: int = _f(42, "seed of the mirror initialisation", "mirror")
    beta: float = _f(0.04, "weight of the k3 KL estimator (divergence_type='kl')", "mirror")
    mirror_path: Optional[str] = _f(None, "a learned mirror (safetensors, from es.py or NeuralMirror.save) used instead of the random one", "mirror")
    # evolution strategies (es.py)
    es_population: int = _f(10, "candidates per ES iteration (even: antithetic pairs)", "es")
    es_sigma: float = _f(0.01, "std of the Gaussian perturbations of the 380 mirror parameters, and the unit of the ES step", "es")
    es_sigma_decay: float = _f(0.99, "sigma is multiplied by this after every iteration", "es")
    es_lr: float = _f(0.2, "ES step: every iteration moves the mirror parameters by es_lr * sigma (root mean square) along the estimated fitness gradient", "es")
    es_inner_steps: int = _f(100, "NMGRPO steps of every candidate's inner run", "es")
    es_iterations: int = _f(15, "ES iterations", "es")
    es_fitness: str = _f("accuracy", "the held-out score ES maximises: accuracy (math_correctness) or reward (mean total reward)", "es")
    es_eval_samples: int = _f(64, "validation prompts of each fitness, disjoint from the inner training prompts", "es")
    es_rank_shaping: bool = _f(True, "centred-rank fitness shaping (robust to the fitness scale)", "es")
    # sampling
    max_prompt_length: int = _f(768, "prompts are cut from the left (and counted) to min(this, max_seq_length - max_completion_length)", "sampling")
    max_completion_length: int = _f(256, "new tokens per completion", "sampling")
    temperature: float = _f(0.8, "sampling temperature (log-probs are taken at the same temperature)", "sampling")
    top_p: float = _f(0.9, "nucleus sampling mass (1.0: off)", "sampling")
    top_k: int = _f(0, "keep the k most likely tokens (0: off)", "sampling")
    # rewards
    reward_functions: Optional[list] = _f(None, "reward names or callables, summed with reward_function_weights (default: math_correctness)", "rewards")
    reward_function_weights: Optional[list] = _f(None, "one weight per reward function (default: 1.0 each)", "rewards")
    rewards: Optional[list] = _f(None, "the other form: [{'type': name, 'weight': w, 'params': {...}}, ...]", "rewards")
    # logging, eval, checkpoints
    output_dir: str = _f("./output", "metrics.jsonl, samples.jsonl and checkpoints go here", "logging")
    run_name: Optional[str] = _f(None, "the run's name for the loggers (None: output_dir's name); AlignTune's wandb_run_name", "logging")
    loggers: list = _f([], "besides metrics.jsonl: 'tensorboard', 'wandb' (optional extras)", "logging")
    wandb_project: Optional[str] = _f(None, "wandb project (None: 'nmgrpo'); WANDB_MODE=offline is respected", "logging")
    memory_metrics: bool = _f(True, "peak memory per phase in the metrics (resets the process's peak counters)", "logging")
    log_level: str = _f("INFO", "console detail: DEBUG / INFO / WARNING / ERROR", "logging")
    backend: str = _f("auto", "'auto' or 'native': our engine; 'trl': TRL's GRPOTrainer with our regulariser, rewards and data (pip install trl)", "logging")
    logging_steps: int = _f(1, "log metrics every this many steps", "logging")
    log_completions: bool = _f(True, "write every rollout of each logging step to samples.jsonl", "logging")
    eval_steps: int = _f(100, "evaluate on the held-out prompts every this many steps (0: only at the end)", "logging")
    eval_on_start: bool = _f(False, "evaluate once before the first step", "logging")
    eval_batch_size: int = _f(64, "held-out prompts per greedy sampling batch", "logging")
    save_steps: int = _f(100, "checkpoint every this many steps (0: only at the end)", "logging")
    save_total_limit: int = _f(2, "checkpoints kept (the oldest are deleted)", "logging")
    resume: Optional[str] = _f(None, "'latest' or a checkpoint folder to continue from", "logging")


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
CHOICES = {
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
    "backend": ("auto", "native", "trl"),
    "optimizer": ("adamw_torch", "adamw", "adam", "sgd"),
    "loss_type": ("grpo", "bnpo", "dr_grpo", "dapo"),
    "scale_rewards": ("group", "batch", "none"),
    "divergence_type": ("neural_mirror", "kl", "prob_l2", "none"),
    "distributed": ("ddp", "fsdp"),
    "bnb_4bit_quant_type": ("nf4", "fp4"),
    "bnb_4bit_compute_dtype": ("auto", "fp32", "bf16", "fp16"),
    "es_fitness": ("accuracy", "reward"),
}


def base_type(tp):
    """The concrete type of a field: Optional[int] -> (int, True); Any -> (None, ...)."""
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else None), True
    return (None if tp is Any else tp), False


def _check_type(key, value):
    tp, optional = base_type(FIELDS[key].type)
    if value is None and optional or tp is None:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is list and isinstance(value, tuple):
        return list(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ValueError(f"{key}={value!r} should be {tp.__name__}, got {type(value).__name__}")
    return value


def make(overrides=None, **kwargs):
    """A validated Config from a mapping and keyword arguments; unknown keys get a did-you-mean."""
    values = {**(overrides or {}), **kwargs}
    for key in values:
        if key not in FIELDS:
            raise ValueError(f"unknown config key '{key}'{did_you_mean(key, FIELDS)}")
    cfg = Config(**{k: _check_type(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


AT_LEAST_ONE = ("batch_size", "max_completion_length", "max_prompt_length", "gradient_accumulation_steps",
                "num_iterations", "logging_steps", "eval_batch_size", "logprob_chunk_size", "max_seq_length",
                "save_total_limit", "es_population", "es_inner_steps", "es_iterations", "es_eval_samples",
                "max_samples")
NON_NEGATIVE = ("mirror_coefficient", "mirror_init_scale", "beta", "weight_decay", "epsilon", "warmup_steps", "top_k",
                "eval_size", "save_steps", "eval_steps")


def validate(cfg):
    """Raise ValueError, naming the key and the fix, for a config that cannot run."""
    from transformers import SchedulerType
    for key, options in {**CHOICES, "lr_scheduler": [s.value for s in SchedulerType]}.items():
        if getattr(cfg, key) not in options:
            raise ValueError(f"{key}={getattr(cfg, key)!r} is not one of {', '.join(options)}"
                             f"{did_you_mean(getattr(cfg, key), options)}")
    for key in ("learning_rate", "temperature"):
        if not getattr(cfg, key) > 0:
            raise ValueError(f"{key}={getattr(cfg, key)} must be a positive number")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name}={value} must be a finite number")
        if f.name in AT_LEAST_ONE and value is not None and value < 1:
            raise ValueError(f"{f.name}={value} must be at least 1" + " (None: all)" * (f.name == "max_samples"))
        if f.name in NON_NEGATIVE and value < 0:
            raise ValueError(f"{f.name}={value} must be >= 0")
    for key, high in (("epsilon_low", 1), ("epsilon_high", 10), ("warmup_ratio", 1)):
        if getattr(cfg, key) is not None and not 0 <= getattr(cfg, key) < high:
            raise ValueError(f"{key}={getattr(cfg, key)} must be in [0, {high})")
    if cfg.es_population % 2:
        raise ValueError(f"es_population={cfg.es_population} must be even: candidates come in antithetic pairs")
    if not (cfg.es_sigma > 0 and cfg.es_lr > 0 and 0 < cfg.es_sigma_decay <= 1):
        raise ValueError(f"ES needs es_sigma > 0, es_lr > 0 and 0 < es_sigma_decay <= 1; got es_sigma={cfg.es_sigma}, "
                         f"es_lr={cfg.es_lr}, es_sigma_decay={cfg.es_sigma_decay}")
    if cfg.distributed == "fsdp" and cfg.precision == "fp16":
        raise ValueError("precision='fp16' with distributed='fsdp': each process would scale its own loss; use "
                         "precision='bf16'")
    if (cfg.load_in_4bit or cfg.load_in_8bit) and not cfg.use_lora:
        raise ValueError(f"load_in_{'4' if cfg.load_in_4bit else '8'}bit=True needs use_lora=True: quantized weights "
                         "cannot be trained, only LoRA adapters on top of them")
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit are both set: choose one")
    bnb = [k for k in FIELDS if k.startswith("bnb_4bit_") and getattr(cfg, k) != FIELDS[k].default]
    if bnb and not cfg.load_in_4bit:
        warn_once(f"{', '.join(bnb)} set, but they shape 4-bit loading only: without load_in_4bit=True they do nothing")
    if cfg.mirror_path is not None and not os.path.isfile(cfg.mirror_path):
        raise ValueError(f"mirror_path={cfg.mirror_path!r} is not a file: give a mirror saved by es.py "
                         "(best_mirror.safetensors) or by NeuralMirror.save")
    if cfg.num_generations < 2:
        raise ValueError(f"num_generations={cfg.num_generations}: group-relative advantages need at least 2")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"top_p={cfg.top_p} must be in (0, 1]")
    if cfg.max_steps <= 0 and cfg.num_epochs < 1:
        raise ValueError("set max_steps > 0 or num_epochs >= 1")
    if cfg.use_lora and (cfg.lora_r < 1 or not cfg.lora_alpha > 0 or not 0 <= cfg.lora_dropout < 1):
        raise ValueError(f"LoRA needs lora_r >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1; got lora_r={cfg.lora_r}, "
                         f"lora_alpha={cfg.lora_alpha}, lora_dropout={cfg.lora_dropout}")
    targets = cfg.lora_target_modules
    if cfg.use_lora and not (isinstance(targets, str) and targets.strip() or isinstance(targets, (list, tuple))
                             and targets and all(isinstance(t, str) and t for t in targets)):
        raise ValueError(f"lora_target_modules={targets!r} must be 'all-linear' or Linear names like "
                         "['q_proj', 'v_proj'] (or 'q_proj,v_proj')")
    if cfg.chat_template not in (None, "auto", "none") and not ("{{" in cfg.chat_template or "{%" in cfg.chat_template):
        raise ValueError(f"chat_template={cfg.chat_template!r} is not a Jinja template: use 'auto' (the tokenizer's), "
                         "'none' (plain text) or a template string with {{ }} / {% %}")
    if (cfg.batch_size * cfg.num_generations) % cfg.gradient_accumulation_steps:
        raise ValueError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must divide "
                         f"batch_size*num_generations={cfg.batch_size * cfg.num_generations}")
    import logs
    logs.check_loggers(cfg.loggers)


def config_dict(cfg):
    """The resolved config as JSON-able values (callables by name)."""
    def plain(v):
        if callable(v):
            return f"{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', repr(v))}"
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}
