"""Analyse models built from mmdet / mmpretrain configs.

``build_from_config(cfg)`` builds the model exactly as the config says (no
pretrained download: ``init_cfg`` checkpoints are not loaded here);
``example_forward(model, shape)`` returns the callable the tracer runs: the
detector's ``_forward`` ('tensor' mode, with minimal data samples so two-stage
detectors run their RoI head), the classifier's ``forward(mode='tensor')``, or for a
model with no tensor mode (GLIP, Grounding DINO, BLIP's VQA, OFA, Chinese CLIP) what
its ``predict`` runs before decoding;
``analyse_model(model, shape)`` traces it and the model's loss on a generated batch.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..core import CouplingGraph, analyse


def register_all_modules() -> None:
    """Register mmdet's and mmpretrain's modules (whichever are installed) and mmfisher's."""
    import importlib
    import importlib.util

    from ..compat import torchvision_fallback
    if importlib.util.find_spec('mmpretrain') is not None:
        torchvision_fallback.install()   # mmpretrain imports torchvision; only it needs the fallback
    for scope in ('mmdet', 'mmpretrain'):
        try:
            mod = importlib.import_module(f'{scope}.utils')
            mod.register_all_modules(init_default_scope=False)
        except ImportError:
            pass
    import mmfisher.openmmlab  # noqa: F401  (handlers, hooks, builders)


def default_scope_of(cfg) -> str:
    scope = cfg.get('default_scope', None)
    if scope:
        return scope
    t = str(cfg.model.get('type', ''))
    return 'mmpretrain' if 'Classifier' in t else 'mmdet'


def build_from_config(cfg) -> nn.Module:
    """Build ``cfg.model`` in its default scope, without loading pretrained weights; a top-level
    ``data_preprocessor`` (mmpretrain's configs) goes to the model, as mmengine's runner passes it."""
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    if not isinstance(cfg, Config):
        cfg = Config.fromfile(cfg)
    register_all_modules()
    scope = default_scope_of(cfg)
    model_cfg = cfg.model.copy()
    if isinstance(model_cfg, dict) and cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    _drop_pretrained(model_cfg)
    with DefaultScope.overwrite_default_scope(scope):
        if scope == 'mmpretrain':
            from mmpretrain.registry import MODELS
        else:
            from mmdet.registry import MODELS
        return MODELS.build(model_cfg)


def config_dicts(node: Any):
    """Every dict in a config (sub)tree, parents first; a dict may be edited before its children are visited."""
    if isinstance(node, dict):
        yield node
        for v in list(node.values()):
            yield from config_dicts(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from config_dicts(v)


def _drop_pretrained(cfg: Any) -> None:
    for d in config_dicts(cfg):
        init = d.get('init_cfg')
        if isinstance(init, dict) and init.get('type') == 'Pretrained':
            d.pop('init_cfg')


def example_samples(model: nn.Module, shape: Sequence[int]) -> Optional[list]:
    """Data samples a detector's ``_forward`` needs for a ``shape`` batch (None for classifiers): the
    image meta and generated ground truth (seed 0), which the tensor forward of a few detectors
    reads (CondInst's mask head picks its positives with it); the others ignore it."""
    try:
        from mmdet.models.detectors import BaseDetector
    except ImportError:  # pragma: no cover
        return None
    from .synthetic import random_batch, tensor_network, text_model
    net = tensor_network(model)     # the detector a wrapper's tensor forward runs
    if text_model(net):      # texts per image: a question, answers, a referring expression
        return random_batch(net, int(shape[0]), (int(shape[-2]), int(shape[-1])))[1]
    if not isinstance(net, BaseDetector):
        return None
    return random_batch(net, int(shape[0]), (int(shape[-2]), int(shape[-1])))[1]


def tensor_forward(model: nn.Module, x: torch.Tensor, samples: Optional[list]) -> Any:
    """The network in 'tensor' mode: a detector's ``_forward`` (with its RoI head, if any) or a
    classifier's ``forward(mode='tensor')``; no post-processing. A semi-supervised detector runs its
    teacher or student, a tracker its detector (:func:`~mmfisher.openmmlab.synthetic.tensor_network`)."""
    from .synthetic import tensor_network, video_model
    net = tensor_network(model)
    if video_model(net):
        # no detector and no tensor mode (Mask2Former-VIS): the backbone and the track head on the
        # frames of one video (``x``: ``[T, C, H, W]``), as its predict runs them
        return net.track_head(net.backbone(x), samples)
    text_forward = text_forward_of(net)
    if text_forward is not None:
        return text_forward(net, x, samples)
    if samples is not None:
        if grounded(net):
            return grounded_forward(net, x, samples)
        return net._forward(x, samples)
    return model(x, mode='tensor')


def grounded(net: nn.Module) -> bool:
    """Whether ``net`` is an open-vocabulary detector that reads a text prompt through a language model
    (GLIP, Grounding DINO): its data samples carry ``text`` (see
    :func:`~mmfisher.openmmlab.synthetic.random_batch`)."""
    try:
        from mmdet.models.detectors import GLIP, GroundingDINO
    except ImportError:  # pragma: no cover  (mmdet < 3.1)
        return False
    return isinstance(net, (GLIP, GroundingDINO))


def grounded_forward(net: nn.Module, x: torch.Tensor, samples: list) -> Any:
    """The tensor forward of GLIP and Grounding DINO, which have none of their own (their ``_forward``
    takes no text): what their ``predict`` runs up to the head's outputs, on the first sample's prompt
    (a tuple of class names), with no post-processing.

    Returns GLIP's head outputs ``(cls_logits, bbox_preds, centerness)`` per level, or Grounding DINO's
    ``(all_layers_cls_scores, all_layers_bbox_preds)``."""
    from mmdet.models.detectors import GLIP
    positive_map, caption, _, _ = net.get_tokens_positive_and_prompts(samples[0].text, True)
    captions = [caption] * len(x)
    feats = net.extract_feat(x)
    text = net.language_model(captions)
    if isinstance(net, GLIP):
        return net.bbox_head(feats, text)
    if net.text_feat_map is not None:
        text['embedded'] = net.text_feat_map(text['embedded'])
    for s in samples:
        s.token_positive_map = positive_map
    return net.bbox_head(**net.forward_transformer(feats, text, samples))


def vqa_forward(net: nn.Module, x: torch.Tensor, samples: list) -> Any:
    """The tensor forward of mmpretrain's ``BlipVQA``, which has none of its own: the image tokens, the
    question fused with them by the multimodal backbone, and the answer decoder's scores for each
    sample's first answer (teacher-forced, as its loss runs it; its ``predict`` runs the same decoder
    one token at a time), with no loss and no decoding.

    Returns ``(visual [N, L, C], fused [N, Q, C'], scores [N, A - 1, vocab])``: ``L`` image tokens,
    ``Q`` question tokens, ``A`` answer tokens."""
    tok = net.tokenizer
    visual = net.extract_feat(x)
    image_atts = torch.ones(visual.shape[:-1], dtype=torch.long, device=x.device)
    q = tok([s.question for s in samples], padding='longest', return_tensors='pt').to(x.device)
    q.input_ids[:, 0] = tok.additional_special_tokens_ids[0]      # [ENC], as BlipVQA puts it
    fused = net.multimodal_backbone(q.input_ids, attention_mask=q.attention_mask, encoder_hidden_states=visual,
                                    encoder_attention_mask=image_atts, return_dict=True).last_hidden_state
    a = tok([s.gt_answer[0] for s in samples], padding='longest', return_tensors='pt').to(x.device)
    scores = net.vqa_head(dict(answer_input_ids=a.input_ids, answer_attention_mask=a.attention_mask,
                               question_states=fused, question_atts=q.attention_mask,
                               answer_targets=a.input_ids.masked_fill(a.input_ids == tok.pad_token_id, -100)))
    return visual, fused, scores


def image_text_forward(net: nn.Module, x: torch.Tensor, samples: Optional[list] = None, classes: int = 4) -> Any:
    """The tensor forward of mmpretrain's ``ChineseCLIP``, which has none of its own: what its zero-shot
    ``predict`` compares, the image features of ``x`` and the text features of its first prompt for its
    first ``classes`` class names (its ``predict`` runs every prompt of every class through the same text
    backbone), without normalisation.

    Returns ``(image [N, D], text [classes, D])``."""
    texts = net.tokenize([net.prompt[0](c) for c in net.prototype[:classes]]).to(x.device)
    return net.extract_image_feat(x), net.extract_text_feat(texts)


def ofa_forward(net: nn.Module, x: torch.Tensor, samples: list) -> Any:
    """The tensor forward of mmpretrain's ``OFA``, which has none of its own: its encoder on the image and
    its task's prompt, and its decoder's scores for each sample's first answer (teacher-forced; its
    ``predict`` runs the same decoder one token at a time in a beam search), with no decoding.

    Returns ``(scores [N, A, vocab],)`` for ``A`` answer tokens after the first."""
    tok = net.tokenizer
    prompts = net.preprocess_text(samples, len(x), x.device)
    answer = tok([' ' + s.gt_answer[0] for s in samples], return_tensors='pt', padding=True).input_ids.to(x.device)
    answer = answer[:, :-1]
    every_image = torch.ones(len(x), dtype=torch.bool, device=x.device)   # as its generate() sets it
    # the decoder's attention mask as its generate() builds it (zeros: every position attended)
    out = net.model(input_ids=prompts, images=x, images_mask=every_image, decoder_input_ids=answer,
                    attention_mask=answer.new_zeros(answer.shape), return_dict=True)
    return (out.logits,)


# mmpretrain's image-text models with no 'tensor' mode: class name -> the tensor forward ``f(net, x, samples)``
# the analysis traces and costs. Their generated batches carry texts (synthetic.text_samples). A user adds a
# model here.
TEXT_FORWARDS = {
    'BlipVQA': vqa_forward,
    'OFA': ofa_forward,
    'ChineseCLIP': image_text_forward,
}


def text_forward_of(net: nn.Module) -> Optional[Callable]:
    """``net``'s entry of :data:`TEXT_FORWARDS` (by class, then its bases), None if it has none."""
    for cls in type(net).__mro__:
        if cls.__name__ in TEXT_FORWARDS:
            return TEXT_FORWARDS[cls.__name__]
    return None


def example_forward(model: nn.Module, shape: Sequence[int] = (1, 3, 320, 320)) -> Callable[[], Any]:
    """The forward the analysis records: ``shape`` is the (already normalised) input batch.

    The input is drawn from a generator of its own (seed 0): the same on every rank and every
    call, and the global random stream of a training run is left untouched.
    """
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(next(model.parameters()).device)
    samples = example_samples(model, shape)
    return lambda: tensor_forward(model, x, samples)


def example_loss(model: nn.Module, shape: Sequence[int] = (1, 3, 320, 320)) -> Callable[[], Any]:
    """The model's loss on a generated batch of ``shape`` (random boxes, masks or labels; seed 0).

    Traced besides :func:`example_forward` because training runs branches the tensor forward does
    not (PointRend's point head, HTC's later mask stages, a head's auxiliary branch). It draws from
    the global random stream (samplers, point sampling): the caller restores it, and the model's
    buffers, afterwards (:func:`analyse_model`)."""
    from .synthetic import loss_of, random_batch
    inputs, samples = random_batch(model, int(shape[0]), (int(shape[-2]), int(shape[-1])))
    inputs = inputs.to(next(model.parameters()).device)

    def loss():
        # in training mode, as training runs it (DINO's heads only return their encoder outputs then);
        # the analysis restores every module's flag afterwards
        model.train()
        try:
            return loss_of(model, inputs, samples)
        finally:
            model.eval()
    return loss


# Copies kept in step with a part of the model that are not averaged-model wrappers (those are found
# by mmfisher.core.mirrors): class name -> (copy, source) module names. CAE's teacher is a second
# backbone updated from the backbone by a momentum loop over their parameters; a semi-supervised
# detector's teacher (soft teacher) is a second detector that mmdet's MeanTeacherHook averages the
# student into, parameter by parameter.
KNOWN_MIRRORS = {
    'CAE': [('teacher', 'backbone')],
    'SemiBaseDetector': [('teacher', 'student')],
}


def known_mirrors(model: nn.Module) -> list:
    """``(copy, source)`` pairs of :data:`KNOWN_MIRRORS` that apply to ``model`` (by class name)."""
    names = dict(model.named_modules())
    pairs = []
    for cls in type(model).__mro__:
        for copy_name, source in KNOWN_MIRRORS.get(cls.__name__, []):
            if copy_name in names and source in names and (copy_name, source) not in pairs:
                pairs.append((copy_name, source))
    return pairs


def analyse_model(model: nn.Module, shape: Sequence[int] = (1, 3, 320, 320), strict: bool = False,
                  with_loss: bool = True) -> CouplingGraph:
    """Coupled groups of an OpenMMLab model, recorded on a random input of ``shape``: its tensor
    forward (what the costs count) and, with ``with_loss``, its loss on a generated batch (what
    training runs besides; see :func:`example_loss`). ``strict``: see :func:`mmfisher.core.analyse`.

    The global random state and the model's parameters and buffers (BN statistics the loss forward
    updated) are as they were afterwards. A loss that fails on the generated batch is skipped and
    named in ``graph.skipped``; the layers only it would have run are then in ``graph.unseen``."""
    import random

    import numpy as np
    register_all_modules()
    also = []
    if with_loss and hasattr(model, 'loss'):
        also.append(example_loss(model, shape))
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            return analyse(model, forward=example_forward(model, shape), also=also, strict=strict,
                           mirrors=known_mirrors(model))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        with torch.no_grad():
            for k, v in model.state_dict(keep_vars=True).items():
                if k in state and v.shape == state[k].shape:
                    v.copy_(state[k])
