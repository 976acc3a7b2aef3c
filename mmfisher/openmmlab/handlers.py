"""Layer types for OpenMMLab parts whose forward the tracer cannot see.

mmdet's RoI extractors pool every FPN level with a compiled op (mmcv RoIAlign)
into a tensor they allocate with ``self.out_channels`` channels. Its layer type
tells the analysis that the extractor passes channels through (all levels share
the output's channels, so they are coupled) and updates ``out_channels`` when the
model is shrunk. mmcv's conv / linear wrappers are declared plain (their forward is
torch's), so the trace does not check them as it checks other subclasses with their
own forward. mmcv's ``ConvAWS2d`` (DetectoRS's weight-standardised conv) gets a layer type whose
shrink keeps the weight it convolves with; mmcv's ``ConvWS2d`` (no gain / shift) becomes a
``ConvAWS2d`` when it loses input channels, for the same reason. mmcv's deformable convs (DCN, DCNv2
and their packs) prune as convs; the offsets and masks they read keep their channels. mmdet's
``DyReLU`` splits its coefficients at ``self.channels``: registered as a split size the shrink
updates. Registered when :mod:`mmfisher.openmmlab` is imported.
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from ..core.atoms import Label, flat_tensors
from ..core.layers import (Call, Conv, LayerType, ModuleRecord, index_attr, register_layer_type, register_plain_forward,
                           register_split_size)
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
            keep_effective_weight(m, effective, keep)


def keep_effective_weight(m, effective: torch.Tensor, keep: Dict[str, torch.Tensor]) -> None:
    """Make the shrunk ``ConvAWS2d`` ``m`` convolve with ``V = effective[keep_out][:, keep_in]``.

    ``effective``: ``[out, in, kh, kw]``, the weight the unshrunk layer convolved with. ``m.weight``
    becomes ``V``, ``weight_gamma`` / ``weight_beta`` (``[out', 1, 1, 1]``) its per-filter std and mean,
    so ``gamma * (V - mean(V)) / std(V) + beta == V``."""
    v = effective.index_select(0, keep['out'].to(effective.device))
    v = v.index_select(1, keep['in'].to(v.device))
    flat = v.flatten(1)
    with torch.no_grad():
        m.weight.copy_(v)
        m.weight_beta.copy_(flat.mean(1).view(-1, 1, 1, 1))
        m.weight_gamma.copy_(torch.sqrt(flat.var(1) + 1e-5).view(-1, 1, 1, 1))


class PlainWeightStandardisedConvType(Conv):
    """mmcv's ``ConvWS2d`` (the ``gn+ws`` detectors): convolves with ``W_eff = (W - mean(W)) / (std(W) + eps)``,
    mean and unbiased std per output filter over its inputs and kernel, with no gain or shift.

    Output channels prune as in a plain conv. Once input channels go, no ``ConvWS2d`` computes
    ``V = W_eff[keep_out][:, keep_in]``: its forward would re-centre and rescale ``V`` (whose mean over the
    kept inputs is not 0). The shrunk layer therefore becomes a ``ConvAWS2d`` (the same standardisation
    followed by a per-filter gain and shift, fixed buffers) holding ``V`` and calibrated to it, as
    :class:`WeightStandardisedConvType` does: it computes what the masked layer did, and still
    standardises its weight while it is fine-tuned. A checkpoint of the compact model holds the
    ``weight_gamma`` / ``weight_beta`` buffers; building the compact model from the spec converts the same
    layers, so it loads. The L1 criterion scores ``W_eff``."""

    kind = 'conv'

    def weight_of(self, m):
        w = m.weight
        flat = w.flatten(1)
        shape = (-1,) + (1,) * (w.dim() - 1)
        return (w - flat.mean(1).view(shape)) / (flat.std(1).view(shape) + m.eps)

    def shrink(self, m, keep):
        inputs_go = m.groups == 1 and keep['in'].numel() < m.in_channels
        if not inputs_go:
            super().shrink(m, keep)
            return
        from mmcv.cnn.bricks.conv_ws import ConvAWS2d
        effective = self.weight_of(m).detach()
        super().shrink(m, keep)
        m.__class__ = ConvAWS2d        # the same parameters and conv attributes, plus two buffers
        del m.eps
        like = m.weight.new_empty(m.out_channels, 1, 1, 1)
        m.register_buffer('weight_gamma', torch.ones_like(like))
        m.register_buffer('weight_beta', torch.zeros_like(like))
        keep_effective_weight(m, effective, keep)


class OffsetConv(Conv):
    """The ``conv_offset`` inside mmcv's ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack``: a plain conv
    reading the pack's input, recorded by :class:`DeformConvType`. It costs and shrinks as a conv; it is
    not a consumer of its own (``input_dim`` None): its input is the pack's, masked and observed once at
    the pack's input, so the Fisher of a channel counts this read once."""

    input_dim = None


class DeformConvType(Conv):
    """mmcv's deformable convs ``DeformConv2d`` / ``ModulatedDeformConv2d`` (DCN / DCNv2), called as
    ``m(x, offset[, mask])``, and their packs, called as ``m(x)``, which compute offset (and mask) with a
    plain ``m.conv_offset`` on ``x``.

    The compiled kernel samples ``x`` (``[N, in, H, W]``) at offset positions, then applies ``m.weight``
    (``[out, in / groups, kh, kw]``) as a conv does: input channel ``i`` meets only ``weight[:, i]``, output
    channel ``o`` is ``weight[o]``. So channels prune as in a conv (a group conv loses whole groups). A
    zeroed input channel contributes nothing to the output or to ``conv_offset``, so the shrunk layer and
    ``conv_offset`` without that column compute what the masked ones did. What cannot prune:

    * the offset and mask inputs: the kernel reads a fixed ``2 * deform_groups * kh * kw`` offset channels
      (and as many / 2 mask channels) from whatever produced them, so their channels are tainted;
    * the input channels of a layer with ``deform_groups > 1``: each block of ``in / deform_groups``
      channels has its own offsets, and removing channels would move others to another block;
    * subclasses with a forward of their own (checked by the type's :meth:`matches`): traced op by op,
      where the compiled op taints what it reads.

    The cost counts the conv's multiply-adds (and ``conv_offset``'s as a conv of its own), not the
    bilinear sampling."""

    def __init__(self, forwards) -> None:
        self.forwards = set(forwards)

    def matches(self, module):
        return type(module).forward in self.forwards

    def trace(self, tracer, rec, args, out):
        m, x = rec.module, args[0]
        ain, aout, first = self.channel_atoms(tracer, rec, x)
        if first and m.deform_groups > 1:
            tracer.sets.taint(ain, f'{rec.name} ({type(m).__name__}): deformable conv with '
                                   f'{m.deform_groups} deform groups (offsets per block of input channels); '
                                   f'its input channels are left unpruned')
        for role, t in zip(('offset', 'mask'), args[1:3]):
            tracer.taint(tracer.label(t), f'{rec.name} ({type(m).__name__}): read as the deformable '
                                          f'{role} (a fixed channel count)')
        rows = out.numel() // out.shape[1]
        offset_conv = getattr(m, 'conv_offset', None)
        if isinstance(offset_conv, torch.nn.Conv2d) and len(args) == 1:
            off = tracer.record_for(offset_conv, OffsetConv())
            tracer.input_atoms(off, 'in', x, 1, offset_conv.in_channels)
            oout = tracer.atoms_of(off, 'out', offset_conv.out_channels)
            if first:
                tracer.sets.taint(oout, f'{off.name}: the offsets of {rec.name} (a fixed channel count)')
            off.calls.append(Call(rows, tuple(x.shape), (out.shape[0], offset_conv.out_channels) +
                                  tuple(out.shape[2:])))
        rec.calls.append(Call(rows, tuple(x.shape), tuple(out.shape)))
        tracer.set_label(out, Label(1, aout))


class ElementwiseNoiseType(LayerType):
    """A module that multiplies its input by a random mask of the input's shape, drawn for every channel
    alike and independently (mmdet's ``DropBlock``: square blocks dropped within each channel; GLIP's
    ``FPN_DropBlock`` neck runs it on every level in training; identity in eval). Its mask is made with
    the input's shape (``torch.full`` then ``bernoulli``), which the op-by-op trace sees as a fixed-size
    tensor multiplying the channels: it would leave them unprunable. Like dropout, it treats every channel
    alike, so its output carries its input's channels. In training, the compact model's rescaling
    (``numel / sum`` of the mask) is taken over the kept channels only: the same factor in expectation,
    drawn from fewer elements."""

    kind = 'noise'
    records = False

    def trace(self, tracer, rec, args, out):
        lab = tracer.label(args[0])
        if lab is not None and isinstance(out, torch.Tensor) and out.shape == args[0].shape:
            tracer.set_label(out, lab)


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
        from mmcv.cnn.bricks.conv_ws import ConvAWS2d, ConvWS2d
    except ImportError:
        ConvAWS2d = ConvWS2d = None
    if ConvAWS2d is not None:
        register_layer_type(ConvAWS2d, WeightStandardisedConvType())
        register_layer_type(ConvWS2d, PlainWeightStandardisedConvType())
    try:
        from mmcv.ops import DeformConv2d, DeformConv2dPack, ModulatedDeformConv2d, ModulatedDeformConv2dPack
    except ImportError:
        DeformConv2d = None
    if DeformConv2d is not None:
        deform = DeformConvType(c.forward for c in (DeformConv2d, DeformConv2dPack, ModulatedDeformConv2d,
                                                    ModulatedDeformConv2dPack))
        register_layer_type(DeformConv2d, deform)
        register_layer_type(ModulatedDeformConv2d, deform)
    try:
        from mmdet.models.roi_heads.roi_extractors import BaseRoIExtractor
    except ImportError:  # mmdet not installed: nothing to register
        return
    register_layer_type(BaseRoIExtractor, RoIExtractorType())
    from mmdet.models.layers.dropblock import DropBlock
    register_layer_type(DropBlock, ElementwiseNoiseType())
    from mmdet.models.layers.se_layer import DyReLU
    # DyHead's task attention: split(coeffs, self.channels) into a1, b1, a2, b2, each per channel of x
    register_split_size(DyReLU, 'channels')
