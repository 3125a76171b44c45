"""`platform/` is a source root, never a package: a platform/__init__.py would shadow the stdlib module."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_platform_is_not_a_package():
    assert not (REPO / "platform" / "__init__.py").exists(), "platform/__init__.py shadows the stdlib 'platform'"


def test_no_loose_modules_in_platform():
    loose = sorted(p.name for p in (REPO / "platform").glob("*.py"))
    assert loose == [], f"put these inside platform/moe_platform/: {loose}"


def test_stdlib_platform_still_importable():
    import platform

    assert hasattr(platform, "system") and platform.system()


# Imports flow one way (docs: shared design): a package may import only from packages on a lower level (and itself).
# `checks` is the shared validation helper every level uses, and `ray_compat`/`deepspeed_compat` the one home of each
# library's private APIs (they import no package of ours); `cli` sits on top.
LEVELS = {"checks": 0, "ray_compat": 0, "deepspeed_compat": 0, "model": 1, "tokenizer": 2, "config": 2,
          "checkpoint": 3, "parallel": 4, "train": 5, "cluster": 6, "serving": 7, "cli": 8}


def _imports(path: Path) -> list[tuple[int, str]]:
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):  # also the imports inside functions
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def upward_imports(root: Path) -> list[str]:
    bad = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        pkg = rel.parts[0].removesuffix(".py")
        if pkg == "__init__":
            continue
        if pkg not in LEVELS:
            bad.append(f"{rel}: no level assigned to package {pkg!r} in LEVELS")
            continue
        for line, module in _imports(f):
            parts = module.split(".")
            if parts[0] != "moe_platform" or len(parts) < 2:
                continue
            target = parts[1]
            if target != pkg and LEVELS.get(target, 99) >= LEVELS[pkg]:
                bad.append(f"{rel}:{line} ({pkg}) imports {module} ({target})")
    return bad


def test_imports_flow_downward():
    bad = upward_imports(REPO / "platform" / "moe_platform")
    assert bad == [], "imports against the layering:\n" + "\n".join(bad)


def test_the_import_check_catches_an_upward_import(tmp_path):
    root = tmp_path / "moe_platform"
    (root / "checkpoint").mkdir(parents=True)
    (root / "checkpoint" / "ok.py").write_text("from moe_platform.model.args import ModelArgs\n")
    (root / "checkpoint" / "bad.py").write_text("def f():\n    from moe_platform.train.trainer import Trainer\n")
    assert upward_imports(root) == ["checkpoint/bad.py:2 (checkpoint) imports moe_platform.train.trainer (train)"]
