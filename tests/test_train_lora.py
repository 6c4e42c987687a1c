"""LoRA, precision and memory in the training loop: adapters only, the base as reference, PEFT checkpoints."""
import math
import os

import pytest
import torch

import config
import lora
import train
from mirror import divergence

LENGTH = [{"type": "length", "params": {"target_length": 3}}]
LORA = dict(use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, rewards=LENGTH, eval_size=0)


def make(small, **kw):
    return config.make(**{**small, **LORA, **kw})


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_only_the_adapters_learn_and_the_reference_is_the_base(small):
    run = train.setup(make(small, max_steps=2))
    model = run.model
    assert run.ref_model is None and lora.is_lora(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A" in n or ".lora_B" in n for n in trained)
    assert {n for g in run.optimizer.param_groups for n, p in model.named_parameters() if any(p is q for q in g["params"])} == trained
    before = params(model)
    m1, _ = train.train_step(run)
    m2, _ = train.train_step(run)
    after = params(model)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trained)  # the base never moves
    assert max((before[n] - after[n]).abs().max().item() for n in trained) > 1e-4
    assert m1["bregman"] == 0.0  # B = 0: the adapted model is the base when step 1 samples and learns
    assert m2["bregman"] > 0  # after one update the policy has moved away from the base
    assert m1["sampler_logp_gap"] < 1e-5  # the sampler runs the learner's adapted weights, unmerged
    for phase in ("sample", "reference", "learn"):
        assert m1[f"memory/{phase}_mib"] > 0


def test_lora_checkpoint_is_a_peft_adapter(small, tmp_path, tiny_dir):
    run = train.setup(make(small, max_steps=2, output_dir=str(tmp_path / "a")))
    ckpt = train.fit(run)["checkpoint"]
    files = os.listdir(ckpt)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files)  # no copy of the base
    from safetensors.torch import load_file
    saved = load_file(os.path.join(ckpt, "adapter_model.safetensors"))
    trained = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
    assert len(saved) == len(trained)
    for n, p in trained.items():  # PEFT's key names
        torch.testing.assert_close(saved["base_model.model." + n + ".weight"], p.detach(), rtol=0, atol=0)

    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        ours = run.model.eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(base, ckpt).eval()(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-5


def test_resume_with_lora_matches_an_uninterrupted_run(small, tmp_path, monkeypatch):
    kw = dict(max_steps=4, save_steps=2)
    straight = train.setup(make(small, output_dir=str(tmp_path / "straight"), **kw))
    train.fit(straight)
    real = train.train_step

    def crash(run):
        if run.step == 3:
            raise RuntimeError("interrupted")
        return real(run)

    monkeypatch.setattr(train, "train_step", crash)
    with pytest.raises(RuntimeError):
        train.train(make(small, output_dir=str(tmp_path / "cut"), **kw))
    monkeypatch.setattr(train, "train_step", real)
    resumed = train.setup(make(small, output_dir=str(tmp_path / "cut"), resume="latest", **kw))
    train.fit(resumed)
    a, b = params(straight.model), params(resumed.model)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_full_checkpoint_does_not_resume_as_lora_and_back(small, tmp_path):
    full = train.train(config.make(**{**small, "rewards": LENGTH, "eval_size": 0, "max_steps": 1,
                                     "output_dir": str(tmp_path / "full")}))
    with pytest.raises(ValueError, match="without use_lora"):
        train.fit(train.setup(make(small, max_steps=2, output_dir=str(tmp_path / "x"), resume=full["checkpoint"])))
    lo = train.train(make(small, max_steps=1, output_dir=str(tmp_path / "lora")))
    with pytest.raises(ValueError, match="use_lora=True"):
        train.fit(train.setup(config.make(**{**small, "rewards": LENGTH, "eval_size": 0, "max_steps": 2,
                                            "output_dir": str(tmp_path / "y"), "resume": lo["checkpoint"]})))


def test_gradient_checkpointing_with_lora_gives_the_same_update(small):
    runs = []
    for gc in (False, True):
        run = train.setup(make(small, gradient_checkpointing=gc, optimizer="sgd", learning_rate=0.5,
                               output_dir=f"{small['output_dir']}-{gc}"))
        train.fit(run)
        runs.append({n: p.detach() for n, p in run.model.named_parameters() if p.requires_grad})
    assert max((runs[0][n] - runs[1][n]).abs().max().item() for n in runs[0]) < 1e-6
    assert max(p.abs().max().item() for n, p in runs[0].items() if "lora_B" in n) > 0


def test_bf16_base_keeps_log_probs_and_the_mirror_in_fp32(small):
    run = train.setup(make(small, precision="bf16", max_steps=1))
    model = run.model
    base = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert {p.dtype for p in base} == {torch.bfloat16}
    assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}
    m, _ = train.train_step(run)  # the adapters move, so step 2's policy differs from the base
    assert math.isfinite(m["loss"]) and m["grad_norm"] > 0
    gen = torch.Generator().manual_seed(0)
    batch = train.rollout(run, run.train_set[:2], 4, generator=gen)
    batch["chunks"] = train.forwards(run, batch)
    assert train.forward(run, model, train.completion_logprobs, batch, batch["chunks"][0])[0].dtype == torch.float32
    logp, ref = train.step_logprobs(run, batch), train.step_logprobs(run, batch, reference=True)  # (N, T)
    mask = batch["mask"].bool()
    ours = divergence("neural_mirror", logp, ref, mirror=run.mirror, coef=1.0)[mask]
    exact = run.mirror.double().bregman(logp.double().exp(), ref.double().exp())[mask]
    run.mirror.float()
    assert (ours >= 0).all()
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-9)
    # the same terms in bf16, as a system that follows the model's dtype computes them: wrong by far more
    naive = run.mirror.to(torch.bfloat16).bregman(logp.bfloat16().exp(), ref.bfloat16().exp()).double()[mask]
    run.mirror.float()
    assert (naive - exact).abs().max() > 100 * (ours.double() - exact).abs().max()


def test_bad_lora_settings_stop_before_training(small):
    with pytest.raises(ValueError, match="did you mean"):
        train.setup(make(small, lora_target_modules=["q_prj"]))
    with pytest.raises(ValueError, match="lora_r"):
        train.setup(make(small, lora_r=0))
    run = train.setup(make(small, lora_target_modules="q_proj,v_proj"))
    assert {n.rsplit(".", 1)[-1] for n in lora.lora_layers(run.model)} == {"q_proj", "v_proj"}
