"""The methods a sweep compares, by name: `RULE[+MODIFIER…]`.

RULE is a scaling rule (`optim.schedule.rule`); `cowclip` runs with the clip on, the others
with it off, so each name is the method it says. Each MODIFIER is a named set of config
overrides laid over it: another dense optimizer (`+lamb`, `+novograd`, …), the official
code's dense embedding update (`+dense`), a dense gradient transform (`+gsnr`, `+extrap`,
`+extrap_past`), … — `MODIFIERS` lists them all, and a new method needs only an entry there.
E.g. `cowclip+lamb`, `none+sngm`, `cowclip+dense`, `cowclip+extrap`.

A preset may define its own modifiers, or redefine built-in ones, in `[bench.modifiers]`
(name → overrides): a sweep that calibrated an optimizer's base LR at the base batch states it
there (`lars = ['optim.dense.name="lars"', "optim.dense.lr=8.0"]`), so the run directories and
the report carry the value every batch size used.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctrscale.choices import (
    ClipMode,
    DenseOptimizerName,
    GradientTransform,
    ScalingRule,
    UpdateSemantics,
    names,
)
from ctrscale.errors import CtrscaleError

MODIFIERS: dict[str, tuple[str, ...]] = {
    **{
        name.value: (f'optim.dense.name="{name}"',)
        for name in DenseOptimizerName
        if name != DenseOptimizerName.ADAM
    },
    "adam": ('optim.dense.name="adam"',),
    "dense": (f'optim.embedding.semantics="{UpdateSemantics.DENSE}"',),
    "gsnr": (f'optim.dense.transform="{GradientTransform.GSNR}"',),
    "extrap": (f'optim.dense.transform="{GradientTransform.EXTRAPOLATION}"',),
    "extrap_past": (f'optim.dense.transform="{GradientTransform.PAST_EXTRAPOLATION}"',),
    # "Train longer": ghost batch norm over the base batch (set `model.ghost_batch_size`) and
    # the gradient-norm clip of its code; small-loss discarding (Gao & Zhong: q = 0.1).
    "ghostbn": ("model.batch_norm=true",),
    "clip5": ("optim.dense.clip_norm=5.0",),
    "discard": ("train.discard_fraction=0.1",),
    # Ablations of the cowclip rule's ingredients.
    "l2xs": ("optim.schedule.scale_l2=true",),  # L2 × s whatever the semantics
    "l2fixed": ("optim.schedule.scale_l2=false",),
    "noclip": (f'optim.cowclip.mode="{ClipMode.OFF}"',),
    "warmup_run": ("optim.schedule.warmup_fraction=1.0",),  # warm up over the whole run
    "nowarmup": ("optim.schedule.warmup_steps=0",),
}


@dataclass(frozen=True)
class RuleVariant:
    name: str
    scaling_rule: ScalingRule
    settings: tuple[str, ...] = ()  # the modifiers' overrides, in order

    def overrides(self) -> list[str]:
        clip = ClipMode.PAPER if self.scaling_rule == ScalingRule.COWCLIP else ClipMode.OFF
        return [
            f'optim.schedule.rule="{self.scaling_rule}"',
            f'optim.cowclip.mode="{clip}"',
            *self.settings,
        ]


def parse_rule(name: str, preset_modifiers: dict[str, list[str]] | None = None) -> RuleVariant:
    """`RULE[+MODIFIER…]`, with the preset's `[bench.modifiers]` over the built-in ones."""
    known = {**MODIFIERS, **{k: tuple(v) for k, v in (preset_modifiers or {}).items()}}
    rule, *modifiers = name.split("+")
    unknown = [m for m in modifiers if m not in known]
    if rule not in tuple(ScalingRule) or unknown:
        raise CtrscaleError(
            f"unknown rule {name!r}: a rule is one of {names(ScalingRule)}, optionally "
            f"followed by +MODIFIER with MODIFIER one of {', '.join(known)} "
            "(e.g. cowclip+lamb, cowclip+dense)"
        )
    settings = tuple(setting for m in modifiers for setting in known[m])
    return RuleVariant(name, ScalingRule(rule), settings)
