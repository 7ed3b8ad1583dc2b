"""The package's layout rule: the science never knows how it is transported. Only the engines (engines/), the
command line (cli.py) and the benchmarks that drive whole runs (benchmarks/) may import flwr or an engine."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "deepfusion"
DRIVERS = ("engines", "benchmarks", "cli.py")  # relative to PACKAGE: what may run a federation
FORBIDDEN = ("flwr", "deepfusion.engines")


def transport_imports(source: str, package: str = "deepfusion") -> list[str]:
    """The modules a source file imports that are flwr or an engine, at any depth (late imports count too);
    `package` is the file's package, against which relative imports resolve."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found += [module] if _forbidden(module) else \
                [f"{module}.{a.name}" for a in node.names if _forbidden(f"{module}.{a.name}")]  # from deepfusion import engines
    return found


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def _package(path: Path) -> str:
    """deepfusion.recipes for src/deepfusion/recipes/deepfusion.py (and for its __init__.py)."""
    return ".".join(("deepfusion", *path.relative_to(PACKAGE).parent.parts))


def science_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in DRIVERS)


def test_the_checker_sees_every_form_of_import():
    assert transport_imports("import flwr") == ["flwr"]
    assert transport_imports("def f():\n    from flwr.app import Message") == ["flwr.app"]
    assert transport_imports("from deepfusion.engines.local import run") == ["deepfusion.engines.local"]
    assert transport_imports("from deepfusion import engines, server") == ["deepfusion.engines"]
    assert transport_imports("from .. import engines", "deepfusion.recipes") == ["deepfusion.engines"]
    assert transport_imports("from .engines.local import run") == ["deepfusion.engines.local"]
    assert transport_imports("import flwrx, deepfusion.server\nfrom . import server") == []


def test_no_science_module_imports_flwr_or_an_engine():
    modules = science_modules()
    names = {p.relative_to(PACKAGE).as_posix() for p in modules}
    assert {"server.py", "device.py", "config.py", "recipes/deepfusion.py", "wire/upload.py"} <= names  # it looks
    offenders = {p.relative_to(PACKAGE).as_posix(): bad for p in modules
                 if (bad := transport_imports(p.read_text(encoding="utf-8"), _package(p)))}
    assert not offenders, (f"{offenders}: science modules stay transport-free; move the code that needs Flower "
                           "or an engine under engines/ (or into cli.py / benchmarks/)")
