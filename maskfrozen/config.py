"""Config keys of maskfrozen: one small function per family, all applied by
``add_maskfrozen_config``. Code defaults equal the values in the shipped yaml files."""
from detectron2.config import CfgNode as CN


def add_engine_config(cfg: CN) -> None:
    """Trainer, optimizer and data-loading options shared by every model."""
    cfg.INPUT.DATASET_MAPPER_NAME = "default"
    cfg.SOLVER.OPTIMIZER = "SGD"  # "SGD" | "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # WEIGHT_DECAY_EMBED applies to nn.Embedding modules (Detectron2 / Mask2Former / FastInst official);
    # True (ours): also to bare parameters named like *embed* (level_embed, meta_pos_embed, ...)
    cfg.SOLVER.WEIGHT_DECAY_EMBED_BY_NAME = False
    # [(substring of a parameter name, lr multiplier)], applied after the backbone multiplier
    cfg.SOLVER.LR_MULTIPLIERS = []
    # SOLVER.CLIP_GRADIENTS.CLIP_TYPE also accepts "full_model" (set in our yaml files): the
    # norm over all parameters at once; detectron2's types ("value", "norm") clip each
    # parameter on its own. Detectron2's default ("value") is left unchanged.
    # regexes (re.search) of parameter names to freeze: requires_grad=False, kept out of the
    # optimizer; modules whose every parameter is frozen also stay in eval mode
    cfg.MODEL.FREEZE_PATTERNS = []


def add_detr_config(cfg: CN) -> None:
    """DETR family (``DeformableDETRFamily`` meta-arch). Defaults = the official Deformable-DETR
    (fundamentalvision/Deformable-DETR) two-stage + box refine; DINO and H-DETR set their
    options in their yaml files. Our deliberate differences are options, off by default
    (docs/fidelity/detr.md)."""
    cfg.MODEL.DETR = CN()
    d = cfg.MODEL.DETR
    # rows of every class head; CLASS_ROWS says what a row is: "contiguous" = the dataset's class k
    # (NUM_CLASSES = its class count) | "coco_category_id" = the COCO category id (the official
    # repositories' 91 rows, ids 0..90: targets use the id, detections map it back to the dataset's
    # class and rows without a COCO category are dropped after the top-k)
    d.NUM_CLASSES = 80
    d.CLASS_ROWS = "contiguous"
    d.IN_FEATURES = ["res3", "res4", "res5"]
    d.NUM_FEATURE_LEVELS = 4  # extra stride-2 levels = NUM_FEATURE_LEVELS - len(IN_FEATURES)
    d.GN_GROUPS = 32
    d.HIDDEN_DIM = 256
    d.NHEADS = 8
    d.ENC_LAYERS = 6
    d.DEC_LAYERS = 6
    d.DIM_FEEDFORWARD = 1024
    d.DROPOUT = 0.1
    d.ACTIVATION = "relu"
    d.ENC_N_POINTS = 4
    d.DEC_N_POINTS = 4
    d.POSITION_TEMPERATURE = 10000.0
    d.POSITION_OFFSET = -0.5  # Deformable-DETR, H-DETR: -0.5; DINO: 0
    # padding mask of each level: "interpolate" = the image's mask resized (nearest) to the level,
    # as the official code | "ceil" (ours) = the ceil(size / stride) cells a conv stack computes
    d.LEVEL_MASKS = "interpolate"
    # the batch is padded to its largest image (0, official) or to a multiple of this
    d.SIZE_DIVISIBILITY = 0
    d.NUM_QUERIES = 300
    d.TWO_STAGE = True
    d.BOX_REFINE = True
    d.MIXED_SELECTION = False  # content queries learned, positions from the proposals
    d.QUERY_POS = "static"  # "static" (Deformable-DETR, H-DETR) | "dynamic" (DINO)
    # the box DINO's dynamic query position embeds: "level0" = the reference scaled by level 0's
    # valid ratio (official) | "image" (ours) = the image-normalised reference (padding-invariant)
    d.QUERY_POS_REFERENCE = "level0"
    d.LOOK_FORWARD_TWICE = False
    d.DECODER_FINAL_NORM = False  # DINO: True
    d.SHARE_DECODER_HEADS = False  # one class / box head for every decoder layer (DINO: True)
    d.INVERSE_SIGMOID_EPS = 1e-5  # clamp of the box refinement's logit (DINO: 1e-3)
    # two-stage selection: False (official) = invalid (padded, border) tokens rank like the others,
    # only their boxes are invalid | True (ours) = they are never selected
    d.PROPOSALS_VALID_ONLY = False
    # Hungarian matching costs and loss weights (focal class cost / loss)
    d.CLASS_COST_WEIGHT = 2.0
    d.BBOX_COST_WEIGHT = 5.0
    d.GIOU_COST_WEIGHT = 2.0
    d.CLASS_WEIGHT = 2.0
    d.BBOX_WEIGHT = 5.0
    d.GIOU_WEIGHT = 2.0
    d.FOCAL_ALPHA = 0.25
    d.FOCAL_GAMMA = 2.0
    # class loss: "focal" | "quality_focal" (the official Co-DINO query head's; exponent QFL_BETA)
    d.CLASS_LOSS = "focal"
    d.QFL_BETA = 2.0
    d.ENC_CLASS_AGNOSTIC = True  # encoder proposals scored object-vs-background (rank by logit 0)
    # encoder-proposal loss on "all" tokens (Deformable-DETR, H-DETR) | the "selected" top-k (DINO)
    d.ENC_LOSS_TOKENS = "all"
    # DINO contrastive denoising: positive dn queries per image (0 = off); groups as the official
    # code: 2 * DN_NUMBER // (2 * most GT in an image) when 2 * DN_NUMBER >= 100, else 2 * DN_NUMBER
    d.DN_NUMBER = 0
    d.DN_LABEL_NOISE = 0.5
    d.DN_BOX_NOISE = 0.4
    # H-DETR hybrid matching: extra one-to-many queries (0 = off), GT repeats k, loss weight
    d.NUM_QUERIES_ONE2MANY = 0
    d.K_ONE2MANY = 6
    d.LAMBDA_ONE2MANY = 1.0
    d.CLIP_BOXES = False  # ours: clip output boxes to the image and drop empty ones (official: no)
    # detections per image at inference: detectron2's TEST.DETECTIONS_PER_IMAGE (all models)


def add_mask_frozen_config(cfg: CN) -> None:
    """Mask Frozen-DETR (``MaskFrozenDETR`` meta-arch). Defaults = the paper's final design
    on a COCO detector (configs/coco/mask_frozen_detr/*.yaml). The
    detector itself is configured by the usual sections (``MODEL.DETR``, backbone)."""
    cfg.MODEL.MASK_FROZEN = CN()
    m = cfg.MODEL.MASK_FROZEN
    m.DETECTOR_META_ARCHITECTURE = "DeformableDETRFamily"
    m.DETECTOR_WEIGHTS = ""  # required: checkpoint of the trained detector
    m.ALLOW_RANDOM_DETECTOR = False  # tests only: run without DETECTOR_WEIGHTS
    m.C1_FEATURE = "res2"  # backbone stage-1 (stride 4) feature; must be in the backbone outputs
    m.NUM_QUERIES = 100  # top-N detector queries by class score
    m.MASK_REGION = "box"  # "box": RoI masks pasted into the boxes | "image": baseline masks at 1/4
    m.ROI_SIZE = 32
    # RoIAlign samples per bin side (0 = adaptive ceil(box/S), detectron2's mask-head default, which
    # makes large boxes expensive on CPU: forward and backward scale with the box area)
    m.ROI_SAMPLING_RATIO = 2
    m.NECK = "conv_gn"  # on C1: "conv_gn" (pointwise conv + GN, the paper's neck) | "linear" (conv only)
    m.NECK_GN_GROUPS = 32
    m.MASK_EMBED_LAYERS = 3  # MLP q_i -> e_i
    m.IMAGE_ENCODER = CN()  # F_e on the encoder features
    m.IMAGE_ENCODER.NAME = "deformable"  # "none" | "deformable" | "swin" | "convnext"
    m.IMAGE_ENCODER.DEPTH = 2
    m.IMAGE_ENCODER.NHEADS = 8
    m.IMAGE_ENCODER.N_POINTS = 4
    m.IMAGE_ENCODER.DIM_FEEDFORWARD = 1024
    m.IMAGE_ENCODER.WINDOW_SIZE = 7  # swin
    m.BOX_ENCODER = CN()  # F_b on the RoI features
    m.BOX_ENCODER.NAME = "transformer"  # "none" | "transformer" (linear channel mapper + layers)
    m.BOX_ENCODER.DIM = 128
    m.BOX_ENCODER.DEPTH = 1
    m.BOX_ENCODER.NHEADS = 8
    m.BOX_ENCODER.DIM_FEEDFORWARD = 512
    m.QUERY_ENCODER = CN()
    m.QUERY_ENCODER.NAME = "cross"  # "none" | "cross" (box-to-object) | "cross_self" | "cross_self_ffn"
    m.QUERY_ENCODER.DEPTH = 1
    m.QUERY_ENCODER.NHEADS = 8
    m.QUERY_ENCODER.DIM_FEEDFORWARD = 1024
    m.MASK_SCORING = CN()  # on: score = class x predicted IoU; off: class x mean mask probability
    m.MASK_SCORING.ENABLED = True
    m.MASK_SCORING.CONV_DIM = 256
    m.MASK_SCORING.NUM_CONVS = 2
    m.MASK_SCORING.FC_DIM = 256
    m.MASK_SCORING.NUM_FC = 2
    m.MASK_SCORING.POOL_SIZE = 4  # conv output average-pooled to P x P before the MLP
    # point-sampled mask loss: N points, oversample k, importance ratio beta (Mask2Former values)
    m.NUM_POINTS = 12544
    m.OVERSAMPLE_RATIO = 3.0
    m.IMPORTANCE_SAMPLE_RATIO = 0.75
    m.MASK_WEIGHT = 5.0
    m.DICE_WEIGHT = 5.0
    m.MASK_IOU_WEIGHT = 1.0
    m.TEST = CN()
    m.TEST.MASK_THRESHOLD = 0.5


def add_maskfrozen_config(cfg: CN) -> None:
    """Add every maskfrozen config key (idempotent: a config that already has them is
    left as it is; no marker key is stored)."""
    if "DETR" in cfg.MODEL and "MASK_FROZEN" in cfg.MODEL:
        return
    add_engine_config(cfg)
    add_detr_config(cfg)
    add_mask_frozen_config(cfg)
    add_data_and_weights_config(cfg)
    add_mask2former_config(cfg)
    add_co_detr_config(cfg)
    add_sotr_config(cfg)
    add_fastinst_config(cfg)


def load_config(config_file: str, opts=(), freeze: bool = True) -> CN:
    """detectron2's defaults + every maskfrozen key + ``config_file`` + ``KEY VALUE`` overrides,
    as tools/train_net.py, tools/demo.py and the tests build it."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_maskfrozen_config(cfg)
    cfg.merge_from_file(config_file)
    try:
        cfg.merge_from_list(list(opts))
    except AssertionError as e:  # yacs asserts on unknown keys / odd-length overrides
        raise KeyError(f"command-line config override {list(opts)}: {e}") from e
    if freeze:
        cfg.freeze()
    return cfg


def _detr_meta_architecture(cfg: CN) -> str:
    """The meta-architecture that reads ``MODEL.DETR`` / ``MODEL.CO_DETR``: the model's own, or
    for Mask Frozen-DETR its frozen detector's."""
    arch = cfg.MODEL.META_ARCHITECTURE
    return cfg.MODEL.MASK_FROZEN.DETECTOR_META_ARCHITECTURE if arch == "MaskFrozenDETR" else arch


def _check_co_detr_target(cfg: CN) -> None:
    """``MODEL.CO_DETR.ENABLED`` only on a DETR-family detector (else it would be ignored)."""
    from detectron2.modeling import META_ARCH_REGISTRY

    from .modeling.detr import DeformableDETRFamily

    def is_detr(cls) -> bool:
        return isinstance(cls, type) and issubclass(cls, DeformableDETRFamily)

    arch = _detr_meta_architecture(cfg)
    if arch in META_ARCH_REGISTRY and is_detr(META_ARCH_REGISTRY.get(arch)):
        return
    detr_archs = sorted(name for name, cls in META_ARCH_REGISTRY if is_detr(cls))
    own = cfg.MODEL.META_ARCHITECTURE
    detector = f" (its detector {arch!r})" if arch != own else ""
    raise ValueError(f"MODEL.CO_DETR.ENABLED is True but MODEL.META_ARCHITECTURE {own!r}{detector} is not a "
                     f"DETR-family detector, so Co-DETR's auxiliary heads would be silently ignored: they attach to "
                     f"{detr_archs} (or Mask Frozen-DETR on one of them). Set MODEL.CO_DETR.ENABLED False")


def check_config(cfg: CN) -> None:
    """Cross-key checks that no single model's ``from_config`` makes (run by
    :func:`prepare_config` before a model is built). Raises ValueError naming the keys and values."""
    if cfg.TEST.DETECTIONS_PER_IMAGE < 1:
        raise ValueError(f"TEST.DETECTIONS_PER_IMAGE must be >= 1 (the detections kept per image; with 0 no image "
                         f"has any and AP is nan), got {cfg.TEST.DETECTIONS_PER_IMAGE} "
                         f"(MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r})")
    if cfg.MODEL.CO_DETR.ENABLED:
        _check_co_detr_target(cfg)


def prepare_config(cfg: CN) -> CN:
    """The start-up step of every entry point (``Trainer``, ``Predictor``, tools/train_net.py,
    tools/demo.py) before a model is built: the config's datasets registered, the train/test
    class lists checked and the class counts resolved (``maskfrozen.data.datasets.
    apply_dataset_config``), then :func:`check_config`. Returns the resolved config."""
    from .data.datasets import apply_dataset_config

    cfg = apply_dataset_config(cfg)
    check_config(cfg)
    return cfg


def add_data_and_weights_config(cfg: CN) -> None:
    """Your own COCO-format datasets, class counts taken from the data, strict MODEL.WEIGHTS
    (``maskfrozen.data.datasets.apply_dataset_config``, ``maskfrozen.engine.weights``)."""
    # [[name, json_file, image_root], ...]: registered (validated when loaded) before the model
    # is built, with thing_classes from the json's categories; use the names in DATASETS.TRAIN/TEST
    cfg.DATASETS.COCO_JSON = []
    # class-count keys (MODEL.DETR / ROI_HEADS / RETINANET.NUM_CLASSES) of the model are set to the
    # training datasets' class count: False = only where the config left the code default (80);
    # True = always (train_net's --dataset turns it on unless the command line sets a count)
    cfg.MODEL.NUM_CLASSES_FROM_DATASET = False
    # False: MODEL.WEIGHTS must fit the model exactly (missing / unexpected keys or shape mismatches
    # are an error); True: load what fits, e.g. fine-tuning from a backbone-only (.pkl) checkpoint
    cfg.MODEL.WEIGHTS_ALLOW_PARTIAL = False


def add_mask2former_config(cfg: CN) -> None:
    """Query-based mask models (``QuerySegmentor`` meta-arch: Mask2Former, FastInst), with the
    official Mask2Former key names so its yaml files carry over. Defaults = the COCO instance
    R50 50-epoch yaml (configs/coco/mask2former/maskformer2_R50_bs16_50ep.yaml); the class count
    is detectron2's ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` (its default, 54, is left unchanged:
    the yaml sets 80)."""
    h = cfg.MODEL.SEM_SEG_HEAD
    h.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    h.MASK_DIM = 256
    h.TRANSFORMER_ENC_LAYERS = 6
    h.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    h.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    h.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8
    h.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD = 1024  # hard-coded 1024 in the official code
    cfg.MODEL.MASK_FORMER = CN()
    m = cfg.MODEL.MASK_FORMER
    m.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    m.DEEP_SUPERVISION = True
    m.NO_OBJECT_WEIGHT = 0.1
    m.CLASS_WEIGHT = 2.0
    m.MASK_WEIGHT = 5.0
    m.DICE_WEIGHT = 5.0
    m.HIDDEN_DIM = 256
    m.NUM_OBJECT_QUERIES = 100
    m.NHEADS = 8
    m.DROPOUT = 0.0  # the pixel decoder's encoder only (official: the transformer decoder has none)
    m.DIM_FEEDFORWARD = 2048
    m.PRE_NORM = False
    m.ENFORCE_INPUT_PROJ = False
    m.SIZE_DIVISIBILITY = 32
    m.DEC_LAYERS = 10  # official meaning: 9 decoder layers + 1 for the prediction on the learnable queries
    m.TRAIN_NUM_POINTS = 12544
    # masked attention also allowed on the d cells around each predicted mask (0 = the papers;
    # measured on the FastInst shapes recipe: configs/shapes/fastinst/fastinst_R18_D3.yaml)
    m.ATTN_MASK_DILATION = 0
    m.OVERSAMPLE_RATIO = 3.0
    m.IMPORTANCE_SAMPLE_RATIO = 0.75
    # accepted so official yaml files load; only these values are supported (checked at build)
    m.TRANSFORMER_IN_FEATURE = "multi_scale_pixel_decoder"
    m.ENC_LAYERS = 0
    m.TEST = CN()
    m.TEST.INSTANCE_ON = True
    m.TEST.SEMANTIC_ON = False
    m.TEST.PANOPTIC_ON = False
    m.TEST.OVERLAP_THRESHOLD = 0.8  # panoptic only (unused)
    m.TEST.OBJECT_MASK_THRESHOLD = 0.8  # panoptic only (unused)
    # sigmoid threshold of a mask pixel (the official code thresholds logits at 0)
    m.TEST.MASK_THRESHOLD = 0.5
    # ours, off = official: score and threshold the masks at the input size and resize the
    # probabilities afterwards, dropping empty masks (official: logits resized to the output size first)
    m.TEST.POSTPROCESS_AT_INPUT_SIZE = False
    # boxes from masks (ours; the official code returns none): 0 = tight around the whole mask;
    # s > 0 = around the mask's connected components holding >= s of its area (and its largest)
    m.TEST.BOX_MIN_COMPONENT_SHARE = 0.0
    # LSJ mapper (INPUT.DATASET_MAPPER_NAME "coco_instance_lsj"): ResizeScale + FixedSizeCrop
    cfg.INPUT.IMAGE_SIZE = 1024
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0


def add_fastinst_config(cfg: CN) -> None:
    """FastInst's decoder (``FastInstDecoder`` on the ``QuerySegmentor`` meta-arch) under the
    official ``MODEL.FASTINST`` names; defaults = configs/coco/fastinst/fastinst_R50_ppm-fpn_x1_576.yaml
    (D1). The meta-arch's shared keys (loss weights, sampled points, size divisibility, test)
    stay in ``MODEL.MASK_FORMER``: where the official yaml has them under ``MODEL.FASTINST``,
    ours has them there. Also the ``fastinst_instance`` mapper's crop-branch resize keys, whose
    defaults are the official code's (off, 800), not the yaml's (on, 400/500/600)."""
    cfg.MODEL.FASTINST = CN()
    f = cfg.MODEL.FASTINST
    f.HIDDEN_DIM = 256  # = SEM_SEG_HEAD.CONVS_DIM (the queries are pixel features)
    f.NUM_OBJECT_QUERIES = 100
    f.NUM_AUX_QUERIES = 8
    f.NHEADS = 8
    f.DROPOUT = 0.0  # unused, as in the official code (its decoder layers have no dropout)
    f.DIM_FEEDFORWARD = 1024
    f.DEC_LAYERS = 1  # D1; D3 = 3 (official meaning: decoder layers, no +1)
    f.PRE_NORM = False
    f.LOCATION_WEIGHT = 1000.0
    f.PROPOSAL_WEIGHT = 20.0
    f.GT_GUIDED = True  # GT-mask-guided learning (training only)
    # ours, off = official: query locations at the 1/16 cells' centres (official: linspace(0, 1, n))
    f.LOCATIONS_AT_CELL_CENTRES = False
    # ours, off = official: the GT-guided pass runs layer i on its input (official: on its output)
    f.GT_GUIDED_ON_LAYER_INPUT = False
    # fastinst_instance mapper: with probability 0.5 a resize (shortest edge from MIN_SIZE) +
    # RandomCrop(CROP.TYPE, CROP.SIZE) runs before the usual resize + flip
    cfg.INPUT.CROP.RESIZE = CN()
    cfg.INPUT.CROP.RESIZE.ENABLED = False
    cfg.INPUT.CROP.RESIZE.MIN_SIZE = (800,)
    cfg.INPUT.CROP.RESIZE.MIN_SIZE_TRAIN_SAMPLING = "choice"


def add_sotr_config(cfg: CN) -> None:
    """SOTR (``SOTR`` meta-arch). Defaults = configs/coco/sotr/sotr_R50.yaml = the official code
    (easton-cau/SOTR: its network, targets, losses and post-processing); our deliberate
    differences are named options, off by default (docs/fidelity/sotr.md). SOLOv2/AdelaiDet key
    names where they exist."""
    cfg.MODEL.SOTR = CN()
    s = cfg.MODEL.SOTR
    s.NUM_CLASSES = 80
    s.INSTANCE_IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    s.FPN_INSTANCE_STRIDES = [8, 8, 16, 32, 32]  # P2 halved, P6 resized to P5's size
    s.FPN_SCALE_RANGES = [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]]  # sqrt(box area), px
    s.SIGMA = 0.2  # centre region: sigma x half box, at most the 3x3 cells around the centre
    s.NUM_GRIDS = [40, 36, 24, 16, 12]
    # twin transformer (shared by all levels); the official code hard-codes 256 / 12 / 8
    s.DIM = 256  # must equal MODEL.FPN.OUT_CHANNELS
    s.DEPTH = 12  # SOTR-RT: 2
    s.NUM_HEADS = 8
    s.TWIN_MODE = "parallel"  # official: x + col(x) + row(x) | "sequential": column then row attention (paper)
    s.WIDTH_DOUBLING = True  # official: the grid concatenated with itself along the width, halves averaged after
    s.CONV_BRANCHES = 2  # official: x + f1(x) + f2(x) after the attention | 1: one conv branch (paper)
    s.TWIN_NORM = "none"  # official: no LayerNorm | "pre" / "post": a LayerNorm per branch (paper)
    s.POS_EMBED = False  # official: none | True: learned per-axis position embedding (paper)
    s.QKV_BIAS = False  # official: to_q / to_kv without bias
    s.LAYER = "hybrid"  # "hybrid": 3x3 conv branches with LeakyReLU | "pure": MLP FFN (needs TWIN_NORM pre/post)
    s.GATE = True  # ReZero scalar gate (init 0) on every branch update (official)
    s.DROPOUT = 0.0
    s.NUM_KERNELS = 256  # D: kernel parameters per cell = mask-feature channels (1x1 dynamic conv)
    s.PRIOR_PROB = 0.01
    s.MASK_IN_FEATURES = ["p2", "p3", "p4", "p5"]  # the last one is refined by the transformer
    s.MASK_CHANNELS = 128
    s.GN_GROUPS = 32
    s.SIZE_DIVISIBILITY = 32
    # training targets and losses
    s.TARGET_CENTRES = "pixel_index"  # official: centre of mass in pixel indices | "pixel_centre": + 0.5
    s.GT_MASK_RESIZE = "unpadded"  # official: OpenCV resize of the unpadded mask to round(size / 4), pasted
    # top-left | "padded": pad, then bilinear to exactly 1/4 (>= 0.5)
    # official "squared": 1 - 2 sum(pt) / (sum p^2 + sum t^2 + 0.002) | "smoothed": 1 - (2 sum(pt) + 1) / (sum p + sum t + 1)
    s.DICE = "squared"
    s.FOCAL_ALPHA = 0.25
    s.FOCAL_GAMMA = 2.0
    s.FOCAL_WEIGHT = 1.0
    s.DICE_WEIGHT = 3.0
    s.TEST = CN()  # top-k: TEST.DETECTIONS_PER_IMAGE (100)
    s.TEST.NMS_PRE = 500
    s.TEST.SCORE_THR = 0.1
    s.TEST.UPDATE_THR = 0.05
    s.TEST.MASK_THR = 0.5
    s.TEST.NMS_KERNEL = "gaussian"  # "gaussian" | "linear" (Matrix NMS)
    s.TEST.NMS_SIGMA = 2.0
    # official: masks upsampled by ceil(h / f_h) (= 4 unless an image is <= 3/4 of its batch's padded
    # height) before the crop to the image | True: by exactly the mask stride 4
    s.TEST.EXACT_UPSAMPLE = False
    # boxes from the output masks (the official code has none): 0 = tight around the whole mask; > 0: stray
    # fragments below this share of the mask ignored (postprocess.boxes_from_masks, shared with Mask2Former)
    s.TEST.BOX_MIN_COMPONENT_SHARE = 0.0


def add_co_detr_config(cfg: CN) -> None:
    """Co-DETR (``maskfrozen/modeling/co_detr``): training-only auxiliary heads + positive
    queries on any ``DeformableDETRFamily`` detector. Off by default; every other default is
    the public Co-DINO R50 setting (configs/coco/co_detr/co_dino_R50_5scale_12ep.yaml)."""
    cfg.MODEL.CO_DETR = CN()
    c = cfg.MODEL.CO_DETR
    c.ENABLED = False
    # K auxiliary heads, each at most once: "atss" (K=1), "faster_rcnn" + "atss" (K=2, the public order);
    # [] = K=0 (the plain detector). Positive-query group i (loss suffix _pos{i}) belongs to head i.
    c.AUX_HEADS = ["faster_rcnn", "atss"]
    c.LAMBDA_1 = 1.0  # positive-query losses
    c.LAMBDA_2 = 2.0  # encoder (auxiliary-head) losses
    # the paper's total loss sums lambda_2 * L_enc once per decoder layer (the public configs' num_dec_layer *
    # lambda_2 factor): aux-head losses x LAMBDA_2 x DEC_LAYERS; False: x LAMBDA_2 only
    c.ENC_LOSS_PER_DECODER_LAYER = True
    c.MAX_POSITIVES = 300  # positive queries per head per image (random subset beyond)
    # positive-query group of a head: at least MIN_POSITIVE_QUERIES slots per image, short groups filled
    # with random negatives of the head, background in the class loss (official); PAD_WITH_NEGATIVES False
    # (ours, the paper's description; with MIN_POSITIVE_QUERIES 0): masked padding that adds no loss
    c.MIN_POSITIVE_QUERIES = 9
    c.PAD_WITH_NEGATIVES = True
    c.CLIP_POSITIVE_BOXES = False  # ours: positive boxes clipped to the image (official: not clipped)
    c.QUERY_FEATURES = False  # + LN(Linear(feature at the positive box)) in the query (Co-Deformable-DETR: True)
    c.ATSS = CN()
    c.ATSS.ANCHOR_SCALE = 8.0  # one square anchor of side ANCHOR_SCALE x stride per location
    c.ATSS.TOPK = 9  # candidates per level per GT
    c.ATSS.NUM_CONVS = 1
    c.ATSS.FOCAL_ALPHA = 0.25
    c.ATSS.FOCAL_GAMMA = 2.0
    c.ATSS.CLASS_WEIGHT = 1.0
    c.ATSS.BOX_WEIGHT = 2.0  # GIoU, weighted by the centerness targets
    c.ATSS.CENTERNESS_WEIGHT = 1.0
    c.RPN = CN()
    c.RPN.ANCHOR_SCALE = 4.0  # anchor sides ANCHOR_SCALE x stride x 2^(i / SCALES_PER_OCTAVE)
    c.RPN.SCALES_PER_OCTAVE = 3
    c.RPN.ASPECT_RATIOS = [0.5, 1.0, 2.0]
    c.RPN.IOU_THRESHOLDS = [0.3, 0.7]
    # a GT's best anchors are positives below IOU_THRESHOLDS[1] only with IoU >= MIN_POS_IOU (mmdet's
    # MaxIoUAssigner); 0.0 = detectron2's Matcher (any IoU, ours)
    c.RPN.MIN_POS_IOU = 0.3
    c.RPN.BATCH_SIZE_PER_IMAGE = 256
    c.RPN.POSITIVE_FRACTION = 0.5
    c.RPN.PRE_NMS_TOPK = 4000  # per level
    c.RPN.POST_NMS_TOPK = 1000
    c.RPN.NMS_THRESH = 0.7
    c.RPN.CLASS_WEIGHT = 1.0
    c.RPN.BOX_WEIGHT = 1.0
    c.ROI_HEAD = CN()
    c.ROI_HEAD.POOLER_RESOLUTION = 7
    # RoIAlign samples per bin side (0: adaptive ceil(RoI size / resolution), the public setting; its backward is
    # slow on CPU for large proposals)
    c.ROI_HEAD.SAMPLING_RATIO = 0
    c.ROI_HEAD.CANONICAL_BOX_SIZE = 56  # level floor(log2(sqrt(area) / 56)) (mmdet's finest_scale)
    c.ROI_HEAD.FC_DIM = 1024
    c.ROI_HEAD.NUM_FC = 2
    c.ROI_HEAD.BATCH_SIZE_PER_IMAGE = 512
    c.ROI_HEAD.POSITIVE_FRACTION = 0.25
    c.ROI_HEAD.IOU_THRESHOLD = 0.5
    c.ROI_HEAD.CLASS_WEIGHT = 1.0
    c.ROI_HEAD.BOX_WEIGHT = 10.0  # GIoU on decoded boxes
    # the detector's test post-processing with Co-DETR (the official mmdet heads' get_bboxes):
    # "mmdet": boxes clamped to the input image; with SOFT_NMS the top NUM_QUERIES (query, class) pairs,
    # class-wise soft-NMS, then TEST.DETECTIONS_PER_IMAGE (Co-DINO), without it the top
    # TEST.DETECTIONS_PER_IMAGE pairs (Co-Deformable-DETR); "detector" (ours): the detector's own
    c.TEST = CN()
    c.TEST.POSTPROCESS = "mmdet"
    c.TEST.SOFT_NMS = True
    c.TEST.SOFT_NMS_METHOD = "linear"  # "linear" | "gaussian" | "naive" (mmcv's soft_nms)
    c.TEST.SOFT_NMS_IOU = 0.8
    c.TEST.SOFT_NMS_SIGMA = 0.5
    c.TEST.SOFT_NMS_MIN_SCORE = 0.001
