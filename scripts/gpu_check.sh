#!/usr/bin/env bash
# One CUDA GPU, about 8 minutes, from the repository root: what a CPU cannot check.
#   bash scripts/gpu_check.sh [LOGS]        (LOGS: a folder for 8 logs, one per check; default $OUT or /tmp/nmgrpo-gpu)
# First, side by side (small models; ~3 min): checks.py (the lean and compiled sampler against generate, which
# attention kernel serves the decode step, host syncs in one sample, compiled shapes past dynamo's default limit,
# the log-prob kernel in bf16 against float64, fp16 gradients with the loss scale, fused and plain); the demo on
# CUDA in bf16 and fp16, with compile and LoRA; a real one-rank cpu:gloo,cuda:nccl group under DDP and FSDP; the
# precision tests. Then alone, for their timings: the sampling head at Qwen3's vocabulary against generate's top-p,
# and bench.py --rows gpu (BENCHMARKS.md). Every step has its own time limit: about 9 minutes at most.
# WHEELS names a folder of wheels installed ahead of the machine's packages (README): `datasets` for the tests, and
# transformers where the machine's is older than requirements.txt's.
# PYTHON names the interpreter that has torch (default python3).
set -uo pipefail
LOGS=${1:-${OUT:-/tmp/nmgrpo-gpu}}; WORK=$(mktemp -d); PY=${PYTHON:-python3}; mkdir -p "$LOGS"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d "${WHEELS:-}" ]; then  # what the machine lacks or has too old, ahead of its own packages
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" "$WHEELS"/*.whl \
    && export PYTHONPATH=$PYTHONPATH:$WORK/site
fi
"$PY" -c 'import torch, transformers as t, common; print("torch", torch.__version__, "| transformers", t.__version__)' \
  || exit 1  # no torch, or a transformers older than requirements.txt's (common says which): nothing could run
run() {  # name, seconds, command: its log in $LOGS, its end on stdout in one write
  n=$1 t=$2; shift 2; timeout "$t" "$@" >"$LOGS/$n.log" 2>&1; r=$?
  printf '== %s: rc=%s\n%s\n' "$n" "$r" "$(tail -n "${TAIL:-6}" "$LOGS/$n.log")"
}
cat >"$WORK/checks.py" <<'EOF'
import tempfile, time, warnings, torch, common, tiny, tasks, data, sampler, logprobs
from transformers import AutoModelForCausalLM, AutoTokenizer
from torch.nn.attention import sdpa_kernel, SDPBackend as B
dev = torch.device("cuda"); d = tiny.make_tiny(tempfile.mkdtemp(), [r["question"] for r in tasks.toy_task(300)], 512)
m = AutoModelForCausalLM.from_pretrained(d).to(dev).eval(); tok = AutoTokenizer.from_pretrained(d); tok.padding_side = "left"
m.generation_config.eos_token_id = None
ids, mask, _ = data.encode_prompts(tok, ["What is 3 + 4?", "Tom has 5 apples."], 64); ids, mask = ids.to(dev), mask.to(dev)
S = lambda ids=ids, mask=mask, n=32, **k: sampler.sample(m, ids, mask, max_new_tokens=n, eos_token_id=[10**6], pad_token_id=0, **k)
ref = m.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=32)[:, ids.size(1):]
for c in (False, True):
    agree = (S(greedy=True, compile=c)[0] == ref).float().mean().item()
    print(f"greedy == generate, compile={c}: {agree:.3f}; compile failed: {sorted(f.__name__ for f in common._FAILED)}")
try:
    with sdpa_kernel([B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.CUDNN_ATTENTION]): S(greedy=True)
    print("lean decode: a fused SDPA kernel serves it")
except RuntimeError as e:
    print("lean decode needs the MATH SDPA kernel:", " ".join(str(e).split())[:200])
g = torch.Generator(dev).manual_seed(0); torch.cuda.set_sync_debug_mode(1)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always"); S(num_samples=4, temperature=1.0, top_p=0.9, return_logprobs=True, generator=g)
torch.cuda.set_sync_debug_mode(0)  # an H200 with torch 2.11 counted 7, 4 of them the EOS checks
print("host syncs in one 32-token sample (one per 8 tokens, a few more once):", len(w))
t0 = time.time()  # more compiled shapes than dynamo's default limit of 8: none may turn compile off
for rows in (1, 2, 3, 5, 8):
    for n in (8, 72):
        S(ids[:1].repeat(rows, 1), mask[:1].repeat(rows, 1), n, num_samples=2, compile=True, generator=g)
print(f"10 compiled shapes in {time.time() - t0:.0f} s; compile failed: {sorted(f.__name__ for f in common._FAILED)}")
h, W = torch.randn(2048, 512, device=dev, generator=g), 0.18 * torch.randn(32768, 512, device=dev, generator=g)
t, a = torch.randint(32768, (2048,), device=dev, generator=g), 1e-7 * torch.randn(2048, device=dev, generator=g)
naive = torch.log_softmax(h.double() @ W.double().T, -1).gather(-1, t[:, None]).squeeze(-1)
with torch.autocast("cuda", torch.bfloat16):
    lp = logprobs.token_logprobs(h, W, t)[0]
print("log-prob kernel vs float64: fp32 max", (logprobs.token_logprobs(h, W, t)[0] - naive).abs().max().item(),
      "| bf16 autocast mean", (lp - naive).abs().mean().item(), "(7e-3 expected with float32 logits, 2e-2 rounded)")
def grad(fused, amp, scale=65536.0):  # train.learn puts the loss scale inside the loss
    x = h.clone().requires_grad_()
    with torch.autocast("cuda", torch.float16, enabled=amp):
        loss = logprobs.token_loss(x, W, t, lambda lp, s: (a[s] * lp).sum() * scale)[0] if fused \
            else (a * logprobs.token_logprobs(x, W, t)[0]).sum() * scale
    loss.backward(); return x.grad / scale
r = grad(False, False)
print("fp16 + loss scale, rel. error of d/dhidden [fused, plain] (<= 1e-2):",
      [round(((grad(f, True) - r).norm() / r.norm()).item(), 4) for f in (True, False)])
EOF
cat >"$WORK/head.py" <<'EOF'
import torch, sampler  # the sampling head at Qwen3's vocabulary, timed alone
dev, g = torch.device("cuda"), torch.Generator("cuda").manual_seed(0)
def timed(fn, *a):
    fn(*a); fn(*a); s, e = torch.cuda.Event(True), torch.cuda.Event(True); s.record()
    for _ in range(10): fn(*a)
    e.record(); torch.cuda.synchronize(); return s.elapsed_time(e) / 10
V = 151936
def hf_top_p(x, p=0.9):  # generate's way: sort, cumsum, mask, multinomial
    x = x.float(); srt, idx = x.sort(-1); drop = srt.softmax(-1).cumsum(-1) <= 1 - p; drop[:, -1] = False
    return torch.multinomial(x.masked_fill(drop.scatter(-1, idx, drop), -float("inf")).softmax(-1), 1)
for N, top_p in ((512, 1.0), (512, 0.9), (64, 0.9), (1, 0.9)):  # below 2 rows per SM inductor splits the cumsum
    z = 4 * torch.randn(N, V, device=dev, dtype=torch.bfloat16, generator=g)
    u = torch.rand(N, sampler.draws_per_row(top_p), device=dev, generator=g)
    f = lambda x: sampler._choose(x, u, 1.0, top_p, 0, False, True)
    ms = [timed(f, z), timed(torch.compile(f, fullgraph=True), z)]
    print(f"sampling head N={N} V={V} top_p={top_p} with log-prob: eager {ms[0]:.2f} ms, compiled {ms[1]:.2f} ms,"
          f" generate-style top-p {timed(hf_top_p, z):.2f} ms; logits read once: {N * V * 2 / 4.3e9:.2f} ms at 4.3 TB/s")
EOF
cat >"$WORK/nccl1.py" <<'EOF'
import sys, torch.distributed as dist, common, train  # a real 1-rank cpu:gloo,cuda:nccl group, world faked to 2
dist.init_process_group("cpu:gloo,cuda:nccl")
common.init_distributed = lambda device="auto", timeout_hours=2: (0, 2)  # every collective runs, on one rank
rc = train.main(sys.argv[1:]); dist.destroy_process_group(); sys.exit(rc)
EOF
D="--config configs/demo.py --device=cuda --logging_steps=2 --eval_on_start=false --eval_steps=0"
timeout 60 "$PY" -c 'import runpy; runpy.run_path("configs/demo.py")'  # the cold start, built once
export OMP_NUM_THREADS=2  # seven jobs side by side share the cores
{
  TAIL=14 run checks 200 "$PY" "$WORK/checks.py" &
  run demo_bf16 180 "$PY" train.py $D --precision=bf16 --max_steps=12 --eval_on_start=true --eval_steps=6 --output_dir="$WORK/bf16" &
  run demo_fp16 150 "$PY" train.py $D --precision=fp16 --max_steps=4 --output_dir="$WORK/fp16" &
  run demo_compile_lora 180 "$PY" train.py $D --precision=bf16 --max_steps=6 --torch_compile=true --use_lora=true --lora_r=8 --output_dir="$WORK/compile" &
  for m in ddp fsdp; do
    run nccl_$m 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "$WORK/nccl1.py" $D --precision=bf16 --max_steps=3 --distributed=$m --loss_type=dapo --scale_rewards=batch --output_dir="$WORK/nccl-$m" &
  done
  run tests 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_ready.py tests/test_logprobs.py tests/test_sampler.py -k "compile or bf16 or autocast or fused or fp16 or sdpa or device or cuda" &
  wait
}
for f in "$WORK"/*/metrics.jsonl; do [ -f "$f" ] || continue
  tail -n1 "$f" | "$PY" -c 'import json,sys; r=json.load(sys.stdin); print(sys.argv[1].split("/")[-2], {k: r.get(k) for k in ("step","loss","grad_norm","sampler_logp_gap","skipped_steps","time_sample","memory/sample_mib","memory/learn_mib","eval/accuracy")})' "$f"
done
unset OMP_NUM_THREADS
TAIL=28 run bench 270 bash -c '"$0" "$1"; "$0" bench.py --rows gpu --repeats 2' "$PY" "$WORK/head.py"
