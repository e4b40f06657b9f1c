"""The golden tests import their helpers (``golden_compare``, ``query_seg_helpers``) as top-level
modules: put this folder on ``sys.path`` (last) before they are collected (the package ``__init__``
makes pytest put ``tests/`` there instead)."""
import os
import sys

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after tests/: its conftest stays `conftest` (spawned DDP workers import it)
