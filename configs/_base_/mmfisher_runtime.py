# Import mmfisher's modules in any tool (stock mmdet/mmpretrain tools included) and make every
# checkpoint of the run loadable with torch.load(weights_only=True) (--resume, load_from).
custom_imports = dict(imports=['mmfisher'], allow_failed_imports=False)
custom_hooks = [dict(type='SafeCheckpointHook')]
