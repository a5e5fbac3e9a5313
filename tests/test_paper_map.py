"""docs/paper_to_code.md's FLOP statement, checked: the paper's Table 1 gives the MLP FLOPs
of one training forward as 48 N L D^2 for BD3-LM and 24 (N_enc + N_dec) L D^2 for E2D2, a
ratio of (N_enc + N_dec) / 2N. The project's own count (models.*_forward_flops, which a test
in test_benchmarks.py checks against torch's FLOP counter) must give the same ratio for its
linear layers, once its dense attention (4 d per query-key pair) and the head are taken out."""
from fractions import Fraction

import pytest

import models
from e2d2 import ModelConfig


@pytest.mark.parametrize("n_enc,n_dec", [(4, 2), (6, 1), (8, 4)])
def test_table_1_linear_flops_ratio_equals_the_projects_count(n_enc, n_dec):
    L = 16
    cfg = dict(n_enc=n_enc, n_dec=n_dec, seq_len=L, d_model=64)
    e2d2 = models.build_model(ModelConfig(decoder="shared_kv", **cfg))
    hidden = models.build_model(ModelConfig(decoder="hidden", **cfg))
    bd3lm = models.build_model(ModelConfig(model="bd3lm", **cfg))
    d, head = 64, models.head_flops(e2d2.cfg)
    # attention, counted dense: E2D2's encoder queries see L keys, its decoder's 2L; BD3-LM's
    # two tokens per x_0 token each see 2L keys in each of N layers
    linear_e2d2 = models.e2d2_forward_flops(e2d2, L) - head - 4 * d * (n_enc * L + n_dec * 2 * L)
    linear_bd3lm = models.bd3lm_forward_flops(bd3lm, L) - head - 2 * n_enc * 4 * d * 2 * L
    table_1 = Fraction(24 * (n_enc + n_dec) * L * d**2, 48 * n_enc * L * d**2)
    assert Fraction(linear_e2d2, linear_bd3lm) == table_1
    # the "hidden" decoder adds the projection of h into each decoder layer's keys and values
    assert models.e2d2_forward_flops(hidden, L) - models.e2d2_forward_flops(e2d2, L) == n_dec * 4 * d**2
