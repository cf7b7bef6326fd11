import pytest
import torch

from vlakit.core import (
    IGNORE_ID,
    CausalMask,
    PrefixLMMask,
    RoleBlockMask,
    TokenRole,
)
from vlakit.interleave import PlaceholderInterleaver, PrefixInterleaver

D = 8
TABLE = torch.randn(50, D)


def embed(ids):
    return TABLE[ids]


def test_prefix_interleaver_layout_with_right_padding():
    image = torch.randn(2, 3, D)
    ids = torch.tensor([[10, 11, 12], [20, 21, 0]])
    valid = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    proprio = torch.randn(2, 1, D)
    actions = torch.randn(2, 2, D)
    action_ids = torch.tensor([[40, 41], [42, 43]])
    seq = PrefixInterleaver(bos_id=1, eos_id=2)(
        embed, image, ids, valid, extras=[(proprio, TokenRole.PROPRIO)],
        action_embeds=actions, action_ids=action_ids,
    )
    R = TokenRole
    row0 = [R.BOS, R.IMAGE, R.IMAGE, R.IMAGE, R.PROPRIO, R.TEXT, R.TEXT, R.TEXT, R.ACTION,
            R.ACTION, R.EOS]
    row1 = row0[:7] + [R.ACTION, R.ACTION, R.EOS, R.PAD]
    assert seq.roles.tolist() == [[int(r) for r in row0], [int(r) for r in row1]]
    assert seq.valid.tolist() == [[True] * 11, [True] * 10 + [False]]
    assert seq.positions[1].tolist() == list(range(10)) + [9]
    assert seq.token_ids[1].tolist() == [1] + [IGNORE_ID] * 4 + [20, 21, 42, 43, 2, IGNORE_ID]
    # embeddings follow their tokens: row 1's action slots sit right after its prompt
    torch.testing.assert_close(seq.embeds[1, 7:9], actions[1])
    torch.testing.assert_close(seq.embeds[1, 1:4], image[1])
    torch.testing.assert_close(seq.embeds[0, 0], TABLE[1])
    assert seq.is_suffix[0].tolist() == [False] * 8 + [True] * 3
    assert not seq.embeds[1, -1].any()


def test_prefix_interleaver_without_actions_has_no_eos():
    seq = PrefixInterleaver(bos_id=1, eos_id=2)(
        embed, torch.randn(1, 2, D), torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.bool)
    )
    assert seq.roles[0].tolist() == [TokenRole.BOS, TokenRole.IMAGE, TokenRole.IMAGE,
                                     TokenRole.TEXT, TokenRole.TEXT]


def test_placeholder_interleaver_replaces_placeholders_and_splits_suffix():
    image = torch.randn(2, 2, D)
    ids = torch.tensor([[49, 49, 3, 10, 11, 12, 0], [49, 49, 3, 20, 21, 0, 0]])
    valid = ids != 0
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0]])
    seq = PlaceholderInterleaver(image_token_id=49, bos_id=3, position_offset=1)(
        embed, image, ids, valid, token_type_ids=types
    )
    torch.testing.assert_close(seq.embeds[:, :2], image)
    torch.testing.assert_close(seq.embeds[0, 3], TABLE[10])
    assert seq.roles[0, :4].tolist() == [TokenRole.IMAGE, TokenRole.IMAGE, TokenRole.BOS,
                                         TokenRole.TEXT]
    assert seq.is_suffix[0].tolist() == [False] * 4 + [True, True, False]
    assert seq.positions[0, :6].tolist() == [1, 2, 3, 4, 5, 6]
    mask = PrefixLMMask()(seq)
    assert mask[0, 0, 3]  # image sees later prefix text
    assert not mask[0, 3, 4]  # prefix does not see the suffix
    assert mask[0, 5, 4] and not mask[0, 4, 5]  # suffix is causal


def test_placeholder_count_mismatch_names_counts():
    ids = torch.tensor([[49, 3, 10]])
    with pytest.raises(ValueError, match="1 image placeholder.*2 image tokens"):
        PlaceholderInterleaver(image_token_id=49)(embed, torch.randn(1, 2, D), ids,
                                                  torch.ones(1, 3, dtype=torch.bool))


def test_role_block_mask_pi0_layout():
    seq = PrefixInterleaver(bos_id=1, eos_id=None)(
        embed, torch.randn(1, 2, D), torch.tensor([[5]]), torch.ones(1, 1, dtype=torch.bool),
        extras=[(torch.randn(1, 1, D), TokenRole.PROPRIO)], action_embeds=torch.randn(1, 2, D),
    )
    R = TokenRole
    policy = RoleBlockMask([{R.BOS, R.IMAGE, R.TEXT}, {R.PROPRIO}, {R.ACTION}])
    m = policy(seq)[0]
    prefix = seq.role_mask(R.BOS, R.IMAGE, R.TEXT)[0]
    proprio = seq.role_mask(R.PROPRIO)[0]
    actions = seq.role_mask(R.ACTION)[0]
    assert not m[prefix][:, proprio | actions].any()
    assert m[proprio][:, prefix | proprio].all() and not m[proprio][:, actions].any()
    assert m[actions].all()
    assert not CausalMask()(seq)[0, 0, 1]
    with pytest.raises(ValueError, match="PROPRIO"):
        RoleBlockMask([{R.PROPRIO}, {R.PROPRIO}])


def test_gather_keeps_fields_in_step():
    seq = PrefixInterleaver(bos_id=1, eos_id=2)(
        embed, torch.randn(1, 3, D), torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.bool)
    )
    kept = seq.gather(torch.tensor([[0, 2, 4]]))
    assert kept.roles.tolist() == [[TokenRole.BOS, TokenRole.IMAGE, TokenRole.TEXT]]
    assert kept.positions.tolist() == [[0, 2, 4]]
    torch.testing.assert_close(kept.embeds[0, 1], seq.embeds[0, 2])
