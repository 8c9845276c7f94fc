"""Griffe extension for the API reference: turn the reStructuredText the docstrings are written in
(roles such as :func:`explain`, :math:`x`, ``.. math::`` blocks, ``::`` literal blocks) into the Markdown
that mkdocstrings renders (inline code, MathJax ``\\( \\)`` and ``\\[ \\]`` through arithmatex)."""

from __future__ import annotations

import re
from typing import Any

import griffe

_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_XREF_ROLE = re.compile(r":(?:func|class|mod|data|attr|meth|obj|exc|const|py:\w+):`~?([^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<inline>.*)$")


def _math_blocks(lines: list[str]) -> list[str]:
    """``.. math:: expr`` and ``.. math::`` followed by an indented block -> ``\\[ ... \\]`` blocks."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH_DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        body = [match["inline"].strip()] if match["inline"].strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            if lines[i].strip() or body:
                body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        equations = [line for line in body if line]
        out.extend(["", f"{indent}\\[", *(f"{indent}{line}" for line in equations), f"{indent}\\]", ""])
    return out


def _literal_blocks(lines: list[str]) -> list[str]:
    """A paragraph ending in ``::`` introduces an indented literal block: end it with ``:`` instead."""
    return [
        re.sub(r"(?<=\S)::$", ":", line) if line.rstrip().endswith("::") and not line.strip().startswith("..") else line
        for line in lines
    ]


def rst_to_markdown(text: str) -> str:
    """The docstring text with its reStructuredText constructs rewritten as Markdown."""
    text = _MATH_ROLE.sub(lambda m: f"\\({m[1]}\\)", text)
    text = _XREF_ROLE.sub(lambda m: f"`{m[1].split('.')[-1] if m[1].startswith('~') else m[1]}`", text)
    lines = _literal_blocks(_math_blocks(text.splitlines()))
    return "\n".join(lines)


class RstToMarkdown(griffe.Extension):
    """Rewrites every docstring once, when griffe loads the object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
