"""The benchmarks' one table printer: plain text (`a | b`), or a markdown table for docs/PERFORMANCE.md."""

from __future__ import annotations


def render(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    lines = [" | ".join(head), *(" | ".join(r) for r in rows)]
    if markdown:
        lines.insert(1, " | ".join("---" for _ in head))
        return "\n".join(f"| {line} |" for line in lines)
    return "\n".join(lines)
