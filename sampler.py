"""KV-cached batched sampling over any transformers causal LM.

The left-padded prompts are prefilled once; their cache is repeated for the G samples of each
prompt; then one token per step for all rows, each row stopping at EOS or max_new_tokens.
Noise comes from a generator the caller seeds (seed, step, rank): one uniform per row per step,
turned into a token by inverse-CDF, so runs reproduce and no two rows share noise.
"""
import torch
from transformers import DynamicCache

EOS_CHECK_EVERY = 8  # decode steps between the host syncs that test whether every row has stopped


def positions(attention_mask):
    """Position ids of left-padded rows: 0 at each row's first real token (pads get 1, as in generate)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def next_token(logits, temperature=1.0, top_p=1.0, top_k=0, generator=None, greedy=False):
    """One token per row from last-position logits (N, V): argmax, or a filtered sample."""
    if greedy:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (N, V)
    index = None
    if top_p < 1.0:
        probs, index = probs.sort(dim=-1, descending=True)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest head whose mass reaches top_p
        probs = probs.masked_fill(drop, 0.0)
    cdf = probs.cumsum(-1)  # (N, V)
    u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1).squeeze(-1)  # first cdf > u: (N,)
    return token if index is None else index.gather(-1, token[:, None]).squeeze(-1)


@torch.no_grad()
def sample(model, input_ids, attention_mask, *, max_new_tokens, eos_token_id, pad_token_id,
           num_samples=1, temperature=1.0, top_p=1.0, top_k=0, greedy=False, generator=None,
           return_logprobs=False):
    """Sample `num_samples` completions for each of B left-padded prompts.

    input_ids, attention_mask: (B, P). Returns completion ids and mask, both (B*num_samples, T) with
    T <= max_new_tokens; the rows of prompt i are i*num_samples ... i*num_samples + G - 1. The mask
    is 1 up to and including each row's EOS; after it, ids are pad_token_id. With return_logprobs,
    also the (N, T) float32 log-prob of each drawn token under softmax(logits / temperature), the
    quantity the learner recomputes.
    """
    eos = torch.as_tensor(eos_token_id, device=input_ids.device).flatten()  # one or several stop ids
    cache = DynamicCache()
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                cache=cache, use_cache=True, logits_to_keep=1)  # fills `cache` in place
    logits = out.logits[:, -1]  # (B, V)
    if num_samples > 1:
        cache.batch_repeat_interleave(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)  # (N, V), N = B*G
        attention_mask = attention_mask.repeat_interleave(num_samples, dim=0)
    pos = positions(attention_mask)[:, -1:]  # (N, 1)
    n = logits.size(0)
    tokens = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(n, dtype=torch.bool, device=input_ids.device)
    logps = torch.zeros((n, max_new_tokens), device=input_ids.device) if return_logprobs else None
    for t in range(max_new_tokens):
        token = next_token(logits, temperature, top_p, top_k, generator, greedy)
        tokens[:, t] = token.masked_fill(done, pad_token_id)
        if return_logprobs:
            scaled = logits.float() / temperature
            logps[:, t] = scaled.gather(-1, token[:, None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)
        done = done | torch.isin(token, eos)
        if t == max_new_tokens - 1 or (t % EOS_CHECK_EVERY == EOS_CHECK_EVERY - 1 and bool(done.all())):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(n, 1)], dim=1)
        pos = pos + 1
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=pos,
                    cache=cache, use_cache=True)
        logits = out.logits[:, -1]
    tokens = tokens[:, : t + 1]  # (N, T)
    mask = completion_mask(tokens, eos)
    if return_logprobs:
        return tokens, mask, logps[:, : t + 1] * mask
    return tokens, mask


def completion_mask(tokens, eos):
    """1 for every token up to and including the first EOS of its row, 0 after. tokens: (N, T)."""
    is_eos = torch.isin(tokens, eos).int()
    after = is_eos.cumsum(-1) - is_eos  # EOS seen strictly before this position
    return (after == 0).long()
