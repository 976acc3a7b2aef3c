"""What the coupling analysis must find: the groups named below are the specification."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import config_path
from mmfisher.core import analyse


# --------------------------------------------------------------------------- #
# real architectures (random init, small input)
# --------------------------------------------------------------------------- #
@pytest.fixture(scope='module')
def retinanet_graph():
    from mmfisher.openmmlab import analyse_model, build_from_config
    model = build_from_config(config_path('mmdet', 'retinanet/retinanet_r50_fpn_1x_coco.py'))
    return model, analyse_model(model, (1, 3, 128, 128), strict=True)


def test_resnet_stage_is_one_residual_stream(retinanet_graph):
    _, g = retinanet_graph
    stream = g.group('backbone.layer1.0.conv3')
    assert stream.prunable
    assert stream.producers == ['backbone.layer1.0.conv3', 'backbone.layer1.0.downsample.0',
                                'backbone.layer1.1.conv3', 'backbone.layer1.2.conv3']
    assert stream.consumers == ['backbone.layer1.1.conv1', 'backbone.layer1.2.conv1',
                                'backbone.layer2.0.conv1', 'backbone.layer2.0.downsample.0']
    assert stream.norms == ['backbone.layer1.0.bn3', 'backbone.layer1.0.downsample.1',
                            'backbone.layer1.1.bn3', 'backbone.layer1.2.bn3']
    assert stream.size == 256
    # inside a bottleneck: conv1 -> bn1 -> conv2 is its own group
    inner = g.group('backbone.layer1.0.conv1')
    assert inner.producers == ['backbone.layer1.0.conv1'] and inner.consumers == ['backbone.layer1.0.conv2']
    assert inner.norms == ['backbone.layer1.0.bn1']


def test_frozen_stem_and_eval_norms_are_not_hidden(retinanet_graph):
    model, g = retinanet_graph
    assert model.backbone.frozen_stages == 1 and model.backbone.norm_eval
    assert not any(p.requires_grad for p in model.backbone.conv1.parameters())
    stem = g.group('backbone.conv1')
    assert stem.prunable and stem.norms == ['backbone.bn1']
    assert stem.consumers == ['backbone.layer1.0.conv1', 'backbone.layer1.0.downsample.0']


def test_fpn_top_down_adds_couple_lateral_convs(retinanet_graph):
    _, g = retinanet_graph
    lateral = g.group('neck.lateral_convs.0.conv')
    assert lateral.producers == ['neck.lateral_convs.0.conv', 'neck.lateral_convs.1.conv',
                                 'neck.lateral_convs.2.conv']
    assert lateral.consumers == ['neck.fpn_convs.0.conv', 'neck.fpn_convs.1.conv', 'neck.fpn_convs.2.conv']


def test_shared_head_couples_every_fpn_output(retinanet_graph):
    _, g = retinanet_graph
    out = g.group('neck.fpn_convs.0.conv')
    assert out.producers == [f'neck.fpn_convs.{i}.conv' for i in range(5)]
    assert 'bbox_head.cls_convs.0.conv' in out.consumers and 'bbox_head.reg_convs.0.conv' in out.consumers
    # the head is one module called once per level; its calls are all recorded
    assert len(g.records['bbox_head.cls_convs.0.conv'].calls) == 5


def test_final_outputs_are_unprunable_and_reported(retinanet_graph):
    _, g = retinanet_graph
    for name in ('bbox_head.retina_cls', 'bbox_head.retina_reg'):
        grp = g.group(name)
        assert not grp.prunable and 'model output' in grp.reasons
    assert 'NOT prunable: model output' in g.report()
    s = g.summary()
    assert s['prunable_groups'] == 47 and s['groups'] == 49


def reference_groups(tracer):
    """A slow, obvious computation of the groups from a finished trace: a dict-based union-find over
    every atom of every recorded union, then producers joined when they write a common class.
    ``[(producers in first-call order, number of channels)]``, groups in order of their first producer."""
    parent = {}

    def find(a):
        parent.setdefault(a, a)
        while parent[a] != a:
            a = parent[a]
        return a

    for a, b in tracer.sets._unions:
        for x, y in zip(a.tolist(), b.tolist()):
            if x >= 0 and y >= 0:
                rx, ry = find(x), find(y)
                parent[max(rx, ry)] = min(rx, ry)
    producers = [tracer.records[i] for i in tracer.order
                 if tracer.records[i].layer_type.produces and tracer.records[i].arrays.get('out') is not None
                 and tracer.records[i].arrays['out'].numel()]
    classes = [{find(a) for a in rec.arrays['out'].tolist()} for rec in producers]
    owner = list(range(len(producers)))          # producer -> first producer of its group

    def top(k):
        while owner[k] != k:
            k = owner[k]
        return k

    for i in range(len(producers)):
        for j in range(i):
            if classes[i] & classes[j]:
                ri, rj = top(i), top(j)
                owner[max(ri, rj)] = min(ri, rj)
    groups = {}
    for k, rec in enumerate(producers):
        names, chans = groups.setdefault(top(k), ([], set()))
        names.append(rec.name)
        chans.update(classes[k])
    return [(names, len(chans)) for _, (names, chans) in sorted(groups.items())]


def test_groups_equal_a_slow_reference_computed_from_the_trace(retinanet_graph):
    from mmfisher.core.groups import CouplingGraph
    from mmfisher.core.trace import ChannelTracer
    from mmfisher.openmmlab import example_forward
    model = copy.deepcopy(retinanet_graph[0]).eval()
    tracer = ChannelTracer(model, strict=True)
    tracer.run(example_forward(model, (1, 3, 128, 128)))
    graph = CouplingGraph(tracer, 0.0)
    assert [(g.producers, g.size) for g in graph.groups] == reference_groups(tracer)
    assert len(graph.groups) == 49


class PartlyShared(nn.Module):
    """``b``'s 16 channels are added to the concatenation of ``a``'s 8 and ``c``'s 8: ``b`` shares part of
    its channels with ``a`` and part with ``c``, which share none with each other: one group of 16."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(3, 16, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.c(x)], 1) + self.b(x))


def test_producers_sharing_part_of_their_channels_form_one_group():
    from mmfisher.core.groups import CouplingGraph
    from mmfisher.core.trace import ChannelTracer
    model = PartlyShared().eval()
    tracer = ChannelTracer(model, strict=True)
    tracer.run(lambda: model(torch.randn(1, 3, 8, 8)))
    graph = CouplingGraph(tracer, 0.0)
    assert reference_groups(tracer)[0] == (['a', 'c', 'b'], 16)
    assert [(g.producers, g.size) for g in graph.groups] == reference_groups(tracer)
    assert graph.groups[0].prunable and graph.groups[0].consumers == ['head']

def test_group_conv_prunes_whole_groups():
    from mmfisher.openmmlab import analyse_model, build_from_config
    model = build_from_config(config_path('mmpretrain', 'resnext/resnext50-32x4d_8xb32_in1k.py'))
    g = analyse_model(model, (1, 3, 64, 64))
    conv2 = model.backbone.layer1[0].conv2
    assert conv2.groups == 32 and conv2.in_channels == 128
    grp = g.groups_of('backbone.layer1.0.conv2')[0]
    # one channel of the group = one conv group: 4 outputs of conv1 and 4 of conv2
    assert grp.size == 32 and grp.positions_per_channel == 4
    assert grp.producers == ['backbone.layer1.0.conv1', 'backbone.layer1.0.conv2']
    chan = g.arrays[('backbone.layer1.0.conv2', 'out')].channel
    assert torch.equal(chan.view(32, 4), (grp.offset + torch.arange(32)).view(32, 1).expand(32, 4))


def test_depthwise_conv_couples_input_and_output():
    from mmfisher.openmmlab import analyse_model, build_from_config
    model = build_from_config(config_path('mmpretrain', 'mobilenet_v2/mobilenet-v2_8xb32_in1k.py'))
    g = analyse_model(model, (1, 3, 64, 64))
    grp = g.group('backbone.layer2.0.conv.0.conv')      # expand 1x1 -> depthwise 3x3 -> project
    assert grp.producers == ['backbone.layer2.0.conv.0.conv', 'backbone.layer2.0.conv.1.conv']
    assert grp.consumers == ['backbone.layer2.0.conv.1.conv', 'backbone.layer2.0.conv.2.conv']
    assert grp.prunable and grp.size == 96


def test_groupnorm_removes_whole_gn_groups():
    from mmfisher.openmmlab import analyse_model, build_from_config
    model = build_from_config(config_path('mmdet', 'fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py'))
    g = analyse_model(model, (1, 3, 128, 128))
    grp = g.group('bbox_head.cls_convs.0.conv')
    assert model.bbox_head.cls_convs[0].gn.num_groups == 32
    assert grp.size == 32 and grp.positions_per_channel == 8 and grp.norms == ['bbox_head.cls_convs.0.gn']


def test_roi_head_flattens_fpn_channels_into_fc_blocks():
    from mmfisher.openmmlab import analyse_model, build_from_config
    model = build_from_config(config_path('mmdet', 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'))
    g = analyse_model(model, (1, 3, 128, 128))
    fpn = g.group('neck.fpn_convs.0.conv')
    assert fpn.prunable
    assert fpn.consumers == ['rpn_head.rpn_conv', 'roi_head.bbox_head.shared_fcs.0']
    chan = g.arrays[('roi_head.bbox_head.shared_fcs.0', 'in')].channel
    assert chan.numel() == 256 * 7 * 7
    # channel c of the FPN owns inputs c*49 .. c*49+48 of the first FC layer
    assert torch.equal(chan.view(256, 49), (fpn.offset + torch.arange(256)).view(256, 1).expand(256, 49))


def test_csp_concat_keeps_branches_separate():
    from mmfisher.openmmlab import analyse_model, build_from_config
    model = build_from_config(config_path('mmdet', 'yolox/yolox_s_8xb8-300e_coco.py'))
    g = analyse_model(model, (1, 3, 128, 128))
    short = g.group('backbone.stage1.1.short_conv.conv')
    main = g.group('backbone.stage1.1.main_conv.conv')
    assert short is not main and short.prunable and main.prunable
    assert 'backbone.stage1.1.final_conv.conv' in short.consumers
    assert 'backbone.stage1.1.final_conv.conv' in main.consumers
    # final_conv's input is [main, short]: its positions map to both groups in order
    chan = g.arrays[('backbone.stage1.1.final_conv.conv', 'in')].channel
    assert torch.equal(chan, torch.cat([main.offset + torch.arange(32), short.offset + torch.arange(32)]))


# --------------------------------------------------------------------------- #
# small models: each operation's rule
# --------------------------------------------------------------------------- #
class Two(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.body = body
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(self.body(self.b(F.relu(self.a(x)))))


def _reasons(body, x=None):
    model = Two(body)
    g = analyse(model, x if x is not None else torch.randn(2, 3, 8, 8), strict=True)
    return g.group('b')


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize('fn,needle', [
    (lambda x: x.view(x.shape[0], 2, 4, *x.shape[2:]).transpose(1, 2).reshape(x.shape), 'reshape'),
    (lambda x: x.softmax(dim=1), 'softmax over channels'),
    (lambda x: x * x.mean(dim=1, keepdim=True), 'mean over channels'),
    (lambda x: x[:, :4].repeat(1, 2, 1, 1), 'slices channels'),
    (lambda x: torch.cat(torch.split(x, [3, 5], 1)[::-1], 1), 'fixed sizes'),
    # spatial self-attention: softmax(q^T k) mixes channels through the matmul
    (lambda x: (x.flatten(2) @ (x.flatten(2).transpose(1, 2) @ x.flatten(2)).softmax(-1)).view_as(x), 'matmul'),
    (lambda x: x + torch.arange(8.).view(1, 8, 1, 1), 'fixed-size tensor'),
])
def test_channel_mixing_makes_group_unprunable(fn, needle):
    grp = _reasons(Lambda(fn))
    assert not grp.prunable
    assert any(needle in r for r in grp.reasons), grp.reasons


def test_layernorm_over_channels_is_unprunable():
    body = Lambda(lambda x: x)
    model = Two(body)
    model.body = nn.Sequential(Lambda(lambda x: x.permute(0, 2, 3, 1)), nn.LayerNorm(8),
                               Lambda(lambda x: x.permute(0, 3, 1, 2)))
    g = analyse(model, torch.randn(1, 3, 8, 8))
    assert any('LayerNorm' in r for r in g.group('b').reasons)


class NormalisedHead(nn.Module):
    """CSRA's head (mmpretrain): a 1x1 conv whose scores are divided by the norm of each class's filter, a
    norm its parent takes over the conv's input channels. ``by_norm=False``: the parent reads only the
    weight's shape."""

    def __init__(self, by_norm=True):
        super().__init__()
        self.head = nn.Conv2d(8, 4, 1, bias=False)
        self.by_norm = by_norm

    def forward(self, x):
        if self.by_norm:
            return self.head(x) / self.head.weight.norm(dim=1, keepdim=True).transpose(0, 1)
        return self.head(x) + x.new_zeros(self.head.weight.shape[0]).view(1, -1, 1, 1)


def test_a_weight_read_outside_its_layer_leaves_that_layers_channels_unpruned():
    # why: masking an input channel (zeroing it) keeps its weights in the norm, removing it does not
    head, x = NormalisedHead(), torch.randn(1, 8, 4, 4)
    mask = torch.ones(1, 8, 1, 1)
    mask[:, 0] = 0
    small = copy.deepcopy(head)
    small.head.weight = nn.Parameter(head.head.weight[:, 1:].detach().clone())
    assert not torch.allclose(head(x * mask), small(x[:, 1:]), atol=1e-4)
    model = Two(nn.Identity())
    model.out = head
    grp = analyse(model, torch.randn(2, 3, 8, 8), strict=True).group('b')
    assert not grp.prunable
    assert any('out.head: its parameters are read outside its own forward (norm in out)' in r
               for r in grp.reasons), grp.reasons
    # reading the weight's shape only is no reason
    model.out = NormalisedHead(by_norm=False)
    assert analyse(model, torch.randn(2, 3, 8, 8), strict=True).group('b').prunable


def _own_forward_pack(name):
    """A deformable conv pack whose forward is its own (a scaled output): mmfisher's layer type for
    mmcv's deformable convs does not describe it, so it is traced op by op and meets the kernel."""
    import mmcv.ops

    class OwnForward(getattr(mmcv.ops, name)):
        def forward(self, x):
            return super().forward(x) * 2.0
    return OwnForward(8, 8, 3, padding=1)


def test_compiled_op_is_reported_not_mis_pruned():
    import mmfisher.openmmlab  # noqa: F401  (registers the layer type that must not match a subclass)
    grp = _reasons(_own_forward_pack('ModulatedDeformConv2dPack'))
    assert not grp.prunable
    assert any('compiled op' in r for r in grp.reasons), grp.reasons


@pytest.mark.parametrize('pack', ['DeformConv2dPack', 'ModulatedDeformConv2dPack'])
def test_a_deformable_conv_nothing_describes_keeps_its_input_and_offsets(pack):
    """mmcv calls its kernels through a module-level alias of ``Function.apply``: still seen. (The
    stock packs have a layer type: tests/test_deform_conv.py.)"""
    import mmfisher.openmmlab  # noqa: F401
    model = Two(nn.Sequential(_own_forward_pack(pack)))
    model.out = nn.Conv2d(8, 4, 1)
    g = analyse(model, torch.randn(1, 3, 8, 8))
    offsets = g.group('body.0.conv_offset')
    assert not offsets.prunable and 'compiled op' in offsets.reasons[0]
    assert not g.group('b').prunable           # the deformable conv's input


def test_channels_read_only_by_a_kernel_outside_torch_are_not_prunable():
    from mmcv.utils import ext_loader
    ext = ext_loader.load_ext('_ext', ['nms'])

    class Hidden(nn.Module):
        """Box channels go straight into mmcv's compiled NMS (no torch function, no autograd Function)."""

        def __init__(self):
            super().__init__()
            self.boxes = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            boxes = self.boxes(x).permute(0, 2, 3, 1).reshape(-1, 4).contiguous()
            keep = ext.nms(boxes, boxes.new_ones(boxes.shape[0]), iou_threshold=0.5, offset=0)
            return self.b(x) * float(keep.numel())

    g = analyse(Hidden(), torch.randn(1, 3, 8, 8))
    grp = g.group('boxes')
    assert not grp.prunable and grp.reasons == [
        'no traced layer reads these channels: an operation the analysis cannot see reads them']


def test_chunk_ties_the_kth_channel_of_every_part():
    class Gate(nn.Module):
        def forward(self, x):
            a, b = x.chunk(2, dim=1)
            return torch.cat([a * torch.sigmoid(b), a], 1)

    model = Two(nn.Sequential(Gate()))
    model.out = nn.Conv2d(8, 4, 1)
    g = analyse(model, torch.randn(1, 3, 8, 8))
    grp = g.group('b')
    assert grp.prunable and grp.size == 4 and grp.positions_per_channel == 2


def test_pointwise_chain_and_pooling_keep_channels():
    body = Lambda(lambda x: F.interpolate(F.max_pool2d(torch.sigmoid(x) * 2 + 1, 2), scale_factor=2.0))
    grp = _reasons(body)
    assert grp.prunable and grp.consumers == ['out']


def test_syncbn_is_per_channel():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SyncBatchNorm(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    g = analyse(model, torch.randn(1, 3, 8, 8))
    grp = g.group('0')
    assert grp.prunable and grp.norms == ['1'] and grp.consumers == ['3']


def test_analysis_restores_training_flags_and_leaves_weights_alone():
    model = Two(nn.BatchNorm2d(8))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analyse(model, torch.randn(2, 3, 8, 8))
    assert all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_without_its_handler_an_roi_extractor_makes_the_fpn_unprunable():
    """The safety net: mmcv RoIAlign is a compiled op; unhandled, it must taint what it reads."""
    from mmfisher.core import layers
    from mmfisher.openmmlab import analyse_model, build_from_config
    model = build_from_config(config_path('mmdet', 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'))
    saved = list(layers._TYPES)
    layers._TYPES[:] = [(cls, lt) for cls, lt in saved if lt.kind != 'roi_extractor']
    try:
        g = analyse_model(model, (1, 3, 96, 96))
    finally:
        layers._TYPES[:] = saved
    fpn = g.group('neck.fpn_convs.0.conv')
    assert not fpn.prunable
    assert any('compiled op' in r for r in fpn.reasons), fpn.reasons


def test_tood_offsets_read_only_by_a_deformable_sampling_are_not_prunable():
    """TOOD's head samples its box map with mmcv's deform_conv2d at offsets a conv predicts."""
    from mmengine.config import Config

    from helpers import config_path
    from mmfisher.openmmlab import build_from_config, example_forward
    model = build_from_config(Config.fromfile(config_path('mmdet', 'tood/tood_r50_fpn_1x_coco.py')))
    g = analyse(model, forward=example_forward(model, (1, 3, 128, 128)))
    grp = g.group('bbox_head.reg_offset_module.2')
    assert not grp.prunable and 'compiled op DeformConv2dFunction' in grp.reasons[0]


def test_a_layernorm_subclass_over_channels_first_is_traced_not_trusted():
    """mmpretrain's LayerNorm2d subclasses nn.LayerNorm but normalises [N, C, H, W] over C."""
    from mmfisher.openmmlab import register_all_modules
    register_all_modules()
    from mmpretrain.models.utils.norm import LayerNorm2d
    grp = _reasons(LayerNorm2d(8))
    assert not grp.prunable and any('layer_norm' in r for r in grp.reasons), grp.reasons


def test_a_failing_op_rule_is_an_error_under_strict_and_unprunable_otherwise(monkeypatch):
    from mmfisher.core import OP_RULES, AnalysisRuleError

    def broken(tr, op):
        raise IndexError('a bug in the rule')
    monkeypatch.setitem(OP_RULES, 'cat', broken)
    body = Lambda(lambda x: torch.cat([x, x], 1)[:, :8])
    with pytest.raises(AnalysisRuleError, match=r'the rule for cat failed \(IndexError: a bug in the rule\)'):
        analyse(Two(body), torch.randn(1, 3, 8, 8), strict=True)
    grp = analyse(Two(body), torch.randn(1, 3, 8, 8)).group('b')
    assert not grp.prunable and 'cat not understood (IndexError: a bug in the rule)' in grp.reasons[0]


class WSConv(nn.Conv2d):
    """Weight standardisation over each filter's inputs (mmcv's ConvWS, in plain torch)."""

    def forward(self, x):
        w = self.weight
        flat = w.flatten(1)
        w = (w - flat.mean(1).view(-1, 1, 1, 1)) / (flat.std(1).view(-1, 1, 1, 1) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SamePadConv(nn.Conv2d):
    """Pads to 'same' before a stock conv (mmcv's Conv2dAdaptivePadding): channel-wise, prunes as usual."""

    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1)))


class ScaledOutConv(nn.Conv2d):
    """Keeps a per-output buffer the stock shrink does not know about (like mmcv's ConvAWS gamma)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.register_buffer('gamma', torch.rand(self.out_channels, 1, 1))

    def forward(self, x):
        return super().forward(x) * self.gamma


@pytest.mark.parametrize('cls, in_ok, out_ok', [(WSConv, False, True), (SamePadConv, True, True),
                                                 (ScaledOutConv, True, False)])
def test_a_conv_with_its_own_forward_is_pruned_only_where_it_prunes_like_a_plain_one(cls, in_ok, out_ok):
    from helpers import masked_and_shrunk, max_rel_err, random_keep
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), cls(8, 12, 3, padding=0 if cls is SamePadConv
                                                                      else 1), nn.ReLU(), nn.Conv2d(12, 4, 1))
    x = torch.randn(2, 3, 10, 10)
    graph = analyse(model, x, strict=True)
    into, out_of = graph.group('0'), graph.group('2')
    assert into.prunable == in_ok and out_of.prunable == out_ok, (into.reasons, out_of.reasons)
    for grp, ok in ((into, in_ok), (out_of, out_ok)):
        if not ok:
            assert any(cls.__name__ in r and 'left unpruned' in r for r in grp.reasons), grp.reasons
    ref, out, _ = masked_and_shrunk(model, graph, random_keep(graph, 0.5), lambda m: m(x))
    assert max_rel_err(ref, out) < 1e-5


def _prune_the_middle_conv(model, x):
    """Analyse ``model`` (``model[0]`` writes the input of ``model[2]``), cut both of ``model[2]``'s groups to a
    random half, check that the masked and the shrunk model agree; returns the compact model and the kept
    input and output positions of ``model[2]`` ([in'], [out'] LongTensors)."""
    from helpers import masked_and_shrunk, max_rel_err, random_keep
    graph = analyse(model, x, strict=True)
    into, out_of = graph.group('0'), graph.group('2')
    assert into.prunable and out_of.prunable
    keep = random_keep(graph, 0.5)
    ref, out, compact = masked_and_shrunk(model, graph, keep, lambda m: m(x))
    assert max_rel_err(ref, out) < 1e-5
    kept_in = keep[into.offset:into.offset + into.size].nonzero().flatten()
    kept_out = keep[out_of.offset:out_of.offset + out_of.size].nonzero().flatten()
    return compact, kept_in, kept_out


def test_mmcv_weight_standardised_conv_prunes_on_both_sides_and_keeps_the_weight_it_convolves_with():
    """DetectoRS's ConvAWS2d standardises each filter over its inputs: its layer type shrinks to the
    effective weight, so the compact model computes what the masked one did on both sides."""
    import mmfisher.openmmlab  # noqa: F401  (registers the layer type)
    from mmcv.cnn.bricks.conv_ws import ConvAWS2d
    from mmfisher.core.layers import layer_type_for
    torch.manual_seed(0)
    aws = ConvAWS2d(8, 12, 3, padding=1)
    with torch.no_grad():   # trained values, not the built ones / ones loading calibrates to
        aws.weight_gamma.uniform_(0.5, 2.0)
        aws.weight_beta.normal_(0.0, 0.1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), aws, nn.ReLU(), nn.Conv2d(12, 4, 1))
    compact, kept_in, kept_out = _prune_the_middle_conv(model, torch.randn(2, 3, 10, 10))
    # the reference: the full layer's standardised weight, computed here, sliced to the kept channels
    w = aws.weight.detach().flatten(1)
    full = (aws.weight_gamma * ((aws.weight - w.mean(1).view(-1, 1, 1, 1)) / torch.sqrt(w.var(1) + 1e-5)
                                .view(-1, 1, 1, 1)) + aws.weight_beta).detach()
    small = compact[2]
    assert small.weight_gamma.shape[0] == kept_out.numel() < 12 and small.in_channels == kept_in.numel() < 8
    assert torch.allclose(small._get_weight(small.weight), full[kept_out][:, kept_in], atol=1e-5)
    # the L1 criterion scores the weight the layer convolves with, over the inputs it keeps
    l1 = layer_type_for(aws).filter_l1(aws, torch.ones(8, dtype=torch.bool))
    assert torch.allclose(l1.float(), full.abs().sum((1, 2, 3)), rtol=1e-5)


def test_mmcv_plain_weight_standardised_conv_becomes_a_calibrated_aws_conv_once_its_inputs_go():
    """gn+ws's ConvWS2d standardises each filter with no gain or shift, so no ConvWS2d computes the kept
    slice of its standardised weight: the shrunk layer is a ConvAWS2d holding that slice, checked here
    against the standardisation computed by hand; a layer that loses outputs only stays a ConvWS2d."""
    import mmfisher.openmmlab  # noqa: F401  (registers the layer type)
    from mmcv.cnn.bricks.conv_ws import ConvAWS2d, ConvWS2d
    from mmfisher.core.layers import layer_type_for
    torch.manual_seed(0)
    ws = ConvWS2d(8, 12, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), ws, nn.ReLU(), ConvWS2d(12, 4, 1))
    x = torch.randn(2, 3, 10, 10)
    compact, kept_in, kept_out = _prune_the_middle_conv(model, x)
    w = ws.weight.detach().flatten(1)      # by hand: mean and unbiased std over inputs and kernel, + eps
    full = (ws.weight.detach() - w.mean(1).view(-1, 1, 1, 1)) / (w.std(1).view(-1, 1, 1, 1) + 1e-5)
    small = compact[2]
    assert type(small) is ConvAWS2d and small.in_channels == kept_in.numel() < 8
    assert torch.allclose(small._get_weight(small.weight), full[kept_out][:, kept_in], atol=1e-5)
    assert type(compact[4]) is ConvAWS2d        # its inputs went too
    assert torch.allclose(layer_type_for(ws).filter_l1(ws, torch.ones(8, dtype=torch.bool)).float(),
                          full.abs().sum((1, 2, 3)), rtol=1e-5)
    # the compact model's state loads into a second one built the same way (the buffers are in it)
    again = copy.deepcopy(compact)
    again.load_state_dict(compact.state_dict())
    torch.testing.assert_close(again(x), compact(x))
    # outputs only: filters keep their own statistics, the layer stays what it was
    only_out = nn.Sequential(ConvWS2d(3, 6, 3, padding=1))
    PlainType = type(layer_type_for(only_out[0]))
    PlainType().shrink(only_out[0], {'in': torch.arange(3), 'out': torch.tensor([0, 2, 5])})
    assert type(only_out[0]) is ConvWS2d and only_out[0].out_channels == 3


class SplitInFour(nn.Module):
    """DyReLU's shape: coefficients ``[N, 4C, 1, 1]`` split at ``self.channels`` into four per-channel maps."""

    def __init__(self, channels=8):
        super().__init__()
        self.channels = channels
        self.coeffs = nn.Conv2d(channels, 4 * channels, 1)

    def forward(self, x):
        a1, b1, a2, b2 = torch.split(self.coeffs(x.mean((2, 3), keepdim=True)), self.channels, dim=1)
        return torch.max(x * a1 + b1, x * a2 + b2)


def test_a_split_at_a_registered_size_attribute_prunes_as_chunk_and_the_shrink_updates_the_attribute():
    from helpers import masked_and_shrunk, max_rel_err, random_keep
    from mmfisher.core import register_split_size
    from mmfisher.core.layers import _SPLIT_SIZES

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SplitInFour(8), nn.Conv2d(8, 2, 1))
    x = torch.randn(2, 3, 8, 8)
    unregistered = analyse(model(), x, strict=True).group('1.coeffs')
    assert not unregistered.prunable and any('split of channels at fixed sizes' in r for r in unregistered.reasons)
    register_split_size(SplitInFour, 'channels')
    try:
        net = model()
        graph = analyse(net, x, strict=True)
        grp = graph.group('0')
        assert grp.prunable and grp.size == 8 and graph.groups_of('1.coeffs') == [grp]   # 4 x 8 in one group
        keep = random_keep(graph, 0.5)
        ref, out, compact = masked_and_shrunk(net, graph, keep, lambda m: m(x))
        assert max_rel_err(ref, out) < 1e-5
        kept = int(keep[grp.channels].sum())
        assert compact[1].channels == kept < 8 and compact[1].coeffs.out_channels == 4 * kept
    finally:
        _SPLIT_SIZES.remove((SplitInFour, 'channels'))


def test_mmdet_dyrelu_is_registered():
    import mmfisher.openmmlab  # noqa: F401
    from mmdet.models.layers.se_layer import DyReLU
    from helpers import masked_and_shrunk, max_rel_err, random_keep
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), DyReLU(16), nn.Conv2d(16, 2, 1))
    x = torch.randn(2, 3, 8, 8)
    graph = analyse(net, x, strict=True)
    assert graph.group('0').prunable, graph.group('0').reasons
    keep = random_keep(graph, 0.5)
    ref, out, compact = masked_and_shrunk(net, graph, keep, lambda m: m(x))
    assert max_rel_err(ref, out) < 1e-5 and compact[1].channels == compact[0].out_channels < 16


def test_mmdet_dropblock_carries_its_input_channels():
    # GLIP's FPN_DropBlock runs DropBlock on every level in training: its mask, made with the input's
    # shape, is a fixed-size tensor to the op-by-op trace and would leave the FPN's laterals unprunable
    import mmfisher.openmmlab  # noqa: F401
    from mmdet.models.layers.dropblock import DropBlock
    from helpers import masked_and_shrunk, max_rel_err, random_keep
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), DropBlock(0.3, 3, warmup_iters=0), nn.Conv2d(16, 2, 1))
    x = torch.randn(2, 3, 8, 8)

    def training_forward():     # the mask is drawn in training only, as in a detector's loss
        net.train()
        try:
            return net(x)
        finally:
            net.eval()
    graph = analyse(net, x, also=[training_forward], strict=True)
    assert graph.group('0').prunable, graph.group('0').reasons
    keep = random_keep(graph, 0.5)
    ref, out, compact = masked_and_shrunk(net, graph, keep, lambda m: m(x))
    assert max_rel_err(ref, out) < 1e-5 and compact[0].out_channels < 16
    compact.train()
    assert compact(x).shape == (2, 2, 8, 8)      # in training it draws its mask over the kept channels


class TwoModes(nn.Module):
    """A branch only training runs (an auxiliary head, PointRend's point head)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)
        self.aux = nn.Conv2d(8, 4, 1)
        self.unused = nn.Linear(8, 8)

    def forward(self, x, loss=False):
        y = torch.relu(self.a(x))
        return (self.head(y), self.aux(y)) if loss else self.head(y)


def test_a_branch_only_the_loss_runs_is_traced_and_a_layer_nothing_runs_is_reported():
    model, x = TwoModes(), torch.randn(1, 3, 8, 8)
    alone = analyse(model, x, strict=True)
    assert alone.unseen == ['aux', 'unused'] and alone.summary()['unseen_layers'] == 2
    both = analyse(model, forward=lambda: model(x), also=[lambda: model(torch.randn(2, 3, 8, 8), loss=True)],
                   strict=True)
    assert both.unseen == ['unused']
    assert sorted(both.group('a').consumers) == ['aux', 'head']
    # costs follow the first forward: 'a' keeps its one call, 'aux' has the call only the loss made
    assert len(both.records['a'].calls) == 1 and len(both.records['aux'].calls) == 1
    assert 'unused' in both.report()


class SwitchConv(nn.Conv2d):
    """A conv with a layer of its own inside (mmcv's SAConv2d: a switch conv picks between two dilations)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.switch = nn.Conv2d(self.in_channels, 1, 1)

    def forward(self, x):
        s = torch.sigmoid(self.switch(x))
        return s * super().forward(x) + (1 - s) * F.conv2d(x, self.weight, self.bias, 1, 2, 2)


def test_a_conv_subclass_with_layers_inside_is_left_unpruned_on_both_sides():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), SwitchConv(8, 12, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(12, 4, 1))
    graph = analyse(model, torch.randn(1, 3, 10, 10), strict=True)
    for name in ('0', '2'):
        grp = graph.group(name)
        assert not grp.prunable and any('SwitchConv' in r and 'layers of its own inside' in r for r in grp.reasons)


def test_analyse_model_traces_the_loss_and_leaves_weights_buffers_and_random_state_alone():
    from mmfisher.openmmlab import analyse_model, build_from_config
    model = build_from_config(config_path('mmdet', 'retinanet/retinanet_r50_fpn_1x_coco.py'))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    graph = analyse_model(model, (1, 3, 128, 128), strict=True)
    assert graph.skipped == [] and graph.unseen == []
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(m.training == model.training or not m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)    # BN statistics the loss updated, too


def test_boxinst_loss_is_traced_with_the_pairwise_masks_its_data_preprocessor_makes():
    """BoxInst's preprocessor derives pairwise masks from colour similarity in training, as train_step
    runs it: the generated batch goes through it, so the analysis traces BoxInst's loss (its mask branch)."""
    from mmengine.logging import MessageHub

    from mmfisher.openmmlab import analyse_model, build_from_config
    from mmfisher.openmmlab.synthetic import loss_of, random_batch
    MessageHub.get_current_instance().update_info('iter', 0)     # what a runner tells the model
    model = build_from_config(config_path('mmdet', 'boxinst/boxinst_r50_fpn_ms-90k_coco.py'))
    inputs, samples = random_batch(model, 2, (96, 96))
    for s in samples:
        k = len(s.gt_instances.bboxes)
        assert tuple(s.gt_instances.pairwise_masks.shape[:2]) == (k, 8)   # 3x3 neighbours but the centre
        assert s.gt_instances.masks.masks.shape == (k, 96, 96)
    model.train()
    assert torch.isfinite(loss_of(model, inputs, samples))
    graph = analyse_model(model, (1, 3, 96, 96), strict=True)
    assert not graph.skipped and not graph.unseen


def test_crowddet_trains_on_the_generated_batch():
    """CrowdDet's multi-instance assigner gives every box its two best objects, and its sampler reads the
    ignored instances mmdet's PackDetInputs always packs: the generated batch has both."""
    from mmengine.config import Config

    from mmfisher.openmmlab import build_from_config
    from mmfisher.openmmlab.analysis import config_dicts
    from mmfisher.openmmlab.synthetic import loss_of, random_batch
    cfg = Config.fromfile(config_path('mmdet', 'crowddet/crowddet-rcnn_r50_fpn_8xb2-30e_crowdhuman.py'))
    for d in config_dicts(cfg.model):
        if d.get('use_torchvision'):
            d['use_torchvision'] = False      # torchvision does not load beside this CPU torch
    model = build_from_config(cfg)
    inputs, samples = random_batch(model, 4, (128, 128))
    assert all(len(s.gt_instances.bboxes) >= 2 for s in samples)
    assert all(s.ignored_instances.bboxes.shape == (0, 4) for s in samples)
    model.train()
    assert torch.isfinite(loss_of(model, inputs, samples))
