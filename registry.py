"""The reward registry: one Spec per reward name, recorded by @register. Imports nothing of ours."""
import math
import numbers
from typing import Callable, NamedTuple, Optional


class Spec(NamedTuple):
    name: str
    fn: Callable  # f(text, reference=None, **kwargs) -> float
    check: Optional[Callable]  # check(**params) raises ValueError on bad params, or a missing extra or model
    batch: Optional[Callable]  # batch(texts, references, rows, **params) -> list of floats
    low: float  # the range of its values, for `list`
    high: float
    extra: Optional[str]  # the pip extra (or model) it needs, for `list`
    needs: tuple  # dataset columns of which every row must have one (check_columns)


SPECS = {}  # name -> Spec


def register(name, check=None, batch=None, low=0.0, high=1.0, extra=None, needs=()):
    """Decorator: record a reward function under `name`, with the other fields of its Spec."""
    def deco(fn):
        SPECS[name] = Spec(name, fn, check, batch, low, high, extra, tuple(needs))
        return fn
    return deco


def is_number(x):
    """A finite real number, not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
