"""Print deploy/bakgrab.toml.example: every setting of tasks/config.py, documented.

Each setting comes out commented, with its default and the docstring that
follows it in the ``Settings`` dataclass, so the example cannot drift from
the code: tests/unit/test_deploy_docs.py fails when they differ. Regenerate
with::

    .venv/bin/python deploy/gen-config-example.py > deploy/bakgrab.toml.example
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import sys
import textwrap

from bakgrab.tasks import config

HEADER = """\
# bakgrab configuration file (TOML), with every setting and its default.
#
# Read from /etc/bakgrab/bakgrab.toml, or the file named by --config or
# $BAKGRAB_CONFIG. Precedence, highest first: command-line flag >
# BAKGRAB_<SETTING> environment variable > this file > the default shown.
# Uncomment a line to change a setting. Secrets (a broker URL with a
# password, flower_basic_auth) belong in a 0600 environment file instead:
# the deploy scripts put them in /etc/bakgrab/*.env.
#
# Generated from tasks/config.py by deploy/gen-config-example.py.

[bakgrab]
"""


def docstrings() -> dict[str, str]:
    """Each field's docstring: the string literal right after its annotation."""
    tree = ast.parse(inspect.getsource(config.Settings))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def render() -> str:
    docs = docstrings()
    parts = [HEADER]
    for field in dataclasses.fields(config.Settings):
        doc = " ".join(docs.get(field.name, "").split()).replace("``", "`")
        if not doc:
            raise SystemExit(f"Settings.{field.name} has no docstring")
        lines = textwrap.wrap(doc, 76)
        lines.append(f"(environment: {config.ENV_PREFIX}{field.name.upper()})")
        parts.append("\n".join(f"# {line}" for line in lines))
        parts.append(f"#{field.name} = {toml_value(field.default)}\n")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(render())
