r"""Re-fitting kept weights to the layer-wise reconstruction objective (DESIGN.md §5 "Finish" and §9).

For a layer with dense weight :math:`W_0` and input second moment :math:`C = X X^\top / N`, the kept set
:math:`S_r` of row :math:`r` gets the values that minimise :math:`(w - w_{0,r}) C (w - w_{0,r})^\top` over
:math:`w` supported on :math:`S_r`: :math:`(C_{SS} + \lambda I) w_S = (C w_{0,r})_S` with
:math:`\lambda = \text{damping} \cdot \text{mean}(\text{diag}\, C)`. Pruned weights stay zero.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from icbs.exceptions import PruningError
from icbs.state import PruningState

__all__ = ["reconstruct_weights", "refit_state"]


@torch.no_grad()
def reconstruct_weights(w0: Tensor, keep_mask: Tensor, covariance: Tensor, damping: float) -> Tensor:
    """Refit the kept weights of one layer by damped least squares (see the module docstring).

    Args:
        w0: ``(n_out, n_in)`` dense original weight.
        keep_mask: ``(n_out, n_in)`` bool.
        covariance: ``(n_in, n_in)`` ``C``.
        damping: ``bcd.reconstruct_damping``.

    Returns:
        ``(n_out, n_in)`` new weight (zeros where pruned), dtype of ``w0``.

    Raises:
        PruningError: a system is singular (raise ``bcd.reconstruct_damping``).
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
            raise PruningError(f"reconstruction system is singular; increase bcd.reconstruct_damping ({err})") from err
    if not bool(torch.isfinite(out).all()):
        raise PruningError("reconstruction gave non-finite weights; increase bcd.reconstruct_damping")
    return out.to(w0.dtype)


def refit_state(state: PruningState, covariances: Mapping[str, Tensor], damping: float) -> None:
    """Refit every layer's kept weights (:func:`reconstruct_weights`), store them as values and write them."""
    for name in state:
        layer = state[name]
        state.set_values(name, reconstruct_weights(layer.w0, layer.keep_mask, covariances[name], damping))
    state.apply()
