"""Tiny blocks and a tiny tokenizer shared by the assembly tests (nothing is downloaded)."""

import torch
import transformers
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from timm.models.vision_transformer import VisionTransformer
from tokenizers import Tokenizer, models, pre_tokenizers

from vlakit import VLA
from vlakit import vision as V
from vlakit.actions import ActionNormalizer
from vlakit.core import ParallelDecodingMask
from vlakit.decoders import HFDecoder, gemma, llama
from vlakit.heads import FlowMatchingHead
from vlakit.interleave import PrefixInterleaver
from vlakit.projectors import LinearProjector, ProprioProjector

WORDS = ("In : What action should the robot take to pick up the cup ? Out open drawer "
         "put block in box describe image a red green ▁").split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB_SIZE = 320  # decoder vocabulary; action ids are the 256 ids below ACTION_VOCAB_END
ACTION_VOCAB_END = 300
IMAGE_TOKEN_ID = 310


def tiny_tokenizer(path) -> transformers.PreTrainedTokenizerBase:
    """A word-level tokenizer saved to ``path`` and loaded back with AutoTokenizer."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def tiny_encoder(name: str) -> V.VisionEncoder:
    if name in ("vit", "vit_two_views"):
        return V.vit(img_size=28, patch_size=14, dim=48, depth=2, num_heads=4, mlp_dim=96)
    if name == "timm":
        return V.TimmEncoder(VisionTransformer(
            img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=4, num_classes=0,
            class_token=True, reg_tokens=4, no_embed_class=True, init_values=0.5))
    if name == "open_clip":
        cfg = CLIPVisionCfg(layers=2, width=48, head_width=16, patch_size=14, image_size=28)
        return V.OpenClipEncoder(_build_vision_tower(32, cfg))
    if name == "hf":
        config = transformers.SiglipVisionConfig(
            hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            image_size=28, patch_size=14)
        return V.HFVisionEncoder(
            transformers.SiglipVisionModel(config),
            transformers.SiglipImageProcessor(size={"height": 28, "width": 28}))
    if name == "fused":
        dino = V.vit(img_size=28, patch_size=14, dim=32, depth=2, num_heads=4, mlp_dim=64,
                     layer_scale_init=1e-5, class_token=True, reg_tokens=4, output_layer=-2)
        return V.FusedEncoder([dino, V.vit(img_size=28, patch_size=14, dim=48, depth=2,
                                           num_heads=4, mlp_dim=96, output_layer=-2)])
    raise KeyError(name)


def tiny_decoder(name: str, dim: int = 64):
    if name == "own_llama":
        return llama(vocab_size=VOCAB_SIZE, dim=dim, num_layers=2, num_heads=4,
                     num_kv_heads=2, mlp_dim=128)
    if name == "own_gemma":
        return gemma(vocab_size=VOCAB_SIZE, dim=dim, num_layers=2, num_heads=4,
                     num_kv_heads=1, head_dim=16, mlp_dim=128)
    if name == "hf":
        return HFDecoder.from_config(transformers.LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=dim, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2))
    raise KeyError(name)


def tiny_flow_vla() -> VLA:
    """A seeded tiny policy model in eval mode: two 28 px views, a 5-d state, a flow head
    drawing chunks of 4 actions of 3 dims, both normalisers (the bundle and vla-eval
    tests)."""
    torch.manual_seed(0)
    return VLA(
        V.vit(img_size=28, patch_size=14, dim=32, depth=1, num_heads=4, mlp_dim=64),
        LinearProjector(32, 64), PrefixInterleaver(bos_id=1, eos_id=2),
        llama(vocab_size=128, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128),
        ParallelDecodingMask(), head=FlowMatchingHead(64, action_dim=3, chunk_size=4,
                                                      num_steps=3),
        proprio_projector=ProprioProjector(5, 64),
        action_normalizer=ActionNormalizer({"q01": [-1.0, 0.0, -2.0], "q99": [1.0, 1.0, 2.0]}),
        proprio_normalizer=ActionNormalizer({"q01": [-1.0] * 5, "q99": [1.0] * 5},
                                            name="proprio"),
        num_views=2,
    ).eval()
