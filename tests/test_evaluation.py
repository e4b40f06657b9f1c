"""COCO evaluation: faster-coco-eval (our COCOEvaluator backend) equals pycocotools."""

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskfrozen.data.datasets import prepare_shapes
from maskfrozen.evaluation import COCO_EVAL_BACKEND, build_evaluator
from maskfrozen.evaluation.coco import _faster_coco_eval_class


def noisy_predictions(coco: COCO, seed: int):
    """Detections as a real model makes them: GT masks shifted/eroded, wrong classes,
    duplicates and false positives, with scores loosely tied to quality."""
    rng = np.random.default_rng(seed)
    results = []
    for img_id in coco.getImgIds():
        info = coco.imgs[img_id]
        h, w = info["height"], info["width"]
        for ann in coco.imgToAnns[img_id]:
            for _ in range(rng.integers(1, 3)):
                mask = coco.annToMask(ann)
                dy, dx = rng.integers(-4, 5, size=2)
                mask = np.roll(mask, (dy, dx), axis=(0, 1))
                cat = ann["category_id"] if rng.random() > 0.15 else int(rng.integers(1, 6))
                results.append(_detection(img_id, mask, cat, float(rng.uniform(0.05, 1.0))))
        for _ in range(rng.integers(0, 4)):  # false positives
            mask = np.zeros((h, w), np.uint8)
            x, y = rng.integers(0, w - 8), rng.integers(0, h - 8)
            mask[y : y + rng.integers(4, 40), x : x + rng.integers(4, 40)] = 1
            results.append(_detection(img_id, mask, int(rng.integers(1, 6)), float(rng.uniform(0, 0.6))))
    return results


def _detection(img_id, mask, category_id, score):
    rle = mask_util.encode(np.asfortranarray(mask))
    box = mask_util.toBbox(rle).tolist()
    rle["counts"] = rle["counts"].decode()
    return {"image_id": img_id, "category_id": category_id, "segmentation": rle, "bbox": box, "score": score}


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_faster_coco_eval_equals_pycocotools(iou_type, capsys):
    faster = _faster_coco_eval_class()
    if faster is None:
        pytest.skip("faster-coco-eval is not installed: COCOEvaluator uses pycocotools itself")
    coco_gt = COCO(prepare_shapes("shapes_val"))
    detections = noisy_predictions(coco_gt, seed=0)
    stats = []
    for evaluator_cls in (COCOeval, faster):
        evaluator = evaluator_cls(coco_gt, coco_gt.loadRes(detections), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        stats.append(np.asarray(evaluator.stats[:12]))
    reference, ours = stats
    assert 0.2 < reference[0] < 0.95  # a realistic, non-trivial AP
    np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_coco_evaluator_backend_and_result_on_ground_truth(tmp_path):
    """COCOEvaluator (through our evaluator registry) gives AP 100 to perfect predictions."""
    import torch
    from detectron2.config import get_cfg
    from detectron2.structures import BitMasks, Instances

    import maskfrozen

    assert COCO_EVAL_BACKEND in ("detectron2", "faster-coco-eval", "pycocotools")
    cfg = get_cfg()
    maskfrozen.add_maskfrozen_config(cfg)
    cfg.MODEL.MASK_ON = True
    evaluator = build_evaluator(cfg, "shapes_tiny_val", str(tmp_path))
    evaluator.reset()
    meta = MetadataCatalog.get("shapes_tiny_val")
    to_contiguous = meta.thing_dataset_id_to_contiguous_id
    for record in DatasetCatalog.get("shapes_tiny_val"):
        h, w = record["height"], record["width"]
        coco = COCO(meta.json_file)
        anns = coco.imgToAnns[record["image_id"]]
        inst = Instances((h, w))
        masks = torch.as_tensor(np.stack([coco.annToMask(a) for a in anns]).astype(bool))
        inst.pred_masks = masks
        inst.pred_boxes = BitMasks(masks).get_bounding_boxes()
        inst.scores = torch.ones(len(anns))
        inst.pred_classes = torch.tensor([to_contiguous[a["category_id"]] for a in anns])
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": inst}])
    results = evaluator.evaluate()
    assert results["segm"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP"] > 90.0  # boxes from masks are the tight pixel boxes


def test_predictions_of_classes_the_dataset_lacks_are_dropped(tmp_path):
    """A model with 7 class outputs on the 5-class shapes: its predictions of classes 5 and 6 can
    match nothing and are dropped (COCOEvaluator asserted on them); the rest scores as before."""
    import torch
    from detectron2.config import get_cfg
    from detectron2.structures import Boxes, Instances

    import maskfrozen
    from conftest import captured_logs

    cfg = get_cfg()
    maskfrozen.add_maskfrozen_config(cfg)
    evaluator = build_evaluator(cfg, "shapes_tiny_val", str(tmp_path))
    evaluator.reset()
    meta = MetadataCatalog.get("shapes_tiny_val")
    coco = COCO(meta.json_file)
    for record in DatasetCatalog.get("shapes_tiny_val"):
        anns = coco.imgToAnns[record["image_id"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        boxes[:, 2:] += boxes[:, :2]
        inst = Instances((record["height"], record["width"]))
        inst.pred_boxes = Boxes(torch.cat([boxes, boxes[:2]]))
        inst.scores = torch.cat([torch.full((len(anns),), 0.5), torch.ones(2)])  # the extra ones rank first
        ids = [meta.thing_dataset_id_to_contiguous_id[a["category_id"]] for a in anns]
        inst.pred_classes = torch.tensor(ids + [5, 6])
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": inst}])
    with captured_logs("maskfrozen.evaluation") as messages:
        results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    images = len(DatasetCatalog.get("shapes_tiny_val"))
    assert messages == [f"shapes_tiny_val: dropped {2 * images} predictions of classes >= 5, which the dataset does "
                        "not have (the model's class count is larger than the dataset's)"]
