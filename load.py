"""What every backend (train.py, trl_backend.py, es.py's inner runs) loads the same way, so they cannot drift.

Device and precision, the model and tokenizer (with LoRA adapters), the task's examples with their rendered
prompts, the rewards, the mirror, the optimizer and schedule, the number of steps, the check that a run never
writes over an earlier one, and the choice of the best eval.
"""
import copy
import logging
import math
import os

import torch

import checkpoint
import data
import lora
import rewards
import common
from common import log
from mirror import NeuralMirror


def device_and_dtype(cfg, world=1):
    """(device, autocast dtype or None); ValueError when the precision cannot run here."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but no CUDA GPU is visible: use device='cpu'")
    if cfg.deterministic:  # cuBLAS reads its workspace setting when it starts: before the first matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda" and world > 1:  # the process's own GPU, also the default for bare "cuda"
        device = torch.device("cuda", common.local_gpu())
        torch.cuda.set_device(device)
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' needs a CUDA GPU: use precision='bf16' or 'fp32' on CPU")
    return device, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_fresh(cfg):
    """ValueError when output_dir holds an earlier run that the config does not continue."""
    if not cfg.resume and (checkpoint.checkpoints(cfg.output_dir) or
                           os.path.isfile(os.path.join(cfg.output_dir, "metrics.jsonl"))):
        raise ValueError(f"output_dir={cfg.output_dir!r} holds an earlier run: continue it with --resume=latest, "
                         "or give a new output_dir")


def quantization(cfg, amp_dtype):
    """transformers' BitsAndBytesConfig for load_in_4bit / load_in_8bit, None without. Its default skips
    (the output embedding, tied weights) keep the lm_head unquantized, as the log-prob kernel reads it."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    try:
        import accelerate  # noqa: F401  (device_map)
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(f"load_in_{'4' if cfg.load_in_4bit else '8'}bit=True needs bitsandbytes and accelerate: "
                         "pip install bitsandbytes accelerate") from None
    from transformers import BitsAndBytesConfig
    if cfg.load_in_8bit:
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)  # "cast to fp16", every call
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = {"auto": amp_dtype or torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16,
               "fp16": torch.float16}[cfg.bnb_4bit_compute_dtype]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=compute)


def model_and_tokenizer(name, device, cfg, dtype=torch.float32, quantization_config=None):
    """A causal LM (weights in `dtype`, dropout off) and its tokenizer through from_pretrained; with a
    `quantization_config` its linears (not the lm_head) are bitsandbytes', loaded straight onto `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    quantized = {} if quantization_config is None else dict(quantization_config=quantization_config,
                                                            device_map={"": device})
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name or name, cache_dir=cfg.cache_dir)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, cache_dir=cfg.cache_dir, **quantized)
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
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(model.config, key, None) not in (None, 1, 1.0):
            raise ValueError(f"model_name={name!r} transforms its logits ({key}), which the log-prob kernel "
                             "does not apply yet: choose a model without it")
    if getattr(model.get_output_embeddings(), "bias", None) is not None:
        raise ValueError(f"model_name={name!r} has an lm_head bias, which the log-prob kernel does not apply "
                         "yet: choose a model without it")
    for m in model.modules():  # sampler and learner must see the same function of the weights
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "support_avx512bf16_for_cpu"):  # a CPU Linear4bit repacks at its first no-grad eval forward
            m.support_avx512bf16_for_cpu = False  # (bf16 scales), then backprops nothing to its input
    if hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0
    return (model if quantized else model.to(device)).train(), tokenizer  # a quantized model cannot move


def policy(cfg, device, amp_dtype, sharded=False):
    """The model to train (with its LoRA adapters when use_lora) and its tokenizer. Full fine-tuning keeps
    fp32 master weights under autocast; a frozen LoRA base is stored in bf16 when the run is bf16 (fp16 keeps
    it in fp32: fp16 weights overflow too easily; FSDP too: a shard group holds one dtype), adapters in fp32.
    load_in_4bit / load_in_8bit: the base's linears stay quantized (QLoRA), the rest as a LoRA base."""
    if cfg.distributed == "fsdp" and not sharded:
        log.info("note: distributed='fsdp' shards over torchrun's processes; this single process holds the whole model")
    if (cfg.load_in_4bit or cfg.load_in_8bit) and sharded:
        raise ValueError("load_in_4bit / load_in_8bit with distributed='fsdp': FSDP cannot shard bitsandbytes' "
                         "packed weights; use distributed='ddp' (each process holds the quantized model)")
    quant = quantization(cfg, amp_dtype)
    bf16_base = cfg.use_lora and amp_dtype == torch.bfloat16 and not sharded
    with torch.random.fork_rng(devices=[]):  # weights missing from the checkpoint: the same init at every load
        torch.manual_seed(cfg.seed)  # (load.reference loads again under FSDP)
        model, tokenizer = model_and_tokenizer(cfg.model_name, torch.device("cpu") if sharded else device, cfg,
                                               torch.bfloat16 if bf16_base else torch.float32, quant)  # FSDP: shard
    if cfg.use_lora:
        t = cfg.lora_target_modules  # 'all-linear', a list, or 'q_proj,v_proj'
        targets = t if t == "all-linear" else [x.strip() for x in t.split(",")] if isinstance(t, str) else list(t)
        lora.inject(model, targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora)
        if cfg.gradient_checkpointing:  # the frozen embeddings give no grad to checkpoint through otherwise
            model.enable_input_require_grads()
    return model, tokenizer


def reference(cfg, model, device, amp_dtype, sharded=False):
    """The frozen reference policy, a copy of the initial weights; None with LoRA (the reference is the base with
    its adapters off) or without a regulariser. Under FSDP it is loaded again once the policy is sharded, so that
    the host never holds two whole models."""
    if cfg.divergence_type == "none" or cfg.use_lora:
        return None
    ref = policy(cfg, device, amp_dtype, sharded)[0] if sharded else copy.deepcopy(model)
    return ref.eval().requires_grad_(False)


def parameter_count(model):
    """The model's parameters, a 4-bit weight counted by its unpacked shape (two weights per stored byte)."""
    return sum(p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
               for p in model.parameters())


def prompt_cap(cfg, model):
    """The prompt tokens kept (cut from the left): min(max_prompt_length, max_seq_length - max_completion_length),
    checked against the model's context."""
    context = getattr(model.config, "max_position_embeddings", None)
    cap = min(cfg.max_prompt_length, cfg.max_seq_length - cfg.max_completion_length)
    if cap < cfg.max_prompt_length:
        log.info(f"note: prompts are cut to {cap} tokens (max_seq_length {cfg.max_seq_length} - "
                 f"max_completion_length {cfg.max_completion_length}), below max_prompt_length={cfg.max_prompt_length}")
    if cap < 1:
        raise ValueError(f"max_seq_length={cfg.max_seq_length} leaves no room for prompts after "
                         f"max_completion_length={cfg.max_completion_length}: raise max_seq_length")
    if context and cap + cfg.max_completion_length > context:
        raise ValueError(f"prompt ({cap}) + completion ({cfg.max_completion_length}) tokens exceed the "
                         f"model's context of {context}: lower max_prompt_length or max_completion_length")
    return cap


def reward_fns(cfg, device=None):
    """The config's rewards (rewards.resolve), math_correctness when it names none."""
    return rewards.resolve(cfg.rewards, cfg.reward_functions or (None if cfg.rewards else ["math_correctness"]),
                           cfg.reward_function_weights, device=device)


def data_seed(cfg):
    """The seed of the data order and the eval carve: data_seed, else seed."""
    return cfg.data_seed if cfg.data_seed is not None else cfg.seed


def task(cfg, tokenizer, reward_list, world=1):
    """(train examples, held-out examples), each with its prompt rendered as model input in ex["text"],
    checked against the batch size and the rewards' columns."""
    batch = cfg.batch_size * world
    train_set, eval_set = data.load_examples(
        cfg.dataset_name, config_name=cfg.dataset_config, split=cfg.split, eval_split=cfg.eval_split,
        eval_size=cfg.eval_size if cfg.eval_split in (None, "carve") else 0, max_samples=cfg.max_samples,
        column_mapping=cfg.column_mapping, processing_fn=cfg.processing_fn, processing_batched=cfg.processing_batched,
        seed=data_seed(cfg), min_train=batch, cache_dir=cfg.cache_dir)
    if len(train_set) < batch:
        raise ValueError(f"{len(train_set)} training prompts cannot fill one batch (batch_size={cfg.batch_size} x "
                         f"{world} process(es)): they are the rows of split={cfg.split!r}, capped by max_samples="
                         f"{cfg.max_samples}, less the eval prompts (eval_size={cfg.eval_size}, eval_split="
                         f"{cfg.eval_split!r}); widen split, raise max_samples, lower eval_size or batch_size, or "
                         "add data")
    rewards.check_columns(reward_list, train_set[0].keys())
    for ex in train_set + eval_set:
        ex["text"] = data.render_prompt(tokenizer, ex["prompt"], cfg.system_prompt, cfg.enable_thinking)
    return train_set, eval_set


def total_steps(cfg, n_train, world=1):
    """Sampling steps: max_steps, or num_epochs passes over n_train prompts at batch_size x world per step."""
    return cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_epochs * n_train / (cfg.batch_size * world))


def mirror(cfg):
    """The neural mirror map the config describes: mirror_path's, or the random one of mirror_init_scale/seed."""
    return NeuralMirror.load(cfg.mirror_path) if cfg.mirror_path else NeuralMirror(cfg.mirror_init_scale,
                                                                                     cfg.mirror_seed)


def optimizer(cfg, model):
    """The torch optimizer cfg.optimizer names, over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer in ("adamw_torch", "adamw", "adam"):
        adam = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        return adam(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                    weight_decay=cfg.weight_decay, fused=True if params and all(p.is_cuda for p in params) else None)
    return torch.optim.SGD(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def scheduler(cfg, opt, steps):
    """transformers' lr_scheduler over steps x num_iterations updates, with its warmup."""
    from transformers import get_scheduler
    updates = steps * cfg.num_iterations
    warmup = math.ceil(cfg.warmup_ratio * updates) if cfg.warmup_ratio > 0 else cfg.warmup_steps
    return get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=warmup, num_training_steps=updates)


def stop_ids(model, tokenizer):
    """Every id that ends a completion: the tokenizer's EOS and the model's generation EOS."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


def eval_row(row):
    """A metrics row's step and eval/* entries; None for None."""
    return row and {"step": row["step"], **{k: v for k, v in row.items() if k.startswith("eval/")}}


def best_eval(evals):
    """The eval row (see eval_row) with the best eval/accuracy (eval/reward without one); None without evals."""
    key = "eval/accuracy" if any("eval/accuracy" in e for e in evals) else "eval/reward"
    return eval_row(max(evals, key=lambda e: e.get(key, float("-inf")), default=None))
