"""The op rules: how each torch function moves, couples or mixes the channels it touches.

The trace (:mod:`mmfisher.core.trace`) calls, for every torch function or tensor method that
reads a tensor carrying channels, the rule registered for the function's name in
:data:`OP_RULES` (``add``, ``add_``, ``__iadd__`` and ``__radd__`` all map to ``'add'``). A rule
reads the call (:class:`Op`) and, through the tracer,

* labels the outputs (``tr.set_label``): where the channels went;
* unions atoms (``tr.sets.union_arrays``): channels that must now be removed together (a
  residual add);
* taints atoms (``tr.taint``) with a reason: channels that cannot be removed (a reduction over
  channels, a reshape across them).

A function without a rule taints every channel it reads (:func:`unknown`). To teach the analysis a
function, register a rule::

    @op_rule('glu')
    def glu(tr, op):
        ...

A rule that raises leaves the channels it saw unpruned, or raises
:class:`~mmfisher.core.trace.AnalysisRuleError` under ``analyse(..., strict=True)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .atoms import Label, flat_tensors
from .layers import SplitSize, split_size_owner

if TYPE_CHECKING:
    from .trace import ChannelTracer


# --------------------------------------------------------------------------- #
# function names by behaviour
# --------------------------------------------------------------------------- #
POINTWISE = {
    # elementwise, applied channel by channel, broadcasting
    'add', 'sub', 'subtract', 'mul', 'multiply', 'div', 'divide', 'true_divide', 'floor_divide',
    'pow', 'maximum', 'minimum', 'fmax', 'fmin', 'where', 'clamp', 'clip', 'clamp_min', 'clamp_max',
    'relu', 'relu6', 'leaky_relu', 'elu', 'selu', 'celu', 'gelu', 'silu', 'mish', 'sigmoid',
    'hardsigmoid', 'hardswish', 'hardtanh', 'tanh', 'softplus', 'softsign',
    'exp', 'log', 'log1p', 'expm1', 'sqrt', 'rsqrt', 'abs', 'neg', 'negative', 'sign', 'square',
    'reciprocal', 'sin', 'cos', 'floor', 'ceil', 'round', 'trunc', 'frac', 'erf', 'logit',
    'dropout', 'dropout1d', 'dropout2d', 'dropout3d', 'alpha_dropout', 'feature_alpha_dropout',
    'eq', 'ne', 'lt', 'le', 'gt', 'ge', 'logical_and', 'logical_or', 'logical_not', 'isnan',
    'isinf', 'isfinite', 'nan_to_num', 'lerp', 'addcmul', 'addcdiv', 'threshold', 'and', 'or',
    'invert', 'bitwise_and', 'bitwise_or', 'masked_fill', 'hardshrink', 'softshrink',
    'tanhshrink', 'logsigmoid',
    'fill', 'zero', 'copy', 'pos',
}
# same tensor, other dtype/device/storage; a second tensor argument only names the dtype/device
CAST = {'contiguous', 'clone', 'detach', 'float', 'double', 'half', 'bfloat16', 'to', 'type', 'type_as',
         'cpu', 'cuda', 'data', 'zeros_like', 'ones_like', 'full_like', 'empty_like',
         'rand_like', 'randn_like', 'bool', 'long', 'int'}
# change only the non-channel dims (pooling, resampling, padding): label kept when dim sizes allow
CHANNELWISE = {
    'max_pool1d', 'max_pool2d', 'max_pool3d', 'avg_pool1d', 'avg_pool2d', 'avg_pool3d',
    'adaptive_avg_pool1d', 'adaptive_avg_pool2d', 'adaptive_avg_pool3d', 'adaptive_max_pool1d',
    'adaptive_max_pool2d', 'adaptive_max_pool3d', 'max_pool2d_with_indices', 'lp_pool2d',
    'interpolate', 'upsample', 'upsample_nearest', 'upsample_bilinear', 'pad', 'grid_sample',
    'roll', 'flip', 'fractional_max_pool2d',
}
RESHAPE = {'view', 'reshape', 'flatten', 'unflatten', 'squeeze', 'unsqueeze', 'view_as', 'reshape_as',
            'ravel', 'atleast_2d', 'atleast_3d'}
REDUCE = {'sum', 'mean', 'amax', 'amin', 'max', 'min', 'prod', 'std', 'var', 'norm', 'logsumexp',
           'argmax', 'argmin', 'softmax', 'log_softmax', 'cumsum', 'cumprod', 'all', 'any', 'median',
           'topk', 'sort', 'argsort', 'count_nonzero', 'nansum', 'nanmean', 'std_mean', 'var_mean',
           'cummax', 'cummin', 'kthvalue', 'mode', 'softmin'}
# inspect a tensor without using its values
INSPECT = {'size', 'dim', 'ndim', 'ndimension', 'numel', 'shape', 'dtype', 'device', 'is_cuda',
            'is_contiguous', 'stride', 'element_size', 'data_ptr', 'len', 'requires_grad',
            'is_floating_point', 'get_device', 'layout', 'is_sparse', 'grad_fn', 'is_leaf', 'names',
            'storage_offset', 'nelement', 'repr', 'format', 'hash', 'grad', 'is_complex',
            'is_quantized', 'is_meta', 'untyped_storage', '_version', 'output_nr', 'retain_grad',
            'register_hook', 'new_zeros', 'new_ones', 'new_full', 'new_empty', 'new_tensor',
            'is_nested', 'itemsize', 'nbytes', 'is_mkldnn', 'is_sparse_csr', 'has_names'}


FACTORY = {'new_empty', 'new_zeros', 'new_ones', 'new_full', 'empty', 'zeros', 'ones', 'full', 'empty_like',
            'empty_strided'}

# --------------------------------------------------------------------------- #
# the table
# --------------------------------------------------------------------------- #
@dataclass
class Op:
    """One call of a torch function that read labelled tensors.

    ``labelled``: ``(tensor, label)`` of every argument that carries channels, in argument order;
    ``where``: the innermost running module, for messages.
    """

    name: str
    inplace: bool
    args: tuple
    kwargs: dict
    out: Any
    labelled: List[Tuple[torch.Tensor, Label]]
    where: str


Rule = Callable[['ChannelTracer', Op], None]
OP_RULES: Dict[str, Rule] = {}


def op_rule(*names: str) -> Callable[[Rule], Rule]:
    """Decorator: register ``rule(tr, op)`` for the function names ``names`` (normalised: ``'add'``
    covers ``add_``, ``__iadd__`` and ``__radd__``). A later registration replaces an earlier one."""
    def register(rule: Rule) -> Rule:
        for n in names:
            OP_RULES[n] = rule
        return rule
    return register


def rule_for(name: str) -> Rule:
    """The rule for a normalised function name; :func:`unknown` if none is registered."""
    return OP_RULES.get(name, unknown)


def function_name(func: Callable) -> str:
    name = getattr(func, '__name__', None) or ''
    if name in ('__get__', '__set__'):
        name = getattr(getattr(func, '__self__', None), '__name__', name)
    return name


def normalise(name: str) -> Tuple[str, bool]:
    """Map ``__iadd__``/``add_``/``__radd__`` to ``('add', inplace)``."""
    inplace = False
    if name.startswith('__') and name.endswith('__'):
        name = name[2:-2]
        if name.startswith('i') and name[1:] in POINTWISE:
            return name[1:], True
        if name.startswith('r') and name[1:] in POINTWISE:
            return name[1:], False
        if name == 'truediv':
            return 'div', False
        if name == 'rtruediv':
            return 'div', False
        if name == 'itruediv':
            return 'div', True
        if name in ('getitem', 'setitem'):
            return name, name == 'setitem'
    if name.endswith('_') and not name.startswith('_'):
        name, inplace = name[:-1], True
    return name, inplace


def _arg(args: tuple, kwargs: dict, pos: int, key: str, default: Any = None) -> Any:
    if key in kwargs:
        return kwargs[key]
    if len(args) > pos:
        return args[pos]
    return default


def _dims(d: Any, ndim: int) -> Optional[List[int]]:
    if d is None:
        return None
    if isinstance(d, (list, tuple)):
        return [x % ndim for x in d]
    return [int(d) % ndim]


# --------------------------------------------------------------------------- #
# the rules
# --------------------------------------------------------------------------- #


def unknown(tr: ChannelTracer, op: Op) -> None:
    for _, lab in op.labelled:
        tr.taint(lab, f'{op.where}: {op.name} mixes or drops channels')


@op_rule(*INSPECT)
def inspect(tr: ChannelTracer, op: Op) -> None:
    if isinstance(op.out, torch.Tensor) and op.name in ('data',):
        tr.set_label(op.out, op.labelled[0][1])


@op_rule(*CAST)
def cast(tr: ChannelTracer, op: Op) -> None:
    lab = tr.label(op.args[0]) if op.args else None
    if lab is not None and isinstance(op.out, torch.Tensor) and op.out.shape == op.args[0].shape:
        tr.set_label(op.out, lab)


@op_rule(*POINTWISE)
def pointwise(tr: ChannelTracer, op: Op) -> None:
    outs = flat_tensors(op.out, [])
    if not outs:
        for _, lab in op.labelled:
            tr.taint(lab, f'{op.where}: {op.name} turns channels into a Python value')
        return
    o = outs[0]
    tensors = flat_tensors(op.args, []) + flat_tensors(op.kwargs, [])
    # align on trailing dims (broadcasting)
    ref_t, ref = op.labelled[0]
    rd = ref_t.dim() - ref.dim
    result: Optional[Label] = None
    ok = True
    for t, lab in op.labelled:
        if t.dim() - lab.dim != rd:
            ok = False
    if not ok:
        for _, lab in op.labelled:
            tr.taint(lab, f'{op.where}: {op.name} combines channels with another dimension')
        return
    full = [lab for t, lab in op.labelled if lab.atoms.numel() > 1]
    size = max(lab.atoms.numel() for _, lab in op.labelled)
    for t, lab in op.labelled:
        if lab.atoms.numel() == 1 and size > 1:
            tr.taint(lab, f'{op.where}: a single channel is broadcast over {size} channels by {op.name}')
    for t in tensors:
        if tr.label(t) is None and t.dim() >= rd and t.shape[t.dim() - rd] == size and size > 1:
            for lab in full:
                tr.taint(lab, f'{op.where}: {op.name} with a fixed-size tensor of {size} channels')
    if full:
        for lab in full[1:]:
            tr.sets.union_arrays(full[0].atoms, lab.atoms)
        result = full[0]
    else:
        result = op.labelled[0][1]
    od = o.dim() - rd
    if 0 <= od < o.dim() and o.shape[od] == result.atoms.numel():
        for oo in outs:
            if oo.dim() == o.dim():
                tr.set_label(oo, Label(od, result.atoms))
    else:
        tr.taint(result, f'{op.where}: {op.name} changes the channel dim')


@op_rule(*CHANNELWISE)
def channelwise(tr: ChannelTracer, op: Op) -> None:
    t, lab = op.labelled[0]
    for t2, lab2 in op.labelled[1:]:
        tr.taint(lab2, f'{op.where}: {op.name} uses channels as an extra argument')
    outs = flat_tensors(op.out, [])
    if not outs:
        return
    o = outs[0]
    if t is not (op.args[0] if op.args else None) or o.dim() != t.dim() or o.shape[lab.dim] != t.shape[lab.dim] \
            or lab.dim == t.dim() - 1 and op.name in ('pad',):
        tr.taint(lab, f'{op.where}: {op.name} changes the channel dim')
        return
    tr.set_label(o, lab)


def _reshape_label(lab: Label, src: Sequence[int], dst: Sequence[int]) -> Optional[Label]:
    before = math.prod(src[:lab.dim])
    c = src[lab.dim]
    acc = 1
    for e, size in enumerate(dst):
        if acc == before:
            if size == c:
                return Label(e, lab.atoms)
            # flatten: channel dim merged with the dims after it
            tail, k = 1, lab.dim + 1
            while k < len(src) and size > c * tail:
                tail *= src[k]
                k += 1
            if size == c * tail and tail > 1:
                return Label(e, lab.atoms.repeat_interleave(tail))
        if acc > before:
            break
        acc *= size
    return None


@op_rule(*RESHAPE)
def reshape(tr: ChannelTracer, op: Op) -> None:
    t, lab = op.args[0], tr.label(op.args[0])
    if lab is None:
        return
    if not isinstance(op.out, torch.Tensor):
        return unknown(tr, op)
    new = _reshape_label(lab, list(t.shape), list(op.out.shape))
    if new is None:
        tr.taint(lab, f'{op.where}: {op.name} {tuple(t.shape)}->{tuple(op.out.shape)} reshapes across the channel dim')
    else:
        tr.set_label(op.out, new)


@op_rule('permute', 'transpose', 'swapaxes', 'movedim', 't', 'T')
def permute(tr: ChannelTracer, op: Op) -> None:
    t, lab = op.labelled[0]
    nd = t.dim()
    if op.name == 'permute':
        perm = op.args[1:] if len(op.args) > 2 or (len(op.args) == 2 and isinstance(op.args[1], int)) else \
            _arg(op.args, op.kwargs, 1, 'dims')
        perm = [p % nd for p in perm]
        newdim = perm.index(lab.dim)
    elif op.name in ('t', 'T'):
        newdim = (nd - 1 - lab.dim) if nd == 2 else lab.dim
    elif op.name == 'movedim':
        src = _dims(_arg(op.args, op.kwargs, 1, 'source'), nd)
        dst = _dims(_arg(op.args, op.kwargs, 2, 'destination'), nd)
        order = [d for d in range(nd) if d not in src]
        perm = [None] * nd
        for s, d in zip(src, dst):
            perm[d] = s
        it = iter(order)
        perm = [p if p is not None else next(it) for p in perm]
        newdim = perm.index(lab.dim)
    else:
        a = _arg(op.args, op.kwargs, 1, 'dim0') % nd
        b = _arg(op.args, op.kwargs, 2, 'dim1') % nd
        newdim = b if lab.dim == a else a if lab.dim == b else lab.dim
    tr.set_label(op.out, Label(newdim, lab.atoms))


@op_rule('expand', 'expand_as', 'broadcast_to', 'repeat')
def expand(tr: ChannelTracer, op: Op) -> None:
    t, lab = op.args[0], tr.label(op.args[0])
    if lab is None:
        return
    shift = op.out.dim() - t.dim()
    if op.out.shape[lab.dim + shift] != t.shape[lab.dim]:
        tr.taint(lab, f'{op.where}: {op.name} repeats channels')
        return
    tr.set_label(op.out, Label(lab.dim + shift, lab.atoms))


@op_rule('cat', 'concat', 'concatenate')
def cat(tr: ChannelTracer, op: Op) -> None:
    tensors = list(_arg(op.args, op.kwargs, 0, 'tensors'))
    nd = tensors[0].dim()
    dim = _arg(op.args, op.kwargs, 1, 'dim', 0) % nd
    labs = [tr.label(t) for t in tensors]
    ldims = {lab.dim for lab in labs if lab is not None}
    if len(ldims) > 1:
        for lab in labs:
            tr.taint(lab, f'{op.where}: {op.name} of tensors with channels on different dims')
        return
    ldim = ldims.pop()
    if ldim == dim:
        atoms = torch.cat([lab.atoms if lab is not None else torch.full((t.shape[dim],), -1, dtype=torch.long)
                           for t, lab in zip(tensors, labs)])
        tr.set_label(op.out, Label(dim, atoms))
        return
    # concatenated along another dim: every input's channels share positions
    full = [lab for lab in labs if lab is not None]
    if len(full) != len(labs):
        for lab in full:
            tr.taint(lab, f'{op.where}: {op.name} with a tensor of fixed channels')
        return
    for lab in full[1:]:
        tr.sets.union_arrays(full[0].atoms, lab.atoms)
    tr.set_label(op.out, Label(ldim, full[0].atoms))


@op_rule('stack')
def stack(tr: ChannelTracer, op: Op) -> None:
    tensors = list(_arg(op.args, op.kwargs, 0, 'tensors'))
    dim = _arg(op.args, op.kwargs, 1, 'dim', 0) % (tensors[0].dim() + 1)
    labs = [tr.label(t) for t in tensors]
    full = [lab for lab in labs if lab is not None]
    if len(full) != len(labs) or len({lab.dim for lab in full}) != 1:
        for lab in full:
            tr.taint(lab, f'{op.where}: {op.name} with a tensor of fixed channels')
        return
    for lab in full[1:]:
        tr.sets.union_arrays(full[0].atoms, lab.atoms)
    ldim = full[0].dim
    tr.set_label(op.out, Label(ldim + (1 if dim <= ldim else 0), full[0].atoms))


@op_rule('chunk', 'split', 'unbind', 'tensor_split', 'split_with_sizes')
def split(tr: ChannelTracer, op: Op) -> None:
    t, lab = op.labelled[0]
    nd = t.dim()
    dim = _arg(op.args, op.kwargs, 1, 'dim', 0) if op.name == 'unbind' else _arg(op.args, op.kwargs, 2, 'dim', 0)
    dim = dim % nd
    outs = list(op.out)
    if dim != lab.dim:
        for o in outs:
            shift = -1 if (op.name == 'unbind' and dim < lab.dim) else 0
            tr.set_label(o, Label(lab.dim + shift, lab.atoms))
        return
    if op.name == 'unbind':
        tr.taint(lab, f'{op.where}: unbind over channels')
        return
    sizes = [o.shape[dim] for o in outs]
    owner = None
    if op.name == 'split' and len(set(sizes)) == 1:
        # split at a size a module attribute holds (registered): the shrink updates the attribute
        owner = split_size_owner(tr.stack, sizes[0])
        if owner is not None:
            rec = tr.record_for(owner[0], SplitSize(owner[1]))
            tr.sets.union_arrays(tr.atoms_of(rec, 'size', sizes[0]), lab.atoms[:sizes[0]])
    if (op.name == 'chunk' or owner is not None) and len(set(sizes)) == 1:
        # chunk(n) keeps equal parts after pruning if the k-th channel of every part goes together
        parts = lab.atoms.split(sizes)
        for p in parts[1:]:
            tr.sets.union_arrays(parts[0], p)
        for o, p in zip(outs, parts):
            tr.set_label(o, Label(dim, p))
        return
    tr.taint(lab, f'{op.where}: {op.name} of channels at fixed sizes {sizes}')


def _index_walk(t: torch.Tensor, idx: Any, lab: Label) -> Tuple[Optional[int], Optional[str]]:
    """Return (dim of channels in the result, problem)."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis and not isinstance(i, bool))
    n_real += sum(i.dim() - 1 for i in idx if isinstance(i, torch.Tensor) and i.dtype == torch.bool)
    expanded: List[Any] = []
    for i in idx:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (t.dim() - n_real))
        else:
            expanded.append(i)
    src, dst = 0, 0
    advanced = False
    for i in expanded:
        if i is None:
            dst += 1
            continue
        if isinstance(i, (torch.Tensor, list)) and not (isinstance(i, torch.Tensor) and i.dim() == 0):
            span = i.dim() if isinstance(i, torch.Tensor) and i.dtype == torch.bool else 1
            if src <= lab.dim < src + span:
                return None, 'indexes channels'
            if src > lab.dim:
                break
            advanced = True
            src += span
            dst += 1
            continue
        if src == lab.dim:
            if isinstance(i, slice):
                if i != slice(None) and range(t.shape[src])[i] != range(t.shape[src]):
                    return None, f'slices channels at fixed positions ({i})'
                if not advanced:
                    return dst, None
                break
            return None, 'selects a single channel'
        if isinstance(i, slice):
            src += 1
            dst += 1
        else:
            src += 1
    if src <= lab.dim and not advanced:
        return dst + (lab.dim - src), None
    return -1, None  # resolve from the end


@op_rule('getitem')
def getitem(tr: ChannelTracer, op: Op) -> None:
    t, lab = op.labelled[0]
    if t is not op.args[0] or not isinstance(op.out, torch.Tensor):
        return unknown(tr, op)
    for t2, lab2 in op.labelled[1:]:
        tr.taint(lab2, f'{op.where}: channels used as an index')
    d, problem = _index_walk(t, op.args[1], lab)
    if problem:
        tr.taint(lab, f'{op.where}: indexing {problem}')
        return
    if d == -1:
        d = op.out.dim() - (t.dim() - lab.dim)
    if 0 <= d < op.out.dim() and op.out.shape[d] == lab.atoms.numel():
        tr.set_label(op.out, Label(d, lab.atoms))
    else:
        tr.taint(lab, f'{op.where}: indexing changes the channel dim')


@op_rule('setitem')
def setitem(tr: ChannelTracer, op: Op) -> None:
    target, idx, value = op.args[0], op.args[1], op.args[2]
    tl, vl = tr.label(target), tr.label(value)
    if tl is None:
        tr.taint(vl, f'{op.where}: channels written into a tensor of fixed size')
        return
    d, problem = _index_walk(target, idx, tl)
    if problem:
        tr.taint(tl, f'{op.where}: assignment {problem}')
        tr.taint(vl, f'{op.where}: assignment {problem}')
        return
    if vl is None:
        if isinstance(value, torch.Tensor) and value.numel() > 1 and value.dim() >= target.dim() - tl.dim \
                and value.shape[value.dim() - (target.dim() - tl.dim)] == tl.atoms.numel() > 1:
            tr.taint(tl, f'{op.where}: assignment of a fixed-size tensor across channels')
        return
    if value.dim() - vl.dim != target.dim() - tl.dim or vl.atoms.numel() != tl.atoms.numel():
        tr.taint(tl, f'{op.where}: assignment moves channels')
        tr.taint(vl, f'{op.where}: assignment moves channels')
        return
    tr.sets.union_arrays(tl.atoms, vl.atoms)


@op_rule(*REDUCE)
def reduce(tr: ChannelTracer, op: Op) -> None:
    if op.name in ('max', 'min') and isinstance(_arg(op.args, op.kwargs, 1, 'other', None), torch.Tensor):
        pointwise(tr, op)        # torch.max(a, b): elementwise, as maximum
        return
    t, lab = op.labelled[0]
    nd = t.dim()
    dim = _arg(op.args, op.kwargs, 1, 'dim', None)
    if op.name in ('topk', 'kthvalue'):
        dim = _arg(op.args, op.kwargs, 2, 'dim', -1)
    if op.name in ('sort', 'argsort', 'softmax', 'log_softmax', 'softmin') and dim is None:
        dim = -1
    if isinstance(dim, (str,)) or (dim is not None and not isinstance(dim, (int, list, tuple))):
        dim = None
    dims = _dims(dim, nd)
    if t is not op.args[0] or dims is None or lab.dim in dims:
        tr.taint(lab, f'{op.where}: {op.name} over channels')
        return
    outs = [o for o in flat_tensors(op.out, []) if o.dim() > 0]
    for o in outs:
        if o.dim() == nd:
            d = lab.dim
        else:
            d = lab.dim - sum(1 for x in dims if x < lab.dim)
        if 0 <= d < o.dim() and o.shape[d] == lab.atoms.numel():
            tr.set_label(o, Label(d, lab.atoms))
