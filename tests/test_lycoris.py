"""LyCORIS algorithms: ΔW of LoRA/LoCon/Tucker, LoHa, LoKr, full diff and DoRA; the real LoKr files.

The expected ΔW of every hand-built case is written out independently with explicit loops over
numpy float64 arrays (never with the einsum/kron/matmul the code under test uses), and each
formula is cross-checked against the function named in the test's docstring. Where the PyPI
package ``lycoris-lora`` is installed, its modules' *forward* (not its merge, which squares the
LoHa/LoKr scale: docs/FORMATS.md §4.8) is the oracle for files it writes itself.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REAL_LORAS, needs_real
from safetensors.torch import load_file, save_file

from loratools.errors import InputError
from loratools.formats.adapters import Full, LoHa, LoKr, LowRank, apply_dora
from loratools.formats.io import load_lora, save_lora
from loratools.formats.kohya import read_kohya
from loratools.formats.lycoris import adapter_from_params, adapter_params
from loratools.formats.names import name_tables
from loratools.synthetic import TINY

LOKR_FILES = REAL_LORAS / "lycoris_lokr"
ATOL = 1e-5


def _t(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Matrix product by explicit loops."""
    out = np.zeros((a.shape[0], b.shape[1]))
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            out[i, j] = sum(a[i, k] * b[k, j] for k in range(a.shape[1]))
    return out


def _kron2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Kronecker product of two matrices by explicit loops: K[i·p+j, k·q+l] = a[i,k]·b[j,l]."""
    p, q = b.shape
    out = np.zeros((a.shape[0] * p, a.shape[1] * q))
    for i, k, j, m in itertools.product(range(a.shape[0]), range(a.shape[1]), range(p), range(q)):
        out[i * p + j, k * q + m] = a[i, k] * b[j, m]
    return out


def _tucker(t: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """M[p,q,h,w] = Σ_{i,j} t[i,j,h,w]·a[i,p]·b[j,q] by explicit loops."""
    r1, r2, kh, kw = t.shape
    out = np.zeros((a.shape[1], b.shape[1], kh, kw))
    for p, q, h, w in itertools.product(range(a.shape[1]), range(b.shape[1]), range(kh), range(kw)):
        out[p, q, h, w] = sum(t[i, j, h, w] * a[i, p] * b[j, q] for i in range(r1) for j in range(r2))
    return out


def _close(actual: torch.Tensor, expected: np.ndarray) -> None:
    assert tuple(actual.shape) == expected.shape
    assert actual.dtype == torch.float32
    np.testing.assert_allclose(actual.numpy(), expected, atol=ATOL, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# LoRA / LoCon / Tucker


def test_lora_linear() -> None:
    """ΔW = alpha/r · up @ down. Cross-checked: LyCORIS lycoris/functional/locon.py (diff_weight),
    lycoris/modules/locon.py (LoConModule.make_weight); ComfyUI comfy/weight_adapter/lora.py
    (LoRAAdapter.calculate_weight), comfy/lora.py (calculate_weight)."""
    up, down = _t(6, 2, seed=1), _t(2, 5, seed=2)
    adapter = adapter_from_params(
        "m", {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(3.0)}, (6, 5), []
    )
    assert adapter.rank == 2 and adapter.scale == 1.5
    _close(adapter.delta(), 1.5 * _mm(_np(up), _np(down)))


@pytest.mark.parametrize("kernel", [1, 3])
def test_locon_conv(kernel: int) -> None:
    """LoCon: down (r, in, k, k), up (out, r, 1, 1); ΔW[o,i,h,w] = alpha/r · Σ_m up[o,m]·down[m,i,h,w].
    Cross-checked: LyCORIS lycoris/modules/locon.py (LoConModule.make_weight: diff_weight(...).view(shape));
    ComfyUI comfy/weight_adapter/lora.py (calculate_weight: mm of flattened up/down, reshape to weight)."""
    up, down = _t(4, 3, 1, 1, seed=3), _t(3, 2, kernel, kernel, seed=4)
    adapter = adapter_from_params(
        "m", {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0)}, (4, 2, kernel, kernel), []
    )
    u, d = _np(up), _np(down)
    expected = np.zeros((4, 2, kernel, kernel))
    for o, i, h, w in itertools.product(range(4), range(2), range(kernel), range(kernel)):
        expected[o, i, h, w] = sum(u[o, m, 0, 0] * d[m, i, h, w] for m in range(3)) / 3
    _close(adapter.delta(), expected)


def test_lora_tucker_mid() -> None:
    """Tucker LoCon: down (r, in, 1, 1), mid (r, r, kh, kw), up (out, r, 1, 1);
    ΔW[o,i,h,w] = alpha/r · Σ_{m,n} up[o,m]·mid[m,n,h,w]·down[n,i]. Cross-checked: LyCORIS
    lycoris/functional/general.py (rebuild_tucker) as called by lycoris/functional/locon.py
    (_diff_weight: rebuild_tucker(mid, up.T, down)); ComfyUI comfy/weight_adapter/base.py
    (tucker_weight_from_conv), comfy/weight_adapter/lora.py (calculate_weight, "lora_mid")."""
    up, mid, down = _t(5, 2, 1, 1, seed=5), _t(2, 2, 3, 2, seed=6), _t(2, 4, 1, 1, seed=7)
    params = {"lora_up.weight": up, "lora_mid.weight": mid, "lora_down.weight": down, "alpha": torch.tensor(4.0)}
    adapter = adapter_from_params("m", params, (5, 4, 3, 2), [])
    u, m, d = _np(up)[:, :, 0, 0], _np(mid), _np(down)[:, :, 0, 0]
    expected = np.zeros((5, 4, 3, 2))
    for o, i, h, w in itertools.product(range(5), range(4), range(3), range(2)):
        expected[o, i, h, w] = 2.0 * sum(u[o, a] * m[a, b, h, w] * d[b, i] for a in range(2) for b in range(2))
    _close(adapter.delta(), expected)


# --------------------------------------------------------------------------------------------
# LoHa


def test_loha_linear() -> None:
    """ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha/r, r = hada_w1_b.shape[0]. Cross-checked: LyCORIS
    lycoris/functional/loha.py (HadaWeight.forward, diff_weight); ComfyUI comfy/weight_adapter/loha.py
    (LoHaAdapter.calculate_weight: alpha / w1b.shape[0])."""
    w1a, w1b, w2a, w2b = _t(6, 3, seed=8), _t(3, 5, seed=9), _t(6, 3, seed=10), _t(3, 5, seed=11)
    params = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": torch.tensor(1.5)}
    adapter = adapter_from_params("m", params, (6, 5), [])
    assert isinstance(adapter, LoHa) and adapter.rank == 3
    expected = _mm(_np(w1a), _np(w1b)) * _mm(_np(w2a), _np(w2b)) * 0.5
    _close(adapter.delta(), expected)


def test_loha_conv_flattened() -> None:
    """Conv LoHa without Tucker: w?_b (r, in·kh·kw), the product reshaped row-major to (out, in, kh, kw).
    Cross-checked: LyCORIS lycoris/modules/loha.py (LohaModule.__init__ w_shape = (out, in·k), get_weight
    reshape(shape)); ComfyUI comfy/weight_adapter/loha.py (calculate_weight: (m1*m2).reshape(weight.shape))."""
    w1a, w1b, w2a, w2b = _t(4, 2, seed=12), _t(2, 3 * 9, seed=13), _t(4, 2, seed=14), _t(2, 3 * 9, seed=15)
    params = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": torch.tensor(2.0)}
    adapter = adapter_from_params("m", params, (4, 3, 3, 3), [])
    flat = _mm(_np(w1a), _np(w1b)) * _mm(_np(w2a), _np(w2b))
    expected = np.zeros((4, 3, 3, 3))
    for o, i, h, w in itertools.product(range(4), range(3), range(3), range(3)):
        expected[o, i, h, w] = flat[o, i * 9 + h * 3 + w]
    _close(adapter.delta(), expected)


def test_loha_tucker() -> None:
    """Tucker LoHa: w?_a (r, out), w?_b (r, in), t? (r, r, kh, kw);
    M?[p,q,h,w] = Σ_{i,j} t?[i,j,h,w]·a?[i,p]·b?[j,q], ΔW = M1 ⊙ M2 · alpha/r. Cross-checked: LyCORIS
    lycoris/functional/loha.py (HadaWeightTucker.forward: einsum "i j ..., j r, i p -> p r ..."
    with (t, w_b, w_a)); ComfyUI comfy/weight_adapter/loha.py (calculate_weight, cp decomposition)."""
    t1, t2 = _t(2, 2, 3, 3, seed=16), _t(2, 2, 3, 3, seed=17)
    w1a, w1b, w2a, w2b = _t(2, 5, seed=18), _t(2, 4, seed=19), _t(2, 5, seed=20), _t(2, 4, seed=21)
    params = {
        "hada_t1": t1,
        "hada_t2": t2,
        "hada_w1_a": w1a,
        "hada_w1_b": w1b,
        "hada_w2_a": w2a,
        "hada_w2_b": w2b,
        "alpha": torch.tensor(1.0),
    }
    adapter = adapter_from_params("m", params, (5, 4, 3, 3), [])
    expected = _tucker(_np(t1), _np(w1a), _np(w1b)) * _tucker(_np(t2), _np(w2a), _np(w2b)) * 0.5
    _close(adapter.delta(), expected)


# --------------------------------------------------------------------------------------------
# LoKr


def _lokr(shape: tuple[int, ...], alpha: float | None, **factors: torch.Tensor) -> LoKr:
    params = {f"lokr_{k}": v for k, v in factors.items()}
    if alpha is not None:
        params["alpha"] = torch.tensor(alpha)
    adapter = adapter_from_params("m", params, shape, [])
    assert isinstance(adapter, LoKr)
    return adapter


def test_lokr_linear_w1_full_w2_lowrank() -> None:
    """ΔW[i·b+j, k·d+l] = w1[i,k]·w2[j,l]·alpha/r, w2 = w2_a @ w2_b, r = w2_b.shape[0]. Cross-checked:
    LyCORIS lycoris/functional/lokr.py (make_kron, _kron_weight), lycoris/modules/lokr.py (LokrModule.get_weight);
    ComfyUI comfy/weight_adapter/lokr.py (LoKrAdapter.calculate_weight: dim = w2_b.shape[0])."""
    w1, w2a, w2b = _t(2, 3, seed=22), _t(4, 2, seed=23), _t(2, 5, seed=24)
    adapter = _lokr((8, 15), 3.0, w1=w1, w2_a=w2a, w2_b=w2b)
    assert adapter.rank == 2 and adapter.scale == 1.5
    _close(adapter.delta(), 1.5 * _kron2(_np(w1), _mm(_np(w2a), _np(w2b))))


def test_lokr_w1_lowrank_w2_full() -> None:
    """w1 = w1_a @ w1_b, w2 full; scale = alpha / w1_b.shape[0]. Cross-checked: LyCORIS
    lycoris/functional/lokr.py (_kron_weight; kernels rank_scale: w1a first); ComfyUI
    comfy/weight_adapter/lokr.py (calculate_weight: dim = w1_b.shape[0])."""
    w1a, w1b, w2 = _t(3, 2, seed=25), _t(2, 2, seed=26), _t(4, 5, seed=27)
    adapter = _lokr((12, 10), 1.0, w1_a=w1a, w1_b=w1b, w2=w2)
    assert adapter.rank == 2
    _close(adapter.delta(), 0.5 * _kron2(_mm(_np(w1a), _np(w1b)), _np(w2)))


def test_lokr_both_lowrank_scale_from_w1() -> None:
    """decompose_both: both halves factored, r taken from w1_b (LyCORIS convention). Cross-checked: LyCORIS
    lycoris/modules/lokr.py (LokrModule.__init__ decompose_both, one lora_dim), functional/lokr.py (_kron_weight);
    ComfyUI comfy/weight_adapter/lokr.py (calculate_weight; same rank in LyCORIS-made files)."""
    w1a, w1b, w2a, w2b = _t(3, 2, seed=28), _t(2, 4, seed=29), _t(5, 2, seed=30), _t(2, 3, seed=31)
    adapter = _lokr((15, 12), 8.0, w1_a=w1a, w1_b=w1b, w2_a=w2a, w2_b=w2b)
    expected = 4.0 * _kron2(_mm(_np(w1a), _np(w1b)), _mm(_np(w2a), _np(w2b)))
    _close(adapter.delta(), expected)


def test_lokr_both_full_scale_one() -> None:
    """Both halves full matrices: scale 1 whatever alpha says. Cross-checked: LyCORIS lycoris/modules/lokr.py
    (LokrModule.__init__: use_w1 and use_w2 ⇒ alpha = lora_dim); ComfyUI comfy/weight_adapter/lokr.py
    (calculate_weight: alpha = 1.0 when dim is None)."""
    w1, w2 = _t(2, 2, seed=32), _t(3, 4, seed=33)
    adapter = _lokr((6, 8), 7.0, w1=w1, w2=w2)
    assert adapter.rank is None and adapter.scale == 1.0
    _close(adapter.delta(), _kron2(_np(w1), _np(w2)))


def _conv_kron(w1: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """ΔW[i·b+j, k·d+l, h, w] = w1[i,k]·w2[j,l,h,w] by explicit loops."""
    a, c = w1.shape
    b, d, kh, kw = w2.shape
    out = np.zeros((a * b, c * d, kh, kw))
    for i, k, j, m, h, w in itertools.product(range(a), range(c), range(b), range(d), range(kh), range(kw)):
        out[i * b + j, k * d + m, h, w] = w1[i, k] * w2[j, m, h, w]
    return out


def test_lokr_conv_old_flat_layout() -> None:
    """Old 2-D conv layout: w2_b (r, d·kh·kw); kron of the two flat factors reshaped to (out, in, kh, kw)
    equals the 4-D kron with w2 = (w2_a @ w2_b) viewed as (b, d, kh, kw). Cross-checked: LyCORIS
    lycoris/modules/lokr.py (LokrModule.__init__ "Conv2d not tucker": w2_b (r, d·k1·k2); get_weight view(shape)),
    lycoris/functional/lokr.py (_kron_weight); ComfyUI comfy/weight_adapter/lokr.py
    (calculate_weight: torch.kron(w1, w2).reshape(weight.shape))."""
    w1, w2a, w2b = _t(2, 3, seed=34), _t(4, 2, seed=35), _t(2, 2 * 9, seed=36)
    adapter = _lokr((8, 6, 3, 3), 2.0, w1=w1, w2_a=w2a, w2_b=w2b)
    w2 = _mm(_np(w2a), _np(w2b)).reshape(4, 2, 3, 3)
    _close(adapter.delta(), _conv_kron(_np(w1), w2))


def test_lokr_conv_oldest_whole_kernel_factorised() -> None:
    """The layout of the real smart_falcon files: in·kh·kw factorised as a whole (w1 (a, c), w2 (b, e) with
    c·e = in·kh·kw and e not a multiple of kh·kw); only kron-then-reshape gives ΔW. Cross-checked: ComfyUI
    comfy/weight_adapter/lokr.py (calculate_weight: torch.kron(w1, w2).reshape(weight.shape)); LyCORIS
    lycoris/modules/lokr.py (get_weight: weight.view(shape))."""
    # out 6 = 2·3, in·k·k = 2·9 = 18 = 3·6 (6 is not a multiple of 9)
    w1a, w1b, w2a, w2b = _t(2, 1, seed=37), _t(1, 3, seed=38), _t(3, 1, seed=39), _t(1, 6, seed=40)
    adapter = _lokr((6, 2, 3, 3), 1.0, w1_a=w1a, w1_b=w1b, w2_a=w2a, w2_b=w2b)
    flat = _kron2(_mm(_np(w1a), _np(w1b)), _mm(_np(w2a), _np(w2b)))
    expected = np.zeros((6, 2, 3, 3))
    for o, i, h, w in itertools.product(range(6), range(2), range(3), range(3)):
        expected[o, i, h, w] = flat[o, i * 9 + h * 3 + w]
    _close(adapter.delta(), expected)


def test_lokr_conv_4d_full_w2() -> None:
    """New 4-D layout, full w2 (b, d, kh, kw): w1 gets two trailing unit axes before kron. Cross-checked:
    LyCORIS lycoris/functional/lokr.py (make_kron: w1.unsqueeze(-1) per extra w2 dim);
    ComfyUI comfy/weight_adapter/lokr.py (calculate_weight: len(w2.shape) == 4 ⇒ w1.unsqueeze(2).unsqueeze(2))."""
    w1, w2 = _t(2, 3, seed=41), _t(3, 2, 3, 3, seed=42)
    adapter = _lokr((6, 6, 3, 3), None, w1=w1, w2=w2)
    _close(adapter.delta(), _conv_kron(_np(w1), _np(w2)))


def test_lokr_conv_4d_w2b_matches_flat() -> None:
    """New 4-D factored layout w2_b (r, d, kh, kw): w2 = (w2_a @ w2_b.view(r, -1)).view(b, d, kh, kw); the same
    numbers stored flat (old layout) give the same ΔW. Cross-checked: LyCORIS lycoris/functional/lokr.py
    (_kron_weight: r, o, *k = w2b.shape; w2a @ w2b.view(r, -1) viewed (-1, o, *k))."""
    w1, w2a, w2b = _t(2, 3, seed=43), _t(4, 2, seed=44), _t(2, 2, 3, 3, seed=45)
    new = _lokr((8, 6, 3, 3), 3.0, w1=w1, w2_a=w2a, w2_b=w2b)
    old = _lokr((8, 6, 3, 3), 3.0, w1=w1, w2_a=w2a, w2_b=w2b.reshape(2, 18))
    w2 = _mm(_np(w2a), _np(w2b).reshape(2, 18)).reshape(4, 2, 3, 3)
    _close(new.delta(), 1.5 * _conv_kron(_np(w1), w2))
    assert torch.equal(new.delta(), old.delta())


def test_lokr_tucker() -> None:
    """Tucker LoKr: w2[j,l,h,w] = Σ_{m,n} t2[m,n,h,w]·w2_a[m,j]·w2_b[n,l], r = w2_b.shape[0]. Cross-checked:
    LyCORIS lycoris/functional/general.py (rebuild_tucker), lycoris/functional/lokr.py (_kron_weight, make_kron);
    ComfyUI comfy/weight_adapter/lokr.py (calculate_weight: einsum 'i j k l, j r, i p -> p r k l' (t2, w2_b, w2_a))."""
    w1, t2, w2a, w2b = _t(2, 2, seed=46), _t(2, 2, 3, 3, seed=47), _t(2, 3, seed=48), _t(2, 4, seed=49)
    adapter = _lokr((6, 8, 3, 3), 1.0, w1=w1, t2=t2, w2_a=w2a, w2_b=w2b)
    _close(adapter.delta(), 0.5 * _conv_kron(_np(w1), _tucker(_np(t2), _np(w2a), _np(w2b))))


def test_lokr_factors_must_fill_weight() -> None:
    """A kron product that cannot be the target weight is an InputError, never a silently unreshaped ΔW."""
    with pytest.raises(InputError, match="ΔW of shape"):
        _lokr((8, 16), 1.0, w1=_t(2, 3, seed=50), w2=_t(4, 5, seed=51))


# --------------------------------------------------------------------------------------------
# Full diff


def test_full_diff() -> None:
    """W' = W + diff, b' = b + diff_b, no alpha. Cross-checked: LyCORIS lycoris/modules/full.py
    (FullModule.custom_state_dict, get_diff_weight); ComfyUI comfy/lora.py (load_lora: "diff" patches)."""
    diff, diff_b = _t(4, 3, 3, 3, seed=52).to(torch.float16), _t(4, seed=53).to(torch.float16)
    adapter = adapter_from_params("m", {"diff": diff, "diff_b": diff_b}, (4, 3, 3, 3), [])
    assert isinstance(adapter, Full) and adapter.scale == 1.0
    _close(adapter.delta(), _np(diff))
    _close(adapter.delta_bias(), _np(diff_b))  # type: ignore[arg-type]
    assert adapter_params(adapter, torch.float16) == {"diff": diff, "diff_b": diff_b}


# --------------------------------------------------------------------------------------------
# DoRA


def _dora_expected(weight: np.ndarray, delta: np.ndarray, magnitude: np.ndarray, axis: str) -> np.ndarray:
    """m ⊙ V / (‖V‖ + eps), V = W + ΔW, norm per output row or per input column, by explicit loops."""
    merged = weight + delta
    eps = float(np.finfo(np.float32).eps)
    out = np.zeros_like(merged)
    flat_m = magnitude.reshape(-1)
    if axis == "out":
        for o in range(merged.shape[0]):
            norm = np.sqrt(sum(float(x) ** 2 for x in merged[o].reshape(-1)))
            out[o] = flat_m[o] * merged[o] / (norm + eps)
    else:
        for i in range(merged.shape[1]):
            norm = np.sqrt(sum(float(x) ** 2 for x in merged[:, i].reshape(-1)))
            out[:, i] = flat_m[i] * merged[:, i] / (norm + eps)
    return out


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv3x3"])
@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora(axis: str, conv: bool) -> None:
    """W' = m ⊙ (W+ΔW)/(‖W+ΔW‖ + eps); dora_scale (out,1[,1,1]) ⇒ per-row norm, (1,in[,1,1]) ⇒ per-column.
    Cross-checked: LyCORIS lycoris/functional/general.py (_weight_decompose: norm + finfo.eps, wd_on_out),
    lycoris/modules/locon.py (LoConModule.__init__ dora_scale shapes, apply_weight_decompose); ComfyUI
    comfy/weight_adapter/base.py (weight_decompose), comfy/lora.py (calculate_weight, dora_scale)."""
    out, inp = 5, 3
    kernel = (3, 3) if conv else ()
    ones = (1,) * len(kernel)
    up = _t(out, 2, *ones, seed=54)
    down = _t(2, inp, *kernel, seed=55)
    weight = _t(out, inp, *kernel, seed=56)
    mag_shape = (out, 1, *ones) if axis == "out" else (1, inp, *ones)
    magnitude = torch.rand(*mag_shape, generator=torch.Generator().manual_seed(57)) + 0.5
    params = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0), "dora_scale": magnitude}
    adapter = adapter_from_params("m", params, tuple(weight.shape), [])
    assert isinstance(adapter, LowRank) and adapter.dora_axis == axis
    delta = adapter.delta()
    _close(apply_dora(weight, adapter), _dora_expected(_np(weight), _np(delta), _np(magnitude), axis))


def test_dora_eps_and_strength() -> None:
    """A zero row of W+ΔW stays zero (eps in the denominator, as LyCORIS' _weight_decompose), not NaN; a
    strength other than 1 is refused (LyCORIS and ComfyUI disagree there: docs/FORMATS.md §4.7)."""
    weight = torch.zeros(2, 3)
    weight[1] = 1.0
    adapter = LowRank(torch.zeros(2, 1), torch.zeros(1, 3), 1.0, dora_scale=torch.ones(2, 1), dora_axis="out")
    merged = apply_dora(weight, adapter)
    assert torch.isfinite(merged).all() and torch.equal(merged[0], torch.zeros(3))
    torch.testing.assert_close(merged[1], torch.full((3,), 3**-0.5))
    with pytest.raises(ValueError, match="strength"):
        apply_dora(weight, adapter, strength=0.5)


@pytest.mark.parametrize(
    ("shape", "axis"), [((6, 1), "out"), ((6,), "out"), ((1, 4), "in"), ((1, 4, 1, 1), "in"), ((6, 1, 1, 1), "out")]
)
def test_dora_axis_rule(shape: tuple[int, ...], axis: str) -> None:
    """dora_scale.shape[0] == out ⇒ output axis, else input axis (ComfyUI comfy/weight_adapter/base.py
    (weight_decompose) shape rule; LyCORIS lycoris/modules/locon.py wd_on_out shapes)."""
    params = {
        "lora_up.weight": _t(6, 2, seed=58),
        "lora_down.weight": _t(2, 4, seed=59),
        "dora_scale": torch.ones(shape),
    }
    adapter = adapter_from_params("m", params, (6, 4), [])
    assert adapter.dora_axis == axis  # type: ignore[union-attr]


def test_dora_scale_that_fits_no_axis() -> None:
    params = {
        "lora_up.weight": _t(6, 2, seed=60),
        "lora_down.weight": _t(2, 4, seed=61),
        "dora_scale": torch.ones(5, 1),
    }
    with pytest.raises(InputError, match="fits neither"):
        adapter_from_params("m", params, (6, 4), [])


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_dora_on_loha_lokr_kept(kind: str) -> None:
    """DoRA on LoHa/LoKr ("doha"/"dokr": LyCORIS lycoris/modules/loha.py, lokr.py weight_decompose) is read,
    merged with the same rule, and written back — never dropped."""
    if kind == "loha":
        params = {"hada_w1_a": _t(4, 2, seed=62), "hada_w1_b": _t(2, 6, seed=63)}
        params |= {"hada_w2_a": _t(4, 2, seed=64), "hada_w2_b": _t(2, 6, seed=65)}
    else:
        params = {"lokr_w1": _t(2, 2, seed=66), "lokr_w2_a": _t(2, 1, seed=67), "lokr_w2_b": _t(1, 3, seed=68)}
    params |= {"alpha": torch.tensor(1.0), "dora_scale": torch.rand(1, 6) + 0.5}
    adapter = adapter_from_params("m", params, (4, 6), [])
    assert adapter.dora_axis == "in"  # type: ignore[union-attr]
    weight = _t(4, 6, seed=69)
    expected = _dora_expected(_np(weight), _np(adapter.delta()), _np(params["dora_scale"]), "in")
    _close(apply_dora(weight, adapter), expected)
    written = adapter_params(adapter, torch.float32)
    assert set(written) == set(params) and torch.equal(written["dora_scale"], params["dora_scale"])


# --------------------------------------------------------------------------------------------
# Reader rules: alpha, rank mismatches, kinds, unsupported algorithms

TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # (12, 12) in TINY sd1


def test_missing_alpha_is_rank_with_warning() -> None:
    tensors = {f"{TE_Q}.lora_up.weight": _t(12, 3, seed=70), f"{TE_Q}.lora_down.weight": _t(3, 12, seed=71)}
    lora = read_kohya(tensors, {}, TINY["sd1"])
    (adapter,) = lora.adapters.values()
    assert adapter.alpha == 3.0 and adapter.scale == 1.0
    assert any("no alpha" in w for w in lora.warnings)


def test_missing_alpha_lokr() -> None:
    adapter = _lokr((12, 12), None, w1=_t(3, 3, seed=72), w2_a=_t(4, 2, seed=73), w2_b=_t(2, 4, seed=74))
    assert adapter.alpha == 2.0 and adapter.scale == 1.0


def test_alpha_zero_warns() -> None:
    tensors = {
        f"{TE_Q}.lora_up.weight": _t(12, 3, seed=75),
        f"{TE_Q}.lora_down.weight": _t(3, 12, seed=76),
        f"{TE_Q}.alpha": torch.tensor(0.0),
    }
    lora = read_kohya(tensors, {}, TINY["sd1"])
    (adapter,) = lora.adapters.values()
    assert adapter.alpha == 0.0 and adapter.scale == 0.0
    assert any("alpha is 0" in w for w in lora.warnings)


@pytest.mark.parametrize(
    "params",
    [
        {"lora_up.weight": torch.zeros(12, 3), "lora_down.weight": torch.zeros(2, 12)},
        {
            "lora_up.weight": torch.zeros(12, 2),
            "lora_down.weight": torch.zeros(2, 12),
            "lora_mid.weight": torch.zeros(3, 3, 3, 3),
        },
        {
            "hada_w1_a": torch.zeros(12, 3),
            "hada_w1_b": torch.zeros(2, 12),
            "hada_w2_a": torch.zeros(12, 2),
            "hada_w2_b": torch.zeros(2, 12),
        },
        {"lokr_w1_a": torch.zeros(3, 2), "lokr_w1_b": torch.zeros(4, 3), "lokr_w2": torch.zeros(4, 4)},
        {"lokr_w1": torch.zeros(3, 3), "lokr_w2_a": torch.zeros(4, 2), "lokr_w2_b": torch.zeros(3, 4)},
    ],
    ids=["lora", "lora-mid", "loha", "lokr-w1", "lokr-w2"],
)
def test_rank_mismatch(params: dict[str, torch.Tensor]) -> None:
    with pytest.raises(InputError, match="rank mismatch"):
        adapter_from_params("m", params, (12, 12), [])


def test_rank_mismatch_through_reader() -> None:
    tensors = {f"{TE_Q}.lora_up.weight": torch.zeros(12, 4), f"{TE_Q}.lora_down.weight": torch.zeros(3, 12)}
    with pytest.raises(InputError, match="rank mismatch"):
        read_kohya(tensors, {}, TINY["sd1"])


def test_mixed_kinds() -> None:
    params = {
        "lora_up.weight": torch.zeros(12, 2),
        "lora_down.weight": torch.zeros(2, 12),
        "hada_w1_a": torch.zeros(12, 2),
        "hada_w1_b": torch.zeros(2, 12),
        "hada_w2_a": torch.zeros(12, 2),
        "hada_w2_b": torch.zeros(2, 12),
    }
    with pytest.raises(InputError, match="mix adapter kinds"):
        adapter_from_params("m", params, (12, 12), [])


@pytest.mark.parametrize(
    ("params", "algo"),
    [
        ({"weight": torch.zeros(12), "on_input": torch.tensor(False)}, "IA3"),
        ({"w_norm": torch.zeros(12), "b_norm": torch.zeros(12)}, "norm"),
        ({"oft_blocks": torch.zeros(3, 4, 4), "alpha": torch.tensor(1.0)}, "OFT"),
        ({"a1.weight": torch.zeros(2, 12), "a2.weight": torch.zeros(12, 2)}, "GLoRA"),
    ],
)
def test_unsupported_algorithms_named(params: dict[str, torch.Tensor], algo: str) -> None:
    with pytest.raises(InputError, match=algo):
        adapter_from_params("m", params, (12, 12), [])


def test_unsupported_through_reader() -> None:
    tensors = {f"{TE_Q}.weight": torch.zeros(12), f"{TE_Q}.on_input": torch.tensor(False)}
    with pytest.raises(InputError, match="IA3"):
        read_kohya(tensors, {}, TINY["sd1"])


# --------------------------------------------------------------------------------------------
# Real LoKr files (KohakuBlueleaf/LyCORIS result/, SD1, kohya names, old 2-D conv layout)


@needs_real("lycoris_lokr")
@pytest.mark.parametrize("rank", [4, 8, 16])
def test_real_lokr_files(rank: int, tmp_path: Path) -> None:
    path = LOKR_FILES / f"smart_falcon_{rank}_lokr.safetensors"
    lora = load_lora(path)
    assert lora.source_format == "kohya" and lora.family.name == "sd1"
    assert len(lora.adapters) == 350
    assert lora.components() == {"te1": 72, "unet": 278}
    assert lora.kinds == {"lokr": 350}
    assert not lora.unmatched
    tables = name_tables(lora.family)
    convs = 0
    for module, adapter in lora.adapters.items():
        assert isinstance(adapter, LoKr) and adapter.rank == rank and adapter.alpha == float(rank)
        delta = adapter.delta()
        assert tuple(delta.shape) == tables.modules[module].shape, module
        assert torch.isfinite(delta).all(), module
        convs += delta.dim() == 4
    assert convs > 0

    # kohya write → read: bit-exact factors and alpha, fp16 kept, same keys as the original file
    out = save_lora(lora, tmp_path / "lokr.safetensors", "kohya")
    again = load_lora(out)
    assert again.family.name == "sd1" and set(again.adapters) == set(lora.adapters)
    for module, adapter in lora.adapters.items():
        back = again.adapters[module]
        assert isinstance(back, LoKr) and back.alpha == adapter.alpha
        for field in ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2"):
            a, b = getattr(adapter, field), getattr(back, field)
            assert (a is None) == (b is None)
            if a is not None:
                assert b.dtype == torch.float16 and torch.equal(a, b), (module, field)
    original, written = load_file(path), load_file(out)
    assert set(original) == set(written)
    for key, tensor in original.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key

    # SD1 from the factor shapes alone (SD1 and SD2 share every U-Net name): no metadata, no tie
    bare = tmp_path / "bare.safetensors"
    save_file(original, bare)
    detected = load_lora(bare)
    assert detected.family.name == "sd1" and len(detected.adapters) == 350
    assert not any("equally" in w for w in detected.warnings), detected.warnings


# --------------------------------------------------------------------------------------------
# Oracle: lycoris-lora's own modules (forward), on files it writes


def _forward_weight_change(module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """W_eff − W from the module's forward: basis inputs through it, minus the zero input (the bias)."""
    with torch.no_grad():
        if weight.dim() == 2:
            x = torch.eye(weight.shape[1])
            return (module(x) - module(torch.zeros_like(x))).T - weight
        out, inp, kh, kw = weight.shape
        x = torch.eye(inp * kh * kw).reshape(-1, inp, kh, kw)
        y = module(x) - module(torch.zeros_like(x))
        return y.reshape(inp, kh, kw, out).permute(3, 0, 1, 2) - weight


def _forward_bias_change(module: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        x = torch.zeros(1, *weight.shape[1:]) if weight.dim() == 4 else torch.zeros(1, weight.shape[1])
        return module(x).reshape(-1) - bias


ORACLE_CASES = {
    "lora": ("lora", {}),
    "locon-tucker": ("lora", {"use_tucker": True}),
    "loha": ("loha", {}),
    "loha-tucker": ("loha", {"use_tucker": True}),
    "lokr": ("lokr", {"factor": 8}),
    "lokr-both": ("lokr", {"factor": 8, "decompose_both": True}),
    "lokr-tucker": ("lokr", {"factor": 8, "use_tucker": True}),
    "lokr-full": ("lokr", {"factor": 8, "full_matrix": True}),
    "full": ("full", {}),
    "dora-out": ("lora", {"dora_wd": True}),
    "dora-in": ("lora", {"dora_wd": True, "wd_on_output": False}),
    "doha": ("loha", {"dora_wd": True}),
    "dokr-in": ("lokr", {"factor": 8, "dora_wd": True, "wd_on_output": False}),
}


@pytest.mark.oracle
@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_lycoris_oracle_forward(case: str, tmp_path: Path) -> None:
    """lycoris-lora builds each algorithm over a Linear, a 3×3 and a 1×1 conv; randomised, saved with
    save_weights, read back with loratools: ΔW (or the DoRA weight) equals what the module's forward applies."""
    pytest.importorskip("lycoris")
    from lycoris import create_lycoris

    algo, kwargs = ORACLE_CASES[case]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Conv2d(32, 48, 3), torch.nn.Conv2d(32, 48, 1))
    weights = [m.weight.detach().clone() for m in model]
    biases = [m.bias.detach().clone() for m in model]
    network = create_lycoris(model, 1.0, linear_dim=2, linear_alpha=3, algo=algo, preset="full", **kwargs)
    network.apply_to()
    try:
        with torch.no_grad():
            for name, param in network.named_parameters():
                if "dora_scale" in name:
                    param.copy_(torch.rand_like(param) + 0.5)
                elif algo == "full":
                    param.add_(torch.randn_like(param) * 0.1)
                else:
                    param.copy_(torch.randn_like(param) * 0.3)
        path = tmp_path / "lycoris.safetensors"
        network.save_weights(str(path), torch.float32, {})
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(path).items():
            module_name, param_name = key.split(".", 1)
            groups.setdefault(module_name, {})[param_name] = tensor
        assert len(groups) == 3
        for i, module in enumerate(model):
            warnings: list[str] = []
            adapter = adapter_from_params(f"lycoris_{i}", groups[f"lycoris_{i}"], tuple(weights[i].shape), warnings)
            assert not warnings
            expected = _forward_weight_change(module, weights[i])
            if getattr(adapter, "dora_scale", None) is not None:
                actual = apply_dora(weights[i], adapter) - weights[i]
            else:
                actual = adapter.delta().reshape(weights[i].shape)
            torch.testing.assert_close(actual, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5)
            if isinstance(adapter, Full):
                bias_change = _forward_bias_change(module, weights[i], biases[i])
                torch.testing.assert_close(adapter.delta_bias(), bias_change, atol=1e-6, rtol=1e-5)
    finally:
        network.restore()


@pytest.mark.oracle
def test_lycoris_oracle_functional_4d_w2b() -> None:
    """The new 4-D factored w2_b layout against lycoris.functional.lokr.diff_weight (LyCORIS' own rebuild)."""
    pytest.importorskip("lycoris")
    from lycoris.functional import lokr

    w1, w2a, w2b = _t(3, 2, seed=80), _t(4, 2, seed=81), _t(2, 5, 3, 3, seed=82)
    reference = lokr.diff_weight(w1, None, None, None, w2a, w2b, None, gamma=3.0, backend="torch")
    adapter = _lokr((12, 10, 3, 3), 3.0, w1=w1, w2_a=w2a, w2_b=w2b)
    torch.testing.assert_close(adapter.delta(), reference.to(torch.float32), atol=1e-5, rtol=1e-5)
