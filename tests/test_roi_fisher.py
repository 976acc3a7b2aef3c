"""Faster R-CNN: the Fisher of a channel sums its RoI-level and image-level uses per image before the square.

The paper (Sec. 3.2) treats a channel's mask as shared by every use of the channel in an image: the FPN
channel read by the RPN head and, through RoIAlign, by the RoI head's first FC layer on each of the image's
RoIs. The reference below is the literal definition: one mask vector per image, applied at every consumer
input (an RoI row takes the mask of its image, read from the rois handed to the extractor), the gradient of
the batch loss with respect to those masks, squared and summed over images.
"""
import torch
from mmdet.models.roi_heads.roi_extractors import BaseRoIExtractor

from helpers import config_path
from mmfisher.core import ConsumerInputs
from mmfisher.core.importance import FisherImportance
from mmfisher.openmmlab.analysis import analyse_model, build_from_config
from mmfisher.openmmlab.synthetic import loss_of, random_batch

SHAPE = (64, 64)


def per_image_mask_reference(model, graph, inputs, samples, seed):
    U, N = graph.num_channels, inputs.shape[0]
    masks = torch.ones(N, U + 1, dtype=torch.float64, requires_grad=True)
    roi_image = {}
    handles = [m.register_forward_pre_hook(lambda mod, args: roi_image.__setitem__('rows', args[1][:, 0].long()))
               for m in model.modules() if isinstance(m, BaseRoIExtractor)]
    for c in ConsumerInputs(model, graph).consumers:
        def hook(mod, args, c=c):
            x = args[0]
            image = torch.arange(N) if x.shape[0] == N else roi_image['rows']   # 512 RoIs per image here
            m = masks[image][:, c.index].to(x.dtype)
            m = m.view(m.shape[0], -1, *([1] * (x.dim() - 2))) if c.dim == 1 else m
            return (x * m,) + tuple(args[1:])
        handles.append(c.module.register_forward_pre_hook(hook))
    torch.manual_seed(seed)
    (grad,) = torch.autograd.grad(loss_of(model, inputs, samples), masks)
    for h in handles:
        h.remove()
    return (grad[:, :U] ** 2).sum(0)


def test_faster_rcnn_roi_rows_are_summed_into_their_image_before_the_square():
    torch.manual_seed(0)
    model = build_from_config(config_path('mmdet', 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'))
    graph = analyse_model(model, (1, 3) + SHAPE)
    head = ['roi_head.bbox_head.' + n for n in ('shared_fcs.0', 'shared_fcs.1', 'fc_cls', 'fc_reg')]
    assert graph.row_level == {n: 'roi_head.bbox_roi_extractor' for n in head}
    assert 'rows of roi_head.bbox_head.shared_fcs.0 are RoIs of roi_head.bbox_roi_extractor' in graph.report()
    model.train()
    inputs, samples = random_batch(model, 2, SHAPE, seed=0)

    consumers = ConsumerInputs(model, graph)
    fisher = FisherImportance(consumers)
    consumers.attach()
    torch.manual_seed(1)              # the RoI sampler draws from the global generator: same RoIs below
    loss_of(model, inputs, samples).backward()
    fisher.accumulate()
    consumers.detach()
    model.zero_grad()

    ref = per_image_mask_reference(model, graph, inputs, samples, seed=1)
    fpn = graph.groups_of('roi_head.bbox_head.shared_fcs.0', 'in')
    assert len(fpn) == 1 and 'rpn_head.rpn_conv' in fpn[0].consumers      # RPN and RoI head share the group
    assert fisher.samples == 2
    prunable = graph.prunable
    rel = (fisher.accum[prunable] - ref[prunable]).abs().max() / ref[prunable].abs().max()
    assert rel < 1e-4, float(rel)
    ch = fpn[0].channels
    sl = slice(ch.start, ch.stop)
    assert torch.allclose(fisher.accum[sl], ref[sl], rtol=1e-3, atol=1e-6 * float(ref[sl].max()))
