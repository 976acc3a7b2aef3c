"""The pruning core: plain PyTorch, no OpenMMLab import.

Pipeline: model -> :func:`analyse` (trace + coupling graph) -> groups ->
:class:`FisherImportance` -> :class:`GroupFisherPruner` decisions -> masks ->
:func:`shrink` (compact model).
"""
from .groups import ChannelGroup, CouplingGraph, analyse
from .masks import ConsumerInputs
from .shrink import copy_model, shrink
from .spec import (SPEC_FORMAT, SpecError, SpecFormatError, SpecMismatchError, make_spec, spec_to_keep,
                   validate_spec, weights_digest)
from .layers import LayerType, register_layer_type, register_plain_forward, register_split_size
from .op_rules import OP_RULES, op_rule
from .trace import AnalysisRuleError

__all__ = ['analyse', 'CouplingGraph', 'ChannelGroup', 'ConsumerInputs', 'shrink', 'copy_model', 'make_spec',
           'spec_to_keep', 'validate_spec', 'weights_digest', 'SpecError', 'SpecFormatError',
           'SpecMismatchError', 'SPEC_FORMAT', 'LayerType', 'register_layer_type', 'register_plain_forward',
           'register_split_size', 'OP_RULES', 'op_rule',
           'AnalysisRuleError']
