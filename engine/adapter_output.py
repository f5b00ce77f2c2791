"""A linear merge of LoRA adapters written as one LoRA adapter (`output_format: lora`).

For a linear method (averaging, task arithmetic) the merged model is base + sum_i c_i(j) tau_i(j)
with tau_i(j) = s_i B_i A_i: the same update is the LoRA whose factors are the experts' side by
side, B = [c_1 s_1 B_1 | ... | c_k s_k B_k] and A = [A_1; ...; A_k], of rank R = sum r_i per
module, with scale 1 (alpha = r). c_i(j) comes from the method itself, per tensor (its settings
may vary with depth and names): merging one-hot task vectors gives it. With `lora_rank`, each
module's B A is truncated to that rank by SVD (through QR of B and A^T: a [R, R] core, never the
dense [m, n] product), and the relative Frobenius error of every module is reported.

Every expert must be a LoRA adapter of `base` whose update of each tensor is one LoRA product
(no IA3, no tensors saved whole that differ from the base, no fan_in_fan_out); else refused,
naming the expert and the tensor. The output folder (adapter_config.json,
adapter_model.safetensors) loads with `peft.PeftModel.from_pretrained(base, output)`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import torch
from safetensors.torch import save

from supermerge.config import MergeConfig
from supermerge.errors import InputError
from supermerge.io.adapters import PREFIX, AdapterCheckpoint
from supermerge.io.atomic import atomic_folder
from supermerge.io.paths import check_apart
from supermerge.io.writer import prepare_output
from supermerge.merge import plan_groups
from supermerge.methods import REGISTRY
from supermerge.methods.settings import TensorMethods

log = logging.getLogger(__name__)


@dataclass
class AdapterSummary:
    """What `run_adapter_merge` wrote: modules, the rank of each, the worst truncation error."""

    output: str
    modules: int
    max_rank: int
    max_relative_error: float
    seconds: float

    def line(self) -> str:
        return (
            f"merged LoRA adapter: {self.modules} modules, rank <= {self.max_rank}, "
            f"truncation error <= {self.max_relative_error:.3g} (relative Frobenius), "
            f"{self.seconds:.1f} s -> {self.output}"
        )


def linear_coefficients(method: object, k: int) -> torch.Tensor:
    """c [k] with merge(base, taus) = base + sum_i c_i tau_i, read off a linear method by merging
    one-hot task vectors on a zero base."""
    eye = torch.eye(k)
    return method.merge("coefficients", torch.zeros(k), [eye[i].clone() for i in range(k)])


def truncate(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` factors (B' [m, rank'], A' [rank', n]) of B A, rank' = min(rank, R),
    and ||B A - B' A'||_F / ||B A||_F."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().t())
    u, s, vh = torch.linalg.svd(rb @ ra.t())
    keep = min(rank, s.numel())
    total = s.square().sum()
    error = (s[keep:].square().sum() / total).sqrt().item() if total > 0 else 0.0
    b_out = (qb @ u[:, :keep]) * s[:keep]
    a_out = vh[:keep] @ qa.t()
    return b_out.float(), a_out.float(), error


def run_adapter_merge(cfg: MergeConfig, overwrite: bool = False) -> AdapterSummary:
    """Merge `cfg`'s LoRA experts with its linear method into one LoRA adapter at cfg.output."""
    start = time.perf_counter()
    check_apart(cfg.output, cfg.inputs())
    prepare_output(cfg.output, overwrite)
    (group,) = plan_groups(cfg)  # no slices: one group, the whole model
    source = group.source
    adapters = []
    for expert in source.experts:
        if not isinstance(expert.checkpoint, AdapterCheckpoint) or expert.checkpoint.kind != "lora":
            raise InputError(
                expert.checkpoint.path, "output_format lora needs every expert to be a LoRA adapter"
            )
        if expert.checkpoint.settings.get("fan_in_fan_out"):
            raise InputError(
                expert.checkpoint.path, "output_format lora: fan_in_fan_out adapters are not supported"
            )
        adapters.append(expert.checkpoint)
    methods = TensorMethods(REGISTRY[cfg.method.name], cfg.method.settings, cfg.seed)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    worst = 0.0
    for name in source.names:
        touched = [i for i, a in enumerate(adapters) if name in a.deltas]
        if not touched:
            continue
        method = methods(name, group.depth[name], group.inputs(name), group.scope)
        c = linear_coefficients(method, len(adapters))
        bs, as_ = [], []
        for i in touched:
            factors = adapters[i].lora_factors(name)
            if factors is None or not name.endswith(".weight"):
                raise InputError(
                    adapters[i].path,
                    "output_format lora: its update of this tensor is not one LoRA product",
                    name,
                )
            b, a, scale = factors
            bs.append(b.float() * (float(c[i]) * scale))
            as_.append(a.float())
        b, a = torch.cat(bs, dim=1), torch.cat(as_, dim=0)
        if cfg.lora_rank is not None:
            b, a, error = truncate(b, a, cfg.lora_rank)
            worst = max(worst, error)
        module = name.removesuffix(".weight")
        ranks[module] = b.shape[1]
        if any(d.kind == "lora_embedding" for i in touched for d in adapters[i].deltas[name]):
            # PEFT's embedding LoRA: tau = (B_e A_e)^T
            tensors[f"{PREFIX}{module}.lora_embedding_A"] = b.t().contiguous()
            tensors[f"{PREFIX}{module}.lora_embedding_B"] = a.t().contiguous()
        else:
            tensors[f"{PREFIX}{module}.lora_A.weight"] = a.contiguous()
            tensors[f"{PREFIX}{module}.lora_B.weight"] = b.contiguous()
    if not ranks:
        raise InputError(cfg.experts[0].path, "output_format lora: the adapters change no tensor")
    rank = max(ranks.values())
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": str(cfg.base.absolute()),
        "task_type": adapters[0].settings.get("task_type"),
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {m: r for m, r in ranks.items() if r != rank},
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    record = {"config": cfg.record(), "modules": len(ranks), "max_relative_error": worst}
    with atomic_folder(cfg.output) as folder:
        (folder / "adapter_model.safetensors").write_bytes(save(tensors, {"format": "pt"}))
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (folder / "supermerge_merge.json").write_text(json.dumps(record, indent=2))
    summary = AdapterSummary(str(cfg.output), len(ranks), rank, worst, time.perf_counter() - start)
    log.info("%s", summary.line())
    return summary
