#!/usr/bin/env python
"""Step 2 of the plan: BTP fine-tuning (a thin wrapper over `codedistill btp`).

    python experiments/step2_btp_finetune_experiment.py --source-model StarCoder2-15B \
        --target-model StarCoder2-3B --mode finetune --dataset mbpp --max-problems 100 \
        --num-beams 5 --n-iterations 3 --sampling-method power --sampling-alpha 1.5 \
        --use-lora --output-dir ./results/starcoder_experiment
    python experiments/step2_btp_finetune_experiment.py --config configs/btp_tiny.yaml
"""

from codedistill.btp.cli import main

if __name__ == "__main__":
    main()
