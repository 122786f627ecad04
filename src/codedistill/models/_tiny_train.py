"""Training internals of the tiny models: a locally trained byte-level BPE tokenizer and
a short CPU training loop (loss on the completion only). Used by ``codedistill.models.tiny``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from codedistill.data.problem import Problem

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
DONE = "[DONE]"

# A little general Python/English text so that MBPP-like prompts get sensible merges too.
_EXTRA_CORPUS = (
    "def main():\n    return None\n",
    "for i in range(len(arr)):\n    if arr[i] > max_val:\n        max_val = arr[i]\n",
    "while n > 0:\n    n = n // 10\n    count += 1\nreturn count\n",
    "import math\nimport re\nfrom collections import Counter\n",
    "Write a python function to find the maximum element in a list of tuples.",
    "Write a function to check if the given string is a palindrome or not.",
    "class Solution:\n    def __init__(self):\n        self.items = []\n",
    "try:\n    x = int(s)\nexcept ValueError:\n    x = 0\n",
    "result = sorted(set(nums), key=lambda x: (-x[1], x[0]))\n",
    "assert func([1, 2, 3]) == (1, 2, 3)\nassert func('abc') == True\n",
)


def completion_text(problem: Problem) -> str:
    """What a model is trained to write after the prompt: the program, then ``[DONE]``."""
    return problem.reference_completion() + DONE


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, wrapped for ``AutoTokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) + list(_EXTRA_CORPUS), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def encode_examples(
    tokenizer: PreTrainedTokenizerFast, problems: Sequence[Problem], max_len: int
) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per problem: prompt ids + completion ids + eos.

    Prompt and completion are encoded separately, as at generation time (the prompt alone
    is encoded, then continued). Over-long examples keep their tail (left truncation).
    """
    out: list[tuple[list[int], int]] = []
    for p in problems:
        pid = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        cid = tokenizer(completion_text(p), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = pid + cid
        cut = max(0, len(ids) - max_len)
        out.append((ids[cut:], max(0, len(pid) - cut)))
    return out


def train_lm(
    model: PreTrainedModel,
    examples: list[tuple[list[int], int]],
    pad_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    weight_decay: float,
    seed: int,
    progress: bool = True,
    desc: str = "train",
    prompt_loss_weight: float = 0.0,
) -> dict[str, Any]:
    """AdamW with linear warm-up and cosine decay.

    Cross-entropy on the completion tokens, plus ``prompt_loss_weight`` times the
    cross-entropy on the prompt tokens (0 = completion only). A little prompt loss makes
    copying (function names and constants from the asserts) emerge much sooner: the three
    asserts repeat the function name, a free copy-task signal.
    """
    import torch
    import torch.nn.functional as F

    g = random.Random(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    order: list[int] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, leave=True, dynamic_ncols=True)
    tokens = 0
    for step in range(steps):
        batch = []
        for _ in range(batch_size):
            if not order:
                order = list(range(len(examples)))
                g.shuffle(order)
            batch.append(examples[order.pop()])
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        weights = torch.zeros((len(batch), width), dtype=torch.float32)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, plen) in enumerate(batch):
            t = torch.tensor(ids, dtype=torch.long)
            input_ids[i, : len(ids)] = t
            weights[i, :plen] = prompt_loss_weight
            weights[i, plen : len(ids)] = 1.0
            attn[i, : len(ids)] = 1
            tokens += len(ids)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1]
        w = weights[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none")
        loss = (ce * w.reshape(-1)).sum() / w.sum().clamp_min(1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach().item())
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    tail = losses[-20:] or [float("nan")]
    return {
        "steps": steps,
        "batch_size": batch_size,
        "tokens_seen": tokens,
        "final_loss": sum(tail) / len(tail),
        "first_loss": losses[0] if losses else float("nan"),
        "train_seconds": round(time.perf_counter() - t0, 2),
    }
