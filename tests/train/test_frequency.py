"""Evaluation by id frequency: the training split's id counts (shared by the ranks), each eval
row's rarest id, its bucket, and the metrics of every bucket's rows."""

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from ctrscale.data.loader import ParquetBatchLoader
from ctrscale.data.schema import SPARSE_FEATURES
from ctrscale.errors import CtrscaleError
from ctrscale.metrics import exact_auc, logloss_from_logits
from ctrscale.train.evaluate import evaluate
from ctrscale.train.frequency import IdFrequency


def loaders(dataset):
    common = dict(batch_size=4096, shuffle=False, holdout_fraction=0.1, drop_last=False)
    train = ParquetBatchLoader(dataset, split="train", **common)
    holdout = ParquetBatchLoader(dataset, split="holdout", **common)
    return train, holdout


def test_counts_are_the_training_splits_and_ranks_share_the_work(tiny_dataset):
    train, holdout = loaders(tiny_dataset)
    counts = train.id_counts()
    c3 = np.zeros(train.table_sizes["C3"], dtype=np.int64)
    rows = 0
    for batch in train:
        ids = batch.sparse_features.values().view(len(SPARSE_FEATURES), -1)[2].numpy()
        c3 += np.bincount(ids, minlength=c3.size)
        rows += ids.size
    start = sum(train.table_sizes[k] for k in ("C1", "C2"))
    assert np.array_equal(counts[start : start + c3.size], c3)
    assert rows == train.num_rows and counts.sum() == rows * len(SPARSE_FEATURES)
    shares = [train.id_counts(rank, 3) for rank in range(3)]
    assert np.array_equal(sum(shares), counts)
    assert holdout.id_counts().sum() == holdout.num_rows * len(SPARSE_FEATURES)


def features(ids: list[list[int]]) -> KeyedJaggedTensor:
    """ids[row][feature] for every one of the 26 features."""
    values = torch.tensor(ids).T.flatten()
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(SPARSE_FEATURES),
        values=values,
        lengths=torch.ones_like(values, dtype=torch.int32),
    )


def test_a_row_falls_in_the_bucket_of_its_rarest_id():
    sizes = dict.fromkeys(SPARSE_FEATURES, 3)
    counts = torch.full((26 * 3,), 1000)
    counts[0:3] = torch.tensor([2, 50, 1000])  # C1's ids 0, 1, 2
    frequency = IdFrequency(counts, sizes, [5, 100])
    assert frequency.labels == ["<5", "5–99", "≥100"]
    rows = [[0] + [2] * 25, [1] + [2] * 25, [2] * 26]
    assert frequency.rarest(features(rows)).tolist() == [2, 50, 1000]
    assert frequency.buckets(features(rows)).tolist() == [0, 1, 2]
    with pytest.raises(CtrscaleError, match="increasing positive"):
        IdFrequency(counts, sizes, [100, 5])


class Logits(torch.nn.Module):
    """A fixed scoring: the logit is C1's id (so the buckets get different AUCs)."""

    def forward(self, dense, sparse):
        return sparse.values().view(len(SPARSE_FEATURES), -1)[0].float()


def test_each_bucket_is_scored_on_its_own_rows(tiny_dataset):
    train, holdout = loaders(tiny_dataset)
    frequency = IdFrequency(torch.from_numpy(train.id_counts()), train.table_sizes, [5, 100])
    result = evaluate(Logits(), holdout, torch.device("cpu"), frequency)
    logits, labels, buckets = [], [], []
    for batch in holdout:
        logits.append(Logits()(None, batch.sparse_features).numpy())
        labels.append(batch.labels.numpy())
        buckets.append(frequency.buckets(batch.sparse_features).numpy())
    logits, labels, buckets = map(np.concatenate, (logits, labels, buckets))
    assert sum(b.rows for b in result.buckets.values()) == result.rows == labels.size
    for index, label in enumerate(frequency.labels):
        rows = buckets == index
        bucket = result.buckets[label]
        assert bucket.rows == rows.sum()
        assert bucket.logloss == pytest.approx(logloss_from_logits(logits[rows], labels[rows]))
        assert bucket.auc == pytest.approx(exact_auc(logits[rows], labels[rows]))
    assert len({round(b.auc, 6) for b in result.buckets.values()}) > 1
