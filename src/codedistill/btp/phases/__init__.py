"""The phases of a BTP iteration, one module each: generate (beams or samples + testing),
replay (the buffer, P2Value and the prioritized draw), finetune, evaluate."""
