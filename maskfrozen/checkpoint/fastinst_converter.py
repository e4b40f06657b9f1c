"""Convert official FastInst checkpoints (junjiehe96/FastInst, e.g.
``fastinst_R50_ppm-fpn_x1_576_*.pth``, detectron2 ``.pth`` / ``.pkl``) to maskfrozen's
``QuerySegmentor`` with the ``PyramidPoolingModuleFPN`` pixel decoder and ``FastInstDecoder``.

An explicit table of ``(pattern, replacement)`` rows, tried in order; the first match renames
the key (``None`` drops it). The backbone (detectron2's ResNet) is unchanged. Beyond renaming:

- the FPN convs: the official ``adapter_k`` / ``layer_k`` count from the finest level
  (k = 1 is res3), ours ``lateral_convs.i`` / ``output_convs.i`` from the coarsest (i = 0 is
  res5), so i = 3 - k;
- ``meta_pos_embed`` is ``[1, C, s, s]`` there and ``[C, s, s]`` here (the leading 1 is
  dropped by the transform hook);
- the criterion's ``empty_weight`` buffer is dropped, in both places the official model holds
  it (``criterion.`` and ``sem_seg_head.predictor.criterion.``: the official meta-arch also
  assigns its criterion to the predictor, which registers it as a submodule there).

Checks as in :mod:`.mask2former_converter`: every converted tensor must have the model's shape
(all mismatches listed), and the :class:`ConversionReport` lists unused source keys and model
keys left without a value. Checkpoint files are read with the one loader of the detectron2-style
checkpoints, :func:`.mask2former_converter.load_mask2former_checkpoint` (``.pkl`` or torch file).
"""
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .detr_converter import ConversionReport
from .key_table import convert_by_table, finish_report, rename_by_table
from .formats import CheckpointFormat, register_format
from .mask2former_converter import load_mask2former_checkpoint

__all__ = ["FASTINST_TABLE", "convert_fastinst_state_dict"]

_PD = r"^sem_seg_head\.pixel_decoder\."
_DEC = r"^sem_seg_head\.predictor\."
_LAYER_OUT = r"transformer_decoder.layers.\1."
_NUM_FPN_LEVELS = 3  # PyramidPoolingModuleFPN always has res3, res4, res5
_META_POS = "transformer_decoder.meta_pos_embed"


def _fpn(kind: str):
    """``adapter_{k}`` / ``layer_{k}`` (1-based, finest first) -> ``{kind}.{3-k}`` (coarsest first)."""
    return lambda m: f"pixel_decoder.{kind}.{_NUM_FPN_LEVELS - int(m.group(1))}.{m.group(2)}"


_ATTN = r"(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$"
_FFN = r"(linear1|linear2|norm)\.(weight|bias)$"

FASTINST_TABLE: List[Tuple[str, object]] = [
    (r"^backbone\.(.*)$", r"backbone.\1"),
    (r"^criterion\.empty_weight$", None),
    (_DEC + r"criterion\.empty_weight$", None),
    # pixel decoder (PyramidPoolingModuleFPN)
    (_PD + r"adapter_([1-3])\.(weight|bias|norm\.weight|norm\.bias)$", _fpn("lateral_convs")),
    (_PD + r"layer_([1-3])\.(weight|bias|norm\.weight|norm\.bias)$", _fpn("output_convs")),
    (_PD + r"ppm\.stages\.(\d+)\.1\.(weight|bias)$", r"pixel_decoder.ppm.stages.\1.1.\2"),
    (_PD + r"ppm\.bottleneck\.(weight|bias)$", r"pixel_decoder.ppm.bottleneck.\1"),
    # transformer decoder (FastInstDecoder): queries, positions, proposals
    (_DEC + r"meta_pos_embed$", _META_POS),
    (_DEC + r"empty_query_features\.weight$", "transformer_decoder.aux_query_feat.weight"),
    (_DEC + r"empty_query_pos_embed\.weight$", "transformer_decoder.aux_query_pos.weight"),
    (_DEC + r"query_proposal\.conv_proposal_cls_logits\.(0|2)\.(weight|bias)$",
     r"transformer_decoder.query_proposal.conv_proposal_cls_logits.\1.\2"),
    # dual-path layers: query path (masked cross-attention, self-attention, FFN), pixel path
    (_DEC + r"transformer_query_cross_attention_layers\.(\d+)\.multihead_attn\." + _ATTN,
     _LAYER_OUT + r"query_cross_attention.attn.\2"),
    (_DEC + r"transformer_query_cross_attention_layers\.(\d+)\.norm\.(weight|bias)$",
     _LAYER_OUT + r"query_cross_attention.norm.\2"),
    (_DEC + r"transformer_query_self_attention_layers\.(\d+)\.self_attn\." + _ATTN,
     _LAYER_OUT + r"query_self_attention.attn.\2"),
    (_DEC + r"transformer_query_self_attention_layers\.(\d+)\.norm\.(weight|bias)$",
     _LAYER_OUT + r"query_self_attention.norm.\2"),
    (_DEC + r"transformer_query_ffn_layers\.(\d+)\." + _FFN, _LAYER_OUT + r"query_ffn.\2.\3"),
    (_DEC + r"transformer_mask_cross_attention_layers\.(\d+)\.multihead_attn\." + _ATTN,
     _LAYER_OUT + r"pixel_cross_attention.attn.\2"),
    (_DEC + r"transformer_mask_cross_attention_layers\.(\d+)\.norm\.(weight|bias)$",
     _LAYER_OUT + r"pixel_cross_attention.norm.\2"),
    (_DEC + r"transformer_mask_ffn_layers\.(\d+)\." + _FFN, _LAYER_OUT + r"pixel_ffn.\2.\3"),
    # prediction heads j = 0..L (j = 0: before the first layer)
    (_DEC + r"decoder_query_norm_layers\.(\d+)\.(weight|bias)$", r"transformer_decoder.heads.\1.norm.\2"),
    (_DEC + r"class_embed_layers\.(\d+)\.layers\.(\d+)\.(weight|bias)$",
     r"transformer_decoder.heads.\1.class_embed.layers.\2.\3"),
    (_DEC + r"mask_embed_layers\.(\d+)\.layers\.(\d+)\.(weight|bias)$",
     r"transformer_decoder.heads.\1.mask_embed.layers.\2.\3"),
    (_DEC + r"mask_features_layers\.(\d+)\.(weight|bias)$", r"transformer_decoder.heads.\1.pixel_proj.\2"),
]


def _rename(key: str) -> Tuple[bool, Optional[str]]:
    return rename_by_table(FASTINST_TABLE, key)


def _transform(key: str, new_key: str, value: torch.Tensor, target_shape: Optional[tuple]) -> torch.Tensor:
    """``meta_pos_embed [1, C, s, s] -> [C, s, s]``; other tensors unchanged (any other leading
    size is left for the shape check to report)."""
    if new_key == _META_POS and value.dim() == 4 and value.shape[0] == 1:
        return value[0]
    return value


def convert_fastinst_state_dict(
    source: Mapping[str, torch.Tensor], target: Optional[Mapping[str, torch.Tensor]] = None
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Rename an official FastInst ``state_dict`` for ``QuerySegmentor`` + ``FastInstDecoder``.

    Args:
        source: the checkpoint's tensors (``model`` entry of the .pth / .pkl).
        target: the model's state_dict; when given, shapes are checked and the model keys
            without a value reported.
    Raises:
        ValueError: two source keys map to one model key, or any shape mismatch (all listed).
    """
    report = ConversionReport(source_format="fastinst")
    converted = convert_by_table(
        source, _rename, report, target, transform=_transform,
        shape_hint="SEM_SEG_HEAD.NUM_CLASSES / CONVS_DIM / MASK_DIM, FASTINST.HIDDEN_DIM / NUM_OBJECT_QUERIES / "
                   "NUM_AUX_QUERIES / DIM_FEEDFORWARD / DEC_LAYERS, backbone")
    finish_report(report, converted, target)
    return converted, report


register_format(CheckpointFormat(
    "fastinst", load_mask2former_checkpoint, lambda source, target, cfg: convert_fastinst_state_dict(source, target),
    # the IA-guided query proposal and the PPM-FPN pixel decoder
    signature=(r"^sem_seg_head\.predictor\.query_proposal\.", r"^sem_seg_head\.pixel_decoder\.ppm\."),
    description="junjiehe96/FastInst"))
