"""RoIAlign with a fast CPU backward for the Faster R-CNN auxiliary head.

torchvision's CPU ``roi_align`` backward recomputes every sample's bilinear weights once
per channel and adds them one at a time (~0.1 s per Co-DINO shapes step, more than the
rest of the RoI head). Here the forward is torchvision's own (bit-identical outputs) and
the backward is one sparse matrix product: the gradient of an aligned RoIAlign with a
fixed sampling ratio is ``S^T @ grad`` where ``S [R * PH * PW, N * H * W]`` holds each
bin's bilinear weights, computed with torchvision's kernel rules (samples beyond
``[-1, size]`` are dropped, coordinates clamped at 0, the last row/column repeated). The
values are the same sums as torchvision's in another order (float rounding only, ~1e-7
relative).

:class:`SparseGradROIPooler` runs all levels in one autograd node, so the per-level
``index_put_`` of detectron2's pooler (whose backward clones the whole pooled gradient
once per level) is gone too. Other cases (``aligned=False``, adaptive sampling
``sampling_ratio <= 0``, GPU tensors, no gradient needed) run detectron2's ``ROIPooler``
unchanged. The RoIs never get a gradient (detectron2's proposals are detached).
"""
from typing import List, Tuple

import torch
from detectron2.layers import ROIAlign
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels, convert_boxes_to_pooler_format
from detectron2.structures import Boxes
from torchvision.ops import roi_align

__all__ = ["SparseGradROIPooler", "roi_align_input_grad"]


def _axis_samples(start: torch.Tensor, end: torch.Tensor, pooled: int, grid: int,
                  size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Along one axis, per RoI ``[R]`` (``start``/``end`` in feature-map cells): the
    ``2 * grid`` cells each of the ``pooled`` bins reads and their bilinear weights, both
    ``[R, pooled, 2 * grid]`` (torchvision's ``bilinear_interpolate_gradient``)."""
    bin_size = (end - start) / pooled
    bins = torch.arange(pooled, dtype=start.dtype, device=start.device)
    offsets = torch.arange(grid, dtype=start.dtype, device=start.device) + 0.5
    pos = (start[:, None, None] + bins[None, :, None] * bin_size[:, None, None]) \
        + offsets * bin_size[:, None, None] / grid
    valid = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0.0)
    low = pos.long()
    edge = low >= size - 1
    low = torch.where(edge, size - 1, low)
    high = torch.where(edge, low, low + 1)
    frac = torch.where(edge, torch.zeros_like(pos), pos - low.to(pos.dtype))
    weights = torch.stack([1.0 - frac, frac], -1) * valid[..., None]
    return torch.stack([low, high], -1).flatten(2), weights.flatten(2)


def roi_align_input_grad(grad: torch.Tensor, rois: torch.Tensor, input_shape: torch.Size, spatial_scale: float,
                         sampling_ratio: int) -> torch.Tensor:
    """Gradient w.r.t. the ``input_shape [N, C, H, W]`` features of an aligned RoIAlign
    (``rois [R, 5]`` = batch index, XYXY; fixed ``sampling_ratio``) given the output's
    ``grad [R, C, PH, PW]``: ``S^T @ grad`` with the sparse bilinear matrix ``S``."""
    n, c, h, w = input_shape
    r, _, ph, pw = grad.shape
    if r == 0:
        return grad.new_zeros(input_shape)
    box = rois[:, 1:] * spatial_scale - 0.5
    rows, wy = _axis_samples(box[:, 1], box[:, 3], ph, sampling_ratio, h)  # [R, PH, K]
    cols, wx = _axis_samples(box[:, 0], box[:, 2], pw, sampling_ratio, w)  # [R, PW, K]
    image = rois[:, 0].long() * (h * w)
    cells = image[:, None, None, None, None] + rows[:, :, None, :, None] * w + cols[:, None, :, None, :]
    weights = wy[:, :, None, :, None] * wx[:, None, :, None, :] / (sampling_ratio * sampling_ratio)
    bins = torch.arange(r * ph * pw, device=grad.device).view(r, ph, pw, 1, 1).expand_as(cells)
    matrix_t = torch.sparse_coo_tensor(torch.stack([cells.reshape(-1), bins.reshape(-1)]), weights.reshape(-1),
                                       (n * h * w, r * ph * pw), check_invariants=False)
    flat = torch.sparse.mm(matrix_t, grad.permute(0, 2, 3, 1).reshape(r * ph * pw, c))
    return flat.view(n, h, w, c).permute(0, 3, 1, 2).contiguous()


def _level_indices(pooler: ROIPooler, box_lists: List[Boxes]) -> List[torch.Tensor]:
    """Per pooler level, the indices of the RoIs it pools (detectron2's assignment)."""
    if len(pooler.level_poolers) == 1:
        return [torch.arange(sum(len(b) for b in box_lists), device=box_lists[0].device)]
    levels = assign_boxes_to_levels(box_lists, pooler.min_level, pooler.max_level, pooler.canonical_box_size,
                                    pooler.canonical_level)
    return [torch.nonzero(levels == i).squeeze(1) for i in range(len(pooler.level_poolers))]


class _MultiLevelROIAlign(torch.autograd.Function):
    """Every level's torchvision ``roi_align`` written into one output (as ``ROIPooler``
    does), and a backward that pools each level's rows back with
    :func:`roi_align_input_grad` (no per-level ``index_put`` gradients)."""

    @staticmethod
    def forward(ctx, rois, indices, spatial_scales, output_size, sampling_ratio, *features):
        output = features[0].new_zeros((rois.shape[0], features[0].shape[1]) + tuple(output_size))
        for x, inds, scale in zip(features, indices, spatial_scales):
            if len(inds):
                output[inds] = roi_align(x, rois[inds], output_size, scale, sampling_ratio, True)
        ctx.save_for_backward(rois)
        ctx.indices, ctx.spatial_scales, ctx.sampling_ratio = indices, spatial_scales, sampling_ratio
        ctx.shapes = [x.shape for x in features]
        return output

    @staticmethod
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        grads = []
        for i, (inds, scale, shape) in enumerate(zip(ctx.indices, ctx.spatial_scales, ctx.shapes)):
            if not ctx.needs_input_grad[5 + i] or len(inds) == 0:
                grads.append(None)
                continue
            grads.append(roi_align_input_grad(grad[inds], rois[inds], shape, scale, ctx.sampling_ratio))
        return (None, None, None, None, None, *grads)


class SparseGradROIPooler(ROIPooler):
    """detectron2's ``ROIPooler`` (same arguments, same outputs) whose aligned RoIAlign
    levels backpropagate with the sparse product (see module doc)."""

    def forward(self, x: List[torch.Tensor], box_lists: List[Boxes]) -> torch.Tensor:
        levels = self.level_poolers
        fast = (len(box_lists) > 0 and all(type(p) is ROIAlign and p.aligned for p in levels)
                and levels[0].sampling_ratio > 0 and torch.is_grad_enabled() and any(f.requires_grad for f in x)
                and all(f.device.type == "cpu" and not f.is_quantized for f in x))
        if not fast or len(x) != len(levels):
            return super().forward(x, box_lists)
        rois = convert_boxes_to_pooler_format(box_lists).to(dtype=x[0].dtype)
        return _MultiLevelROIAlign.apply(rois, _level_indices(self, box_lists), [p.spatial_scale for p in levels],
                                         levels[0].output_size, levels[0].sampling_ratio, *x)
