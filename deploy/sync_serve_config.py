"""Write configs/serve.yaml into the RayService's serveConfigV2 (deploy/base/rayservice.yaml).

    python deploy/sync_serve_config.py

The text is copied verbatim, comments included, with one change: http_options.host becomes 0.0.0.0,
because in a pod the Serve proxy must accept connections from other pods (the local default in
configs/serve.yaml is 127.0.0.1). deploy/validate.py checks that the two agree.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIG = ROOT / "configs" / "serve.yaml"
RAYSERVICE = ROOT / "deploy" / "base" / "rayservice.yaml"
KEY = "  serveConfigV2: |"
INDENT = " " * 4
HOST_LINE = re.compile(r"^(\s+host:\s*)127\.0\.0\.1\b.*$")


def serve_config_block(text: str) -> list[str]:
    """configs/serve.yaml as the indented lines of a YAML block scalar, host switched to 0.0.0.0."""
    lines = []
    for line in text.splitlines():
        line = HOST_LINE.sub(r"\g<1>0.0.0.0         # configs/serve.yaml: 127.0.0.1 (local)", line)
        lines.append(INDENT + line if line.strip() else "")
    return lines


def sync(rayservice: Path = RAYSERVICE, serve_config: Path = SERVE_CONFIG) -> bool:
    """Rewrite the block; returns True when the file changed."""
    old = rayservice.read_text().splitlines()
    start = old.index(KEY) + 1
    end = start
    while end < len(old) and (not old[end].strip() or old[end].startswith(INDENT)):
        end += 1
    new = old[:start] + serve_config_block(serve_config.read_text()) + old[end:]
    if new == old:
        return False
    rayservice.write_text("\n".join(new) + "\n")
    return True


if __name__ == "__main__":
    changed = sync()
    print(f"{RAYSERVICE.relative_to(ROOT)}: {'updated' if changed else 'already in sync'}", file=sys.stderr)
