"""The embedding update: one component that owns how embedding rows change at each step.

`update.EmbeddingUpdate` (the component: update path, FBGEMM fused settings, hooks, per-row
state and its checkpoint layout, LR reporting), `optimizers` (each embedding optimizer as one
class: row form and FBGEMM fused form), `gradients` (per-id L2 and CowClip on the global batch),
`layout` (where each table's rows live inside TorchRec's sharded modules).
"""
