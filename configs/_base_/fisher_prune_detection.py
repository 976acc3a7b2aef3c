# Group Fisher pruning of a detector as in the paper: memory normalisation, one channel every 10
# iterations, down to 50% of the FLOPs; a compact checkpoint also at 75%. Training stops at the target.
_base_ = ['./mmfisher_runtime.py']
custom_hooks = [
    dict(type='SafeCheckpointHook'),
    dict(type='FisherPruningHook', interval=10, target=('flops', 0.5), normalization='memory',
         save_ratios=[0.75], channels_per_step=1, stop_at_target=True),
]
