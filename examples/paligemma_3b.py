"""PaliGemma-3B: the full-size model on the meta device, then the same recipe at tiny size.

python examples/paligemma_3b.py
"""

import torch

from vlakit import parameter_table
from vlakit.decoders import gemma
from vlakit.models import paligemma, paligemma_3b
from vlakit.processors import PaliGemmaProcessor, word_tokenizer
from vlakit.projectors import LinearProjector
from vlakit.vision import vit


def main() -> None:
    print("PaliGemma-3B (pt-224) on the meta device:")
    print(parameter_table(paligemma_3b(device="meta"), depth=2))

    # The same recipe at tiny size: SigLIP-style ViT -> linear projector -> Gemma, prefix-LM.
    torch.manual_seed(0)
    image_token_id, bos, eos = 500, 1, 2  # word_tokenizer: <s> 1, </s> 2
    encoder = vit(
        img_size=56,
        patch_size=14,
        dim=64,
        depth=2,
        num_heads=4,
        mlp_dim=128,
        gelu_approximate="tanh",
        final_norm=True,
    )
    model = paligemma(
        encoder=encoder,
        projector=LinearProjector(64, 128, bias=True),
        decoder=gemma(
            vocab_size=512,
            dim=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=1,
            head_dim=32,
            mlp_dim=256,
        ),
        image_token_id=image_token_id,
        bos_id=bos,
        eos_id=eos,
    ).eval()
    n_img = encoder.patches_per_image
    # A real model's tokenizer: AutoTokenizer.from_pretrained(path); here a tiny one
    # built in memory. from_model takes the preprocessing, the image token count and the
    # placeholder, <bos> and <eos> ids from the model.
    processor = PaliGemmaProcessor.from_model(word_tokenizer("caption the image"), model)
    # <image> x 16, <bos>, prompt, "\n"; the image may be any size (resized to 56 px)
    inputs = processor(torch.rand(1, 3, 80, 80), "caption the image")
    tokens = model.generate(inputs, max_new_tokens=6)
    print(
        f"\ntiny PaliGemma recipe: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{n_img} image tokens; generated {tokens.tolist()[0]}"
    )


if __name__ == "__main__":
    main()
