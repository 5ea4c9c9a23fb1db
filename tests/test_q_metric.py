"""The Q metric of the paper's appendix H (eqs. 22-23, table 4) on hand-made CLIP embeddings.

Every expected value is worked out by hand from the paper's definitions in the comments beside it:
CS = cosine similarity of two CLIP embeddings (sec. 4.2), averaged over seeds, each guided image
against the unguided image of its own seed;
eq. 22: Q = CS(no guid, unrel) - CS(no guid, rel);
eq. 23: Q = a (x_max + x_min) / 2 + b - (x_max + x_min) / 2 for the line y = a x + b fitted to the
points (x, y) = (mean CS related, mean CS unrelated) of a sweep of guidance scales.
"""

import numpy as np
import pytest

from dngjax.q_metric import (average_over_prompts, clip_score, cosine_distance, q_regression, q_score,
                             q_sweep)


def unit(deg):
    """A 2-d embedding at ``deg`` degrees from (1, 0)."""
    r = np.deg2rad(deg)
    return np.array([np.cos(r), np.sin(r)])


def test_clip_score_is_the_cosine_of_each_pair_whatever_the_norms():
    a = np.array([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = np.array([[1.0, 1.0], [0.0, -5.0], [2.0, 2.0]])
    # cos 45 deg, cos 180 deg, cos 0 deg
    np.testing.assert_allclose(clip_score(a, b), [np.sqrt(0.5), -1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(cosine_distance(a, b), [1 - np.sqrt(0.5), 2.0, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="same seeds"):
        clip_score(a, b[:2])


def test_eq22_one_seed_by_hand():
    # unguided at 0 deg; related guidance turned the image to 60 deg (CS = cos 60 = 0.5), unrelated to
    # acos 0.8 (CS = 0.8, the embedding (0.8, 0.6) x 5). Q = 0.8 - 0.5 = 0.3.
    u = np.array([[2.0, 0.0]])
    rel = unit(60)[None] * 7.0
    unrel = np.array([[4.0, 3.0]])
    out = q_score(u, rel, unrel)
    assert out["q"] == pytest.approx(0.3)
    assert out["clip_score_related"] == pytest.approx(0.5)
    assert out["clip_score_unrelated"] == pytest.approx(0.8)
    assert out["distance_related"] == pytest.approx(0.5) and out["distance_unrelated"] == pytest.approx(0.2)
    assert out["n"] == 1 and np.isnan(out["q_se"])
    # swapping the negatives flips the sign: the unrelated prompt changing the image more is negative
    assert q_score(u, unrel, rel)["q"] == pytest.approx(-0.3)


def test_eq22_pairs_each_guided_image_with_the_unguided_image_of_its_seed():
    # Seed 0 unguided at 0 deg, seed 1 at 90 deg. Related: 60 deg from its own seed (CS 0.5 each);
    # unrelated: unchanged for seed 0 (CS 1), 30 deg off for seed 1 (CS cos 30).
    u = np.stack([unit(0), unit(90)])
    rel = np.stack([unit(60), unit(150)])
    unrel = np.stack([unit(0), unit(120)])
    cs_rel, cs_unrel = 0.5, (1.0 + np.cos(np.deg2rad(30))) / 2
    out = q_score(u, rel, unrel)
    assert out["clip_score_related"] == pytest.approx(cs_rel)
    assert out["clip_score_unrelated"] == pytest.approx(cs_unrel)
    assert out["q"] == pytest.approx(cs_unrel - cs_rel)                         # 0.4330...
    # paired standard error over seeds: per-seed Q = 0.5 and cos 30 - 0.5
    per_seed = np.array([0.5, np.cos(np.deg2rad(30)) - 0.5])
    assert out["q_se"] == pytest.approx(np.std(per_seed, ddof=1) / np.sqrt(2))
    # seed order matters together: permuting all three alike changes nothing, one alone does
    perm = [1, 0]
    assert q_score(u[perm], rel[perm], unrel[perm])["q"] == pytest.approx(out["q"])
    assert q_score(u, rel[perm], unrel)["q"] != pytest.approx(out["q"])


def test_eq22_compares_with_the_unguided_images_not_the_two_guided_sets():
    # related at +90 deg and unrelated at -90 deg from the unguided image: both CS 0, Q = 0, although
    # the two guided images are opposite each other (their mutual CS is -1).
    u = np.array([[1.0, 0.0]])
    rel, unrel = unit(90)[None], unit(-90)[None]
    out = q_score(u, rel, unrel)
    assert out["q"] == pytest.approx(0.0, abs=1e-12)
    assert out["clip_score_related"] == pytest.approx(0.0, abs=1e-12)
    assert out["clip_score_unrelated"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="same seeds"):
        q_score(u, rel, np.concatenate([unrel, unrel]))


def test_eq23_on_points_on_a_line():
    # y = 0.5 x + 0.5 at x = 0.86, 0.90, 0.94: a = 0.5, b = 0.5, x_min + x_max = 1.8,
    # Q = 0.5 * 0.9 + 0.5 - 0.9 = 0.05 (the line's y at the middle of the range, 0.95, minus 0.90).
    x = [0.86, 0.90, 0.94]
    out = q_regression(x, [0.5 * v + 0.5 for v in x])
    assert out["a"] == pytest.approx(0.5) and out["b"] == pytest.approx(0.5)
    assert out["x_min"] == pytest.approx(0.86) and out["x_max"] == pytest.approx(0.94)
    assert out["q"] == pytest.approx(0.05) and out["n_points"] == 3


def test_eq23_averages_over_the_range_of_x_not_over_the_points():
    # The same line at x = 0.86, 0.87, 0.88, 0.94 (crowded at the low end): eq. 23 still gives
    # 0.5 * (0.86 + 0.94) / 2 + 0.5 - (0.86 + 0.94) / 2 = 0.05, whereas the mean of eq. 22 over the
    # points would be 0.5 - 0.5 * mean(x) = 0.5 - 0.5 * 0.8875 = 0.05625.
    x = np.array([0.86, 0.87, 0.88, 0.94])
    y = 0.5 * x + 0.5
    assert q_regression(x, y)["q"] == pytest.approx(0.05)
    assert np.mean(y - x) == pytest.approx(0.05625)


def test_eq23_uses_the_least_squares_line():
    # (0.86, 0.97), (0.90, 0.95), (0.94, 0.97): the least-squares slope is
    # sum (x - 0.9)(y - mean y) / sum (x - 0.9)^2 = (-0.04 * 0.02/3 + 0.04 * 0.02/3) / ... = 0, so
    # a = 0, b = mean y = 2.89 / 3, and Q = b - 0.9 = 0.06333...
    out = q_regression([0.86, 0.90, 0.94], [0.97, 0.95, 0.97])
    assert out["a"] == pytest.approx(0.0, abs=1e-12)
    assert out["b"] == pytest.approx(2.89 / 3)
    assert out["q"] == pytest.approx(2.89 / 3 - 0.9)


def test_eq23_sign_dng_like_above_np_like():
    # DNG-like: unrelated CS stays near 1 while related CS falls (y = 0.98 flat): Q = 0.98 - mid x.
    # NP-like: both fall together (y = x): Q = 0.
    x = [0.85, 0.90, 0.95]
    assert q_regression(x, [0.98] * 3)["q"] == pytest.approx(0.08)
    assert q_regression(x, x)["q"] == pytest.approx(0.0, abs=1e-12)


def test_eq23_refuses_what_defines_no_line():
    with pytest.raises(ValueError, match="two distinct"):
        q_regression([0.9], [0.95])
    with pytest.raises(ValueError, match="two distinct"):
        q_regression([0.9, 0.9], [0.95, 0.96])
    with pytest.raises(ValueError, match="same scales"):
        q_regression([0.9, 0.8], [0.95])
    with pytest.raises(ValueError, match="finite"):
        q_regression([0.9, np.nan], [0.95, 0.9])


def test_eq23_from_embeddings_of_a_sweep():
    # One seed, unguided at 0 deg; three scales. Related images at acos 0.86, acos 0.90, acos 0.94,
    # unrelated at acos(0.5 x + 0.5) of the same scale: the points of test_eq23_on_points_on_a_line,
    # Q = 0.05. A second seed mirrored (negative angles) gives the same CLIP scores.
    xs = np.array([0.94, 0.90, 0.86])                        # increasing scale: decreasing CS
    ang = lambda c: np.rad2deg(np.arccos(c))
    u = np.stack([unit(0), unit(0)])
    rel = np.stack([[unit(ang(c)), unit(-ang(c))] for c in xs])                  # (3, 2, 2)
    unrel = np.stack([[unit(ang(0.5 * c + 0.5)), unit(-ang(0.5 * c + 0.5))] for c in xs])
    out = q_sweep(u, rel, unrel)
    np.testing.assert_allclose(out["clip_score_related"], xs, atol=1e-12)
    np.testing.assert_allclose(out["clip_score_unrelated"], 0.5 * xs + 0.5, atol=1e-12)
    np.testing.assert_allclose(out["q_per_scale"], 0.5 - 0.5 * xs, atol=1e-12)  # eq. 22 per scale
    assert out["q"] == pytest.approx(0.05) and out["a"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"\(G, N, D\)"):
        q_sweep(u, rel[0], unrel[0])


def test_table4_average_column():
    # Table 4, DNG row: 0.053 0.018 0.080 0.054 0.057, printed average 0.052 +- 0.022 (mean and
    # sample standard deviation)
    out = average_over_prompts([0.053, 0.018, 0.080, 0.054, 0.057])
    assert round(out["mean"], 3) == 0.052 and round(out["std"], 3) == 0.022 and out["n"] == 5
    # the NP row as printed (-0.015 0.003 0.017 0.016 0.041 | 0.007 0.014) does not add up: its
    # entries give 0.012 +- 0.021 (documented in dngjax/q_metric.py and docs/text_to_image.md)
    out = average_over_prompts([-0.015, 0.003, 0.017, 0.016, 0.041])
    assert round(out["mean"], 3) == 0.012 and round(out["std"], 3) == 0.021
    assert np.isnan(average_over_prompts([0.1])["std"])


def test_job_q_table_reports_eq22_per_prompt_and_the_average_over_prompts():
    from dngjax.tools.sample.text_to_image import q_table
    u = np.array([[1.0, 0.0], [0.0, 1.0]])
    results = []
    for prompt, deg_rel, deg_unrel in (("A", 60, 0), ("B", 90, 30)):
        info = q_score(u, np.stack([unit(deg_rel), unit(90 + deg_rel)]),
                       np.stack([unit(deg_unrel), unit(90 + deg_unrel)]))
        results.append({"prompt": prompt, "methods": {"DNG": info}})
    table = q_table(results, ["DNG"])
    # A: 1 - 0.5 = 0.5 (CS 1 / 0.5); B: cos 30 - 0 = 0.866 (CS 0.866 / 0)
    assert "| A | 0.500 +- 0.000 (1.000 / 0.500) |" in table
    assert "| B | 0.866 +- 0.000 (0.866 / 0.000) |" in table
    # mean 0.683, sample sd |0.866 - 0.5| / sqrt 2 = 0.259
    assert "| mean +- sd over prompts | 0.683 +- 0.259 |" in table
    assert "eq. 22" in table and "table 4" in table and "eq. 23" in table
