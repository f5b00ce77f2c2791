"""Sparsification of task vectors, defined as mergekit 0.1.5 defines it (`mergekit/sparsify.py`,
`mergekit/merge_methods/sce.py`), so results compare tensor for tensor:
- magnitude (TIES): keep the max(1, int(density * numel)) largest |tau|;
- magnitude outliers (Model Breadcrumbs): in |tau| order, drop the int(gamma * numel) largest
  (fewer when needed to keep the target) and keep the int(density * numel) below them;
- random (DARE): keep each element with probability `density` (Bernoulli), from a seeded
  generator;
- magnitude-ranked random (DELLA): keep each element with a probability rising linearly with its
  |tau| rank in its row, from density - epsilon (smallest) to density + epsilon (largest);
- variance top-k (SCE): keep the int(density * #nonzero) elements whose values vary most across
  the experts.
Rescaling after dropping: "l1" rescales the kept values so the L1 norm equals the original's
(mergekit's `rescale: true`), "inverse_density" divides by density (the DARE paper's 1/(1-p)),
"none" keeps them as they are.

Ties of magnitude. mergekit orders |tau| with torch's unstable CPU sort, which in torch 2.x is
libstdc++'s `std::sort` on (value, index) pairs comparing values only (checked against torch
2.13): an introsort (median-of-3 quicksort, heapsort past a depth limit, insertion sort of the
last ranges of 16 or fewer). Which of several entries of equal magnitude fall inside the kept
range is whatever that algorithm leaves, not an index order. `keep_sorted_range_` keeps exactly
those entries without sorting: it replays the algorithm's partitions only on the ranges that hold
an end of the kept range (a quickselect along std::sort's own pivots, O(numel) expected), so the
kept entries are the same bit for bit, ties included. On the CPU the replay is compiled C++
(supermerge.kernels.sorted_range_cpu, built on first use); without a compiler, or on another
device, it runs as torch operations on chunks (`_SortedRangeSelection`, same entries, about 1.5x
slower on 2 cores). torch sorts CUDA tensors with other
algorithms, so mergekit run on a GPU may keep other entries among ties; this reproduces mergekit
on the CPU (its default), whatever the device.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

import torch

from supermerge.kernels import sorted_range_cpu

log = logging.getLogger(__name__)

INSERTION_RANGE = 16  # libstdc++'s _S_threshold: std::sort insertion-sorts ranges of at most this
SMALL = 1 << 15  # tensors of at most this many elements are simply argsorted, as mergekit does
CHUNK = 1 << 18  # elements per step of the partition passes (bounds their temporaries)
# |tau| is compared through its bits: for floats >= 0 the integer order of the bits is their order.
# mergekit sorts |tau| as float32 on the CPU; bf16 and fp16 convert to it exactly, so their own 16
# bits order them the same way, and other dtypes are converted to float32 first.
_KEY_DTYPES = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


class Rescale(str, Enum):
    NONE = "none"
    L1 = "l1"
    INVERSE_DENSITY = "inverse_density"


def rescale_kept_(
    kept: torch.Tensor, l1_before: torch.Tensor | None, rescale: Rescale, density: float, eps: float = 1e-7
) -> torch.Tensor:
    """Rescale the kept values in place (see module docstring) and return them.

    Args:
        kept: the task vector with its dropped entries zeroed.
        l1_before: sum |tau| before dropping (0-dim, fp32); needed for Rescale.L1 only.
        rescale: the mode.
        density: the keep fraction (Rescale.INVERSE_DENSITY).
        eps: below this, either L1 norm leaves the values unscaled (mergekit's rule).
    """
    if rescale is Rescale.L1:
        after = kept.abs().sum()
        if l1_before < eps or after < eps:
            return kept
        return kept.mul_(l1_before / after)
    if rescale is Rescale.INVERSE_DENSITY:
        return kept.div_(density)
    return kept


def _l1(tau: torch.Tensor, rescale: Rescale) -> torch.Tensor | None:
    return tau.abs().sum() if rescale is Rescale.L1 else None


def magnitude_trim(tau: torch.Tensor, density: float, rescale: Rescale = Rescale.NONE) -> torch.Tensor:
    """Keep the largest-magnitude fraction `density` of `tau`, zero the rest, in place (TIES).

    Args:
        tau: task vector, any shape; modified in place and returned.
        density: fraction kept, in (0, 1]: the max(1, int(density * numel)) largest |tau|.
        rescale: rescaling of the kept values.
    """
    if density >= 1 or tau.numel() == 0:
        return tau
    before = _l1(tau, rescale)
    keep_sorted_range_(tau, 0, max(1, int(density * tau.numel())), descending=True)
    return rescale_kept_(tau, before, rescale, density)


def magnitude_outliers_trim(
    tau: torch.Tensor, density: float, gamma: float, rescale: Rescale = Rescale.NONE
) -> torch.Tensor:
    """Model Breadcrumbs: drop the largest |tau| (fraction `gamma`) and the smallest, in place.

    In ascending |tau| order, entries [n_bot, n_bot + int(density * numel)) are kept, where
    n_bot = max(0, numel - int(density * numel) - int(gamma * numel)).

    Args:
        tau: task vector, any shape; modified in place and returned.
        density: fraction kept, in (0, 1].
        gamma: fraction of the largest magnitudes dropped as outliers, in [0, 1].
        rescale: rescaling of the kept values.
    """
    if density >= 1 or tau.numel() == 0:
        return tau
    n = tau.numel()
    target = int(density * n)
    bottom = max(0, n - target - int(gamma * n))
    before = _l1(tau, rescale)
    keep_sorted_range_(tau, bottom, bottom + target, descending=False)
    return rescale_kept_(tau, before, rescale, density)


def random_drop(tau: torch.Tensor, density: float, rescale: Rescale, seed: int) -> torch.Tensor:
    """Drop each element of `tau` with probability 1 - density, then rescale (DARE).

    Args:
        tau: task vector, any shape, fp32, on CPU or GPU; modified in place and returned.
        density: keep probability, in (0, 1].
        rescale: how to compensate for the dropped mass.
        seed: seeds a generator on tau's device; the same seed gives the same mask.
    """
    if density >= 1:
        return tau
    work = _work_dtype(tau)
    generator = torch.Generator(device=tau.device).manual_seed(seed)
    mask = torch.bernoulli(torch.full_like(tau, density, dtype=work), generator=generator)
    return _drop_(tau, mask, rescale, density)


def magnitude_ranked_drop(
    tau: torch.Tensor, density: float, epsilon: float, rescale: Rescale, seed: int
) -> torch.Tensor:
    """DELLA's MagPrune: drop each element at random, the smaller its |tau| the likelier.

    Along dim 1 (a 1-D tau is one row), the element of |tau| rank r (1 = smallest, ties ranked
    by torch's CPU sort as in mergekit) is kept with probability
    density - epsilon + 2 epsilon (r - 1) / (columns - 1); then the kept values are rescaled.
    Arithmetic as mergekit's, operation for operation; the ranks cost a full argsort (two int64
    tensors of tau's size), as they do in mergekit.

    Args:
        tau: task vector, any shape, fp32; modified in place and returned.
        density: mean keep probability, in (0, 1]; with epsilon, density +- epsilon in (0, 1).
        epsilon: half the spread of the keep probabilities.
        rescale: how to compensate for the dropped mass.
        seed: seeds the Bernoulli draws (a generator on tau's device).
    """
    if density >= 1:
        return tau
    work = _work_dtype(tau)
    rows = tau.unsqueeze(0) if tau.dim() < 2 else tau
    order = torch.argsort(rows.abs().cpu(), dim=1)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
    del order
    ranks = ranks.to(device=tau.device, dtype=work).add_(1)
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    # one column: mergekit divides 0 by 0 and fails in bernoulli; here it keeps density - epsilon
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1) if ranks.shape[1] > 1 else ranks.zero_()
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    generator = torch.Generator(device=tau.device).manual_seed(seed)
    mask = torch.bernoulli(probs, generator=generator).reshape(tau.shape)
    del probs, rank_norm, ranks
    return _drop_(tau, mask, rescale, density)


def _drop_(tau: torch.Tensor, mask: torch.Tensor, rescale: Rescale, density: float) -> torch.Tensor:
    """tau * mask rescaled, computed in the mask's dtype as mergekit does, in tau's memory."""
    work_tau = tau.to(mask.dtype)  # tau itself when the dtypes agree
    before = _l1(work_tau, rescale)
    kept = rescale_kept_(work_tau.mul_(mask), before, rescale, density)
    return kept if kept.data_ptr() == tau.data_ptr() else tau.copy_(kept)


def _work_dtype(tau: torch.Tensor) -> torch.dtype:
    """mergekit's dtype for the random drops: tau's, but float32 for CPU tensors other than bf16
    (torch has no float16 Bernoulli on the CPU)."""
    if tau.device.type != "cpu" or tau.dtype in (torch.bfloat16, torch.float32):
        return tau.dtype
    return torch.float32


def variance_topk_mask(taus: list[torch.Tensor], density: float) -> torch.Tensor | None:
    """SCE's selection: where the experts' task vectors vary most across experts.

    Of the population variance over experts, per element (torch.var of the stacked task
    vectors, as mergekit computes it: one k x numel stack while it is computed), the
    int(density * #nonzero variances) largest are kept (torch.topk on the CPU, mergekit's).

    Args:
        taus: k task vectors of one shape, fp32.
        density: fraction of the elements of nonzero variance kept, in (0, 1].
    Returns:
        bool mask shaped like a task vector, or None when everything is kept (density 1).
    """
    if density >= 1:
        return None
    variance = torch.var(torch.stack(taus), dim=0, unbiased=False)
    count = int(torch.count_nonzero(variance) * density)  # a float32 product, as mergekit's
    mask = torch.zeros(variance.shape, dtype=torch.bool, device=variance.device)
    if count:
        top = torch.topk(variance.abs().view(-1).cpu(), k=count, largest=True).indices
        mask.view(-1)[top.to(mask.device)] = True
    return mask


# --- exact sorted-range selection: std::sort replayed on the ranges that matter -----------------


def keep_sorted_range_(tau: torch.Tensor, lo: int, hi: int, descending: bool) -> torch.Tensor:
    """Zero, in place, the entries of `tau` that `torch.argsort(|tau|.flatten(), descending)[lo:hi]`
    (torch's CPU sort, mergekit's) does not list; return `tau`.

    Tensors of at most SMALL elements, or holding NaN, are argsorted on the CPU (as they are when
    this torch's sort is not the one replayed: `replay_matches_torch`). Larger ones are not
    sorted: their partitions are replayed (see module docstring), in O(numel) expected time, on
    one CPU thread. Memory besides `tau`: the int32 flat indices of the side of the first
    partition that holds lo or hi (typically half to three quarters of the elements; both sides
    when both hold an end), partitioned in place from then on, plus temporaries of CHUNK
    elements; no sorted copy, no int64 index of tau's size. Measured peak above tau (4096 x 4096,
    density 0.5): 1.0 x tau's bytes in fp32, 1.7 x in bf16 (mergekit's argsort: 7 x and 13 x).

    Args:
        tau: any shape and float dtype, on any device.
        lo, hi: the kept range of sorted positions, [lo, hi).
        descending: the sort direction (True: largest |tau| first).
    """
    if not tau.is_contiguous():
        return tau.copy_(keep_sorted_range_(tau.contiguous(), lo, hi, descending))
    flat = tau.view(-1)
    n = flat.numel()
    lo, hi = max(lo, 0), min(hi, n)
    if lo >= hi:
        return tau.zero_()
    if lo == 0 and hi == n:
        return tau
    # NaN (or inf - inf in the sum): where std::sort puts NaN is not replayed
    if n <= SMALL or bool(flat.sum().isnan()) or not replay_matches_torch():
        order = torch.argsort(flat.abs().cpu().float(), descending=descending).to(flat.device)
        flat[order[:lo]] = 0
        flat[order[hi:]] = 0
        return tau
    if sorted_range_cpu.supports(flat) and native_matches_torch():
        sorted_range_cpu.keep_sorted_range(flat, lo, hi, descending)
        return tau
    with one_cpu_thread(flat.device):
        _SortedRangeSelection(flat, lo, hi, descending).run()
    return tau


def _select_like_torch(select: Callable[[torch.Tensor, int, int, bool], object]) -> bool:
    """Whether `select(values, lo, hi, descending)`, zeroing in place the entries torch's CPU
    argsort does not put at [lo, hi), agrees with torch on tensors full of ties."""
    gen = torch.Generator().manual_seed(0)
    for n, levels in ((3001, 7), (5000, 1000)):
        values = torch.randint(1, levels + 1, (n,), generator=gen).float()
        for lo, hi, descending in ((0, n // 3, True), (n // 7, n // 2, False)):
            expected = torch.zeros(n, dtype=torch.bool)
            expected[torch.argsort(values, descending=descending)[lo:hi]] = True
            replayed = values.clone()
            select(replayed, lo, hi, descending)
            if not torch.equal(replayed != 0, expected):
                return False
    return True


@functools.cache
def replay_matches_torch() -> bool:
    """Whether torch's CPU sort here is the std::sort that `keep_sorted_range_` replays (torch 2.x
    built with libstdc++, as its Linux wheels are), checked once on tensors full of ties. When it
    is not (another C++ library, a torch that sorts floats with x86-simd-sort), the trims argsort
    as mergekit does: as exact, and as slow."""
    if _select_like_torch(lambda *args: _SortedRangeSelection(*args).run()):
        return True
    log.warning(
        "torch %s sorts unlike libstdc++'s std::sort: magnitude trims will argsort", torch.__version__
    )
    return False


@functools.cache
def native_matches_torch() -> bool:
    """Whether the compiled replay (built here) agrees with torch's sort, checked once as
    `replay_matches_torch` is; if not, the torch-operations replay is used."""
    if _select_like_torch(sorted_range_cpu.keep_sorted_range):
        return True
    log.warning("the compiled magnitude trim disagrees with torch's sort here: using the slower replay")
    return False


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run torch's CPU ops on one thread (on `device` "cpu"; elsewhere nothing changes).

    For many small dependent steps, as the replay below: waking torch's other threads for each
    step costs more than they give, very much so on a loaded machine (measured on 2 shared cores
    at load 3: a 2^20-element add took 10-30 ms on two threads, 0.5 ms on one; the replay ran 30x
    slower). std::sort, which the replay replaces, is single-threaded too.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Range:
    """A range [first, last) of std::sort's array still to be partitioned.

    `ids` (the flat index in tau of each entry, int32) is a tensor the range owns, partitioned in
    place; None for the root, whose entries are tau's own, in tau's order (tau is never
    reordered: only the root's pivot swap is made in it, and undone at the end).
    """

    first: int
    last: int
    depth: int
    ids: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.last - self.first

    @property
    def is_root(self) -> bool:
        return self.ids is None


class _SortedRangeSelection:
    """keep_sorted_range_ on large tensors: std::sort's introsort followed only where it decides
    which entries land in [lo, hi).

    Each partition step is libstdc++'s `__unguarded_partition_pivot`: the median of the entries
    at offsets 1, m/2, m-1 is swapped to the front, then two scans from the ends swap, pair by
    pair, the i-th entry from the left that is not before the pivot with the i-th from the
    right that is not after it, until they cross. A side of the cut that lies inside [lo, hi)
    is kept whole, one outside is dropped whole (zeroed in tau); a side holding lo or hi is
    replayed further. Ranges of INSERTION_RANGE or fewer entries end in insertion sort (stable);
    a range reached at the depth limit ends in libstdc++'s heapsort.

    Entries are compared through keys: the bits of |tau| (in the dtype mergekit sorts in) as
    integers, read CHUNK at a time from tau (through the range's ids below the root).
    """

    def __init__(self, flat: torch.Tensor, lo: int, hi: int, descending: bool) -> None:
        self.flat, self.lo, self.hi, self.descending = flat, lo, hi, descending
        self.before = operator.gt if descending else operator.lt
        # an entry x stops the left scan when not before(x, pivot), the right one when not
        # before(pivot, x)
        self.left_stop, self.right_stop = (torch.le, torch.ge) if descending else (torch.ge, torch.le)
        self.index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
        self.key_dtype = _KEY_DTYPES.get(flat.dtype, torch.int32)
        self.buffer = torch.empty(min(CHUNK, flat.numel()), dtype=flat.dtype, device=flat.device)

    def run(self) -> None:
        n = self.flat.numel()
        pending, root_swap = [_Range(0, n, depth=2 * (n.bit_length() - 1))], None
        while pending:
            part = pending.pop()
            if part.size <= INSERTION_RANGE or part.depth == 0:
                self._finish(part)
                continue
            pivot_at = self._median_to_front(part)
            if part.is_root:
                root_swap = pivot_at
            pivot = self._keys(part, 0, 1).item()
            swaps, cut, b_s = self._cut(part, pivot)
            sides = {True: (0, cut), False: (cut, part.size)}  # True: the left side
            kinds = {left: self._kind(part, a, b) for left, (a, b) in sides.items()}
            if part.is_root:
                opened = [left for left in sides if kinds[left] == "open"]
                pending += [self._open_root_side(left, cut, b_s, swaps, pivot) for left in opened]
                for left in (side for side in sides if kinds[side] == "drop"):
                    self._drop_root_side(left, cut, b_s, pivot)
                continue
            if swaps:
                self._swap_pairs(part, cut, b_s, pivot)
            for left, (a, b) in sides.items():
                if kinds[left] == "drop":
                    self._zero(part.ids[a:b])
                elif kinds[left] == "open":
                    pending.append(_Range(part.first + a, part.first + b, part.depth - 1, part.ids[a:b]))
        if root_swap is not None:
            self.flat[[0, root_swap]] = self.flat[[root_swap, 0]]

    def _kind(self, part: _Range, a: int, b: int) -> str:
        """'keep', 'drop' or 'open': where offsets [a, b) of `part` lie against [lo, hi)."""
        start, end = part.first + a, part.first + b
        if end <= self.lo or start >= self.hi:
            return "drop"
        return "keep" if self.lo <= start and end <= self.hi else "open"

    def _zero(self, ids: torch.Tensor) -> None:
        """Zero tau's entries at flat indices `ids`, CHUNK at a time (bounds the int64 copy
        indexing makes)."""
        for block in ids.split(CHUNK):
            self.flat.index_fill_(0, block.long(), 0)

    # reading a range
    def _as_keys(self, magnitudes: torch.Tensor) -> torch.Tensor:
        if self.key_dtype == torch.int32 and magnitudes.dtype != torch.float32:
            magnitudes = magnitudes.float()
        return magnitudes.view(self.key_dtype)

    def _keys(self, part: _Range, a: int, b: int) -> torch.Tensor:
        """Keys at offsets [a, b) of `part`, b - a <= CHUNK, in a buffer the next call reuses."""
        buffer = self.buffer[: b - a]
        if part.is_root:
            return self._as_keys(torch.abs(self.flat[a:b], out=buffer))
        return self._as_keys(torch.index_select(self.flat, 0, part.ids[a:b], out=buffer).abs_())

    def _keys_at(self, part: _Range, offsets: torch.Tensor) -> torch.Tensor:
        """Keys at the given offsets of `part` (a new tensor)."""
        return self._as_keys(self.flat.index_select(0, self._ids_at(part, offsets)).abs_())

    def _ids_at(self, part: _Range, offsets: torch.Tensor) -> torch.Tensor:
        return offsets if part.is_root else part.ids.index_select(0, offsets)

    def _stops(
        self, part: _Range, a: int, b: int, pivot: int, left: bool
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset, mask) chunks over offsets [a, b): where the left (or right) scan stops."""
        stop = self.left_stop if left else self.right_stop
        for start in range(a, b, CHUNK):
            end = min(start + CHUNK, b)
            yield start, stop(self._keys(part, start, end), pivot)

    def _both_stops(self, part: _Range, a: int, b: int, pivot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the left and where the right scan stops over offsets [a, b), b - a <= CHUNK."""
        keys = self._keys(part, a, b)
        return self.left_stop(keys, pivot), self.right_stop(keys, pivot)

    def _stop_offsets(self, part: _Range, a: int, b: int, pivot: int, left: bool) -> Iterator[torch.Tensor]:
        """The offsets in [a, b) where the left scan stops, ascending (left) or where the right
        scan stops, descending, in blocks of at most CHUNK."""
        if left:
            for start, mask in self._stops(part, a, b, pivot, True):
                yield mask.nonzero().squeeze(1).add_(start)
        else:
            for start in reversed(range(a, b, CHUNK)):
                ((_, mask),) = self._stops(part, start, min(start + CHUNK, b), pivot, False)
                yield mask.nonzero().squeeze(1).add_(start).flip(0)

    # one partition step
    def _median_to_front(self, part: _Range) -> int:
        """std::__move_median_to_first(first, first + 1, mid, last - 1): returns the offset
        swapped with the front."""
        m = part.size
        offsets = [1, m // 2, m - 1]
        a, b, c = self._keys_at(part, torch.tensor(offsets, device=self.flat.device)).tolist()
        before = self.before
        if before(a, b):
            pick = 1 if before(b, c) else (2 if before(a, c) else 0)
        elif before(a, c):
            pick = 0
        else:
            pick = 2 if before(b, c) else 1
        j = offsets[pick]
        entries = self.flat if part.is_root else part.ids
        entries[[0, j]] = entries[[j, 0]]
        return j

    def _cut(self, part: _Range, pivot: int) -> tuple[int, int, int]:
        """(swaps, cut, b_s) of std::__unguarded_partition over offsets [1, m).

        With A_i the offset of the i-th left stop from the left and B_i of the i-th right stop
        from the right, the scans swap A_i and B_i while A_i < B_i. So `swaps` = the number of
        such i = max over x of min(f(x), g(x)), f(x) = #left stops in [1, x), g(x) = #right
        stops in [x, m), found where f - g (nondecreasing) turns nonnegative. The left scan then
        ends, at the cut, on A_{swaps+1} or on B_swaps (which then holds a left stop), whichever
        comes first; b_s = B_swaps (m when there is no swap).
        """
        m = part.size
        left, right = [], []
        for start in range(1, m, CHUNK):
            lmask, rmask = self._both_stops(part, start, min(start + CHUNK, m), pivot)
            left.append(int(lmask.count_nonzero()))
            right.append(int(rmask.count_nonzero()))
        f, g = 0, sum(right)  # f(x), g(x) at the start x of the chunk
        for index, start in enumerate(range(1, m, CHUNK)):
            if f + left[index] < g - right[index]:  # f - g is still negative at the chunk's end
                f, g = f + left[index], g - right[index]
                continue
            lmask, rmask = self._both_stops(part, start, min(start + CHUNK, m), pivot)
            f_at = torch.cat([lmask.new_zeros(1, dtype=torch.int64), lmask.cumsum(0)]).add_(f)
            g_at = torch.cat([rmask.new_zeros(1, dtype=torch.int64), rmask.cumsum(0)]).neg_().add_(g)
            meet = int(torch.searchsorted(f_at - g_at, 0))  # f_at[i], g_at[i]: at x = start + i
            swaps = max(int(g_at[meet]), int(f_at[meet - 1])) if meet else g
            break
        # A_{swaps+1}: the x with f(x + 1) = swaps + 1; B_swaps: the last x with g(x) >= swaps
        after = int(torch.searchsorted(f_at, swaps + 1))
        if 1 <= after < f_at.numel():
            cut = start + after - 1
        else:
            cut = self._nth_stop(part, pivot, True, swaps + 1, left) if swaps < sum(left) else m
        if not swaps:
            return 0, cut, m
        last = int(torch.count_nonzero(g_at >= swaps)) - 1
        if 0 <= last < g_at.numel() - 1:
            b_s = start + last
        else:
            b_s = self._nth_stop(part, pivot, False, sum(right) - swaps + 1, right)
        return swaps, min(cut, b_s), b_s

    def _nth_stop(self, part: _Range, pivot: int, left: bool, nth: int, counts: list[int]) -> int:
        """Offset of the nth (1-based, from the left) stop of one scan over offsets [1, m),
        `counts` its stops per chunk."""
        for index, start in enumerate(range(1, part.size, CHUNK)):
            if nth <= counts[index]:
                ((_, mask),) = self._stops(part, start, min(start + CHUNK, part.size), pivot, left)
                return start + int(mask.nonzero()[nth - 1])
            nth -= counts[index]
        raise AssertionError("fewer stops than counted")

    def _pairs(
        self, part: _Range, cut: int, b_s: int, pivot: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The offsets the partition swaps, in blocks (A, B): A ascending from 1 (the left stops
        in [1, cut)), B descending from m - 1 (the right stops in [b_s, m)), A_i with B_i."""
        lefts = self._stop_offsets(part, 1, cut, pivot, True)
        rights = self._stop_offsets(part, b_s, part.size, pivot, False)
        a_block = b_block = torch.empty(0, dtype=torch.int64)
        while True:
            while a_block.numel() == 0:
                a_block = next(lefts, None)
                if a_block is None:
                    return
            while b_block.numel() == 0:
                b_block = next(rights)
            count = min(a_block.numel(), b_block.numel())
            yield a_block[:count], b_block[:count]
            a_block, b_block = a_block[count:], b_block[count:]

    def _swap_pairs(self, part: _Range, cut: int, b_s: int, pivot: int) -> None:
        """Partition a range below the root in place (its ids)."""
        for a, b in self._pairs(part, cut, b_s, pivot):
            at_a, at_b = part.ids.index_select(0, a), part.ids.index_select(0, b)
            part.ids.index_copy_(0, a, at_b)
            part.ids.index_copy_(0, b, at_a)

    def _open_root_side(self, left: bool, cut: int, b_s: int, swaps: int, pivot: int) -> _Range:
        """The root's left (or right) side as its own range: the flat indices of its entries, in
        the order the partition leaves them."""
        n = self.flat.numel()
        a, b = (0, cut) if left else (cut, n)
        ids = torch.arange(a, b, dtype=self.index_dtype, device=self.flat.device)
        if swaps:
            for into_left, into_right in self._pairs(_Range(0, n, 0), cut, b_s, pivot):
                to, source = (into_left, into_right) if left else (into_right, into_left)
                ids.index_copy_(0, to - a, source.to(self.index_dtype))
        return _Range(a, b, 2 * (n.bit_length() - 1) - 1, ids)

    def _drop_root_side(self, left: bool, cut: int, b_s: int, pivot: int) -> None:
        """Zero in tau the entries the root's partition leaves on its left (or right) side: that
        side's offsets less its swapped stops, plus the other side's swapped stops."""
        n, flat, root = self.flat.numel(), self.flat, _Range(0, self.flat.numel(), 0)
        if left:
            flat[0] = 0  # the pivot
        elif cut < b_s:
            flat[cut:b_s] = 0
        for start, mask in self._stops(root, 1, cut, pivot, True):
            flat[start : start + mask.numel()].mul_(mask if left else ~mask)
        for start, mask in self._stops(root, b_s, n, pivot, False):
            flat[start : start + mask.numel()].mul_(~mask if left else mask)

    def _finish(self, part: _Range) -> None:
        """The range's final order (insertion sort, or heapsort at the depth limit); drop the
        entries it puts outside [lo, hi)."""
        offsets = torch.arange(part.size, device=self.flat.device)
        keys = self._keys_at(part, offsets)
        if part.size <= INSERTION_RANGE:
            order = torch.sort(keys, descending=self.descending, stable=True).indices
        else:
            order = torch.tensor(heapsort_order(keys.tolist(), self.before), device=keys.device)
        rank = offsets + part.first
        self._zero(self._ids_at(part, order[(rank < self.lo) | (rank >= self.hi)]))


# libstdc++'s heap algorithms (bits/stl_heap.h), on a list of (index, value), comparing values:
# std::sort's fallback past its depth limit is std::__partial_sort(first, last, last).


def _adjust_heap(heap: list, hole: int, length: int, item: tuple, before: Callable) -> None:
    top, child = hole, hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if before(heap[child][1], heap[child - 1][1]):
            child -= 1
        heap[hole] = heap[child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        heap[hole] = heap[child - 1]
        hole = child - 1
    parent = (hole - 1) // 2
    while hole > top and before(heap[parent][1], item[1]):
        heap[hole] = heap[parent]
        hole = parent
        parent = (hole - 1) // 2
    heap[hole] = item


def heap_select_and_sort(items: list, middle: int, before: Callable) -> None:
    """std::__partial_sort(first, first + middle, last) on `items`, in place."""
    if middle >= 2:
        for parent in range((middle - 2) // 2, -1, -1):
            _adjust_heap(items, parent, middle, items[parent], before)
    for i in range(middle, len(items)):
        if before(items[i][1], items[0][1]):
            item, items[i] = items[i], items[0]
            _adjust_heap(items, 0, middle, item, before)
    for last in range(middle - 1, 0, -1):
        item, items[last] = items[last], items[0]
        _adjust_heap(items, 0, last, item, before)


def heapsort_order(values: list[float], before: Callable) -> list[int]:
    """The order libstdc++'s heapsort leaves `values` in: position -> original index."""
    items = list(enumerate(values))
    heap_select_and_sort(items, len(items), before)
    return [index for index, _ in items]
