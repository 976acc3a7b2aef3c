"""The support matrix tool on a small fixed subset: TOOD (whose offsets only a deformable sampling reads)
and an mmpretrain MobileNetV2 pass; LeNet-5 passes on the one-channel 32x32 images of its config; MoCo v2 (two views from its own pipeline; its momentum
encoder loses its source's channels) passes; T2T-ViT, whose random-init network amplifies float32
rounding past 1e-4, passes on its float64 re-check; mmdet's ReID classifier (256x128 person crops)
passes; Sparse R-CNN, whose random initial proposals are boxes of negative size until its own
init_weights makes them whole-image boxes, passes after that retry, which its row says; DeepSORT, which
has no train step of its own, is checked as its detector, which its row says; a config the
harness cannot build is a harness row, not a failure."""
import json
import os
import os.path as osp
import subprocess
import sys

ROOT = osp.abspath(osp.join(osp.dirname(__file__), '..'))


def test_zoo_check_on_a_fixed_subset(tmp_path):
    from helpers import config_path
    broken = tmp_path / 'broken.py'
    broken.write_text("_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py']\nmodel = dict(type='NoSuchDetector')\n")
    configs = [config_path('mmdet', 'tood/tood_r50_fpn_1x_coco.py'),
               config_path('mmpretrain', 'mobilenet_v2/mobilenet-v2_8xb32_in1k.py'),
               config_path('mmpretrain', 'lenet/lenet5_mnist.py'),
               config_path('mmpretrain', 'mocov2/mocov2_resnet50_8xb32-coslr-200e_in1k.py'),
               config_path('mmpretrain', 't2t_vit/t2t-vit-t-14_8xb64_in1k.py'),
               config_path('mmdet', 'reid/reid_r50_8xb32-6e_mot17train80_test-mot17val20.py'),
               config_path('mmdet', 'sparse_rcnn/sparse-rcnn_r50_fpn_1x_coco.py'),
               config_path('mmdet', 'deepsort/deepsort_faster-rcnn_r50_fpn_8xb2-4e_mot17train_test-mot17test.py'),
               str(broken)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, 'tools/analysis_tools/zoo_check.py', '--configs', *configs, '--shape', '128',
                          '--md', str(tmp_path / 'matrix.md'), '--json', str(tmp_path / 'matrix.json')],
                         cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows_in_order = json.load(open(tmp_path / 'matrix.json'))
    assert all(r['commit'] and r['candidates'] for r in rows_in_order)
    rows = {osp.basename(r['config']): r for r in rows_in_order}
    tood = rows['tood_r50_fpn_1x_coco.py']
    assert tood['status'] == 'pass' and tood['max_rel_err'] <= 1e-4
    assert any('compiled op DeformConv2dFunction' in r for r in tood['reasons'])
    assert rows['mobilenet-v2_8xb32_in1k.py']['status'] == 'pass'
    lenet = rows['lenet5_mnist.py']      # 1x32x32 inputs, as its config gives; mmpretrain's batch-1 squeeze mended
    assert lenet['status'] == 'pass' and 'LeNet5 squeeze' in lenet['note'], lenet
    assert rows['mocov2_resnet50_8xb32-coslr-200e_in1k.py']['status'] == 'pass'
    t2t = rows['t2t-vit-t-14_8xb64_in1k.py']
    assert t2t['status'] == 'pass' and t2t['max_rel_err'] > 1e-4 and t2t['max_rel_err_float64'] <= 1e-9, t2t
    reid = rows['reid_r50_8xb32-6e_mot17train80_test-mot17val20.py']     # 256x128 crops, LabelData labels
    assert reid['status'] == 'pass' and reid['max_rel_err'] <= 1e-4, reid
    sparse = rows['sparse-rcnn_r50_fpn_1x_coco.py']
    assert sparse['status'] == 'pass' and sparse['max_rel_err'] <= 1e-4, sparse
    assert sparse['note'].startswith('after its own init_weights, at 128x128: as built at 128x128'), sparse['note']
    deepsort = rows['deepsort_faster-rcnn_r50_fpn_8xb2-4e_mot17train_test-mot17test.py']   # no train step of its own
    assert deepsort['status'] == 'pass' and deepsort['note'].startswith('its detector checked (a FasterRCNN)'), deepsort
    assert rows['broken.py']['status'] == 'harness' and 'NoSuchDetector' in rows['broken.py']['error']
    md = (tmp_path / 'matrix.md').read_text()
    assert '| mmdet | tood | `tood/tood_r50_fpn_1x_coco.py` | pass |' in md

    # --resume keeps what the JSON holds: nothing is checked again
    again = subprocess.run([sys.executable, 'tools/analysis_tools/zoo_check.py', '--configs', *configs, '--shape', '128',
                            '--json', str(tmp_path / 'matrix.json'), '--resume'],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert '9 families kept' in again.stdout and '[zoo] ' not in again.stdout.replace('[zoo] 9 families kept', '')
    assert json.load(open(tmp_path / 'matrix.json')) == list(rows_in_order)


def _zoo_check():
    import importlib.util
    path = osp.join(ROOT, 'tools', 'analysis_tools', 'zoo_check.py')
    spec = importlib.util.spec_from_file_location('zoo_check', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mask_pasting_with_every_box_outside_the_image_takes_the_gpu_path():
    """mmdet 3.3 pastes masks on CPU into the region the boxes span; with every box beyond the image
    (QueryInst's random-init cascade) that region is empty and torch.arange raises. The mend takes the
    path mmdet takes on GPU (paste over the whole image): empty masks, said in the row."""
    import pytest
    import torch
    from mmdet.models.roi_heads.mask_heads.fcn_mask_head import _do_paste_mask
    masks = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    outside = torch.tensor([[300., 10., 340., 50.], [280., 0., 400., 90.], [270., 200., 290., 250.]])
    with pytest.raises(RuntimeError):
        _do_paste_mask(masks, outside, 256, 256, skip_empty=True)
    row = {}
    mended = _zoo_check()._paste_masks_outside_the_image(_do_paste_mask, row)
    out, where = mended(masks, outside, 256, 256, skip_empty=True)
    gpu_path, _ = _do_paste_mask(masks, outside, 256, 256, skip_empty=False)
    assert out.shape == (3, 256, 256) and where == () and torch.equal(out, gpu_path) and not out.any()
    assert 'every box outside the image' in row['note']
    inside = torch.tensor([[10., 20., 60., 90.], [100., 100., 250., 200.], [0., 0., 30., 30.]])
    row = {}
    out, where = mended(masks, inside, 256, 256, skip_empty=True)      # the usual case: unchanged, no note
    ref, ref_where = _do_paste_mask(masks, inside, 256, 256, skip_empty=True)
    assert torch.equal(out, ref) and where == ref_where and 'note' not in row


def test_weight_standardised_convs_are_calibrated_to_their_weights_as_loading_does():
    """DetectoRS's ConvAWS2d standardises its weight and rescales it by buffers that are ones and zeros
    when built (a random-init ResNet of them overflows); loading weights sets the buffers to the weight's
    per-filter std and mean. After the calibration each conv computes the plain conv of its own weights."""
    import torch
    import torch.nn.functional as F
    from mmcv.cnn.bricks.conv_ws import ConvAWS2d
    torch.manual_seed(0)
    net = torch.nn.Sequential(ConvAWS2d(8, 16, 3, padding=1), torch.nn.ReLU(), ConvAWS2d(16, 4, 1))
    x = torch.randn(2, 8, 10, 10)
    plain = F.conv2d(F.relu(F.conv2d(x, net[0].weight, net[0].bias, padding=1)), net[2].weight, net[2].bias)
    assert (net(x) - plain).abs().max() > 1.0            # as built: standardised weights, far larger outputs
    assert _zoo_check()._calibrate_weight_standardisation(net)
    torch.testing.assert_close(net(x), plain, rtol=1e-5, atol=1e-5)
    assert not _zoo_check()._calibrate_weight_standardisation(torch.nn.Conv2d(3, 3, 1))


def test_grounding_dino_passes_with_a_generated_bert_and_its_checkpointed_encoder(tmp_path):
    """Grounding DINO (R50): its BERT is generated (random weights, nothing downloaded), its batches carry a
    text prompt, its tensor forward is what predict runs up to the head; its encoder layers are wrapped by
    fairscale's activation checkpointing (``num_cp=6``), whose weak self-reference a plain deepcopy would
    leave pointing at the original layers. transformers and fairscale come from .language_env
    (tools/setup_env.sh), on the check's path only."""
    from helpers import config_path
    assert osp.isdir(osp.join(ROOT, '.language_env', 'transformers')), 'run tools/setup_env.sh (step 5)'
    config = config_path('mmdet', 'grounding_dino/grounding_dino_r50_scratch_8xb2_1x_coco.py')
    res = subprocess.run([sys.executable, 'tools/analysis_tools/zoo_check.py', '--configs', config, '--shape', '128',
                          '--json', str(tmp_path / 'matrix.json'), '--md', str(tmp_path / 'matrix.md')],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    row, = json.load(open(tmp_path / 'matrix.json'))
    assert row['status'] == 'pass', row
    assert 'BERT generated' in row['note']
    assert all(row['parts'][p][1] > 0 for p in ('backbone', 'neck', 'head')), row['parts']
    assert 'checked with transformers 4.38.2, fairscale 0.4.13 from `.language_env`' in (tmp_path / 'matrix.md').read_text()


def test_masked_conv_without_a_cpu_kernel_runs_as_a_dense_conv_zeroed_off_the_mask():
    """mmcv's MaskedConv2d (guided anchoring) has no CPU kernel; the check runs it as mmcv does on NPU. The
    reference is the op's definition, one output position at a time: conv and bias where the mask is > 0,
    zero elsewhere."""
    import torch
    from mmcv.ops import MaskedConv2d, masked_conv
    zoo = _zoo_check()
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(1, 3, 6, 7, generator=g), torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g)
    mask = (torch.rand(1, 6, 7, generator=g) > 0.5).float()
    ref = torch.zeros(1, 4, 6, 7)
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(6):
        for j in range(7):
            if mask[0, i, j] > 0:
                ref[0, :, i, j] = (w * xp[0, :, i:i + 3, j:j + 3]).sum((1, 2, 3)) + b
    assert torch.allclose(zoo._dense_masked_conv2d(x, mask, w, b, padding=1), ref, atol=1e-5)

    conv = MaskedConv2d(3, 4, 3, padding=1)
    row = {}
    before = masked_conv.masked_conv2d
    try:
        zoo._masked_conv_without_cpu_kernel(torch.nn.Sequential(conv), row)
        assert 'MaskedConv2d' in row['note']
        with torch.no_grad():
            out = conv(x, mask)
        assert torch.allclose(out, zoo._dense_masked_conv2d(x, mask, conv.weight, conv.bias, padding=1))
    finally:
        masked_conv.masked_conv2d = before


def test_a_generated_clip_checkpoint_loads_as_milans_target_generator_loads_its_download(tmp_path):
    """MILAN's CLIPGenerator builds CLIP from the checkpoint it downloads; a generated one (small here) builds
    the image tower its shapes say, every key matched, nothing downloaded."""
    import torch
    from mmfisher.openmmlab.synthetic import generated_clip_checkpoint     # first: mmpretrain without torchvision
    from mmpretrain.models.selfsup.milan import CLIPGenerator
    path = generated_clip_checkpoint(str(tmp_path / 'clip.pth'), vision_layers=2, vision_width=64)
    gen = CLIPGenerator(path)
    assert gen.tokenizer.visual.conv1.weight.shape == (64, 3, 16, 16)
    assert len(gen.tokenizer.visual.transformer.resblocks) == 2
    state = torch.load(path, weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in gen.tokenizer.state_dict().items() if k in state)
    feats = gen(torch.randn(1, 3, 224, 224))
    assert feats[0].shape[-1] == 512          # the features MILAN's head is trained to predict
