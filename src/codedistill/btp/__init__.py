"""BTP (step 2): Beam search -> Testing -> Prioritized experience replay -> fine-tune.

Chen et al. 2024, arXiv 2410.12236. Entry points:

* ``codedistill.btp.cli.btp_command`` - the typer command (``codedistill btp``);
* ``codedistill.btp.loop.run_btp(BTPConfig)`` - the resumable loop, read top to bottom;
* ``plan`` (inputs, splits, overlap guard), ``models`` (the generator cache), ``runner``
  (one experiment with a training step: BTP's or GRPO's), ``phases/`` (generate, replay,
  finetune, evaluate), and the parts: ``p2value``, ``replay``, ``samplers``.
"""

from codedistill.btp.p2value import DEFAULT_P2_ALPHA, normalize_program, p2value
from codedistill.btp.replay import ReplayBuffer, ReplayEntry
from codedistill.btp.samplers import SAMPLING_METHODS, draw, sampling_probs

__all__ = [
    "DEFAULT_P2_ALPHA",
    "SAMPLING_METHODS",
    "ReplayBuffer",
    "ReplayEntry",
    "draw",
    "normalize_program",
    "p2value",
    "sampling_probs",
]
