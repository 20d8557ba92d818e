"""The end-of-run mix of start and trained weights (engine/merge.py): hand-computed mixes and searches."""
import pytest
import torch

from engine.merge import best_mix, interpolate


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
