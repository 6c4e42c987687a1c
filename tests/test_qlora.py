"""QLoRA: our LoRA adapters over bitsandbytes' 4-bit (nf4) and 8-bit linears, the frozen base loaded quantized."""
import sys

import bitsandbytes as bnb
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import config
import load
import lora
import sampler
import train
import trl_backend

LENGTH = [{"type": "length", "params": {"target_length": 3}}]
LORA = dict(use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, rewards=LENGTH, eval_size=0)
BITS = {4: (dict(load_in_4bit=True), bnb.nn.Linear4bit), 8: (dict(load_in_8bit=True), bnb.nn.Linear8bitLt)}
IDS = torch.tensor([[1, 5, 9, 13, 2, 7], [0, 0, 4, 8, 15, 16]])


def make(small, bits, **kw):
    return config.make(**{**small, **LORA, **BITS[bits][0], **kw})


def quantized(folder, bits):
    """The model at `folder` loaded as load.policy loads it, quantized, without adapters."""
    cfg = make(dict(model_name=folder, device="cpu", precision="fp32"), bits)
    return load.model_and_tokenizer(folder, torch.device("cpu"), cfg, quantization_config=load.quantization(cfg, None))


def packed(model):
    """{name: packed weight} of the model's quantized linears."""
    kinds = tuple(cls for _, cls in BITS.values())
    return {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, kinds)}


@pytest.mark.parametrize("bits", [4, 8])
def test_adapters_train_on_a_quantized_base_and_peft_loads_them(small, tiny_dir, bits):
    run = train.setup(make(small, bits, max_steps=3, save_steps=3))
    model = run.model
    assert {type(m.base_layer) for m in lora.lora_layers(model).values()} == {BITS[bits][1]}
    head = model.get_output_embeddings()  # the log-prob kernel reads its weight: never quantized
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained.keys() == {n for n, _ in lora.lora_parameters(model)}
    assert {p.dtype for p in trained.values()} == {torch.float32}
    base, adapters = packed(model), {n: p.detach().clone() for n, p in trained.items()}
    out = train.fit(run)
    after = packed(model)
    assert all(torch.equal(w, after[n]) for n, w in base.items())  # the base stays as it was quantized
    assert max((p.detach() - adapters[n]).abs().max().item() for n, p in trained.items()) > 1e-4
    assert run.step == 3 and out["checkpoint"]

    with torch.no_grad():
        ours = model.eval()(IDS).logits
        theirs = peft.PeftModel.from_pretrained(quantized(tiny_dir, bits)[0], out["checkpoint"]).eval()(IDS).logits
    assert (ours - theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("bits", [4, 8])
def test_adapter_gradients_through_the_quantized_base_are_those_of_its_dequantized_twin(tiny_dir, bits):
    model, twin = quantized(tiny_dir, bits)[0], AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        for m, t in zip(model.modules(), twin.modules()):
            if isinstance(m, bnb.nn.Linear4bit):
                t.weight.copy_(bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state))
            elif isinstance(m, bnb.nn.Linear8bitLt):
                t.weight.copy_(m.weight.data.float() * m.weight.SCB[:, None] / 127)  # row-wise absmax scales
    grads = []
    for net in (model, twin):
        torch.manual_seed(0)
        lora.inject(net, "all-linear", r=4, alpha=8, dropout=0.0)
        with torch.no_grad():
            for n, p in lora.lora_parameters(net):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
            net.eval()(IDS)  # as the sampler runs it first (bitsandbytes may repack a CPU layer here)
        net.train()(IDS).logits.pow(2).mean().backward()
        grads.append({n: p.grad for n, p in lora.lora_parameters(net)})
    for n, g in grads[1].items():  # every layer's adapters, the first ones through all the quantized layers
        assert (grads[0][n] - g).norm() <= 1e-4 * g.norm(), n


def test_gradient_checkpointing_on_a_quantized_base_gives_the_same_update(small):
    runs = []
    for gc in (False, True):
        run = train.setup(make(small, 4, gradient_checkpointing=gc, optimizer="sgd", learning_rate=0.5,
                               output_dir=f"{small['output_dir']}-{gc}"))
        train.fit(run)
        runs.append({n: p.detach() for n, p in lora.lora_parameters(run.model)})
    assert max((runs[0][n] - runs[1][n]).abs().max().item() for n in runs[0]) < 1e-6
    assert max(p.abs().max().item() for n, p in runs[0].items() if "lora_B" in n) > 0


@pytest.fixture(scope="module")
def peaked_dir(tiny_dir, tmp_path_factory):
    """The tiny model with every weight scaled up (greedy argmaxes well separated), saved to disk."""
    folder = str(tmp_path_factory.mktemp("peaked"))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("bits", [4, 8])
def test_lean_decode_agrees_with_the_model_forward_on_a_quantized_model(peaked_dir, bits, monkeypatch):
    model, tokenizer = quantized(peaked_dir, bits)
    lora.inject(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for n, p in lora.lora_parameters(model):
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    enc = tokenizer(["hello", "what is 3 plus 4", "a b c"], return_tensors="pt", padding=True)
    assert sampler.lean(model)

    def go():
        return sampler.sample(model.eval(), enc["input_ids"], enc["attention_mask"], max_new_tokens=12, greedy=True,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    fast = go()
    monkeypatch.setattr(sampler, "lean", lambda model: False)
    slow = go()
    assert fast[0].size(1) == 12 and torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


def test_quantization_is_refused_where_it_cannot_run(small, monkeypatch):
    with pytest.raises(ValueError, match="needs use_lora=True"):
        config.make(**{**small, "load_in_4bit": True})
    with pytest.raises(ValueError, match="both set"):
        make(small, 4, load_in_8bit=True)
    cfg = make(small, 8)
    with pytest.raises(ValueError, match="distributed='fsdp'"):
        load.policy(make(small, 4, distributed="fsdp"), torch.device("cpu"), None, sharded=True)
    with pytest.raises(ValueError, match="backend='native'"):
        trl_backend.build_trainer(make(small, 4, backend="trl"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ValueError, match="pip install bitsandbytes accelerate"):
        load.policy(cfg, torch.device("cpu"), None)


def test_4bit_compute_dtype_follows_the_run_precision(small):
    cfg = make(small, 4)
    assert load.quantization(cfg, None).bnb_4bit_compute_dtype == torch.float32
    assert load.quantization(cfg, torch.bfloat16).bnb_4bit_compute_dtype == torch.bfloat16
    fp4 = make(small, 4, bnb_4bit_compute_dtype="bf16", bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False)
    q = load.quantization(fp4, None)
    assert (q.bnb_4bit_compute_dtype, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == \
        (torch.bfloat16, "fp4", False)
    assert load.quantization(make(small, 4, load_in_4bit=False, use_lora=True), None) is None
