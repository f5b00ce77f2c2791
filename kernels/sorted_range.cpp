// Exact magnitude trim: keep the entries of tau that torch's CPU argsort of |tau| (libstdc++'s
// std::sort on (value, index) pairs) puts at sorted positions [lo, hi), zero the others.
//
// std::sort is introsort: partition around a median of three until a range has at most 16
// entries (then insertion sort, stable), heapsort past a depth limit of 2 floor(log2 n). Only the
// ranges that straddle lo or hi decide anything, so a range lying wholly inside or outside
// [lo, hi) is not sorted further: O(n) expected instead of O(n log n). The steps below are
// libstdc++'s (bits/stl_algo.h, bits/stl_heap.h); the moves of the entries depend only on the
// comparisons of their keys, so ties end where torch leaves them. Python checks the result
// against torch.argsort before trusting this build (supermerge.kernels.sorted_range_cpu).
//
// Memory: tau is never reordered. The first partition (the whole array) is replayed on tau in
// place of the array, twice: once to find the cut, once to write the side that holds lo (or hi)
// in the order the partition leaves it. A side of at most n / 2 entries is written as (key << 32
// | index) words and sorted as such, read in order; a larger one as int32 indices, comparing the
// entries of tau they point at (scattered reads, about 1.5x slower). Besides tau: at most 4
// bytes per entry of tau, and one bit per entry.
//
// Magnitudes are compared as the bits of |tau| (sign bit cleared) read as unsigned integers:
// for floats that are not NaN this is their order (the caller refuses NaN).

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

using Word = uint64_t;  // key << 32 | index: entries below the first partition

template <bool Descending>
struct WordBefore {
  bool operator()(Word a, Word b) const {
    return Descending ? (a >> 32) > (b >> 32) : (a >> 32) < (b >> 32);
  }
};

template <typename T, typename Before>
void move_median_to_first(T* result, T* a, T* b, T* c, Before before) {
  if (before(*a, *b)) {
    if (before(*b, *c)) std::swap(*result, *b);
    else if (before(*a, *c)) std::swap(*result, *c);
    else std::swap(*result, *a);
  } else if (before(*a, *c)) {
    std::swap(*result, *a);
  } else if (before(*b, *c)) {
    std::swap(*result, *c);
  } else {
    std::swap(*result, *b);
  }
}

template <typename T, typename Before>
T* unguarded_partition_pivot(T* first, T* last, Before before) {
  T* mid = first + (last - first) / 2;
  move_median_to_first(first, first + 1, mid, last - 1, before);
  T* pivot = first;
  ++first;
  while (true) {
    while (before(*first, *pivot)) ++first;
    --last;
    while (before(*pivot, *last)) --last;
    if (!(first < last)) return first;
    std::swap(*first, *last);
    ++first;
  }
}

template <typename T, typename Before>
void insertion_sort(T* first, T* last, Before before) {
  if (first == last) return;
  for (T* i = first + 1; i != last; ++i) {
    T value = *i;
    if (before(value, *first)) {
      for (T* j = i; j != first; --j) *j = *(j - 1);
      *first = value;
    } else {
      T* hole = i;
      for (T* next = i - 1; before(value, *next); --next) {
        *hole = *next;
        hole = next;
      }
      *hole = value;
    }
  }
}

template <typename T, typename Before>
void adjust_heap(T* first, int64_t hole, int64_t len, T value, Before before) {
  const int64_t top = hole;
  int64_t child = hole;
  while (child < (len - 1) / 2) {
    child = 2 * (child + 1);
    if (before(first[child], first[child - 1])) child--;
    first[hole] = first[child];
    hole = child;
  }
  if ((len & 1) == 0 && child == (len - 2) / 2) {
    child = 2 * (child + 1);
    first[hole] = first[child - 1];
    hole = child - 1;
  }
  int64_t parent = (hole - 1) / 2;
  while (hole > top && before(first[parent], value)) {
    first[hole] = first[parent];
    hole = parent;
    parent = (hole - 1) / 2;
  }
  first[hole] = value;
}

// std::__partial_sort(first, last, last): make_heap, then sort_heap.
template <typename T, typename Before>
void heapsort(T* first, T* last, Before before) {
  const int64_t len = last - first;
  if (len >= 2) {
    for (int64_t parent = (len - 2) / 2;; --parent) {
      adjust_heap(first, parent, len, first[parent], before);
      if (parent == 0) break;
    }
  }
  while (last - first > 1) {
    --last;
    T value = *last;
    *last = *first;
    adjust_heap(first, 0, last - first, value, before);
  }
}

// std::__introsort_loop and the final insertion sort, skipping every range that decides nothing
// about which entries end in [lo, hi) (pointers into the same array as first and last).
template <typename T, typename Before>
void introsort(T* first, T* last, int64_t depth, Before before, const T* lo, const T* hi) {
  while (true) {
    if (last <= lo || first >= hi || (lo <= first && last <= hi)) return;
    if (last - first <= 16) {
      insertion_sort(first, last, before);
      return;
    }
    if (depth == 0) {
      heapsort(first, last, before);
      return;
    }
    --depth;
    T* cut = unguarded_partition_pivot(first, last, before);
    introsort(cut, last, depth, before, lo, hi);
    last = cut;
  }
}

int64_t floor_log2(int64_t n) {
  int64_t k = 0;
  while (n > 1) {
    n >>= 1;
    ++k;
  }
  return k;
}

// The first partition, on tau itself. Position p of the array std::sort partitions holds entry p
// of tau, except that the median of three (at `median`) and entry 0 trade places first.
template <typename Bits, bool Descending>
struct Root {
  Bits* bits;
  int64_t n;
  Bits mask;
  int64_t median = 0;

  Word key(int64_t entry) const { return static_cast<Word>(bits[entry] & mask); }
  int64_t at(int64_t p) const { return p == 0 ? median : (p == median ? 0 : p); }
  Word word_of(int64_t entry) const { return key(entry) << 32 | static_cast<Word>(entry); }
  Word word(int64_t p) const { return word_of(at(p)); }
  bool before(Word a, Word b) const { return WordBefore<Descending>()(a, b); }

  // std::__move_median_to_first(first, first + 1, mid, last - 1): which position it picks.
  void pick_median() {
    const int64_t a = 1, b = n / 2, c = n - 1;
    auto less = [&](int64_t x, int64_t y) { return before(word(x), word(y)); };
    if (less(a, b)) median = less(b, c) ? b : (less(a, c) ? c : a);
    else if (less(a, c)) median = a;
    else median = less(b, c) ? c : b;
  }

  // __unguarded_partition over positions [1, n) against the pivot at 0; calls swap(p, q) for each
  // exchange (p < q) and returns the cut. Positions keep their first content except the two of
  // the latest exchange, which the scans may read again (the left one runs up to its q at most,
  // the right one down to its p).
  template <typename Swap>
  int64_t partition(Swap swap) const {
    const Word pivot = word(0);
    int64_t first = 1, last = n, swapped_p = -1, swapped_q = -1;
    auto now = [&](int64_t p) {
      return word(p == swapped_p ? swapped_q : (p == swapped_q ? swapped_p : p));
    };
    while (true) {
      while (before(now(first), pivot)) ++first;
      --last;
      while (before(pivot, now(last))) --last;
      if (!(first < last)) return first;
      swap(first, last);
      swapped_p = first;
      swapped_q = last;
      ++first;
    }
  }

  // The entries at positions [a, b) after the partition (a side of the cut), each made into a T
  // by entry_as (position -> T) in the order the partition leaves them.
  template <typename T, typename EntryAs>
  std::vector<T> side(int64_t a, int64_t b, EntryAs entry_as) const {
    std::vector<T> out(static_cast<size_t>(b - a));
    for (int64_t p = a; p < b; ++p) out[p - a] = entry_as(p);
    partition([&](int64_t p, int64_t q) {
      if (a <= p && p < b) out[p - a] = entry_as(q);
      if (a <= q && q < b) out[q - a] = entry_as(p);
    });
    return out;
  }

  // Marks the entries at positions [a, b) after the partition, without writing them out.
  void mark_side(int64_t a, int64_t b, std::vector<bool>& marked) const {
    for (int64_t p = a; p < b; ++p) marked[at(p)] = true;
    partition([&](int64_t p, int64_t q) {
      const bool p_in = a <= p && p < b, q_in = a <= q && q < b;
      if (p_in != q_in) {  // the entry at the position inside leaves, the other comes in
        marked[at(p_in ? p : q)] = false;
        marked[at(p_in ? q : p)] = true;
      }
    });
  }
};

template <typename Bits, bool Descending>
void keep(Bits* bits, int64_t n, int64_t lo, int64_t hi) {
  const Bits mask = static_cast<Bits>(~(Bits(1) << (8 * sizeof(Bits) - 1)));
  Root<Bits, Descending> root{bits, n, mask};
  int64_t depth = 2 * floor_log2(n), cut = n;
  if (n > 16) {
    root.pick_median();
    cut = root.partition([](int64_t, int64_t) {});
    --depth;
  }
  // entries to zero, marked first: zeroing changes the keys the other side is replayed with. A
  // side dropped whole is marked first: marking it clears the entries its partition sends away.
  std::vector<bool> dropped(static_cast<size_t>(n), false);
  const std::pair<int64_t, int64_t> sides[2] = {{0, cut}, {cut, n}};
  for (const auto& [a, b] : sides) {
    if (a < b && (b <= lo || a >= hi)) root.mark_side(a, b, dropped);
  }
  for (const auto& [a, b] : sides) {
    if (a >= b || b <= lo || a >= hi || (lo <= a && b <= hi)) continue;  // done above, or kept
    const int64_t from = std::max(lo - a, int64_t(0)), to = std::min(hi - a, b - a);
    if (2 * (b - a) <= n) {  // its words fit in 4 bytes per entry of tau
      std::vector<Word> words = root.template side<Word>(a, b, [&](int64_t p) { return root.word(p); });
      Word* first = words.data();
      introsort(first, first + (b - a), depth, WordBefore<Descending>(), first + from, first + to);
      for (int64_t p = 0; p < b - a; ++p) {
        if (p < from || p >= to) dropped[words[p] & 0xffffffffu] = true;
      }
    } else {  // the larger side: its indices (4 bytes each), comparing the entries they point at
      std::vector<int32_t> ids =
          root.template side<int32_t>(a, b, [&](int64_t p) { return static_cast<int32_t>(root.at(p)); });
      int32_t* first = ids.data();
      auto before = [&](int32_t x, int32_t y) { return root.before(root.word_of(x), root.word_of(y)); };
      introsort(first, first + (b - a), depth, before, first + from, first + to);
      for (int64_t p = 0; p < b - a; ++p) {
        if (p < from || p >= to) dropped[ids[p]] = true;
      }
    }
  }
  for (int64_t entry = 0; entry < n; ++entry) {
    if (dropped[entry]) bits[entry] = 0;
  }
}

}  // namespace

extern "C" {

// tau's `n` entries as 32-bit (float32) or 16-bit (bfloat16, float16) words, n < 2^31. Zeroes,
// in place, every entry whose sorted position is outside [lo, hi).
void keep_sorted_range_32(uint32_t* bits, int64_t n, int64_t lo, int64_t hi, int descending) {
  if (descending) keep<uint32_t, true>(bits, n, lo, hi);
  else keep<uint32_t, false>(bits, n, lo, hi);
}

void keep_sorted_range_16(uint16_t* bits, int64_t n, int64_t lo, int64_t hi, int descending) {
  if (descending) keep<uint16_t, true>(bits, n, lo, hi);
  else keep<uint16_t, false>(bits, n, lo, hi);
}
}
