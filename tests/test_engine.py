"""Engine parts on hand-made models: parameter groups, clipping, freezing, checkpoints."""
import copy
import os

import pytest
import torch
from detectron2.config import get_cfg
from torch import nn

import maskfrozen
from maskfrozen.engine import AtomicCheckpointer, build_optimizer, build_param_groups, freeze_by_patterns
from maskfrozen.engine.freeze import unpin_eval_mode
from maskfrozen.engine.trainer import amp_enabled


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.query_embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 2)
        self.level_embed = nn.Parameter(torch.zeros(3, 4))


def solver_cfg(**overrides):
    cfg = get_cfg()
    maskfrozen.add_maskfrozen_config(cfg)
    cfg.SOLVER.BASE_LR = 1.0
    cfg.SOLVER.WEIGHT_DECAY = 0.1
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.MOMENTUM = 0.0
    for key, value in overrides.items():
        node, attr = cfg, key.split(".")
        for a in attr[:-1]:
            node = getattr(node, a)
        setattr(node, attr[-1], value)
    return cfg


def hyperparams_by_name(model, groups):
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_param_groups_follow_the_rules():
    model = Toy()
    cfg = solver_cfg(**{"SOLVER.LR_MULTIPLIERS": [["head.bias", 0.5]], "SOLVER.WEIGHT_DECAY_BIAS": 0.2})
    got = hyperparams_by_name(model, build_param_groups(model, cfg))
    assert got == {
        "backbone.0.weight": (0.1, 0.1),
        "backbone.0.bias": (0.1, 0.2),
        "backbone.1.weight": (0.1, 0.0),  # norm
        "backbone.1.bias": (0.1, 0.0),
        "query_embed.weight": (1.0, 0.0),  # nn.Embedding
        "head.weight": (1.0, 0.1),
        "head.bias": (0.5, 0.2),
        "level_embed": (1.0, 0.1),  # a bare parameter: decayed, as the official Mask2Former / FastInst
    }
    cfg.SOLVER.WEIGHT_DECAY_EMBED_BY_NAME = True  # ours: named like an embedding is enough
    assert hyperparams_by_name(model, build_param_groups(model, cfg))["level_embed"] == (1.0, 0.0)


def test_full_model_clipping_clips_the_global_norm():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    model = nn.Module()
    model.a, model.b = a, b
    cfg = solver_cfg(**{"SOLVER.CLIP_GRADIENTS.ENABLED": True, "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 1.0,
                        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "full_model", "SOLVER.WEIGHT_DECAY": 0.0})
    optimizer = build_optimizer(cfg, model)
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])  # global norm 5 -> scaled by 1/5
    optimizer.step()
    assert torch.allclose(torch.cat([a.data, b.data]), torch.tensor([-0.6, -0.8]), atol=1e-6)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER='LAMB'"):
        build_optimizer(solver_cfg(**{"SOLVER.OPTIMIZER": "LAMB"}), Toy())


def test_freezing_by_pattern_excludes_params_and_pins_eval():
    model = Toy()
    frozen = freeze_by_patterns(model, [r"^backbone\."])
    assert frozen == ["backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "backbone.1.bias"]
    groups = build_param_groups(model, solver_cfg())
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in model.backbone.parameters())
    model.train()
    assert not model.backbone.training and not model.backbone[1].training
    assert model.head.training
    # a real class override (no instance attribute), kept by deepcopy, undone by unpin
    assert "train" not in vars(model.backbone) and isinstance(model.backbone, nn.Sequential)
    copy_of_model = copy.deepcopy(model)
    copy_of_model.train()
    assert not copy_of_model.backbone.training
    unpin_eval_mode(model.backbone)
    model.train()
    assert type(model.backbone) is nn.Sequential and model.backbone.training


@pytest.mark.parametrize("patterns, message", [(["backbne"], "match no parameter"), (["("], "invalid regex")])
def test_freeze_patterns_errors_name_the_pattern(patterns, message):
    with pytest.raises(ValueError, match=message):
        freeze_by_patterns(Toy(), patterns)


def test_amp_is_ignored_on_cpu():
    cfg = solver_cfg(**{"SOLVER.AMP.ENABLED": True, "MODEL.DEVICE": "cpu"})
    assert amp_enabled(cfg) is False


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = Toy()
    checkpointer = AtomicCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    before = (tmp_path / "model_0000001.pth").read_bytes()

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000002", iteration=2)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert (tmp_path / "model_0000001.pth").read_bytes() == before


def test_maskfrozen_keys_leave_detectron2_defaults_and_no_marker():
    """Adding our keys changes no detectron2 default (CLIP_TYPE stays "value"; our yaml
    files set "full_model") and leaves no marker key in a dumped config; adding twice is
    harmless."""
    from detectron2.config import get_cfg

    from maskfrozen.config import add_maskfrozen_config

    cfg = get_cfg()
    add_maskfrozen_config(cfg)
    add_maskfrozen_config(cfg)
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == get_cfg().SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "value"
    dumped = cfg.dump()
    assert "_maskfrozen" not in dumped and "TEST_TOPK" not in dumped
