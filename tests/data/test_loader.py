"""The streaming loader on small hand-made datasets: several files, uneven row groups.

Dense feature I1 of every row holds a unique row number, so tests can tell exactly which
rows a batch holds.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.datasets.utils import Batch

from ctrscale.config import DataConfig
from ctrscale.data import schema
from ctrscale.data.loader import (
    BatchWithExtras,
    ParquetBatchLoader,
    resolve_parquet_files,
)
from ctrscale.data.loader.decode import WindowDecoder
from ctrscale.errors import CtrscaleError, DataError

TABLE_SIZES = {name: 5 + i for i, name in enumerate(schema.SPARSE_FEATURES)}
# file → row group sizes; 101 rows in all.
LAYOUT = {
    "day=0/part-00000.parquet": [10, 10, 10, 7],
    "day=0/part-00001.parquet": [23],
    "day=1/part-00000.parquet": [16, 16, 9],
}
NUM_ROWS = 101


def make_table(first_row: int, num_rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed + first_row)
    row_numbers = np.arange(first_row, first_row + num_rows)
    columns: dict[str, np.ndarray] = {
        schema.LABEL: rng.integers(0, 2, num_rows).astype(np.int8),
        "I1": row_numbers.astype(np.float32),
    }
    for name in schema.DENSE_FEATURES[1:]:
        columns[name] = rng.random(num_rows, dtype=np.float32)
    for name in schema.SPARSE_FEATURES:
        columns[name] = rng.integers(0, TABLE_SIZES[name], num_rows)
    table = pa.Table.from_pydict(columns, schema=schema.PARQUET_SCHEMA)
    p_true = pa.array(row_numbers.astype(np.float32) / 1000)
    return table.append_column(schema.TRUE_PROBABILITY, p_true)


def write_file(path: Path, table: pa.Table, row_groups: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, table.schema) as writer:
        start = 0
        for size in row_groups:
            writer.write_table(table.slice(start, size), row_group_size=size)
            start += size


def write_metadata(root: Path, sizes: dict[str, int] = TABLE_SIZES) -> None:
    (root / schema.METADATA_FILE).write_text(json.dumps({"table_sizes": sizes}))


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    first_row = 0
    for relative, row_groups in LAYOUT.items():
        write_file(root / relative, make_table(first_row, sum(row_groups)), row_groups)
        first_row += sum(row_groups)
    write_metadata(root)
    return root


def loader(path: Path | str, batch_size: int, **kwargs) -> ParquetBatchLoader:
    kwargs.setdefault("shuffle_buffer_rows", 25)
    return ParquetBatchLoader([str(path)], batch_size, **kwargs)


def row_numbers(batch: Batch) -> list[int]:
    return batch.dense_features[:, 0].long().tolist()


def epoch_rows(ld: ParquetBatchLoader) -> list[list[int]]:
    return [row_numbers(b) for b in ld]


def flat(batches: list[list[int]]) -> list[int]:
    return [row for rows in batches for row in rows]


# ---- layout -----------------------------------------------------------------------------


def test_batches_have_torchrec_criteo_layout(dataset: Path) -> None:
    batch = next(iter(loader(dataset, 16, shuffle=False)))
    kjt = batch.sparse_features
    assert batch.dense_features.dtype == torch.float32
    assert batch.dense_features.shape == (16, 13)
    assert batch.labels.dtype == torch.float32 and batch.labels.shape == (16,)
    assert kjt.keys() == list(schema.SPARSE_FEATURES)
    assert kjt.values().dtype == torch.int64 and kjt.lengths().dtype == torch.int32
    assert kjt.stride() == 16 and bool((kjt.lengths() == 1).all())
    expected = pq.read_table(dataset / "day=0/part-00000.parquet").slice(0, 16)
    for name in ("C1", "C26"):
        assert kjt[name].values().tolist() == expected.column(name).to_pylist()
    assert batch.labels.tolist() == expected.column("label").to_pylist()


def test_file_resolution_sorts_naturally_and_skips_hidden_entries(dataset: Path) -> None:
    write_file(dataset / "day=10/part-00000.parquet", make_table(500, 3), [3])
    write_file(dataset / "day=2/part-00000.parquet", make_table(600, 3), [3])
    for junk in ("day=0/.tmp-part-9.parquet", "day=0/_part.parquet", "_tmp/part-0.parquet"):
        write_file(dataset / junk, make_table(900, 3), [3])
    (dataset / "day=0/_SUCCESS").write_text("")
    files = resolve_parquet_files([dataset])
    relative = [f.relative_to(dataset.resolve()).as_posix() for f in files]
    assert relative == [
        *list(LAYOUT)[:2],
        "day=1/part-00000.parquet",
        "day=2/part-00000.parquet",
        "day=10/part-00000.parquet",
    ]
    assert resolve_parquet_files([f"{dataset}/day=*/*.parquet"]) == files
    assert resolve_parquet_files([dataset / "day=1", dataset / "day=1/part-00000.parquet"]) == [
        files[2]
    ]


def test_missing_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        resolve_parquet_files([tmp_path / "absent"])
    with pytest.raises(DataError, match="matches no files"):
        resolve_parquet_files([f"{tmp_path}/*.parquet"])


def test_day_directory_finds_metadata_in_its_parent(dataset: Path) -> None:
    ld = loader(dataset / "day=1", 8)
    assert ld.table_sizes == TABLE_SIZES
    assert ld.num_rows == 41


def test_missing_metadata_is_a_data_error(dataset: Path) -> None:
    (dataset / schema.METADATA_FILE).unlink()
    with pytest.raises(DataError, match="metadata"):
        loader(dataset, 8)
    assert loader(dataset, 8, table_sizes=TABLE_SIZES).num_rows == NUM_ROWS


# ---- ranks, batches, coverage -----------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_every_row_is_used_exactly_once_across_ranks(
    dataset: Path, world_size: int, shuffle: bool
) -> None:
    seen: list[int] = []
    for rank in range(world_size):
        ld = loader(dataset, 12, rank=rank, world_size=world_size, drop_last=False, shuffle=shuffle)
        for rows in epoch_rows(ld):
            seen += rows
    assert sorted(seen) == list(range(NUM_ROWS))


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_batches_concatenate_to_the_single_process_batch(
    dataset: Path, world_size: int, drop_last: bool
) -> None:
    def batches(rank: int, size: int) -> list[Batch]:
        kwargs = dict(rank=rank, world_size=size, drop_last=drop_last, seed=7)
        return list(loader(dataset, 24, **kwargs))

    single = batches(0, 1)
    per_rank = [batches(rank, world_size) for rank in range(world_size)]
    assert {len(b) for b in per_rank} == {len(single)}
    for index, whole in enumerate(single):
        parts = [per_rank[rank][index] for rank in range(world_size)]
        assert torch.equal(torch.cat([p.dense_features for p in parts]), whole.dense_features)
        assert torch.equal(torch.cat([p.labels for p in parts]), whole.labels)
        for name in ("C1", "C13", "C26"):
            ids = torch.cat([p.sparse_features[name].values() for p in parts])
            assert torch.equal(ids, whole.sparse_features[name].values())


def test_every_rank_yields_num_batches_even_when_its_last_slice_is_empty(dataset: Path) -> None:
    # 101 rows, global batch 50, 2 ranks: the last global batch has 1 row → rank 0 gets none.
    ranks = [loader(dataset, 50, rank=r, world_size=2, drop_last=False) for r in range(2)]
    outputs = [list(ld) for ld in ranks]
    assert [len(o) for o in outputs] == [3, 3] and ranks[0].num_batches() == 3
    empty, single = outputs[0][-1], outputs[1][-1]
    assert empty.dense_features.shape == (0, 13) and empty.labels.shape == (0,)
    assert empty.sparse_features.stride() == 0 and empty.sparse_features.values().numel() == 0
    assert empty.sparse_features.keys() == list(schema.SPARSE_FEATURES)
    assert single.labels.shape == (1,)
    assert [len(b.labels) for b in outputs[0][:2]] == [25, 25]


def test_drop_last_drops_only_the_final_partial_batch(dataset: Path) -> None:
    kept = loader(dataset, 24, drop_last=False, shuffle=False)
    dropped = loader(dataset, 24, drop_last=True, shuffle=False)
    assert (kept.num_batches(), dropped.num_batches()) == (5, 4)
    kept_rows, dropped_rows = epoch_rows(kept), epoch_rows(dropped)
    assert [len(r) for r in kept_rows] == [24, 24, 24, 24, 5]
    assert kept_rows[:4] == dropped_rows
    assert flat(kept_rows) == list(range(NUM_ROWS))  # unshuffled = file order


def test_batch_size_must_split_evenly_over_ranks(dataset: Path) -> None:
    with pytest.raises(CtrscaleError, match="not divisible by world_size=3"):
        loader(dataset, 16, world_size=3)


def test_num_batches_comes_from_parquet_metadata_alone(dataset: Path, monkeypatch) -> None:
    ld = loader(dataset, 8, split="train", holdout_fraction=0.2, drop_last=False)

    def no_reads(*args, **kwargs):
        raise AssertionError("num_batches() must not decode row groups")

    monkeypatch.setattr(WindowDecoder, "decode", no_reads)
    assert ld.num_batches() == -(-ld.num_rows // 8) and 60 < ld.num_rows < 101


# ---- shuffling and the cursor -----------------------------------------------------------


def test_shuffle_is_reproducible_per_seed_and_epoch(dataset: Path) -> None:
    first = epoch_rows(loader(dataset, 10, seed=1))
    assert epoch_rows(loader(dataset, 10, seed=1)) == first
    assert epoch_rows(loader(dataset, 10, seed=2)) != first
    ld = loader(dataset, 10, seed=1)
    epoch0, epoch1 = epoch_rows(ld), epoch_rows(ld)  # iterating moves on to the next epoch
    assert epoch0 == first and epoch1 != first
    ld.set_epoch(0)
    assert epoch_rows(ld) == first
    # The shuffle mixes rows across row groups and files, not just row groups.
    assert sorted(flat(first)) != flat(first)


def test_resume_from_a_cursor_yields_the_remaining_batches(dataset: Path, monkeypatch) -> None:
    full = epoch_rows(loader(dataset, 8, seed=3))
    ld = loader(dataset, 8, seed=3)
    iterator = iter(ld)
    done = [row_numbers(next(iterator)) for _ in range(7)]
    state = ld.state_dict()
    assert state == {"epoch": 0, "batches_done": 7, "seed": 3, "batch_size": 8, "shares": 1}
    del iterator

    reads: list[int] = []
    original = WindowDecoder.decode
    monkeypatch.setattr(
        WindowDecoder,
        "decode",
        lambda self, window: reads.append(window.rows) or original(self, window),
    )
    resumed = loader(dataset, 8, seed=99)
    resumed.load_state_dict(state)
    assert done + epoch_rows(resumed) == full
    assert sum(reads) < NUM_ROWS  # windows before the cursor were skipped, not decoded
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["batches_done"] == 0


def test_resume_works_per_rank(dataset: Path) -> None:
    for rank in range(2):
        full = epoch_rows(loader(dataset, 8, rank=rank, world_size=2, seed=5))
        ld = loader(dataset, 8, rank=rank, world_size=2, seed=5)
        ld.load_state_dict({"epoch": 0, "batches_done": 4, "seed": 5})
        assert epoch_rows(ld) == full[4:]


def test_load_state_dict_rejects_another_batch_size(dataset: Path) -> None:
    ld = loader(dataset, 8)
    with pytest.raises(CtrscaleError, match="batch_size=16"):
        ld.load_state_dict({"epoch": 0, "batches_done": 1, "seed": 0, "batch_size": 16})


# ---- sharded decoding: each rank decodes its own share of the stream ---------------------


def sharded(dataset: Path, batch_size: int, world_size: int, **kwargs) -> list[ParquetBatchLoader]:
    return [
        loader(dataset, batch_size, rank=r, world_size=world_size, sharded_decode=True, **kwargs)
        for r in range(world_size)
    ]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_sharded_ranks_use_every_row_once_in_global_batches_of_the_same_size(
    dataset: Path, world_size: int, shuffle: bool
) -> None:
    single = epoch_rows(loader(dataset, 12, drop_last=False, shuffle=shuffle, seed=2))
    ranks = [
        epoch_rows(ld)
        for ld in sharded(dataset, 12, world_size, drop_last=False, shuffle=shuffle, seed=2)
    ]
    assert sorted(flat([flat(r) for r in ranks])) == list(range(NUM_ROWS))
    # Batch i of every rank has the size of its slice of global batch i, as when replicated.
    for index, whole in enumerate(single):
        sizes = [len(ranks[r][index]) for r in range(world_size)]
        assert sum(sizes) == len(whole)
        assert sizes == [
            len(whole) * (r + 1) // world_size - len(whole) * r // world_size
            for r in range(world_size)
        ]
    # Rank r's rows are a contiguous share of the one-process stream, rank after rank.
    assert flat([flat(r) for r in ranks]) == flat(single)
    interleaved = [
        row for i in range(len(single)) for r in range(world_size) for row in ranks[r][i]
    ]
    assert interleaved != flat(single)  # so global batches hold other rows than replicated


def test_sharded_drop_last_drops_the_streams_tail_as_replicated_does(dataset: Path) -> None:
    replicated = flat(epoch_rows(loader(dataset, 24, drop_last=True, seed=4)))
    ranks = [flat(epoch_rows(ld)) for ld in sharded(dataset, 24, 2, drop_last=True, seed=4)]
    assert [len(r) for r in ranks] == [48, 48]
    assert sorted(ranks[0] + ranks[1]) == sorted(replicated)


def test_sharded_ranks_decode_their_share_not_the_whole_stream(dataset: Path, monkeypatch) -> None:
    decoded: list[int] = []
    original = WindowDecoder.decode
    monkeypatch.setattr(
        WindowDecoder,
        "decode",
        lambda self, window: decoded.append(window.rows) or original(self, window),
    )
    for ld in sharded(dataset, 12, 3, drop_last=False, shuffle=False):
        epoch_rows(ld)
    # Unshuffled, a window is one row group (≤ 23 rows): each of the 2 boundaries between
    # shares is decoded by both ranks at most; replicated, 3 ranks would decode 303 rows.
    assert NUM_ROWS <= sum(decoded) <= NUM_ROWS + 2 * 23
    for ld in [
        loader(dataset, 12, rank=r, world_size=3, drop_last=False, shuffle=False) for r in range(3)
    ]:
        epoch_rows(ld)
    assert sum(decoded) > 3 * NUM_ROWS


def test_sharded_ranks_resume_from_their_cursor(dataset: Path) -> None:
    for rank, ld in enumerate(sharded(dataset, 8, 2, seed=5)):
        full = epoch_rows(ld)
        resumed = sharded(dataset, 8, 2, seed=5)[rank]
        resumed.load_state_dict({"epoch": 0, "batches_done": 4, "seed": 5, "shares": 2})
        assert epoch_rows(resumed) == full[4:]


def test_a_mid_epoch_cursor_needs_the_same_shares(dataset: Path) -> None:
    two = sharded(dataset, 8, 2, seed=5)[0]
    iterator = iter(two)
    next(iterator)
    state = two.state_dict()
    del iterator
    assert state["shares"] == 2
    for other in (loader(dataset, 8, rank=0, world_size=2), sharded(dataset, 8, 4)[0]):
        with pytest.raises(CtrscaleError, match=r"2 share.*cuts it into [14]"):
            other.load_state_dict(state)
    epoch_end = {**state, "epoch": 1, "batches_done": 0}
    replicated = loader(dataset, 8, rank=0, world_size=2)
    replicated.load_state_dict(epoch_end)  # an epoch boundary is the same in every layout
    assert replicated.state_dict()["epoch"] == 1
    with pytest.raises(CtrscaleError, match="not a prefix of the stream"):
        loader(dataset, 4).continue_from(state)


def test_sharded_decoding_is_chosen_by_data_decode() -> None:
    assert not DataConfig().sharded_decode("cpu", 4)
    assert DataConfig().sharded_decode("cuda", 2)
    assert not DataConfig().sharded_decode("cuda", 1)
    assert not DataConfig(shard_count=2).sharded_decode("cuda", 2)  # SWAP's replica shards
    assert DataConfig(decode="sharded").sharded_decode("cpu", 2)
    assert not DataConfig(decode="replicated").sharded_decode("cuda", 8)
    with pytest.raises(ValueError, match=r"data\.decode='sharded' cannot be combined"):
        DataConfig(decode="sharded", shard_count=2)


# ---- holdout split ----------------------------------------------------------------------


def split_rows(dataset: Path, split: str, **kwargs) -> list[int]:
    ld = loader(dataset, 6, split=split, holdout_fraction=0.3, holdout_seed=4, **kwargs)
    return sorted(flat(epoch_rows(ld)))


def test_holdout_split_is_disjoint_covering_and_stable(dataset: Path) -> None:
    train = split_rows(dataset, "train", drop_last=False)
    holdout = split_rows(dataset, "holdout", drop_last=False)
    assert not set(train) & set(holdout)
    assert sorted(train + holdout) == list(range(NUM_ROWS))
    assert 15 < len(holdout) < 45
    across_ranks = flat(
        [split_rows(dataset, "holdout", rank=r, world_size=3, drop_last=False) for r in range(3)]
    )
    assert sorted(across_ranks) == holdout
    assert split_rows(dataset, "holdout", shuffle=False, drop_last=False) == holdout
    other_seed = loader(dataset, 6, split="holdout", holdout_fraction=0.3, holdout_seed=5)
    assert sorted(flat(epoch_rows(other_seed))) != holdout


def test_holdout_is_the_same_whichever_path_names_the_files(dataset: Path) -> None:
    """The hash uses the path relative to the dataset root, not the path as given."""

    def holdout(path: Path | str) -> list[int]:
        kwargs = dict(split="holdout", holdout_fraction=0.3, shuffle=False, drop_last=False)
        return flat(epoch_rows(loader(path, 6, **kwargs)))

    day1 = [row for row in holdout(dataset) if row >= 60]
    assert day1 and holdout(dataset / "day=1") == day1
    assert holdout(f"{dataset}/day=1/*.parquet") == day1


def test_from_config_splits_train_and_eval(dataset: Path) -> None:
    cfg = DataConfig(train=[str(dataset)], batch_size=8, eval_batch_size=9, holdout_fraction=0.25)
    train = ParquetBatchLoader.from_config(cfg, "train", seed=0)
    evaluation = ParquetBatchLoader.from_config(cfg, "eval", seed=0)
    assert (train.split, evaluation.split) == ("train", "holdout")
    assert not evaluation.shuffle and not evaluation.drop_last and evaluation.batch_size == 9
    assert train.num_rows + evaluation.num_rows == NUM_ROWS
    with pytest.raises(CtrscaleError, match="no eval data"):
        ParquetBatchLoader.from_config(
            cfg.model_copy(update={"holdout_fraction": 0.0}), "eval", seed=0
        )


# ---- extras -----------------------------------------------------------------------------


def test_extra_columns_ride_along_and_survive_to(dataset: Path) -> None:
    ld = loader(dataset, 10, extra_columns=[schema.TRUE_PROBABILITY], world_size=2, rank=1)
    batch = next(iter(ld))
    assert isinstance(batch, BatchWithExtras)
    p_true = batch.extras[schema.TRUE_PROBABILITY]
    assert torch.allclose(p_true, batch.dense_features[:, 0] / 1000)
    moved = batch.to(torch.device("cpu"))
    assert isinstance(moved, BatchWithExtras)
    assert torch.equal(moved.extras[schema.TRUE_PROBABILITY], p_true)
    assert type(next(iter(loader(dataset, 10)))) is Batch


def test_a_missing_extra_column_names_the_file(dataset: Path) -> None:
    with pytest.raises(DataError, match="extra column 'q'"):
        loader(dataset, 10, extra_columns=["q"])


# ---- validation -------------------------------------------------------------------------


def corrupt(table: pa.Table, column: str, row: int, value) -> pa.Table:
    values = table.column(column).to_numpy().copy()
    values[row] = value
    index = table.schema.get_field_index(column)
    return table.set_column(index, table.schema.field(index), pa.array(values))


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("C3", -1, "id -1 at row 4 is outside \\[0, 7\\)"),
        ("C26", 30, "id 30 at row 4 is outside \\[0, 30\\)"),
        ("I5", np.nan, "value nan at row 4 is not finite"),
        ("I13", np.inf, "value inf at row 4 is not finite"),
        ("label", 2, "label 2 at row 4 is not 0 or 1"),
    ],
)
def test_bad_values_name_file_row_group_and_column(
    dataset: Path, column: str, value, message: str
) -> None:
    path = dataset / "day=1/part-00000.parquet"
    table = pq.read_table(path)
    write_file(path, corrupt(table, column, 16 + 4, value), LAYOUT["day=1/part-00000.parquet"])
    with pytest.raises(DataError, match=message) as error:
        list(loader(dataset, 8, prefetch_batches=2))
    assert f"{path}, row group 1, column '{column}'" in str(error.value)


def test_schema_errors_name_file_row_groups_and_column(dataset: Path) -> None:
    path = dataset / "day=0/part-00001.parquet"
    table = pq.read_table(path)
    write_file(path, table.drop_columns(["C7"]), [23])
    with pytest.raises(DataError, match=f"{path}, all 1 row groups: column 'C7' is missing"):
        loader(dataset, 8)
    wrong = table.set_column(
        table.schema.get_field_index("I2"), "I2", table.column("I2").cast(pa.float64())
    )
    write_file(path, wrong, [23])
    with pytest.raises(DataError, match="column 'I2' has type double, expected float"):
        loader(dataset, 8)


def test_validation_covers_only_rows_of_the_split(dataset: Path) -> None:
    """A bad row is reported with its row in the row group even when a split filters rows."""
    path = dataset / "day=0/part-00001.parquet"
    table = corrupt(pq.read_table(path), "C1", 22, 99)
    write_file(path, table, [23])
    errors = []
    for split in ("train", "holdout"):
        try:
            list(loader(dataset, 4, split=split, holdout_fraction=0.5))
        except DataError as exc:
            errors.append(str(exc))
    assert len(errors) == 1 and "row group 0, column 'C1': id 99 at row 22" in errors[0]


# ---- prefetch ---------------------------------------------------------------------------


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ctrscale-prefetch"]


def test_abandoned_iteration_stops_its_thread(dataset: Path) -> None:
    ld = loader(dataset, 4, prefetch_batches=1)
    for _ in ld:
        break
    assert not prefetch_threads()
    iterator = iter(ld)
    next(iterator)
    second = iter(ld)  # a new iteration ends the previous one
    assert next(second) is not None
    with pytest.raises(StopIteration):
        next(iterator)
    del second
    assert not prefetch_threads()


def test_prefetch_and_synchronous_reads_agree(dataset: Path) -> None:
    assert epoch_rows(loader(dataset, 8, prefetch_batches=0)) == epoch_rows(
        loader(dataset, 8, prefetch_batches=3)
    )


def test_batches_for_a_gpu_are_pinned_in_the_prefetch_thread(dataset: Path, monkeypatch) -> None:
    """On CUDA the trainer asks for page-locked batches (for non-blocking copies); pinning
    happens off the training thread. A CPU-only torch cannot pin, so `pin_memory` is observed
    here: it runs in the prefetch thread, once per batch, and the batches are unchanged."""
    threads = []

    def pin(batch):
        threads.append(threading.current_thread().name)
        return batch

    monkeypatch.setattr(Batch, "pin_memory", pin)
    monkeypatch.setattr(BatchWithExtras, "pin_memory", pin)
    plain = epoch_rows(loader(dataset, 8, prefetch_batches=2))
    pinned_loader = loader(dataset, 8, prefetch_batches=2)
    pinned_loader.pin_memory = True
    assert epoch_rows(pinned_loader) == plain
    assert threads == ["ctrscale-prefetch"] * len(plain)


def test_each_ranks_rows_of_a_batch_are_known_without_a_collective(dataset: Path) -> None:
    """`rows_of` gives, on the host, what each rank's slice holds — also for the short last
    batch when it is kept — so a step's global row count needs no all-reduce."""
    loaders = [loader(dataset, 8, rank=r, world_size=2, drop_last=False) for r in range(2)]
    sizes = [[b.labels.numel() for b in ld] for ld in loaders]
    assert sizes[0][-1] != sizes[1][-1]  # a short, odd last batch: the ranks' shares differ
    for index in range(loaders[0].num_batches()):
        for rank in range(2):
            assert loaders[0].rows_of(index, range(rank, rank + 1)) == sizes[rank][index]
        assert loaders[0].rows_of(index, range(2)) == sizes[0][index] + sizes[1][index]


def test_has_column_reports_optional_columns(dataset: Path) -> None:
    ld = loader(dataset, 8)
    assert ld.has_column(schema.TRUE_PROBABILITY) and not ld.has_column("q")


def test_a_cursor_resumes_under_another_world_size(dataset: Path) -> None:
    single = loader(dataset, 8, seed=2)
    full = epoch_rows(single)
    state = {"epoch": 0, "batches_done": 5, "seed": 2, "batch_size": 8}
    ranks = [loader(dataset, 8, rank=r, world_size=2, seed=2) for r in range(2)]
    for ld in ranks:
        ld.load_state_dict(state)
    rest = [epoch_rows(ld) for ld in ranks]
    assert [a + b for a, b in zip(*rest, strict=True)] == full[5:]
