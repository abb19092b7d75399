"""The one CEL environment: compile once with declared variables, evaluate fail-closed to JSON values."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jwtlet.cel import (
    MAX_EXPRESSION_LENGTH,
    CelCompileError,
    CelEvaluationError,
    compile_expression,
    evaluate,
    evaluate_bool,
    prepare,
)

VARIABLES = frozenset({"subject", "request", "now"})
SUBJECT = {"username": "system:serviceaccount:team-a:api", "namespace": "team-a",
           "extra": {"authentication.kubernetes.io/pod-name": ["api-0"]}, "claims": {}}


def activation() -> dict[str, object]:
    return {"subject": SUBJECT, "request": {"resource": "payments", "scopes": ["read"], "audiences": []},
            "now": datetime.datetime(2026, 11, 29, tzinfo=datetime.UTC)}


def test_a_compiled_expression_evaluates_against_the_declared_variables() -> None:
    condition = compile_expression("subject.namespace.startsWith('team-') && request.scopes.size() > 0", VARIABLES)
    assert evaluate_bool(condition, activation()) is True
    claim = compile_expression("subject.extra['authentication.kubernetes.io/pod-name'][0]", VARIABLES)
    assert evaluate(claim, prepare(activation())) == "api-0"


@pytest.mark.parametrize(("source", "message"), [
    ("subject.(", "Syntax error"),
    ("secrets.password", "undeclared reference to 'secrets'"),
    ("", "must not be empty"),
    ("'" + "a" * MAX_EXPRESSION_LENGTH + "'", "longer than 2048"),
])
def test_unusable_expressions_are_refused_when_compiled(source: str, message: str) -> None:
    with pytest.raises(CelCompileError, match=message):
        compile_expression(source, VARIABLES)


def test_macro_loop_variables_are_not_unknown_references() -> None:
    expression = compile_expression("request.scopes.all(s, s.startsWith('r'))", VARIABLES)
    assert evaluate_bool(expression, activation()) is True


def test_a_non_string_expression_is_refused() -> None:
    with pytest.raises(CelCompileError):
        compile_expression(42, VARIABLES)


@pytest.mark.parametrize("source", [
    "subject.extra['missing'][0]",      # a missing key
    "subject.namespace + 1",            # a type mismatch
    "now",                              # a timestamp is not a JSON value
    "b'bytes'",                         # nor are bytes
])
def test_evaluation_fails_closed(source: str) -> None:
    with pytest.raises(CelEvaluationError):
        evaluate(compile_expression(source, VARIABLES), activation())


def test_a_condition_must_be_a_bool() -> None:
    with pytest.raises(CelEvaluationError, match="not bool"):
        evaluate_bool(compile_expression("subject.namespace", VARIABLES), activation())


@given(st.text(max_size=80))
def test_no_source_text_escapes_as_anything_but_a_compile_error(source: str) -> None:
    try:
        expression = compile_expression(source, VARIABLES)
    except CelCompileError:
        return
    try:
        evaluate(expression, activation())
    except CelEvaluationError:
        pass


def test_the_daemon_loads_the_native_cel_module_without_the_packages_command_line_tool(tmp_path: Path) -> None:
    """``import cel`` drags in typer, rich and prompt_toolkit (~28 MB at every start); jwtlet must not."""
    import subprocess
    import sys

    probe = ("import sys, jwtlet.cel as c; "
             "c.compile_expression('1 + 1', frozenset()); "
             "print(sorted(m for m in ('cel.cli', 'typer', 'rich', 'prompt_toolkit') if m in sys.modules))")
    # From tmp_path, so the installed package is imported, not the checkout's source tree.
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert result.stdout.strip() == "[]"
