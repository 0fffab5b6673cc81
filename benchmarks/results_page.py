"""`benchmarks/RESULTS.md`, the one results page: each benchmark owns one ``## <title>`` section of it."""
from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def replace_section(path: str | Path, title: str, body: str) -> None:
    """Replaces the section headed ``## {title}`` of the markdown file ``path`` with ``body`` (appending the
    section if absent), leaving every other section as it is."""
    path = Path(path)
    heading = f"## {title}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    section = f"{heading}\n\n{body.strip()}\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("" if end < 0 else text[end:])
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
