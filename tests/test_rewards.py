import math

import pytest

import registry
import rewards
from rewards import (ALIASES, Reward, extract_answer, length, math_correctness, math_equal, parse_number, register,
                     resolve, score)

GSM8K_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")

EXTRACT = [
    # GSM8K style: the number after the last ####
    (GSM8K_SOLUTION, "72"),
    ("Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.\n#### 10", "10"),
    ("The store sold 1,000 + 234 = 1,234 items.\n#### 1,234", "1234"),
    ("She makes 9 * 2 = $18 every day at the farmer's market.\n#### $18", "18"),
    ("The temperature fell 8 degrees from 3, so it is 3 - 8 = -5 degrees.\n#### -5", "-5"),
    ("Each share is 7 / 2 = 3.5 pounds.\n####   3.5", "3.5"),
    ("#### +5", "5"),
    ("The discount is 15/60 = 25%.\n#### 25%", "25"),
    ("Half of the pie is left.\n#### -\\frac{1}{2}", "-0.5"),
    ("The answer is 12.\n#### 15", "15"),
    ("We first guessed $\\boxed{7}$, but 4 + 4 = 8.\n#### 8", "8"),
    ("Working backwards:\n####\nThe answer is 15.", "15"),
    # \boxed: the last one, with balanced braces
    ("The rectangle has area $3 \\times 4 = 12$, so the answer is $\\boxed{12}$.", "12"),
    ("Simplifying, $\\frac{2}{4} = \\boxed{\\frac{1}{2}}$.", "0.5"),
    ("Therefore $m = \\boxed{-\\dfrac{3}{4}}$.", "-0.75"),
    ("So the probability is $\\boxed{\\tfrac{5}{2}}$.", "2.5"),
    ("As a percentage, $\\boxed{25\\%}$.", "25"),
    ("Subtracting 3 from both sides, $\\boxed{x = 5}$.", "5"),
    ("The number of divisors is $\\boxed{\\text{9}}$.", "9"),
    ("She walks $\\boxed{2\\frac{1}{2}}$ miles.", "2.5"),
    ("The total cost is $\\boxed{\\$18.00}$.", "18"),
    ("There are $\\boxed{1{,}000}$ ways.", "1000"),
    ("The area is $\\boxed{12 \\text{ cm}^2}$.", "12"),
    ("First I got $\\boxed{3}$; checking again, the answer is $\\boxed{4}$.", "4"),
    ("Hence $x = \\boxed{\\frac{1}{3}}$.", "1/3"),
    ("The side length is $\\boxed{\\sqrt{2}}$.", None),
    ("The intersection point is $\\boxed{(2, 3)}$.", None),
    # "the answer is" / "answer:", case-insensitive, last occurrence
    ("3 + 4 = 7 marbles in the bag. The answer is 42. Check: 42 - 40 = 2.", "42"),
    ("Adding the two bills gives 450 + 600, so the answer is $1,050.", "1050"),
    ("Answer: 7 apples", "7"),
    ("ANSWER: 16", "16"),
    ("I think the answer is 3 hours. Wait, 12 / 3 = 4, so the answer is 4 hours.", "4"),
    ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "0.75"),
    ("The answer is:\n\n**18**", "18"),
    # no marker: the last number
    ("First, 5 apples + 3 apples = 8 apples.\nThen she eats 2, so 8 - 2 = 6.\nShe has 6 apples left.", "6"),
    ("Step 1: 15 * 4 = 60\nStep 2: 60 / 3 = 20\nSo each friend gets 20 cookies.", "20"),
    ("The train goes 60 km/h for 2.5 hours, covering 150 km.", "150"),
    ("The price went up to $1,234,567 in total", "1234567"),
    ("Items bought:\n- 3 pears\n- 5 apples", "5"),
    ("The difference is 12-5=7", "7"),
    ("The final temperature is \u22127\u00b0C.", "-7"),
    ("Between 12/25/2023 and the next week there are 7 days", "7"),
    ("She ran $\\frac{1}{2}$ of the way", "0.5"),
    ("10/4", "2.5"),
    ("3.50", "3.5"),
    ("The sample weighs 1e3 grams", "1000"),
    ("The dose is 2.5e-3 grams", "0.0025"),
    ("I am not sure how to solve this problem.", None),
    ("", None),
]


@pytest.mark.parametrize("text, expected", EXTRACT)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("s, expected", [("1,234", 1234.0), ("$18", 18.0), ("3/4", 0.75), ("-\\dfrac{1}{2}", -0.5),
                                         ("25%", 25.0), ("x = 5", 5.0), ("3.50", 3.5), ("1e3", 1000.0), ("+7", 7.0),
                                         ("12 apples", 12.0), ("\\sqrt{2}", None), ("2x+3", None), ("1/0", None), ("", None)])
def test_parse_number(s, expected):
    assert parse_number(s) == expected


@pytest.mark.parametrize("pred, ref, tolerance, expected", [
    ("So the answer is 72.", GSM8K_SOLUTION, 1e-6, True),
    ("#### 71", GSM8K_SOLUTION, 1e-6, False),
    ("#### 3.50", "3.5", 1e-6, True),
    ("$\\boxed{0.75}$", "3/4", 1e-6, True),
    ("$\\boxed{\\frac{3}{4}}$", "0.75", 1e-6, True),
    ("#### 2.5", "10/4", 1e-6, True),
    ("#### 10", "10/4", 1e-6, False),
    ("#### 0.3333333", "\\frac{1}{3}", 1e-6, True),
    ("#### 0.3333333", "\\frac{1}{3}", 1e-9, False),
    ("#### 1000001", "1000000", 1e-6, True),
    ("#### 1000001", "1000000", 1e-7, False),
    ("#### 0.0000001", "0", 1e-6, True),
    ("#### 72", 72, 1e-6, True),
    ("#### 72", 72.0, 1e-6, True),
    ("#### 18", "$18", 1e-6, True),
    ("#### 1234", "1,234", 1e-6, True),
    ("#### 5", "Subtracting, we find $\\boxed{5}$.", 1e-6, True),
    ("#### 2", "\\sqrt{2}", 1e-6, False),
    ("#### 72", None, 1e-6, False),
    ("I do not know.", "72", 1e-6, False),
    (None, "72", 1e-6, False),
])
def test_math_equal(pred, ref, tolerance, expected):
    assert math_equal(pred, ref, tolerance) is expected


def test_math_correctness():
    assert math_correctness("She has 6 apples.\n#### 6", "#### 6") == 1.0
    assert math_correctness("She has 7 apples.\n#### 7", "#### 6") == 0.0
    assert math_correctness("#### 6", None) == 0.0
    assert math_correctness("I give up.", "6") == 0.0
    assert math_correctness("#### 6.0000001", "6", tolerance=1e-6, test_list=["x"], context="c") == 1.0
    with pytest.raises(ValueError, match="tolerance"):
        resolve(rewards=[{"type": "math_correctness", "params": {"tolerance": -1}}])


def words(n):
    return " ".join(["word"] * n)


@pytest.mark.parametrize("n, params, expected", [
    (10, dict(target_length=10), 1.0),
    (5, dict(target_length=10), 0.5),
    (15, dict(target_length=10), 0.5),
    (25, dict(target_length=10), 0.0),
    (7, dict(min_length=5, max_length=10), 1.0),
    (2, dict(min_length=5, max_length=10), 0.4),
    (15, dict(min_length=5, max_length=10), 0.5),
    (30, dict(min_length=5, max_length=10), 0.0),
    (0, dict(min_length=5, max_length=10), 0.0),
    (1000, dict(min_length=5), 1.0),
    (1, dict(max_length=10), 1.0),
    (0, dict(min_length=0, max_length=10), 1.0),
    (5, dict(), 0.5),
    (100, dict(), 1.0),
    (750, dict(), 0.5),
])
def test_length(n, params, expected):
    assert length(words(n), **params) == pytest.approx(expected)


def test_length_counts_chars_and_ignores_row_columns():
    assert length("abcd", target_length=8, unit="chars") == 0.5
    assert length("  two   words \n", target_length=2, reference="ref", context="c") == 1.0


@pytest.mark.parametrize("params, message", [
    (dict(min_length=10, max_length=5), "min_length"),
    (dict(min_length=-1), "min_length"),
    (dict(max_length=0), "max_length"),
    (dict(target_length=0), "target_length"),
    (dict(target_length=float("nan")), "target_length"),
    (dict(target_length="100"), "target_length"),
    (dict(target_length=10, max_length=20), "not both"),
    (dict(target_length=10, unit="word"), "did you mean 'words'"),
])
def test_length_validation(params, message):
    with pytest.raises(ValueError, match=message):  # the check register() recorded
        registry.SPECS["length"].check(**params)
    with pytest.raises(ValueError, match=message):  # run once, at resolve time
        resolve(rewards=[{"type": "length", "params": params}])


def test_both_forms_resolve_the_same():
    a = resolve(rewards=[{"type": "math_correctness", "weight": 1.0}, {"type": "length", "weight": 0.1}])
    b = resolve(reward_functions=["math_correctness", "length"], reward_function_weights=[1.0, 0.1])
    assert a == b == [Reward("math_correctness", math_correctness, 1.0, {}), Reward("length", length, 0.1, {})]


def test_resolve_defaults_and_shorthands():
    assert [r.weight for r in resolve(reward_functions=["math_correctness", "length"])] == [1.0, 1.0]
    assert resolve(reward_functions="math_correctness") == resolve(rewards=["math_correctness"])
    [r] = resolve(rewards=[{"type": "length", "name": "short", "weight": 2, "params": {"max_length": 50}}])
    assert r == Reward("short", length, 2.0, {"max_length": 50})


def test_resolve_suffixes_duplicate_names():
    names = [r.name for r in resolve(reward_functions=["length", "math_correctness", "length", "length"])]
    assert names == ["length", "math_correctness", "length_2", "length_3"]


def test_resolve_alias(monkeypatch):
    monkeypatch.setitem(ALIASES, "accuracy", "math_correctness")
    assert resolve(reward_functions=["accuracy"]) == resolve(reward_functions=["math_correctness"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(reward_functions=["math_correctness", "length"], reward_function_weights=[1.0]),
     "got 1 reward_function_weights for 2 reward_functions"),
    (dict(rewards=[{"type": "length"}], reward_functions=["length"]), "use one"),
    (dict(rewards=[{"type": "length"}], reward_function_weights=[1.0]), "use one"),
    (dict(reward_function_weights=[1.0]), "without reward_functions"),
    (dict(), "no rewards configured"),
    (dict(reward_functions=["math_corectness"]), "did you mean 'math_correctness'.*python rewards.py list"),
    (dict(rewards=[{"type": "length", "params": {"max_len": 5}}]), "no param 'max_len' \\(did you mean 'max_length'"),
    (dict(rewards=[{"type": "math_correctness", "params": {"tol": 0.1}}]), "accepted: tolerance"),
    (dict(rewards=[{"type": "math_correctness", "params": {"tolerance": -0.1}}]), "tolerance must be"),
    (dict(rewards=[{"type": "length", "wieght": 2}]), "did you mean 'weight'"),
    (dict(rewards=[{"weight": 2}]), "needs a 'type'"),
    (dict(rewards=[3]), "must be a dict"),
    (dict(rewards=[{"type": "length", "params": [1]}]), "params must be a dict"),
    (dict(reward_functions=[3]), "a name, 'custom' or a callable"),
    (dict(reward_functions=["length"], reward_function_weights=[float("nan")]), "weight must be a finite number"),
    (dict(reward_functions=["length"], reward_function_weights=["0.5"]), "weight must be a finite number"),
    (dict(reward_functions=["length"], reward_function_weights=[True]), "weight must be a finite number"),
])
def test_resolve_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve(**kwargs)


def test_custom_callable_receives_reference_row_and_params():
    seen = []

    def custom(text, reference=None, **kwargs):
        seen.append((text, reference, kwargs))
        return len(text)

    rs = resolve(rewards=[{"type": custom, "weight": 0.5, "params": {"scale": 2}}])
    assert [r.name for r in rs] == ["custom"]
    rows = [{"test_list": ["assert f(1) == 2"], "context": "ctx", "scale": 1, "reference": "dropped"}, {}]
    total, columns = score(rs, ["abc", "de"], ["ref0", None], rows)
    assert seen == [("abc", "ref0", {"test_list": ["assert f(1) == 2"], "context": "ctx", "scale": 2}),
                    ("de", None, {"scale": 2})]
    assert columns == {"custom": [3.0, 2.0]} and total == [1.5, 1.0]


def test_custom_callable_without_kwargs_gets_only_its_columns():
    def exact(text, reference=None, context=None):
        return float(text == context)

    rs = resolve(reward_functions=[exact])
    _, columns = score(rs, ["a", "b"], [None, None], [{"context": "a", "test_list": []}, {"context": "a"}])
    assert columns == {"exact": [1.0, 0.0]}
    with pytest.raises(ValueError, match="cannot be called"):
        resolve(rewards=[{"type": exact, "params": {"scale": 2}}])
    with pytest.raises(ValueError, match="cannot be called"):
        resolve(reward_functions=[lambda text: 1.0])


def test_register_new_reward(monkeypatch):
    monkeypatch.setattr(registry, "SPECS", dict(registry.SPECS))

    def check(scale=1.0):
        if scale <= 0:
            raise ValueError("shout: scale must be > 0")

    @register("shout", check=check)
    def shout(text, reference=None, scale=1.0, **kwargs):
        return scale * text.count("!")

    rs = resolve(rewards=[{"type": "shout", "params": {"scale": 0.5}}])
    assert score(rs, ["hi!!"], [None]) == ([1.0], {"shout": [1.0]})
    with pytest.raises(ValueError, match="scale must be > 0"):
        resolve(rewards=[{"type": "shout", "params": {"scale": 0}}])


def test_score_totals_are_weighted_sums():
    rs = resolve(rewards=[{"type": "math_correctness", "weight": 1.0},
                          {"type": "length", "weight": 0.1, "params": {"target_length": 4}},
                          {"type": "length", "weight": -0.5, "params": {"max_length": 2}}])
    texts = ["The answer is 72.", "The answer is 71.", "#### 72"]
    total, columns = score(rs, texts, [GSM8K_SOLUTION] * 3, rows=[{"question": "q"}] * 3)
    assert list(columns) == ["math_correctness", "length", "length_2"]
    assert columns["math_correctness"] == [1.0, 0.0, 1.0]
    assert columns["length"] == [1.0, 1.0, 0.5]
    assert columns["length_2"] == [0.0, 0.0, 1.0]
    for i in range(3):
        expected = sum(r.weight * columns[r.name][i] for r in rs)
        assert total[i] == pytest.approx(expected)
    assert score(rs, [], []) == ([], {"math_correctness": [], "length": [], "length_2": []})
    assert score(rs, ["#### 72"], [72], rows=[None]) == score(rs, ["#### 72"], [72])


def test_score_errors_name_the_reward():
    def broken(text, reference=None, **kwargs):
        raise KeyError("answer")

    def nan(text, reference=None, **kwargs):
        return math.nan if text == "y" else 0.0

    def wordy(text, reference=None, **kwargs):
        return "good"

    with pytest.raises(RuntimeError, match="reward 'broken' failed on completion 0: KeyError"):
        score(resolve(reward_functions=[broken]), ["x"], [None])
    with pytest.raises(ValueError, match="reward 'nan' returned nan on completion 1"):
        score(resolve(reward_functions=["length", nan]), ["x", "y"], [None, None])
    with pytest.raises(ValueError, match="reward 'wordy' returned 'good'"):
        score(resolve(reward_functions=[wordy]), ["x"], [None])
    with pytest.raises(ValueError, match="2 texts but 1 references"):
        score(resolve(reward_functions=["length"]), ["x", "y"], [None])
    with pytest.raises(ValueError, match="and 1 rows"):
        score(resolve(reward_functions=["length"]), ["x", "y"], [None, None], [{}])
    with pytest.raises(ValueError, match="share a name"):
        score([Reward("a", length, 1.0, {})] * 2, ["x"], [None])


def test_a_row_column_never_sets_a_registered_rewards_param():
    [r] = rewards.resolve(reward_functions=["length"])
    text = "one two three"
    plain, _ = rewards.score([r], [text], [None], [{}])
    shadowed, _ = rewards.score([r], [text], [None], [{"max_length": 1, "unit": "chars"}])
    assert plain == shadowed
