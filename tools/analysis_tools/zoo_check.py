"""The support matrix: every model family of mmdet's and mmpretrain's own config trees, pruned and checked.

    python tools/analysis_tools/zoo_check.py [--packages mmdet mmpretrain] [--families retinanet fcos ...]
                                             [--configs PATH ...] [--jobs 1] [--timeout 300] [--shape 256]
                                             [--fraction 0.7] [--md docs/support_matrix.md]
                                             [--json docs/support_matrix.json] [--resume]
                                             [--language-env .language_env]

For one representative config per family (the shortest name, preferring ResNet-50 and the 1x
schedule; the next of five if the check cannot run it or it is backbone-only), in a subprocess with a
time limit: build it with random weights (nothing downloaded; a classifier at the input size of its
config's test pipeline, with its data preprocessor's channels), analyse it strictly (a failing op
rule is an error, not "unprunable"), cut every prunable group to a random ``--fraction`` of its
channels, write the channel spec as JSON and shrink a copy of the model from it, compare the compact
model's outputs with the masked model's (relative 1e-4, or, where float32 rounding amplified by the
random-init network exceeds that, 1e-9 with both in float64; the compact model's run replays the
masked run's discrete decisions, top-k, sorts, NMS, thresholds, which can flip on float rounding over
random-init scores: DETR's query selection, the RPN's choice of proposals; the RoI heads of two-stage
detectors get the masked run's proposals themselves), then run one training step and one predict on
the compact model with generated data. Every group that is not prunable is listed with its reason.

A row is ``pass``, ``fail`` (something mmfisher does went wrong: the analysis, the shrink, the
outputs, or the compact model's train / predict while the original's work), ``harness`` (the check
itself could not run the model: it does not build here, or the original model's own train step or
predict fails on generated data), ``timeout``, ``nothing prunable``, ``features only`` (a
backbone-only config, no head and no loss, or a model with no loss in its package, such as OFA and
Chinese CLIP: its tensor outputs analysed, shrunk and compared; nothing to train or predict) or
``no model`` (a folder of dataset or schedule templates, not a model family: not counted). Where the
check adapts a model to run here (a bug of the installed packages mended, a dataset that is not here
replaced by generated data), its row says so.

The whole matrix takes hours on 2 cores: ``--json`` is rewritten after every family, and
``--resume`` keeps the families it already holds (each row records the mmfisher commit it ran on).
"""
import argparse
import concurrent.futures
import json
import os
import os.path as osp
import subprocess
import sys
import tempfile
import time
import traceback
import types

ROOT = osp.abspath(osp.join(osp.dirname(__file__), '..', '..'))
LANGUAGE_ENV = osp.join(ROOT, '.language_env')
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--packages', nargs='+', default=['mmdet', 'mmpretrain'], choices=['mmdet', 'mmpretrain'])
    p.add_argument('--families', nargs='+', help='only these families (config folder names)')
    p.add_argument('--configs', nargs='+', help='check these config files instead of one per family')
    p.add_argument('--jobs', type=int, default=1, help='configs checked at once (each in its own process)')
    p.add_argument('--timeout', type=float, default=300, help='seconds per config')
    p.add_argument('--shape', type=int, default=256,
                   help='input size for detectors (classifiers: the size their config\'s test pipeline gives, '
                        'else 224)')
    p.add_argument('--fraction', type=float, default=0.7, help='share of every prunable group kept')
    p.add_argument('--language-env', metavar='DIR', default=LANGUAGE_ENV if osp.isdir(LANGUAGE_ENV) else None,
                   help='a folder holding transformers and fairscale, put on the path of the checks of models '
                        'with a language model or tokenizer only (GLIP, Grounding DINO, BLIP, Chinese CLIP, OFA); '
                        'default: .language_env, which tools/setup_env.sh installs')
    p.add_argument('--md', help='write the matrix as markdown here')
    p.add_argument('--json', help='write the results as JSON here (rewritten after every family)')
    p.add_argument('--resume', action='store_true',
                   help='keep the families --json already holds and check only the others')
    p.add_argument('--worker', help=argparse.SUPPRESS)
    p.add_argument('--worker-out', help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- which configs
def config_root(package):
    mod = __import__(package)
    return osp.join(osp.dirname(mod.__file__), '.mim', 'configs')


def candidates(folder, n=5):
    """The configs a family is checked with, best first: the shortest names, preferring ResNet-50 and the
    1x schedule. The first the harness can run represents the family."""
    names = [x for x in os.listdir(folder) if x.endswith('.py') and not x.startswith('_')]
    names.sort(key=lambda x: ('r50' not in x, '1x' not in x, len(x), x))
    return [osp.join(folder, x) for x in names[:n]]


def family_configs(packages, families=None):
    out = []
    for package in packages:
        root = config_root(package)
        for fam in sorted(os.listdir(root)):
            folder = osp.join(root, fam)
            if fam.startswith('_') or not osp.isdir(folder) or (families and fam not in families):
                continue
            cfgs = candidates(folder)
            if cfgs:
                out.append((package, fam, cfgs))
    return out


# ---------------------------------------------------------------- one config (in a worker process)
class Harness(Exception):
    """The check could not run the model (not mmfisher's fault)."""


class NoModel(Harness):
    """The config defines no model (a dataset, schedule or test-time augmentation template)."""


_STEP_FILE = None     # the worker notes each step here, so a crash of the process is put on the right side
_TMP = None           # the worker's scratch folder (a generated language model or CLIP checkpoint)


def _step(name, fn, harness=False):
    if _STEP_FILE:
        with open(_STEP_FILE, 'w') as f:
            json.dump({'step': name, 'harness': harness}, f)
    try:
        return fn()
    except Harness:
        raise
    except Exception as e:  # noqa: BLE001
        msg = f'{name}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}'
        if harness:
            raise Harness(msg) from e
        raise RuntimeError(msg) from e


def _outputs(model, x, samples, proposals=None):
    """The network's tensors in 'tensor' mode, and the proposals its RoI head was given (None for
    one-stage models). Two-stage detectors run the RoI head on ``proposals`` when given: the compact
    model gets the masked model's. Replaying only the choice of proposals (:class:`SameDecisions`) is
    not enough: box coordinates that differ by 1e-6 change the number of RoIAlign samples per bin
    (``sampling_ratio=0``) and can change a box's FPN level, both steps in the output (fpg: 1.3e-4
    with replayed choices, 1.6e-6 with shared proposals)."""
    import copy

    from mmfisher.core.atoms import flat_tensors
    from mmfisher.openmmlab.analysis import tensor_forward
    from mmfisher.openmmlab.synthetic import tensor_network
    try:
        from mmdet.models.detectors import TwoStageDetector
    except ImportError:  # pragma: no cover
        TwoStageDetector = ()
    model = tensor_network(model)     # a semi-supervised detector's teacher, a tracker's detector
    if isinstance(model, TwoStageDetector) and model.with_rpn:
        feats = model.extract_feat(x)
        try:
            rpn = model.rpn_head.forward(feats)
        except NotImplementedError:    # CascadeRPNHead: no forward of its own; its predict runs the stages
            rpn = ()
        own = model.rpn_head.predict(feats, samples, rescale=False)  # run either way: the decision stream
        proposals = own if proposals is None else proposals          # stays the same in both runs
        roi = model.roi_head.forward(feats, copy.deepcopy(proposals), samples)
        return flat_tensors((rpn, roi), [], -8), proposals
    return flat_tensors(tensor_forward(model, x, samples), [], -8), None


def _parts(graph):
    """Per part (backbone / neck / head): conv/linear layers, and those in a prunable group (an averaged
    copy's layers, e.g. a momentum encoder's, are not counted: they follow their source's)."""
    prunable = graph.prunable_layers()
    copies = tuple(c + '.' for c, _ in graph.mirrors)
    out = {}
    for n in graph.layers():
        if copies and n.startswith(copies):
            continue
        path = n.split('.')
        if path[0] in ('student', 'detector') and len(path) > 1:    # a semi-supervised detector, a tracker
            path = path[1:]
        if path[0] == 'image_encoder' and len(path) > 1:    # an image retriever: Sequential(backbone, neck)
            path = [('backbone', 'neck')[min(int(path[1]), 1)]] + path[2:] if path[1].isdigit() else path
        # mmpretrain's multimodal models: vision_backbone, text_backbone, multimodal_backbone
        if path[0].endswith('_backbone'):
            part = 'backbone'
        else:
            part = path[0] if path[0] in ('backbone', 'neck') else 'head'
        total, pr = out.get(part, (0, 0))
        out[part] = (total + 1, pr + (n in prunable))
    return out


def pipeline_batch(cfg, model, n=2, size=256, row=None):
    """A training batch of ``n`` generated images through the config's own train pipeline and the
    model's data preprocessor: ``(inputs, data_samples)`` as ``model.loss`` receives them. Used for
    self-supervised models, whose loss wants what only their pipeline makes (several views of an
    image, the mask of a masked-image-modelling method)."""
    import random
    import tempfile

    import numpy as np
    from mmengine.dataset import Compose, default_collate
    from mmengine.registry import DefaultScope
    from PIL import Image

    def without_jitter(ts):
        # mmcv 2.1's hue adjustment overflows uint8 under numpy 2 (every ColorJitter fails on this stack);
        # a photometric transform changes no shape, so the batch is what the model gets without it
        out = []
        for t in ts:
            if isinstance(t, dict) and t.get('type') in ('ColorJitter', 'mmpretrain.ColorJitter'):
                continue
            if isinstance(t, dict):
                t = {k: (without_jitter(v) if isinstance(v, list) else v) for k, v in t.items()}
                if t.get('type', '').endswith('RandomApply') and not t.get('transforms'):
                    continue
            elif isinstance(t, list):
                t = without_jitter(t)
            out.append(t)
        return out

    pipeline, replaced = _without_torchvision(without_jitter(cfg.train_dataloader.dataset.pipeline))
    if replaced and row is not None:
        _note(row, f'its pipeline\'s torchvision transforms ({", ".join(replaced)}) checked as mmpretrain\'s '
                   f'(torchvision does not load beside this CPU torch)')
    rng = np.random.default_rng(0)
    random.seed(0)
    np.random.seed(0)
    with tempfile.TemporaryDirectory() as tmp, DefaultScope.overwrite_default_scope('mmpretrain'):
        from mmpretrain.registry import TRANSFORMS
        compose = Compose([TRANSFORMS.build(t) for t in pipeline])
        packed = []
        for i in range(n):
            path = osp.join(tmp, f'{i}.png')
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
            packed.append(compose(dict(img_path=path, gt_label=i % 2, sample_idx=i)))
    data = model.data_preprocessor(default_collate(packed), True)
    return data['inputs'], data['data_samples']


def _replace_norm(cfg, old, new):
    """Every ``type=old`` in a config (sub)tree becomes ``type=new``; whether any did."""
    from mmfisher.openmmlab.analysis import config_dicts
    hits = [d for d in config_dicts(cfg) if d.get('type') == old]
    for d in hits:
        d['type'] = new
    return bool(hits)


def _calibrate_weight_standardisation(model):
    """mmcv's ConvAWS2d (DetectoRS) standardises its weight, then scales it by ``weight_gamma`` and shifts it
    by ``weight_beta``: buffers of ones and zeros when built, which loading a checkpoint without them sets to
    the loaded weight's per-filter std and mean (its ``_load_from_state_dict``). Left at ones, every conv
    multiplies by about sqrt(fan-in) and a random-init ResNet overflows to inf. Loads each one's own weights
    back, as loading any checkpoint does; returns whether there was any."""
    try:
        from mmcv.cnn.bricks.conv_ws import ConvAWS2d
    except ImportError:  # pragma: no cover
        return False
    found = False
    for m in model.modules():
        if isinstance(m, ConvAWS2d):
            state = {k: v for k, v in m.state_dict().items() if k not in ('weight_gamma', 'weight_beta')}
            m.load_state_dict(state, strict=False)
            found = True
    return found


def _note(row, text):
    """Add ``text`` to the row's note (what the check changed or saw, shown in the matrix)."""
    row['note'] = '; '.join(filter(None, [row.get('note'), text]))


def _mend_upstream_bugs(model, row):
    """Known bugs of the installed OpenMMLab packages, which a user meets without mmfisher too, mended
    the way their proposed fixes do; the row says so."""
    try:
        from mmpretrain.models.backbones import LeNet5
    except ImportError:  # pragma: no cover
        LeNet5 = ()
    for m in model.modules():
        if isinstance(m, LeNet5) and m.num_classes > 0 and 'single_image' not in m.__dict__:
            # mmpretrain 1.2's LeNet5 squeezes its [N, 120, 1, 1] features with a bare squeeze(), which drops
            # the batch dim of a single image (its own predict of one image fails); the spatial dims only
            m.forward = m.single_image = types.MethodType(_lenet_forward, m)   # a deep copy binds its copy
            _note(row, "mmpretrain 1.2's LeNet5 squeeze of a single image's batch dim mended (flatten(1))")
    try:
        from mmdet.models.dense_heads import SSDHead
    except ImportError:  # pragma: no cover
        return
    for m in model.modules():
        if isinstance(m, SSDHead) and not hasattr(m, 'loss_cls'):
            # mmdet 3.3's predict reads a loss_cls SSDHead never sets (open-mmlab/mmdetection#11305, #11780)
            m.loss_cls = None
            _note(row, "mmdet 3.3's SSDHead predict bug mended (open-mmlab/mmdetection#11305)")
    from mmdet.models.roi_heads.mask_heads import FCNMaskHead, fcn_mask_head
    if any(isinstance(m, FCNMaskHead) for m in model.modules()) and \
            not getattr(fcn_mask_head._do_paste_mask, 'mended', False):
        fcn_mask_head._do_paste_mask = _paste_masks_outside_the_image(fcn_mask_head._do_paste_mask, row)


def _dense_masked_conv2d(features, mask, weight, bias, padding=0, stride=1):
    """mmcv's ``masked_conv2d`` as mmcv computes it on NPU: the dense conv, zero where ``mask`` is not > 0
    (its CUDA kernel computes the conv and bias at the mask's positions only and leaves zeros elsewhere)."""
    import torch.nn.functional as F
    out = F.conv2d(features, weight, bias, stride=stride, padding=padding)
    return out * (mask > 0).to(out.dtype)


def _masked_conv_without_cpu_kernel(model, row):
    """mmcv's ``MaskedConv2d`` (guided anchoring's heads at test time) has no CPU kernel: it runs as mmcv
    runs it on NPU, and the row says so."""
    try:
        from mmcv.ops import MaskedConv2d
        from mmcv.ops import masked_conv
    except ImportError:  # pragma: no cover
        return
    if any(isinstance(m, MaskedConv2d) for m in model.modules()) and \
            masked_conv.masked_conv2d is not _dense_masked_conv2d:
        masked_conv.masked_conv2d = _dense_masked_conv2d
        _note(row, "mmcv's MaskedConv2d (no CPU kernel) run as mmcv runs it on NPU: the dense conv times its mask")


def _milan_decoder_width(cfg, row):
    """mmpretrain 1.2's MILAN config (ViT-B) leaves its decoder's ``embed_dim`` at the class default, 1024
    (ViT-L's width), so its train step fails on the 768-wide latent. The decoder is checked with its
    backbone's width, as the ViT-B config of MAE, whose decoder MILAN's extends, sets it."""
    neck, backbone = cfg.model.get('neck'), cfg.model.get('backbone')
    if not (isinstance(neck, dict) and neck.get('type') == 'MILANPretrainDecoder' and 'embed_dim' not in neck
            and isinstance(backbone, dict) and backbone.get('type') == 'MILANViT'):
        return
    from mmpretrain.models.selfsup.milan import MILANViT
    arch = backbone.get('arch', 'b')
    width = arch['embed_dims'] if isinstance(arch, dict) else MILANViT.arch_zoo[arch.lower()]['embed_dims']
    if width != 1024:
        neck['embed_dim'] = width
        _note(row, f"mmpretrain 1.2's MILAN config: its decoder's embed_dim (the default 1024) set to its "
                   f"backbone's width, {width}")


def _distilled_head(d):
    """Whether config dict ``d`` builds a head with its distillation branch on (EfficientFormer's and LeViT's
    heads: ``distillation=True``, their default)."""
    import inspect
    if 'Head' not in str(d.get('type')):
        return False
    if 'distillation' in d:
        return d['distillation'] is True
    try:
        from mmpretrain.registry import MODELS
        cls = MODELS.get(d['type'])
        default = inspect.signature(cls).parameters.get('distillation')
    except Exception:  # noqa: BLE001  (not an mmpretrain head)
        return False
    return default is not None and default.default is True


def _generated_gallery(model, shape, row):
    """An image retriever whose gallery (``prototype``) is a dataset config (ArcFace on InShop, which is not
    here): a gallery of 8 random feature vectors of the size its features have on a ``shape`` input."""
    import torch
    try:
        from mmpretrain.models.retrievers import ImageToImageRetriever
    except ImportError:  # pragma: no cover
        return
    if not isinstance(model, ImageToImageRetriever) or isinstance(model.prototype, torch.Tensor):
        return
    with torch.no_grad():
        feats = model.extract_feat(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    feats = feats[-1] if isinstance(feats, tuple) else feats
    named = (model.prototype.get('dataset') or {}).get('type') if isinstance(model.prototype, dict) else None
    model.prototype = torch.randn(8, feats.shape[-1], generator=torch.Generator().manual_seed(1))
    _note(row, f'its gallery: 8 random feature vectors, not the dataset its config names ({named or "a loader"})')


def _lenet_forward(self, x):
    """LeNet5's forward with its features flattened from dim 1 (:func:`_mend_upstream_bugs`)."""
    return (self.classifier(self.features(x).flatten(1)),)


def _paste_masks_outside_the_image(paste, row):
    """mmdet 3.3's mask pasting on CPU (``skip_empty``) pastes into the region the boxes span, clamped to
    the image; when every box lies outside the image that region is empty and ``torch.arange`` raises
    (on GPU the same call pastes over the whole image and returns empty masks). Random-init cascades
    (QueryInst's six refinement stages) do send every box out. Mended by taking the GPU path there."""
    import torch

    def mended(masks, boxes, img_h, img_w, skip_empty=True):
        if skip_empty and len(boxes):
            x0, y0 = torch.clamp(boxes.min(dim=0).values.floor()[:2] - 1, min=0)
            x1 = torch.clamp(boxes[:, 2].max().ceil() + 1, max=img_w)
            y1 = torch.clamp(boxes[:, 3].max().ceil() + 1, max=img_h)
            if x0 > x1 or y0 > y1:
                if 'every box outside' not in row.get('note', ''):
                    _note(row, "mmdet 3.3's CPU mask pasting with every box outside the image mended "
                               "(the GPU path: empty masks)")
                skip_empty = False
        return paste(masks, boxes, img_h, img_w, skip_empty=skip_empty)
    mended.mended = True
    return mended


# torchvision transforms in a pipeline (mmpretrain registers them as ``torchvision/<name>`` only when
# torchvision imports), as the mmpretrain transform giving the same shapes
_TORCHVISION_AS = {
    'Resize': lambda t: dict(type='ResizeEdge', scale=t['size'], edge='short')
    if isinstance(t['size'], int) else dict(type='Resize', scale=tuple(t['size'])[::-1]),
    'CenterCrop': lambda t: dict(type='CenterCrop', crop_size=t['size']),
    'RandomCrop': lambda t: dict(type='RandomCrop', crop_size=t['size'], padding=t.get('padding'),
                                 padding_mode=t.get('padding_mode', 'constant')),
    'RandomResizedCrop': lambda t: dict(type='RandomResizedCrop', scale=t['size']),
    'RandomHorizontalFlip': lambda t: dict(type='RandomFlip', prob=t.get('p', 0.5), direction='horizontal'),
}


def _without_torchvision(pipeline):
    """``(pipeline, names replaced)``: ``torchvision/*`` transforms as mmpretrain's (:data:`_TORCHVISION_AS`),
    the PIL round trip around them (``ToPIL``, ``ToNumpy``) dropped. An unknown one stays (and fails)."""
    out, replaced = [], []
    uses = any(isinstance(t, dict) and str(t.get('type', '')).startswith('torchvision/') for t in pipeline)
    for t in pipeline:
        kind = str(t.get('type', '')) if isinstance(t, dict) else ''
        if uses and kind in ('ToPIL', 'NumpyToPIL', 'ToNumpy', 'PILToNumpy'):
            continue
        name = kind[len('torchvision/'):] if kind.startswith('torchvision/') else None
        if name in _TORCHVISION_AS:
            out.append(_TORCHVISION_AS[name](t))
            replaced.append(name)
        else:
            out.append(t)
    return out, replaced


def _scratch():
    """The worker's scratch folder, deleted when the process ends."""
    global _TMP
    _TMP = _TMP or tempfile.TemporaryDirectory()
    return _TMP.name


# tokenizers that mmpretrain's multimodal models load from HuggingFace by name: with BERT's vocabulary
# (BLIP), with a byte-level BPE (OFA's BART tokenizer)
BERT_TOKENIZERS = ('BlipTokenizer',)
BPE_TOKENIZERS = ('OFATokenizer',)


def language_models(cfg):
    """``(dict, key)`` of every entry of ``cfg.model`` that names a BERT or its vocabulary to download: a
    ``BertModel``'s ``name`` (GLIP, Grounding DINO), and the same name wherever else the model repeats it
    (GLIP's head reads the BERT config by it); a BERT tokenizer's ``name_or_path`` (BLIP, whose BERT
    networks are built from its config); a ``FullTokenizer``'s ``vocab_file`` URL (Chinese CLIP)."""
    from mmfisher.openmmlab.analysis import config_dicts
    if 'model' not in cfg:
        return []
    dicts = list(config_dicts(cfg.model))
    names = {d.get('name', 'bert-base-uncased') for d in dicts if d.get('type') == 'BertModel'}
    found = [(d, k) for d in dicts for k, v in d.items() if isinstance(v, str) and v in names]
    found += [(d, 'name_or_path') for d in dicts
              if d.get('type') in BERT_TOKENIZERS and 'name_or_path' in d and (d, 'name_or_path') not in found]
    return found + [(d, 'vocab_file') for d in dicts
                    if d.get('type') == 'FullTokenizer' and not osp.isfile(str(d.get('vocab_file')))]


def bpe_tokenizers(cfg):
    """The entries of ``cfg.model`` that load a byte-level BPE tokenizer by name (OFA's)."""
    from mmfisher.openmmlab.analysis import config_dicts
    return [d for d in config_dicts(cfg.get('model', {})) if d.get('type') in BPE_TOKENIZERS]


def trained_apart(model):
    """A tracker with no train step of its own, whose detector and ReID network mmdet trains with their own
    configs (DeepSORT)."""
    try:
        from mmdet.models.mot import DeepSORT
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, DeepSORT)


def check(config, shape, fraction):
    """Everything about one config, as plain data."""
    import copy

    import torch
    from mmengine.config import Config

    from mmfisher.core import ConsumerInputs, copy_model, make_spec, shrink
    from mmfisher.core.uniform import random_keep
    from mmfisher.openmmlab import analyse_model, build_from_config
    from mmfisher.openmmlab.decisions import SameDecisions
    from mmfisher.openmmlab.analysis import default_scope_of, example_samples
    from mmfisher.openmmlab.synthetic import loss_of, one_frame_video, random_batch, randomise_norms
    from mmfisher.openmmlab.tools_common import analysis_shape

    t0 = time.perf_counter()
    row = {'config': config}
    cfg = _step('config', lambda: Config.fromfile(config), harness=True)
    if 'model' not in cfg:
        raise NoModel('config: no model in it (a dataset, schedule or test-time augmentation template)')
    classifier = default_scope_of(cfg) == 'mmpretrain'
    # a classifier at the size and channels its config's test pipeline and data preprocessor give (LeNet:
    # 1x32x32, swin-v2: 256), a detector at --shape
    channels, *hw = analysis_shape(cfg, None) if classifier else (3, shape, shape)
    hw = tuple(hw)
    torch.manual_seed(0)
    if cfg.get('model', {}).get('teacher_ckpt'):
        cfg.model.teacher_ckpt = None        # knowledge distillation: a random-init teacher, nothing downloaded
    if _replace_norm(cfg.model, 'MMSyncBN', 'BN'):
        # mmcv's SyncBN needs a process group to be built and CUDA to train: one CPU process checks the
        # same network with plain BN, and the row says so
        _note(row, "mmcv's MMSyncBN checked as BN")
    from mmfisher.openmmlab.analysis import config_dicts
    torchvision_ops = [d for d in config_dicts(cfg.model) if d.get('use_torchvision')]
    for d in torchvision_ops:
        d['use_torchvision'] = False     # torchvision does not load beside this CPU torch: mmcv's same op
    if torchvision_ops:
        _note(row, "torchvision's RoI op checked as mmcv's")
    distilled = [d for d in config_dicts(cfg.model) if _distilled_head(d)]
    for d in distilled:
        # EfficientFormer's and LeViT's distilled heads have no train step in mmpretrain ("doesn't support
        # training in distillation mode"): their configs' heads are checked as mmpretrain trains them
        d['distillation'] = False
    if distilled:
        _note(row, f"{distilled[0]['type']} checked without its distillation branch (mmpretrain trains none)")
    language = language_models(cfg)
    if language:
        # GLIP / Grounding DINO load BERT by name from HuggingFace: a generated one, random weights,
        # nothing downloaded (this process's temporary folder, deleted with it)
        from mmfisher.openmmlab.synthetic import generated_language_model
        folder = _step('generated language model', lambda: generated_language_model(
            osp.join(_scratch(), 'bert')), harness=True)
        for d, key in language:
            d[key] = osp.join(folder, 'vocab.txt') if key == 'vocab_file' else folder
        with open(osp.join(folder, 'vocab.txt')) as f:
            words = len(f.read().split())
        if any(d.get('type') == 'BertModel' for d, _ in language):
            _note(row, f'its BERT generated (bert-base, random weights, a {words}-token vocabulary)')
        else:
            _note(row, f'its BERT tokenizer generated (a {words}-token vocabulary)')
    bpe = bpe_tokenizers(cfg)
    if bpe:
        # OFA loads its BART tokenizer by name from HuggingFace: a generated one (bytes, no merges)
        from mmfisher.openmmlab.synthetic import generated_bpe_tokenizer
        folder = _step('generated tokenizer', lambda: generated_bpe_tokenizer(osp.join(_scratch(), 'bpe')),
                       harness=True)
        for d in bpe:
            d['name_or_path'] = folder
        _note(row, 'its BPE tokenizer generated (the 256 bytes, no merges)')
    clip_targets = [d for d in config_dicts(cfg.model)
                    if d.get('type') == 'CLIPGenerator' and not osp.isfile(str(d.get('tokenizer_path')))]
    if clip_targets:
        # MILAN's target generator loads a CLIP ViT-B/16 checkpoint by URL when it is built: a generated one,
        # random weights, nothing downloaded (this process's temporary folder, deleted with it)
        from mmfisher.openmmlab.synthetic import generated_clip_checkpoint
        path = _step('generated CLIP checkpoint', lambda: generated_clip_checkpoint(
            osp.join(_scratch(), 'clip_vit_base_16.pth')), harness=True)
        for d in clip_targets:
            d['tokenizer_path'] = path
        _note(row, 'its CLIP target generator generated (ViT-B/16, random weights)')
    _milan_decoder_width(cfg, row)
    downloads = sorted({d['name_or_path'] for d in config_dicts(cfg.model)
                        if isinstance(d.get('name_or_path'), str) and not osp.exists(d['name_or_path'])})
    if downloads:
        # BLIP-2, Flamingo, LLaVA, MiniGPT-4, Otter: 2.7-7B-parameter language models (OPT, LLaMA, Baichuan)
        raise Harness(f'build: loads {", ".join(downloads)} from HuggingFace by name; the check generates '
                      'BERT-sized language models and tokenizers only')
    model = _step('build', lambda: build_from_config(cfg), harness=True)
    if trained_apart(model):
        # DeepSORT has no train step: mmdet trains its detector and its ReID network with configs of their
        # own (the reid family's row checks a ReID). Its detector is checked, as that config trains it
        # (the SORT and StrongSORT rows are their folders' detector configs)
        det = copy.deepcopy(cfg.model.detector)
        tdp = cfg.model.get('data_preprocessor', {})
        det.data_preprocessor = dict(type='DetDataPreprocessor', **{k: v for k, v in tdp.items() if k != 'type'})
        cfg.model = det
        tracker_name = type(model).__name__
        torch.manual_seed(0)
        model = _step('build (its detector)', lambda: build_from_config(cfg), harness=True)
        _note(row, f'its detector checked (a {type(model).__name__}): {tracker_name} has no train step, mmdet '
                   'trains its detector and ReID apart')
    try:
        from mmdet.models.reid import BaseReID
        if isinstance(model, BaseReID):
            hw = (256, 128)     # person crops: its neck's pooling kernel is sized for a 256x128 input
    except ImportError:  # pragma: no cover
        pass
    if any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()):
        from mmengine.model import revert_sync_batchnorm
        model = revert_sync_batchnorm(model)     # one CPU process: no process group for SyncBN's train step
    if _calibrate_weight_standardisation(model):
        _note(row, "mmcv's ConvAWS2d calibrated to its random weights, as loading any checkpoint does")
    randomise_norms(model)
    model.eval()
    _mend_upstream_bugs(model, row)
    _masked_conv_without_cpu_kernel(model, row)
    _generated_gallery(model, (1, channels) + tuple(hw), row)
    try:
        from mmpretrain.models import BaseSelfSupervisor
        selfsup = isinstance(model, BaseSelfSupervisor)
    except ImportError:  # pragma: no cover
        selfsup = False
    try:
        from mmdet.models.mot import BaseMOTModel
        tracker = isinstance(model, BaseMOTModel)
    except ImportError:  # pragma: no cover
        tracker = False
    # a backbone-only config (DINOv2, EVA, SAM, GLIP's image encoder: no head, so no loss): a feature extractor
    # for other models. Its features are analysed, shrunk and compared; there is nothing to train or predict
    headless = classifier and not selfsup and getattr(model, 'head', 1) is None
    if headless:
        _note(row, 'a backbone-only config (no head, no loss): its features are checked, nothing to train')
    elif classifier and not callable(getattr(model, 'loss', None)):
        # Chinese CLIP, OFA: mmpretrain runs them zero-shot or fine-tuned elsewhere, with no loss of its own
        headless = True
        _note(row, 'no loss in mmpretrain (inference only): its tensor outputs are checked, nothing to train')

    def inputs_at(hw):
        """The analysis input, its samples and a training batch at ``hw``."""
        # a self-supervised model on two images, its training batch's size: SparK's sparse convs read the
        # mask of the last training batch (a class attribute), whatever batch they are given
        x = torch.randn(2 if selfsup else 1, channels, *hw, generator=torch.Generator().manual_seed(0))
        samples = example_samples(model, tuple(x.shape))
        if selfsup:      # several views / a mask: the config's own pipeline on generated images
            batch = _step('generated batch (the config\'s train pipeline)', lambda: pipeline_batch(cfg, model, row=row),
                          harness=True)
        else:
            batch = _step('generated batch', lambda: random_batch(model, 2, hw, channels=channels),
                          harness=True)
        return x, samples, batch

    def train_and_predict(m, what, harness):
        def run():
            m.train()
            loss = loss_of(m, batch[0], copy.deepcopy(batch[1]))   # the loss edits proposals in place
            loss.backward()
            if not torch.isfinite(loss):
                raise FloatingPointError(f'loss {float(loss)}')
            m.eval()
            with torch.no_grad():
                if selfsup:      # no predict of their own: the features they are trained for, on a
                    views = batch[0]     # view of the training batch (SparK keeps the batch's mask)
                    m(views[0] if isinstance(views, list) else views, mode='tensor')
                elif tracker and batch[0].dim() == 4:    # a one-frame video ([N, T, C, H, W]), as a tracker is deployed
                    m.predict(*one_frame_video(batch[0][:1], batch[1][0]))
                else:    # one image (a video model: its training video), as a detector is deployed (mmcv's
                    # masked conv takes no more)
                    m.predict(batch[0][:1], copy.deepcopy(batch[1][:1]))
        _step(f'{what} train step / predict', run, harness=harness)

    from mmengine.logging import MessageHub
    hub = MessageHub.get_current_instance()      # what a runner tells the model (TOOD reads the epoch)
    hub.update_info('epoch', 0)
    hub.update_info('iter', 0)
    # the control: the original model's own train step and predict. Two retries, each said in the row:
    # a detector whose coarsest level is too small at --shape for its own kernels (SSD300's extra layers,
    # DDOD's deformable conv on P7) gets twice the size; a model whose own init_weights sets more than
    # random values (Sparse R-CNN's initial proposals: whole-image boxes) gets it, as a runner calls it
    attempts = [(hw, False)] if classifier or hw != (shape, shape) else \
        [(hw, False), ((2 * shape, 2 * shape), False), (hw, True), ((2 * shape, 2 * shape), True)]
    initialised, first_error = False, None
    for i, (hw, init) in enumerate(attempts):
        if init and not initialised:
            _step('init_weights', model.init_weights, harness=True)
            _calibrate_weight_standardisation(model)
            randomise_norms(model)
            initialised = True
        x, samples, batch = inputs_at(hw)
        if headless:
            break
        try:
            train_and_predict(copy_model(model), 'original model', harness=True)
            break
        except Harness as e:
            if i + 1 == len(attempts):
                raise Harness(str(first_error or e)) from e   # the error as built, at --shape
            if not i:
                first_error = e
    if i:
        _note(row, ('after its own init_weights, ' if init else '') + f'at {hw[0]}x{hw[1]}: as built at '
                   f'{attempts[0][0][0]}x{attempts[0][0][1]}, the original model failed ({str(first_error)[:120]})')
    pristine = copy_model(model)

    def plain_forward():        # the control: the untraced network in tensor mode on the analysis input
        with torch.no_grad():
            _outputs(model, x, samples)
    _step('original model tensor forward', plain_forward, harness=True)
    graph = _step('analysis', lambda: analyse_model(model, tuple(x.shape), strict=True))
    s = graph.summary()
    row.update(groups=s['groups'], prunable_groups=s['prunable_groups'], layers=s['layers'],
               prunable_layers=s['prunable_layers'], parts=_parts(graph),
               reasons=sorted({g.reasons[0] for g in graph.groups if not g.prunable and g.reasons != ['model output']}),
               unseen=graph.unseen, loss_traced=not graph.skipped)
    if graph.skipped:
        row['loss_error'] = graph.skipped[0]
    if not s['prunable_groups']:
        row.update(status='nothing prunable', seconds=time.perf_counter() - t0)
        return row
    keep = random_keep(graph, fraction, seed=1)
    spec = json.loads(json.dumps(make_spec(graph, keep)))
    compact = _step('shrink from the JSON spec', lambda: shrink(copy_model(pristine), graph, spec))

    def compare(dtype=torch.float32):
        # torch's own ``to``: mmdet's distillation detectors (LD, LAD) override it with one that takes a device
        # only; their teacher is no submodule and runs in the loss, not in the outputs compared here
        torch.nn.Module.to(model, dtype)
        torch.nn.Module.to(compact, dtype)
        xd = x.to(dtype)
        masks = ConsumerInputs(model, graph)
        masks.set_keep(keep)
        masks.attach()
        try:
            with torch.no_grad(), SameDecisions() as decisions:
                ref, proposals = _outputs(model, xd, samples)
        finally:
            masks.detach()
        compact.eval()
        with torch.no_grad(), SameDecisions(decisions):
            out, _ = _outputs(compact, xd, samples, proposals)
        model.float()
        compact.float()
        if len(ref) != len(out):
            raise AssertionError(f'{len(ref)} outputs masked, {len(out)} compact')
        err = 0.0
        for a, b in zip(ref, out):
            if a.shape != b.shape:
                raise AssertionError(f'output shapes {tuple(a.shape)} masked, {tuple(b.shape)} compact')
            err = max(err, float((a - b).abs().max() / (a.abs().max() + 1e-6)))
        return err
    row['max_rel_err'] = _step('compare outputs', compare)
    if row['max_rel_err'] > 1e-4:
        # float32 rounding (1e-7) that the random-init network amplifies (t2t_vit: x1800) against a real
        # difference: in float64 rounding is 1e-16, so an exact shrink compares to ~1e-12, a wrong one does not
        try:
            row['max_rel_err_float64'] = compare(torch.float64)
        except Exception as e:  # noqa: BLE001  (a compiled op without float64: the float32 verdict stands)
            row['float64_error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}'
    if not headless:
        train_and_predict(compact, 'compact model', harness=False)
    exact64 = row.get('max_rel_err_float64', 1.0) <= 1e-9
    row['status'] = ('features only' if headless else 'pass') if row['max_rel_err'] <= 1e-4 or exact64 else 'fail'
    if row['status'] == 'fail':
        row['error'] = f'compact outputs differ from the masked model\'s by {row["max_rel_err"]:.2e} (relative)'
    elif exact64:
        _note(row, f'float32 {row["max_rel_err"]:.1e}: rounding the random-init network amplifies; '
                   f'float64 {row["max_rel_err_float64"]:.0e}')
    row['seconds'] = time.perf_counter() - t0
    return row


def worker(config, out, shape, fraction):
    global _STEP_FILE, _TMP
    _STEP_FILE = out + '.step'
    _TMP = tempfile.TemporaryDirectory(dir=osp.dirname(out))
    from mmfisher.openmmlab import register_all_modules
    register_all_modules()
    t0 = time.perf_counter()
    try:
        row = check(config, shape, fraction)
    except Harness as e:
        row = {'config': config, 'status': 'no model' if isinstance(e, NoModel) else 'harness', 'error': str(e)}
    except Exception as e:  # noqa: BLE001
        row = {'config': config, 'status': 'fail', 'error': str(e),
               'traceback': traceback.format_exc()[-2000:]}
    row.setdefault('seconds', time.perf_counter() - t0)
    with open(out, 'w') as f:
        json.dump(row, f)


# ---------------------------------------------------------------- the matrix
def run_family(package, family, configs, args):
    """The first candidate config whose check is neither a harness failure nor a backbone-only config's
    (else the first 'features only' row, else the last harness row; 'no model' when no candidate defines a
    model)."""
    rows = []
    for config in configs:
        rows.append(run_one(package, family, config, args))
        if rows[-1]['status'] not in ('harness', 'no model', 'features only'):
            return rows[-1]
    for status in ('features only', 'harness'):
        if any(r['status'] == status for r in rows):
            return [r for r in rows if r['status'] == status][0 if status == 'features only' else -1]
    return rows[-1]


def run_one(package, family, config, args):
    with tempfile.TemporaryDirectory() as tmp:
        out = osp.join(tmp, 'row.json')
        cmd = [sys.executable, osp.abspath(__file__), '--worker', osp.abspath(config), '--worker-out', out,
               '--shape', str(args.shape), '--fraction', str(args.fraction)]
        path = [ROOT]
        if args.language_env and needs_language_env(config):
            path.append(osp.abspath(args.language_env))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path + [os.environ.get('PYTHONPATH', '')]))
        t0 = time.perf_counter()
        try:
            # from the package's own tree: configs name others relative to it (LD's teacher config)
            cwd = osp.dirname(osp.dirname(config)) if osp.basename(osp.dirname(osp.dirname(config))) == 'configs' \
                else None
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env,
                                 cwd=osp.dirname(cwd) if cwd else None)
        except subprocess.TimeoutExpired:
            return {'package': package, 'family': family, 'config': config, 'status': 'timeout',
                    'error': f'over {args.timeout:.0f} s', 'seconds': time.perf_counter() - t0}
        if osp.isfile(out):
            with open(out) as f:
                row = json.load(f)
        else:   # the process died (a crash in a compiled op, a segfault): say so, and in which step
            step = {'step': 'start', 'harness': True}
            if osp.isfile(out + '.step'):
                with open(out + '.step') as f:
                    step = json.load(f)
            row = {'status': 'harness' if step['harness'] else 'fail',
                   'error': f'{step["step"]}: worker exited with {res.returncode} '
                            f'({res.stderr.strip().splitlines()[-1:]})'}
    row.update(package=package, family=family, config=config)
    return row


def needs_language_env(config):
    """Whether ``config``'s model loads a language model or a tokenizer by name (GLIP, Grounding DINO, BLIP,
    Chinese CLIP, OFA). Only those checks get ``--language-env`` on their path: with transformers importable,
    mmpretrain registers its multimodal models; every other row is checked with mmpretrain as it installs,
    without its multimodal extras."""
    from mmengine.config import Config
    try:
        cfg = Config.fromfile(config)
        return bool(language_models(cfg) or bpe_tokenizers(cfg))
    except Exception:  # noqa: BLE001  (the worker reports a config that does not load)
        return False


def source_commit():
    """The git commit of the mmfisher tree this runs from, with ``+changes`` when its package or tools differ
    from that commit ('unknown' outside a git checkout)."""
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        commit = out.stdout.strip()
        if not commit:
            return 'unknown'
        dirty = subprocess.run(['git', 'diff', '--quiet', 'HEAD', '--', 'mmfisher', 'tools'], cwd=ROOT,
                               capture_output=True, timeout=10)
        return commit + ('+changes' if dirty.returncode == 1 else '')
    except (OSError, subprocess.TimeoutExpired):
        return 'unknown'


def rel(config):
    for package in ('mmdet', 'mmpretrain'):
        try:
            root = config_root(package)
        except ImportError:
            continue
        if config.startswith(root):
            return osp.relpath(config, root)
    return config


def language_env_versions(folder=LANGUAGE_ENV):
    """'transformers 4.38.2, fairscale 0.4.13' as installed in ``folder`` (read from its dist-info folders: the
    packages are not importable in this process)."""
    found = {}
    if osp.isdir(folder):
        for d in os.listdir(folder):
            if d.endswith('.dist-info'):
                name, _, version = d[:-len('.dist-info')].rpartition('-')
                found[name.lower()] = version
    return ', '.join(f'{p} {found[p]}' for p in ('transformers', 'fairscale') if p in found) or 'transformers and fairscale'


def every_part_pruned(rows):
    """``(package, families passing with a prunable layer in every part they have, model families)`` per
    package (a family without a neck, as CornerNet's hourglass, counts with backbone and head)."""
    out = []
    for package in sorted({r['package'] for r in rows}):
        models = [r for r in rows if r['package'] == package and r['status'] != 'no model']
        done = [r for r in models if r['status'] == 'pass' and r.get('parts')
                and all(n_prunable > 0 for n, n_prunable in r['parts'].values() if n)]
        if models:
            out.append((package, len(done), len(models)))
    return out


def markdown(rows, args):
    import mmdet
    import mmengine
    import torch
    try:
        import mmpretrain
        pre = mmpretrain.__version__
    except ImportError:
        pre = 'not installed'
    counts = {}
    for r in rows:
        counts[r['status']] = counts.get(r['status'], 0) + 1
    lines = [
        '# Support matrix',
        '',
        f'`python tools/analysis_tools/zoo_check.py{" --families " + " ".join(args.families) if args.families else ""}'
        f' --shape {args.shape} --fraction {args.fraction}` with mmdet {mmdet.__version__}, mmpretrain {pre}, '
        f'mmengine {mmengine.__version__}, torch {torch.__version__}, mmfisher commit '
        f'{", ".join(sorted({r.get("commit", "unknown") for r in rows}))}: ' +
        ', '.join(f'{v} {k}' for k, v in sorted(counts.items())) + '.',
        '',
    ] + [f'{package}: {done} of {total} model families pass with every part they have (backbone, neck, head) '
         f'pruned ({done / total:.1%}).' for package, done, total in every_part_pruned(rows) if package == 'mmdet'] + [
        '',
        f'Per family, one config (random weights; detectors at {args.shape}x{args.shape}, classifiers at the size '
        'and channels of their config\'s test pipeline): strict analysis; every prunable group cut to a random '
        f'{args.fraction:.0%}; the compact model shrunk from the JSON spec; its outputs against the masked '
        'model\'s (the compact run replays the masked run\'s top-k, sort, NMS and threshold choices, and the RoI heads '
        'of two-stage detectors get the masked run\'s proposals); one train step '
        'and one predict on it. '
        'Prunable layers: conv/linear layers in a prunable group, per part.' +
        (f' Models that load a language model or a tokenizer by name (GLIP, Grounding DINO, BLIP, Chinese CLIP, '
         f'OFA) are checked with {language_env_versions()} from `.language_env` (`tools/setup_env.sh`) on their '
         'path only, and a generated BERT or tokenizer (random weights, small vocabularies), as each row says.'
         if any(r.get('note', '').startswith(('its BERT', 'its BPE tokenizer')) for r in rows) else ''),
        '',
        '| package | family | config | status | groups (prunable) | prunable layers: backbone / neck / head | '
        'max rel. error | not prunable, first reasons | s |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        parts = r.get('parts', {})
        share = ' / '.join(f'{parts[p][1]}/{parts[p][0]}' if p in parts else '-' for p in ('backbone', 'neck', 'head'))
        reasons = '; '.join(x.replace('|', '/') for x in r.get('reasons', [])[:2])
        if r.get('error'):
            reasons = f'**{r["error"]}**'.replace('|', '/') + ('; ' + reasons if reasons else '')
        elif r.get('note'):
            reasons = f'*{r["note"]}*' + ('; ' + reasons if reasons else '')
        err = f'{r["max_rel_err"]:.1e}' if 'max_rel_err' in r else '-'
        groups = f'{r["groups"]} ({r["prunable_groups"]})' if 'groups' in r else '-'
        lines.append(f'| {r["package"]} | {r["family"]} | `{rel(r["config"])}` | {r["status"]} | {groups} | '
                     f'{share if parts else "-"} | {err} | {reasons} | {r.get("seconds", 0):.0f} |')
    return '\n'.join(lines) + '\n'


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker, args.worker_out, args.shape, args.fraction)
    from mmfisher.openmmlab import register_all_modules
    register_all_modules()
    if args.configs:
        todo = [('mmpretrain' if 'mmpretrain' in c else 'mmdet', osp.basename(osp.dirname(c)), [c])
                for c in args.configs]
    else:
        todo = family_configs(args.packages, args.families)
    if not todo:
        sys.exit('error: no config to check (see --packages / --families / --configs)')
    rows = [None] * len(todo)
    if args.resume and args.json and osp.isfile(args.json):
        with open(args.json) as f:
            done = {(r['package'], r['family'], tuple(r.get('candidates', ()))): r for r in json.load(f)}
        rows = [done.get((package, family, tuple(configs))) for package, family, configs in todo]
        print(f'[zoo] {sum(r is not None for r in rows)} families kept from {args.json}', flush=True)
    commit = source_commit()

    def save():
        if args.json:
            tmp = args.json + '.part'
            with open(tmp, 'w') as f:
                json.dump([r for r in rows if r is not None], f, indent=1)
            os.replace(tmp, args.json)

    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(run_family, *t, args): i for i, t in enumerate(todo) if rows[i] is None}
        for fut in concurrent.futures.as_completed(futures):
            i = futures[fut]
            rows[i] = dict(fut.result(), commit=commit, candidates=list(todo[i][2]))
            r = rows[i]
            print(f'[zoo] {r["package"]}/{r["family"]}: {r["status"]}'
                  + (f' ({r["error"]})' if r.get('error') else '')
                  + (f', max rel. error {r["max_rel_err"]:.1e}' if 'max_rel_err' in r else ''), flush=True)
            save()
    text = markdown(rows, args)
    print(text)
    if args.md:
        with open(args.md, 'w') as f:
            f.write(text)
    save()
    return rows


if __name__ == '__main__':
    main()
