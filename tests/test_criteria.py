"""Importance criteria are interchangeable: 'l1' and 'random' rank channels by their own rule, everything
else (groups, constraints, normalisation, target) is the pruner's, the same as for Group Fisher."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmfisher.core import analyse
from mmfisher.core.criteria import CRITERIA, ImportanceCriterion, build_criterion, register_criterion
from mmfisher.core.layers import layer_type_for
from mmfisher.core.pruner import GroupFisherPruner
from test_pruner import ResNetish, train


def reference_l1(layer, keep_in):
    """The layer itself, run with |weights| and no bias on an input of ones at its kept input channels
    (zeros elsewhere), large enough for one full kernel window: each output is its filter's L1 norm."""
    w = layer.weight.detach().abs().double()
    if isinstance(layer, nn.Linear):
        return F.linear(keep_in.double()[None], w)[0]
    k = layer.kernel_size
    if layer.transposed:
        x = keep_in.double()[None, :, None, None]
        y = F.conv_transpose2d(x, w, groups=layer.groups)      # every weight lands on one output position
        return y.sum((0, 2, 3))
    x = keep_in.double()[None, :, None, None].expand(1, -1, *k).contiguous()
    return F.conv2d(x, w, groups=layer.groups)[0, :, 0, 0]


@pytest.mark.parametrize('layer', [
    nn.Conv2d(6, 8, 3), nn.Conv2d(6, 8, 3, groups=2), nn.Conv2d(6, 6, 3, groups=6),
    nn.ConvTranspose2d(6, 8, 3, groups=2), nn.ConvTranspose2d(4, 6, 2), nn.Linear(6, 5),
], ids=['conv', 'group', 'depthwise', 'transposed-group', 'transposed', 'linear'])
def test_filter_l1_is_the_layer_applied_to_its_kept_inputs(layer):
    torch.manual_seed(0)
    n_in = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    for keep_in in (torch.ones(n_in, dtype=torch.bool), torch.arange(n_in) % 3 != 1):
        got = layer_type_for(layer).filter_l1(layer, keep_in)
        assert torch.allclose(got, reference_l1(layer, keep_in), rtol=1e-12)


def make(**kw):
    torch.manual_seed(0)
    model = ResNetish()
    graph = analyse(model, torch.randn(1, 3, 16, 16))
    return model, graph, GroupFisherPruner(model, graph, **kw)


def test_l1_of_a_channel_sums_every_layer_that_writes_it_over_kept_inputs():
    model, graph, pruner = make(importance='l1')
    groups = {g.name: g for g in graph.groups}
    stream, inner = groups['stem'], groups['c1']
    assert stream.producers == ['stem', 'c2'] and inner.producers == ['c1', 'dw']
    removed = inner.offset + 2
    pruner.keep[removed] = False               # c2 and dw lose input 2
    imp, evidence, valid = pruner.criterion.importance(pruner)
    assert evidence.all() and valid == 1
    kept_inner = [0, 1, 3, 4, 5]
    w = {n: m.weight.detach().abs().double() for n, m in model.named_modules() if hasattr(m, 'weight')}
    for c in range(8):
        ref = w['stem'][c].sum() + w['c2'][c][kept_inner].sum()
        assert torch.isclose(imp[stream.offset + c], ref, rtol=1e-12), c
    for c in kept_inner:
        ref = w['c1'][c].sum() + w['dw'][c].sum()   # dw reads only its own channel
        assert torch.isclose(imp[inner.offset + c], ref, rtol=1e-12), c


def test_l1_step_removes_the_least_l1_per_saving_among_candidates():
    model, graph, pruner = make(importance='l1', normalization='memory')
    imp, _, _ = pruner.criterion.importance(pruner)
    saving = pruner.cost.saving('memory', pruner.keep)
    ratio = imp / saving
    ratio[~pruner.candidates] = float('inf')
    removed = pruner.step(1)
    assert removed[0]['channel'] == int(torch.argmin(ratio))
    assert removed[0]['importance'] == pytest.approx(float(imp[removed[0]['channel']]))


def test_random_depends_on_its_seed_only():
    def history(seed):
        model, graph, pruner = make(importance=dict(type='random', seed=seed), target=('flops', 0.6))
        train(model, pruner.attach(), 16, interval=2, per_step=2)
        return [h['channel'] for h in pruner.history]

    a, b, c = history(0), history(0), history(1)
    assert a == b and a != c and len(a) == len(c) > 0


@pytest.mark.parametrize('importance', ['l1', 'random'])
def test_other_criteria_obey_the_same_constraints_and_target(importance):
    model, graph, pruner = make(importance=importance, target=('flops', 0.5), min_channels=2)
    assert not pruner.fisher.enabled          # no Fisher gathered for a criterion that does not use it
    train(model, pruner.attach(), 200, interval=1, per_step=1)
    assert pruner.reached() and pruner.postponed == 0
    assert pruner.fisher.valid_passes == 0
    removed = ~pruner.keep
    assert not (removed & ~pruner.candidates).any()
    assert not pruner.constraint_violations()          # no layer below min_channels
    assert pruner.state_dict()['criterion']['type'] == importance


def test_a_registered_criterion_is_used_and_unknown_names_are_refused():
    @register_criterion('by_index_test')
    class ByIndex(ImportanceCriterion):
        def importance(self, pruner):
            U = pruner.graph.num_channels
            return torch.arange(U, dtype=torch.float64), torch.ones(U, dtype=torch.bool), 1

    try:
        model, graph, pruner = make(importance='by_index_test', normalization='none')
        first = int(pruner.candidates.nonzero()[0])
        assert pruner.step(1)[0]['channel'] == first
    finally:
        CRITERIA.pop('by_index_test')
    with pytest.raises(ValueError, match=r"importance='taylor' is not a registered criterion; registered: "
                                         r"\['fisher', 'l1', 'random'\]"):
        build_criterion('taylor')
    with pytest.raises(ValueError, match='unexpected keyword'):
        build_criterion(dict(type='random', sede=1))
