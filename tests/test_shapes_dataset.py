"""The synthetic shapes dataset: determinism, annotation validity, registration, caching,
COCOEvaluator compatibility and the handling of bad COCO json."""
import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

import maskfrozen  # noqa: F401  (registers the datasets)
from conftest import captured_logs
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from maskfrozen.data import datasets as shapes_datasets
from maskfrozen.data.datasets import (
    ensure_dataset_files,
    prepare_shapes,
    register_coco_instances_validated,
    register_coco_json,
    register_shapes,
    validate_coco_json,
)
from maskfrozen.data.shapes import SHAPE_CLASSES, generate_shapes_dataset, render_shapes_image

SIZE = 128


@pytest.fixture(scope="module")
def png_dataset(tmp_path_factory):
    """6 lossless images so pixels can be compared exactly: (dir, coco dict)."""
    out = tmp_path_factory.mktemp("shapes_png")
    json_path = generate_shapes_dataset(str(out), 6, SIZE, seed=11, image_format="png")
    with open(json_path) as f:
        return str(out), json.load(f)


def _decode(segmentation, height, width) -> np.ndarray:
    if isinstance(segmentation, list):
        rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    else:
        rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    return mask_util.decode(rle).astype(bool)


def _unique_name(prefix: str) -> str:
    name, i = prefix, 0
    while name in DatasetCatalog.list():
        i += 1
        name = f"{prefix}_{i}"
    return name


# ----------------------------------------------------------------------------- generator
def test_generation_is_deterministic(tmp_path):
    runs = (("a", 5), ("b", 5), ("c", 6))  # (directory, seed)
    paths = [generate_shapes_dataset(str(tmp_path / d), 3, SIZE, seed=s) for d, s in runs]
    blobs = [open(p, "rb").read() for p in paths]
    assert blobs[0] == blobs[1] and blobs[0] != blobs[2]
    for name in ("000000.jpg", "000001.jpg", "000002.jpg"):
        assert (tmp_path / "a/images" / name).read_bytes() == (tmp_path / "b/images" / name).read_bytes()


def test_annotations_match_visible_pixels(png_dataset):
    """Each annotation decodes to the pixels where its shape is the top-most one, computed
    here independently from the painted polygons; bbox/area agree with that mask."""
    out, coco = png_dataset
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4, 5]
    assert [c["name"] for c in coco["categories"]] == list(SHAPE_CLASSES)
    anns_by_image = {}
    for ann in coco["annotations"]:
        anns_by_image.setdefault(ann["image_id"], []).append(ann)
    assert sorted(anns_by_image) == [1, 2, 3, 4, 5, 6]  # every image has instances
    kinds = set()
    for img in coco["images"]:
        index = img["id"] - 1
        image, instances = render_shapes_image(np.random.default_rng((11, index)), SIZE)
        saved = np.asarray(Image.open(os.path.join(out, "images", img["file_name"])))
        assert saved.shape == (SIZE, SIZE, 3) and np.array_equal(saved, image)
        # top-most painted shape per pixel (-1: background), from each full polygon
        top = np.full((SIZE, SIZE), -1)
        for k, inst in enumerate(instances):
            top[_decode([inst.polygon], SIZE, SIZE)] = k
        anns = anns_by_image[img["id"]]
        assert len(anns) == len(instances)
        for k, (ann, inst) in enumerate(zip(anns, instances)):
            mask = _decode(ann["segmentation"], SIZE, SIZE)
            kinds.add(type(ann["segmentation"]).__name__)
            assert np.array_equal(mask, top == k)
            ys, xs = np.nonzero(mask)
            expected_box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["bbox"] == pytest.approx(expected_box)
            assert ann["area"] == mask.sum() >= 16
            assert ann["iscrowd"] == 0 and ann["category_id"] == inst.category + 1
            # the shape's colour is what is painted there (±12 shading, pixel noise averages out)
            assert np.abs(image[mask].mean(axis=0) - inst.color).max() < 20
    assert kinds == {"list", "dict"}  # both exact polygons and occluded/cut RLE occur


def test_sizes_span_coco_small_medium_large():
    areas = []
    for index in range(40):
        _, instances = render_shapes_image(np.random.default_rng((0, index)), 256)
        areas += [int(inst.visible.sum()) for inst in instances]
    areas = np.array(areas)
    fractions = [(areas < 32**2).mean(), ((areas >= 32**2) & (areas < 96**2)).mean(), (areas >= 96**2).mean()]
    assert min(fractions) > 0.1, fractions


def test_bad_generator_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_format"):
        generate_shapes_dataset(str(tmp_path), 1, SIZE, image_format="bmp")
    with pytest.raises(ValueError, match="num_images"):
        generate_shapes_dataset(str(tmp_path), 0, SIZE)


# ----------------------------------------------------------------------------- registration
def test_builtin_names_registered_without_generation():
    for name, (num, size, seed) in shapes_datasets.BUILTIN_SHAPES_SPLITS.items():
        meta = MetadataCatalog.get(name)
        assert name in DatasetCatalog.list()
        assert meta.evaluator_type == "coco" and meta.thing_classes == list(SHAPE_CLASSES)
        cache_dir = f"n{num}_s{size}_seed{seed}_v1"
        assert meta.json_file.endswith(os.path.join("shapes", cache_dir, "annotations.json"))
    assert shapes_datasets.BUILTIN_SHAPES_SPLITS["shapes_train"] == (1000, 256, 0)
    # detectron2's builtin COCO names are untouched
    assert MetadataCatalog.get("coco_2017_val").json_file.endswith("instances_val2017.json")
    ensure_dataset_files("coco_2017_val")  # no-op: COCO files are the user's


def test_registered_split_generates_on_first_use_and_is_cached(tmp_path):
    name = _unique_name("shapes_test_cached")
    spec = register_shapes(name, num_images=3, image_size=SIZE, seed=4, root=str(tmp_path))
    assert not os.path.exists(spec.directory)  # registration generates nothing
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 3 and all(os.path.isfile(d["file_name"]) for d in dicts)
    assert {a["category_id"] for d in dicts for a in d["annotations"]} <= set(range(5))
    with open(os.path.join(spec.directory, "params.json")) as f:
        assert json.load(f) == {"num_images": 3, "image_size": SIZE, "seed": 4, "generator_version": 1}
    mtime = os.path.getmtime(spec.json_file)
    assert prepare_shapes(name) == spec.json_file and os.path.getmtime(spec.json_file) == mtime
    assert os.listdir(os.path.dirname(spec.directory)) == [os.path.basename(spec.directory)]


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    name = _unique_name("shapes_test_interrupted")
    spec = register_shapes(name, num_images=2, image_size=SIZE, seed=0, root=str(tmp_path))

    def crash(out_dir, *args, **kwargs):
        os.makedirs(os.path.join(out_dir, "images"))
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes_datasets, "generate_shapes_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_shapes(name)
    assert os.listdir(tmp_path / "shapes") == []
    monkeypatch.undo()
    assert os.path.isfile(prepare_shapes(name))
    # a directory whose parameters differ is reported, not silently reused
    with open(os.path.join(spec.directory, "params.json"), "w") as f:
        json.dump({"num_images": 99}, f)
    with pytest.raises(RuntimeError, match="Delete it to regenerate"):
        prepare_shapes(name)


def test_ensure_dataset_files_registers_name_pattern(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    name = "shapes_n2_s96_seed123"
    ensure_dataset_files(name)
    meta = MetadataCatalog.get(name)
    assert meta.json_file == str(tmp_path / "shapes/n2_s96_seed123_v1/annotations.json")
    with open(meta.json_file) as f:
        coco = json.load(f)
    assert len(coco["images"]) == 2 and coco["images"][0]["height"] == 96
    with pytest.raises(KeyError, match="not a registered shapes dataset"):
        prepare_shapes("coco_2017_val")


def test_coco_evaluator_scores_ground_truth_as_perfect(tmp_path):
    """COCOEvaluator works unchanged on a shapes split: ground truth fed back as predictions
    (bitmask + box) gets AP 100 for segm and bbox."""
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import BitMasks, Boxes, BoxMode, Instances

    name = _unique_name("shapes_test_eval")
    register_shapes(name, num_images=4, image_size=SIZE, seed=9, root=str(tmp_path))
    dicts = DatasetCatalog.get(name)
    evaluator = COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False,
                              output_dir=str(tmp_path / "eval"), use_fast_impl=False)
    evaluator.reset()
    for d in dicts:
        anns = d["annotations"]
        inst = Instances((SIZE, SIZE))
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
        inst.pred_boxes = Boxes(torch.tensor(boxes))
        masks = [_decode(a["segmentation"], SIZE, SIZE) for a in anns]
        inst.pred_masks = BitMasks(torch.from_numpy(np.stack(masks))).tensor
        inst.scores = torch.ones(len(anns))
        inst.pred_classes = torch.tensor([a["category_id"] for a in anns])
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    results = evaluator.evaluate()
    assert results["segm"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP"] == pytest.approx(100.0)


# ----------------------------------------------------------------------------- bad input
def _write_coco(path, annotations, num_images=2):
    coco = {
        "images": [
            {"id": i + 1, "file_name": f"{i}.jpg", "height": 32, "width": 32} for i in range(num_images)
        ],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "thing"}],
    }
    path.write_text(json.dumps(coco))
    return str(path)


def _ann(ann_id, image_id=1, bbox=(2, 2, 10, 10), segmentation=((2, 2, 12, 2, 12, 12),)):
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "area": 50.0,
            "bbox": list(bbox), "segmentation": [list(p) for p in segmentation]}


@pytest.mark.parametrize(
    "bad, message",
    [
        (_ann(7, bbox=(2, 2, 0, 10)), "annotation id 7 .*degenerate bbox"),
        (_ann(7, bbox=(2, 2, 10, -1)), "annotation id 7 .*degenerate bbox"),
        (_ann(7, segmentation=()), "annotation id 7 .*empty or non-list polygon"),
        (_ann(7, segmentation=((),)), "annotation id 7 .*even number >= 6"),
        (_ann(7, segmentation=((1, 2, 3, 4),)), "annotation id 7 .*even number >= 6"),
        ({**_ann(7), "segmentation": {"size": [16, 16], "counts": "abc"}}, "annotation id 7 .*RLE size"),
        ({**_ann(7), "category_id": 3}, "annotation id 7 .*category_id 3"),
        (_ann(7, bbox=(40, 2, 10, 10)), r"annotation id 7 \(image_id 1\): bbox \[40, 2, 10, 10\] lies entirely outside "
                                        r"its image \(width 32, height 32\)"),
        (_ann(7, image_id=2, bbox=(2, -20, 10, 10)), r"annotation id 7 \(image_id 2\): bbox .* entirely outside"),
    ],
)
def test_validate_coco_json_names_file_and_annotation(tmp_path, bad, message):
    json_file = _write_coco(tmp_path / "bad.json", [_ann(1), bad])
    with pytest.raises(ValueError, match="bad.json: 1 invalid annotation"):
        validate_coco_json(json_file)
    with pytest.raises(ValueError, match=message):
        validate_coco_json(json_file)
    name = _unique_name("user_bad")
    register_coco_instances_validated(name, {}, json_file, str(tmp_path))
    with pytest.raises(ValueError, match="bad.json"):
        DatasetCatalog.get(name)


def test_shapes_json_is_valid(png_dataset):
    out, coco = png_dataset
    counts = validate_coco_json(os.path.join(out, "annotations.json"))
    assert counts == {"images": 6, "annotations": len(coco["annotations"]), "images_without_annotations": 0}


def test_box_partly_outside_its_image_is_valid(tmp_path):
    json_file = _write_coco(tmp_path / "edge.json", [_ann(1, bbox=(28, 28, 10, 10)), _ann(2, bbox=(-5, 0, 6, 4))])
    assert validate_coco_json(json_file)["annotations"] == 2


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "images": [],\n  "annotations": [,],\n  "categories": []\n}')
    expected = r"broken\.json: not valid JSON: Expecting value at line 3, column 19"
    with pytest.raises(ValueError, match=expected):
        validate_coco_json(str(path))
    with pytest.raises(ValueError, match=expected):  # registration reads the categories first
        register_coco_json(_unique_name("user_broken"), str(path), str(tmp_path))
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"broken\.json: expected a JSON object .* got a list"):
        validate_coco_json(str(path))


def test_mask_models_need_segmentation_on_every_training_annotation(tmp_path):
    no_mask = {k: v for k, v in _ann(7, image_id=2).items() if k != "segmentation"}
    crowd = {**{k: v for k, v in _ann(8).items() if k != "segmentation"}, "iscrowd": 1}
    json_file = _write_coco(tmp_path / "boxes.json", [_ann(1), no_mask, crowd])
    assert validate_coco_json(json_file)["annotations"] == 3  # a box model trains on it
    expected = (r"boxes\.json: 1 invalid annotation.*\n  annotation id 7 \(image_id 2\): no 'segmentation' key, "
                r"but the model trains on masks \(MODEL\.MASK_ON True\)")
    with pytest.raises(ValueError, match=expected):
        validate_coco_json(json_file, require_masks=True)


def test_image_without_annotation_is_filtered_with_logged_count(tmp_path):
    """detectron2's documented behaviour: dropped from training (FILTER_EMPTY_ANNOTATIONS)
    with 'Removed N images', kept for evaluation."""
    json_file = _write_coco(tmp_path / "user.json", [_ann(1, image_id=1)], num_images=3)
    assert validate_coco_json(json_file)["images_without_annotations"] == 2
    name = _unique_name("user_partly_empty")
    register_coco_instances_validated(name, {}, json_file, str(tmp_path))
    with captured_logs("detectron2.data.build") as messages:
        kept = get_detection_dataset_dicts([name], filter_empty=True)
    assert [d["image_id"] for d in kept] == [1]
    assert any("Removed 2 images with no usable annotations" in m for m in messages)
    assert len(get_detection_dataset_dicts([name], filter_empty=False)) == 3
