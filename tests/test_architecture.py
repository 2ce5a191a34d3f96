"""Import boundaries: a service imports only `shared` (and itself); `shared` imports no service."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("gateway", "redirect", "worker")


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("service", SERVICES)
def test_service_imports_only_shared(service):
    offenders = [
        f"{path.relative_to(ROOT)}: {module}"
        for path in (ROOT / "services" / service).rglob("*.py")
        for module in imported_modules(path)
        if module.startswith("services.") and not module.startswith(f"services.{service}")
    ]
    assert offenders == []


def test_shared_imports_no_service():
    offenders = [
        f"{path.relative_to(ROOT)}: {module}"
        for path in (ROOT / "shared").rglob("*.py")
        for module in imported_modules(path)
        if module == "services" or module.startswith("services.")
    ]
    assert offenders == []


def test_the_check_sees_imports(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("from services.redirect import app\nimport services.worker.main\n")
    assert imported_modules(sample) == {"services.redirect", "services.worker.main"}
