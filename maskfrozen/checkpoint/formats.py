"""One registry of the checkpoint formats ``tools/convert_checkpoint.py`` converts, each with
the key signature that recognises its checkpoints, so that a checkpoint of another
architecture is refused with the name of the format that fits instead of loading only
the backbone.

A converter module registers its format(s) at import with :func:`register_format`:

- ``load(path, allow_pickle) -> {name: tensor}`` reads the file;
- ``convert(source, target_state_dict, cfg) -> (converted, ConversionReport)``;
- ``signature``: regexes that must each match at least one key of a checkpoint of this
  format (keys of the architecture's own parts, not of the backbone);
- ``excludes``: regexes none of which may match (to tell apart formats whose keys nest,
  e.g. DINO's original keys contain every Deformable-DETR key).
"""
import re
from dataclasses import dataclass, field
from typing import Callable, Collection, Dict, List, Mapping, Sequence, Tuple

import torch

__all__ = ["CheckpointFormat", "FORMATS", "register_format", "matching_formats", "check_format_fits",
           "WrongCheckpointFormatError"]

ConvertFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], object], Tuple[Dict[str, torch.Tensor], object]]


class WrongCheckpointFormatError(ValueError):
    """The checkpoint's keys are those of another format (or of no known format)."""


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    load: Callable[[str, bool], Dict[str, torch.Tensor]]
    convert: ConvertFn
    signature: Sequence[str]
    excludes: Sequence[str] = field(default_factory=tuple)
    description: str = ""

    def fits(self, keys: Collection[str]) -> bool:
        """Whether ``keys`` look like a checkpoint of this format."""
        has = lambda pattern: any(re.search(pattern, k) for k in keys)  # noqa: E731
        return all(has(p) for p in self.signature) and not any(has(p) for p in self.excludes)


FORMATS: Dict[str, CheckpointFormat] = {}


def register_format(fmt: CheckpointFormat) -> CheckpointFormat:
    """Add ``fmt`` (a name registered twice is an error)."""
    if fmt.name in FORMATS:
        raise ValueError(f"checkpoint format {fmt.name!r} is registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


def matching_formats(keys: Collection[str]) -> List[str]:
    """Names of the registered formats whose signature ``keys`` fit."""
    return [name for name, fmt in FORMATS.items() if fmt.fits(keys)]


def check_format_fits(name: str, keys: Collection[str], path: str = "the checkpoint") -> None:
    """Raise ``WrongCheckpointFormatError`` unless ``keys`` fit format ``name``; the message
    names the format(s) that do fit, if any."""
    if name not in FORMATS:
        raise ValueError(f"unknown checkpoint format {name!r}; expected one of {sorted(FORMATS)}")
    if FORMATS[name].fits(keys):
        return
    fitting = matching_formats(keys)
    hint = (f"its keys are those of --format {' or '.join(fitting)}" if fitting
            else "its keys fit none of the known formats " + ", ".join(sorted(FORMATS)))
    example = ", ".join(sorted(keys)[:3])
    raise WrongCheckpointFormatError(
        f"{path} is not a {name!r} checkpoint: {hint} (its keys start: {example}; a {name!r} checkpoint has keys "
        f"matching {list(FORMATS[name].signature)}). Pass the right --format, or --allow-partial to convert "
        f"whatever matches anyway")
