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
