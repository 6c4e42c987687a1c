"""Checkpoints: written atomically with sha256 checksums, found, verified, and read back into a run.

A checkpoint-STEP folder holds the weights (or, with LoRA, the adapter in PEFT's layout), the tokenizer,
the mirror, the optimizer state and the RNG (safetensors), trainer_state.json (step, scheduler, scaler,
config) and checksums.json, written last: its completion marker. Under FSDP every process also writes its
shard of the weights and optimizer state into shards/ (torch.distributed.checkpoint), which resume reads,
and rank 0 writes the whole weights gathered to its CPU, so that every checkpoint loads with from_pretrained.
"""
import hashlib
import json
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

import config as config_lib
import lora
from common import log
from mirror import NeuralMirror


def save_checkpoint(run, folder=None):
    """Write output_dir/checkpoint-STEP (or `folder`) atomically (a temp folder, then a rename); keep the
    newest few checkpoint-STEP folders. Under FSDP every process calls it."""
    cfg, step = run.cfg, run.step
    final = folder or os.path.join(cfg.output_dir, f"checkpoint-{step}")
    tmp = os.path.join(os.path.dirname(os.path.abspath(final)), f".tmp-{os.path.basename(final)}")
    root = run.roots.get(id(run.model))
    rank = dist.get_rank() if root is not None else 0
    if rank == 0:
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    full = None
    if root is not None:  # collectives: every process writes its shard; rank 0 gathers the whole weights
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
        dist.barrier()
        model_sd, opt_sd = get_state_dict(root, run.optimizer)
        dcp.save({"model": model_sd, "optimizer": opt_sd}, checkpoint_id=os.path.join(tmp, SHARDS))
        full = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        full = {k.removeprefix("model."): v for k, v in full.items()}  # the Root wrapper's prefix
        model = run.model
        if getattr(model.config, "tie_word_embeddings", False):  # saved once, as save_pretrained does
            full.pop(next(n for n, m in model.named_modules() if m is model.get_output_embeddings()) + ".weight", None)
        if rank != 0:
            dist.barrier()  # until rank 0 has put the checkpoint in place
            return final
    if cfg.use_lora:  # the adapters alone, in PEFT's layout (the base is cfg.model_name)
        base = os.path.abspath(cfg.model_name) if os.path.isdir(cfg.model_name) else cfg.model_name
        lora.save_adapter(run.model, tmp, base_model_name_or_path=base, state_dict=full)
    else:
        run.model.save_pretrained(tmp, state_dict=full)
    run.tokenizer.save_pretrained(tmp)
    run.mirror.save(os.path.join(tmp, "mirror.safetensors"))
    opt = run.optimizer.state_dict() if root is None else {"state": {}, "param_groups": []}  # FSDP: in shards/
    if root is None:
        save_file({f"{i}.{k}": v.contiguous() for i, s in opt["state"].items() for k, v in s.items()
                   if torch.is_tensor(v)} or {"empty": torch.zeros(0)}, os.path.join(tmp, "optimizer.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, os.path.join(tmp, "rng.safetensors"))
    state = dict(step=step, skipped_steps=run.skipped_steps, optimizer_groups=opt["param_groups"],
                 optimizer_scalars={i: {k: v for k, v in s.items() if not torch.is_tensor(v)}
                                    for i, s in opt["state"].items()},
                 scheduler=run.scheduler.state_dict(),
                 scaler=run.scaler.state_dict() if run.scaler else None, config=config_lib.config_dict(cfg))
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
    if root is not None:
        dist.barrier()
    return final


CHECKSUMS = "checksums.json"
SHARDS = "shards"  # FSDP: torch.distributed.checkpoint's folder of per-process shards


def _files(folder):
    """Every file under folder, as sorted paths relative to it."""
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names)


def file_hashes(folder):
    """{file path: sha256} of the files of a checkpoint folder (the checksum file itself aside)."""
    out = {}
    for name in _files(folder):
        if name != CHECKSUMS:
            digest = hashlib.sha256()
            with open(os.path.join(folder, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            out[name] = digest.hexdigest()
    return out


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder):
    """Flush a folder's files and folders to disk (folders only where the OS allows it)."""
    for name in _files(folder):
        _fsync(os.path.join(folder, name))
    for d, _, _ in os.walk(folder, topdown=False):
        try:
            _fsync(d)
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


def resume_path(cfg):
    """The checkpoint folder cfg.resume names ('latest': the newest one that checks out, or None); a
    corrupted checkpoint is skipped ('latest') or refused (a named folder) with the reason."""
    if cfg.resume == "latest":
        found = checkpoints(cfg.output_dir)
        for path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            log.warning(f"skipping corrupted checkpoint {path}: {problem}")
        if found:
            raise ValueError(f"every checkpoint in {cfg.output_dir} is corrupted: restore one, or start over "
                             "with a new output_dir")
        log.info(f"resume='latest': no checkpoint in {cfg.output_dir} yet, starting at step 0")
        return None
    if not os.path.isfile(os.path.join(cfg.resume, "trainer_state.json")):
        raise ValueError(f"resume={cfg.resume!r} is not a checkpoint folder (no trainer_state.json): "
                         "give a checkpoint-N folder or resume='latest'")
    problem = checkpoint_problem(cfg.resume)
    if problem:
        raise ValueError(f"resume={cfg.resume!r} is corrupted ({problem}): give an earlier checkpoint or "
                         "resume='latest', which skips corrupted ones")
    return cfg.resume


def load_checkpoint(run, path):
    """Restore weights, optimizer, scheduler, RNG, mirror and step from a checkpoint folder."""
    from safetensors.torch import load_model as load_weights
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    weights = [n for n in os.listdir(path) if n.startswith("model") and n.endswith(".safetensors")]
    root = run.roots.get(id(run.model))
    sharded = os.path.isdir(os.path.join(path, SHARDS))
    if (root is not None) != sharded:
        raise ValueError(f"{path} holds FSDP shards: resume it under torchrun with distributed='fsdp'" if sharded else
                         f"{path} holds no FSDP shards (saved without FSDP): resume it with distributed='ddp'")
    if root is not None:  # weights and optimizer state from every process's shard
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_sd, opt_sd = get_state_dict(root, run.optimizer)
        both = {"model": model_sd, "optimizer": opt_sd}
        dcp.load(both, checkpoint_id=os.path.join(path, SHARDS))
        set_state_dict(root, run.optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])
    elif run.cfg.use_lora:
        if not os.path.isfile(os.path.join(path, lora.WEIGHTS_NAME)):
            raise ValueError(f"{path} holds no LoRA adapter ({lora.WEIGHTS_NAME}): it was saved without use_lora")
        lora.load_adapter(run.model, path)
    elif not weights:
        raise ValueError(f"{path} holds no model weights (a LoRA checkpoint?): resume it with use_lora=True")
    elif weights == ["model.safetensors"]:
        load_weights(run.model, os.path.join(path, "model.safetensors"), device=str(run.device))
    else:
        from transformers import AutoModelForCausalLM
        run.model.load_state_dict(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict())
    run.mirror.load_state_dict(NeuralMirror.load(os.path.join(path, "mirror.safetensors")).state_dict())
    if root is None:
        tensors = load_file(os.path.join(path, "optimizer.safetensors"))  # load_state_dict moves them
        opt_state = {}
        for i, scalars in state["optimizer_scalars"].items():
            opt_state[int(i)] = {**scalars, **{k.split(".", 1)[1]: v for k, v in tensors.items()
                                               if k.split(".")[0] == i}}
        run.optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer_groups"]})
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler and state["scaler"]:
        run.scaler.load_state_dict(state["scaler"])
    rng = load_file(os.path.join(path, "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    run.step, run.skipped_steps = state["step"], state["skipped_steps"]
    now = config_lib.config_dict(run.cfg)
    changed = [f"{k}: {v!r} -> {now.get(k)!r}" for k, v in state["config"].items()
               if k not in ("resume", "output_dir") and now.get(k) != v]
    log.info(f"resumed from {path} at step {run.step}")
    if changed:
        log.warning("resuming with changed settings (the run will not match an uninterrupted one): " +
                    "; ".join(changed))
