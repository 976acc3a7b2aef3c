# Fine-tune the compact demo RetinaNet written by retinanet_r18_shapes_prune.py.
_base_ = ['./retinanet_r18_shapes.py']

pruned = 'work_dirs/demo/prune/pruned_flops_0.50.pth'
model = dict(_delete_=True, type='PrunedModel', architecture=_base_.model, channel_spec=pruned)
load_from = pruned
max_iters = 400
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=50, end=max_iters, eta_min=1e-5),
]
