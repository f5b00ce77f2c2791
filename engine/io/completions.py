"""The generative task format: prompts and the completions a causal LM should give.

One JSONL file per task. Each line is either
- {"prompt": str, "completion": str, "choices": [str, ...] (optional), "split": ...}: the model
  should continue `prompt` with `completion`; `choices`, when given, are the candidate
  completions (the completion among them) and the task is scored by rank classification over
  them, else by exact match of the greedy generation; or
- {"text": str, "label": str | int, "split": ...}: the classification format of
  `supermerge.io.taskfile`, posed through a template: prompt = template.prompt with `{text}`
  filled in, completion = template.completion with `{label}`, and the choices are the template's
  completion for every class seen in train and validation.
A file may open with a line {"template": {"prompt": str, "completion": str}} for its text rows;
without one, the template of the YAML's `model:` block applies. Splits as in
`supermerge.io.taskfile` (validation carved from train when absent; no split field: all
validation). Rows of one file either all have choices or none has. Bad files are refused with the
file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from supermerge.errors import InputError
from supermerge.io.taskfile import CARVED_VALIDATION, assign_splits, parse_lines


@dataclass(frozen=True)
class Template:
    """How a text/label row becomes a prompt and a completion (`{text}`, `{label}` filled in)."""

    prompt: str = "{text}\nAnswer:"
    completion: str = " {label}"


@dataclass(frozen=True)
class Completion:
    """One generative example and the file line it came from (1-based)."""

    prompt: str
    completion: str
    choices: tuple[str, ...] | None
    line: int


@dataclass
class CompletionTaskFile:
    """A generative task's examples by split.

    Attributes:
        name: task name (the file's stem).
        path: the JSONL file.
        splits: split name -> examples (validation carved from train when absent).
    """

    name: str
    path: Path
    splits: dict[str, list[Completion]]

    @property
    def scored_by_choices(self) -> bool:
        """Whether accuracy is rank classification over choices (else exact match)."""
        return any(e.choices is not None for s in self.splits.values() for e in s)


def _fill(path: Path, pattern: str, field: str, value: str | int, where: str) -> str:
    try:
        return pattern.format(**{field: value})
    except (KeyError, IndexError, ValueError) as e:
        raise InputError(
            path, f"{where}: template {pattern!r} cannot be filled with {{{field}}} ({e})"
        ) from None


def _string_list(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def read_completion_file(
    path: str | Path, validation_size: int = CARVED_VALIDATION, template: Template | None = None
) -> CompletionTaskFile:
    """Read and check one generative task file (see the module docstring).

    Args:
        path: the JSONL file.
        validation_size: examples carved from train when the file has no validation rows
            (`supermerge.io.taskfile`: keep the default outside tests).
        template: for text/label rows when the file has no template line of its own.
    """
    path = Path(path)
    rows = parse_lines(path)
    if rows and "template" in rows[0][1]:
        number, header = rows.pop(0)
        spec = header["template"]
        if set(header) != {"template"} or not isinstance(spec, dict) or set(spec) - {"prompt", "completion"}:
            raise InputError(
                path, f'line {number}: expected {{"template": {{"prompt": ..., "completion": ...}}}}'
            )
        if not all(isinstance(v, str) for v in spec.values()):
            raise InputError(path, f"line {number}: template fields must be strings")
        template = Template(**spec)
    labelled = []  # (row, line) of text/label rows, filled once the classes are known
    examples: list[tuple[dict, Completion]] = []
    for number, row in rows:
        if "prompt" in row:
            if not isinstance(row["prompt"], str):
                raise InputError(path, f"line {number}: 'prompt' must be a string")
            if not isinstance(row.get("completion"), str) or not row["completion"]:
                raise InputError(path, f"line {number}: missing non-empty string field 'completion'")
            choices = row.get("choices")
            if choices is not None:
                if not _string_list(choices) or len(set(choices)) != len(choices):
                    raise InputError(path, f"line {number}: 'choices' must be a list of distinct strings")
                if row["completion"] not in choices:
                    raise InputError(path, f"line {number}: the completion is not one of its choices")
                choices = tuple(choices)
            examples.append((row, Completion(row["prompt"], row["completion"], choices, number)))
        elif "text" in row:
            if not isinstance(row["text"], str):
                raise InputError(path, f"line {number}: 'text' must be a string")
            label = row.get("label")
            if isinstance(label, bool) or not isinstance(label, int | str):
                raise InputError(path, f"line {number}: missing string or integer field 'label'")
            if template is None:
                raise InputError(
                    path,
                    f"line {number}: a text/label row needs a template (a first line "
                    '{"template": {"prompt": ..., "completion": ...}} or model.prompt_template)',
                )
            labelled.append(len(examples))
            examples.append((row, Completion(row["text"], str(label), None, number)))
        else:
            raise InputError(path, f"line {number}: expected a 'prompt' (and 'completion') or a 'text' field")
    if labelled:
        examples = _posed(path, examples, labelled, template)
    with_choices = [e.choices is not None for _, e in examples]
    if any(with_choices) and not all(with_choices):
        odd = next(e for _, e in examples if (e.choices is None) == with_choices[0])
        raise InputError(path, f"line {odd.line}: some rows have 'choices' and some do not")
    return CompletionTaskFile(path.stem, path, assign_splits(path, examples, validation_size))


def _posed(
    path: Path, examples: list[tuple[dict, Completion]], labelled: list[int], template: Template
) -> list[tuple[dict, Completion]]:
    """Text/label rows (at indices `labelled`, label as str) as prompt/completion/choices."""
    known = sorted({examples[i][1].completion for i in labelled if examples[i][0].get("split") != "test"})
    choices = {
        label: _fill(path, template.completion, "label", label, "template.completion") for label in known
    }
    posed = list(examples)
    for i in labelled:
        row, e = examples[i]
        if e.completion not in choices:
            raise InputError(path, f"line {e.line}: label {row['label']!r} appears only in test")
        prompt = _fill(path, template.prompt, "text", e.prompt, f"line {e.line}")
        posed[i] = (row, Completion(prompt, choices[e.completion], tuple(choices.values()), e.line))
    return posed


def read_completion_suite(
    folder: str | Path, validation_size: int = CARVED_VALIDATION, template: Template | None = None
) -> dict[str, CompletionTaskFile]:
    """Every `<task>.jsonl` of a folder, by task name."""
    folder = Path(folder)
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise InputError(folder, "no <task>.jsonl files in the suite folder")
    return {f.stem: read_completion_file(f, validation_size, template) for f in files}
