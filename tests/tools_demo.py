"""Import shim: tools/ is not a package; the tests import tools/demo.py's main from here."""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "maskfrozen_tools_demo", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "demo.py")
)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
demo_main = _module.main
