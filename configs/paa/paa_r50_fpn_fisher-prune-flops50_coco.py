# Prune PAA-R50-FPN (GN head) with Group Fisher (memory normalisation) to 50% of its FLOPs on COCO, starting
# from the official mmdet model. The paper prunes detectors at 1/10 of the base learning rate with one
# channel every 10 iterations; training stops at the iteration the target is reached and the hook writes
# pruned_flops_0.75.pth and pruned_flops_0.50.pth (compact weights + channel spec) to the work dir.
_base_ = ['mmdet::paa/paa_r50_fpn_1x_coco.py', '../_base_/fisher_prune_detection.py']

# every weight comes from load_from (no ImageNet download); as in the paper's code, nothing is frozen while
# pruning and fine-tuning, so a layer whose input lost channels can adapt (mmdet trains with frozen_stages=1)
model = dict(backbone=dict(init_cfg=None, frozen_stages=-1))
load_from = 'https://download.openmmlab.com/mmdetection/v2.0/paa/paa_r50_fpn_1x_coco/paa_r50_fpn_1x_coco_20200821-936edec3.pth'
optim_wrapper = dict(optimizer=dict(lr=0.001))  # 1/10 of the base learning rate
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0, end=1)]
# iteration-based, so training ends at the iteration the target is reached (an epoch-based loop is
# stopped mid-epoch too); 12 COCO epochs at 16 images per iteration are an upper bound
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=88000, val_interval=88000)
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=2000))
log_processor = dict(by_epoch=False)
