"""Datasets and dataset mappers: importing this package registers them."""
from .mappers import MAPPER_REGISTRY, ImageReadError, build_mapper  # noqa: E402,F401
from . import datasets  # noqa: F401  (registers shapes_* datasets; generates nothing)
