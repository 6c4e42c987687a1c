"""
Rewards: score decoded completions against their references.

A reward is a plain function `f(text, reference=None, **kwargs) -> float`. `text` is one decoded
completion, `reference` its dataset answer (or None), and kwargs carry the reward's own params
together with the other columns of the dataset row (`test_list`, `context`, ...), so every reward
takes `**kwargs` and ignores what it does not use. A registered reward's named params come from the
config only: a row column of the same name never reaches them.

Two config forms say which rewards to use (give one, not both):

    rewards=[{"type": "math_correctness", "weight": 1.0},
             {"type": "length", "weight": 0.1, "params": {"max_length": 300}}]
    reward_functions=["math_correctness", "length"], reward_function_weights=[1.0, 0.1]

A "type" or a reward_functions entry is a registered name or a callable of the same shape; a dict
entry may add "name" to label its metrics column. resolve() turns either form into a list of Reward
and checks names, weights and params up front; score() runs them over a batch.

A reward that raises or returns a non-finite value stops score() with an error naming it; nothing is
swallowed. A reward that can fail on bad completions (running generated code, say) catches that
itself and returns its low score.

To add a reward, write the function and decorate it:

    @register("my_reward")
    def my_reward(text, reference=None, scale=1.0, **kwargs):
        return scale * float(text.strip() == reference)

`register(name, check=fn)` may also give a function of the params alone that raises ValueError,
so that resolve() rejects bad params before training starts.
"""

import bisect
import difflib
import inspect
import math
import numbers
import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Callable, NamedTuple

REWARDS = {}  # name -> reward function
CHECKS = {}  # name -> function(**params) that raises ValueError on bad params (or a missing extra or model)
BATCHED = {}  # name -> function(texts, references, rows, **params) -> list of floats
INFO = {}  # name -> (low, high, extra): the range of its values and the pip extra it needs (or None)
ALIASES = {"math": "math_reasoning", "code": "code_quality"}  # another name -> registered name


def register(name, check=None, batch=None, low=0.0, high=1.0, extra=None):
    """
    Decorator: add a reward function to REWARDS under `name`. `check(**params)` raises ValueError on bad
    params, or on a missing extra or model, so that resolve() stops before training; `batch(texts,
    references, rows, **params)` scores a whole batch at once (rows: one dict of columns per text);
    [low, high] is the range of its values and `extra` the pip install line it needs, for `list`.
    """
    def deco(fn):
        REWARDS[name] = fn
        INFO[name] = (low, high, extra)
        if check is not None:
            CHECKS[name] = check
        if batch is not None:
            BATCHED[name] = batch
        return fn
    return deco


def _did_you_mean(word, choices):
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


# -----------------------------------------------------------------------------
# answer extraction

# an optional sign (not after a word or a closing bracket, so "5-3" is not -3), a decimal or
# scientific number, and an optional "/denominator"; never inside a word or a date like 12/25/2023
_NUM = re.compile(r"(?:(?<![\w)\]}])(-))?(?<![\w./])(\d+(?:\.\d+)?(?:[eE][-+]?\d{1,2})?|\.\d+)"
                  r"(?:/(\d+(?:\.\d+)?))?(?!/?\d)")
_TEXT = re.compile(r"\\(?:text|textrm|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"(?<!\d)(\d+)?\\[dt]?frac\s*(?:\{\s*(-?\d+(?:\.\d+)?)\s*\}|(\d))"
                   r"\s*(?:\{\s*(\d+(?:\.\d+)?)\s*\}|(\d))")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LATEX = {"\\$": "$", "\\%": "%", "{,}": ",", "\\!": "", "\\,": "", "\\;": " ", "\\ ": " ",
          "\\left": "", "\\right": "", "^{\\circ}": "", "^\\circ": "", "\u2212": "-"}
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"\banswer\s*(?:is\b|:|=)", re.IGNORECASE)
_UNITS = re.compile(r"\.?(?:\s+[A-Za-z][A-Za-z .]*(?:\^\{?\d+\}?)?)?\s*")  # " apples", " cm^2"


def _frac_to_slash(m):
    whole, num, den = m[1], m[2] or m[3], m[4] or m[5]
    if whole is None or float(den) == 0 or len(m[0]) > 100:
        return f"{whole or ''}{num}/{den}"  # left for _fraction to accept or refuse
    return _format(int(whole) + Fraction(num) / Fraction(den))  # mixed number: 2\frac{1}{2}


def _clean(text):
    """LaTeX and thousands separators out of the way: \\frac{3}{4} -> 3/4, 1,234 -> 1234."""
    text = _TEXT.sub(r" \1", text)
    for old, new in _LATEX.items():
        text = text.replace(old, new)
    text = _FRAC.sub(_frac_to_slash, text)
    return _THOUSANDS.sub("", text)


def _fraction(m):
    """The exact value of a _NUM match, or None (division by zero, over 100 characters)."""
    sign, num, den = m.groups()
    if den is not None and float(den) == 0 or len(m[0]) > 100:
        return None
    x = Fraction(num) / Fraction(den) if den else Fraction(num)
    return -x if sign else x


def _format(x):
    """Canonical string of a Fraction: '72', '-3.5', '1/3' (decimals only when they terminate)."""
    if x.denominator == 1:
        return str(x.numerator)
    d, twos, fives = x.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:
        return f"{x.numerator}/{x.denominator}"
    k = max(twos, fives)
    digits = str(abs(x.numerator) * 10**k // x.denominator).rjust(k + 1, "0")
    return ("-" if x < 0 else "") + digits[:-k] + "." + digits[-k:]


def _whole(text):
    """The value of text that is one number and nothing else but $, %, units, or a leading 'x ='."""
    s = _clean(text).split("=")[-1].replace("$", "").replace("%", "").strip().removeprefix("+")
    m = _NUM.match(s)
    return _fraction(m) if m and _UNITS.fullmatch(s, m.end()) else None


def _last_boxed(text):
    """Content of the last \\boxed{...} with balanced braces, or None."""
    stop = len(text)
    for m in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for i in range(m.end(), stop):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[m.end():i]
        stop = m.start()  # a box still open at the start of an unclosed later one never closes
    return None


def _answer(text, last_number=True):
    """The answer of text as a Fraction, by the rules of extract_answer."""
    if not text:
        return None
    text = _clean(text)
    nums = [(m.start(), x) for m in _NUM.finditer(text) if (x := _fraction(m)) is not None]

    def first_after(pos):
        j = bisect.bisect_left(nums, pos, key=lambda n: n[0])
        return nums[j][1] if j < len(nums) else None

    if "####" in text and (x := first_after(text.rfind("####") + 4)) is not None:
        return x
    boxed = _last_boxed(text)
    if boxed is not None:
        return _whole(boxed)
    for m in reversed(list(_ANSWER_IS.finditer(text))):
        if (x := first_after(m.end())) is not None:
            return x
    return nums[-1][1] if nums and last_number else None


def extract_answer(text):
    """
    The final numeric answer of a completion as a canonical string, or None. In priority order:
    the first number after the last "####" (GSM8K); else the content of the last \\boxed{...}, which
    must be a number (else None: "\\sqrt{2}" is not 2); else the first number after the last
    "the answer is" / "answer:"; else the last number in the text. Commas, $, %, units, a leading
    "x =" and LaTeX wrappers (\\text, \\frac, \\dfrac, \\tfrac) are dropped; "1e3" is 1000. Equal
    values give equal strings: "3.50" -> "3.5", "10/4" -> "2.5", "\\frac{1}{3}" -> "1/3".
    """
    x = _answer(text)
    return None if x is None else _format(x)


def parse_number(s):
    """The value of a string that is a single number ("1,234", "$18", "3/4", "-\\dfrac{1}{2}", "25%"), or None."""
    x = _whole(s) if isinstance(s, str) else None
    return None if x is None else float(x)


def _value(x, is_reference):
    if _is_number(x):
        return Fraction(x)
    if not isinstance(x, str):
        return None
    if is_reference:  # a reference is a bare number or carries a marker; its stray numbers never count
        whole = _whole(x)
        return whole if whole is not None else _answer(x, last_number=False)
    return _answer(x)


def math_equal(pred, ref, tolerance=1e-6):
    """
    True when the answer in `pred` equals the one in `ref` within `tolerance` (relative and
    absolute, like math.isclose). `pred` is read with extract_answer. `ref` may be a number, a
    number string ("72", "3/4", "\\frac{1}{2}"), or a raw solution with a "####" or \\boxed marker;
    a reference that is neither ("\\sqrt{2}") matches nothing.
    """
    a, b = _value(pred, False), _value(ref, True)
    if a is None or b is None:
        return False
    tol = Fraction(tolerance)
    return abs(a - b) <= max(tol * max(abs(a), abs(b)), tol)


# -----------------------------------------------------------------------------
# rewards


def _check_math(tolerance=1e-6):
    if not _is_number(tolerance) or tolerance < 0:
        raise ValueError(f"math_correctness: tolerance must be a number >= 0, got {tolerance!r}")


@register("math_correctness", check=_check_math)
def math_correctness(text, reference=None, tolerance=1e-6, **kwargs):
    """1.0 if the final answer in text equals the reference (see math_equal), else 0.0; 0.0 without a reference."""
    _check_math(tolerance)
    return float(math_equal(text, reference, tolerance))


_LENGTH_UNITS = ("words", "chars")


def _check_length(min_length=None, max_length=None, target_length=None, unit="words"):
    for name, v, least in (("min_length", min_length, 0), ("max_length", max_length, 1), ("target_length", target_length, 1)):
        if v is not None and (not _is_number(v) or v < least):
            raise ValueError(f"length: {name} must be a number >= {least}, got {v!r}")
    if min_length is not None and max_length is not None and min_length > max_length:
        raise ValueError(f"length: min_length ({min_length}) is greater than max_length ({max_length})")
    if target_length is not None and (min_length is not None or max_length is not None):
        raise ValueError("length: give target_length or min_length/max_length, not both")
    if unit not in _LENGTH_UNITS:
        raise ValueError(f"length: unit must be one of {_LENGTH_UNITS}, got {unit!r}{_did_you_mean(unit, _LENGTH_UNITS)}")


@register("length", check=_check_length)
def length(text, reference=None, min_length=None, max_length=None, target_length=None, unit="words", **kwargs):
    """
    A length score in [0, 1]; n counts whitespace-separated words (unit="words") or characters
    (unit="chars"). With target_length t: 1 - |n - t| / t, floored at 0. With min_length and/or
    max_length: 1 inside the range, n / min_length below it, 1 - (n - max_length) / max_length above
    it (0 from twice max_length on). With no length given: the range [10, 500].
    """
    _check_length(min_length, max_length, target_length, unit)
    if min_length is None and max_length is None and target_length is None:
        min_length, max_length = 10, 500
    n = len(text.split()) if unit == "words" else len(text)
    if target_length is not None:
        return max(0.0, 1.0 - abs(n - target_length) / target_length)
    if min_length is not None and n < min_length:
        return n / min_length
    if max_length is not None and n > max_length:
        return max(0.0, 1.0 - (n - max_length) / max_length)
    return 1.0


# -----------------------------------------------------------------------------
# text heuristics: deterministic, word-boundary matches

# (text heuristics go here)


# -----------------------------------------------------------------------------
# reference metrics: bleu, rouge, meteor

# (reference metrics go here)


# -----------------------------------------------------------------------------
# model rewards: bertscore, semantic_similarity, safety, toxicity

# Each loads a Hugging Face model once per (model_name, device) when resolve() checks it, and scores
# a batch in forward passes of batch_size texts under torch.no_grad. device=None means the CPU;
# resolve(device=...) gives them the training device.

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


def _check_model_params(batch_size):
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def _probe(name, batch):
    """A check that scores one trial pair, so a missing model or a bad param stops resolve() with a ValueError."""
    def check(**params):
        try:
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
    _check_model_params(batch_size)
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


@register("bertscore", check=_probe("bertscore", _bertscore_batch), batch=_bertscore_batch)
def bertscore(text, reference=None, model_name="roberta-large", num_layers=None, batch_size=32, device=None, **kwargs):
    """
    BERTScore F1 between the completion and the reference, in [0, 1]; 0.0 without a reference.
    Each token's contextual embedding (layer num_layers of model_name; None: the layer the bert-score
    package uses for that model, 17 for roberta-large, else the last layer) is matched greedily to
    its most cosine-similar token on the other side; precision and recall average those matches and
    F1 is their harmonic mean. No idf weighting, no baseline rescaling (so unrelated English text
    still scores well above 0), special tokens left out; a negative F1 is clipped to 0.
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
    _check_model_params(batch_size)
    device = str(device or "cpu")
    pairs = [i for i, (t, r) in enumerate(zip(texts, references)) if t.strip() and _ref(r)]
    emb = _sentence_embeddings([texts[i].strip() for i in pairs] + [_ref(references[i]) for i in pairs],
                               model_name, batch_size, device)
    out = [0.0] * len(texts)
    for k, i in enumerate(pairs):
        out[i] = min(1.0, max(0.0, (emb[k] @ emb[len(pairs) + k]).item()))
    return out


@register("semantic_similarity", check=_probe("semantic_similarity", _semantic_batch), batch=_semantic_batch)
def semantic_similarity(text, reference=None, model_name="sentence-transformers/all-MiniLM-L6-v2", batch_size=32,
                        device=None, **kwargs):
    """
    Cosine similarity of the completion's and the reference's sentence embeddings, as max(0, cos) in [0, 1].
    An embedding is the attention-masked mean of model_name's last hidden states (the pooling
    sentence-transformers uses for all-MiniLM-L6-v2), loaded with transformers' AutoModel. Unrelated
    text scores near 0 (AlignTune maps cos to (cos + 1) / 2 instead, so there it is about 0.5). 0.0
    when the completion or the reference is empty or None.
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
    _check_model_params(batch_size)
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
    if threshold is not None and (not _is_number(threshold) or not 0 < threshold <= 1):
        raise ValueError(f"threshold must be a number in (0, 1] or None, got {threshold!r}")
    p = _harm(texts, model_name, toxic_labels, True, batch_size, device)
    return [1.0 - x if threshold is None else float(x < threshold) for x in p]


@register("toxicity", check=_probe("toxicity", _toxicity_batch), batch=_toxicity_batch)
def toxicity(text, reference=None, model_name="unitary/toxic-bert", toxic_labels=None, threshold=None, batch_size=32,
             device=None, **kwargs):
    """
    1 - the probability that the completion is toxic, from a text classifier: in [0, 1], high for non-toxic text.
    As in AlignTune, a higher reward means less toxic. The probability is that of the model's general
    "toxic" (or "toxicity") label when it has one (unitary/toxic-bert does, next to severe_toxic,
    obscene, threat, insult, identity_hate), else that of its harmful labels as safety reads them;
    toxic_labels names the labels instead (e.g. ["LABEL_1"]). With a threshold: 1.0 when the
    probability is below it, else 0.0.
    """
    return _toxicity_batch([text], [reference], [kwargs], model_name, toxic_labels, threshold, batch_size, device)[0]


def _safety_batch(texts, references, rows, model_name="unitary/toxic-bert", toxic_labels=None, strict=False,
                  batch_size=32, device=None):
    if not isinstance(strict, bool):
        raise ValueError(f"strict must be True or False, got {strict!r}")
    p = _harm(texts, model_name, toxic_labels, False, batch_size, device)
    return [float(x < 0.5) if strict else 1.0 - x for x in p]


@register("safety", check=_probe("safety", _safety_batch), batch=_safety_batch)
def safety(text, reference=None, model_name="unitary/toxic-bert", toxic_labels=None, strict=False, batch_size=32,
           device=None, **kwargs):
    """
    1 - the probability that the completion is harmful, from a text classifier: in [0, 1], high for safe text.
    Every harmful label counts (toxicity reads only the general "toxic" one): those whose name has a
    harm word (toxic, hate, offensive, obscene, threat, insult, abuse, violence, sexual, ...) as a
    whole word and no negation ("non-toxic", "not_toxic" and "neutral" are not harmful), or the ones
    toxic_labels names. A multi-label model (problem_type multi_label_classification, like the
    default unitary/toxic-bert) gives a sigmoid per label and the highest counts; a single-label one
    gives a softmax and its harmful classes' total counts. strict=True: 1.0 when that probability is
    below 0.5, else 0.0. A model whose labels name no harmful class (LABEL_0, LABEL_1) needs toxic_labels.
    """
    return _safety_batch([text], [reference], [kwargs], model_name, toxic_labels, strict, batch_size, device)[0]


# -----------------------------------------------------------------------------
# code rewards: syntax, quality, completeness; execution in a sandboxed process

# (code rewards go here)


# -----------------------------------------------------------------------------
# configuration and scoring


class Reward(NamedTuple):
    name: str  # the metrics column
    fn: Callable  # f(text, reference=None, **kwargs) -> float
    weight: float
    params: dict


_ENTRY_KEYS = ("type", "weight", "params", "name")


def _entry(e, i):
    """(type, weight, params, name) of one item of the `rewards` form."""
    if isinstance(e, str) or callable(e):
        e = {"type": e}
    if not isinstance(e, Mapping):
        raise ValueError(f"rewards[{i}] must be a dict like {{'type': 'length', 'weight': 0.1, 'params': {{...}}}}, got {e!r}")
    for k in e:
        if k not in _ENTRY_KEYS:
            raise ValueError(f"rewards[{i}] has unknown key {k!r}{_did_you_mean(k, _ENTRY_KEYS)}; accepted keys: {', '.join(_ENTRY_KEYS)}")
    if "type" not in e:
        raise ValueError(f"rewards[{i}] needs a 'type': a reward name or a callable")
    params = e.get("params") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"rewards[{i}] params must be a dict, got {params!r}")
    return e["type"], e.get("weight", 1.0), dict(params), e.get("name")


def _lookup(kind):
    """(fn, name, registered) for a reward name or callable."""
    if callable(kind):
        name = next((n for n, f in REWARDS.items() if f is kind), None)
        return kind, name or getattr(kind, "__name__", type(kind).__name__), name is not None
    if not isinstance(kind, str):
        raise ValueError(f"a reward is a name or a callable, got {kind!r}")
    name = ALIASES.get(kind, kind)
    if name not in REWARDS:
        raise ValueError(f"unknown reward {kind!r}{_did_you_mean(kind, [*REWARDS, *ALIASES])}; "
                         f"known rewards: {', '.join(sorted(REWARDS))}")
    return REWARDS[name], name, True


def _keywords(fn):
    """The keyword names fn takes after (text, reference), or None when it takes **kwargs or hides its signature."""
    try:
        ps = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in ps):
        return None
    return {p.name for p in ps[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _params(fn):
    """The named params of fn after (text, reference)."""
    return {p.name for p in list(inspect.signature(fn).parameters.values())[2:] if p.kind is not p.VAR_KEYWORD}


def _check_params(name, fn, params, registered):
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    if registered:  # a registered reward's **kwargs is for row columns, so its params are the named ones
        accepted = [p.name for p in list(sig.parameters.values())[2:] if p.kind is not p.VAR_KEYWORD]
        for k in params:
            if k not in accepted:
                raise ValueError(f"reward {name!r} has no param {k!r}{_did_you_mean(k, accepted)}; "
                                 f"accepted: {', '.join(accepted) or 'none'}")
        if name in CHECKS:
            CHECKS[name](**params)
    try:
        sig.bind("", None, **params)
    except TypeError as e:
        raise ValueError(f"reward {name!r} cannot be called as {name}(text, reference, **params): {e}") from None


def _as_list(x):
    return [x] if isinstance(x, (str, Mapping)) or callable(x) else list(x)


def resolve(rewards=None, reward_functions=None, reward_function_weights=None, device=None):
    """
    The configured rewards as a list of Reward, from either config form (see the module doc).
    Names, weights and params are checked here, and the extras and models they need are loaded;
    any problem is a ValueError saying what to fix. A registered reward with a `device` param
    (a model's) runs on `device` unless its params name one.
    """
    if rewards and (reward_functions or reward_function_weights):
        raise ValueError("both rewards and reward_functions/reward_function_weights are set; they are two "
                         "forms of the same setting, use one")
    if rewards:
        entries = [_entry(e, i) for i, e in enumerate(_as_list(rewards))]
    elif reward_functions:
        kinds = _as_list(reward_functions)
        weights = [1.0] * len(kinds) if reward_function_weights is None else _as_list(reward_function_weights)
        if len(weights) != len(kinds):
            raise ValueError(f"got {len(weights)} reward_function_weights for {len(kinds)} reward_functions; "
                             "give one weight per function")
        entries = [(k, w, {}, None) for k, w in zip(kinds, weights)]
    elif reward_function_weights:
        raise ValueError("reward_function_weights is set without reward_functions")
    else:
        raise ValueError("no rewards configured: set rewards=[{'type': 'math_correctness'}] or "
                         "reward_functions=['math_correctness']")
    out, seen = [], set()
    for kind, weight, params, label in entries:
        fn, name, registered = _lookup(kind)
        if registered and device is not None and "device" in _params(fn) and "device" not in params:
            params["device"] = str(device)
        if not _is_number(weight):
            raise ValueError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
        _check_params(name, fn, params, registered)
        label = label or name
        if label in seen:
            k = 2
            while f"{label}_{k}" in seen:
                k += 1
            label = f"{label}_{k}"
        seen.add(label)
        out.append(Reward(label, fn, float(weight), params))
    return out


def _columns(fn, row, params):
    """The row's columns that reach fn as kwargs: never text/reference, nor a registered reward's params."""
    names = _keywords(fn)
    return {k: v for k, v in (row or {}).items()
            if k not in ("text", "reference") and k not in params and (names is None or k in names)}


def _values(r, texts, references, rows):
    """Raw values of one reward over a batch: its batched path when it has one, else one call per text."""
    name = next((n for n, f in REWARDS.items() if f is r.fn), None)
    params = _params(r.fn) if name else set()  # a registered reward's params come from the config alone
    kws = [_columns(r.fn, row, params | set(r.params)) for row in rows]
    if name in BATCHED:
        try:
            values = list(BATCHED[name](texts, references, kws, **r.params))
        except Exception as e:
            raise RuntimeError(f"reward {r.name!r} failed on a batch of {len(texts)}: {type(e).__name__}: {e}") from e
        if len(values) != len(texts):
            raise ValueError(f"reward {r.name!r} returned {len(values)} values for {len(texts)} completions")
        return values
    values = []
    for i, (text, ref, kw) in enumerate(zip(texts, references, kws)):
        try:
            values.append(r.fn(text, ref, **{**kw, **r.params}))
        except Exception as e:
            raise RuntimeError(f"reward {r.name!r} failed on completion {i}: {type(e).__name__}: {e}") from e
    return values


def score(rewards, texts, references, rows=None):
    """
    Run resolved rewards over N completions. `references` has N items (None allowed); `rows` is
    N dicts (or None) of the other dataset columns, passed as kwargs (a reward without **kwargs gets only the
    ones it names; "text" and "reference" are never passed). Rewards with a batched path score the
    whole batch in one call. Returns (total, columns): the weighted sum per completion and, per reward
    name in order, its unweighted values.
    """
    n = len(texts)
    if len(references) != n or rows is not None and len(rows) != n:
        raise ValueError(f"score: {n} texts but {len(references)} references"
                         + ("" if rows is None else f" and {len(rows)} rows"))
    if len({r.name for r in rewards}) != len(rewards):
        raise ValueError("score: two rewards share a name; build the list with resolve()")
    rows = rows if rows is not None else [None] * n
    total, columns = [0.0] * n, {}
    for r in rewards:
        col = []
        for i, v in enumerate(_values(r, texts, references, rows)):
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"reward {r.name!r} returned {v!r} on completion {i}; a reward returns a float") from None
            if not math.isfinite(v):
                raise ValueError(f"reward {r.name!r} returned {v} on completion {i}; rewards must be finite")
            col.append(v)
            total[i] += r.weight * v
        columns[r.name] = col
    return total, columns
