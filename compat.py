"""AlignTune's ways in, mapped onto our Config: its YAML/JSON schema, its CLI flags, create_rl_trainer's names.

Every key of AlignTune's schema either maps to a Config field here or stops with an error that
names it and says why; nothing is silently dropped. The nested schema (algo, model, datasets,
train, logging, distributed, caching, chat_template, rewards) is recognised by its sections; a flat
mapping of our own field names passes through untouched. Imports nothing of ours but the leaf common.py.
"""
from common import did_you_mean

# algo -> the settings it implies (anything the config sets explicitly wins)
ALGOS = {"nmgrpo": {"divergence_type": "neural_mirror"}, "grpo": {"divergence_type": "kl"},
         "dapo": {"loss_type": "dapo", "divergence_type": "none"},
         "drgrpo": {"loss_type": "dr_grpo", "scale_rewards": "none", "divergence_type": "none"}}

# section -> {AlignTune key: our field}; None: accepted only at the value in NEUTRAL (it changes nothing here)
MODEL = {"name_or_path": "model_name", "precision": "precision", "gradient_checkpointing": "gradient_checkpointing",
         "max_seq_length": "max_seq_length", "use_peft": "use_lora", "lora_r": "lora_r", "lora_alpha": "lora_alpha",
         "lora_dropout": "lora_dropout", "lora_target_modules": "lora_target_modules",
         "tokenizer_name": "tokenizer_name", "backend": "backend",
         "disable_dropout": None, "trust_remote_code": None, "device_map": None, "attn_implementation": None}
DATASET = {"name": "dataset_name", "split": "split", "config_name": "dataset_config", "subset": "dataset_config",
           "column_mapping": "column_mapping", "system_prompt": "system_prompt", "max_samples": "max_samples",
           "processing_fn": "processing_fn", "percent": None, "task_type": None, "weight": None}
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
DISTRIBUTED = {"backend": None, "nodes": None, "gpus_per_node": None, "seed": "seed"}
CACHING = {"root": "cache_dir", "enabled": None}
SECTIONS = {"model": MODEL, "train": TRAIN, "training": TRAIN, "logging": LOGGING, "distributed": DISTRIBUTED,
            "caching": CACHING}
TOP = ("algo", "algorithm", "model", "datasets", "dataset", "train", "training", "logging", "distributed", "caching",
       "chat_template", "rewards", "backend")
# keys accepted without a field, at the values that mean what we always do
NEUTRAL = {"model.disable_dropout": (True,), "model.trust_remote_code": (False,), "model.device_map": (None, "auto"),
           "model.attn_implementation": (None, "auto"),
           "datasets.percent": (None, 100), "datasets.task_type": (None, "conversation", "grpo"),
           "datasets.weight": (1, 1.0), "train.save_strategy": ("steps",), "train.eval_strategy": ("steps",),
           "train.logging_strategy": ("steps",), "train.use_cache": (None, False, True, (False,)),
           "train.group_by_length": (True, False), "distributed.backend": ("single",), "distributed.nodes": (1,),
           "distributed.gpus_per_node": (1,), "caching.enabled": (True, False)}
WHY = {"distributed.backend": "only 'single' runs in this version",
       "distributed.nodes": "one node in this version", "distributed.gpus_per_node": "one GPU per run in this version",
       "model.trust_remote_code": "models load with transformers' own code",
       "model.attn_implementation": "the model's default attention runs", "model.device_map": "one device per run",
       "train.eval_strategy": "eval runs every eval_steps (0: at the end only)",
       "datasets.percent": "give the slice in split instead, e.g. split: 'train[:10%]'",
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


def _section(name, values, table, out):
    if not isinstance(values, dict):
        raise ValueError(f"'{name}' should be a mapping of keys, got {type(values).__name__}")
    for key, value in values.items():
        path = f"{name}.{key}"
        if key not in table:
            raise ValueError(f"unknown key '{path}'{did_you_mean(key, table)}: it maps to nothing here")
        field = table[key]
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
        raise ValueError(f"column_mapping={mapping!r} should map names to names, "
                         "e.g. {prompt: question, text: answer}")
    if all(k in ROLE for k in mapping) and not all(v in ("prompt", "reference") for v in mapping.values()):
        return {column: ROLE[role] for role, column in mapping.items()}
    return dict(mapping)


def from_nested(data):
    """Our {field: value} from a config in AlignTune's nested schema; ValueError names any key that maps to nothing."""
    for key in data:
        if key not in TOP:
            raise ValueError(f"unknown top-level key '{key}'{did_you_mean(key, TOP)}; AlignTune's sections are "
                             f"{', '.join(TOP)}")
    out = {}
    algo = str(data.get("algo", data.get("algorithm", "nmgrpo"))).lower()
    if algo not in ALGOS:
        raise ValueError(f"algo={algo!r}: this trainer runs {', '.join(ALGOS)}{did_you_mean(algo, ALGOS)}")
    for name in ("model", "train", "training", "logging", "distributed", "caching"):
        if name in data and data[name] is not None:
            _section(name, data[name], SECTIONS[name], out)
    sets = data.get("datasets", data.get("dataset"))
    if sets is not None:
        sets = [sets] if isinstance(sets, dict) else sets
        if not isinstance(sets, list) or len(sets) != 1:
            got = len(sets) if isinstance(sets, list) else repr(sets)
            raise ValueError(f"datasets: give exactly one dataset (got {got}); mixtures are not supported here")
        _section("datasets", sets[0], DATASET, out)
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
FLAGS = {"model": "model_name", "dataset": "dataset_name", "output": "output_dir", "epochs": "num_epochs",
         "batch_size": "batch_size", "lr": "learning_rate", "max_length": "max_seq_length", "use_peft": "use_lora",
         "lora_targets": "lora_target_modules", "config_name": "dataset_config", "subset": "dataset_config",
         "grad_accum": "gradient_accumulation_steps", "kl_coef": "beta", "cliprange": "epsilon",
         "eval_batch_size": "eval_batch_size", "eval_interval": "eval_steps", "save_interval": "save_steps",
         "cache_dir": "cache_dir", "use_gradient_checkpointing": "gradient_checkpointing"}
LISTS = ("reward_functions", "reward_function_weights", "loggers", "lora_target_modules")


def algo_settings(name):
    """The settings of --type/--algo NAME."""
    name = str(name).lower()
    if name not in ALGOS:
        raise ValueError(f"--type={name!r}: this trainer runs {', '.join(ALGOS)}{did_you_mean(name, ALGOS)}")
    return dict(ALGOS[name])


# create_rl_trainer's keyword names -> our fields
KWARGS = {"num_epochs": "num_epochs", "batch_size": "batch_size", "use_peft": "use_lora", "max_seq_length":
          "max_seq_length", "use_gradient_checkpointing": "gradient_checkpointing", "config_name": "dataset_config",
          "kl_coef": "beta", "cliprange": "epsilon", "cache_dir": "cache_dir", "eval_batch_size": "eval_batch_size"}
