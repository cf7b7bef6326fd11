"""Persistence survives transforms: LoRA applied (by hand or OFT's recipe), merged, linears
swapped through a factory (a quantisation hook); each saves and loads back to identical
outputs, and a child replaced by plain assignment is still refused."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_save_pretrained import _batch, _composition
from torch import nn

from vlakit import VLA
from vlakit.core import (
    DescriptionError,
    LoRALinear,
    apply_lora,
    describe,
    merge_lora,
    recorded,
    replace_linears,
    replace_module,
)
from vlakit.distributed import oft_lora


def _perturb(model, only=None):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if only is None or only in name:
                param.add_(torch.randn_like(param) * 0.05)


def _round_trip(model, path):
    model.save_pretrained(path)
    return VLA.from_pretrained(path, trust=("test_persist_transforms",)).eval()


def test_oft_lora_then_merge_round_trips(tmp_path):
    model = _composition()
    _perturb(model)
    names = oft_lora(model, rank=4)
    _perturb(model, only="lora_B")  # a trained adapter
    want = model.predict_action(_batch())
    again = _round_trip(model, tmp_path / "lora")
    assert type(again.decoder.layers[0].attn.q_proj) is LoRALinear
    assert sum(isinstance(m, LoRALinear) for m in again.modules()) == len(names)
    assert torch.equal(again.predict_action(_batch()), want)
    merged = merge_lora(model)
    assert merged and not any(isinstance(m, LoRALinear) for m in model.modules())
    again = _round_trip(model, tmp_path / "merged")
    assert not any(isinstance(m, LoRALinear) for m in again.modules())
    assert type(again.decoder.layers[0].attn.q_proj) is nn.Linear
    torch.testing.assert_close(again.predict_action(_batch()), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(again.predict_action(_batch()), model.predict_action(_batch()))


def test_apply_lora_on_a_part_records_the_dotted_replacements(tmp_path):
    model = _composition(film=False)
    apply_lora(model.projector, rank=2, targets=lambda name, layer: name == "fc1")
    _perturb(model, only="lora_B")
    description = json.loads(json.dumps(describe(model)))
    replaced = description["args"]["projector"]["replaced"]
    assert replaced and all(v["$class"] == "vlakit.core.low_rank.LoRALinear"
                            for v in replaced.values())
    again = _round_trip(model, tmp_path)
    assert torch.equal(again.predict_action(_batch()), model.predict_action(_batch()))


@recorded
class FakeQuantLinear(nn.Module):
    """A linear layer whose weight is rounded to a grid in forward (a quantisation stand-in
    that keeps nn.Linear's weight and bias names)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 step: float = 0.01) -> None:
        super().__init__()
        self.step = step
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        weight = torch.round(self.weight / self.step) * self.step
        return F.linear(x, weight, self.bias)


def test_linears_swapped_through_a_factory_round_trip(tmp_path):
    model = _composition(film=False)
    _perturb(model)
    before = model.predict_action(_batch())
    swapped = replace_linears(model.decoder, FakeQuantLinear,
                              targets=lambda name, layer: "mlp" in name)
    assert swapped and all("mlp" in n for n in swapped)
    assert type(model.decoder.layers[0].mlp.up_proj) is FakeQuantLinear
    quantised = model.predict_action(_batch())
    assert not torch.equal(quantised, before)  # the swap is in effect, weights kept
    weight = model.decoder.layers[0].mlp.up_proj.weight
    again = _round_trip(model, tmp_path)
    assert type(again.decoder.layers[0].mlp.up_proj) is FakeQuantLinear
    assert torch.equal(again.decoder.layers[0].mlp.up_proj.weight, weight)
    assert torch.equal(again.predict_action(_batch()), quantised)


def test_a_factory_that_cannot_take_the_weights_is_refused():
    class Wrapped(nn.Module):
        def __init__(self, i, o, bias=True):
            super().__init__()
            self.inner = nn.Linear(i, o, bias=bias)

    model = _composition(film=False)
    with pytest.raises(ValueError, match="cannot take .*weight"):
        replace_linears(model.projector, Wrapped)


def test_plain_assignment_is_still_refused_but_replace_module_is_recorded(tmp_path):
    model = _composition(film=False)
    layer = model.decoder.layers[0].attn
    layer.q_proj = nn.Linear(layer.q_proj.in_features, layer.q_proj.out_features, bias=False)
    with pytest.raises(DescriptionError, match="replaced after .*replace_module"):
        model.save_pretrained(tmp_path / "plain")
    model = _composition(film=False)
    replace_module(model, "decoder.layers.0.attn.q_proj", nn.Linear(
        layer.q_proj.in_features, layer.q_proj.out_features, bias=False))
    again = _round_trip(model, tmp_path / "recorded")
    assert torch.equal(again.predict_action(_batch()), model.predict_action(_batch()))
    with pytest.raises(KeyError, match="no sub-module 'nope'"):
        replace_module(model, "decoder.nope", nn.Identity())


def test_loading_returns_eval_mode_and_files_follow_the_umask(tmp_path):
    import os
    import stat

    model = _composition(film=False).train()
    old = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "vlakit.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert not VLA.from_pretrained(tmp_path).training


def test_a_mistyped_local_path_says_the_directory_does_not_exist(tmp_path):
    from vlakit.core import CheckpointError

    for path in (tmp_path / "nope", "./nope", "runs/a/nope"):
        with pytest.raises(CheckpointError, match="is not a directory"):
            VLA.from_pretrained(path)
