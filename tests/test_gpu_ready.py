"""Readiness for GPUs and torchrun, checked on CPU: what a careful read of the device, precision and
multi-process code found, each with the behaviour that must hold."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_processes_starting_together_build_the_cold_start_once(tmp_path):
    """torchrun's ranks all call coldstart.prepare on an empty cache: one builds, the others wait for it."""
    folder = str(tmp_path / "cache" / "coldstart")
    code = (f"import sys; sys.path[:0] = [{REPO!r}, {os.path.join(REPO, 'configs')!r}]\n"
            "import coldstart, tasks\n"
            f"print(coldstart.prepare({folder!r}, tasks.toy_task(64, seed=1), steps=2, layers=1, hidden=32,"
            " heads=2, kv_heads=1, head_dim=16))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    assert all(out.strip().endswith(folder) for out, _ in outs)
    assert os.path.isfile(os.path.join(folder, "config.json")) and not os.path.exists(folder + ".tmp")


def fake_gpus(monkeypatch, count, rank, world=2):
    """torchrun's environment for process `rank` of `world` on a node showing `count` GPUs; returns the devices
    torch.cuda.set_device was given."""
    import torch
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch, small):
    import pytest
    import torch.distributed as dist

    import common
    import config
    import load
    cfg = config.make(**{**small, "device": "cuda", "precision": "auto"})  # built before CUDA is faked
    fake_gpus(monkeypatch, count=1, rank=1)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("joined a group it cannot serve"))
    with pytest.raises(ValueError, match=r"LOCAL_RANK=1 but this node shows 1 GPU.*--nproc_per_node 1"):
        common.init_distributed("cuda")
    with pytest.raises(ValueError, match="--nproc_per_node 1"):
        load.device_and_dtype(cfg, 2)


def test_each_process_takes_its_own_gpu_on_both_backends(monkeypatch, small):
    """Rank 1 of 2 runs on cuda:1, made the default device, natively and with backend='trl' (which used to resolve
    the device as one process would: bare 'cuda', i.e. GPU 0, for every rank)."""
    import pytest
    import torch

    import config
    import load
    import trl_backend
    from transformers.trainer_callback import PrinterCallback  # noqa: F401 - imported before CUDA is faked
    cfg = config.make(**{**small, "device": "cuda", "precision": "auto"})
    chosen = fake_gpus(monkeypatch, count=2, rank=1)
    device, dtype = load.device_and_dtype(cfg, 2)
    assert device == torch.device("cuda", 1) and chosen == [device] and dtype == torch.bfloat16
    real, seen = load.device_and_dtype, []

    def stop_after(cfg, world=1):  # the device the TRL backend resolves; then stop before any model is built
        seen.append(real(cfg, world)[0])
        raise RuntimeError("stop here")
    monkeypatch.setattr(load, "device_and_dtype", stop_after)
    with pytest.raises(RuntimeError, match="stop here"):
        trl_backend.build_trainer(cfg)
    assert seen == [torch.device("cuda", 1)]


def test_fp16_fused_loss_keeps_small_gradients():
    """Under fp16 autocast the fused kernel forms the lm_head and hidden gradients in its forward. With the loss
    scale applied only in backward (as GradScaler.scale(loss) does) tiny per-token weights flush them to zero; with
    the scale inside the loss, as train.learn now applies it, they match float64."""
    import torch

    import logprobs
    g = torch.Generator().manual_seed(0)
    n, d, v, scale = 64, 32, 301, 2.0 ** 16
    hidden, weight = torch.randn(n, d, generator=g), 0.02 * torch.randn(v, d, generator=g)
    targets, w = torch.randint(0, v, (n,), generator=g), torch.full((n,), 1e-7)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    (torch.log_softmax(h64 @ w64.T, -1).gather(-1, targets[:, None]).squeeze(-1) * w).sum().backward()
    errors = {}
    for inside in (False, True):
        h, wt = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            loss, _, _ = logprobs.token_loss(h, wt, targets, lambda lp, s: (lp * w[s]).sum() * (scale if inside else 1))
        (loss if inside else loss * scale).backward()
        errors[inside] = [((x.grad.double() / scale - ref.grad).norm() / ref.grad.norm()).item()
                          for x, ref in ((h, h64), (wt, w64))]
    assert min(errors[False]) > 0.2  # the defect: the gradients flushed before the scale could protect them
    assert max(errors[True]) <= 1e-2, errors


def test_fp16_loss_scale_gives_the_fused_and_plain_losses_the_same_update(small, monkeypatch):
    """train.learn with a GradScaler and fp16 autocast (on CPU, faked as the run's precision) and per-token
    gradients near fp16's smallest numbers: the fused loss and the plain one agree, the reported loss is unscaled."""
    import torch

    import config
    import train
    grads, metrics = [], []
    for fused in (True, False):
        run = train.setup(config.make(**{**small, "fused_loss": fused, "loss_type": "dapo", "eval_size": 0,
                                         "scale_rewards": "none", "output_dir": f"{small['output_dir']}-{fused}",
                                         "rewards": [{"type": "length", "params": {"target_length": 3},
                                                      "weight": 1e-5}]}))  # advantages ~1e-5: tiny gradients
        run.amp_dtype, run.scaler = torch.float16, torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        monkeypatch.setattr(train, "optimizer_step", lambda run: grads.append(
            [p.grad.double() / run.scaler.get_scale() for p in run.model.parameters()]) or 0.0)
        metrics.append(train.train_step(run)[0])
    for a, b in zip(*grads):
        assert ((a - b).norm() / b.norm().clamp(min=1e-30)).item() <= 1e-2
    assert metrics[0]["loss"] == __import__("pytest").approx(metrics[1]["loss"], rel=1e-2, abs=1e-6)
    assert abs(metrics[0]["loss"]) < 1e-3  # not multiplied by the 65536 scale


def test_the_lean_decode_step_never_asks_sdpa_for_gqa_with_a_mask(tiny_dir, monkeypatch):
    """CUDA's fused attention kernels take no enable_gqa together with a mask: such a call falls back to the math
    kernel, which copies the keys and values to every query head, every layer, every token."""
    import types

    import torch
    from transformers import AutoModelForCausalLM

    import sampler
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # a GQA model
    calls = []

    def sdpa(*args, **kw):
        calls.append(kw)
        return torch.nn.functional.scaled_dot_product_attention(*args, **kw)
    monkeypatch.setattr(sampler, "F", types.SimpleNamespace(scaled_dot_product_attention=sdpa))
    ids = torch.randint(3, 100, (2, 5))
    sampler.sample(model, ids, torch.ones_like(ids), max_new_tokens=4, eos_token_id=0, pad_token_id=0,
                   num_samples=2, generator=torch.Generator().manual_seed(0))
    assert calls and not any(kw.get("enable_gqa") and kw.get("attn_mask") is not None for kw in calls)


def test_a_failing_rank_ends_every_rank_within_seconds(small, tmp_path):
    """Rank 1's reward raises at the first step: rank 0, waiting in the next collective, must not sit there until
    the process group's timeout. Under torchrun the survivor's collective fails as its peer's connection closes
    (gloo), and the launcher stops the other ranks (SIGTERM, then SIGKILL), so the run ends with rank 1's message."""
    import json
    import time
    (tmp_path / "badreward.py").write_text(
        "import os\n\n\ndef bad(text, reference=None, **kw):\n"
        "    if os.environ.get('RANK') == '1':\n        raise RuntimeError('reward exploded on rank 1')\n"
        "    return float(len(text) % 3)\n")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(REPO, "train.py"), "--model_name", small["model_name"], "--dataset_name",
            small["dataset_name"], "--column_mapping", json.dumps(small["column_mapping"]), "--rewards",
            json.dumps([{"type": "custom", "params": {"reward_function": "badreward:bad"}}]), "--eval_size", "0",
            "--batch_size", "2", "--num_generations", "4", "--max_completion_length", "8", "--max_steps", "3",
            "--device", "cpu", "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    start = time.monotonic()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "reward exploded on rank 1" in done.stdout + done.stderr
    assert time.monotonic() - start < 120



def test_deterministic_switch(small, monkeypatch):
    import torch

    import config
    import load
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        load.device_and_dtype(config.make(**{**small, "deterministic": True}))
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_the_entropy_is_float32_under_bf16_autocast():
    """The kernel's entropy is a batched dot product of float32 log-softmax rows; autocast used to run it in
    bf16 (a relative error of about 1e-2)."""
    import torch

    import logprobs
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(64, 32, generator=g), 0.3 * torch.randn(301, 32, generator=g)
    targets = torch.randint(0, 301, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, entropy = logprobs.token_logprobs(hidden, weight, targets)
    logits = (hidden.to(torch.bfloat16) @ weight.to(torch.bfloat16).T).double()  # the kernel's bf16 matmul
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(entropy.double(), -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=1e-5)


def test_bench_reports_a_failed_case_and_goes_on(monkeypatch, capsys):
    """A case that fails is a 'failed' row, not the end of the run; a compiled side that fell back to eager fails
    its case instead of being timed as compiled."""
    import pytest

    import bench
    import common
    assert bench.measure(case="no such case", repeats=1) is None
    assert bench.row("r", "s", "u", None, {"peak": 0}, lambda r: 1)["failed"]
    monkeypatch.setattr(common, "_FAILED", set())
    monkeypatch.setitem(bench.CASES, "broken", lambda spec: (lambda: common._FAILED.add(bench.run_case), 1))
    with pytest.raises(SystemExit, match="torch.compile failed for"):
        bench.run_case({"case": "broken", "repeats": 1})


def test_a_shape_past_the_graph_limit_runs_eagerly_and_the_compiled_ones_go_on(monkeypatch):
    """At dynamo's graph limit fullgraph raises; that shape runs eagerly, the graphs already made keep serving
    theirs (the whole function used to turn eager for good)."""
    import torch

    import common
    monkeypatch.setattr(common, "_FAILED", set())
    monkeypatch.setattr(common, "_FULL", set())
    monkeypatch.setattr(common, "RECOMPILE_LIMIT", 2)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"

    def double_sum(x):
        return (2 * x).sum(-1)
    with torch._dynamo.config.patch(**{limit: 2}):
        for n in (1, 2, 3, 4):  # two graphs, then two shapes past the limit
            assert torch.equal(common.compiled_call(double_sum, True, torch.ones(n, 4), fullgraph=True, dynamic=False),
                               torch.full((n,), 8.0))
        assert double_sum not in common._FAILED and double_sum in common._FULL
        with torch._dynamo.config.patch(error_on_recompile=True):  # served by its graph: no new compile
            assert torch.equal(common._COMPILED[double_sum](torch.ones(2, 4)), torch.full((2,), 8.0))
    assert hasattr(torch._dynamo.config, limit)


def test_the_toy_task_needs_no_datasets_package():
    """data.py imports `datasets` only where a file, folder, Hub name or split slice needs it (a GPU image may not
    have it); asking for one without it names the install."""
    code = ("import sys; sys.modules['datasets'] = None\n"
            "import data\n"
            "train, held_out = data.load_examples('toy', max_samples=300, eval_size=20, seed=0)\n"
            "print(len(train), len(held_out))\n"
            "try:\n"
            "    data.load_examples('toy', split='train[:50%]')\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "280 20" and "pip install datasets" in lines[1]


def test_fsdp_shards_gather_in_bf16_and_stay_fp32(tiny_dir):
    """fsdp.shard with bf16: a forward sees bf16 weights, the shards (what the optimizer steps) stay fp32, and the
    reference's root is resharded after its forward."""
    code = f"""
import torch, torch.distributed as dist
from transformers import AutoModelForCausalLM
import fsdp
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29431", rank=0, world_size=1)
for frozen in (False, True):
    model = AutoModelForCausalLM.from_pretrained({tiny_dir!r})
    root = fsdp.shard(model, frozen=frozen, dtype=torch.bfloat16, device="cpu")
    seen, shards = [], {{(p.dtype, type(p).__name__) for p in model.parameters()}}
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(m.weight.dtype))
    out = root(lambda m, ids: m(input_ids=ids).logits, torch.tensor([[1, 2, 3]]))
    print(seen[0], shards, out.dtype, type(model.lm_head.weight).__name__)
dist.destroy_process_group()
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    trained, frozen = out.stdout.strip().splitlines()
    # the trained root stays whole until its backward, the frozen one is resharded
    assert trained == "torch.bfloat16 {(torch.float32, 'DTensor')} torch.bfloat16 Parameter"
    assert frozen == "torch.bfloat16 {(torch.float32, 'DTensor')} torch.bfloat16 DTensor"


def test_fsdp_loads_on_the_cpu_and_leaves_the_move_to_the_sharding(small, monkeypatch):
    """Under FSDP the policy is loaded on the CPU, not on the run's GPU (fsdp.shard moves each group there as it
    shards it), so no GPU ever holds the whole model and its reference copy; without FSDP it goes to the GPU."""
    import torch

    import config
    import load
    cfg, asked, load_it = config.make(**{**small, "distributed": "fsdp"}), [], load.model_and_tokenizer
    monkeypatch.setattr(load, "model_and_tokenizer", lambda name, device, *a: asked.append(device) or
                        load_it(name, torch.device("cpu"), *a))  # the CPU stands in for the GPU asked for
    for sharded in (True, False):
        load.policy(cfg, torch.device("cuda", 1), None, sharded=sharded)
    assert asked == [torch.device("cpu"), torch.device("cuda", 1)]


SETUP_MEMORY = """
import json, os, resource, sys
import config, train
statm = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
cfg = config.make(model_name=sys.argv[1], dataset_name="toy", max_samples=64, eval_size=0, device="cpu",
                  precision="fp32", distributed="fsdp", batch_size=2, num_generations=2, output_dir=sys.argv[2],
                  rewards=[{"type": "length", "params": {"target_length": 3}}])
start = max(statm(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
run = train.setup(cfg)
print("RESULT", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start, statm())
"""


def test_fsdp_setup_never_holds_two_whole_models(tiny_dir, tmp_path):
    """Two gloo processes set up FSDP with a 42M-parameter model (168 MB) and its reference: each process's memory
    peaks under 2.2 models (it peaked at 2.6 when the reference was a copy made before sharding: 1.7-1.8 now)."""
    if not os.path.exists("/proc/self/statm"):
        import pytest
        pytest.skip("needs Linux's /proc")
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM
    big = str(tmp_path / "big")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=32768, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                         num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                                         tie_word_embeddings=True))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(big)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(big)
    del model
    script = tmp_path / "setup_memory.py"
    script.write_text(SETUP_MEMORY)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), big, str(tmp_path / "out")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    peaks = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert len(peaks) == 2 and max(peaks) < 2.2 * size, [p / size for p in peaks]


def test_a_weight_missing_from_the_checkpoint_loads_the_same_every_time(small, tiny_dir, tmp_path):
    """Under FSDP the reference is a second load (load.reference): a weight the checkpoint lacks is initialised
    from the run's seed, so both loads, and so policy and reference, start equal."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    import config
    import load
    folder = tmp_path / "partial"
    shutil.copytree(tiny_dir, folder)
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = config.make(**{**small, "model_name": str(folder)})
    first, second = (dict(load.policy(cfg, torch.device("cpu"), None)[0].named_parameters()) for _ in range(2))
    torch.manual_seed(123)  # whatever the global generator holds
    third = dict(load.policy(cfg, torch.device("cpu"), None)[0].named_parameters())
    assert all(torch.equal(first[k], second[k]) and torch.equal(first[k], third[k]) for k in first)


def test_an_older_transformers_than_required_stops_with_the_upgrade(monkeypatch):
    """transformers < 5.24 ignores cache= and would sample without the prompt: importing nmgrpo stops instead."""
    import importlib.metadata
    import re

    import pytest

    import common
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "5.17.0")
    with pytest.raises(ImportError, match=re.escape("transformers 5.17.0 is installed; nmgrpo needs "
                                                    "transformers>=5.24") + ".*pip install -U 'transformers>=5.24'"):
        common.require("transformers", common.TRANSFORMERS, "why")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "5.24.0")
    common.require("transformers", common.TRANSFORMERS, "why")
    assert f"transformers>={common.TRANSFORMERS}," in open(os.path.join(REPO, "requirements.txt")).read()
