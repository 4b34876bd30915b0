r"""Re-fitting kept weights to the layer-wise reconstruction objective (DESIGN.md §5 "Finish" and §9).

For a layer with dense weight :math:`W_0` and input second moment :math:`C = X X^\top / N`, the kept set
:math:`S_r` of row :math:`r` gets the values that minimise :math:`(w - w_{0,r}) C (w - w_{0,r})^\top` over
:math:`w` supported on :math:`S_r`: :math:`(C_{SS} + \lambda I) w_S = (C w_{0,r})_S` with
:math:`\lambda = \text{damping} \cdot \text{mean}(\text{diag}\, C)`. Pruned weights stay zero.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import Tensor

from icbs.baselines.alps import pcg_refit
from icbs.exceptions import PruningError
from icbs.state import PruningState

__all__ = ["reconstruct_weights", "refit_state", "Refitter", "RowRefit"]


@torch.no_grad()
def reconstruct_weights(w0: Tensor, keep_mask: Tensor, covariance: Tensor, damping: float) -> Tensor:
    """Refit the kept weights of one layer by damped least squares (see the module docstring).

    Args:
        w0: ``(n_out, n_in)`` dense original weight.
        keep_mask: ``(n_out, n_in)`` bool.
        covariance: ``(n_in, n_in)`` ``C``.
        damping: ``bcd.refit_damping``.

    Returns:
        ``(n_out, n_in)`` new weight (zeros where pruned), dtype of ``w0``.

    Raises:
        PruningError: a system is singular (raise ``bcd.refit_damping``).
    """
    C = covariance.double().to(w0.device)
    lam = damping * float(torch.diagonal(C).mean())
    target = w0.double() @ C  # row r: (C w0_r)^T, C symmetric
    out = torch.zeros_like(w0, dtype=torch.float64)
    eye = torch.eye(C.shape[0], dtype=torch.float64, device=C.device)
    for r in range(w0.shape[0]):
        cols = torch.nonzero(keep_mask[r]).squeeze(1)
        if cols.numel() == 0:
            continue
        A = C[cols][:, cols] + lam * eye[: cols.numel(), : cols.numel()]
        try:
            out[r, cols] = torch.linalg.solve(A, target[r, cols])
        except RuntimeError as err:
            raise PruningError(f"reconstruction system is singular; increase bcd.refit_damping ({err})") from err
    if not bool(torch.isfinite(out).all()):
        raise PruningError("reconstruction gave non-finite weights; increase bcd.refit_damping")
    return out.to(w0.dtype)


def refit_state(state: PruningState, covariances: Mapping[str, Tensor], damping: float) -> None:
    """Refit every layer's kept weights (:func:`reconstruct_weights`), store them as values and write them."""
    for name in state:
        layer = state[name]
        state.set_values(name, reconstruct_weights(layer.w0, layer.keep_mask, covariances[name], damping))
    state.apply()


@dataclasses.dataclass
class RowRefit:
    """The values of some rows of a layer before a refit (what :meth:`Refitter.undo` writes back)."""

    layer: str
    rows: Tensor  # (R,) long
    old_values: Tensor  # (R, n_in)


class Refitter:
    """Re-fit the kept weights of the rows a round's moves touched (DESIGN.md §9), warm-started CG.

    After each round's accepted moves, every touched row ``r`` of a layer gets, on its new kept set ``S``,
    the minimiser of ``(w - w0_r) (C + λI) (w - w0_r)^T`` (damping pulls towards the dense weights), solved
    by ALPS's batched preconditioned CG (:func:`icbs.baselines.alps.pcg_refit`) from the current values; the
    weights the row prunes keep their dense value as their value-if-kept. Later blocks then see current values, and the round check compares true losses after
    the refit. Masks never move here, so every pattern (N:M included) is respected.

    Args:
        covariances: ``{layer: (n_in, n_in)}`` input second moments ``X X^T / N`` of the dense model.
        damping: ``bcd.refit_damping`` (λ = damping · mean diag).
        max_iters: CG iterations per refit (warm starts from the current values converge in few).
        rtol: CG relative residual tolerance.
    """

    def __init__(self, covariances: Mapping[str, Tensor], damping: float, max_iters: int = 64,
                 rtol: float = 1e-6) -> None:
        self.covariances = {name: c.double() for name, c in covariances.items()}
        self.damping, self.max_iters, self.rtol = float(damping), int(max_iters), float(rtol)

    @torch.no_grad()
    def refit_rows(self, state: PruningState, name: str, rows: Tensor) -> RowRefit:
        """Refit ``rows`` of layer ``name``; store them as values, write the weights; return the undo record."""
        layer = state[name]
        rows = rows.to(layer.w0.device)
        C = self.covariances[name].to(layer.w0.device)
        lam = self.damping * float(torch.diagonal(C).mean())
        if layer.values is None:
            layer.values = layer.w0.clone()
        old = layer.values[rows].clone()
        w0 = layer.w0[rows].double()
        keep = layer.keep_mask[rows]
        damped = C + lam * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
        fitted = pcg_refit(w0, damped, keep, start=layer.values[rows].double(), max_iters=self.max_iters,
                           rel_tol=self.rtol)
        if not bool(torch.isfinite(fitted).all()):
            raise PruningError(f"the refit of layer {name!r} gave non-finite weights; increase bcd.refit_damping")
        layer.values[rows] = torch.where(keep, fitted, w0).to(layer.w0.dtype)
        layer.module.weight.data[rows] = layer.values[rows] * keep.to(layer.w0.dtype)
        return RowRefit(name, rows, old)

    def refit_moves(self, state: PruningState, touched: Mapping[str, Tensor]) -> list[RowRefit]:
        """Refit the rows of ``{layer: flat indices}`` (the blocks whose moves were applied)."""
        refits = []
        for name, index in touched.items():
            n_in = state[name].shape[1]
            rows = torch.unique(torch.div(index.cpu(), n_in, rounding_mode="floor"))
            refits.append(self.refit_rows(state, name, rows))
        return refits

    @staticmethod
    @torch.no_grad()
    def undo(state: PruningState, refits: list[RowRefit]) -> None:
        """Put the rows' old values back and rewrite their weights from the (already restored) masks."""
        for refit in reversed(refits):
            layer = state[refit.layer]
            assert layer.values is not None
            layer.values[refit.rows] = refit.old_values
            keep = layer.keep_mask[refit.rows].to(layer.w0.dtype)
            layer.module.weight.data[refit.rows] = refit.old_values * keep
