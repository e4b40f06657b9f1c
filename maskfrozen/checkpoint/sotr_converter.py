"""Convert official SOTR checkpoints (easton-cau/SOTR, e.g. ``SOTR_R50.pth``, detectron2 ``.pth`` /
``.pkl``) to maskfrozen's ``SOTR`` meta-architecture.

An explicit table of ``(pattern, replacement)`` rows, tried in order; the first match renames
the key. The backbone (detectron2's ResNet-FPN names) is unchanged. The official twin
transformer is one flat ``layers.blocks`` list: block ``2i`` holds layer ``i``'s column (``.0``)
and row (``.1``) attention, each ``Rezero(SelfAttention)`` (gate ``fn.g``, projections
``fn.fn.to_*``); block ``2i + 1`` its two convolution branches (gate ``g``, convs ``fn.0`` /
``fn.2``). Every official tensor has a place in the model of the official defaults; nothing is
dropped. Checkpoint files are read with the one loader of the detectron2-style checkpoints,
:func:`.mask2former_converter.load_mask2former_checkpoint` (``.pkl`` or torch file).
"""
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .detr_converter import ConversionReport
from .formats import CheckpointFormat, register_format
from .key_table import convert_by_table, finish_report, rename_by_table
from .mask2former_converter import load_mask2former_checkpoint

__all__ = ["SOTR_TABLE", "convert_sotr_state_dict"]

_BLOCK = r"^cate_head\.transformer\.layers\.blocks\.(\d+)\.([01])\."
_AXES = ("col", "row")


def _layer(m) -> str:
    return f"head.transformer.layers.{int(m.group(1)) // 2}"


SOTR_TABLE: List[Tuple[str, object]] = [
    (r"^backbone\.(.*)$", r"backbone.\1"),
    # twin transformer: attention blocks (even), convolution blocks (odd)
    (_BLOCK + r"fn\.g$", lambda m: f"{_layer(m)}.{_AXES[int(m.group(2))]}_gate.alpha"),
    (_BLOCK + r"fn\.fn\.(to_q|to_kv|to_out)\.(weight|bias)$",
     lambda m: f"{_layer(m)}.{_AXES[int(m.group(2))]}_attn.{m.group(3)}.{m.group(4)}"),
    (_BLOCK + r"g$", lambda m: f"{_layer(m)}.convs.{m.group(2)}.gate.alpha"),
    (_BLOCK + r"fn\.(0|2)\.(weight|bias)$",
     lambda m: f"{_layer(m)}.convs.{m.group(2)}.conv{1 if m.group(3) == '0' else 2}.{m.group(4)}"),
    # class and kernel heads
    (r"^cate_head\.cate_pred\.(weight|bias)$", r"head.cate.\1"),
    (r"^cate_head\.kernel_pred\.(weight|bias)$", r"head.kernel.\1"),
    # mask branch: convs_all_levels.i.conv{j}.{0: conv, 1: GroupNorm}
    (r"^mask_head\.convs_all_levels\.(\d+)\.conv(\d+)\.([01])\.(weight|bias)$", r"mask_branch.levels.\1.\2.\3.\4"),
    (r"^mask_head\.conv_pred\.([01])\.(weight|bias)$", r"mask_branch.out.\1.\2"),
]


def _rename(key: str) -> Tuple[bool, Optional[str]]:
    return rename_by_table(SOTR_TABLE, key)


def convert_sotr_state_dict(
    source: Mapping[str, torch.Tensor], target: Optional[Mapping[str, torch.Tensor]] = None
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Rename an official SOTR ``state_dict`` for our ``SOTR``.

    Args:
        source: the checkpoint's tensors (``model`` entry of the .pth / .pkl).
        target: the model's state_dict; when given, shapes are checked and the model keys
            without a value reported (a model built with a non-official twin transformer option,
            e.g. ``QKV_BIAS`` or ``TWIN_NORM``, has keys the checkpoint cannot fill).
    Raises:
        ValueError: two source keys map to one model key, or any shape mismatch (all listed).
    """
    report = ConversionReport(source_format="sotr")
    converted = convert_by_table(source, _rename, report, target,
                                 shape_hint="MODEL.SOTR.NUM_CLASSES / DIM / DEPTH / NUM_KERNELS / MASK_CHANNELS, "
                                            "MODEL.FPN.OUT_CHANNELS, backbone")
    finish_report(report, converted, target)
    return converted, report


register_format(CheckpointFormat(
    "sotr", load_mask2former_checkpoint, lambda source, target, cfg: convert_sotr_state_dict(source, target),
    signature=(r"^cate_head\.transformer\.layers\.blocks\.", r"^mask_head\.convs_all_levels\."),
    description="easton-cau/SOTR"))
