"""Layer types for OpenMMLab parts whose forward the tracer cannot see.

mmdet's RoI extractors pool every FPN level with a compiled op (mmcv RoIAlign)
into a tensor they allocate with ``self.out_channels`` channels. Its layer type
tells the analysis that the extractor passes channels through (all levels share
the output's channels, so they are coupled) and updates ``out_channels`` when the
model is shrunk. mmcv's conv / linear wrappers are declared plain (their forward is
torch's), so the trace does not check them as it checks other subclasses with their
own forward. Registered when :mod:`mmfisher.openmmlab` is imported.
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from ..core.atoms import Label, flat_tensors
from ..core.layers import Call, LayerType, ModuleRecord, register_layer_type, register_plain_forward
from ..core.trace import ChannelTracer


class RoIExtractorType(LayerType):
    """``roi_feats[r, c] = pool(feats[level(r)][batch(r), c])``: channel-wise over all levels."""

    kind = 'roi_extractor'

    def trace(self, tracer: ChannelTracer, rec: ModuleRecord, args: tuple, output: Any) -> None:
        feats = flat_tensors(args[0], [])
        n = rec.module.out_channels
        atoms = tracer.atoms_of(rec, 'feat', n)
        for f in feats:
            tracer.input_atoms(rec, 'feat', f, 1, n)
        inner = [name for name, p in rec.module.named_parameters()]
        if inner:
            # GRoIE's pre / post modules: layers inside the extractor, which this type does not trace
            tracer.sets.taint(atoms, f'{rec.name} ({type(rec.module).__name__}): RoI extractor with layers of its '
                                     f'own ({inner[0].rsplit(".", 1)[0]}): not traced, its input channels are '
                                     f'left unpruned')
            return
        out = output if isinstance(output, torch.Tensor) else None
        if out is not None and out.dim() >= 2 and out.shape[1] == n:
            rec.calls.append(Call(out.numel() // out.shape[1], tuple(out.shape), tuple(out.shape)))
            tracer.set_label(out, Label(1, atoms))

    def shrink(self, module, keep: Dict[str, torch.Tensor]) -> None:
        module.out_channels = int(keep['feat'].numel())

    def sample_rows(self, module, args: tuple, output: Any):
        """mmdet's rois are ``[R, 5]`` with the image index in column 0."""
        feats = flat_tensors(args[0], [])
        rois = args[1] if len(args) > 1 else None
        if not feats or not isinstance(rois, torch.Tensor) or rois.dim() != 2 or rois.shape[1] != 5:
            return None
        return rois[:, 0].detach().long(), int(feats[0].shape[0])


def register_openmmlab_handlers() -> None:
    try:
        from mmcv.cnn.bricks import wrappers
    except ImportError:
        wrappers = None
    if wrappers is not None:
        # these only add an empty-batch path for old torch: on this torch they are the stock layers
        for name in ('Conv2d', 'Conv3d', 'ConvTranspose2d', 'ConvTranspose3d', 'Linear'):
            if hasattr(wrappers, name):
                register_plain_forward(getattr(wrappers, name))
    try:
        from mmdet.models.roi_heads.roi_extractors import BaseRoIExtractor
    except ImportError:  # mmdet not installed: nothing to register
        return
    register_layer_type(BaseRoIExtractor, RoIExtractorType())
