"""Mean, standard deviation, 95 % confidence interval (Student's t), Welch's t-test, and
Holm's correction of a family of p-values.

scipy.stats is used when it is installed; otherwise Student's t distribution is computed
here from the regularized incomplete beta function (continued fraction, as in Numerical
Recipes), which agrees with scipy to about 1e-10.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

try:  # optional
    from scipy import stats as _scipy_stats
except ImportError:  # pragma: no cover - depends on the environment
    _scipy_stats = None


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    sd: float | None  # sample standard deviation (n - 1); None for one value
    ci_low: float | None  # 95 % confidence interval of the mean; None for one value
    ci_high: float | None


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of no values")
    return math.fsum(values) / len(values)


def sd(values: Sequence[float]) -> float | None:
    """Sample standard deviation (divides by n - 1); None for fewer than two values."""
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


PERCENT = (0.0, 100.0)  # an accuracy's bounds, for summarize(bounds=...)


def summarize(values: Sequence[float], level: float = 0.95,
              bounds: tuple[float, float] | None = None) -> Summary:
    """n, mean, sd and the Student's t interval of the mean; with `bounds` (an accuracy's
    0 and 100) the interval is cut to them: from few seeds it can reach past what the
    measure can be, which says nothing more than the bound."""
    m, s = mean(values), sd(values)
    if s is None:
        return Summary(len(values), m, None, None, None)
    half = t_ppf(0.5 + level / 2, len(values) - 1) * s / math.sqrt(len(values))
    low, high = m - half, m + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Summary(len(values), m, s, low, high)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (unequal variances) that the means are equal;
    None when either sample has fewer than two values or both have no spread."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = sd(a) ** 2 / len(a), sd(b) ** 2 / len(b)
    if va + vb == 0:
        return None
    t = (mean(a) - mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return 2 * t_sf(abs(t), df)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (None: no test, left out of the
    family). The k-th smallest of m p-values is multiplied by m - k + 1, the products kept
    non-decreasing in that order and capped at 1; a hypothesis is rejected at level alpha
    when its adjusted p-value is at most alpha, which holds the family-wise error rate at
    alpha (Holm, 1979)."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for k, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - k) * p))
        adjusted[i] = running
    return adjusted


# ------------------------------------------------------------------ Student's t distribution

def t_sf(t: float, df: float) -> float:
    """P(T > t) for t >= 0."""
    if _scipy_stats is not None:
        return float(_scipy_stats.t.sf(t, df))
    return 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))


def t_ppf(p: float, df: float) -> float:
    """The p-quantile of Student's t with df degrees of freedom, p in (0.5, 1)."""
    if _scipy_stats is not None:
        return float(_scipy_stats.t.ppf(p, df))
    low, high = 0.0, 1.0
    while t_sf(high, df) > 1 - p:
        high *= 2
    for _ in range(200):  # bisection; t_sf falls as t grows
        middle = (low + high) / 2
        if t_sf(middle, df) > 1 - p:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1 - math.exp(log_front) * _betacf(b, a, 1 - x) / b


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < eps:
            break
    return h
