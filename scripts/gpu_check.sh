#!/usr/bin/env bash
# One CUDA GPU, about 10 minutes, from the repository root: what a CPU cannot check. The lean and compiled sampler
# against generate; which attention kernel serves the decode step; host syncs in one sample; the log-prob kernel in
# bf16 against float64; fp16 gradients with the loss scale, fused and plain; the demo on CUDA in bf16 and fp16, with
# compile and LoRA; a real one-rank cpu:gloo,cuda:nccl group under DDP and FSDP; bench.py --rows gpu,mirror; the
# precision tests. Logs: one file per check in $OUT (default /tmp/nmgrpo-gpu), each check's tail on stdout.
# Without `datasets` on the machine, WHEELS names a folder of wheels for it (pip download datasets -d wheels).
set -uo pipefail
OUT=${OUT:-/tmp/nmgrpo-gpu}; mkdir -p "$OUT"; export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=$PWD
python -c 'import datasets' 2>/dev/null || pip install -q --no-index --find-links "${WHEELS:-./wheels}" datasets || exit 1
run() { n=$1 t=$2; shift 2; echo "== $n"; timeout "$t" "$@" >"$OUT/$n.log" 2>&1; echo "rc=$? ($n)"; tail -n "${TAIL:-7}" "$OUT/$n.log"; }
cat >"$OUT/checks.py" <<'EOF'
import tempfile, warnings, torch, common, tiny, tasks, data, sampler, logprobs
from transformers import AutoModelForCausalLM, AutoTokenizer
from torch.nn.attention import sdpa_kernel, SDPBackend as B
dev = torch.device("cuda"); d = tiny.make_tiny(tempfile.mkdtemp(), [r["question"] for r in tasks.toy_task(300)], 512)
m = AutoModelForCausalLM.from_pretrained(d).to(dev).eval(); tok = AutoTokenizer.from_pretrained(d); tok.padding_side = "left"
m.generation_config.eos_token_id = None
ids, mask, _ = data.encode_prompts(tok, ["What is 3 + 4?", "Tom has 5 apples."], 64); ids, mask = ids.to(dev), mask.to(dev)
S = lambda **k: sampler.sample(m, ids, mask, max_new_tokens=32, eos_token_id=[10**6], pad_token_id=0, **k)
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
torch.cuda.set_sync_debug_mode(0); print("host syncs in one 32-token sample (prefill + 1 per 8 tokens expected):", len(w))
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
cat >"$OUT/nccl1.py" <<'EOF'
import sys, torch.distributed as dist, common, train  # a real 1-rank cpu:gloo,cuda:nccl group, world faked to 2
dist.init_process_group("cpu:gloo,cuda:nccl")
common.init_distributed = lambda device="auto", timeout_hours=2: (0, 2)  # every collective runs, on one rank
sys.exit(train.main(sys.argv[1:]))
EOF
D="--config configs/demo.py --device=cuda --logging_steps=2 --eval_on_start=false --eval_steps=0"
TAIL=12 run checks 240 python "$OUT/checks.py"
run demo_bf16 240 python train.py $D --precision=bf16 --max_steps=12 --eval_on_start=true --eval_steps=6 --output_dir="$OUT/bf16"
run demo_fp16 90 python train.py $D --precision=fp16 --max_steps=4 --output_dir="$OUT/fp16"
run demo_compile_lora 180 python train.py $D --precision=bf16 --max_steps=6 --torch_compile=true --use_lora=true --lora_r=8 --output_dir="$OUT/compile"
for m in ddp fsdp; do
  run nccl_$m 150 torchrun --standalone --nproc_per_node=1 "$OUT/nccl1.py" $D --precision=bf16 --max_steps=3 --distributed=$m --loss_type=dapo --scale_rewards=batch --output_dir="$OUT/nccl-$m"
done
TAIL=24 run bench 360 python bench.py --rows gpu,mirror --repeats 1
run tests 150 python -m pytest -q -x -p no:cacheprovider tests/test_logprobs.py tests/test_sampler.py tests/test_train.py tests/test_gpu_ready.py -k "compile or bf16 or autocast or fused or fp16 or sdpa"
for f in "$OUT"/*/metrics.jsonl; do
  tail -n1 "$f" | python -c 'import json,sys; r=json.load(sys.stdin); print(sys.argv[1], {k: r.get(k) for k in ("step","loss","grad_norm","sampler_logp_gap","skipped_steps","time_sample","memory/sample_mib","memory/learn_mib","eval/accuracy")})' "$f"
done
