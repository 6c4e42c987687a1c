"""Final-answer comparison for math rewards: math-verify for symbolic answers, the numbers for plain ones."""
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import pytest

import rewards
from rewards import math_correctness, math_equal, math_reasoning, resolve, score

GSM8K_REF = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
             "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
MATH_REF = "Squaring, $x^2 = 8$, so $x = \\boxed{2\\sqrt{2}}$ since $x > 0$."

# (completion or answer, reference, equal?, numeric?): numeric says whether the numeric backend gives the same
# verdict; where it is False the answer is symbolic and the numeric backend returns 0.0 (it cannot judge it)
PAIRS = [
    # GSM8K style
    ("She sold 24 clips in May, so 48 + 24 = 72 in all.\n#### 72", GSM8K_REF, True, True),
    ("She sold 48 + 24 = 71 clips.\n#### 71", GSM8K_REF, False, True),
    ("First, 5 + 3 = 8 apples. She eats 2, so she has 6 apples left.", "6", True, True),
    ("Weng earns 12/60 = $0.2 per minute, so 0.2 x 50 = $10.\n#### $10", "10", True, True),
    ("The store sold 1,000 + 234 = 1,234 items.\n#### 1,234", "#### 1234", True, True),
    ("It falls 8 degrees from 3: 3 - 8 = -5.\n#### -5", "-5", True, True),
    ("#### 5", "-5", False, True),
    ("3 + 4 = 7 marbles. The answer is 42. Check: 42 - 40 = 2.", "42", True, True),
    ("I think the answer is 3 hours. Wait, 12 / 3 = 4, so the answer is 4 hours.", "4", True, True),
    ("Answer: 7 apples", "7", True, True),
    ("The answer is:\n\n**18**", "18", True, True),
    ("the answer is 42, since 6 * 7 = 42", "42", True, True),
    ("#### 3.50", "3.5", True, True),
    ("#### 72", 72, True, True),
    ("#### 72", 72.5, False, True),
    ("#### 1000001", "1000000", True, True),  # within the default tolerance 1e-6
    ("#### 0.3333333", "\\frac{1}{3}", True, True),
    ("I am not sure how to solve this problem.", "6", False, True),
    ("", "6", False, True),
    # plain numbers written in LaTeX: equivalent forms, units, degrees, percentages
    ("#### 0.5", "\\frac{1}{2}", True, True),
    ("So the probability is $\\boxed{\\frac{1}{2}}$.", "0.5", True, True),
    ("The answer is 1/2.", "\\frac{1}{2}", True, True),
    ("$\\boxed{0.75}$", "3/4", True, True),
    ("She walks $\\boxed{2\\frac{1}{2}}$ miles.", "5/2", True, True),
    ("$\\boxed{\\frac{7}{2}}$", "3\\frac{1}{2}", True, True),
    ("Therefore $m = \\boxed{-\\dfrac{3}{4}}$.", "-0.75", True, True),
    ("$\\boxed{\\frac{3}{4}}$", "-\\frac{3}{4}", False, True),
    ("$\\boxed{-\\frac{1}{3}}$", "\\frac{1}{3}", False, True),
    ("$\\boxed{10}$", "10/4", False, True),
    ("Subtracting 3 from both sides, $\\boxed{x = 5}$.", "5", True, True),
    ("So $x = \\boxed{3}$.", "x = 3", True, True),
    ("As a percentage, $\\boxed{25\\%}$.", "25", True, True),
    ("As a percentage, $\\boxed{25\\%}$.", "0.25", False, True),  # a % sign is dropped: 25% is 25
    ("The angle is $\\boxed{30^\\circ}$.", "30", True, True),
    ("The area is $\\boxed{12 \\text{ cm}^2}$.", "12", True, True),
    ("$\\boxed{5}$", "5\\text{ cm}", True, True),
    ("The total cost is $\\boxed{\\$18.00}$.", "18", True, True),
    ("There are $\\boxed{1{,}000}$ ways.", "1000", True, True),
    # symbolic: radicals, pi, expressions
    ("Simplifying, $\\boxed{2\\sqrt{2}}$.", "\\sqrt{8}", True, False),
    ("$\\boxed{\\sqrt{8}}$", MATH_REF, True, False),
    ("$\\boxed{3\\sqrt{2}}$", "\\sqrt{12}", False, False),
    ("$\\boxed{-2\\sqrt{5}}$", "-\\sqrt{20}", True, False),
    ("Final Answer: The final answer is $\\frac{\\sqrt{3}}{3}$. I hope it is correct.", "\\frac{1}{\\sqrt{3}}",
     True, False),
    ("$\\boxed{\\dfrac{\\sqrt{2}}{2}}$", "\\frac{1}{\\sqrt{2}}", True, False),
    ("$\\boxed{\\sqrt{2}}$", "2", False, False),
    ("The angle is $\\boxed{\\frac{\\pi}{2}}$.", "\\pi/2", True, False),
    ("$\\boxed{9\\pi}$", "9\\pi", True, False),
    ("$\\boxed{\\pi}$", "3.14", False, False),
    ("$\\boxed{x^2+1}$", "1 + x^2", True, False),
    ("$\\boxed{x^2-1}$", "x^2+1", False, False),
    ("Expanding, the answer is $(x+1)^2$.", "x^2+2x+1", True, False),
    ("$\\boxed{3 + 2i}$", "3+2i", True, False),
    ("$\\boxed{\\text{(B)}}$", "B", True, False),
    ("$\\boxed{\\text{(B)}}$", "C", False, False),
    # intervals, sets, tuples
    ("Thus $x \\in \\boxed{[1, 3)}$.", "[1,3)", True, False),
    ("Thus $x \\in \\boxed{[1, 3]}$.", "[1,3)", False, False),
    ("The solution set is $x \\in (2, \\infty)$.", "(2, \\infty)", True, False),
    ("$\\boxed{(-\\infty, 0) \\cup (1, \\infty)}$", "(-\\infty,0)\\cup(1,\\infty)", True, False),
    ("$\\boxed{(-\\infty, 0] \\cup (1, \\infty)}$", "(-\\infty,0)\\cup(1,\\infty)", False, False),
    ("The roots are $\\boxed{\\{1, 2, 3\\}}$.", "\\{3,2,1\\}", True, False),
    ("The roots are $\\boxed{\\{1, 2\\}}$.", "\\{1,2,3\\}", False, False),
    ("The intersection point is $\\boxed{(2, 3)}$.", "(2,3)", True, False),
    ("The intersection point is $\\boxed{(3, 2)}$.", "(2,3)", False, False),
    ("The answer is $\\boxed{(1, -2)}$", "(1,-2)", True, False),
]


@pytest.mark.parametrize("text, ref, expected, numeric", PAIRS)
def test_math_verify_backend(text, ref, expected, numeric):
    pytest.importorskip("math_verify")
    assert math_correctness(text, ref, backend="math_verify") == float(expected)


@pytest.mark.parametrize("text, ref, expected, numeric", PAIRS)
def test_numeric_backend(text, ref, expected, numeric):
    assert math_correctness(text, ref, backend="numeric") == (float(expected) if numeric else 0.0)


def test_numeric_backend_misreads_an_unmarked_symbolic_answer():
    text = "The side is $\\frac{\\sqrt{2}}{2}$"
    assert math_correctness(text, "2", backend="numeric") == 1.0  # reads the last number, 2
    pytest.importorskip("math_verify")
    assert math_correctness(text, "2", backend="math_verify") == 0.0
    assert math_correctness(text, "\\frac{1}{\\sqrt{2}}", backend="math_verify") == 1.0


class NoMathVerify(types.SimpleNamespace):
    def __getattr__(self, name):
        raise AssertionError(f"math_verify.{name} used for plain numbers")


def test_plain_numbers_skip_math_verify(monkeypatch):
    monkeypatch.setattr(rewards, "_math_verify", lambda: NoMathVerify())
    for text, ref, expected, numeric in PAIRS:
        if numeric and rewards._final(text) is not None:
            assert math_correctness(text, ref, backend="math_verify") == float(expected), (text, ref)


def test_without_math_verify(monkeypatch):
    monkeypatch.setattr(rewards, "_math_verify", lambda: None)
    assert math_correctness("$\\boxed{2\\sqrt{2}}$", "\\sqrt{8}") == 0.0  # auto: numeric
    assert math_correctness("#### 0.5", "\\frac{1}{2}") == 1.0
    for name in ("math_correctness", "math_reasoning"):
        with pytest.raises(ValueError, match="pip install math-verify"):
            resolve(rewards=[{"type": name, "params": {"backend": "math_verify"}}])
        resolve(rewards=[{"type": name, "params": {"backend": "auto"}}])
    with pytest.raises(ValueError, match="pip install math-verify"):
        math_equal("#### 1", "1", backend="math_verify")


@pytest.mark.parametrize("params, match", [
    ({"backend": "sympy"}, "backend must be one of"),
    ({"backend": "numerc"}, "did you mean 'numeric'"),
    ({"tolerance": -1}, "tolerance must be"),
])
def test_bad_params(params, match):
    for name in ("math_correctness", "math"):
        with pytest.raises(ValueError, match=match):
            resolve(rewards=[{"type": name, "params": params}])


def test_off_main_thread():
    """math-verify's signal-based timeouts fail outside the main thread; there it runs without one."""
    pytest.importorskip("math_verify")
    rewards._parse_answer.cache_clear()  # parse again, in the workers
    pairs = [(t, r, e) for t, r, e, numeric in PAIRS if not numeric][:8]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda p: math_correctness(p[0], p[1], backend="math_verify"), pairs))
    assert got == [float(e) for _, _, e in pairs]
    rs = resolve(rewards=[{"type": "math_correctness", "params": {"backend": "math_verify"}}, {"type": "math"}])
    out = {}
    worker = threading.Thread(target=lambda: out.update(result=score(rs, [p[0] for p in pairs], [p[1] for p in pairs])))
    worker.start()
    worker.join()
    assert out["result"][1]["math_correctness"] == got


GSM8K_WORKED = ("First, she sold 48 / 2 = 24 clips in May.\nThen she sold 48 + 24 = 72 clips in total.\n"
                "Check: 72 - 24 = 48, as given.\nSo the answer is 72.")


@pytest.mark.parametrize("text, ref, params, expected", [
    (GSM8K_WORKED, "72", {}, 1.0),  # 3 equations, 3 step words, a marked answer, distinct lines
    (GSM8K_WORKED.replace("72", "70"), "72", {}, 0.0),  # a wrong answer earns nothing for its steps
    (GSM8K_WORKED, None, {}, 1.0),  # no reference: structure alone
    ("#### 72", "72", {}, 0.75),  # correct, no work: (1 + (0 + 1) / 2) / 2
    ("72", "72", {}, 0.625),  # nor a marker: (1 + (0 + 0.5) / 2) / 2
    ("#### 72", "72", {"check_reasoning": False, "check_format": False}, 1.0),
    (GSM8K_REF, None, {"check_format": False}, 1 / 3),  # 2 equations, no step word
    ("Also, when 5 is sold, the rest stays.", None, {"check_format": False}, 0.0),  # no "so"/"then" in words
    ("so then so then\nso then so then\nso then so then", None, {"check_reasoning": False}, 1 / 6),  # repeated lines
    ("", "72", {}, 0.0),
    ("", None, {}, 0.0),
])
def test_math_reasoning(text, ref, params, expected):
    assert math_reasoning(text, ref, backend="numeric", **params) == pytest.approx(expected)


def test_math_reasoning_symbolic():
    pytest.importorskip("math_verify")
    worked = "First, $x^2 = 8$.\nThen $x = \\sqrt{8} = 2\\sqrt{2}$ since $x > 0$.\nSo $x = \\boxed{2\\sqrt{2}}$."
    assert math_reasoning(worked, "\\sqrt{8}", backend="math_verify") > 0.5
    assert math_reasoning(worked, "\\sqrt{8}", backend="numeric") == 0.0


def test_math_reasoning_params():
    assert resolve(rewards=["math"])[0].fn is math_reasoning
    for params, match in [({"check_format": 1}, "True or False"),
                          ({"check_correctness": False, "check_reasoning": False, "check_format": False}, "nothing")]:
        with pytest.raises(ValueError, match=match):
            resolve(rewards=[{"type": "math_reasoning", "params": params}])
