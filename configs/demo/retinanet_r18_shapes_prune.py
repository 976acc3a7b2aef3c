# Prune the demo RetinaNet with Group Fisher (memory normalisation) to 50% of its FLOPs, starting
# from the trained baseline, at 1/10 of its learning rate. Several channels per decision: the
# paper's one channel every 10 iterations would need thousands of CPU iterations here.
_base_ = ['./retinanet_r18_shapes.py']

load_from = 'work_dirs/retinanet_r18_shapes/iter_800.pth'
max_iters = 600
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(optimizer=dict(lr=2e-4))
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0, end=max_iters)]
custom_hooks = [
    dict(type='SafeCheckpointHook'),
    dict(type='FisherPruningHook', interval=2, target=('flops', 0.5), normalization='memory',
         channels_per_step=8, save_ratios=[0.75], stop_at_target=True),
]
