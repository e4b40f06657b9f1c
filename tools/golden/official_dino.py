"""Golden fixtures of DINO 4-scale from its official implementation (IDEA-Research/DINO at
faa8520): ``python tools/golden/make_fixtures.py dino OFFICIAL_SRC_DIR``.

The official model is built by its own ``build_dino(args)``: the arguments are those of
``main.py``'s parser (its ``get_args_parser``, read from the file) merged with
``config/DINO/DINO_4scale.py`` and its base file as ``main.py`` merges them, then reduced
through the same config keys (``--options`` style): hidden dim 32, 3 + 3 layers, FFN 64,
30 queries, dn_number 10 (91 classes and every other value as in the config: sine
temperature 20, box noise 0.4, label noise 0.5, 300 detections, shared decoder heads).

Shims: those of ``official_deformable_detr.py`` (pure-PyTorch deformable attention, torchvision
version string, the feature stand-in for the ResNet-50), plus:

- ``Tensor.cuda()`` and ``Tensor.to("cuda")`` stay on the CPU (the denoising and the criterion
  hard-code them); torch's default dtype is float64 during the training step (``prepare_for_cdn``
  makes its query tensors in the default dtype);
- the hard-coded width of ``gen_sineembed_for_position`` (128 = hidden dim 256 / 2) reads
  hidden_dim / 2 (the official source, that constant substituted);
- the config file is read as ``SLConfig`` reads a Python config (its ``addict`` dependency is
  not installed): the base file's names, then the file's own;
- the unused Swin / ConvNeXt backbones (timm) are empty modules.

Besides the outputs of the other DETR cases, the training case saves the official denoising
groups (noised labels and boxes per query slot, checked against the official decoder input)
so that the test feeds the same groups to maskfrozen.
"""
import ast
import os
from typing import Any, Dict, List

import torch

import golden_io
from official_deformable_detr import (IMAGE_SIZES, OUTPUT_SIZES, FixedFeatureBackbone, Recorder, coco_targets,
                                      feature_backbone_builder, meta_for, official_runtime, padded_images,
                                      perturb_state_dict, promote_invalid_proposals, random_features, run_inference,
                                      run_training, state_dict_of, substitute_constant, two_stage_outputs)

REPO = "IDEA-Research/DINO"
COMMIT = "faa8520"
SEED = 0
CASE = "dino"
CONFIG = "config/DINO/DINO_4scale.py"
REDUCED = {"hidden_dim": 32, "enc_layers": 3, "dec_layers": 3, "dim_feedforward": 64, "num_queries": 30,
           "dn_number": 10}
MASKFROZEN_CONFIG = "configs/coco/dino/dino_R50_4scale_12ep.yaml"
MASKFROZEN_OPTS = ["MODEL.DETR.HIDDEN_DIM", "32", "MODEL.DETR.ENC_LAYERS", "3", "MODEL.DETR.DEC_LAYERS", "3",
                   "MODEL.DETR.DIM_FEEDFORWARD", "64", "MODEL.DETR.NUM_QUERIES", "30", "MODEL.DETR.DN_NUMBER", "10"]


def official_parser(official_dir: str):
    """``get_args_parser`` of the official main.py, compiled from its source alone (main.py's
    own imports need packages the golden runs do not use; ``--options``, whose ``DictAction``
    comes from util/slconfig.py, is never passed: a plain action stands in)."""
    path = os.path.join(official_dir, "main.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_args_parser")
    argparse = __import__("argparse")
    namespace: Dict[str, Any] = {"argparse": argparse, "DictAction": argparse.Action}
    exec(compile(ast.Module(body=[function], type_ignores=[]), path, "exec"), namespace)
    return namespace["get_args_parser"]()


def python_config(path: str) -> Dict[str, Any]:
    """The names a Python config file defines, after those of its ``_base_`` files (as SLConfig)."""
    namespace: Dict[str, Any] = {}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), namespace)
    merged: Dict[str, Any] = {}
    for base in namespace.get("_base_", []):
        merged.update(python_config(os.path.join(os.path.dirname(path), base)))
    merged.update({k: v for k, v in namespace.items() if not k.startswith("_")})
    return merged


def official_args(official_dir: str):
    """main.py's args for DINO_4scale.py (merged as main.py merges them), then the reductions."""
    args = official_parser(official_dir).parse_args(["--config_file", CONFIG, "--device", "cpu"])
    for key, value in python_config(os.path.join(official_dir, CONFIG)).items():
        if hasattr(args, key):
            raise ValueError(f"Key {key} can used by args only")
        setattr(args, key, value)
    for key, value in REDUCED.items():
        setattr(args, key, value)
    return args


def build_official(official_dir: str, gen: torch.Generator):
    import models.dino.backbone as backbone_module
    import models.dino.deformable_transformer as transformer_module
    import models.dino.dino as dino_module
    import models.dino.utils as utils_module

    args = official_args(official_dir)
    stand_in = FixedFeatureBackbone()
    dino_module.build_backbone = feature_backbone_builder(backbone_module, stand_in)
    substitute_constant(utils_module, "gen_sineembed_for_position", "128", str(args.hidden_dim // 2), 2,
                        also_in=[transformer_module])
    torch.manual_seed(SEED)
    model, criterion, postprocessors = dino_module.build_dino(args)
    perturb_state_dict(model, gen)
    return model, criterion, postprocessors, stand_in, args, dino_module


class record_proposals:
    """Keeps every ``output_proposals`` of the official ``gen_encoder_output_proposals`` (as the
    transformer module calls it) in ``record.values["proposals"]`` until closed."""

    def __init__(self, record: Recorder):
        import models.dino.deformable_transformer as transformer_module

        self.module, self.original = transformer_module, transformer_module.gen_encoder_output_proposals
        record.values["proposals"] = []

        def recording(*args, **kwargs):
            memory, proposals = self.original(*args, **kwargs)
            record.values["proposals"].append(proposals)
            return memory, proposals
        transformer_module.gen_encoder_output_proposals = recording

    def close(self):
        self.module.gen_encoder_output_proposals = self.original


class DenoisingRecorder:
    """The official denoising groups of one training forward, per query slot: noised labels
    (-1 for an empty slot) and noised boxes (cx, cy, w, h before the inverse sigmoid), laid out
    as the official ``prepare_for_cdn`` lays them out (copy-major, then image, then object;
    slot = single_pad * copy + object) and checked against its output embeddings."""

    def __init__(self, dino_module, label_enc):
        self.module, self.original, self.label_enc = dino_module, dino_module.prepare_for_cdn, label_enc
        self.dn_module = __import__("models.dino.dn_components", fromlist=["inverse_sigmoid"])
        self.inverse_sigmoid = self.dn_module.inverse_sigmoid
        self.labels: List[torch.Tensor] = []
        self.boxes: List[torch.Tensor] = []
        self.result = None
        self.handle = label_enc.register_forward_hook(lambda m, i, out: self.labels.append(i[0].clone()))
        self.dn_module.inverse_sigmoid = self._record_boxes
        dino_module.prepare_for_cdn = self._record

    def _record_boxes(self, x, *args, **kwargs):
        self.boxes.append(x.clone())
        return self.inverse_sigmoid(x, *args, **kwargs)

    def _record(self, *args, **kwargs):
        self.result = self.original(*args, **kwargs)
        return self.result

    def close(self):
        self.handle.remove()
        self.module.prepare_for_cdn = self.original
        self.dn_module.inverse_sigmoid = self.inverse_sigmoid

    def groups(self, targets) -> Dict[str, Any]:
        query_label, query_bbox, _, meta = self.result
        groups, pad = meta["num_dn_group"], meta["pad_size"]
        single = pad // (2 * groups)
        batch = len(targets)
        labels = torch.full((batch, pad), -1, dtype=torch.int64)
        boxes = torch.zeros(batch, pad, 4, dtype=torch.float64)
        known_labels, known_boxes = self.labels[-1], self.boxes[-1]
        k = 0
        for copy in range(2 * groups):
            for b, t in enumerate(targets):
                for j in range(len(t["labels"])):
                    labels[b, single * copy + j], boxes[b, single * copy + j] = known_labels[k], known_boxes[k]
                    k += 1
        assert k == len(known_labels), "denoising layout: every noised object placed once"
        filled = labels >= 0
        assert torch.equal(query_label[filled], self.label_enc(labels[filled]))
        assert torch.equal(query_bbox[filled], self.inverse_sigmoid(boxes[filled]))
        assert not query_label[~filled].any() and not query_bbox[~filled].any()
        return {"labels": labels, "boxes": boxes, "num_groups": groups}


def dino_losses_with(dino_module, groups: List[Dict[str, Any]]):
    """The official training step (``model(samples, targets)``, then the criterion); the
    denoising groups it drew are appended to ``groups``."""
    def losses(model, criterion, images, targets):
        recorder = DenoisingRecorder(dino_module, model.label_enc)
        try:
            out = model(images, targets)
        finally:
            recorder.close()
        groups.append(recorder.groups(targets))
        return out, criterion(out, targets)
    return losses


def make(official_dir: str, out_dir: str) -> None:
    """Write the ``dino`` case."""
    gen = torch.Generator().manual_seed(SEED)
    features = random_features(gen)
    unused = {"models.dino.swin_transformer": {"build_swin_transformer": None},
              "models.dino.convnext": {"build_convnext": None}}
    with official_runtime(official_dir, ["models.dino.ops.modules.ms_deform_attn"], cuda_to_cpu=True,
                          empty_modules=unused):
        model, criterion, post, stand_in, args, dino_module = build_official(official_dir, gen)
        model.double().eval()
        stand_in.features = [f.double() for f in features]
        tilt = promote_invalid_proposals(model.transformer.enc_output_norm, model.transformer.enc_out_class_embed,
                                         lambda: model(padded_images()), args.num_queries, rank_by_max=True)
        checkpoint = state_dict_of(model)
        model.float().double()
        record = Recorder()
        record.calls_of(model.transformer.enc_out_class_embed, "enc_class")  # 1st call: every token
        record.calls_of(model.transformer.enc_out_bbox_embed, "enc_delta")
        proposals = record_proposals(record)
        inference = run_inference(model, post, stand_in, features, record,
                                  transformer_inputs=lambda a: (a[0], a[1], a[3]))
        proposals.close()
        # the official enc_outputs_coord_unselected (delta + proposals), as a sigmoid box
        boxes = (record.values["enc_delta"][0] + record.values["proposals"][0]).sigmoid()
        enc = two_stage_outputs(record.values["enc_class"][0], boxes, record.values["topk"][0], score_column=None)
        groups: List[Dict[str, Any]] = []
        torch.set_default_dtype(torch.float64)  # prepare_for_cdn makes its query tensors in the default dtype
        try:
            training = run_training(model, criterion, stand_in, features, Recorder(),
                                    dino_losses_with(dino_module, groups))
        finally:
            torch.set_default_dtype(torch.float32)
        training.pop("_out")
        denoising = groups[0]
    inputs = {"features": features, "image_sizes": [list(s) for s in IMAGE_SIZES],
              "output_sizes": [list(s) for s in OUTPUT_SIZES], "targets": coco_targets(), "denoising": denoising}
    outputs = {**inference, "two_stage": enc, "training": training}
    meta = meta_for(REPO, COMMIT, args, {"encoder_head_tilt": tilt, "maskfrozen_config": MASKFROZEN_CONFIG,
                                         "maskfrozen_opts": MASKFROZEN_OPTS, "official_config": CONFIG,
                                         "official_reductions": REDUCED})
    meta["shims"] += ["Tensor.cuda() / Tensor.to('cuda') kept on the CPU (prepare_for_cdn, SetCriterion)",
                      "default dtype float64 during the training step (prepare_for_cdn's query tensors)",
                      "config read as SLConfig reads a Python config (addict not installed)",
                      "unused Swin / ConvNeXt backbones: empty modules (timm)"]
    golden_io.save_case(out_dir, CASE, checkpoint, inputs, outputs, meta)
