"""rl.stats three ways: numbers worked out by hand, scipy/statsmodels or a plain loop as reference, invariants.

Also regression tests for the errors of the reference implementation this module replaces: a negative
t-quantile, normal differences sent to Wilcoxon, and a "paired" permutation test that was not paired.
"""

import itertools

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import optimize
from scipy import stats as st

from rl import stats

# b: per-seed accuracies of one experiment; a = b + d with d = [-2, 0, 3, 4, 4, 5] points.
B6 = np.array([0.50, 0.40, 0.60, 0.55, 0.45, 0.35])
D6 = np.array([-2, 0, 3, 4, 4, 5]) / 100
A6 = B6 + D6


def all_sign_flips(d: np.ndarray) -> np.ndarray:
    """Every sign pattern applied to d: (2**n, n). The reference for the exact tests."""
    return np.array(list(itertools.product([1.0, -1.0], repeat=len(d)))) * d


# ---- input validation -------------------------------------------------------------------------------------

def test_mismatched_lengths_are_refused_with_the_lengths():
    with pytest.raises(ValueError, match=r"len\(a\)=3 != len\(b\)=2"):
        stats.paired_differences(np.ones(3), np.ones(2))


def test_nan_is_refused_with_its_position():
    with pytest.raises(ValueError, match=r"b has NaN .* positions \[1\]"):
        stats.paired_ttest(np.ones(3), np.array([1.0, np.nan, 1.0]))


def test_one_seed_and_2d_inputs_are_refused():
    with pytest.raises(ValueError, match="at least 2 seeds"):
        stats.compare_paired(np.ones(1), np.ones(1))
    with pytest.raises(ValueError, match="1-D"):
        stats.paired_differences(np.ones((2, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="at least 2 finite differences"):
        stats.choose_test(np.array([np.nan, 1.0]))


# ---- paired t-test and the t quantile ---------------------------------------------------------------------

def test_paired_ttest_by_hand_scipy_and_dz():
    # d = [-2, 0, 3, 4, 4, 5] / 100: mean = 14/6 = 2.3333 points; squared deviations 18.778 + 5.444 + 0.444
    # + 2.778 + 2.778 + 7.111 = 37.333, var = 37.333 / 5 = 7.4667, sd = 2.7325, se = 2.7325 / sqrt(6) = 1.1155;
    # t = 2.3333 / 1.1155 = 2.0917 on df = 5, two-sided p = 0.0907.
    res = stats.paired_ttest(A6, B6)
    assert res.statistic == pytest.approx(2.0917, abs=1e-4)
    assert round(res.p, 3) == 0.091
    ref = st.ttest_rel(A6, B6)  # the reference implementation
    assert res.p == pytest.approx(ref.pvalue, rel=1e-12) and res.statistic == pytest.approx(ref.statistic)
    assert res.p == pytest.approx(2 * st.t.sf(2.0917, df=5), abs=1e-4)
    assert res.statistic == pytest.approx(stats.cohens_dz(A6, B6) * np.sqrt(6))  # invariant t = d_z sqrt(n)
    assert stats.paired_ttest(B6, A6).p == pytest.approx(res.p)  # swapping sides only flips the sign


def test_t_quantile_at_df10_is_positive_2228_regression():
    # Regression: the reference returned -0.36 for t_{0.975, 10}. x = 0..10: mean 5, sd = sqrt(110 / 10)
    # = sqrt(11), se = sqrt(11) / sqrt(11) = 1, so the 95% half-width is t_{0.975, 10} = 2.228 exactly.
    ci = stats.mean_ci(np.arange(11.0))
    assert ci.estimate == 5.0
    assert ci.high - 5.0 == pytest.approx(2.228, abs=5e-4) and 5.0 - ci.low == pytest.approx(2.228, abs=5e-4)
    assert ci.high - 5.0 == pytest.approx(st.t.ppf(0.975, 10))


def test_mean_ci_one_seed_is_explicit():
    ci = stats.mean_ci(np.array([0.4]))
    assert ci.estimate == 0.4 and np.isnan(ci.low) and "one seed" in ci.note


def test_constant_differences_t_is_undefined_not_a_crash():
    res = stats.paired_ttest(np.array([0.3, 0.5, 0.7]), np.array([0.2, 0.4, 0.6]))  # d = 0.1 each (float noise)
    assert np.isnan(res.p) and "sd is 0" in res.note


# ---- Wilcoxon signed-rank ---------------------------------------------------------------------------------

def test_wilcoxon_exact_by_hand():
    # d = [1, 2, -3, 4, 5]: ranks of |d| are 1..5, R- = 3, statistic min(R+, R-) = 3. Sign patterns with
    # R+ <= 3: {}, {1}, {2}, {3}, {1, 2} -> 5 of 32, two-sided p = 2 * 5 / 32 = 0.3125.
    res = stats.wilcoxon_signed_rank(np.array([1.0, 2, -3, 4, 5]), np.zeros(5))
    assert res.statistic == 3 and res.p == pytest.approx(0.3125) and res.method == "exact"


def test_wilcoxon_with_ties_and_a_zero_is_exact_by_enumeration():
    d = np.array([1.0, 1, 2, -2, 3, 0, 4, -1, 5])  # ties at |1| and |2|, one zero
    res = stats.wilcoxon_signed_rank(d, np.zeros_like(d))
    nonzero = d[d != 0]
    ranks = st.rankdata(np.abs(nonzero))
    r_plus = (all_sign_flips(nonzero) > 0) @ ranks  # R+ under every sign pattern (loop reference)
    observed, centre = ranks[nonzero > 0].sum(), ranks.sum() / 2
    expected = np.mean(np.abs(r_plus - centre) >= abs(observed - centre) - 1e-9)
    assert res.p == pytest.approx(expected) and res.method.startswith("exact")
    assert "1 zero difference(s) dropped" in res.note
    assert res.p == pytest.approx(st.wilcoxon(d, method="auto").pvalue)


def test_wilcoxon_all_zero_differences_p_is_one():
    res = stats.wilcoxon_signed_rank(np.ones(4), np.ones(4))
    assert res.p == 1.0 and "zero" in res.note


# ---- sign-flip permutation test ---------------------------------------------------------------------------

def test_sign_flip_by_hand():
    # d = [1, 2, 3]: of the 8 sign patterns only +++ and --- reach |mean| >= 2, so p = 2/8 = 0.25.
    res = stats.sign_flip_test(np.array([1.0, 2, 3]), np.zeros(3))
    assert res.p == pytest.approx(0.25) and res.statistic == pytest.approx(2.0)


def test_sign_flip_matches_enumeration_and_scipy_paired_samples():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.5, 0.2, 10), rng.normal(0.45, 0.2, 10)
    d = a - b
    null = all_sign_flips(d).mean(1)
    expected = np.mean(np.abs(null) >= abs(d.mean()) * (1 - 1e-12))
    res = stats.sign_flip_test(a, b)
    assert res.p == pytest.approx(expected) and "exact" in res.method
    # The same test phrased on the two samples: permutation_type="samples" swaps a and b within each seed.
    two = st.permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples",
                              vectorized=True, n_resamples=np.inf)
    assert res.p == pytest.approx(two.pvalue)


def test_sign_flip_is_really_paired_regression():
    # Regression: the reference's "paired" test permuted across seeds. 13 seeds spread from 0.2 to 0.8
    # (between-seed sd ~0.19), each improved by a consistent 0.023-0.025. Paired: all 13 differences positive,
    # so only +...+ and -...- reach the observed |mean|: p = 2 / 2**13 = 0.000244. Unpaired, the shift is lost
    # in the seed spread (Welch p ~0.76).
    b = np.linspace(0.2, 0.8, 13)
    a = b + 0.024 + 0.001 * (np.arange(13) % 3 - 1)
    assert stats.sign_flip_test(a, b).p == pytest.approx(2 / 2**13)
    unpaired = st.ttest_ind(a, b, equal_var=False).pvalue
    unpaired_perm = st.permutation_test((a, b), lambda x, y, axis: np.mean(x, axis) - np.mean(y, axis),
                                        n_resamples=9999, vectorized=True, rng=0).pvalue
    assert 0.7 < unpaired < 0.82 and unpaired_perm > 0.5
    assert stats.compare_paired(a, b).p < 0.001


def test_sign_flip_monte_carlo_is_seeded_and_close_to_t():
    rng = np.random.default_rng(4)
    d = rng.normal(0.3, 1.0, 30)
    one = stats.sign_flip_test(d, np.zeros(30), rng_seed=7)
    assert one == stats.sign_flip_test(d, np.zeros(30), rng_seed=7) and "monte carlo" in one.method
    assert one.p >= 1 / (99_999 + 1)  # (k + 1) / (R + 1) never reports 0
    assert one.p == pytest.approx(st.ttest_1samp(d, 0).pvalue, abs=0.02)  # same hypothesis, normal data


# ---- automatic choice -------------------------------------------------------------------------------------

def test_normal_differences_with_large_n_go_to_the_t_test_regression():
    # Regression: the reference's normality check sent normal data to Wilcoxon (inverted comparison).
    d = np.random.default_rng(0).normal(0.1, 1.0, 40)
    assert st.shapiro(d).pvalue > 0.05  # precondition of this case
    name, reason = stats.choose_test(d)
    assert name == "t-test" and "Shapiro-Wilk" in reason
    # Over many draws ~95% of normal samples (the test's 1 - alpha) must go to t; the inverted rule gives ~5%.
    picks = [stats.choose_test(np.random.default_rng(s).normal(size=30))[0] for s in range(200)]
    assert picks.count("t-test") / 200 > 0.88


def test_heavy_tailed_differences_go_to_wilcoxon_and_small_n_to_permutation():
    picks = [stats.choose_test(np.random.default_rng(s).lognormal(0, 1, 40))[0] for s in range(50)]
    assert picks.count("wilcoxon") / 50 > 0.95
    assert stats.choose_test(np.random.default_rng(0).normal(size=10))[0] == "permutation"
    name, reason = stats.choose_test(np.full(30, 0.02))
    assert name == "permutation" and "all differences equal" in reason


def test_compare_paired_reports_the_chosen_p():
    cmp = stats.compare_paired(A6, B6)
    assert cmp.n == 6 and cmp.mean_diff == pytest.approx(D6.mean())
    assert cmp.chosen == "permutation" and cmp.p == cmp.permutation.p
    assert cmp.ttest == stats.paired_ttest(A6, B6) and cmp.wilcoxon == stats.wilcoxon_signed_rank(A6, B6)


# ---- effect sizes -----------------------------------------------------------------------------------------

def test_cohens_dz_by_hand():
    # d = [1, 2, 3]: mean 2, sd (ddof=1) = sqrt((1 + 0 + 1) / 2) = 1, d_z = 2.
    assert stats.cohens_dz(np.array([1.0, 2, 3]), np.zeros(3)) == pytest.approx(2.0)
    assert np.isnan(stats.cohens_dz(np.ones(3), np.zeros(3)))


def test_rank_biserial_by_hand_scipy_and_invariants():
    # d = [1, 2, -3, 4]: ranks 1..4, R+ = 1 + 2 + 4 = 7, R- = 3, r = (7 - 3) / 10 = 0.4.
    a, b = np.array([1.0, 2, -3, 4]), np.zeros(4)
    assert stats.rank_biserial(a, b) == pytest.approx(0.4)
    r_plus = st.wilcoxon(a, alternative="greater").statistic  # scipy's one-sided statistic is R+
    assert stats.rank_biserial(a, b) == pytest.approx(2 * r_plus / 10 - 1)
    assert stats.rank_biserial(b, a) == pytest.approx(-0.4)
    # zeros are dropped: d = [0, 1, 2] ranks the nonzero ones 1, 2 -> r = 1; all positive -> 1.
    assert stats.rank_biserial(np.array([0.0, 1, 2]), np.zeros(3)) == 1.0
    assert np.isnan(stats.rank_biserial(np.ones(3), np.ones(3)))


# ---- bootstrap --------------------------------------------------------------------------------------------

def test_bootstrap_degenerate_is_zero_width():
    ci = stats.bootstrap_mean_diff(np.array([0.3, 0.5, 0.7]), np.array([0.2, 0.4, 0.6]))
    assert ci.low == ci.high == pytest.approx(0.1) and "zero-width" in ci.note


def test_bootstrap_invariants_and_paired_equivalence():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.6, 0.1, 12), rng.normal(0.5, 0.1, 12)
    pct = stats.bootstrap_mean_diff(a, b, "percentile", rng_seed=1)
    basic = stats.bootstrap_mean_diff(a, b, "basic", rng_seed=1)
    bca = stats.bootstrap_mean_diff(a, b, "BCa", rng_seed=1)
    m = np.mean(a - b)
    # Same resamples: the basic interval is the percentile one reflected about the estimate.
    assert (basic.low, basic.high) == pytest.approx((2 * m - pct.high, 2 * m - pct.low))
    assert all(ci.low < m < ci.high for ci in (pct, basic, bca))
    paired = st.bootstrap((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), paired=True, vectorized=True,
                          method="percentile", rng=1).confidence_interval
    assert (pct.low, pct.high) == pytest.approx((paired.low, paired.high))
    shifted = stats.bootstrap_mean_diff(a + 1, b, "percentile", rng_seed=1)
    assert (shifted.low, shifted.high) == pytest.approx((pct.low + 1, pct.high + 1))


def test_bootstrap_percentile_matches_a_plain_loop():
    d = np.random.default_rng(6).normal(0.05, 0.1, 20)
    rng = np.random.default_rng(0)
    means = np.array([rng.choice(d, len(d)).mean() for _ in range(20_000)])
    ci = stats.bootstrap_mean_diff(d, np.zeros(20), "percentile", n_resamples=20_000)
    assert (ci.low, ci.high) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), abs=0.004)


def test_bootstrap_unknown_method_is_refused():
    with pytest.raises(ValueError, match="'percentile', 'basic', 'BCa'"):
        stats.bootstrap_mean_diff(A6, B6, "bca")


# ---- power ------------------------------------------------------------------------------------------------

def test_mde_against_noncentral_t_and_invariants():
    mde = stats.minimum_detectable_effect(10, sd_diff=0.05)

    def power(dz: float, n: int = 10, alpha: float = 0.05) -> float:  # two-sided one-sample t, by hand
        crit, nc = st.t.ppf(1 - alpha / 2, n - 1), dz * np.sqrt(n)
        return st.nct.sf(crit, n - 1, nc) + st.nct.cdf(-crit, n - 1, nc)

    assert mde.mde_dz == pytest.approx(optimize.brentq(lambda x: power(x) - 0.8, 0.1, 2), abs=1e-4)
    assert mde.mde_dz == pytest.approx(0.996, abs=1e-3)
    # The normal approximation (1.96 + 0.8416) / sqrt(10) = 0.886 ignores the t's heavier tails: smaller.
    assert mde.mde_dz > (st.norm.ppf(0.975) + st.norm.ppf(0.8)) / np.sqrt(10)
    assert mde.mde_raw == pytest.approx(mde.mde_dz * 0.05)
    assert stats.minimum_detectable_effect(20).mde_dz < mde.mde_dz  # more seeds, smaller MDE
    assert stats.minimum_detectable_effect(10, alpha=0.05 / 4).mde_dz > mde.mde_dz  # corrected alpha, larger
    assert stats.minimum_detectable_effect(3).mde_dz == pytest.approx(3.264, abs=1e-3)  # 3 seeds: huge


def test_mde_refuses_one_seed():
    with pytest.raises(ValueError, match="at least 2 seeds"):
        stats.minimum_detectable_effect(1)


# ---- multiple comparisons ---------------------------------------------------------------------------------

def test_adjustments_by_hand():
    p = np.array([0.01, 0.04, 0.03])
    # Bonferroni: 3p = [0.03, 0.12, 0.09].
    assert stats.adjust_pvalues(p, "bonferroni") == pytest.approx([0.03, 0.12, 0.09])
    # Holm: sorted 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.03, 0.06, 0.06.
    assert stats.adjust_pvalues(p, "holm") == pytest.approx([0.03, 0.06, 0.06])
    # BH: sorted 0.01*3/1 = 0.03, 0.03*3/2 = 0.045, 0.04*3/3 = 0.04 -> running min from the top 0.03, 0.04, 0.04.
    assert stats.adjust_pvalues(p, "bh") == pytest.approx([0.03, 0.04, 0.04])
    assert len(stats.adjust_pvalues(np.array([]), "holm")) == 0


def test_adjustment_errors_list_the_valid_names():
    with pytest.raises(ValueError, match=r"valid: \['bh', 'bonferroni', 'holm'\]"):
        stats.adjust_pvalues(np.array([0.1]), "fdr")
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        stats.adjust_pvalues(np.array([np.nan]), "holm")


# ---- problems within runs ---------------------------------------------------------------------------------

def problem_rows(effect: float = 0.8, seeds: int = 4, problems: int = 40, seed: int = 0) -> pd.DataFrame:
    """Correctness of experiments "a" (log-odds + effect) and "b" on the same problems in every seed."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, 1.5, problems)
    rows = []
    for s in range(seeds):
        run_effect = rng.normal(0, 0.5)
        for name, shift in (("a", effect), ("b", 0.0)):
            prob = 1 / (1 + np.exp(-(difficulty + run_effect + shift)))
            rows += [{"experiment": name, "seed": s, "problem_key": f"q{i}", "correct": int(rng.random() < q)}
                     for i, q in enumerate(prob)]
    return pd.DataFrame(rows)


def test_gee_equals_the_pooled_log_odds_ratio_and_the_glm():
    df = problem_rows()
    res = stats.problem_level_gee(df, "a", "b")
    pa, pb = df[df.experiment == "a"].correct.mean(), df[df.experiment == "b"].correct.mean()
    # Balanced design, one indicator: the estimating equations are solved by the two empirical proportions.
    assert res.log_odds_ratio == pytest.approx(np.log(pa / (1 - pa)) - np.log(pb / (1 - pb)), abs=1e-6)
    glm = sm.GLM(df.correct, sm.add_constant((df.experiment == "a").astype(float)), family=sm.families.Binomial())
    assert res.log_odds_ratio == pytest.approx(glm.fit().params.iloc[1], abs=1e-6)
    assert res.low < res.log_odds_ratio < res.high and 0 <= res.p <= 1
    assert (res.n_rows, res.n_seeds, res.n_problems) == (320, 4, 40) and "4 seed clusters" in res.note
    assert stats.problem_level_gee(df, "b", "a").log_odds_ratio == pytest.approx(-res.log_odds_ratio)


def test_mixed_model_agrees_in_sign_and_is_larger_than_population_averaged():
    df = problem_rows(effect=1.5, seeds=3, problems=30)
    mixed, gee = stats.problem_level_mixed(df, "a", "b"), stats.problem_level_gee(df, "a", "b")
    assert mixed.log_odds_ratio > gee.log_odds_ratio > 0 and mixed.low < mixed.log_odds_ratio < mixed.high
    assert mixed.p < 0.01


def test_problem_level_degenerate_inputs_give_clear_errors():
    df = problem_rows()
    with pytest.raises(ValueError, match="a has every problem correct.*separation"):
        stats.problem_level_gee(df.assign(correct=np.where(df.experiment == "a", 1, df.correct)), "a", "b")
    with pytest.raises(ValueError, match="every problem correct"):
        stats.problem_level_mixed(df.assign(correct=1), "a", "b")
    with pytest.raises(ValueError, match="share 1 seed"):
        stats.problem_level_gee(df[(df.seed == 0) | (df.experiment == "a")], "a", "b")
    with pytest.raises(ValueError, match="share 0 seed"):
        stats.problem_level_gee(df, "a", "missing")
    with pytest.raises(ValueError, match=r"lacks columns \['problem_key'\]"):
        stats.problem_level_gee(df.drop(columns="problem_key"), "a", "b")
    with pytest.raises(ValueError, match="0/1"):
        stats.problem_level_gee(df.assign(correct=2), "a", "b")


# ---- pre-registration -------------------------------------------------------------------------------------

def test_preregistered_contrasts_are_the_four_planned_questions():
    pairs = {(c.name, c.experiment_a, c.experiment_b, c.metrics) for c in stats.PREREGISTERED}
    assert pairs == {
        ("iteration vs parameters", "mla_lru_adaptive", "mla_only_matched", ("acc",)),
        ("latent vs layer iteration at equal compute", "mla_lru_fixed", "looped", ("acc",)),
        ("what halting saves", "mla_lru_adaptive", "mla_lru_fixed", ("acc", "iterations_mean")),
        ("MLA's cost", "mla_only", "baseline", ("acc",)),
    }
    assert all(c.question.endswith("?") for c in stats.PREREGISTERED)


def test_retrofit_contrasts_are_the_three_planned_questions_of_the_arm():
    pairs = {(c.experiment_a, c.experiment_b, c.metrics) for c in stats.RETROFIT_CONTRASTS}
    assert pairs == {("retrofit_mla_lru_adaptive", "retrofit_mla_only", ("acc",)),
                     ("retrofit_mla_lru_fixed", "retrofit_mla_only", ("acc",)),
                     ("retrofit_mla_only", "retrofit_baseline", ("acc",))}  # equal warm-start steps
    named = {e for c in stats.RETROFIT_CONTRASTS for e in (c.experiment_a, c.experiment_b)}
    assert named == set(stats.RETROFIT_ARM) and stats.RETROFIT_MAIN in stats.RETROFIT_ARM
    assert not named & {e for c in stats.PREREGISTERED for e in (c.experiment_a, c.experiment_b)}
    assert all(c.question.endswith("?") for c in stats.RETROFIT_CONTRASTS)
