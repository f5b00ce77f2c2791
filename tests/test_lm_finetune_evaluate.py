"""Causal-LM experts: fine-tuning (completion-only loss, cache) and evaluation (rank classification,
exact match), each checked against an independent brute-force reference on fresh random tiny
models (Llama untied and tied, Qwen2), and the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from supermerge.cli import main
from supermerge.demo import lm_finetune
from supermerge.demo.lm_evaluate import (
    choice_scores,
    default_max_new_tokens,
    evaluate_lm,
    greedy_completions,
    load_lm,
)
from supermerge.demo.lm_finetune import (
    LMFinetuneConfig,
    LMLoraFinetuneConfig,
    completion_logits,
    decoder_of,
    finetune_lm_expert,
    finetune_lm_suite,
    is_causal_lm,
)
from supermerge.errors import InputError, SupermergeError
from supermerge.io.adapters import is_adapter
from supermerge.io.completions import Completion, read_completion_file
from supermerge.learned.lm_inputs import (
    collate,
    completion_lengths,
    completion_targets,
    encode,
    pad_id,
    predicting_positions,
)
from tests.lm import byte_tokenizer, choice_task, generation_task, tiny_lm, write_completion_task

FAMILIES = [("llama", False), ("llama", True), ("qwen2", False)]
FAMILY_IDS = ["llama", "llama-tied", "qwen2"]
EOS = 2


def ref_prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """The prompt's ids, written out by hand: BOS + bytes, or the test tokenizer's chat template
    (`<user>...\\n<assistant>`, no BOS)."""
    if chat:
        return tokenizer(f"<user>{prompt}\n<assistant>", add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


@torch.no_grad()
def ref_completion_logprobs(
    model, tokenizer, prompt: str, completion: str, chat: bool = False
) -> torch.Tensor:
    """[completion tokens + 1] log-probabilities of completion + EOS, from one unpadded sequence's
    full [T, vocab] logits."""
    head = ref_prompt_ids(tokenizer, prompt, chat)
    tail = tokenizer(completion, add_special_tokens=False)["input_ids"] + [EOS]
    logits = model(torch.tensor([head + tail])).logits[0].float()  # [T, vocab]
    logp = logits.log_softmax(-1)[len(head) - 1 : -1]  # rows predicting the tail
    return logp.gather(1, torch.tensor(tail)[:, None])[:, 0]


@torch.no_grad()
def ref_greedy(model, tokenizer, prompt: str, steps: int) -> tuple[str, float]:
    """Greedy continuation by hand: `steps` times the argmax of the full logits of the whole
    sequence so far, stopping at EOS; the text and the smallest top-1/top-2 logit gap met."""
    ids = ref_prompt_ids(tokenizer, prompt, False)
    new, gap = [], float("inf")
    for _ in range(steps):
        last = model(torch.tensor([ids + new])).logits[0, -1].float()
        top = last.topk(2).values
        gap = min(gap, float(top[0] - top[1]))
        token = int(last.argmax())
        if token == EOS:
            break
        new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True), gap


@torch.no_grad()
def full_sequence_choice_scores(
    model, tokenizer, examples: list[Completion], batch_size: int, max_length: int, chat: bool = False
) -> list[torch.Tensor]:
    """`choice_scores` the straightforward way (what it did before it cached prompts): every
    (example, choice) sequence `encode` writes, whole, right-padded `batch_size` at a time, and the
    mean log-probability at its completion's predicting positions."""
    encoded = [encode(tokenizer, e.prompt, c, max_length, chat) for e in examples for c in e.choices]
    means = []
    for lo in range(0, len(encoded), batch_size):
        batch = collate(encoded[lo : lo + batch_size], pad_id(tokenizer))
        logp = completion_logits(model, batch).float().log_softmax(-1)  # [M, vocab]
        targets = completion_targets(batch["input_ids"], batch["completion_mask"])  # [M]
        token_logp = logp.gather(1, targets[:, None])[:, 0]
        means += [
            part.mean() for part in token_logp.split(completion_lengths(batch["completion_mask"]).tolist())
        ]
    means = torch.stack(means)
    return list(means.split([len(e.choices) for e in examples]))


def mean_completion_loss(model_dir: Path, examples: list[Completion]) -> float:
    """Mean next-token loss over every completion token (+ EOS) of `examples`, by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    logps = [ref_completion_logprobs(model, tokenizer, e.prompt, e.completion) for e in examples]
    return -float(torch.cat(logps).mean())


def labelled_choice_task(path: Path, seed: int, n: int = 9) -> Path:
    """A text/label task posed by its own template: three classes whose completions differ in length."""
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict] = [{"template": {"prompt": "{text} is a", "completion": " {label}"}}]
    labels = ["cat", "horse", "ox"]
    for i in range(n):
        rows.append(
            {"text": f"thing {i}", "label": labels[(i + int(torch.randint(3, (1,), generator=gen))) % 3]}
        )
    return write_completion_task(path, rows)


@pytest.mark.parametrize(("family", "tied"), FAMILIES, ids=FAMILY_IDS)
def test_completion_logits_are_the_full_logits_at_predicting_positions(tmp_path, seed, family, tied) -> None:
    base = tiny_lm(tmp_path / "base", seed, family, tied)
    model, tokenizer = load_lm(base, progress=False)
    encoded = [encode(tokenizer, "a prompt", " yes", 64), encode(tokenizer, "hi", " a longer one", 64)]
    batch = collate(encoded, pad_id(tokenizer))
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mine = completion_logits(model, batch)
    torch.testing.assert_close(
        mine, full[predicting_positions(batch["completion_mask"])], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(("family", "tied"), FAMILIES, ids=FAMILY_IDS)
def test_finetune_lowers_the_completion_loss_and_reloads(tmp_path, seed, family, tied) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_lm(tmp_path / "base", seed, family, tied)
    task = read_completion_file(
        choice_task(tmp_path / "yesno.jsonl", seed, n=24, split=True), validation_size=2
    )
    train = task.splits["train"]
    cfg = LMFinetuneConfig(epochs=4, lr=1e-2, batch_size=4, max_length=64, seed=seed)
    out = finetune_lm_expert(base, task, tmp_path / "expert", cfg, progress=False)

    before, after = mean_completion_loss(base, train), mean_completion_loss(out, train)
    print(f"completion loss {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before, (before, after)
    expert = AutoModelForCausalLM.from_pretrained(out)
    assert type(expert).__name__ == ("Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM")
    assert expert.config.supermerge_task == "yesno"
    assert AutoTokenizer.from_pretrained(out)("ab")["input_ids"] == byte_tokenizer()("ab")["input_ids"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert ("lm_head.weight" in names) != tied  # tied embeddings stay tied: one tensor on disk
    assert (expert.lm_head.weight.data_ptr() == expert.model.embed_tokens.weight.data_ptr()) == tied


def merged_lora(base: Path, adapter: Path):
    """The adapter merged into its base by PEFT itself (`merge_and_unload`), in eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


@pytest.mark.parametrize("tied", [False, True], ids=["llama", "llama-tied"])
def test_lora_finetune_trains_only_the_factors_and_lowers_the_loss(tmp_path, seed, tied) -> None:
    from transformers import AutoModelForCausalLM

    base = tiny_lm(tmp_path / "base", seed, "llama", tied)
    task = read_completion_file(
        choice_task(tmp_path / "yesno.jsonl", seed, n=24, split=True), validation_size=2
    )
    cfg = LMLoraFinetuneConfig(epochs=8, lr=1e-2, batch_size=4, max_length=64, seed=seed, rank=4, alpha=8)
    out = finetune_lm_expert(base, task, tmp_path / "expert", cfg, progress=False)

    assert is_adapter(out) and not (out / "config.json").exists()
    settings = json.loads((out / "adapter_config.json").read_text())
    assert (settings["peft_type"], settings["r"], settings["lora_alpha"]) == ("LORA", 4, 8)
    assert settings["base_model_name_or_path"] == str(base.resolve())
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert not any("lm_head" in n or "embed" in n for n in names)  # all-linear spares the output head

    model, _ = load_lm(out, progress=False)  # the adapter on the base it names
    reference = merged_lora(base, out)
    plain = AutoModelForCausalLM.from_pretrained(base).state_dict()
    trained = model.state_dict()
    assert trained.keys() == reference.state_dict().keys()
    for name, tensor in trained.items():
        torch.testing.assert_close(tensor, reference.state_dict()[name], rtol=0, atol=0)
    changed = {n for n in plain if not torch.equal(plain[n], trained[n])}
    assert changed and all(n.endswith("proj.weight") for n in changed)  # factors only, base frozen

    train = task.splits["train"]  # transformers loads the adapter folder itself (its PEFT integration)
    before, after = mean_completion_loss(base, train), mean_completion_loss(out, train)
    print(f"completion loss {before:.3f} -> {after:.3f}")
    assert after < 0.95 * before, (before, after)  # 0.89-0.93 over 6 runs; 4 epochs gave up to 0.97


def test_lora_adapter_whose_base_is_gone_is_refused_naming_the_field(tmp_path, seed) -> None:
    base = tiny_lm(tmp_path / "base", seed)
    task = read_completion_file(choice_task(tmp_path / "yesno.jsonl", seed, split=True), validation_size=2)
    cfg = LMLoraFinetuneConfig(epochs=1, batch_size=4, seed=seed, rank=2)
    out = finetune_lm_expert(base, task, tmp_path / "expert", cfg, progress=False)
    (base / "config.json").unlink()
    with pytest.raises(InputError, match="adapter_config.json.*base_model_name_or_path"):
        load_lm(out, progress=False)


def test_finetune_suite_caches_experts_and_retrains_on_a_change(tmp_path, seed, monkeypatch) -> None:
    base = tiny_lm(tmp_path / "base", seed)
    tasks = {
        "yesno": read_completion_file(
            choice_task(tmp_path / "yesno.jsonl", seed, split=True), validation_size=2
        )
    }
    cfg = LMFinetuneConfig(epochs=1, lr=1e-3, batch_size=4, seed=seed)
    first = finetune_lm_suite(base, tasks, tmp_path / "cache", cfg, progress=False)["yesno"]
    assert is_causal_lm(first) and first.parent == tmp_path / "cache" / "experts"
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    trained: list[Path] = []
    real = lm_finetune.finetune_lm_expert
    monkeypatch.setattr(
        lm_finetune, "finetune_lm_expert", lambda b, t, out, *a: trained.append(out) or real(b, t, out, *a)
    )
    assert finetune_lm_suite(base, tasks, tmp_path / "cache", cfg, progress=False)["yesno"] == first
    assert trained == [] and (first / "model.safetensors").stat().st_mtime_ns == stamp

    for changed in (LMFinetuneConfig(epochs=1, lr=2e-3, batch_size=4, seed=seed),
                    LMFinetuneConfig(epochs=1, lr=1e-3, batch_size=4, seed=seed, chat=True)):  # fmt: skip
        again = finetune_lm_suite(base, tasks, tmp_path / "cache", changed, progress=False)["yesno"]
        assert again != first and trained[-1] == again
    # a base file beside the weights (the chat template) is part of the key too
    (base / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    again = finetune_lm_suite(base, tasks, tmp_path / "cache", cfg, progress=False)["yesno"]
    assert again != first and trained[-1] == again and len(trained) == 3

    with pytest.raises(SupermergeError, match="expert cache"):
        finetune_lm_suite(base, tasks, base / "cache", cfg, progress=False)


@pytest.mark.parametrize(
    ("family", "tied", "chat"),
    [(f, t, False) for f, t in FAMILIES] + [("llama", False, True)],
    ids=[*FAMILY_IDS, "llama-chat"],
)
def test_rank_classification_matches_brute_force(tmp_path, seed, family, tied, chat) -> None:
    base = tiny_lm(tmp_path / "base", seed, family, tied)
    tasks = {
        "yesno": read_completion_file(choice_task(tmp_path / "yesno.jsonl", seed, n=10)),
        "animal": read_completion_file(labelled_choice_task(tmp_path / "animal.jsonl", seed)),
    }
    model, tokenizer = load_lm(base, progress=False)
    accuracy = evaluate_lm(base, tasks, "validation", batch_size=3, chat=chat, progress=False)
    assert set(accuracy) == {"yesno", "animal"}
    for name, task in tasks.items():
        examples = task.splits["validation"]
        assert task.scored_by_choices
        scores = choice_scores(model, tokenizer, examples, batch_size=3, chat=chat)
        right = ambiguous = 0
        for e, got in zip(examples, scores, strict=True):
            reference = torch.stack([ref_completion_logprobs(model, tokenizer, e.prompt, c, chat).mean()
                                     for c in e.choices])  # fmt: skip
            torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
            top = reference.sort(descending=True).values
            ambiguous += bool(top[0] - top[1] < 1e-4)  # a near tie may fall either way
            right += e.choices[int(reference.argmax())] == e.completion
        assert abs(accuracy[name] * len(examples) - right) <= ambiguous, (name, accuracy[name], right)


def mixed_choice_examples(seed: int, n: int = 14) -> list[Completion]:
    """Examples whose prompts are 0-40 letters (byte tokens) and whose 2-5 choices are a space and
    0-5 letters, every fifth prompt a repeat: padded batches of every shape."""
    gen = torch.Generator().manual_seed(seed)

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    def word(longest: int) -> str:
        return "".join(chr(97 + randint(0, 25)) for _ in range(randint(0, longest)))

    examples = []
    for i in range(n):
        prompt = examples[i - 3].prompt if i % 5 == 4 else word(40)
        choices = list(dict.fromkeys(" " + word(5) for _ in range(randint(2, 5))))
        examples.append(Completion(prompt, choices[0], tuple(choices), line=i + 1))
    return examples


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize(("family", "tied"), FAMILIES, ids=FAMILY_IDS)
def test_cached_choice_scores_equal_full_sequences(tmp_path, seed, family, tied, attention) -> None:
    """The prompt's KV cache reused per choice gives the full sequences' scores: left-padded
    prompts of mixed lengths (repeated ones shared), choices of 1-6 tokens + EOS, any batch size,
    and prompts cut from the left by `max_length` (differently per choice when the choices'
    lengths differ; at 1, no token is scored: NaN both ways)."""
    from transformers import AutoModelForCausalLM

    base = tiny_lm(tmp_path / "base", seed, family, tied)
    _, tokenizer = load_lm(base, progress=False)
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation=attention).eval()
    examples = mixed_choice_examples(seed)
    for max_length, batch_size, chat in [(128, 4, False), (128, 1, False), (128, 64, True), (24, 3, False),
                                         (6, 5, False), (2, 2, True), (1, 3, False)]:  # fmt: skip
        got = choice_scores(
            model, tokenizer, examples, batch_size=batch_size, max_length=max_length, chat=chat
        )
        want = full_sequence_choice_scores(model, tokenizer, examples, 7, max_length, chat)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == torch.float32 and g.shape == w.shape
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, equal_nan=True)
        assert all(torch.isfinite(g).all() for g in got) == (max_length > 1), max_length

    # each distinct prompt is read once: one pass over the prompts, one over every choice
    calls = []  # the decoder's input shapes
    record = lambda module, args, kwargs, out: calls.append(tuple(kwargs["input_ids"].shape))  # noqa: E731
    hook = decoder_of(model).register_forward_hook(record, with_kwargs=True)
    try:
        choice_scores(model, tokenizer, examples, batch_size=64)
    finally:
        hook.remove()
    prompts = {e.prompt for e in examples}
    choices = [len(c) for e in examples for c in e.choices]  # bytes: + EOS, less the last token
    assert calls == [(len(prompts), 1 + max(map(len, prompts))), (len(choices), max(choices))], calls


@pytest.mark.parametrize(("family", "tied"), FAMILIES, ids=FAMILY_IDS)
def test_exact_match_matches_a_greedy_loop(tmp_path, seed, family, tied) -> None:
    base = tiny_lm(tmp_path / "base", seed, family, tied)
    model, tokenizer = load_lm(base, progress=False)
    prompts = [
        json.loads(line)["prompt"]
        for line in generation_task(tmp_path / "g.jsonl", seed, n=10).read_text().splitlines()
    ]
    steps = 5
    rows, texts = [], []
    for i, prompt in enumerate(prompts):
        text, gap = ref_greedy(model, tokenizer, prompt, steps)
        if gap < 1e-4:  # a near tie: batched (padded) logits may pick the other token
            continue
        texts.append(text)
        rows.append({"prompt": prompt, "completion": (text or " ") if i % 2 == 0 else " not it"})
    assert len(rows) >= 6
    task = read_completion_file(write_completion_task(tmp_path / "copy.jsonl", rows))
    assert not task.scored_by_choices
    examples = task.splits["validation"]

    assert greedy_completions(model, tokenizer, examples, batch_size=4, max_new_tokens=steps) == texts
    expected = sum(t.strip() == r["completion"].strip() for t, r in zip(texts, rows, strict=True)) / len(rows)
    assert expected >= 0.3
    got = evaluate_lm(base, {"copy": task}, "validation", batch_size=4, max_new_tokens=steps, progress=False)
    assert got == {"copy": expected}
    longest = max(len(tokenizer(e.completion, add_special_tokens=False)["input_ids"]) for e in examples)
    assert default_max_new_tokens(tokenizer, examples) == longest + 2


def write_suite(folder: Path) -> Path:
    """Three generative tasks with train, validation and test rows: choices, exact match, text/label."""
    folder.mkdir()
    splits = ["train", "train", "validation", "test"]
    yesno = [{"prompt": f"is {i} even?", "completion": [" yes", " no"][i % 2], "choices": [" yes", " no"],
              "split": splits[i % 4]} for i in range(16)]  # fmt: skip
    copy = [{"prompt": f"copy {w}:", "completion": f" {w}", "split": splits[i % 4]}
            for i, w in enumerate(["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"])]  # fmt: skip
    sentiment = [{"text": t, "label": lab, "split": splits[i % 4]}
                 for i, (t, lab) in enumerate([("great", "good"), ("awful", "bad")] * 4)]  # fmt: skip
    for name, rows in {"yesno": yesno, "copy": copy, "sentiment": sentiment}.items():
        write_completion_task(folder / f"{name}.jsonl", rows)
    return folder


def printed_experts(out: str) -> dict[str, str]:
    """`supermerge finetune`'s "<task>\t<folder>" lines (a library may print a line of its own)."""
    return dict(line.split("\t") for line in out.splitlines() if "\t" in line)


def test_cli_finetunes_and_evaluates_a_causal_lm(tmp_path, seed, capsys) -> None:
    base = tiny_lm(tmp_path / "base", seed, "llama", tied=True)
    suite = write_suite(tmp_path / "suite")
    template = ["--prompt-template", "{text} is"]
    argv = ["-q", "finetune", "--suite", str(suite), "--base", str(base), "--cache", str(tmp_path / "cache"),
            "--epochs", "2", "--lr", "3e-3", "--batch-size", "2", "--max-length", "32"]  # fmt: skip
    argv += template
    capsys.readouterr()
    assert main(argv) == 0
    experts = printed_experts(capsys.readouterr().out)
    assert sorted(experts) == ["copy", "sentiment", "yesno"]
    assert all(is_causal_lm(Path(p)) for p in experts.values())
    assert main(argv) == 0  # cached: the same folders
    assert printed_experts(capsys.readouterr().out) == experts

    out = tmp_path / "acc.json"
    argv = ["-q", "evaluate", experts["yesno"], "--suite", str(suite), "--json", str(out),
            "--batch-size", "3", "--max-length", "32", *template]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    accuracy = json.loads(out.read_text())
    assert sorted(accuracy) == ["copy", "sentiment", "yesno"] and "mean" in printed
    assert all(0.0 <= v <= 1.0 for v in accuracy.values())
    from supermerge.io.completions import Template, read_completion_suite

    tasks = read_completion_suite(suite, template=Template("{text} is"))
    assert evaluate_lm(experts["yesno"], tasks, batch_size=1, max_length=32, progress=False) == accuracy


def test_cli_finetunes_lora_experts_and_evaluates_them_as_their_merged_models(tmp_path, seed, capsys) -> None:
    base = tiny_lm(tmp_path / "base", seed, "llama", tied=True)
    suite = write_suite(tmp_path / "suite")
    template = ["--prompt-template", "{text} is"]
    argv = ["-q", "finetune", "--suite", str(suite), "--base", str(base), "--cache", str(tmp_path / "cache"),
            "--lora", "--lora-rank", "2", "--lora-alpha", "4", "--batch-size", "2", "--max-length", "32",
            "--tasks", "yesno", "copy", *template]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    experts = printed_experts(capsys.readouterr().out)
    assert sorted(experts) == ["copy", "yesno"] and all(is_adapter(Path(p)) for p in experts.values())
    settings = json.loads((Path(experts["yesno"]) / "adapter_config.json").read_text())
    assert (settings["r"], settings["lora_alpha"]) == (2, 4)

    merged = tmp_path / "yesno_merged"  # PEFT's merge_and_unload, written as a plain model
    merged_lora(base, Path(experts["yesno"])).save_pretrained(merged)
    byte_tokenizer().save_pretrained(merged)
    scores = {}
    for model in (experts["yesno"], str(merged)):
        assert main(["-q", "evaluate", model, "--suite", str(suite), "--max-length", "32", *template]) == 0
        scores[model] = capsys.readouterr().out
    assert scores[experts["yesno"]] == scores[str(merged)]

    not_an_lm = tmp_path / "no-such-lm"
    assert main(["-q", "finetune", "--suite", str(suite), "--base", str(not_an_lm), "--lora"]) == 2
    assert f"--lora: for causal-LM models only ({not_an_lm} is not one)" in capsys.readouterr().err
    assert main(["-q", "finetune", "--suite", str(suite), "--base", str(base), "--lora-rank", "4"]) == 2
    assert "--lora-rank: give --lora too" in capsys.readouterr().err
    assert main(["-q", "demo", "--lora", "--workdir", str(tmp_path / "d")]) == 2
    assert "--lora applies to the LLM demo" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_cli_refuses_a_bad_generative_task_file(tmp_path, seed, capsys) -> None:
    base = tiny_lm(tmp_path / "base", seed)
    suite = write_suite(tmp_path / "suite")
    bad = suite / "yesno.jsonl"
    lines = bad.read_text().splitlines()
    lines[2] = json.dumps(
        {"prompt": "is it?", "completion": " maybe", "choices": [" yes", " no"], "split": "train"}
    )
    bad.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    template = ["--prompt-template", "{text} is"]
    for argv in (["finetune", "--suite", str(suite), "--base", str(base), "--cache", str(tmp_path / "cache")],
                 ["evaluate", str(base), "--suite", str(suite)]):  # fmt: skip
        assert main(["-q", *argv, *template]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("supermerge: error: ") and "\n" not in err, err
        assert f"{bad}: line 3: the completion is not one of its choices" in err
    assert not (tmp_path / "cache" / "experts").exists() or not any(
        (tmp_path / "cache" / "experts").iterdir()
    )
    # text/label rows need a template; the causal-LM flags are refused for an encoder
    (suite / "sentiment.jsonl").write_text(json.dumps({"text": "fine", "label": "good"}) + "\n")
    bad.unlink()
    assert main(["-q", "evaluate", str(base), "--suite", str(suite)]) == 2
    assert "sentiment.jsonl: line 1: a text/label row needs a template" in capsys.readouterr().err
    assert main(["-q", "evaluate", str(tmp_path), "--suite", str(suite), "--chat"]) == 2
    assert "--chat: for causal-LM models only" in capsys.readouterr().err
