"""sampler.py: greedy equals HF generate, EOS and masks, G samples per prompt, seeded noise, the token law."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import common
import sampler

PROMPTS = ["hello", "what is 3 plus 4 and then a few more words", "a b c", "Question: 12 + 30"]
K = 12


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="module")
def enc(tokenizer):
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    lengths = enc["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) == len(PROMPTS) and (enc["attention_mask"][:, 0] == 0).any()
    return enc


@pytest.fixture(scope="module")
def flat_model(tiny_dir):
    """The random tiny model as saved: next-token distributions are close to uniform."""
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def peaked_model(tiny_dir):
    """The tiny model with every weight scaled up, so greedy argmaxes are well separated."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


def run(model, enc, tokenizer, eos=None, **kw):
    kw.setdefault("max_new_tokens", K)
    return sampler.sample(model, enc["input_ids"], enc["attention_mask"],
                          eos_token_id=tokenizer.eos_token_id if eos is None else eos,
                          pad_token_id=tokenizer.pad_token_id, **kw)


def hf_greedy(model, enc, eos, pad, k=K):
    out = model.generate(**enc, do_sample=False, max_new_tokens=k, eos_token_id=eos, pad_token_id=pad)
    return out[:, enc["input_ids"].size(1):]


def first_hit(row, eos):
    """Index of the first token of `row` in `eos`, or None."""
    return next((j for j, t in enumerate(row) if t in eos), None)


@pytest.fixture(scope="module")
def reference(peaked_model, enc, tokenizer):
    """The greedy trajectories with no stop token in reach, checked to be far from argmax ties."""
    ids, mask = run(peaked_model, enc, tokenizer, greedy=True)
    assert tokenizer.eos_token_id not in ids and mask.all()
    cat = torch.cat([enc["input_ids"], ids], 1)
    cat_mask = torch.cat([enc["attention_mask"], mask], 1)
    with torch.no_grad():
        logits = peaked_model(input_ids=cat, attention_mask=cat_mask,
                              position_ids=sampler.positions(cat_mask)).logits[:, enc["input_ids"].size(1) - 1:-1]
    top2 = logits.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-3
    assert (logits.argmax(-1) == ids).all()
    return ids.tolist()


def stop_tokens(reference, stops):
    """EOS ids making row r stop at step j for each (r, j) in `stops`, checked against the trajectories."""
    eos = sorted({reference[r][j] for r, j in stops.items()})
    for r, row in enumerate(reference):
        assert first_hit(row, eos) == stops.get(r), "pick other stop steps: the chosen ids appear earlier"
    return eos


@pytest.mark.parametrize("stops", [{}, {0: 3}, {1: 0, 3: 5}, {0: 2, 1: 1, 2: 0, 3: 5}],
                         ids=["no-eos", "one-row", "two-eos-ids", "all-rows-stop"])
def test_greedy_matches_generate(peaked_model, enc, tokenizer, reference, stops):
    eos = stop_tokens(reference, stops) if stops else [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id
    ids, mask = run(peaked_model, enc, tokenizer, eos=eos, greedy=True)
    expected = hf_greedy(peaked_model, enc, eos, pad)
    n = expected.size(1)
    assert ids.shape == mask.shape and ids.size(0) == len(PROMPTS) and n <= ids.size(1) <= K
    assert torch.equal(ids[:, :n], expected)
    assert (ids[:, n:] == pad).all()
    for r in range(len(PROMPTS)):
        stop = stops.get(r, K - 1)
        assert mask[r, :stop + 1].eq(1).all() and mask[r, stop + 1:].eq(0).all()
        assert (ids[r, stop + 1:] == pad).all()
        assert ids[r, :stop + 1].tolist() == reference[r][:stop + 1]
    if len(stops) < len(PROMPTS):
        assert ids.size(1) == K


def test_all_rows_stopped_ends_early(peaked_model, enc, tokenizer, reference):
    eos = stop_tokens(reference, {0: 0, 1: 0, 2: 0, 3: 1})
    ids, mask = run(peaked_model, enc, tokenizer, eos=eos, greedy=True, max_new_tokens=4 * sampler.EOS_CHECK_EVERY)
    assert ids.size(1) <= sampler.EOS_CHECK_EVERY
    assert mask.sum(-1).tolist() == [1, 1, 1, 2]


def test_eos_token_id_int_and_list_agree(peaked_model, enc, tokenizer, reference):
    eos = reference[0][3]
    a = run(peaked_model, enc, tokenizer, eos=eos, greedy=True)
    b = run(peaked_model, enc, tokenizer, eos=[eos], greedy=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[1][0].sum() == 4


@pytest.mark.parametrize("g", [2, 3])
def test_greedy_samples_are_copies_of_one_sample(peaked_model, enc, tokenizer, reference, g):
    eos = stop_tokens(reference, {1: 4})
    one, one_mask = run(peaked_model, enc, tokenizer, eos=eos, greedy=True)
    ids, mask = run(peaked_model, enc, tokenizer, eos=eos, greedy=True, num_samples=g)
    assert ids.shape == (len(PROMPTS) * g, one.size(1)) and mask.shape == ids.shape
    assert torch.equal(ids, one.repeat_interleave(g, dim=0))
    assert torch.equal(mask, one_mask.repeat_interleave(g, dim=0))


def seeded(model, enc, tokenizer, seed, **kw):
    kw = {"temperature": 1.0, "max_new_tokens": 8, **kw}
    return run(model, enc, tokenizer, generator=torch.Generator().manual_seed(seed), **kw)


def test_seed_reproduces_and_global_rng_is_untouched(flat_model, enc, tokenizer):
    torch.manual_seed(1)
    a, _ = seeded(flat_model, enc, tokenizer, 0, num_samples=3)
    torch.manual_seed(2)
    b, _ = seeded(flat_model, enc, tokenizer, 0, num_samples=3)
    c, _ = seeded(flat_model, enc, tokenizer, 1, num_samples=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_samples_of_one_prompt_differ(flat_model, enc, tokenizer):
    g = 4
    ids, mask = seeded(flat_model, enc, tokenizer, 0, num_samples=g)
    assert ids.shape[0] == len(PROMPTS) * g
    rows = [tuple(r) for r in ids.tolist()]
    assert len(set(rows)) == len(rows)
    first = ids[:, 0].view(len(PROMPTS), g)
    assert all(len(set(f.tolist())) > 1 for f in first)


def test_sampled_rows_follow_their_own_prompt(peaked_model, enc, tokenizer):
    """At a low temperature sampling is greedy in practice, so each block of G rows is its prompt's trajectory."""
    g = 3
    greedy, _ = run(peaked_model, enc, tokenizer, greedy=True, max_new_tokens=4)
    ids, _ = seeded(peaked_model, enc, tokenizer, 0, num_samples=g, max_new_tokens=4, temperature=1e-4)
    assert torch.equal(ids, greedy.repeat_interleave(g, dim=0))


def test_never_calls_generate(flat_model, enc, tokenizer, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("sample() must not call generate")
    monkeypatch.setattr(flat_model, "generate", boom)
    ids, mask = seeded(flat_model, enc, tokenizer, 0, num_samples=2, top_p=0.9, top_k=50)
    assert ids.shape == mask.shape == (2 * len(PROMPTS), 8)


# ------------------------------------------------------------------------------------------ lean decode, compile

def other_family(kind, tokenizer):
    """A random tiny llama or qwen2 (untied head, biased projections for qwen2), scaled up so that its
    next-token laws are far from uniform."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    config = config_cls(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    return model


def through_forward(monkeypatch, fn):
    """fn() with the sampler decoding through the model's own forward instead of the lean step."""
    with monkeypatch.context() as m:
        m.setattr(sampler, "lean", lambda model: False)
        return fn()


@pytest.mark.parametrize("kw", [dict(num_samples=3, top_p=0.9), dict(num_samples=2, top_k=20, temperature=0.7),
                                dict(greedy=True)])
def test_lean_decode_gives_the_samples_of_the_model_forward(flat_model, peaked_model, enc, tokenizer, kw,
                                                            monkeypatch):
    model = peaked_model if kw.get("greedy") else flat_model
    assert sampler.lean(model)
    eos = [tokenizer.eos_token_id, 5, 9]  # frequent stops: rows end at different steps
    if kw.get("greedy"):  # stop where row 0 of the greedy trajectory is at step 3
        eos.append(run(model, enc, tokenizer, greedy=True, max_new_tokens=4)[0][0, 3].item())

    def go():
        return run(model, enc, tokenizer, eos=eos, generator=torch.Generator().manual_seed(0), return_logprobs=True,
                   max_new_tokens=20, **kw)
    fast, slow = go(), through_forward(monkeypatch, go)
    assert slow[1].sum(1).min() < slow[1].size(1)  # some rows stopped early
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    torch.testing.assert_close(fast[2], slow[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_lean_decode_matches_other_llama_family_models(kind, enc, tokenizer, monkeypatch):
    model = other_family(kind, tokenizer)
    assert sampler.lean(model)

    def go():
        return run(model, enc, tokenizer, generator=torch.Generator().manual_seed(0), return_logprobs=True,
                   num_samples=2, top_p=0.95, max_new_tokens=16)
    fast, slow = go(), through_forward(monkeypatch, go)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    torch.testing.assert_close(fast[2], slow[2], atol=1e-5, rtol=1e-5)


def test_lean_decode_is_only_taken_where_it_reproduces_the_model(flat_model, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    windowed = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                            use_sliding_window=True, sliding_window=8, max_window_layers=0))
    assert sampler.lean(flat_model) and not sampler.lean(gpt2) and not sampler.lean(windowed)
    ids = torch.randint(1, 64, (2, 5))
    out = sampler.sample(gpt2.eval(), ids, torch.ones_like(ids), max_new_tokens=4, eos_token_id=0, pad_token_id=0,
                         generator=torch.Generator().manual_seed(0))
    assert out[0].shape == (2, 4)


@pytest.mark.parametrize("fast", [True, False])
def test_compiled_decode_equals_eager(flat_model, enc, tokenizer, fast, monkeypatch):
    monkeypatch.setattr(sampler, "lean", lambda model: fast)
    kw = dict(num_samples=2, top_p=0.9, max_new_tokens=4, return_logprobs=True)
    eager = run(flat_model, enc, tokenizer, generator=torch.Generator().manual_seed(0), **kw)
    compiled = run(flat_model, enc, tokenizer, generator=torch.Generator().manual_seed(0), compile=True, **kw)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])
    torch.testing.assert_close(compiled[2], eager[2], atol=1e-5, rtol=1e-5)


def test_failed_compile_falls_back_to_eager(flat_model, enc, tokenizer, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(sampler.torch, "compile", lambda fn, **kw: broken)
    monkeypatch.setattr(common, "_COMPILED", {})
    monkeypatch.setattr(common, "_FAILED", set())
    with pytest.warns(UserWarning, match="running eagerly"):
        ids, _ = run(flat_model, enc, tokenizer, generator=torch.Generator().manual_seed(0), compile=True, max_new_tokens=4)
    want, _ = run(flat_model, enc, tokenizer, generator=torch.Generator().manual_seed(0), max_new_tokens=4)
    assert torch.equal(ids, want)


# ------------------------------------------------------------------------------------------ next_token

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0, 1.5, -0.5])
N = 20000


def frequencies(tokens, v=LOGITS.numel()):
    return torch.bincount(tokens, minlength=v).double() / tokens.numel()


def chi2(freq, probs, n=N):
    """Pearson's statistic over the cells the expected law gives mass to."""
    keep = probs > 0
    return float((n * (freq[keep] - probs[keep]) ** 2 / probs[keep]).sum())


def draw(temperature=1.0, top_p=1.0, top_k=0, seed=0, logits=LOGITS):
    gen = torch.Generator().manual_seed(seed)
    return sampler.next_token(logits.expand(N, -1), temperature, top_p, top_k, gen)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_next_token_law_is_softmax_at_temperature(temperature):
    probs = torch.softmax(LOGITS.double() / temperature, -1)
    freq = frequencies(draw(temperature))
    assert chi2(freq, probs) < 30  # 7 degrees of freedom: p < 1e-4
    wrong = torch.softmax(LOGITS.double(), -1) if temperature != 1 else torch.softmax(LOGITS.double() / 0.8, -1)
    assert chi2(freq, wrong) > 100


@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_next_token_top_k(top_k):
    tokens = draw(0.9, top_k=top_k)
    kept = LOGITS.topk(top_k).indices
    probs = torch.zeros(LOGITS.numel(), dtype=torch.float64)
    probs[kept] = torch.softmax(LOGITS[kept].double() / 0.9, -1)
    assert set(tokens.unique().tolist()) == set(kept.tolist())
    assert chi2(frequencies(tokens), probs) < 30


def nucleus(probs, top_p):
    order = probs.argsort(descending=True)
    size = int((probs[order].cumsum(0) < top_p).sum()) + 1
    return order[:size]


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.8, 0.93])
def test_next_token_top_p(top_p):
    full = torch.softmax(LOGITS.double(), -1)
    kept = nucleus(full, top_p)
    assert abs(float(full[kept].sum()) - top_p) > 0.01 and abs(float(full[kept[:-1]].sum()) - top_p) > 0.01
    probs = torch.zeros_like(full)
    probs[kept] = full[kept] / full[kept].sum()
    tokens = draw(1.0, top_p=top_p)
    assert set(tokens.unique().tolist()) == set(kept.tolist())
    assert chi2(frequencies(tokens), probs) < 30


def test_next_token_top_k_then_top_p():
    full = torch.softmax(LOGITS.double(), -1)
    top3 = LOGITS.topk(3).indices
    renorm = torch.zeros_like(full)
    renorm[top3] = full[top3] / full[top3].sum()
    kept = nucleus(renorm, 0.75)
    assert len(kept) == 2
    tokens = draw(1.0, top_p=0.75, top_k=3)
    assert set(tokens.unique().tolist()) == set(kept.tolist())


def test_next_token_rows_use_their_own_logits_and_greedy_is_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 0.1
    hot = torch.tensor([3, 17, 0, 49, 25, 8])
    logits[torch.arange(6), hot] = 20.0
    assert torch.equal(sampler.next_token(logits, greedy=True), hot)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sampler.next_token(logits, 1.0, 0.9, 0, gen), hot)
    logits[torch.arange(6), hot] = 0.0
    many = sampler.next_token(logits.repeat(2000, 1), 1.0, generator=gen).view(2000, 6)
    assert all(len(many[:, r].unique()) > 40 for r in range(6))


@pytest.mark.parametrize("top_p, top_k, greedy", [(1.0, 0, False), (0.9, 0, False), (0.9, 5, False),
                                                    (1.0, 0, True)])
def test_choose_gives_the_token_of_next_token_and_its_log_prob(top_p, top_k, greedy):
    """The sampler's head: the token next_token draws from the same uniforms, and its log-prob under
    softmax(logits / T), read off the sampling law itself where no top-k filter changes it."""
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(8, 5000, generator=gen)).to(torch.bfloat16)
    u = torch.rand(8, sampler.draws_per_row(top_p), generator=gen)
    token, logp = sampler._choose(logits, u, 0.7, top_p, top_k, greedy, True)
    assert torch.equal(token, sampler.next_token(logits, 0.7, top_p, top_k, greedy=greedy, u=u))
    want = torch.log_softmax(logits.double() / 0.7, -1).gather(-1, token[:, None]).squeeze(-1)
    torch.testing.assert_close(logp.double(), want, atol=1e-5, rtol=0)
    assert sampler._choose(logits, u, 0.7, top_p, top_k, greedy, False)[1] is None


def test_a_compiled_draw_leaves_the_cumsum_to_aten_off_the_cpu():
    """Inductor before torch 2.13 fuses the split scan it makes of a long cumsum over few rows (CUDA) with the
    argmax over the same rows and fails to build: compiled sampling fell back to eager at batch 1 to 64 on an
    H200. Off the CPU (here: meta tensors, traced like CUDA ones) the graph calls the opaque nmgrpo::cdf; on
    the CPU, inductor's own cumsum, faster there."""
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 300, generator=gen).softmax(-1)
    u = torch.rand(2, sampler.draws_per_row(0.9), generator=gen)
    for device, op in (("meta", "nmgrpo.cdf"), ("cpu", "cumsum")):
        graphs = []

        def keep_graph(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        token = torch.compile(sampler.draw, backend=keep_graph, fullgraph=True)(probs.to(device), u.to(device), 0.9)
        code = "\n".join(g.code for g in graphs)
        assert op in code and ("cumsum" if op == "nmgrpo.cdf" else "nmgrpo.cdf") not in code
    assert torch.equal(token, sampler.draw(probs, u, 0.9))
    assert torch.equal(sampler._cdf(probs), probs.cumsum(-1))


def test_next_token_accepts_half_precision_logits():
    gen = torch.Generator().manual_seed(0)
    tokens = sampler.next_token(LOGITS.to(torch.bfloat16).expand(N, -1), 1.0, 1.0, 0, gen)
    probs = torch.softmax(LOGITS.to(torch.bfloat16).double(), -1)
    assert chi2(frequencies(tokens), probs) < 30


# ------------------------------------------------------------------------------------------ completion_mask

@pytest.mark.parametrize("tokens, eos, expected", [
    ([[5, 6, 7, 8]], [2], [[1, 1, 1, 1]]),
    ([[5, 2, 7, 8]], [2], [[1, 1, 0, 0]]),
    ([[2, 2, 0, 0]], [2], [[1, 0, 0, 0]]),
    ([[5, 6, 7, 2]], [2], [[1, 1, 1, 1]]),
    ([[5, 9, 2, 9]], [2, 9], [[1, 1, 0, 0]]),
    ([[5, 6, 2, 9], [9, 6, 6, 6], [1, 1, 1, 1]], [2, 9], [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]),
])
def test_completion_mask(tokens, eos, expected):
    mask = sampler.completion_mask(torch.tensor(tokens), torch.tensor(eos))
    assert mask.tolist() == expected


def test_positions_of_left_padded_rows():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    pos = sampler.positions(mask)
    assert pos[mask.bool()].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0]


def test_next_token_never_draws_a_filtered_token_even_when_u_is_zero():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])  # token 0 is outside the top 2
    assert sampler.next_token(logits, top_k=2, u=torch.zeros(1)).item() == 1  # the first kept token in vocabulary order


@pytest.mark.parametrize("scale", [0.1, 1.0, 8.0])  # flat, moderate, peaked
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
def test_in_nucleus_agrees_with_sorting(scale, top_p):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(16, 500, generator=g) * scale, -1)
    draws = torch.randint(0, 500, (16, 40), generator=g)
    draws[:, 0] = probs.argmax(-1)  # always inside
    sorted_p, order = probs.sort(-1, descending=True)
    head = (sorted_p.cumsum(-1) - sorted_p) < top_p  # the mass before each sorted token is < top_p
    want = torch.zeros_like(head).scatter(-1, order, head).gather(-1, draws)
    got = sampler.in_nucleus(probs, draws, top_p)
    assert torch.equal(got, want) and got[:, 0].all()
    assert top_p > 0.5 or (~got).any()  # some draws fall outside


def test_in_nucleus_keeps_ties_together():
    probs = torch.softmax(torch.tensor([[3.0, 3.0, 3.0, 0.0, 0.0]]), -1)  # three tied at the top hold 0.98
    inside = sampler.in_nucleus(probs, torch.tensor([[0, 1, 2, 3, 4]]), 0.05)
    assert inside.tolist() == [[True, True, True, False, False]]


def test_draws_per_row():
    assert sampler.draws_per_row(1.0) == 1
    assert (1 - 0.9) ** sampler.draws_per_row(0.9) < 1e-12 <= (1 - 0.9) ** (sampler.draws_per_row(0.9) - 1)
    assert sampler.draws_per_row(1e-6) == 1024


def test_greedy_draws_no_noise(peaked_model, enc, tokenizer):
    state = torch.random.get_rng_state()
    run(peaked_model, enc, tokenizer, greedy=True, num_samples=2, top_p=0.9)
    assert torch.equal(torch.random.get_rng_state(), state)


# ------------------------------------------------------------------------------------------ finished rows leave

def batch_sizes(monkeypatch):
    """The running batch size of every lean decode step, recorded."""
    sizes, inner = [], sampler._lean_decode

    def spy(model, token, *args):
        sizes.append(token.size(0))
        return inner(model, token, *args)
    monkeypatch.setattr(sampler, "_lean_decode", spy)
    return sizes


def spread_stops(model, tokenizer, enc, **kw):
    """Sampled completions whose rows stop at many different steps (frequent stop ids), and the kwargs used."""
    kw = dict(eos=[tokenizer.eos_token_id, *range(5, 15)], num_samples=4, max_new_tokens=48, return_logprobs=True,
              generator=torch.Generator().manual_seed(3), **kw)
    out = run(model, enc, tokenizer, **kw)
    lengths = out[1].sum(1)
    assert len(set(lengths.tolist())) >= 6 and lengths.min() < sampler.EOS_CHECK_EVERY < 48 == lengths.max()
    return out, kw


def without_compaction(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(sampler, "COMPACT_AT", 0.0)  # never: every row runs to the end, as before
        return fn()


@pytest.mark.parametrize("greedy", [False, True])
def test_compaction_keeps_every_token_and_logprob(flat_model, peaked_model, enc, tokenizer, greedy, monkeypatch):
    model = peaked_model if greedy else flat_model
    kw = {}
    if greedy:  # greedy rows stop where each row's own trajectory meets a stop id: pick ids from them
        ref = run(model, enc, tokenizer, greedy=True, num_samples=4, max_new_tokens=48)[0]
        kw = dict(greedy=True, eos=[ref[0, 2].item(), ref[1, 11].item(), ref[2, 20].item()], num_samples=1,
                  max_new_tokens=48)
        sizes = batch_sizes(monkeypatch)
        got = run(model, enc, tokenizer, return_logprobs=True, **kw)
    else:
        sizes = batch_sizes(monkeypatch)
        got, kw = spread_stops(model, tokenizer, enc)
    n = got[0].size(0)
    assert min(sizes) < n and sorted(sizes, reverse=True) == sizes  # rows left the batch, never came back
    if greedy:
        assert got[1].sum(1).min() < 24 and got[1].sum(1).max() == 48
    if "generator" in kw:
        kw["generator"] = torch.Generator().manual_seed(3)
    want = without_compaction(monkeypatch, lambda: run(model, enc, tokenizer, **{**kw, "return_logprobs": True}))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], atol=1e-5, rtol=1e-5)  # other batch sizes, other rounding


def test_compaction_keeps_each_rows_noise_across_process_splits(flat_model, enc, tokenizer, monkeypatch):
    """Two processes sharing a seed, each sampling half the prompts with noise_rows, draw what one process does."""
    whole, kw = spread_stops(flat_model, tokenizer, enc)
    half = enc["input_ids"].size(0) // 2
    parts = []
    for r in range(2):
        part = {k: v[r * half:(r + 1) * half] for k, v in enc.items()}
        parts.append(run(flat_model, part, tokenizer, **{**kw, "generator": torch.Generator().manual_seed(3),
                                                            "noise_rows": (r * half * 4, 2 * half * 4)}))
    t = max(p[0].size(1) for p in parts)
    assert t == whole[0].size(1)
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    torch.testing.assert_close(torch.cat([p[2] for p in parts]), whole[2], atol=1e-5, rtol=1e-5)


def test_processor_edits_the_running_rows_logits(flat_model, enc, tokenizer, monkeypatch):
    """A processor that makes the stop id certain at a per-row step: each row ends exactly there, compacted."""
    eos = tokenizer.eos_token_id
    stop_at = torch.tensor([3, 40, 9, 17, 1, 25, 33, 12])  # each row's last step

    def force(logits, rows, t):
        logits = logits.clone()
        logits[:, eos] = float("-inf")
        logits[stop_at[rows] == t] = torch.where(torch.arange(logits.size(1)) == eos, 0.0, float("-inf"))
        return logits
    sizes = batch_sizes(monkeypatch)
    ids, mask = run(flat_model, enc, tokenizer, num_samples=2, max_new_tokens=48, processor=force,
                    generator=torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == (stop_at + 1).tolist() and (ids[:, 41:] == tokenizer.pad_token_id).all()
    assert (ids.gather(1, stop_at[:, None]) == eos).all() and min(sizes) < len(stop_at)


def test_compiled_compaction_uses_few_shapes(flat_model, enc, tokenizer, monkeypatch):
    sizes = []

    def record(logits, rows, t):  # runs outside the compiled step
        sizes.append(rows.numel())
        return logits
    got, kw = spread_stops(flat_model, tokenizer, enc, compile=True, processor=record)
    n = got[0].size(0)
    assert set(sizes) <= {n >> i for i in range(sampler.COMPILED_SIZES)} and min(sizes) < n
    assert not common._FAILED, "a compiled step fell back to eager"
    kw["generator"] = torch.Generator().manual_seed(3)
    want = without_compaction(monkeypatch, lambda: run(flat_model, enc, tokenizer, **{**kw, "compile": False}))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], atol=1e-5, rtol=1e-5)


def test_bench_realistic_lengths_are_forced_on_both_sides():
    """bench.py's realistic-length rows: the sampler (processor) and HF generate (logits_processor) each stop
    every row after exactly its drawn length; the case asserts it on every call."""
    import bench
    for side in ("ours", "hf"):
        step, _ = bench.case_sampler(dict(model="tiny", batch=4, side=side, lengths="real"))
        step()  # asserts that every row's completion has exactly its length
