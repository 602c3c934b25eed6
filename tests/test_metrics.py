"""multitag.metrics cross-checked against scikit-learn on random data and on edge cases."""
import json

import numpy as np
import pytest
from sklearn import metrics as skm

from multitag import metrics as M

SEEDS = [0, 1, 2, 3]


def random_multilabel(seed, n=300, c=7, ties=False, prevalence=0.3):
    """Scores (N, C) in [0, 1), targets (N, C) bool; ``ties`` rounds scores so many are equal."""
    rng = np.random.default_rng(seed)
    targets = rng.random((n, c)) < prevalence
    scores = np.clip(0.35 * targets + rng.random((n, c)) * 0.8, 0, 1)  # informative but imperfect
    if ties:
        scores = np.round(scores, 1)
    return scores, targets


def random_ignore(seed, shape, rate=0.15):
    return np.random.default_rng(seed + 100).random(shape) < rate


def assert_close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- average precision

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_per_class_ap_matches_sklearn(seed, ties):
    scores, targets = random_multilabel(seed, ties=ties)
    expected = [skm.average_precision_score(targets[:, k], scores[:, k]) for k in range(targets.shape[1])]
    assert_close(M.per_class_ap(scores, targets), expected)
    assert_close(M.mean_average_precision(scores, targets), np.mean(expected))


def test_average_precision_one_class_with_ties_by_hand():
    # thresholds 0.9 (1 pos of 1) and 0.5 (tied group: +1 pos, +1 neg); AP = 1/2*1 + 1/2*2/3
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    targets = np.array([1, 1, 0, 0])
    assert M.average_precision(scores, targets) == pytest.approx(0.5 + 1 / 3)
    assert M.average_precision(scores, targets) == pytest.approx(skm.average_precision_score(targets, scores))


def test_class_without_positives_is_nan_and_left_out_of_map():
    scores, targets = random_multilabel(5)
    targets[:, 3] = False
    ap = M.per_class_ap(scores, targets)
    assert np.isnan(ap[3]) and not np.isnan(np.delete(ap, 3)).any()
    assert M.mean_average_precision(scores, targets) == pytest.approx(np.delete(ap, 3).mean())
    assert np.isnan(M.average_precision(scores[:, 3], targets[:, 3]))


def test_map_is_nan_when_no_class_has_positives():
    scores, targets = random_multilabel(6)
    assert np.isnan(M.mean_average_precision(scores, np.zeros_like(targets)))


def test_all_equal_scores_give_prevalence():
    targets = np.random.default_rng(7).random((50, 3)) < [0.1, 0.5, 0.9]
    ap = M.per_class_ap(np.full((50, 3), 0.42), targets)
    assert_close(ap, targets.mean(axis=0))


def test_perfect_ranking_gives_one():
    scores, targets = random_multilabel(8)
    assert_close(M.per_class_ap(targets + 0.01 * scores, targets), np.ones(targets.shape[1]))
    # a reversed ranking is far from 1: AP is not trivially 1
    assert M.mean_average_precision(0.01 * scores - targets, targets) < 0.5


def test_ap_ignores_the_sign_and_scale_of_scores():
    scores, targets = random_multilabel(9)
    logits = np.log(scores + 1e-3) * 3 - 7
    assert_close(M.per_class_ap(logits, targets), M.per_class_ap(scores, targets))


@pytest.mark.parametrize("seed", SEEDS)
def test_ap_with_ignore_equals_sklearn_on_kept_rows(seed):
    scores, targets = random_multilabel(seed, ties=seed % 2 == 1)
    ignore = random_ignore(seed, targets.shape)
    expected = [skm.average_precision_score(targets[~ignore[:, k], k], scores[~ignore[:, k], k])
                for k in range(targets.shape[1])]
    assert_close(M.per_class_ap(scores, targets, ignore), expected)
    # the mask changes the answer (otherwise the test proves nothing)
    assert not np.allclose(M.per_class_ap(scores, targets), expected)


def test_ignoring_every_positive_gives_nan():
    scores, targets = random_multilabel(10)
    ignore = np.zeros_like(targets)
    ignore[:, 2] = targets[:, 2]
    assert np.isnan(M.per_class_ap(scores, targets, ignore)[2])


def test_ignored_pairs_with_extreme_scores_do_not_count():
    scores = np.array([[0.99], [0.8], [0.3], [0.2]])
    targets = np.array([[0], [1], [0], [1]])
    ignore = np.array([[True], [False], [False], [False]])  # the top-ranked negative is "difficult"
    assert M.per_class_ap(scores, targets, ignore)[0] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


# ----------------------------------------------------------------------------- predictions

def test_binarize_uses_greater_or_equal_and_per_class_thresholds():
    scores = np.array([[0.5, 0.2], [0.49, 0.3]])
    np.testing.assert_array_equal(M.binarize(scores, 0.5), [[1, 0], [0, 0]])
    np.testing.assert_array_equal(M.binarize(scores, np.array([0.4, 0.3])), [[1, 0], [1, 1]])
    with pytest.raises(ValueError):
        M.binarize(scores, np.array([0.1, 0.2, 0.3]))


def test_top_k_picks_highest_and_breaks_ties_by_lower_index():
    scores = np.array([[0.1, 0.9, 0.5, 0.7, 0.2],
                       [0.3, 0.3, 0.3, 0.3, 0.3],
                       [0.0, 0.6, 0.6, 0.1, 0.6]])
    np.testing.assert_array_equal(M.top_k_predictions(scores, 3), [[0, 1, 1, 1, 0],
                                                                   [1, 1, 1, 0, 0],
                                                                   [0, 1, 1, 0, 1]])


def test_top_k_ties_on_wide_rows_go_to_the_lowest_indices():
    # long rows, where an unstable sort would shuffle equal scores
    scores = np.zeros((4, 64))
    scores[:, 40] = 1.0
    expected = np.zeros((4, 64), dtype=np.uint8)
    expected[:, [0, 1, 40]] = 1
    np.testing.assert_array_equal(M.top_k_predictions(scores, 3), expected)


def test_top_k_with_fewer_classes_than_k_predicts_every_class():
    scores = np.random.default_rng(0).random((6, 2))
    np.testing.assert_array_equal(M.top_k_predictions(scores, 3), np.ones((6, 2)))


# ----------------------------------------------------------------------------- threshold metrics

def predictions_with_empty_rows_and_columns(seed):
    """Predictions at 0.5 where one class is never predicted, one never true, and some rows are empty."""
    scores, targets = random_multilabel(seed, n=200, c=6)
    targets[:, 1] = False                     # class without positives: recall 0/0
    scores[:, 2] = 0.0                        # class never predicted: precision 0/0
    scores[:5] = 0.0                          # rows with no prediction
    targets[5:10] = False                     # rows with no label
    return M.binarize(scores, 0.5), targets


@pytest.mark.parametrize("seed", SEEDS)
def test_per_class_and_averaged_counts_match_sklearn(seed):
    pred, targets = predictions_with_empty_rows_and_columns(seed)
    kw = dict(zero_division=0)
    assert_close(M.per_class_precision(pred, targets), skm.precision_score(targets, pred, average=None, **kw))
    assert_close(M.per_class_recall(pred, targets), skm.recall_score(targets, pred, average=None, **kw))
    assert_close(M.per_class_f1(pred, targets), skm.f1_score(targets, pred, average=None, **kw))
    assert_close(M.class_precision(pred, targets), skm.precision_score(targets, pred, average="macro", **kw))
    assert_close(M.class_recall(pred, targets), skm.recall_score(targets, pred, average="macro", **kw))
    assert_close(M.overall_precision(pred, targets), skm.precision_score(targets, pred, average="micro", **kw))
    assert_close(M.overall_recall(pred, targets), skm.recall_score(targets, pred, average="micro", **kw))
    assert_close(M.overall_f1(pred, targets), skm.f1_score(targets, pred, average="micro", **kw))
    assert_close(M.micro_f1(pred, targets), skm.f1_score(targets, pred, average="micro", **kw))
    assert_close(M.macro_f1(pred, targets), skm.f1_score(targets, pred, average="macro", **kw))
    assert_close(M.samples_f1(pred, targets), skm.f1_score(targets, pred, average="samples", **kw))
    assert_close(M.samples_jaccard(pred, targets), skm.jaccard_score(targets, pred, average="samples", **kw))
    np.testing.assert_array_equal(M.support(targets), targets.sum(axis=0))


@pytest.mark.parametrize("seed", SEEDS)
def test_cf1_is_harmonic_mean_of_cp_and_cr_not_mean_f1(seed):
    pred, targets = predictions_with_empty_rows_and_columns(seed)
    cp = skm.precision_score(targets, pred, average="macro", zero_division=0)
    cr = skm.recall_score(targets, pred, average="macro", zero_division=0)
    assert M.class_f1(pred, targets) == pytest.approx(2 * cp * cr / (cp + cr), rel=1e-12)


def test_cf1_differs_from_mean_per_class_f1():
    # class 0: 10 true, 1 predicted (correct) -> P 1, R 0.1; class 1 the mirror -> P 0.1, R 1.
    # CP = CR = 0.55 so CF1 = 0.55, while each class's F1 is 2*0.1/1.1 = 0.18.
    targets = np.zeros((10, 2), dtype=bool)
    targets[:, 0] = True
    targets[0, 1] = True
    pred = np.zeros((10, 2), dtype=np.uint8)
    pred[0, 0] = 1
    pred[:, 1] = 1
    assert M.class_f1(pred, targets) == pytest.approx(0.55)
    assert M.macro_f1(pred, targets) == pytest.approx(0.2 / 1.1)


def test_zero_division_conventions():
    pred = np.zeros((3, 2), dtype=np.uint8)
    targets = np.array([[1, 0], [0, 0], [1, 0]])
    np.testing.assert_array_equal(M.per_class_precision(pred, targets), [0, 0])   # nothing predicted
    np.testing.assert_array_equal(M.per_class_recall(pred, targets), [0, 0])      # class 1: nothing true
    assert M.class_f1(pred, targets) == 0.0 and M.overall_f1(pred, targets) == 0.0
    assert M.samples_jaccard(pred, targets) == 0.0                                  # empty row: 0, not 1


@pytest.mark.parametrize("seed", SEEDS)
def test_threshold_metrics_with_ignore_equal_sklearn_on_kept_pairs(seed):
    pred, targets = predictions_with_empty_rows_and_columns(seed)
    ignore = random_ignore(seed, targets.shape, rate=0.2)
    keep = ~ignore
    kw = dict(zero_division=0)
    for k in range(targets.shape[1]):
        t, p = targets[keep[:, k], k], pred[keep[:, k], k]
        assert M.per_class_precision(pred, targets, ignore)[k] == pytest.approx(skm.precision_score(t, p, **kw))
        assert M.per_class_recall(pred, targets, ignore)[k] == pytest.approx(skm.recall_score(t, p, **kw))
        assert M.per_class_f1(pred, targets, ignore)[k] == pytest.approx(skm.f1_score(t, p, **kw))
    # overall metrics pool the kept pairs
    assert M.overall_precision(pred, targets, ignore) == pytest.approx(skm.precision_score(targets[keep], pred[keep], **kw))
    assert M.overall_recall(pred, targets, ignore) == pytest.approx(skm.recall_score(targets[keep], pred[keep], **kw))
    assert M.micro_f1(pred, targets, ignore) == pytest.approx(skm.f1_score(targets[keep], pred[keep], **kw))
    # sample metrics: each row over its kept classes (40 rows, incl. empty ones, keep sklearn calls few)
    p, t, i = pred[:40], targets[:40], ignore[:40]
    row_f1 = [skm.f1_score(t[r, ~i[r]], p[r, ~i[r]], **kw) for r in range(len(p))]
    row_jac = [skm.jaccard_score(t[r, ~i[r]], p[r, ~i[r]], **kw) for r in range(len(p))]
    assert M.samples_f1(p, t, i) == pytest.approx(np.mean(row_f1))
    assert M.samples_jaccard(p, t, i) == pytest.approx(np.mean(row_jac))
    np.testing.assert_array_equal(M.support(targets, ignore), (targets & keep).sum(axis=0))


def test_bad_inputs_raise():
    scores, targets = random_multilabel(0, n=10, c=3)
    with pytest.raises(ValueError):
        M.per_class_ap(scores, targets * 2)
    with pytest.raises(ValueError):
        M.per_class_ap(scores, targets[:, :2])
    with pytest.raises(ValueError):
        M.per_class_ap(np.where(targets, np.nan, scores), targets)
    with pytest.raises(ValueError):
        M.top_k_predictions(scores, 0)


# ----------------------------------------------------------------------------- multi-label report

def test_multilabel_report_agrees_with_the_single_metrics():
    scores, targets = random_multilabel(11)
    ignore = random_ignore(11, targets.shape)
    thresholds = np.linspace(0.3, 0.7, targets.shape[1])
    names = [f"c{k}" for k in range(targets.shape[1])]
    rep = M.multilabel_report(scores, targets, ignore, thresholds, class_names=names)
    json.loads(json.dumps(rep))  # plain Python types only

    pred = M.binarize(scores, thresholds)
    top3 = M.top_k_predictions(scores, 3)
    assert rep["mAP"] == pytest.approx(M.mean_average_precision(scores, targets, ignore))
    for key, fn in [("CP", M.class_precision), ("CR", M.class_recall), ("CF1", M.class_f1),
                    ("OP", M.overall_precision), ("OR", M.overall_recall), ("OF1", M.overall_f1)]:
        assert rep[key] == pytest.approx(fn(pred, targets, ignore)), key
        assert rep["top3_" + key] == pytest.approx(fn(top3, targets, ignore)), key
    for key, fn in [("micro_f1", M.micro_f1), ("macro_f1", M.macro_f1),
                    ("samples_f1", M.samples_f1), ("samples_jaccard", M.samples_jaccard)]:
        assert rep[key] == pytest.approx(fn(pred, targets, ignore)), key
        assert rep["top3_" + key] == pytest.approx(fn(top3, targets, ignore)), key
    assert rep["top3_CP"] != pytest.approx(rep["CP"])
    assert (rep["num_samples"], rep["num_classes"]) == targets.shape

    ap, f1 = M.per_class_ap(scores, targets, ignore), M.per_class_f1(pred, targets, ignore)
    for k, row in enumerate(rep["per_class"]):
        assert row["name"] == names[k] and row["threshold"] == pytest.approx(thresholds[k])
        assert row["ap"] == pytest.approx(ap[k]) and row["f1"] == pytest.approx(f1[k])
        assert row["support"] == int((targets[:, k] & ~ignore[:, k]).sum())
        assert isinstance(row["support"], int) and isinstance(row["ap"], float)


def test_multilabel_report_with_two_classes_and_a_class_without_positives():
    scores, targets = random_multilabel(12, c=2)
    targets[:, 0] = False
    rep = M.multilabel_report(scores, targets)
    assert np.isnan(rep["per_class"][0]["ap"]) and rep["per_class"][0]["name"] == "0"
    assert rep["mAP"] == pytest.approx(rep["per_class"][1]["ap"])
    all_pred = np.ones_like(targets)  # top-3 of 2 classes predicts both
    assert rep["top3_OP"] == pytest.approx(M.overall_precision(all_pred, targets))
    assert rep["top3_CR"] == pytest.approx(0.5)  # class 0 recall 0/0 -> 0, class 1 recall 1


# ----------------------------------------------------------------------------- single-label

def random_singlelabel(seed, n=400, c=6):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    scores = rng.random((n, c)) + 0.6 * np.eye(c)[labels]  # right about half the time
    return scores, labels


@pytest.mark.parametrize("seed", SEEDS)
def test_singlelabel_metrics_match_sklearn(seed):
    scores, labels = random_singlelabel(seed)
    c = scores.shape[1]
    pred = scores.argmax(axis=1)
    assert M.accuracy(scores, labels) == pytest.approx(skm.accuracy_score(labels, pred))
    for k in (1, 2, 5):
        assert M.top_k_accuracy(scores, labels, k) == pytest.approx(
            skm.top_k_accuracy_score(labels, scores, k=k, labels=range(c)))
    np.testing.assert_array_equal(M.confusion_matrix(pred, labels, c),
                                  skm.confusion_matrix(labels, pred, labels=range(c)))
    assert_close(M.per_class_accuracy(scores, labels),
                 skm.recall_score(labels, pred, average=None, labels=range(c), zero_division=0))
    assert 0.3 < M.accuracy(scores, labels) < 0.9  # the data is neither trivial nor hopeless


def test_top_k_accuracy_clips_k_to_the_number_of_classes():
    scores, labels = random_singlelabel(1, c=4)
    assert M.top_k_accuracy(scores, labels, k=10) == 1.0
    assert M.top_k_accuracy(scores, labels, k=3) < 1.0


def test_top_k_accuracy_breaks_ties_like_top_k_predictions():
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 3, (300, 6)).astype(float)   # many ties
    labels = rng.integers(0, 6, 300)
    for k in (1, 2, 3):
        hits = M.top_k_predictions(scores, k)[np.arange(300), labels]
        assert M.top_k_accuracy(scores, labels, k) == pytest.approx(hits.mean())
    assert M.accuracy(scores, labels) == pytest.approx(np.mean(scores.argmax(axis=1) == labels))


def test_empty_inputs():
    assert np.isnan(M.per_class_ap(np.zeros((0, 3)), np.zeros((0, 3)))).all()
    assert np.isnan(M.accuracy(np.zeros((0, 3)), np.zeros(0, dtype=int)))


def test_singlelabel_report():
    scores, labels = random_singlelabel(2, c=5)
    labels[labels == 4] = 0  # class 4 has no samples: accuracy NaN, precision 0 if ever predicted
    c = scores.shape[1]
    pred = scores.argmax(axis=1)
    names = list("abcde")
    rep = M.singlelabel_report(scores, labels, class_names=names)
    json.loads(json.dumps(rep))
    assert rep["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert rep["top5"] is None  # 5 classes: top-5 is 1 by construction, not reported
    assert rep["macro_f1"] == pytest.approx(skm.f1_score(labels, pred, average="macro", zero_division=0))
    never = scores.copy()
    never[:, 4] = -np.inf                      # class 4 neither occurs nor is predicted: not averaged in
    assert 4 not in never.argmax(1)
    assert M.singlelabel_report(never, labels)["macro_f1"] == pytest.approx(
        skm.f1_score(labels, never.argmax(1), average="macro", zero_division=0))
    assert M.singlelabel_report(np.c_[scores, np.zeros((len(labels), 1))], labels)["top5"] == pytest.approx(
        skm.top_k_accuracy_score(labels, np.c_[scores, np.zeros((len(labels), 1))], k=5, labels=range(6)))
    assert rep["confusion_matrix"] == skm.confusion_matrix(labels, pred, labels=range(c)).tolist()
    precision = skm.precision_score(labels, pred, average=None, labels=range(c), zero_division=0)
    for k, row in enumerate(rep["per_class"]):
        assert row["name"] == names[k] and row["support"] == int((labels == k).sum())
        assert row["precision"] == pytest.approx(precision[k])
    assert np.isnan(rep["per_class"][4]["accuracy"])


def test_labels_out_of_range_raise():
    scores, labels = random_singlelabel(3, c=4)
    with pytest.raises(ValueError):
        M.accuracy(scores, labels + 1)
    with pytest.raises(ValueError):
        M.confusion_matrix(labels, labels[:-1], 4)
