# Fine-tune the compact MobileNetV2 written by mobilenet-v2_8xb32_fisher-prune-flops50_in1k.py with the original schedule, then
#   python tools/test.py configs/mobilenet_v2/mobilenet-v2_8xb32_fisher-pruned-flops50_finetune_in1k.py work_dirs/mobilenet-v2_8xb32_fisher-pruned-flops50_finetune_in1k/epoch_300.pth
_base_ = ['mmpretrain::mobilenet_v2/mobilenet-v2_8xb32_in1k.py', '../_base_/mmfisher_runtime.py']

pruned = 'work_dirs/mobilenet-v2_8xb32_fisher-prune-flops50_in1k/pruned_flops_0.50.pth'
model = dict(_delete_=True, type='PrunedModel', architecture=_base_.model, channel_spec=pruned)
load_from = pruned
