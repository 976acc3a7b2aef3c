"""The support matrix tool on a small fixed subset: TOOD (whose offsets only a deformable sampling reads)
and an mmpretrain MobileNetV2 pass; MoCo v2 (two views from its own pipeline; its momentum
encoder loses its source's channels) passes; T2T-ViT, whose random-init network amplifies float32
rounding past 1e-4, passes on its float64 re-check; mmdet's ReID classifier (256x128 person crops)
passes; Sparse R-CNN, whose random initial proposals are boxes of negative size until its own
init_weights makes them whole-image boxes, passes after that retry, which its row says; a config the
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
               config_path('mmpretrain', 'mocov2/mocov2_resnet50_8xb32-coslr-200e_in1k.py'),
               config_path('mmpretrain', 't2t_vit/t2t-vit-t-14_8xb64_in1k.py'),
               config_path('mmdet', 'reid/reid_r50_8xb32-6e_mot17train80_test-mot17val20.py'),
               config_path('mmdet', 'sparse_rcnn/sparse-rcnn_r50_fpn_1x_coco.py'), str(broken)]
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
    assert rows['mocov2_resnet50_8xb32-coslr-200e_in1k.py']['status'] == 'pass'
    t2t = rows['t2t-vit-t-14_8xb64_in1k.py']
    assert t2t['status'] == 'pass' and t2t['max_rel_err'] > 1e-4 and t2t['max_rel_err_float64'] <= 1e-9, t2t
    reid = rows['reid_r50_8xb32-6e_mot17train80_test-mot17val20.py']     # 256x128 crops, LabelData labels
    assert reid['status'] == 'pass' and reid['max_rel_err'] <= 1e-4, reid
    sparse = rows['sparse-rcnn_r50_fpn_1x_coco.py']
    assert sparse['status'] == 'pass' and sparse['max_rel_err'] <= 1e-4, sparse
    assert sparse['note'].startswith('after its own init_weights, at 128x128: as built at 128x128'), sparse['note']
    assert rows['broken.py']['status'] == 'harness' and 'NoSuchDetector' in rows['broken.py']['error']
    md = (tmp_path / 'matrix.md').read_text()
    assert '| mmdet | tood | `tood/tood_r50_fpn_1x_coco.py` | pass |' in md

    # --resume keeps what the JSON holds: nothing is checked again
    again = subprocess.run([sys.executable, 'tools/analysis_tools/zoo_check.py', '--configs', *configs, '--shape', '128',
                            '--json', str(tmp_path / 'matrix.json'), '--resume'],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert '7 families kept' in again.stdout and '[zoo] ' not in again.stdout.replace('[zoo] 7 families kept', '')
    assert json.load(open(tmp_path / 'matrix.json')) == list(rows_in_order)
