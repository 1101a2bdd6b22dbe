"""``loratools demo``: the main jobs, end to end, on a generated sample model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
from rich.console import Console
from rich.rule import Rule

from ..io.checkpoint import open_checkpoint
from ..ops.checkpoint import convert_checkpoint
from ..report import inspect_checkpoint
from .errors import user_errors
from .render import render_checkpoint


@click.command()
@click.option(
    "--keep",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write the sample files here (kept) instead of a temporary folder.",
)
def demo(keep: Path | None) -> None:
    """Run loratools end to end on a generated sample SD1.5 checkpoint.

    Generates a small checkpoint with the real SD1.5 key set (1145 tensors, tiny widths) in a
    temporary folder, inspects it, converts it to a diffusers folder and back (bit for bit), converts
    a LoCon LoRA through diffusers and peft and back (bit for bit), merges two LoRAs into the
    checkpoint (one with block weights and a negative U-Net weight) and unmerges them again, and
    resizes a LoCon by SVD in factor space (checked against a dense SVD).
    """
    console = Console()
    with user_errors():
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            _run(console, keep)
        else:
            with tempfile.TemporaryDirectory(prefix="loratools-demo-") as tmp:
                _run(console, Path(tmp))


def _run(console: Console, folder: Path) -> None:
    from ..synthetic import TINY, make_lora, write_checkpoint

    spec = TINY["sd1"]
    console.print(Rule("1. a sample SD1.5 checkpoint (real key set, tiny widths)"))
    single = write_checkpoint(spec, folder / "sample-sd15.safetensors", "single", overwrite=True)
    render_checkpoint(console, inspect_checkpoint(single))

    console.print(Rule("2. convert: single file → diffusers folder → single file"))
    as_folder = folder / "sample-sd15-diffusers"
    report = convert_checkpoint(single, as_folder, layout="diffusers", overwrite=True)
    console.print(
        f"{single.name} → {as_folder.name}/: {report.tensors_written} tensors"
        f" ({len(report.dropped)} single-file-only tensors (schedule, EMA, position_ids) have no diffusers home)"
    )
    back = folder / "sample-sd15-roundtrip.safetensors"
    report = convert_checkpoint(as_folder, back, layout="single", overwrite=True)
    console.print(f"{as_folder.name}/ → {back.name}: {report.tensors_written} tensors")
    with open_checkpoint(single) as a, open_checkpoint(back) as b:
        same = sum(a.read(k).equal(b.read(k)) for k in b)
    verdict = "[green]bit-exact[/green]" if same == len(b) else "[red]DIFFERENT[/red]"
    console.print(f"round trip: {same}/{len(b)} tensors {verdict}")
    if same != len(b):
        raise click.ClickException("round trip changed tensors")
    console.print(Rule("3. a LoRA: kohya → diffusers → peft → kohya"))
    from ..formats.io import load_lora, save_lora
    from ..ops.convert import convert_lora
    from ..report import inspect_lora
    from .render import render_lora

    lora = make_lora(spec, rank=4, alphas="varied", conv=True)
    kohya = save_lora(lora, folder / "sample-lora.safetensors", "kohya", overwrite=True)
    shown = inspect_lora(kohya)  # no --family: the family is a report (tiny widths: by names)
    render_lora(console, shown)
    console.print(f"$ loratools inspect {kohya.name}  →  model: {shown.model['note']}", highlight=False)
    diffusers = folder / "sample-lora-diffusers.safetensors"
    convert_lora(kohya, diffusers, "diffusers", family=spec, overwrite=True)
    peft_folder = folder / "sample-lora-peft"
    convert_lora(diffusers, peft_folder, "peft", family=spec, overwrite=True)
    back = folder / "sample-lora-roundtrip.safetensors"
    convert_lora(peft_folder, back, "kohya", family=spec, overwrite=True)
    first, second = load_lora(kohya, spec), load_lora(back, spec)
    exact = all(
        a.kind == b.kind
        and a.alpha == b.alpha
        and a.tensors().keys() == b.tensors().keys()
        and all(t.equal(b.tensors()[k]) for k, t in a.tensors().items())
        for m, a in first.adapters.items()
        for b in [second.adapters[m]]
    )
    verdict = "[green]factors and alphas bit-exact[/green]" if exact else "[red]CHANGED[/red]"
    console.print(
        f"{len(first.adapters)} LoCon modules with per-module alphas, through diffusers and peft and back: {verdict}"
    )
    if not exact:
        raise click.ClickException("LoRA round trip changed factors")

    console.print(Rule("4. merge the LoRA into the checkpoint, then unmerge it"))
    from ..ops.merge import LoraInput, merge, unmerge
    from .merge_cmd import render_merge

    merged = folder / "sample-sd15-merged.safetensors"
    loras = [LoraInput(kohya, 0.8), LoraInput(diffusers, unet=-0.3, text=0.0, blocks="OUTALL")]
    render_merge(console, merge(single, loras, merged, verify=16, overwrite=True))
    restored = folder / "sample-sd15-restored.safetensors"
    unmerged = unmerge(merged, loras, restored, base=single, overwrite=True)
    render_merge(console, unmerged)
    worst = max(stats["relative"] for stats in unmerged.residual.values())
    if worst > 1e-6:
        raise click.ClickException(f"unmerge left a relative residual of {worst:.3g}")

    console.print(Rule("5. resize a LoCon: rank 8 → 4, and dynamically (sv-fro 0.9)"))
    from .rank_cmds import demo_resize

    demo_resize(folder, console)
    console.print(Rule())
    console.print(
        f"done; sample files in {folder}" if folder.name and not folder.name.startswith("loratools-demo-") else "done"
    )
