"""The generated shapes data: both variants are deterministic, hold what their docstring says, load through
mmdet's CocoDataset with the demo configs, and a data root holding one variant is never silently reused for
the other."""
import json
import os.path as osp

import numpy as np
import pytest

ROOT = osp.abspath(osp.join(osp.dirname(__file__), '..'))


def _ann(root, split='train'):
    with open(osp.join(root, 'annotations', f'instances_{split}2017.json')) as f:
        return json.load(f)


def test_hard_variant_is_deterministic_and_has_eight_classes_overlaps_and_small_objects(tmp_path):
    from mmfisher.datasets.shapes import HARD_SHAPES, make_coco_shapes
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    for root in (a, b):
        make_coco_shapes(root, num_train=60, num_val=5, size=160, variant='hard')
    ann = _ann(a)
    assert ann == _ann(b)
    for i in (0, 17, 59):
        name = f'{i:06d}.jpg'
        assert open(osp.join(a, 'train2017', name), 'rb').read() == open(osp.join(b, 'train2017', name), 'rb').read()
    assert [c['name'] for c in ann['categories']] == list(HARD_SHAPES)
    assert {x['category_id'] for x in ann['annotations']} == set(range(1, 9))
    per_image = np.bincount([x['image_id'] for x in ann['annotations']])[1:]
    assert per_image.min() >= 2 and per_image.max() <= 10
    sides = np.array([x['bbox'][2:] for x in ann['annotations']])
    assert sides.min() >= 8 and sides.max() <= 0.35 * 160 * np.sqrt(1.4) + 1
    assert (sides[:, 0] != sides[:, 1]).mean() > 0.5          # boxes are not all square

    def iou(p, q):
        ix = max(0, min(p[0] + p[2], q[0] + q[2]) - max(p[0], q[0]))
        iy = max(0, min(p[1] + p[3], q[1] + q[3]) - max(p[1], q[1]))
        return ix * iy / (p[2] * p[3] + q[2] * q[3] - ix * iy)
    boxes = {}
    for x in ann['annotations']:
        boxes.setdefault(x['image_id'], []).append(x['bbox'])
    ious = [iou(p, q) for bs in boxes.values() for i, p in enumerate(bs) for q in bs[:i]]
    assert 0 < max(ious) <= 0.3        # objects overlap, partially
    assert ann['info']['mmfisher']['variant'] == 'hard'


def test_a_root_holding_one_variant_is_refused_for_the_other(tmp_path):
    from mmfisher.datasets.shapes import make_coco_shapes
    root = str(tmp_path / 'd')
    make_coco_shapes(root, num_train=4, num_val=2, variant='easy')
    before = _ann(root)
    with pytest.raises(ValueError, match="holds the 'easy' variant.*data root of its own"):
        make_coco_shapes(root, num_train=4, num_val=2, variant='hard')
    assert _ann(root) == before
    with pytest.raises(ValueError, match="variant must be 'easy' or 'hard'"):
        make_coco_shapes(root, variant='medium')
    with pytest.raises(ValueError, match='has 8 classes'):
        make_coco_shapes(str(tmp_path / 'e'), variant='hard', names=('a', 'b'))


def test_hard_config_reads_the_hard_data_through_mmdet_coco_dataset(tmp_path):
    from mmengine.config import Config
    from mmengine.registry import DefaultScope, init_default_scope

    from mmfisher.datasets.shapes import make_coco_shapes
    from mmfisher.openmmlab import register_all_modules
    register_all_modules()
    root = str(tmp_path / 'hard') + '/'
    make_coco_shapes(root, num_train=6, num_val=2, variant='hard')
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'demo', 'retinanet_r18_shapes_hard.py'))
    assert cfg.model.bbox_head.num_classes == 8
    from mmdet.registry import DATASETS
    with DefaultScope.overwrite_default_scope('mmdet'):
        init_default_scope('mmdet')
        ds_cfg = cfg.train_dataloader.dataset
        ds_cfg.data_root = root
        ds = DATASETS.build(ds_cfg)
        assert len(ds) == 6 and ds.metainfo['classes'] == cfg.metainfo.classes
        sample = ds[0]
        labels = sample['data_samples'].gt_instances.labels
        ann = _ann(root)
        first = [x['category_id'] - 1 for x in ann['annotations'] if x['image_id'] == 1]
        assert sorted(labels.tolist()) == sorted(first)
