"""Per-token log-probs (and entropy) of chosen tokens, straight from hidden states and the lm_head.

Chunked, never a (tokens, vocab) tensor: log_softmax(h @ W.T / T).gather(targets) would hold 0.6 GB for 1k
tokens of a 152k vocab in fp32, and as much again for its gradient. The rows go in chunks through one reused
(chunk, vocab) float32 buffer, the softmax math in float32 whatever the model dtype. Two ways through:
- token_logprobs: forward keeps each row's log-prob, entropy and logsumexp; backward recomputes each
  chunk's logits for its gradient (four lm_head matmuls in all, naive autograd needs three).
- token_loss, the fused loss: the caller's per-token loss is evaluated chunk by chunk in the same pass,
  so each chunk's gradient is formed while its logits live: three matmuls, nothing recomputed.
And length_chunks, the learner's forwards over a step: rows of similar length together, each cut to its longest.
"""
from typing import NamedTuple, Optional

import torch
from transformers import DynamicCache

from common import compiled_call


def _stats_(logits, targets):
    """Chosen-token log-prob, entropy and logsumexp (C,) of float32 logits (C, V), which become log-softmax."""
    lse = torch.logsumexp(logits, -1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if torch.compiler.is_compiling():  # one fused reduction; outputs from the logits as read, the buffer written
        logp_all = logits - lse[:, None]  # last (torch 2.11's inductor read a shorter view of it before the sub_)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        logits.sub_(lse[:, None])
    else:  # eagerly, a batched dot product saves a (C, V) temporary; in float32 (autocast would round it)
        logp_all = logits.sub_(lse[:, None])
        with torch.autocast(logits.device.type, enabled=False):
            entropy = -torch.bmm(logp_all.exp()[:, None], logp_all[:, :, None]).flatten()
    return logp, entropy, lse


def _grad_(logp_all, targets, a, b, entropy):
    """Overwrite log-softmax (C, V) with d/dlogits of sum(a * logp + b * entropy); a, b (C,), b may be None."""
    if b is None:
        logp_all.exp_().mul_(-a[:, None])
    else:  # d entropy / d logit_j = -p_j * (logp_j + entropy)
        p = logp_all.exp()
        logp_all.add_(entropy[:, None]).mul_(b[:, None]).add_(a[:, None]).mul_(p).neg_()
    return logp_all.scatter_add_(-1, targets[:, None], a[:, None])


def _run(fn, compile, *args):
    """fn(*args), torch.compile'd once (dynamic shapes) when asked."""
    return compiled_call(fn, compile, *args, dynamic=True)


def _compute_dtype(hidden):
    """The lm_head matmuls' dtype: autocast's when it is on (as for any matmul), else the hidden states'."""
    dev = hidden.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype


_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype_out")  # torch.mm(..., out_dtype=), torch >= 2.8


def _logits(h, temperature, weight, out):
    """Float32 logits (C, V) of h (C, D) at `temperature`, written into out[:C], the reused buffer."""
    h = (h / temperature).to(weight.dtype)  # 1/T folded into h costs (C, D), not (C, V)
    out = out[: h.size(0)]
    if h.dtype == torch.float32:
        return torch.mm(h, weight.T, out=out)
    if h.is_cuda and _MM_OUT_DTYPE:  # half inputs, float32 sums written as float32: no rounding to half first
        return torch.mm(h, weight.T, out_dtype=torch.float32, out=out)
    return out.copy_(h @ weight.T)


def _backprop(g, h, weight, grad_h, grad_w):
    """Chain a chunk's logit gradient g (C, V) into grad_h (C, D) and grad_w (V, D), matmuls in weight's dtype."""
    if grad_h is not None and weight.dtype == grad_h.dtype == torch.float32:
        torch.mm(g, weight, out=grad_h)
    elif grad_h is not None:
        grad_h.copy_(g.to(weight.dtype) @ weight)
    if grad_w is not None and weight.dtype == torch.float32:
        grad_w.addmm_(g.T, h.float())
    elif grad_w is not None:
        grad_w += (g.to(weight.dtype).T @ h.to(weight.dtype)).float()


def _chunks(n, chunk_size):
    return [slice(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]


class ChunkedLogprobs(torch.autograd.Function):
    """(logp, entropy) of `targets` under softmax(hidden @ weight.T / temperature), chunked over rows."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, compile):
        n, w = hidden.size(0), weight.to(_compute_dtype(hidden))
        buf = torch.empty(min(chunk_size, n), w.size(0), device=hidden.device, dtype=torch.float32)
        logp, entropy, lse = (torch.empty(n, device=hidden.device, dtype=torch.float32) for _ in range(3))
        for s in _chunks(n, chunk_size):
            logp[s], entropy[s], lse[s] = _run(_stats_, compile, _logits(hidden[s], temperature, w, buf), targets[s])
        ctx.save_for_backward(hidden, weight, targets, entropy, lse)
        ctx.temperature, ctx.chunk_size, ctx.compile, ctx.dtype = temperature, chunk_size, compile, w.dtype
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, entropy, lse = ctx.saved_tensors
        n, t = hidden.size(0), ctx.temperature
        a = (torch.zeros_like(lse) if grad_logp is None else grad_logp.float()) / t  # 1/T: logits = h W^T / T
        b = None if grad_entropy is None else grad_entropy.float() / t
        w = weight.to(ctx.dtype)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        buf = torch.empty(min(ctx.chunk_size, n), w.size(0), device=hidden.device, dtype=torch.float32)
        for s in _chunks(n, ctx.chunk_size):
            logp_all = _logits(hidden[s], t, w, buf).sub_(lse[s, None])  # recomputed: (C, V)
            g = _run(_grad_, ctx.compile, logp_all, targets[s], a[s], None if b is None else b[s], entropy[s])
            _backprop(g, hidden[s], w, None if grad_h is None else grad_h[s], grad_w)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


class ChunkedLoss(torch.autograd.Function):
    """sum_i loss_fn(logp_i) over the rows, its gradient formed in forward while each chunk's logits live."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, loss_fn, temperature, chunk_size, compile):
        n, w = hidden.size(0), weight.to(_compute_dtype(hidden))
        buf = torch.empty(min(chunk_size, n), w.size(0), device=hidden.device, dtype=torch.float32)
        logp, entropy = (torch.empty(n, device=hidden.device, dtype=torch.float32) for _ in range(2))
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        for s in _chunks(n, chunk_size):
            logits = _logits(hidden[s], temperature, w, buf)
            logp[s], entropy[s], _ = _run(_stats_, compile, logits, targets[s])  # logits is now log-softmax
            with torch.enable_grad():
                lp = logp[s].detach().requires_grad_()
                chunk_loss = loss_fn(lp, s)
                a, = torch.autograd.grad(chunk_loss, lp)  # d loss / d logp: (C,)
            loss += chunk_loss.detach()
            g = _run(_grad_, compile, logits, targets[s], a.float() / temperature, None, entropy[s])
            _backprop(g, hidden[s], w, None if grad_h is None else grad_h[s], grad_w)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _logp, _entropy):
        return tuple(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors) + (None,) * 5


def token_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=1024, compile=False):
    """hidden (N, D), weight (V, D), targets (N,) -> logp (N,), entropy (N,), both float32."""
    return ChunkedLogprobs.apply(hidden, weight, targets, float(temperature), int(chunk_size), bool(compile))


def token_loss(hidden, weight, targets, loss_fn, temperature=1.0, chunk_size=1024, compile=False):
    """The fused loss: (loss, detached logp (N,), entropy (N,)); loss = sum over chunks s of loss_fn(logp[s], s).

    loss_fn(logp (C,), s: slice of rows) -> scalar must sum per-row terms of each row's own logp (GRPO's loss does)."""
    return ChunkedLoss.apply(hidden, weight, targets, loss_fn, float(temperature), int(chunk_size), bool(compile))


def completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask, share=None):
    """Decoder states before each kept completion token (M, D), their targets (M,) and the mask (B, T).

    prompt_*: (B, P), left padded; completion_*: (B, T). share=(firsts (U,), index (B,)): row i's prompt is that of
    row firsts[index[i]]; the U distinct prompts run once and their keys/values (gradients flow through them)
    serve every row that has them."""
    mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (B, P+T)
    pos = (mask.long().cumsum(-1) - 1).clamp_(min=0)
    p = prompt_ids.size(1)
    if share is None:
        hidden = model.base_model(input_ids=torch.cat([prompt_ids, completion_ids], dim=1), attention_mask=mask,
                                  position_ids=pos, use_cache=False).last_hidden_state[:, p - 1:-1]  # (B, T, D)
    else:
        firsts, index = share
        cache = DynamicCache()
        last = model.base_model(input_ids=prompt_ids[firsts], attention_mask=prompt_mask[firsts],
                                position_ids=pos[firsts, :p], cache=cache, use_cache=True).last_hidden_state[:, -1:]
        hidden = last[index]  # (B, 1, D): the state before the first completion token
        if completion_ids.size(1) > 1:
            cache.reorder_cache(index)  # (U, ...) -> (B, ...)
            rest = model.base_model(input_ids=completion_ids[:, :-1], attention_mask=mask[:, :-1],
                                    position_ids=pos[:, p:-1], cache=cache, use_cache=True).last_hidden_state
            hidden = torch.cat([hidden, rest], dim=1)  # (B, T, D)
    keep = completion_mask.bool()  # (B, T)
    return hidden[keep], completion_ids[keep], keep


def scatter_rows(values, keep):
    """Kept-token values (M,) back to (B, T) float32, 0 where not kept."""
    return torch.zeros(keep.shape, dtype=torch.float32, device=values.device).masked_scatter(keep, values)


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                        temperature=1.0, chunk_size=1024, compile=False, share=None):
    """Log-probs and entropies (B, T) of completions given their left-padded prompts (0 where masked)."""
    h, targets, keep = completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask, share)
    logp, ent = token_logprobs(h, model.get_output_embeddings().weight, targets, temperature, chunk_size, compile)
    return scatter_rows(logp, keep), scatter_rows(ent, keep)


def completion_loss(model, prompt_ids, prompt_mask, completion_ids, completion_mask, loss_fn,
                    temperature=1.0, chunk_size=1024, compile=False, share=None):
    """token_loss over completions: (loss, logp (B, T), entropy (B, T)); loss_fn sees kept tokens row-major."""
    h, targets, keep = completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask, share)
    loss, logp, ent = token_loss(h, model.get_output_embeddings().weight, targets, loss_fn, temperature,
                                 chunk_size, compile)
    return loss, scatter_rows(logp, keep), scatter_rows(ent, keep)


# ---------------------------------------------------------------------------- the learner's forwards

CHUNK_RATIO = 1.25  # a forward holds rows at least 1/CHUNK_RATIO as long as its longest (best of 1.25, 1.5, 2, 3)


class Chunk(NamedTuple):
    """Rows that go through the model in one forward: their indices (n,), ascending, in the step's batch; the
    widths of their longest prompt and completion (the padding beyond is cut); and `share`, None or (firsts (U,),
    index (n,)): their U distinct prompts, which run once each (completion_hidden)."""
    rows: torch.Tensor
    prompt: int
    length: int
    share: Optional[tuple]


def length_chunks(lengths, prompt_lengths, max_rows, group=1, count=1):
    """The learner's forwards over a step's N rows, lengths and prompt_lengths (N,) their real tokens: sorted by
    length, a new forward after max_rows rows or where they get CHUNK_RATIO shorter, each cut to its own longest
    prompt and completion. With group > 1, rows i*group ... i*group + group - 1 share a prompt and every forward
    runs its distinct prompts once, then the completions (at least 2 columns wide, so that every forward makes the
    same calls: FSDP gathers the weights in each). At least `count` forwards (count <= N): the largest halved."""
    lengths, prompts, device = lengths.tolist(), prompt_lengths.tolist(), prompt_lengths.device
    parts = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: equal lengths stay in order
        if not parts or len(parts[-1]) == max_rows or lengths[i] * CHUNK_RATIO < lengths[parts[-1][0]]:
            parts.append([])
        parts[-1].append(i)
    while len(parts) < count:
        j = max(range(len(parts)), key=lambda j: len(parts[j]))
        parts[j:j + 1] = [parts[j][: len(parts[j]) // 2], parts[j][len(parts[j]) // 2:]]
    chunks = []
    for rows in map(sorted, parts):
        owners = [i // group for i in rows]
        distinct = sorted(set(owners))
        share = None if group == 1 else (
            torch.tensor([owners.index(o) for o in distinct], device=device),  # firsts (U,)
            torch.tensor([distinct.index(o) for o in owners], device=device))  # index (n,)
        chunks.append(Chunk(torch.tensor(rows, device=device), max(prompts[i] for i in rows),
                            max(1 if share is None else 2, max(lengths[i] for i in rows)), share))
    return chunks
