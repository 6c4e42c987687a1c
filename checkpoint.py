"""Checkpoints: written atomically with sha256 checksums, found, verified, and read back into a run.

A checkpoint-STEP folder holds the weights (or, with LoRA, the adapter in PEFT's layout), the tokenizer,
the mirror, the optimizer state and the RNG (safetensors), trainer_state.json (step, scheduler, scaler,
config) and checksums.json, written last: its completion marker.
"""
import hashlib
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

import config as config_lib
import lora
from mirror import NeuralMirror


def save_checkpoint(run, folder=None):
    """Write output_dir/checkpoint-STEP (or `folder`) atomically (a temp folder, then a rename); keep the
    newest few checkpoint-STEP folders."""
    cfg, step = run["cfg"], run["step"]
    final = folder or os.path.join(cfg.output_dir, f"checkpoint-{step}")
    tmp = os.path.join(os.path.dirname(os.path.abspath(final)), f".tmp-{os.path.basename(final)}")
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.use_lora:  # the adapters alone, in PEFT's layout (the base is cfg.model_name)
        base = os.path.abspath(cfg.model_name) if os.path.isdir(cfg.model_name) else cfg.model_name
        lora.save_adapter(run["model"], tmp, base_model_name_or_path=base)
    else:
        run["model"].save_pretrained(tmp)
    run["tokenizer"].save_pretrained(tmp)
    run["mirror"].save(os.path.join(tmp, "mirror.safetensors"))
    opt = run["optimizer"].state_dict()
    save_file({f"{i}.{k}": v.contiguous() for i, s in opt["state"].items() for k, v in s.items()
               if torch.is_tensor(v)} or {"empty": torch.zeros(0)}, os.path.join(tmp, "optimizer.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, os.path.join(tmp, "rng.safetensors"))
    state = dict(step=step, skipped_steps=run["skipped_steps"], optimizer_groups=opt["param_groups"],
                 optimizer_scalars={i: {k: v for k, v in s.items() if not torch.is_tensor(v)}
                                    for i, s in opt["state"].items()},
                 scheduler=run["scheduler"].state_dict(),
                 scaler=run["scaler"].state_dict() if run["scaler"] else None, config=config_lib.config_dict(cfg))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump(state, f, indent=1)
    with open(os.path.join(tmp, CHECKSUMS), "w") as f:  # written last: the folder's completion marker
        json.dump(file_hashes(tmp), f, indent=1)
    _fsync_tree(tmp)  # on disk before the rename makes it the checkpoint
    old = f"{tmp}.old"
    if os.path.exists(final):  # re-saving a step: the earlier copy goes only once the new one is in place
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    for stale in checkpoints(cfg.output_dir)[:-cfg.save_total_limit]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


CHECKSUMS = "checksums.json"


def file_hashes(folder):
    """{file name: sha256} of the files of a checkpoint folder (the checksum file itself aside)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name != CHECKSUMS and os.path.isfile(os.path.join(folder, name)):
            digest = hashlib.sha256()
            with open(os.path.join(folder, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            out[name] = digest.hexdigest()
    return out


def _fsync_tree(folder):
    """Flush a folder's files and the folder itself to disk (folders only where the OS allows it)."""
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # Windows and some network file systems cannot sync a folder
        pass


def checkpoint_problem(path):
    """Why the checkpoint folder cannot be trusted (a missing or changed file), or None when it checks out.
    A folder saved before checksums existed is trusted if its trainer_state.json is there."""
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        return "no trainer_state.json (an unfinished save?)"
    if not os.path.isfile(os.path.join(path, CHECKSUMS)):
        return None
    with open(os.path.join(path, CHECKSUMS)) as f:
        want = json.load(f)
    have = file_hashes(path)
    bad = sorted(n for n in want if have.get(n) != want[n])
    return f"{', '.join(bad[:3])} {'is' if len(bad) == 1 else 'are'} missing or changed" if bad else None


def checkpoints(output_dir):
    """Complete checkpoint folders, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d[11:].isdigit()
             and os.path.isfile(os.path.join(output_dir, d, "trainer_state.json"))]
    return [os.path.join(output_dir, d) for d in sorted(found, key=lambda d: int(d[11:]))]


def resume_path(cfg, say=print):
    """The checkpoint folder cfg.resume names ('latest': the newest one that checks out, or None); a
    corrupted checkpoint is skipped ('latest') or refused (a named folder) with the reason."""
    if cfg.resume == "latest":
        found = checkpoints(cfg.output_dir)
        for path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            say(f"skipping corrupted checkpoint {path}: {problem}")
        if found:
            raise ValueError(f"every checkpoint in {cfg.output_dir} is corrupted: restore one, or start over "
                             "with a new output_dir")
        return None
    if not os.path.isfile(os.path.join(cfg.resume, "trainer_state.json")):
        raise ValueError(f"resume={cfg.resume!r} is not a checkpoint folder (no trainer_state.json): "
                         "give a checkpoint-N folder or resume='latest'")
    problem = checkpoint_problem(cfg.resume)
    if problem:
        raise ValueError(f"resume={cfg.resume!r} is corrupted ({problem}): give an earlier checkpoint or "
                         "resume='latest', which skips corrupted ones")
    return cfg.resume


def load_checkpoint(run, path, say=print):
    """Restore weights, optimizer, scheduler, RNG, mirror and step from a checkpoint folder."""
    from safetensors.torch import load_model as load_weights
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    weights = [n for n in os.listdir(path) if n.startswith("model") and n.endswith(".safetensors")]
    if run["cfg"].use_lora:
        if not os.path.isfile(os.path.join(path, lora.WEIGHTS_NAME)):
            raise ValueError(f"{path} holds no LoRA adapter ({lora.WEIGHTS_NAME}): it was saved without use_lora")
        lora.load_adapter(run["model"], path)
    elif not weights:
        raise ValueError(f"{path} holds no model weights (a LoRA checkpoint?): resume it with use_lora=True")
    elif weights == ["model.safetensors"]:
        load_weights(run["model"], os.path.join(path, "model.safetensors"), device=str(run["device"]))
    else:
        from transformers import AutoModelForCausalLM
        run["model"].load_state_dict(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict())
    run["mirror"].load_state_dict(NeuralMirror.load(os.path.join(path, "mirror.safetensors")).state_dict())
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))  # load_state_dict moves them
    opt_state = {}
    for i, scalars in state["optimizer_scalars"].items():
        opt_state[int(i)] = {**scalars, **{k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".")[0] == i}}
    run["optimizer"].load_state_dict({"state": opt_state, "param_groups": state["optimizer_groups"]})
    run["scheduler"].load_state_dict(state["scheduler"])
    if run["scaler"] and state["scaler"]:
        run["scaler"].load_state_dict(state["scaler"])
    rng = load_file(os.path.join(path, "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    run["step"], run["skipped_steps"] = state["step"], state["skipped_steps"]
    now = config_lib.config_dict(run["cfg"])
    changed = [f"{k}: {v!r} -> {now.get(k)!r}" for k, v in state["config"].items()
               if k not in ("resume", "output_dir") and now.get(k) != v]
    if changed:
        say("resuming with changed settings (the run will not match an uninterrupted one): " + "; ".join(changed))
