"""The Python examples of docs/memory-constrained-environments.md, by heading, for tests to run.

The doc is what users read; tests execute its code rather than copies of it.
"""

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "memory-constrained-environments.md"
SEED = Path(__file__).resolve().parent / "seed" / "memory-constrained-environments.md"

_FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    heading: str
    language: str
    code: str


def blocks(path: Path = DOC) -> list[Block]:
    """Every fenced code block with the nearest heading above it."""
    out: list[Block] = []
    heading, language, lines = "", None, []
    for line in path.read_text(encoding="utf-8").splitlines():
        fence = _FENCE.match(line)
        if language is None and line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif fence and language is None:
            language, lines = fence.group(1), []
        elif fence and language is not None:
            out.append(Block(heading, language, "\n".join(lines) + "\n"))
            language = None
        elif language is not None:
            lines.append(line)
    return out


def example(heading: str, path: Path = DOC) -> str:
    """The code of the (first) Python block under the heading containing ``heading``."""
    found = [b for b in blocks(path) if b.language == "python" and heading in b.heading]
    if not found:
        raise KeyError(f"no Python example under a heading containing {heading!r} in {path}")
    return found[0].code


def pipeline_example() -> tuple[str, str]:
    """The pipeline example split into (class definition, usage)."""
    code = example("Memory-Aware Data Pipeline")
    head, sep, usage = code.partition("# Usage example")
    assert sep, "the pipeline example lost its '# Usage example' marker"
    return head, sep + usage
