"""Meta-device builds become real models, and named builders build in the requested dtype.

Every builder at tiny size is built on ``meta``, materialised with ``to_empty`` into memory
filled with NaN, and initialised with ``vlakit.core.init_parameters``: every parameter must
come out finite and of the same kind as a direct CPU build (constants such as norm weights
exactly equal, random ones with a similar spread).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlakit.actions import ActionTokenizer
from vlakit.core import init_parameters
from vlakit.decoders import TransformerDecoder, gemma, gemma_2b, llama, llama2_7b
from vlakit.models import openvla, openvla_7b, paligemma, paligemma_3b
from vlakit.projectors import LinearProjector, MLPProjector
from vlakit.vision import FusedEncoder, vit


def _tiny_llama(**kw):
    return llama(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                 **kw)


def _tiny_gemma(**kw):
    return gemma(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=8,
                 mlp_dim=48, **kw)


def _tiny_openvla():
    dino = vit(img_size=28, patch_size=14, dim=32, depth=2, num_heads=4, mlp_dim=64,
               layer_scale_init=1e-5, class_token=True, reg_tokens=4, output_layer=-2)
    siglip = vit(img_size=28, patch_size=14, dim=40, depth=2, num_heads=4, mlp_dim=64,
                 map_head=True, output_layer=-2)
    return openvla(
        encoder=FusedEncoder([dino, siglip]),
        projector=MLPProjector([72, 96, 32, 32]),
        decoder=_tiny_llama(),
        action_tokenizer=ActionTokenizer(vocab_end=60, action_dim=3, num_bins=16),
    )


def _tiny_paligemma():
    return paligemma(
        encoder=vit(img_size=28, patch_size=14, dim=40, depth=2, num_heads=4, mlp_dim=64,
                    gelu_approximate="tanh"),
        projector=LinearProjector(40, 32, bias=True),
        decoder=_tiny_gemma(),
        image_token_id=63,
    )


BUILDERS = {
    "llama": _tiny_llama,
    "gemma": _tiny_gemma,
    "llama_tied": lambda: _tiny_llama(tie_embeddings=True),
    "openvla": _tiny_openvla,
    "paligemma": _tiny_paligemma,
}


def _decoder(model: nn.Module) -> TransformerDecoder:
    return model if isinstance(model, TransformerDecoder) else model.decoder


def _materialise_from_meta(make) -> nn.Module:
    with torch.device("meta"):
        model = make()
    model.to_empty(device="cpu")
    with torch.no_grad():  # to_empty's memory is garbage; make it unmistakable
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point():
                t.fill_(float("nan"))
    return init_parameters(model)


def _is_constant(t: torch.Tensor) -> bool:
    return bool((t == t.flatten()[0]).all())


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_meta_build_initialises_every_parameter_like_a_direct_build(name):
    torch.manual_seed(0)
    reference = dict(BUILDERS[name]().named_parameters())
    torch.manual_seed(0)
    model = _materialise_from_meta(BUILDERS[name])
    params = dict(model.named_parameters())
    assert params.keys() == reference.keys()
    for key, p in params.items():
        assert p.device.type == "cpu", key
        assert torch.isfinite(p).all(), f"{key} left uninitialised after to_empty"
        ref = reference[key].detach()
        if _is_constant(ref):  # norms (1 or 0), LayerScale, zero biases
            assert torch.equal(p, ref), f"{key}: expected the constant {ref.flatten()[0]}"
        else:
            assert not _is_constant(p), f"{key}: random in a direct build, constant here"
            ratio = (p.std() / ref.std()).item()
            assert 0.5 < ratio < 2.0, f"{key}: std {p.std():.3g} vs {ref.std():.3g} directly"
    for key, b in model.named_buffers():
        if b.is_floating_point():
            assert torch.isfinite(b).all(), f"buffer {key} left uninitialised"


@pytest.mark.parametrize("name", ["gemma", "llama_tied", "paligemma"])
def test_tied_head_is_still_tied_after_to_empty_and_init(name):
    decoder = _decoder(_materialise_from_meta(BUILDERS[name]))
    assert decoder.tied_embeddings
    assert decoder.lm_head.weight is decoder.embed.weight
    hidden = torch.randn(2, 3, decoder.dim)
    torch.testing.assert_close(decoder.logits(hidden), F.linear(hidden, decoder.embed.weight))


def test_rmsnorm_conventions_initialise_to_identity():
    from vlakit.decoders import RMSNorm

    for unit_offset, value in ((False, 1.0), (True, 0.0)):
        with torch.device("meta"):
            norm = RMSNorm(8, unit_offset=unit_offset)
        norm.to_empty(device="cpu")
        norm.weight.data.fill_(float("nan"))
        norm.reset_parameters()
        assert torch.equal(norm.weight, torch.full((8,), value))
        x = torch.randn(3, 8)
        torch.testing.assert_close(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


@pytest.mark.parametrize("make", [_tiny_llama, _tiny_gemma], ids=["llama", "gemma"])
def test_decoder_builders_build_in_the_requested_dtype(make):
    before = torch.get_default_dtype()
    model = make(dtype=torch.bfloat16)
    assert torch.get_default_dtype() == before  # restored
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # RoPE angles stay fp32 whatever the parameter dtype: the same numbers as an fp32 build
    positions = torch.arange(40)[None]
    cos32, sin32 = make().rope(positions, torch.float32)
    cos, sin = model.rope(positions, torch.float32)
    assert torch.equal(cos, cos32) and torch.equal(sin, sin32)
    for key, b in model.named_buffers():
        if "rope" in key:
            assert b.dtype == torch.float32, key


def test_builder_restores_the_default_dtype_when_construction_fails():
    with pytest.raises(ValueError, match="num_kv_heads"):
        llama(vocab_size=8, dim=32, num_layers=1, num_heads=4, num_kv_heads=3, mlp_dim=8,
              dtype=torch.float16)
    assert torch.get_default_dtype() == torch.float32
    with pytest.raises(ValueError, match="floating"):
        _tiny_llama(dtype=torch.int64)


def test_openvla_7b_builds_directly_in_bf16_on_meta():
    model = openvla_7b(dtype=torch.bfloat16, device="meta")
    assert torch.get_default_dtype() == torch.float32
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert {p.device.type for p in params} == {"meta"}
    assert sum(p.numel() for p in params) == 7_541_237_184
    for key, b in model.decoder.rope.named_buffers():
        assert b.dtype == torch.float32, key
    # the released OpenVLA runs with transformers' default 1e-6 (REFERENCE.md)
    assert model.decoder.layers[0].attn_norm.eps == 1e-6


def test_named_builders_take_dtype_device_and_only_the_norm_eps_keyword():
    gemma_bf16 = gemma_2b(dtype=torch.bfloat16, device="meta")
    assert {p.dtype for p in gemma_bf16.parameters()} == {torch.bfloat16}
    assert sum(p.numel() for p in gemma_bf16.parameters()) == 2_506_172_416
    pali = paligemma_3b(dtype=torch.float16, device="meta")
    assert {p.dtype for p in pali.parameters()} == {torch.float16}
    assert llama2_7b(device="meta").norm.eps == 1e-5  # Llama-2's own
    assert llama2_7b(norm_eps=1e-6, device="meta").norm.eps == 1e-6
    assert gemma_2b(norm_eps=1e-5, device="meta").norm.eps == 1e-5
    assert openvla_7b(norm_eps=1e-5, device="meta").decoder.norm.eps == 1e-5
    # the transformers config name `rms_norm_eps=` is no alias any more: refused, not ignored
    for build in (llama2_7b, gemma_2b, openvla_7b):
        with pytest.raises(TypeError, match="rms_norm_eps"):
            build(rms_norm_eps=1e-6, device="meta")


class _MarkedLinear(nn.Linear):
    pass


def test_named_vla_builders_pass_the_linear_factory_down():
    vla = openvla_7b(device="meta", linear=_MarkedLinear)
    assert isinstance(vla.decoder.layers[0].attn.q_proj, _MarkedLinear)
    assert isinstance(vla.decoder.layers[-1].mlp.down_proj, _MarkedLinear)
    assert not isinstance(vla.decoder.lm_head, _MarkedLinear)
    assert all(any(isinstance(m, _MarkedLinear) for m in tower.modules())
               for tower in vla.encoder.encoders)
    assert sum(p.numel() for p in vla.parameters()) == 7_541_237_184
    pali = paligemma_3b(device="meta", linear=_MarkedLinear)
    assert isinstance(pali.decoder.layers[0].mlp.gate_proj, _MarkedLinear)
    assert any(isinstance(m, _MarkedLinear) for m in pali.encoder.modules())
