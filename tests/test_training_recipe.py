"""The training recipe's steps on a single process: activation checkpointing leaves loss and
gradients unchanged, OFT's LoRA recipe trains what OFT trains, merged and unmerged LoRA
give the same outputs, freezing by block."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_continuous_heads import _inputs, _model  # noqa: E402

from vlakit.core import LoRALinear, merge_lora  # noqa: E402
from vlakit.distributed import checkpoint_blocks, freeze, oft_lora, unfreeze  # noqa: E402


def _step(model, inputs):
    model.zero_grad()
    loss = model(inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def test_activation_checkpointing_leaves_loss_and_gradients_unchanged():
    plain = _model("l1").train()
    checked = _model("l1").train()
    units = checkpoint_blocks(checked)
    assert len(units) == 1 + 2  # one vision block, two decoder layers
    assert list(checked.state_dict()) == list(plain.state_dict())  # no wrapper modules
    loss_a, grads_a = _step(plain, _inputs())
    loss_b, grads_b = _step(checked, _inputs())
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)


def test_oft_lora_trains_adapters_heads_and_projectors_and_merges_exactly():
    model = _model("l1").train()
    names = oft_lora(model, rank=4)
    assert "decoder.layers.0.attn.q_proj" in names and "projector.linear" in names
    assert not any(n.endswith("lm_head") for n in names)
    layer = model.decoder.layers[0].attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.scale == 4 / 4  # alpha = min(r, 16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or n.startswith(("head.", "proprio_projector.")) for n in trainable)
    assert any(n.startswith("head.") for n in trainable)
    assert any(n.startswith("proprio_projector.") for n in trainable)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _step(model, _inputs())
    optimizer.step()  # B moves off zero: the adapters now change the outputs
    model.eval()
    inputs = _inputs(actions=False)
    before = model.predict_action(inputs)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model.predict_action(inputs), before, atol=1e-5, rtol=0)


def test_freeze_and_unfreeze_by_block():
    model = _model("l1")
    frozen = freeze(model, "encoder", "decoder.layers.0")
    assert frozen and all(n.startswith(("encoder.", "decoder.layers.0.")) for n in frozen)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.layers[1].parameters())
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())
