"""What train.py, es.py and trl_backend.py all need: processes, stop signals, the one log path, files, did-you-mean.

The one leaf every file may import: it imports nothing of ours (and torch only where a function needs it).
"""
import atexit
import contextlib
import datetime
import difflib
import functools
import importlib
import json
import logging
import math
import os
import signal
import sys
import threading
import warnings

from tqdm import tqdm

log = logging.getLogger("nmgrpo")  # the one console path: log.info, log.warning
# bitsandbytes (imported by peft, which transformers imports when it is installed) tries on CPUs with avx512-bf16 to
# fetch an optional kernel from the Hub (through the kernels package) and warns when it cannot, offline say; it falls
# back to its own, so these lines are noise at every start
for _name in ("bitsandbytes.backends.cpu.ops", "kernels"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def did_you_mean(name, options):
    """' (did you mean 'X'?)' for the option closest to name, or ''."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def require(package, minimum, why):
    """An ImportError naming the upgrade when `package` is older than `minimum` (an older one would run, wrongly)."""
    from importlib.metadata import version
    from packaging.version import Version
    if Version(have := version(package)) < Version(minimum):
        raise ImportError(f"{package} {have} is installed; nmgrpo needs {package}>={minimum} ({why}): "
                          f"pip install -U '{package}>={minimum}'")


TRANSFORMERS = "5.24"  # requirements.txt's floor: models take their cache as cache= and have activation checkpointing
require("transformers", TRANSFORMERS, "an older one ignores cache= and samples without the prompt")


def callable_from(value, what):
    """value when it is callable, else the function a 'module:function' string names; a ValueError that names
    `what` (the setting) otherwise."""
    if isinstance(value, str) and ":" in value:
        module, _, name = value.partition(":")
        try:
            value = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(f"{what}={value!r} cannot be imported ({e}): give a callable or a 'module:function' "
                             "string on the path") from None
    if not callable(value):
        raise ValueError(f"{what}={value!r} is not callable: give a callable or a 'module:function' string")
    return value


_COMPILED, _FAILED, _FULL = {}, set(), set()  # fn -> its compiled twin; fns whose compile failed; fns at the limit
RECOMPILE_LIMIT = 64  # graphs one compiled function may hold (the sampler's step: batch x cache sizes x greedy)


def compiled_call(fn, enabled, *args, **options):
    """fn(*args), through its torch.compile'd twin (built once with `options`) when enabled; after a failed compile
    fn runs eagerly for good, with one warning; a shape past the graph limit runs eagerly, the graphs it holds go on
    serving theirs. The one place where anything is compiled."""
    if enabled and fn not in _FAILED:
        import torch
        try:
            if fn not in _COMPILED:  # dynamo's default of 8 graphs per function is too few for the sampler
                limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
                setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), RECOMPILE_LIMIT))
                _COMPILED[fn] = torch.compile(fn, **options)
            if fn in _FULL and hasattr(torch.compiler, "set_stance"):  # a new shape runs eagerly, no retrace
                with torch.compiler.set_stance("eager_on_recompile"):
                    return _COMPILED[fn](*args)
            return _COMPILED[fn](*args)
        except Exception as e:  # no compiler, unsupported backend, ...; at the graph limit (fullgraph), that shape
            if type(e).__name__ == "FailOnRecompileLimitHit":
                _FULL.add(fn)
                warn_once(f"torch.compile of {fn.__name__} holds as many graphs as it may: new shapes run eagerly")
            else:
                _FAILED.add(fn)
                warnings.warn(f"torch.compile of {fn.__name__} failed ({type(e).__name__}: {e}); running eagerly")
    return fn(*args)


# ---------------------------------------------------------------------------- the console

class _Console(logging.Handler):
    """Lines above the progress bar: info to stdout, warnings and errors to stderr."""

    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stderr if record.levelno >= logging.WARNING else sys.stdout)


def configure_logging(level="INFO", rank=0):
    """Show `level` and above on rank 0, nothing on the other ranks; transformers' own progress bars (loading and
    writing weights, at every checkpoint) off, so that they never cut through the run's bar."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    if not any(isinstance(h, _Console) for h in log.handlers):
        log.addHandler(_Console())
        log.propagate = False
    log.setLevel(level if rank == 0 else logging.CRITICAL + 1)


@contextlib.contextmanager
def kept_log_level():
    """Within the block a run may set its own level (es.py's quiet inner runs); restored after."""
    level = log.level
    try:
        yield
    finally:
        log.setLevel(level)


@functools.lru_cache(maxsize=None)
def warn_once(message):
    """log.warning(message), once per process (es.py's inner runs would repeat a run's start-up warnings)."""
    log.warning(message)


def quiet():
    """Whether progress lines are off (log_level WARNING or ERROR, or not rank 0)."""
    return not log.isEnabledFor(logging.INFO)


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode within the block (no dropout), its training mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------- processes

def local_gpu():
    """This process's GPU under torchrun: LOCAL_RANK; ValueError when its node shows fewer GPUs than processes."""
    import torch
    rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if rank >= count:
        raise ValueError(f"LOCAL_RANK={rank} but this node shows {count} GPU(s): start one process per GPU "
                         f"(torchrun --nproc_per_node {count}), check CUDA_VISIBLE_DEVICES, or use device='cpu'")
    return rank


def init_distributed(device="auto", timeout_hours=2):
    """(rank, world): join torchrun's process group when launched by it (WORLD_SIZE > 1), gloo for the CPU
    tensors of metrics and stop flags, nccl beside it on GPUs; (0, 1) for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist
    gpu = device != "cpu" and torch.cuda.is_available()
    if gpu:  # one GPU per process, whatever index the config names
        torch.cuda.set_device(local_gpu())
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if gpu else "gloo",
                                timeout=datetime.timedelta(hours=timeout_hours))
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())  # NCCL wants it explicit
    return dist.get_rank(), dist.get_world_size()


def all_reduce(x, world, op="sum"):
    """x (a tensor) summed (or maxed) over the `world` processes, in place; itself with one process."""
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x


def sum_grads(params, world, bucket=1 << 24):
    """Sum every gradient over the processes, in flat buckets of about `bucket` elements."""
    import torch
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    i = 0
    while i < len(params):
        j, size = i, 0
        while j < len(params) and (size == 0 or size + params[j].numel() <= bucket):
            size, j = size + params[j].numel(), j + 1
        grads = [p.grad for p in params[i:j]]
        flat = all_reduce(torch.cat([g.reshape(-1) for g in grads]), world)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
        i = j


def reduce_metrics(m, world):
    """A step's metrics over every process: sums for the loss (each rank holds its share of the global loss),
    the prompts cut and the throughput; maxima for maxima and peak memory; the mean of the ranks' values for
    the rest (ranks hold equal batches); step, lr and counters are the same everywhere."""
    if world == 1:
        return m
    import torch
    keys = [k for k, v in m.items() if isinstance(v, (int, float)) and k not in ("step", "lr", "skipped_steps")]
    peak = [k for k in keys if k.endswith("_max") or k.startswith("memory/")]
    summed = [k for k in keys if k in ("loss", "prompts_cut", "tokens_per_s")]
    rest = [k for k in keys if k not in peak]
    sums = all_reduce(torch.tensor([float(m[k]) for k in rest], dtype=torch.float64), world).tolist()
    maxes = all_reduce(torch.tensor([float(m[k]) for k in peak], dtype=torch.float64), world, op="max").tolist()
    return {**m, **{k: v if k in summed else v / world for k, v in zip(rest, sums)}, **dict(zip(peak, maxes))}


@contextlib.contextmanager
def stop_signals():
    """Within the block, SIGTERM and SIGINT only append their name to the yielded list, so that a loop can
    finish its step, save and stop; a second SIGINT interrupts at once. Outside the main thread: no change."""
    caught = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum, frame):
        if caught and signum == signal.SIGINT:
            raise KeyboardInterrupt
        caught.append(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield caught
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stopping(caught, world):
    """Whether any process caught a stop signal: every process decides together, or a collective would wait."""
    if world == 1:
        return bool(caught)
    import torch
    return bool(all_reduce(torch.tensor(len(caught)), world, op="max").item())


# ---------------------------------------------------------------------------- files

def append_jsonl(path, rows):
    """Append rows (dicts) to a jsonl file; a non-finite number is written as null."""
    with open(path, "a") as f:
        for row in rows:
            row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
            f.write(json.dumps(row) + "\n")


def read_jsonl(path):
    """The dict rows of a jsonl file; a line cut short by a kill is skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def truncate_jsonl(path, key, last):
    """Keep the rows of a jsonl file whose `key` is at most `last` (a missing file stays missing)."""
    if os.path.isfile(path):
        kept = [r for r in read_jsonl(path) if isinstance(r.get(key, 0), (int, float)) and r.get(key, 0) <= last]
        atomic_write(path, lambda tmp: append_jsonl(tmp, kept))


def atomic_write(path, write):
    """write(tmp), flush it to disk, then rename it onto path: a reader sees the old file or the new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
