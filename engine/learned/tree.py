"""The tree of a hierarchical merge, as a plan: nodes, what each merges, which tasks train it.

Pure: no files, no processes, no tensors. The learned merge asks for one level at a time
(grouping by similarity reads the level's inputs, which exist only once the level below is
trained), and executes the nodes it is given.

    level 0:  tasks t1 .. tk, grouped g at a time -> nodes level0-node0, level0-node1, ...
    level l:  the nodes of level l - 1 (and tasks left alone), grouped again
    root:     the last level's inputs, once at most g remain (flat merge: the tasks themselves)

A group of one input is not a node: the input passes up to the next level as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from supermerge.errors import ConfigError

ROOT = "root"


@dataclass(frozen=True)
class TreeNode:
    """One merge of the tree.

    Attributes:
        id: "level<l>-node<j>", or "root".
        children: the inputs it merges (task names at level 0, node ids or tasks above).
        leaves: the tasks under it, whose validation data trains it.
        init: initial coefficient tanh(w) of its inputs.
    """

    id: str
    children: tuple[str, ...]
    leaves: tuple[str, ...]
    init: float


class TreePlan:
    """Levels of a hierarchical merge, added one at a time (see module docstring).

    Args:
        tasks: the k task names, in order.
        group_size: g; 0 for a flat merge (the root merges every task).
        init: initial coefficient at level 0 (and of a flat root).
        upper_init: initial coefficient of the levels above (their inputs are merges already).
    """

    def __init__(self, tasks: Sequence[str], group_size: int, init: float, upper_init: float) -> None:
        self.group_size, self.init, self.upper_init = group_size, init, upper_init
        self.inputs: list[str] = list(tasks)
        self.levels: list[list[TreeNode]] = []
        self._leaves: dict[str, tuple[str, ...]] = {t: (t,) for t in tasks}

    @property
    def needs_level(self) -> bool:
        """True while more than g inputs remain below the root."""
        return bool(self.group_size) and len(self.inputs) > self.group_size

    def _node(self, node_id: str, children: Sequence[str]) -> TreeNode:
        leaves = tuple(leaf for c in children for leaf in self._leaves[c])
        return TreeNode(node_id, tuple(children), leaves, self.upper_init if self.levels else self.init)

    def add_level(self, groups: Sequence[Sequence[str]]) -> list[TreeNode]:
        """The next level's nodes for `groups`, a partition of the current inputs into groups of at
        most g; their outputs (and inputs left alone) become the inputs of the level above."""
        listed = sorted(n for group in groups for n in group)
        if listed != sorted(self.inputs) or any(len(group) > self.group_size for group in groups):
            raise ValueError(f"groups {groups} are not a partition of {self.inputs} into groups of g or less")
        level = len(self.levels)
        nodes, inputs = [], []
        for j, group in enumerate(groups):
            if len(group) == 1:
                inputs.append(group[0])
                continue
            node = self._node(f"level{level}-node{j}", group)
            self._leaves[node.id] = node.leaves
            nodes.append(node)
            inputs.append(node.id)
        self.levels.append(nodes)
        self.inputs = inputs
        return nodes

    def root(self) -> TreeNode:
        """The node that merges what remains into the output."""
        return self._node(ROOT, self.inputs)


def in_order_groups(names: Sequence[str], g: int) -> list[list[str]]:
    """`names` cut into consecutive groups of g (the last may be smaller)."""
    return [list(names[i : i + g]) for i in range(0, len(names), g)]


def check_groups(groups: Sequence[Sequence[str]], tasks: Sequence[str], g: int) -> list[list[str]]:
    """The explicit first-level groups of `method.groups`, checked against the tasks and g."""
    listed = [n for group in groups for n in group]
    if sorted(listed) != sorted(tasks):
        raise ConfigError("method.groups", f"must list every task exactly once: {sorted(tasks)}")
    if any(len(group) > g for group in groups):
        raise ConfigError("method.groups", f"a group is larger than group_size {g}")
    return [list(group) for group in groups]


def waves(nodes: int, ranks: int) -> list[tuple[range, list[int]]]:
    """How a level's nodes share the ranks: waves of at most `ranks` nodes trained at once, each
    on a disjoint, contiguous group of ranks. Returns per wave its node indices and each rank's
    node within the wave (its color)."""
    result = []
    for first in range(0, nodes, ranks):
        wave = range(first, min(first + ranks, nodes))
        result.append((wave, [r * len(wave) // ranks for r in range(ranks)]))
    return result


def effective_coefficients(
    nodes: Sequence[tuple[str, Sequence[str], Sequence[Sequence[float]]]], tasks: Sequence[str]
) -> dict[str, list[float]]:
    """Per task, the product of its coefficients along its path to the root, per column.

    Args:
        nodes: (node id, children, tanh(W) rows [children][columns]) of every trained node, the
            root last. A flat merge has one node: the effective coefficients are its rows.
        tasks: the task names.
    """
    parent: dict[str, tuple[str, Sequence[float]]] = {}
    for node_id, children, rows in nodes:
        for child, row in zip(children, rows, strict=True):
            parent[child] = (node_id, row)
    columns = len(nodes[-1][2][0])
    result = {}
    for task in tasks:
        product = [1.0] * columns
        name = task
        while name in parent:
            name, row = parent[name]
            product = [p * c for p, c in zip(product, row, strict=True)]
        result[task] = product
    return result
