"""multitag.calibration: exact F1-maximising thresholds, their placement and the fallback."""
import numpy as np
import pytest

from multitag import metrics as M
from multitag.calibration import fit_thresholds, fit_thresholds_with_f1

SEEDS = [0, 1, 2, 3]


def random_multilabel(seed, n=250, c=6, ties=False):
    rng = np.random.default_rng(seed)
    targets = rng.random((n, c)) < rng.uniform(0.05, 0.5, c)
    scores = np.clip(0.3 * targets + 0.8 * rng.random((n, c)), 0, 1)
    return (np.round(scores, 2) if ties else scores), targets


def f1_at(scores, targets, thresholds, ignore=None):
    """(C,) F1 of each class at the given thresholds, through the metrics module."""
    return M.per_class_f1(M.binarize(scores, thresholds), targets, ignore)


def test_separable_class_gets_a_threshold_inside_the_gap():
    rng = np.random.default_rng(0)
    targets = rng.random((200, 2)) < 0.3
    scores = rng.random((200, 2))
    # class 0: positives in [0.7, 0.9], negatives in [0.1, 0.3]; the gap is (max neg, min pos)
    scores[:, 0] = np.where(targets[:, 0], 0.7 + 0.2 * scores[:, 0], 0.1 + 0.2 * scores[:, 0])
    thresholds, best = fit_thresholds_with_f1(scores, targets)
    low, high = scores[~targets[:, 0], 0].max(), scores[targets[:, 0], 0].min()
    assert low < thresholds[0] < high
    assert thresholds[0] == pytest.approx((low + high) / 2)  # the midpoint rule
    assert best[0] == 1.0 and f1_at(scores, targets, thresholds)[0] == 1.0
    assert best[1] < 1.0  # the random class is not separable


def test_separable_logits_far_from_half():
    # logits: the gap is (-6, -4), nowhere near 0.5, and fitting must not assume probabilities
    targets = np.array([[1], [1], [0], [0], [0]])
    scores = np.array([[-2.0], [-4.0], [-6.0], [-7.0], [-9.0]])
    assert fit_thresholds(scores, targets)[0] == pytest.approx(-5.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_fitted_f1_is_at_least_f1_at_half(seed):
    scores, targets = random_multilabel(seed)
    thresholds, best = fit_thresholds_with_f1(scores, targets)
    fitted = f1_at(scores, targets, thresholds)
    assert_f1 = f1_at(scores, targets, 0.5)
    assert (fitted >= assert_f1 - 1e-12).all()
    assert fitted.mean() > assert_f1.mean()  # strictly better on average, so the fit does something
    np.testing.assert_allclose(fitted, best, rtol=0, atol=1e-12)  # the reported F1 is the achieved one


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_fitted_f1_is_the_maximum_over_a_dense_grid(seed, ties):
    scores, targets = random_multilabel(seed, ties=ties)
    ignore = np.random.default_rng(seed + 50).random(targets.shape) < 0.1
    thresholds, best = fit_thresholds_with_f1(scores, targets, ignore)
    grid = np.unique(np.concatenate([np.linspace(-0.01, 1.01, 1001), scores.ravel()]))
    grid_f1 = np.stack([f1_at(scores, targets, t, ignore) for t in grid])  # (G, C)
    np.testing.assert_allclose(grid_f1.max(axis=0), best, rtol=0, atol=1e-12)
    np.testing.assert_allclose(f1_at(scores, targets, thresholds, ignore), best, rtol=0, atol=1e-12)


def test_class_without_positives_falls_back_to_default():
    scores, targets = random_multilabel(4)
    targets[:, 1] = False
    thresholds, best = fit_thresholds_with_f1(scores, targets, default=0.37)
    assert thresholds[1] == 0.37 and np.isnan(best[1])
    assert not np.isnan(np.delete(best, 1)).any()
    assert thresholds.shape == (targets.shape[1],) and thresholds.dtype == np.float64


def test_min_positives_and_all_ignored_classes_fall_back():
    scores, targets = random_multilabel(5, n=100)
    targets[:, 0] = False
    targets[:3, 0] = True                          # 3 positives
    ignore = np.zeros_like(targets)
    ignore[:, 2] = True                            # nothing left to fit class 2 on
    thresholds = fit_thresholds(scores, targets, ignore, default=0.5, min_positives=4)
    assert thresholds[0] == 0.5 and thresholds[2] == 0.5
    assert thresholds[1] != 0.5
    assert fit_thresholds(scores, targets, ignore, min_positives=3)[0] != 0.5
    with pytest.raises(ValueError):
        fit_thresholds(scores, targets, min_positives=0)


def test_ties_in_f1_go_to_the_higher_threshold():
    # P = 2. At 0.9: TP 1, FP 0 -> F1 2/3. At 0.6: TP 2, FP 2 -> F1 4/6 = 2/3. Higher wins.
    scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.5]])
    targets = np.array([[1], [0], [0], [1], [0]])
    thresholds, best = fit_thresholds_with_f1(scores, targets)
    assert best[0] == pytest.approx(2 / 3)
    assert thresholds[0] == pytest.approx(0.85)


def test_lowest_score_chosen_returns_that_score():
    # every sample positive: the best threshold keeps all of them, and there is no lower score
    scores = np.array([[0.2], [0.5], [0.9]])
    assert fit_thresholds(scores, np.ones((3, 1)))[0] == 0.2


def test_adjacent_scores_never_put_the_threshold_on_the_lower_one():
    hi = 0.5
    lo = np.nextafter(hi, 0.0)                     # no double strictly between hi and lo
    scores = np.array([[hi], [lo]])
    targets = np.array([[1], [0]])
    thresholds, best = fit_thresholds_with_f1(scores, targets)
    assert lo < thresholds[0] <= hi and best[0] == 1.0
    assert f1_at(scores, targets, thresholds)[0] == 1.0


def test_ignored_scores_do_not_move_the_threshold():
    scores = np.array([[0.9], [0.8], [0.79], [0.2], [0.1]])
    targets = np.array([[1], [1], [0], [0], [0]])
    ignore = np.array([[False], [False], [True], [False], [False]])  # an ignored negative inside the gap
    assert fit_thresholds(scores, targets, ignore)[0] == pytest.approx(0.5)
    assert fit_thresholds(scores, targets)[0] == pytest.approx(0.795)


def test_empty_input_returns_defaults():
    thresholds, best = fit_thresholds_with_f1(np.zeros((0, 3)), np.zeros((0, 3)), default=0.4)
    np.testing.assert_array_equal(thresholds, [0.4, 0.4, 0.4])
    assert np.isnan(best).all()
