import torch

from vlakit.core import (
    bidirectional_mask,
    causal_mask,
    positions_from_valid,
    prefix_lm_mask,
    segment_mask,
)


def _reference_mask(allowed_fn, valid):
    b, n = valid.shape
    out = torch.zeros(b, n, n, dtype=torch.bool)
    for i in range(b):
        for q in range(n):
            for k in range(n):
                out[i, q, k] = (allowed_fn(i, q, k) and bool(valid[i, k])) or q == k
    return out


VALID = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)


def test_causal_mask_matches_loop_definition():
    expected = _reference_mask(lambda i, q, k: k <= q, VALID)
    assert torch.equal(causal_mask(VALID), expected)


def test_bidirectional_mask_matches_loop_definition():
    expected = _reference_mask(lambda i, q, k: True, VALID)
    assert torch.equal(bidirectional_mask(VALID), expected)


def test_prefix_lm_mask_prefix_both_ways_suffix_causal():
    is_suffix = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)

    def allowed(i, q, k):
        if not is_suffix[i, k]:
            return True  # everyone sees the whole prefix
        return bool(is_suffix[i, q]) and k <= q

    assert torch.equal(prefix_lm_mask(is_suffix, VALID), _reference_mask(allowed, VALID))


def test_segment_mask_pi0_blocks():
    # prefix (3 tokens) | state | 2 actions: prefix cannot see state/actions,
    # state sees prefix + itself, actions see everything and each other.
    seg = torch.tensor([[0, 0, 0, 1, 2, 2]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    m = segment_mask(seg, valid)[0]
    assert not m[:3, 3:].any()
    assert m[3, :4].all() and not m[3, 4:].any()
    assert m[4:, :].all()


def test_padding_rows_are_never_empty():
    m = causal_mask(VALID)
    assert m.any(dim=-1).all()


def test_positions_skip_left_padding():
    assert positions_from_valid(VALID).tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
