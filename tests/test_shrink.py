"""The compact model computes exactly what the masked model computes, on every covered architecture."""
import copy
import io

import pytest
import torch

from helpers import config_path, masked_and_shrunk, max_rel_err, random_keep, randomise_norms
from mmfisher.core import analyse, make_spec, shrink
from mmfisher.core.shrink import kept_positions

MODELS = [
    ('mmdet', 'retinanet/retinanet_r50_fpn_1x_coco.py'),
    ('mmdet', 'fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py'),
    ('mmdet', 'atss/atss_r50_fpn_1x_coco.py'),
    ('mmdet', 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'),
    ('mmdet', 'retinanet/retinanet_x101-32x4d_fpn_1x_coco.py'),
    ('mmdet', 'regnet/retinanet_regnetx-3.2GF_fpn_1x_coco.py'),
    ('mmdet', 'yolox/yolox_s_8xb8-300e_coco.py'),
    ('mmdet', 'rtmdet/rtmdet_s_8xb32-300e_coco.py'),
    ('mmpretrain', 'resnet/resnet50_8xb32_in1k.py'),
    ('mmpretrain', 'resnext/resnext50-32x4d_8xb32_in1k.py'),
    ('mmpretrain', 'mobilenet_v2/mobilenet-v2_8xb32_in1k.py'),
    ('mmpretrain', 'regnet/regnetx-400mf_8xb128_in1k.py'),
]


def _runner(model, shape):
    """The analysis forward of ``model`` and a function running any model (masked, compact) on its input."""
    from mmfisher.openmmlab.analysis import example_samples, tensor_forward
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    samples = example_samples(model, shape)
    return (lambda: tensor_forward(model, x, samples)), (lambda m: tensor_forward(m, x, samples))


@pytest.mark.parametrize('package,config', MODELS, ids=[c.split('/')[-1][:-3] for _, c in MODELS])
def test_compact_equals_masked(package, config):
    from mmfisher.openmmlab import build_from_config
    model = build_from_config(config_path(package, config))
    randomise_norms(model)
    model.eval()
    shape = (1, 3, 128, 128) if package == 'mmdet' else (2, 3, 64, 64)
    fwd, run = _runner(model, shape)
    graph = analyse(model, forward=fwd, strict=True)
    assert graph.summary()['prunable_groups'] >= 0.8 * graph.summary()['groups']
    keep = random_keep(graph, 0.5, seed=1)
    ref, out, compact = masked_and_shrunk(model, graph, keep, run)
    assert max_rel_err(ref, out) < 1e-4
    # the masks really removed something: unmasked outputs differ
    with torch.no_grad():
        plain = run(model)
    from mmfisher.core.atoms import flat_tensors
    plain = flat_tensors(plain, [], -8)
    assert any(a.shape != b.shape or float((a - b).abs().max()) > 1e-3 * float(a.abs().max())
               for a, b in zip(ref, plain))
    # fewer parameters, and every layer of the compact model has exactly the kept positions
    n_before = sum(p.numel() for p in model.parameters())
    n_after = sum(p.numel() for p in compact.parameters())
    assert n_after < 0.6 * n_before
    g2 = analyse(compact, forward=_runner(compact, shape)[0], strict=True)
    for (name, role), arr in graph.arrays.items():
        assert g2.arrays[(name, role)].channel.numel() == kept_positions(graph, keep, name, role).numel(), name


def test_compact_model_prints_saves_and_reloads():
    from mmfisher.openmmlab import build_from_config
    model = build_from_config(config_path('mmdet', 'fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py'))
    fwd, run = _runner(model, (1, 3, 96, 96))
    graph = analyse(model, forward=fwd)
    keep = random_keep(graph, 0.4, seed=3)
    compact = shrink(copy.deepcopy(model), graph, keep)
    text = repr(compact)
    gn = compact.bbox_head.cls_convs[0].gn
    assert f'GroupNorm({gn.num_groups}, {gn.num_channels}' in text and gn.num_groups < 32
    buf = io.BytesIO()
    torch.save(compact.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    # a second copy shrunk from the spec (as a builder would) loads the weights strictly
    spec = make_spec(graph, keep)
    other = shrink(copy.deepcopy(model), graph, spec)
    other.load_state_dict(state, strict=True)
    compact.eval()
    other.eval()
    with torch.no_grad():
        from mmfisher.core.atoms import flat_tensors
        assert max_rel_err(flat_tensors(run(compact), [], -8), flat_tensors(run(other), [], -8)) == 0
