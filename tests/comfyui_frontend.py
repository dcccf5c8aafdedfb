"""ComfyUI's real frontend in headless Chromium (Debian's `chromium`, driven by playwright).

Playwright's own browser download is not used: `launch_chromium` starts the system's
`chromium`. Every page runs in a fresh browser context (the frontend restores the last
graph from local storage otherwise), and requests to anything but the test server are
refused, so nothing leaves the machine.

    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = open_frontend(browser, server.url)
        prompt, problems = frontend_prompt(page, workflow, {"max_train_steps": 2})
"""

from __future__ import annotations

import shutil
from typing import Any

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1600, "height": 1000}
# The pack's entry in the template browser (locales/en/main.json names it).
PACK_TEMPLATES_LABEL = "DreamBooth LoRA"


def chromium_path() -> str | None:
    """The system's Chromium (Debian: `apt-get install chromium`), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def launch_chromium(playwright: Any):
    """A headless Chromium browser from the system's binary."""
    return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS, headless=True)


def open_frontend(browser: Any, url: str, viewport: dict[str, int] = VIEWPORT, scale: float = 1.0,
                  timeout: float = 120.0) -> Any:
    """A page of the frontend at `url` in a fresh context, once its app and graph are ready.

    The page collects uncaught errors in `page.errors`.
    """
    context = browser.new_context(viewport=viewport, device_scale_factor=scale)
    local = url.rstrip("/")
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(local)
                  else route.abort())
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(url, timeout=timeout * 1000)
    page.wait_for_function("() => window.app && window.app.graph && window.app.canvas && "
                           "document.querySelector('#graph-canvas')", timeout=timeout * 1000)
    return page


# What runs in the page: load the graph as "open workflow" does, set widgets by name, check
# that every combo's value is one the server offers, and let the frontend write the prompt.
_LOAD_AND_CONVERT = """
async ([workflow, overrides]) => {
  const app = window.app;
  await app.loadGraphData(workflow);
  const nodes = app.graph.nodes ?? app.graph._nodes;
  const problems = [];
  for (const node of nodes) {
    for (const widget of node.widgets ?? []) {
      const linked = (node.inputs ?? []).some((slot) => slot.widget?.name === widget.name && slot.link != null);
      if (linked) continue;
      if (Object.prototype.hasOwnProperty.call(overrides, widget.name)) {
        widget.value = overrides[widget.name];
      }
      if (widget.type === 'combo') {
        let values = widget.options?.values;
        if (typeof values === 'function') values = values();
        if (Array.isArray(values) && !values.includes(widget.value)) {
          problems.push(`${node.type} (#${node.id}) ${widget.name}: ${JSON.stringify(widget.value)} is not offered`);
        }
      }
    }
  }
  const { output } = await app.graphToPrompt();
  return [output, problems];
}
"""


def frontend_prompt(page: Any, workflow: dict[str, Any], overrides: dict[str, Any] | None = None
                    ) -> tuple[dict[str, Any], list[str]]:
    """The API prompt the frontend makes of `workflow`, and the combo values the server does not offer.

    `overrides` sets widgets by name on every node that has them (as a user would type), before
    the prompt is made.
    """
    output, problems = page.evaluate(_LOAD_AND_CONVERT, [workflow, overrides or {}])
    return output, problems


def open_pack_templates(page: Any, timeout: float = 30.0) -> None:
    """Open the template browser (Workflow > Browse Templates) on the pack's entry."""
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text(PACK_TEMPLATES_LABEL, exact=True).first.click(timeout=timeout * 1000)
    page.wait_for_timeout(1500)
