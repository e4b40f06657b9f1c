"""FastInst's parts, registered by name: ``PyramidPoolingModuleFPN`` (pixel decoder) and
``FastInstDecoder`` (transformer decoder with IA-guided queries and GT-mask-guided learning)."""
from .pixel_decoder import PyramidPoolingModule, PyramidPoolingModuleFPN  # noqa: F401
from .query_proposal import InstanceActivationQueries, grid_locations, local_maxima, proposal_loss  # noqa: F401
from .transformer_decoder import DualPathLayer, FastInstDecoder  # noqa: F401
