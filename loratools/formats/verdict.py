"""What model a LoRA is for, as a report: never a reason to refuse a file the readers can parse.

A :class:`ModelVerdict` says which model a file's module names (and, for SD, its shapes) point
to, and how sure that is: an SD family at full size (names and shapes fit), an SD family by names
whose widths fit no full-size model (a tiny or distilled model), a recognised non-SD model by its
names (FLUX.1, SD3/SD3.5), a language-model adapter ("not a diffusion model"), or unknown. The
readers key adapters by canonical SD names when an SD family's names apply, and verbatim in the
file's own dialect otherwise (:data:`VERBATIM`); commands that need a family map (merge, and
conversion between dialects of a non-SD LoRA) say so by name (:func:`needs_family_map`).

Torch-free: census (issue 16) and check (issue 19) reuse it over headers alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache

from ..errors import InputError

# kind
SD = "sd"  # an SD family (names in loratools' tables)
MODEL = "model"  # a recognised non-SD diffusion model, by names
NOT_DIFFUSION = "not-diffusion"  # a language-model (or other non-diffusion) adapter
UNKNOWN = "unknown"

# fit
SHAPES = "shapes"  # names and shapes fit a full-size family
NAMES = "names"  # names fit; shapes were not checked (no full-size model has these widths)
NONE = "none"  # no family map applies

# Adapter keys of a LoRA with no family map keep the file's own module names, in one of these
# dialect namespaces: "kohya" (``lora_unet_double_blocks_0_img_attn_proj``) or "peft" (the dotted
# module path, ``transformer.single_transformer_blocks.12.proj_out``).
VERBATIM = ("kohya", "peft")


@dataclass(frozen=True)
class ModelVerdict:
    """The model a LoRA is for, and how that was told (schema field ``model`` of inspect --json)."""

    kind: str  # sd, model, not-diffusion, unknown
    family: str  # sd1, sd2, sdxl, flux1, sd3, language-model, unknown
    title: str  # "SD 1.x", "FLUX.1", …
    fit: str  # shapes, names, none
    note: str  # one line for people

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @property
    def has_family_map(self) -> bool:
        """Whether loratools' name tables name this LoRA's modules (canonical adapter keys)."""
        return self.fit != NONE


def sd_verdict(family: str, title: str, *, full_size: bool, note: str = "", kind: str = SD) -> ModelVerdict:
    """A family loratools has a map of (SD; ``kind`` MODEL for another one): at full size (names
    and shapes fit), or by names only."""
    if full_size:
        return ModelVerdict(kind, family, title, SHAPES, note or f"{title}: names and shapes fit")
    return ModelVerdict(
        kind,
        family,
        title,
        NAMES,
        note or f"{title} names; widths fit no full-size {title} — a tiny or distilled model",
    )


# --- non-SD models by their module names ----------------------------------------------------------

_FLUX = re.compile(
    r"(^|[._])(single_transformer_blocks|double_blocks|single_blocks)([._]\d|$)"
    r"|^lora_unet_(double|single)_blocks_"
)
_SD3 = re.compile(r"(^|[._])joint_blocks[._]\d")
_TRANSFORMER_BLOCKS = re.compile(r"(^|[._])transformer_blocks[._]\d")
_SD_UNET = re.compile(r"(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]")
# language models: HF module paths of BERT/RoBERTa, Llama/Mistral/Qwen, GPT-2, OPT/BART, T5, …
_LANGUAGE = re.compile(
    r"(^|\.)(roberta|bert|deberta|distilbert|electra|albert|xlm_roberta)\.(encoder|embeddings)\."
    r"|(^|\.)model\.layers\.\d+\.(self_attn|mlp)\."
    r"|(^|\.)transformer\.h\.\d+\.(attn|mlp)\."
    r"|(^|\.)model\.(decoder|encoder)\.layers\.\d+\."
    r"|(^|\.)(encoder|decoder)\.block\.\d+\.layer\."
    r"|(^|\.)lm_head$"
)
FLUX_TITLE = "FLUX.1"
SD3_TITLE = "SD3/SD3.5"


# The same rules over every name at once, the names joined one a line. ``re`` finds a pattern
# that starts with a literal at C speed, but one that starts with ``(^|[._])`` is tried at every
# position (~1 ms per pattern, 4–9 ms for the language one, on an SDXL LoRA's names): so each
# rule is its pattern without that prefix, every match of which has its preceding character
# checked (a line start, or one of the allowed ones). Exact while no name holds a newline; a name
# that does takes the per-name path. The result depends on the names alone and layouts repeat
# across files (every sd-scripts SDXL LoRA of one network shape has the same names), so it is
# cached per name tuple.
# (literals one of which every match holds, the pattern without its ``(^|[…])`` prefix, the
# characters allowed before a match besides a line start)
_Rule = tuple[tuple[str, ...], re.Pattern[str], str]
_FLUX_RULES: tuple[_Rule, ...] = (
    (
        ("single_transformer_blocks", "double_blocks", "single_blocks"),
        re.compile(r"(single_transformer_blocks|double_blocks|single_blocks)([._]\d|$)", re.MULTILINE),
        "._",
    ),
    (("lora_unet_",), re.compile(r"lora_unet_(double|single)_blocks_", re.MULTILINE), ""),
)
_SD3_RULES: tuple[_Rule, ...] = ((("joint_blocks",), re.compile(r"joint_blocks[._]\d", re.MULTILINE), "._"),)
_LANGUAGE_RULES: tuple[_Rule, ...] = (
    (
        ("bert.", "electra."),  # "bert." is in roberta, deberta, distilbert, albert, xlm_roberta
        re.compile(r"(roberta|bert|deberta|distilbert|electra|albert|xlm_roberta)\.(encoder|embeddings)\.", re.M),
        ".",
    ),
    (("model.layers.",), re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.", re.MULTILINE), "."),
    (("transformer.h.",), re.compile(r"transformer\.h\.\d+\.(attn|mlp)\.", re.MULTILINE), "."),
    (("model.decoder.", "model.encoder."), re.compile(r"model\.(decoder|encoder)\.layers\.\d+\.", re.M), "."),
    (("coder.block.",), re.compile(r"(encoder|decoder)\.block\.\d+\.layer\.", re.MULTILINE), "."),
    (("lm_head",), re.compile(r"lm_head$", re.MULTILINE), "."),
)
# a line holding transformer_blocks (at its start or after . or _) and none of the SD U-Net's
# block names: _TRANSFORMER_BLOCKS and not _SD_UNET, per line (only run when the literal is there)
_NON_UNET_TRANSFORMER_LINE = re.compile(
    rf"^(?![^\n]*{_SD_UNET.pattern})(?:[^\n]*[._])?transformer_blocks[._]\d", re.MULTILINE
)
_BY_WIDTH = "by width"  # names leave FLUX.1 or SD3 open: Flux's 3072 width decides


def _matches(rules: tuple[_Rule, ...], text: str) -> bool:
    """Whether a rule's pattern matches ``text`` at a line start or after one of its characters
    (``(^|[…])pattern`` per line), every position considered; skipped when none of its literals
    is in the text."""
    for needles, pattern, before in rules:
        if not any(n in text for n in needles):
            continue
        match = pattern.search(text)
        while match is not None:
            at = match.start()
            if at == 0 or text[at - 1] == "\n" or text[at - 1] in before:
                return True
            match = pattern.search(text, at + 1)
    return False


def model_by_names(modules: Iterable[str], widths: Iterable[int] = ()) -> ModelVerdict | None:
    """A recognised non-SD model from module names (and, where names alone cannot tell, widths).

    FLUX.1: ``single_transformer_blocks``/``double_blocks``/``single_blocks``
    (diffusers ``FluxTransformer2DModel``; BFL and ComfyUI ``double_blocks``; kohya
    ``lora_unet_double_blocks_``). SD3/SD3.5: SGM ``joint_blocks``, or diffusers
    ``transformer_blocks`` beside ``context_embedder`` (``SD3Transformer2DModel``) — Flux's double
    blocks share that name, so a file holding only ``transformer_blocks`` is FLUX.1 at Flux's
    3072 width and SD3 otherwise. None when the names are SD's or unknown. ``widths`` is read
    only when the names leave FLUX.1 or SD3 open (it may be a lazy iterable).
    """
    found = _verdict_of_names(tuple(modules))
    if found is _BY_WIDTH:
        return _FLUX_BY_WIDTH if 3072 in set(widths) else _SD3_BY_TRANSFORMER_BLOCKS
    return found  # type: ignore[return-value]


@lru_cache(maxsize=32)
def _verdict_of_names(names: tuple[str, ...]) -> ModelVerdict | str | None:
    text = "\n".join(names)
    if text.count("\n") != max(len(names) - 1, 0):  # a name holds a newline
        return _model_by_each_name(list(names))
    if _matches(_FLUX_RULES, text):
        return _FLUX_BY_NAMES
    if _matches(_SD3_RULES, text):
        return _SD3_BY_JOINT_BLOCKS
    if "transformer_blocks" in text and _NON_UNET_TRANSFORMER_LINE.search(text):
        return _SD3_BY_TRANSFORMER_BLOCKS if "context_embedder" in text else _BY_WIDTH
    if _matches(_LANGUAGE_RULES, text):
        return _LANGUAGE_VERDICT
    return None


def clear_name_caches() -> None:
    """Forget the names-only verdicts (benchmarks measure a first-seen layout with it)."""
    _verdict_of_names.cache_clear()


def _model_by_each_name(names: list[str]) -> ModelVerdict | str | None:
    """:func:`_verdict_of_names` one name at a time (names holding newlines)."""
    if any(_FLUX.search(n) for n in names):
        return _FLUX_BY_NAMES
    if any(_SD3.search(n) for n in names):
        return _SD3_BY_JOINT_BLOCKS
    if any(_TRANSFORMER_BLOCKS.search(n) and not _SD_UNET.search(n) for n in names):
        return _SD3_BY_TRANSFORMER_BLOCKS if any("context_embedder" in n for n in names) else _BY_WIDTH
    if any(_LANGUAGE.search(n) for n in names):
        return _LANGUAGE_VERDICT
    return None


_LANGUAGE_VERDICT = ModelVerdict(
    NOT_DIFFUSION, "language-model", "a language model", NONE, "not a diffusion model: a language-model adapter"
)
_FLUX_BY_NAMES = ModelVerdict(MODEL, "flux1", FLUX_TITLE, NONE, "FLUX.1 by its module names")
_FLUX_BY_WIDTH = ModelVerdict(MODEL, "flux1", FLUX_TITLE, NONE, "FLUX.1 by its module names and its 3072 width")
_SD3_BY_JOINT_BLOCKS = ModelVerdict(MODEL, "sd3", SD3_TITLE, NONE, "SD3/SD3.5 by its module names (joint_blocks)")
_SD3_BY_TRANSFORMER_BLOCKS = ModelVerdict(
    MODEL, "sd3", SD3_TITLE, NONE, "SD3/SD3.5 by its module names (transformer_blocks)"
)


def unknown_verdict(sample: Iterable[str]) -> ModelVerdict:
    """No family loratools knows: the modules are read and kept by their own names."""
    first = ", ".join(list(sample)[:2])
    return ModelVerdict(UNKNOWN, "unknown", "unknown model", NONE, f"unknown model (modules such as {first})")


def config_verdict(config: Mapping[str, object]) -> ModelVerdict | None:
    """A peft adapter_config.json whose task type names a language task."""
    task = config.get("task_type")
    if isinstance(task, str) and task.upper() in {
        "CAUSAL_LM",
        "SEQ_CLS",
        "SEQ_2_SEQ_LM",
        "TOKEN_CLS",
        "QUESTION_ANS",
        "FEATURE_EXTRACTION",
    }:
        return ModelVerdict(
            NOT_DIFFUSION,
            "language-model",
            "a language model",
            NONE,
            f"not a diffusion model: a peft {task} adapter"
            + (f" for {config['base_model_name_or_path']}" if config.get("base_model_name_or_path") else ""),
        )
    return None


def needs_family_map(verdict: ModelVerdict, what: str) -> InputError:
    """The one refusal a LoRA without a family map gets: the operation that needs one, by name."""
    return InputError(
        f"{what} needs a {verdict.title} family map, which loratools lacks ({verdict.note})",
        hint="rescale, resize, blend, diff, inspect and convert within the same dialect work on it",
    )


def is_flux_lora(keys: list[str]) -> bool:
    """Keys that only FLUX.1 LoRAs use (BFL or FLUX.1-diffusers module names, any dialect)."""
    # substring tests over all keys at once: a needle holds no newline, so it is found in the
    # joined text exactly when some key holds it; only the two-part test needs the keys one by one
    text = "\n".join(keys)
    if any(needle in text for needle in _FLUX_ONLY):
        return True
    return "transformer_blocks" in text and any(n in text for n in _FLUX_DOUBLE) and _is_flux_by_each_key(keys)


# module names only FLUX.1 (and its T5 text encoder: no SD family has one) uses
_FLUX_ONLY = ("double_blocks", "single_blocks", "single_transformer_blocks", "SelfAttention", "DenseReluDense")
# double-stream names FLUX.1 shares with SD3: the reader's shape check decides (None if no fit)
_FLUX_DOUBLE = ("add_q_proj", "to_add_out", "ff_context", "norm1_context")


def _is_flux_by_each_key(keys: list[str]) -> bool:
    """:func:`is_flux_lora`'s rule one key at a time (its reference)."""
    return any(
        ("double_blocks" in k or "single_blocks" in k or "single_transformer_blocks" in k)
        or ("transformer_blocks" in k and any(n in k for n in _FLUX_DOUBLE))
        or "SelfAttention" in k
        or "DenseReluDense" in k
        for k in keys
    )
