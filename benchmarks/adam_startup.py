"""Start-up cost of W's optimiser: torch.optim.Adam against supermerge's Adam (learned/adam.py).

Each measurement is a fresh interpreter (as every rank of a job is): it imports torch, then
times building the optimiser on a [4, 8] W and taking its first step. torch.optim imports
torch._dynamo on first use; supermerge's Adam does not. Prints each one's median over --repeats
and their ratio, with the machine.

    python benchmarks/adam_startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys

import torch

PROBE = """
import time, torch
w = torch.zeros(4, 8, requires_grad=True)
start = time.perf_counter()
{make}
w.grad = torch.ones_like(w)
opt.step()
print(time.perf_counter() - start)
"""
OPTIMISERS = {
    "torch.optim.Adam": "opt = torch.optim.Adam([w], lr=0.1)",
    "supermerge Adam": "from supermerge.learned.adam import Adam; opt = Adam(w, lr=0.1)",
}


def first_step_seconds(make: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(make=make)], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    medians = {}
    for label, make in OPTIMISERS.items():
        medians[label] = statistics.median(first_step_seconds(make) for _ in range(args.repeats))
        print(
            f"{label:18s} build + first step in a fresh process: "
            f"{medians[label]:.3f} s (median of {args.repeats})"
        )
    ratio = medians["torch.optim.Adam"] / medians["supermerge Adam"]
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}"
    print(f"torch.optim.Adam / supermerge Adam: {ratio:.0f}x ({machine})")


if __name__ == "__main__":
    main()
