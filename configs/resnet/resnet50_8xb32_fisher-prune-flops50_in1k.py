# Prune ResNet-50 with Group Fisher (memory normalisation) to 50% of its FLOPs on ImageNet, starting
# from the official mmpretrain model, at 1/10 of the base learning rate with one channel every 25
# iterations (the paper's classification setting); training stops at the target.
_base_ = ['mmpretrain::resnet/resnet50_8xb32_in1k.py', '../_base_/fisher_prune_classification.py']

load_from = 'https://download.openmmlab.com/mmclassification/v0/resnet/resnet50_8xb32_in1k_20210831-ea4938fc.pth'
optim_wrapper = dict(optimizer=dict(lr=0.01))  # 1/10 of the base learning rate
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0, end=1)]
train_cfg = dict(max_epochs=30, val_interval=30)  # upper bound: the hook ends training at the target
