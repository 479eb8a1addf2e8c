"""The public API: every name in __all__ resolves, the list is sorted, and import is cheap."""

from __future__ import annotations

import subprocess
import sys

import fetchpool


def test_all_is_sorted_and_every_name_resolves() -> None:
    assert fetchpool.__all__ == sorted(fetchpool.__all__)
    for name in fetchpool.__all__:
        assert getattr(fetchpool, name) is not None, name


def test_unknown_attribute_raises() -> None:
    try:
        fetchpool.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_import_and_help_do_not_load_heavy_modules() -> None:
    code = (
        "import sys, fetchpool.cli;"
        "heavy = [m for m in ('urllib3', 'PIL', 'rich', 'pyarrow', 'sqlite3') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_all_matches_the_lazy_export_table() -> None:
    assert set(fetchpool.__all__) == set(fetchpool._EXPORTS)


def test_report_lives_in_the_models_and_stays_importable_where_it_was() -> None:
    from fetchpool.engine.pipeline import Report as from_pipeline
    from fetchpool.models import Report

    assert fetchpool.Report is Report is from_pipeline


def test_the_models_import_nothing_else_from_the_package() -> None:
    """models is the bottom layer (docs/architecture.md): a report reads its records through
    the source its builder attaches, never through state/ or storage."""
    import ast
    from pathlib import Path

    import fetchpool.models

    tree = ast.parse(Path(fetchpool.models.__file__).read_text())
    imported = {
        node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    } | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert not [name for name in imported if name.split(".")[0] == "fetchpool"]
