"""Golden fixtures of FastInst from its official implementation (junjiehe96/FastInst at 4996a61):
``python tools/golden/make_fixtures.py fastinst OFFICIAL_SRC_DIR`` writes two cases, D1
(``fastinst_d1``, one decoder layer) and D3 (``fastinst_d3``, three).

The official model is built from its own code and its COCO yamls
(``configs/coco/instance-segmentation/fastinst_R50_ppm-fpn_x{1_576,3_640}.yaml``), shrunk
through its own config keys (a narrow ResNet-50, fewer classes, queries, channels, sampled
points), random weights at a fixed seed, every tensor perturbed (as for Mask2Former). Shims:
the package ``__init__`` files are not run (datasets). Saved as for Mask2Former (see
``official_mask2former.py``, whose helpers this reuses), plus the query proposals (the selected
pixel indices and their features, in training also their locations), the proposal matcher's
indices, and every layer of the training forward: the normal layers and the GT-mask-guided
ones.
"""
import importlib
import os
from typing import Any, Dict

import torch
from detectron2.modeling import build_model

import golden_io
import shims
from official_mask2former import (OUTPUT_SIZES, IMAGE_SIZES, PointRecorder, captured_forward, decoder_layers,
                                  detectron2_inputs, indices_to_lists, instances_to_dict, official_cfg,
                                  perturb_state_dict, synthetic_batch)

COMMIT = "4996a61"
SEED = 0
YAMLS = {"fastinst_d1": "configs/coco/instance-segmentation/fastinst_R50_ppm-fpn_x1_576.yaml",
         "fastinst_d3": "configs/coco/instance-segmentation/fastinst_R50_ppm-fpn_x3_640.yaml"}
MASKFROZEN_CONFIGS = {"fastinst_d1": "configs/coco/fastinst/fastinst_R50_ppm-fpn_x1_576.yaml",
                      "fastinst_d3": "configs/coco/fastinst/fastinst_R50_ppm-fpn_x3_640.yaml"}
OFFICIAL_OPTS = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "4",
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "7", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.FASTINST.HIDDEN_DIM", "32", "MODEL.FASTINST.NHEADS", "4", "MODEL.FASTINST.DIM_FEEDFORWARD", "64",
    "MODEL.FASTINST.NUM_OBJECT_QUERIES", "16", "MODEL.FASTINST.NUM_AUX_QUERIES", "2",
    "MODEL.FASTINST.TRAIN_NUM_POINTS", "128", "TEST.DETECTIONS_PER_IMAGE", "20",
]


def _ours(key: str) -> str:
    """Our key of an official one: the meta-arch's shared keys live under MODEL.MASK_FORMER."""
    return key.replace("MODEL.FASTINST.TRAIN_NUM_POINTS", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS")


MASKFROZEN_OPTS = [_ours(k) for k in OFFICIAL_OPTS]


def _import_official(official_dir: str):
    root = os.path.join(official_dir, "fastinst")
    shims.package_without_init("fastinst", root)
    shims.package_without_init("fastinst.modeling", os.path.join(root, "modeling"))
    for name in ("modeling.pixel_decoder.fastinst_encoder", "modeling.transformer_decoder",
                 "modeling.meta_arch.fastinst_head", "fastinst"):
        importlib.import_module(f"fastinst.{name}")
    return importlib.import_module("fastinst.config").add_fastinst_config


def _proposals(store: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The query proposal's selection: pixel indices into the flattened 1/16 map (recovered
    exactly from the gathered features), features and positions ``[B, N, C]``, logits."""
    (x, _), (features, pos, locations, logits) = store["proposal_in"], store["proposal"]
    flat = x.flatten(2)  # [B, C, hw]
    index = torch.stack([(flat[b][:, None, :] - features[b][:, :, None]).abs().sum(0).argmin(1) for b in range(len(x))])
    assert torch.equal(torch.gather(flat, 2, index[:, None].expand(-1, flat.shape[1], -1)), features)
    out = {"index": index, "features": features.transpose(1, 2), "pos": pos.transpose(1, 2), "logits": logits}
    if locations is not None:
        out["locations"] = locations
    return out


def _capture_proposals(model, store):
    proposal = model.sem_seg_head.predictor.query_proposal
    return [proposal.register_forward_hook(lambda m, args, out: store.update(proposal_in=args, proposal=out))]


def _inference(model, batch) -> Dict[str, Any]:
    store: Dict[str, Any] = {}
    decoder = model.sem_seg_head.pixel_decoder
    original = decoder.forward_features

    def forward_features(features):
        out = original(features)
        store["pixel_decoder"] = {"multi_scale_features": list(out[1])}
        return out

    decoder.forward_features = forward_features
    hooks = _capture_proposals(model, store)
    try:
        with captured_forward(model.backbone, store, "backbone"), \
                captured_forward(model.sem_seg_head.predictor, store, "decoder"), torch.no_grad():
            results = model.eval()(detectron2_inputs(batch, with_instances=False))
    finally:
        del decoder.forward_features
        for h in hooks:
            h.remove()
    return {"backbone": store["backbone"], "pixel_decoder": store["pixel_decoder"], "proposals": _proposals(store),
            "decoder": decoder_layers(store["decoder"]), "instances": instances_to_dict(results)}


def _layer_names(outputs: Dict[str, Any], num_layers: int) -> Dict[int, str]:
    """tensor id of each layer's ``pred_logits``: "main"; the official ``aux_outputs`` list the L
    GT-guided layers ("guided0".."guided{L-1}") before the L first normal layers ("aux0"..)."""
    names = {id(outputs["pred_logits"]): "main"}
    for i, aux in enumerate(outputs["aux_outputs"]):
        names[id(aux["pred_logits"])] = f"guided{i}" if i < num_layers else f"aux{i - num_layers}"
    return names


def _training(model, batch, num_layers: int) -> Dict[str, Any]:
    recorder, indices, store, proposal_indices = PointRecorder(), {}, {}, []
    criterion = model.criterion
    matcher = criterion.matcher
    matcher.memory_efficient_forward = recorder.wrap("match", matcher.memory_efficient_forward, indices)
    original_proposal_match = matcher.memory_efficient_forward_for_proposal

    def proposal_match(outputs, targets):
        result = original_proposal_match(outputs, targets)
        proposal_indices.extend([torch.as_tensor(i), torch.as_tensor(j)] for i, j in result)
        return result

    matcher.memory_efficient_forward_for_proposal = proposal_match
    criterion.loss_masks = recorder.wrap("loss", criterion.loss_masks)
    predictor = model.sem_seg_head.predictor
    hooks = _capture_proposals(model, store)
    hooks.append(predictor.register_forward_hook(lambda m, args, out: store.__setitem__("decoder", dict(out))))
    try:
        with recorder.active(), torch.no_grad():
            losses = model.train()(detectron2_inputs(batch, with_instances=True))
    finally:
        for h in hooks:
            h.remove()
    outputs = store["decoder"]
    names = _layer_names(outputs, num_layers)
    points = recorder.by_layer(names)
    gt_and_main = points.pop("main.match")  # the decoder's GT-guided assignment draws first, then the criterion's
    points["gt.match"], points["main.match"] = gt_and_main[:len(batch)], gt_and_main[len(batch):]
    matched = indices_to_lists(indices, names)
    matched["gt"], matched["main"] = matched.pop("main"), matched.pop("main#1")
    layers = decoder_layers(outputs)
    layers = {names[id(layer["pred_logits"])]: layer for layer in layers.values()}
    return {"points": points, "indices": matched, "proposal_indices": proposal_indices, "losses": losses,
            "proposals": _proposals(store), "decoder": layers}


def make(official_dir: str, out_dir: str) -> None:
    add_config = _import_official(official_dir)
    for case, yaml in YAMLS.items():
        cfg = official_cfg(official_dir, add_config, yaml, OFFICIAL_OPTS)
        shims.seed_everything(SEED)
        model = build_model(cfg)
        gen = torch.Generator().manual_seed(SEED)
        perturb_state_dict(model, gen)
        batch = synthetic_batch(gen, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        outputs = {"inference": _inference(model, batch)}
        torch.manual_seed(SEED + 1)
        outputs["training"] = _training(model, batch, cfg.MODEL.FASTINST.DEC_LAYERS)
        meta = {
            "repo": "junjiehe96/FastInst", "commit": COMMIT, "official_config": yaml,
            "official_overrides": OFFICIAL_OPTS, "seed": SEED, "dec_layers": cfg.MODEL.FASTINST.DEC_LAYERS,
            "shims": ["package __init__ files not run (datasets)",
                      "every state_dict tensor but criterion.empty_weight + N(0, 0.05) (FrozenBN variances kept "
                      "positive)"],
            "maskfrozen_config": MASKFROZEN_CONFIGS[case], "maskfrozen_overrides": MASKFROZEN_OPTS,
            "image_sizes": IMAGE_SIZES, "output_sizes": OUTPUT_SIZES,
        }
        golden_io.save_case(out_dir, case, model.state_dict(), {"batch": batch}, outputs, meta)
