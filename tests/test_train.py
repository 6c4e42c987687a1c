"""The training loop end to end on a tiny model: files, resume, accumulation, reference, loss math, failures."""
import json
import math
import os
import statistics
import subprocess
import sys
import types

import pytest
import torch

import config
import tasks
import es
import logprobs
import train
from mirror import NeuralMirror
from sampler import completion_mask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a reward that varies on a random model (its completions differ in word count), so the loss has a gradient
LENGTH = [{"type": "length", "params": {"target_length": 3}}]
TIMING = ("step_time", "tokens_per_s")
STEP_KEYS = ("reward", "reward_std", "frac_zero_std_groups", "completion_length", "completion_length_max",
             "truncated_frac", "loss", "entropy", "clip_low", "clip_high", "bregman", "grad_norm", "lr",
             "tokens_per_s", "step_time", "sampler_logp_gap", "rewards/math_correctness", "rewards/math_correctness_std", "accuracy")


def make(small, **kw):
    return config.make(**{**small, **kw})


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def max_change(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def untimed(row):
    return {k: v for k, v in row.items() if k not in TIMING and not k.startswith(("time_", "memory/"))}


def fixed_length_sampler(monkeypatch, eos_at):
    """Sample as usual, then end row i with an EOS at eos_at(i, T) (None: no EOS, full length)."""
    real = train.sample

    def sample(model, ids, mask, **kw):
        tokens, _, _ = real(model, ids, mask, **kw)
        eos, pad = kw["eos_token_id"][0], kw["pad_token_id"]
        tokens = tokens.masked_fill(torch.isin(tokens, torch.as_tensor([*kw["eos_token_id"], pad])), 100)
        for i in range(tokens.size(0)):
            t = eos_at(i, tokens.size(1))
            if t is not None:
                tokens[i, t] = eos
                tokens[i, t + 1:] = pad
        new_mask = completion_mask(tokens, torch.as_tensor(kw["eos_token_id"]))
        return tokens, new_mask, torch.zeros(tokens.shape)  # the rewritten tokens have no sampler log-probs

    monkeypatch.setattr(train, "sample", sample)


# ---------------------------------------------------------------------------- end to end

def test_train_writes_metrics_samples_and_checkpoints(small):
    cfg = make(small, eval_on_start=True, save_steps=1, save_total_limit=1)
    result = train.train(cfg)
    out = cfg.output_dir

    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval/accuracy" in rows[0] and "eval/reward" in rows[0]
    for row in rows[1:]:
        missing = [k for k in STEP_KEYS if k not in row]
        assert not missing, missing
    for row in rows:
        for k, v in row.items():
            if isinstance(v, (int, float)):
                assert math.isfinite(v), (row["step"], k, v)
    assert "eval/accuracy" in rows[-1]  # the last step evaluates

    samples = read_jsonl(os.path.join(out, "samples.jsonl"))
    assert samples and {"step", "prompt", "completion", "reward"} <= samples[0].keys()

    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-2"]
    assert not [d for d in os.listdir(out) if d.startswith(".tmp-")]
    ckpt = os.path.join(out, "checkpoint-2")
    for name in ("model.safetensors", "optimizer.safetensors", "mirror.safetensors", "rng.safetensors",
                 "trainer_state.json"):
        assert os.path.isfile(os.path.join(ckpt, name)), name
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        assert json.load(f)["step"] == 2

    assert result["output_dir"] == out
    assert os.path.samefile(result["checkpoint"], ckpt)
    assert result["metrics"]["step"] == 2
    assert untimed(result["metrics"]) == untimed(rows[-1])


def test_bf16_autocast_trains_with_float32_logprobs(small):
    run = train.setup(make(small, precision="bf16", rewards=LENGTH))
    assert run.amp_dtype == torch.bfloat16
    before = params(run.model)
    train.fit(run)
    rows = read_jsonl(os.path.join(run.cfg.output_dir, "metrics.jsonl"))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert max_change(params(run.model), before) > 0
    batch = train.rollout(run, run.train_set[:2], 2, generator=torch.Generator().manual_seed(0))
    logp, _ = train.forward(run, run.model, train.completion_logprobs, batch, train.forwards(run, batch)[0])
    assert logp.dtype == torch.float32


def test_save_total_limit_keeps_the_newest(small):
    cfg = make(small, max_steps=3, save_steps=1, save_total_limit=2, eval_size=0)
    train.train(cfg)
    assert sorted(d for d in os.listdir(cfg.output_dir) if d.startswith("checkpoint-")) == \
        ["checkpoint-2", "checkpoint-3"]


# ---------------------------------------------------------------------------- resume

def test_resume_reproduces_an_uninterrupted_run(small, tmp_path, monkeypatch):
    kw = dict(max_steps=4, save_steps=2, rewards=LENGTH)
    straight = train.setup(make(small, output_dir=str(tmp_path / "straight"), **kw))
    initial = params(straight.model)
    train.fit(straight)

    out = str(tmp_path / "interrupted")
    real_step = train.train_step

    def crash_at_step_4(run):  # after step 3 is logged, past the checkpoint of step 2
        if run.step == 3:
            raise RuntimeError("interrupted")
        return real_step(run)

    monkeypatch.setattr(train, "train_step", crash_at_step_4)
    with pytest.raises(RuntimeError, match="interrupted"):
        train.train(make(small, output_dir=out, **kw))
    monkeypatch.setattr(train, "train_step", real_step)
    resumed = train.setup(make(small, output_dir=out, resume="latest", **kw))
    train.fit(resumed)

    a = read_jsonl(os.path.join(str(tmp_path / "straight"), "metrics.jsonl"))
    b = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert untimed(ra) == untimed(rb), ra["step"]
    assert a[-1]["grad_norm"] > 0

    final = params(straight.model)
    assert same(final, params(resumed.model))
    assert max_change(final, initial) > 1e-4
    assert same(params(resumed.ref_model), initial)  # the reference stays the initial weights


# ---------------------------------------------------------------------------- gradient accumulation

@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_gradient_accumulation_does_not_change_the_update(small, monkeypatch, loss_type):
    fixed_length_sampler(monkeypatch, lambda row, T: (3 * row) % T)  # ragged: lengths 1, 4, 7, 2, 5, 8, 3, 6
    deltas = []
    for gas in (1, 4):
        run = train.setup(make(small, loss_type=loss_type, gradient_accumulation_steps=gas, optimizer="sgd",
                               learning_rate=0.1, max_grad_norm=0.0, rewards=LENGTH, eval_size=0))
        before = params(run.model)
        m, _ = train.train_step(run)
        assert m["frac_zero_std_groups"] < 1 and m["completion_length_max"] > 1 and m["truncated_frac"] < 1
        after = params(run.model)
        deltas.append({k: after[k] - before[k] for k in before})
    one, four = deltas
    assert max(d.abs().max().item() for d in one.values()) > 1e-3
    for k in one:
        torch.testing.assert_close(four[k], one[k], atol=1e-6, rtol=1e-4, msg=k)


@pytest.mark.parametrize("divergence_type, loss_type, iterations", [
    ("neural_mirror", "grpo", 1), ("kl", "dapo", 2), ("none", "dr_grpo", 1)])
def test_fused_loss_gives_the_same_update(small, monkeypatch, divergence_type, loss_type, iterations):
    fixed_length_sampler(monkeypatch, lambda row, T: (3 * row) % T)
    deltas, metrics = [], []
    for fused in (True, False):
        run = train.setup(make(small, fused_loss=fused, divergence_type=divergence_type, loss_type=loss_type,
                               num_iterations=iterations, mirror_coefficient=0.5, beta=0.5, optimizer="sgd",
                               learning_rate=0.1, max_grad_norm=0.0, rewards=LENGTH, eval_size=0,
                               output_dir=f"{small['output_dir']}-{fused}"))
        before = params(run.model)
        m, _ = train.train_step(run)
        metrics.append(m)
        deltas.append({k: v - before[k] for k, v in params(run.model).items()})
    assert max(d.abs().max().item() for d in deltas[1].values()) > 1e-3
    for k in deltas[0]:
        torch.testing.assert_close(deltas[0][k], deltas[1][k], atol=1e-6, rtol=1e-4, msg=k)
    for key in ("loss", "entropy", "ratio", "clip_low", "clip_high", "sampler_logp_gap"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("loss_type, divergence_type, iterations, fused", [
    ("grpo", "neural_mirror", 1, True), ("bnpo", "kl", 2, True), ("dr_grpo", "none", 1, False),
    ("dapo", "prob_l2", 1, True)])
def test_length_sorted_forwards_give_the_same_update(small, monkeypatch, loss_type, divergence_type, iterations,
                                                     fused):
    """The learner's length-sorted forwards, each cut to its longest row, against the rows in order at the batch's
    full width (the learner before): the same update to 1e-6, the same metrics."""
    fixed_length_sampler(monkeypatch, lambda row, T: (5 * row + 2) % T)  # ragged: 2, 7, 12, 17, 22, 3, 8, 13, ...
    real, seen = train.forwards, []

    def full_width(run, batch):  # the learner before: rows in order, padded to the batch's widths
        n, m, g = batch["ids"].size(0), batch["ids"].size(0) // run.cfg.gradient_accumulation_steps, run.cfg.num_generations
        share = (torch.arange(0, m, g), torch.arange(m) // g)  # each group's prompt once, as the learner before did
        return [logprobs.Chunk(torch.arange(i, i + m), batch["prompt_ids"].size(1), batch["ids"].size(1), share)
                for i in range(0, n, m)]

    def record(run, batch):
        seen.append(batch)
        return real(run, batch)

    deltas, metrics = [], []
    for forwards in (full_width, record):
        monkeypatch.setattr(train, "forwards", forwards)
        run = train.setup(make(small, loss_type=loss_type, divergence_type=divergence_type, num_iterations=iterations,
                               fused_loss=fused, max_completion_length=24, batch_size=3, gradient_accumulation_steps=3,
                               mirror_coefficient=0.5, beta=0.5, optimizer="sgd", learning_rate=0.1, max_grad_norm=0.0,
                               rewards=LENGTH, eval_size=0, output_dir=f"{small['output_dir']}-{forwards.__name__}"))
        before = params(run.model)
        m, _ = train.train_step(run)
        metrics.append(m)
        deltas.append({k: v - before[k] for k, v in params(run.model).items()})
    chunks, width = seen[0]["chunks"], seen[0]["ids"].size(1)
    n = seen[0]["ids"].size(0)  # sorted and cut: most of the padding is skipped
    assert len(chunks) > 3 and sum(len(c.rows) * c.length for c in chunks) < 0.7 * n * width
    assert any(c.rows.tolist() != list(range(c.rows[0], c.rows[0] + len(c.rows))) for c in chunks)
    assert max(d.abs().max().item() for d in deltas[0].values()) > 1e-3
    for k in deltas[0]:
        torch.testing.assert_close(deltas[1][k], deltas[0][k], atol=1e-6, rtol=1e-6, msg=k)
    for key in ("loss", "entropy", "ratio", "clip_low", "clip_high", "bregman", "kl", "sampler_logp_gap"):
        if key in metrics[0]:
            assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-5, abs=1e-7), key


# ---------------------------------------------------------------------------- reference policy

def test_reference_is_a_frozen_copy_of_the_initial_weights(small, tiny_dir):
    from transformers import AutoModelForCausalLM
    run = train.setup(make(small, rewards=LENGTH, eval_size=0))
    model, ref = run.model, run.ref_model
    on_disk = params(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32))
    assert same(params(ref), on_disk)
    assert same(params(model), on_disk)
    policy_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not policy_ptrs & {p.data_ptr() for p in ref.parameters()}
    assert not any(p.requires_grad for p in ref.parameters())

    train.train_step(run)
    assert max_change(params(model), on_disk) > 1e-4
    assert same(params(ref), on_disk)
    assert all(p.grad is None for p in ref.parameters())


def test_divergence_none_has_no_reference(small):
    run = train.setup(make(small, divergence_type="none", rewards=LENGTH, eval_size=0))
    assert run.ref_model is None
    m, _ = train.train_step(run)
    assert m["divergence"] == 0 and math.isfinite(m["loss"]) and m["grad_norm"] > 0


# ---------------------------------------------------------------------------- advantages

def test_group_advantages_by_hand():
    r = torch.tensor([0.0, 1.0, 1.0, 2.0, 5.0, 5.0, 5.0, 5.0])
    g1 = [0.0, 1.0, 1.0, 2.0]
    centred = [x - 1.0 for x in g1] + [0.0] * 4  # group means 1 and 5
    std1 = statistics.stdev(g1)  # sqrt(2/3)
    batch_std = statistics.stdev(r.tolist())

    def check(scale, expected):
        torch.testing.assert_close(train.group_advantages(r, 4, scale), torch.tensor(expected), rtol=1e-5, atol=1e-6)

    check("group", [c / (std1 + 1e-4) for c in centred[:4]] + [0.0] * 4)
    check("batch", [c / (batch_std + 1e-4) for c in centred])
    check("none", centred)


def test_zero_std_group_gives_zero_advantages():
    adv = train.group_advantages(torch.full((6,), 0.7), 3, "group")
    assert torch.equal(adv, torch.zeros(6))


# ---------------------------------------------------------------------------- loss terms

MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
ADV = torch.tensor([1.0, -2.0], dtype=torch.float64)


def fake_run(**kw):
    cfg = config.make(**{"divergence_type": "none", "max_completion_length": 4, **kw})
    return types.SimpleNamespace(cfg=cfg, mirror=NeuralMirror(0.5, seed=1))


def logps(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(2, 3, generator=g, dtype=torch.float64) * -3).requires_grad_(True)


def terms(run, logp, old, ref, adv, mask, weights):
    """A micro-batch's share of the step loss with the step's token weights, and its per-token sums, as learn forms them."""
    per_token, stats = train.objective(run, logp, old, ref, adv[:, None])
    return (per_token * weights).sum(), {k: (v.double() * mask).sum().item() for k, v in stats.items()}


def step_loss(run, logp, old, ref=None, adv=ADV, mask=MASK):
    return terms(run, logp, old, ref, adv, mask, train.token_weights(run.cfg, mask, dtype=logp.dtype))


def test_token_weights():
    m = MASK.double()
    grpo = train.token_weights(fake_run(loss_type="grpo").cfg, MASK, dtype=torch.float64)
    torch.testing.assert_close(grpo, torch.tensor([[1 / 2, 1 / 2, 0], [1 / 3, 1 / 3, 1 / 3]]).double() / 2)
    for loss_type in ("bnpo", "dapo"):  # over the step's 5 tokens
        torch.testing.assert_close(train.token_weights(fake_run(loss_type=loss_type).cfg, MASK), m.float() / 5)
    torch.testing.assert_close(train.token_weights(fake_run(loss_type="dr_grpo").cfg, MASK), m.float() / (2 * 4))
    # under torchrun the grpo and dr_grpo denominators count every process's sequences
    torch.testing.assert_close(train.token_weights(fake_run(loss_type="dr_grpo").cfg, MASK, world=3),
                               m.float() / (3 * 2 * 4))


@pytest.mark.parametrize("loss_type,expected", [
    ("grpo", ((-1.0 * 2) / 2 + (2.0 * 3) / 3) / 2),  # mean over each sequence, then over sequences
    ("bnpo", (-1.0 * 2 + 2.0 * 3) / 5),  # over all tokens
    ("dr_grpo", (-1.0 * 2 + 2.0 * 3) / (2 * 4)),  # sum / (sequences * max_completion_length)
    ("dapo", (-1.0 * 2 + 2.0 * 3) / 5),  # sum / tokens in the batch
])
def test_loss_type_aggregation_at_ratio_one(loss_type, expected):
    run = fake_run(loss_type=loss_type)
    logp = logps()
    loss, stats = step_loss(run, logp, logp.detach())  # ratio 1: each token's term is -A
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert stats["ratio"] == pytest.approx(5.0) and stats["clip_low"] == stats["clip_high"] == 0
    # cut into micro-batches with the step's weights, the parts add up to the whole
    weights = train.token_weights(run.cfg, MASK, dtype=torch.float64)
    parts = sum(terms(run, logp[i:i + 1], logp.detach()[i:i + 1], None, ADV[i:i + 1], MASK[i:i + 1],
                      weights[i:i + 1])[0] for i in range(2))
    assert parts.item() == pytest.approx(loss.item(), abs=1e-12)


def one_token(run, ratio, adv):
    """Loss and d loss / d logp of a single token with the given ratio and advantage (bnpo: its own mean)."""
    old = torch.tensor([[-1.0]], dtype=torch.float64)
    logp = (old + math.log(ratio)).requires_grad_(True)
    loss, stats = step_loss(run, logp, old, adv=torch.tensor([adv], dtype=torch.float64), mask=torch.ones(1, 1))
    loss.backward()
    return loss.item(), logp.grad.item(), stats


def test_clipping_and_its_zero_gradient():
    run = fake_run(loss_type="bnpo", epsilon=0.2)
    loss, grad, stats = one_token(run, 1.5, 2.0)  # above 1 + eps with A > 0: clipped to 1.2
    assert loss == pytest.approx(-1.2 * 2.0) and grad == 0 and stats["clip_high"] == 1
    loss, grad, stats = one_token(run, 1.5, -2.0)  # A < 0: the unclipped, more pessimistic term
    assert loss == pytest.approx(1.5 * 2.0) and grad == pytest.approx(1.5 * 2.0) and stats["clip_high"] == 0
    loss, grad, stats = one_token(run, 0.5, -2.0)  # below 1 - eps with A < 0: clipped to 0.8
    assert loss == pytest.approx(0.8 * 2.0) and grad == 0 and stats["clip_low"] == 1
    loss, grad, _ = one_token(run, 1.1, 2.0)  # inside the range: -rho*A, gradient -rho*A
    assert loss == pytest.approx(-1.1 * 2.0) and grad == pytest.approx(-1.1 * 2.0)


def test_epsilon_low_and_high_are_separate():
    run = fake_run(loss_type="bnpo", epsilon=0.2, epsilon_low=0.1, epsilon_high=0.3)
    loss, grad, stats = one_token(run, 1.25, 2.0)  # inside 1 + 0.3: not clipped
    assert loss == pytest.approx(-1.25 * 2.0) and grad != 0 and stats["clip_high"] == 0
    loss, grad, stats = one_token(run, 0.85, -2.0)  # below 1 - 0.1: clipped to 0.9
    assert loss == pytest.approx(0.9 * 2.0) and grad == 0 and stats["clip_low"] == 1
    loss, grad, stats = one_token(fake_run(loss_type="bnpo", epsilon=0.2), 1.25, 2.0)  # symmetric 0.2 clips it
    assert loss == pytest.approx(-1.2 * 2.0) and grad == 0 and stats["clip_high"] == 1


def test_regulariser_weights():
    logp, ref = logps(0), logps(1).detach()
    zero = torch.zeros(2, dtype=torch.float64)
    m = MASK.double()

    run = fake_run(loss_type="dapo", divergence_type="kl", beta=0.5, mirror_coefficient=7.0)
    loss, stats = step_loss(run, logp, logp.detach(), ref, adv=zero)
    k3 = torch.exp(ref - logp) - (ref - logp) - 1
    assert loss.item() == pytest.approx(0.5 * (k3 * m).sum().item() / 5, rel=1e-9)
    assert stats["divergence"] == pytest.approx((k3 * m).sum().item(), rel=1e-9)

    run = fake_run(loss_type="dapo", divergence_type="neural_mirror", mirror_coefficient=0.3, beta=9.0)
    loss, stats = step_loss(run, logp, logp.detach(), ref, adv=zero)
    d = run.mirror.bregman(logp.exp(), ref.exp())
    assert (d * m).sum().item() > 0
    assert loss.item() == pytest.approx(0.3 * (d * m).sum().item() / 5, rel=1e-9)
    assert stats["divergence"] == pytest.approx((d * m).sum().item(), rel=1e-9)

    # with the advantages back, the surrogate and the regulariser add
    full, _ = step_loss(run, logp, logp.detach(), ref)
    assert full.item() == pytest.approx(loss.item() + (-1.0 * 2 + 2.0 * 3) / 5, rel=1e-9)


# ---------------------------------------------------------------------------- failures and options

@pytest.mark.parametrize("fused", [True, False])
def test_non_finite_step_is_skipped_and_counted(small, monkeypatch, fused):
    real_objective, real_step = train.objective, train.train_step

    def nan_on_first_step(run, *args):
        per_token, stats = real_objective(run, *args)
        return (per_token * float("nan") if run.step == 0 else per_token), stats

    snapshots = []

    def recording(run):
        out = real_step(run)
        snapshots.append(params(run.model))
        return out

    monkeypatch.setattr(train, "objective", nan_on_first_step)
    monkeypatch.setattr(train, "train_step", recording)
    run = train.setup(make(small, rewards=LENGTH, eval_size=0, fused_loss=fused))
    initial = params(run.model)
    result = train.fit(run)

    assert same(snapshots[0], initial)
    assert max_change(snapshots[1], snapshots[0]) > 1e-4
    assert run.skipped_steps == 1 and result["skipped_steps"] == 1
    rows = read_jsonl(os.path.join(run.cfg.output_dir, "metrics.jsonl"))
    assert [r["skipped_steps"] for r in rows] == [1, 1]
    assert math.isfinite(rows[1]["loss"]) and math.isfinite(rows[1]["grad_norm"])
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_num_iterations_two_uses_old_logprobs(small):
    run = train.setup(make(small, num_iterations=2, rewards=LENGTH, eval_size=0))
    m, _ = train.train_step(run)
    for k in ("loss", "entropy", "clip_low", "clip_high", "ratio", "bregman", "grad_norm"):
        assert math.isfinite(m[k]), k
    assert 0 <= m["clip_low"] <= 1 and 0 <= m["clip_high"] <= 1
    assert m["ratio"] != 1.0  # the second pass sees the moved policy against the old log-probs
    steps = {int(s["step"]) for s in run.optimizer.state.values()}
    assert steps == {2}


@pytest.mark.parametrize("masked", [True, False])
def test_mask_truncated_completions(small, monkeypatch, masked):
    fixed_length_sampler(monkeypatch, lambda row, T: None)
    run = train.setup(make(small, mask_truncated_completions=masked, rewards=LENGTH, eval_size=0))
    before = params(run.model)
    m, _ = train.train_step(run)
    assert m["truncated_frac"] == 1 and m["frac_zero_std_groups"] < 1
    if masked:
        assert m["loss"] == 0 and m["grad_norm"] == 0
        assert same(params(run.model), before)
    else:
        assert m["grad_norm"] > 0
        assert max_change(params(run.model), before) > 1e-4


def test_rewards_receive_reference_and_row_columns(small):
    calls = []

    def spy(text, reference=None, **kwargs):
        calls.append((reference, kwargs))
        return float(len(text.split()))

    cfg = make(small, dataset_name="toy", max_samples=40, rewards=[{"type": spy}],
               processing_fn=lambda row: {**row, "answer_copy": row["answer"]})
    train.train(cfg)
    n_train = cfg.max_steps * cfg.batch_size * cfg.num_generations
    assert len(calls) == n_train + cfg.eval_size
    for reference, kwargs in calls:
        assert {"prompt", "answer_copy"} <= kwargs.keys()
        assert "text" not in kwargs and "reference" not in kwargs
        assert reference == tasks.extract_gsm8k(kwargs["answer_copy"]) and reference.isdigit()
    for i in range(0, n_train, cfg.num_generations):  # the G completions of a prompt are scored with its row
        assert len({kw["prompt"] for _, kw in calls[i:i + cfg.num_generations]}) == 1


def test_mbpp_trains_with_sandboxed_tests_that_the_references_pass(small, tmp_path):
    from test_data import MBPP_ROWS
    folder = tmp_path / "mbpp"
    folder.mkdir()
    rows = [dict(r, task_id=r["task_id"] + 100 * k, text=f"{r['text']} (variant {k})") for k in range(4) for r in MBPP_ROWS]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make({k: v for k, v in small.items() if k != "column_mapping"}, dataset_name=str(folder), eval_size=2, max_steps=1,
               rewards=[{"type": "code_correctness", "params": {"timeout": 5.0}}, {"type": "code_syntax", "weight": 0.1}])
    run = train.setup(cfg)
    examples = run.train_set[:4]
    total, columns = train.score(run, examples, [ex["reference"] for ex in examples])  # the reference solutions
    assert columns["code_correctness"] == [1.0] * 4 and total.tolist() == [pytest.approx(1.1)] * 4
    _, columns = train.score(run, examples, ["```python\ndef remove_Occ(s, ch):\n    return s\n```"] * 4)
    assert columns["code_correctness"] == [0.0, 0.0, 0.0, 0.0] and columns["code_syntax"] == [1.0] * 4
    train.train(cfg)
    m = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert 0.0 <= m[0]["rewards/code_correctness"] <= 1.0


# ---------------------------------------------------------------------------- bad configs

@pytest.mark.parametrize("bad", ["model", "dataset", "reward", "fp16", "resume"])
def test_bad_config_raises_before_writing(small, tmp_path, bad):
    kw = {"model": {"model_name": str(tmp_path / "no-model")},
          "dataset": {"dataset_name": str(tmp_path / "no-data.jsonl")},
          "reward": {"reward_functions": ["math_corectness"]},
          "fp16": {"precision": "fp16"},
          "resume": {"resume": str(tmp_path / "no-checkpoint")}}[bad]
    cfg = make(small, **kw)
    with pytest.raises(ValueError):
        train.train(cfg)
    assert not os.path.exists(cfg.output_dir)


def test_cli_bad_model_exits_2_with_one_error_line(small, tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in small.items()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "train.py", "--config", str(path), "--model_name=/nonexistent"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model_name" in errors[0]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert not os.path.exists(small["output_dir"])


def test_an_earlier_run_in_output_dir_is_never_overwritten(small):
    train.train(make(small, save_steps=1))
    before = read_jsonl(os.path.join(small["output_dir"], "metrics.jsonl"))
    with pytest.raises(ValueError, match="resume=latest"):
        train.setup(make(small))
    assert read_jsonl(os.path.join(small["output_dir"], "metrics.jsonl")) == before


def test_resume_latest_without_a_checkpoint_starts_over(small):
    out = small["output_dir"]
    os.makedirs(out)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1, "reward": 0.5}\n{"step": 2, "rew')  # a run killed mid-line before its first save
    result = train.train(make(small, resume="latest"))
    assert result["steps"] == 2
    assert [r["step"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))] == [1, 2]


def test_gradient_checkpointing_gives_the_same_update(small):
    runs = []
    for gc in (False, True):
        run = train.setup(make(small, gradient_checkpointing=gc, rewards=LENGTH, optimizer="sgd", learning_rate=0.1,
                               output_dir=f"{small['output_dir']}-{gc}"))  # sgd: Adam would magnify float noise
        assert run.model.training and run.model.is_activation_checkpointing == gc
        initial = params(run.model)
        train.fit(run)
        runs.append(params(run.model))
        assert max_change(runs[-1], initial) > 1e-4
    assert max_change(runs[0], runs[1]) < 1e-6


def test_sampler_and_learner_agree_on_the_log_probs(small):
    train.train(make(small, max_steps=3, num_iterations=2, rewards=LENGTH))
    gaps = [r["sampler_logp_gap"] for r in read_jsonl(os.path.join(small["output_dir"], "metrics.jsonl"))]
    assert len(gaps) == 3 and all(g < 1e-4 for g in gaps)  # fp32: the same weights, the same function


def test_held_out_score_trains_with_the_given_mirror_and_saves_nothing(small, tmp_path):
    mirror = NeuralMirror(0.5, seed=7)
    cfg = config.make(**small, mirror_coefficient=1.0, reward_functions=["math_correctness"])
    score = es.held_out_score(cfg, mirror, "accuracy")
    assert 0.0 <= score <= 1.0
    assert not [d for d in os.listdir(cfg.output_dir) if d.startswith("checkpoint-")]  # ES throws it away
    assert torch.equal(mirror.to_vector(), NeuralMirror(0.5, seed=7).to_vector())  # the caller's map is untouched
    path = str(tmp_path / "m.safetensors")
    mirror.save(path)
    run = train.setup(config.make(**{**small, "output_dir": str(tmp_path / "o2")}, mirror_path=path))
    assert torch.equal(run.mirror.to_vector(), mirror.to_vector())  # mirror_path replaces the random map
    with pytest.raises(ValueError, match="mirror_path='nope' is not a file"):
        config.make(**small, mirror_path="nope")


def test_each_process_evaluates_its_share(small, monkeypatch):
    """Rank 1 of 2 samples every other held-out prompt, as many batches as rank 0 (a stand-in where it has none
    left), and the sums it reduces count only its own prompts."""
    run = train.setup(make(small, rewards=LENGTH, eval_size=5, eval_batch_size=2))
    whole = train.evaluate(run)
    seen, reduced = [], []
    rollout = train.rollout
    monkeypatch.setattr(train, "rollout", lambda run_, examples, *a, **k: seen.append(examples) or
                        rollout(run_, examples, *a, **k))
    monkeypatch.setattr(train, "all_reduce", lambda x, world, op="sum": reduced.append(x.tolist()) or x)
    run.rank, run.world = 1, 2
    train.evaluate(run)
    assert seen == [run.eval_set[1:4:2], run.eval_set[:1]]  # its two prompts, then a stand-in batch
    assert reduced[0][1] == 2  # rows counted: its own
    run.rank, run.world = 0, 1
    assert train.evaluate(run) == whole
