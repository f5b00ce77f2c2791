"""Learned merging of causal-LM experts on tiny random Llama / Qwen2 models: logits at the
completion positions only, W's gradient, each objective, the distillation targets' cache, the
written model, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from supermerge.cli import main
from supermerge.config import config_from_dict
from supermerge.learned import teacher as teacher_module
from supermerge.learned.body import MergedBody
from supermerge.learned.coefficients import CoefficientLayout
from supermerge.learned.data import TopK
from supermerge.learned.lm_inputs import collate, encode, predicting_positions
from supermerge.learned.objectives import distill
from supermerge.learned.task_models import HFCausalLMModel
from supermerge.learned.trainer import CoefficientTrainer
from supermerge.learned_merge import load_inputs, run_learned_merge
from supermerge.taskvectors.store import TaskVectorStore
from tests.files import tree_hashes
from tests.lm import byte_tokenizer, choice_task, generation_task, lm_expert, tiny_lm, write_completion_task

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def lm_doc(tmp_path: Path, base: Path, experts: dict[str, Path], data: dict[str, Path], **method) -> dict:
    return {
        "base": str(base),
        "experts": [{"name": t, "path": str(p), "data": str(data[t])} for t, p in experts.items()],
        "method": {"name": "supermerge", "steps": 4, "lr": 0.1, "batch_size": 4} | method,
        "model": {"kind": "hf_causal_lm", "max_length": 48},
        "output": str(tmp_path / "merged"),
    }


@pytest.mark.parametrize("family, tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_logits_are_the_full_models_at_the_completion_positions(
    tmp_path: Path, seed: int, family: str, tied: bool
) -> None:
    from transformers import AutoModelForCausalLM

    from supermerge.config import ModelSpec
    from supermerge.io.checkpoint import Checkpoint

    folder = tiny_lm(tmp_path / "m", seed, family, tied)
    tok = byte_tokenizer()
    batch = collate([encode(tok, "hello", " there", 32), encode(tok, "a much longer prompt", " x", 32)], 0)
    ckpt = Checkpoint(folder)
    assert ("lm_head.weight" in ckpt) is not tied
    model = HFCausalLMModel(ModelSpec(kind="hf_causal_lm"), ckpt)
    ours = model.logits({n: ckpt.read(n) for n in ckpt.names}, {}, batch)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        full = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = full[predicting_positions(batch["completion_mask"])]
    assert ours.shape == (int(batch["completion_mask"][:, 1:].sum()), 256)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_distill_is_the_kl_divergence_and_zero_at_the_teacher(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    teacher_logits, student = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    full = TopK(torch.arange(7).expand(5, 7), teacher_logits)
    assert float(distill(teacher_logits, full)) == pytest.approx(0, abs=1e-6)
    kl = torch.nn.functional.kl_div(
        student.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True, reduction="sum"
    )
    assert float(distill(student, full)) == pytest.approx(float(kl), rel=1e-5)
    top = teacher_logits.topk(3, dim=-1)  # top-k: the teacher's kept part renormalised
    p = top.values.softmax(-1)
    expected = (p * (p.log() - student.log_softmax(-1).gather(1, top.indices))).sum()
    assert float(distill(student, TopK(top.indices, top.values))) == pytest.approx(float(expected), rel=1e-5)


def lettered_task(path: Path, expert: Path, seed: int, n: int = 8) -> Path:
    """Prompts answered by `expert`'s own choice of letters (its argmax among a-z, 2 steps): data
    that this expert fits better than the base does."""
    from transformers import AutoModelForCausalLM

    tok = byte_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(expert, dtype="auto").eval()
    letters = torch.tensor([tok.convert_tokens_to_ids(c) for c in LETTERS])
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = "".join(LETTERS[int(i)] for i in torch.randint(26, (5,), generator=gen))
        ids = tok(prompt)["input_ids"]
        answer = ""
        for _ in range(2):
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1]
            pick = int(letters[logits[letters].argmax()])
            ids.append(pick)
            answer += tok.convert_ids_to_tokens(pick)
        rows.append({"prompt": prompt, "completion": answer})
    return write_completion_task(path, rows)


@pytest.fixture
def lm_pair(tmp_path: Path, seed: int):
    """A tiny Llama base, two experts (large task vectors) and each expert's own lettered task."""
    base = tiny_lm(tmp_path / "base", seed)
    experts = {t: lm_expert(base, tmp_path / t, seed + i + 1, scale=0.5) for i, t in enumerate(("a", "b"))}
    data = {t: lettered_task(tmp_path / f"{t}.jsonl", p, seed + 7) for t, p in experts.items()}
    return base, experts, data


def test_w_gradient_matches_autograd_through_the_full_model_in_float64(
    tmp_path: Path, gen: torch.Generator
) -> None:
    """The trainer's dLoss/dW (fused merge, leaf gradients, completion-only logits) vs autograd
    through base + tanh(W) tau fed to the transformers model with its full [B, T, vocab] logits.
    The model's RMSNorm computes in fp32 whatever the dtype, so the two agree to fp32 rounding
    (and finite differences are too noisy to check it)."""
    from transformers import AutoModelForCausalLM

    base = tiny_lm(tmp_path / "base", 1, dtype=torch.float64)
    experts = {t: lm_expert(base, tmp_path / t, i + 2, scale=0.3) for i, t in enumerate(("a", "b"))}
    data = {
        "a": choice_task(tmp_path / "a.jsonl", 3, n=5),
        "b": generation_task(tmp_path / "b.jsonl", 4, n=5),
    }
    doc = lm_doc(tmp_path, base, experts, data, impl="torch")
    run = load_inputs(config_from_dict(doc, tmp_path), torch.device("cpu"))
    store = TaskVectorStore.build(run.source, torch.float64)
    body = MergedBody(store, CoefficientLayout.build(store.names), impl="torch")
    body.w = torch.nn.Parameter(torch.randn(body.w.shape, generator=gen, dtype=torch.float64) * 0.5)
    tasks = list(run.tasks.values())
    trainer = CoefficientTrainer(body, run.model, tasks, run.fixed, run.params.train_config())
    trainer.losses_and_grad()

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).eval()
    w = body.w.detach().clone().requires_grad_()
    states = [load_file(str(p / "model.safetensors")) for p in (base, *experts.values())]
    merged = {
        name: states[0][name]
        + sum(torch.tanh(w[i, j]) * (s[name] - states[0][name]) for i, s in enumerate(states[1:]))
        for j, name in enumerate(store.names)
    }
    total = 0
    for task in tasks:
        batch = task.data.inputs
        logits = torch.func.functional_call(
            model, merged, (), dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        ).logits
        targets = batch["input_ids"][:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="sum")
        total = total + loss / (len(task.data) * len(tasks))
    total.backward()
    torch.testing.assert_close(body.w.grad, w.grad, rtol=1e-5, atol=1e-8)  # fp32 RMSNorm inside


@pytest.mark.parametrize("objective", ["cross_entropy", "distill", "entropy"])
def test_each_objective_lowers_its_loss_and_writes_a_loadable_model(
    tmp_path: Path, lm_pair, objective: str
) -> None:
    from transformers import AutoModelForCausalLM

    base, experts, data = lm_pair
    doc = lm_doc(tmp_path, base, experts, data, objective=objective, steps=8, lr=0.2)
    inputs = [base, *experts.values(), *data.values()]
    before = tree_hashes(*inputs)
    summary = run_learned_merge(config_from_dict(doc, tmp_path), progress=False)
    out = tmp_path / "merged"
    record = json.loads((out / "coefficients.json").read_text())["nodes"][-1]
    first, last = record["losses"][0], record["losses"][-1]
    assert sum(last.values()) < sum(first.values()), record["losses"]
    assert set(summary.validation_accuracy) == {"a", "b"}
    model = AutoModelForCausalLM.from_pretrained(out)  # the output is a causal LM folder
    assert (out / "chat_template.jinja").is_file()  # with the base's tokenizer, chat template included
    coefficients = json.loads((out / "coefficients.json").read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    column = coefficients["columns"].index(coefficients["tensors"][name])
    base_tensor = load_file(str(base / "model.safetensors"))[name]
    expected = base_tensor + sum(
        coefficients["effective"][t][column] * (load_file(str(p / "model.safetensors"))[name] - base_tensor)
        for t, p in experts.items()
    )
    torch.testing.assert_close(dict(model.named_parameters())[name].detach(), expected, rtol=1e-5, atol=1e-6)
    assert tree_hashes(*inputs) == before  # no input touched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("merged")) == ["merged"]


def test_distillation_pulls_a_single_expert_in_fully(tmp_path: Path, lm_pair) -> None:
    """With one expert, distillation's optimum is the expert itself: tanh(w) -> 1 from 0.3."""
    base, experts, data = lm_pair
    doc = lm_doc(tmp_path, base, {"a": experts["a"]}, data, objective="distill", steps=15, lr=0.3)
    doc["method"]["granularity"] = "task"
    run_learned_merge(config_from_dict(doc, tmp_path), progress=False)
    effective = json.loads((tmp_path / "merged" / "coefficients.json").read_text())["effective"]["a"]
    assert effective[0] > 0.6, effective


def test_distillation_targets_are_cached_by_expert_and_data_content(
    tmp_path: Path, lm_pair, monkeypatch
) -> None:
    base, experts, data = lm_pair
    cache = tmp_path / "targets"
    doc = lm_doc(tmp_path, base, experts, data, objective="distill", steps=1, targets_cache=str(cache))
    run_learned_merge(config_from_dict(doc, tmp_path), progress=False)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and not (tmp_path / "merged.run").exists()
    computed = []
    real = teacher_module.compute_targets
    monkeypatch.setattr(teacher_module, "compute_targets", lambda *a: computed.append(a) or real(*a))
    run_learned_merge(config_from_dict(doc, tmp_path), overwrite=True, progress=False)
    assert computed == []  # both read from the cache
    lm_expert(base, experts["b"], 99, scale=0.5)  # the expert changes on disk: its key changes
    run_learned_merge(config_from_dict(doc, tmp_path), overwrite=True, progress=False)
    assert len(computed) == 1 and len(list(cache.iterdir())) == 3


def test_a_bad_generative_task_file_is_refused_with_its_line(capsys, tmp_path: Path, lm_pair) -> None:
    base, experts, data = lm_pair
    data["b"].write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "q"}\n')
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(lm_doc(tmp_path, base, experts, data)))
    assert main(["-q", "merge", str(config)]) == 2
    err = capsys.readouterr().err
    assert "b.jsonl" in err and "line 2: missing non-empty string field 'completion'" in err
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("where", ["base", "output"])
def test_a_targets_cache_inside_an_input_or_the_output_is_refused(
    capsys, tmp_path: Path, lm_pair, where: str
) -> None:
    base, experts, data = lm_pair
    cache = base / "targets" if where == "base" else tmp_path / "merged" / "targets"
    doc = lm_doc(tmp_path, base, experts, data, objective="distill", targets_cache=str(cache))
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(doc))
    before = tree_hashes(base)
    assert main(["-q", "merge", str(config)]) == 2
    err = capsys.readouterr().err
    assert "targets" in err and (
        "the base" in err if where == "base" else "distillation targets cache" in err
    )
    assert tree_hashes(base) == before and not cache.exists() and not (tmp_path / "merged").exists()
