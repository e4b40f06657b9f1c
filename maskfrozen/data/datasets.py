"""Dataset registration: the synthetic "shapes" splits and a validating COCO-json registrar.

Importing this module registers (without generating anything):

==================  ======  =========  ====
name                images  size (px)  seed
==================  ======  =========  ====
shapes_train          1000     256        0
shapes_val             200     256        1
shapes_tiny_train        8     128        2
shapes_tiny_val          4     128        3
==================  ======  =========  ====

They are registered exactly as ``register_coco_instances`` would (metadata ``json_file``,
``image_root``, ``evaluator_type="coco"``, ``thing_classes``), so COCOEvaluator, the
Visualizer and ``load_coco_json`` work unchanged. Files are generated on first use: by the
DatasetCatalog function, or explicitly by :func:`prepare_shapes` / :func:`ensure_dataset_files`
(call the latter before building a COCOEvaluator, which reads ``metadata.json_file`` at
construction).

Other sizes: any name ``shapes_n<IMAGES>_s<SIZE>_seed<SEED>`` (e.g. ``shapes_n500_s320_seed7``)
can be put in ``DATASETS.TRAIN/TEST``; :func:`ensure_dataset_files` registers it on demand,
or call :func:`register_shapes` with any name.

Cache: ``$DETECTRON2_DATASETS/shapes/n<IMAGES>_s<SIZE>_seed<SEED>_v<GENERATOR_VERSION>/``
(root default ``./datasets``, resolved at registration like detectron2's builtins) holding
``images/``, ``annotations.json`` and ``params.json``. It is written to a temporary sibling
directory and renamed into place, so an interrupted run never leaves a partial dataset (at
most a stale ``.tmp-*`` directory, safe to delete); concurrent processes (multi-GPU launch)
each generate and the first rename wins.

Your own COCO-format data: ``DATASETS.COCO_JSON`` entries ``[name, json_file, image_root]`` (or
``--dataset NAME=JSON:IMAGE_ROOT`` of tools/train_net.py and tools/demo.py,
:func:`parse_dataset_flag`) are registered by :func:`apply_dataset_config` through
:func:`register_coco_instances_validated`, with ``thing_classes`` from the json's categories;
the same function checks that the train and test datasets share one class list and fills or
checks the model's class count (``NUM_CLASSES_KEYS``) from the training datasets before a
model is built. :func:`check_datasets_before_training` validates every json of a training run
at start-up (the test sets too, which would otherwise be read only after training).

Detectron2's builtin COCO names (``coco_2017_train``...) are untouched; see datasets/README.md.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .shapes import ANNOTATION_FILE, GENERATOR_VERSION, IMAGE_DIR, SHAPE_CLASSES, generate_shapes_dataset

__all__ = [
    "BUILTIN_SHAPES_SPLITS",
    "SHAPES_NAME_PATTERN",
    "ShapesSpec",
    "register_shapes",
    "register_shapes_from_name",
    "prepare_shapes",
    "ensure_dataset_files",
    "read_coco_json",
    "validate_coco_json",
    "register_coco_instances_validated",
    "NUM_CLASSES_KEYS",
    "coco_json_metadata",
    "register_coco_json",
    "register_coco_json_datasets",
    "dataset_num_classes",
    "resolve_num_classes",
    "dataset_classes",
    "check_class_lists",
    "apply_dataset_config",
    "check_datasets_before_training",
    "parse_dataset_flag",
    "add_dataset_flags",
]

logger = logging.getLogger(__name__)

PARAMS_FILE = "params.json"
# distinct, readable colours for the Visualizer, one per SHAPE_CLASSES entry
_THING_COLORS = [(220, 20, 60), (0, 130, 200), (60, 180, 75), (245, 130, 48), (145, 30, 180)]


@dataclass(frozen=True)
class ShapesSpec:
    """Parameters of one shapes split; ``root`` is the datasets root it is cached under."""

    num_images: int
    image_size: int
    seed: int
    root: str

    @property
    def directory(self) -> str:
        tag = f"n{self.num_images}_s{self.image_size}_seed{self.seed}_v{GENERATOR_VERSION}"
        return os.path.join(self.root, "shapes", tag)

    @property
    def json_file(self) -> str:
        return os.path.join(self.directory, ANNOTATION_FILE)

    @property
    def image_root(self) -> str:
        return os.path.join(self.directory, IMAGE_DIR)

    def params(self) -> dict:
        params = {k: v for k, v in asdict(self).items() if k != "root"}
        return {**params, "generator_version": GENERATOR_VERSION}


BUILTIN_SHAPES_SPLITS: Dict[str, tuple] = {
    # name: (num_images, image_size, seed)
    "shapes_train": (1000, 256, 0),
    "shapes_val": (200, 256, 1),
    "shapes_tiny_train": (8, 128, 2),
    "shapes_tiny_val": (4, 128, 3),
}
SHAPES_NAME_PATTERN = re.compile(r"^shapes_n(?P<num_images>\d+)_s(?P<image_size>\d+)_seed(?P<seed>\d+)$")

_SHAPES_SPECS: Dict[str, ShapesSpec] = {}


def _default_root() -> str:
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


# ----------------------------------------------------------------------------- shapes
def register_shapes(
    name: str, num_images: int, image_size: int, seed: int, root: Optional[str] = None
) -> ShapesSpec:
    """Register a shapes split under ``name`` (nothing is generated here).

    Args:
        name: dataset name for ``DATASETS.TRAIN/TEST``; must not be registered yet.
        num_images, image_size, seed: generator parameters (square images).
        root: datasets root; default ``$DETECTRON2_DATASETS`` or ``./datasets``.
    """
    if num_images < 1 or image_size < 16:
        raise ValueError(f"shapes dataset {name!r}: need num_images >= 1 and image_size >= 16")
    spec = ShapesSpec(int(num_images), int(image_size), int(seed), root or _default_root())
    DatasetCatalog.register(name, functools.partial(_load_shapes, name))
    MetadataCatalog.get(name).set(
        json_file=spec.json_file,
        image_root=spec.image_root,
        evaluator_type="coco",
        thing_classes=list(SHAPE_CLASSES),
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(SHAPE_CLASSES))},
        thing_colors=list(_THING_COLORS),
    )
    _SHAPES_SPECS[name] = spec
    return spec


def register_shapes_from_name(name: str, root: Optional[str] = None) -> ShapesSpec:
    """Register a name of the form ``shapes_n<IMAGES>_s<SIZE>_seed<SEED>`` (idempotent)."""
    if name in _SHAPES_SPECS:
        return _SHAPES_SPECS[name]
    match = SHAPES_NAME_PATTERN.match(name)
    if match is None:
        raise ValueError(f"{name!r} does not match {SHAPES_NAME_PATTERN.pattern}")
    return register_shapes(name, **{k: int(v) for k, v in match.groupdict().items()}, root=root)


def _load_shapes(name: str) -> List[dict]:
    json_file = prepare_shapes(name)
    return load_coco_json(json_file, _SHAPES_SPECS[name].image_root, name)


def _shapes_spec(name: str) -> ShapesSpec:
    if name not in _SHAPES_SPECS:
        raise KeyError(
            f"{name!r} is not a registered shapes dataset; registered: {sorted(_SHAPES_SPECS)} "
            f"(or use a name matching {SHAPES_NAME_PATTERN.pattern})"
        )
    return _SHAPES_SPECS[name]


def _is_generated(spec: ShapesSpec) -> bool:
    """True when the cache directory is complete for ``spec``; raise if it holds other data."""
    params_file = os.path.join(spec.directory, PARAMS_FILE)
    if not os.path.isdir(spec.directory):
        return False
    if not os.path.isfile(params_file) or not os.path.isfile(spec.json_file):
        raise RuntimeError(
            f"{spec.directory} exists but lacks {PARAMS_FILE} or {ANNOTATION_FILE}; "
            "it was not written by prepare_shapes. Delete it to regenerate."
        )
    with open(params_file) as f:
        recorded = json.load(f)
    recorded = {k: recorded.get(k) for k in spec.params()}
    if recorded != spec.params():
        raise RuntimeError(
            f"{params_file} records {recorded}, expected {spec.params()}. Delete it to regenerate."
        )
    return True


def prepare_shapes(name: str) -> str:
    """Generate the registered shapes split ``name`` if not cached yet; return its json path."""
    spec = _shapes_spec(name)
    if _is_generated(spec):
        return spec.json_file
    parent = os.path.dirname(spec.directory)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(spec.directory)}-", dir=parent)
    try:
        start = time.perf_counter()
        generate_shapes_dataset(tmp_dir, spec.num_images, spec.image_size, spec.seed)
        with open(os.path.join(tmp_dir, PARAMS_FILE), "w") as f:
            json.dump(spec.params(), f, indent=1)
        os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp_dir, spec.directory)
        except OSError:
            if not _is_generated(spec):  # a concurrent process may have won the rename
                raise
        logger.info(f"Generated {name} ({spec.num_images} images) in {spec.directory} "
                    f"in {time.perf_counter() - start:.1f} s")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return spec.json_file


def ensure_dataset_files(dataset_name: str) -> None:
    """Make the files of ``dataset_name`` exist: registers ``shapes_n*_s*_seed*`` names on
    demand and generates shapes datasets; a no-op for any other dataset (e.g. COCO)."""
    if dataset_name not in _SHAPES_SPECS and dataset_name not in DatasetCatalog.list():
        if SHAPES_NAME_PATTERN.match(dataset_name):
            register_shapes_from_name(dataset_name)
    if dataset_name in _SHAPES_SPECS:
        prepare_shapes(dataset_name)


# ----------------------------------------------------------------------------- validation
def read_coco_json(json_file: str) -> dict:
    """The json object of an annotation file. A file that is not valid JSON is a ValueError
    naming the file and the parser's line and column; valid JSON that is not an object too."""
    with open(json_file, "rb") as f:  # bytes: json detects UTF-8/16/32 itself
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_file}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno} "
                             f"(character {e.pos})") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"{json_file}: not a JSON text file ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{json_file}: expected a JSON object with 'images', 'annotations' and 'categories', "
                         f"got a {type(data).__name__}")
    return data


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _segmentation_problem(segm, image: dict) -> Optional[str]:
    if isinstance(segm, dict):
        size = segm.get("size")
        if "counts" not in segm or size is None:
            return "RLE segmentation needs 'size' and 'counts'"
        if list(size) != [image.get("height"), image.get("width")]:
            image_size = [image.get("height"), image.get("width")]
            return f"RLE size {list(size)} differs from image height/width {image_size}"
        return None
    if not isinstance(segm, list) or len(segm) == 0:
        return f"empty or non-list polygon segmentation {segm!r}"
    for poly in segm:
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 or not all(map(_is_number, poly)):
            return f"polygon needs an even number >= 6 of coordinates, got {str(poly)[:80]}"
    return None


def _bbox_outside_image(bbox: list, image: dict) -> bool:
    """Whether the ``[x, y, w, h]`` box has no pixel inside its image (unknown size: False)."""
    width, height = image.get("width"), image.get("height")
    if not (_is_number(width) and _is_number(height)):
        return False
    x, y, w, h = bbox
    return x >= width or y >= height or x + w <= 0 or y + h <= 0


def _annotation_problem(ann: dict, images: Dict[int, dict], category_ids: set, require_masks: bool) -> Optional[str]:
    if ann.get("image_id") not in images:
        return f"image_id {ann.get('image_id')!r} is not in 'images'"
    image = images[ann["image_id"]]
    if ann.get("category_id") not in category_ids:
        return f"category_id {ann.get('category_id')!r} is not in 'categories'"
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(map(_is_number, bbox)):
        return f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return f"degenerate bbox {bbox} (width and height must be > 0)"
    if _bbox_outside_image(bbox, image):
        return f"bbox {bbox} lies entirely outside its image (width {image['width']}, height {image['height']})"
    if "segmentation" in ann:
        return _segmentation_problem(ann["segmentation"], image)
    if require_masks and not ann.get("iscrowd", 0):
        return "no 'segmentation' key, but the model trains on masks (MODEL.MASK_ON True)"
    return None


# validate_coco_json results by (path, mtime, size, require_masks): the start-up check and the
# dataset loader read a json once
_VALIDATED: Dict[tuple, dict] = {}


def _file_key(json_file: str) -> tuple:
    stat = os.stat(json_file)
    return os.path.abspath(json_file), stat.st_mtime_ns, stat.st_size


def validate_coco_json(json_file: str, max_reported: int = 5, require_masks: bool = False) -> dict:
    """Check a COCO instances json before training on it; return counts
    ``{"images", "annotations", "images_without_annotations"}``.

    Raises ValueError naming the file (and, for JSON syntax errors, the line and column) and
    the offending annotation and image ids for: missing top-level keys, duplicate
    image/annotation ids, unknown image/category ids, a bbox that is not 4 finite numbers, has
    width/height <= 0 or lies entirely outside its image, an empty polygon list or a polygon
    with < 3 points, an RLE whose size differs from its image, and, with ``require_masks`` (a
    mask model's training data), a non-crowd annotation without ``segmentation``. (Unchecked,
    detectron2 silently keeps degenerate and outside boxes until the mapper drops them, drops
    < 3-point polygons with one warning count, and keeps ``segmentation: []`` as an instance
    without a mask.) Images without annotations are valid: detectron2 drops them from training
    (``DATALOADER.FILTER_EMPTY_ANNOTATIONS``) and logs how many it removed. A file validated
    before and unchanged since is not read again.
    """
    key = _file_key(json_file)
    for masks in (True,) if require_masks else (False, True):
        if (key, masks) in _VALIDATED:
            return dict(_VALIDATED[(key, masks)])
    coco = read_coco_json(json_file)
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(coco.get(k), list)]
    if missing:
        raise ValueError(f"{json_file}: missing or non-list top-level keys {missing}")
    images = {img.get("id"): img for img in coco["images"] if isinstance(img, dict)}
    if len(images) != len(coco["images"]):
        raise ValueError(f"{json_file}: image ids are not unique (or an image entry is not an object)")
    if not all(isinstance(ann, dict) for ann in coco["annotations"]):
        raise ValueError(f"{json_file}: every entry of 'annotations' must be an object")
    ann_ids = [ann.get("id") for ann in coco["annotations"]]
    if len(set(ann_ids)) != len(ann_ids):
        raise ValueError(f"{json_file}: annotation ids are not unique")
    category_ids = {c.get("id") for c in coco["categories"] if isinstance(c, dict)}
    problems = []
    for ann in coco["annotations"]:
        problem = _annotation_problem(ann, images, category_ids, require_masks)
        if problem is not None:
            problems.append(f"annotation id {ann.get('id')} (image_id {ann.get('image_id')}): {problem}")
    if problems:
        shown = "\n  ".join(problems[:max_reported])
        more = f"\n  ... and {len(problems) - max_reported} more" if len(problems) > max_reported else ""
        raise ValueError(f"{json_file}: {len(problems)} invalid annotation(s):\n  {shown}{more}")
    annotated = {ann["image_id"] for ann in coco["annotations"]}
    counts = {
        "images": len(images),
        "annotations": len(ann_ids),
        "images_without_annotations": len(set(images) - annotated),
    }
    _VALIDATED[(key, require_masks)] = counts
    return dict(counts)


def _load_validated_coco_json(name: str, json_file: str, image_root: str) -> List[dict]:
    counts = validate_coco_json(json_file)
    if counts["images_without_annotations"]:
        logger.info(f"{name}: {counts['images_without_annotations']} of {counts['images']} images "
                    "have no annotation (dropped from training when DATALOADER.FILTER_EMPTY_ANNOTATIONS)")
    return load_coco_json(json_file, image_root, name)


# name -> json file of the datasets registered by register_coco_instances_validated
_VALIDATED_DATASETS: Dict[str, str] = {}


def register_coco_instances_validated(name: str, metadata: dict, json_file: str, image_root: str) -> None:
    """Same as detectron2's ``register_coco_instances`` but the json is checked by
    :func:`validate_coco_json` when the dataset is first loaded (clear errors, no silent drops),
    or earlier by :func:`check_datasets_before_training`."""
    _VALIDATED_DATASETS[name] = json_file
    DatasetCatalog.register(name, functools.partial(_load_validated_coco_json, name, json_file, image_root))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", **metadata
    )


def _register_builtin_shapes() -> None:
    for name, (num_images, image_size, seed) in BUILTIN_SHAPES_SPLITS.items():
        if name not in DatasetCatalog.list():
            register_shapes(name, num_images, image_size, seed)


_register_builtin_shapes()


# ----------------------------------------------------------------------------- your own COCO json
COCO_JSON_KEY = "DATASETS.COCO_JSON"

# The class-count config keys of the models (thing classes). A new model adds its key; keys
# absent from the config are skipped. Every present key is filled / checked, also those of
# models not selected by MODEL.META_ARCHITECTURE (harmless: they are unused there).
NUM_CLASSES_KEYS = (
    "MODEL.DETR.NUM_CLASSES",  # DETR family, Mask Frozen-DETR
    "MODEL.ROI_HEADS.NUM_CLASSES",  # detectron2's R-CNNs (Mask R-CNN)
    "MODEL.RETINANET.NUM_CLASSES",  # detectron2's RetinaNet
    "MODEL.SOTR.NUM_CLASSES",  # SOTR
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES",  # QuerySegmentor (Mask2Former, FastInst)
)


def coco_json_metadata(json_file: str) -> dict:
    """``thing_classes`` and ``thing_dataset_id_to_contiguous_id`` of a COCO json, exactly as
    detectron2's ``load_coco_json`` derives them (categories sorted by id, ids made contiguous)."""
    categories = read_coco_json(json_file).get("categories")
    if not isinstance(categories, list) or not categories:
        raise ValueError(f"{json_file}: 'categories' is missing or empty; the class names and count come from it")
    bad = [c for c in categories if not isinstance(c, dict) or not isinstance(c.get("id"), int)
           or isinstance(c.get("id"), bool) or not isinstance(c.get("name"), str)]
    if bad:
        raise ValueError(f"{json_file}: {len(bad)} categor(y/ies) without an integer 'id' and a string 'name', "
                         f"e.g. {str(bad[0])[:120]}")
    ids = [c["id"] for c in categories]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{json_file}: duplicate category ids {duplicates}")
    ordered = sorted(categories, key=lambda c: c["id"])
    return {
        "thing_classes": [c["name"] for c in ordered],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(ordered)},
    }


def register_coco_json(name: str, json_file: str, image_root: str, source: str = COCO_JSON_KEY) -> None:
    """Register ``name`` through :func:`register_coco_instances_validated` with the json's classes.

    Idempotent for the same files; ``source`` (the config key or flag the entry came from) is
    named in the errors: FileNotFoundError for a missing json or image directory, ValueError for
    a name already registered with other files."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"{source}: annotation json {json_file!r} of dataset {name!r} does not exist "
                                f"(relative paths are read from {os.getcwd()})")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"{source}: image directory {image_root!r} of dataset {name!r} does not exist "
                                f"(relative paths are read from {os.getcwd()})")
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if (meta.get("json_file"), meta.get("image_root")) == (json_file, image_root):
            return
        raise ValueError(f"{source}: dataset name {name!r} is already registered with json_file "
                         f"{meta.get('json_file')!r}; choose another name for {json_file}")
    register_coco_instances_validated(name, coco_json_metadata(json_file), json_file, image_root)


def register_coco_json_datasets(cfg: CfgNode) -> List[str]:
    """Register every ``[name, json_file, image_root]`` entry of ``DATASETS.COCO_JSON``; return the names."""
    names = []
    for index, entry in enumerate(cfg.DATASETS.get("COCO_JSON", [])):
        source = f"{COCO_JSON_KEY}[{index}]"
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and all(isinstance(x, str) and x for x in entry)):
            raise ValueError(f"{source} = {entry!r}: expected [name, json_file, image_root], three non-empty strings")
        register_coco_json(*entry, source=source)
        names.append(entry[0])
    return names


def _registered(name: str) -> bool:
    """Whether ``name`` is registered; a ``shapes_n*_s*_seed*`` name is registered on demand."""
    if name in DatasetCatalog.list():
        return True
    if SHAPES_NAME_PATTERN.match(name):
        register_shapes_from_name(name)
        return True
    return False


def dataset_classes(name: str) -> Optional[List[str]]:
    """The class names of a registered dataset (metadata ``thing_classes``, or its json's
    categories); None when unknown or not registered (the loader names an unknown dataset)."""
    if not _registered(name):
        return None
    meta = MetadataCatalog.get(name)
    if meta.get("thing_classes") is not None:
        return list(meta.thing_classes)
    json_file = meta.get("json_file")
    if json_file and os.path.isfile(json_file):
        return coco_json_metadata(json_file)["thing_classes"]
    return None


def _num_classes_of(name: str) -> Optional[int]:
    """Class count of a registered dataset (:func:`dataset_classes`); None if unknown."""
    classes = dataset_classes(name)
    return None if classes is None else len(classes)


def _short_list(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(x) for x in items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)} classes)"


def check_class_lists(cfg: CfgNode) -> None:
    """Raise ValueError naming both datasets and their class lists when the datasets of
    ``DATASETS.TRAIN`` and ``DATASETS.TEST`` do not share one class list (names in contiguous-id
    order): the model's class i must mean the same class in each, else AP is computed over
    mismatched ids. Datasets whose classes are unknown are skipped."""
    named = [(key, name) for key in ("DATASETS.TRAIN", "DATASETS.TEST") for name in _cfg_get(cfg, key)]
    lists = [(key, name, dataset_classes(name)) for key, name in named]
    lists = [entry for entry in lists if entry[2] is not None]
    for key, name, classes in lists[1:]:
        first_key, first_name, first = lists[0]
        if classes == first:
            continue
        diff = next((i for i, (a, b) in enumerate(zip(first, classes)) if a != b), min(len(first), len(classes)))
        at = (f"class {diff} is {first[diff]!r} vs {classes[diff]!r}" if diff < min(len(first), len(classes))
              else f"{len(first)} vs {len(classes)} classes")
        raise ValueError(
            f"{first_key} dataset {first_name!r} and {key} dataset {name!r} have different class lists ({at}): "
            f"{first_name!r}: {_short_list(first)}; {name!r}: {_short_list(classes)}. A model predicts one class "
            f"list: evaluate on data with the training classes (same category names, in the same id order)")


def dataset_num_classes(names: Sequence[str]) -> Optional[Tuple[int, str]]:
    """``(count, first dataset name)`` for datasets ``names``; None when no count is known.
    Raises ValueError naming each dataset's count when they disagree."""
    counts = {name: _num_classes_of(name) for name in names}
    counts = {name: n for name, n in counts.items() if n is not None}
    if not counts:
        return None
    if len(set(counts.values())) > 1:
        raise ValueError(f"the datasets {list(counts)} have different numbers of classes {counts}; "
                         "a model is trained on one class list")
    name = next(iter(counts))
    return counts[name], name


@functools.lru_cache(maxsize=None)
def _code_default(key: str) -> Any:
    """The value of ``key`` in a config of detectron2's and maskfrozen's defaults (no yaml)."""
    from detectron2.config import get_cfg

    from ..config import add_maskfrozen_config

    cfg = get_cfg()
    add_maskfrozen_config(cfg)
    return _cfg_get(cfg, key)


def _cfg_get(cfg: CfgNode, key: str) -> Any:
    """``cfg``'s value at the dotted ``key``; None when the config has no such key."""
    node = cfg
    for part in key.split("."):
        if not hasattr(node, "get") or part not in node:
            return None
        node = node[part]
    return node


@functools.lru_cache(maxsize=None)
def _log_once(level: int, message: str) -> None:
    """Log ``message`` once per process (configs are resolved several times per run)."""
    logger.log(level, message)


def _num_classes_update(cfg: CfgNode, key: str, count: int, dataset: str) -> Optional[int]:
    """The value ``key`` must take for ``count`` classes (None: keep it); raise when too small."""
    value = _cfg_get(cfg, key)
    if value is None or value == count:
        return None
    if cfg.MODEL.get("NUM_CLASSES_FROM_DATASET", False) or value == _code_default(key):
        return count
    if value < count:
        raise ValueError(
            f"{key} is {value} but dataset {dataset!r} has {count} classes: the model cannot predict "
            f"{count - value} of them. Set {key} {count}, or MODEL.NUM_CLASSES_FROM_DATASET True to take "
            f"it from the data"
        )
    if key == "MODEL.DETR.NUM_CLASSES" and cfg.MODEL.DETR.get("CLASS_ROWS") == "coco_category_id":
        # one row per category id (the official COCO heads): rows are mapped to the dataset's classes, none dropped
        _log_once(logging.INFO, f"{key} {value}: class-head rows are category ids (MODEL.DETR.CLASS_ROWS "
                                f"coco_category_id); dataset {dataset!r} has {count} classes")
        return None
    _log_once(logging.WARNING, f"{key} is {value} but dataset {dataset!r} has {count} classes: the {value - count} "
              f"extra class outputs are never trained, and evaluation drops predictions of them (classes "
              f"{count}..{value - 1})")
    return None


def resolve_num_classes(cfg: CfgNode) -> CfgNode:
    """``cfg`` with the model's class-count keys (``NUM_CLASSES_KEYS``) checked against the
    training datasets (``DATASETS.TRAIN``, else ``DATASETS.TEST``) and filled from them where
    the config left the code default or ``MODEL.NUM_CLASSES_FROM_DATASET`` is True.

    Returns ``cfg`` itself when nothing changes, otherwise a clone (frozen if ``cfg`` was).
    Raises ValueError naming the key and both numbers when a set count is below the data's."""
    found = dataset_num_classes(cfg.DATASETS.TRAIN or cfg.DATASETS.TEST)
    if found is None:
        return cfg
    updates = []
    for key in NUM_CLASSES_KEYS:
        value = _num_classes_update(cfg, key, *found)
        if value is not None:
            updates += [key, value]
    if not updates:
        return cfg
    if "MODEL.DETR.NUM_CLASSES" in updates[0::2] and cfg.MODEL.DETR.CLASS_ROWS != "contiguous":
        # the official COCO heads have a row per COCO category id; a dataset's own classes are contiguous rows
        updates += ["MODEL.DETR.CLASS_ROWS", "contiguous"]
    changes = ", ".join(f"{key} {_cfg_get(cfg, key)} -> {value}" for key, value in zip(updates[0::2], updates[1::2]))
    logger.info(f"{found[0]} classes in {found[1]!r}: {changes}")
    frozen = cfg.is_frozen()
    cfg = cfg.clone()
    cfg.defrost()
    cfg.merge_from_list(updates)
    if frozen:
        cfg.freeze()
    return cfg


def apply_dataset_config(cfg: CfgNode) -> CfgNode:
    """Register ``DATASETS.COCO_JSON``, check that ``DATASETS.TRAIN`` and ``DATASETS.TEST``
    share one class list (:func:`check_class_lists`) and return ``cfg`` with class counts
    resolved (:func:`resolve_num_classes`); called before a model is built."""
    register_coco_json_datasets(cfg)
    check_class_lists(cfg)
    return resolve_num_classes(cfg)


def _require_registered(name: str, key: str) -> None:
    """KeyError naming ``key`` and the ways to register ``name`` when it is not registered."""
    if _registered(name):
        return
    raise KeyError(f"{key}: dataset {name!r} is not registered. Register a COCO json with "
                   f"{COCO_JSON_KEY} [[{name!r}, JSON, IMAGE_ROOT]] in the yaml or --dataset {name}=JSON:IMAGE_ROOT; "
                   f"registered: {sorted(DatasetCatalog.list())}")


def check_datasets_before_training(cfg: CfgNode) -> None:
    """Start-up checks of a training run, so that bad data stops it before the first iteration
    rather than at the first evaluation: every name of ``DATASETS.TRAIN`` and ``DATASETS.TEST``
    is registered, and the jsons of the datasets registered through
    :func:`register_coco_instances_validated` (``DATASETS.COCO_JSON``, ``--dataset``) pass
    :func:`validate_coco_json` (for ``DATASETS.TRAIN`` with masks required when
    ``MODEL.MASK_ON``). Raises KeyError or ValueError naming the key, dataset, file and ids."""
    for key in ("DATASETS.TRAIN", "DATASETS.TEST"):
        for name in _cfg_get(cfg, key):
            _require_registered(name, key)
            if name in _VALIDATED_DATASETS:
                masks = key == "DATASETS.TRAIN" and bool(cfg.MODEL.MASK_ON)
                validate_coco_json(_VALIDATED_DATASETS[name], require_masks=masks)


# ----------------------------------------------------------------------------- --dataset
DATASET_FLAG_FORMS = "NAME=JSON:IMAGE_ROOT (a COCO json and its images) or NAME (a registered dataset)"


def parse_dataset_flag(spec: str) -> Tuple[str, Optional[List[str]]]:
    """One ``--dataset`` value of tools/train_net.py and tools/demo.py (same meaning in both).

    ``NAME=JSON:IMAGE_ROOT`` registers the json under NAME (:func:`register_coco_json`) and gives
    ``(NAME, [NAME, abs JSON, abs IMAGE_ROOT])``, the entry for ``DATASETS.COCO_JSON``; a bare
    ``NAME`` must be registered already (a shapes or detectron2 name, or an entry of the
    config's ``DATASETS.COCO_JSON``: register those first) and gives ``(NAME, None)``.
    Raises ValueError for a malformed value, FileNotFoundError for missing files, KeyError for
    an unknown NAME; each names the flag."""
    source = f"--dataset {spec}"
    if "=" not in spec:
        _require_registered(spec, source)
        return spec, None
    name, _, paths = spec.partition("=")
    parts = paths.split(":")
    if not name or len(parts) != 2 or not all(parts):
        raise ValueError(f"--dataset {spec!r}: expected {DATASET_FLAG_FORMS}, e.g. my_train=ann.json:images/")
    register_coco_json(name, parts[0], parts[1], source=source)
    return name, [name, os.path.abspath(parts[0]), os.path.abspath(parts[1])]


def add_dataset_flags(cfg: CfgNode, specs: Sequence[str]) -> List[str]:
    """Register the config's ``DATASETS.COCO_JSON`` and then each ``--dataset`` value of
    ``specs`` (:func:`parse_dataset_flag`); the new ``NAME=JSON:IMAGE_ROOT`` entries are appended
    to the (unfrozen) ``cfg.DATASETS.COCO_JSON``, so a saved config registers them again.
    Returns the dataset names, in the order given."""
    register_coco_json_datasets(cfg)
    names = []
    entries = [list(entry) for entry in cfg.DATASETS.COCO_JSON]
    for spec in specs:
        name, entry = parse_dataset_flag(spec)
        if entry is not None and entry not in entries:
            entries.append(entry)
        names.append(name)
    cfg.DATASETS.COCO_JSON = entries
    return names
