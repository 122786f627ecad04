"""Experiments as configs: one run, a matrix of runs, ablations (step 3), a hyperparameter
search (step 4) and the GRPO baseline; each resumable and sharing generations.

* :mod:`run`    - ``codedistill run CONFIG.yaml [--set key=value ...]``
* :mod:`matrix` - ``codedistill matrix CONFIG... --output-dir OUT``
* :mod:`ablate` - ``codedistill ablate CONFIG.yaml --variants ... --output-dir OUT``
* :mod:`sweep`  - ``codedistill sweep CONFIG.yaml --trials N --output-dir OUT``
* :mod:`grpo`   - TRL GRPO on the same problems, reward = sandbox pass rate
"""
