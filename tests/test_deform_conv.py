"""mmcv's deformable convs (DCN, DCNv2, their packs) prune as convs; the offsets and masks they read do not.

The compiled kernel samples its input at offset positions and then applies its weight as a conv does,
so input channel i meets only ``weight[:, i]``: the layer type says so, and the masked model, the
shrunk model and the Fisher of every channel are checked here against computations that do not use
the layer type (the masked model's outputs, and mask gradients taken with hooks of the test's own).
"""
import pytest
import torch
import torch.nn as nn

mmcv_ops = pytest.importorskip('mmcv.ops')

import mmfisher.openmmlab  # noqa: E402,F401  (registers the layer types)
from mmfisher.core import ConsumerInputs, analyse  # noqa: E402
from mmfisher.core.importance import FisherImportance  # noqa: E402


class DeformNet(nn.Module):
    """A DCN pack (ResNet-DCN's conv2), a DCNv2 pack, and a DCNv2 fed offsets and mask by a separate
    conv, as DyHead / RepPoints / VFNet heads do; the packs' offset convs get non-zero weights (mmcv
    builds them zero), so the offsets depend on the channels."""

    def __init__(self, deform_groups=1):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act0 = nn.ReLU()
        self.dcn = mmcv_ops.DeformConv2dPack(8, 12, 3, padding=1, deform_groups=deform_groups)
        self.act1 = nn.ReLU()
        self.mdcn = mmcv_ops.ModulatedDeformConv2dPack(12, 10, 3, padding=1)
        self.act2 = nn.ReLU()
        self.offset = nn.Conv2d(10, 27, 3, padding=1)
        self.spatial = mmcv_ops.ModulatedDeformConv2d(10, 6, 3, padding=1)
        self.act3 = nn.ReLU()
        self.head = nn.Conv2d(6, 2, 1)
        with torch.no_grad():
            for conv in (self.dcn.conv_offset, self.mdcn.conv_offset, self.offset):
                conv.weight.normal_(0, 0.3)
                conv.bias.normal_(0, 0.3)

    def forward(self, x):
        x = self.act0(self.stem(x))
        x = self.act1(self.dcn(x))
        x = self.act2(self.mdcn(x))
        o = self.offset(x)
        offset, mask = o[:, :18], o[:, 18:].sigmoid()
        return self.head(self.act3(self.spatial(x, offset, mask)))


def test_deformable_convs_prune_like_convs_and_keep_their_offset_channels():
    from helpers import masked_and_shrunk, max_rel_err, random_keep
    torch.manual_seed(0)
    model = DeformNet()
    x = torch.randn(2, 3, 12, 12)
    graph = analyse(model, x, strict=True)
    for name in ('stem', 'dcn', 'mdcn'):       # every channel a deformable conv reads or writes
        assert graph.group(name).prunable, graph.group(name).reasons
    assert graph.groups_of('dcn', 'in') == [graph.group('stem')]
    assert graph.groups_of('dcn.conv_offset', 'in') == [graph.group('stem')]
    assert graph.groups_of('spatial', 'in') == graph.groups_of('offset', 'in') == [graph.group('mdcn')]
    assert graph.group('spatial').prunable
    # offsets and masks: their channel counts are fixed by the kernel (here the slicing says so first)
    assert not graph.group('offset').prunable
    for pack in ('dcn', 'mdcn'):
        grp = graph.group(f'{pack}.conv_offset')
        assert not grp.prunable and any(f'the offsets of {pack}' in r for r in grp.reasons)
    keep = random_keep(graph, 0.5)
    ref, out, compact = masked_and_shrunk(model, graph, keep, lambda m: m(x))
    assert max_rel_err(ref, out) < 1e-5
    kept = {n: int(keep[graph.group(n).channels].sum()) for n in ('stem', 'dcn', 'mdcn', 'spatial')}
    assert kept['stem'] < 8 and kept['dcn'] < 12
    assert compact.dcn.weight.shape[:2] == (kept['dcn'], kept['stem'])
    assert compact.dcn.conv_offset.weight.shape[:2] == (18, kept['stem'])
    assert compact.mdcn.conv_offset.weight.shape[:2] == (27, kept['dcn'])
    assert compact.spatial.weight.shape[:2] == (kept['spatial'], kept['mdcn'])
    assert compact.offset.weight.shape[:2] == (27, kept['mdcn'])
    # the compact model trains
    compact.train()
    compact(x).sum().backward()
    assert compact.dcn.weight.grad is not None and torch.isfinite(compact.dcn.weight.grad).all()


class OffsetsFromAConv(nn.Module):
    """RepPoints / VFNet style: a DCN fed the output of a conv as its offsets, unsliced."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.offset = nn.Conv2d(8, 18, 1)
        self.dcn = mmcv_ops.DeformConv2d(8, 4, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.dcn(x, self.offset(x))


def test_the_offsets_a_deformable_conv_reads_keep_their_channels():
    graph = analyse(OffsetsFromAConv(), torch.randn(1, 3, 12, 12), strict=True)
    grp = graph.group('offset')
    assert not grp.prunable and any('dcn (DeformConv2d): read as the deformable offset' in r for r in grp.reasons)
    assert graph.group('stem').prunable


def test_a_deformable_conv_with_several_deform_groups_keeps_its_input_channels():
    torch.manual_seed(0)
    graph = analyse(DeformNet(deform_groups=2), torch.randn(1, 3, 12, 12), strict=True)
    grp = graph.group('stem')
    assert not grp.prunable and any('2 deform groups' in r for r in grp.reasons)
    assert graph.group('dcn').prunable


def test_fisher_of_channels_a_deformable_conv_reads_equals_the_gradient_of_one_mask_per_channel():
    """Reference: one mask per channel, multiplied into the activation every reader reads (a hook on
    the ReLU after each producer), per-sample gradient squared. A pack reads its input twice (kernel
    and offset conv): the mask's gradient sums both reads, once."""
    torch.manual_seed(0)
    model = DeformNet()
    graph = analyse(model, torch.randn(1, 3, 12, 12), strict=True)
    batch = torch.randn(3, 3, 12, 12)

    def loss(out):
        return (out ** 2).sum()

    consumers = ConsumerInputs(model, graph)
    fisher = FisherImportance(consumers)
    consumers.attach()
    model.zero_grad()
    loss(model(batch)).backward()
    fisher.accumulate()
    consumers.detach()

    acts = {'stem': model.act0, 'dcn': model.act1, 'mdcn': model.act2, 'spatial': model.act3}
    for name, act in acts.items():
        grp = graph.group(name)
        ref = torch.zeros(grp.size, dtype=torch.float64)
        for n in range(batch.shape[0]):
            m = torch.ones(grp.size, requires_grad=True)
            h = act.register_forward_hook(lambda mod, a, y, m=m: y * m.view(1, -1, 1, 1))
            (g,) = torch.autograd.grad(loss(model(batch[n:n + 1])), m)
            h.remove()
            ref += g.double() ** 2
        got = fisher.accum[grp.channels]
        assert ref.abs().max() > 0
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-12 * float(ref.abs().max())), name
