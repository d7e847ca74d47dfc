"""The large-batch settings as a user sets them: the scaling rule's resolved values are what
the run uses and saves; LAMB/LARS and FBGEMM's CowClip variant train; what cannot be exact is
refused."""

import json
import math

import pytest
import torch
from runner import run_ctrscale, tiny_overrides, train_args
from torchrec import KeyedJaggedTensor
from torchrec.datasets.utils import Batch

from ctrscale.config import load_config
from ctrscale.data.schema import SPARSE_FEATURES
from ctrscale.distributed.context import init_distributed
from ctrscale.errors import CtrscaleError
from ctrscale.train.step import build_trainer


def test_cowclip_rule_resolves_and_saves_the_papers_scaling(tiny_dataset, tmp_path):
    overrides = tiny_overrides(
        tiny_dataset,
        **{
            "train.max_steps": 2,
            "optim.schedule.rule": "cowclip",
            "optim.schedule.base_batch_size": 512,  # batch 2048 → s = 4
            "optim.embedding.lr": 0.05,
            "optim.embedding.l2": 1e-5,
            "optim.dense.lr": 0.003,
        },
    )
    run_ctrscale(train_args(tmp_path / "run", overrides))
    saved = json.loads((tmp_path / "run" / "hyperparameters.json").read_text())
    assert saved["rule"] == "cowclip" and saved["scale"] == 4
    assert saved["embedding_lr"] == pytest.approx(0.05)  # fixed
    assert saved["embedding_l2"] == pytest.approx(1e-5)  # lazy updates: L2 not × s
    assert saved["dense_lr"] == pytest.approx(0.003 * math.sqrt(4))  # × √s
    assert saved["dense_warmup_steps"] == 10  # one epoch: 21,600 train rows / 2,048
    assert saved["embedding"]["cowclip"]["mode"] == "paper"  # the clip's own switch, default on
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    # Warm-up: the 2nd step (index 1) runs at 2/10 of the scaled dense LR.
    assert first["lr"]["dense"] == pytest.approx(0.003 * 2 * 2 / 10)


@pytest.mark.parametrize("dense", ["lamb", "lars"])
def test_layerwise_dense_optimizers_train(tiny_dataset, tmp_path, dense):
    overrides = tiny_overrides(
        tiny_dataset, **{"train.max_steps": 3, "optim.dense.name": dense, "optim.dense.lr": 0.01}
    )
    run_ctrscale(train_args(tmp_path / dense, overrides))
    result = json.loads((tmp_path / dense / "metrics.json").read_text())
    assert math.isfinite(result["logloss"]) and 0.0 < result["auc"] < 1.0


def test_fbgemm_cowclip_variant_runs_with_rowwise_adagrad_only(tiny_dataset, tmp_path):
    variant = {
        "train.max_steps": 2,
        "optim.cowclip.mode": "fbgemm_rowwise",
        "optim.cowclip.zeta": 1e-5,
        "optim.schedule.rule": "none",
    }
    refused = run_ctrscale(
        train_args(tmp_path / "refused", tiny_overrides(tiny_dataset, **variant)), check=False
    )
    assert refused.returncode != 0
    assert "needs optim.embedding.name=rowwise_adagrad" in refused.stderr
    rowwise = {**variant, "optim.embedding.name": "rowwise_adagrad"}
    run_ctrscale(train_args(tmp_path / "ok", tiny_overrides(tiny_dataset, **rowwise)))
    assert json.loads((tmp_path / "ok" / "metrics.json").read_text())["steps"] == 2


def test_multi_valued_features_are_refused_not_approximated(single_process_group):
    config = load_config(
        None,
        ['distributed.device="cpu"', "data.batch_size=4", "model.dnn=[8]",
         'optim.cowclip.mode="paper"', 'optim.schedule.rule="none"'],
    )  # fmt: skip
    ctx = init_distributed(config.distributed)
    sizes = dict.fromkeys(SPARSE_FEATURES, 10)
    trainer = build_trainer(config, ctx, sizes, steps_per_epoch=1, total_steps=1)
    lengths = torch.ones(len(SPARSE_FEATURES) * 4, dtype=torch.int32)
    lengths[0] = 2  # sample 0 of C1 looks up two ids
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(SPARSE_FEATURES), values=torch.zeros(int(lengths.sum()), dtype=torch.int64),
        lengths=lengths,
    )  # fmt: skip
    batch = Batch(torch.rand(4, 13), kjt, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(CtrscaleError, match="single-valued"):
        trainer.step(batch, 4, 0)
