"""Dynamic per-row int8 quantization, bit-exact with the A3 `npu_attention_to_ffn`.

For a float32 row xf: amax = max|xf|; ds = float32(127 / amax); q = round-half-to-even of
the float32 product xf * ds; the stored scale is float32(1 / ds) (not amax / 127, which can
differ in the last bit). Dequantize as q * scale.

An all-zero row is undefined on the hardware; here it gives q = 0 and scale = 0, which
dequantizes to the zero row it came from.
"""

from __future__ import annotations

import torch


def quantize_rows(xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [..., H], scale float32 [...]) of float32 rows [..., H]."""
    # max |x| = max(max x, -min x): exact, and cheaper than materialising |x|
    amax = torch.maximum(xf.amax(dim=-1, keepdim=True), -xf.amin(dim=-1, keepdim=True))
    nonzero = amax > 0
    ds = torch.where(nonzero, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.mul(xf, ds).round_().to(torch.int8)
    scale = torch.where(nonzero, torch.ones_like(ds) / ds, torch.zeros_like(ds))
    return q, scale.squeeze(-1)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * scale.unsqueeze(-1)
