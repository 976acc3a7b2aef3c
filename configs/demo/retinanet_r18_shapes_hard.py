# The demo RetinaNet on the hard variant of the generated shapes data (make_coco_shapes(variant='hard')):
# eight classes that differ in outline only (a ring and a circle share box and colour), textured fills,
# 2-10 objects of 8-35% of the image that may overlap, and unannotated clutter. On the easy data a
# uniformly half-width model, trained, comes within 1.7 mAP points of this one; the pruning study
# (benchmarks/pruning_study.py --dataset hard) uses this variant so that the width pruning keeps matters.
_base_ = ['./retinanet_r18_shapes.py']

data_root = 'data/shapes_hard/'
classes = ('square', 'circle', 'triangle', 'cross', 'diamond', 'ring', 'frame', 'x')
metainfo = dict(classes=classes, palette=[(220, 20, 60), (0, 128, 255), (0, 200, 0), (250, 170, 30),
                                          (160, 32, 240), (0, 200, 200), (128, 128, 0), (255, 105, 180)])
model = dict(bbox_head=dict(num_classes=len(classes)))
train_dataloader = dict(dataset=dict(data_root=data_root, metainfo=metainfo))
val_dataloader = dict(dataset=dict(data_root=data_root, metainfo=metainfo))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
