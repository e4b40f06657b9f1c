"""Overlay images of predictions (detectron2's Visualizer), used by tools/demo.py and the
main job. PNG files are written atomically: an interrupted run never leaves half a file.
Each input image gets its own overlay file: inputs with the same name (from different
folders, or ``a.jpg`` and ``a.png``) get numbered names, and an overlay that would replace
an input image is an error."""
import os
from typing import Iterable, List, Optional

import cv2
import numpy as np
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.utils.visualizer import ColorMode, Visualizer
from tqdm import tqdm

from ..data.mappers import read_image
from .checkpointer import atomic_write
from .predictor import Predictor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_images(inputs: Iterable[str]) -> List[str]:
    """Image files named by ``inputs`` (files, or folders searched non-recursively), each
    file once (a file named twice, directly or through its folder, keeps its first place)."""
    inputs = list(inputs)
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            names = sorted(n for n in os.listdir(item) if n.lower().endswith(IMAGE_EXTENSIONS))
            paths += [os.path.join(item, n) for n in names]
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"input {item!r} is neither an image file nor a folder")
    if not paths:
        raise FileNotFoundError(f"no image found in {inputs}")
    seen = set()
    unique = []
    for path in paths:
        if os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            unique.append(path)
    return unique


def load_bgr(path: str) -> np.ndarray:
    """An image file as HxWx3 BGR uint8 (grayscale expanded, 16-bit scaled to 8 bit), or
    ImageReadError naming the file (``maskfrozen.data.mappers.read_image``)."""
    return read_image(path, format="BGR")


def weights_problem(cfg: CfgNode) -> Optional[str]:
    """Why ``cfg.MODEL.WEIGHTS`` cannot give a trained model (empty, or no such local file),
    or None. URLs and other ``scheme://`` paths are left to detectron2's checkpointer."""
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        return ("MODEL.WEIGHTS is empty, so the predictions would come from a randomly initialised model: "
                "pass MODEL.WEIGHTS path/to/model_final.pth (or --allow-random-weights to draw them anyway)")
    if "://" in weights:
        return None
    if not os.path.exists(weights):
        return f"MODEL.WEIGHTS {weights!r} does not exist"
    if not os.path.isfile(weights):
        return f"MODEL.WEIGHTS {weights!r} is not a file"
    return None


def overlay_names(image_paths: List[str]) -> List[str]:
    """Distinct ``<stem>.png`` file names for the overlays of ``image_paths``: a repeated
    stem gets ``<stem>_1.png``, ``<stem>_2.png``, ... in input order (the first keeps the
    plain name), so no overlay replaces another."""
    taken = set()
    names = []
    for path in image_paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, n = f"{stem}.png", 0
        while name in taken:
            n += 1
            name = f"{stem}_{n}.png"
        taken.add(name)
        names.append(name)
    return names


def draw_predictions(predictions, image_bgr: np.ndarray, metadata, score_threshold: float) -> np.ndarray:
    """RGB overlay of the instances scoring at least ``score_threshold`` (and, when ``metadata``
    names its classes, of a class it has: a model with more class outputs than the dataset's
    classes may predict the others, as evaluation drops them)."""
    instances = predictions["instances"].to("cpu")
    keep = instances.scores >= score_threshold
    classes = metadata.get("thing_classes")
    if classes is not None and instances.has("pred_classes"):
        keep &= instances.pred_classes < len(classes)
    instances = instances[keep]
    visualizer = Visualizer(image_bgr[:, :, ::-1], metadata=metadata, instance_mode=ColorMode.IMAGE)
    return visualizer.draw_instance_predictions(instances).get_image()


def write_png(path: str, image_rgb: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image_rgb[:, :, ::-1]))
    if not ok:
        raise RuntimeError(f"could not encode {path!r} as PNG")
    atomic_write(path, lambda f: f.write(encoded.tobytes()))


def overlay_paths(image_paths: List[str], output_dir: str) -> List[str]:
    """One distinct overlay path per image in ``output_dir`` (``overlay_names``), none of
    them an input image itself (``--output`` may be an input folder).

    Raises:
        ValueError: two entries of ``image_paths`` are the same file (``list_images`` removes
            repeats), or an overlay path would be an input image."""
    inputs = {}
    for path in image_paths:
        if os.path.realpath(path) in inputs:
            raise ValueError(f"image {path!r} is listed twice (also as {inputs[os.path.realpath(path)]!r})")
        inputs[os.path.realpath(path)] = path
    paths = [os.path.join(output_dir, n) for n in overlay_names(image_paths)]
    clashes = [p for p in paths if os.path.realpath(p) in inputs]
    if clashes:
        raise ValueError(f"the overlay {clashes[0]!r} would overwrite an input image: "
                         f"choose an output folder that holds no input PNG of the same name")
    return paths


def write_overlays(cfg: CfgNode, image_paths: List[str], output_dir: str, score_threshold: float = 0.5,
                   predictor=None) -> List[str]:
    """Predict each image with ``predictor`` (default ``Predictor(cfg)``; e.g. an exported model's
    ``maskfrozen.export.ONNXPredictor``) and write one overlay PNG per image to ``output_dir``
    (names from ``overlay_paths``); returns the written paths."""
    outputs = overlay_paths(image_paths, output_dir)
    predictor = predictor if predictor is not None else Predictor(cfg)
    dataset = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused"
    metadata = MetadataCatalog.get(dataset)
    os.makedirs(output_dir, exist_ok=True)
    for path, out in tqdm(list(zip(image_paths, outputs)), desc="demo", unit="img"):
        image = load_bgr(path)
        overlay = draw_predictions(predictor(image), image, metadata, score_threshold)
        write_png(out, overlay)
    return outputs
