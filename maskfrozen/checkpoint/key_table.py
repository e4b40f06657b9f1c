"""The conversion loop every converter shares: rename each checkpoint tensor by the
converter's key table, optionally transform it (slice class rows, permute anchors), and
check it against the target model (name and shape), filling a ``ConversionReport``."""
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["RenameFn", "TransformFn", "rename_by_table", "convert_by_table", "finish_report"]

# source key -> (matched a row, new key or None when the row drops it)
RenameFn = Callable[[str], Tuple[bool, Optional[str]]]
# (source key, new key, value, target shape or None) -> value
TransformFn = Callable[[str, str, torch.Tensor, Optional[tuple]], torch.Tensor]


def rename_by_table(table: Sequence[Tuple[str, object]], key: str) -> Tuple[bool, Optional[str]]:
    """(matched, new key) by the first ``(pattern, replacement)`` row whose regex matches
    ``key``: the replacement is a template (``\\1`` groups), a function of the match, or None
    (the row drops the key: matched, no new key)."""
    for pattern, replacement in table:
        m = re.match(pattern, key)
        if m is not None:
            if replacement is None:
                return True, None
            return True, replacement(m) if callable(replacement) else m.expand(replacement)
    return False, None


def convert_by_table(source: Mapping[str, torch.Tensor], rename: RenameFn, report,
                     target: Optional[Mapping[str, torch.Tensor]] = None, transform: Optional[TransformFn] = None,
                     dropped: Optional[List[str]] = None, shape_hint: str = "") -> Dict[str, torch.Tensor]:
    """The renamed tensors; ``report`` gets the renamed, dropped (``dropped``, default its
    ``dropped_aliases``) and unused keys. Raises ValueError when two checkpoint keys map
    to one model key, or listing every shape mismatch with ``target``."""
    dropped = report.dropped_aliases if dropped is None else dropped
    converted: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    mismatches = []
    for key, value in source.items():
        if key.endswith("num_batches_tracked"):
            continue
        report.num_source_tensors += 1
        matched, new_key = rename(key)
        if not matched or new_key is None:
            (report.unused_source_keys if not matched else dropped).append(key)
            continue
        if new_key in converted:
            raise ValueError(f"checkpoint keys {origin[new_key]!r} and {key!r} both map to {new_key!r}")
        if target is not None and new_key not in target:
            report.unused_source_keys.append(f"{key} (-> {new_key}, not in the model)")
            continue
        target_shape = tuple(target[new_key].shape) if target is not None else None
        value = transform(key, new_key, value, target_shape) if transform is not None else value
        if target_shape is not None and tuple(value.shape) != target_shape:
            mismatches.append(f"{key} -> {new_key}: checkpoint {tuple(value.shape)} vs model {target_shape}")
            continue
        converted[new_key], origin[new_key] = value, key
        report.renamed[key] = new_key
    if mismatches:
        raise ValueError(f"shape mismatch between the checkpoint and the model (check the config: {shape_hint}):\n  "
                         + "\n  ".join(mismatches))
    return converted


def finish_report(report, converted: Mapping[str, torch.Tensor], target: Optional[Mapping[str, torch.Tensor]]) -> None:
    """Model keys left without a value, and how many the model has (``target`` given)."""
    if target is None:
        return
    report.unmatched_target_keys = sorted(k for k in target if k not in converted and not k.endswith("num_batches_tracked"))
    report.num_target_keys = len(report.unmatched_target_keys) + len(converted)
