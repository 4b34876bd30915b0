"""The block problem: a QUBO with disjoint cardinality constraints (DESIGN.md §3).

:class:`CardinalityQP` is the one object that crosses the torch/solver boundary. It holds

* a symmetric float64 matrix ``Q`` (n, n) and an ``offset`` ``c``; the energy of a 0/1 vector
  ``x`` is :math:`E(x) = x^\\top Q x + c` (diagonal entries act as linear terms, since
  :math:`x_i^2 = x_i`);
* a list of disjoint groups ``G`` with counts ``k_G``; ``x`` is feasible when
  :math:`\\sum_{i \\in G} x_i = k_G` for every group (variables in no group are free);
* optionally the continuous data of the block (:class:`BlockData`) that the OBS family uses.

From the continuous data, with :math:`D = \\mathrm{diag}(w_0)`, :math:`H_\\lambda = H + 2\\lambda I`,
:math:`\\Delta = -(d + D x)` (``x_i = 1`` means pruned):

.. math::

    \\Delta L(x) = \\alpha g^\\top \\Delta + \\tfrac12 \\Delta^\\top H \\Delta + \\lambda \\|\\Delta\\|^2
                = x^\\top Q x + c,

    Q = \\tfrac12 D H_\\lambda D + \\mathrm{diag}(D H_\\lambda d - \\alpha D g), \\quad
    c = -\\alpha g^\\top d + \\tfrac12 d^\\top H_\\lambda d.

Conversions: dimod BQM with a penalty :math:`P \\sum_G (\\sum_{i\\in G} x_i - k_G)^2`, dimod CQM with
native equality constraints, Ising ``(h, J, offset)``, and two file formats (see :meth:`CardinalityQP.write`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["BlockData", "CardinalityQP"]

_TEXT_SUFFIXES = (".qp", ".txt", ".qubo")
_DIMOD_SUFFIXES = (".cqm", ".dimod")
_TEXT_HEADER = "# icbs CardinalityQP v1"


def _as_float_array(value: Any, name: str, ndim: int) -> np.ndarray:
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"'{name}' should be a numeric array; got {type(value).__name__}") from exc
    if array.ndim != ndim:
        raise ValueError(f"'{name}' should have {ndim} dimension(s); got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"'{name}' should contain only finite values; got non-finite entries")
    return array


@dataclasses.dataclass(frozen=True, eq=False)
class BlockData:
    """Continuous data of one block, as used by the OBS family.

    Attributes:
        H: (n, n) float64 Hessian block (symmetric).
        g: (n,) float64 gradient.
        w0: (n,) float64 original weight values.
        d: (n,) float64 current deviation ``w - w0`` (``-w0_i`` where pruned, 0 where kept).
        alpha: gradient multiplier.
        ridge: ridge coefficient ``lambda``.
    """

    H: np.ndarray
    g: np.ndarray
    w0: np.ndarray
    d: np.ndarray
    alpha: float = 1.0
    ridge: float = 0.0

    def __post_init__(self) -> None:
        H = _as_float_array(self.H, "H", 2)
        n = H.shape[0]
        if H.shape != (n, n):
            raise ValueError(f"'H' should be square; got shape {H.shape}")
        H = 0.5 * (H + H.T)
        arrays = {"H": H}
        for name in ("g", "w0", "d"):
            array = _as_float_array(getattr(self, name), name, 1)
            if array.shape != (n,):
                raise ValueError(f"'{name}' should have shape ({n},) to match 'H'; got {array.shape}")
            arrays[name] = array
        for name in ("alpha", "ridge"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
                raise ValueError(f"'{name}' should be a finite float; got {value!r}")
        if self.ridge < 0:
            raise ValueError(f"'ridge' should be a non-negative float; got {self.ridge!r}")
        for name, array in arrays.items():
            array.setflags(write=False)
            object.__setattr__(self, name, array)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "ridge", float(self.ridge))

    @property
    def n(self) -> int:
        """Number of weights in the block."""
        return int(self.w0.shape[0])

    def regularised_hessian(self) -> np.ndarray:
        """Return ``H + 2 * ridge * I`` as a new (n, n) float64 array."""
        return self.H + 2.0 * self.ridge * np.eye(self.n)

    def delta(self, x: np.ndarray) -> np.ndarray:
        """Return the weight change ``Delta = -(d + diag(w0) x)`` for a 0/1 vector ``x``."""
        return -(self.d + self.w0 * np.asarray(x, dtype=np.float64))

    def loss_change(self, x: np.ndarray) -> float:
        """Return ``alpha g^T Delta + 1/2 Delta^T H Delta + ridge ||Delta||^2`` evaluated directly."""
        delta = self.delta(x)
        return float(
            self.alpha * self.g @ delta + 0.5 * delta @ self.H @ delta + self.ridge * delta @ delta
        )


class CardinalityQP:
    """A QUBO ``x^T Q x + offset`` subject to disjoint constraints ``sum_{i in G} x_i = k_G``.

    Args:
        Q: (n, n) real matrix; an asymmetric one is replaced by ``(Q + Q^T) / 2``, which has the
            same energy for every ``x``.
        constraints: sequence of ``(indices, k)`` pairs, one per group; the groups must be
            disjoint. ``None`` means no constraint (every variable is free).
        offset: constant added to every energy.
        block: continuous data the matrix was built from, if any (see :meth:`from_block`).

    Raises:
        ValueError: ``Q`` is not square or not finite, an index is out of range or repeated,
            groups overlap, or ``k`` is outside ``[0, |G|]``.

    Example:
        >>> qp = CardinalityQP([[1.0, -2.0], [-2.0, 1.0]], [([0, 1], 1)])
        >>> qp.energy([1, 0])
        1.0
    """

    def __init__(
        self,
        Q: Any,
        constraints: Sequence[tuple[Sequence[int], int]] | None = None,
        offset: float = 0.0,
        block: BlockData | None = None,
    ) -> None:
        matrix = _as_float_array(Q, "Q", 2) if np.size(Q) else np.zeros((0, 0))
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"'Q' should be a square matrix; got shape {matrix.shape}")
        matrix = 0.5 * (matrix + matrix.T)
        matrix.setflags(write=False)
        self._Q = matrix
        n = matrix.shape[0]
        try:
            offset_value = float(offset)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"'offset' should be a float; got {offset!r}") from exc
        if not math.isfinite(offset_value):
            raise ValueError(f"'offset' should be finite; got {offset!r}")
        self._offset = offset_value
        self._groups, self._ks, self._group_of = self._check_constraints(constraints, n)
        if block is not None:
            if not isinstance(block, BlockData):
                raise TypeError(f"'block' should be a BlockData or None; got {type(block).__name__}")
            if block.n != n:
                raise ValueError(f"'block' should have n={n} weights to match 'Q'; got {block.n}")
        self._block = block

    @staticmethod
    def _check_constraints(
        constraints: Sequence[tuple[Sequence[int], int]] | None, n: int
    ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        group_of = np.full(n, -1, dtype=np.int64)
        groups: list[np.ndarray] = []
        ks: list[int] = []
        for index, item in enumerate(constraints or ()):
            try:
                indices, k = item
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"constraint {index} should be an (indices, k) pair; got {item!r}"
                ) from exc
            members = np.asarray(indices)
            if members.size == 0:
                members = members.astype(np.int64)
            if members.ndim != 1 or not (
                np.issubdtype(members.dtype, np.integer) or members.size == 0
            ):
                raise ValueError(
                    f"'indices' of group {index} should be a 1-D sequence of ints; got {indices!r}"
                )
            members = members.astype(np.int64)
            bad = members[(members < 0) | (members >= n)]
            if bad.size:
                raise ValueError(
                    f"'indices' of group {index} should be in [0, {n - 1}]; got {int(bad[0])}"
                )
            if np.unique(members).size != members.size:
                raise ValueError(f"'indices' of group {index} should not repeat an index; got {indices!r}")
            taken = group_of[members]
            if np.any(taken >= 0):
                position = int(np.flatnonzero(taken >= 0)[0])
                raise ValueError(
                    f"groups should be disjoint; index {int(members[position])} is in group "
                    f"{int(taken[position])} and group {index}"
                )
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
                raise ValueError(f"'k' for group {index} should be an int; got {k!r}")
            if not 0 <= k <= members.size:
                raise ValueError(f"'k' for group {index} should be in [0, {members.size}]; got {k}")
            group_of[members] = index
            members.setflags(write=False)
            groups.append(members)
            ks.append(int(k))
        ks_array = np.array(ks, dtype=np.int64)
        ks_array.setflags(write=False)
        group_of.setflags(write=False)
        return groups, ks_array, group_of

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_block(
        cls,
        H: Any,
        g: Any,
        w0: Any,
        d: Any,
        constraints: Sequence[tuple[Sequence[int], int]] | None,
        *,
        alpha: float = 1.0,
        ridge: float = 0.0,
    ) -> CardinalityQP:
        """Build the block problem of DESIGN.md §3 from its continuous data.

        Args:
            H: (n, n) Hessian block.
            g: (n,) gradient.
            w0: (n,) original weights.
            d: (n,) current deviation ``w - w0``.
            constraints: as in :class:`CardinalityQP`.
            alpha: gradient multiplier.
            ridge: ridge coefficient ``lambda >= 0``.

        Returns:
            A problem whose energy equals ``alpha g^T Delta + 1/2 Delta^T H Delta + ridge ||Delta||^2``
            for every 0/1 ``x``, with ``block`` set.
        """
        block = BlockData(H=H, g=g, w0=w0, d=d, alpha=alpha, ridge=ridge)
        h_reg = block.regularised_hessian()
        w0v, dv = block.w0, block.d
        # 1/2 D H_l D : the purely quadratic part of 1/2 (d + Dx)^T H_l (d + Dx).
        Q = 0.5 * (w0v[:, None] * h_reg * w0v[None, :])
        # Linear part x^T (D H_l d - alpha D g), put on the diagonal because x_i^2 = x_i.
        Q[np.diag_indices_from(Q)] += w0v * (h_reg @ dv) - block.alpha * w0v * block.g
        offset = -block.alpha * float(block.g @ dv) + 0.5 * float(dv @ h_reg @ dv)
        return cls(Q, constraints, offset=offset, block=block)

    # ------------------------------------------------------------------ properties
    @property
    def n(self) -> int:
        """Number of binary variables."""
        return int(self._Q.shape[0])

    @property
    def Q(self) -> np.ndarray:
        """(n, n) symmetric float64 matrix, read-only."""
        return self._Q

    @property
    def offset(self) -> float:
        """Constant energy offset."""
        return self._offset

    @property
    def groups(self) -> list[np.ndarray]:
        """Disjoint groups as read-only int64 index arrays (a new list each call)."""
        return list(self._groups)

    @property
    def ks(self) -> np.ndarray:
        """(n_groups,) int64 array of required counts, read-only."""
        return self._ks

    @property
    def group_of(self) -> np.ndarray:
        """(n,) int64 array: the group of each variable, -1 for free variables; read-only."""
        return self._group_of

    @property
    def constraints(self) -> list[tuple[np.ndarray, int]]:
        """The constraints as ``(indices, k)`` pairs, as accepted by the constructor."""
        return [(group, int(k)) for group, k in zip(self._groups, self._ks)]

    @property
    def block(self) -> BlockData | None:
        """Continuous data of the block, or ``None`` for a plain QUBO."""
        return self._block

    def __repr__(self) -> str:
        return (
            f"CardinalityQP(n={self.n}, n_groups={len(self._groups)}, "
            f"offset={self._offset!r}, block={'yes' if self._block is not None else 'no'})"
        )

    # ------------------------------------------------------------------ evaluation
    def _check_x(self, x: Any) -> np.ndarray:
        array = np.asarray(x)
        if array.shape != (self.n,):
            raise ValueError(f"'x' should have shape ({self.n},); got {array.shape}")
        if array.size and not np.all((array == 0) | (array == 1)):
            raise ValueError("'x' should contain only 0 and 1")
        return array.astype(np.float64)

    def energy(self, x: Any) -> float:
        """Return ``x^T Q x + offset`` for a 0/1 vector ``x`` of shape (n,)."""
        xf = self._check_x(x)
        return float(xf @ self._Q @ xf) + self._offset

    def energies(self, X: Any) -> np.ndarray:
        """Return the energies of the rows of a (m, n) 0/1 matrix as a (m,) float64 array."""
        Xf = np.asarray(X, dtype=np.float64)
        if Xf.ndim != 2 or Xf.shape[1] != self.n:
            raise ValueError(f"'X' should have shape (m, {self.n}); got {Xf.shape}")
        return np.einsum("ij,ij->i", Xf @ self._Q, Xf) + self._offset

    def violations(self, x: Any) -> np.ndarray:
        """Return ``sum_{i in G} x_i - k_G`` for every group as a (n_groups,) int64 array."""
        xi = self._check_x(x).astype(np.int64)
        return np.array(
            [int(xi[group].sum()) - int(k) for group, k in zip(self._groups, self._ks)],
            dtype=np.int64,
        )

    def is_feasible(self, x: Any) -> bool:
        """Return whether the 0/1 vector ``x`` satisfies every cardinality constraint."""
        return not np.any(self.violations(x))

    def default_penalty(self) -> float:
        """Return a penalty weight large enough that every penalty-BQM minimum is feasible.

        Flipping variable ``i`` changes the objective by at most
        ``M_i = |Q_ii| + 2 sum_{j != i} |Q_ij|``; from an infeasible ``x`` a flip inside a violated
        group lowers the penalty by at least ``P``. So ``P > max_i M_i`` makes an infeasible ``x``
        never a minimum. The value is 1 for an all-zero ``Q``.
        """
        if self.n == 0:
            return 1.0
        abs_q = np.abs(self._Q)
        bound = 2.0 * abs_q.sum(axis=1) - np.diag(abs_q)
        grouped = self._group_of >= 0
        value = float(bound[grouped].max()) if grouped.any() else 0.0
        return 1.0001 * value if value > 0 else 1.0

    def penalty_matrix(self, penalty: float | None = None) -> tuple[np.ndarray, float]:
        """Return ``(Q_P, c_P)`` with ``x^T Q_P x + c_P = E(x) + P sum_G (sum_G x - k_G)^2``.

        Args:
            penalty: the weight ``P``; ``None`` picks :meth:`default_penalty`.

        Returns:
            The (n, n) symmetric penalised matrix and its offset.
        """
        weight = self.default_penalty() if penalty is None else float(penalty)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"'penalty' should be a non-negative float; got {penalty!r}")
        Q = np.array(self._Q)
        offset = self._offset
        for group, k in zip(self._groups, self._ks):
            # P (sum_G x - k)^2 = P [ (sum_G x)^2 - 2k sum_G x + k^2 ]
            #   (sum_G x)^2 = x^T 1_G 1_G^T x  -> +P on every (i, j) in G x G, diagonal included
            Q[np.ix_(group, group)] += weight
            #   -2k sum_G x -> linear, on the diagonal because x_i^2 = x_i
            Q[group, group] -= 2.0 * weight * k
            #   +k^2 -> constant
            offset += weight * float(k) ** 2
        return Q, offset

    # ------------------------------------------------------------------ dimod conversions
    def to_bqm(self, penalty: float | None = None) -> Any:
        """Return a dimod ``BinaryQuadraticModel`` with the constraints as a quadratic penalty.

        Variables are labelled ``0..n-1``. The energy of every feasible ``x`` equals
        :meth:`energy`; infeasible ones pay ``P sum_G (sum_G x - k_G)^2``. The penalty weight is
        stored nowhere in the BQM; read :meth:`default_penalty` when ``penalty`` is ``None``.

        Args:
            penalty: penalty weight ``P``; ``None`` uses :meth:`default_penalty`.
        """
        import dimod

        Q, offset = self.penalty_matrix(penalty)
        bqm = dimod.BinaryQuadraticModel(Q, "BINARY") if self.n else dimod.BinaryQuadraticModel("BINARY")
        bqm.offset = offset
        return bqm

    @classmethod
    def from_bqm(
        cls, bqm: Any, constraints: Sequence[tuple[Sequence[int], int]] | None = None
    ) -> CardinalityQP:
        """Build a problem from a dimod BQM and constraints given by variable position.

        Variables are ordered as in ``bqm.variables`` (``0..n-1`` for models made by
        :meth:`to_bqm`). A SPIN model is converted to BINARY first. A penalty already in the BQM
        is kept; it is zero on the feasible set, so feasible energies are unchanged.

        Args:
            bqm: a ``dimod.BinaryQuadraticModel``.
            constraints: as in :class:`CardinalityQP`, indexing positions in ``bqm.variables``.
        """
        import dimod

        if not isinstance(bqm, dimod.BinaryQuadraticModel):
            raise TypeError(f"'bqm' should be a dimod.BinaryQuadraticModel; got {type(bqm).__name__}")
        binary = bqm.change_vartype("BINARY", inplace=False)
        n = binary.num_variables
        labels = list(binary.variables)
        position = {label: index for index, label in enumerate(labels)}
        Q = np.zeros((n, n))
        for label, bias in binary.iter_linear():
            Q[position[label], position[label]] += bias
        for u, v, bias in binary.iter_quadratic():
            i, j = position[u], position[v]
            Q[i, j] += 0.5 * bias
            Q[j, i] += 0.5 * bias
        return cls(Q, constraints, offset=float(binary.offset))

    def _objective_bqm(self) -> Any:
        import dimod

        if self.n == 0:
            return dimod.BinaryQuadraticModel("BINARY")
        bqm = dimod.BinaryQuadraticModel(np.array(self._Q), "BINARY")
        bqm.offset = self._offset
        return bqm

    def to_cqm(self) -> Any:
        """Return a dimod ``ConstrainedQuadraticModel`` with native equality constraints.

        Variables are binary and labelled ``0..n-1``; group ``g`` becomes the constraint
        ``group_g``: ``sum_{i in G} x_i == k_G``.
        """
        import dimod

        cqm = dimod.ConstrainedQuadraticModel()
        cqm.set_objective(self._objective_bqm())
        for index, (group, k) in enumerate(zip(self._groups, self._ks)):
            cqm.add_constraint_from_iterable(
                [(int(i), 1.0) for i in group], "==", rhs=float(k), label=f"group_{index}"
            )
        return cqm

    @classmethod
    def from_cqm(cls, cqm: Any) -> CardinalityQP:
        """Build a problem from a binary dimod CQM whose constraints are cardinality equalities.

        Variables must be labelled ``0..n-1`` (as written by :meth:`to_cqm`); each constraint must
        be ``sum x_i == k`` with unit coefficients over a disjoint set of variables.

        Raises:
            ValueError: a variable label, vartype or constraint does not fit this form.
        """
        import dimod

        labels = list(cqm.variables)
        n = len(labels)
        if sorted(labels) != list(range(n)):
            raise ValueError(f"CQM variables should be labelled 0..{n - 1}; got {labels[:5]}...")
        for label in labels:
            if cqm.vartype(label) is not dimod.BINARY:
                raise ValueError(f"CQM variable {label!r} should be BINARY; got {cqm.vartype(label).name}")
        objective = cqm.objective
        Q = np.zeros((n, n))
        for label, bias in objective.iter_linear():
            Q[label, label] += bias
        for u, v, bias in objective.iter_quadratic():
            Q[u, v] += 0.5 * bias
            Q[v, u] += 0.5 * bias
        def order(item: tuple[Any, Any]) -> tuple[int, str]:
            # Labels written by to_cqm are 'group_<index>'; keep that order (files may reorder).
            label = str(item[0])
            suffix = label.rsplit("_", 1)[-1]
            return (int(suffix), label) if label.startswith("group_") and suffix.isdigit() else (-1, label)

        constraints = []
        for name, constraint in sorted(cqm.constraints.items(), key=order):
            lhs = constraint.lhs
            if constraint.sense is not dimod.sampleset.Sense.Eq or lhs.num_interactions:
                raise ValueError(f"CQM constraint {name!r} should be a linear equality; got {constraint}")
            if any(bias != 1.0 for _, bias in lhs.iter_linear()):
                raise ValueError(f"CQM constraint {name!r} should have unit coefficients")
            rhs = constraint.rhs - lhs.offset
            if rhs != round(rhs):
                raise ValueError(f"CQM constraint {name!r} should have an integer right side; got {rhs}")
            constraints.append((sorted(int(v) for v in lhs.variables), int(round(rhs))))
        return cls(Q, constraints, offset=float(objective.offset))

    def to_ising(self, penalty: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """Return the penalty model in spin form ``s = 2x - 1``.

        ``s^T J s + h^T s + offset`` equals the energy of :meth:`to_bqm` (``penalty`` as there)
        for every ``s`` in {-1, +1}^n.

        Returns:
            ``(h, J, offset)``: ``h`` (n,) float64, ``J`` (n, n) float64 strictly upper triangular,
            and the constant.
        """
        Qp, offset = self.penalty_matrix(penalty)
        # x = (1 + s) / 2:  x^T Qp x = 1/4 (1 + s)^T Qp (1 + s)
        #   = 1/4 1^T Qp 1 + 1/2 (Qp 1)^T s + 1/4 s^T Qp s, and s_i^2 = 1 moves diag(Qp)/4 to the constant
        h = 0.5 * Qp.sum(axis=1)
        J = 0.5 * np.triu(Qp, 1)  # 1/4 (Qp_ij + Qp_ji) for i < j
        constant = offset + 0.25 * float(Qp.sum()) + 0.25 * float(np.trace(Qp))
        return h, J, constant

    # ------------------------------------------------------------------ files
    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the problem to ``path``; the suffix picks the format.

        * ``.qp``, ``.txt``, ``.qubo``: plain text (UBQP style, 0-based; see :meth:`write_text`).
          Keeps the block data.
        * ``.cqm``, ``.dimod``: dimod's own CQM serialisation (:meth:`to_cqm` then ``to_file``).
          Loses the block data.

        Raises:
            ValueError: the suffix is not one of the above.
        """
        suffix = os.fspath(path).lower()
        if suffix.endswith(_TEXT_SUFFIXES):
            self.write_text(path)
        elif suffix.endswith(_DIMOD_SUFFIXES):
            self.write_dimod(path)
        else:
            raise ValueError(
                f"'path' should end in one of {_TEXT_SUFFIXES + _DIMOD_SUFFIXES}; got {os.fspath(path)!r}"
            )

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> CardinalityQP:
        """Read a problem written by :meth:`write`; the suffix picks the format."""
        suffix = os.fspath(path).lower()
        if suffix.endswith(_TEXT_SUFFIXES):
            return cls.read_text(path)
        if suffix.endswith(_DIMOD_SUFFIXES):
            return cls.read_dimod(path)
        raise ValueError(
            f"'path' should end in one of {_TEXT_SUFFIXES + _DIMOD_SUFFIXES}; got {os.fspath(path)!r}"
        )

    def write_dimod(self, path: str | os.PathLike[str]) -> None:
        """Write dimod's CQM file serialisation of :meth:`to_cqm` to ``path``."""
        with self.to_cqm().to_file() as source, open(path, "wb") as target:
            source.seek(0)
            target.write(source.read())

    @classmethod
    def read_dimod(cls, path: str | os.PathLike[str]) -> CardinalityQP:
        """Read a file written by :meth:`write_dimod` (or any CQM fitting :meth:`from_cqm`)."""
        import dimod

        with open(path, "rb") as source:
            return cls.from_cqm(dimod.ConstrainedQuadraticModel.from_file(source))

    def write_text(self, path: str | os.PathLike[str]) -> None:
        """Write the plain text format.

        Layout (``#`` starts a comment line; floats are written with 17 significant digits, so a
        read gives back the same values)::

            # icbs CardinalityQP v1
            n <n> offset <c>
            groups <m>
            <k> <size> <i_1> ... <i_size>          (m lines)
            terms <t>
            <i> <j> <q>                            (t lines, i <= j: q multiplies x_i x_j,
                                                    i.e. Q_ii on the diagonal, 2 Q_ij above it)
            block alpha <a> ridge <r>              (optional, then n+3 lines of n floats:
            <H row 0> ... <H row n-1> <g> <w0> <d>  rows of H, then g, w0, d)
        """
        rows, cols = np.nonzero(np.triu(self._Q))
        lines = [_TEXT_HEADER, f"n {self.n} offset {self._offset!r}", f"groups {len(self._groups)}"]
        for group, k in zip(self._groups, self._ks):
            lines.append(" ".join([str(int(k)), str(group.size), *(str(int(i)) for i in group)]))
        lines.append(f"terms {rows.size}")
        for i, j in zip(rows, cols):
            value = self._Q[i, j] if i == j else 2.0 * self._Q[i, j]
            lines.append(f"{i} {j} {float(value)!r}")
        if self._block is not None:
            block = self._block
            lines.append(f"block alpha {block.alpha!r} ridge {block.ridge!r}")
            for row in (*block.H, block.g, block.w0, block.d):
                lines.append(" ".join(repr(float(v)) for v in row))
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")

    @classmethod
    def read_text(cls, path: str | os.PathLike[str]) -> CardinalityQP:
        """Read the plain text format of :meth:`write_text`.

        Raises:
            ValueError: the file does not follow the format (the message names the line).
        """
        with open(path, encoding="utf-8") as handle:
            lines = [line.split() for line in handle if line.strip() and not line.startswith("#")]
        cursor = 0

        def take(keyword: str | None = None) -> list[str]:
            nonlocal cursor
            if cursor >= len(lines):
                raise ValueError(f"{os.fspath(path)!r}: unexpected end of file (wanted {keyword or 'data'})")
            tokens = lines[cursor]
            if keyword is not None and tokens[0] != keyword:
                raise ValueError(f"{os.fspath(path)!r}: expected '{keyword}' line; got {' '.join(tokens)!r}")
            cursor += 1
            return tokens

        try:
            header = take("n")
            n, offset = int(header[1]), float(header[3])
            n_groups = int(take("groups")[1])
            constraints = []
            for _ in range(n_groups):
                tokens = take()
                k, size = int(tokens[0]), int(tokens[1])
                constraints.append(([int(t) for t in tokens[2 : 2 + size]], k))
            n_terms = int(take("terms")[1])
            Q = np.zeros((n, n))
            for _ in range(n_terms):
                i_text, j_text, value_text = take()
                i, j, value = int(i_text), int(j_text), float(value_text)
                if i == j:
                    Q[i, i] += value
                else:
                    Q[i, j] += 0.5 * value
                    Q[j, i] += 0.5 * value
            block = None
            if cursor < len(lines) and lines[cursor][0] == "block":
                tokens = take("block")
                alpha, ridge = float(tokens[2]), float(tokens[4])
                arrays = [np.array([float(v) for v in take()]) for _ in range(n + 3)]
                block = BlockData(
                    H=np.array(arrays[:n]).reshape(n, n), g=arrays[n], w0=arrays[n + 1],
                    d=arrays[n + 2], alpha=alpha, ridge=ridge,
                )
        except (IndexError, ValueError) as exc:
            raise ValueError(f"{os.fspath(path)!r} is not a CardinalityQP text file: {exc}") from exc
        return cls(Q, constraints, offset=offset, block=block)
