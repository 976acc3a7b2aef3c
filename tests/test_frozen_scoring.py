"""Frozen-stage scoring is unbiased: over k passes of the same batch, k times the exact Fisher."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmfisher.core import ConsumerInputs, analyse
from mmfisher.core.importance import FisherImportance

from test_importance import reference_fisher_fn


class FrozenStages(nn.Module):
    """Consecutive frozen convs, a frozen residual stream of two blocks, and the first trainable
    layer after it (its input does not require grad although its weights do)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(6, 5, 3, padding=1), nn.Conv2d(5, 6, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(6, 4, 1), nn.Conv2d(4, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 5, 3, padding=1)
        self.d = nn.Conv2d(5, 3, 1)
        for m in (self.stem, self.a1, self.a2, self.b1, self.b2):
            m.requires_grad_(False)

    def forward(self, x):
        s = F.relu(self.stem(x))
        s = s + self.a2(F.relu(self.a1(s)))
        s = s + self.b2(F.relu(self.b1(s)))
        return self.d(F.relu(self.c(F.relu(s))))


def loss(out):
    return out.sin().sum()


def run_passes(model, graph, x, k, passes, loss_fn=loss):
    """``passes`` backward passes of the batch ``x`` with frozen layers scored every k-th pass."""
    consumers = ConsumerInputs(model, graph)
    fisher = FisherImportance(consumers, frozen_every=k)
    consumers.attach()
    for _ in range(passes):
        model.zero_grad()
        loss_fn(model(x)).backward()
        fisher.accumulate()
    consumers.detach()
    return fisher


@pytest.mark.parametrize('k', [1, 2, 10])
def test_frozen_every_k_is_unbiased_for_every_group(k):
    torch.manual_seed(0)
    model = FrozenStages()
    graph = analyse(model, torch.randn(1, 3, 8, 8))
    x = torch.randn(3, 3, 8, 8)
    ref = reference_fisher_fn(model, graph, [x], loss)
    fisher = run_passes(model, graph, x, k, 2 * k)
    for g in graph.groups:
        if g.prunable:
            sl = slice(g.offset, g.offset + g.size)
            assert torch.allclose(fisher.accum[sl], 2 * k * ref[sl], rtol=1e-5, atol=0), g.name
    assert fisher.valid_passes == 2 * k


def test_frozen_channels_are_scored_on_the_last_pass_of_every_k_and_the_others_on_every_pass():
    torch.manual_seed(1)
    model = FrozenStages()
    graph = analyse(model, torch.randn(1, 3, 8, 8))
    consumers = ConsumerInputs(model, graph)
    fisher = FisherImportance(consumers, frozen_every=3)
    consumers.attach()
    frozen = graph.group('stem').channels     # read by a1, b1 (frozen) and c (trainable, input without grad)
    trained = graph.group('c').channels       # read only by d, whose input requires grad
    gains = []
    for _ in range(6):
        model.zero_grad()
        loss(model(torch.randn(2, 3, 8, 8))).backward()
        before = fisher.accum.clone()
        fisher.accumulate()
        gained = fisher.accum - before
        gains.append((bool((gained[frozen.start:frozen.stop] > 0).any()),
                      bool((gained[trained.start:trained.stop] > 0).all())))
    assert gains == [(False, True), (False, True), (True, True)] * 2
    # learned on the passes that are not scored: the stem stream, a1's and b1's channels
    assert set(graph.groups[i].name for i in graph.channel_group_index()[fisher.frozen].unique().tolist()) == \
        {'stem', 'a1', 'b1'}


def test_mmdet_resnet18_with_frozen_stem_and_layer1_is_scored_without_bias():
    """mmdet's ResNet with frozen_stages=1 (stem and layer1 frozen, BN in eval mode)."""
    from mmdet.models.backbones import ResNet
    torch.manual_seed(2)
    model = ResNet(depth=18, frozen_stages=1, norm_eval=True, out_indices=(3,)).double()
    model.train()
    graph = analyse(model, torch.randn(1, 3, 32, 32, dtype=torch.float64))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)   # float64: the batched and per-sample convs agree
    k = 4

    def loss_resnet(out):
        return (out[0] ** 2).sum()   # a sum over samples: the per-sample reference sees the same loss

    fisher = run_passes(model, graph, x, k, k, loss_resnet)
    ref = reference_fisher_fn(model, graph, [x], loss_resnet)
    checked = 0
    for g in graph.groups:
        if g.prunable:
            sl = slice(g.offset, g.offset + g.size)
            assert torch.allclose(fisher.accum[sl], k * ref[sl], rtol=1e-5, atol=1e-30), g.name
            checked += 1
    assert checked >= 8 and bool(fisher.frozen[graph.group('conv1').offset])   # the stem stream is frozen
