"""The uniformly narrower baseline: every prunable width scaled by one factor, at the FLOPs asked for."""
import copy
import importlib.util
import json
import os.path as osp

import pytest
import torch

from helpers import DEMO
from mmfisher.core import analyse, shrink
from mmfisher.core.cost import CostModel
from mmfisher.core.uniform import uniform_keep, uniform_keep_for
from test_pruner import ResNetish

ROOT = osp.abspath(osp.join(osp.dirname(__file__), '..'))


def test_every_prunable_group_keeps_the_same_fraction_and_the_rest_keeps_everything():
    model = ResNetish()
    graph = analyse(model, torch.randn(1, 3, 16, 16))
    keep = uniform_keep(graph, 0.5)
    for g in graph.groups:
        k = keep[g.offset:g.offset + g.size]
        want = max(1, round(0.5 * g.size)) if g.prunable else g.size
        assert int(k.sum()) == want and bool(k[:want].all()), g.name


def test_the_uniform_width_meets_a_flops_target_measured_on_the_compact_model():
    from mmengine.config import Config

    from mmfisher.openmmlab import build_from_config, example_forward
    model = build_from_config(Config.fromfile(DEMO))
    fwd = example_forward(model, (1, 3, 160, 160))
    graph = analyse(model, forward=fwd)
    cost = CostModel(model, graph)
    width, keep, got = uniform_keep_for(graph, cost, 'flops', 0.5)
    assert abs(got - 0.5) <= 0.01
    # independent of the keep vector: the compact model analysed afresh, its own FLOPs over the original's
    compact = shrink(copy.deepcopy(model), graph, keep)
    cgraph = analyse(compact, forward=example_forward(compact, (1, 3, 160, 160)))
    full = cost.totals(torch.ones(graph.num_channels, dtype=torch.bool))['flops']
    small = CostModel(compact, cgraph).totals(torch.ones(cgraph.num_channels, dtype=torch.bool))['flops']
    assert small / full == pytest.approx(got, rel=1e-6)
    assert compact.backbone.conv1.out_channels == round(width * 16)
    with pytest.raises(ValueError, match='no uniform width gives flops 0.001'):
        uniform_keep_for(graph, cost, 'flops', 0.001)


def test_the_tool_writes_a_spec_that_builds_and_never_overwrites(tmp_path):
    spec = importlib.util.spec_from_file_location('uniform_spec', osp.join(ROOT, 'tools/analysis_tools/uniform_spec.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / 'uniform.json'
    width, ratios = tool.main([DEMO, '--target', 'flops', '0.5', '--shape', '160', '--out', str(out)])
    assert abs(ratios['flops'] - 0.5) <= 0.01
    from mmengine.config import Config

    from mmfisher.openmmlab import build_pruned_model
    model = build_pruned_model(Config.fromfile(DEMO).model, str(out), input_shape=(160, 160))
    assert model.neck.fpn_convs[0].conv.out_channels == round(width * 64)
    assert json.loads(out.read_text())['format'] == 'mmfisher.channel_spec/1'
    with pytest.raises(SystemExit, match='exists'):
        tool.main([DEMO, '--width', '0.5', '--out', str(out)])
