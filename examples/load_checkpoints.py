"""Loading checkpoint directories in their published layouts, one call each.

Nothing can be downloaded here, so the script writes tiny checkpoints itself, with the real
file names, formats, config fields and key names, to a temporary folder, and loads them:

1. PaliGemma, saved by transformers' own ``save_pretrained`` (sharded safetensors):
   ``load_paligemma`` gives transformers' logits;
2. OpenVLA, as the release lays it out (``config.json`` of ``OpenVLAConfig`` naming timm
   towers, bf16 safetensors shards with Prismatic's key names, ``dataset_statistics.json``):
   ``load_openvla``, with the unused tower parts skipped and reported;
3. the same directory made an OpenVLA-OFT run folder (``action_head--*_checkpoint.pt``,
   ``proprio_projector--*_checkpoint.pt``): ``load_openvla_oft`` predicts an action chunk
   from two camera views, ``load_lightvla`` the same with LightVLA's pruner;
4. a peft LoRA adapter folder (``adapter_config.json``, ``adapter_model.safetensors``),
   merged into the OpenVLA weights as they load;
5. the OFT model saved with ``save_pretrained`` (weights + the constructor tree as JSON)
   and rebuilt with ``VLA.from_pretrained``: the same actions.

python examples/load_checkpoints.py
"""

import json
import tempfile
from pathlib import Path

import timm
import torch
import transformers
from safetensors.torch import save_file
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from vlakit import VLA, VLAInputs
from vlakit.heads import L1RegressionHead
from vlakit.models import load_lightvla, load_openvla, load_openvla_oft, load_paligemma
from vlakit.projectors import ProprioProjector


# Real OpenVLA directories name timm towers such as "vit_large_patch14_reg4_dinov2.lvd142m";
# any id timm knows works, so two tiny ones are registered for this script.
def _tiny_tower(kwargs: dict, **args) -> VisionTransformer:
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)  # timm's registry hands these to every builder
    return VisionTransformer(patch_size=14, depth=3, num_heads=4, mlp_ratio=2, **args, **kwargs)


@register_model
def example_tiny_dinov2_reg4(pretrained=False, **kwargs):
    return _tiny_tower(kwargs, embed_dim=32, class_token=True, reg_tokens=4,
                       no_embed_class=True, init_values=0.5)


@register_model
def example_tiny_siglip(pretrained=False, **kwargs):
    return _tiny_tower(kwargs, embed_dim=40, class_token=False, global_pool="map")


def paligemma(root: Path) -> None:
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             image_size=28, patch_size=14)
    text = transformers.GemmaConfig(vocab_size=120, hidden_size=64, intermediate_size=96,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=1, head_dim=16)
    hf = transformers.PaliGemmaForConditionalGeneration(transformers.PaliGemmaConfig(
        vision_config=vision, text_config=text, image_token_id=100, projection_dim=64)).eval()
    hf.save_pretrained(root, max_shard_size="100KB")
    model, report = load_paligemma(root, return_report=True)
    ids = torch.tensor([[100] * 4 + [2, 10, 11, 12]])
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels,
                      position_ids=torch.arange(1, 9)[None]).logits
        got = model.eval()(VLAInputs(input_ids=ids, text_valid=ids >= 0,
                                     pixels=pixels[:, None]), return_logits=True).logits
    shards = len(list(root.glob("*.safetensors")))
    print(f"PaliGemma ({shards} shards): {report}; max |logits - transformers| = "
          f"{(got - expected).abs().max():.2e}")


def openvla(root: Path) -> None:
    torch.manual_seed(0)
    dino = timm.create_model("example_tiny_dinov2_reg4", num_classes=0, img_size=28)
    siglip = timm.create_model("example_tiny_siglip", num_classes=0, img_size=28)
    text = dict(model_type="llama", vocab_size=384, hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{k: v for k, v in text.items() if k != "model_type"}))
    state = {f"vision_backbone.featurizer.{k.replace('.gamma', '.scale_factor')}": v
             for k, v in dino.state_dict().items()}
    state |= {f"vision_backbone.fused_featurizer.{k}": v for k, v in siglip.state_dict().items()}
    for i, (n_in, n_out) in enumerate([(72, 288), (288, 64), (64, 64)], start=1):
        layer = torch.nn.Linear(n_in, n_out)
        state[f"projector.fc{i}.weight"], state[f"projector.fc{i}.bias"] = layer.weight, layer.bias
    state |= {f"language_model.{k}": v for k, v in llama.state_dict().items()}
    state = {k: v.detach().contiguous().to(torch.bfloat16) for k, v in state.items()}
    keys = sorted(state)
    weight_map = {}
    for n, names in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), start=1):
        shard = f"model-0000{n}-of-00002.safetensors"
        save_file({k: state[k] for k in names}, root / shard)
        weight_map |= dict.fromkeys(names, shard)
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({
        "model_type": "openvla", "timm_model_ids": ["example_tiny_dinov2_reg4",
                                                    "example_tiny_siglip"],
        "timm_override_act_layers": [None, None], "image_sizes": [28, 28],
        "text_config": text, "n_action_bins": 256, "pad_to_multiple_of": 64}))
    stats = {"libero_spatial": {"action": {"q01": [-1.0] * 3, "q99": [1.0] * 3},
                                "proprio": {"q01": [-1.0] * 5, "q99": [1.0] * 5}}}
    (root / "dataset_statistics.json").write_text(json.dumps(stats))
    model, report = load_openvla(root, return_report=True)
    print(f"OpenVLA (2 bf16 shards): {report}")

    torch.save({f"module.{k}": v for k, v in L1RegressionHead(64, 3, 8).state_dict().items()},
               root / "action_head--latest_checkpoint.pt")
    torch.save({f"module.{k}": v for k, v in ProprioProjector(5, 64).state_dict().items()},
               root / "proprio_projector--latest_checkpoint.pt")
    # OFT's run folders do not record the camera views (num_images_in_input): say it, and
    # the model refuses a batch with another count (PaliGemma and OpenVLA know theirs: 1)
    oft = load_openvla_oft(root, num_views=2).eval()
    batch = VLAInputs(input_ids=torch.tensor([[10, 11, 12]]),
                      text_valid=torch.ones(1, 3, dtype=torch.bool),
                      pixels=torch.randn(1, 2, 6, 28, 28), proprio=torch.rand(1, 5))
    chunk = oft.predict_action(batch)
    print(f"OpenVLA-OFT ({type(oft.head).__name__}, chunk {oft.head.chunk_size} from the "
          f"dataset name, proprio {oft.proprio_projector.in_dim}): actions {tuple(chunk.shape)}")
    light = load_lightvla(root, num_views=2).eval()
    light.predict_action(batch)
    kept = light.pruner.last_kept
    print(f"LightVLA: kept {int(kept.sum())} of {kept.numel()} image tokens")

    adapter = root.parent / "lora"
    adapter.mkdir()
    target = "language_model.model.layers.0.self_attn.q_proj"
    save_file({f"base_model.model.{target}.lora_A.weight": torch.randn(4, 64),
               f"base_model.model.{target}.lora_B.weight": torch.randn(64, 4)},
              adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    _, report = load_openvla(root, adapter=adapter, return_report=True)
    print(f"OpenVLA + LoRA adapter (merged): {report}")

    saved = root.parent / "saved"
    oft.save_pretrained(saved)
    again = VLA.from_pretrained(saved).eval()
    same = all(torch.equal(v, again.state_dict()[k]) for k, v in oft.state_dict().items())
    diff = (again.predict_action(batch) - chunk).abs().max()
    print(f"save_pretrained -> from_pretrained: {sorted(p.name for p in saved.iterdir())}, "
          f"same weights: {same}, max |actions diff| = {diff:.1e}")


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "paligemma").mkdir()
        (Path(folder) / "openvla").mkdir()
        paligemma(Path(folder) / "paligemma")
        openvla(Path(folder) / "openvla")


if __name__ == "__main__":
    main()
