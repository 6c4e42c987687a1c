"""AlignTune's ways in, mapped onto our Config: its YAML/JSON schema, its CLI flags, create_rl_trainer's names.

Every key of AlignTune's schema either maps to a Config field here or stops with an error that
names it and says why; nothing is silently dropped. The nested schema (algo, model, datasets,
train, logging, distributed, caching, chat_template, rewards) is recognised by its sections, and each section
also takes any of our own field names, so every knob is reachable from YAML; a flat mapping of our field names
(or AlignTune's RENAMES of them) passes through. Imports nothing of ours but the leaf common.py.
"""
import os
import re

from common import did_you_mean

# algo -> the settings it implies (anything the config sets explicitly wins)
ALGOS = {"nmgrpo": {"divergence_type": "neural_mirror"}, "grpo": {"divergence_type": "kl"},
         "dapo": {"loss_type": "dapo", "divergence_type": "none"},
         "drgrpo": {"loss_type": "dr_grpo", "scale_rewards": "none", "divergence_type": "none"}}

# AlignTune's names of our fields, taken on every surface: keyword arguments, config files, YAML sections, flags
RENAMES = {"wandb_run_name": "run_name", "use_peft": "use_lora", "use_gradient_checkpointing": "gradient_checkpointing",
           "config_name": "dataset_config", "subset": "dataset_config", "kl_coef": "beta", "cliprange": "epsilon",
           "epochs": "num_epochs", "per_device_batch_size": "batch_size",
           "per_device_eval_batch_size": "eval_batch_size", "eval_interval": "eval_steps", "save_interval": "save_steps"}

# section -> {AlignTune key: our field}; None: accepted only at the value in NEUTRAL (it changes nothing here);
# "percent": a share of the split (fold_percent)
MODEL = {"name_or_path": "model_name", "precision": "precision", "gradient_checkpointing": "gradient_checkpointing",
         "max_seq_length": "max_seq_length", "use_peft": "use_lora", "lora_r": "lora_r", "lora_alpha": "lora_alpha",
         "lora_dropout": "lora_dropout", "lora_target_modules": "lora_target_modules",
         "tokenizer_name": "tokenizer_name", "backend": "backend",
         "disable_dropout": None, "trust_remote_code": None, "device_map": None, "attn_implementation": None}
DATASET = {"name": "dataset_name", "split": "split", "config_name": "dataset_config", "subset": "dataset_config",
           "column_mapping": "column_mapping", "system_prompt": "system_prompt", "max_samples": "max_samples",
           "processing_fn": "processing_fn", "percent": "percent", "task_type": None, "weight": None}
TRAIN = {"epochs": "num_epochs", "max_steps": "max_steps", "per_device_batch_size": "batch_size",
         "batch_size": "batch_size", "gradient_accumulation_steps": "gradient_accumulation_steps",
         "learning_rate": "learning_rate", "num_generations": "num_generations",
         "mirror_coefficient": "mirror_coefficient", "mirror_init_scale": "mirror_init_scale",
         "mirror_seed": "mirror_seed", "divergence_type": "divergence_type", "optimizer": "optimizer",
         "lr_scheduler": "lr_scheduler", "weight_decay": "weight_decay", "warmup_steps": "warmup_steps",
         "warmup_ratio": "warmup_ratio", "max_grad_norm": "max_grad_norm", "max_prompt_length": "max_prompt_length",
         "max_completion_length": "max_completion_length", "temperature": "temperature", "top_p": "top_p",
         "beta": "beta", "kl_coef": "beta", "epsilon": "epsilon", "cliprange": "epsilon", "loss_type": "loss_type",
         "scale_rewards": "scale_rewards", "mask_truncated_completions": "mask_truncated_completions",
         "enable_thinking": "enable_thinking", "seed": "seed", "save_steps": "save_steps",
         "save_total_limit": "save_total_limit", "eval_steps": "eval_steps", "logging_steps": "logging_steps",
         "per_device_eval_batch_size": "eval_batch_size", "rewards": "rewards", "reward_functions": "reward_functions",
         "reward_function_weights": "reward_function_weights", "num_iterations": "num_iterations",
         "wandb_project": "wandb_project", "eval_interval": "eval_steps", "save_interval": "save_steps",
         "save_strategy": None, "eval_strategy": None, "logging_strategy": None, "use_cache": None,
         "group_by_length": None}
LOGGING = {"output_dir": "output_dir", "run_name": "run_name", "loggers": "loggers", "report_to": "report_to",
           "wandb_project": "wandb_project", "logging_steps": "logging_steps", "save_steps": "save_steps",
           "eval_steps": "eval_steps", "log_level": "log_level", "sample_logging": "sample_logging"}
DISTRIBUTED = {"backend": "distributed", "seed": "seed"}  # nodes and gpus_per_node: check_processes
CACHING = {"root": "cache_dir", "enabled": None}
SECTIONS = {"model": MODEL, "train": TRAIN, "training": TRAIN, "logging": LOGGING, "distributed": DISTRIBUTED,
            "caching": CACHING}
TOP = ("algo", "algorithm", "model", "datasets", "dataset", "train", "training", "logging", "distributed", "caching",
       "chat_template", "rewards", "backend")
# keys accepted without a field, at the values that mean what we always do
NEUTRAL = {"model.disable_dropout": (True,), "model.trust_remote_code": (False,), "model.device_map": (None, "auto"),
           "model.attn_implementation": (None, "auto"),
           "datasets.task_type": (None, "conversation", "grpo"),
           "datasets.weight": (1, 1.0), "train.save_strategy": ("steps",), "train.eval_strategy": ("steps",),
           "train.logging_strategy": ("steps",), "train.use_cache": (None, False, True, (False,)),
           "train.group_by_length": (True, False), "caching.enabled": (True, False)}
WHY = {"model.trust_remote_code": "models load with transformers' own code",
       "model.attn_implementation": "the model's default attention runs", "model.device_map": "one device per run",
       "train.eval_strategy": "eval runs every eval_steps (0: at the end only)",
       "model.disable_dropout": "dropout is always off (the sampler and learner must agree)"}


def is_nested(data):
    """Whether a config mapping is in AlignTune's nested schema: it names an algo or holds one of its sections
    (none of which is a field of ours)."""
    return "algo" in data or "algorithm" in data or any(
        isinstance(data.get(k), (dict, list)) for k in ("model", "datasets", "dataset", "train", "training", "logging",
                                                        "distributed", "caching"))


def _neutral(path, value):
    ok = NEUTRAL.get(path, ())
    if ok is None or value in ok:
        return
    why = WHY.get(path) or "it has no meaning for this trainer"
    raise ValueError(f"{path}={value!r} is not supported: {why}; remove the key or set it to {ok[0]!r}")


def _section(name, values, table, out, fields):
    if not isinstance(values, dict):
        raise ValueError(f"'{name}' should be a mapping of keys, got {type(values).__name__}")
    for key, value in values.items():
        path = f"{name}.{key}"
        if key not in table and key not in RENAMES and key not in fields:
            raise ValueError(f"unknown key '{path}'{did_you_mean(key, [*table, *fields])}: it maps to nothing here")
        field = table[key] if key in table else RENAMES.get(key, key)
        if field is None:
            _neutral(f"{'datasets' if name == 'dataset' else name.replace('training', 'train')}.{key}", value)
        elif field in out and out[field] != value:
            raise ValueError(f"'{path}' sets {field}={value!r}, which another key already set to {out[field]!r}")
        else:
            out[field] = value


ROLE = {"prompt": "prompt", "query": "prompt", "question": "prompt", "instruction": "prompt", "text": "reference",
        "answer": "reference", "response": "reference", "completion": "reference", "reference": "reference",
        "solution": "reference", "ground_truth": "reference", "target": "reference"}


def column_mapping(mapping):
    """AlignTune writes {role: dataset column} ({prompt: question, text: answer}); ours is {column: role}."""
    if not mapping:
        return mapping
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise ValueError(f"column_mapping={mapping!r} should be a dict of names to names, "
                         "e.g. {prompt: question, text: answer}")
    if all(k in ROLE for k in mapping) and not all(v in ("prompt", "reference") for v in mapping.values()):
        return {column: ROLE[role] for role, column in mapping.items()}
    return dict(mapping)


def check_processes(nodes=1, gpus_per_node=1):
    """ValueError when AlignTune's distributed.nodes x gpus_per_node is not the number of processes torchrun started."""
    for name, n in (("nodes", nodes), ("gpus_per_node", gpus_per_node)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"distributed.{name}={n!r} should be a positive integer")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if nodes * gpus_per_node != world:
        raise ValueError(f"distributed: nodes={nodes} x gpus_per_node={gpus_per_node} processes, but this run has "
                         f"{world}: the processes come from torchrun; launch with torchrun --nnodes {nodes} "
                         f"--nproc_per_node {gpus_per_node} train.py ..., or drop the two keys")


def fold_percent(values):
    """values with AlignTune's percent (the share of the split that trains) folded into split: {'split': 'train',
    'percent': 10} -> {'split': 'train[:10%]'}. Called once, on the final merge of every surface."""
    if "percent" not in values:
        return values
    values = dict(values)
    split, percent = values.get("split", "train"), values.pop("percent")
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 < percent <= 100 \
            or not float(percent).is_integer():
        raise ValueError(f"percent={percent!r} should be a whole number in [1, 100] (datasets slices by whole "
                         "percents); for finer shares give rows, e.g. split='train[:1234]'")
    if not isinstance(split, str) or not re.fullmatch(r"[\w.-]+", split):
        raise ValueError(f"percent={percent} and split={split!r}: give one slice, e.g. "
                         f"split='train[:{percent:g}%]'")
    return {**values, "split": split if percent == 100 else f"{split}[:{int(percent)}%]"}


def rename(values):
    """A flat mapping with AlignTune's names (RENAMES) as our fields; percent is kept for fold_percent."""
    out = {}
    for key, value in values.items():
        field = RENAMES.get(key, key)
        if field in out and out[field] != value:
            raise ValueError(f"'{key}' sets {field}={value!r}, which another key already set to {out[field]!r}")
        out[field] = column_mapping(value) if field == "column_mapping" else value
    return out


def from_nested(data, fields=()):
    """Our {field: value} from a config in AlignTune's nested schema; ValueError names any key that maps to nothing.
    `fields` (our field names) are taken in every section and at the top level."""
    for key in data:
        if key not in TOP and key not in fields and key not in RENAMES:
            raise ValueError(f"unknown top-level key '{key}'{did_you_mean(key, [*TOP, *fields])}; AlignTune's "
                             f"sections are {', '.join(TOP)}")
    out = rename({k: v for k, v in data.items() if k not in TOP})
    algo = str(data.get("algo", data.get("algorithm", "nmgrpo"))).lower()
    if algo not in ALGOS:
        raise ValueError(f"algo={algo!r}: this trainer runs {', '.join(ALGOS)}{did_you_mean(algo, ALGOS)}")
    dist = data.get("distributed")
    if isinstance(dist, dict):
        dist = {k: v for k, v in dist.items() if k not in ("nodes", "gpus_per_node")
                and (k, v) != ("backend", "single")}  # single: one process, what runs without torchrun
        if {"nodes", "gpus_per_node"} & data["distributed"].keys():
            check_processes(data["distributed"].get("nodes", 1), data["distributed"].get("gpus_per_node", 1))
    elif isinstance(dist, str):  # our field, distributed: fsdp
        out["distributed"], dist = dist, None
    for name in ("model", "train", "training", "logging", "distributed", "caching"):
        section = dist if name == "distributed" else data.get(name)
        if section is not None:
            _section(name, section, SECTIONS[name], out, fields)
    sets = data.get("datasets", data.get("dataset"))
    if sets is not None:
        sets = [sets] if isinstance(sets, dict) else sets
        if not isinstance(sets, list) or len(sets) != 1:
            got = len(sets) if isinstance(sets, list) else repr(sets)
            raise ValueError(f"datasets: give exactly one dataset (got {got}); mixtures are not supported here")
        _section("datasets", sets[0], DATASET, out, fields)
    if "column_mapping" in out:
        out["column_mapping"] = column_mapping(out["column_mapping"])
    if "sample_logging" in out:  # enabled: every rollout of a logging step goes to samples.jsonl
        sl = out.pop("sample_logging")
        sl = sl if isinstance(sl, dict) else {"enabled": bool(sl)}
        extra = sorted(set(sl) - {"enabled"})
        if extra:
            raise ValueError(f"logging.sample_logging.{extra[0]} has no meaning here: samples.jsonl gets every rollout "
                             "of each logging step; keep only 'enabled'")
        out["log_completions"] = bool(sl.get("enabled"))
    if "rewards" in data:
        if "rewards" in out:
            raise ValueError("rewards are given both at the top level and under train: keep one")
        out["rewards"] = data["rewards"]
    if "chat_template" in data:
        out["chat_template"] = data["chat_template"]
    if "backend" in data:  # 'trl': TRL's GRPOTrainer with our regulariser, rewards and data (trl_backend.py)
        if out.get("backend", data["backend"]) != data["backend"]:
            raise ValueError(f"backend={data['backend']!r} and model.backend={out['backend']!r} disagree: keep one")
        out["backend"] = data["backend"]
    for field, value in ALGOS[algo].items():
        out.setdefault(field, value)
    if "num_epochs" in out and "max_steps" not in out:  # epochs alone: train for them
        out["max_steps"] = -1
    for key in ("loggers", "report_to"):  # HF's report_to names loggers too; "none" adds nothing
        if key not in out:
            continue
        value = out[key]
        value = [] if value in (None, "none", ["none"]) else [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"logging.{key}={out[key]!r} should be a list of names like [tensorboard, wandb]")
        out[key] = value
    if "report_to" in out:
        out["loggers"] = list(dict.fromkeys(out.get("loggers", []) + out.pop("report_to")))
    return out


# AlignTune's CLI flags (dashes as underscores) -> our fields; comma lists are split for LISTS
FLAGS = {**RENAMES, "model": "model_name", "dataset": "dataset_name", "output": "output_dir", "lr": "learning_rate",
         "max_length": "max_seq_length", "lora_targets": "lora_target_modules",
         "grad_accum": "gradient_accumulation_steps"}
SHORT = {"-m": "--model", "-d": "--dataset", "-o": "--output", "-c": "--config"}
# flags that set a field to a fixed value: --bf16, --4bit (=false: leave the field as it is)
SWITCHES = {"bf16": ("precision", "bf16"), "fp16": ("precision", "fp16"), "fp32": ("precision", "fp32"),
            "4bit": ("load_in_4bit", True), "8bit": ("load_in_8bit", True)}
# --col-prompt COLUMN: that dataset column plays the role
COLUMNS = {"col_prompt": "prompt", "col_question": "prompt", "col_response": "reference", "col_answer": "reference",
           "col_reference": "reference", "col_text": "reference", "col_completion": "reference"}
LISTS = ("reward_functions", "reward_function_weights", "loggers", "lora_target_modules")


def algo_settings(name):
    """The settings of --type/--algo NAME."""
    name = str(name).lower()
    if name not in ALGOS:
        raise ValueError(f"--type={name!r}: this trainer runs {', '.join(ALGOS)}{did_you_mean(name, ALGOS)}")
    return dict(ALGOS[name])

