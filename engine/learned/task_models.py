"""How a task's logits are computed from the merged body and the task's own head.

The body's weights are never module state: they are passed in at call time
(`torch.func.functional_call`), so one module skeleton, built without allocating its weights
(accelerate's `init_empty_weights`: parameters on the meta device, buffers real), serves every
task and every step.

Kinds (the YAML's `model.kind`):
- `hf_encoder`: a Hugging Face encoder folder (AutoModel) with a linear head per task, named
  `<head>.weight` / `<head>.bias` in each expert; features are the mean-pooled (or [CLS]) last
  hidden state; inputs are tokenised text.
- `hf_causal_lm`: a Hugging Face causal LM folder (AutoModelForCausalLM): no per-task head, the
  body is every mergeable tensor (embeddings and lm_head included); inputs are prompt +
  completion tokens (`supermerge.learned.lm_inputs`) and the logits are computed only at the
  positions that predict a completion token: [M, vocab] for M completion tokens, never
  [batch, seq, vocab].
- `torch_module`: any `nn.Module` from a factory `package.module:function`; its state_dict names
  are the checkpoint's, the head tensors included; inputs are one tensor `x`.

Every kind gives logits as rows [M, C]: one row per example for classifiers, one per completion
token for causal LMs. `targets` and `rows` map per-example data onto those rows, `correct` says
which examples are right (a causal-LM example when every completion token is the argmax, i.e.
its greedy generation is the completion).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from torch import nn
from torch.func import functional_call

from supermerge.config import ModelSpec
from supermerge.errors import ConfigError, InputError
from supermerge.io.checkpoint import Checkpoint, Tensors
from supermerge.learned.lm_inputs import completion_lengths, completion_targets, predicting_positions
from supermerge.plugins import import_object


class TaskModel(ABC):
    """Computes one task's logits from body weights, head weights and a batch of inputs."""

    module: nn.Module

    @abstractmethod
    def logits(self, body: Tensors, head: Tensors, inputs: Tensors) -> torch.Tensor:
        """[M, classes] logits: a row per example (classifiers) or per completion token.

        Args:
            body: merged body weights (plus the base's non-merged tensors), by name.
            head: the task's own head tensors, by name.
            inputs: a batch, as produced by `supermerge.learned.data`.
        """

    def rows_per_example(self, inputs: Tensors) -> torch.Tensor:
        """[B] int64: how many rows of `logits` each example of the batch has."""
        return torch.ones(next(iter(inputs.values())).shape[0], dtype=torch.int64)

    def targets(self, inputs: Tensors, labels: torch.Tensor | None) -> torch.Tensor | None:
        """[M] the class (or token) each row of `logits` should predict; None if unknown."""
        return labels

    def correct(self, logits: torch.Tensor, inputs: Tensors, labels: torch.Tensor | None) -> torch.Tensor:
        """[B] bool: the examples whose every row's argmax is its target."""
        hits = logits.argmax(-1) == self.targets(inputs, labels)
        rows = self.rows_per_example(inputs).to(hits.device)
        example = torch.repeat_interleave(torch.arange(len(rows), device=hits.device), rows)
        misses = torch.zeros(len(rows), dtype=torch.int64, device=hits.device)
        return misses.index_add_(0, example, (~hits).long()) == 0

    @staticmethod
    def num_classes(head: Tensors) -> int | None:
        """Classes of a head: rows of its last 2-D weight, or None if it has none."""
        matrices = [t for n, t in head.items() if n.endswith("weight") and t.dim() == 2]
        return matrices[-1].shape[0] if matrices else None


def skeleton(base: Checkpoint, auto_class: str, kind: str) -> nn.Module:
    """The transformers model of the base's config.json (`auto_class`: "AutoModel", ...), its
    weights on the meta device (never allocated), in eval mode."""
    import transformers

    if base.config is None:
        raise ConfigError("model.kind", f"{kind} needs a base model folder with config.json: {base.path}")
    config = transformers.AutoConfig.from_pretrained(base.path)
    with init_empty_weights():
        return getattr(transformers, auto_class).from_config(config).eval()


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
        self.spec = spec
        self.module = skeleton(base, "AutoModel", spec.kind)

    def logits(self, body: Tensors, head: Tensors, inputs: Tensors) -> torch.Tensor:
        hidden = functional_call(self.module, body, args=(), kwargs=inputs).last_hidden_state
        features = pool(hidden, inputs["attention_mask"], self.spec.pooling)
        p = self.spec.head
        return F.linear(features, head[f"{p}.weight"], head.get(f"{p}.bias"))


class HFCausalLMModel(TaskModel):
    """A transformers causal LM (AutoModelForCausalLM of the base's config); no per-task head.

    The decoder runs on the merged weights; the output projection (lm_head, or the input
    embedding when tied) is applied only to the hidden states of the positions that predict a
    completion token.
    """

    def __init__(self, spec: ModelSpec, base: Checkpoint) -> None:
        self.spec = spec
        self.module = skeleton(base, "AutoModelForCausalLM", spec.kind)
        self.prefix = self.module.base_model_prefix
        self.decoder = getattr(self.module, self.prefix)
        output = self.module.get_output_embeddings()
        names = {id(p): n for n, p in self.module.named_parameters(remove_duplicate=False)}
        self.output_weight = names[id(output.weight)]
        if self.output_weight not in base:  # tied: the input embedding is the output projection
            self.output_weight = names[id(self.module.get_input_embeddings().weight)]
            output.weight = self.module.get_input_embeddings().weight  # the skeleton is built untied
        if self.output_weight not in base:
            raise InputError(base.path, f"no output projection: neither lm_head nor '{self.output_weight}'")
        self.output_bias = names[id(output.bias)] if getattr(output, "bias", None) is not None else None

    def hidden(self, body: Tensors, inputs: Tensors) -> torch.Tensor:
        """[B, T, H] the decoder's last hidden state."""
        start = len(self.prefix) + 1
        own = {n[start:]: t for n, t in body.items() if n.startswith(f"{self.prefix}.")}
        kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        return functional_call(self.decoder, own, args=(), kwargs=kwargs).last_hidden_state

    def logits(self, body: Tensors, head: Tensors, inputs: Tensors) -> torch.Tensor:
        hidden = self.hidden(body, inputs)[predicting_positions(inputs["completion_mask"])]
        # the output module, not F.linear: in layer-gather mode its weight arrives through its hooks
        given = {"weight": self.output_weight, "bias": self.output_bias}
        own = {k: body[n] for k, n in given.items() if n is not None and n in body}
        return functional_call(self.module.get_output_embeddings(), own, (hidden,))

    def rows_per_example(self, inputs: Tensors) -> torch.Tensor:
        return completion_lengths(inputs["completion_mask"])

    def targets(self, inputs: Tensors, labels: torch.Tensor | None) -> torch.Tensor:
        return completion_targets(inputs["input_ids"], inputs["completion_mask"])


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
    if spec.kind == "hf_causal_lm":
        return HFCausalLMModel(spec, base)
    return HFEncoderModel(spec, base)
