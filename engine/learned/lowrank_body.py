"""The merged body over a LowRankStore: LoRA experts merged and differentiated through their
factors (supermerge.kernels.lowrank), IA3 experts through their vectors, the others through
dense task vectors.

Per tensor j (as [m, n]) and c_i = tanh(w(i, g(j))):
    merged(j) = base(j) + sum_dense c_i tau_i(j) + sum_lowrank c_i s_i B_i A_i
                + base(j) * (sum_rows c_i v_i)[:, None] + base(j) * (sum_cols c_i v_i)[None, :]
    dL/dw(i, g(j)) += sech^2(w(i, g(j))) <G(j), tau_i(j)>, where
        <G, s_i B_i A_i> comes from the factors, <G, W0 v_i[:, None]> = v_i . rowsum(G * W0)
One process, one device; the merged body [N] and its gradient are dense (the task model's
forward needs them), the task vectors are not.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from supermerge.kernels.lowrank import lowrank_coefficient_grad, lowrank_merge_into
from supermerge.learned.body import WholeBody
from supermerge.learned.coefficients import CoefficientLayout
from supermerge.taskvectors.lowrank_store import LowRankStore


class LowRankBody(WholeBody):
    """Coefficients W [k, G] over a LowRankStore (see the module docstring).

    Args:
        store: base, factors and dense task vectors.
        layout, init, impl: as for Body (impl picks the low-rank kernels, `kernels.lowrank`).
    """

    def __init__(
        self, store: LowRankStore, layout: CoefficientLayout, init: float = 0.3, impl: str = "auto"
    ) -> None:
        super().__init__(store, store.k, layout, init, impl, store.base_flat.device)
        self.store: LowRankStore = store
        self._out: torch.Tensor | None = None

    def _per_tensor(self, flat: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(tensor index, its view of `flat` as a 2-D [m, n] matrix)."""
        for t, view in enumerate(self.store.split(flat).values()):
            yield t, view.reshape(view.shape[0], -1) if view.dim() else view.reshape(1, 1)

    @torch.no_grad()
    def forward(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """[N] merged weights in the base's dtype, detached; `backward` sends their gradient to W.
        Written into `out` when given, else into a buffer the next call reuses (no page faults of
        a fresh N-sized tensor per step)."""
        if out is None:
            if self._out is None:
                self._out = torch.empty_like(self.store.base_flat)
            out = self._out
        coefficients = torch.tanh(self.layout.expand(self.w.detach()))  # [k, T]
        base = dict(self._per_tensor(self.store.base_flat))
        for t, view in self._per_tensor(out):
            part, c = self.store.tensors[t], coefficients[:, t]
            merged = view if view.dtype == torch.float32 else torch.empty(view.shape, device=view.device)
            if part.lowrank:  # base + the factors' product in one GEMM, then the rest in place
                c_lowrank = c[part.lowrank] * part.scales
                lowrank_merge_into(merged, base[t], part.b, part.a, c_lowrank, part.rank_offsets, self.impl)
            else:
                merged.copy_(base[t])
            for i, tau in zip(part.dense, part.taus, strict=True):
                merged.add_(tau.reshape(merged.shape), alpha=float(c[i]))
            if part.rows:
                merged.addcmul_(base[t], (c[part.rows] @ part.row_vectors.float())[:, None])
            if part.cols:
                merged.addcmul_(base[t], (c[part.cols] @ part.col_vectors.float())[None, :])
            if merged is not view:
                view.copy_(merged)
        return out

    def backward(self, grad: torch.Tensor) -> None:
        """Accumulate dLoss/dW into w.grad from dLoss/dmerged [N] of the last `forward`."""
        d_coefficients = torch.zeros(self.store.k, len(self.store.names), device=grad.device)
        base = dict(self._per_tensor(self.store.base_flat))
        for t, g in self._per_tensor(grad):
            part, g = self.store.tensors[t], g.float()
            for i, tau in zip(part.dense, part.taus, strict=True):
                d_coefficients[i, t] += (g * tau.reshape(g.shape).float()).sum()
            if part.lowrank:
                d = lowrank_coefficient_grad(g, part.b, part.a, part.rank_offsets, self.impl) * part.scales
                d_coefficients[part.lowrank, t] += d
            if part.rows or part.cols:
                weighted = g * base[t].float()
                if part.rows:
                    d_coefficients[part.rows, t] += part.row_vectors.float() @ weighted.sum(dim=1)
                if part.cols:
                    d_coefficients[part.cols, t] += part.col_vectors.float() @ weighted.sum(dim=0)
        w_t = self.layout.expand(self.w)  # [k, T], differentiable: shared columns sum
        sech2 = torch.cosh(w_t.detach()).pow(-2)  # from w: 1 - tanh^2 cancels when saturated
        w_t.backward(d_coefficients * sech2)

    def merged_tensors(self) -> dict[str, torch.Tensor]:
        """The merged weights by tensor name (views of one flat buffer of their own), without a graph."""
        return self.store.split(self.forward(torch.empty_like(self.store.base_flat)))
