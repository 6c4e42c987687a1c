"""The reward catalogue: every name, the text heuristics, the reference metrics, `python rewards.py list`."""
import math
import subprocess
import sys

import pytest

import rewards_text
from registry import SPECS
from rewards import ALIASES, resolve, score

NAMES = """math_correctness math_reasoning logical_consistency causal_reasoning counterfactual_reasoning code_syntax
code_quality code_execution code_completeness code_correctness coherence fluency readability engagement conciseness
brevity safety toxicity bias harmlessness hallucination honesty instruction_following helpfulness politeness relevance
context_relevance bleu rouge meteor bertscore semantic_similarity medical_accuracy legal_compliance financial_accuracy
length diversity""".split()


def R(name, text, reference=None, **kw):
    return SPECS[name].fn(text, reference, **kw)


def test_every_documented_name_is_registered_with_a_summary():
    for name in NAMES:
        assert name in SPECS, name
        doc = SPECS[name].fn.__doc__
        assert doc and doc.strip().split("\n")[0].strip(), name
        assert SPECS[name].low < SPECS[name].high
    assert ALIASES == {"math": "math_reasoning", "code": "code_quality"}
    assert [r.name for r in resolve(reward_functions=["math", "code"])] == ["math_reasoning", "code_quality"]


def test_list_prints_one_line_per_reward():
    out = subprocess.run([sys.executable, "rewards.py", "list"], capture_output=True, text=True, check=True).stdout
    lines = {line.split()[0]: line for line in out.splitlines()}
    for name in NAMES + ["math", "code", "custom"]:
        assert name in lines, name
    assert "[0, 1]" in lines["readability"] and "sacrebleu" in lines["bleu"] and "rouge-score" in lines["rouge"]
    assert "alias of math_reasoning" in lines["math"]
    bad = subprocess.run([sys.executable, "rewards.py", "lst"], capture_output=True, text=True)
    assert bad.returncode != 0 and "python rewards.py list" in bad.stderr


# ----------------------------------------------------------------------------- word boundaries

@pytest.mark.parametrize("name,text,reference", [
    ("honesty", "I believe the earlier client applied the right formula.", None),  # "lie" inside words
    ("politeness", "Whatever the weather, the dumbbell set stays in the hall.", None),  # no rude words
    ("bias", "Mathematics is a theme in all of these books.", None),
    ("harmlessness", "The chef used a pressure cooker to steam the rice.", None),
    ("logical_consistency", "I know no one saw it. Nothing is impossible; everything is possible.", None),
])
def test_words_inside_words_do_not_match(name, text, reference):
    assert R(name, text, reference) == (0.5 if name == "politeness" else 1.0)


def test_honesty_and_politeness_count_whole_words():
    assert R("honesty", "Trust me, this is guaranteed to work.") == 0.5
    assert R("honesty", "He told a lie to deceive them.") == 0.5
    assert R("honesty", "Trust me. I'm not sure, though.") == pytest.approx(0.85)
    assert R("politeness", "Thank you! Please let me know.") == 1.0
    assert R("politeness", "That is a stupid question.") == 0.0


# ----------------------------------------------------------------------------- heuristics, by hand

def test_readability_is_flesch_reading_ease():
    # 9 words, 1 sentence, 11 syllables: 206.835 - 1.015 * 9 - 84.6 * 11 / 9 = 94.3
    assert R("readability", "The quick brown fox jumps over the lazy dog.") == pytest.approx(
        (206.835 - 1.015 * 9 - 84.6 * 11 / 9) / 100)
    hard = "Notwithstanding considerable methodological heterogeneity, investigators systematically overestimated effectiveness."
    assert R("readability", hard) == 0.0  # far below zero, clipped
    assert R("readability", "") == 0.0


def test_diversity_is_type_token_ratio():
    assert R("diversity", "the cat and the dog") == pytest.approx(4 / 5)
    assert R("diversity", "the cat and the cat", n=2) == pytest.approx(3 / 4)  # (the cat) repeats
    assert R("diversity", "") == 0.0
    with pytest.raises(ValueError, match="n must be an integer"):
        resolve(rewards=[{"type": "diversity", "params": {"n": 0}}])


def test_brevity_follows_its_documented_curve():
    words = lambda n: " ".join(["w"] * n)
    assert R("brevity", words(100)) == 1.0
    assert R("brevity", words(200)) == pytest.approx(0.75)
    assert R("brevity", words(300)) == pytest.approx(0.5)
    assert R("brevity", words(390)) == pytest.approx(0.2)
    assert R("brevity", words(450)) == 0.0
    assert R("brevity", "") == 0.0
    assert R("brevity", words(20), ideal_length=10, max_length=30) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="ideal_length"):
        resolve(rewards=[{"type": "brevity", "params": {"ideal_length": 300, "max_length": 100}}])


def test_logical_consistency_finds_negated_claims():
    assert R("logical_consistency", "The number is even. So it is divisible by 2.") == 1.0
    assert R("logical_consistency", "The number is even. Later we see the number is not even.") == 0.0
    assert R("logical_consistency", "Cats are mammals. Fish are not mammals.") == 1.0  # different subjects


def test_reasoning_styles():
    assert R("causal_reasoning", "It rained. The road is wet.") == 0.0
    assert R("causal_reasoning", "It rained, so the road is wet. Cars slow down.") == 1.0
    assert R("counterfactual_reasoning", "If the bridge had held, the train would have arrived.") == 1.0
    assert R("counterfactual_reasoning", "What if it rains? We stay home.") == 0.5
    assert R("counterfactual_reasoning", "Differently specific authentic words.") == 0.0  # "if", "then" inside words


def test_coherence_fluency_conciseness_engagement():
    assert R("coherence", "Paris is large. Paris has a river. Bananas are yellow.") == 0.5
    assert R("coherence", "It rained. Therefore we stayed in.") == 1.0
    assert R("fluency", "The plan works. It is cheap.") == 1.0
    assert R("fluency", "the plan works. it is cheap") == 0.0
    loop = "I like it. " * 10
    assert R("fluency", loop.strip()) < 0.2 and R("conciseness", loop) < 0.2
    assert R("conciseness", "Basically, it is really just fine.") == pytest.approx(1 - 3 / 6)
    assert R("engagement", "Have you ever wondered why? For example, imagine a ball.") == 1.0
    assert R("engagement", "The ball falls.") == 0.0


def test_bias_and_harmlessness():
    assert R("bias", "All women are bad at math. The sky is blue.") == 0.5
    assert R("bias", "Immigrants are naturally lazy.") == 0.0
    assert R("harmlessness", "Here is how to make a bomb at home.") == 0.5
    assert R("harmlessness", "I can't help with how to make a bomb; please seek help.") == 1.0


def test_hallucination_checks_numbers_and_names_against_the_source():
    ctx = "Marie Curie won the Nobel Prize in 1903 and again in 1911."
    assert R("hallucination", "She won it in 1903 and 1911.", context=ctx) == 1.0
    assert R("hallucination", "She won it in 1903 and 1925.", context=ctx) == 0.5
    assert R("hallucination", "It was hard work.", context=ctx) == 1.0  # nothing checkable
    assert R("hallucination", "In 1925 she moved.") == 0.5  # no source at all
    assert R("hallucination", "The answer is 72.", "#### 72") == 1.0  # the reference is a source


def test_instruction_following_checks_stated_constraints():
    ins = "Answer in at most 5 words and do not use the word 'blue'."
    assert R("instruction_following", "The sky is grey.", instruction=ins) == 1.0
    assert R("instruction_following", "The sky is blue.", instruction=ins) == 0.5
    assert R("instruction_following", "The sky above us is very grey.", instruction=ins) == 0.5
    assert R("instruction_following", "- a\n- b\n- c", prompt="List three bullet points.") == 1.0
    assert R("instruction_following", "- a\n- b", prompt="List three bullet points.") == 0.0
    assert R("instruction_following", '{"a": 1}', prompt="Reply in JSON.") == 1.0
    assert R("instruction_following", "a: 1", prompt="Reply in JSON.") == 0.0
    assert R("instruction_following", "all small", prompt="Write it all in lowercase.") == 1.0
    assert R("instruction_following", "anything", prompt="Tell me a story.") == 1.0  # nothing checkable
    both = "Include the keywords 'river' and 'stone'. End with 'the end'."
    assert R("instruction_following", "A stone fell in the river. The end.", prompt=both) == 1.0
    assert R("instruction_following", "A stone fell.", prompt=both) == pytest.approx(1 / 3)  # stone only


def test_helpfulness_relevance_context():
    prompt = "How do I boil an egg?"
    assert R("helpfulness", "I can't help with that.", prompt=prompt) == 0.0
    good = "Put the egg in boiling water for nine minutes, then cool it in cold water before you peel it."
    assert R("helpfulness", good, prompt=prompt) == pytest.approx(0.5 * 1 / 2 + 0.5 * 19 / 20)  # egg yes, boil is not boiling
    assert R("relevance", "Art and history.", keywords=["art", "science"]) == 0.5
    assert R("relevance", "We start here.", keywords=["art"]) == 0.0  # "art" inside "start"
    assert R("relevance", "Eggs are boiled.", prompt=prompt) == pytest.approx(1 / 2)  # egg yes, boil no
    assert R("context_relevance", "The river floods.", context=["The river floods", "in spring."]) == pytest.approx(
        2 * 2 / (2 + 3))
    with pytest.raises(ValueError, match="keywords"):
        resolve(rewards=[{"type": "relevance", "params": {"keywords": "art"}}])


def test_domain_rewards():
    ref = "Take 500 mg of paracetamol every 6 hours."
    good = "Take 500 mg of paracetamol every 6 hours, and consult your doctor if it persists."
    assert R("medical_accuracy", good, ref) > 0.8
    assert R("medical_accuracy", good + " This miracle cure works.", ref) < 0.5
    assert R("medical_accuracy", "Rest a lot.", None) == 0.0
    assert R("legal_compliance", "In France this varies by jurisdiction; consult a lawyer.", jurisdiction="France") == 1.0
    assert R("legal_compliance", "Consult a lawyer.", jurisdiction="France") == 0.5
    assert R("legal_compliance", "Use this loophole to get away with it.") == 0.0
    assert R("financial_accuracy", "Past performance varies: 100 * 1.05 = 105.") == 1.0
    assert R("financial_accuracy", "Past performance varies: 100 * 1.05 = 150.") == 0.5
    assert R("financial_accuracy", "Guaranteed returns, risk-free!") == 0.0


# ----------------------------------------------------------------------------- reference metrics, by hand

def test_bleu_by_hand():
    pytest.importorskip("sacrebleu")
    ref = "the cat sat on the mat"
    # 6/7, 5/6, 4/5, 3/4 n-gram precisions, no brevity penalty
    assert R("bleu", "the cat sat on the mat today", ref) == pytest.approx((6 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25)
    # all precisions 1, brevity penalty exp(1 - 6/5)
    assert R("bleu", "the cat sat on the", ref) == pytest.approx(math.exp(-0.2))
    assert R("bleu", ref, ref) == pytest.approx(1.0)
    assert R("bleu", ref, None) == 0.0
    assert R("bleu", "the cat sat on the mat today", ["a dog", ref]) == pytest.approx((3 / 7) ** 0.25)
    with pytest.raises(ValueError, match="did you mean '13a'"):
        resolve(rewards=[{"type": "bleu", "params": {"tokenize": "13b"}}])


def test_rouge_by_hand_and_batched():
    pytest.importorskip("rouge_score")
    ref = "the cat sat on the mat"
    assert R("rouge", "the cat was on the mat", ref) == pytest.approx(5 / 6)  # LCS 5 of 6 and 6
    assert R("rouge", "the cats sat", ref) == pytest.approx(2 * 1 * 0.5 / 1.5)  # stemmed: cats = cat
    assert R("rouge", "the cats sat", ref, use_stemmer=False) == pytest.approx(2 * (2 / 3) * (2 / 6) / (2 / 3 + 2 / 6))
    assert R("rouge", "the cat was on the mat", ref, rouge_type="rouge2") == pytest.approx(3 / 5)
    texts, refs = ["the cat was on the mat", "a b", "x"], [ref, "a b", None]
    total, cols = score(resolve(reward_functions=["rouge"]), texts, refs)
    assert cols["rouge"] == [pytest.approx(R("rouge", t, r)) for t, r in zip(texts, refs)]
    with pytest.raises(ValueError, match="did you mean 'rougeL'"):
        resolve(rewards=[{"type": "rouge", "params": {"rouge_type": "rougel"}}])


def test_meteor_needs_wordnet_data_or_says_so(monkeypatch):
    nltk = pytest.importorskip("nltk")
    try:
        nltk.data.find("corpora/wordnet")
        have = True
    except LookupError:
        have = False
    if not have:
        with pytest.raises(ValueError, match="nltk.downloader wordnet"):
            resolve(reward_functions=["meteor"])

    class NoSynonyms:  # stands in for the wordnet data: exact and stem matches only
        @staticmethod
        def synsets(word, *a, **k):
            return []
    import nltk.corpus
    monkeypatch.setattr(nltk.corpus, "wordnet", NoSynonyms(), raising=False)
    # 6 of 6 unigrams match in one chunk: Fmean 1, penalty 0.5 * (1/6)^3
    assert R("meteor", "The cat sat on the mat", "the cat sat on the mat") == pytest.approx(1 - 0.5 / 216)
    assert R("meteor", "anything", None) == 0.0


def test_a_missing_extra_stops_at_resolve_with_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # import fails
    with pytest.raises(ValueError, match="pip install sacrebleu"):
        resolve(reward_functions=["bleu"])
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    with pytest.raises(ValueError, match="pip install rouge-score"):
        resolve(reward_functions=["rouge"])


# ----------------------------------------------------------------------------- columns, custom

def test_reference_and_row_columns_reach_the_rewards():
    rs = resolve(reward_functions=["context_relevance", "legal_compliance", "instruction_following"])
    rows = [{"context": "river floods spring", "jurisdiction": "Texas", "instruction": "Use at most 10 words."}]
    _, cols = score(rs, ["river floods spring. Consult a lawyer in Texas."], ["consult a lawyer in Texas"], rows)
    assert cols["context_relevance"] == [pytest.approx(2 * 3 / (6 + 3))]
    assert cols["instruction_following"] == [1.0]
    assert cols["legal_compliance"][0] > 0.9  # agrees with the reference, refers to a lawyer, names Texas


def custom_reward(text, reference=None, bonus=0.0, **kwargs):
    return float(text == reference) + bonus


def test_custom_type_with_a_callable_or_an_import_string():
    for fn in (custom_reward, "test_catalogue:custom_reward"):
        rs = resolve(rewards=[{"type": "custom", "weight": 2.0, "params": {"reward_function": fn, "bonus": 0.5}}])
        total, cols = score(rs, ["a", "b"], ["a", "a"])
        assert total == [3.0, 1.0] and cols["custom_reward"] == [1.5, 0.5]
    with pytest.raises(ValueError, match="module:function"):
        resolve(rewards=[{"type": "custom", "params": {}}])
    with pytest.raises(ValueError, match="cannot be imported"):
        resolve(rewards=[{"type": "custom", "params": {"reward_function": "nowhere:fn"}}])


def test_every_registered_reward_stays_in_its_range_on_varied_text():
    texts = ["", "ok", "The answer is 42. Because 6 * 7 = 42, we are done!", "word " * 400,
             "I can't help. Stupid! All men are lazy.", "```python\ndef f(x):\n    return x\n```"]
    cheap = [n for n in SPECS if not (SPECS[n].extra or "").startswith("model")  # models: test_model_rewards
             and n not in ("meteor", "code_execution", "code_correctness")]  # wordnet data; the sandbox
    for name in cheap:
        low, high = SPECS[name].low, SPECS[name].high
        for t in texts:
            v = R(name, t, "42", prompt="What is 6 * 7? Answer in at most 10 words.")
            assert low <= v <= high, (name, t, v)


def test_review_cases_contractions_names_quotes_and_lists():
    assert R("logical_consistency", "x is even. x isn't even.") == 0.0
    assert R("logical_consistency", "The cat can fly. The cat cannot fly.") == 0.0
    assert R("logical_consistency", "It does work. It doesn\u2019t work.") == 0.0
    assert R("hallucination", "I love New York.", context="New York is big.") == 1.0
    assert R("hallucination", "- The city is big.\n- Paris is old.", context="Paris is old.") == 1.0
    assert R("honesty", "I\u2019m not sure. Trust me.") == R("honesty", "I'm not sure. Trust me.")
    assert R("harmlessness", "I can\u2019t help with how to make a bomb.") == 1.0
    assert R("helpfulness", "I won't bore you: Paris is the capital.", prompt="Capital of France?") > 0
    assert R("legal_compliance", "In the UK, consult a lawyer.", jurisdiction=["UK", "Wales"]) == 1.0
    assert R("instruction_following", "The answer is 4.", instruction="Do not use the internet.") == 1.0  # nothing checkable
    assert R("instruction_following", "a, b", instruction="Do not use any commas.") == 0.0


def test_arithmetic_check_on_long_digit_runs():
    # an amount starts only where no digit, comma or point precedes it, and has at most 21 digits and commas: a run of
    # digits or commas holds no computation (an unanchored pattern backtracked quadratically over one)
    assert R("financial_accuracy", "1" * 20000) == 0.0
    assert R("financial_accuracy", "1," * 10000 + "x") == 0.0
    assert rewards_text._arithmetic("1" * 20000) is None
    assert rewards_text._arithmetic("1" * 30 + " * 2 = 4") is None  # no amount starts inside the run
    assert rewards_text._arithmetic("1" * 20000 + " 12 * 2 = 24") == 1.0  # one after it still counts


def test_list_references_score_against_each():
    pytest.importorskip("rouge_score")
    ref = "the cat sat on the mat"
    assert R("rouge", "the cat was on the mat", ["a dog ran", ref]) == pytest.approx(5 / 6)
