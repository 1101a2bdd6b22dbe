"""Each adapter kind × each shared method, checked against the kind's own dense ``delta()``.

The kinds describe themselves (formats/adapters.py ``AdapterKind``): ops call ``rescaled``,
``product_factors``, ``tensors``… instead of branching on the class, so every method is checked
here on every layout, with ``delta()`` (the reference maths, cited in each class) as the oracle.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from loratools.formats.adapters import KINDS, Adapter, Full, LoHa, LoKr, LowRank
from loratools.formats.lycoris import adapter_from_params, adapter_params
from loratools.ops.lowrank import factorize


def _t(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def _dora(adapter: Adapter) -> Adapter:
    return adapter.with_dora(_t(adapter.delta_shape()[0], 1, seed=99).abs() + 0.5, "out")


# name → (factory, form, label, tally, is_pair, is_plain)
LAYOUTS: dict[str, tuple[Callable[[], Adapter], str, str, str, bool, bool]] = {
    "lora": (lambda: LowRank(_t(6, 3, seed=1), _t(3, 5, seed=2), 1.5), "lora", "lora", "lora", True, True),
    "locon": (
        lambda: LowRank(_t(6, 3, 1, 1, seed=1), _t(3, 4, 3, 3, seed=2), 2.0),
        "locon",
        "locon",
        "lora",
        True,
        True,
    ),
    # a 3×1 kernel is a conv LoRA (kohya conv_dim: kernel ≠ 1×1); the label once said "lora" here
    "locon-3x1": (
        lambda: LowRank(_t(6, 2, 1, 1, seed=1), _t(2, 4, 3, 1, seed=2), 1.0),
        "locon",
        "locon",
        "lora",
        True,
        True,
    ),
    "tucker": (
        lambda: LowRank(_t(6, 3, 1, 1, seed=1), _t(3, 4, 1, 1, seed=2), 3.0, _t(3, 3, 3, 3, seed=3)),
        "tucker",
        "tucker",
        "lora",
        False,
        False,
    ),
    "dora": (
        lambda: _dora(LowRank(_t(6, 3, seed=1), _t(3, 5, seed=2), 1.5)),
        "lora",
        "dora",
        "dora",
        True,
        False,
    ),
    "loha": (
        lambda: LoHa(_t(6, 3, seed=1), _t(3, 5, seed=2), _t(6, 3, seed=3), _t(3, 5, seed=4), 2.0),
        "loha",
        "loha",
        "loha",
        False,
        False,
    ),
    "loha-tucker": (
        lambda: LoHa(
            _t(3, 6, seed=1),
            _t(3, 4, seed=2),
            _t(3, 6, seed=3),
            _t(3, 4, seed=4),
            1.0,
            _t(3, 3, 3, 3, seed=5),
            _t(3, 3, 3, 3, seed=6),
        ),
        "loha",
        "loha",
        "loha",
        False,
        False,
    ),
    "loha-dora": (
        lambda: _dora(LoHa(_t(6, 3, seed=1), _t(3, 5, seed=2), _t(6, 3, seed=3), _t(3, 5, seed=4), 2.0)),
        "loha",
        "loha+dora",
        "loha+dora",
        False,
        False,
    ),
    "lokr-full": (lambda: LoKr(4.0, w1=_t(2, 3, seed=1), w2=_t(3, 4, seed=2)), "lokr", "lokr", "lokr", False, False),
    "lokr-w2-factored": (
        lambda: LoKr(1.0, w1=_t(2, 3, seed=1), w2a=_t(3, 2, seed=2), w2b=_t(2, 4, seed=3)),
        "lokr",
        "lokr",
        "lokr",
        False,
        False,
    ),
    "lokr-w1-factored": (
        lambda: LoKr(2.0, w1a=_t(2, 1, seed=1), w1b=_t(1, 3, seed=2), w2=_t(3, 4, seed=3)),
        "lokr",
        "lokr",
        "lokr",
        False,
        False,
    ),
    "lokr-tucker": (
        lambda: LoKr(2.0, w1=_t(2, 2, seed=1), w2a=_t(2, 3, seed=2), w2b=_t(2, 4, seed=3), t2=_t(2, 2, 3, 3, seed=4)),
        "lokr",
        "lokr",
        "lokr",
        False,
        False,
    ),
    "full": (lambda: Full(_t(6, 5, seed=1), _t(6, seed=2)), "full", "full", "full", False, False),
}
NAMES = list(LAYOUTS)


def test_every_kind_is_covered() -> None:
    assert {type(LAYOUTS[n][0]()) for n in NAMES} == set(KINDS)


@pytest.mark.parametrize("name", NAMES)
def test_labels_and_predicates(name: str) -> None:
    make, form, label, tally, is_pair, is_plain = LAYOUTS[name]
    adapter = make()
    assert (adapter.form, adapter.label, adapter.tally) == (form, label, tally)
    assert (adapter.is_pair, adapter.is_plain) == (is_pair, is_plain)
    assert adapter.stores_alpha == (adapter.kind != "full")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("svd", ["dense", "factor-space"])
def test_product_factors_give_delta(name: str, svd: str) -> None:
    adapter = LAYOUTS[name][0]()
    if svd == "dense":
        up, down, shape = adapter.product_factors()
    elif adapter.dora_scale is not None:  # ops refuse DoRA: its ΔW needs the base weight
        return
    else:
        up, down, shape = factorize(adapter)
    oracle = adapter.delta()
    assert tuple(shape) == tuple(oracle.shape)
    product = up if down is None else up @ down
    torch.testing.assert_close(product.to(torch.float32).reshape(oracle.shape), oracle, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in NAMES if LAYOUTS[n][4]])
def test_pair_factors_without_scale_are_stored_ones(name: str) -> None:
    adapter = LAYOUTS[name][0]()
    assert isinstance(adapter, LowRank)
    up, down, _ = adapter.product_factors(include_scale=False)
    assert torch.equal(up.reshape(adapter.up.shape), adapter.up) and torch.equal(
        down.reshape(adapter.down.shape), adapter.down
    )


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("by", [2.5, -0.75])
def test_rescaled_scales_delta(name: str, by: float) -> None:
    adapter = LAYOUTS[name][0]()
    scaled, how = adapter.rescaled(by)
    assert type(scaled) is type(adapter)
    if not adapter.stores_alpha or adapter.rank is None:
        assert how == "factor"
    else:
        assert how == ("alpha+sign" if by < 0 else "alpha")
        assert scaled.alpha == adapter.alpha * abs(by)
    torch.testing.assert_close(scaled.delta(), by * adapter.delta(), rtol=1e-6, atol=1e-6)
    if isinstance(adapter, Full) and adapter.diff_b is not None:
        delta_b = scaled.delta_bias()
        assert delta_b is not None
        torch.testing.assert_close(delta_b, by * adapter.diff_b)


@pytest.mark.parametrize("name", NAMES)
def test_tensors_round_trip_through_the_lycoris_reader(name: str) -> None:
    adapter = LAYOUTS[name][0]()
    params = adapter_params(adapter, torch.float32)
    assert ("alpha" in params) == adapter.stores_alpha
    assert adapter.parameters() == sum(t.numel() for t in adapter.tensors().values())
    back = adapter_from_params("m", params, tuple(adapter.delta_shape()), [])
    assert type(back) is type(adapter) and back.alpha == pytest.approx(adapter.alpha)
    assert list(back.tensors()) == list(adapter.tensors())
    assert all(torch.equal(t, back.tensors()[k]) for k, t in adapter.tensors().items())
    torch.testing.assert_close(back.delta(), adapter.delta())


@pytest.mark.parametrize("name", NAMES)
def test_kron_halves(name: str) -> None:
    adapter = LAYOUTS[name][0]()
    halves = adapter.kron_halves()
    if adapter.kind != "lokr":
        assert halves is None
        return
    assert halves is not None
    w1, w2 = halves
    for _ in range(w2.dim() - w1.dim()):
        w1 = w1.unsqueeze(-1)
    oracle = adapter.delta()
    torch.testing.assert_close((adapter.scale * torch.kron(w1, w2.contiguous())).reshape(oracle.shape), oracle)


def test_full_holds_no_dora() -> None:
    full = Full(_t(4, 3, seed=1))
    assert not full.holds_dora and full.dora_scale is None
    with pytest.raises(ValueError, match="no DoRA"):
        full.with_dora(_t(4, 1, seed=2), "out")
