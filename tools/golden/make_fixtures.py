#!/usr/bin/env python
"""Regenerate the golden fixtures of one model from its official implementation:

    python tools/golden/make_fixtures.py MODEL OFFICIAL_SRC_DIR [--out tests/golden/fixtures]

MODEL names a module ``tools/golden/official_<MODEL>.py`` with a function
``make(official_dir: str, out_dir: str) -> None`` that builds the official model from its
own code at a fixed seed (shims from ``tools/golden/shims.py``), saves an official-format
checkpoint and the official outputs as one fixture case per folder (``golden_io.save_case``).
OFFICIAL_SRC_DIR is the official repository at the commit named in tests/golden/README.md.
The official code is only needed here, never by the tests.
"""
import argparse
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)


def available_models() -> list:
    """Model names with an ``official_<name>.py`` module next to this script."""
    return sorted(f[len("official_"):-3] for f in os.listdir(HERE) if f.startswith("official_") and f.endswith(".py"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=available_models())
    parser.add_argument("official_dir", help="the official repository's source tree")
    parser.add_argument("--out", default=os.path.join(REPO, "tests", "golden", "fixtures"))
    args = parser.parse_args(argv)
    if not os.path.isdir(args.official_dir):
        parser.error(f"{args.official_dir!r} is not a directory (the official repository's source tree)")
    module = importlib.import_module(f"official_{args.model}")
    os.makedirs(args.out, exist_ok=True)
    module.make(os.path.abspath(args.official_dir), os.path.abspath(args.out))


if __name__ == "__main__":
    main()
