"""The build step pyproject.toml cannot express: copy the deployment files (systemd units, the example
config, the Kubernetes RBAC manifest) from their repository paths into the wheel under
supervisor/data/, so that `supervisor print NAME` works after a plain `pip install`. The list is
supervisor/shipped.py's FILES (one source of truth; nothing is copied in the repository itself)."""

import ast
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def shipped_paths() -> list[str]:
    # read FILES without importing the package (its dependencies may not be installed at build time)
    tree = ast.parse((HERE / "supervisor" / "shipped.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "FILES":
            return [v.elts[0].value for v in node.value.values]
    raise RuntimeError("supervisor/shipped.py: FILES not found")


class BuildPyWithData(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads them from the checkout
            return
        dest = Path(self.build_lib) / "supervisor" / "data"
        dest.mkdir(parents=True, exist_ok=True)
        for rel in shipped_paths():
            shutil.copyfile(HERE / rel, dest / Path(rel).name)


setup(cmdclass={"build_py": BuildPyWithData})
