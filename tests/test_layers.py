"""Imports point one way: reporting never imports experiments or analysis, report.py never
imports compare.py (which calls it), and the training loop leaves file I/O to run_folder.py."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "soaplab"


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "reporting").glob("*.py")), ids=str)
def test_reporting_imports_no_experiments_or_analysis(path):
    assert not {n for n in imports(path)
                if n.startswith(("soaplab.experiments", "soaplab.analysis"))}


def test_report_does_not_import_compare():  # compare.py calls report.py, never back
    assert not {n for n in imports(PACKAGE / "experiments" / "report.py") if "compare" in n}


def test_the_loop_does_no_file_io():
    loop = PACKAGE / "experiments" / "loop.py"
    assert not {n for n in imports(loop) if n.startswith("soaplab.reporting")}
    source = loop.read_text()
    assert not any(call in source for call in ("torch.save", "torch.load", "open(", "json.dump("))


@pytest.mark.parametrize("path", sorted((PACKAGE / "optim").rglob("*.py")) + [PACKAGE / "roles.py"],
                         ids=str)
def test_optim_and_roles_import_no_framework(path):
    """Integrations live in soaplab.integrations, which the optimizers never import; roles
    duck-type Hugging Face and timm models instead of importing them."""
    assert not {n for n in imports(path)
                if n.startswith(("soaplab.integrations", "transformers", "timm", "lightning",
                                 "pytorch_lightning", "accelerate"))}
