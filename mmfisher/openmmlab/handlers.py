"""Layer types for OpenMMLab parts whose forward the tracer cannot see.

mmdet's RoI extractors pool every FPN level with a compiled op (mmcv RoIAlign)
into a tensor they allocate with ``self.out_channels`` channels. Its layer type
tells the analysis that the extractor passes channels through (all levels share
the output's channels, so they are coupled) and updates ``out_channels`` when the
model is shrunk. mmcv's conv / linear wrappers are declared plain (their forward is
torch's), so the trace does not check them as it checks other subclasses with their
own forward. mmcv's ``ConvAWS2d`` (DetectoRS's weight-standardised conv) gets a layer type whose
shrink keeps the weight it convolves with. Registered when :mod:`mmfisher.openmmlab` is imported.
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from ..core.atoms import Label, flat_tensors
from ..core.layers import Call, Conv, LayerType, ModuleRecord, index_attr, register_layer_type, register_plain_forward
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


class WeightStandardisedConvType(Conv):
    """mmcv's ``ConvAWS2d``: convolves with ``W_eff = gamma * (W - mean(W)) / std(W) + beta``, the mean and
    std taken per output filter over its inputs and kernel (``[out, in / g, kh, kw]`` -> ``[out]``),
    ``gamma`` / ``beta`` ``[out, 1, 1, 1]`` buffers.

    Output channels prune as in a plain conv (each filter's statistics are its own): ``gamma`` and
    ``beta`` lose the same rows. Removing input channels changes every filter's statistics, so the
    shrunk layer would not compute what the masked one did (which convolves zeroed inputs with the
    full ``W_eff``). The shrink therefore keeps ``V = W_eff[keep_out][:, keep_in]`` itself: weight ``V``,
    ``gamma = std(V)``, ``beta = mean(V)``, so that ``W_eff`` of the shrunk layer is ``V`` (the calibration
    mmcv's loading does for a checkpoint without ``gamma`` / ``beta``). The L1 criterion scores ``W_eff``.
    Subclasses with their own forward (SAC's ``SAConv2d``) are still checked by the trace and left
    unpruned when they hold layers of their own."""

    kind = 'conv'

    def weight_of(self, m):
        return m._get_weight(m.weight)

    def shrink(self, m, keep):
        inputs_go = m.groups == 1 and keep['in'].numel() < m.in_channels
        effective = self.weight_of(m).detach() if inputs_go else None
        super().shrink(m, keep)
        index_attr(m, 'weight_gamma', 0, keep['out'])
        index_attr(m, 'weight_beta', 0, keep['out'])
        if inputs_go:
            v = effective.index_select(0, keep['out'].to(effective.device))
            v = v.index_select(1, keep['in'].to(v.device))
            flat = v.flatten(1)
            with torch.no_grad():
                m.weight.copy_(v)
                m.weight_beta.copy_(flat.mean(1).view(-1, 1, 1, 1))
                m.weight_gamma.copy_(torch.sqrt(flat.var(1) + 1e-5).view(-1, 1, 1, 1))


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
        from mmcv.cnn.bricks.conv_ws import ConvAWS2d
    except ImportError:
        ConvAWS2d = None
    if ConvAWS2d is not None:
        register_layer_type(ConvAWS2d, WeightStandardisedConvType())
    try:
        from mmdet.models.roi_heads.roi_extractors import BaseRoIExtractor
    except ImportError:  # mmdet not installed: nothing to register
        return
    register_layer_type(BaseRoIExtractor, RoIExtractorType())
