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
# library's private APIs (they import no package of ours); `rewards` (GRPO's built-in reward functions) imports
# nothing of ours either; `cli` sits on top. `post_train` (objectives beyond next-token) builds on the trainer and, for
# GRPO's rollouts, runs the serving engine: it sits above serving, just below cli, and nothing else imports it.
LEVELS = {"checks": 0, "ray_compat": 0, "deepspeed_compat": 0, "rewards": 0, "model": 1, "tokenizer": 2, "config": 2,
          "checkpoint": 3, "parallel": 4, "train": 5, "cluster": 6, "serving": 7, "post_train": 7.5, "cli_support": 7.8,
          "cli": 8}


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


# No import cycle anywhere in the package, not even through function-level imports (docs: shared design, style 11).
# The edges are resolved as /work/shared/hooks/check-cycles resolves them, so this test and the hook agree: an
# `import a.b.c` or `from a.b import c` names the longest module prefix that exists in the tree; a module importing
# one of its own parent packages is no edge (that is the package being initialised, not a cycle through its code).
def import_edges(src_root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of `package` (under `src_root`) it imports, at any nesting level."""
    import ast

    files = {}
    for f in sorted((src_root / package).rglob("*.py")):
        name = ".".join(f.relative_to(src_root).with_suffix("").parts).removesuffix(".__init__")
        files[name] = f
    edges: dict[str, set[str]] = {m: set() for m in files}
    for module, f in files.items():
        pkg = module if f.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: `from . import x` in pkg.mod is pkg.x, `from ..y import z` is y.z
                    parts = pkg.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in names:
                while target and target not in files:
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                if target and target != module and not module.startswith(target + "."):
                    edges[module].add(target)
    return edges


def import_cycles(src_root: Path, package: str) -> list[list[str]]:
    """The strongly connected components of more than one module in `package`'s import graph (Tarjan), each sorted."""
    edges = import_edges(src_root, package)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_no_import_cycles():
    edges = import_edges(REPO / "platform", "moe_platform")
    # the finder sees the tree: every package's modules, and the edges between them
    assert {"moe_platform.model.moe", "moe_platform.serving.engine", "moe_platform.train.trainer"} <= edges.keys()
    assert "moe_platform.model.grouped_mm" in edges["moe_platform.model.moe"]
    cycles = import_cycles(REPO / "platform", "moe_platform")
    assert cycles == [], "import cycles (move the shared part into a leaf module):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_the_cycle_check_catches_a_planted_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import leaf\n")  # a package importing its own module
    (pkg / "sub" / "leaf.py").write_text("import os\nfrom pkg import sub\n")  # its parent package: no edge
    (pkg / "a.py").write_text("from pkg.b import g\n\ndef f():\n    return g()\n")
    # the edge back sits inside a function, as the one in model/ did
    (pkg / "b.py").write_text("def g():\n    from pkg import a\n    return a\n")
    (pkg / "c.py").write_text("from .d import h\n")  # relative imports count too
    (pkg / "d.py").write_text("def h():\n    from . import c\n")
    (pkg / "e.py").write_text("from pkg.a import f\nfrom pkg.sub.leaf import os\n")  # imports into a cycle: not in one
    assert import_cycles(tmp_path, "pkg") == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d"]]
    (pkg / "b.py").write_text("def g():\n    return 1\n")
    assert import_cycles(tmp_path, "pkg") == [["pkg.c", "pkg.d"]]


def test_constraints_lock_every_declared_dependency_within_its_range():
    """constraints.txt (scripts/setup.sh installs with it) pins each dependency of pyproject.toml, the test extra's
    too, at one exact version that its declared range allows; pyproject.toml itself keeps ranges."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {req}"
    assert pins[canonicalize_name("torch")] == Version("2.13.0")  # the CPU install's torch (docs: shared design)
    for name in ("ray", "deepspeed", "transformers", "peft", "torchao", "tokenizers", "safetensors", "pyarrow",
                 "openai"):
        assert name in pins, name
    assert len(pins) > len(declared), "the lock covers what the dependencies pull in too"
    # pyproject.toml keeps ranges (ray excepted: it has been pinned there since ray_compat targets one version)
    assert not any("==" in r for r in project["dependencies"] if not r.startswith("ray[")), "keep ranges in pyproject"
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert '-c "$lock"' in setup and "constraints.txt -nt" in setup
