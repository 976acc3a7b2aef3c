"""A deterministic generated dataset of simple shapes, in COCO and ImageNet layouts.

Detection (``make_coco_shapes``)::

    ROOT/annotations/instances_train2017.json   ROOT/train2017/000000.jpg ...
    ROOT/annotations/instances_val2017.json     ROOT/val2017/...

the layout mmdet's COCO configs expect, so ``data_root=ROOT`` is the only change a
config needs. Each image holds 1..``max_objects`` filled shapes (square, circle,
triangle, cross) in random colours on a noisy background; boxes are the shapes'
bounding boxes. Category names default to four COCO names so that stock COCO
configs (80 classes) find them; the demo uses its own names.

``variant='hard'`` (the pruning study's data, where width matters): eight classes that differ
in outline only (the four above, plus diamond, ring, frame and diagonal cross, so a ring and a
circle, or a frame and a square, share their box and colour), each filled with a solid colour,
stripes of random period and direction, or noise; 2..``max_objects`` (default 10) objects of
8-35% of the image side with aspect ratios 0.7-1.4, which may overlap (a later object hides part
of an earlier one; the box stays the whole shape's); unannotated clutter (lines, blobs) on a
background with a colour gradient.

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
HARD_SHAPES = SHAPES + ('diamond', 'ring', 'frame', 'x')
COCO_NAMES = ('person', 'car', 'dog', 'bottle')   # four of COCO's 80 classes, ids 1, 3, 18, 44
COCO_IDS = (1, 3, 18, 44)


def _draw(img: np.ndarray, kind: int, box: Tuple[int, int, int, int], color: np.ndarray) -> None:
    x0, y0, x1, y1 = box
    h, w = y1 - y0, x1 - x0
    yy, xx = np.mgrid[0:h, 0:w]
    u = (xx + 0.5) / w * 2 - 1
    v = (yy + 0.5) / h * 2 - 1
    mask = _outline(kind, u, v)
    region = img[y0:y1, x0:x1]
    region[mask] = color


def _outline(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The mask of shape ``kind`` (an index into HARD_SHAPES) on the box's coordinates u, v in [-1, 1]."""
    if kind == 0:
        return np.ones(u.shape, bool)
    if kind == 1:
        return u ** 2 + v ** 2 <= 1
    if kind == 2:
        return (v >= -1) & (np.abs(u) <= (v + 1) / 2)
    if kind == 3:
        return (np.abs(u) <= 0.3) | (np.abs(v) <= 0.3)
    if kind == 4:
        return np.abs(u) + np.abs(v) <= 1
    if kind == 5:
        r2 = u ** 2 + v ** 2
        return (r2 <= 1) & (r2 >= 0.45 ** 2)
    if kind == 6:
        return np.maximum(np.abs(u), np.abs(v)) >= 0.55
    return (np.abs(u - v) <= 0.4) | (np.abs(u + v) <= 0.4)


def _fill(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An (h, w, 3) uint8 fill: a solid colour, stripes of two colours, or coloured noise."""
    c0, c1 = rng.integers(0, 256, (2, 3))
    style = int(rng.integers(0, 3))
    if style == 0:
        return np.broadcast_to(c0, (h, w, 3)).astype(np.uint8)
    if style == 1:
        yy, xx = np.mgrid[0:h, 0:w]
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(3, 8)
        on = ((xx * np.cos(angle) + yy * np.sin(angle)) / period % 1) < 0.5
        return np.where(on[..., None], c0, c1).astype(np.uint8)
    return (c0 + rng.normal(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)


def _iou(a: List[int], b: List[int]) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _hard_image(rng: np.random.Generator, size: int, max_objects: int
                ) -> Tuple[np.ndarray, List[Tuple[int, List[int]]]]:
    """An image of the hard variant (see the module's docstring) and its (class, [x, y, w, h]) objects."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    a, b = rng.integers(40, 200, (2, 3))
    gx, gy = rng.uniform(-1, 1, 2)
    t = (gx * xx + gy * yy + 1) / 2
    img = (a * t[..., None] + b * (1 - t[..., None]) + rng.normal(0, 20, (size, size, 3))).clip(0, 255)
    img = img.astype(np.uint8)
    for _ in range(int(rng.integers(2, 7))):          # clutter: lines and blobs that are no object
        c = rng.integers(0, 256, 3).astype(np.uint8)
        if rng.random() < 0.5:
            x0, y0, x1, y1 = rng.integers(0, size, 4)
            n = max(abs(int(x1) - int(x0)), abs(int(y1) - int(y0)), 1)
            px = np.linspace(x0, x1, n).astype(int)
            py = np.linspace(y0, y1, n).astype(int)
            for d in range(int(rng.integers(1, 3))):
                img[np.clip(py + d, 0, size - 1), px] = c
        else:
            r = int(rng.integers(2, 6))
            cx, cy = rng.integers(r, size - r, 2)
            blob = (xx * size - cx) ** 2 + (yy * size - cy) ** 2 <= r * r
            img[blob] = c
    n = int(rng.integers(2, max_objects + 1))
    objs: List[Tuple[int, List[int]]] = []
    for _ in range(n * 4):                           # a few tries per object to keep overlaps partial
        if len(objs) == n:
            break
        kind = int(rng.integers(0, len(HARD_SHAPES)))
        s = rng.uniform(0.08, 0.35) * size
        aspect = rng.uniform(0.7, 1.4)
        w = max(8, min(size, int(round(s * np.sqrt(aspect)))))
        h = max(8, min(size, int(round(s / np.sqrt(aspect)))))
        box = [int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1)), w, h]
        if any(_iou(box, o[1]) > 0.3 for o in objs):
            continue
        x0, y0 = box[0], box[1]
        v, u = (np.mgrid[0:h, 0:w] + 0.5) / np.array([h, w])[:, None, None] * 2 - 1
        mask = _outline(kind, u, v)
        img[y0:y0 + h, x0:x0 + w][mask] = _fill(rng, h, w)[mask]
        objs.append((kind, box))
    return img, objs


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
                     max_objects: Optional[int] = None, seed: int = 0, names: Optional[Sequence[str]] = None,
                     ids: Optional[Sequence[int]] = None, variant: str = 'easy') -> Dict[str, str]:
    """Write the detection dataset (skipped if it is already complete); returns the annotation paths.

    ``variant``: 'easy' (4 classes, 1..5 objects; ``names`` default to four COCO names) or 'hard'
    (the 8 HARD_SHAPES, 2..10 objects, textures, overlaps and clutter; ``names`` default to HARD_SHAPES).
    """
    from PIL import Image
    if variant not in ('easy', 'hard'):
        raise ValueError(f"variant must be 'easy' or 'hard', got {variant!r}")
    hard = variant == 'hard'
    kinds = HARD_SHAPES if hard else SHAPES
    names = tuple(names) if names is not None else (HARD_SHAPES if hard else COCO_NAMES)
    if len(names) != len(kinds):
        raise ValueError(f'the {variant} variant has {len(kinds)} classes ({", ".join(kinds)}); '
                         f'got {len(names)} names')
    if max_objects is None:
        max_objects = 10 if hard else 5
    ids = list(ids) if ids is not None else (list(COCO_IDS) if tuple(names) == COCO_NAMES
                                              else list(range(1, len(names) + 1)))
    out = {}
    for split, count, split_seed in (('train', num_train, seed), ('val', num_val, seed + 1)):
        ann_path = osp.join(root, 'annotations', f'instances_{split}2017.json')
        out[split] = ann_path
        img_dir = osp.join(root, f'{split}2017')
        recipe = {'generator': 'mmfisher.datasets.shapes', 'variant': variant, 'seed': split_seed, 'size': size,
                  'max_objects': max_objects, 'names': list(names), 'ids': ids}
        if osp.isfile(ann_path):
            with open(ann_path) as f:
                old = json.load(f)
            # files written before the recipe was recorded hold the easy variant
            written = old.get('info', {}).get('mmfisher', {'variant': 'easy'})
            if written.get('variant') != variant:
                raise ValueError(f'{ann_path} holds the {written.get("variant")!r} variant of the shapes data, '
                                 f'not {variant!r}: give the {variant} variant a data root of its own')
            if len(old['images']) == count:
                continue
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(osp.dirname(ann_path), exist_ok=True)
        rng = np.random.default_rng(split_seed)
        images, annotations = [], []
        for i in range(count):
            img, objs = (_hard_image if hard else _image)(rng, size, max_objects)
            name = f'{i:06d}.jpg'
            Image.fromarray(img).save(osp.join(img_dir, name), quality=95)
            images.append({'id': i + 1, 'file_name': name, 'width': size, 'height': size})
            for kind, bbox in objs:
                annotations.append({'id': len(annotations) + 1, 'image_id': i + 1, 'category_id': ids[kind],
                                    'bbox': [float(b) for b in bbox], 'area': float(bbox[2] * bbox[3]),
                                    'iscrowd': 0})
        cats = [{'id': ids[k], 'name': names[k], 'supercategory': 'shape'} for k in range(len(kinds))]
        tmp = ann_path + '.tmp'
        with open(tmp, 'w') as f:
            json.dump({'info': {'mmfisher': recipe}, 'images': images, 'annotations': annotations,
                       'categories': cats}, f)
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
