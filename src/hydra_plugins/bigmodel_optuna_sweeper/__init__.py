"""bigmodel's Hydra sweeper for current Optuna: resumable studies, failed trials, pruning.

Hydra finds it in the `hydra_plugins` namespace package; select it with
`defaults: [override /hydra/sweeper: bigmodel_optuna]` (configs/hparams_search/*.yaml do).
"""
