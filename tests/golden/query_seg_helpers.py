"""What the Mask2Former and FastInst golden tests share: the converted model of a case, its
inputs as detectron2 dicts, our per-stage outputs, the final ``Instances`` compared with the
official ones, and a matcher wrapper that records the assignment of every layer."""
import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances

from golden_compare import REPO, convert_official

__all__ = ["converted_model", "detectron2_inputs", "inference_stages", "decoder_layers", "unpack_masks",
           "assert_instances_equal", "RecordingMatcher"]


def converted_model(case: Dict[str, Any], out_dir: str, fmt: str) -> Tuple[torch.nn.Module, Any]:
    """Our model of ``case``: its official checkpoint converted by tools/convert_checkpoint.py
    with the case's maskfrozen config + overrides, loaded strictly. (model, conversion report)."""
    from maskfrozen.config import load_config

    meta = case["meta"]
    config = os.path.join(REPO, meta["maskfrozen_config"])
    out = os.path.join(out_dir, f"{fmt}_converted.pth")
    report = convert_official(fmt, config, case["checkpoint"], out, tuple(meta["maskfrozen_overrides"]))
    cfg = load_config(config, [*meta["maskfrozen_overrides"], "MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    model.load_state_dict(torch.load(out, map_location="cpu", weights_only=True)["model"], strict=True)
    return model, report


def detectron2_inputs(batch: Sequence[Dict[str, Any]], with_instances: bool) -> List[Dict[str, Any]]:
    """The fixture's images as detectron2 dicts (instances with ``BitMasks``, as our mappers give)."""
    out = []
    for x in batch:
        item = {"image": x["image"], "height": x["height"], "width": x["width"]}
        if with_instances:
            inst = Instances(tuple(x["image"].shape[-2:]))
            inst.gt_classes = x["gt_classes"]
            inst.gt_masks = BitMasks(x["gt_masks"])
            item["instances"] = inst
        out.append(item)
    return out


def decoder_layers(outputs: Dict[str, Any]) -> Dict[str, Dict[str, torch.Tensor]]:
    """{"aux0": {"pred_logits", "pred_masks"}, ..., "main": {...}} of a decoder's outputs."""
    layers = {f"aux{i}": aux for i, aux in enumerate(outputs.get("aux_outputs", []))}
    layers["main"] = outputs
    return {name: {k: layer[k] for k in ("pred_logits", "pred_masks") if layer.get(k) is not None}
            for name, layer in layers.items()}


def inference_stages(model: torch.nn.Module, batch) -> Dict[str, Any]:
    """Our backbone features, pixel-decoder outputs, decoder layers and final results (eval)."""
    store: Dict[str, Any] = {}
    hooks = [getattr(model, name).register_forward_hook(lambda m, a, out, name=name: store.__setitem__(name, out))
             for name in ("backbone", "pixel_decoder", "transformer_decoder")]
    try:
        with torch.no_grad():
            results = model.eval()(detectron2_inputs(batch, with_instances=False))
    finally:
        for h in hooks:
            h.remove()
    pixels = store["pixel_decoder"]
    return {"backbone": store["backbone"],
            "pixel_decoder": {"mask_features": pixels.mask_features,
                              "multi_scale_features": list(pixels.multi_scale_features)},
            "decoder": decoder_layers(store["transformer_decoder"].outputs), "results": results}


def unpack_masks(bits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[N, H, W]`` bool masks from the fixture's packed bits (``numpy.packbits`` per mask)."""
    flat = np.unpackbits(bits.numpy(), axis=1, count=height * width)
    return torch.from_numpy(flat.astype(bool)).reshape(-1, height, width)


def assert_instances_equal(results: Sequence[Dict[str, Any]], official: Sequence[Dict[str, torch.Tensor]],
                           atol: float = 1e-4) -> Dict[str, float]:
    """Our final ``Instances`` equal the official ones as sets (the official top-k is unsorted):
    same size, classes, scores within ``atol``, masks pixel for pixel. Detections are paired
    after sorting both by (class, score). Returns the worst score difference and the number of
    differing mask pixels."""
    worst, flipped = 0.0, 0
    for i, (r, ref) in enumerate(zip(results, official)):
        inst = r["instances"]
        h, w = ref["image_size"].tolist()
        assert inst.image_size == (h, w), f"image {i}: size {inst.image_size} vs official {(h, w)}"
        assert len(inst) == len(ref["scores"]), f"image {i}: {len(inst)} detections vs official {len(ref['scores'])}"
        ref_masks = unpack_masks(ref["pred_masks_bits"], h, w)
        ours_order = _class_score_order(inst.pred_classes, inst.scores)
        ref_order = _class_score_order(ref["pred_classes"], ref["scores"])
        assert torch.equal(inst.pred_classes[ours_order], ref["pred_classes"][ref_order]), f"image {i}: classes differ"
        worst = max(worst, (inst.scores[ours_order] - ref["scores"][ref_order]).abs().max().item())
        flipped += (inst.pred_masks[ours_order].bool() != ref_masks[ref_order]).sum().item()
    assert worst <= atol and flipped == 0, (f"scores differ from the official ones by {worst:.3g} (atol {atol}); "
                                            f"{flipped} mask pixels differ from the official masks")
    return {"scores": worst, "mask_pixels": flipped}


def _class_score_order(classes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(scores.double(), stable=True)
    return order[torch.argsort(classes[order], stable=True)]


class RecordingMatcher(torch.nn.Module):
    """Our criterion's matcher, recording each assignment it returns (``calls``, in order)."""

    def __init__(self, matcher: torch.nn.Module):
        super().__init__()
        self.inner = matcher
        self.calls: List[List[Tuple[torch.Tensor, torch.Tensor]]] = []

    def forward(self, outputs, targets):
        indices = self.inner(outputs, targets)
        self.calls.append(indices)
        return indices
