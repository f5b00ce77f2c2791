"""How a task's logits are computed from the merged body and the task's own head.

The body's weights are never module state: they are passed in at call time
(`torch.func.functional_call`), so one module skeleton, built without allocating its weights
(accelerate's `init_empty_weights`: parameters on the meta device, buffers real), serves every
task and every step.

Kinds (the YAML's `model.kind`):
- `hf_encoder`: a Hugging Face encoder folder (AutoModel) with a linear head per task, named
  `<head>.weight` / `<head>.bias` in each expert; features are the mean-pooled (or [CLS]) last
  hidden state; inputs are tokenised text.
- `torch_module`: any `nn.Module` from a factory `package.module:function`; its state_dict names
  are the checkpoint's, the head tensors included; inputs are one tensor `x`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from torch import nn
from torch.func import functional_call

from supermerge.config import ModelSpec
from supermerge.errors import ConfigError
from supermerge.io.checkpoint import Checkpoint, Tensors
from supermerge.plugins import import_object


class TaskModel(ABC):
    """Computes one task's logits from body weights, head weights and a batch of inputs."""

    module: nn.Module

    @abstractmethod
    def logits(self, body: Tensors, head: Tensors, inputs: Tensors) -> torch.Tensor:
        """[batch, classes] logits.

        Args:
            body: merged body weights (plus the base's non-merged tensors), by name.
            head: the task's own head tensors, by name.
            inputs: a batch, as produced by `supermerge.learned.data`.
        """

    @staticmethod
    def num_classes(head: Tensors) -> int | None:
        """Classes of a head: rows of its last 2-D weight, or None if it has none."""
        matrices = [t for n, t in head.items() if n.endswith("weight") and t.dim() == 2]
        return matrices[-1].shape[0] if matrices else None


class TorchModuleModel(TaskModel):
    """An arbitrary nn.Module whose parameters (head included) come from the checkpoints."""

    def __init__(self, spec: ModelSpec) -> None:
        factory = import_object(spec.factory or "", "model.factory")
        with init_empty_weights():
            self.module = factory().eval()

    def logits(self, body: Tensors, head: Tensors, inputs: Tensors) -> torch.Tensor:
        return functional_call(self.module, {**body, **head}, (inputs["x"],))


class HFEncoderModel(TaskModel):
    """A transformers encoder (AutoModel of the base's config) plus a linear head per task."""

    def __init__(self, spec: ModelSpec, base: Checkpoint) -> None:
        from transformers import AutoConfig, AutoModel

        self.spec = spec
        if base.config is None:
            raise ConfigError(
                "model.kind", f"hf_encoder needs a base model folder with config.json: {base.path}"
            )
        config = AutoConfig.from_pretrained(base.path)
        with init_empty_weights():
            self.module = AutoModel.from_config(config).eval()

    def logits(self, body: Tensors, head: Tensors, inputs: Tensors) -> torch.Tensor:
        hidden = functional_call(self.module, body, args=(), kwargs=inputs).last_hidden_state
        features = pool(hidden, inputs["attention_mask"], self.spec.pooling)
        p = self.spec.head
        return F.linear(features, head[f"{p}.weight"], head.get(f"{p}.bias"))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Sentence features [B, H] from a last hidden state [B, T, H]: masked mean or [CLS]."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


def build_task_model(spec: ModelSpec, base: Checkpoint) -> TaskModel:
    """The TaskModel for `spec`."""
    if spec.kind == "torch_module":
        return TorchModuleModel(spec)
    return HFEncoderModel(spec, base)
