"""Convert the public Co-DETR (Sense-X/Co-DETR, mmdet 2.x) Co-DINO checkpoint to
maskfrozen's ``DeformableDETRFamily`` + ``MODEL.CO_DETR`` parameter names.

One explicit table of ``(pattern, replacement)`` rows (the style and the helpers of
:mod:`.detr_converter`). ``{rcnn}`` / ``{atss}`` in a replacement stand for the index of that
auxiliary head in the target's ``MODEL.CO_DETR.AUX_HEADS``; the public positive-query
modules are indexed RoI heads first, then ATSS heads (``aux_pos_trans.0`` = Faster R-CNN,
``.1`` = ATSS in the K=2 checkpoint). Value transforms beyond renaming:

- the RPN's ``rpn_cls`` / ``rpn_reg`` output channels are permuted from mmdet's anchor
  order (ratio-major) to Detectron2's (size-major);
- mmdet's ``ChannelMapper`` convs have no bias (``ConvModule`` before GN): ours are
  filled with zeros (listed in ``zero_filled``), which computes the same function.

``include_aux_heads=False`` drops every Co-DETR tensor (adapter, positive-query embeddings,
auxiliary heads: the detector alone, e.g. to
fine-tune or evaluate a plain DINO of the same shape); an auxiliary head missing from the
target's ``AUX_HEADS`` is dropped too. The detector itself (backbone, neck, transformer,
heads, denoising label embedding: 80 sigmoid classes, no slicing) is always converted.
"""
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .key_table import convert_by_table, finish_report
from .detr_converter import ConversionReport, _torchvision_resnet
from .formats import CheckpointFormat, register_format
from .loading import load_model_tensors

__all__ = ["CO_DINO_TABLE", "CoDETRConversionReport", "convert_co_detr_state_dict", "permute_rpn_anchors"]

_QH = r"query_head\.transformer\."
_ENC = _QH + r"encoder\.layers\.(\d+)\."
_DEC = _QH + r"decoder\.layers\.(\d+)\."
_ENC_OUT = r"transformer.encoder.layers.\1."
_DEC_OUT = r"transformer.decoder.layers.\1."
_ATTN = r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)$"
_RCNN = "co_detr.heads.{rcnn}."
_ATSS = "co_detr.heads.{atss}."

CO_DINO_TABLE: List[Tuple[str, Optional[str]]] = [
    # backbone: mmdet ResNet (torchvision names without the DETR repos' "0.body." prefix)
    (r"^backbone\.conv1\.weight$", "backbone.stem.conv1.weight"),
    (r"^backbone\.bn1\.(weight|bias|running_mean|running_var)$", r"backbone.stem.conv1.norm.\1"),
    (r"^backbone\.layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)\.(weight|bias|running_mean|running_var)$",
     _torchvision_resnet),
    # neck: mmdet ChannelMapper (ConvModule: conv without bias, then "gn")
    (r"^neck\.(convs|extra_convs)\.(\d+)\.conv\.weight$", r"neck.\1.\2.conv.weight"),
    (r"^neck\.(convs|extra_convs)\.(\d+)\.gn\.(weight|bias)$", r"neck.\1.\2.norm.\3"),
    # transformer (mmcv BaseTransformerLayer: attentions / ffns / norms in operation order)
    (_QH + r"level_embeds$", "transformer.level_embeds"),
    (_ENC + r"attentions\.0\." + _ATTN, _ENC_OUT + r"self_attn.attn.\2.\3"),
    (_ENC + r"ffns\.0\.layers\.0\.0\.(weight|bias)$", _ENC_OUT + r"ffn.linear1.\2"),
    (_ENC + r"ffns\.0\.layers\.1\.(weight|bias)$", _ENC_OUT + r"ffn.linear2.\2"),
    (_ENC + r"norms\.0\.(weight|bias)$", _ENC_OUT + r"self_attn.norm.\2"),
    (_ENC + r"norms\.1\.(weight|bias)$", _ENC_OUT + r"ffn.norm.\2"),
    (_DEC + r"attentions\.0\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$",
     _DEC_OUT + r"self_attn.attn.\2"),
    (_DEC + r"attentions\.1\." + _ATTN, _DEC_OUT + r"cross_attn.attn.\2.\3"),
    (_DEC + r"ffns\.0\.layers\.0\.0\.(weight|bias)$", _DEC_OUT + r"ffn.linear1.\2"),
    (_DEC + r"ffns\.0\.layers\.1\.(weight|bias)$", _DEC_OUT + r"ffn.linear2.\2"),
    (_DEC + r"norms\.0\.(weight|bias)$", _DEC_OUT + r"self_attn.norm.\2"),
    (_DEC + r"norms\.1\.(weight|bias)$", _DEC_OUT + r"cross_attn.norm.\2"),
    (_DEC + r"norms\.2\.(weight|bias)$", _DEC_OUT + r"ffn.norm.\2"),
    (_QH + r"decoder\.ref_point_head\.0\.(weight|bias)$", r"transformer.decoder.ref_point_head.layers.0.\1"),
    (_QH + r"decoder\.ref_point_head\.2\.(weight|bias)$", r"transformer.decoder.ref_point_head.layers.1.\1"),
    (_QH + r"decoder\.norm\.(weight|bias)$", r"transformer.decoder.norm.\1"),
    (_QH + r"(enc_output|enc_output_norm)\.(weight|bias)$", r"transformer.\1.\2"),
    (_QH + r"query_embed\.weight$", "transformer.tgt_embed.weight"),
    # prediction heads: per decoder layer, the last one scores the encoder proposals (as ours)
    (r"^query_head\.cls_branches\.(\d+)\.(weight|bias)$", r"transformer.class_embed.\1.\2"),
    (r"^query_head\.reg_branches\.(\d+)\.0\.(weight|bias)$", r"transformer.bbox_embed.\1.layers.0.\2"),
    (r"^query_head\.reg_branches\.(\d+)\.2\.(weight|bias)$", r"transformer.bbox_embed.\1.layers.1.\2"),
    (r"^query_head\.reg_branches\.(\d+)\.4\.(weight|bias)$", r"transformer.bbox_embed.\1.layers.2.\2"),
    (r"^query_head\.label_embedding\.weight$", "denoising.label_enc.weight"),
    # Co-DETR: adapter, positive-query embeddings ({head} = public index -> ours), aux heads
    (r"^query_head\.downsample\.0\.(weight|bias)$", r"co_detr.adapter.conv.\1"),
    (r"^query_head\.downsample\.1\.(weight|bias)$", r"co_detr.adapter.norm.\1"),
    (_QH + r"aux_pos_trans\.(\d+)\.(weight|bias)$", r"co_detr.query_embeddings.{head\1}.pos_proj.\2"),
    (_QH + r"aux_pos_trans_norm\.(\d+)\.(weight|bias)$", r"co_detr.query_embeddings.{head\1}.pos_norm.\2"),
    (_QH + r"pos_feats_trans\.(\d+)\.(weight|bias)$", r"co_detr.query_embeddings.{head\1}.feat_proj.\2"),
    (_QH + r"pos_feats_norm\.(\d+)\.(weight|bias)$", r"co_detr.query_embeddings.{head\1}.feat_norm.\2"),
    (r"^rpn_head\.rpn_conv\.(weight|bias)$", _RCNN + r"rpn.rpn_head.conv.\1"),
    (r"^rpn_head\.rpn_cls\.(weight|bias)$", _RCNN + r"rpn.rpn_head.objectness_logits.\1"),
    (r"^rpn_head\.rpn_reg\.(weight|bias)$", _RCNN + r"rpn.rpn_head.anchor_deltas.\1"),
    (r"^roi_head\.0\.bbox_head\.shared_fcs\.0\.(weight|bias)$", _RCNN + r"roi_heads.box_head.fc1.\1"),
    (r"^roi_head\.0\.bbox_head\.shared_fcs\.1\.(weight|bias)$", _RCNN + r"roi_heads.box_head.fc2.\1"),
    (r"^roi_head\.0\.bbox_head\.fc_cls\.(weight|bias)$", _RCNN + r"roi_heads.box_predictor.cls_score.\1"),
    (r"^roi_head\.0\.bbox_head\.fc_reg\.(weight|bias)$", _RCNN + r"roi_heads.box_predictor.bbox_pred.\1"),
    (r"^bbox_head\.0\.(cls_convs|reg_convs)\.(\d+)\.conv\.weight$", _ATSS + r"\1.\2.weight"),
    (r"^bbox_head\.0\.(cls_convs|reg_convs)\.(\d+)\.gn\.(weight|bias)$", _ATSS + r"\1.\2.norm.\3"),
    (r"^bbox_head\.0\.(atss_cls|atss_reg|atss_centerness)\.(weight|bias)$", _ATSS + r"\1.\2"),
    (r"^bbox_head\.0\.scales\.(\d+)\.scale$", _ATSS + r"scales.\1"),
]

# target keys the public checkpoint has no tensor for, filled with zeros (same function)
ZERO_FILLED = r"^neck\.(convs|extra_convs)\.\d+\.conv\.bias$"


@dataclass
class CoDETRConversionReport(ConversionReport):
    zero_filled: List[str] = field(default_factory=list)  # target keys set to 0 (mmdet convs without bias)
    dropped_aux: List[str] = field(default_factory=list)  # aux-head tensors left out (not in the target config)


def permute_rpn_anchors(value: torch.Tensor, num_ratios: int, num_scales: int) -> torch.Tensor:
    """``rpn_cls`` (A rows) or ``rpn_reg`` (4A rows) weight/bias from mmdet's anchor order
    (index ``ratio * S + scale``) to Detectron2's (``scale * R + ratio``)."""
    per_anchor = value.shape[0] // (num_ratios * num_scales)
    grouped = value.reshape(num_ratios, num_scales, per_anchor, *value.shape[1:])
    return grouped.transpose(0, 1).reshape(value.shape)


def _expand(key: str, m: re.Match, replacement: str, head_index: Dict[str, Optional[int]],
            public_heads: Sequence[str]) -> Optional[str]:
    """The new key, or None when it names an aux head the target does not have."""
    new = m.expand(replacement)
    for kind in ("rcnn", "atss"):
        if "{" + kind + "}" in new:
            if head_index[kind] is None:
                return None
            new = new.replace("{" + kind + "}", str(head_index[kind]))
    head = re.search(r"\{head(\d+)\}", new)
    if head:
        kind = public_heads[int(head.group(1))]
        if head_index[kind] is None:
            return None
        new = new.replace(head.group(0), str(head_index[kind]))
    return new


def convert_co_detr_state_dict(
    source: Mapping[str, torch.Tensor],
    target: Optional[Mapping[str, torch.Tensor]] = None,
    aux_heads: Sequence[str] = ("faster_rcnn", "atss"),
    include_aux_heads: bool = True,
    public_heads: Sequence[str] = ("rcnn", "atss"),
    rpn_ratios_scales: Tuple[int, int] = (3, 3),
) -> Tuple[Dict[str, torch.Tensor], CoDETRConversionReport]:
    """Rename (and permute) a public Co-DINO ``state_dict`` (see the module doc).

    Args:
        source: the checkpoint's ``state_dict`` (tensors).
        target: the target model's ``state_dict``: shapes are checked (every mismatch
            listed in a ``ValueError``), unmatched target keys reported, neck biases filled.
        aux_heads: the target's ``MODEL.CO_DETR.AUX_HEADS`` (its head order).
        include_aux_heads: False: convert the detector only.
        public_heads: the checkpoint's positive-query order ("rcnn" heads, then "atss").
        rpn_ratios_scales: the RPN's aspect ratios and scales per octave (3, 3).
    """
    own = {"rcnn": "faster_rcnn", "atss": "atss"}
    head_index = {k: (list(aux_heads).index(v) if include_aux_heads and v in aux_heads else None)
                  for k, v in own.items()}
    report = CoDETRConversionReport(source_format="co_detr")

    def rename(key: str):
        row = next(((p, r) for p, r in CO_DINO_TABLE if re.match(p, key)), None)
        if row is None:
            return False, None
        m = re.match(row[0], key)
        new_key = row[1](m) if callable(row[1]) else _expand(key, m, row[1], head_index, public_heads)
        aux_left_out = new_key is not None and new_key.startswith("co_detr.") and not include_aux_heads
        return True, None if aux_left_out else new_key

    def permute_rpn(key, new_key, value, shape):
        return permute_rpn_anchors(value, *rpn_ratios_scales) if re.match(r"^rpn_head\.(rpn_cls|rpn_reg)\.", key) \
            else value

    converted = convert_by_table(source, rename, report, target, transform=permute_rpn, dropped=report.dropped_aux,
                                 shape_hint="NUM_CLASSES, NUM_QUERIES, HIDDEN_DIM, NUM_FEATURE_LEVELS, layers, AUX_HEADS")
    if target is not None:
        for key in target:
            if key not in converted and re.match(ZERO_FILLED, key):
                converted[key] = torch.zeros_like(target[key])
                report.zero_filled.append(key)
    finish_report(report, converted, target)
    return converted, report


def _convert_co_detr(source, target, cfg):
    co = cfg.MODEL.CO_DETR
    return convert_co_detr_state_dict(source, target, aux_heads=co.AUX_HEADS, include_aux_heads=co.ENABLED)


register_format(CheckpointFormat("co_detr", load_model_tensors, _convert_co_detr,
                                 signature=(r"^query_head\.transformer\.",), description="Sense-X/Co-DETR (mmdet)"))
