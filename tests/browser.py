"""Render a report page in a real headless browser (Debian's ``chromium``) and measure it.

``check_page`` loads a copy of the page with a small script appended that, once the page has
loaded, records every image's natural size and every element that reaches past the viewport's
right edge (unless it sits in a box that scrolls sideways, such as a wide table); ``--dump-dom``
hands the result back. ``screenshot`` writes a full-page PNG.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WIDTH, HEIGHT = 1280, 900
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=10000"]

_PROBE = """<script>
window.addEventListener("load", () => {
  const width = document.documentElement.clientWidth;
  const images = [...document.images].map(i => ({alt: i.alt, complete: i.complete, natural: i.naturalWidth,
                                                  shown: i.getBoundingClientRect().width}));
  // an element inside a box that scrolls sideways is reachable, not cut off
  const scrolls = e => { for (let a = e.parentElement; a; a = a.parentElement) {
    if (["auto", "scroll"].includes(getComputedStyle(a).overflowX)) return true; } return false; };
  const past = [...document.body.querySelectorAll("*")]
                 .filter(e => e.getBoundingClientRect().right > width + 0.5 && !scrolls(e))
                 .map(e => e.tagName + ": " + (e.textContent || e.alt || "").trim().slice(0, 60));
  const out = document.createElement("pre");
  out.id = "probe";
  out.style.display = "none";
  const page = document.documentElement;
  out.textContent = JSON.stringify({width, height: page.scrollHeight, scroll_width: page.scrollWidth, images, past});
  document.body.appendChild(out);
});
</script>"""


def find_browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def check_page(page: Path, workdir: Path, width: int = WIDTH) -> dict:
    """The probe's measurements of ``page`` in a ``width``-pixel window: ``images`` (alt, complete,
    natural width, shown width), ``past`` (elements reaching past the right edge), ``scroll_width``."""
    probed = workdir / f"probed_{page.name}"
    probed.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    dom = subprocess.run([find_browser(), *FLAGS, f"--window-size={width},{HEIGHT}", "--dump-dom",
                          probed.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r'<pre id="probe"[^>]*>(.*?)</pre>', dom, re.S)
    if found is None:
        raise RuntimeError("the probe script did not run: the page did not finish loading")
    return json.loads(html.unescape(found.group(1)))


def screenshot(page: Path, png: Path, width: int = WIDTH, height: int | None = None) -> Path:
    """A PNG of the page's top ``height`` pixels (default: its full height, measured first)."""
    if height is None:
        probe = check_page(page, png.parent, width)
        height = probe["height"]
    subprocess.run([find_browser(), *FLAGS, f"--window-size={width},{height}", f"--screenshot={png}",
                    page.as_uri()], capture_output=True, timeout=120, check=True)
    return png
