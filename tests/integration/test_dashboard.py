"""The MLflow dashboard as a user sees it: `mlflow server` (sqlite, 127.0.0.1) on a store the product wrote, opened
in a headless Chromium. On the training run's page the loss chart has points, a generated image artifact renders,
the registered model is listed, and the tokenize run of its shard set is listed (its id as a tag, the run in the
tokenize experiment). Screenshots go to runs/dashboard/ (the README shows one).

Two stores: the default suite writes one through common/tracking directly (a tokenize run, a training run's
metrics, images, shard set and a registered debug export: no Ray, ~1 min); the `slow` variant runs a real
tokenize job and a short Ray Train run (the debug config, 1 worker, 6 steps) and checks the same pages.
Skipped, with the reason, when Chromium, chromedriver or Selenium is missing.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.dashboard import browser, browser_missing, mlflow_server, wait_for

pytestmark = [pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing())),
              pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "runs" / "dashboard"
MODEL = "omni-diffusion-dashboard"
TRAIN_EXP, TOKENIZE_EXP = "omni-diffusion-dashboard", "omni-diffusion-tokenize"
ML_VIEW = "workflowType=machine_learning"    # the UI's "Model training" view (README: Dashboard)

# The nearest ancestor of a chart's legend entry ("<run name> (<metric>)") that holds one plot: its points.
JS_CHART_POINTS = """
const label = arguments[0];
const hits = Array.from(document.querySelectorAll('*')).filter(
    e => e.children.length == 0 && e.textContent.trim() == label);
for (const hit of hits) {
  let n = hit;
  while (n && !(n.querySelectorAll && n.querySelectorAll('.js-plotly-plot').length)) n = n.parentElement;
  if (n && n.querySelectorAll('.js-plotly-plot').length == 1) return n.querySelectorAll('path.point').length;
}
return -1;
"""
# The artifact viewer's <img> of a file (its alt is the artifact path), once decoded: [width, height] or null.
JS_IMAGE_SIZE = """
const img = Array.from(document.images).find(i => i.alt == arguments[0] && i.complete && i.naturalWidth > 0);
return img ? [img.naturalWidth, img.naturalHeight] : null;
"""


def client_image_size(client, run_id: str, path: str) -> tuple[int, int]:
    import tempfile

    from PIL import Image

    with tempfile.TemporaryDirectory() as d:
        return Image.open(client.download_artifacts(run_id, path, d)).size


def click(d, element) -> None:
    """A click where a user would: scrolled into view first (a long tree can hold the file below the fold)."""
    d.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].click();", element)


def close_assistant(d) -> None:
    """The MLflow Assistant side panel hides a third of the page in screenshots: close it if it is open."""
    for button in d.find_elements("xpath", "//*[text()='MLflow Assistant']/following::button[position() <= 3]"):
        if "close" in (button.get_attribute("aria-label") or "").lower():
            button.click()
            return


def check_dashboard(url: str, client, run_id: str, tokenize_run_id: str, shots: Path) -> None:
    """The checks a user's first look makes, each with a screenshot."""
    shots.mkdir(parents=True, exist_ok=True)
    run = client.get_run(run_id)
    exp_id = run.info.experiment_id
    run_page = f"{url}/#/experiments/{exp_id}/runs/{run_id}"
    with browser() as d:
        # the experiment opens on its training runs
        d.get(f"{url}/#/experiments/{exp_id}?{ML_VIEW}")
        wait_for(d, lambda d: "/runs" in d.current_url and run.info.run_name in d.find_element("tag name", "body").text,
                 what="the experiment's run list")
        close_assistant(d)
        d.save_screenshot(str(shots / "experiment.png"))

        # overview: tags (provenance, the tokenize run), the shard set, the registered model
        d.get(f"{run_page}?{ML_VIEW}")
        body = wait_for(d, lambda d: (t := d.find_element("tag name", "body").text) and "Registered models" in t
                        and MODEL in t and t, what="the run overview with its registered model")
        assert tokenize_run_id in body, "the tokenize run id is not among the run's tags"
        assert "omnidiff.config_sha256" in body and "Datasets" in body and "omnidiff train" in body
        d.save_screenshot(str(shots / "run-overview.png"))

        # the loss chart has points
        d.get(f"{run_page}/model-metrics?{ML_VIEW}")
        search = wait_for(d, lambda d: d.find_elements("css selector", "input[placeholder*='Search metric']"),
                          what="the metric chart search box")[0]
        wait_for(d, lambda d: d.find_elements("css selector", "path.point"), what="the first charts")
        d.save_screenshot(str(shots / "model-metrics.png"))
        search.send_keys("^loss$")     # a regex: the run's loss chart alone, not loss/<task> (charts render lazily)
        points = wait_for(d, lambda d: max(0, d.execute_script(JS_CHART_POINTS, f"{run.info.run_name} (loss)")),
                          what="points on the loss chart")
        assert points == len(client.get_metric_history(run_id, "loss"))
        d.save_screenshot(str(shots / "loss-chart.png"))

        # a generated image renders in the artifact viewer (opened as a user does: folder, then file)
        image = next(a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png"))
        d.get(f"{run_page}/artifacts?{ML_VIEW}")
        click(d, wait_for(d, lambda d: d.find_element("xpath", "//*[text()='images']"), what="the images folder"))
        click(d, wait_for(d, lambda d: d.find_element("xpath", f"//*[text()='{image.split('/')[-1]}']"),
                          what=f"{image} in the artifact tree"))
        size = wait_for(d, lambda d: d.execute_script(JS_IMAGE_SIZE, image), what=f"the image artifact {image}")
        assert size == list(client_image_size(client, run_id, image)), f"{image} rendered at {size}"
        d.save_screenshot(str(shots / "image-artifact.png"))

        # the registry lists the model; the tokenize experiment lists the run
        d.get(f"{url}/#/models?{ML_VIEW}")
        wait_for(d, lambda d: MODEL in d.find_element("tag name", "body").text, what="the registered model list")
        d.save_screenshot(str(shots / "models.png"))
        tok_run = client.get_run(tokenize_run_id)
        d.get(f"{url}/#/experiments/{tok_run.info.experiment_id}?{ML_VIEW}")
        wait_for(d, lambda d: tok_run.info.run_name in d.find_element("tag name", "body").text,
                 what="the tokenize run in its experiment")
        d.save_screenshot(str(shots / "tokenize-runs.png"))


# ---- default suite: a store written through common/tracking ------------------------------------------------

@pytest.fixture(scope="module")
def written_store(tmp_path_factory):
    from common import tracking
    from common.configlib import from_dict
    from common.tracking import lineage
    from model.tokenizers import TokenizerSet
    from pipelines.infer.pyfunc import OmniDiffusionModel
    from pipelines.train.config import TrainConfig
    from tests.helpers.export import digit_png, write_debug_export
    from tests.helpers.shardgen import write_shard_set
    from tokenize_jobs.config import TokenizeJobConfig

    root = tmp_path_factory.mktemp("dash")
    export = write_debug_export(root / "export")
    vocab = TokenizerSet.load(str(export / "tokenizers")).vocab
    shards = write_shard_set(root / "tok", vocab, {"t2i": 4, "asr": 4}, samples_per_shard=4)
    uri = f"sqlite:///{root}/mlflow.db"
    import json

    manifest = json.loads((shards / "manifest.json").read_text())
    tok = lineage.TokenizeRun(uri, TOKENIZE_EXP, job_id="20261206T000000Z-dash01", kind="messages",
                              input_uri="/corpus/train.jsonl", output=str(shards), config=TokenizeJobConfig(),
                              say=pytest.fail)
    tok.finish({"inputs_seen": 9, "inputs_tokenized": 8, "inputs_quarantined": 1, "samples_written": 8,
                "tokens": 800, "shards_written": 2, "bytes_written": 4096, "units_listed": 9, "units_skipped": 0,
                "wall_s": 2.0, "samples_per_s": 4.0, "samples_per_task": {"t2i": 4, "asr": 4},
                "tokens_per_task": {"t2i": 400, "asr": 400}, "quarantined_by_reason": {"corrupt_image": 1},
                "totals": {}}, lambda: manifest)
    manifest["runs"] = [{"run_id": "20261206T000000Z-dash01"}]

    cfg = from_dict(TrainConfig, {"mlflow": {"experiment": TRAIN_EXP, "registered_model": MODEL}})
    t = tracking.Tracker(uri, TRAIN_EXP, "dashboard", say=print)
    run_id = t.start(None, cfg, tags=lineage.provenance(cfg, source="omnidiff train"))
    t.log_shard_sets([(str(shards), manifest)], TOKENIZE_EXP)
    for step in range(1, 7):
        t.log_metrics({"loss": 8.0 / step, "lr": 1e-3}, step)
    digit = np.asarray(Image.open(io.BytesIO(digit_png(7))))                              # (8, 8) uint8
    t.log_image(np.kron(digit, np.ones((8, 8), dtype=np.uint8)), "samples/t2i_0", 6)      # (64, 64)
    t.log_model(str(export), MODEL, OmniDiffusionModel())
    t.end()
    return uri, run_id, tok.run_id, root


def test_dashboard_shows_the_run_its_loss_images_model_and_tokenize_run(written_store):
    from mlflow import MlflowClient

    uri, run_id, tok_run_id, root = written_store
    with mlflow_server(uri, root / "server-artifacts") as url:
        check_dashboard(url, MlflowClient(tracking_uri=uri), run_id, tok_run_id, SHOTS / "written")


# ---- slow: a real tokenize job and a short Ray Train run ---------------------------------------------------

@pytest.mark.slow
def test_dashboard_of_a_real_tokenize_and_training_run(tmp_path):
    import ray
    from mlflow import MlflowClient

    from common import configlib
    from pipelines.train import trainer
    from tests.helpers.export import demo_lines, write_jsonl, write_media
    from tokenize_jobs.config import TokenizeJobConfig
    from tokenize_jobs.run import run_job

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"
    write_media(tmp_path / "corpus")
    corpus = write_jsonl(tmp_path / "corpus" / "train.jsonl", demo_lines())
    run_dir = tmp_path / "run"
    uri = f"sqlite:///{run_dir}/mlflow.db"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        job = configlib.load(TokenizeJobConfig, None, ["ray.progress_bars=false", f"mlflow.tracking_uri={uri}",
                                                       f"mlflow.experiment={TOKENIZE_EXP}"])
        run_job(job, "messages", str(corpus), str(tmp_path / "tok"), print_summary=False)
        cfg = trainer.resolve_config(str(REPO / "configs" / "train" / "debug.yaml"), [str(tmp_path / "tok")],
                                     str(run_dir), ["run.name=dashboard", "scaling.num_workers=1",
                                                    "train.log_every=1", f"mlflow.experiment={TRAIN_EXP}",
                                                    f"mlflow.registered_model={MODEL}"]).with_steps(6)
        assert trainer.run(cfg).error is None
    finally:
        ray.shutdown()
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name(TRAIN_EXP).experiment_id])[0]
    (tok_run,) = client.search_runs([client.get_experiment_by_name(TOKENIZE_EXP).experiment_id])
    assert run.data.tags["omnidiff.tokenize_runs"] == tok_run.info.run_id
    with mlflow_server(uri, tmp_path / "server-artifacts") as url:
        check_dashboard(url, client, run.info.run_id, tok_run.info.run_id, SHOTS / "trained")
