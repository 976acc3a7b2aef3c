"""Group Fisher importance equals the per-sample gradient w.r.t. shared channel masks, squared."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmfisher.core import ConsumerInputs, analyse
from mmfisher.core.importance import FisherImportance


class Net(nn.Module):
    """A residual stream, a conv called twice (shared), a frozen stem and a flattened FC."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.frozen = nn.Conv2d(6, 6, 3, padding=1)
        self.c1 = nn.Conv2d(6, 5, 1)
        self.c2 = nn.Conv2d(5, 6, 3, padding=1)
        self.shared = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, 3)
        self.out = nn.Conv2d(4, 2, 1)
        for p in list(self.stem.parameters()) + list(self.frozen.parameters()):
            p.requires_grad_(False)  # like mmdet's frozen_stages: nothing before c1 requires grad

    def forward(self, x):
        s = F.relu(self.stem(x))
        s = s + F.relu(self.frozen(s))
        s = s + self.c2(F.relu(self.c1(s)))
        a = F.relu(self.shared(s))
        b = F.relu(self.shared(F.max_pool2d(s, 2)))
        pooled = F.adaptive_avg_pool2d(a, 2) + F.adaptive_avg_pool2d(b, 2)
        return self.fc(pooled.flatten(1)), self.out(b)


def loss_fn(outputs):
    fc, out = outputs
    return (fc ** 2).sum() + (out.sin()).sum()


def reference_fisher(model, graph, batches, keep):
    return reference_fisher_fn(model, graph, batches, loss_fn, keep)


def reference_fisher_fn(model, graph, batches, loss, keep=None):
    """s_i = sum_n (dL_n/dm_i)^2 with one explicit mask vector m shared by all consumer inputs."""
    U = graph.num_channels
    keep = torch.ones(U, dtype=torch.bool) if keep is None else keep
    consumers = ConsumerInputs(model, graph).consumers
    total = torch.zeros(U, dtype=torch.float64)
    for x in batches:
        for n in range(x.shape[0]):
            m = torch.cat([keep.float(), torch.ones(1)]).requires_grad_()
            handles = []
            for c in consumers:
                def hook(mod, args, c=c):
                    pm = m[c.index]
                    shape = (1, -1) + (1,) * (args[0].dim() - 2) if c.dim == 1 else (-1,)
                    return (args[0] * pm.view(shape),)
                handles.append(c.module.register_forward_pre_hook(hook))
            (g,) = torch.autograd.grad(loss(model(x[n:n + 1])), m)
            for h in handles:
                h.remove()
            total += g[:U].double() ** 2
    return total


@pytest.mark.parametrize('pruned', [False, True])
def test_fisher_matches_explicit_mask_gradients(pruned):
    torch.manual_seed(0)
    model = Net()
    graph = analyse(model, torch.randn(2, 3, 8, 8))
    keep = torch.ones(graph.num_channels, dtype=torch.bool)
    if pruned:  # masked channels must not change the others' scores' definition
        keep[graph.group('c1').offset + 1] = False
        keep[graph.group('stem').offset + 2] = False
    consumers = ConsumerInputs(model, graph)
    fisher = FisherImportance(consumers)
    consumers.set_keep(keep)
    consumers.attach()
    batches = [torch.randn(3, 3, 8, 8), torch.randn(2, 3, 8, 8)]   # the last batch is smaller
    for x in batches:
        model.zero_grad()
        loss_fn(model(x)).backward()
        fisher.accumulate()
    consumers.detach()
    ref = reference_fisher(model, graph, batches, keep)
    prunable = graph.prunable & keep
    assert fisher.samples == 5
    assert torch.allclose(fisher.accum[prunable], ref[prunable], rtol=1e-4, atol=1e-10)
    # channels of the frozen stem's stream and of the shared conv get a score too
    assert graph.groups_of('frozen', 'in') == graph.groups_of('frozen', 'out') == [graph.group('stem')]
    for name in ('stem', 'shared'):
        ch = graph.group(name).channels
        assert (fisher.accum[ch.start:ch.stop][keep[ch.start:ch.stop]] > 0).all()


def test_sum_over_calls_comes_before_the_square():
    """The shared conv is called twice per sample: the score is (g1 + g2)^2, not g1^2 + g2^2."""
    torch.manual_seed(1)
    model = Net()
    graph = analyse(model, torch.randn(1, 3, 8, 8))
    consumers = ConsumerInputs(model, graph)
    fisher = FisherImportance(consumers)
    consumers.attach()
    x = torch.randn(1, 3, 8, 8)
    loss_fn(model(x)).backward()
    fisher.accumulate()
    ref = reference_fisher(model, graph, [x], torch.ones(graph.num_channels, dtype=torch.bool))
    grp = graph.group('stem')  # read by c1, frozen, shared (x2)
    sl = slice(grp.offset, grp.offset + grp.size)
    assert torch.allclose(fisher.accum[sl], ref[sl], rtol=1e-4)


def test_no_scores_without_grad_and_a_non_finite_pass_is_dropped_whole():
    torch.manual_seed(2)
    model = Net()
    graph = analyse(model, torch.randn(1, 3, 8, 8))
    consumers = ConsumerInputs(model, graph)
    fisher = FisherImportance(consumers)
    consumers.attach()
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))
    fisher.accumulate()
    assert fisher.samples == 0 and float(fisher.accum.sum()) == 0 and fisher.valid_passes == 0
    good = torch.randn(2, 3, 8, 8)
    loss_fn(model(good)).backward()
    fisher.accumulate()
    after_good = fisher.accum.clone()
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float('nan')      # one pixel of one image: every channel of the pass is dropped
    loss_fn(model(x)).backward()
    with pytest.warns(UserWarning, match='not finite.*whole pass is dropped'):
        fisher.accumulate()
    assert torch.equal(fisher.accum, after_good)
    assert fisher.valid_passes == 1 and fisher.passes == 3


def test_mixed_precision_inputs_give_finite_float_scores():
    torch.manual_seed(4)
    model = Net()
    graph = analyse(model, torch.randn(1, 3, 8, 8))
    consumers = ConsumerInputs(model, graph)
    fisher = FisherImportance(consumers)
    consumers.attach()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 8, 8))
    loss_fn([o.float() for o in out]).backward()
    fisher.accumulate()
    assert fisher.accum.dtype == torch.float64 and torch.isfinite(fisher.accum).all()
    assert float(fisher.accum[graph.prunable].sum()) > 0
