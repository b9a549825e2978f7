"""The package map in dist_clm/__init__.py is the code's: every import, at the top of a module or inside a
function, runs from a package to one listed above it (or within itself), never downward; every package is on
the map and says in its __init__ what it owns and what it may import."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import dist_clm

ROOT = Path(dist_clm.__file__).parent


def documented_order() -> list[str]:
    """The map's first column, from the bottom up; names on one row are ordered left to right."""
    rows = [line.strip() for line in ast.get_docstring(ast.parse((ROOT / "__init__.py").read_text())).splitlines()]
    order = []
    for row in rows:
        m = re.match(r"^([a-z_]+/?(?:, [a-z_]+/?)*)\s{2,}\S", row)
        if m:
            order += [name.strip().rstrip("/") for name in m.group(1).split(",")]
    return order


def unit_of(module: str) -> str:
    """'dist_clm.data.loader' -> 'data'; 'dist_clm.cli' -> 'cli'; 'dist_clm' -> '' (the package's version)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, the dist_clm module or name imported) for every import in `path`, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("dist_clm")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dist_clm"):
            if node.module == "dist_clm":  # from dist_clm import console, __version__
                found += [(node.lineno, f"dist_clm.{a.name}") for a in node.names if not a.name.startswith("__")]
            else:
                found.append((node.lineno, node.module))
    return found


def test_the_map_lists_every_package_and_top_level_module_once():
    order = documented_order()
    present = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    present |= {p.stem for p in ROOT.glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert len(order) == len(set(order)), order
    assert set(order) == present, (sorted(set(order) - present), sorted(present - set(order)))
    assert order.index("errors") < order.index("data") < order.index("training") < order.index("cli")


def test_no_import_runs_down_the_map():
    rank = {name: i for i, name in enumerate(documented_order())}
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        here = unit_of(".".join(path.relative_to(ROOT.parent).with_suffix("").parts))
        if here == "__main__":
            continue
        for line, target in imports(path):
            there = unit_of(target)
            if there and rank[there] > rank[here]:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} ({here}) imports {target} ({there})")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_an_import_inside_a_function(tmp_path):
    lazy = tmp_path / "m.py"
    lazy.write_text("def f():\n    from dist_clm.training.loop import train\n    from dist_clm import console\n")
    assert imports(lazy) == [(2, "dist_clm.training.loop"), (3, "dist_clm.console")]


def test_every_package_says_what_it_owns_and_what_it_may_import():
    order = documented_order()
    for package in (p for p in ROOT.iterdir() if (p / "__init__.py").exists()):
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert doc and "Imports:" in doc, package.name
        allowed = doc.split("Imports:", 1)[1]
        for other in order[order.index(package.name) + 1 :]:  # it never names a package above it as allowed
            assert not re.search(rf"\b{other}\b", allowed), (package.name, other)
