"""The two training masks on small hand-worked cases (L=8, B=2): 1 = may attend."""
import doctest

import torch

import e2d2

from conftest import rows
from e2d2 import decoder_mask, encoder_mask


def test_encoder_mask_no_prompt_is_block_causal():
    valid = torch.ones(1, 8, dtype=torch.bool)
    prompt = torch.zeros(1, 8, dtype=torch.bool)
    expected = rows(
        "11 00 00 00",
        "11 00 00 00",
        "11 11 00 00",
        "11 11 00 00",
        "11 11 11 00",
        "11 11 11 00",
        "11 11 11 11",
        "11 11 11 11",
    )
    assert torch.equal(encoder_mask(prompt, valid, 2)[0], expected)


def test_encoder_mask_prompt_is_bidirectional():
    # prompt = positions 0..2 (it ends inside block 1): every query sees all of it
    valid = torch.ones(1, 8, dtype=torch.bool)
    prompt = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    expected = rows(
        "11 10 00 00",
        "11 10 00 00",
        "11 11 00 00",
        "11 11 00 00",
        "11 11 11 00",
        "11 11 11 00",
        "11 11 11 11",
        "11 11 11 11",
    )
    assert torch.equal(encoder_mask(prompt, valid, 2)[0], expected)


def test_encoder_mask_padding_never_seen():
    # left padding at 0, a prompt at 1..3, answer 4..5, right padding 6..7
    valid = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    prompt = torch.tensor([[0, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    expected = rows(
        "10 00 00 00",  # a padding query sees only itself
        "01 11 00 00",
        "01 11 00 00",
        "01 11 00 00",
        "01 11 11 00",
        "01 11 11 00",
        "00 00 00 10",
        "00 00 00 01",
    )
    assert torch.equal(encoder_mask(prompt, valid, 2)[0], expected)


def test_decoder_mask_offset_block_causal_and_block_diagonal():
    valid = torch.ones(1, 8, dtype=torch.bool)
    # keys: 8 clean (h) | 8 noisy (x_t)
    expected = rows(
        "00 00 00 00  11 00 00 00",
        "00 00 00 00  11 00 00 00",
        "11 00 00 00  00 11 00 00",
        "11 00 00 00  00 11 00 00",
        "11 11 00 00  00 00 11 00",
        "11 11 00 00  00 00 11 00",
        "11 11 11 00  00 00 00 11",
        "11 11 11 00  00 00 00 11",
    )
    m = decoder_mask(valid, 2)
    assert m.shape == (1, 8, 16)
    assert torch.equal(m[0], expected)


def test_decoder_mask_with_padding():
    valid = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    expected = rows(
        "00 00 00 00  10 00 00 00",  # padding query: itself only
        "00 00 00 00  01 00 00 00",
        "01 00 00 00  00 11 00 00",
        "01 00 00 00  00 11 00 00",
        "01 11 00 00  00 00 11 00",
        "01 11 00 00  00 00 11 00",
        "00 00 00 00  00 00 00 10",  # padding queries: themselves only
        "00 00 00 00  00 00 00 01",
    )
    assert torch.equal(decoder_mask(valid, 2)[0], expected)


def test_masks_match_a_naive_loop():
    torch.manual_seed(0)
    L, B = 12, 3
    valid = torch.rand(3, L) > 0.2
    prompt = torch.zeros(3, L, dtype=torch.bool)
    prompt[:, :4] = True
    enc, dec = encoder_mask(prompt, valid, B), decoder_mask(valid, B)
    for b in range(3):
        for i in range(L):
            for j in range(L):
                e = bool(valid[b, j]) and (j // B <= i // B or bool(prompt[b, j]))
                if not valid[b, i]:
                    e = i == j
                assert bool(enc[b, i, j]) == e
                c = bool(valid[b, j]) and j // B < i // B
                n = bool(valid[b, j]) and j // B == i // B
                if not valid[b, i]:
                    c, n = False, i == j
                assert bool(dec[b, i, j]) == c and bool(dec[b, i, L + j]) == n


def test_the_mask_pictures_in_e2d2_docstrings_are_what_the_code_draws():
    # encoder_mask and decoder_mask draw their mask in their docstring; run as doctests, a
    # picture that no longer matches the code fails here (doctest prints both pictures)
    result = doctest.testmod(e2d2)
    assert result.attempted == 5 and result.failed == 0, result
