"""vlakit quickstart: build a tiny decoder from blocks and generate with a KV cache.

    python examples/quickstart.py
"""

import torch

from vlakit.core import causal_mask, positions_from_valid
from vlakit.decoders import greedy_generate, llama


def main() -> None:
    torch.manual_seed(0)
    decoder = llama(vocab_size=256, dim=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    hidden_dim=344).eval()
    n_params = sum(p.numel() for p in decoder.parameters())
    print(f"built a Llama-style decoder: {decoder.num_layers} layers, d={decoder.dim}, "
          f"{n_params:,} parameters")

    prompt = torch.randint(0, 256, (2, 6))
    valid = torch.ones_like(prompt, dtype=torch.bool)
    valid[1, :2] = False  # the second prompt is shorter: left padding
    tokens = greedy_generate(decoder, decoder.embed_tokens(prompt), causal_mask(valid),
                             positions_from_valid(valid), valid, max_new_tokens=8)
    print(f"generated {tokens.shape[1]} tokens per prompt: {tokens.tolist()}")


if __name__ == "__main__":
    main()
