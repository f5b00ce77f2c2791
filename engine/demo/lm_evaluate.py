"""Per-task accuracy of a causal LM on generative tasks (`supermerge.io.completions`).

A task with choices is scored by rank classification: every choice of an example is scored by
the mean log-probability of its completion tokens (the choice's tokens + EOS, as
`supermerge.learned.lm_inputs.encode` writes a completion: length-normalised), read only at
the positions that predict them; the prediction is the best-scored choice (the first on a tie)
and is right when it is the example's completion. A task without choices is scored by exact
match: the greedy generation (`model.generate`, no sampling, no repetition penalty or other
logits processors of the model's generation config), up to the first EOS, decoded without
special tokens, stripped, against the stripped completion.

Prompts are encoded as in training: `lm_inputs.encode` of prompt and completion, whose prompt
part (`encode_prompt`'s ids, cut from the left only when prompt + completion exceed
`max_length`) is what the model reads. Rank classification reads each prompt once: a batch of
distinct prompts runs left-padded, keeping its KV cache, and every choice of those prompts is
then scored in one more pass as a continuation on top of that cache. Prompts are batched in
order of length; the order changes no score.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from supermerge.demo.lm_finetune import check_completion_logits, decoder_of, hf_progress
from supermerge.errors import InputError
from supermerge.io.adapters import adapter_base, is_adapter
from supermerge.io.completions import Completion, CompletionTaskFile
from supermerge.learned.lm_inputs import Encoded, encode, pad_id

log = logging.getLogger(__name__)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _encode(
    tokenizer, prompt: str, completion: str, max_length: int, chat: bool, where: Path | None
) -> Encoded:
    try:
        return encode(tokenizer, prompt, completion, max_length, chat)
    except ValueError as e:  # no chat template
        raise InputError(where or Path("."), str(e)) from None


@torch.inference_mode()
def choice_scores(
    model: torch.nn.Module,
    tokenizer,
    examples: list[Completion],
    batch_size: int = 16,
    max_length: int = 128,
    chat: bool = False,
    where: Path | None = None,
) -> list[torch.Tensor]:
    """Per example, [len(choices)] float32 (on the CPU): the mean log-probability of each
    choice's completion tokens (choice + EOS) after the prompt.

    Each (example, choice) sequence `encode` writes is split into a context, the tokens before
    the first scored one (its prompt part; the first token if the prompt part is empty, as the
    first token of a sequence is never predicted), and its scored tokens. Distinct contexts run
    once, `batch_size` at a time, left-padded to [B, Tp]; their KV cache is then gathered to one
    row per (example, choice) of those contexts, [R, Tp], and all R scored-token sequences (less
    their last token, which predicts nothing) run right-padded on top of it, [R, Tc]. The logits
    that predict scored token 0 are the context's last ones; token t's are continuation position
    t - 1's: the logits of the full sequence at the same positions, and the same mean.

    Args:
        model: a causal LM (`AutoModelForCausalLM`), in eval mode.
        tokenizer: its tokenizer.
        examples: examples that all have choices.
        batch_size: distinct prompts per forward pass (their choices run together in one more).
        max_length: tokens per sequence (a longer prompt loses tokens from its left).
        chat: pose prompts in the tokenizer's chat template.
        where: the model folder, named by the error when `chat` finds no chat template.
    """
    pairs = [(i, j) for i, e in enumerate(examples) for j in range(len(e.choices or ()))]
    contexts: dict[tuple[int, ...], list[int]] = {}  # context ids -> the pairs (indices) that read it
    scored: list[list[int]] = []  # per pair, its scored tokens
    for k, (i, j) in enumerate(pairs):
        prompt, choice = examples[i].prompt, examples[i].choices[j]
        ids, n_prompt = _encode(tokenizer, prompt, choice, max_length, chat, where)
        split = max(n_prompt, 1)
        contexts.setdefault(tuple(ids[:split]), []).append(k)
        scored.append(ids[split:])
    ordered = sorted(contexts, key=len)
    decoder, head = decoder_of(model), model.get_output_embeddings()
    pad, device = pad_id(tokenizer), _device(model)
    means = torch.empty(len(pairs))
    for lo in range(0, len(ordered), batch_size):
        batch = ordered[lo : lo + batch_size]
        width = len(batch[-1])  # Tp: the longest context of the batch
        ids = torch.full((len(batch), width), pad, dtype=torch.int64)
        mask = torch.zeros(len(batch), width, dtype=torch.int64)
        for b, context in enumerate(batch):  # left padding: every context ends at the last column
            ids[b, width - len(context) :] = torch.tensor(context, dtype=torch.int64)
            mask[b, width - len(context) :] = 1
        positions = (mask.cumsum(1) - 1).clamp_min(0)  # [B, Tp]: 0 at each context's first token
        out = decoder(input_ids=ids.to(device), attention_mask=mask.to(device),
                      position_ids=positions.to(device), use_cache=True)  # fmt: skip
        last = out.last_hidden_state[:, -1]  # [B, H]: predicts each context's scored token 0

        rows = [k for context in batch for k in contexts[context]]  # R pairs
        of_row = torch.tensor([b for b, context in enumerate(batch) for _ in contexts[context]])  # [R]
        lengths = [len(scored[k]) for k in rows]  # scored tokens per row
        steps = max(max(lengths) - 1, 0)  # Tc: scored tokens that predict another
        targets = torch.full((len(rows), steps + 1), pad, dtype=torch.int64)  # [R, Tc + 1]
        for r, k in enumerate(rows):
            targets[r, : lengths[r]] = torch.tensor(scored[k], dtype=torch.int64)
        valid = torch.arange(steps + 1) < torch.tensor(lengths)[:, None]  # [R, Tc + 1]
        hidden = last[of_row.to(device)][:, None]  # [R, 1, H]
        if steps:
            cache = out.past_key_values
            cache.batch_select_indices(of_row.to(device))  # [R, Tp] per layer
            attention = torch.cat([mask[of_row], valid[:, :-1].long()], 1)  # [R, Tp + Tc]
            cont = decoder(
                input_ids=targets[:, :-1].to(device),
                attention_mask=attention.to(device),
                position_ids=(mask.sum(1)[of_row, None] + torch.arange(steps)).to(device),  # [R, Tc]
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state  # [R, Tc, H]
            hidden = torch.cat([hidden, cont], 1)  # [R, Tc + 1, H]: position t predicts scored token t
        valid = valid.to(device)
        logp = head(hidden[valid]).float().log_softmax(-1)  # [M, vocab]
        token_logp = logp.gather(1, targets.to(device)[valid][:, None])[:, 0].cpu()  # [M]
        means[rows] = torch.stack([part.mean() for part in token_logp.split(lengths)])
    scores, k = [], 0
    for e in examples:
        n = len(e.choices or ())
        scores.append(means[k : k + n])
        k += n
    return scores


def eos_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """Every id that ends a generation: the tokenizer's EOS and the model's generation config's."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in configured if isinstance(configured, list) else [configured]:
        if i is not None and i not in ids:
            ids.append(int(i))
    return ids


def default_max_new_tokens(tokenizer, examples: list[Completion]) -> int:
    """The longest completion of `examples` in tokens, + 2 (its EOS and one more)."""
    return 2 + max((len(tokenizer(e.completion, add_special_tokens=False)["input_ids"]) for e in examples),
                   default=0)  # fmt: skip


@torch.inference_mode()
def greedy_completions(
    model: torch.nn.Module,
    tokenizer,
    examples: list[Completion],
    batch_size: int = 16,
    max_length: int = 128,
    chat: bool = False,
    max_new_tokens: int | None = None,
    where: Path | None = None,
) -> list[str]:
    """Per example, the model's greedy continuation of its prompt: at most `max_new_tokens`
    tokens (None: `default_max_new_tokens`), cut before the first EOS, decoded without special
    tokens. Batched prompts are left-padded ([B, T] ids and attention mask).

    Args: as `choice_scores`, plus `max_new_tokens`.
    """
    from transformers import GenerationConfig

    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(tokenizer, examples)
    prompts = []
    for e in examples:
        ids, n_prompt = _encode(tokenizer, e.prompt, e.completion, max_length, chat, where)
        prompts.append(ids[:n_prompt])
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad, device, stop = pad_id(tokenizer), _device(model), eos_ids(model, tokenizer)
    # only these settings: none of the model's own (a repetition penalty, sampling) applies
    clean = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=stop or None,
        pad_token_id=pad, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    saved, model.generation_config = model.generation_config, clean
    texts = [""] * len(prompts)
    try:
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            width = max(len(prompts[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.int64)
            attention_mask = torch.zeros(len(idx), width, dtype=torch.int64)
            for b, i in enumerate(idx):  # left padding: every prompt ends at the last column
                input_ids[b, width - len(prompts[i]) :] = torch.tensor(prompts[i], dtype=torch.int64)
                attention_mask[b, width - len(prompts[i]) :] = 1
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=clean,
            )  # [B, width + generated]
            for b, i in enumerate(idx):
                new = out[b, width:].tolist()
                end = next((t for t, token in enumerate(new) if token in stop), len(new))
                texts[i] = tokenizer.decode(new[:end], skip_special_tokens=True)
    finally:
        model.generation_config = saved
    return texts


def evaluate_lm_model(
    model: torch.nn.Module,
    tokenizer,
    tasks: dict[str, CompletionTaskFile],
    split: str = "test",
    batch_size: int = 16,
    max_length: int = 128,
    chat: bool = False,
    max_new_tokens: int | None = None,
    progress: bool = True,
    where: Path | None = None,
) -> dict[str, float]:
    """Accuracy per task on `split` of a loaded causal LM (in eval mode, on its device): rank
    classification for tasks with choices, exact match of greedy generation for the others.
    Tasks with no example in `split` are skipped (logged). For weights held in memory (a merge),
    load them into the model first (`model.load_state_dict`)."""
    accuracy = {}
    for name in tqdm(list(tasks), desc="evaluate", unit="task", disable=not progress):
        task = tasks[name]
        examples = task.splits.get(split, [])
        if not examples:
            log.warning("%s: no %s examples: skipped", task.path, split)
            continue
        if task.scored_by_choices:
            scores = choice_scores(model, tokenizer, examples, batch_size, max_length, chat, where)
            correct = sum(
                e.choices[int(s.argmax())] == e.completion for e, s in zip(examples, scores, strict=True)
            )
        else:
            texts = greedy_completions(model, tokenizer, examples, batch_size, max_length, chat,
                                       max_new_tokens, where)  # fmt: skip
            correct = sum(t.strip() == e.completion.strip() for e, t in zip(examples, texts, strict=True))
        accuracy[name] = correct / len(examples)
    return accuracy


def load_lm(
    model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, progress: bool = True
):
    """(model in eval mode on `device`, tokenizer) of a causal-LM folder, or of a PEFT adapter
    folder on the base its adapter_config.json names (`base_model_name_or_path`), merged into
    it as `merge_and_unload` does; the tokenizer is the folder's own if it has one, else the base's.

    Raises:
        InputError: not a model or adapter folder, or the adapter's base is not a model folder.
        SupermergeError: its logits are not supported (`check_completion_logits`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    adapter = is_adapter(model_dir)
    if not adapter and not (model_dir / "config.json").is_file():
        raise InputError(model_dir, "no config.json: not a model folder")
    weights = adapter_base(model_dir) if adapter else model_dir
    has_tokenizer = (model_dir / "tokenizer_config.json").is_file()
    with hf_progress(progress):
        tokenizer = AutoTokenizer.from_pretrained(model_dir if has_tokenizer else weights)
        model = AutoModelForCausalLM.from_pretrained(weights, dtype=dtype)
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, model_dir).merge_and_unload()
    model = model.to(device).eval()
    check_completion_logits(model)
    return model, tokenizer


def evaluate_lm(
    model_dir: str | Path,
    tasks: dict[str, CompletionTaskFile],
    split: str = "test",
    batch_size: int = 16,
    max_length: int = 128,
    chat: bool = False,
    max_new_tokens: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Accuracy per task on `split` of the causal LM in `model_dir` (see the module docstring and
    `evaluate_lm_model`)."""
    model, tokenizer = load_lm(model_dir, device, dtype, progress)
    return evaluate_lm_model(model, tokenizer, tasks, split, batch_size, max_length, chat, max_new_tokens,
                             progress, Path(model_dir))  # fmt: skip
