"""GeomonCallback's probes in real Lightning fits: neural collapse of the head's input, tensors returned from
training_step, per-head files, resume, torch.compile policy, and no perturbation with every probe on."""

import csv

import pytest
import torch
import torch.nn.functional as F

lightning = pytest.importorskip("lightning.pytorch")

from geomon._tiny_gpt import TinyGPT  # noqa: E402
from geomon.callback import GeomonCallback, default_labels  # noqa: E402
from geomon.functional import neural_collapse, rankme  # noqa: E402

VOCAB, CONTEXT, D = 19, 12, 32


class LitGPT(lightning.LightningModule):
    """Next-token prediction on (inputs, targets) batches; returns its final features under "geomon"."""

    def __init__(self, lr=1e-2):
        super().__init__()
        self.lr = lr
        self.model = TinyGPT(vocab_size=VOCAB, d_model=D, n_layer=2, n_head=4, context=CONTEXT)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        self.log("train_loss", loss)
        return {"loss": loss, "geomon": {"token_embeddings": self.model.tok(x)}}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def _loader(n=48):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (n, CONTEXT + 1), generator=g)
    data = torch.utils.data.TensorDataset(x[:, :-1], x[:, 1:])
    return torch.utils.data.DataLoader(data, batch_size=8)


def _trainer(tmp_path, callbacks, max_steps=6, logger=True, **kwargs):
    if logger is True:
        logger = lightning.loggers.CSVLogger(tmp_path, name="run")
    checkpointing = any(isinstance(c, lightning.callbacks.ModelCheckpoint) for c in callbacks)
    return lightning.Trainer(max_steps=max_steps, logger=logger, callbacks=callbacks,
                             enable_checkpointing=checkpointing,
                             enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                             accelerator="cpu", deterministic=True, **kwargs)  # fmt: skip


def _rows(trainer):
    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        return list(csv.DictReader(handle))


def _rows_of(directory):
    (path,) = directory.glob("run/version_*/metrics.csv")
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_neural_collapse_of_the_head_input_equals_the_reference_on_captured_features(tmp_path):
    captured = {}

    class Capturing(LitGPT):
        def on_train_batch_start(self, batch, batch_idx):  # the test's own, independent capture of the features
            self._handle = self.model.head.register_forward_hook(
                lambda m, i, o: captured.update({self.global_step: (i[0].detach().clone(), batch[1].clone())})
            )

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self._handle.remove()

    torch.manual_seed(0)
    module = Capturing()
    callback = GeomonCallback(every_n_steps=2, window_rows=8 * CONTEXT, strict=True)
    trainer = _trainer(tmp_path, [callback])
    trainer.fit(module, _loader())
    assert callback.monitor.head == "model.head"
    logged = {int(r["step"]): r for r in _rows(trainer) if r.get("geomon/nc/nc1/model.head.input")}
    assert sorted(logged) == [0, 2, 4]
    for step, row in logged.items():
        features, labels = captured[step]
        # the head's weight moved after the measured forward: compare the statistics that do not use it
        expected = neural_collapse(features.reshape(-1, D), labels.reshape(-1), num_classes=VOCAB)
        for stat in ("nc1", "nc2_equinorm", "nc2_equiangular", "cdnv"):
            assert float(row[f"geomon/nc/{stat}/model.head.input"]) == pytest.approx(float(expected[stat]), rel=1e-4)
        assert float(row["geomon/rankme/model.head.input"]) == pytest.approx(
            float(rankme(features.reshape(-1, D))), rel=1e-5
        )
    assert row["geomon/nc/nc4/model.head.input"] not in ("", "nan")  # later windows have the previous means


def test_tensors_returned_from_training_step_feed_rankme(tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, [GeomonCallback(every_n_steps=1, window_rows=8 * CONTEXT, strict=True)])
    trainer.fit(LitGPT(), _loader())
    values = [
        float(r["geomon/rankme/token_embeddings"]) for r in _rows(trainer) if r.get("geomon/rankme/token_embeddings")
    ]
    assert len(values) == 6 and all(1 < v <= D + 1e-3 for v in values)


def test_per_head_values_are_written_beside_the_csv_log(tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, [GeomonCallback(every_n_steps=3, strict=True)])
    trainer.fit(LitGPT(), _loader())
    with open(trainer.logger.log_dir + "/geomon_heads.csv") as handle:
        heads = list(csv.DictReader(handle))
    key = "geomon/attention/entropy_normalized/model.blocks.1.attn"
    for step in (0, 3):
        per_head = [float(r["value"]) for r in heads if r["key"] == key and int(r["step"]) == step]
        assert len(per_head) == 4 and all(0 < v <= 1 for v in per_head)
        (scalar,) = [float(r[key]) for r in _rows(trainer) if r.get(key) and int(r["step"]) == step]
        assert scalar == pytest.approx(sum(per_head) / 4, rel=1e-6)  # every head has the same number of rows


def test_default_labels_follow_the_batch_conventions():
    x, y = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    assert torch.equal(default_labels((x, y)), y)
    assert default_labels((x, torch.randn(2))) is None  # regression targets are not classes
    assert default_labels({"input_ids": x}) is None
    shifted = default_labels({"labels": torch.tensor([[1, 2, 3]])})
    assert shifted.tolist() == [[2, 3, -100]]


def test_a_resumed_fit_logs_what_an_uninterrupted_fit_logs(tmp_path):
    def fit(directory, steps, ckpt_path=None, checkpoint=False):
        torch.manual_seed(0)
        callbacks = [GeomonCallback(every_n_steps=2, strict=True)]
        if checkpoint:
            callbacks.append(lightning.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3,
                                                                 save_top_k=-1))  # fmt: skip
        trainer = _trainer(directory, callbacks, max_steps=steps)
        trainer.fit(LitGPT(), _loader(24), ckpt_path=ckpt_path)  # 3 steps per epoch: resume at an epoch boundary
        return {
            (int(r["step"]), k): float(v) for r in _rows(trainer) for k, v in r.items() if k.startswith("geomon/") and v
        }

    whole = fit(tmp_path / "whole", 9)
    fit(tmp_path / "first", 3, checkpoint=True)
    (checkpoint,) = (tmp_path / "ckpt").glob("*.ckpt")
    resumed = fit(tmp_path / "resumed", 9, ckpt_path=str(checkpoint))
    later = {key: value for key, value in whole.items() if key[0] > 3}
    assert later and set(later) == set(resumed)
    for key, value in later.items():
        assert resumed[key] == pytest.approx(value, rel=1e-5, nan_ok=True), key


def test_a_compiled_module_is_refused_at_setup_with_the_reason(tmp_path):
    module = torch.compile(LitGPT(), backend="eager")
    trainer = _trainer(tmp_path, [GeomonCallback()])
    with pytest.raises(ValueError, match=r"torch.compile.*attention=False"):
        trainer.fit(module, _loader())


def test_a_compiled_module_is_watched_through_returned_tensors(tmp_path):
    torch.manual_seed(0)
    module = torch.compile(LitGPT(), backend="eager")
    callback = GeomonCallback(every_n_steps=2, attention=False, head=None, window_rows=8 * CONTEXT, strict=True)
    trainer = _trainer(tmp_path, [callback])
    trainer.fit(module, _loader())
    values = [r for r in _rows(trainer) if r.get("geomon/rankme/token_embeddings")]
    assert [int(r["step"]) for r in values] == [0, 2, 4]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_every_probe_on_every_step_leaves_training_bit_identical(tmp_path, precision):
    def fit(callbacks, directory):
        torch.manual_seed(0)
        module = LitGPT()
        trainer = _trainer(directory, callbacks, precision=precision)
        trainer.fit(module, _loader())
        return module, [float(r["train_loss"]) for r in _rows(trainer) if r.get("train_loss")]

    every = GeomonCallback(every_n_steps=1, embedding_modules=["model.blocks.*"], spectral_modules=["model.*"],
                           window_rows=8, strict=True)  # fmt: skip
    plain, plain_losses = fit([], tmp_path / "plain")
    watched, watched_losses = fit([every], tmp_path / "watched")
    assert plain_losses == watched_losses and len(plain_losses) == 6
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b)
    keys = {k for row in _rows_of(tmp_path / "watched") for k, v in row.items() if v}
    assert {
        "geomon/nc/nc1/model.head.input",
        "geomon/spectral/sigma/model.head",
        "geomon/rankme/model.blocks.1",
    } <= keys
