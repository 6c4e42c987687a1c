"""
Reference metrics (bleu, rouge, meteor: sacrebleu, rouge-score, NLTK) and model rewards (bertscore,
semantic_similarity, toxicity, safety: transformers encoders and classifiers).

A model reward loads its Hugging Face model once per (model_name, device) when resolve() checks it, and scores a batch
in forward passes of batch_size texts under torch.no_grad. device=None means the CPU; resolve(device=...) gives them
the training device.
"""
import re

from common import did_you_mean
from registry import is_number, register

_WORD = re.compile(r"[a-z0-9]+(?:['’][a-z]+)?")  # METEOR's words: lower-case letters and digits, "don't" whole


# ---------------------------------------------------------------------------- reference metrics

def _require(module, pip, reward):
    """Import an optional extra, or stop with the line that installs it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"reward {reward!r} needs the {pip.split()[0]} package: pip install {pip}") from None


def _check_bleu(tokenize="13a", smooth_method="exp", lowercase=False):
    sacrebleu = _require("sacrebleu", "sacrebleu", "bleu")
    if tokenize not in sacrebleu.metrics.BLEU.TOKENIZERS:
        raise ValueError(f"bleu: unknown tokenize {tokenize!r}"
                         f"{did_you_mean(tokenize, sacrebleu.metrics.BLEU.TOKENIZERS)}")
    if smooth_method not in sacrebleu.metrics.BLEU.SMOOTH_DEFAULTS:
        raise ValueError(f"bleu: unknown smooth_method {smooth_method!r}; "
                         f"one of {', '.join(sacrebleu.metrics.BLEU.SMOOTH_DEFAULTS)}")


@register("bleu", check=_check_bleu, extra="sacrebleu")
def bleu(text, reference=None, tokenize="13a", smooth_method="exp", lowercase=False, **kwargs):
    """Sentence BLEU against the reference (sacrebleu), scaled to [0, 1].

    Up to 4-grams with effective order (short texts are not zeroed for lacking 4-grams), `smooth_method` (default
    "exp"), `tokenize` (default "13a", sacrebleu's standard), `lowercase`. A list reference counts as several
    references. 0.0 without a reference. Needs: pip install sacrebleu.
    """
    refs = _refs(reference)
    if not refs:
        return 0.0
    from sacrebleu.metrics import BLEU
    metric = BLEU(tokenize=tokenize, smooth_method=smooth_method, lowercase=lowercase, effective_order=True)
    return min(1.0, metric.sentence_score(text, refs).score / 100.0)


_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _check_rouge(rouge_type="rougeL", use_stemmer=True):
    _require("rouge_score", "rouge-score", "rouge")
    if rouge_type not in _ROUGE_TYPES:
        raise ValueError(f"rouge: unknown rouge_type {rouge_type!r}{did_you_mean(rouge_type, _ROUGE_TYPES)}; "
                         f"one of {', '.join(_ROUGE_TYPES)}")


def _rouge_scorer(rouge_type, use_stemmer):
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer([rouge_type], use_stemmer=use_stemmer)


def _refs(reference):
    """A reference as a list of non-empty strings: a list counts as several references."""
    refs = reference if isinstance(reference, (list, tuple)) else [reference]
    return [str(r) for r in refs if r is not None and str(r).strip()]


def _rouge_batch(texts, references, rows, rouge_type="rougeL", use_stemmer=True):
    scorer = _rouge_scorer(rouge_type, use_stemmer)
    return [scorer.score_multi(refs, t)[rouge_type].fmeasure if (refs := _refs(r)) else 0.0
            for t, r in zip(texts, references)]


@register("rouge", check=_check_rouge, batch=_rouge_batch, extra="rouge-score")
def rouge(text, reference=None, rouge_type="rougeL", use_stemmer=True, **kwargs):
    """ROUGE-L F1 against the reference (rouge-score; rouge1/2/Lsum as options).

    By Google's rouge-score: `rouge_type` "rougeL" (longest common subsequence, the default), "rouge1", "rouge2" or
    "rougeLsum"; Porter stemming when `use_stemmer` (default True). A list reference scores against its best match; 0.0
    without a reference. Needs: pip install rouge-score.
    """
    return _rouge_batch([text], [reference], [kwargs], rouge_type, use_stemmer)[0]


def _check_meteor(alpha=0.9, beta=3.0, gamma=0.5):
    nltk = _require("nltk", "nltk", "meteor")
    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        raise ValueError("reward 'meteor' needs NLTK's wordnet data, which is never downloaded at run time: "
                         "python -m nltk.downloader wordnet (or copy it into a folder on NLTK_DATA)") from None


@register("meteor", check=_check_meteor, extra="nltk, and its wordnet data")
def meteor(text, reference=None, alpha=0.9, beta=3.0, gamma=0.5, **kwargs):
    """METEOR against the reference (NLTK, with WordNet synonyms).

    Exact, Porter-stem and WordNet-synonym matches and a fragmentation penalty (alpha, beta, gamma as in NLTK). Words
    are lower-cased runs of letters and digits; a list reference counts as several references. 0.0 without a reference.
    Needs: pip install nltk, and the wordnet data (python -m nltk.downloader wordnet), which is never fetched at run
    time.
    """
    refs = _refs(reference)
    if not refs:
        return 0.0
    from nltk.corpus import wordnet
    from nltk.translate.meteor_score import meteor_score
    return float(meteor_score([_WORD.findall(r.lower()) for r in refs], _WORD.findall(text.lower()), wordnet=wordnet,
                              alpha=alpha, beta=beta, gamma=gamma))


# ---------------------------------------------------------------------------- model rewards

_MODELS = {}  # (model_name, device, classifier) -> (tokenizer, model)

# the layer the bert-score package uses for these models (by the last part of the name)
_BERTSCORE_LAYERS = {"roberta-large": 17, "roberta-base": 10, "roberta-large-mnli": 19, "distilroberta-base": 5,
                     "bert-base-uncased": 9, "bert-large-uncased": 18, "bert-base-multilingual-cased": 9,
                     "distilbert-base-uncased": 5, "xlm-roberta-base": 9, "xlm-roberta-large": 17,
                     "deberta-xlarge-mnli": 40}

# words of a classifier label that name a harmful class; a label with a negation word is not one
_HARM_WORDS = {"toxic", "toxicity", "hate", "hateful", "offensive", "obscene", "obscenity", "threat", "threatening",
               "insult", "insulting", "abuse", "abusive", "harassment", "profane", "profanity", "violence", "violent",
               "sexual", "explicit", "attack", "harmful", "unsafe", "nsfw"}
_NEGATIONS = {"non", "not", "no"}


def _load(model_name, device, classifier):
    """(tokenizer, model) in eval mode on device, loaded once; ValueError when the model is not there."""
    key = (model_name, device, classifier)
    if key not in _MODELS:
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
        auto = AutoModelForSequenceClassification if classifier else AutoModel
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_name)
            model = auto.from_pretrained(model_name)
        except OSError as e:
            why = ("no saved model at that path. Set params model_name to a folder saved with save_pretrained"
                   if model_name.startswith(("/", ".", "~")) else
                   f"it is not in the local Hugging Face cache. Download it first (hf download {model_name}) or set "
                   f"params model_name to a local folder that holds it")
            raise ValueError(f"cannot load model {model_name!r}: {why} ({str(e).splitlines()[0]})") from None
        tokenizer.padding_side = "right"  # encoders number positions from the left
        _MODELS[key] = tokenizer, model.to(device).eval()
    return _MODELS[key]


def _inputs(tokenizer, model, texts, device, **kw):
    """A padded batch of texts on device, truncated to what the model takes."""
    limit = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None) or 512)
    return tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt", **kw).to(device)


def _check_model_params(batch_size=32, threshold=None, strict=False, **_):
    """ValueError on a bad batch_size, threshold (toxicity) or strict (safety)."""
    if threshold is not None and (not is_number(threshold) or not 0 < threshold <= 1):
        raise ValueError(f"threshold must be a number in (0, 1] or None, got {threshold!r}")
    if not isinstance(strict, bool):
        raise ValueError(f"strict must be True or False, got {strict!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def _probe(name, batch):
    """A check of the params that then scores one trial pair, so a bad param or a missing model stops resolve()."""
    def check(**params):
        try:
            _check_model_params(**params)
            batch(["A short trial sentence."], ["A short trial sentence."], [{}], **params)
        except Exception as e:
            raise ValueError(f"{name}: {e}" if isinstance(e, ValueError) else
                             f"{name}: a trial batch failed: {type(e).__name__}: {e}") from None
    return check


def _ref(reference):
    return "" if reference is None else str(reference).strip()


def _layer(model_name, num_layers, n):
    """The hidden layer bertscore reads: num_layers, else bert-score's usual one for the model, else the last (n)."""
    if num_layers is None:
        return _BERTSCORE_LAYERS.get(str(model_name).rstrip("/").split("/")[-1], n)
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or not 1 <= num_layers <= n:
        raise ValueError(f"num_layers must be an int from 1 to {n} (the layers of {model_name!r}), got {num_layers!r}")
    return num_layers


def _token_embeddings(texts, model_name, num_layers, batch_size, device):
    """Per text, the unit-length embeddings of its tokens at the bertscore layer, special tokens left out."""
    import torch
    import torch.nn.functional as F
    tokenizer, model = _load(model_name, device, False)
    layer = _layer(model_name, num_layers, model.config.num_hidden_layers)
    out = []
    for i in range(0, len(texts), batch_size):
        inputs = _inputs(tokenizer, model, texts[i:i + batch_size], device, return_special_tokens_mask=True)
        keep = inputs["attention_mask"].bool() & ~inputs.pop("special_tokens_mask").bool()
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True).hidden_states[layer].float()
        out += [F.normalize(h[k], dim=-1) for h, k in zip(hidden, keep)]
    return out


def _bertscore_batch(texts, references, rows, model_name="roberta-large", num_layers=None, batch_size=32, device=None):
    device = str(device or "cpu")
    pairs = [i for i, r in enumerate(references) if _ref(r)]
    emb = _token_embeddings([texts[i].strip() for i in pairs] + [_ref(references[i]) for i in pairs],
                            model_name, num_layers, batch_size, device)
    out = [0.0] * len(texts)
    for k, i in enumerate(pairs):
        c, r = emb[k], emb[len(pairs) + k]
        if len(c) and len(r):
            sim = c @ r.T
            p, rec = sim.max(1).values.mean().item(), sim.max(0).values.mean().item()
            out[i] = min(1.0, 2 * p * rec / (p + rec)) if p > 0 and rec > 0 else 0.0
    return out


@register("bertscore", check=_probe("bertscore", _bertscore_batch), batch=_bertscore_batch, extra="model roberta-large")
def bertscore(text, reference=None, model_name="roberta-large", num_layers=None, batch_size=32, device=None, **kwargs):
    """BERTScore F1 against the reference (greedy cosine matching of contextual embeddings).

    In [0, 1]; 0.0 without a reference. Each token's contextual embedding (layer num_layers of model_name; None: the
    layer the bert-score package uses for that model, 17 for roberta-large, else the last layer) is matched greedily to
    its most cosine-similar token on the other side; precision and recall average those matches and F1 is their harmonic
    mean. No idf weighting, no baseline rescaling (so unrelated English text still scores well above 0), special tokens
    left out; a negative F1 is clipped to 0.
    """
    return _bertscore_batch([text], [reference], [kwargs], model_name, num_layers, batch_size, device)[0]


def _sentence_embeddings(texts, model_name, batch_size, device):
    """Unit-length mean of each text's token embeddings (last layer, padding masked out), as one tensor."""
    import torch
    import torch.nn.functional as F
    tokenizer, model = _load(model_name, device, False)
    out = []
    for i in range(0, len(texts), batch_size):
        inputs = _inputs(tokenizer, model, texts[i:i + batch_size], device)
        with torch.no_grad():
            hidden = model(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1))
    return torch.cat(out) if out else None


def _semantic_batch(texts, references, rows, model_name="sentence-transformers/all-MiniLM-L6-v2", batch_size=32,
                    device=None):
    device = str(device or "cpu")
    pairs = [i for i, (t, r) in enumerate(zip(texts, references)) if t.strip() and _ref(r)]
    emb = _sentence_embeddings([texts[i].strip() for i in pairs] + [_ref(references[i]) for i in pairs],
                               model_name, batch_size, device)
    out = [0.0] * len(texts)
    for k, i in enumerate(pairs):
        out[i] = min(1.0, max(0.0, (emb[k] @ emb[len(pairs) + k]).item()))
    return out


@register("semantic_similarity", check=_probe("semantic_similarity", _semantic_batch), batch=_semantic_batch,
          extra="model sentence-transformers/all-MiniLM-L6-v2")
def semantic_similarity(text, reference=None, model_name="sentence-transformers/all-MiniLM-L6-v2", batch_size=32,
                        device=None, **kwargs):
    """Cosine similarity of sentence embeddings of the text and the reference.

    max(0, cos), in [0, 1]. An embedding is the attention-masked mean of model_name's last hidden states (the pooling
    sentence-transformers uses for all-MiniLM-L6-v2), loaded with transformers' AutoModel. Unrelated text scores near 0
    (AlignTune maps cos to (cos + 1) / 2 instead, so there it is about 0.5). 0.0 when the completion or the reference is
    empty or None.
    """
    return _semantic_batch([text], [reference], [kwargs], model_name, batch_size, device)[0]


def _is_harmful(label):
    words = set(re.findall(r"[a-z0-9]+", label.lower()))
    return bool(words & _HARM_WORDS) and not words & _NEGATIONS


def _harmful_ids(model_name, id2label, toxic_labels, overall):
    """
    Indices of the harmful labels: those named in toxic_labels, else those with a harm word (toxic, hate,
    offensive, obscene, threat, insult, ...) and no negation (non-toxic, not_toxic); with `overall`, only the
    general "toxic"/"toxicity" label when the model has one.
    """
    labels = {int(i): str(name) for i, name in id2label.items()}
    found = ", ".join(repr(labels[i]) for i in sorted(labels))
    if toxic_labels is not None:
        wanted = [toxic_labels] if isinstance(toxic_labels, str) else toxic_labels
        if not isinstance(wanted, (list, tuple)) or not wanted or not all(isinstance(w, str) for w in wanted):
            raise ValueError(f"toxic_labels must be a label name or a list of them, got {toxic_labels!r}")
        unknown = [w for w in wanted if w not in labels.values()]
        if unknown:
            raise ValueError(f"toxic_labels {unknown} are not labels of {model_name!r}; its labels are {found}")
        return [i for i in sorted(labels) if labels[i] in wanted]
    ids = [i for i in sorted(labels) if _is_harmful(labels[i])]
    if not ids:
        raise ValueError(f"no label of {model_name!r} names a harmful class (its labels are {found}); set params "
                         f"toxic_labels to the harmful ones, e.g. {{'toxic_labels': [{labels[max(labels)]!r}]}}")
    main = [i for i in ids if labels[i].strip().lower() in ("toxic", "toxicity")]
    return (main or ids) if overall else ids


def _harm(texts, model_name, toxic_labels, overall, batch_size, device):
    """
    Per text, the probability the classifier gives its harmful labels: the highest one for a multi-label
    model (a sigmoid per label), their sum for a single-label one (a softmax).
    """
    import torch
    device = str(device or "cpu")
    tokenizer, model = _load(model_name, device, True)
    ids = _harmful_ids(model_name, model.config.id2label, toxic_labels, overall)
    multi = model.config.problem_type == "multi_label_classification" or model.config.num_labels == 1
    out = []
    for i in range(0, len(texts), batch_size):
        inputs = _inputs(tokenizer, model, texts[i:i + batch_size], device)
        with torch.no_grad():
            logits = model(**inputs).logits.float()
        probs = logits.sigmoid()[:, ids].amax(-1) if multi else logits.softmax(-1)[:, ids].sum(-1)
        out += probs.clamp(0, 1).tolist()
    return out


def _toxicity_batch(texts, references, rows, model_name="unitary/toxic-bert", toxic_labels=None, threshold=None,
                    batch_size=32, device=None):
    p = _harm(texts, model_name, toxic_labels, True, batch_size, device)
    return [1.0 - x if threshold is None else float(x < threshold) for x in p]


@register("toxicity", check=_probe("toxicity", _toxicity_batch), batch=_toxicity_batch,
          extra="model unitary/toxic-bert")
def toxicity(text, reference=None, model_name="unitary/toxic-bert", toxic_labels=None, threshold=None, batch_size=32,
             device=None, **kwargs):
    """1 - the probability of toxicity from a text classifier: high for non-toxic text.

    As in AlignTune, a higher reward means less toxic. The probability is that of the model's general "toxic" (or
    "toxicity") label when it has one (unitary/toxic-bert does, next to severe_toxic, obscene, threat, insult,
    identity_hate), else that of its harmful labels as safety reads them; toxic_labels names the labels instead (e.g.
    ["LABEL_1"]). With a threshold: 1.0 when the probability is below it, else 0.0.
    """
    return _toxicity_batch([text], [reference], [kwargs], model_name, toxic_labels, threshold, batch_size, device)[0]


def _safety_batch(texts, references, rows, model_name="unitary/toxic-bert", toxic_labels=None, strict=False,
                  batch_size=32, device=None):
    p = _harm(texts, model_name, toxic_labels, False, batch_size, device)
    return [float(x < 0.5) if strict else 1.0 - x for x in p]


@register("safety", check=_probe("safety", _safety_batch), batch=_safety_batch, extra="model unitary/toxic-bert")
def safety(text, reference=None, model_name="unitary/toxic-bert", toxic_labels=None, strict=False, batch_size=32,
           device=None, **kwargs):
    """1 - the probability of any harmful label from a text classifier: high for safe text.

    Every harmful label counts (toxicity reads only the general "toxic" one): those whose name has a harm word (toxic,
    hate, offensive, obscene, threat, insult, abuse, violence, sexual, ...) as a whole word and no negation
    ("non-toxic", "not_toxic" and "neutral" are not harmful), or the ones toxic_labels names. A multi-label model
    (problem_type multi_label_classification, like the default unitary/toxic-bert) gives a sigmoid per label and the
    highest counts; a single-label one gives a softmax and its harmful classes' total counts. strict=True: 1.0 when that
    probability is below 0.5, else 0.0. A model whose labels name no harmful class (LABEL_0, LABEL_1) needs
    toxic_labels.
    """
    return _safety_batch([text], [reference], [kwargs], model_name, toxic_labels, strict, batch_size, device)[0]
