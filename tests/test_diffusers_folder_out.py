"""A single file written as a diffusers folder is a loadable pipeline (issue 14 item 2).

The scheduler config comes from the family data (docs/FORMATS.md §5.6) and is checked against
diffusers itself: the class named in model_index.json loads it with ``from_pretrained``, and its
config equals the scheduler diffusers' own single-file loader builds for a checkpoint of that
family (``load_single_file_sub_model`` on the real key set's shapes). Tokenizers cannot be made
from weights: the report says so, and ``--tokenizers-from`` copies them verbatim, after which
``StableDiffusionPipeline``/``StableDiffusionXLPipeline.from_pretrained`` loads the folder.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import FAMILY_NAMES, keyset_shapes
from helpers_preserve import make_pipeline_files, tokenizer_folder

from loratools.cli.main import cli
from loratools.errors import InputError
from loratools.formats.io import save_lora
from loratools.ops.checkpoint import convert_checkpoint
from loratools.synthetic import TINY, make_lora, write_checkpoint

REAL_KEYSET = {"sd1": "sd15-ldm", "sd2": "sd21-ldm", "sdxl": "sdxl-sgm"}
NEEDED = {"sd1": ("tokenizer",), "sd2": ("tokenizer",), "sdxl": ("tokenizer", "tokenizer_2")}
# The LDM training schedule as the original configs give it (CompVis/stable-diffusion:
# configs/stable-diffusion/v1-inference.yaml, Stability-AI/stablediffusion: v2-inference-v.yaml):
# what diffusers' legacy single-file path reads betas from.
ORIGINAL_CONFIG = {"model": {"params": {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}}}


@pytest.fixture(scope="module")
def singles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("singles")
    return {f: write_checkpoint(TINY[f], root / f"{f}.safetensors", "single") for f in FAMILY_NAMES}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding tokenizer/ and tokenizer_2/ built from a tiny local vocabulary."""
    root = tmp_path_factory.mktemp("tokenizers")
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer_folder(root / name)
    return root


def _diffusers_scheduler(family: str, cls: str, **kwargs: object) -> dict[str, object]:
    """The scheduler diffusers' single-file loader makes for a real checkpoint of ``family``."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders import single_file_utils
    from diffusers.loaders.single_file import load_single_file_sub_model

    checkpoint = {k: torch.empty(shape, device="meta") for k, (shape, _) in keyset_shapes(REAL_KEYSET[family]).items()}
    saved = copy.deepcopy(single_file_utils.SCHEDULER_DEFAULT_CONFIG)  # diffusers writes into its module default
    try:
        scheduler = load_single_file_sub_model(
            "diffusers",
            cls,
            "scheduler",
            checkpoint,
            diffusers.pipelines,
            False,
            None,
            original_config=ORIGINAL_CONFIG,
            is_legacy_loading=True,
            **kwargs,
        )
    finally:
        single_file_utils.SCHEDULER_DEFAULT_CONFIG.clear()
        single_file_utils.SCHEDULER_DEFAULT_CONFIG.update(saved)
    return _init_config(scheduler)


def _init_config(scheduler: object) -> dict[str, object]:
    """The scheduler's config restricted to its constructor's arguments (what it runs with)."""
    params = inspect.signature(type(scheduler).__init__).parameters
    return {k: v for k, v in scheduler.config.items() if k in params}  # type: ignore[attr-defined]


def _load_ours(folder: Path) -> tuple[str, dict[str, object]]:
    diffusers = pytest.importorskip("diffusers")
    library, cls = json.loads((folder / "model_index.json").read_text())["scheduler"]
    assert library == "diffusers"
    scheduler = getattr(diffusers, cls).from_pretrained(str(folder), subfolder="scheduler")
    return cls, _init_config(scheduler)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_scheduler_equals_diffusers_single_file(singles: dict[str, Path], tmp_path: Path, family: str) -> None:
    report = convert_checkpoint(singles[family], tmp_path / "out", layout="diffusers")
    cls, ours = _load_ours(tmp_path / "out")
    assert cls == {"sd1": "PNDMScheduler", "sd2": "DDIMScheduler", "sdxl": "EulerDiscreteScheduler"}[family]
    assert ours == _diffusers_scheduler(family, cls)
    names = " and ".join(f"{n}/" for n in NEEDED[family])
    assert f"{names} cannot be made from weights; pass --tokenizers-from FOLDER" in report.notes
    assert not any((tmp_path / "out" / n).exists() for n in ("tokenizer", "tokenizer_2"))


@pytest.mark.parametrize(
    ("family", "declared", "cls", "prediction"),
    [
        ("sd2", "epsilon", "PNDMScheduler", "epsilon"),  # 2.x-base: its own hub file
        ("sd2", "v", "DDIMScheduler", "v_prediction"),
        ("sd1", "v", "PNDMScheduler", "v_prediction"),  # no v entry: the default with the declared type
    ],
)
def test_declared_prediction_type_picks_the_scheduler(
    tmp_path: Path, family: str, declared: str, cls: str, prediction: str
) -> None:
    single = write_checkpoint(
        TINY[family], tmp_path / "in.safetensors", "single", metadata={"modelspec.prediction_type": declared}
    )
    convert_checkpoint(single, tmp_path / "out", layout="diffusers")
    got_cls, ours = _load_ours(tmp_path / "out")
    assert (got_cls, ours["prediction_type"]) == (cls, prediction)
    assert ours == _diffusers_scheduler(family, cls, prediction_type=prediction)


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tokenizers_from_a_diffusers_folder_are_copied_verbatim(
    singles: dict[str, Path], tmp_path: Path, family: str
) -> None:
    """A whole diffusers folder as the source: only its tokenizers come over, byte for byte, with
    the classes its model_index.json names."""
    hub = write_checkpoint(TINY[family], tmp_path / "hub", "diffusers")
    make_pipeline_files(hub, TINY[family])
    index = json.loads((hub / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "CLIPTokenizerFast"]
    (hub / "model_index.json").write_text(json.dumps(index))
    convert_checkpoint(singles[family], tmp_path / "out", layout="diffusers", tokenizers_from=hub)
    for name in NEEDED[family]:
        assert _hashes(tmp_path / "out" / name) == _hashes(hub / name)
    assert not (tmp_path / "out" / "feature_extractor").exists()  # not a tokenizer: not taken
    out_index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert out_index["tokenizer"] == ["transformers", "CLIPTokenizerFast"]


def test_missing_tokenizer_is_refused_before_writing(singles: dict[str, Path], tmp_path: Path) -> None:
    only_one = tmp_path / "tok"
    tokenizer_folder(only_one / "tokenizer")
    with pytest.raises(InputError, match=r"no tokenizer_2/ in it \(SDXL needs tokenizer/ and tokenizer_2/\)"):
        convert_checkpoint(singles["sdxl"], tmp_path / "out", layout="diffusers", tokenizers_from=only_one)
    assert not (tmp_path / "out").exists()


def test_tokenizers_from_needs_a_new_folder(singles: dict[str, Path], tokenizers: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="only when a single file is written as a diffusers folder"):
        convert_checkpoint(singles["sd1"], tmp_path / "out.safetensors", dtype="fp16", tokenizers_from=tokenizers)
    assert not (tmp_path / "out.safetensors").exists()


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


@pytest.mark.parametrize("command", ["convert", "merge"])
def test_cli_says_it_in_one_line(singles: dict[str, Path], tokenizers: Path, tmp_path: Path, command: str) -> None:
    line = "tokenizer/ and tokenizer_2/ cannot be made from weights; pass --tokenizers-from FOLDER"
    base = str(singles["sdxl"])
    if command == "convert":
        head = ["convert", base]
    else:
        lora = save_lora(make_lora(TINY["sdxl"]), tmp_path / "lora.safetensors", "kohya")
        head = ["merge", base, str(lora), "-o"]
    code, text = _run(*head, str(tmp_path / "human"), "--to", "diffusers")
    assert code == 0 and line in " ".join(text.split())  # rich may wrap the line on a narrow terminal
    code, text = _run(*head, str(tmp_path / "json"), "--to", "diffusers", "--json")
    assert code == 0 and line in json.loads(text)["notes"]
    code, text = _run(*head, str(tmp_path / "tok"), "--to", "diffusers", "--tokenizers-from", str(tokenizers), "--json")
    assert code == 0 and not any("cannot be made" in n for n in json.loads(text)["notes"])
    code, text = _run(*head, str(tmp_path / "bad"), "--to", "diffusers", "--tokenizers-from", str(tmp_path / "nope"))
    assert code != 0 and "not a folder" in text and "Traceback" not in text and len(text.strip().splitlines()) == 1


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_converted_tiny_file_loads_as_a_pipeline(
    singles: dict[str, Path], tokenizers: Path, tmp_path: Path, family: str
) -> None:
    """A single file whose widths are not full size becomes a folder diffusers builds: group and
    head counts the widths cannot hold are replaced (and said), every weight lands where it was."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    report = convert_checkpoint(singles[family], tmp_path / "out", layout="diffusers", tokenizers_from=tokenizers)
    assert any("GroupNorm groups 8 (not 32)" in n for n in report.notes)
    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    for component in ("unet", "vae", "text_encoder"):
        written = load_file(next((tmp_path / "out" / component).glob("*.safetensors")))
        loaded = getattr(pipe, component).state_dict()
        # transformers 5 keeps CLIP's weights without the text_model. prefix the files use
        names = {k: k if k in loaded else k.removeprefix("text_model.") for k in written}
        assert set(names.values()) <= set(loaded)
        assert all(torch.equal(loaded[names[k]], v) for k, v in written.items())


def _bfl_schedule(steps: int, seq_len: int, shift: bool) -> list[float]:
    """BFL's own sampling schedule, from black-forest-labs/flux:src/flux/sampling.py (get_schedule,
    get_lin_function, time_shift): linspace(1, 0, steps + 1), shifted for every model but schnell."""
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    if shift:
        slope = (1.15 - 0.5) / (4096 - 256)
        mu = slope * seq_len + (0.5 - slope * 256)
        t = torch.exp(torch.tensor(mu, dtype=torch.float64)) / (torch.exp(torch.tensor(mu)) + (1 / t - 1))
    return t.tolist()


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_folder_scheduler_samples_bfl_schedule(tmp_path: Path, variant: str) -> None:
    """The scheduler a FLUX.1 single file gets is chosen by the variant its weights show, and the
    sigmas diffusers' FluxPipeline makes from it equal BFL's sampler's."""
    pytest.importorskip("diffusers")
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    from loratools.synthetic import TINY_FLUX

    single = write_checkpoint(TINY_FLUX[variant], tmp_path / "flux.safetensors", "single")
    report = convert_checkpoint(single, tmp_path / "out", layout="diffusers")
    assert not any("no scheduler" in n for n in report.notes)
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tmp_path / "out"), subfolder="scheduler")
    steps = 4 if variant == "schnell" else 28
    for seq_len in (256, 1024, 4096):  # 512², 1024², 2048² images in 2×2-packed latent tokens
        c = scheduler.config
        mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        ours = scheduler.sigmas.double().tolist()
        assert ours == pytest.approx(_bfl_schedule(steps, seq_len, shift=variant == "dev"), abs=1e-6)
