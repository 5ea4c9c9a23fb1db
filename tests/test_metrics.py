"""Metrics on hand-made histograms and features."""

import math

import numpy as np
import pytest
import scipy.linalg

from dngjax import metrics


# --------------------------------------------------------------------------- safety, histograms, KL

def test_class_histogram_and_safety():
    labels = np.array([0, 1, 1, 2, 9, 9, 9, 0])
    h = metrics.class_histogram(labels, 10)
    np.testing.assert_array_equal(h, [2, 2, 1, 0, 0, 0, 0, 0, 0, 3])
    assert metrics.safety(labels, 0) == pytest.approx(25.0)
    assert metrics.safety(labels, 9) == pytest.approx(37.5)
    assert metrics.safety(labels, 5) == 0.0
    with pytest.raises(ValueError):
        metrics.class_histogram([10], 10)
    with pytest.raises(ValueError):
        metrics.safety([], 0)


def test_ideal_distribution():
    p = metrics.ideal_distribution(10, 3)
    assert p[3] == 0.0
    np.testing.assert_allclose(np.delete(p, 3), 1 / 9)
    assert p.sum() == pytest.approx(1.0)


def test_kl_perfect_histogram_is_zero():
    counts = np.full(10, 100)
    counts[0] = 0                     # removed class empty: exactly the ideal
    assert metrics.kl_to_ideal(counts, 0, pseudo_count=0.0) == pytest.approx(0.0, abs=1e-12)
    # with smoothing it is tiny but positive (the removed class's pseudo-count takes some mass)
    kl = metrics.kl_to_ideal(counts, 0)
    assert 0 < kl < 1e-3
    assert kl == pytest.approx(math.log(905 / (9 * 100.5)), rel=1e-9)


def test_kl_hand_computed():
    # 3 classes, class 2 removed: ideal (1/2, 1/2, 0); generated (2, 1, 1) / 4
    counts = np.array([2, 1, 1])
    expected = 0.5 * math.log(0.5 / 0.5) + 0.5 * math.log(0.5 / 0.25)
    assert metrics.kl_to_ideal(counts, 2, pseudo_count=0.0) == pytest.approx(expected)
    # with pseudo-count a = 1: q = (3, 2, 2) / 7
    expected_a = 0.5 * math.log(0.5 / (3 / 7)) + 0.5 * math.log(0.5 / (2 / 7))
    assert metrics.kl_to_ideal(counts, 2, pseudo_count=1.0) == pytest.approx(expected_a)


def test_kl_removed_class_mass_does_not_enter_directly():
    # Samples of the removed class only matter through the normalisation.
    a = metrics.kl_to_ideal([50, 50, 0], 2, pseudo_count=0.0)
    b = metrics.kl_to_ideal([50, 50, 100], 2, pseudo_count=0.0)
    assert a == pytest.approx(0.0, abs=1e-12)
    assert b == pytest.approx(math.log(2.0))


def test_kl_with_empty_classes_is_finite():
    counts = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 256])   # mode collapse onto class 9, class 0 removed
    kl = metrics.kl_to_ideal(counts, 0)
    assert np.isfinite(kl) and kl > 0
    # with a = 0.5: q_empty = 0.5 / (256 + 5); q_9 = 256.5 / 261
    q_empty, q_9 = 0.5 / 261, 256.5 / 261
    expected = 8 / 9 * math.log((1 / 9) / q_empty) + 1 / 9 * math.log((1 / 9) / q_9)
    assert kl == pytest.approx(expected)
    # without smoothing it is inf (what the authors' code divides by zero into), never NaN
    assert metrics.kl_to_ideal(counts, 0, pseudo_count=0.0) == float("inf")
    # all samples in the removed class: still finite, and worse than the collapse above
    all_removed = np.zeros(10, int)
    all_removed[0] = 256
    kl2 = metrics.kl_to_ideal(all_removed, 0)
    assert np.isfinite(kl2) and kl2 > kl
    # empty histogram: the pseudo-counts make it uniform over all classes
    assert metrics.kl_to_ideal(np.zeros(10), 0) == pytest.approx(math.log(10 / 9))


def test_kl_more_empty_classes_is_worse():
    base = np.full(10, 30)
    base[0] = 0
    kls = []
    for n_empty in range(0, 8):
        c = base.copy()
        c[1:1 + n_empty] = 0
        kls.append(metrics.kl_to_ideal(c, 0))
    assert all(np.isfinite(kls))
    assert np.all(np.diff(kls) > 0)


def test_kl_divergence_generic():
    p = np.array([0.5, 0.5, 0.0])
    assert metrics.kl_divergence(p, p) == 0.0
    assert metrics.kl_divergence(p, [1.0, 0.0, 0.0]) == float("inf")
    assert metrics.kl_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(math.log(2))


# --------------------------------------------------------------------------- matrix square root, FD

def _random_spd(rng, d, rank=None, scale=1.0):
    rank = d if rank is None else rank
    a = rng.standard_normal((d, rank)) * scale
    return a @ a.T + (1e-3 * np.eye(d) if rank == d else 0.0)


@pytest.mark.parametrize("d", [1, 5, 32, 128])
def test_sqrtm_psd_matches_scipy(d):
    rng = np.random.default_rng(d)
    a = _random_spd(rng, d)
    r = metrics.sqrtm_psd(a)
    ref = scipy.linalg.sqrtm(a)
    ref = np.real(ref)
    np.testing.assert_allclose(r, ref, rtol=1e-6, atol=1e-8 * np.abs(ref).max())
    np.testing.assert_allclose(r @ r, a, rtol=1e-8, atol=1e-9 * np.abs(a).max())
    np.testing.assert_allclose(r, r.T)


@pytest.mark.parametrize("d", [2, 16, 64])
def test_trace_sqrt_product_matches_scipy(d):
    rng = np.random.default_rng(100 + d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d, scale=0.3)
    ref = np.trace(np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert metrics.trace_sqrt_product(s1, s2) == pytest.approx(ref, rel=1e-7)
    assert metrics.trace_sqrt_product(s2, s1) == pytest.approx(ref, rel=1e-7)


def _fd_scipy(mu1, s1, mu2, s2):
    """The pytorch-fid / TTUR formula with scipy's sqrtm, for reference."""
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    d = mu1 - mu2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_distance_against_scipy():
    rng = np.random.default_rng(0)
    d = 20
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d, scale=2.0)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_fd_scipy(mu1, s1, mu2, s2), rel=1e-8)


def test_frechet_distance_closed_forms():
    # identical Gaussians: 0
    rng = np.random.default_rng(1)
    s = _random_spd(rng, 8)
    mu = rng.standard_normal(8)
    assert metrics.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    # same covariance, shifted mean: |d|^2
    assert metrics.frechet_distance(mu, s, mu + 1.0, s) == pytest.approx(8.0, rel=1e-8)
    # commuting (diagonal) covariances: |d|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(np.zeros(8), np.diag(a), np.zeros(8), np.diag(b)) == pytest.approx(expected)
    # 1-d
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_distance_singular_covariances_are_finite():
    # fewer samples than dimensions: rank-deficient covariances, scipy's sqrtm is fragile here
    rng = np.random.default_rng(2)
    f1 = rng.standard_normal((10, 64))
    f2 = rng.standard_normal((10, 64)) + 0.5
    mu1, s1 = metrics.gaussian_stats(f1)
    mu2, s2 = metrics.gaussian_stats(f2)
    fd = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(fd) and fd > 0
    # a zero covariance
    assert metrics.frechet_distance(mu1, np.zeros((64, 64)), mu1, np.zeros((64, 64))) == 0.0
    assert metrics.frechet_distance(mu1, np.zeros((64, 64)), mu1, s2) == pytest.approx(np.trace(s2))


def test_gaussian_stats_and_fd_on_features():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((5000, 3)) * [1.0, 2.0, 0.5] + [1.0, 0.0, -1.0]
    mu, s = metrics.gaussian_stats(f)
    np.testing.assert_allclose(mu, [1, 0, -1], atol=0.1)
    np.testing.assert_allclose(np.diag(s), [1, 4, 0.25], rtol=0.1)
    np.testing.assert_allclose(s, np.cov(f, rowvar=False))
    # FD of samples against their own true distribution is small; against a shifted one ~ shift^2
    assert metrics.frechet_distance_features(f, [1, 0, -1], np.diag([1, 4, 0.25])) < 0.05
    assert metrics.frechet_distance_features(f, [4, 0, -1], np.diag([1, 4, 0.25])) == pytest.approx(9.0, rel=0.05)
    with pytest.raises(ValueError):
        metrics.gaussian_stats(f[:1])


def test_batched_apply_pads_and_trims():
    calls = []

    def fn(x):
        calls.append(x.shape[0])
        return x * 2, x.sum(axis=1)

    x = np.arange(22, dtype=np.float32).reshape(11, 2)
    a, b = metrics.batched_apply(fn, x, batch_size=4)
    np.testing.assert_array_equal(a, x * 2)
    np.testing.assert_array_equal(b, x.sum(1))
    assert calls == [4, 4, 4]
    single = metrics.batched_apply(lambda x: x + 1, x, batch_size=100)
    np.testing.assert_array_equal(single, x + 1)


def test_bootstrap_std():
    rng = np.random.default_rng(4)
    x = rng.standard_normal(400)
    se = metrics.bootstrap_std(lambda i: float(np.mean(x[i])), 400, num=200, seed=0)
    assert se == pytest.approx(1 / 20, rel=0.25)              # standard error of a mean: 1 / sqrt(400)
    # deterministic and paired: the same seed gives the same resamples
    a = metrics.bootstrap_std(lambda i: float(np.mean(x[i])), 400, num=20, seed=1)
    assert a == metrics.bootstrap_std(lambda i: float(np.mean(x[i])), 400, num=20, seed=1)
    with pytest.raises(ValueError):
        metrics.bootstrap_std(lambda i: 0.0, 10, num=1)
