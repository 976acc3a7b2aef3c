# Group Fisher pruning of an ImageNet classifier as in the paper: one channel every 25 iterations,
# memory normalisation, down to 50% of the FLOPs. Training stops at the target.
_base_ = ['./mmfisher_runtime.py']
custom_hooks = [
    dict(type='SafeCheckpointHook'),
    dict(type='FisherPruningHook', interval=25, target=('flops', 0.5), normalization='memory',
         save_ratios=[0.75], channels_per_step=1, stop_at_target=True),
]
