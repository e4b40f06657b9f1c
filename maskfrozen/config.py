"""Config keys of maskfrozen: one small function per family, all applied by
``add_maskfrozen_config``. Code defaults equal the values in the shipped yaml files."""
from detectron2.config import CfgNode as CN


def add_engine_config(cfg: CN) -> None:
    """Trainer, optimizer and data-loading options shared by every model."""
    cfg.INPUT.DATASET_MAPPER_NAME = "default"
    cfg.SOLVER.OPTIMIZER = "SGD"  # "SGD" | "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # [(substring of a parameter name, lr multiplier)], applied after the backbone multiplier
    cfg.SOLVER.LR_MULTIPLIERS = []
    # "full_model" clips the norm over all parameters at once; the detectron2 types
    # ("value", "norm") clip each parameter on its own
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    # regexes (re.search) of parameter names to freeze: requires_grad=False, kept out of the
    # optimizer; modules whose every parameter is frozen also stay in eval mode
    cfg.MODEL.FREEZE_PATTERNS = []


def add_maskfrozen_config(cfg: CN) -> None:
    """Add every maskfrozen config key (idempotent)."""
    if getattr(cfg, "_maskfrozen_keys_added", False):
        return
    add_engine_config(cfg)
    cfg._maskfrozen_keys_added = True
