"""Convert public DETR checkpoints (detrex, the official Deformable-DETR, H-DETR and DINO
repositories) to maskfrozen's ``DeformableDETRFamily`` parameter names.

Each source format is an explicit table of ``(pattern, replacement)`` rows, tried in
order; the first matching row renames the key (``None`` drops it: aliases such as
``transformer.decoder.class_embed.*``, which duplicate ``class_embed.*`` in every format).
A replacement may be a tuple of alternatives: the first that exists in the target
model wins (``query_embed`` is the content embedding of a mixed-selection model but the
(pos, content) embedding of a one-stage one).

Prediction heads: ``{L}`` (= decoder layers) in a replacement is our encoder-proposal head,
the last entry of ``transformer.class_embed`` / ``bbox_embed``. When the target shares one head
by every decoder layer (``SHARE_DECODER_HEADS``, the official DINO), the checkpoint's per-layer
copies ``class_embed.{1..L-1}`` must equal ``class_embed.0`` and are dropped as aliases (a
checkpoint with distinct per-layer heads is refused: build the model without sharing).

Class heads are kept whole: the official repositories' 91 rows (COCO category ids 0..90) rank
the two-stage proposals (Deformable-DETR and H-DETR by row 0, DINO by the best row) and enter
the top-k of the post-processing; build the model with ``NUM_CLASSES 91`` and
``CLASS_ROWS coco_category_id`` (the shipped COCO configs). DINO's label embedding has one row
more than the classes (``dn_labelbook_size + 1``) that the official code never reads (noised
labels are drawn in 0..90): it is dropped.

Checks: every converted tensor must have the target's shape (else ``ValueError``, listing
every mismatch); the report lists source keys left unused and target keys left without a
value, and how many tensors were converted of how many (``ConversionReport.check_coverage``
refuses a conversion that mapped too little: the mark of a wrong ``source_format`` or a
checkpoint of another model).
"""
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .key_table import convert_by_table, finish_report
from .formats import CheckpointFormat, register_format
from .loading import load_model_tensors

__all__ = ["ConversionReport", "ConversionCoverageError", "convert_detr_state_dict", "KEY_TABLES",
           "coco_contiguous_ids"]

Replacement = Union[None, str, Tuple[str, ...], Callable[[re.Match], str]]

_ENC = r"transformer\.encoder\.layers\.(\d+)\."
_DEC = r"transformer\.decoder\.layers\.(\d+)\."
_ENC_OUT = r"transformer.encoder.layers.\1."
_DEC_OUT = r"transformer.decoder.layers.\1."

# detrex (DINO, H-Deformable-DETR, Deformable-DETR projects): detectron2 backbone/neck names
DETREX_TABLE: List[Tuple[str, Replacement]] = [
    (r"^backbone\.(.*)$", r"backbone.\1"),
    (r"^neck\.(.*)$", r"neck.\1"),
    (r"^transformer\.decoder\.(class_embed|bbox_embed)\..*$", None),  # aliases of the top-level heads
    (r"^transformer\.(level_embeds|tgt_embed\.weight)$", r"transformer.\1"),
    (r"^transformer\.(enc_output|enc_output_norm|pos_trans|pos_trans_norm|reference_points)\.(weight|bias)$",
     r"transformer.\1.\2"),
    (_ENC + r"attentions\.0\.(.*)$", _ENC_OUT + r"self_attn.attn.\2"),
    (_ENC + r"ffns\.0\.layers\.0\.0\.(weight|bias)$", _ENC_OUT + r"ffn.linear1.\2"),
    (_ENC + r"ffns\.0\.layers\.1\.(weight|bias)$", _ENC_OUT + r"ffn.linear2.\2"),
    (_ENC + r"norms\.0\.(weight|bias)$", _ENC_OUT + r"self_attn.norm.\2"),
    (_ENC + r"norms\.1\.(weight|bias)$", _ENC_OUT + r"ffn.norm.\2"),
    (_DEC + r"attentions\.0\.attn\.(.*)$", _DEC_OUT + r"self_attn.attn.\2"),
    (_DEC + r"attentions\.1\.(.*)$", _DEC_OUT + r"cross_attn.attn.\2"),
    (_DEC + r"ffns\.0\.layers\.0\.0\.(weight|bias)$", _DEC_OUT + r"ffn.linear1.\2"),
    (_DEC + r"ffns\.0\.layers\.1\.(weight|bias)$", _DEC_OUT + r"ffn.linear2.\2"),
    (_DEC + r"norms\.0\.(weight|bias)$", _DEC_OUT + r"self_attn.norm.\2"),
    (_DEC + r"norms\.1\.(weight|bias)$", _DEC_OUT + r"cross_attn.norm.\2"),
    (_DEC + r"norms\.2\.(weight|bias)$", _DEC_OUT + r"ffn.norm.\2"),
    (r"^transformer\.decoder\.(ref_point_head\.layers\.\d+|norm)\.(weight|bias)$", r"transformer.decoder.\1.\2"),
    (r"^query_embedding\.weight$", ("transformer.tgt_embed.weight", "transformer.query_embed.weight")),
    (r"^class_embed\.(\d+)\.(weight|bias)$", r"transformer.class_embed.\1.\2"),
    (r"^bbox_embed\.(\d+)\.layers\.(\d+)\.(weight|bias)$", r"transformer.bbox_embed.\1.layers.\2.\3"),
    (r"^label_enc\.weight$", "denoising.label_enc.weight"),
]


def _torchvision_resnet(m: re.Match) -> str:
    """``layer{k}.{i}.{conv|bn}{j}|downsample.{0|1}.<p>`` -> detectron2 ``res{k+1}`` names."""
    stage, block, module, param = int(m.group(1)) + 1, m.group(2), m.group(3), m.group(4)
    renamed = {"downsample.0": "shortcut", "downsample.1": "shortcut.norm"}.get(module)
    if renamed is None:
        kind, j = module[:-1], module[-1]
        renamed = f"conv{j}" if kind == "conv" else f"conv{j}.norm"
    return f"backbone.res{stage}.{block}.{renamed}.{param}"


def _input_proj(m: re.Match, num_backbone_levels: int = 3) -> str:
    """``input_proj.{i}.{0 conv|1 GN}`` -> ``neck.convs.{i}`` or ``neck.extra_convs.{i-3}``."""
    i, part, param = int(m.group(1)), ("conv", "norm")[int(m.group(2))], m.group(3)
    if i < num_backbone_levels:
        return f"neck.convs.{i}.{part}.{param}"
    return f"neck.extra_convs.{i - num_backbone_levels}.{part}.{param}"


# fundamentalvision/Deformable-DETR and HDETR/H-Deformable-DETR (DETR-style names, 91 classes)
ORIGINAL_DEFORMABLE_TABLE: List[Tuple[str, Replacement]] = [
    (r"^backbone\.0\.body\.conv1\.weight$", "backbone.stem.conv1.weight"),
    (r"^backbone\.0\.body\.bn1\.(weight|bias|running_mean|running_var)$", r"backbone.stem.conv1.norm.\1"),
    (r"^backbone\.0\.body\.layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)\.(weight|bias|running_mean|running_var)$",
     _torchvision_resnet),
    (r"^input_proj\.(\d+)\.(0|1)\.(weight|bias)$", _input_proj),
    (r"^transformer\.decoder\.(class_embed|bbox_embed)\..*$", None),
    (r"^transformer\.level_embed$", "transformer.level_embeds"),
    (r"^transformer\.(enc_output|enc_output_norm|pos_trans|pos_trans_norm|reference_points)\.(weight|bias)$",
     r"transformer.\1.\2"),
    (_ENC + r"self_attn\.(.*)$", _ENC_OUT + r"self_attn.attn.\2"),
    (_ENC + r"norm1\.(weight|bias)$", _ENC_OUT + r"self_attn.norm.\2"),
    (_ENC + r"norm2\.(weight|bias)$", _ENC_OUT + r"ffn.norm.\2"),
    (_ENC + r"(linear1|linear2)\.(weight|bias)$", _ENC_OUT + r"ffn.\2.\3"),
    (_DEC + r"(self_attn|cross_attn)\.(.*)$", _DEC_OUT + r"\2.attn.\3"),
    # original decoder: self-attn -> norm2, cross-attn -> norm1, FFN -> norm3 (ours: each sub-layer's .norm)
    (_DEC + r"norm2\.(weight|bias)$", _DEC_OUT + r"self_attn.norm.\2"),
    (_DEC + r"norm1\.(weight|bias)$", _DEC_OUT + r"cross_attn.norm.\2"),
    (_DEC + r"norm3\.(weight|bias)$", _DEC_OUT + r"ffn.norm.\2"),
    (_DEC + r"(linear1|linear2)\.(weight|bias)$", _DEC_OUT + r"ffn.\2.\3"),
    (r"^query_embed\.weight$", ("transformer.tgt_embed.weight", "transformer.query_embed.weight")),
    (r"^class_embed\.(\d+)\.(weight|bias)$", r"transformer.class_embed.\1.\2"),
    (r"^bbox_embed\.(\d+)\.layers\.(\d+)\.(weight|bias)$", r"transformer.bbox_embed.\1.layers.\2.\3"),
]

# IDEA-Research/DINO: Deformable-DETR names plus DINO's parts. ``{L}`` = our encoder-proposal
# head. Its decoder heads are shared (one tensor under every index, dec_pred_*_embed_share):
# index 0 fills our shared head, the others are aliases (see the module doc).
ORIGINAL_DINO_TABLE: List[Tuple[str, Replacement]] = [
    (r"^transformer\.enc_out_class_embed\.(weight|bias)$", r"transformer.class_embed.{L}.\1"),
    (r"^transformer\.enc_out_bbox_embed\.layers\.(\d+)\.(weight|bias)$", r"transformer.bbox_embed.{L}.layers.\1.\2"),
    (r"^transformer\.tgt_embed\.weight$", "transformer.tgt_embed.weight"),
    (r"^transformer\.decoder\.(ref_point_head\.layers\.\d+|norm)\.(weight|bias)$", r"transformer.decoder.\1.\2"),
    (r"^label_enc\.weight$", "denoising.label_enc.weight"),  # its last, never used, row dropped
] + ORIGINAL_DEFORMABLE_TABLE

KEY_TABLES: Dict[str, List[Tuple[str, Replacement]]] = {
    "detrex": DETREX_TABLE,
    "original": ORIGINAL_DEFORMABLE_TABLE,
    "original_dino": ORIGINAL_DINO_TABLE,
}


def coco_contiguous_ids() -> List[int]:
    """The 80 COCO category ids (1..90 with gaps) in detectron2's contiguous order:
    row ``coco_contiguous_ids()[k]`` of a 91-way head is detectron2 class k."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return [c["id"] for c in COCO_CATEGORIES if c["isthing"]]


class ConversionCoverageError(ValueError):
    """Too few checkpoint tensors were converted (wrong format or another model)."""


@dataclass
class ConversionReport:
    renamed: Dict[str, str] = field(default_factory=dict)  # source key -> target key
    dropped_aliases: List[str] = field(default_factory=list)
    unused_source_keys: List[str] = field(default_factory=list)  # no table row matched
    unmatched_target_keys: List[str] = field(default_factory=list)  # target keys given no value
    sliced_rows: List[str] = field(default_factory=list)  # tensors whose unused last row was dropped
    source_format: str = ""
    num_source_tensors: int = 0  # checkpoint tensors considered (num_batches_tracked excluded)
    num_target_keys: Optional[int] = None  # model keys to fill (num_batches_tracked excluded), when known

    def check_coverage(self, min_fraction: float = 0.5) -> None:
        """Raise ``ConversionCoverageError`` when no tensor was converted, or fewer than
        ``min_fraction`` of the model's keys got a value (when the model was given).

        The message says how many tensors mapped of how many, and shows unused keys."""
        converted = len(self.renamed)
        if converted > 0 and (self.num_target_keys is None or converted >= min_fraction * self.num_target_keys):
            return
        model = f" of the model's {self.num_target_keys} keys" if self.num_target_keys is not None else ""
        examples = ", ".join(self.unused_source_keys[:3]) or "none"
        raise ConversionCoverageError(
            f"only {converted}{model} got a value: {converted} of the checkpoint's {self.num_source_tensors} "
            f"tensors mapped with --format {self.source_format} (required: {min_fraction:.0%} of the model's keys); "
            f"{len(self.unused_source_keys)} checkpoint keys unused, e.g. {examples}. "
            f"Is the format right (tools/convert_checkpoint.py --help lists them), and is the checkpoint of this model?")

    def summary(self) -> str:
        model = f", {len(self.renamed)} of the model's {self.num_target_keys} keys filled" \
            if self.num_target_keys is not None else ""
        lines = [f"converted {len(self.renamed)} of {self.num_source_tensors} checkpoint tensors{model}, "
                 f"dropped {len(self.dropped_aliases)} aliases"]
        if self.sliced_rows:
            lines.append(f"dropped the unused last row of: {', '.join(self.sliced_rows)}")
        for title, keys in (("unused source keys", self.unused_source_keys),
                            ("target keys without a value", self.unmatched_target_keys)):
            lines.append(f"{title}: {len(keys)}")
            lines.extend(f"  {k}" for k in keys)
        return "\n".join(lines)


def _indices(keys, pattern: str) -> set:
    return {int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m}


def num_decoder_layers_of(keys) -> Optional[int]:
    """Decoder layers of a state dict (the official, detrex and our names), None if none."""
    layers = _indices(keys, r"^transformer\.decoder\.layers\.(\d+)\.")
    return max(layers) + 1 if layers else None


def _head_layout(target_keys: Optional[set], num_decoder_layers: int) -> Tuple[int, bool]:
    """(index of our encoder-proposal head, whether one head serves every decoder layer)."""
    heads = _indices(target_keys or (), r"^transformer\.class_embed\.(\d+)\.")
    if not heads:
        return num_decoder_layers, False
    layers = num_decoder_layers_of(target_keys) or num_decoder_layers
    return max(heads), len(heads) < layers


def _rename(key: str, table, target_keys: Optional[set], num_decoder_layers: int) -> Tuple[bool, Optional[str]]:
    """(matched, new key or None when dropped)."""
    enc_head, shared = _head_layout(target_keys, num_decoder_layers)
    for pattern, replacement in table:
        m = re.match(pattern, key)
        if m is None:
            continue
        if replacement is None:
            return True, None
        if callable(replacement):
            return True, replacement(m)
        expand = lambda r: _head_index(m.expand(r).replace("{L}", str(num_decoder_layers)),  # noqa: E731
                                       num_decoder_layers, enc_head, shared)
        if isinstance(replacement, tuple):
            options = [expand(r) for r in replacement]
            chosen = [o for o in options if target_keys is None or o in target_keys]
            return True, (chosen or options)[0]
        return True, expand(replacement)
    return False, None


def _head_index(new_key: str, num_decoder_layers: int, enc_head: int, shared: bool) -> Optional[str]:
    """Our name of a head tensor: the checkpoint's index L (the encoder head) becomes ours;
    with shared decoder heads every decoder index becomes 0 (None for 1..L-1: an alias)."""
    m = re.match(r"^transformer\.(class_embed|bbox_embed)\.(\d+)\.(.*)$", new_key)
    if m is None:
        return new_key
    index = int(m.group(2))
    if index == num_decoder_layers:
        index = enc_head
    elif shared:
        if index > 0:
            return None
    return f"transformer.{m.group(1)}.{index}.{m.group(3)}"


def _check_shared_heads(source: Mapping[str, torch.Tensor], dropped: List[str]) -> None:
    """Dropped per-layer head copies must equal head 0 (the official DINO shares them)."""
    differing = []
    for key in dropped:
        m = re.match(r"^((?:class_embed|bbox_embed)\.)(\d+)(\..*)$", key)  # the top-level heads only
        first = m and f"{m.group(1)}0{m.group(3)}"
        if first and first in source and not torch.equal(source[key], source[first]):
            differing.append(key)
    if differing:
        raise ValueError(f"the model shares one class / box head by every decoder layer (MODEL.DETR.SHARE_DECODER_HEADS "
                         f"True) but the checkpoint's per-layer heads differ ({', '.join(differing[:3])}): set "
                         f"MODEL.DETR.SHARE_DECODER_HEADS False")


def _drop_unused_last_row(key: str, value: torch.Tensor, target_shape, report: ConversionReport) -> torch.Tensor:
    """DINO's label embedding: ``dn_labelbook_size + 1`` rows, the last never drawn."""
    if key == "denoising.label_enc.weight" and target_shape is not None and value.shape[0] == target_shape[0] + 1:
        report.sliced_rows.append(key)
        return value[:-1]
    return value


def convert_detr_state_dict(
    source: Mapping[str, torch.Tensor],
    source_format: str,
    target: Optional[Mapping[str, torch.Tensor]] = None,
    num_decoder_layers: int = 6,
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Rename a public DETR ``state_dict`` for ``DeformableDETRFamily``.

    Args:
        source: the checkpoint's model state_dict (tensors).
        source_format: "detrex", "original" (Deformable-DETR / H-DETR repos) or
            "original_dino" (IDEA-Research/DINO), see ``KEY_TABLES``.
        target: the target model's state_dict; when given, shapes are checked, the
            unmatched target keys are reported, alternative names and the head layout
            (shared decoder heads, index of the encoder head) are resolved.
        num_decoder_layers: the checkpoint's decoder layers (its encoder head's index) when
            its keys do not tell (they do whenever it holds a decoder layer).

    Raises:
        ValueError: unknown format, two source keys mapped to one target key, any shape
            mismatch with ``target`` (all listed), per-layer heads into a shared head.
    """
    if source_format not in KEY_TABLES:
        raise ValueError(f"unknown checkpoint format {source_format!r}; expected one of {sorted(KEY_TABLES)}")
    table = KEY_TABLES[source_format]
    target_keys = set(target) if target is not None else None
    num_decoder_layers = num_decoder_layers_of(source) or num_decoder_layers
    report = ConversionReport(source_format=source_format)
    converted = convert_by_table(
        source, lambda key: _rename(key, table, target_keys, num_decoder_layers), report, target,
        transform=lambda key, new_key, value, shape: _drop_unused_last_row(new_key, value, shape, report),
        shape_hint="NUM_CLASSES (91 for the official checkpoints), NUM_QUERIES (+ NUM_QUERIES_ONE2MANY), HIDDEN_DIM, "
                   "layers, variant options")
    _check_shared_heads(source, report.dropped_aliases)
    finish_report(report, converted, target)
    return converted, report


def _detr_format(name: str, signature, excludes=(), description: str = "") -> CheckpointFormat:
    convert = lambda source, target, cfg: convert_detr_state_dict(  # noqa: E731
        source, name, target, cfg.MODEL.DETR.DEC_LAYERS)
    return CheckpointFormat(name, load_model_tensors, convert, signature, excludes, description)


_DEFORMABLE_ORIGINAL = (r"^transformer\.encoder\.layers\.\d+\.self_attn\.sampling_offsets\.", r"^input_proj\.\d+\.")
register_format(_detr_format("detrex", (r"^transformer\.encoder\.layers\.\d+\.attentions\.0\.sampling_offsets\.",),
                             description="detrex DINO / H-DETR / Deformable-DETR"))
register_format(_detr_format("original", _DEFORMABLE_ORIGINAL, (r"^label_enc\.", r"^transformer\.tgt_embed\."),
                             description="fundamentalvision/Deformable-DETR, HDETR/H-Deformable-DETR"))
register_format(_detr_format("original_dino", _DEFORMABLE_ORIGINAL + (r"^label_enc\.weight$",),
                             description="IDEA-Research/DINO"))
