"""Griffe extension for the API reference: adapt two habits of geomon's docstrings to griffe's Google parser.

- geomon heads its doctests ``Example:`` (singular); griffe's Google parser knows only ``Examples:`` and would
  render the doctest as a quoted paragraph. The header is renamed, so each doctest becomes a code block.
- Sphinx roles (``:func:`geomon.functional.rankme```, ``:meth:`compute```) would show up verbatim. A role naming a
  ``geomon.`` object becomes an optional cross-reference (a link when the object is on a reference page, plain code
  otherwise); any other role becomes plain code.

Both happen at documentation time only: the docstrings in the code stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADER = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|meth|class|mod|attr|data|exc|obj):`(~?)([\w.]+)`")


def _role(match: re.Match[str]) -> str:
    short, target = match.group(1) == "~", match.group(2)
    text = target.rsplit(".", 1)[-1] if short else target
    if target.startswith("geomon."):
        return f'<autoref identifier="{target}" optional><code>{text}</code></autoref>'
    return f"`{text}`"


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` headers and turn Sphinx roles into cross-references, before a docstring is parsed."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is not None:
            docstring.value = _ROLE.sub(_role, _HEADER.sub(r"\1Examples:", docstring.value))
