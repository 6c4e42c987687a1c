"""logprobs.py: the chunked kernel against log_softmax + gather, its gradients, and the model-level wrapper."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

import common
import logprobs

N, D, V = 53, 32, 301


def naive(hidden, weight, targets, temperature):
    logp_all = torch.log_softmax(hidden @ weight.T / temperature, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), entropy


def inputs(scale_h, scale_w, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g) * scale_h
    weight = torch.randn(V, D, generator=g) * scale_w
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, targets


SCALES = {"realistic": (1.0, 0.02), "hard": (3.0, 1.0)}
CHUNKS = [1, 7, 16, N, 1000]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_forward_matches_log_softmax(scale, chunk, temperature):
    hidden, weight, targets = inputs(*SCALES[scale])
    logp, entropy = logprobs.token_logprobs(hidden, weight, targets, temperature, chunk)
    ref_logp, ref_entropy = naive(hidden.double(), weight.double(), targets, temperature)
    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == entropy.shape == (N,)
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-5, rtol=1e-5)


def test_hard_scale_is_not_flat():
    """The hard inputs give peaked, varied distributions, so agreement with the naive path means something."""
    hidden, weight, targets = inputs(*SCALES["hard"])
    logp, entropy = naive(hidden, weight, targets, 0.7)
    assert entropy.min() < 1.0 and logp.min() < -20


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("chunk", [1, 7, N, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradients_match_autograd(scale, chunk, temperature):
    hidden, weight, targets = inputs(*SCALES[scale])
    g = torch.Generator().manual_seed(1)
    up_logp, up_entropy = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = logprobs.token_logprobs(h, w, targets, temperature, chunk)
    (logp.double() * up_logp + entropy.double() * up_entropy).sum().backward()

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref_logp, ref_entropy = naive(h64, w64, targets, temperature)
    (ref_logp * up_logp + ref_entropy * up_entropy).sum().backward()

    assert h.grad.dtype == hidden.dtype and w.grad.dtype == weight.dtype
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("use", ["logp", "entropy"])
def test_gradient_of_one_output_alone(use):
    hidden, weight, targets = inputs(*SCALES["hard"])
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = dict(zip(["logp", "entropy"], logprobs.token_logprobs(h, w, targets, 0.9, 8)))[use]
    out.sum().backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = dict(zip(["logp", "entropy"], naive(h64, w64, targets, 0.9)))[use]
    ref.sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-5 * h64.grad.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5 * w64.grad.abs().max().item(), rtol=1e-4)


def test_gradient_only_for_what_requires_it():
    hidden, weight, targets = inputs(*SCALES["realistic"])
    h = hidden.clone().requires_grad_()
    logp, _ = logprobs.token_logprobs(h, weight, targets, 1.0, 16)
    logp.sum().backward()
    assert h.grad is not None and weight.grad is None


def test_bfloat16_hidden_is_scored_in_float32():
    hidden, weight, targets = inputs(*SCALES["realistic"])
    h16, w16 = hidden.bfloat16(), weight.bfloat16()
    logp, entropy = logprobs.token_logprobs(h16, w16, targets, 1.0, 16)
    assert logp.dtype == torch.float32
    ref_logp, ref_entropy = naive(h16.float(), w16.float(), targets, 1.0)
    torch.testing.assert_close(logp, ref_logp, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(entropy, ref_entropy, atol=2e-2, rtol=1e-2)


# ------------------------------------------------------------------------------------------ the fused loss path

def surrogate(up):
    """A per-token loss of the GRPO kind: clipped ratio against fixed old log-probs, plus a squared term."""
    def loss_fn(lp, s):
        ratio = torch.exp(lp - (lp.detach() - 0.1))
        return (-torch.min(ratio * up[s], ratio.clamp(0.8, 1.2) * up[s]) + 0.3 * lp.double().exp() ** 2).sum()
    return loss_fn


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("chunk", [1, 7, N, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_loss_equals_logprobs_then_loss(scale, chunk, temperature):
    hidden, weight, targets = inputs(*SCALES[scale])
    loss_fn = surrogate(torch.randn(N, generator=torch.Generator().manual_seed(3)))

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, logp, entropy = logprobs.token_loss(h, w, targets, loss_fn, temperature, chunk)
    assert loss.dim() == 0 and not logp.requires_grad and not entropy.requires_grad
    loss.backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_logp, ref_entropy = naive(h2, w2, targets, temperature)
    ref_loss = loss_fn(ref_logp, slice(0, N))
    ref_loss.backward()

    torch.testing.assert_close(loss.double(), ref_loss.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logp, ref_logp.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy.detach(), atol=1e-5, rtol=1e-5)
    for got, want in ((h.grad, h2.grad), (w.grad, w2.grad)):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)


def test_fused_loss_upstream_grad_scales_and_frozen_weight_gets_none():
    hidden, weight, targets = inputs(*SCALES["hard"])
    loss_fn = surrogate(torch.randn(N, generator=torch.Generator().manual_seed(4)))
    h = hidden.clone().requires_grad_()
    loss, _, _ = logprobs.token_loss(h, weight, targets, loss_fn, 0.9, 8)
    (3.0 * loss).backward()
    assert weight.grad is None
    h2 = hidden.clone().requires_grad_()
    loss_fn(naive(h2, weight, targets, 0.9)[0], slice(0, N)).backward()
    torch.testing.assert_close(h.grad, 3.0 * h2.grad, atol=1e-5 * h2.grad.abs().max().item(), rtol=1e-4)


def test_fused_loss_in_bfloat16_is_within_bfloat16_tolerance():
    hidden, weight, targets = inputs(*SCALES["realistic"])
    loss_fn = surrogate(torch.randn(N, generator=torch.Generator().manual_seed(5)))
    h, w = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    loss, logp, _ = logprobs.token_loss(h, w, targets, loss_fn, 0.8, 16)
    loss.backward()
    assert logp.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    h2, w2 = hidden.bfloat16().float().requires_grad_(), weight.bfloat16().float().requires_grad_()
    ref_logp, _ = naive(h2, w2, targets, 0.8)
    loss_fn(ref_logp, slice(0, N)).backward()
    torch.testing.assert_close(logp, ref_logp.detach(), atol=2e-2, rtol=1e-2)
    for got, want in ((h.grad, h2.grad), (w.grad, w2.grad)):
        torch.testing.assert_close(got.float(), want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)


@pytest.mark.parametrize("fused", [False, True])
def test_autocast_runs_the_lm_head_matmuls_in_its_dtype(fused):
    hidden, weight, targets = inputs(*SCALES["realistic"])
    loss_fn = surrogate(torch.randn(N, generator=torch.Generator().manual_seed(8)))
    results = []
    for amp in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            if fused:
                loss, logp, _ = logprobs.token_loss(h, w, targets, loss_fn, 0.8, 16)
            else:
                logp, _ = logprobs.token_logprobs(h, w, targets, 0.8, 16)
                loss = loss_fn(logp, slice(0, N))
        loss.backward()
        results.append((logp.detach(), h.grad, w.grad))
    (lp32, gh32, gw32), (lp16, gh16, gw16) = results
    assert lp16.dtype == torch.float32 and gh16.dtype == gw16.dtype == torch.float32
    assert not torch.equal(lp16, lp32)  # bf16 matmuls, as autocast asks
    torch.testing.assert_close(lp16, lp32, atol=2e-2, rtol=1e-2)
    for got, want in ((gh16, gh32), (gw16, gw32)):
        torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)


# ------------------------------------------------------------------------------------------ the model wrapper

@pytest.fixture(scope="module")
def model(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)  # sharper than the random init: log-probs and their gradients vary across tokens
    return model.train(False)


@pytest.fixture(scope="module")
def batch(model):
    """Left-padded prompts of different lengths and completions that stop early (mask 0 after EOS)."""
    g = torch.Generator().manual_seed(0)
    v = model.config.vocab_size
    prompt_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]])
    prompt_ids = torch.randint(3, v, prompt_mask.shape, generator=g).masked_fill(prompt_mask == 0, 0)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    completion_ids = torch.randint(3, v, completion_mask.shape, generator=g).masked_fill(completion_mask == 0, 0)
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def naive_completion(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature):
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, prompt_ids.size(1) - 1:-1]
    logp_all = torch.log_softmax(logits.float() / temperature, -1)
    logp = logp_all.gather(-1, completion_ids[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp * completion_mask, entropy * completion_mask


PARAMS = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
          "model.layers.1.mlp.down_proj.weight", "model.norm.weight"]


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    named = dict(model.named_parameters())
    return {k: named[k].grad.clone() for k in PARAMS}


@pytest.mark.parametrize("temperature, chunk", [(1.0, 1024), (0.7, 4), (1.3, 1)])
def test_completion_logprobs_match_full_logits(model, batch, temperature, chunk):
    completion_mask = batch[3]
    weights = torch.randn(completion_mask.shape, generator=torch.Generator().manual_seed(2))

    logp, entropy = logprobs.completion_logprobs(model, *batch, temperature, chunk)
    got = grads(model, (logp * weights).sum() + (entropy * weights.flip(0)).sum())
    ref_logp, ref_entropy = naive_completion(model, *batch, temperature)
    want = grads(model, (ref_logp * weights).sum() + (ref_entropy * weights.flip(0)).sum())

    assert logp.shape == entropy.shape == completion_mask.shape and logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=1e-5)
    assert (logp[completion_mask == 1] < 0).all()
    assert logp.detach().std() > 0.1
    for name in PARAMS:
        assert want[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], want[name], atol=1e-5 * want[name].abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("temperature, chunk", [(1.0, 1024), (0.7, 4)])
def test_completion_loss_matches_logprobs_then_loss_tied_embeddings(model, batch, temperature, chunk):
    completion_mask = batch[3]
    weights = torch.randn(completion_mask.shape, generator=torch.Generator().manual_seed(6))
    keep = completion_mask.bool()
    loss_fn = surrogate(weights[keep])
    loss, logp, entropy = logprobs.completion_loss(model, *batch, loss_fn, temperature, chunk)
    got = grads(model, loss)
    ref_logp, ref_entropy = logprobs.completion_logprobs(model, *batch, temperature, chunk)
    want = grads(model, loss_fn(ref_logp[keep], slice(None)))
    torch.testing.assert_close(logp, ref_logp.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(entropy, ref_entropy.detach(), atol=1e-6, rtol=1e-6)
    for name in PARAMS:  # embed_tokens is also the lm_head: both of its gradients arrive
        assert want[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], want[name], atol=1e-5 * want[name].abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("length", [5, 1])
def test_one_prompt_pass_per_distinct_prompt_changes_nothing(model, batch, fused, length):
    prompt_ids, prompt_mask, _, _ = batch
    owner = torch.tensor([2, 0, 0, 1, 2, 2, 0, 1, 1])  # row i has prompt owner[i], in no particular order
    gen = torch.Generator().manual_seed(7)
    completion_ids = torch.randint(3, model.config.vocab_size, (len(owner), length), generator=gen)
    lengths = torch.tensor([5, 1, 3, 2, 5, 4, 1, 1, 5]).clamp(max=length)
    completion_mask = (torch.arange(length)[None] < lengths[:, None]).long()
    rows = (prompt_ids[owner], prompt_mask[owner], completion_ids, completion_mask)
    share = (torch.tensor([1, 3, 0]), owner)  # the first row of each prompt, and each row's prompt among those
    weights = torch.randn(completion_mask.shape, generator=gen)
    keep = completion_mask.bool()
    results = []
    for s in (None, share):
        if fused:
            loss, logp, _ = logprobs.completion_loss(model, *rows, surrogate(weights[keep]), 0.9, 4, share=s)
        else:
            logp, entropy = logprobs.completion_logprobs(model, *rows, 0.9, 4, share=s)
            loss = (logp * weights).sum() + entropy.sum()
        results.append((logp.detach(), grads(model, loss)))
    (logp_1, grads_1), (logp_g, grads_g) = results
    torch.testing.assert_close(logp_g, logp_1, atol=1e-5, rtol=1e-5)
    for name in PARAMS:
        assert grads_1[name].abs().max() > 0, name
        torch.testing.assert_close(grads_g[name], grads_1[name], atol=1e-5 * grads_1[name].abs().max().item(), rtol=1e-4)


def test_length_chunks():
    lengths = torch.tensor([10, 40, 39, 12, 7, 40, 25, 26])  # 2 prompts x 4 completions
    chunks = logprobs.length_chunks(lengths, torch.tensor([5, 5, 5, 5, 9, 9, 9, 9]), max_rows=3, group=4)
    # sorted 40 40 39 | 26 25 (max_rows) | 12 10 (CHUNK_RATIO shorter) | 7 (CHUNK_RATIO shorter than 12)
    assert [c.rows.tolist() for c in chunks] == [[1, 2, 5], [6, 7], [0, 3], [4]]
    assert [(c.prompt, c.length) for c in chunks] == [(9, 40), (9, 26), (5, 12), (9, 7)]
    assert [None if c.share is None else [x.tolist() for x in c.share] for c in chunks] == [
        [[0, 2], [0, 0, 1]], [[0], [0, 0]], [[0], [0, 0]], [[0], [0]]]  # rows 1, 2 share prompt 0; 5 has prompt 1
    alone = logprobs.length_chunks(lengths, torch.full((8,), 5), max_rows=8, group=1)
    assert all(c.share is None for c in alone)
    for count in (4, 6, 8):  # FSDP: every process runs as many forwards; the largest are halved
        more = logprobs.length_chunks(lengths, torch.full((8,), 5), max_rows=3, group=4, count=count)
        assert len(more) == count and sorted(torch.cat([c.rows for c in more]).tolist()) == list(range(8))
        assert all(c.length == lengths[c.rows].max() for c in more)
    short = logprobs.length_chunks(torch.tensor([1, 1, 5, 1]), torch.full((4,), 5), max_rows=4, group=2)
    assert [c.length for c in short] == [5, 2]  # every shared forward has a completion pass


def test_masked_positions_are_zero_and_carry_no_gradient(model, batch):
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    masked = completion_mask == 0
    logp, entropy = logprobs.completion_logprobs(model, *batch, 1.0, 3)
    assert (logp[masked] == 0).all() and (entropy[masked] == 0).all()
    assert (logp[~masked] != 0).all() and (entropy[~masked] != 0).all()

    weights = torch.ones(completion_mask.shape)
    base = grads(model, (logp * weights).sum() + entropy.sum())
    logp, entropy = logprobs.completion_logprobs(model, *batch, 1.0, 3)
    heavy = weights.masked_fill(masked, 1e6)
    heavy_grads = grads(model, (logp * heavy).sum() + (entropy * heavy).sum())
    for name in PARAMS:
        torch.testing.assert_close(heavy_grads[name], base[name])

    other_ids = completion_ids.masked_fill(masked, 7)  # what sits after EOS does not matter
    again, _ = logprobs.completion_logprobs(model, prompt_ids, prompt_mask, other_ids, completion_mask, 1.0, 3)
    torch.testing.assert_close(again, logp.detach())


def test_prompt_padding_does_not_change_the_result(model, batch):
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    pad = 4
    wider_ids = torch.cat([torch.zeros(3, pad, dtype=torch.long), prompt_ids], 1)
    wider_mask = torch.cat([torch.zeros(3, pad, dtype=torch.long), prompt_mask], 1)
    with torch.no_grad():
        a, _ = logprobs.completion_logprobs(model, *batch, 1.0, 5)
        b, _ = logprobs.completion_logprobs(model, wider_ids, wider_mask, completion_ids, completion_mask, 1.0, 5)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class VocabTensors(TorchDispatchMode):
    """Records, for every new (non-view) op output with a vocab-sized last dimension, how many rows it has."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                self.rows.append(t.numel() // self.vocab)
        return out


def test_no_full_vocab_tensor(model, batch):
    chunk = 2
    tokens = int(batch[3].sum())
    assert tokens > chunk

    naive_mode = VocabTensors(model.config.vocab_size)
    with naive_mode:
        ref, _ = naive_completion(model, *batch, 1.0)
        ref.sum().backward()
    assert max(naive_mode.rows) >= tokens  # the detector sees the full logits of the naive path

    mode = VocabTensors(model.config.vocab_size)
    with mode:
        logp, entropy = logprobs.completion_logprobs(model, *batch, 1.0, chunk)
        (logp.sum() + entropy.sum()).backward()
    assert mode.rows and max(mode.rows) <= chunk

    mode = VocabTensors(model.config.vocab_size)
    with mode:
        loss, _, _ = logprobs.completion_loss(model, *batch, lambda lp, s: lp.sum(), 1.0, chunk)
        loss.backward()
    assert mode.rows and max(mode.rows) <= chunk


def test_compiled_kernel_equals_eager():
    """40 rows in chunks of 16: the last chunk is a shorter view of the reused buffer, which torch 2.11's inductor
    (dynamic shapes) read from before the in-place log-softmax, its log-probs off by the logsumexp."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(40, 16), torch.randn(96, 16)
    targets, up = torch.randint(0, 96, (40,)), torch.randn(2, 40)
    results = []
    for compile in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, ent = logprobs.token_logprobs(h, w, targets, 0.7, chunk_size=16, compile=compile)
        (logp * up[0] + ent * up[1]).sum().backward()
        results.append((logp.detach(), ent.detach(), h.grad, w.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compiled_fused_loss_equals_eager():
    torch.manual_seed(0)
    hidden, weight = torch.randn(40, 16), torch.randn(96, 16)
    targets, loss_fn = torch.randint(0, 96, (40,)), surrogate(torch.randn(40))
    results = []
    for compile in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, logp, ent = logprobs.token_loss(h, w, targets, loss_fn, 0.7, chunk_size=16, compile=compile)
        loss.backward()
        results.append((loss.detach(), logp, ent, h.grad, w.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(fn, **kw):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(logprobs.torch, "compile", broken)
    monkeypatch.setattr(common, "_COMPILED", {})
    monkeypatch.setattr(common, "_FAILED", set())
    hidden, weight, targets = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))
    with pytest.warns(UserWarning, match="running eagerly"):
        logp, _ = logprobs.token_logprobs(hidden, weight, targets, compile=True)
    torch.testing.assert_close(logp, torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1))
