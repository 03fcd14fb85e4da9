"""The package's shape: imports run one way (jobs -> hosts -> reducers -> core) and no module
imports another module's private name."""
import ast
from pathlib import Path

import ats_vit

PACKAGE = Path(ats_vit.__file__).parent
LAYERS = ["core", "reducers", "hosts", "jobs"]  # each may import only those before it


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield path, ("ats_vit",) + tuple(p for p in parts if p != "__init__"), path.name == "__init__.py"


def _imports(path: Path, name: tuple, is_package: bool):
    """(imported ats_vit module parts, imported names) of each import in the file."""
    here = name if is_package else name[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else ()
            target = base + tuple(node.module.split(".")) if node.module else base
            if not node.level and target[0] != "ats_vit":
                continue
            yield target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ats_vit":
                    yield tuple(alias.name.split(".")), []


def _rank(module: tuple):
    """Layer index of a module, None for the package's top (__init__, __main__) and the
    stand-alone leaf ``zoo``."""
    return LAYERS.index(module[1]) if len(module) > 1 and module[1] in LAYERS else None


def test_lower_layers_never_import_higher_ones():
    wrong = []
    for path, name, is_package in _modules():
        rank = _rank(name)
        for target, _ in _imports(path, name, is_package):
            if target == ("ats_vit", "zoo"):
                continue  # the bundled model's registration imports nothing of the package
            if rank is None and name[-1] not in ("ats_vit", "__main__"):
                wrong.append(f"{path.name}: a leaf module imports {'.'.join(target)}")
            elif rank is not None and (_rank(target) is None or _rank(target) > rank):
                wrong.append(f"{'/'.join(name)} imports {'.'.join(target)}")
    assert not wrong, wrong


def test_no_module_imports_a_private_name():
    private = [f"{'/'.join(name)} imports {n} from {'.'.join(target)}"
               for path, name, is_package in _modules() for target, names in _imports(path, name, is_package)
               for n in names if n.startswith("_") and n != "__future__"]
    assert not private, private


def test_the_checker_sees_a_violation(tmp_path):
    """The walk above resolves relative imports: a core module importing jobs is caught."""
    path = tmp_path / "block.py"
    path.write_text("from ..jobs.cli import main\nfrom .tokens import _private\n")
    imports = list(_imports(path, ("ats_vit", "core", "block"), False))
    assert imports == [(("ats_vit", "jobs", "cli"), ["main"]), (("ats_vit", "core", "tokens"), ["_private"])]
    assert _rank(imports[0][0]) > _rank(("ats_vit", "core", "block"))
