"""Small-sample statistics for the design study: t-intervals of a mean, paired differences, and the verdict on a
claim of the paper.

No scipy: the Student t quantile comes from the t distribution's CDF (the regularised incomplete beta function,
evaluated by its continued fraction) and bisection. `tests/test_stats.py` checks it against published table values.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

__all__ = ['t_cdf', 't_quantile', 'summarize', 'paired_difference', 'verdict', 'EQUAL_MARGIN', 'CONFIDENCE']

CONFIDENCE = 0.95
# A claim that two designs score the same (the paper's difference under this many points) holds when the whole
# interval of our difference lies within +-EQUAL_MARGIN points.
EQUAL_MARGIN = 0.5


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Lentz's continued fraction for the incomplete beta function (Numerical Recipes, betacf)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, for 0 < p < 1 and df >= 1 (bisection on `t_cdf` to 1e-12)."""
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f't_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}')
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    while high - low > 1e-12 * max(1.0, high):
        middle = (low + high) / 2.0
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2.0


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Dict[str, Any]:
    """n, mean, sample standard deviation and the two-sided t-interval of the mean (None for n < 2)."""
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n if n else None
    if n < 2:
        return dict(n=n, mean=mean, std=None, ci95=None, ci95_width=None)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return dict(n=n, mean=mean, std=std, ci95=[mean - half, mean + half], ci95_width=2 * half)


def paired_difference(variant: Dict[Any, float], baseline: Dict[Any, float]) -> Dict[str, Any]:
    """variant - baseline per key (seed) both have, and the t-interval of their mean."""
    keys = sorted(set(variant) & set(baseline))
    differences = [variant[k] - baseline[k] for k in keys]
    return dict(seeds=keys, differences=differences, **summarize(differences))


def verdict(paper_difference: float, ci: Optional[Sequence[float]], n: int,
            margin: float = EQUAL_MARGIN) -> Dict[str, str]:
    """Whether our paired-difference interval `ci` (variant - baseline, points) agrees with the paper's.

    A paper difference under `margin` points claims the two score the same: it holds when the whole interval lies
    within +-margin, does not hold when the whole interval lies outside it, and is inconclusive otherwise. A larger
    paper difference claims a direction: it holds when the interval excludes zero on the paper's side, does not hold
    when it excludes zero on the other side, and is inconclusive when it contains zero.
    """
    if n < 2 or ci is None:
        return dict(verdict='inconclusive', reason=f'{n} paired seed(s): no interval; run two or more seeds')
    low, high = ci
    if abs(paper_difference) < margin:
        if -margin <= low and high <= margin:
            return dict(verdict='holds', reason=f'the interval lies within +-{margin} points: no real difference')
        if low > margin or high < -margin:
            return dict(verdict='does not hold', reason=f'the interval lies beyond {margin} points from zero')
        return dict(verdict='inconclusive', reason=f'the interval reaches past +-{margin} points but not wholly')
    sign = 1.0 if paper_difference > 0 else -1.0
    if sign * low > 0 and sign * high > 0:
        return dict(verdict='holds', reason='the interval excludes zero on the paper\'s side')
    if sign * low < 0 and sign * high < 0:
        return dict(verdict='does not hold', reason='the interval excludes zero on the opposite side')
    return dict(verdict='inconclusive', reason='the interval contains zero')
