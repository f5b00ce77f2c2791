"""The built-in demo: a small BERT, three synthetic experts, every training-free method.

Until the real evaluation suite lands, the demo shows the whole I/O path end to end: it writes
a base model and three experts as Hugging Face folders (each expert changes different layers
and carries its own classifier head), merges them with every registered method through the
same code path as `supermerge merge`, loads each result with `transformers.AutoModel`, and
prints how far each merged model's outputs are from each expert's (relative L2 distance of the
last hidden state on a fixed batch of token ids; lower is closer).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from supermerge.config import config_from_dict
from supermerge.merge import run_merge
from supermerge.methods import REGISTRY

log = logging.getLogger(__name__)

DEMO_METHOD_PARAMS = {
    "average": {},
    "task_arithmetic": {"lambda": 0.5},
    "ties": {"density": 0.3, "lambda": 1.0},
    "dare_linear": {"density": 0.5, "lambda": 0.5},
    "dare_ties": {"density": 0.5, "lambda": 1.0},
}
TASKS = {
    "first_layer": "encoder.layer.0.",
    "second_layer": "encoder.layer.1.",
    "embeddings": "embeddings.",
}


def _tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )


def build_models(workdir: Path, seed: int = 0) -> tuple[Path, dict[str, Path]]:
    """Write the base and one expert per task; each expert shifts the tensors of its prefix."""
    from transformers import BertModel

    torch.manual_seed(seed)
    base = BertModel(_tiny_bert_config()).eval()
    base_dir = workdir / "base"
    base.save_pretrained(base_dir)
    state = {n: t.detach().clone() for n, t in base.state_dict().items()}
    experts = {}
    for i, (task, prefix) in enumerate(TASKS.items()):
        gen = torch.Generator().manual_seed(seed + 1 + i)
        tuned = {
            n: t + 0.2 * t.std() * torch.randn(t.shape, generator=gen)
            if n.startswith(prefix) and t.is_floating_point()
            else t
            for n, t in state.items()
        }
        tuned["classifier.weight"] = torch.randn(3 + i, 64, generator=gen)
        tuned["classifier.bias"] = torch.zeros(3 + i)
        path = workdir / f"expert_{task}"
        path.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous() for n, t in tuned.items()}, str(path / "model.safetensors"))
        (path / "config.json").write_bytes((base_dir / "config.json").read_bytes())
        experts[task] = path
    return base_dir, experts


@torch.no_grad()
def _hidden(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Last hidden state of the body in `model_dir` (an expert's head is ignored on load)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir).eval()
    return model(input_ids=ids).last_hidden_state


def run_demo(workdir: str | Path, progress: bool = True) -> dict[str, dict[str, float]]:
    """Build models, merge with every method, and print the distance table; returns it."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    base_dir, experts = build_models(workdir)
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    expert_out = {t: _hidden(p, ids) for t, p in experts.items()}
    base_out = _hidden(base_dir, ids)
    table = {"(base)": {t: float((base_out - r).norm() / r.norm()) for t, r in expert_out.items()}}
    for method in REGISTRY:
        cfg = config_from_dict(
            {
                "base": str(base_dir),
                "experts": [{"name": t, "path": str(p)} for t, p in experts.items()],
                "method": {"name": method, **DEMO_METHOD_PARAMS.get(method, {})},
                "heads": ["classifier.*"],
                "output": str(workdir / f"merged_{method}"),
            },
            workdir,
        )
        summary = run_merge(cfg, overwrite=True, progress=progress)
        log.info(summary.line())
        out = _hidden(cfg.output, ids)
        table[method] = {t: float((out - ref).norm() / ref.norm()) for t, ref in expert_out.items()}
    print(f"\nrelative distance of merged outputs to each expert's (lower is closer), {workdir}")
    print(f"{'method':16s}" + "".join(f"{t:>14s}" for t in TASKS))
    for method, row in table.items():
        print(f"{method:16s}" + "".join(f"{row[t]:14.4f}" for t in TASKS))
    return table
