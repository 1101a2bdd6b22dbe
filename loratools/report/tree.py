"""Canonical module names grouped the way people think about a model, as plain data.

``unet.down_blocks.1.attentions.0.transformer_blocks.3.attn1.to_q`` sits under
U-Net → down 1 → attention 0 → transformer block 3 → ``attn1.to_q``; text-encoder modules under
text encoder → layer N → ``self_attn.q_proj``. Each node carries what is under it (module count,
kinds, ranks, alphas, and the ΔW norm when computed); runs of identical siblings (text layers
0–11, transformer blocks 0–9) fold into one node with a ``repeat`` count, so a uniform SDXL LoRA
fits on one screen. Rendering is the CLI's job; ``to_dict`` is the ``tree`` of the JSON report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..families.spec import COMPONENT_TITLES

# index-bearing containers of diffusers/HF module paths → singular label
CONTAINERS = {
    "down_blocks": "down",
    "up_blocks": "up",
    "attentions": "attention",
    "resnets": "resnet",
    "transformer_blocks": "transformer block",
    "single_transformer_blocks": "single transformer block",
    "layers": "layer",
    "downsamplers": "downsampler",
    "upsamplers": "upsampler",
}
PASS_THROUGH = ("text_model", "encoder")  # path tokens folded into the next group's name
# containers whose identical consecutive members fold into one node; blocks (down/up) never do:
# they are the view people navigate by
FOLDABLE: tuple[str, ...] = ("layers", "transformer_blocks", "attentions", "resnets")
# … and in module paths no family map knows (FLUX.1, SD3, language models)
FOLDABLE += ("single_transformer_blocks", "double_blocks", "single_blocks", "joint_blocks", "layer", "h", "blocks")


@dataclass
class Leaf:
    """The facts the tree aggregates for one module."""

    module: str  # canonical name
    kind: str
    rank: int | None
    alpha: float | None
    norm: float | None = None
    parameters: int = 0


@dataclass
class Node:
    """A group of modules (or, with ``module`` set, one module)."""

    key: str  # path segment(s) below the parent: "down_blocks.1", "attn1.to_q"
    label: str  # "down 1", "layers 0–11"
    path: str  # canonical prefix of everything below (the first member's, for a folded run)
    modules: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, int] = field(default_factory=dict)
    norm: float | None = None  # ‖ΔW‖_F of everything below: sqrt of the summed squares
    parameters: int = 0  # stored parameters below (LoRA factors, or checkpoint weights)
    repeat: int = 1  # a run of this many identical siblings folded into this node
    module: str | None = None
    children: list[Node] = field(default_factory=list)

    @property
    def uniform(self) -> bool:
        """One kind, one rank and one alpha below this node."""
        return len(self.kinds) <= 1 and len(self.ranks) <= 1 and len(self.alphas) <= 1

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "key": self.key,
            "label": self.label,
            "path": self.path,
            "modules": self.modules,
            "kinds": self.kinds,
            "ranks": self.ranks,
            "alphas": self.alphas,
            "norm": self.norm,
            "repeat": self.repeat,
            "parameters": self.parameters,
        }
        if self.module is not None:
            out["module"] = self.module
        if self.children:
            out["children"] = [c.to_dict() for c in self.children]
        return out


_KOHYA_NAME = re.compile(r"^(lora_(?:unet|te\d?|transformer))_(.+)$")
_INDEXED = re.compile(r"^(.+?)_(\d+)(?:_(.*))?$")


def generic_segments(module: str) -> list[tuple[str, str]]:
    """Levels of a module name no family map knows, by its own dots: each ``name.N`` pair is one
    level (``single_transformer_blocks 12``). A kohya lora_name has no dots: its ``_N_`` indices
    split it the same way (``lora_unet`` → ``double_blocks 0`` → ``img_attn_proj``)."""
    kohya = _KOHYA_NAME.match(module) if "." not in module else None
    if kohya is not None:
        out = [(kohya.group(1), kohya.group(1))]
        rest: str | None = kohya.group(2)
        while rest:
            found = _INDEXED.match(rest)
            if found is None:
                break
            out.append((f"{found.group(1)}.{found.group(2)}", f"{found.group(1)} {found.group(2)}"))
            rest = found.group(3)
        if rest:
            out.append((rest, rest))
        return out
    tokens = module.split(".")
    out, i = [], 0
    while i < len(tokens) - 1:
        if tokens[i + 1].isdigit():
            out.append((f"{tokens[i]}.{tokens[i + 1]}", f"{CONTAINERS.get(tokens[i], tokens[i])} {tokens[i + 1]}"))
            i += 2
        elif not out:
            out.append((tokens[i], tokens[i]))  # the root component ("transformer", "model")
            i += 1
        else:
            break
    leaf = ".".join(tokens[i:])
    if leaf:
        out.append((leaf, leaf))
    return out


def segments(module: str) -> list[tuple[str, str]]:
    """(key, label) of every level from the component down to the module's own leaf."""
    component, _, rest = module.partition(".")
    out = [(component, COMPONENT_TITLES.get(component, component))]
    tokens = rest.split(".") if rest else []
    prefix: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in CONTAINERS and i + 1 < len(tokens) and tokens[i + 1].isdigit():
            out.append((".".join([*prefix, token, tokens[i + 1]]), f"{CONTAINERS[token]} {tokens[i + 1]}"))
            prefix, i = [], i + 2
        elif token == "mid_block" and not prefix:
            out.append((token, "mid"))
            i += 1
        elif component == "vae" and token in ("encoder", "decoder") and not prefix and i + 1 < len(tokens):
            out.append((token, token))
            i += 1
        elif token in PASS_THROUGH and i + 1 < len(tokens):
            prefix.append(token)
            i += 1
        else:
            break
    leaf = ".".join(prefix + tokens[i:])
    if leaf:
        out.append((leaf, leaf))
    return out


def build_tree(leaves: Iterable[Leaf], *, fold: bool = True, generic: bool = False) -> list[Node]:
    """Component nodes (U-Net, text encoders) with their groups below, in module order.

    ``generic``: module names no family map knows, grouped by their own dots (:func:`generic_segments`).

    Each leaf's facts are counted into every node on its path as it is inserted (one pass, no
    Counter merging: this runs inside inspect's 0.2 s budget for ~1,000 modules).
    """
    roots: list[Node] = []
    index: dict[str, Node] = {}  # canonical prefix → node
    alpha_text: dict[float | None, str] = {}
    squares: dict[str, float] = {}
    for leaf in leaves:
        rank = "None" if leaf.rank is None else str(leaf.rank)
        alpha = alpha_text.get(leaf.alpha)
        if alpha is None:
            alpha = alpha_text[leaf.alpha] = "none" if leaf.alpha is None else f"{leaf.alpha:g}"
        path = ""
        parent: Node | None = None
        levels = generic_segments(leaf.module) if generic else segments(leaf.module)
        for depth, (key, label) in enumerate(levels):
            path = f"{path}.{key}" if path else key
            node = index.get(path)
            if node is None:
                node = index[path] = Node(key, label, path)
                (parent.children if parent is not None else roots).append(node)
            if depth == len(levels) - 1:
                node.module = leaf.module
            node.modules += 1
            node.parameters += leaf.parameters
            node.kinds[leaf.kind] = node.kinds.get(leaf.kind, 0) + 1
            node.ranks[rank] = node.ranks.get(rank, 0) + 1
            node.alphas[alpha] = node.alphas.get(alpha, 0) + 1
            if leaf.norm is not None:
                squares[path] = squares.get(path, 0.0) + leaf.norm * leaf.norm
            parent = node
    for path, total in squares.items():
        index[path].norm = math.sqrt(total)
    if fold:
        memo: dict[int, tuple[object, ...]] = {}
        for node in roots:
            _fold(node, memo)
    return roots


def _signature(node: Node, memo: dict[int, tuple[object, ...]]) -> tuple[object, ...]:
    """What a node holds, independent of where it sits: its leaves' relative names and facts."""
    cached = memo.get(id(node))
    if cached is None:
        cached = memo[id(node)] = (
            node.module is not None,
            node.repeat,
            node.parameters,
            tuple(sorted(node.kinds.items())),
            tuple(sorted(node.ranks.items())),
            tuple(sorted(node.alphas.items())),
            tuple((c.key if c.module is not None else _container(c.key), _signature(c, memo)) for c in node.children),
        )
    return cached


def _container(key: str) -> str:
    parts = key.rsplit(".", 1)
    return parts[0] if len(parts) == 2 and parts[1].isdigit() else key


def _index_of(key: str) -> int | None:
    parts = key.rsplit(".", 1)
    return int(parts[1]) if len(parts) == 2 and parts[1].isdigit() else None


def _fold(node: Node, memo: dict[int, tuple[object, ...]]) -> None:
    """Fold runs of consecutive, identical siblings of one container (layers 0–11) into one node.

    Bottom-up: children fold first, then each child's signature is taken once, before any merge,
    so a run is compared against its first member. Only nodes without norms fold: norms differ
    from block to block, and showing them is the point.
    """
    for child in node.children:
        _fold(child, memo)
    folded: list[Node] = []
    last_signature: tuple[object, ...] | None = None
    for child in node.children:
        signature = _signature(child, memo)
        prev = folded[-1] if folded else None
        index = _index_of(child.key)
        first = _index_of(prev.key) if prev is not None else None
        if (
            prev is not None
            and index is not None
            and first is not None
            and child.norm is None
            and prev.norm is None
            and child.module is None
            and _container(prev.key) == _container(child.key)
            and _container(child.key).rsplit(".", 1)[-1] in FOLDABLE
            and first + prev.repeat == index
            and last_signature == signature
        ):
            prev.repeat += 1
            word = prev.label.rpartition(" ")[0].removesuffix("s")
            prev.label = f"{word}s {first}–{index}"
            prev.modules += child.modules
            prev.parameters += child.parameters
            for mine, theirs in ((prev.kinds, child.kinds), (prev.ranks, child.ranks), (prev.alphas, child.alphas)):
                for k, v in theirs.items():
                    mine[k] = mine.get(k, 0) + v
            continue
        folded.append(child)
        last_signature = signature
    node.children = folded
    memo.pop(id(node), None)  # its children changed: recomputed when its parent folds


def walk(nodes: Iterable[Node], depth: int = 0) -> Iterable[tuple[int, Node]]:
    """Every node with its depth, parents first."""
    for node in nodes:
        yield depth, node
        yield from walk(node.children, depth + 1)
