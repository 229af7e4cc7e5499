"""Print the shell command of a marked block of README.md.

A block is marked by an HTML comment line `<!-- NAME -->` right before a ```bash fence; its
lines, without blank and comment lines, are printed as a script for `bash -e`.
"""

import sys
from pathlib import Path


def readme_command(name: str, readme: Path = Path(__file__).parents[1] / "README.md") -> str:
    lines = readme.read_text().splitlines()
    marker = f"<!-- {name} -->"
    if lines.count(marker) != 1:
        raise SystemExit(f"README.md must hold exactly one {marker} block")
    i = lines.index(marker) + 1
    if not lines[i].startswith("```"):
        raise SystemExit(f"{marker} must be followed by a code fence")
    body = []
    for line in lines[i + 1 :]:
        if line.startswith("```"):
            break
        line = line.strip()
        if line and not line.startswith("#"):
            body.append(line)
    return "\n".join(body)


if __name__ == "__main__":
    print(readme_command(sys.argv[1]))
