"""Generated batches for detectors and classifiers (tools, benchmarks and tests; nothing downloaded).

The batches are what a data preprocessor would hand the model: a normalised
``[N, 3, H, W]`` tensor and data samples with random ground truth.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn


# the text prompt of a generated batch for a detector that reads one (GLIP, Grounding DINO)
PROMPT_NAMES = ('circle', 'square', 'triangle', 'star', 'ring')
# the texts of a generated batch for an image-text model (BLIP's VQA, OFA): questions and referring
# expressions; the answers are PROMPT_NAMES
VQA_QUESTIONS = ('what shape is in the middle?', 'which shape is the largest?', 'what is left of the ring?')
REFERRING = ('the large circle', 'the square on the left', 'a small star')


def text_model(model: nn.Module) -> bool:
    """Whether ``model`` is one of mmpretrain's image-text models with no 'tensor' mode, those
    :data:`mmfisher.openmmlab.analysis.TEXT_FORWARDS` has a tensor forward for: its data samples carry texts
    (:func:`text_samples`)."""
    from .analysis import text_forward_of
    return text_forward_of(model) is not None


def text_samples(batch: int, g: torch.Generator) -> List:
    """``batch`` data samples for an image-text model, with what each reads, as mmpretrain's loaders pack
    them: a ``question`` (VQA), one or two ``gt_answer`` texts from :data:`PROMPT_NAMES` and their
    ``gt_answer_weight``, and a referring expression ``text`` (OFA's refcoco task)."""
    from mmpretrain.structures import DataSample
    samples = []
    for _ in range(batch):
        q = VQA_QUESTIONS[int(torch.randint(len(VQA_QUESTIONS), (1,), generator=g))]
        k = int(torch.randint(1, 3, (1,), generator=g))
        answers = [PROMPT_NAMES[int(i)] for i in torch.randperm(len(PROMPT_NAMES), generator=g)[:k]]
        text = REFERRING[int(torch.randint(len(REFERRING), (1,), generator=g))]
        samples.append(DataSample(question=q, gt_answer=answers, gt_answer_weight=[1.0 / k] * k, text=text))
    return samples


def _num_classes(model: nn.Module, default: int = 80) -> int:
    for name in ('bbox_head', 'head', 'roi_head', 'track_head'):
        head = getattr(model, name, None)
        if head is None:
            continue
        sub = getattr(head, 'bbox_head', head)
        n = getattr(sub, 'num_classes', None)
        if isinstance(n, int):
            return n
    # a classifier whose head does not keep the count (mmpretrain's ClsHead, multi-label heads): its data
    # preprocessor's, which turns labels to one-hot with it
    n = getattr(getattr(model, 'data_preprocessor', None), 'num_classes', None)
    return n if isinstance(n, int) else default


def random_batch(model: nn.Module, batch: int = 2, shape: Sequence[int] = (320, 320),
                 seed: int = 0, max_objects: int = 4, _for_video: nn.Module = None,
                 channels: int = 3) -> Tuple[torch.Tensor, List]:
    """``(inputs, data_samples)`` for ``model.loss`` / ``model.train_step``-free training loops: inputs
    ``[batch, channels, *shape]``. A wrapper gets its detector's batch (:func:`detector_of`; :func:`loss_of`
    makes a semi-supervised detector's branches). A multi-label classifier (its data preprocessor turns
    labels to one-hot) gets a few labels per image."""
    if video_model(model) and _for_video is None:
        return random_video_batch(model, batch, shape, seed, max_objects)
    model = detector_of(model)
    g = torch.Generator().manual_seed(seed)
    h, w = int(shape[0]), int(shape[1])
    inputs = torch.randn(batch, channels, h, w, generator=g)
    if text_model(model):
        return inputs, text_samples(batch, g)
    n_cls = _num_classes(model)
    try:
        from mmdet.models.detectors import BaseDetector
        is_det = isinstance(model, BaseDetector) or _for_video is not None
    except ImportError:  # pragma: no cover
        is_det = False
    # a video model without a detector segments with its track head (Mask2Former-VIS): it needs masks
    track_masks = _for_video is not None and getattr(_for_video, 'detector', None) is None
    samples = []
    if is_det:
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData
        roi_head = getattr(model, 'roi_head', None)
        # CrowdDet's multi-instance assigner gives every box its num_instance best objects: it needs as many
        least = int(getattr(getattr(roi_head, 'bbox_assigner', None), 'num_instance', 1))
        for _ in range(batch):
            k = int(torch.randint(min(least, max_objects), max_objects + 1, (1,), generator=g))
            xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
            wh = (torch.rand(k, 2, generator=g) * 0.5 + 0.1) * torch.tensor([w, h])
            boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w - 1.0, h - 1.0]))], 1)
            s = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                                            batch_input_shape=(h, w), scale_factor=(1.0, 1.0)))
            s.gt_instances = InstanceData(bboxes=boxes, labels=torch.randint(0, n_cls, (k,), generator=g))
            # none ignored, as mmdet's PackDetInputs packs them (CrowdDet's sampler reads them)
            s.ignored_instances = InstanceData(bboxes=boxes.new_zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))
            semantic = (hasattr(model, 'semantic_head') or getattr(roi_head, 'with_semantic', False)
                        or hasattr(model, 'panoptic_head'))      # PanopticFPN, HTC's semantic branch, MaskFormer
            if getattr(model, 'with_mask', False) or getattr(roi_head, 'with_mask', False) or semantic or track_masks:
                from mmdet.structures.mask import BitmapMasks
                masks = np.zeros((k, h, w), dtype=np.uint8)
                for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
                    masks[i, y0:y1 + 1, x0:x1 + 1] = 1       # the box, filled
                s.gt_instances.masks = BitmapMasks(masks, h, w)
            if semantic:
                from mmengine.structures import PixelData
                seg = torch.zeros(1, h, w, dtype=torch.long)
                for (x0, y0, x1, y1), c in zip(boxes.round().long().tolist(), s.gt_instances.labels.tolist()):
                    seg[0, y0:y1 + 1, x0:x1 + 1] = c
                s.gt_sem_seg = PixelData(sem_seg=seg)
            if roi_head is not None and getattr(model, 'with_rpn', True) is False:
                # Fast R-CNN: proposals come with the data; the boxes plus random ones
                n = 32
                xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
                wh = (torch.rand(n, 2, generator=g) * 0.5 + 0.1) * torch.tensor([w, h])
                rand = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w - 1.0, h - 1.0]))], 1)
                s.proposals = InstanceData(bboxes=torch.cat([boxes, rand]), scores=torch.rand(n + k, generator=g))
            if hasattr(model, 'language_model'):
                # an open-vocabulary detector (GLIP, Grounding DINO): the prompt names the classes, the
                # labels index it, as mmdet's loaders pack a detection dataset for them
                s.text = PROMPT_NAMES
                s.custom_entities = True
                s.gt_instances.labels = s.gt_instances.labels % len(PROMPT_NAMES)
            samples.append(s)
        inputs, samples = _training_targets(model, inputs, samples)
    else:
        sample_type = _classifier_sample_type(model)
        n_labels = 3 if _multi_label(model) else 1
        for _ in range(batch):
            if n_labels == 1:
                label = int(torch.randint(0, n_cls, (1,), generator=g))
            else:
                k = int(torch.randint(1, n_labels + 1, (1,), generator=g))
                label = torch.randperm(n_cls, generator=g)[:k].tolist()
            samples.append(sample_type().set_gt_label(label))
    return inputs, samples


def random_video_batch(model: nn.Module, batch: int = 2, shape: Sequence[int] = (320, 320), seed: int = 0,
                       max_objects: int = 4) -> Tuple[torch.Tensor, List]:
    """A video model's batch: ``[N, 2, 3, H, W]`` inputs (a key frame and a reference frame) and one
    ``TrackDataSample`` per video, as mmdet's video loader packs them. The scene is still: the reference
    frame is the key frame plus a little noise, with the same objects (``instances_ids`` 0..k-1) and
    ground truth (boxes, labels, masks as its detector or track head needs them)."""
    frame_model = getattr(model, 'detector', None) or model
    g = torch.Generator().manual_seed(seed + 1)
    key, frames = random_batch(frame_model, batch, shape, seed, max_objects, _for_video=model)
    ref = key + 0.05 * torch.randn(key.shape, generator=g)
    videos = []
    for i, sample in enumerate(frames):
        sample.gt_instances.instances_ids = torch.arange(len(sample.gt_instances))
        videos.append(as_video([sample, sample], video_id=i))
    return torch.stack([key, ref], 1), videos


def as_video(frames: List, video_id: int = 0):
    """A ``TrackDataSample`` of ``frames`` (``DetDataSample`` s, each deep-copied: heads convert their ground
    truth in place), as mmdet's video loader packs them: frame ``i`` has ``frame_id`` ``i``; the key frame
    is the first, the reference frame the last."""
    import copy

    from mmdet.structures import TrackDataSample
    video = []
    for frame_id, sample in enumerate(frames):
        f = copy.deepcopy(sample)
        f.set_metainfo(dict(frame_id=frame_id, video_id=video_id, video_length=len(frames),
                            img_id=video_id * len(frames) + frame_id,
                            img_path=f'generated/{video_id}/{frame_id}.jpg'))
        video.append(f)
    packed = TrackDataSample(metainfo=dict(key_frames_inds=[0], ref_frames_inds=[len(frames) - 1]))
    packed.video_data_samples = video
    return packed


def one_frame_video(image: torch.Tensor, sample) -> Tuple[torch.Tensor, List]:
    """A tracker's predict input from one image ``[1, C, H, W]`` and its ``DetDataSample``: ``[1, 1, C, H, W]``
    and a one-frame ``TrackDataSample`` (:func:`as_video`)."""
    return image.unsqueeze(1), [as_video([sample])]


def _multi_label(model: nn.Module) -> bool:
    """An mmpretrain classifier with a multi-label head (CSRA on VOC): every image has one or more labels."""
    try:
        from mmpretrain.models.heads import MultiLabelClsHead
    except ImportError:  # pragma: no cover
        return False
    return isinstance(getattr(model, 'head', None), MultiLabelClsHead)


def _classifier_sample_type(model: nn.Module) -> type:
    """mmpretrain's ``DataSample``, or mmdet's ``ReIDDataSample`` for its ReID models (they read a
    ``LabelData`` label)."""
    try:
        from mmdet.models.reid import BaseReID
        if isinstance(model, BaseReID):
            from mmdet.structures import ReIDDataSample
            return ReIDDataSample
    except ImportError:  # pragma: no cover
        pass
    from mmpretrain.structures import DataSample
    return DataSample


def _training_targets(model: nn.Module, inputs: torch.Tensor, samples: List) -> Tuple[torch.Tensor, List]:
    """The batch through the detector's data preprocessor, when that preprocessor adds training
    targets of its own (BoxInst's pairwise masks from colour similarity), as ``train_step`` would;
    otherwise unchanged. ``inputs`` are taken for normalised images and turned back into pixels first."""
    try:
        from mmdet.models.data_preprocessors import DetDataPreprocessor, TrackDataPreprocessor
    except ImportError:  # pragma: no cover
        return inputs, samples
    dp = getattr(model, 'data_preprocessor', None)
    if (not isinstance(dp, DetDataPreprocessor) or isinstance(dp, TrackDataPreprocessor)
            or type(dp).forward is DetDataPreprocessor.forward):
        return inputs, samples
    pixels = inputs
    if getattr(dp, '_enable_normalize', False):
        pixels = inputs * dp.std.cpu() + dp.mean.cpu()
    out = dp({'inputs': list(pixels.clamp(0, 255)), 'data_samples': samples}, training=True)
    return out['inputs'].cpu(), out['data_samples']


def _semi_supervised(model: nn.Module) -> bool:
    try:
        from mmdet.models.detectors import SemiBaseDetector
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, SemiBaseDetector)


def _tracker_of_its_detector(model: nn.Module) -> bool:
    """A tracker whose only network is its detector (ByteTrack, OC-SORT: their loss is the detector's
    loss on single images; the motion model and the association have nothing to train)."""
    try:
        from mmdet.models.mot import BaseMOTModel
    except ImportError:  # pragma: no cover
        return False
    return (isinstance(model, BaseMOTModel) and model.with_detector and not model.with_reid
            and not model.with_track_head)


def video_model(model: nn.Module) -> bool:
    """A model trained on videos (``[N, T, C, H, W]`` inputs, ``TrackDataSample`` s): a track head learns
    to match objects across a key and a reference frame (QDTrack, MaskTrack R-CNN, Mask2Former-VIS)."""
    try:
        from mmdet.models.mot import BaseMOTModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, BaseMOTModel) and model.with_track_head


def detector_of(model: nn.Module) -> nn.Module:
    """The detector a wrapper trains, whose batches it takes: a semi-supervised detector's student, the
    detector of a tracker that trains nothing else (:func:`_tracker_of_its_detector`); else ``model``."""
    if _semi_supervised(model):
        return model.student
    if _tracker_of_its_detector(model):
        return model.detector
    return model


def tensor_network(model: nn.Module) -> nn.Module:
    """The network whose tensor forward stands for ``model``'s: the teacher or the student its
    ``semi_test_cfg`` runs ``_forward`` on (a semi-supervised detector); a tracker's or a video model's
    detector (they have no tensor mode of their own; a video model's track head runs in its loss); else
    ``model`` (also a video model with no detector: see ``analysis.tensor_forward``)."""
    if _semi_supervised(model):
        on = (model.semi_test_cfg or {}).get('forward_on', 'teacher')
        return model.teacher if on == 'teacher' else model.student
    if video_model(model) and getattr(model, 'detector', None) is not None:
        return model.detector      # QDTrack, MaskTrack R-CNN: the track head runs in the loss only
    return detector_of(model)


def semi_supervised_branches(inputs: torch.Tensor, samples: List) -> Tuple[dict, dict]:
    """A semi-supervised detector's three branches from one labelled batch, as its
    ``MultiBranchDataPreprocessor`` hands them over: ``'sup'`` the batch itself, ``'unsup_teacher'`` and
    ``'unsup_student'`` the same images as unlabelled views related by the identity homography (the
    teacher's pseudo boxes replace their ground truth)."""
    import copy
    unsup = []
    for s in samples:
        c = copy.deepcopy(s)
        c.set_metainfo(dict(homography_matrix=np.eye(3, dtype=np.float32)))
        unsup.append(c)
    return ({'sup': inputs, 'unsup_teacher': inputs, 'unsup_student': inputs},
            {'sup': samples, 'unsup_teacher': unsup, 'unsup_student': copy.deepcopy(unsup)})


def loss_of(model: nn.Module, inputs: torch.Tensor, samples: List) -> torch.Tensor:
    """The summed training loss, as mmengine's ``parse_losses`` computes it (a semi-supervised
    detector's on the branches :func:`semi_supervised_branches` makes of the batch)."""
    if _semi_supervised(model):
        inputs, samples = semi_supervised_branches(inputs, samples)
    losses = model.loss(inputs, samples)
    total, _ = model.parse_losses(losses)
    return total


def randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial norm parameters and statistics, so removed channels would show."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
                if getattr(m, 'running_mean', None) is not None:
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.4 - 0.2)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def generated_language_model(folder: str, seed: int = 0) -> str:
    """A BERT-base with random weights and a small generated vocabulary, saved to ``folder`` as
    HuggingFace's ``from_pretrained`` reads it: what GLIP's and Grounding DINO's ``BertModel`` load by
    name (``bert-base-uncased``), without downloading anything. Needs ``transformers``.

    The vocabulary holds BERT's special tokens, punctuation, letters and digits (whole and ``##``
    continuations, so WordPiece spells any lower-case word) and :data:`PROMPT_NAMES`; the network is
    bert-base's (12 layers, 768 wide) with that vocabulary's size. Returns ``folder``."""
    import os
    import string

    from transformers import BertConfig, BertModel, BertTokenizer
    os.makedirs(folder, exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    vocab = (['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + list(chars) + list('.,?!;:\'"-()/&')
             + ['##' + c for c in chars] + sorted(set(PROMPT_NAMES)))
    path = os.path.join(folder, 'vocab.txt')
    with open(path, 'w') as f:
        f.write('\n'.join(vocab) + '\n')
    BertTokenizer(path, do_lower_case=True).save_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertModel(BertConfig(vocab_size=len(vocab))).save_pretrained(folder)
    return folder


def generated_bpe_tokenizer(folder: str) -> str:
    """A byte-level BPE tokenizer in BART's format (``vocab.json``, ``merges.txt``), saved to ``folder`` as
    HuggingFace's ``from_pretrained`` reads it: what OFA's ``OFATokenizer`` loads by name
    (``OFA-Sys/OFA-base``), without downloading anything. Needs ``transformers``.

    The vocabulary is BART's special tokens and the 256 bytes, with no merges: every text is spelled
    byte by byte. Returns ``folder``."""
    import json
    import os

    from transformers import BartTokenizer
    from transformers.models.bart.tokenization_bart import bytes_to_unicode
    os.makedirs(folder, exist_ok=True)
    tokens = ['<s>', '<pad>', '</s>', '<unk>'] + sorted(bytes_to_unicode().values()) + ['<mask>']
    vocab, merges = os.path.join(folder, 'vocab.json'), os.path.join(folder, 'merges.txt')
    with open(vocab, 'w') as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(merges, 'w') as f:
        f.write('#version: 0.2\n')
    BartTokenizer(vocab, merges).save_pretrained(folder)
    return folder


def generated_clip_checkpoint(path: str, seed: int = 0, embed_dim: int = 512, image_resolution: int = 224,
                              vision_layers: int = 12, vision_width: int = 768, patch_size: int = 16) -> str:
    """A CLIP state dict with random weights, saved to ``path`` as mmpretrain's ``CLIPGenerator`` loads it
    (``build_clip_model``): what MILAN's config downloads as its target generator
    (``clip_vit_base_16.pth.tar``), without downloading anything. The image tower is ViT-B/16's (the
    defaults: 224x224, 12 layers, 768 wide, features of 512); the text tower, which the generator never
    runs, is one layer of 64 over an 8-token vocabulary. Needs mmpretrain. Returns ``path``."""
    from mmpretrain.models.utils.clip_generator_helper import CLIP
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIP(embed_dim, image_resolution, vision_layers, vision_width, patch_size, context_length=8,
                    vocab_size=8, transformer_width=64, transformer_heads=1, transformer_layers=1)
    torch.save(clip.state_dict(), path)
    return path
