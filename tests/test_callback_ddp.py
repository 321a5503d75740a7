"""A 2-process (gloo, CPU) Lightning run logs what one process logs on the same global batches."""

import csv

import pytest
import torch
import torch.distributed as dist

lightning = pytest.importorskip("lightning.pytorch")

import torch.nn.functional as F  # noqa: E402

from geomon._tiny_gpt import TinyGPT  # noqa: E402
from geomon.callback import GeomonCallback  # noqa: E402
from tests.test_callback import _loader  # noqa: E402


class TinyLitGPT(lightning.LightningModule):  # at module level, so that spawned processes can unpickle it
    def __init__(self):
        super().__init__()
        self.model = TinyGPT(vocab_size=19, d_model=32, n_layer=2, n_head=4, context=12)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return F.cross_entropy(self.model(x).flatten(0, 1), x.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class LitGPT(TinyLitGPT):
    def train_dataloader(self):
        """Rank r gets rows [16k + 8r, 16k + 8r + 8) of global batch k: the union is the one-process batch."""
        data = _loader().dataset
        world, rank = self.trainer.world_size, self.global_rank
        per_rank = 16 // world
        index = [16 * k + per_rank * rank + i for k in range(len(data) // 16) for i in range(per_rank)]
        return torch.utils.data.DataLoader(torch.utils.data.Subset(data, index), batch_size=per_rank)


def _logged(tmp_path, devices):
    torch.manual_seed(0)
    module = LitGPT()
    trainer = lightning.Trainer(
        max_steps=3,
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        logger=lightning.loggers.CSVLogger(tmp_path, name="run"),
        callbacks=[GeomonCallback(every_n_steps=1, embedding_modules=["model.ln_f"], strict=True)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module)
    with open(f"{tmp_path}/run/version_0/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {(int(row["step"]), key): float(value) for row in rows for key, value in row.items()
            if key.startswith("geomon/") and value}  # fmt: skip


@pytest.mark.slow
def test_two_process_run_logs_the_single_process_values(tmp_path):
    if not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    single = _logged(tmp_path / "one", devices=1)
    double = _logged(tmp_path / "two", devices=2)
    assert single.keys() == double.keys()
    assert {step for step, _ in single} == {0, 1, 2}
    assert any(key.startswith("geomon/rankme/") for _, key in single)
    for key, value in single.items():
        assert double[key] == pytest.approx(value, rel=1e-4), key
