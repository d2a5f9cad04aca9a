"""What every script run on a lent GPU needs: the project importable from a bare checkout (no
pip install there), and a log that keeps what was printed even when a run is cut off."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Package name -> folder, where the folder is not named like the package (pyproject maps them).
_MAPPED = (("dspark_runtime", "runtime"), ("dspark_plugins", "plugins"))


def bootstrap() -> None:
    """Make `dspark_export`, `dspark_runtime`, `dspark_plugins` and `dspark_export.profiles`
    importable from the checkout, unless they are installed already."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    for name, folder in _MAPPED:
        if importlib.util.find_spec(name) is None:
            _register(name, ROOT / folder)
    import dspark_export  # noqa: F401  (its subpackage is looked up next)

    if importlib.util.find_spec("dspark_export.profiles") is None:
        _register("dspark_export.profiles", ROOT / "profiles")


def _register(name: str, folder: Path) -> None:
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


class Tee:
    """Copy a stream into the log file as it is written (the log survives a timeout)."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.stream.write(text)
        self.log.write(text)
        self.log.flush()
        return len(text)

    def flush(self):
        self.stream.flush()
        self.log.flush()

    def isatty(self):
        return False

    def __getattr__(self, name):
        return getattr(self.stream, name)
