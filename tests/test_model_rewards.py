"""Model rewards (bertscore, semantic_similarity, toxicity, safety) on tiny BERTs built offline and saved to disk."""
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (AutoModel, AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel,
                          PreTrainedTokenizerFast)

import rewards_models
from rewards import resolve, score
from rewards_models import bertscore, safety, semantic_similarity, toxicity

WORDS = "the a cat dog sat ran on in mat park you are an idiot nice day i will hurt kind".split()
TOXIC_BERT = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
TEXTS = ["the cat sat on the mat", "a dog ran in the park on a nice day", "you are an idiot", "", "nice day"]
REFS = ["the cat sat on the mat", "the dog sat in a park", None, "a cat", "   "]


def save_bert(folder, model):
    """Save a tiny BERT with a word-level tokenizer that wraps each text in [CLS] ... [SEP]."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(folder)
    model.save_pretrained(folder)
    return str(folder)


def config(**kw):
    return BertConfig(vocab_size=4 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, **kw)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    torch.manual_seed(0)
    return save_bert(tmp_path_factory.mktemp("encoder"), BertModel(config()))


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """toxic-bert's six labels, multi-label (a sigmoid per label), random weights."""
    torch.manual_seed(1)
    model = BertForSequenceClassification(config(num_labels=6, id2label=dict(enumerate(TOXIC_BERT)),
                                                 problem_type="multi_label_classification"))
    return save_bert(tmp_path_factory.mktemp("multi"), model)


def fixed_classifier(folder, bias, **kw):
    """A classifier whose logits are `bias` whatever the text."""
    torch.manual_seed(2)
    model = BertForSequenceClassification(config(num_labels=len(bias), **kw))
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor(bias))
    return save_bert(folder, model)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Single-label (softmax) with labels non-toxic / toxic and logits [1, 0]."""
    return fixed_classifier(tmp_path_factory.mktemp("single"), [1.0, 0.0], id2label={0: "non-toxic", 1: "toxic"})


def one_by_one(fn, texts, refs, **params):
    return [fn(t, r, **params) for t, r in zip(texts, refs)]


def batched(kind, texts, refs, **params):
    rs = resolve(rewards=[{"type": kind, "params": params}], device="cpu")
    return score(rs, texts, refs)[1][kind]


def test_bertscore_batched_equals_one_by_one_and_identical_is_one(encoder):
    got = batched("bertscore", TEXTS, REFS, model_name=encoder, batch_size=2)
    assert got == pytest.approx(one_by_one(bertscore, TEXTS, REFS, model_name=encoder), abs=1e-5)
    assert got[0] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 < got[1] < 1.0
    assert got[2:] == [0.0, 0.0, 0.0]  # no reference, empty completion, blank reference


def test_bertscore_is_greedy_cosine_f1_without_special_tokens(encoder):
    tok, model = AutoTokenizer.from_pretrained(encoder), AutoModel.from_pretrained(encoder)

    def emb(text, layer):
        with torch.no_grad():
            h = model(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states[layer][0, 1:-1]
        return torch.nn.functional.normalize(h, dim=-1)

    for layer in (1, 2):
        sim = emb("a dog ran in the park", layer) @ emb("the dog sat in a park", layer).T
        p, r = sim.max(1).values.mean().item(), sim.max(0).values.mean().item()
        params = {} if layer == 2 else {"num_layers": 1}  # default: the last layer of an unknown model
        got = bertscore("a dog ran in the park", "the dog sat in a park", model_name=encoder, **params)
        assert got == pytest.approx(2 * p * r / (p + r), abs=1e-5)


def test_bertscore_layer():
    assert rewards_models._layer("roberta-large", None, 24) == 17
    assert rewards_models._layer("FacebookAI/roberta-large", None, 24) == 17
    assert rewards_models._layer("/models/my-encoder", None, 6) == 6
    assert rewards_models._layer("roberta-large", 3, 24) == 3


def test_semantic_similarity(encoder):
    got = batched("semantic_similarity", TEXTS, REFS, model_name=encoder, batch_size=2)
    assert got == pytest.approx(one_by_one(semantic_similarity, TEXTS, REFS, model_name=encoder), abs=1e-5)
    assert got[0] == pytest.approx(1.0, abs=1e-5)
    assert got[2:] == [0.0, 0.0, 0.0]
    tok, model = AutoTokenizer.from_pretrained(encoder), AutoModel.from_pretrained(encoder)
    with torch.no_grad():
        a, b = (model(**tok(t, return_tensors="pt")).last_hidden_state[0].mean(0) for t in (TEXTS[1], REFS[1]))
    assert got[1] == pytest.approx(max(0.0, torch.cosine_similarity(a, b, dim=0).item()), abs=1e-5)


def test_multi_label_toxicity_and_safety_are_sigmoids(multi):
    tok, model = AutoTokenizer.from_pretrained(multi), BertForSequenceClassification.from_pretrained(multi)
    with torch.no_grad():
        probs = [model(**tok(t, return_tensors="pt")).logits[0].sigmoid() for t in TEXTS]
    tox = batched("toxicity", TEXTS, REFS, model_name=multi, batch_size=2)
    safe = batched("safety", TEXTS, REFS, model_name=multi, batch_size=2)
    assert tox == pytest.approx([1 - p[0].item() for p in probs], abs=1e-5)  # the "toxic" label alone
    assert safe == pytest.approx([1 - p.max().item() for p in probs], abs=1e-5)  # the worst of the six
    assert tox == pytest.approx(one_by_one(toxicity, TEXTS, REFS, model_name=multi), abs=1e-5)
    assert safe == pytest.approx(one_by_one(safety, TEXTS, REFS, model_name=multi), abs=1e-5)
    assert safety(TEXTS[0], model_name=multi, toxic_labels="threat") == pytest.approx(1 - probs[0][3].item(), abs=1e-5)


def test_known_logits_give_known_rewards(single, tmp_path):
    p = 1 / (1 + math.e)  # softmax([1, 0])[1]
    assert toxicity("you are an idiot", model_name=single) == pytest.approx(1 - p, abs=1e-6)
    assert safety("nice day", model_name=single) == pytest.approx(1 - p, abs=1e-6)
    assert toxicity("nice day", model_name=single, threshold=0.2) == 0.0  # p = 0.27 >= 0.2
    assert toxicity("nice day", model_name=single, threshold=0.3) == 1.0
    assert safety("nice day", model_name=single, strict=True) == 1.0
    # multi-label, logits toxic=-1, threat=2: toxicity reads "toxic", safety the worst label
    multi = fixed_classifier(tmp_path, [-1.0, -3.0, -3.0, 2.0, -3.0, -3.0], id2label=dict(enumerate(TOXIC_BERT)),
                             problem_type="multi_label_classification")
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert toxicity("nice day", model_name=multi) == pytest.approx(1 - sig(-1), abs=1e-6)
    assert safety("nice day", model_name=multi) == pytest.approx(1 - sig(2), abs=1e-6)
    assert safety("nice day", model_name=multi, strict=True) == 0.0


@pytest.mark.parametrize("labels, overall, want", [
    (TOXIC_BERT, False, TOXIC_BERT),
    (TOXIC_BERT, True, ["toxic"]),
    (["non-toxic", "toxic"], True, ["toxic"]),
    (["not_toxic", "Toxic"], False, ["Toxic"]),
    (["neutral", "hate", "offensive"], True, ["hate", "offensive"]),
    (["nothate", "hate"], False, ["hate"]),
    (["toxicity", "severe_toxicity", "identity_attack", "sexual_explicit"], True, ["toxicity"]),
    (["NEGATIVE", "POSITIVE", "toxicology"], None, ValueError),
    (["LABEL_0", "LABEL_1"], None, ValueError),
])
def test_label_reading(labels, overall, want):
    id2label = dict(enumerate(labels))
    if want is ValueError:
        with pytest.raises(ValueError, match=r"no label of 'm' names a harmful class.*toxic_labels"):
            rewards_models._harmful_ids("m", id2label, None, True)
    else:
        assert [labels[i] for i in rewards_models._harmful_ids("m", id2label, None, overall)] == want


def test_toxic_labels_param():
    id2label = {0: "LABEL_0", 1: "LABEL_1"}
    assert rewards_models._harmful_ids("m", id2label, ["LABEL_1"], True) == [1]
    assert rewards_models._harmful_ids("m", id2label, "LABEL_0", False) == [0]
    with pytest.raises(ValueError, match="'LABEL_0', 'LABEL_1'"):
        rewards_models._harmful_ids("m", id2label, ["toxic"], True)
    with pytest.raises(ValueError, match="toxic_labels must be"):
        rewards_models._harmful_ids("m", id2label, 1, True)


def test_unnamed_labels_fail_at_resolve(tmp_path):
    plain = fixed_classifier(tmp_path, [0.0, 0.0])  # labels LABEL_0, LABEL_1
    with pytest.raises(ValueError, match=r"toxicity: .*'LABEL_0', 'LABEL_1'.*toxic_labels"):
        resolve(rewards=[{"type": "toxicity", "params": {"model_name": plain}}])
    rs = resolve(rewards=[{"type": "safety", "params": {"model_name": plain, "toxic_labels": ["LABEL_1"]}}])
    assert score(rs, ["nice day"], [None])[0] == pytest.approx([0.5], abs=1e-6)


def test_missing_model_fails_at_resolve(tmp_path):
    missing = str(tmp_path / "no-such-model")
    for kind in ("toxicity", "safety", "bertscore", "semantic_similarity"):
        with pytest.raises(ValueError, match=rf"{kind}: cannot load model '{missing}': no saved model at that path"):
            resolve(rewards=[{"type": kind, "params": {"model_name": missing}}])
    with pytest.raises(ValueError, match=r"'nmgrpo-test/none': it is not in the local Hugging Face cache.*hf download"):
        resolve(rewards=[{"type": "toxicity", "params": {"model_name": "nmgrpo-test/none"}}])


@pytest.mark.parametrize("kind, params, match", [
    ("bertscore", {"num_layers": 3}, "num_layers must be an int from 1 to 2"),
    ("bertscore", {"batch_size": 0}, "batch_size must be"),
    ("toxicity", {"threshold": 1.5}, "threshold must be"),
    ("safety", {"strict": "yes"}, "strict must be"),
])
def test_bad_params_fail_at_resolve(encoder, multi, kind, params, match):
    model = encoder if kind == "bertscore" else multi
    with pytest.raises(ValueError, match=f"{kind}: {match}"):
        resolve(rewards=[{"type": kind, "params": {"model_name": model, **params}}])


def test_resolve_fills_device(encoder, multi):
    rs = resolve(rewards=[{"type": "semantic_similarity", "params": {"model_name": encoder}},
                          {"type": "toxicity", "params": {"model_name": multi, "device": "cpu"}}], device="cpu")
    assert [r.params["device"] for r in rs] == ["cpu", "cpu"]
    assert (encoder, "cpu", False) in rewards_models._MODELS
