"""Import boundaries: a service imports only `shared` (and itself); `shared` imports no service."""
import ast
import re
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


# Pooled connections are handed on without asyncpg's reset query (shared/db.py): no SQL the
# services run may leave state in the session for the connection's next user. shared/migrate.py
# takes its session advisory lock on a connection of its own, never a pooled one.
_SESSION_STATE = re.compile(
    r"^(SET\s+(?!LOCAL\b)|RESET\s+\S|LISTEN\b|PREPARE\b|DECLARE\b.*\bWITH\s+HOLD\b|CREATE\s+(TEMP|TEMPORARY)\b)"
    r"|\bpg_(try_)?advisory_(un)?lock(_shared)?\s*\(|\bset_config\s*\(",
    re.IGNORECASE | re.DOTALL,
)
_NO_POOL = {Path("shared/migrate.py")}


def session_state_sql(path: Path) -> list[str]:
    """SQL in the file's string literals (f-string parts included) that sets session state."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            for statement in node.value.split(";"):
                text = re.sub(r"--[^\n]*", "", statement).strip()
                if _SESSION_STATE.search(text):
                    found.append(text[:60])
        elif isinstance(node, ast.Attribute) and node.attr in ("add_listener", "add_log_listener"):
            found.append(node.attr)
    return found


def test_no_sql_leaves_session_state_on_a_pooled_connection():
    offenders = [
        f"{path.relative_to(ROOT)}: {sql}"
        for folder in ("services", "shared")
        for path in (ROOT / folder).rglob("*.py")
        if path.relative_to(ROOT) not in _NO_POOL
        for sql in session_state_sql(path)
    ]
    assert offenders == []


def test_the_session_state_check_sees_it(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text(
        'a = "SET statement_timeout = 0"\nb = f"SELECT pg_advisory_lock({1})"\nc = "UPDATE t SET x = 1; LISTEN ch"\n'
        'd = "SET LOCAL lock_timeout = 1"\ne = "SELECT pg_advisory_xact_lock(1)"\nconn.add_listener("ch", f)\n'
        'f = """INSERT INTO t VALUES (1) ON CONFLICT (k) DO UPDATE\n    SET x = 2"""\n'
    )
    assert sorted(session_state_sql(sample)) == ["LISTEN ch", "SELECT pg_advisory_lock(", "SET statement_timeout = 0", "add_listener"]
