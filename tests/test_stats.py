"""The design study's statistics: the t quantile against table values, intervals, paired differences, verdicts."""
from __future__ import annotations

import math

import pytest

from t2tvit.tools.paper import CLAIMS, DESIGN_STUDY
from t2tvit.tools.stats import EQUAL_MARGIN, paired_difference, summarize, t_cdf, t_quantile, verdict

# Two-sided 95% critical values of Student's t (any statistics textbook's table), and one-sided 99%
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 19: 2.093, 29: 2.045, 120: 1.980}
T_99 = {1: 31.821, 2: 6.965, 4: 3.747, 10: 2.764}


@pytest.mark.parametrize('df,expected', sorted(T_975.items()))
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=6e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=6e-4)


@pytest.mark.parametrize('df,expected', sorted(T_99.items()))
def test_t_quantile_one_sided_99(df, expected):
    assert t_quantile(0.99, df) == pytest.approx(expected, abs=6e-4)


def test_t_cdf_closed_forms():
    # df = 1 is the Cauchy distribution, df = 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-3.0, -0.4, 0.0, 0.7, 5.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.960, abs=1e-3)  # the normal limit


def test_t_quantile_refuses_what_it_cannot_give():
    with pytest.raises(ValueError, match='0 < p < 1 and df >= 1'):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match='0 < p < 1 and df >= 1'):
        t_quantile(0.9, 0)


def test_summary_of_three_runs():
    s = summarize([84.0, 85.0, 86.0])
    assert (s['n'], s['mean'], s['std']) == (3, 85.0, 1.0)
    half = 4.302652729749 / math.sqrt(3)
    assert s['ci95'] == pytest.approx([85.0 - half, 85.0 + half], abs=1e-9)
    assert s['ci95_width'] == pytest.approx(2 * half, abs=1e-9)
    one = summarize([84.5])
    assert (one['n'], one['mean'], one['std'], one['ci95'], one['ci95_width']) == (1, 84.5, None, None, None)


def test_paired_difference_uses_the_seeds_both_have():
    d = paired_difference({0: 80.0, 1: 82.0, 2: 81.0, 5: 70.0}, {0: 79.0, 1: 80.0, 2: 81.5})
    assert d['seeds'] == [0, 1, 2] and d['differences'] == [1.0, 2.0, -0.5]
    assert d['n'] == 3 and d['mean'] == pytest.approx(2.5 / 3)


def _judge(paper, variant, baseline):
    d = paired_difference(dict(enumerate(variant)), dict(enumerate(baseline)))
    return verdict(paper, d['ci95'], d['n'])['verdict']


def test_verdicts_on_synthetic_results():
    baseline = [84.0, 84.5, 85.0, 84.2, 84.8]
    clearly_better = [86.1, 86.4, 87.2, 86.0, 86.9]
    clearly_worse = [82.0, 82.6, 83.1, 82.3, 82.7]
    overlapping = [84.9, 83.6, 85.8, 83.9, 85.1]
    # the paper says the variant is better (+2)
    assert _judge(+2.0, clearly_better, baseline) == 'holds'
    assert _judge(+2.0, clearly_worse, baseline) == 'does not hold'
    assert _judge(+2.0, overlapping, baseline) == 'inconclusive'
    # the paper says the variant is worse (-2)
    assert _judge(-2.0, clearly_worse, baseline) == 'holds'
    assert _judge(-2.0, clearly_better, baseline) == 'does not hold'
    assert _judge(-2.0, overlapping, baseline) == 'inconclusive'


def test_verdicts_on_claims_of_no_difference():
    assert verdict(0.0, [-0.3, 0.4], 5)['verdict'] == 'holds'
    assert verdict(0.1, [0.8, 1.9], 5)['verdict'] == 'does not hold'
    assert verdict(0.0, [-2.0, -0.6], 5)['verdict'] == 'does not hold'
    assert verdict(0.0, [-0.2, 1.5], 5)['verdict'] == 'inconclusive'
    assert EQUAL_MARGIN == 0.5


def test_one_seed_is_always_inconclusive_with_the_reason():
    for paper in (-2.0, 0.0, 2.7):
        judged = verdict(paper, None, 1)
        assert judged['verdict'] == 'inconclusive'
        assert judged['reason'] == '1 paired seed(s): no interval; run two or more seeds'


def test_claims_take_their_numbers_from_the_papers_rows():
    by_variant = {c.variant: c for c in CLAIMS}
    assert by_variant['t2t_vit_p_14'].paper_difference == pytest.approx(79.5 - 81.5)
    assert by_variant['t2t_vit_14_wide'].paper_difference == pytest.approx(78.8 - 81.5)
    assert by_variant['t2t_vit_14_resnext'].paper_difference == 0.0
    assert all(c.baseline == 't2t_vit_14' and c.variant in DESIGN_STUDY for c in CLAIMS)
    assert len(CLAIMS) == 7
