#!/usr/bin/env bash
# Draw the Mermaid diagrams of docs/diagrams.md to PNG files, to look at them as GitHub shows them.
#
#   bash docs/render_diagrams.sh [OUT_DIR]          (default /tmp/minilora-diagrams)
#
# Needs Node.js and a Chromium; on Debian/Ubuntu, once:
#   apt-get install -y chromium nodejs npm
#   (cd OUT_DIR && PUPPETEER_SKIP_DOWNLOAD=1 npm install @mermaid-js/mermaid-cli)
# The PNGs are not committed: the Markdown is the source, and GitHub renders it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-/tmp/minilora-diagrams}"
mkdir -p "$out"
if [ ! -x "$out/node_modules/.bin/mmdc" ]; then
  (cd "$out" && PUPPETEER_SKIP_DOWNLOAD=1 npm install --silent @mermaid-js/mermaid-cli)
fi
chromium="$(command -v chromium || command -v chromium-browser || command -v google-chrome)"
printf '{"executablePath": "%s", "args": ["--no-sandbox", "--disable-gpu"]}\n' "$chromium" > "$out/puppeteer.json"
"$out/node_modules/.bin/mmdc" -p "$out/puppeteer.json" -i "$here/diagrams.md" -o "$out/diagram.png" -s 2 -b white
ls "$out"/diagram-*.png
