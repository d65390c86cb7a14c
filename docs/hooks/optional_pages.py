"""MkDocs hook: list pages that other work may or may not have written yet, once they exist.

``docs/performance.md`` is written separately from the rest of the documentation; when the file is
present it is put into the navigation before "Reproduction", so the site never links to a missing page.
"""

from __future__ import annotations

from pathlib import Path

OPTIONAL = [("Performance", "performance.md", "Reproduction")]  # (title, file, insert before this title)


def _titles(nav: list) -> list[str | None]:
    return [next(iter(item)) if isinstance(item, dict) else None for item in nav]


def on_config(config, **kwargs):
    nav = config.get("nav")
    if not nav:
        return config
    docs_dir = Path(config["docs_dir"])
    listed = {value for item in nav if isinstance(item, dict) for value in item.values() if isinstance(value, str)}
    for title, filename, before in OPTIONAL:
        if (docs_dir / filename).is_file() and filename not in listed:
            titles = _titles(nav)
            nav.insert(titles.index(before) if before in titles else len(nav), {title: filename})
    return config
