"""Seeded generator of the synthetic COCO-format "shapes" instance-segmentation dataset.

Every image holds several instances of ``SHAPE_CLASSES`` (circle, rectangle, triangle,
ellipse, star) in random colours over a textured background (gradient, stripes or blotchy
colour noise, plus pixel noise). Object sizes are drawn log-uniformly so that the instance
areas span COCO's small (< 32²), medium and large (> 96²) ranges at 256 px.

Annotation rules (so that the json, the pixels and COCOEvaluator always agree):

* Every shape is a polygon (circles/ellipses as dense vertex lists) and is rasterised with
  pycocotools itself, the same rasteriser COCOeval and detectron2's ``PolygonMasks`` use.
* Shapes are painted in order, later ones on top (partial occlusion). An instance is
  annotated by its *visible* pixels: a polygon (its exact vertex list) when it is neither
  occluded nor cut by the image border, otherwise the compressed RLE of the visible mask.
* ``area`` is the visible pixel count and ``bbox`` the tight XYWH box of the visible mask,
  both computed by ``pycocotools.mask`` from that mask; ``iscrowd`` is 0.
* A shape is only placed if it keeps ``min_area`` pixels and ``min_visible_fraction`` of its
  polygon area visible, and leaves every earlier instance above the same limits; otherwise
  another position and pose is tried (``max_attempts`` times), then the shape is skipped.
  Hence every painted shape is annotated.

Determinism: image ``i`` is drawn from ``numpy.random.default_rng((seed, i))``; the same
parameters give byte-identical json and images (on the same OpenCV/numpy build).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util

__all__ = [
    "SHAPE_CLASSES",
    "GENERATOR_VERSION",
    "ShapeInstance",
    "render_shapes_image",
    "generate_shapes_dataset",
    "coco_categories",
]

SHAPE_CLASSES: Tuple[str, ...] = ("circle", "rectangle", "triangle", "ellipse", "star")
# Bump when the drawing changes, so cached datasets of older versions are not reused.
GENERATOR_VERSION = 1
ANNOTATION_FILE = "annotations.json"
IMAGE_DIR = "images"


@dataclass
class ShapeInstance:
    """One painted shape: category index (0-based), polygon [x0, y0, x1, y1, ...],
    RGB colour, polygon area (unclipped) and its currently visible boolean mask."""

    category: int
    polygon: List[float]
    color: Tuple[int, int, int]
    polygon_area: float
    visible: np.ndarray


def coco_categories() -> List[dict]:
    """COCO ``categories`` entries, ids 1..K in ``SHAPE_CLASSES`` order."""
    return [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_CLASSES)]


# ----------------------------------------------------------------------------- geometry
def _polygon_from_points(points: np.ndarray) -> List[float]:
    """Flatten an (N, 2) float array to COCO's [x0, y0, ...], rounded to 0.01 px so that the
    json holds exactly the vertices that were rasterised."""
    return [round(float(v), 2) for v in points.reshape(-1)]


def _ellipse_points(cx, cy, ax, ay, angle, num_vertices) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, num_vertices, endpoint=False)
    x, y = ax * np.cos(t), ay * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def _unit_shape_points(category: int, rng) -> np.ndarray:
    """Vertices of a shape of class ``SHAPE_CLASSES[category]`` with extent ~1, centred at 0,
    with random rotation and class-specific proportions."""
    name = SHAPE_CLASSES[category]
    angle = rng.uniform(0.0, 2.0 * math.pi)
    if name == "circle":
        return _ellipse_points(0.0, 0.0, 0.5, 0.5, 0.0, 64)
    if name == "ellipse":
        return _ellipse_points(0.0, 0.0, 0.5, 0.5 * rng.uniform(0.35, 0.7), angle, 64)
    if name == "rectangle":
        half_h = 0.5 * rng.uniform(0.4, 1.0)
        corners = np.array([[-0.5, -half_h], [0.5, -half_h], [0.5, half_h], [-0.5, half_h]])
    elif name == "triangle":
        # vertices ~120° apart on a circle, jittered so triangles are not all equilateral
        angles = np.array([0.0, 2.0 * math.pi / 3, 4.0 * math.pi / 3]) + rng.uniform(-0.35, 0.35, 3)
        corners = 0.5 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    elif name == "star":
        radii = np.tile([0.5, 0.5 * rng.uniform(0.38, 0.5)], 5)
        angles = np.arange(10) * (math.pi / 5)
        corners = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    else:  # pragma: no cover - SHAPE_CLASSES and this function are edited together
        raise ValueError(f"unknown shape class {name!r}")
    c, s = math.cos(angle), math.sin(angle)
    return corners @ np.array([[c, s], [-s, c]])


def _polygon_area(points: np.ndarray) -> float:
    """Shoelace area of an (N, 2) vertex array."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _shape_points(category: int, area: float, cx: float, cy: float, rng) -> np.ndarray:
    """Vertices of a shape whose polygon area is ``area`` px², centred at (cx, cy).
    Sizing by area (not extent) gives every class the same area distribution."""
    unit = _unit_shape_points(category, rng)
    return unit * math.sqrt(area / _polygon_area(unit)) + np.array([cx, cy])


def _rasterize(polygon: List[float], height: int, width: int) -> np.ndarray:
    """Boolean mask of a polygon with pycocotools' rasteriser (as COCOeval/detectron2 do)."""
    rle = mask_util.merge(mask_util.frPyObjects([polygon], height, width))
    return mask_util.decode(rle).astype(bool)


def _inside_image(polygon: List[float], height: int, width: int) -> bool:
    x, y = np.asarray(polygon[0::2]), np.asarray(polygon[1::2])
    return bool(x.min() >= 0 and y.min() >= 0 and x.max() <= width and y.max() <= height)


# ----------------------------------------------------------------------------- pixels
def _pixel_grid(height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))


def _random_color(rng) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _background(height: int, width: int, rng) -> np.ndarray:
    """Float32 HxWx3 background: a linear gradient, stripes, or blotchy colour noise."""
    kind = rng.integers(3)
    if kind == 2:
        cells = int(rng.integers(3, 12))
        grid = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.float32)
        return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    xs, ys = _pixel_grid(height, width)
    theta = rng.uniform(0.0, math.pi)
    t = xs * math.cos(theta) + ys * math.sin(theta)
    if kind == 0:
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    else:
        period = rng.uniform(6.0, 40.0)
        t = 0.5 + 0.5 * np.sin(t * (2.0 * math.pi / period))
    c0, c1 = _random_color(rng), _random_color(rng)
    return c0 + t[..., None] * (c1 - c0)


def _contrasting_color(region_mean: np.ndarray, rng, min_distance: float = 80.0) -> np.ndarray:
    """A random colour at least ``min_distance`` (L2, 0..255) from the local background."""
    color = _random_color(rng)
    for _ in range(20):
        if np.linalg.norm(color - region_mean) >= min_distance:
            break
        color = _random_color(rng)
    return color


def _mask_box(mask: np.ndarray) -> Tuple[slice, slice]:
    """Row and column slices of the tight box around a non-empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _paint_shaded(image, mask, color, cx, cy, size, rng, amplitude: float = 12.0) -> None:
    """Paint ``color`` under ``mask`` with a soft linear brightness ramp (±``amplitude`` over
    the shape's extent ``size``) in a random direction, working inside the mask's box only."""
    rows, cols = _mask_box(mask)
    ys, xs = np.mgrid[rows, cols].astype(np.float32)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    ramp = ((xs - cx) * math.cos(theta) + (ys - cy) * math.sin(theta)) / max(size / 2.0, 1.0)
    shaded = color + amplitude * np.clip(ramp, -1.0, 1.0)[..., None]
    np.copyto(image[rows, cols], shaded, where=mask[rows, cols, None])


# ----------------------------------------------------------------------------- one image
def _keeps_visible(mask_area: int, polygon_area: float, min_area: int, min_fraction: float) -> bool:
    return mask_area >= min_area and mask_area >= min_fraction * polygon_area


def render_shapes_image(
    rng: np.random.Generator,
    image_size: int,
    instances_per_image: Tuple[int, int] = (3, 8),
    area_range: Tuple[float, float] = (0.0015, 0.8),
    min_area: int = 16,
    min_visible_fraction: float = 0.25,
    max_attempts: int = 10,
    noise_std: Tuple[float, float] = (2.0, 12.0),
) -> Tuple[np.ndarray, List[ShapeInstance]]:
    """Draw one square RGB uint8 image and its instances (in painting order).

    Args:
        rng: the image's random generator.
        image_size: side length in pixels.
        instances_per_image: inclusive range of the number of shapes attempted.
        area_range: range of a shape's polygon area as fractions of the image area, sampled
            log-uniformly (at 256 px: 98 to 52429 px², i.e. COCO small to large).
        min_area, min_visible_fraction: visibility limits (pixels, fraction of polygon area)
            every annotated instance keeps, including after later shapes occlude it.
        max_attempts: placements tried per shape before it is skipped.
        noise_std: range of the per-image Gaussian pixel-noise standard deviation.
    """
    h = w = int(image_size)
    image = _background(h, w, rng)
    instances: List[ShapeInstance] = []
    num_shapes = int(rng.integers(instances_per_image[0], instances_per_image[1] + 1))
    log_lo, log_hi = (math.log(f * h * w) for f in area_range)
    # largest first: big shapes form the back layers and small ones are not buried under them
    areas = np.sort(np.exp(rng.uniform(log_lo, log_hi, num_shapes)))[::-1]
    for area in areas:
        category = int(rng.integers(len(SHAPE_CLASSES)))
        for _attempt in range(max_attempts):
            # centre at least a quarter extent inside: border cuts are partial, never most of it
            margin = min(0.25 * math.sqrt(area), 0.5 * min(h, w))
            cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
            points = _shape_points(category, area, cx, cy, rng)
            polygon = _polygon_from_points(points)
            polygon_area = _polygon_area(points)
            mask = _rasterize(polygon, h, w)
            if not _keeps_visible(int(mask.sum()), polygon_area, min_area, min_visible_fraction):
                continue
            remaining = [inst.visible & ~mask for inst in instances]
            if not all(
                _keeps_visible(int(r.sum()), inst.polygon_area, min_area, min_visible_fraction)
                for r, inst in zip(remaining, instances)
            ):
                continue
            for inst, r in zip(instances, remaining):
                inst.visible = r
            rows, cols = _mask_box(mask)
            color = _contrasting_color(image[rows, cols].mean(axis=(0, 1)), rng)
            _paint_shaded(image, mask, color, cx, cy, math.sqrt(area), rng)
            rgb = tuple(int(c) for c in color)
            instances.append(ShapeInstance(category, polygon, rgb, polygon_area, mask))
            break
    image += np.float32(rng.uniform(*noise_std)) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), instances


def _annotation(instance: ShapeInstance, height: int, width: int) -> dict:
    """COCO annotation fields of one instance: segmentation, area and bbox of its visible mask."""
    rle = mask_util.encode(np.asfortranarray(instance.visible.astype(np.uint8)))
    full = _rasterize(instance.polygon, height, width)
    if np.array_equal(full, instance.visible) and _inside_image(instance.polygon, height, width):
        segmentation = [instance.polygon]
    else:
        segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    return {
        "segmentation": segmentation,
        "area": float(mask_util.area(rle)),
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
        "iscrowd": 0,
        "category_id": instance.category + 1,
    }


# ----------------------------------------------------------------------------- dataset
def _write_image(path: str, image_rgb: np.ndarray, jpeg_quality: int) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if path.endswith(".jpg") else []
    if not cv2.imwrite(path, np.ascontiguousarray(image_rgb[..., ::-1]), params):
        raise OSError(f"could not write image {path!r}")


def generate_shapes_dataset(
    out_dir: str,
    num_images: int,
    image_size: int = 256,
    seed: int = 0,
    image_format: str = "jpg",
    jpeg_quality: int = 90,
    **render_kwargs,
) -> str:
    """Write ``num_images`` images to ``out_dir/images`` and their COCO json to
    ``out_dir/annotations.json``; return the json path.

    Image ids are 1..N and file names ``000000.jpg``...; annotation ids are 1..M in image
    order. ``render_kwargs`` go to :func:`render_shapes_image`. This function writes in place;
    :func:`maskfrozen.data.datasets.prepare_shapes` wraps it in an atomic, cached directory.
    """
    if num_images < 1 or image_size < 16:
        raise ValueError(f"need num_images >= 1 and image_size >= 16, got {num_images}, {image_size}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    os.makedirs(os.path.join(out_dir, IMAGE_DIR), exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng((seed, index))
        image, instances = render_shapes_image(rng, image_size, **render_kwargs)
        file_name = f"{index:06d}.{image_format}"
        _write_image(os.path.join(out_dir, IMAGE_DIR, file_name), image, jpeg_quality)
        images.append({"id": index + 1, "file_name": file_name, "height": image_size, "width": image_size})
        for inst in instances:
            ann = _annotation(inst, image_size, image_size)
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, **ann})
    coco: Dict[str, object] = {
        "info": {
            "description": "maskfrozen synthetic shapes",
            "generator_version": GENERATOR_VERSION,
            "num_images": num_images,
            "image_size": image_size,
            "seed": seed,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(),
    }
    json_path = os.path.join(out_dir, ANNOTATION_FILE)
    with open(json_path, "w") as f:
        json.dump(coco, f)
    return json_path
