"""The gated cross-attention block's attention call: how its grouped K/V heads meet a mask on each device."""

import torch
import torch.nn.functional as F

from mm.adapters.cross_attention import grouped_kv


def test_no_mask_goes_with_enable_gqa_on_cuda_and_the_result_is_the_same():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    kc, vc, gqa = grouped_kv(k, v, n_heads=4, device_type="cuda")
    assert (
        not gqa
        and kc.shape == (2, 4, 7, 8)
        and torch.equal(kc[:, 1], k[:, 0])
        and torch.equal(kc[:, 2], k[:, 1])
    )
    grouped = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask), grouped)
    assert grouped_kv(k, v, n_heads=4, device_type="cpu")[2] is True  # the CPU keeps the grouped heads
    assert grouped_kv(kc, vc, n_heads=4, device_type="cuda")[2] is False  # as many K/V heads as queries
