"""The command-line tools around a run: plots, a merged LoRA export, the knob table.

    python tools.py plot OUTPUT_DIR [--out DIR]                    # a run's metrics.jsonl as PNGs
    python tools.py mirror A.safetensors [B ...] [--out mirror.png] [--coef C] [--beta B]   # saved mirror maps
    python tools.py merge ADAPTER_FOLDER OUT_FOLDER [BASE_MODEL]   # a plain model with the LoRA adapter folded in
    python tools.py knobs                                          # every Config knob as a markdown table
"""
import argparse
import dataclasses
import os
import sys

import torch
import torch.nn as nn

import common
import config
import logs
import lora
from common import log


def _merged_linear(m):
    """A plain nn.Linear equal to the LoRALinear m; its base weight is not touched."""
    base = m.base_layer
    linear = nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
    with torch.no_grad():
        delta = (m.lora_B @ m.lora_A) * m.scaling  # (out, in) fp32
        linear.weight = nn.Parameter(base.weight + delta.to(base.weight.dtype), requires_grad=False)
    linear.bias = base.bias
    return linear


def export_merged(model, folder, tokenizer=None):
    """save_pretrained a plain model with every adapter folded into its linear (the live model is unchanged)."""
    layers = lora.lora_layers(model)
    if not layers:
        raise ValueError("export_merged: the model has no LoRA adapters (call inject or load_adapter first)")
    try:
        for name, m in layers.items():
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, _merged_linear(m))
        model.save_pretrained(folder)
    finally:
        for name, m in layers.items():
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, m)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def merge(adapter, out, base=None):
    """A plain transformers model with the adapter folded in, saved to `out` (base: the adapter's
    base_model_name_or_path unless given)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = base or lora.read_adapter_config(adapter).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter} names no base model: give it as the third argument")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora.load_adapter(model, adapter)
    tokenizer_from = adapter if os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) else base
    export_merged(model, out, AutoTokenizer.from_pretrained(tokenizer_from))
    return f"merged {adapter} into {base}: {out}"


def knobs():
    """Every Config knob with its default and doc, grouped, as a markdown table (docs/configuration.md)."""
    lines, group = ["| knob | default | what it does |", "| --- | --- | --- |"], None
    for f in dataclasses.fields(config.Config):
        if f.metadata["group"] != group:
            group = f.metadata["group"]
            lines.append(f"| **{group}** | | |")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"| `{f.name}` | `{default!r}` | {f.metadata['doc']} |")
    return "\n".join(lines)


def main(argv):
    parser = argparse.ArgumentParser(prog="tools.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("plot", help="a run's metrics.jsonl as PNGs")
    cmd.add_argument("output_dir", help="the run's output_dir (holds metrics.jsonl)")
    cmd.add_argument("--out", default=None, help="where to write the PNGs (default OUTPUT_DIR/plots)")
    cmd = sub.add_parser("mirror", help="phi_inv and D(p || p_ref) of saved mirror maps against their initial maps")
    cmd.add_argument("files", nargs="+", help="mirror files (safetensors from es.py or NeuralMirror.save)")
    cmd.add_argument("--out", default="mirror.png", help="the PNG to write (default mirror.png)")
    cmd.add_argument("--coef", type=float, default=1.0, help="weight of D (e.g. mirror_coefficient; default 1)")
    cmd.add_argument("--beta", type=float, default=1.0, help="weight of the KL penalty (e.g. beta; default 1)")
    cmd = sub.add_parser("merge", help="a plain transformers model with a LoRA adapter folded in")
    cmd.add_argument("adapter", help="a checkpoint or adapter folder (PEFT's layout)")
    cmd.add_argument("out", help="the folder to write")
    cmd.add_argument("base", nargs="?", default=None, help="the base model (default: the adapter's)")
    sub.add_parser("knobs", help="every Config knob as a markdown table")
    args = parser.parse_args(argv)
    common.configure_logging("INFO")
    try:
        if args.command == "plot":
            log.info("\n".join(logs.plot(args.output_dir, args.out)))
        elif args.command == "mirror":
            log.info(logs.plot_mirror(args.files, args.out, args.coef, args.beta))
        elif args.command == "merge":
            log.info(merge(args.adapter, args.out, args.base))
        else:
            log.info(knobs())
    except ValueError as e:
        log.error(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
