"""The package's layers import downwards only, and no module outside a family branches on its name.

Layers, bottom up: the core front door (``base``, ``specs``, ``units``, ``explanations``, ...),
``architectures`` (models on shared blocks), then ``training``, ``evaluation`` and ``model_cards``,
which consult the family record (:mod:`mlmi_zoo.families`) instead of comparing family names.

Imports are read from the source with :mod:`ast` (module-level and function-level ``import`` /
``from ... import``, relative ones resolved, and ``importlib.import_module("...")`` with a literal
name), so a violation is reported with its file and line, every violation in one message.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import mlmi_zoo
from mlmi_zoo.families import families

PACKAGE_ROOT = Path(mlmi_zoo.__file__).resolve().parent
UPPER_LAYERS = ("mlmi_zoo.training", "mlmi_zoo.evaluation", "mlmi_zoo.model_cards")
# A family's evaluation section is a plug-in of the evaluation layer (loaded by name from the family
# record by mlmi_zoo.evaluation only): it may use that layer, and the data spec's index subsets.
EVALUATION_SECTION_MAY_IMPORT = ("mlmi_zoo.evaluation", "mlmi_zoo.training.data_spec")
FRONT_DOOR = ("base", "specs", "units", "explanations", "_config", "_weights", "families", "registry")
FRONT_DOOR_MUST_NOT_IMPORT = ("mlmi_zoo.architectures",) + UPPER_LAYERS


@dataclass(frozen=True)
class Import:
    importer: str  # dotted name of the importing module
    target: str  # dotted name of the imported module
    path: Path
    line: int
    module_level: bool  # executed on import (not in a function, not under `if TYPE_CHECKING:`)

    def __str__(self) -> str:
        where = "" if self.module_level else " (in a function)"
        return f"{self.path.relative_to(PACKAGE_ROOT.parent)}:{self.line}: {self.importer} imports {self.target}{where}"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, importer: str, path: Path) -> None:
        self.importer, self.path = importer, path
        self.is_package = path.name == "__init__.py"
        self.depth = 0  # > 0 inside a function or a TYPE_CHECKING block
        self.found: list[Import] = []

    def _add(self, target: str, node: ast.AST) -> None:
        if within(target, "mlmi_zoo"):
            self.found.append(Import(self.importer, target, self.path, node.lineno, self.depth == 0))

    def _nested(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _nested

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.depth += 1
            for child in node.body:
                self.visit(child)
            self.depth -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            package = self.importer.split(".")
            if not self.is_package:
                package = package[:-1]
            base = ".".join(package[: len(package) - (node.level - 1)])
            module = f"{base}.{node.module}" if node.module else base
        else:
            module = node.module or ""
        self._add(module, node)
        for alias in node.names:  # `from mlmi_zoo import training` imports the submodule
            if f"{module}.{alias.name}" in MODULES:
                self._add(f"{module}.{alias.name}", node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            self._add(node.args[0].value, node)
        self.generic_visit(node)


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imports_of(name: str, path: Path | None = None) -> list[Import]:
    """Every import of a ``mlmi_zoo`` module by module ``name`` (read from ``path``, default: its file)."""
    path = MODULES[name] if path is None else path
    collector = _ImportCollector(name, path)
    collector.visit(_parse(path))
    return collector.found


ALL_IMPORTS: list[Import] = [imp for name in MODULES for imp in imports_of(name)]


def _report(title: str, violations: list) -> str:
    return f"{title} ({len(violations)}):\n" + "\n".join(f"  {v}" for v in violations)


def is_evaluation_section(module: str) -> bool:
    """``mlmi_zoo.architectures.<family package>.evaluation``, named by a family record."""
    return any(f.evaluation.partition(":")[0] == module for f in families().values())


def test_import_scan_finds_the_forms_it_looks_for(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent("""
        from typing import TYPE_CHECKING
        import mlmi_zoo.training.trainer
        from mlmi_zoo import evaluation
        from ..cbm import model
        from . import heads
        if TYPE_CHECKING:
            from mlmi_zoo.model_cards import card
        def later():
            from mlmi_zoo.training.recipe import load_recipe
            importlib.import_module("mlmi_zoo.evaluation.metrics")
        import numpy
    """))
    found = {(imp.target, imp.module_level) for imp in imports_of("mlmi_zoo.architectures.mil.probe", probe)}
    assert found == {
        ("mlmi_zoo.training.trainer", True),
        ("mlmi_zoo", True), ("mlmi_zoo.evaluation", True),
        ("mlmi_zoo.architectures.cbm", True), ("mlmi_zoo.architectures.cbm.model", True),
        ("mlmi_zoo.architectures.mil", True), ("mlmi_zoo.architectures.mil.heads", True),
        ("mlmi_zoo.model_cards", False), ("mlmi_zoo.model_cards.card", False),
        ("mlmi_zoo.training.recipe", False),
        ("mlmi_zoo.evaluation.metrics", False),
    }, sorted(found)


# -- (a) the model code does not reach up into training, evaluation or model cards --------------------
def test_evaluation_sections_are_the_registered_ones() -> None:
    # The exception below is granted to the modules that the family records name, and only those.
    sections = sorted({f.evaluation.partition(":")[0] for f in families().values()})
    assert sections, "no family registers an evaluation section"
    for section in sections:
        assert section in MODULES, f"a family record names the evaluation section {section!r}, which does not exist"
        parts = section.split(".")
        assert parts[:2] == ["mlmi_zoo", "architectures"] and len(parts) == 4 and parts[-1] == "evaluation", (
            f"evaluation section {section!r} is not mlmi_zoo.architectures.<family>.evaluation")


def test_architectures_import_nothing_from_training_evaluation_or_model_cards() -> None:
    violations = []
    for imp in ALL_IMPORTS:
        if not within(imp.importer, "mlmi_zoo.architectures"):
            continue
        if not any(within(imp.target, layer) for layer in UPPER_LAYERS):
            continue
        if is_evaluation_section(imp.importer) and any(within(imp.target, ok) for ok in EVALUATION_SECTION_MAY_IMPORT):
            continue
        violations.append(imp)
    assert not violations, _report(
        "modules of mlmi_zoo.architectures import training / evaluation / model_cards (only the family "
        f"evaluation sections may import {' and '.join(EVALUATION_SECTION_MAY_IMPORT)})", violations)


def test_nothing_imports_a_family_evaluation_section_but_the_evaluation_layer() -> None:
    # The sections are plug-ins of the evaluation layer; importing one from the model code would load
    # that layer with the models.
    violations = [imp for imp in ALL_IMPORTS if is_evaluation_section(imp.target) and imp.target != imp.importer
                  and not within(imp.importer, "mlmi_zoo.evaluation")]
    assert not violations, _report("family evaluation sections imported outside mlmi_zoo.evaluation", violations)


# -- (b) importing the models loads none of the upper layers -------------------------------------------------
def test_importing_architectures_loads_no_upper_layer() -> None:
    script = textwrap.dedent(f"""
        import sys
        import mlmi_zoo.architectures
        layers = {UPPER_LAYERS!r}
        print("\\n".join(sorted(m for m in sys.modules if any(m == l or m.startswith(l + ".") for l in layers))))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"`import mlmi_zoo.architectures` failed in a fresh interpreter:\n{done.stderr}"
    loaded = done.stdout.split()
    assert not loaded, _report("`import mlmi_zoo.architectures` loads modules of the upper layers", loaded)


# -- (c) the front door stands on its own ----------------------------------------------------------------
def test_front_door_modules_import_no_models_or_upper_layers_at_module_level() -> None:
    front = [f"mlmi_zoo.{name}" for name in FRONT_DOOR]
    assert all(name in MODULES for name in front), f"front-door modules missing: {set(front) - set(MODULES)}"
    violations = [imp for imp in ALL_IMPORTS if imp.importer in front and imp.module_level
                  and any(within(imp.target, layer) for layer in FRONT_DOOR_MUST_NOT_IMPORT)]
    assert not violations, _report(
        "front-door modules import architectures / training / evaluation / model_cards at module level", violations)


# -- (d) nobody but the family itself branches on its name ---------------------------------------------------
def _family_packages() -> dict[str, str]:
    """Family name -> the package that owns it (where its model class lives)."""
    return {name: f.model_class.__module__.rsplit(".", 1)[0] for name, f in families().items()}


def _string_constants(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


_EQUALITY = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)


def family_name_comparisons(path: Path, names: set[str]) -> list[tuple[int, str, str]]:
    """(line, family name, source) of every ==, !=, in, not in (and ``case "name":``) on a family name."""
    source = path.read_text(encoding="utf-8")
    found = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Compare) and any(isinstance(op, _EQUALITY) for op in node.ops):
            for operand in (node.left, *node.comparators):
                for value in _string_constants(operand):
                    if value in names:
                        found.append((node.lineno, value, ast.get_source_segment(source, node) or ""))
        elif isinstance(node, ast.MatchValue):
            for value in _string_constants(node.value):
                if value in names:
                    found.append((node.lineno, value, f"case {value!r}:"))
    return found


def test_family_comparison_scan_finds_the_forms_it_looks_for(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent("""
        a = family == "cbm"
        b = "protopnet" != model.family
        c = name in ("abmil", "additive_mil")
        d = name not in ["baseline"]
        match family:
            case "cbm":
                pass
        e = family == "not_a_family" or label == "cbmx"
    """))
    names = {"protopnet", "cbm", "abmil", "additive_mil", "baseline"}
    assert sorted(v for _, v, _ in family_name_comparisons(probe, names)) == sorted(
        ["cbm", "protopnet", "abmil", "additive_mil", "baseline", "cbm"])


def test_no_family_name_is_compared_outside_its_own_package() -> None:
    owners = _family_packages()
    assert set(owners) >= {"protopnet", "cbm", "abmil", "additive_mil", "baseline"}, sorted(owners)
    violations = []
    for name, path in MODULES.items():
        for line, family, text in family_name_comparisons(path, set(owners)):
            if not within(name, owners[family]):
                violations.append(f"{path.relative_to(PACKAGE_ROOT.parent)}:{line}: {text}  "
                                  f"(family {family!r} belongs to {owners[family]})")
    assert not violations, _report(
        "family names compared outside their own package; consult mlmi_zoo.families.family_of(...) instead", violations)
