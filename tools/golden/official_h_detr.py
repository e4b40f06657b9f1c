"""Golden fixtures of H-DETR (H-Deformable-DETR, two-stage + box refine + mixed selection +
look-forward-twice + hybrid one-to-many branch) from its official implementation
(HDETR/H-Deformable-DETR at f58ceb1): ``python tools/golden/make_fixtures.py h_detr OFFICIAL_SRC_DIR``.

The official model is built by its own ``build(args)`` from ``main.py``'s parser with the
arguments of its 12-epoch hybrid-branch script (configs/two_stage/deformable-detr-hybrid-branch/
12eps/r50_hybrid_branch_lambda1_group6_t1500_dp0_mqs_lft_...two_stage.sh: --with_box_refine
--two_stage --mixed_selection --look_forward_twice --dropout 0 --k_one2many 6 --lambda_one2many 1),
reduced through the same arguments (hidden dim 32, 3 + 3 layers, FFN 64, 20 one-to-one + 60
one-to-many queries). Evaluation runs as its ``engine.evaluate`` does (one-to-one queries and
proposals only); training as ``engine.train_hybrid`` (one-to-one + one-to-many losses).

Shims: those of ``official_deformable_detr.py`` (pure-PyTorch deformable attention, torchvision
version string, the feature stand-in for the ResNet-50, the proposal embedding's hard-coded
width 128 -> hidden_dim / 2), an empty ``wandb`` module (imported by ``engine.py``) and an empty ``models.swin_transformer``
(the unused Swin backbone imports timm and mmcv).
"""
import torch

import golden_io
import shims
from official_deformable_detr import (IMAGE_SIZES, OUTPUT_SIZES, Recorder, build_official, coco_targets, meta_for,
                                      official_runtime, padded_images, promote_invalid_proposals, random_features,
                                      run_inference, run_training, state_dict_of, two_stage_outputs)

REPO = "HDETR/H-Deformable-DETR"
COMMIT = "f58ceb1"
SEED = 0
CASE = "h_detr"
OFFICIAL_ARGS = ["--with_box_refine", "--two_stage", "--mixed_selection", "--look_forward_twice",
                 "--dim_feedforward", "64", "--hidden_dim", "32", "--nheads", "8", "--enc_layers", "3",
                 "--dec_layers", "3", "--num_queries_one2one", "20", "--num_queries_one2many", "60",
                 "--k_one2many", "6", "--lambda_one2many", "1.0", "--dropout", "0.0", "--device", "cpu"]
MASKFROZEN_CONFIG = "configs/coco/h_detr/h_detr_R50_two_stage_12ep.yaml"
MASKFROZEN_OPTS = ["MODEL.DETR.HIDDEN_DIM", "32", "MODEL.DETR.NHEADS", "8", "MODEL.DETR.ENC_LAYERS", "3",
                   "MODEL.DETR.DEC_LAYERS", "3", "MODEL.DETR.DIM_FEEDFORWARD", "64", "MODEL.DETR.NUM_QUERIES", "20",
                   "MODEL.DETR.NUM_QUERIES_ONE2MANY", "60"]


def evaluation_queries(model, one2one: bool) -> None:
    """What ``engine.evaluate`` switches (one-to-one queries and proposals) and restores."""
    if one2one:
        model._saved_queries = (model.num_queries, model.transformer.two_stage_num_proposals)
        model.num_queries = model.num_queries_one2one
        model.transformer.two_stage_num_proposals = model.num_queries
    else:
        model.num_queries, model.transformer.two_stage_num_proposals = model._saved_queries


def make(official_dir: str, out_dir: str) -> None:
    """Write the ``h_detr`` case."""
    gen = torch.Generator().manual_seed(SEED)
    features = random_features(gen)
    shims.stub_modules(["wandb"])
    unused = {"models.swin_transformer": {"SwinTransformer": None}}  # the Swin backbone (timm, mmcv)
    with official_runtime(official_dir, ["models.ops.modules.ms_deform_attn"], empty_modules=unused):
        import engine

        model, criterion, post, stand_in, args = build_official(official_dir, OFFICIAL_ARGS, gen)
        model.double().eval()
        stand_in.features = [f.double() for f in features]
        evaluation_queries(model, True)
        tilt = promote_invalid_proposals(model.transformer.enc_output_norm, model.class_embed[-1],
                                         lambda: model(padded_images()), args.num_queries_one2one)
        checkpoint = state_dict_of(model)
        model.float().double()
        record = Recorder()
        inference = run_inference(model, post, stand_in, features, record)
        out = inference.pop("_out")
        enc = two_stage_outputs(out["enc_outputs"]["pred_logits"], out["enc_outputs"]["pred_boxes"],
                                record.values["topk"][0], score_column=0)
        evaluation_queries(model, False)

        def hybrid_losses(model, criterion, images, targets):
            out = model(images)
            return out, engine.train_hybrid(out, targets, args.k_one2many, criterion, args.lambda_one2many)

        training = run_training(model, criterion, stand_in, features, Recorder(), hybrid_losses)
        training.pop("_out")
    inputs = {"features": features, "image_sizes": [list(s) for s in IMAGE_SIZES],
              "output_sizes": [list(s) for s in OUTPUT_SIZES], "targets": coco_targets()}
    outputs = {**inference, "two_stage": enc, "training": training}
    meta = meta_for(REPO, COMMIT, args, {"encoder_head_tilt": tilt, "maskfrozen_config": MASKFROZEN_CONFIG,
                                         "maskfrozen_opts": MASKFROZEN_OPTS})
    meta["shims"].append("empty wandb module (imported by engine.py); models/swin_transformer.py (the unused "
                         "Swin backbone: timm, mmcv) replaced by an empty module")
    golden_io.save_case(out_dir, CASE, checkpoint, inputs, outputs, meta)
