# The baseline pruning must beat: the demo RetinaNet with every prunable width scaled by one factor so
# that its FLOPs match the pruned model's (the spec written by tools/analysis_tools/uniform_spec.py),
# trained from scratch with the baseline's recipe for as many iterations as baseline + pruning +
# fine-tuning took in all. tools/demo.py sets the spec and the iteration count.
_base_ = ['./retinanet_r18_shapes.py']

uniform = 'work_dirs/demo/uniform_flops_0.50.json'
model = dict(_delete_=True, type='PrunedModel', architecture=_base_.model, channel_spec=uniform)
load_from = None     # from scratch: the runner initialises the narrow layers with their own fan-in
