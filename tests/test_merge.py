"""The end-of-run mix of start and trained weights (engine/merge.py): hand-computed mixes and searches."""
import pytest
import torch

from engine.merge import best_mix, interpolate, mix_rank


def test_interpolate_mixes_floats_and_keeps_counters_from_the_trained_end():
    start = {"w": torch.tensor([0.0, 4.0]), "bn.running_var": torch.tensor([1.0]),
             "bn.num_batches_tracked": torch.tensor(3)}
    end = {"w": torch.tensor([2.0, 0.0]), "bn.running_var": torch.tensor([3.0]),
           "bn.num_batches_tracked": torch.tensor(9)}
    mixed = interpolate(start, end, 0.25)
    assert mixed["w"].tolist() == [0.5, 3.0]  # 0.75 * start + 0.25 * end
    assert mixed["bn.running_var"].tolist() == [1.5]
    assert mixed["bn.num_batches_tracked"].item() == 9
    assert interpolate(start, end, 0.0)["w"].tolist() == [0.0, 4.0]
    assert interpolate(start, end, 1.0)["w"].tolist() == [2.0, 0.0]


def test_interpolate_names_keys_that_differ():
    with pytest.raises(ValueError, match="extra"):
        interpolate({"w": torch.zeros(1)}, {"w": torch.zeros(1), "extra": torch.zeros(1)}, 0.5)


@pytest.mark.parametrize(("curve", "expected", "tried"), [
    (lambda a: 1 - (a - 0.3) ** 2, 0.25, [0.5, 0.25]),  # peak near 0.3: the start side is searched
    (lambda a: a, 1.0, [0.5, 0.75]),  # training only helps: the trained weights
    (lambda a: -a, 0.0, [0.5, 0.25]),  # training only hurts: the start
    (lambda a: 1 - (a - 0.7) ** 2, 0.75, [0.5, 0.75]),
])
def test_best_mix_searches_the_better_side_with_two_evaluations(curve, expected, tried):
    calls = []
    alpha, scores = best_mix(lambda a: calls.append(a) or curve(a), curve(0.0), curve(1.0))
    assert calls == tried and alpha == expected and set(scores) == {0.0, 1.0, *tried}


def test_best_mix_ties_keep_the_trained_end():
    assert best_mix(lambda a: 0.5, 0.5, 0.5)[0] == 1.0


def test_a_mix_ranks_by_ap_plus_ap50_among_those_not_below_the_start():
    start = {"AP": 0.58, "AP50": 0.95, "AP75": 0.60}
    boxes_better = {"AP": 0.62, "AP50": 0.95, "AP75": 0.70}  # AP50 at its ceiling, the boxes tighter
    ap50_down = {"AP": 0.64, "AP50": 0.94, "AP75": 0.72}  # a larger sum, but AP50 below the start
    assert mix_rank(start, start, "AP50") == (True, pytest.approx(1.53))
    assert mix_rank(boxes_better, start, "AP50") == (True, pytest.approx(1.57))
    assert mix_rank(ap50_down, start, "AP50") == (False, pytest.approx(1.58))
    assert mix_rank(boxes_better, start, "AP75")[0] and not mix_rank(start | {"AP75": 0.5}, start, "AP75")[0]
    # the search over mix_rank's tuples: alpha 0.5 tightens the boxes, the trained end loses AP50
    stats = {0.0: start, 0.25: boxes_better | {"AP": 0.60}, 0.5: boxes_better, 1.0: ap50_down}
    alpha, ranks = best_mix(lambda a: mix_rank(stats[a], start, "AP50"), mix_rank(start, start, "AP50"),
                            mix_rank(ap50_down, start, "AP50"))
    assert alpha == 0.5 and sorted(ranks) == [0.0, 0.25, 0.5, 1.0]  # the end ranks below the start: 0.25 is tried
