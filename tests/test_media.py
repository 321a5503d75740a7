"""Per-step media (geomon._media): drawn only for loggers that take images, once for all of them, without touching
the user's matplotlib backend or pyplot's figure registry; read back from W&B's offline run file and TensorBoard."""

import csv
import io
import time

import pytest
import torch

pytest.importorskip("matplotlib")
lightning = pytest.importorskip("lightning.pytorch")

from geomon import _media  # noqa: E402

HEATMAP = "geomon/media/entropy_heatmap"
SPECTRA = "geomon/media/spectra"
STEPS = (0, 2, 4)


def _heads_and_spectra(step):
    g = torch.Generator().manual_seed(step)
    heads = {f"{_media.ENTROPY_NORMALIZED}model.blocks.{i}.attn": torch.rand(4, generator=g) for i in range(3)}
    heads["geomon/attention/max_logit/model.blocks.0.attn"] = 10 * torch.rand(4, generator=g)
    spectra = {"geomon/rankme/head.input": torch.rand(32, generator=g).sort(descending=True).values}
    return heads, spectra


def _log(loggers):
    for step in STEPS:
        _media.log_media(loggers, step, *_heads_and_spectra(step))


@pytest.fixture
def wandb_logger(tmp_path, monkeypatch):
    """A W&B offline logger; its run is finished even when the test fails, so no later test attaches to it."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    yield lightning.loggers.WandbLogger(project="geomon-test", save_dir=str(tmp_path), offline=True)
    if wandb.run is not None:
        wandb.run.finish()


def _tensorboard_logger(tmp_path):
    pytest.importorskip("tensorboard")
    return lightning.loggers.TensorBoardLogger(tmp_path / "tb", name="run")


def _wandb_image_rows(logger, tmp_path):
    from tests.wandb_records import history

    logger.experiment.finish()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 30
    while True:  # the W&B service may still be flushing the run file when finish() returns on a loaded machine
        rows = [row for row in history(run_file) if f"{HEATMAP}/_type" in row]
        if len(rows) >= len(STEPS) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


@pytest.fixture
def svg_backend():
    """A user's non-Agg backend (svg: non-interactive, works headless), restored afterwards."""
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    yield "svg"
    matplotlib.use(before)


def test_media_leave_the_users_backend_and_pyplot_alone(tmp_path, monkeypatch, svg_backend, wandb_logger):
    # regression: heatmap_figure called matplotlib.use("Agg") (a notebook lost its inline backend) and drew on pyplot
    import matplotlib
    import matplotlib.pyplot as plt

    loggers = [wandb_logger, _tensorboard_logger(tmp_path)]
    pyplot_figures = []
    figure = plt.figure
    monkeypatch.setattr(plt, "figure", lambda *a, **k: pyplot_figures.append(1) or figure(*a, **k))
    fignums = plt.get_fignums()
    _log(loggers)
    assert matplotlib.get_backend() == svg_backend
    assert not pyplot_figures
    assert plt.get_fignums() == fignums == []
    assert len(_wandb_image_rows(loggers[0], tmp_path)) == len(STEPS)  # the images were made, on svg's watch


def test_csv_logger_alone_gets_the_per_head_file_and_no_figure_is_drawn(tmp_path, monkeypatch):
    # regression: both figures were drawn (~40 ms a logging step) and thrown away when no logger took images
    from matplotlib.figure import Figure

    made = []
    init = Figure.__init__
    monkeypatch.setattr(Figure, "__init__", lambda self, *a, **k: made.append(1) or init(self, *a, **k))
    logger = lightning.loggers.CSVLogger(tmp_path, name="run")
    _log([logger])
    assert not made
    with open(f"{logger.log_dir}/{_media.HEADS_FILE}") as handle:
        rows = list(csv.DictReader(handle))
    assert {int(row["step"]) for row in rows} == set(STEPS)
    assert len(rows) == len(STEPS) * 4 * 4  # 4 keys x 4 heads per step
    # a logger that takes images does draw: the spy sees the figures
    _media.log_media([logger, _tensorboard_logger(tmp_path)], 6, *_heads_and_spectra(6))
    assert len(made) == 2


def test_wandb_and_tensorboard_get_both_images_from_one_drawing(tmp_path, monkeypatch, wandb_logger):
    import numpy as np

    drawn = []

    def counted(name):
        draw = getattr(_media, name)
        return lambda *args: drawn.append(name) or draw(*args)

    for name in ("heatmap_figure", "spectrum_figure"):
        monkeypatch.setattr(_media, name, counted(name))
    tensorboard_logger = _tensorboard_logger(tmp_path)
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files_dir = wandb_logger.experiment.dir
    _log([wandb_logger, tensorboard_logger])
    assert drawn == ["heatmap_figure", "spectrum_figure"] * len(STEPS)  # once a step, shared by both loggers

    rows = _wandb_image_rows(wandb_logger, tmp_path)
    assert [row["trainer/global_step"] for row in rows] == list(STEPS)
    assert all(row[f"{HEATMAP}/_type"] == row[f"{SPECTRA}/_type"] == "image-file" for row in rows)
    heatmap = Image.open(f"{files_dir}/{rows[-1][f'{HEATMAP}/path']}")
    assert (heatmap.width, heatmap.height) == (rows[-1][f"{HEATMAP}/width"], rows[-1][f"{HEATMAP}/height"])

    tensorboard_logger.experiment.flush()
    events = EventAccumulator(tensorboard_logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    for tag in (HEATMAP, SPECTRA):
        images = events.Images(tag)
        assert [image.step for image in images] == list(STEPS)
        pixels = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
        assert pixels.shape[:2] == (images[-1].height, images[-1].width)
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # a drawing, not a blank canvas
    # the same rendering went to both: TensorBoard's heatmap has the W&B heatmap's size
    last = events.Images(HEATMAP)[-1]
    assert (last.width, last.height) == (heatmap.width, heatmap.height)


def test_missing_matplotlib_is_a_geomon_warning(monkeypatch):
    # the callback's warnings share one category (docs/faq.md: filter them with GeomonWarning)
    from geomon import GeomonWarning

    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    heads, spectra = _heads_and_spectra(0)
    with pytest.warns(GeomonWarning, match="geomon: matplotlib is not installed"):
        assert _media._images(heads, spectra, 0) == {}
