#!/usr/bin/env python
"""Build and install maskfrozen.

The compiled extension ``maskfrozen._C`` holds the multi-scale deformable attention
kernels. The C++ CPU kernel is always built. The CUDA kernel is added when a CUDA
toolkit is found and torch sees a GPU (or ``FORCE_CUDA=1``); ``FORCE_CUDA=0`` disables
it. Building nothing compiled is possible too (``MASKFROZEN_NO_EXT=1``): the op then
falls back to its pure-PyTorch reference at run time.

The extension is compiled against the torch of the installing environment, so pip must
see that torch: install torch first, then

    pip install --no-build-isolation .        (or -e . for a development checkout)

pip's default build isolation hides it; the build then stops with a message saying so.
"""
import glob
import os
import sys
from types import ModuleType

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("maskfrozen", "ops", "csrc")


NO_TORCH_MESSAGE = """\
maskfrozen: cannot build the compiled op maskfrozen._C: torch is not importable at build time
({error}).
The extension is compiled against the torch of the environment you install into, and pip's
build isolation hides that torch. Install torch first, then run
    pip install --no-build-isolation .        (or: pip install --no-build-isolation -e .)
To install without the compiled op (pure-PyTorch fallback, slower): MASKFROZEN_NO_EXT=1 pip install ."""


def _import_torch_extension_tools() -> ModuleType:
    """torch.utils.cpp_extension, or exit with what to do when torch is missing (build isolation)."""
    try:
        import torch.utils.cpp_extension as cpp_extension
    except ImportError as e:
        sys.exit(NO_TORCH_MESSAGE.format(error=f"{type(e).__name__}: {e}"))
    return cpp_extension


def _want_cuda(cuda_home) -> bool:
    """Whether to add the CUDA kernel (FORCE_CUDA, else a toolkit and a visible GPU)."""
    forced = os.environ.get("FORCE_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    # A toolkit alone is not enough: without a GPU the (slow) nvcc build is only wanted
    # when asked for (FORCE_CUDA=1, e.g. the CI compile check).
    return cuda_home is not None and torch.version.cuda is not None and torch.cuda.is_available()


def get_extensions() -> list:
    """The C++ (and, when possible, CUDA) extension ``maskfrozen._C``."""
    if os.environ.get("MASKFROZEN_NO_EXT") == "1":
        return []
    cpp_extension = _import_torch_extension_tools()

    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    sources += sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    if not sources:
        return []
    # at::parallel_for is inlined from torch's headers as OpenMP pragmas: without
    # -fopenmp the kernels would silently run on one thread.
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    define_macros = []
    extension = cpp_extension.CppExtension
    extra_compile_args = {"cxx": cxx_flags}
    if _want_cuda(cpp_extension.CUDA_HOME):
        extension = cpp_extension.CUDAExtension
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-Xcompiler", "-fopenmp"]
    return [
        extension(
            "maskfrozen._C",
            sources,
            include_dirs=[os.path.join(HERE, CSRC)],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ]


def get_cmdclass() -> dict:
    """torch's BuildExtension (ninja) as ``build_ext``, unless no extension is built."""
    if os.environ.get("MASKFROZEN_NO_EXT") == "1":
        return {}
    build_extension = _import_torch_extension_tools().BuildExtension
    return {"build_ext": build_extension.with_options(use_ninja=True)}


setup(
    name="maskfrozen",
    version="0.1.0",
    description="Query-based instance segmentation for Detectron2: Mask Frozen-DETR, "
    "DETR detectors with Co-DETR heads, Mask2Former, FastInst and SOTR.",
    packages=find_packages(exclude=("tests", "tests.*", "tools", "configs")),
    python_requires=">=3.10",
    install_requires=[
        "torch",
        "torchvision",
        "detectron2",
        "fvcore",
        "pycocotools",
        "numpy",
        "opencv-python-headless",
        "scipy",
    ],
    extras_require={
        "fast-eval": ["faster-coco-eval"],
        "test": ["pytest"],
        # tools/export_model.py, maskfrozen.export: ONNX export (torch's dynamo exporter needs
        # onnxscript) and the ONNX Runtime predictor
        "export": ["onnx>=1.16", "onnxruntime>=1.17", "onnxscript>=0.3"],
    },
    ext_modules=get_extensions(),
    cmdclass=get_cmdclass(),
)
