"""torch.autograd.Function over the Triton grouped weighted-sum kernels (gradient for w only)."""

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from supermerge.kernels import weighted_sum_triton as kernels


class GroupedWeightedSumFunction(torch.autograd.Function):
    """``out = base + sum_i tanh(w[i, t]) * tau[i]`` on flat buffers; differentiable in ``w`` only.

    Inputs as in :func:`supermerge.kernels.weighted_sum_triton.grouped_forward`; ``base`` and
    ``tau`` are treated as constants (frozen model weights).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, base_flat: Tensor, tau_flat: Tensor, w: Tensor, plan: kernels.ChunkPlan
    ) -> Tensor:
        w32 = w.detach().to(torch.float32).contiguous()
        out = kernels.grouped_forward(base_flat, tau_flat, w32, plan, torch.empty_like(base_flat))
        ctx.save_for_backward(tau_flat, w32)
        ctx.plan = plan
        ctx.w_dtype = w.dtype
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        tau_flat, w32 = ctx.saved_tensors
        plan: kernels.ChunkPlan = ctx.plan
        n_tasks, n_tensors = w32.shape
        # One allocation for dw [k, T] and the per-chunk partials [k, C]: host time counts here.
        scratch = torch.empty(n_tasks * (n_tensors + plan.n_chunks), device=w32.device)
        dw = scratch[: n_tasks * n_tensors].view(n_tasks, n_tensors)
        partial = scratch[n_tasks * n_tensors :].view(n_tasks, plan.n_chunks)
        kernels.grouped_backward(grad_out.contiguous(), tau_flat, w32, plan, dw, partial)
        return None, None, dw.to(ctx.w_dtype), None
