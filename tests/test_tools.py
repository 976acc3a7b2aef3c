"""The command-line tools run on real configs."""
import json
import os
import subprocess
import sys

from helpers import config_path

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def test_print_groups_on_retinanet(tmp_path):
    out_json = tmp_path / 'groups.json'
    cfg = config_path('mmdet', 'retinanet/retinanet_r50_fpn_1x_coco.py')
    res = subprocess.run([sys.executable, 'tools/analysis_tools/print_groups.py', cfg, '--shape', '128', '128',
                          '--json', str(out_json)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert '[0] backbone.conv1: 64 channels x 1 -- prunable' in res.stdout
    assert 'bbox_head.retina_cls: 720 channels x 1 -- NOT prunable: model output' in res.stdout
    assert '47/49 groups prunable, 71/71 conv/linear layers prunable (100.0%)' in res.stdout
    data = json.loads(out_json.read_text())
    assert data['summary']['prunable_groups'] == 47 and len(data['groups']) == 49


def test_print_groups_takes_cfg_options_as_mmengine_tools_do(tmp_path):
    """Values are parsed by mmengine's DictAction, never evaluated as Python."""
    cfg = config_path('mmdet', 'retinanet/retinanet_r50_fpn_1x_coco.py')
    marker = tmp_path / 'evaluated'
    subprocess.run([sys.executable, 'tools/analysis_tools/print_groups.py', cfg, '--shape', '96', '96',
                    '--cfg-options', f"model.bbox_head.stacked_convs=(__import__('pathlib').Path('{marker}').touch() or 2)"],
                   cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert not marker.exists()
    res = subprocess.run([sys.executable, 'tools/analysis_tools/print_groups.py', cfg, '--shape', '96', '96',
                          '--cfg-options', 'model.bbox_head.stacked_convs=2'],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert '43/45 groups prunable, 67/67 conv/linear' in res.stdout   # two head convs fewer per branch


def test_print_groups_on_a_classifier_uses_its_configs_input_size_and_channels(tmp_path):
    """LeNet-5 on MNIST: one channel (its data preprocessor normalises one) at 32x32 (its test pipeline)."""
    out_json = tmp_path / 'groups.json'
    res = subprocess.run([sys.executable, 'tools/analysis_tools/print_groups.py',
                          config_path('mmpretrain', 'lenet/lenet5_mnist.py'), '--json', str(out_json)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'input 1x1x32x32' in res.stdout
    assert json.loads(out_json.read_text())['input_shape'] == [1, 1, 32, 32]


def test_analysis_shape_follows_the_configs_test_pipeline():
    from mmengine.config import Config

    from mmfisher.openmmlab.tools_common import analysis_shape
    swin = Config.fromfile(config_path('mmpretrain', 'swin_transformer_v2/swinv2-base-w16_16xb64_in1k-256px.py'))
    assert analysis_shape(swin, None) == (3, 256, 256)           # ResizeEdge 292, then CenterCrop 256
    assert analysis_shape(swin, [96]) == (3, 96, 96)
    retina = Config.fromfile(config_path('mmdet', 'retinanet/retinanet_r50_fpn_1x_coco.py'))
    assert analysis_shape(retina, None) == (3, 320, 320)          # a detector: 320x320 unless told


def test_print_groups_missing_config_is_a_clear_error():
    res = subprocess.run([sys.executable, 'tools/analysis_tools/print_groups.py', 'no/such.py'], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "config file 'no/such.py' does not exist" in res.stderr


def test_prune_example_reaches_target_and_writes_compact_model(tmp_path):
    cfg = config_path('mmdet', 'retinanet/retinanet_r50_fpn_1x_coco.py')
    res = subprocess.run([sys.executable, 'tools/prune_example.py', cfg, '--shape', '96', '96', '--batch', '1',
                          '--iters', '12', '--channels-per-step', '400', '--target', 'flops', '0.8',
                          '--work-dir', str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert '[result] target flops 0.8 reached' in res.stdout
    import torch
    ckpt = torch.load(tmp_path / 'compact.pth', weights_only=True)
    spec = json.loads((tmp_path / 'channel_spec.json').read_text())
    assert ckpt['meta']['channel_spec'] == spec
    assert sum(v.numel() for v in ckpt['state_dict'].values()) > 0
