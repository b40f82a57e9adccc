"""Statistics of the study with the seed (one training run) as the unit.

Pure functions: numpy arrays (or a tidy table for the problem-level models) in, small frozen dataclasses out;
no I/O. ``rl.study_report`` turns a table of runs into the study's tables and figures with them.

Notation: a run is one (experiment, seed); ``a`` and ``b`` are per-seed scores of two experiments in the same
seed order, and ``d = a - b`` are the paired differences, one per seed (n of them). Paired tests ask whether
the differences are centred on zero; the seed pairs runs that share data order, initialisation and problems.

    from rl import stats
    cmp = stats.compare_paired(acc_adaptive, acc_matched)   # all three tests, the chosen one and why
    stats.cohens_dz(acc_adaptive, acc_matched), stats.bootstrap_mean_diff(acc_adaptive, acc_matched)

The tests come from scipy.stats and statsmodels; this module validates inputs, picks exact methods where
they exist, and states the assumptions. References: Wilcoxon (1945); Kerby (2014) for the matched-pairs
rank-biserial correlation; Efron & Tibshirani (1993) for the bootstrap; Holm (1979); Benjamini & Hochberg
(1995); Liang & Zeger (1986) for GEE; Mancl & DeRouen (2001) for the bias-reduced sandwich.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import statsmodels.api as sm
from scipy import stats as st
from statsmodels.genmod.bayes_mixed_glm import BinomialBayesMixedGLM
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

EXACT_MAX_N = 16  # up to here the sign-flip test enumerates all 2**n sign patterns (65,536; 2**20 takes ~10 s)
MIN_N_NORMALITY = 20  # below this Shapiro-Wilk has too little power for "not rejected" to mean anything


@dataclass(frozen=True)
class PairedTestResult:
    """One two-sided test of H0: the paired differences are centred on zero."""

    name: str  # "t-test" | "wilcoxon" | "permutation"
    statistic: float
    p: float
    method: str  # how the p-value was computed ("exact", "asymptotic", "monte carlo (R resamples)", ...)
    note: str = ""


@dataclass(frozen=True)
class PairedComparison:
    """The three paired tests of ``a - b`` over n seeds, the one ``choose_test`` picked, and why."""

    n: int
    mean_diff: float
    ttest: PairedTestResult
    wilcoxon: PairedTestResult
    permutation: PairedTestResult
    chosen: str
    reason: str

    @property
    def p(self) -> float:
        """p-value of the chosen test."""
        return {"t-test": self.ttest, "wilcoxon": self.wilcoxon, "permutation": self.permutation}[self.chosen].p


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    confidence: float
    method: str
    note: str = ""


@dataclass(frozen=True)
class Power:
    """Minimum detectable effect of a two-sided paired t-test with n seeds (one-sample t on the differences)."""

    n: int
    alpha: float
    power: float
    mde_dz: float  # in units of the sd of the differences (Cohen's d_z)
    mde_raw: float | None  # mde_dz * observed sd of the differences, in the metric's units; None without an sd


@dataclass(frozen=True)
class LogOddsRatio:
    """Problem-level log-odds ratio of being correct, experiment_a vs experiment_b (positive: a better)."""

    experiment_a: str
    experiment_b: str
    log_odds_ratio: float
    low: float
    high: float
    p: float
    n_rows: int
    n_seeds: int
    n_problems: int
    method: str
    note: str = ""


@dataclass(frozen=True)
class Contrast:
    """A comparison fixed before the runs: difference ``experiment_a - experiment_b`` of each metric."""

    name: str
    experiment_a: str
    experiment_b: str
    question: str
    metrics: tuple[str, ...] = ("acc",)


# Fixed before running the study (do not edit after seeing results): Holm's correction covers exactly these
# (contrast, metric) tests; every other comparison is exploratory (Benjamini-Hochberg, labelled so).
PREREGISTERED: tuple[Contrast, ...] = (
    Contrast("iteration vs parameters", "mla_lru_adaptive", "mla_only_matched",
             "Do latent iterations beat the same number of parameters spent on a bigger MLA model?"),
    Contrast("latent vs layer iteration at equal compute", "mla_lru_fixed", "looped",
             "At equal compute, is iterating a latent state better than re-running whole layers?"),
    Contrast("what halting saves", "mla_lru_adaptive", "mla_lru_fixed",
             "Does adaptive halting keep accuracy while spending fewer iterations than a fixed count?",
             ("acc", "iterations_mean")),
    Contrast("MLA's cost", "mla_only", "baseline",
             "What does compressing the KV cache with MLA cost against standard attention?"),
)

# The retrofit arm, fixed before it runs (do not edit after seeing results): every MLA group converted from the
# baseline's warm-started checkpoint of the same seed (experiments.yaml, retrofit_from). A second Holm family,
# apart from the from-scratch one above: a different question (what is added to one pretrained model), and the
# main family's error rate stays what was planned.
RETROFIT_CONTRASTS: tuple[Contrast, ...] = (
    Contrast("what the LRU adds (retrofit)", "retrofit_mla_lru_adaptive", "retrofit_mla_only",
             "Does the adaptive LRU improve the same converted model over MLA alone?"),
    Contrast("what fixed iteration adds (retrofit)", "retrofit_mla_lru_fixed", "retrofit_mla_only",
             "Does an LRU with a fixed number of iterations improve the same converted model over MLA alone?"),
    Contrast("what the conversion costs (retrofit)", "retrofit_mla_only", "retrofit_baseline",
             "After the same recovery fine-tune, what does converting the baseline's attention to MLA cost?"),
)
# One change after the first seed, from the design and not from its numbers: the conversion's cost compared
# retrofit_mla_only with baseline, which has 200 warm-start steps fewer; it now compares it with
# retrofit_baseline, the same recovery steps without a conversion (added for this).
RETROFIT_ARM = ("retrofit_baseline", "retrofit_mla_only", "retrofit_mla_lru_fixed", "retrofit_mla_lru_adaptive")
RETROFIT_MAIN = "retrofit_mla_lru_adaptive"  # the arm's exploratory contrasts compare the others with it


def paired_differences(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a - b`` as float64 after checking both are 1-D, the same length (same seeds, same order), finite."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"per-seed scores must be 1-D arrays, got shapes {a.shape} and {b.shape}")
    if len(a) != len(b):
        raise ValueError(f"paired scores need one value per seed on both sides: len(a)={len(a)} != len(b)={len(b)}"
                         " (keep only the seeds both experiments have, in the same order)")
    for name, x in (("a", a), ("b", b)):
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name} has NaN or infinite values at positions {np.flatnonzero(~np.isfinite(x))}: "
                             "drop those seeds from both sides (a failed run is not a score)")
    if len(a) < 2:
        raise ValueError(f"a paired comparison needs at least 2 seeds, got {len(a)}")
    return a - b


def _is_constant(d: np.ndarray) -> bool:
    # Differences of equal values computed in floating point (0.3 - 0.2 vs 0.4 - 0.3) differ by ~1e-16.
    return bool(np.ptp(d) <= 1e-12 * max(1.0, float(np.max(np.abs(d)))))


def paired_ttest(a: np.ndarray, b: np.ndarray) -> PairedTestResult:
    """Student's paired t-test (scipy.stats.ttest_rel). Assumes the differences are normal, or n large (CLT).

    Undefined when all differences are equal (sd 0): p is NaN with a note rather than scipy's 0/0 or 1e-31.
    """
    d = paired_differences(a, b)
    if _is_constant(d):
        return PairedTestResult("t-test", float("nan"), float("nan"), "exact (t distribution)",
                                "all differences equal: the sd is 0 and t is undefined")
    res = st.ttest_rel(a, b)
    return PairedTestResult("t-test", float(res.statistic), float(res.pvalue),
                            f"exact (t distribution, df={len(d) - 1})")


def wilcoxon_signed_rank(a: np.ndarray, b: np.ndarray) -> PairedTestResult:
    """Wilcoxon signed-rank test (scipy.stats.wilcoxon, zero_method="wilcox", method="auto").

    Assumes the differences are symmetric about their median. Zero differences are dropped (Wilcoxon's
    method) and tied absolute differences get average ranks. scipy's "auto" makes the p-value exact for
    small n: without ties or zeros from the exact null distribution (n <= 50); with them, for n <= 13, by
    enumerating all 2**n sign flips of the statistic; otherwise the normal approximation, tie-corrected and
    without continuity correction. (``method="exact"`` itself is only conservative with ties.) All zero: p = 1.
    """
    d = paired_differences(a, b)
    nonzero = d[d != 0]
    if len(nonzero) == 0:
        return PairedTestResult("wilcoxon", 0.0, 1.0, "exact", "all differences are zero")
    has_ties = len(np.unique(np.abs(nonzero))) < len(nonzero) or len(nonzero) < len(d)
    if not has_ties and len(d) <= 50:
        method = "exact"
    elif has_ties and len(d) <= 13:
        method = f"exact (all 2**{len(d)} sign flips, ties or zeros present)"
    else:
        method = "asymptotic (normal, tie-corrected)"
    res = st.wilcoxon(d, zero_method="wilcox", method="auto")
    note = f"{len(d) - len(nonzero)} zero difference(s) dropped" if len(nonzero) < len(d) else ""
    return PairedTestResult("wilcoxon", float(res.statistic), float(res.pvalue), method, note)


def sign_flip_test(a: np.ndarray, b: np.ndarray, exact_max_n: int = EXACT_MAX_N, n_resamples: int = 99_999,
                   rng_seed: int = 0) -> PairedTestResult:
    """Paired permutation test of the mean difference: under H0 each seed's difference is as likely +d as -d.

    scipy.stats.permutation_test on the single sample ``d`` with ``permutation_type="samples"`` flips the sign
    of each difference independently (equivalently, swaps a and b within each seed; never across seeds, so
    between-seed variation cancels). Exact (all 2**n patterns) for n <= ``exact_max_n``: p = twice the smaller
    tail, which for this symmetric null is the share of patterns with |mean| >= |observed|; so with n seeds and
    no zero difference p >= 2 / 2**n (0.0625 for 5 seeds). Otherwise Monte Carlo with ``rng_seed``:
    p = (k + 1) / (R + 1).
    Assumes only that the differences are symmetric about 0 under H0 (no normality).
    """
    d = paired_differences(a, b)
    exact = len(d) <= exact_max_n
    resamples = 2 ** len(d) if exact else n_resamples
    res = st.permutation_test((d,), np.mean, permutation_type="samples", vectorized=True, n_resamples=resamples,
                              rng=rng_seed, axis=-1)
    method = f"exact (all 2**{len(d)} sign flips)" if exact else f"monte carlo ({resamples} flips, seed {rng_seed})"
    return PairedTestResult("permutation", float(res.statistic), float(res.pvalue), method)


def choose_test(d: np.ndarray, min_n_normality: int = MIN_N_NORMALITY, alpha_normality: float = 0.05
                ) -> tuple[str, str]:
    """Pick the test for the differences ``d``: (name, reason). Depends on the shape of d, never on the p-values.

    Rule and why:
    - all differences equal: the permutation test (t is undefined, ranks carry no information);
    - n < ``min_n_normality``: the sign-flip permutation test (exact up to ``EXACT_MAX_N`` seeds). It holds
      its level with no normality assumption, and at such n Shapiro-Wilk rarely rejects even clearly skewed
      data, so "normality not rejected" would not justify a t-test;
    - otherwise Shapiro-Wilk on the differences: p >= ``alpha_normality`` (no evidence against normality,
      and the CLT helps at this n) -> the paired t-test, the most powerful test for normal differences;
      p < ``alpha_normality`` -> Wilcoxon signed-rank, robust to the heavy tails and outliers that break t.
    Pre-testing changes the operating characteristics a little; all three p-values are always reported so a
    reader can see whether a conclusion hinges on the choice.
    """
    d = np.asarray(d, dtype=float)
    if d.ndim != 1 or len(d) < 2 or not np.all(np.isfinite(d)):
        raise ValueError(f"choose_test needs a 1-D array of at least 2 finite differences, got {d!r}")
    if _is_constant(d):
        return "permutation", "all differences equal: t undefined, ranks uninformative; sign-flip permutation test"
    if len(d) < min_n_normality:
        return "permutation", (f"n={len(d)} < {min_n_normality}: normality cannot be checked with useful power; "
                               f"sign-flip permutation test (exact up to {EXACT_MAX_N} seeds)")
    p_normal = float(st.shapiro(d).pvalue)
    if p_normal >= alpha_normality:
        return "t-test", f"n={len(d)}, Shapiro-Wilk p={p_normal:.3g} >= {alpha_normality}: no evidence against normal"
    return "wilcoxon", f"n={len(d)}, Shapiro-Wilk p={p_normal:.3g} < {alpha_normality}: differences not normal"


def compare_paired(a: np.ndarray, b: np.ndarray, rng_seed: int = 0) -> PairedComparison:
    """All three paired tests of ``a - b`` plus the automatic choice (see ``choose_test``)."""
    d = paired_differences(a, b)
    chosen, reason = choose_test(d)
    return PairedComparison(n=len(d), mean_diff=float(d.mean()), ttest=paired_ttest(a, b),
                            wilcoxon=wilcoxon_signed_rank(a, b), permutation=sign_flip_test(a, b, rng_seed=rng_seed),
                            chosen=chosen, reason=reason)


def cohens_dz(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's d_z = mean(d) / sd(d, ddof=1) (Cohen 1988; Lakens 2013); t = d_z * sqrt(n). NaN when sd is 0."""
    d = paired_differences(a, b)
    return float("nan") if _is_constant(d) else float(d.mean() / d.std(ddof=1))


def rank_biserial(a: np.ndarray, b: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation r = (R+ - R-) / (R+ + R-) (Kerby 2014), in [-1, 1].

    R+ and R- are the sums of the ranks of |d| over positive and negative differences, zeros dropped and
    ties averaged as in ``wilcoxon_signed_rank``. NaN when every difference is zero.
    """
    d = paired_differences(a, b)
    d = d[d != 0]
    if len(d) == 0:
        return float("nan")
    ranks = st.rankdata(np.abs(d))
    r_plus, r_minus = ranks[d > 0].sum(), ranks[d < 0].sum()
    return float((r_plus - r_minus) / (r_plus + r_minus))


def mean_ci(x: np.ndarray, confidence: float = 0.95) -> Interval:
    """Mean over seeds with a t interval: mean +- t_{(1+c)/2, n-1} * sd / sqrt(n). Assumes roughly normal scores.

    One seed: the interval is (NaN, NaN) with a note, since one run says nothing about seed variance.
    """
    x = np.asarray(x, dtype=float)
    if x.ndim != 1 or len(x) == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"mean_ci needs a non-empty 1-D array of finite per-seed values, got {x!r}")
    if len(x) == 1:
        return Interval(float(x[0]), float("nan"), float("nan"), confidence, "t", "one seed: no interval")
    half = st.t.ppf((1 + confidence) / 2, df=len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return Interval(float(x.mean()), float(x.mean() - half), float(x.mean() + half), confidence, f"t (df={len(x) - 1})")


def bootstrap_mean_diff(a: np.ndarray, b: np.ndarray, method: str = "BCa", confidence: float = 0.95,
                        n_resamples: int = 9999, rng_seed: int = 0) -> Interval:
    """Bootstrap CI of the mean paired difference, resampling seeds (scipy.stats.bootstrap on ``d``).

    Resampling the differences is resampling seeds with their pairs kept (the same as ``paired=True``).
    ``method``: "percentile", "basic" or "BCa". All differences equal: a zero-width interval with a note
    (BCa is undefined there). With few seeds (< ~10) every bootstrap interval is too narrow: there are only
    C(2n-1, n) distinct resamples (10 for n=3), so read it next to the t-test rather than instead of it.
    """
    if method not in ("percentile", "basic", "BCa"):
        raise ValueError(f"bootstrap method must be one of 'percentile', 'basic', 'BCa', got {method!r}")
    d = paired_differences(a, b)
    if _is_constant(d):
        return Interval(float(d.mean()), float(d.mean()), float(d.mean()), confidence, method,
                        "all differences equal: zero-width interval")
    res = st.bootstrap((d,), np.mean, method=method, confidence_level=confidence, n_resamples=n_resamples,
                       vectorized=True, rng=rng_seed)
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    note = "" if np.isfinite(low) and np.isfinite(high) else f"{method} interval could not be computed"
    return Interval(float(d.mean()), low, high, confidence, f"bootstrap {method} ({n_resamples} resamples)", note)


def minimum_detectable_effect(n: int, sd_diff: float | None = None, alpha: float = 0.05, power: float = 0.8
                              ) -> Power:
    """Smallest |d_z| a two-sided paired t-test with n seeds detects with the given power at ``alpha``.

    statsmodels TTestPower (one-sample t on the differences, noncentral t with df = n - 1, noncentrality
    d_z * sqrt(n)). Pass the corrected alpha when the test sits in a corrected family (e.g. alpha / m for
    Bonferroni). ``mde_raw`` = d_z * ``sd_diff``, in the metric's units. Assumes normal differences.
    """
    if n < 2:
        raise ValueError(f"power needs at least 2 seeds (df = n - 1), got n={n}")
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha and power must be in (0, 1), got alpha={alpha}, power={power}")
    dz = float(TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power,
                                        alternative="two-sided"))
    return Power(n, alpha, power, dz, None if sd_diff is None else dz * float(sd_diff))


ADJUSTMENTS = {"bonferroni": "bonferroni", "holm": "holm", "bh": "fdr_bh"}  # our name -> statsmodels' name


def adjust_pvalues(p: np.ndarray, method: str) -> np.ndarray:
    """Adjusted p-values of one family (statsmodels multipletests): "bonferroni", "holm" (FWER) or "bh" (FDR)."""
    if method not in ADJUSTMENTS:
        raise ValueError(f"unknown adjustment {method!r}; valid: {sorted(ADJUSTMENTS)}")
    p = np.asarray(p, dtype=float)
    if p.ndim != 1 or np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must be a 1-D array of numbers in [0, 1], got {p!r}")
    if len(p) == 0:
        return p
    return multipletests(p, method=ADJUSTMENTS[method])[1]


def problem_table(table: pd.DataFrame | list[dict], experiment_a: str, experiment_b: str) -> pd.DataFrame:
    """Rows of the two experiments on the seeds both have, with ``is_a`` (1 for experiment_a) added.

    ``table`` is tidy: one row per (experiment, seed, problem_key) with ``correct`` in {0, 1}. Raises a
    ValueError naming the problem for missing columns, NaN, non-binary outcomes, fewer than 2 shared seeds,
    or an outcome with no variation (all correct or all wrong in either experiment: the log-odds ratio is
    then infinite or undefined, and a logistic fit would report a huge number with a meaningless p).
    """
    df = pd.DataFrame(table)
    missing = {"experiment", "seed", "problem_key", "correct"} - set(df.columns)
    if missing:
        raise ValueError(f"problem table lacks columns {sorted(missing)}; needs experiment, seed, problem_key, correct")
    df = df[df["experiment"].isin([experiment_a, experiment_b])][["experiment", "seed", "problem_key", "correct"]]
    if df.isna().any().any():
        raise ValueError("problem table has NaN values: drop or fix those rows")
    if not df["correct"].isin([0, 1]).all():
        raise ValueError(f"correct must be 0/1, got values {sorted(set(df['correct']) - {0, 1})[:5]}")
    seeds_of = df.groupby("experiment")["seed"].apply(set).to_dict()
    seeds = seeds_of.get(experiment_a, set()) & seeds_of.get(experiment_b, set())
    if len(seeds) < 2:
        raise ValueError(f"{experiment_a} and {experiment_b} share {len(seeds)} seed(s) with per-problem results; "
                         "clustering by seed needs at least 2")
    df = df[df["seed"].isin(seeds)].assign(is_a=lambda x: (x["experiment"] == experiment_a).astype(float),
                                           correct=lambda x: x["correct"].astype(float))
    for name, rows in df.groupby("experiment")["correct"]:
        if rows.min() == rows.max():
            raise ValueError(f"{name} has every problem {'correct' if rows.iloc[0] else 'wrong'} on the shared seeds: "
                             "the log-odds ratio is infinite (perfect separation); compare the accuracies instead")
    return df.reset_index(drop=True)


def problem_level_gee(table: pd.DataFrame | list[dict], experiment_a: str, experiment_b: str,
                      confidence: float = 0.95) -> LogOddsRatio:
    """Population-averaged log-odds ratio of a correct answer, a vs b, from a GEE logistic model.

    logit P(correct) = b0 + b1 * [experiment == a], Binomial family, exchangeable working correlation within
    a seed (runs that share a seed share the problems, data order and initialisation), bias-reduced sandwich
    covariance (Mancl & DeRouen 2001), Wald z CI and p. With a single indicator and every seed holding the
    same problems, b1 equals the pooled empirical log-odds ratio. The unit of replication is still the seed:
    with few seeds (< ~10 clusters) the sandwich is unreliable even bias-reduced, so read p as descriptive.
    """
    df = problem_table(table, experiment_a, experiment_b)
    model = sm.GEE.from_formula("correct ~ is_a", groups="seed", data=df, family=sm.families.Binomial(),
                                cov_struct=sm.cov_struct.Exchangeable())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = model.fit(cov_type="bias_reduced")
    low, high = res.conf_int(alpha=1 - confidence).loc["is_a"]
    seeds = df["seed"].nunique()
    notes = [f"only {seeds} seed clusters: sandwich SE unreliable"] if seeds < 10 else []
    notes += sorted({str(w.message) for w in caught})
    return LogOddsRatio(experiment_a, experiment_b, float(res.params["is_a"]), float(low), float(high),
                        float(res.pvalues["is_a"]), len(df), seeds, df["problem_key"].nunique(),
                        "GEE logit, exchangeable within seed, bias-reduced sandwich", "; ".join(notes))


def problem_level_mixed(table: pd.DataFrame | list[dict], experiment_a: str, experiment_b: str,
                        confidence: float = 0.95) -> LogOddsRatio:
    """Conditional log-odds ratio, a vs b, from a logistic mixed model with crossed seed and problem effects.

    statsmodels BinomialBayesMixedGLM: logit P(correct) = b0 + b1 * [experiment == a] + u_seed + v_problem,
    independent normal random intercepts, fitted by variational Bayes (``fit_vb``, default priors). The
    interval is the approximate posterior mean +- z * sd and p is the matching normal tail: a Bayesian summary,
    not a frequentist test, and VB posterior sds are known to be too small. b1 is conditional on the seed and
    the problem, so it is larger in magnitude than the GEE's population-averaged one.
    """
    df = problem_table(table, experiment_a, experiment_b)
    model = BinomialBayesMixedGLM.from_formula(
        "correct ~ is_a", {"seed": "0 + C(seed)", "problem": "0 + C(problem_key)"}, df)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = model.fit_vb()
    mean, sd = float(res.fe_mean[1]), float(res.fe_sd[1])
    z = st.norm.ppf((1 + confidence) / 2)
    p = float(2 * st.norm.sf(abs(mean / sd)))
    return LogOddsRatio(experiment_a, experiment_b, mean, mean - z * sd, mean + z * sd, p, len(df),
                        df["seed"].nunique(), df["problem_key"].nunique(),
                        "Bayesian mixed logit (variational), random seed and problem intercepts",
                        "; ".join(sorted({str(w.message) for w in caught})))
