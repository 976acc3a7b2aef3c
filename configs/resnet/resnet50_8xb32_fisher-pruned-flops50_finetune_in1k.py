# Fine-tune the compact ResNet-50 written by resnet50_8xb32_fisher-prune-flops50_in1k.py with the original schedule, then
#   python tools/test.py configs/resnet/resnet50_8xb32_fisher-pruned-flops50_finetune_in1k.py work_dirs/resnet50_8xb32_fisher-pruned-flops50_finetune_in1k/epoch_100.pth
_base_ = ['mmpretrain::resnet/resnet50_8xb32_in1k.py', '../_base_/mmfisher_runtime.py']

pruned = 'work_dirs/resnet50_8xb32_fisher-prune-flops50_in1k/pruned_flops_0.50.pth'
model = dict(_delete_=True, type='PrunedModel', architecture=_base_.model, channel_spec=pruned)
load_from = pruned
