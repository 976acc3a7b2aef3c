"""Channel atoms: the bookkeeping the trace (:mod:`mmfisher.core.trace`) builds on.

Every channel-indexed dimension of a module parameter (a conv's output and input channels, a norm's
features) is an array of *atoms*: integers allocated once per module, so a module called several
times (a detection head shared by all FPN levels) keeps one set of atoms.

* :class:`AtomSets`: union-find over atoms. Operations that force channels to be removed together
  *union* atoms; operations that mix channels in a way that cannot survive removing one *taint* them
  with a reason, and a class with a reason is never pruned.
* :class:`Label`: which dimension of a tensor carries channels and which atom sits at each position.
* :func:`flat_tensors`: the tensors inside nested call arguments and outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch


class AtomSets:
    """Union-find over integer atoms, solved once at the end.

    The trace only adds: it allocates atoms, records unions (pairs of atom arrays) and taints (atoms
    with a reason). :meth:`roots` then finds every connected class in a few vectorised passes; a
    class's root is its smallest atom, and its reasons (:meth:`reasons`) are those of all its atoms,
    in the order they were given. Negative atoms (positions no module produced) are ignored.
    """

    def __init__(self) -> None:
        self.size = 0
        self._unions: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self._taints: List[Tuple[torch.Tensor, str]] = []
        self._roots: Optional[torch.Tensor] = None
        self._allocated: Dict[int, torch.Tensor] = {}      # id -> array alloc() returned (kept alive here)

    def alloc(self, n: int) -> torch.Tensor:
        """``n`` fresh atoms: ``[n]`` LongTensor."""
        start = self.size
        self.size += n
        atoms = torch.arange(start, start + n, dtype=torch.long)
        self._allocated[id(atoms)] = atoms
        return atoms

    def allocated(self, atoms: torch.Tensor) -> bool:
        """Whether ``atoms`` is an array :meth:`alloc` returned (so it holds no negative atom)."""
        return self._allocated.get(id(atoms)) is atoms

    def union_arrays(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Union ``a[i]`` with ``b[i]`` for every i."""
        a, b = _longs(a), _longs(b)
        if a.numel() != b.numel():
            raise ValueError(f'union of {a.numel()} atoms with {b.numel()}')
        if a.numel():                 # negative atoms and self-unions are dropped when solving
            self._unions.append((a if a.dim() == 1 else a.reshape(-1), b if b.dim() == 1 else b.reshape(-1)))
            self._roots = None

    def union_rows(self, rows: torch.Tensor) -> None:
        """Union the atoms of every row of ``rows`` (``[k, m]``): k classes of m atoms."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if rows.shape[-1] > 1:
            self.union_arrays(rows[:, :1].expand_as(rows[:, 1:]).reshape(-1), rows[:, 1:].reshape(-1))

    def union_all(self, atoms: Iterable[int]) -> None:
        """Union all of ``atoms`` into one class."""
        atoms = torch.as_tensor(list(atoms) if not isinstance(atoms, torch.Tensor) else atoms, dtype=torch.long)
        atoms = atoms[atoms >= 0]
        if atoms.numel() > 1:
            self.union_rows(atoms[None])

    def taint(self, atoms: Iterable[int], reason: str) -> None:
        """The classes of ``atoms`` cannot be pruned, because of ``reason``."""
        atoms = _longs(atoms).reshape(-1)
        atoms = atoms[atoms >= 0]
        if atoms.numel():
            self._taints.append((atoms, reason))

    def roots(self) -> torch.Tensor:
        """``[size]`` LongTensor: the root (smallest atom) of every atom's class."""
        if self._roots is None:
            self._roots = connected_roots(self.size, self._unions)
        return self._roots

    def forget_roots(self) -> None:
        """Drop the solved classes: the next :meth:`roots` solves them again (a benchmark times that)."""
        self._roots = None

    def find(self, a: int) -> int:
        return int(self.roots()[a]) if a >= 0 else a

    def reasons(self) -> Dict[int, List[str]]:
        """``root -> reasons`` of every tainted class, each reason once, in the order given."""
        roots = self.roots()
        out: Dict[int, List[str]] = {}
        for atoms, reason in self._taints:
            for r in sorted(set(roots.index_select(0, atoms).tolist())):   # faster than unique() here
                lst = out.setdefault(r, [])
                if reason not in lst:
                    lst.append(reason)
        return out


def _longs(atoms: Any) -> torch.Tensor:
    """``atoms`` as a LongTensor (a tensor already long is returned as is)."""
    if isinstance(atoms, torch.Tensor) and atoms.dtype == torch.long:
        return atoms
    return torch.as_tensor(list(atoms) if not isinstance(atoms, torch.Tensor) else atoms, dtype=torch.long)


def connected_roots(n: int, unions: List[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``[n]``: the smallest node of every node's connected component, for the edges ``unions``.

    Alternates hooking (every edge's larger root points at the smaller) with pointer jumping
    until no edge joins two classes; pointers only ever go to smaller nodes, so no cycle forms.
    An edge whose ends share a root keeps sharing it (classes only merge), so each pass looks only
    at the edges the previous one left joining two classes.
    """
    roots = torch.arange(n, dtype=torch.long)
    if not unions:
        return roots
    u = torch.cat([a for a, _ in unions])
    v = torch.cat([b for _, b in unions])
    ok = ((u >= 0) & (v >= 0) & (u != v)).nonzero().flatten()
    u, v = u.index_select(0, ok), v.index_select(0, ok)
    while True:                       # index_select: much faster than advanced indexing on CPU
        ru, rv = roots.index_select(0, u), roots.index_select(0, v)
        differ = (ru != rv).nonzero().flatten()
        if not differ.numel():
            return roots
        u, v = u.index_select(0, differ), v.index_select(0, differ)
        ru, rv = ru.index_select(0, differ), rv.index_select(0, differ)
        roots.scatter_reduce_(0, torch.maximum(ru, rv), torch.minimum(ru, rv), 'amin')
        while True:
            jumped = roots.index_select(0, roots)
            if torch.equal(jumped, roots):
                break
            roots = jumped


@dataclass
class Label:
    """Which dim of a tensor holds channels and the atom at each position.

    ``atoms``: LongTensor of shape ``[tensor.shape[dim]]``; -1 marks a position
    no module produced.
    """

    dim: int
    atoms: torch.Tensor


def flat_tensors(obj: Any, out: List[torch.Tensor], depth: int = 0) -> List[torch.Tensor]:
    """Append to ``out`` every tensor in ``obj`` (nested lists, tuples and dict values, 4 levels)."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for o in obj:
            if isinstance(o, torch.Tensor):      # the common case, without a call
                out.append(o)
            else:
                flat_tensors(o, out, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for o in obj.values():
            flat_tensors(o, out, depth + 1)
    return out
