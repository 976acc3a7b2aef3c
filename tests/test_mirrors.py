"""An averaged copy (EMA / momentum encoder) loses exactly the channels of the part it copies.

The copy is updated from its source by name (``update_parameters``), outside any forward the trace
sees: pruned on its own, or left whole while its source shrinks, the next update fails. These tests
use mmengine's ExponentialMovingAverage (what MoCo, BYOL and DenseCL use) and torch's AveragedModel.
"""
import copy

import pytest
import torch
import torch.nn as nn

from helpers import max_rel_err, random_keep
from mmfisher.core import analyse, shrink
from mmfisher.core.mirrors import find_mirrors


def _encoder():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 8))


class Momentum(nn.Module):
    """MoCo's shape: a query encoder, and a key encoder averaged from it (run without gradients)."""

    def __init__(self, averaged='mmengine', run_copy=True):
        super().__init__()
        self.backbone = _encoder()
        if averaged == 'mmengine':
            from mmengine.model import ExponentialMovingAverage
            self.encoder_k = ExponentialMovingAverage(nn.Sequential(self.backbone), momentum=0.01)
        else:
            self.encoder_k = torch.optim.swa_utils.AveragedModel(self.backbone)
        self.run_copy = run_copy

    def forward(self, x):
        q = self.backbone(x)
        if not self.run_copy:
            return q
        with torch.no_grad():
            k = self.encoder_k(x)
        return q, k


def _update(model):
    if hasattr(model.encoder_k, 'avg_parameters'):
        model.encoder_k.update_parameters(nn.Sequential(model.backbone))
    else:
        model.encoder_k.update_parameters(model.backbone)


@pytest.mark.parametrize('averaged', ['mmengine', 'torch'])
@pytest.mark.parametrize('run_copy', [True, False], ids=['copy-runs', 'copy-unseen'])
def test_momentum_encoder_loses_the_channels_of_its_source(averaged, run_copy):
    torch.manual_seed(0)
    model = Momentum(averaged, run_copy).eval()
    x = torch.randn(2, 3, 12, 12)
    graph = analyse(model, x, strict=True)
    prefix = 'encoder_k.module.0.' if averaged == 'mmengine' else 'encoder_k.module.'
    assert graph.mirrors == [(prefix[:-1], 'backbone')]
    assert graph.unseen == []
    # one group per conv of the source, holding the copy's conv too: the spec a user would write
    g0 = graph.groups_of('backbone.0')[0]
    assert g0.prunable and g0.producers == ['backbone.0', prefix + '0'] and prefix + '1' in g0.norms
    assert graph.groups_of(prefix + '3')[0] is graph.groups_of('backbone.3')[0]

    keep = random_keep(graph, 0.5, seed=3)
    compact = shrink(copy.deepcopy(model), graph, keep)
    # the copy has its source's shapes, parameter by parameter
    src = dict(compact.backbone.named_parameters())
    mod = compact.encoder_k.module
    mir = dict((mod[0] if averaged == 'mmengine' else mod).named_parameters())
    assert {k: v.shape for k, v in mir.items()} == {k: v.shape for k, v in src.items()}
    # the update the training loop runs works on the compact model: its first update copies the source
    for p in compact.backbone.parameters():
        p.data.add_(1.0)
    _update(compact)
    for k, v in src.items():
        assert torch.equal(mir[k], v), k
    # a mirror's values are its source's kept positions: the copy starts equal to the source, so after
    # the shrink copy and source are equal where the original copy and source were
    ref = shrink(copy.deepcopy(model), graph, keep)
    r_src = dict(ref.backbone.named_parameters())
    r_mir = dict((ref.encoder_k.module[0] if averaged == 'mmengine' else ref.encoder_k.module).named_parameters())
    for k in r_src:
        assert torch.equal(r_src[k], r_mir[k]), k


def test_a_copy_of_one_of_two_identical_modules_prunes_neither():
    from mmengine.model import ExponentialMovingAverage

    class Twins(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _encoder(), _encoder()
            self.ema = ExponentialMovingAverage(self.a)

        def forward(self, x):
            return self.a(x) + self.b(x), self.ema(x)

    model = Twins().eval()
    pairs, ambiguous = find_mirrors(model)
    assert pairs == [] and ambiguous == [('ema.module', ['a', 'b'])]
    graph = analyse(model, torch.randn(1, 3, 8, 8), strict=True)
    for name in ('a.0', 'b.0', 'ema.module.0', 'a.3', 'b.3'):
        g = graph.groups_of(name)[0]
        assert not g.prunable and any('averaged copy of one of a, b' in r for r in g.reasons), (name, g.reasons)


def test_masked_and_compact_momentum_model_agree():
    """With the copy's channels masked like its source's, the masked model computes what the compact one does."""
    from mmfisher.core import ConsumerInputs
    torch.manual_seed(1)
    model = Momentum('mmengine').eval()
    for p in model.encoder_k.module.parameters():      # a copy that has drifted from its source
        p.data.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, 12, 12)
    graph = analyse(model, x, strict=True)
    keep = random_keep(graph, 0.5, seed=5)
    masks = ConsumerInputs(model, graph)
    masks.set_keep(keep)
    masks.attach()
    with torch.no_grad():
        ref = model(x)
    masks.detach()
    compact = shrink(copy.deepcopy(model), graph, keep).eval()
    with torch.no_grad():
        out = compact(x)
    assert max_rel_err(ref, out) < 1e-5


def test_cae_teacher_follows_the_backbone():
    """CAE's teacher is a second backbone updated by a momentum loop over both parameter lists (no
    averaged-model wrapper): the adapter names it (KNOWN_MIRRORS), and the compact model's update runs."""
    from helpers import config_path
    from mmfisher.openmmlab import analyse_model, build_from_config
    model = build_from_config(config_path('mmpretrain', 'cae/cae_beit-base-p16_8xb256-amp-coslr-300e_in1k.py'))
    model.init_weights()                       # the teacher starts as a copy of the backbone
    graph = analyse_model(model, (1, 3, 224, 224), strict=True)
    assert ('teacher', 'backbone') in graph.mirrors
    g = graph.groups_of('backbone.layers.0.ffn.layers.0.0')[0]
    assert g.prunable and 'teacher.layers.0.ffn.layers.0.0' in g.producers
    compact = shrink(copy.deepcopy(model), graph, random_keep(graph, 0.5, seed=2))
    compact.momentum_update()
    for (n, a), (m, b) in zip(compact.backbone.named_parameters(), compact.teacher.named_parameters()):
        assert n == m and a.shape == b.shape, (n, a.shape, b.shape)
