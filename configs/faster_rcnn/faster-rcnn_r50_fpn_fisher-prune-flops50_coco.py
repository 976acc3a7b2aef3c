# Prune Faster R-CNN-R50-FPN with Group Fisher (memory normalisation) to 50% of its FLOPs on COCO, starting
# from the official mmdet model. The paper prunes detectors at 1/10 of the base learning rate with one
# channel every 10 iterations; training stops when the target is reached and the hook writes
# pruned_flops_0.75.pth and pruned_flops_0.50.pth (compact weights + channel spec) to the work dir.
_base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', '../_base_/fisher_prune_detection.py']

model = dict(backbone=dict(init_cfg=None))  # every weight comes from load_from: no ImageNet download
load_from = 'https://download.openmmlab.com/mmdetection/v2.0/faster_rcnn/faster_rcnn_r50_fpn_1x_coco/faster_rcnn_r50_fpn_1x_coco_20200130-047c8118.pth'
optim_wrapper = dict(optimizer=dict(lr=0.002))  # 1/10 of the base learning rate
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0, end=1)]
train_cfg = dict(max_epochs=12, val_interval=12)  # upper bound: the hook ends training at the target
