"""The dense update: every non-embedding parameter's optimizer and LR schedule.

`update.DenseUpdate` (the component the trainer steps), `optimizers.build_dense_optimizer`
(the one factory `optim.dense.name` selects from: torch's Adam/AdamW/SGD and ctrscale's LAMB,
LARS, LAMBC here, NovoGrad, SNGM, CBLR/MCLR in their modules), `base` (what the hand-written
optimizers share), and gradient transforms in front of any of them: `gsnr` (VRGD) and
`extragradient` (EXTRAP-SGD).
"""
