"""Take the screenshots in this folder: the three UIs after `make demo`, as a browser shows them.

Needs Chromium (Debian: `apt-get install chromium`) and Playwright in any Python
(`python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright pillow`; Playwright's own browser
download is not needed). With `make dagster` and `.venv/bin/mlflow ui` running and
`.dvc-venv/bin/dvc plots show` done, from the repository root:

    /tmp/pw/bin/python docs/screenshots/take.py

Writes dagster-eval-report.png, dagster-pictures.png, mlflow-run.png, mlflow-metrics.png,
mlflow-model.png (version 1, with its schema) and dvc-plots.png here.
"""

from __future__ import annotations

import argparse
import json
import urllib.request
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

HERE = Path(__file__).resolve().parent
DAGSTER, MLFLOW = "http://127.0.0.1:3000", "http://127.0.0.1:5000"
CLASSIC = "?workflowType=machine_learning"  # MLflow's non-GenAI view (docs/tracking.md)


def latest_run() -> tuple[str, str]:
    """The newest run of the `deepcluster` experiment: (experiment id, run id), by MLflow's REST API."""
    def call(path: str, body: dict) -> dict:
        request = urllib.request.Request(f"{MLFLOW}/api/2.0/mlflow/{path}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    experiment = call("experiments/search", {"filter": "name = 'deepcluster'", "max_results": 1})
    eid = experiment["experiments"][0]["experiment_id"]
    runs = call("runs/search", {"experiment_ids": [eid], "max_results": 1,
                                "order_by": ["attributes.start_time DESC"]})  # fmt: skip
    return eid, runs["runs"][0]["info"]["run_id"]


def save(page: Page, name: str) -> None:
    """The page as `name`, in 256 colours where Pillow is at hand (a third of the bytes)."""
    path = HERE / name
    page.screenshot(path=path)
    try:
        from PIL import Image
    except ImportError:
        pass
    else:
        Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
    print(path)


def shot(page: Page, url: str, name: str, wait_ms: int = 7000) -> None:
    page.goto(url)
    page.wait_for_timeout(wait_ms)
    skip = page.get_by_text("Skip", exact=True)  # Dagster's first-visit community dialog
    if skip.count():
        skip.click()
    save(page, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--plots", type=Path, default=Path("dvc_plots/index.html"))
    args = parser.parse_args()
    eid, run = latest_run()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1700, "height": 1050})
        shot(page, f"{DAGSTER}/assets/eval_report", "dagster-eval-report.png")
        page.get_by_text("[Show Markdown]").first.click()  # the pictures: one click away
        page.wait_for_timeout(2000)
        save(page, "dagster-pictures.png")
        base = f"{MLFLOW}/#/experiments/{eid}/runs/{run}"
        shot(page, base + CLASSIC, "mlflow-run.png")
        shot(page, f"{base}/model-metrics{CLASSIC}", "mlflow-metrics.png")
        shot(page, f"{MLFLOW}/#/models/deepcluster/versions/1{CLASSIC}", "mlflow-model.png")
        page.set_viewport_size({"width": 1400, "height": 2300})
        shot(page, args.plots.resolve().as_uri(), "dvc-plots.png", 4000)
        browser.close()


if __name__ == "__main__":
    main()
