"""pi0 and pi0.5: the full-size models on the meta device, block by block beside openpi's
layout and LeRobot's in-memory build, then a tiny pi0 and pi0.5 predicting action chunks.

python examples/pi0.py
"""

import torch

from vlakit import count_parameters
from vlakit.actions import ActionNormalizer
from vlakit.models import pi0, pi0_3b, pi0_decoder, pi0_expert, pi05, pi05_3b
from vlakit.processors import Pi0Processor, Pi05Processor, pi05_prompt, word_tokenizer
from vlakit.projectors import LinearProjector
from vlakit.vision import vit


def block_rows(model) -> list[tuple[str, int]]:
    """(block, parameters) of a pi0-family model, in the order the forward runs them."""
    decoder, head = model.decoder, model.head
    expert = head.expert
    last = len(decoder.layers) - 1
    rows = [
        ("SigLIP So400m/14 (encoder)", count_parameters(model.encoder)),
        ("projector Linear(1152, 2048)", count_parameters(model.projector)),
        ("Gemma-2B embedding (tied)", count_parameters(decoder.embed)),
        (f"Gemma-2B layers 0-{last - 1}", sum(count_parameters(m) for m in decoder.layers[:-1])),
        (f"Gemma-2B layer {last}", count_parameters(decoder.layers[-1])),
        ("Gemma-2B final norm", count_parameters(decoder.norm)),
        ("action expert layers", count_parameters(expert.layers)),
        ("action expert final norm", count_parameters(expert.norm)),
        ("head projections", count_parameters(head) - count_parameters(expert)),
    ]
    assert sum(n for _, n in rows) == count_parameters(model)
    return rows


def compare(name: str, ours, openpi_layout) -> None:
    """Print vlakit's blocks beside openpi's layout (what the published PyTorch checkpoints
    hold but their LM heads) and LeRobot's in-memory build (openpi's plus both LM heads)."""
    vocab, width, expert_width = ours.decoder.vocab_size, ours.decoder.dim, ours.head.width
    lm_heads = [("PaliGemma LM head (untied)", vocab * width),
                ("action expert LM head", vocab * expert_width)]
    mine, theirs = block_rows(ours), block_rows(openpi_layout)
    print(f"{name}:")
    print(f"  {'block':<30} {'vlakit':>15} {'openpi layout':>15} {'LeRobot memory':>15}")
    for (block, n), (_, m) in zip(mine, theirs):
        print(f"  {block:<30} {n:>15,} {m:>15,} {m:>15,}")
    for block, n in lm_heads:
        print(f"  {block:<30} {0:>15,} {0:>15,} {n:>15,}")
    total, openpi = count_parameters(ours), count_parameters(openpi_layout)
    lerobot = openpi + sum(n for _, n in lm_heads)
    print(f"  {'total':<30} {total:>15,} {openpi:>15,} {lerobot:>15,}")
    print(f"  openpi's layout (its modules less the LM heads) adds {openpi - total:,} never "
          f"read (the last Gemma layer's "
          f"queries, output projection, MLP and post-attention norm, the final norm"
          + (", the expert's final-norm gate rows" if name.startswith("pi0.5") else "")
          + f"); LeRobot's build adds {lerobot - openpi:,} more (both LM heads)")


def tiny_parts(tokenizer):
    """A tiny PaliGemma-shaped prefix and a matching expert (same depth, key/value heads
    and head width); image placeholder = one past the vocabulary, as in pi0."""
    torch.manual_seed(0)
    vocab = len(tokenizer)
    return dict(
        encoder=vit(img_size=28, patch_size=14, dim=48, depth=2, num_heads=4, mlp_dim=96),
        projector=LinearProjector(48, 64, bias=True),
        decoder=pi0_decoder(vocab_size=vocab, dim=64, num_layers=2, num_heads=4,
                            num_kv_heads=1, head_dim=16, mlp_dim=128),
        image_token_id=vocab, bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
        action_dim=7, chunk_size=10, max_dim=32, num_views=2,
    )


def main() -> None:
    compare("pi0 (pi0_3b)", pi0_3b(device="meta"),
            pi0_3b(device="meta", last_layer_kv_only=False))
    print()
    compare("pi0.5 (pi05_3b)", pi05_3b(device="meta"),
            pi05_3b(device="meta", last_layer_kv_only=False, keep_final_gate=True))
    kept = count_parameters(pi05_3b(device="meta", keep_final_gate=True))
    print(f"  pi05_3b(keep_final_gate=True) keeps the final norm's gate rows: {kept:,}")
    print()

    # tiny models: 2 cameras, 7 action dims padded to 32, chunks of 10
    tasks = ["pick up the red block", "open the drawer", "put the block in the box"]
    states = torch.rand(3, 8) * 2 - 1                      # raw robot state [b, 8]
    images = torch.randint(0, 256, (3, 2, 3, 64, 64), dtype=torch.uint8)
    tokenizer = word_tokenizer([*tasks, pi05_prompt("x", torch.zeros(8))])
    stats = {"mean": [0.0] * 7, "std": [0.5] * 7}
    expert = dict(dim=32, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16, mlp_dim=64)

    model = pi0(expert=pi0_expert(**expert), **tiny_parts(tokenizer),
                action_normalizer=ActionNormalizer(stats, mode="normal", form="lerobot")).eval()
    batch = Pi0Processor.from_model(tokenizer, model)(images, tasks, proprio=states)
    actions = model.predict_action(batch)                  # [3, 10, 7], unnormalised
    print(f"tiny pi0: {count_parameters(model):,} parameters, actions {tuple(actions.shape)}, "
          f"first step of robot 0: {[round(v, 3) for v in actions[0, 0].tolist()]}")

    bounds = ActionNormalizer({"q01": [-1.0] * 8, "q99": [1.0] * 8}, mode="bounds_q99",
                              form="lerobot", name="proprio")
    model = pi05(expert=pi0_expert(**expert, cond_dim=32), state_normalizer=bounds,
                 **tiny_parts(tokenizer)).eval()
    batch = Pi05Processor.from_model(tokenizer, model)(images, tasks, proprio=states)
    actions = model.predict_action(batch)                  # [3, 10, 7]; state in the prompt
    prompt = pi05_prompt(tasks[0], bounds.normalize(states[0]))
    print(f"tiny pi0.5: {count_parameters(model):,} parameters, actions "
          f"{tuple(actions.shape)}, prompt of robot 0: {prompt!r}")


if __name__ == "__main__":
    main()
