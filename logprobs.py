"""Per-token log-probs (and entropy) of chosen tokens, straight from hidden states and the lm_head.

`log_softmax(h @ W.T / T).gather(targets)` would hold a (tokens, vocab) tensor, 0.6 GB for 1k tokens
of a 152k vocab in fp32, plus as much again for its gradient. Here the tokens go in chunks: forward
keeps only each row's log-prob and entropy, and backward recomputes a chunk's logits to form its
gradient, so the extra memory is (chunk, vocab). The softmax math is float32 whatever the model
dtype; with `compile=True` it runs as torch.compile'd kernels (eager if compiling fails).
"""
import warnings

import torch

_COMPILED, _FAILED = {}, set()


def _stats(logits, targets):
    """Chosen-token log-prob and entropy (C,) of float32 logits (C, V)."""
    logp_all = torch.log_softmax(logits, -1)
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def _grad(logits, targets, grad_logp, grad_entropy, entropy):
    """d loss / d logits (C, V), given the upstream grads of logp and entropy (C,)."""
    logp_all = torch.log_softmax(logits, -1)
    p = logp_all.exp()
    g = -p * (grad_logp[:, None] + (logp_all + entropy[:, None]) * grad_entropy[:, None])
    return g.scatter_add(-1, targets[:, None], grad_logp[:, None])


def _run(fn, compile, *args):
    """fn(*args), through its torch.compile'd twin when asked (built once; eager if compiling fails)."""
    if compile and fn not in _FAILED:
        try:
            if fn not in _COMPILED:
                _COMPILED[fn] = torch.compile(fn, dynamic=True)
            return _COMPILED[fn](*args)
        except Exception as e:  # no compiler, unsupported backend, ...
            _FAILED.add(fn)
            warnings.warn(f"torch.compile of the log-prob kernel failed ({type(e).__name__}: {e}); running eagerly")
    return fn(*args)


def _logits(h, weight, temperature):
    """Float32 logits of one chunk at the temperature."""
    return (h @ weight.to(h.dtype).T).float() / temperature  # (C, V)


class ChunkedLogprobs(torch.autograd.Function):
    """(logp, entropy) of `targets` under softmax(hidden @ weight.T / temperature), chunked over rows."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, compile):
        n = hidden.size(0)
        logp = torch.empty(n, device=hidden.device, dtype=torch.float32)
        entropy = torch.empty_like(logp)
        for i in range(0, n, chunk_size):
            logits = _logits(hidden[i:i + chunk_size], weight, temperature)
            logp[i:i + chunk_size], entropy[i:i + chunk_size] = _run(_stats, compile, logits, targets[i:i + chunk_size])
        ctx.save_for_backward(hidden, weight, targets, entropy)
        ctx.temperature, ctx.chunk_size, ctx.compile = temperature, chunk_size, compile
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, entropy = ctx.saved_tensors
        t, c = ctx.temperature, ctx.chunk_size
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for i in range(0, hidden.size(0), c):
            h = hidden[i:i + c]
            logits = _logits(h, weight, t)
            g = _run(_grad, ctx.compile, logits, targets[i:i + c], grad_logp[i:i + c], grad_entropy[i:i + c],
                     entropy[i:i + c]) / t  # d loss / d (h @ W.T): (C, V)
            if grad_h is not None:
                grad_h[i:i + c] = g.to(hidden.dtype) @ weight.to(hidden.dtype)
            if grad_w is not None:
                grad_w += g.T @ h.float()
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


def token_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=1024, compile=False):
    """hidden (N, D), weight (V, D), targets (N,) -> logp (N,), entropy (N,), both float32."""
    return ChunkedLogprobs.apply(hidden, weight, targets, float(temperature), int(chunk_size), bool(compile))


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                        temperature=1.0, chunk_size=1024, compile=False):
    """Log-probs and entropies (B, T) of completions given their left-padded prompts (0 where masked).

    prompt_*: (B, P); completion_*: (B, T). Runs the decoder once over prompt+completion and the
    chunked kernel over the completion tokens that count.
    """
    ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P+T)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    pos = (mask.long().cumsum(-1) - 1).clamp_(min=0)
    hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    p = prompt_ids.size(1)
    keep = completion_mask.bool()  # (B, T)
    h = hidden[:, p - 1:-1][keep]  # (M, D): the state before each kept completion token
    logp, ent = token_logprobs(h, model.get_output_embeddings().weight, completion_ids[keep], temperature,
                               chunk_size, compile)
    out_logp = torch.zeros(completion_ids.shape, dtype=torch.float32, device=ids.device)
    out_ent = torch.zeros_like(out_logp)
    return out_logp.masked_scatter(keep, logp), out_ent.masked_scatter(keep, ent)
