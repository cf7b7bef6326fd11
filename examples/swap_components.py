"""Start from the OpenVLA recipe, swap in a single SigLIP encoder and a Gemma decoder.

python examples/swap_components.py
"""

import torch

from vlakit import count_parameters
from vlakit.actions import ActionTokenizer
from vlakit.decoders import gemma, llama
from vlakit.models import openvla
from vlakit.processors import OPENVLA_PROMPT, OpenVLAProcessor, word_tokenizer
from vlakit.projectors import MLPProjector
from vlakit.vision import FusedEncoder, vit


def tiny_openvla(encoder, decoder):
    return openvla(
        encoder=encoder,
        projector=MLPProjector([encoder.dim, 4 * encoder.dim, decoder.dim, decoder.dim]),
        decoder=decoder,
        action_tokenizer=ActionTokenizer(vocab_end=300, action_dim=7),
    ).eval()


INSTRUCTIONS = ["put the cup in the box", "open the drawer"]
TOKENIZER = word_tokenizer([OPENVLA_PROMPT, *INSTRUCTIONS])  # tiny, in memory


def run(name, model):
    processor = OpenVLAProcessor.from_model(TOKENIZER, model)
    images = torch.rand(2, 3, 56, 56)
    instructions = INSTRUCTIONS
    inputs = processor(images, instructions, actions=torch.rand(2, 1, 7) * 2 - 1)
    loss = model(inputs).loss
    actions = model.predict_action(processor(images, instructions))
    print(
        f"{name:<34} {count_parameters(model):>10,} params  encoder width {model.encoder.dim:>3}"
        f"  loss {loss.item():.3f}  actions {tuple(actions.shape)}"
    )


def main() -> None:
    torch.manual_seed(0)
    dino = vit(
        img_size=56,
        patch_size=14,
        dim=32,
        depth=3,
        num_heads=4,
        mlp_dim=64,
        layer_scale_init=1e-5,
        class_token=True,
        reg_tokens=4,
        output_layer=-2,
    )
    siglip = vit(
        img_size=56,
        patch_size=14,
        dim=48,
        depth=3,
        num_heads=4,
        mlp_dim=96,
        gelu_approximate="tanh",
        output_layer=-2,
    )
    llama_lm = llama(vocab_size=320, dim=128, num_layers=2, num_heads=4, mlp_dim=256)
    run(
        "OpenVLA recipe (DINOv2+SigLIP, Llama)",
        tiny_openvla(FusedEncoder([dino, siglip]), llama_lm),
    )

    # The swap: one SigLIP tower (all blocks, final norm) and a Gemma decoder. The projector
    # is rebuilt for the new widths; everything else is the same recipe.
    siglip_only = vit(
        img_size=56,
        patch_size=14,
        dim=48,
        depth=3,
        num_heads=4,
        mlp_dim=96,
        gelu_approximate="tanh",
    )
    gemma_lm = gemma(
        vocab_size=320,
        dim=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=1,
        head_dim=32,
        mlp_dim=256,
    )
    run("swapped (SigLIP only, Gemma)", tiny_openvla(siglip_only, gemma_lm))


if __name__ == "__main__":
    main()
