"""mmfisher: Group Fisher channel pruning for OpenMMLab.

``mmfisher.core`` needs only torch. Importing ``mmfisher`` (e.g. through a config's
``custom_imports = dict(imports=['mmfisher'])``) also registers the OpenMMLab parts
(``FisherPruningHook``, ``SafeCheckpointHook``, ``type='PrunedModel'``) when mmengine
is installed.
"""
__version__ = '0.1.0'

try:
    import mmengine  # noqa: F401
except ImportError:  # plain PyTorch use: the core only
    pass
else:
    from . import openmmlab  # noqa: F401
