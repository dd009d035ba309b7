"""Lists the decimal numbers typed into the prose of the README and docs/ (outside generated blocks, tables, code and
links), so that a result typed by hand is caught: results belong in generated blocks (``python -m analysis.paper``).
Configuration values, versions and identifiers that prose may name are allowed below. Exits 1 when it finds others.

    python scripts/typed_numbers.py
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/*.md", "docs/bench/*.md"]
ALLOWED = {
    # compression ratios the presets and sweeps set
    "0.2", "0.25", "0.3", "0.5",
    # the nominal level of every interval
    "95%",
    # versions: Python, torch, transformers, lm-eval, Llama 3.1
    "3.11", "2.11", "2.13", "5.23", "5.24", "5.25", "0.4", "3.1",
    # arXiv identifiers of the methods
    "2602.02599", "2601.07891", "2507.11273",
    # the benchmark's targets for RAP 0.3 (analysis.paper.TARGETS) and the RAP paper's reported latencies they echo
    "0.72", "0.78", "77%", "83%",
    # the coverage every interval must reach in simulation
    "93%",
    # benchmark settings: a vocabulary size, a context length
    "32,000", "32,768",
}
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+\.\d+%?|\b\d{1,3}(?:,\d{3})+\b|\b\d+%")


def prose(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of the prose: generated blocks, code, inline code, link targets and tables blanked."""
    blank = lambda m: "\n" * m.group(0).count("\n")  # noqa: E731  (keeps line numbers)
    text = re.sub(r"<!-- generated: (\S+) -->.*?<!-- end generated: \1 -->", blank, text, flags=re.S)
    text = re.sub(r"```.*?```", blank, text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    text = re.sub(r"\]\([^)\n]*\)", "](", text)
    return [(i, line) for i, line in enumerate(text.splitlines(), 1) if not line.lstrip().startswith("|")]


def typed_numbers(root: Path = REPO) -> list[str]:
    """``page:line: number`` for every number in the prose that is not allowed."""
    found = []
    for pattern in PAGES:
        for page in sorted(root.glob(pattern)):
            for i, line in prose(page.read_text()):
                found += [f"{page.relative_to(root)}:{i}: {n}" for n in NUMBER.findall(line) if n not in ALLOWED]
    return found


def main() -> None:
    found = typed_numbers()
    for f in found:
        print(f)
    if found:
        sys.exit(f"error: {len(found)} typed number(s) in the docs' prose; put results in generated blocks.")


if __name__ == "__main__":
    main()
