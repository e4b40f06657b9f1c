"""Datasets and dataset mappers: importing this package registers them."""
from .mappers import MAPPER_REGISTRY, ImageReadError, build_mapper  # noqa: E402,F401
from . import datasets  # noqa: F401  (registers shapes_* datasets; generates nothing)
from .datasets import apply_dataset_config, register_coco_json, resolve_num_classes  # noqa: F401
from . import lsj_mapper  # noqa: F401,E402  (registers the coco_instance_lsj mapper)
from . import fastinst_mapper  # noqa: F401,E402  (registers the fastinst_instance mapper)
