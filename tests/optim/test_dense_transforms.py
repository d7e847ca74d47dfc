"""The dense gradient transforms inside the trainer equal a literal re-implementation on an
unsharded copy of the model: GSNR (k micro-batch gradients, scaled by their signal-to-noise
ratio), EXTRAP-SGD (the gradient at w − γ·g(w) applied at w) and its past-gradient variant.
Embedding tables are neither extrapolated nor scaled; they take the step's own gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from optim import cowclip_reference as ref

from ctrscale.config import load_config
from ctrscale.distributed.context import init_distributed
from ctrscale.models import build_model
from ctrscale.optim.dense.gsnr import gsnr_gradient
from ctrscale.train.discard import kept_rows
from ctrscale.train.step import build_trainer

EMBEDDING_LR, DENSE_LR, K = 0.5, 0.1, 4


def trainer_and_reference(transform: str, *extra: str):
    config = load_config(
        None,
        [
            'distributed.device="cpu"',
            f"data.batch_size={ref.GLOBAL_BATCH}",
            "model.embedding_dim=8",
            "model.dnn=[16]",
            'optim.embedding.name="sgd"',
            f"optim.embedding.lr={EMBEDDING_LR}",
            "optim.embedding.l2=0.0",
            'optim.cowclip.mode="off"',
            'optim.dense.name="sgd"',
            "optim.dense.momentum=0.0",
            f"optim.dense.lr={DENSE_LR}",
            'optim.schedule.rule="none"',
            f'optim.dense.transform="{transform}"',
            f"optim.dense.gsnr_samples={K}",
            *extra,
        ],
    )
    ctx = init_distributed(config.distributed)
    torch.manual_seed(0)
    sizes = dict.fromkeys(ref.SPARSE_FEATURES, ref.TABLE_ROWS)
    trainer = build_trainer(config, ctx, sizes, steps_per_epoch=3, total_steps=3)
    model = build_model(config.model, sizes, embedding_device=torch.device("cpu"))
    model.load_state_dict(ref.full_state(trainer.dmp))
    return trainer, model


def split(model):
    tables = {id(b.weight) for b in model.embedding_bag_collection.embedding_bags.values()}
    dense = [p for p in model.parameters() if id(p) not in tables]
    embedding = [p for p in model.parameters() if id(p) in tables]
    return dense, embedding


def losses(model, batch):
    logits = model(batch.dense_features, batch.sparse_features)
    return F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")


@torch.no_grad()
def sgd(params, grads, lr):
    for param, grad in zip(params, grads, strict=True):
        param -= lr * grad


def gsnr_step(model, batch, past):
    dense, embedding = split(model)
    per_sample = losses(model, batch)
    samples = [torch.autograd.grad(c.mean(), dense, retain_graph=True) for c in per_sample.chunk(K)]
    stacked = [torch.stack([g[i] for g in samples]) for i in range(len(dense))]
    scaled = [gsnr_gradient(s.mean(0), s.var(0, unbiased=False)) for s in stacked]
    embedding_grads = torch.autograd.grad(per_sample.mean(), embedding)
    sgd(embedding, embedding_grads, EMBEDDING_LR)
    sgd(dense, scaled, DENSE_LR)
    return past


def extrapolation_step(model, batch, past):
    """Local (past=None): direction = the gradient at w_t; past: the previous step's g'."""
    dense, embedding = split(model)
    direction = past or torch.autograd.grad(losses(model, batch).mean(), dense)
    saved = [p.detach().clone() for p in dense]
    sgd(dense, direction, DENSE_LR)  # γ = η: to w'
    grads = torch.autograd.grad(losses(model, batch).mean(), [*dense, *embedding])
    dense_grads, embedding_grads = grads[: len(dense)], grads[len(dense) :]
    with torch.no_grad():
        for param, value in zip(dense, saved, strict=True):
            param.copy_(value)  # back to w_t
    sgd(embedding, embedding_grads, EMBEDDING_LR)
    sgd(dense, dense_grads, DENSE_LR)
    return None if past is None else list(dense_grads)


@pytest.mark.parametrize(
    ("transform", "literal", "past"),
    [
        ("gsnr", gsnr_step, None),
        ("extrapolation", extrapolation_step, None),
        ("past_extrapolation", extrapolation_step, "zeros"),
    ],
)
def test_the_trainer_applies_the_transform_literally(
    single_process_group, transform, literal, past
):
    trainer, model = trainer_and_reference(transform)
    if past == "zeros":  # step 1 of the past variant does not move
        past = [torch.zeros_like(p) for p in split(model)[0]]
    plain_trainer, _ = trainer_and_reference("none")
    for step, batch in enumerate(ref.global_batches()):
        trainer.step(batch, ref.GLOBAL_BATCH, step)
        plain_trainer.step(batch, ref.GLOBAL_BATCH, step)
        past = literal(model, batch, past)
    ours, expected = ref.full_state(trainer.dmp), model.state_dict()
    plain = ref.full_state(plain_trainer.dmp)
    for name, value in expected.items():
        scale = value.abs().max().clamp_min(1e-12)
        assert ((ours[name] - value).abs().max() / scale).item() <= 1e-5, name
    # The transform changed the run: it is not a no-op on these batches.
    dense_names = [n for n in ours if "embedding_bags" not in n]
    assert any(not torch.allclose(ours[n], plain[n], rtol=1e-4) for n in dense_names)


def test_discarding_small_losses_trains_on_the_rest_of_the_batch(single_process_group):
    """q = 0.25: the gradient of the mean loss over the 192 rows with the largest losses."""
    trainer, model = trainer_and_reference("none", "train.discard_fraction=0.25")
    for step, batch in enumerate(ref.global_batches()):
        trainer.step(batch, ref.GLOBAL_BATCH, step)
        per_sample = losses(model, batch)
        kept = kept_rows(per_sample.detach(), 0.25)
        assert int(kept.sum()) == ref.GLOBAL_BATCH - ref.GLOBAL_BATCH // 4
        dense, embedding = split(model)
        grads = torch.autograd.grad(per_sample[kept].mean(), [*dense, *embedding])
        sgd(dense, grads[: len(dense)], DENSE_LR)
        sgd(embedding, grads[len(dense) :], EMBEDDING_LR)
    ours, expected = ref.full_state(trainer.dmp), model.state_dict()
    for name, value in expected.items():
        scale = value.abs().max().clamp_min(1e-12)
        assert ((ours[name] - value).abs().max() / scale).item() <= 1e-5, name


def test_the_global_gradient_norm_is_clipped_before_the_step():
    """ "Train longer" clips the gradient's global norm (its code: at 5) before the optimizer."""
    from ctrscale.config import DenseOptimConfig, ScheduleConfig
    from ctrscale.optim.dense.update import DenseUpdate

    layer = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in layer.parameters()]
    config = DenseOptimConfig(name="sgd", lr=1.0, momentum=0.0, clip_norm=5.0)
    update = DenseUpdate(
        dict(layer.named_parameters()), config, ScheduleConfig(), warmup_steps=0, total_steps=1
    )
    for param in layer.parameters():
        param.grad = torch.full_like(param, 100.0)
    update.step(0)
    after = list(layer.parameters())
    moved = torch.cat([(b - a.detach()).flatten() for b, a in zip(before, after, strict=True)])
    assert moved.norm().item() == pytest.approx(5.0, rel=1e-5)
