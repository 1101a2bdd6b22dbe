"""Human renderings of the issue-7 facts: the LoRA layout tree, ΔW norm bars, metadata, hashes,
raw keys, folder summaries and diffs. Plain data in (``loratools.report``), rich out."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text
from rich.tree import Tree

from ..families.spec import COMPONENT_ORDER
from ..report.lora import LoraReport
from ..report.tree import Node
from .render import FORMAT_TITLES, human_bytes, human_count

if TYPE_CHECKING:  # rich.table (with fractions and decimal) is imported by the tables only:
    from rich.table import Table  # a header-only inspect prints none

BAR_WIDTH = 40
_EIGHTHS = " ▏▎▍▌▋▊▉"
_PLACE = {component: i for i, component in enumerate(COMPONENT_ORDER)}  # n.key → its row


def echo_json(data: Any) -> None:
    """JSON on stdout, indented, UTF-8 as is: written directly, since rich's highlighter-free
    ``print_json`` still spends ~0.3 s laying out a 1,000-module report."""
    import json
    import sys

    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def bar(value: float, top: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar ``value/top`` of ``width`` cells, in eighths of a cell."""
    if not (math.isfinite(value) and math.isfinite(top)) or top <= 0 or value <= 0:
        return ""
    eighths = round(min(value / top, 1.0) * width * 8)
    return "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")


def _one(counts: dict[str, int]) -> str | None:
    return next(iter(counts)) if len(counts) == 1 else None


def _spread(counts: dict[str, int], prefix: str) -> str:
    keys = list(counts)
    if len(keys) == 1:
        return f"{prefix}{keys[0]}"
    numeric = sorted((float(k) for k in keys if k not in ("none", "None")), key=float)
    if numeric and len(numeric) == len(keys):
        return f"{prefix}{numeric[0]:g}…{numeric[-1]:g} ({len(keys)} values)"
    return f"{prefix}{'/'.join(keys[:4])}{'…' if len(keys) > 4 else ''}"


def describe(node: Node) -> str:
    """``kind r32 α16 ×0.5`` for a uniform node, the spread of each fact otherwise."""
    kind, rank, alpha = _one(node.kinds), _one(node.ranks), _one(node.alphas)
    parts = [kind or "/".join(f"{k}×{n}" for k, n in node.kinds.items())]
    parts.append(_spread(node.ranks, "r") if rank != "None" else "")
    parts.append(_spread(node.alphas, "α") if alpha != "none" else "")
    if kind and rank not in (None, "None") and alpha not in (None, "none"):
        parts.append(f"×{float(alpha) / float(rank):.4g}")
    return " ".join(p for p in parts if p)


def _node_text(node: Node, top_norm: float | None) -> Text:
    text = Text()
    text.append(node.label, style="bold" if not node.module else "")
    if node.module is None:
        each = node.modules // node.repeat
        text.append(f" · {each} module{'s' if each != 1 else ''}{' each' if node.repeat > 1 else ''}", style="dim")
    text.append(f" · {describe(node)}", style="cyan")
    if node.norm is not None:
        text.append(f" · ‖ΔW‖ {node.norm:.4g}", style="magenta")
    return text


def _add(branch: Tree, node: Node, depth: int, top_norm: float | None) -> None:
    child = branch.add(_node_text(node, top_norm))
    if node.children and (depth == 0 or not node.uniform):
        for sub in node.children:
            _add(child, sub, depth + 1, top_norm)


def layout_tree(report: LoraReport) -> Tree:
    """The module layout as a rich Tree: components always open, uniform groups collapsed."""
    root = Tree(Text(f"{report.modules} modules", style="bold"), guide_style="dim")
    top = max((n.norm or 0.0 for n in report.tree), default=0.0) or None
    for node in sorted(report.tree, key=lambda n: _PLACE.get(n.key, len(_PLACE))):
        _add(root, node, 0, top)
    return root


def _checkpoint_node_text(node: Node) -> Text:
    text = Text()
    text.append(node.label, style="bold" if not node.module else "")
    each = node.modules // node.repeat
    if node.module is None:
        text.append(f" · {each} module{'s' if each != 1 else ''}{' each' if node.repeat > 1 else ''}", style="dim")
    text.append(f" · {human_count(node.parameters // node.repeat)} parameters{' each' if node.repeat > 1 else ''}")
    text.append(f" · {'/'.join(node.kinds)}", style="cyan")
    return text


def checkpoint_tree(nodes: Sequence[Node], *, depth: int = 1) -> Tree:
    """A checkpoint's modules by block: components and their blocks, dtype and parameter counts."""
    root = Tree(Text("modules", style="bold"), guide_style="dim")

    def add(branch: Tree, node: Node, level: int) -> None:
        child = branch.add(_checkpoint_node_text(node))
        if level < depth:
            for sub in node.children:
                add(child, sub, level + 1)

    for node in sorted(nodes, key=lambda n: _PLACE.get(n.key, len(_PLACE))):
        add(root, node, 0)
    return root


def norm_bars(report: LoraReport, *, top_modules: int = 12) -> Table:
    """‖ΔW‖_F per block (each component's groups) and the largest modules, as bars."""
    from rich.table import Table

    table = Table(show_edge=False, header_style="bold", title="‖ΔW‖_F (factor space)", title_justify="left")
    table.add_column("block")
    table.add_column("‖ΔW‖", justify="right")
    table.add_column("")
    rows: list[tuple[str, float]] = []
    for component in sorted(report.tree, key=lambda n: _PLACE.get(n.key, len(_PLACE))):
        for node in component.children:
            rows.append((f"{component.label} · {node.label}", node.norm or 0.0))
    top = max((v for _, v in rows), default=0.0)
    for label, value in rows:
        table.add_row(label, f"{value:.4g}", Text(bar(value, top), style="magenta"))
    modules = sorted((f for f in report.module_facts if f.norm is not None), key=lambda f: -(f.norm or 0.0))
    if modules:
        table.add_section()
        biggest = modules[0].norm or 0.0
        for f in modules[:top_modules]:
            table.add_row(Text(f.module, style="dim"), f"{f.norm:.4g}", Text(bar(f.norm or 0.0, biggest), style="cyan"))
    return table


def render_lora_report(console: Console, report: LoraReport, *, norms: bool, keys: bool) -> None:
    """One screen: what the file is, family from shapes against what metadata claims, the module
    tree (which carries the per-component kinds/ranks/alphas), totals, then the details."""
    head = Text()
    head.append(report.path, style="bold")
    if report.format == "textual-inversion":
        head.append(f"  ·  textual-inversion embeddings for {report.family_title}", style="bold cyan")
    else:
        head.append(f"  ·  LoRA for {report.family_title}", style="bold cyan")
        head.append(f"  ·  {FORMAT_TITLES.get(report.format, report.format)}")
    head.append(f"  ·  {human_bytes(report.file_bytes)}")
    console.print(head)
    model = report.model or {}
    if model.get("fit") not in (None, "shapes"):
        console.print(f"model: {model['note']}", highlight=False)
    if report.metadata_claims:
        verdict = "[yellow]disagrees: the shapes win[/yellow]" if report.family_mismatch else "[green]agrees[/green]"
        console.print(
            f"family from {'shapes' if model.get('fit', 'shapes') == 'shapes' else 'names'}: {report.family_title}"
            f" · metadata claims: {report.metadata_claims} · {verdict}"
        )
    console.print(
        f"{report.modules} modules, {human_count(report.parameters)} parameters, dtypes "
        + ", ".join(f"{d}×{n}" for d, n in report.dtypes.items())
        + f" · read: {report.read}"
    )
    if report.loads_in:
        console.print("loads in: " + " · ".join(report.loads_in), highlight=False)
    for warning in report.warnings[:10]:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    if len(report.warnings) > 10:
        console.print(f"[dim]… and {len(report.warnings) - 10} more warnings (--json lists them)[/dim]")
    if report.modules:
        console.print(layout_tree(report))
    render_lora_details(console, report, norms=norms, keys=keys)


def render_lora_details(console: Console, report: LoraReport, *, norms: bool, keys: bool) -> None:
    """Everything beyond the summary and tree: embeddings, metadata, norms, hashes, keys."""
    for emb in report.embedding_facts:
        console.print(
            f"textual-inversion embedding [bold]{emb.name}[/bold]: {emb.vectors} vector{'s' if emb.vectors != 1 else ''}"
            f" × {emb.width} ({emb.dtype})"
        )
    render_metadata(console, report.metadata_summary)
    if report.provenance is not None:
        render_provenance(console, report.provenance)
    if norms and report.norms is not None:
        console.print(norm_bars(report))
        console.print(f"total ‖ΔW‖_F {report.norms['total']:.4g}")
        if report.norms.get("dora_note"):
            console.print(f"[dim]note:[/dim] {report.norms['dora_note']}")
    if report.hashes is not None:
        render_hashes(console, [report.hashes])
    if keys and report.keys is not None:
        render_keys(console, report.keys)


def render_metadata(console: Console, summary: dict[str, Any]) -> None:
    training = summary.get("training") or {}
    if training:
        shown = ", ".join(f"{k.removeprefix('ss_')}={v}" for k, v in training.items() if k != "ss_training_comment")
        console.print(f"[bold]training:[/bold] {shown}")
        if training.get("ss_training_comment"):
            console.print(f"  comment: {training['ss_training_comment']}")
    tags = summary.get("tags") or {}
    if tags.get("top"):
        top = ", ".join(f"{tag} ({n})" for tag, n in tags["top"])
        console.print(f"[bold]top tags[/bold] ({tags['distinct']} distinct): {top}")
    modelspec = summary.get("modelspec") or {}
    if modelspec:
        console.print("[bold]modelspec:[/bold] " + ", ".join(f"{k}={v}" for k, v in modelspec.items()))
    if summary.get("merged_from"):
        console.print(f"[bold]merged from:[/bold] {summary['merged_from']}")
    if summary.get("other_keys"):
        console.print(f"[dim]{summary['other_keys']} more metadata entries (--json shows them all)[/dim]")


def _hash_text(entry: Mapping[str, Any]) -> str:
    """``AutoV2 sha256`` of one input, or one per file of a folder input."""
    if entry.get("sha256"):
        return f"AutoV2 {entry.get('autov2') or str(entry['sha256'])[:10]}  [dim]sha256 {entry['sha256']}[/dim]"
    files = entry.get("files")
    if isinstance(files, Mapping) and files:
        return f"{len(files)} weight files: " + ", ".join(
            f"{rel} {h.get('autov2', '?')}" for rel, h in files.items() if isinstance(h, Mapping)
        )
    return "[dim]no hash recorded[/dim]"


_OPTION_NAMES = ("weight", "unet", "text", "blocks", "format")


def render_provenance(console: Console, record: Mapping[str, Any]) -> None:
    """What loratools recorded this file was made from (ops/provenance.py), one line per input."""
    if "unreadable" in record:
        console.print(f"[yellow]provenance:[/yellow] recorded but unreadable: {record['unreadable']}")
        return
    tool = f"{record.get('tool', 'loratools')} {record.get('version', '?')}"
    console.print(f"[bold]provenance:[/bold] {record.get('operation', '?')} by {tool}")
    base = record.get("base")
    if isinstance(base, Mapping):
        console.print(f"  base  {base.get('name', '?')}  {_hash_text(base)}")
    for lora in record.get("loras") or []:
        if not isinstance(lora, Mapping):
            continue
        options = ", ".join(f"{k}={lora[k]}" for k in _OPTION_NAMES if k in lora and lora[k] not in (None, "", {}, []))
        console.print(f"  LoRA  {lora.get('name', '?')}  {options}")
        console.print(f"        {_hash_text(lora)}")
    for source in record.get("inputs") or []:  # a LoRA made by rescale/resize/extract
        if isinstance(source, Mapping):
            console.print(f"  {source.get('role', 'input')}  {source.get('name', '?')}  {_hash_text(source)}")
    recorded = record.get("options")
    if isinstance(recorded, Mapping) and recorded:
        console.print("  options  " + ", ".join(f"{k}={v}" for k, v in recorded.items()))
    previous = record.get("previous")
    if isinstance(previous, Mapping):
        console.print(f"  before that: {previous.get('operation', '?')} by {previous.get('tool', 'loratools')}")


def render_hashes(console: Console, entries: Sequence[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(show_edge=False, header_style="bold", title="hashes", title_justify="left")
    for column in ("file", "AutoV2 (sha256)", "legacy (AutoV1)", "addnet (sshs_model_hash)"):
        table.add_column(column)
    for h in entries:
        table.add_row(
            str(h["path"]).rsplit("/", 1)[-1],
            f"{h['autov2']}  [dim]{h['sha256']}[/dim]",
            h["legacy"],
            f"{h['addnet_short']}  [dim]{h['addnet']}[/dim]" if h.get("addnet") else "-",
        )
    console.print(table)
    for h in entries:
        for check in h.get("checks", []):
            mark = {True: "[green]ok[/green]", False: "[yellow]mismatch[/yellow]", None: "[dim]unchecked[/dim]"}[
                check["ok"]
            ]
            console.print(f"stored {check['key']} {check['stored']}: {mark} ({check['note']})")


def render_keys(console: Console, keys: Iterable[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(show_edge=False, header_style="bold", title="keys", title_justify="left")
    table.add_column("key", overflow="fold")  # raw keys are for copying: never cut with "…"
    table.add_column("shape")
    table.add_column("dtype")
    for k in keys:
        table.add_row(str(k["key"]), "×".join(map(str, k["shape"])) or "scalar", str(k["dtype"]))
    console.print(table)


def summary_line(report: Any) -> str:
    """One line per file for folder inspects."""
    r = report
    if isinstance(r, LoraReport):
        ranks = "/".join(r.ranks) if len(r.ranks) <= 3 else f"{len(r.ranks)} ranks"
        alphas = "/".join(r.alphas) if len(r.alphas) <= 3 else f"{len(r.alphas)} alphas"
        kinds = "+".join(r.kinds) or r.format
        fmt = FORMAT_TITLES.get(r.format, r.format).split(" (")[0]
        warn = " · [yellow]metadata disagrees[/yellow]" if r.family_mismatch else ""
        fit = (r.model or {}).get("fit")
        how = {"names": " (by names; tiny or distilled widths)", "none": " (by names; no family map)"}.get(
            fit or "", ""
        )
        if (r.model or {}).get("kind") == "unknown":
            how = ""
        if r.format == "textual-inversion":
            shown = ", ".join(f"{e.name} {e.vectors}×{e.width}" for e in r.embedding_facts[:3])
            return f"{r.family_title} textual-inversion embeddings · {shown} · {human_bytes(r.file_bytes)}"
        what = "LoRA"
        return (
            f"{r.family_title} {what}{how} · {fmt} · {r.modules} modules {kinds} r{ranks} α{alphas} · "
            f"{human_bytes(r.file_bytes)}{warn}"
        )
    return (
        f"{r.family_title} checkpoint · {r.layout} · {r.variant} · {human_count(r.parameters)} parameters · "
        f"{human_bytes(r.file_bytes)}"
    )
