"""Query groups of one decoder pass and the self-attention mask that keeps them apart.

Layout along the query axis: ``[denoising groups | one-to-one | one-to-many]``.
- Matching queries (one-to-one, one-to-many) never see denoising queries (the noised
  GT would leak the answer); each denoising group sees only itself and the matching
  queries (DINO).
- One-to-one and one-to-many queries do not see each other (H-DETR's block-diagonal
  mask), so the one-to-one branch at inference is the same network as in training.
"""
from typing import Dict, Optional

import torch

__all__ = ["query_slices", "query_self_attention_mask"]


def query_slices(num_dn: int, num_one2one: int, num_one2many: int) -> Dict[str, slice]:
    """Slices of the groups along the query axis (empty groups are left out)."""
    slices = {}
    if num_dn:
        slices["dn"] = slice(0, num_dn)
    slices["one2one"] = slice(num_dn, num_dn + num_one2one)
    if num_one2many:
        slices["one2many"] = slice(num_dn + num_one2one, num_dn + num_one2one + num_one2many)
    return slices


def query_self_attention_mask(
    num_dn_groups: int, dn_group_size: int, num_one2one: int, num_one2many: int, device=None
) -> Optional[torch.Tensor]:
    """``[Q, Q]`` bool mask for ``nn.MultiheadAttention`` (True = may NOT attend), or
    None when every query may see every other."""
    num_dn = num_dn_groups * dn_group_size
    total = num_dn + num_one2one + num_one2many
    if num_dn == 0 and num_one2many == 0:
        return None
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[num_dn:, :num_dn] = True
    for g in range(num_dn_groups):
        rows = slice(g * dn_group_size, (g + 1) * dn_group_size)
        mask[rows, :num_dn] = True
        mask[rows, rows] = False
    if num_one2many:
        one2one = slice(num_dn, num_dn + num_one2one)
        one2many = slice(num_dn + num_one2one, total)
        mask[one2one, one2many] = True
        mask[one2many, one2one] = True
    return mask
