"""A deterministic generated dataset of simple shapes, in COCO and ImageNet layouts.

Detection (``make_coco_shapes``)::

    ROOT/annotations/instances_train2017.json   ROOT/train2017/000000.jpg ...
    ROOT/annotations/instances_val2017.json     ROOT/val2017/...

the layout mmdet's COCO configs expect, so ``data_root=ROOT`` is the only change a
config needs. Each image holds 1..``max_objects`` filled shapes (square, circle,
triangle, cross) in random colours on a noisy background; boxes are the shapes'
bounding boxes. Category names default to four COCO names so that stock COCO
configs (80 classes) find them; the demo uses its own names.

Classification (``make_imagenet_shapes``): ``ROOT/meta/{train,val}.txt`` with
``file label`` lines (relative to the split folder) and images under
``ROOT/{train,val}/``, the layout of mmpretrain's ImageNet configs (``split='train'``).

Everything is drawn with numpy and written with Pillow; the same seed gives the
same files.
"""
from __future__ import annotations

import json
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

SHAPES = ('square', 'circle', 'triangle', 'cross')
COCO_NAMES = ('person', 'car', 'dog', 'bottle')   # four of COCO's 80 classes, ids 1, 3, 18, 44
COCO_IDS = (1, 3, 18, 44)


def _draw(img: np.ndarray, kind: int, box: Tuple[int, int, int, int], color: np.ndarray) -> None:
    x0, y0, x1, y1 = box
    h, w = y1 - y0, x1 - x0
    yy, xx = np.mgrid[0:h, 0:w]
    u = (xx + 0.5) / w * 2 - 1
    v = (yy + 0.5) / h * 2 - 1
    if kind == 0:
        mask = np.ones((h, w), bool)
    elif kind == 1:
        mask = u ** 2 + v ** 2 <= 1
    elif kind == 2:
        mask = (v >= -1) & (np.abs(u) <= (v + 1) / 2)
    else:
        mask = (np.abs(u) <= 0.3) | (np.abs(v) <= 0.3)
    region = img[y0:y1, x0:x1]
    region[mask] = color


def _image(rng: np.random.Generator, size: int, max_objects: int, min_frac: float = 0.15,
           max_frac: float = 0.45) -> Tuple[np.ndarray, List[Tuple[int, List[int]]]]:
    img = (rng.normal(110, 25, (size, size, 3))).clip(0, 255).astype(np.uint8)
    n = int(rng.integers(1, max_objects + 1))
    objs = []
    for _ in range(n):
        kind = int(rng.integers(0, len(SHAPES)))
        s = int(rng.integers(int(size * min_frac), int(size * max_frac) + 1))
        x0 = int(rng.integers(0, size - s + 1))
        y0 = int(rng.integers(0, size - s + 1))
        color = rng.integers(0, 256, 3).astype(np.uint8)
        # keep shapes visible against the grey background
        if np.abs(color.astype(int) - 110).max() < 60:
            color[int(rng.integers(0, 3))] = 250
        _draw(img, kind, (x0, y0, x0 + s, y0 + s), color)
        objs.append((kind, [x0, y0, s, s]))
    return img, objs


def make_coco_shapes(root: str, num_train: int = 800, num_val: int = 200, size: int = 160,
                     max_objects: int = 5, seed: int = 0, names: Sequence[str] = COCO_NAMES,
                     ids: Optional[Sequence[int]] = None) -> Dict[str, str]:
    """Write the detection dataset (skipped if it is already complete); returns the annotation paths."""
    from PIL import Image
    ids = list(ids) if ids is not None else (list(COCO_IDS) if tuple(names) == COCO_NAMES
                                              else list(range(1, len(names) + 1)))
    out = {}
    for split, count, split_seed in (('train', num_train, seed), ('val', num_val, seed + 1)):
        ann_path = osp.join(root, 'annotations', f'instances_{split}2017.json')
        out[split] = ann_path
        img_dir = osp.join(root, f'{split}2017')
        if osp.isfile(ann_path):
            with open(ann_path) as f:
                if len(json.load(f)['images']) == count:
                    continue
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(osp.dirname(ann_path), exist_ok=True)
        rng = np.random.default_rng(split_seed)
        images, annotations = [], []
        for i in range(count):
            img, objs = _image(rng, size, max_objects)
            name = f'{i:06d}.jpg'
            Image.fromarray(img).save(osp.join(img_dir, name), quality=95)
            images.append({'id': i + 1, 'file_name': name, 'width': size, 'height': size})
            for kind, bbox in objs:
                annotations.append({'id': len(annotations) + 1, 'image_id': i + 1, 'category_id': ids[kind],
                                    'bbox': [float(b) for b in bbox], 'area': float(bbox[2] * bbox[3]),
                                    'iscrowd': 0})
        cats = [{'id': ids[k], 'name': names[k], 'supercategory': 'shape'} for k in range(len(SHAPES))]
        tmp = ann_path + '.tmp'
        with open(tmp, 'w') as f:
            json.dump({'images': images, 'annotations': annotations, 'categories': cats}, f)
        os.replace(tmp, ann_path)
    return out


def make_imagenet_shapes(root: str, num_train: int = 64, num_val: int = 16, size: int = 64,
                         seed: int = 0) -> Dict[str, str]:
    """Write the classification dataset: one shape per image, the label is the shape."""
    from PIL import Image
    out = {}
    for split, count, split_seed in (('train', num_train, seed), ('val', num_val, seed + 1)):
        ann = osp.join(root, 'meta', f'{split}.txt')
        out[split] = ann
        if osp.isfile(ann):
            with open(ann) as f:
                if len(f.read().splitlines()) == count:
                    continue
        os.makedirs(osp.join(root, split), exist_ok=True)
        os.makedirs(osp.dirname(ann), exist_ok=True)
        rng = np.random.default_rng(split_seed)
        lines = []
        for i in range(count):
            img, objs = _image(rng, size, 1, 0.4, 0.8)
            name = f'{i:06d}.JPEG'
            Image.fromarray(img).save(osp.join(root, split, name), quality=95)
            lines.append(f'{name} {objs[0][0]}')
        with open(ann + '.tmp', 'w') as f:
            f.write('\n'.join(lines) + '\n')
        os.replace(ann + '.tmp', ann)
    return out
