"""Manual LoRA with PEFT's numerics and file layout: inject, adapters on/off, save and load.

A wrapped linear computes  W x + (B A dropout(x)) * scaling  (scaling = alpha/r, alpha/sqrt(r) with rslora), W frozen
in the base dtype or quantized (bitsandbytes' Linear4bit / Linear8bitLt: QLoRA), A and B trainable in fp32. B starts
at zero, so the adapted model is the base at step 0; with the adapters off it *is* the base: the reference policy
costs no copy. PeftModel loads our files, load_adapter PEFT's.
"""
import contextlib
import json
import math
import os
import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from common import atomic_write

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# PEFT config fields whose non-default values change the adapter in ways this file does not implement
UNSUPPORTED = {"use_dora": (False, None), "bias": ("none", None), "fan_in_fan_out": (False, None),
               "lora_bias": (False, None), "modules_to_save": (None, []), "layers_to_transform": (None,),
               "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "target_parameters": (None, [])}


class LoRALinear(nn.Module):
    """A frozen nn.Linear (`base_layer`; a quantized one packs its weight, so its shape comes from in_features
    and out_features) plus a trainable low-rank update, PEFT's LoRA numerics."""

    def __init__(self, base_layer, r, alpha, dropout=0.0, rslora=False):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.r, self.alpha, self.dropout, self.rslora = r, alpha, dropout, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, device=base_layer.weight.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r, device=base_layer.weight.device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT (and nn.Linear)
        self.enabled = True  # False: base only (see adapters_off)

    def forward(self, x):  # x (..., in) -> (..., out) in the base's output dtype
        out = self.base_layer(x)
        if not self.enabled:
            return out
        h = F.dropout(x.to(self.lora_A.dtype), self.dropout, self.training)  # (..., in) fp32
        h = F.linear(F.linear(h, self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return (out + h * self.scaling).to(out.dtype)  # one rounding to a bf16 base, as PEFT

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}"


def lora_layers(model):
    """{module name: LoRALinear} of the model, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_lora(model):
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_parameters(model):
    """[(name, parameter)] of the adapters (the trainable ones after inject)."""
    return [(n, p) for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))]


def inject(model, targets=DEFAULT_TARGETS, r=64, alpha=64, dropout=0.05, rslora=False):
    """Wrap every nn.Linear (bitsandbytes' quantized linears are subclasses) whose last name component is in
    `targets` ("all-linear": every one but the output embedding) in a LoRALinear, in place; freeze all other
    parameters. Returns the wrapped names."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if is_lora(model):
        raise ValueError("the model already has LoRA adapters")
    all_linear = targets == "all-linear"
    if not all_linear and (isinstance(targets, str) or not targets or not all(isinstance(t, str) for t in targets)):
        raise ValueError(f"LoRA targets must be 'all-linear' or a list of module names, got {targets!r}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
    available = sorted({name.rpartition(".")[2] for name in linears})
    if not all_linear:
        head_names = [name.rpartition(".")[2] for name, m in model.named_modules() if m is head and name]
        unknown = sorted(set(targets) - set(available))
        if set(targets) & set(head_names):
            raise ValueError(f"the output embedding ({head_names[0]}) cannot carry LoRA: it stays as is "
                             "(tied to the input embedding, read directly by the log-prob path)")
        if unknown:
            raise ValueError(f"LoRA targets {unknown} match no nn.Linear of the model; "
                             f"did you mean one of {available} (or 'all-linear')?")
        linears = {name: m for name, m in linears.items() if name.rpartition(".")[2] in targets}
    if not linears:
        raise ValueError("the model has no nn.Linear to wrap with LoRA")
    model.requires_grad_(False)
    for name, m in linears.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, LoRALinear(m, r, alpha, dropout, rslora).train(m.training))
    return list(linears)


def _layers_or_raise(model, what):
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no LoRA adapters (call inject or load_adapter first)")
    return layers


@contextlib.contextmanager
def adapters_off(model):
    """Within the block the model is its base (adapters skipped); the switches are restored on exit."""
    layers = list(_layers_or_raise(model, "adapters_off").values())
    enabled = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(layers, enabled):
            m.enabled = e


def save_adapter(model, folder, base_model_name_or_path=None, state_dict=None):
    """Write adapter_model.safetensors then adapter_config.json to `folder`, as PEFT's save_pretrained.
    `state_dict` (the model's, e.g. gathered from FSDP shards) is read instead of the model's own tensors."""
    layers = _layers_or_raise(model, "save_adapter")
    hyper = {(m.r, m.alpha, m.dropout, m.rslora) for m in layers.values()}
    if len(hyper) != 1:
        raise ValueError(f"LoRA layers with different (r, alpha, dropout, rslora): {sorted(hyper)}")
    r, alpha, dropout, rslora = hyper.pop()
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    source = dict(lora_parameters(model)) if state_dict is None else state_dict
    tensors = {f"{PREFIX}{name}.{ab}.weight": source[f"{name}.{ab}"].detach().to("cpu").contiguous()
               for name in layers for ab in ("lora_A", "lora_B")}  # A (r, in), B (out, r)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "revision": None, "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": rslora,
              "target_modules": sorted({name.rpartition(".")[2] for name in layers}), "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
              "use_dora": False, "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
              "rank_pattern": {}, "alpha_pattern": {}}
    os.makedirs(folder, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(os.path.join(folder, WEIGHTS_NAME), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(os.path.join(folder, CONFIG_NAME), lambda p: pathlib.Path(p).write_text(text))


def read_adapter_config(folder):
    """The adapter_config.json of `folder`, checked to be a LoRA this file can load."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} holds no {CONFIG_NAME}: give a checkpoint of a use_lora run or a PEFT adapter")
    config = json.loads(pathlib.Path(path).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    bad = {k: config[k] for k, ok in UNSUPPORTED.items() if k in config and config[k] not in ok}
    if bad:
        raise ValueError(f"{path}: unsupported LoRA options {bad}")
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        raise ValueError(f"{path}: target_modules {targets!r} is a regex; "
                         "only a list of names or 'all-linear' is supported")
    return config


def load_adapter(model, folder):
    """Load an adapter saved by save_adapter or by PEFT into `model`, injecting it from the config if the
    model has no adapters yet, else checking r/alpha/rslora agree. Strict about keys and shapes. Returns the config."""
    config = read_adapter_config(folder)
    r, alpha, rslora = config["r"], config["lora_alpha"], config.get("use_rslora", False)
    if not is_lora(model):
        targets = config["target_modules"]
        inject(model, targets if targets == "all-linear" else tuple(targets), r, alpha,
               config.get("lora_dropout", 0.0), rslora)
    layers = lora_layers(model)
    for name, m in layers.items():
        if (m.r, m.alpha, m.rslora) != (r, alpha, rslora):
            raise ValueError(f"{folder} has r={r}, alpha={alpha}, rslora={rslora} but {name} has "
                             f"r={m.r}, alpha={m.alpha}, rslora={m.rslora}")
    tensors = load_file(os.path.join(folder, WEIGHTS_NAME))
    params = {f"{PREFIX}{name}.weight": p for name, p in lora_parameters(model)}  # as save_adapter names them
    missing, unexpected = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"{folder} does not match the model's adapters: {len(missing)} missing keys {missing[:3]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:3]}")
    for key, p in params.items():
        if tensors[key].shape != p.shape:
            raise ValueError(f"{key}: shape {tuple(tensors[key].shape)} in {folder}, {tuple(p.shape)} in the model")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(tensors[key])
    return config
