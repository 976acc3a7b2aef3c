"""Replaying discrete choices (mmfisher.openmmlab.decisions): comparable outputs, wrong values still seen."""
import pytest
import torch

from mmfisher.openmmlab.decisions import DecisionMismatch, SameDecisions


def select(scores, feats):
    """A detector's post-processing in miniature: top-k, a threshold, a sort."""
    top = scores.topk(3)
    kept = top.indices[top.values > 0.5]
    order = scores[kept].sort(descending=True).indices
    return feats[kept[order]], scores.max(0)


def test_a_choice_that_flips_on_rounding_is_replayed_and_values_are_the_second_runs_own():
    scores = torch.tensor([0.9, 0.7, 0.7, 0.2, 0.6])
    feats = torch.arange(10.0).view(5, 2)
    nudged = scores + torch.tensor([0.0, -1e-7, 1e-7, 0.0, 0.0])         # 1 and 2 swap places
    plain_a, plain_b = select(scores, feats)[0], select(nudged, feats)[0]
    assert plain_a.tolist() != plain_b.tolist()
    with SameDecisions() as rec:
        a, (amax, aarg) = select(scores, feats)
    with SameDecisions(rec):
        b, (bmax, barg) = select(nudged, feats)
    assert torch.equal(a, b) and torch.equal(aarg, barg) and abs(float(amax - bmax)) < 1e-6
    # a wrong value is not hidden: the replayed indices gather the second run's own values
    with SameDecisions(rec):
        c, (cmax, _) = select(scores, feats * 2)
    assert not torch.equal(a, c)
    with SameDecisions(rec):
        _, (cmax, _) = select(scores * 0.9, feats)
    assert abs(float(cmax) - 0.81) < 1e-6


def test_a_run_that_takes_other_decisions_is_an_error():
    x = torch.randn(8)
    with SameDecisions() as rec:
        x.topk(2)
    with pytest.raises(DecisionMismatch, match='took 0 decisions, the masked one 1'):
        with SameDecisions(rec):
            x.sum()
    with pytest.raises(DecisionMismatch, match='argmax in the compact model, topk in the masked one'):
        with SameDecisions(rec):
            x.argmax()


def test_a_decision_over_a_feature_map_of_another_width_is_not_replayed():
    """CornerNet's corner pooling: cummax over a feature map whose channels the compact model lost."""
    wide, narrow = torch.randn(1, 8, 5, 5), torch.randn(1, 6, 5, 5)
    with SameDecisions() as rec:
        wide.cummax(2)
    with SameDecisions(rec):
        values, idx = narrow.cummax(2)
    assert torch.equal(values, narrow.cummax(2).values) and idx.shape == narrow.shape
