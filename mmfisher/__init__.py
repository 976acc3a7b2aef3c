"""mmfisher: Group Fisher channel pruning for OpenMMLab."""
__version__ = "0.1.0"
