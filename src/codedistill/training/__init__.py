"""Fine-tuning the target: the trainer (``trainer.py``: transformers' Trainer with BTP's
completion-only, importance-weighted loss), its settings and examples (``settings.py``,
light), and the training phase as an ``accelerate launch`` program (``launch.py``)."""
