"""Linear probes on hidden states across checkpoints.

* `probes.features`  residual stream per layer at pre-answer decision points (nnsight, cached)
* `probes.targets`   labels: answer correctness, next step a verification, next token Chinese,
                     the latest assumption's role true
* `probes.fit`       cross-validated logistic-regression probes, control task, permutation
                     test, baselines, calibration; `save_probe` / `load_probe`
* `probes.compare`   layer x checkpoint heatmaps, transfer matrices, direction cosines
* `probes.plugin`    the "probes" analysis of the checkpoint harness
* `python -m probes run ...` (probes/cli.py)
"""
