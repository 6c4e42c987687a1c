"""KV-cached batched sampling over any transformers causal LM, in the stages of gpt-fast's generate.py and
nanochat's engine.py:
1. prefill the B left-padded prompts once;
2. share their keys/values across the G samples of each prompt (N = B*G rows);
3. decode one token per step for the running rows (the step torch.compile'd once per shape, in _run, if asked):
   Llama-family models (LEAN_TYPES) through _lean_decode, a short step over the model's own modules (LoRA and
   FSDP's gathered weights used as they are) and preallocated keys/values, without the per-step cache
   concatenation, mask building and generic dispatch that cost more than the matmuls at small shapes; others
   through their forward;
4. stop each row at EOS or max_new_tokens; on the lean path, rows that have stopped leave the running batch and
   its keys/values (_compact), as in vLLM no forward is spent on a finished row.
Noise comes from a generator the caller seeds (seed, step, rank): a few uniforms per row per step, each made a
token by inverse-CDF (see next_token), so runs reproduce and no two rows share noise.
"""
import math
import sys

import torch
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache

from common import compiled_call

EOS_CHECK_EVERY = 8  # decode steps between the host syncs that count the rows still running
COMPACT_AT = 0.75  # at a check, the lean path drops its stopped rows once no more than this share still runs
COMPILED_SIZES = 4  # a compiled step runs at N, N/2, N/4 or N/8 rows (stopped rows fill up to the size)
CACHE_BUCKET = 64  # a compiled step's cache length is rounded up to this, so it sees few shapes
LEAN_TYPES = ("llama", "qwen2", "qwen3")  # model types _lean_decode reproduces


def positions(attention_mask):
    """Position ids of left-padded rows: 0 at each row's first real token (pads get 1, as in generate)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def draws_per_row(top_p):
    """Proposals per row for top-p: each lands in the nucleus with probability >= top_p, so all miss with
    probability < 1e-12. At most 1024: below top_p 0.03 a miss (then the argmax) gets likelier, 3e-5 at 0.01."""
    return 1 if top_p >= 1.0 else min(1024, math.ceil(math.log(1e-12) / math.log1p(-top_p)))


def in_nucleus(probs, draws, top_p):
    """(N, K) bool: whether each drawn token (N, K) is in its row's top-p nucleus, i.e. the tokens more probable
    than it hold less than top_p: the smallest head of the sorted law whose mass reaches top_p, ties at its edge
    all kept. No sort of the vocabulary: a bisection over the K drawn probabilities, each probe one masked sum."""
    p = probs.gather(-1, draws)  # (N, K)
    bounds, k = p.sort(-1).values, p.size(-1)
    lo = torch.zeros_like(draws[:, :1])  # the first sorted bound inside the nucleus lies in [lo, hi]
    hi = torch.full_like(lo, k)
    for _ in range(k.bit_length()):
        mid = (lo + hi) // 2
        b = bounds.gather(-1, mid.clamp(max=k - 1))  # (N, 1)
        # the mass of the tokens above b, (N, 1); faster on CPU than torch.where(probs > b, probs, 0).sum(-1)
        above = torch.relu(probs - b).sum(-1, keepdim=True) + b * (probs > b).sum(-1, keepdim=True)
        inside, active = above < top_p, lo < hi
        lo, hi = torch.where(active & ~inside, mid + 1, lo), torch.where(active & inside, mid, hi)
    return (p >= bounds.gather(-1, lo.clamp(max=k - 1))) & (lo < k)


def law(logits, temperature=1.0, top_k=0):
    """softmax(logits / temperature) (N, V) in float32, over the top_k most likely tokens when 0 < top_k < V."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


@torch.library.custom_op("nmgrpo::cdf", mutates_args=())
def _cdf(probs: torch.Tensor) -> torch.Tensor:
    """probs.cumsum(-1), opaque to torch.compile. Before torch 2.13, inductor fuses the split scan it makes of a
    long cumsum over few rows (CUDA, fewer than twice the SM count) with a reduction over the same rows, which
    it cannot generate (NYI TritonSplitDimKernel reductions): the compiled head fell back to eager. On a CPU,
    where inductor fuses the cumsum with the softmax and is faster, draw calls torch.cumsum itself."""
    return probs.cumsum(-1)


_cdf.register_fake(torch.empty_like)


def draw(probs, u, top_p=1.0):
    """The token (N,) of each row of probs (N, V) by inverse-CDF: each uniform of u (N, K) is a token; the first
    inside the top-p nucleus is the sample (rejection: exactly the nucleus), else the argmax."""
    cdf = probs.cumsum(-1) if probs.device.type == "cpu" else _cdf(probs)  # (N, V)
    draws = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.size(-1) - 1)  # first cdf > u: (N, K)
    if top_p >= 1.0:
        return draws[:, 0]
    inside = in_nucleus(probs, draws, top_p)
    first = draws.gather(-1, inside.int().argmax(-1, keepdim=True)).squeeze(-1)
    return torch.where(inside.any(-1), first, probs.argmax(-1))


def next_token(logits, temperature=1.0, top_p=1.0, top_k=0, generator=None, greedy=False, u=None):
    """One token per row from last-position logits (N, V): argmax, or a draw of the (top-k filtered) law with the
    uniforms u (N, draws_per_row(top_p)), or fresh ones from `generator`."""
    if greedy:
        return logits.argmax(-1)
    probs = law(logits, temperature, top_k)
    if u is None:
        u = torch.rand(probs.size(0), draws_per_row(top_p), generator=generator, device=probs.device)
    return draw(probs, u, top_p)


def _choose(logits, u, temperature, top_p, top_k, greedy, with_logp):
    """The next token (N,) and, with_logp, its log-prob (N,) under softmax(logits / temperature): read off the
    sampling law itself where no top-k filter changes it (one pass over the vocabulary fewer)."""
    probs = None if greedy else law(logits, temperature, top_k)
    token = logits.argmax(-1) if greedy else draw(probs, u, top_p)
    if not with_logp:
        return token, None
    if not greedy and not 0 < top_k < logits.size(-1):
        return token, probs.gather(-1, token[:, None]).squeeze(-1).log()
    scaled = logits.float() / temperature
    return token, scaled.gather(-1, token[:, None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


def _decode(model, token, attention_mask, pos, cache):
    """One decode step through the model's forward: feed `token` (N,) at `pos` (N, 1); the next logits (N, V)."""
    return model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=pos, cache=cache,
                 use_cache=True).logits[:, -1]


def lean(model):
    """Whether _lean_decode reproduces the model's forward: a Llama-family decoder, full attention in every layer."""
    inner = getattr(model, "model", None)
    return (getattr(model.config, "model_type", None) in LEAN_TYPES and hasattr(model, "lm_head")
            and hasattr(inner, "rotary_emb")
            and all(getattr(layer.self_attn, "sliding_window", None) is None for layer in inner.layers))


def _lean_decode(model, token, attention_mask, pos, cache, at, length):
    """_decode over preallocated keys/values (see lean): `token` (N,) at `pos` (N, 1) goes to cache position `at`
    (1,), attention reads [0, length). cache: per layer (keys, values), each (N, kv heads, L, head dim)."""
    inner = model.model
    x = inner.embed_tokens(token[:, None])  # (N, 1, C)
    n = x.size(0)
    cos, sin = inner.rotary_emb(x, pos)  # (N, 1, D)
    mask = attention_mask[:, None, None, :length].bool()  # (N, 1, 1, length)
    rope = sys.modules[type(inner.layers[0].self_attn).__module__].apply_rotary_pos_emb  # the model's own
    for layer, (keys, values) in zip(inner.layers, cache):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(n, 1, -1, attn.head_dim)  # (N, 1, H, D)
        k = attn.k_proj(h).view(n, 1, -1, attn.head_dim)  # (N, 1, Hkv, D)
        if hasattr(attn, "q_norm"):  # qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (N, H, 1, D), (N, Hkv, 1, D)
        keys.index_copy_(2, at, k.to(keys.dtype))
        values.index_copy_(2, at, attn.v_proj(h).view(n, 1, -1, attn.head_dim).transpose(1, 2).to(values.dtype))
        # the H / Hkv query heads of each key/value head as its queries: no GQA flag, which fused kernels refuse
        o = F.scaled_dot_product_attention(q.to(keys.dtype).reshape(n, keys.size(1), -1, attn.head_dim),
                                           keys[:, :, :length], values[:, :, :length], attn_mask=mask,
                                           scale=attn.scaling)  # (N, Hkv, H / Hkv, D)
        x = x + attn.o_proj(o.reshape(n, 1, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(inner.norm(x))[:, -1]  # (N, V)


def _run(fn, compile, *args):
    """fn(*args), torch.compile'd once at a fixed shape when asked: it fails whole or runs whole."""
    return compiled_call(fn, compile, *args, dynamic=False, fullgraph=True)


def _static_cache(model, prefill, num_samples, length):
    """A preallocated cache of `length` positions holding the prefill's keys/values repeated per sample."""
    cache = StaticCache(config=model.config, max_cache_len=length)
    for i, layer in enumerate(prefill.layers):
        cache.update(layer.keys.repeat_interleave(num_samples, 0), layer.values.repeat_interleave(num_samples, 0), i)
    return cache


def _buffers(prefill, num_samples, length):
    """Per layer (keys, values) (N, kv heads, length, head dim): the prefill's, repeated per sample, then zeros."""
    def grow(x):  # (B, kv heads, P, head dim)
        buf = x.new_zeros(x.size(0) * num_samples, x.size(1), length, x.size(3))
        buf[:, :, : x.size(2)] = x.repeat_interleave(num_samples, 0)
        return buf
    return [(grow(layer.keys), grow(layer.values)) for layer in prefill.layers]


def _compact(done, live, size, compile):
    """The running rows to keep (n',) in order, or None to keep them all: once no more than COMPACT_AT of the n
    rows in `done` (n,) still run (`live` of them), those, and with `compile` stopped ones up to the smallest
    compiled size (size / 2**i, i < COMPILED_SIZES) that holds them."""
    n = done.numel()
    keep = live if live <= COMPACT_AT * n else n
    if compile:
        keep = min([s for s in (size >> i for i in range(COMPILED_SIZES)) if keep <= s < n], default=n)
    return None if keep == n else torch.argsort(done.int(), stable=True)[:keep].sort().values


@torch.no_grad()
def sample(model, input_ids, attention_mask, *, max_new_tokens, eos_token_id, pad_token_id,
           num_samples=1, temperature=1.0, top_p=1.0, top_k=0, greedy=False, generator=None,
           return_logprobs=False, compile=False, noise_rows=None, processor=None):
    """Sample G = `num_samples` completions for each of B left-padded prompts, input_ids and attention_mask (B, P).

    Returns completion ids and mask (N, T), T <= max_new_tokens, the rows of prompt i being i*G ... i*G + G - 1;
    the mask is 1 up to and including each row's EOS, after which ids are pad_token_id. return_logprobs adds
    the (N, T) float32 log-prob of each drawn token under softmax(logits / temperature), as the learner recomputes it.
    compile (a preallocated cache, attention over all of it) keeps the law: tokens agree up to kernel rounding.
    noise_rows=(offset, total): each step draws (total, K) uniforms, of which these rows take offset ... offset
    + N - 1, so processes sharing a seed and splitting one batch draw what one process would; default (0, N).
    A row's noise, and so its tokens up to kernel rounding, do not depend on which other rows still run. processor(logits (n, V), rows (n,), t)
    -> logits, as a transformers LogitsProcessor, edits the next-token logits of the running rows (their rows in
    the result) before the choice of token t."""
    dev = input_ids.device
    eos = torch.as_tensor(eos_token_id, device=dev).flatten()  # one or several stop ids
    b, p = input_ids.shape
    n = b * num_samples
    prefill = DynamicCache()  # 1. prefill
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                   cache=prefill, use_cache=True, logits_to_keep=1).logits[:, -1]  # (B, V); fills `prefill`
    logits = logits.repeat_interleave(num_samples, dim=0)  # (N, V); 2. share the prompts across their G samples
    attention_mask = attention_mask.repeat_interleave(num_samples, dim=0)  # (N, P)
    pos = positions(attention_mask)[:, -1:]  # (N, 1)
    fast = lean(model)
    fn = _lean_decode if fast else _decode
    length = -(-(p + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET if compile else p + max_new_tokens
    if fast:  # the prompts' keys/values, preallocated for the lean or the compiled step, else repeated in place
        cache = _buffers(prefill, num_samples, length)
    elif compile:
        cache = _static_cache(model, prefill, num_samples, length)
    else:
        cache = prefill
        cache.batch_repeat_interleave(num_samples)
    if cache is not prefill:
        attention_mask = torch.cat([attention_mask, attention_mask.new_zeros(n, length - p)], dim=1)  # (N, L)
    tokens = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=dev)
    logps = torch.zeros((n, max_new_tokens), device=dev) if return_logprobs else None
    rows = torch.arange(n, device=dev)  # (n,): the result row of each running row
    done = torch.zeros(n, dtype=torch.bool, device=dev)  # (n,)
    k = draws_per_row(top_p)
    where = torch.arange(p, p + max_new_tokens, device=dev)  # cache positions of the decoded tokens

    first, total = noise_rows or (0, n)

    def choose(logits, t):  # the next token (n,) and its log-prob; each running row takes its own row of noise
        u = None if greedy else torch.rand(total, k, generator=generator, device=dev)[first:first + n]  # (N, K)
        u = u[rows] if u is not None and rows.numel() < n else u
        logits = processor(logits, rows, t) if processor else logits
        return _run(_choose, compile, logits, u, temperature, top_p, top_k, greedy, return_logprobs)

    token, logp = choose(logits, 0)
    for t in range(max_new_tokens):  # 3. decode
        tokens[rows, t] = token.masked_fill(done, pad_token_id)
        if return_logprobs:
            logps[rows, t] = logp
        done = done | torch.isin(token, eos)  # 4. stop: each row at its EOS, the loop once all have
        live = int((~done).sum()) if t % EOS_CHECK_EVERY == EOS_CHECK_EVERY - 1 else -1  # a host sync, now and then
        if t == max_new_tokens - 1 or live == 0:
            break
        keep = _compact(done, live, n, compile) if fast and live > 0 else None
        if keep is not None:  # the stopped rows leave the batch and its keys/values
            rows, token, done, pos, attention_mask = (x[keep] for x in (rows, token, done, pos, attention_mask))
            for i, (keys, values) in enumerate(cache):  # in place, layer by layer: one layer's copy at a time
                cache[i] = (keys[keep], values[keep])
            del keys, values
        if cache is prefill:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.size(0), 1)], dim=1)
        else:
            attention_mask[:, p + t] = 1  # the position `token` is written to
        pos = pos + 1
        args = (model, token, attention_mask, pos, cache)
        if fast:  # where `token` goes, and how far attention reads (all of a compiled step's fixed-size cache)
            args += (where[t : t + 1], length if compile else p + t + 1)
        token, logp = choose(_run(fn, compile, *args), t + 1)
    tokens = tokens[:, : t + 1]  # (N, T)
    mask = completion_mask(tokens, eos)
    return (tokens, mask, logps[:, : t + 1] * mask) if return_logprobs else (tokens, mask)


def completion_mask(tokens, eos):
    """1 for every token up to and including the first EOS of its row, 0 after. tokens: (N, T)."""
    is_eos = torch.isin(tokens, eos).int()
    after = is_eos.cumsum(-1) - is_eos  # EOS seen strictly before this position
    return (after == 0).long()
