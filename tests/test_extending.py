"""The analysis is extended in one place: an op rule for a torch function, a layer type for a module.

Also the union-find the trace builds on, against an obvious reference."""
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import masked_and_shrunk, max_rel_err, random_keep
from mmfisher.core import OP_RULES, LayerType, analyse, op_rule, register_layer_type
from mmfisher.core import layers as layer_table
from mmfisher.core.atoms import AtomSets, Label, connected_roots


# --------------------------------------------------------------------------- #
# union-find
# --------------------------------------------------------------------------- #
def reference_roots(n, pairs):
    """Merge classes pair by pair, relabelling every member: slow and obvious."""
    cls = list(range(n))
    for a, b in pairs:
        ca, cb = cls[a], cls[b]
        if ca != cb:
            lo, hi = min(ca, cb), max(ca, cb)
            cls = [lo if c == hi else c for c in cls]
    return cls


@pytest.mark.parametrize('seed', range(6))
def test_classes_are_the_connected_components_rooted_at_their_smallest_atom(seed):
    rnd = random.Random(seed)
    n = rnd.choice([1, 5, 50, 400])
    pairs = [(rnd.randrange(n), rnd.randrange(n)) for _ in range(rnd.choice([0, n // 2, 2 * n]))]
    # a long chain in reverse order: the worst case for pointer jumping
    pairs += [(k, k + 1) for k in range(n - 2, max(-1, n - 60), -1)]
    unions = [(torch.tensor([a]), torch.tensor([b])) for a, b in pairs]
    assert connected_roots(n, unions).tolist() == reference_roots(n, pairs)


def test_unions_with_unproduced_positions_or_an_atom_itself_join_nothing():
    sets = AtomSets()
    a, b = sets.alloc(4), sets.alloc(4)
    # -1: a position no module produced; a[2] with itself; only a[0]-b[0] and a[3]-b[1] are real
    sets.union_arrays(torch.tensor([int(a[0]), -1, int(a[2]), int(a[3])]),
                      torch.tensor([int(b[0]), int(b[2]), int(a[2]), int(b[1])]))
    sets.union_arrays(torch.tensor([-1]), torch.tensor([-1]))
    assert sets.roots().tolist() == reference_roots(8, [(0, 4), (3, 5)])
    with pytest.raises(ValueError, match='union of 2 atoms with 3'):
        sets.union_arrays(a[:2], b[:3])


def test_taints_reach_the_whole_class_whenever_the_union_comes():
    sets = AtomSets()
    a, b, c = sets.alloc(3), sets.alloc(3), sets.alloc(3)
    sets.taint(a[:1], 'first')
    sets.union_arrays(a, b)                  # after the taint
    sets.taint(torch.tensor([-1, int(b[2])]), 'second')
    sets.union_rows(c.view(1, 3))            # the three atoms of c are one class
    reasons = sets.reasons()
    roots = sets.roots()
    assert roots.tolist() == [0, 1, 2, 0, 1, 2, 6, 6, 6]
    assert reasons == {0: ['first'], 2: ['second']}


# --------------------------------------------------------------------------- #
# an op rule
# --------------------------------------------------------------------------- #
class GluNet(nn.Module):
    """``glu`` halves the channels: out[:, k] = x[:, k] * sigmoid(x[:, k + C/2])."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(F.glu(self.a(x), dim=1))


def glu_rule(tr, op):
    """Channel k and k + C/2 go together; the output carries the first half's atoms."""
    x, lab = op.labelled[0]
    dim = op.kwargs.get('dim', op.args[1] if len(op.args) > 1 else -1) % x.dim()
    if dim != lab.dim:
        return tr.taint(lab, f'{op.where}: glu over another dim')     # be conservative
    first, second = lab.atoms.chunk(2)
    tr.sets.union_arrays(first, second)
    tr.set_label(op.out, Label(dim, first))


def test_an_unknown_function_leaves_its_channels_unpruned():
    grp = analyse(GluNet(), torch.randn(1, 3, 8, 8), strict=True).group('a')
    assert not grp.prunable and 'glu mixes or drops channels' in grp.reasons[0]


def test_a_registered_op_rule_teaches_the_analysis_a_function(monkeypatch):
    monkeypatch.setitem(OP_RULES, 'glu', None)      # restored after the test
    op_rule('glu')(glu_rule)
    model = GluNet()
    graph = analyse(model, torch.randn(1, 3, 8, 8), strict=True)
    grp = graph.group('a')
    assert grp.prunable and grp.size == 8 and grp.positions_per_channel == 2 and grp.consumers == ['out']
    keep = random_keep(graph, 0.5)
    ref, out, compact = masked_and_shrunk(model, graph, keep, lambda m: m(torch.randn(1, 3, 8, 8,
                                                                                      generator=torch.Generator().manual_seed(0))))
    assert compact.a.out_channels == 8 and compact.out.in_channels == 4
    assert max_rel_err(ref, out) < 1e-5


# --------------------------------------------------------------------------- #
# a layer type
# --------------------------------------------------------------------------- #
class _ScaleFn(torch.autograd.Function):
    """A per-channel scale as a custom autograd Function: the trace treats every Function as a compiled
    kernel (mmcv's are), whatever its forward does."""

    @staticmethod
    def forward(ctx, x, w):
        return x * w.view(1, -1, 1, 1)

    @staticmethod
    def backward(ctx, g):
        raise NotImplementedError


class ChannelScale(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x):
        return _ScaleFn.apply(x, self.weight)


class ScaleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = ChannelScale(8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(self.scale(self.a(x)))


class ChannelScaleType(LayerType):
    """What a user adds for such a module: channels pass through, the weight follows them."""

    kind = 'channel_scale'

    def trace(self, tracer, rec, args, output):
        feat = tracer.input_atoms(rec, 'feat', args[0], 1, rec.module.weight.numel())
        tracer.set_label(output, Label(1, feat))

    def shrink(self, module, keep):
        module.weight = nn.Parameter(module.weight.detach()[keep['feat']].clone())

    def params_per_channel(self, module):
        return 1.0


def test_a_module_running_a_compiled_op_is_unprunable_until_its_layer_type_is_registered(monkeypatch):
    grp = analyse(ScaleNet(), torch.randn(1, 3, 8, 8), strict=True).group('a')
    assert not grp.prunable and any('compiled op _ScaleFn' in r for r in grp.reasons), grp.reasons

    monkeypatch.setattr(layer_table, '_TYPES', list(layer_table._TYPES))     # restored after the test
    register_layer_type(ChannelScale, ChannelScaleType())
    model = ScaleNet()
    graph = analyse(model, torch.randn(1, 3, 8, 8), strict=True)
    grp = graph.group('a')
    assert grp.prunable and grp.norms == ['scale'] and grp.consumers == ['out']
    keep = random_keep(graph, 0.5)
    x = torch.randn(1, 3, 8, 8)
    ref, out, compact = masked_and_shrunk(model, graph, keep, lambda m: m(x))
    assert compact.scale.weight.numel() == 4
    assert max_rel_err(ref, out) < 1e-5
    # the cost model counts the type's parameters
    from mmfisher.core.cost import CostModel
    cost = CostModel(model, graph)
    full = sum(p.numel() for p in model.parameters())
    assert cost.totals(torch.ones(graph.num_channels, dtype=torch.bool))['params'] == full
    assert cost.totals(keep)['params'] == sum(p.numel() for p in compact.parameters())
