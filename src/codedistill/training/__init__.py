"""Fine-tuning at scale: the training phase as an `accelerate launch` program (launch.py).

The trainer itself is codedistill.btp.trainer (transformers Trainer + BTP's loss)."""
