"""First-use reliability: the package installs for real (importable from outside the
repository, clear error under pip's build isolation), the demo refuses missing weights and
never lets one overlay replace another, 16-bit images read as 8 bit, ``Predictor`` checks
its input, and files get the umask's mode with no stale temporary left behind."""
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultPredictor
from PIL import Image

import maskfrozen
from conftest import REPO, TINY_CONFIG, make_cfg
from maskfrozen.data import ImageReadError
from maskfrozen.data.mappers import build_mapper, image_to_8bit, read_image
from maskfrozen.engine import AtomicCheckpointer, Predictor
from maskfrozen.engine import checkpointer as ckpt_module
from maskfrozen.engine.predictor import as_bgr_uint8
from maskfrozen.engine.visualize import load_bgr, overlay_names, overlay_paths, write_png
from tools_demo import demo_main


# ---- 1. installation ----------------------------------------------------------------------

def test_package_imports_from_outside_the_repository(tmp_path):
    """The install, not the current directory, makes ``import maskfrozen`` work: run from an
    empty folder with -I (no cwd / PYTHONPATH on sys.path), it resolves to this checkout."""
    code = ("import importlib.metadata, importlib.util, os; s = importlib.util.find_spec('maskfrozen'); "
            "print(os.path.realpath(s.origin)); print(importlib.metadata.version('maskfrozen'))")
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    origin, version = out.stdout.split()
    assert origin == os.path.realpath(os.path.join(REPO, "maskfrozen", "__init__.py"))
    assert version == maskfrozen.__version__


def test_setup_py_without_torch_says_to_pass_no_build_isolation(tmp_path):
    """Under pip's build isolation setup.py sees no torch: it stops with the remedy."""
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "torch is not importable at build time" in out.stderr
    assert "pip install --no-build-isolation ." in out.stderr and "MASKFROZEN_NO_EXT=1" in out.stderr
    assert "Traceback" not in out.stderr


# ---- 2 + 4. tools/demo.py: weights required, one overlay per image -----------------------

def _tiny_images(root, names):
    paths = []
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.full((40, 48, 3), 40 * i, np.uint8))
        paths.append(path)
    return paths


def test_demo_without_weights_names_model_weights(tmp_path, capsys):
    (image,) = _tiny_images(tmp_path, ["a.png"])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        demo_main(["--config-file", TINY_CONFIG, "--input", str(image), "--output", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "MODEL.WEIGHTS is empty" in err and "--allow-random-weights" in err
    assert not out.exists()


def test_demo_with_missing_weights_file_names_the_path(tmp_path, capsys):
    (image,) = _tiny_images(tmp_path, ["a.png"])
    missing = tmp_path / "no_such_model.pth"
    with pytest.raises(SystemExit) as exit_info:
        demo_main(["--config-file", TINY_CONFIG, "--input", str(image), "--output", str(tmp_path / "out"),
                   "--allow-random-weights", "MODEL.WEIGHTS", str(missing)])
    assert exit_info.value.code == 2
    assert f"MODEL.WEIGHTS {str(missing)!r} does not exist" in capsys.readouterr().err


def test_demo_same_file_name_in_two_folders_gives_distinct_overlays(tmp_path, capsys, one_thread):
    images = _tiny_images(tmp_path, ["one/x.png", "one/y.jpg", "two/x.png", "two/y.png"])
    out = tmp_path / "out"
    written = demo_main(["--config-file", TINY_CONFIG, "--input", str(tmp_path / "one"), str(tmp_path / "two"),
                         str(images[0]), "--output", str(out), "--allow-random-weights"])
    names = [os.path.basename(p) for p in written]
    assert names == ["x.png", "y.png", "x_1.png", "y_1.png"]  # one/x.png given twice: drawn once
    assert sorted(os.listdir(out)) == sorted(names)
    assert "wrote 4 overlay(s)" in capsys.readouterr().out
    # each overlay is its own image's: the inputs differ in brightness
    means = [cv2.imread(p).mean() for p in written]
    assert len(set(np.round(means, 3))) == 4


def test_overlay_names_stay_distinct_and_never_replace_an_input(tmp_path):
    assert overlay_names(["a/x.jpg", "b/x.jpg", "c/x_1.png", "d/x.png"]) == ["x.png", "x_1.png", "x_1_1.png", "x_2.png"]
    (image,) = _tiny_images(tmp_path, ["x.png"])
    with pytest.raises(ValueError, match="would overwrite an input image"):
        overlay_paths([str(image)], str(tmp_path))
    with pytest.raises(ValueError, match="listed twice"):
        overlay_paths([str(image), str(tmp_path / "." / "x.png")], str(tmp_path / "out"))


# ---- 5. 16-bit images ---------------------------------------------------------------------

def test_16bit_png_reads_like_its_8bit_version(tmp_path):
    gray8 = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    color8 = np.random.RandomState(0).randint(0, 256, (16, 16, 3)).astype(np.uint8)
    for name, image8 in (("gray", gray8), ("color", color8)):
        cv2.imwrite(str(tmp_path / f"{name}8.png"), image8)
        cv2.imwrite(str(tmp_path / f"{name}16.png"), image8.astype(np.uint16) * 257)
        assert cv2.imread(str(tmp_path / f"{name}16.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
        expected = read_image(str(tmp_path / f"{name}8.png"), "BGR")
        for read in (lambda p: read_image(p, "BGR"), load_bgr):
            got = read(str(tmp_path / f"{name}16.png"))
            assert got.dtype == np.uint8 and got.shape == (16, 16, 3)
            np.testing.assert_array_equal(got, expected)
    assert read_image(str(tmp_path / "gray16.png"), "BGR").mean() == pytest.approx(gray8.mean())


def test_image_to_8bit_modes():
    wide = Image.fromarray(np.array([[0, 257, 65535]], np.int32), mode="I")
    assert np.asarray(image_to_8bit(wide)).tolist() == [[0, 1, 255]]
    small = Image.fromarray(np.array([[0, 7, 255]], np.int32), mode="I")
    assert np.asarray(image_to_8bit(small)).tolist() == [[0, 7, 255]]
    rgb = Image.new("RGB", (2, 2))
    assert image_to_8bit(rgb) is rgb


def test_dataset_mapper_scales_16bit_images(tmp_path):
    cfg = make_cfg(TINY_CONFIG, tmp_path)
    record = dict(DatasetCatalog.get("shapes_tiny_train")[0])
    gray8 = cv2.cvtColor(cv2.imread(record["file_name"]), cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(tmp_path / "gray8.png"), gray8)
    cv2.imwrite(str(tmp_path / "gray16.png"), gray8.astype(np.uint16) * 257)
    mapper = build_mapper(cfg, is_train=False)
    reference = mapper(dict(record, file_name=str(tmp_path / "gray8.png")))["image"]
    image16 = mapper(dict(record, file_name=str(tmp_path / "gray16.png")))["image"]
    assert torch.equal(image16, reference) and image16.float().mean() < 200
    with pytest.raises(ImageReadError, match="cannot read image.*missing.png"):
        mapper(dict(record, file_name=str(tmp_path / "missing.png")))


# ---- 6. Predictor ------------------------------------------------------------------------

def test_as_bgr_uint8_converts_grayscale_and_alpha():
    rgb = np.random.RandomState(0).randint(0, 256, (5, 7, 3)).astype(np.uint8)
    assert as_bgr_uint8(rgb) is rgb
    gray = rgb[:, :, 0]
    for g in (gray, gray[:, :, None]):
        out = as_bgr_uint8(g)
        assert out.shape == (5, 7, 3) and out.dtype == np.uint8
        assert all(np.array_equal(out[:, :, c], gray) for c in range(3))
    bgra = np.dstack([rgb, np.full((5, 7), 9, np.uint8)])
    out = as_bgr_uint8(bgra)
    assert out.shape == (5, 7, 3) and np.array_equal(out, rgb) and out.flags.c_contiguous


@pytest.mark.parametrize("image, error, words", [
    (np.random.RandomState(0).rand(8, 8, 3), TypeError, ["float64", "[0, 1]", "HxWx3 uint8 BGR"]),
    (np.zeros((8, 8, 3), np.float32), TypeError, ["float32", "HxWx3 uint8 BGR"]),
    (np.zeros((8, 8, 3), np.uint16), TypeError, ["dtype uint16", "HxWx3 uint8 BGR"]),
    (np.zeros((0, 0), np.uint8), ValueError, ["empty image of shape (0, 0)"]),
    (np.zeros((0, 5, 3), np.uint8), ValueError, ["empty image of shape (0, 5, 3)"]),
    (np.zeros((8, 8, 2), np.uint8), ValueError, ["shape (8, 8, 2)"]),
    (np.zeros((2, 8, 8, 3), np.uint8), ValueError, ["shape (2, 8, 8, 3)"]),
    ("image.jpg", TypeError, ["file path 'image.jpg'", "detection_utils.read_image"]),
    (torch.zeros(8, 8, 3, dtype=torch.uint8), TypeError, ["torch.Tensor", ".numpy()"]),
    (None, TypeError, ["got None", "cv2.imread"]),
])
def test_as_bgr_uint8_refuses_what_it_cannot_interpret(image, error, words):
    with pytest.raises(error) as info:
        as_bgr_uint8(image)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_predictor_is_exported_and_takes_grayscale_and_bgra(tmp_path, one_thread):
    assert maskfrozen.Predictor is Predictor and issubclass(Predictor, DefaultPredictor)
    cfg = make_cfg(TINY_CONFIG, tmp_path, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")
    torch.manual_seed(0)
    predictor = Predictor(cfg)
    gray = np.random.RandomState(1).randint(0, 256, (40, 52)).astype(np.uint8)
    reference = predictor(np.repeat(gray[:, :, None], 3, axis=2))["instances"]
    for image in (gray, gray[:, :, None], np.dstack([gray, gray, gray, np.zeros_like(gray)])):
        instances = predictor(image)["instances"]
        assert instances.image_size == (40, 52)
        assert torch.equal(instances.pred_boxes.tensor, reference.pred_boxes.tensor)
    with pytest.raises(TypeError, match="HxWx3 uint8 BGR"):
        predictor(gray.astype(np.float32) / 255)


def test_predictor_loads_weights_strictly(tmp_path, one_thread):
    """Its own checkpoint loads exactly; a checkpoint of another model is an error naming
    the file, unless MODEL.WEIGHTS_ALLOW_PARTIAL."""
    from maskfrozen.engine.weights import WeightsMismatchError

    cfg = make_cfg(TINY_CONFIG, tmp_path)
    model = Predictor(cfg).model
    good = tmp_path / "good.pth"
    torch.save({"model": {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}}, good)
    loaded = Predictor(make_cfg(TINY_CONFIG, tmp_path, "MODEL.WEIGHTS", str(good))).model
    key = "roi_heads.box_predictor.cls_score.bias"
    torch.testing.assert_close(loaded.state_dict()[key], model.state_dict()[key] + 1)
    other = tmp_path / "other.pth"
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(WeightsMismatchError, match="other.pth"):
        Predictor(make_cfg(TINY_CONFIG, tmp_path, "MODEL.WEIGHTS", str(other)))
    Predictor(make_cfg(TINY_CONFIG, tmp_path, "MODEL.WEIGHTS", str(other), "MODEL.WEIGHTS_ALLOW_PARTIAL", "True"))


# ---- 7. file modes and stale temporaries -------------------------------------------------

class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        AtomicCheckpointer(_Tiny(), save_dir=str(tmp_path)).save("model_final")
        write_png(str(tmp_path / "overlay.png"), np.zeros((4, 4, 3), np.uint8))
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth", "overlay.png"]
    for name in os.listdir(tmp_path):
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode, name


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_checkpointer_removes_only_stale_temporaries(tmp_path):
    host = ckpt_module._host_tag()
    old = time.time() - 2 * ckpt_module.STALE_AFTER_SECONDS
    files = {  # name: (age, removed?)
        f".tmp-{host}-{_dead_pid()}-0123abcd-model_0000009.pth": (None, True),  # writer dead
        f".tmp-{host}-{os.getpid()}-0123abcd-model_0000010.pth": (None, False),  # writer alive
        f".tmp-otherhost_1-{_dead_pid()}-0123abcd-model_final.pth": (None, False),  # pid not ours to judge
        f".tmp-otherhost_1-{_dead_pid()}-0123abcd-last_checkpoint": (old, True),  # untouched for long
        ".tmp-k2x_9abcmodel_final.pth": (None, False),  # old mkstemp name, recent
        ".tmp-k2x_9abclast_checkpoint": (old, True),  # old mkstemp name, untouched for long
        ".tmp-notes.txt": (old, False),  # not the checkpointer's pattern
        "model_final.pth": (old, False),
    }
    for name, (age, _) in files.items():
        (tmp_path / name).write_bytes(b"")
        if age is not None:
            os.utime(tmp_path / name, (age, age))
    AtomicCheckpointer(_Tiny(), save_dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, (_, removed) in files.items() if not removed)
    AtomicCheckpointer(_Tiny(), save_dir=str(tmp_path), save_to_disk=False)  # a non-saving rank: no-op
    assert len(os.listdir(tmp_path)) == 5


def test_kill_9_during_a_write_leaves_a_temporary_the_next_checkpointer_removes(tmp_path):
    writer = (
        "import importlib.util, sys, time\n"
        f"spec = importlib.util.spec_from_file_location('ck', {ckpt_module.__file__!r})\n"
        "ck = importlib.util.module_from_spec(spec); spec.loader.exec_module(ck)\n"
        "def slow(f):\n    f.write(b'partial'); f.flush(); print('writing', flush=True); time.sleep(60)\n"
        f"ck.atomic_write({str(tmp_path / 'model_final.pth')!r}, slow)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        (left,) = os.listdir(tmp_path)
        assert left.startswith(".tmp-") and left.endswith("-model_final.pth")
        AtomicCheckpointer(_Tiny(), save_dir=str(tmp_path))
        assert os.listdir(tmp_path) == [left]  # its writer is alive: kept
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert os.listdir(tmp_path) == [left]
    AtomicCheckpointer(_Tiny(), save_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []
