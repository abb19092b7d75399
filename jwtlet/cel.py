"""
One CEL environment for every expression jwtlet evaluates: mapping
conditions and claim expressions (claims.md) and the ``jwt-authenticator``
validator's rules and mappings (workload-identity.md).

Expressions are compiled once — when a mapping is written or loaded, when the
config is loaded — and evaluated many times.  The interpreter is the native
``common-expression-language`` package (about 1 µs per compiled evaluation
against a prepared context here; ``cel-python`` took about 120 µs, see
docs/design.md).  Evaluation is pure and fails closed: any error, and any
result that is not a JSON value, is a :class:`CelEvaluationError`.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Mapping, Optional

import attrs

from jwtlet.model import JSONObject, JSONValue

if TYPE_CHECKING:
    import cel as _cel_types


def _native() -> ModuleType:
    """
    The package's native module alone.  ``import cel`` also imports the
    package's command-line tool (typer, rich, prompt_toolkit: about 28 MB and
    160 ms at every start), which a daemon never uses; so the extension is
    loaded from the installed package without running its ``__init__``.
    """
    loaded = sys.modules.get("cel.cel")
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec("cel")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the common-expression-language package is not installed")
    for directory in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            candidate = Path(directory) / f"cel{suffix}"
            if not candidate.is_file():
                continue
            loader = importlib.machinery.ExtensionFileLoader("cel.cel", str(candidate))
            native_spec = importlib.util.spec_from_file_location("cel.cel", candidate, loader=loader)
            if native_spec is not None:
                module = importlib.util.module_from_spec(native_spec)
                loader.exec_module(module)
                return module
    raise ImportError("the common-expression-language package has no native module")


_cel = _native()

#: claims.md: an expression longer than this is refused when it is written.
MAX_EXPRESSION_LENGTH = 2048

# Macros bind a loop variable (``[1, 2].map(x, x * 2)``); the compiled program
# reports it among the variables it reads, so it is not an unknown variable.
_MACRO_BINDING = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,")


class CelCompileError(ValueError):
    """An expression cannot be used; the message is what an operator needs to fix it."""


class CelEvaluationError(Exception):
    """An expression failed to evaluate, or produced something that is not a JSON value."""


@attrs.frozen
class Expression:
    """A compiled expression and its source (for logs and round trips)."""

    source: str
    program: _cel_types.Program = attrs.field(eq=False, repr=False)
    #: The top-level variables it reads (a macro's loop variable included).
    variables: frozenset[str] = attrs.field(default=frozenset(), eq=False, repr=False)


def compile_expression(source: object, variables: frozenset[str]) -> Expression:
    """
    Compile ``source`` for an environment that declares ``variables`` (the
    top-level names an expression may read, e.g. ``subject``, ``request``,
    ``now``).  Raises :class:`CelCompileError`.
    """
    if not isinstance(source, str):
        raise CelCompileError("must be a string holding a CEL expression")
    if not source.strip():
        raise CelCompileError("must not be empty")
    if len(source) > MAX_EXPRESSION_LENGTH:
        raise CelCompileError(f"longer than {MAX_EXPRESSION_LENGTH} characters")
    try:
        program = _cel.compile(source)
    except Exception as error:  # the binding raises ValueError, but a parser bug must not escape as a 500
        raise CelCompileError(_first_line(str(error))) from None
    bound = set(_MACRO_BINDING.findall(source))
    read = frozenset(program.variables())
    unknown = sorted(read - variables - bound)
    if unknown:
        raise CelCompileError(
            f"undeclared reference to '{unknown[0]}' (known: {', '.join(sorted(variables))})"
        )
    return Expression(source=source, program=program, variables=read)


def evaluate(expression: Expression, activation: object) -> JSONValue:
    """
    The value of ``expression`` for ``activation`` (a mapping of the
    declared variables, or a :func:`prepare` d context), as a JSON value.
    (``object``: callers keep a prepared context without naming the
    binding's type; anything else is an evaluation error.)
    """
    try:
        # The binding takes a dict or a Context; any other mapping is copied once.
        if isinstance(activation, (dict, _cel.Context)):
            value: object = expression.program.execute(activation)
        elif isinstance(activation, Mapping):
            value = expression.program.execute(dict(activation))
        else:
            raise TypeError(f"cannot evaluate against {type(activation).__name__}")
    except Exception as error:
        raise CelEvaluationError(f"{type(error).__name__}: {_first_line(str(error))}") from None
    return json_value(value)


def evaluate_bool(expression: Expression, activation: object) -> bool:
    """A condition or validation rule: anything but a bool is an error."""
    value = evaluate(expression, activation)
    if not isinstance(value, bool):
        raise CelEvaluationError(f"evaluated to {type(value).__name__}, not bool")
    return value


def prepare(
    variables: Mapping[str, object], resolve: Optional[Callable[[str], object]] = None
) -> _cel_types.Context:
    """
    A context built once and evaluated against many times: several
    expressions evaluated against the same variables (a condition and its
    claim expressions, the next exchanges of the same caller) share the
    conversion cost.  ``resolve(name)`` is asked first for every variable an
    expression reads, and ``None`` falls through to ``variables``: it gives
    values that change between evaluations without converting the others
    again (the package rebuilds its environment after any change to a
    context's variables).
    """
    context = _cel.Context(dict(variables))
    if resolve is not None:
        context.set_variable_resolver(resolve)
    return context


def json_value(value: object) -> JSONValue:
    """``value`` if it is a JSON value (recursively), else :class:`CelEvaluationError`."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CelEvaluationError("evaluated to a non-finite number")
        return value
    if isinstance(value, (list, tuple)):
        return [json_value(item) for item in value]
    if isinstance(value, Mapping):
        result: JSONObject = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CelEvaluationError("evaluated to a map whose keys are not all strings")
            result[key] = json_value(item)
        return result
    raise CelEvaluationError(f"evaluated to {type(value).__name__}, which is not a JSON value")


def _first_line(message: str) -> str:
    line: Optional[str] = next((part.strip() for part in message.splitlines() if part.strip()), None)
    return line or "invalid expression"
