"""Every emitted name is documented: docs/names.md is generated from names.py."""

from __future__ import annotations

from pathlib import Path

from otel_gil import names

DOC = Path(__file__).parent.parent / "docs" / "names.md"


def test_docs_table_is_current() -> None:
    # GIVEN the registry WHEN rendered THEN it equals the committed doc
    # (regenerate with `python -m otel_gil.names > docs/names.md`).
    assert DOC.read_text() == names.markdown()


def test_names_are_unique_and_prefixed() -> None:
    metric_names = [m.name for m in names.METRICS]
    assert len(set(metric_names)) == len(metric_names)
    assert all(n.startswith("otel_gil.") for n in metric_names)
    attrs = [a.name for a in names.ATTRIBUTES]
    assert len(set(attrs)) == len(attrs)
    # Our own attributes carry the prefix; the rest are semantic conventions.
    own = {a.name for a in names.ATTRIBUTES} - {"thread.id", "thread.name", "process.pid"} - {
        "code.stacktrace", "code.function.name", "code.file.path", "code.line.number"}
    assert all(n.startswith("otel_gil.") for n in own)


def test_no_emitted_name_is_spelled_outside_names_py() -> None:
    # GIVEN every module of the package except names.py
    pkg = Path(names.__file__).parent
    spelled = [m.name for m in names.METRICS] + [s.name for s in names.SPANS] + \
        [a.name for a in names.ATTRIBUTES if a.name.startswith("otel_gil.")]
    for path in pkg.rglob("*.py"):
        if path.name == "names.py":
            continue
        text = path.read_text()
        # THEN none of them contains an emitted name as a string literal
        for name in spelled:
            assert f'"{name}"' not in text and f"'{name}'" not in text, (path, name)


def test_configuration_doc_is_current() -> None:
    from otel_gil import config

    doc = Path(__file__).parent.parent / "docs" / "configuration.md"
    assert doc.read_text() == config.markdown()
    assert set(config.DOCS) == set(config.ENV.values())
