"""Rendering a page in headless Chromium (Debian's package; .ci/run installs it)."""

import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest

# Appended to a copy of the page under test: once everything has loaded, it writes how many
# images decoded (natural size > 0) into the DOM, which --dump-dom prints.
_PROBE = """
<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter((i) => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0);
  const out = document.createElement("pre");
  out.id = "render-check";
  out.textContent = JSON.stringify({images: imgs.length, rendered: ok.length});
  document.body.appendChild(out);
});
</script>
"""


def chromium() -> str:
  """The Chromium binary; skips when absent unless QAJ_REQUIRE_BROWSER=1 (CI), then fails."""
  path = shutil.which("chromium") or shutil.which("chromium-browser")
  if path:
    return path
  if os.environ.get("QAJ_REQUIRE_BROWSER") == "1":
    pytest.fail("QAJ_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium).")
  pytest.skip("no chromium on PATH (apt-get install chromium): the browser check is skipped.")


def rendered_images(html_path: str) -> dict:
  """``{"images", "rendered"}`` counted by Chromium after loading the page."""
  with open(html_path) as f:
    page = f.read()
  with tempfile.TemporaryDirectory() as tmp:
    probe = os.path.join(tmp, "page.html")
    with open(probe, "w") as f:
      f.write(page.replace("</body>", _PROBE + "</body>"))
    proc = subprocess.run(
      [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={os.path.join(tmp, 'profile')}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        f"file://{probe}",
      ],
      capture_output=True,
      text=True,
      timeout=120,
    )
  m = re.search(r'<pre id="render-check">(.*?)</pre>', proc.stdout)
  assert m, f"Chromium printed no render check (rc {proc.returncode}): {proc.stderr[-2000:]}"
  return json.loads(m.group(1))
