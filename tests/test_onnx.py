"""The compact detector exports to ONNX and onnxruntime computes what PyTorch computes."""
import copy
import os.path as osp

import torch

from helpers import random_keep, randomise_norms

ROOT = osp.abspath(osp.join(osp.dirname(__file__), '..'))


def test_pruned_detector_exports_to_onnx(tmp_path):
    from mmfisher.core import analyse, shrink
    from mmfisher.openmmlab import build_from_config, example_forward
    from mmfisher.openmmlab.onnx_export import TensorModeNetwork, export_onnx, onnx_session
    model = build_from_config(osp.join(ROOT, 'configs', 'demo', 'retinanet_r18_shapes.py'))
    randomise_norms(model)
    model.eval()
    shape = (1, 3, 160, 160)
    graph = analyse(model, forward=example_forward(model, shape))
    compact = shrink(copy.deepcopy(model), graph, random_keep(graph, 0.5, seed=2))
    path = str(tmp_path / 'pruned.onnx')
    names = export_onnx(compact, path, shape)
    assert len(names) == 10   # 5 levels x (cls, box)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = TensorModeNetwork(compact, shape)(x)
    outs = onnx_session(path).run(None, {'input': x.numpy()})
    assert [o.shape for o in outs] == [tuple(r.shape) for r in ref]
    for o, r in zip(outs, ref):
        assert float((torch.from_numpy(o) - r).abs().max()) <= 1e-4 * float(r.abs().max()) + 1e-5
