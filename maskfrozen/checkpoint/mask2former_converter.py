"""Convert official Mask2Former checkpoints (facebookresearch/Mask2Former ``model_final_*.pkl``
/ ``.pth``, instance segmentation) to maskfrozen's ``QuerySegmentor`` parameter names.

An explicit table of ``(pattern, replacement)`` rows, tried in order; the first match renames
the key (``None`` drops it: the criterion's ``empty_weight`` buffer, which our criterion keeps
as a number). The backbone (detectron2's ResNet / Swin names) is unchanged. Checks as in
:mod:`.detr_converter`: every converted tensor must have the model's shape (all mismatches
listed), and the :class:`ConversionReport` lists unused source keys and model keys left
without a value.
"""
import pickle
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from .detr_converter import ConversionReport
from .key_table import convert_by_table, finish_report, rename_by_table
from .loading import CheckpointFormatError, load_model_tensors
from .formats import CheckpointFormat, register_format

__all__ = ["MASK2FORMER_TABLE", "convert_mask2former_state_dict", "load_mask2former_checkpoint"]

_PD = r"^sem_seg_head\.pixel_decoder\."
_ENC = _PD + r"transformer\.encoder\.layers\.(\d+)\."
_ENC_OUT = r"pixel_decoder.encoder.layers.\1."
_DEC = r"^sem_seg_head\.predictor\."


def _fpn(kind: str):
    """``adapter_{k}`` / ``layer_{k}`` (1-based, finest first) -> ``{kind}.{k-1}``."""
    return lambda m: f"pixel_decoder.{kind}.{int(m.group(1)) - 1}.{m.group(2)}"


MASK2FORMER_TABLE: List[Tuple[str, object]] = [
    (r"^backbone\.(.*)$", r"backbone.\1"),
    (r"^criterion\.empty_weight$", None),
    # pixel decoder (MSDeformAttnPixelDecoder)
    (_PD + r"input_proj\.(\d+)\.(0|1)\.(weight|bias)$", r"pixel_decoder.input_proj.\1.\2.\3"),
    (_PD + r"transformer\.level_embed$", "pixel_decoder.level_embed"),
    (_ENC + r"self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)$",
     _ENC_OUT + r"self_attn.attn.\2.\3"),
    (_ENC + r"norm1\.(weight|bias)$", _ENC_OUT + r"self_attn.norm.\2"),
    (_ENC + r"(linear1|linear2)\.(weight|bias)$", _ENC_OUT + r"ffn.\2.\3"),
    (_ENC + r"norm2\.(weight|bias)$", _ENC_OUT + r"ffn.norm.\2"),
    (_PD + r"mask_features\.(weight|bias)$", r"pixel_decoder.mask_features.\1"),
    (_PD + r"adapter_(\d+)\.(weight|bias|norm\.weight|norm\.bias)$", _fpn("lateral_convs")),
    (_PD + r"layer_(\d+)\.(weight|bias|norm\.weight|norm\.bias)$", _fpn("output_convs")),
    # transformer decoder (MultiScaleMaskedTransformerDecoder)
    (_DEC + r"transformer_self_attention_layers\.(\d+)\.self_attn\.(.*)$",
     r"transformer_decoder.self_attention_layers.\1.attn.\2"),
    (_DEC + r"transformer_self_attention_layers\.(\d+)\.norm\.(weight|bias)$",
     r"transformer_decoder.self_attention_layers.\1.norm.\2"),
    (_DEC + r"transformer_cross_attention_layers\.(\d+)\.multihead_attn\.(.*)$",
     r"transformer_decoder.cross_attention_layers.\1.attn.\2"),
    (_DEC + r"transformer_cross_attention_layers\.(\d+)\.norm\.(weight|bias)$",
     r"transformer_decoder.cross_attention_layers.\1.norm.\2"),
    (_DEC + r"transformer_ffn_layers\.(\d+)\.(linear1|linear2|norm)\.(weight|bias)$",
     r"transformer_decoder.ffn_layers.\1.\2.\3"),
    (_DEC + r"(decoder_norm|class_embed)\.(weight|bias)$", r"transformer_decoder.\1.\2"),
    (_DEC + r"(query_feat|query_embed|level_embed)\.weight$", r"transformer_decoder.\1.weight"),
    (_DEC + r"static_query\.weight$", "transformer_decoder.query_feat.weight"),  # checkpoints before v2
    (_DEC + r"input_proj\.(\d+)\.(weight|bias)$", r"transformer_decoder.input_proj.\1.\2"),
    (_DEC + r"mask_embed\.layers\.(\d+)\.(weight|bias)$", r"transformer_decoder.mask_embed.layers.\1.\2"),
]


def _rename(key: str) -> Tuple[bool, Optional[str]]:
    return rename_by_table(MASK2FORMER_TABLE, key)


def convert_mask2former_state_dict(
    source: Mapping[str, torch.Tensor], target: Optional[Mapping[str, torch.Tensor]] = None
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Rename an official Mask2Former ``state_dict`` for ``QuerySegmentor``.

    Args:
        source: the checkpoint's tensors (``model`` entry of the .pkl / .pth).
        target: the model's state_dict; when given, shapes are checked and the model keys
            without a value reported.
    Raises:
        ValueError: two source keys map to one model key, or any shape mismatch (all listed).
    """
    report = ConversionReport(source_format="mask2former")
    converted = convert_by_table(source, _rename, report, target,
                                 shape_hint="SEM_SEG_HEAD.NUM_CLASSES, NUM_OBJECT_QUERIES, HIDDEN_DIM, DEC_LAYERS, backbone")
    finish_report(report, converted, target)
    return converted, report


def load_mask2former_checkpoint(path: str, allow_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """The model tensors of an official checkpoint: a detectron2 model-zoo ``.pkl`` (a pickled
    ``{"model": {name: numpy array}}``, read only with ``allow_pickle``) or a torch file."""
    if not path.endswith(".pkl"):
        return load_model_tensors(path, allow_pickle)
    if not allow_pickle:
        raise CheckpointFormatError(f"{path!r} is a pickle (detectron2 model zoo .pkl): pass --allow-pickle "
                                    "(allow_pickle=True) if you trust the file")
    with open(path, "rb") as f:
        data = pickle.load(f, encoding="latin1")
    model = data.get("model", data) if isinstance(data, dict) else {}
    tensors = {k: torch.as_tensor(v) for k, v in model.items() if isinstance(v, (np.ndarray, torch.Tensor))}
    if not tensors:
        raise CheckpointFormatError(f"{path!r} holds no arrays at its top level or under 'model'")
    return tensors


register_format(CheckpointFormat(
    "mask2former", load_mask2former_checkpoint, lambda source, target, cfg: convert_mask2former_state_dict(source, target),
    # the masked-attention decoder and the MSDeformAttn pixel decoder (FastInst's decoder has
    # transformer_query_cross_attention_layers and a PPM-FPN pixel decoder instead)
    signature=(r"^sem_seg_head\.predictor\.transformer_cross_attention_layers\.",
               r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\."),
    description="facebookresearch/Mask2Former"))
