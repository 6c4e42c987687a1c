"""FSDP: torch's fully_shard, for a model whose weights, gradients and optimizer state do not fit one device.

    torchrun --nproc_per_node 8 train.py --config configs/x.py --distributed=fsdp

Every decoder layer is a shard group of its own; the root group is a thin wrapper (Root) around the model
and holds the rest: the embeddings, the final norm and the lm_head (tied or not). The log-prob kernel reads
the lm_head weight straight from the model, so train.py runs it as the root's forward (Root(fn, *args)),
where FSDP has gathered that weight and from where its backward reduce-scatters every gradient. The sampler
makes many small forwards, so it runs through the root too and keeps each gathered layer until it ends
(gathered), then reshards.
Gradients are summed over the processes, as DDP's are here (each loss is already over the global batch),
and reduce-scattered after every micro-batch, so that no process ever holds a whole gradient.
"""
import contextlib

import torch.nn as nn


class Root(nn.Module):
    """The sharded model's root: root(fn, *args, **kwargs) = fn(model, ...) with the root's parameters gathered."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def decoder_layers(model):
    """The model's repeated blocks: the classes transformers names in _no_split_modules (Qwen3DecoderLayer, ...)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"distributed='fsdp': {type(model).__name__} names no decoder layer class "
                         "(_no_split_modules) to shard by; use distributed='ddp'")
    return layers


def shard(model, frozen=False, dtype=None, device=None):
    """fully_shard each decoder layer of `model`, then the Root around it: the root (an FSDPModule). Each group
    moves to the process's device as it is sharded, so a model loaded on the CPU never lands whole on a GPU.
    `frozen`: a model that only runs forwards (the reference), whose root must reshard after each one.
    `dtype` (autocast's): bf16 gathers the weights in bf16 (fp16 would put the residual stream in fp16), the
    gradients still reduced in float32. `device`: the run's (None: torch's default, the accelerator if any)."""
    try:
        import torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
        FSDPModule.set_force_sum_reduction_for_comms
    except (ImportError, AttributeError):
        raise ValueError("distributed='fsdp' needs a newer torch (pip install -U torch; tested with 2.13): "
                         "or use distributed='ddp'") from None
    policy = MixedPrecisionPolicy(param_dtype=dtype if dtype == torch.bfloat16 else None, reduce_dtype=torch.float32)
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),)) if device is not None else None
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    root = fully_shard(Root(model), mesh=mesh, mp_policy=policy)
    if frozen:  # FSDP keeps a root gathered until its backward, which a frozen model never runs
        root.set_reshard_after_forward(True, recurse=False)
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # a sum over processes, not a mean,
            m.set_force_sum_reduction_for_comms(True)  # as a plain sum (gloo has no pre-multiplied sum)
    return root


def call(roots, model, fn, *args, **kwargs):
    """fn(model, *args, **kwargs); for a sharded model (roots: id(model) -> its root), as the root's forward,
    which gathers its weights."""
    root = roots.get(id(model))
    return root(fn, *args, **kwargs) if root is not None else fn(model, *args, **kwargs)


@contextlib.contextmanager
def gathered(roots, model):
    """In the block, each shard group of a sharded model stays whole once a forward through its root has gathered
    it (the sampler's many small forwards gather once), and every group is resharded after; else nothing."""
    root = roots.get(id(model))
    if root is None:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(m is not root, recurse=False)  # FSDP keeps the root gathered otherwise
