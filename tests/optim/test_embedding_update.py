"""The embedding update as one component: it picks the update path, keeps the clip's one
switch, refuses combinations that cannot clip, takes a new optimizer as one class, and each
optimizer's row form computes exactly what FBGEMM's fused kernel computes."""

from types import MappingProxyType

import pytest
import torch
from optim import cowclip_reference

from ctrscale.choices import EmbeddingOptimizerName, ShardingChoice, UpdateSemantics
from ctrscale.config import ConfigError, load_config
from ctrscale.distributed.context import init_distributed
from ctrscale.optim.embedding.optimizers import OPTIMIZERS, EmbeddingOptimizer
from ctrscale.optim.embedding.update import EmbeddingUpdate, UpdatePath
from ctrscale.optim.scaling import resolve_hyperparameters, scaled
from ctrscale.train.step import build_trainer

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # only the device type is read


def update_for(*overrides: str, device=CPU, sharding=ShardingChoice.AUTO) -> EmbeddingUpdate:
    optim = load_config(None, list(overrides)).optim
    return EmbeddingUpdate(optim.embedding, optim.cowclip, sharding, device)


@pytest.mark.parametrize(
    ("optimizer", "semantics", "device", "path"),
    [
        ("sgd", "lazy", CPU, UpdatePath.FUSED),
        ("rowwise_adagrad", "lazy", CPU, UpdatePath.FUSED),
        ("adam", "lazy", CPU, UpdatePath.ROW),  # FBGEMM has no CPU Adam kernel
        ("adam", "lazy", CUDA, UpdatePath.FUSED),
        ("adam", "dense", CUDA, UpdatePath.ROW),  # FBGEMM updates only looked-up rows
        ("sgd", "dense", CPU, UpdatePath.ROW),
    ],
)
def test_the_path_follows_the_optimizer_the_device_and_the_semantics(
    optimizer, semantics, device, path
):
    update = update_for(
        f'optim.embedding.name="{optimizer}"',
        f'optim.embedding.semantics="{semantics}"',
        device=device,
    )
    assert update.path == path
    assert update.describe()["path"] == path.value


def test_the_clip_has_one_switch_that_the_scaling_rule_does_not_touch():
    config = load_config(None, ['optim.schedule.rule="none"'])
    assert config.optim.cowclip.mode == "paper"  # on by default, whatever the rule
    hp = resolve_hyperparameters(config, steps_per_epoch=10, total_steps=10)
    assert scaled(config.optim, hp).cowclip == config.optim.cowclip
    off = load_config(None, ['optim.schedule.rule="cowclip"', 'optim.cowclip.mode="off"'])
    hp = resolve_hyperparameters(off, steps_per_epoch=10, total_steps=10)
    assert scaled(off.optim, hp).cowclip.mode == "off"  # the cowclip rule does not switch it on


def test_fbgemm_rowwise_on_data_parallel_tables_is_an_error_naming_both_keys():
    with pytest.raises(ConfigError, match=r"optim.cowclip.mode=fbgemm_rowwise.*data_parallel"):
        update_for(
            'optim.cowclip.mode="fbgemm_rowwise"',
            "optim.cowclip.zeta=1e-5",
            'optim.embedding.name="rowwise_adagrad"',
            sharding=ShardingChoice.DATA_PARALLEL,
        )


def test_fbgemm_rowwise_under_dense_semantics_is_an_error_naming_both_keys():
    with pytest.raises(ConfigError, match=r"fbgemm_rowwise.*optim.embedding.semantics=dense"):
        update_for(
            'optim.cowclip.mode="fbgemm_rowwise"',
            "optim.cowclip.zeta=1e-5",
            'optim.embedding.name="rowwise_adagrad"',
            'optim.embedding.semantics="dense"',
        )


def final_tables(
    sharding: str, optimizer: str, monkeypatch, row_form: bool
) -> dict[str, torch.Tensor]:
    if row_form:  # no fused kernel: the update takes the optimizer's row form
        cls = OPTIMIZERS[EmbeddingOptimizerName(optimizer)]
        monkeypatch.setattr(cls, "fused_kernels", MappingProxyType({}))
    config = cowclip_reference.config_for(sharding, optimizer)
    ctx = init_distributed(config.distributed)
    sizes = dict.fromkeys(cowclip_reference.SPARSE_FEATURES, cowclip_reference.TABLE_ROWS)
    trainer = build_trainer(config, ctx, sizes, steps_per_epoch=3, total_steps=3)
    assert trainer.embedding.path == (UpdatePath.ROW if row_form else UpdatePath.FUSED)
    for step, batch in enumerate(cowclip_reference.global_batches()):
        trainer.step(batch, cowclip_reference.GLOBAL_BATCH, step)
    monkeypatch.undo()
    state = cowclip_reference.full_state(trainer.dmp)
    return {name: value for name, value in state.items() if "embedding_bags" in name}


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
@pytest.mark.parametrize("sharding", ["table_wise", "column_wise"])
def test_each_row_form_computes_what_fbgemms_fused_kernel_computes(
    single_process_group, monkeypatch, sharding, optimizer
):
    torch.manual_seed(0)
    fused = final_tables(sharding, optimizer, monkeypatch, row_form=False)
    torch.manual_seed(0)
    rows = final_tables(sharding, optimizer, monkeypatch, row_form=True)
    for name, expected in fused.items():
        scale = expected.abs().max().clamp_min(1e-12)
        assert ((rows[name] - expected).abs().max() / scale).item() <= 1e-5, name


class SignSgd(EmbeddingOptimizer):
    """A new optimizer for the test: w ← w − lr·sign(g), no fused kernel."""

    name = EmbeddingOptimizerName.SGD  # reuses a literal: the config accepts only known names

    @torch.no_grad()
    def apply(self, weight, state, rows, grad):
        weight[rows] -= self.lr * grad.sign()


@pytest.mark.parametrize("sharding", ["table_wise", "column_wise", "data_parallel"])
def test_a_new_embedding_optimizer_plugs_in_as_one_class(
    single_process_group, monkeypatch, sharding
):
    monkeypatch.setitem(OPTIMIZERS, EmbeddingOptimizerName.SGD, SignSgd)
    config = cowclip_reference.config_for(sharding, "sgd")
    ctx = init_distributed(config.distributed)
    sizes = dict.fromkeys(cowclip_reference.SPARSE_FEATURES, 40)  # ids 24..39 never looked up
    trainer = build_trainer(config, ctx, sizes, steps_per_epoch=1, total_steps=1)
    assert isinstance(trainer.embedding.optimizer, SignSgd)
    before = cowclip_reference.full_state(trainer.dmp)
    trainer.step(cowclip_reference.global_batches()[0], cowclip_reference.GLOBAL_BATCH, 0)
    after = cowclip_reference.full_state(trainer.dmp)
    lr = config.optim.embedding.lr
    for name in (n for n in before if n.endswith(".C1.weight") or n.endswith(".C7.weight")):
        change = (after[name] - before[name]).abs()
        assert torch.allclose(change[24:], torch.zeros_like(change[24:]))  # rows not looked up
        moved = change[:24][change[:24] > 0]
        assert moved.numel() > 0
        assert torch.allclose(moved, torch.full_like(moved, lr), rtol=1e-5)  # exactly ±lr


def test_dense_semantics_is_a_setting_saved_with_the_run():
    update = update_for('optim.embedding.semantics="dense"')
    assert update.semantics == UpdateSemantics.DENSE
    assert update.describe()["semantics"] == "dense"
