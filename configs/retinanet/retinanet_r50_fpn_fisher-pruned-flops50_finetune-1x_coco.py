# Fine-tune the compact RetinaNet-R50-FPN written by retinanet_r50_fpn_fisher-prune-flops50_coco.py with the original
# 1x schedule (the paper fine-tunes for as many epochs as the original training), then test it with
#   python tools/test.py configs/retinanet/retinanet_r50_fpn_fisher-pruned-flops50_finetune-1x_coco.py work_dirs/retinanet_r50_fpn_fisher-pruned-flops50_finetune-1x_coco/epoch_12.pth
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', '../_base_/mmfisher_runtime.py']

pruned = 'work_dirs/retinanet_r50_fpn_fisher-prune-flops50_coco/pruned_flops_0.50.pth'
# nothing frozen, as while pruning (the paper's recipe): the pruned stem and layer1 keep learning
model = dict(_delete_=True, type='PrunedModel', channel_spec=pruned,
             architecture=dict(_base_.model, backbone=dict(_base_.model.backbone, frozen_stages=-1)))
load_from = pruned
