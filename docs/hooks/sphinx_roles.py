"""MkDocs hook: render Sphinx roles left in docstrings (``:class:`~a.b.C``` → ``C`` in code font).

mkdocstrings' Google-style parser leaves ``:class:`` / ``:func:`` / ``:data:`` … as literal text before
the code span; this strips the role and, for ``~``, keeps only the last dotted component, as Sphinx does.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|data|attr|mod|obj|exc):<code>(~?)([\w.]+)</code>")


def _replace(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return _ROLE.sub(_replace, html)
