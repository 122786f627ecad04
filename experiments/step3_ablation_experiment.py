#!/usr/bin/env python
"""Step 3 of the plan: ablations of BTP's components (a thin wrapper over `codedistill ablate`).

    python experiments/step3_ablation_experiment.py configs/demo.yaml --output-dir results/ablation_demo
    python experiments/step3_ablation_experiment.py configs/btp_starcoder2.yaml \
        --variants testing_off,sampling_uniform,rft,grpo --output-dir results/ablation_starcoder2
"""

from codedistill.experiments.cli import main_ablate

if __name__ == "__main__":
    main_ablate()
