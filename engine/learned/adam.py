"""Adam on the one tensor W, written out.

torch.optim imports torch._dynamo on an optimizer's first use: about 2 s of start-up in every
process of a job (each rank of a launch), which is most of the run of a small merge. W is one
[inputs, columns] tensor and needs none of torch.optim's generality (param groups, foreach,
fused, capturable, amsgrad, weight decay).
"""

from __future__ import annotations

import torch

from supermerge.errors import SupermergeError


class Adam:
    """Adam (Kingma & Ba) on one tensor: the same floats, step for step, as torch.optim.Adam with
    its defaults (betas (0.9, 0.999), eps 1e-8, no weight decay) in its single-tensor form.

    Args:
        param: the tensor trained (a leaf with requires_grad); its .grad is read by `step`.
        lr: learning rate.
    """

    def __init__(
        self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.steps = 0
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)

    def zero_grad(self) -> None:
        self.param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grad = self.param.grad
        beta1, beta2 = self.betas
        self.steps += 1
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = self.lr / (1 - beta1**self.steps)
        bias_correction2_sqrt = (1 - beta2**self.steps) ** 0.5
        denom = (self.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        self.param.addcdiv_(self.exp_avg, denom, value=-step_size)

    def state_dict(self) -> dict:
        """Steps taken and the two moments (tensors on the CPU: loadable with weights_only)."""
        return {"steps": self.steps, "exp_avg": self.exp_avg.cpu(), "exp_avg_sq": self.exp_avg_sq.cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned.

        Raises:
            SupermergeError: `state` is not such a dict (a state saved by an older version) or its
                moments do not have W's shape.
        """
        if set(state) != {"steps", "exp_avg", "exp_avg_sq"}:
            raise SupermergeError(f"the saved Adam state has fields {sorted(state)}, not this version's")
        for name in ("exp_avg", "exp_avg_sq"):
            if state[name].shape != self.param.shape:
                raise SupermergeError(
                    f"the saved Adam {name} has shape {tuple(state[name].shape)}, W {tuple(self.param.shape)}"
                )
            getattr(self, name).copy_(state[name])
        self.steps = int(state["steps"])
