#!/usr/bin/env python
"""Step 1 of the plan: baseline pass@k of one model (a thin wrapper over `codedistill baseline`).

    python experiments/step1_baseline_experiment.py --model-name StarCoder2-15B --dataset mbpp --num-samples 10
    python experiments/step1_baseline_experiment.py --model-name tiny-target --dataset synth
"""

import sys

from codedistill.cli import app

if __name__ == "__main__":
    app(["baseline", *sys.argv[1:]], prog_name="step1_baseline_experiment.py")
