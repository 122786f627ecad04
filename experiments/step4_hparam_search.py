#!/usr/bin/env python
"""Step 4 of the plan: hyperparameter search with Optuna (a thin wrapper over `codedistill sweep`).

    python experiments/step4_hparam_search.py configs/demo.yaml --trials 4 --output-dir results/sweep_demo
    # several workers (same machine: the journal file; several machines: a database URL)
    python experiments/step4_hparam_search.py configs/btp_starcoder2.yaml --trials 40 \
        --storage postgresql://user@db/optuna --output-dir /shared/sweep_starcoder2
"""

from codedistill.experiments.cli import main_sweep

if __name__ == "__main__":
    main_sweep()
