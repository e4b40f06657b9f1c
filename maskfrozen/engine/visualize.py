"""Overlay images of predictions (detectron2's Visualizer), used by tools/demo.py and the
main job. PNG files are written atomically: an interrupted run never leaves half a file."""
import os
from typing import Iterable, List

import cv2
import numpy as np
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import ColorMode, Visualizer
from tqdm import tqdm

from ..data.mappers import ImageReadError
from .checkpointer import atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_images(inputs: Iterable[str]) -> List[str]:
    """Image files named by ``inputs`` (files, or folders searched non-recursively)."""
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
        raise FileNotFoundError(f"no image found in {list(inputs)}")
    return paths


def load_bgr(path: str) -> np.ndarray:
    """An image file as HxWx3 BGR uint8 (grayscale is expanded), or ImageReadError."""
    try:
        return read_image(path, format="BGR")
    except OSError as e:
        raise ImageReadError(f"cannot read image {path!r}: {e}") from e


def draw_predictions(predictions, image_bgr: np.ndarray, metadata, score_threshold: float) -> np.ndarray:
    """RGB overlay of the instances scoring at least ``score_threshold``."""
    instances = predictions["instances"].to("cpu")
    instances = instances[instances.scores >= score_threshold]
    visualizer = Visualizer(image_bgr[:, :, ::-1], metadata=metadata, instance_mode=ColorMode.IMAGE)
    return visualizer.draw_instance_predictions(instances).get_image()


def write_png(path: str, image_rgb: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image_rgb[:, :, ::-1]))
    if not ok:
        raise RuntimeError(f"could not encode {path!r} as PNG")
    atomic_write(path, lambda f: f.write(encoded.tobytes()))


def write_overlays(cfg: CfgNode, image_paths: List[str], output_dir: str, score_threshold: float = 0.5) -> List[str]:
    """Predict each image with ``DefaultPredictor(cfg)`` and write ``<name>.png`` overlays."""
    predictor = DefaultPredictor(cfg)
    dataset = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused"
    metadata = MetadataCatalog.get(dataset)
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for path in tqdm(image_paths, desc="demo", unit="img"):
        image = load_bgr(path)
        overlay = draw_predictions(predictor(image), image, metadata, score_threshold)
        out = os.path.join(output_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        write_png(out, overlay)
        written.append(out)
    return written
