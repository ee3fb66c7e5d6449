"""The monitoring files ship in the package (so `tide monitor` works from an
installed wheel): every file under src/tidemq/monitoring/ is a module or matches a
package-data pattern of pyproject.toml."""

from __future__ import annotations

import fnmatch
import tomllib

from ops_helpers import ROOT


def test_every_monitoring_file_is_package_data() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["tidemq"]
    package = ROOT / "src" / "tidemq"
    files = [
        path.relative_to(package).as_posix()
        for path in (package / "monitoring").rglob("*")
        if path.is_file() and path.suffix != ".pyc"
    ]
    assert len(files) >= 8
    for name in files:
        if name.endswith(".py"):
            continue
        matched = [
            p for p in patterns if fnmatch.fnmatch(name, p) and p.count("/") == name.count("/")
        ]
        assert matched, (
            f"{name} is not package data (pyproject.toml [tool.setuptools.package-data])"
        )
