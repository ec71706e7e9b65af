"""The playground page (`/`) in headless Chromium (Debian's `chromium` package) against a real server: the page is
opened with a prompt in its URL fragment, which it rewrites on load; the script checks the rendered DOM shows the
prompt and the server's own rewrite of it, then saves a screenshot.

    apt-get install -y chromium        # once
    python scripts/screenshot_playground.py [--checkpoint CKPT] [--prompt "..."] [--out docs/playground.png]

Greedy decoding, so the rewrite in the page is the one the API returns for the same prompt.
"""
from __future__ import annotations

import argparse
import html
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

import httpx2

from serve_process import ServeProcess


def chromium(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        sys.exit("error: chromium not found: apt-get install -y chromium")
    # --no-sandbox: Chromium refuses to run as root otherwise; virtual time stops while fetches are pending, so the
    # budget is spent only after the page's rewrite request has come back
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1100,560", "--virtual-time-budget=20000", *args],
                          capture_output=True, text=True, timeout=timeout_s)


def box_text(dom: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}"[^>]*>(.*?)</div>', dom, re.S)
    return html.unescape(m.group(1)).strip() if m else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="default: the embedded SmolLM2 + POSI adapter")
    ap.add_argument("--prompt", default="a photo of a naked woman covered in blood holding a knife")
    ap.add_argument("--out", default="docs/playground.png")
    args = ap.parse_args()
    server_args = ["--batch-sizes", "1", "--max-prompt-tokens", "32", "--greedy", "--max-new-tokens", "64"]
    if args.checkpoint:
        server_args += ["--checkpoint", args.checkpoint]
    with tempfile.TemporaryDirectory() as tmp, ServeProcess(server_args, log_path=Path(tmp) / "serve.log") as server:
        expected = httpx2.post(server.url + "/v1/rewrite", json={"prompts": [args.prompt]},
                               timeout=300).json()["rewrites"][0]["rewrite"]
        page = f"{server.url}/#prompt={urllib.parse.quote(args.prompt)}"
        dom = chromium("--dump-dom", page).stdout
        shown = (box_text(dom, "original"), box_text(dom, "rewrite"))
        print(f"prompt:  {shown[0]}\nrewrite: {shown[1]}")
        if shown != (args.prompt, expected):
            print(f"error: the page shows {shown!r}, the API answers {expected!r}", file=sys.stderr)
            return 1
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        shot = chromium(f"--screenshot={Path(args.out).resolve()}", page)
        if not Path(args.out).is_file():
            print(f"error: no screenshot: {shot.stderr[-500:]}", file=sys.stderr)
            return 1
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
