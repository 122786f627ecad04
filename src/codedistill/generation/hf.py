"""Hugging Face transformers backend: batched sampling and beam search with exact log-probs.

Log-probabilities are always the *model's* raw ones (temperature 1, no top-p, no length
penalty): ``log softmax(logits)`` at each kept token.
- Sampling: taken from the raw logits that ``generate`` returns (``output_logits``), so
  no extra forward pass.
- Beam search: its scores carry beam bookkeeping and the length penalty, so the kept
  tokens of every returned beam are rescored with one teacher-forced forward pass.
Both are checked in the tests against an unbatched teacher-forced recomputation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from codedistill.generation.base import Candidate
from codedistill.generation.postprocess import cut_at_stop
from codedistill.models.loading import default_device, ensure_pad_token, load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)


def load_model_and_tokenizer(
    path: str, device: str | None = None, dtype: str = "auto", trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """``from_pretrained`` exactly as for a hub model; ``device_map='auto'`` on GPUs; left padding."""
    device = device or default_device()
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = load_causal_lm(path, device, dtype, spread=True, trust_remote_code=trust_remote_code)
    model.eval()
    tok.padding_side = "left"
    return model, tok


#: prompt tokens kept as context when decoding a continuation (enough for any tokenizer's
#: word-boundary marker; one would do for SentencePiece's leading "▁")
CONTEXT_TOKENS = 4


def decode_continuation(tokenizer: Any, ids: Sequence[int], context_ids: Sequence[int] = ()) -> str:
    """The text ``ids`` add after ``context_ids`` (the prompt's last tokens).

    Decoding generated ids on their own is wrong for SentencePiece tokenizers: their
    decoder strips the leading space of the first token (``▁▁▁▁return`` alone decodes to
    three spaces of indentation, after a newline to four). Decoding the prompt's last
    tokens together with the continuation and dropping the prompt's text gives exactly
    the continuation's text in context, for every tokenizer family.
    """
    ctx = list(context_ids)[-CONTEXT_TOKENS:]
    if ctx:
        head = tokenizer.decode(ctx, skip_special_tokens=True)
        full = tokenizer.decode(ctx + list(ids), skip_special_tokens=True)
        if full.startswith(head):
            return full[len(head) :]
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def kept_token_count(tokenizer, ids: Sequence[int], kept_text: str, context_ids: Sequence[int] = ()) -> int:
    """Fewest leading tokens whose decoded text covers ``kept_text`` (the token that
    completes the kept text is included; tokens only of the stop string are not).
    ``context_ids``: the prompt's tokens, to decode the continuation in context
    (:func:`decode_continuation`)."""
    if not kept_text:
        return 0
    m = len(ids)
    # Walk back from the end: stops are near the end, so this costs a few decodes.
    while m > 1 and len(decode_continuation(tokenizer, ids[: m - 1], context_ids)) >= len(kept_text):
        m -= 1
    return m


class HFGenerator:
    """The Generator protocol on a transformers causal LM."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str = "model",
        batch_size: int = 8,
        add_special_tokens: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.add_special_tokens = add_special_tokens
        ensure_pad_token(tokenizer)
        tokenizer.padding_side = "left"
        self.forward_passes = 0
        self.generated_tokens = 0

    @classmethod
    def from_pretrained(
        cls, path: str | Path, name: str | None = None, device: str | None = None, dtype: str = "auto", **kw: Any
    ) -> HFGenerator:
        model, tok = load_model_and_tokenizer(str(path), device=device, dtype=dtype)
        return cls(model, tok, name=name or str(path), **kw)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- encoding -----------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(prompts), return_tensors="pt", padding=True, add_special_tokens=self.add_special_tokens
        )
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    @staticmethod
    def _prompt_ids(enc: dict[str, torch.Tensor], i: int) -> list[int]:
        """Row ``i``'s prompt ids without the left padding."""
        return enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()

    def _finish(
        self,
        gen_ids: list[int],
        stop: Sequence[str],
        token_logprobs: list[float] | None,
        prompt_index: int,
        hit_max: bool,
        context_ids: Sequence[int] = (),
    ) -> Candidate:
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        # drop the EOS that ended generation and the padding after it
        ids = list(gen_ids)
        ended_eos = False
        for i, t in enumerate(ids):
            if t == eos or t == pad:
                ids = ids[:i]
                ended_eos = True
                break
        raw = decode_continuation(self.tokenizer, ids, context_ids)
        text, hit_stop = cut_at_stop(raw, stop)
        m = kept_token_count(self.tokenizer, ids, text, context_ids) if hit_stop else len(ids)
        ids = ids[:m]
        lp = float(sum(token_logprobs[:m])) if token_logprobs is not None else float("nan")
        finish = "stop" if (hit_stop or ended_eos) else ("length" if hit_max else "stop")
        return Candidate(
            text=text,
            num_tokens=m,
            logprob=lp,
            prompt_index=prompt_index,
            raw_text=raw,
            finish_reason=finish,
            meta={"token_ids": ids},
        )

    # ---- sampling -----------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        n: int,
        temperature: float = 0.8,
        top_p: float = 0.95,
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[list[Candidate]]:
        out: list[list[Candidate]] = [[] for _ in prompts]
        if seed is not None:
            torch.manual_seed(seed)
        per_call = max(1, self.batch_size // max(1, n)) if n <= self.batch_size else 1
        for start in range(0, len(prompts), per_call):
            chunk = list(prompts[start : start + per_call])
            enc = self.encode(chunk)
            plen = enc["input_ids"].shape[1]
            greedy = temperature <= 0
            gen = self.model.generate(
                **enc,
                do_sample=not greedy,
                temperature=None if greedy else temperature,
                top_p=None if greedy else top_p,
                top_k=None if greedy else 0,
                num_return_sequences=n,
                max_new_tokens=max_new_tokens,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                stop_strings=list(stop) or None,
                tokenizer=self.tokenizer if stop else None,
            )
            seqs = gen.sequences[:, plen:]
            logits = torch.stack(gen.logits, dim=1).float()  # (B*n, T, V) raw
            lps = torch.log_softmax(logits, dim=-1).gather(-1, seqs[:, : logits.shape[1], None]).squeeze(-1)
            self.forward_passes += logits.shape[1]
            for row in range(seqs.shape[0]):
                pi = start + row // n
                ids = seqs[row].tolist()
                cand = self._finish(
                    ids,
                    stop,
                    lps[row].tolist(),
                    pi,
                    hit_max=len(ids) >= max_new_tokens,
                    context_ids=self._prompt_ids(enc, row // n),
                )
                self.generated_tokens += cand.num_tokens
                out[pi].append(cand)
        return out

    # ---- beam search ----------------------------------------------------------------
    @torch.no_grad()
    def beam_search(
        self,
        prompts: Sequence[str],
        num_beams: int,
        num_return_sequences: int | None = None,
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        length_penalty: float = 1.0,
    ) -> list[list[Candidate]]:
        nrs = num_return_sequences or num_beams
        if nrs > num_beams:
            raise ValueError("num_return_sequences cannot exceed num_beams")
        out: list[list[Candidate]] = [[] for _ in prompts]
        per_call = max(1, self.batch_size // num_beams)
        for start in range(0, len(prompts), per_call):
            chunk = list(prompts[start : start + per_call])
            enc = self.encode(chunk)
            plen = enc["input_ids"].shape[1]
            gen = self.model.generate(
                **enc,
                do_sample=False,
                num_beams=num_beams,
                num_return_sequences=nrs,
                length_penalty=length_penalty,
                early_stopping=True,
                max_new_tokens=max_new_tokens,
                return_dict_in_generate=True,
                output_scores=True,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                stop_strings=list(stop) or None,
                tokenizer=self.tokenizer if stop else None,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            self.forward_passes += len(gen.scores) if gen.scores is not None else 0
            seqs = gen.sequences[:, plen:]
            cands = []
            for row in range(seqs.shape[0]):
                pi = start + row // nrs
                ids = seqs[row].tolist()
                # beam outputs are right-padded with pad after EOS; _finish cuts at EOS
                c = self._finish(
                    ids,
                    stop,
                    None,
                    pi,
                    hit_max=len(ids) >= max_new_tokens,
                    context_ids=self._prompt_ids(enc, row // nrs),
                )
                c.meta["beam_rank"] = row % nrs
                cands.append(c)
            prompt_rows = [
                enc["input_ids"][row // nrs][enc["attention_mask"][row // nrs].bool()].tolist()
                for row in range(seqs.shape[0])
            ]
            lps = self.score_tokens(prompt_rows, [c.meta["token_ids"] for c in cands])
            for c, lp in zip(cands, lps):
                c.logprob = lp
                self.generated_tokens += c.num_tokens
                out[c.prompt_index].append(c)
        return out

    # ---- teacher forcing ------------------------------------------------------------
    @torch.no_grad()
    def score_tokens(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> list[float]:
        """Summed log p(completion | prompt) by teacher forcing, batched with left padding."""
        res: list[float] = []
        pad = self.tokenizer.pad_token_id
        for s in range(0, len(prompt_ids), max(1, self.batch_size)):
            P, C = prompt_ids[s : s + self.batch_size], completion_ids[s : s + self.batch_size]
            seqs = [list(p) + list(c) for p, c in zip(P, C)]
            L = max(len(x) for x in seqs)
            ids = torch.full((len(seqs), L), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), L), dtype=torch.long)
            for i, x in enumerate(seqs):
                ids[i, L - len(x) :] = torch.tensor(x)
                mask[i, L - len(x) :] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
            self.forward_passes += 1
            lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            for i, c in enumerate(C):
                n = len(c)
                res.append(float(lp[i, L - 1 - n : L - 1].sum()) if n else 0.0)
        return res


def is_finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
