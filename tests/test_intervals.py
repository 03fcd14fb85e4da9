"""The bootstrap intervals against closed forms: a binomial proportion's normal interval and a
paired difference's, both accurate at 10,000 images."""
import numpy as np
import pytest

from ats_vit.jobs.intervals import accuracy_interval, difference_interval, verdict


def test_accuracy_interval_is_the_binomial_normal_interval():
    hits = np.random.default_rng(3).permutation(np.arange(10000) < 7000)  # exactly 70.00%
    low, high = accuracy_interval(hits)
    half = 100 * 1.959964 * np.sqrt(0.7 * 0.3 / 10000)  # 0.898 points
    assert low == pytest.approx(70 - half, abs=0.12) and high == pytest.approx(70 + half, abs=0.12)
    assert accuracy_interval(hits) == (low, high)  # seeded


def test_paired_difference_interval_is_the_normal_interval_of_the_differences():
    rng = np.random.default_rng(4)
    reference = rng.random(10000) < 0.7
    flip = rng.random(10000) < 0.1  # a method that differs from the reference on 10% of the images
    hits = np.where(flip, rng.random(10000) < 0.6, reference)
    d = hits.astype(float) - reference
    half = 100 * 1.959964 * d.std(ddof=1) / np.sqrt(10000)
    diff, low, high = difference_interval(hits, reference)
    assert diff == pytest.approx(100 * d.mean())
    assert low == pytest.approx(diff - half, abs=0.08) and high == pytest.approx(diff + half, abs=0.08)
    # unpaired resampling would give a far wider interval: the pairing is what narrows it
    assert high - low < 0.5 * 2 * 100 * 1.959964 * np.sqrt(2 * 0.7 * 0.3 / 10000)


def test_no_variation_gives_a_point_and_verdicts_read_the_interval():
    assert accuracy_interval(np.ones(50, bool)) == (100.0, 100.0)
    assert difference_interval(np.ones(50, bool), np.ones(50, bool)) == (0.0, 0.0, 0.0)
    assert [verdict(*i) for i in ((0.1, 2.0), (-2.0, -0.1), (-0.5, 0.5))] == ["holds", "does not hold", "cannot tell"]
