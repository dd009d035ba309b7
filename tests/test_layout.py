"""The code's shape: the library never imports the harness, nothing imports in a circle, functions stay short, and
the embedded model's spec in the library is the one its config preset gives."""
import ast
import dataclasses
import importlib.util

from conftest import REPO, compose


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_graph_is_a_tree_and_the_library_never_imports_the_harness():
    ig = _import_graph()
    graph = ig.graph()
    assert "rap.harness.job" in graph and "rap.plans" in graph["rap.harness.job"]  # the graph sees real imports
    assert ig.cycles(graph) == []
    assert ig.library_to_harness(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    ig = _import_graph()
    assert ig.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert ig.library_to_harness({"rap.costs": {"rap.harness.job"}}) == [("rap.costs", "rap.harness.job")]


def test_no_library_function_is_longer_than_80_lines():
    long = [f"{p.relative_to(REPO)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in sorted((REPO / "rap").rglob("*.py")) for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert long == []


def test_embedded_model_spec_matches_its_preset():
    from rap.harness.settings import model_spec
    from rap.models import SMOLLM2

    preset = model_spec(compose("model=smollm2-135m", "device=cpu"))
    assert dataclasses.replace(preset, device="auto", seed=0) == SMOLLM2


def test_readme_and_docs_link_only_to_files_that_exist():
    import re

    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    broken = [f"{page.relative_to(REPO)} -> {target}" for page in pages
              for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
              if "://" not in target and not (page.parent / target).exists()]
    assert broken == []
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


def test_the_docs_prose_types_no_result_by_hand():
    """Every decimal number in the README's and docs' prose outside generated blocks is an allowed configuration
    value, version or identifier (scripts/typed_numbers.py); a typed result is caught."""
    spec = importlib.util.spec_from_file_location("typed_numbers", REPO / "scripts" / "typed_numbers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.typed_numbers() == []
    page = "A sentence.\n<!-- generated: x -->\n| 1.5 |\n<!-- end generated: x -->\nIt took 3.4 hours (`0.9`).\n"
    assert [n for _, line in module.prose(page) for n in module.NUMBER.findall(line)] == ["3.4"]
