"""Hugging Face transformers backend: batched sampling and beam search with exact log-probs.

Log-probabilities are always the *model's* raw ones (temperature 1, no top-p, no length
penalty): ``log softmax(logits)`` at each kept token.

Memory: a vocabulary of 262,144 (Gemma 3) makes one position's float32 logits 1 MiB, so
nothing here keeps [sequences, positions, vocabulary] logits: each step's log-probs are
reduced to what is needed as they are made (``generate`` is called without
``output_logits`` / ``output_scores``; a :class:`~transformers.LogitsProcessor` records them).
- Sampling: :class:`ChosenLogprobs` sees every step's raw logits (it runs before the
  temperature and top-p warpers) and keeps one step's log-softmax until the next step shows
  the token that was chosen; no extra forward pass.
- Beam search: :class:`BeamTopLogprobs` keeps each beam's top few log-probs per step (every
  token beam search can choose is among them); ``beam_indices`` says which beam each
  returned token came from. A token not found there (never expected) is rescored by
  :meth:`HFGenerator.score_tokens`.
- Teacher forcing (:meth:`HFGenerator.score_tokens`): the model runs over the sequence in
  segments through its KV cache, the LM head (the model's own forward, soft-capping
  included) only on the completion positions, a few positions at a time.
All are checked in the tests against an unbatched teacher-forced full-logits recomputation.

Speed on CPU (measured on Gemma 3 270M, ``benchmarks/gemma_throughput.py``):
- CPU threads (``threads``: default None, torch's setting; ``"auto"`` opt-in): a decode step is
  some 130 matrix products and a few hundred small operations, each a parallel region of all of torch's threads. On a
  machine whose cores are busy with other work, every region waits for a thread the kernel
  has descheduled: on 2 cores at load 8, a [8, 640] x [640, 2048] product took 30-38 ms with
  2 threads against 0.4 ms with 1, and a decode step of the chunk of 8 about 1.9 s against
  0.43 s. ``"auto"`` therefore uses, for each ``generate`` call, no more threads than there
  are cores left by other runnable tasks (:func:`auto_threads`; at least 1, at most torch's
  setting). MKL's float32 products of the model's shapes are bit for bit the same with 1 and
  2 threads; some other kernel is not always (a tiny model's padded rows: log-probs an ulp
  apart from the 5th decode step), so a thread count, like torch's own choice of one per
  core, can in a near tie change a greedy token. The benchmark's 8 Gemma completions were
  the same with 1 thread as with 2. That is why ``"auto"`` is not the default: a count that
  follows the machine's load from call to call could make a rerun differ from its first run,
  while torch's fixed setting (one thread per core) reproduces on the same machine.
- Stop strings: transformers builds its stop-string criterion on every ``generate`` call from
  the whole vocabulary (``get_vocab`` and a sort of 262,144 tokens for Gemma, about 1 s); it is
  built once per stop list here (:meth:`HFGenerator._stop_criteria`).
- transformers already computes the LM head for the last prompt position only during the
  prefill (``logits_to_keep=1``) and decodes through its KV cache.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteriaList, StopStringCriteria

from codedistill.generation.base import Candidate
from codedistill.generation.postprocess import cut_at_stop
from codedistill.models.loading import (
    default_device,
    ensure_pad_token,
    load_causal_lm,
    load_tokenizer,
    release_freed_memory,
    slim_tokenizer,
)

log = logging.getLogger(__name__)


def load_model_and_tokenizer(
    path: str, device: str | None = None, dtype: str = "auto", trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """``from_pretrained`` exactly as for a hub model; ``device_map='auto'`` on GPUs; left padding.

    Generation never saves the tokenizer, so its Python copies of the vocabulary and merges
    are dropped (:func:`~codedistill.models.loading.slim_tokenizer`)."""
    device = device or default_device()
    tok = slim_tokenizer(load_tokenizer(path, trust_remote_code=trust_remote_code))
    model = load_causal_lm(path, device, dtype, spread=True, trust_remote_code=trust_remote_code)
    model.eval()
    tok.padding_side = "left"
    release_freed_memory()
    return model, tok


def _running_tasks(stat_dir: str = "/proc") -> tuple[int, int] | None:
    """(runnable tasks on the machine, runnable threads of this process), from /proc; None
    where /proc does not say. The machine's count is the fourth field of /proc/loadavg."""
    try:
        with open(f"{stat_dir}/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        own = 0
        for tid in os.listdir(f"{stat_dir}/self/task"):
            with contextlib.suppress(OSError, IndexError):
                with open(f"{stat_dir}/self/task/{tid}/stat") as f:
                    own += f.read().rsplit(")", 1)[1].split()[0] == "R"
        return running, own
    except (OSError, ValueError, IndexError):
        return None


def auto_threads(limit: int | None = None, samples: int = 5) -> int:
    """CPU threads for the next ``generate`` call: the cores this process may use, less the
    tasks of other processes that are runnable now (the median of a few looks at /proc, a
    millisecond apart; scaled to this process's share of the machine's CPUs), at least 1 and
    at most ``limit`` (default torch's setting). Where /proc does not say: ``limit``."""
    import time

    limit = limit or torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    others = []
    for i in range(samples):
        got = _running_tasks()
        if got is None:
            return limit
        others.append(max(0, got[0] - got[1]))
        if i + 1 < samples:
            time.sleep(0.001)
    busy = sorted(others)[len(others) // 2] * cores / max(cores, os.cpu_count() or cores)
    return max(1, min(limit, cores - int(round(busy))))


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


#: float32 logits one teacher-forcing chunk may hold ([rows, positions, vocabulary] elements)
SCORE_CHUNK_ELEMENTS = 16 * 2**20


class ChosenLogprobs(LogitsProcessor):
    """Records each row's raw log-prob of the token chosen at every step of ``generate``.

    Placed in ``logits_processor`` it runs before the sampling warpers (temperature, top-p),
    so it sees the raw logits. A step's chosen token is only known at the next step (the
    last column of ``input_ids``), so one step's log-softmax is kept until then; the last
    step's is resolved by :meth:`result` from the returned sequences. The scores pass
    through unchanged.
    """

    def __init__(self) -> None:
        self._prev: torch.Tensor | None = None
        self._steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._prev is not None:
            self._take(input_ids[:, -1])
        self._prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _take(self, chosen: torch.Tensor) -> None:
        assert self._prev is not None
        self._steps.append(self._prev.gather(-1, chosen[:, None].to(self._prev.device)).squeeze(-1))
        self._prev = None

    @property
    def steps(self) -> int:
        return len(self._steps) + (self._prev is not None)

    def result(self, generated: torch.Tensor) -> torch.Tensor:
        """[rows, steps] log-probs; ``generated``: the [rows, steps] generated token ids."""
        if self._prev is not None:
            self._take(generated[:, len(self._steps)])
        if not self._steps:
            return torch.zeros((generated.shape[0], 0))
        return torch.stack(self._steps, dim=1).cpu()


class BeamTopLogprobs(LogitsProcessor):
    """Each beam's ``k`` best raw log-probs (values and token ids) at every beam search step.

    Beam search hands its processors ``log_softmax(logits)`` before adding the beam scores,
    and chooses each step's continuations among the top ``2 * num_beams`` of all beams
    together, so a chosen token is among its own beam's top ``2 * num_beams``.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.values: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        v, i = torch.topk(scores.float(), min(self.k, scores.shape[-1]), dim=-1)
        self.values.append(v)  # kept on the device: no synchronisation per step
        self.indices.append(i)
        self._stacked = None
        return scores

    def lookup(self, tokens: Sequence[int], beams: Sequence[int]) -> list[float] | None:
        """Per-step log-probs of ``tokens``, token ``t`` chosen on flat beam ``beams[t]``;
        None if one is not among the recorded top ``k`` (or ``beams`` ends early)."""
        n = len(tokens)
        if n == 0:
            return []
        if n > len(self.values) or len(beams) < n or min(beams[:n]) < 0:
            return None
        if self._stacked is None:  # [steps, rows, k], on the CPU once
            self._stacked = (torch.stack(self.values).cpu(), torch.stack(self.indices).cpu())
        values, indices = self._stacked
        steps = torch.arange(n)
        rows = torch.tensor(list(beams[:n]), dtype=torch.long)
        idx, val = indices[steps, rows], values[steps, rows]  # [n, k]
        hit = idx == torch.tensor(list(tokens), dtype=torch.long)[:, None]
        if not bool(hit.any(-1).all()):
            return None
        return val.masked_fill(~hit, 0.0).sum(-1).tolist()


class HFGenerator:
    """The Generator protocol on a transformers causal LM."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str = "model",
        batch_size: int = 8,
        add_special_tokens: bool = True,
        threads: int | str | None = None,
    ):
        """``threads``: torch's CPU threads while generating on the CPU: ``"auto"``
        (:func:`auto_threads`, per ``generate`` call), a number, or None (torch's setting,
        untouched)."""
        if not (threads is None or threads == "auto" or (isinstance(threads, int) and threads >= 1)):
            raise ValueError(f"threads must be 'auto', a positive number or None, not {threads!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.add_special_tokens = add_special_tokens
        self.threads = threads
        ensure_pad_token(tokenizer)
        tokenizer.padding_side = "left"
        self.forward_passes = 0
        self.generated_tokens = 0
        self.threads_used: list[int] = []  # torch threads of each generate call on the CPU
        self._stops: dict[tuple[str, ...], StoppingCriteriaList] = {}

    @classmethod
    def from_pretrained(
        cls, path: str | Path, name: str | None = None, device: str | None = None, dtype: str = "auto", **kw: Any
    ) -> HFGenerator:
        """Load ``path`` (:func:`load_model_and_tokenizer`); ``kw``: the constructor's."""
        model, tok = load_model_and_tokenizer(str(path), device=device, dtype=dtype)
        return cls(model, tok, name=name or str(path), **kw)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextlib.contextmanager
    def _cpu_threads(self) -> Iterator[None]:
        """torch's thread count for one ``generate`` call on the CPU (``threads``), restored after."""
        if self.threads is None or self.device.type != "cpu":
            yield
            return
        before = torch.get_num_threads()
        n = auto_threads(before) if self.threads == "auto" else int(self.threads)
        self.threads_used.append(n)
        if n == before:
            yield
            return
        log.debug("generating with %d CPU threads (torch's setting %d)", n, before)
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _stop_criteria(self, stop: Sequence[str]) -> StoppingCriteriaList | None:
        """transformers' stop-string criterion for ``stop``, built once per stop list (building
        it reads and sorts the whole vocabulary; ``generate(stop_strings=...)`` does that on
        every call)."""
        if not stop:
            return None
        key = tuple(stop)
        if key not in self._stops:
            self._stops[key] = StoppingCriteriaList([StopStringCriteria(self.tokenizer, list(key))])
            release_freed_memory()  # building it leaves ~100 MB of freed heap (Gemma) with glibc
        return self._stops[key]

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
            recorder = ChosenLogprobs()
            with self._cpu_threads():
                gen = self.model.generate(
                    **enc,
                    do_sample=not greedy,
                    temperature=None if greedy else temperature,
                    top_p=None if greedy else top_p,
                    top_k=None if greedy else 0,
                    num_return_sequences=n,
                    max_new_tokens=max_new_tokens,
                    logits_processor=LogitsProcessorList([recorder]),
                    stopping_criteria=self._stop_criteria(stop),
                    return_dict_in_generate=True,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                )
            seqs = gen.sequences[:, plen:]
            steps = recorder.steps
            lps = recorder.result(seqs)  # (B*n, T) raw log-probs of the chosen tokens
            self.forward_passes += steps
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
            recorder = BeamTopLogprobs(3 * num_beams)
            with self._cpu_threads():
                gen = self.model.generate(
                    **enc,
                    do_sample=False,
                    num_beams=num_beams,
                    num_return_sequences=nrs,
                    length_penalty=length_penalty,
                    early_stopping=True,
                    max_new_tokens=max_new_tokens,
                    return_dict_in_generate=True,
                    logits_processor=LogitsProcessorList([recorder]),
                    stopping_criteria=self._stop_criteria(stop),
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
            self.forward_passes += len(recorder.values)
            seqs = gen.sequences[:, plen:]
            beam_rows = getattr(gen, "beam_indices", None)
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
                kept = c.meta["token_ids"]
                found = recorder.lookup(kept, beam_rows[row].tolist()) if beam_rows is not None else None
                if found is not None:
                    c.logprob = float(sum(found))
                cands.append((row, c, found is not None))
            # a token not among the recorded top-k (never expected): rescore by teacher forcing
            todo = [(row, c) for row, c, ok in cands if not ok]
            if todo:
                lps = self.score_tokens(
                    [self._prompt_ids(enc, row // nrs) for row, _ in todo], [c.meta["token_ids"] for _, c in todo]
                )
                for (_, c), lp in zip(todo, lps):
                    c.logprob = lp
            for _, c, _ in cands:
                self.generated_tokens += c.num_tokens
                out[c.prompt_index].append(c)
        return out

    # ---- teacher forcing ------------------------------------------------------------
    @torch.no_grad()
    def score_tokens(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> list[float]:
        """Summed log p(completion | prompt) by teacher forcing, batched with left padding.

        The prompts (and any completion part that no row needs) run in one forward pass
        that keeps the logits of its last position only (``logits_to_keep``); the rest runs
        on through the KV cache a few positions at a time, so at most
        :data:`SCORE_CHUNK_ELEMENTS` float32 logits exist at once, whatever the vocabulary.
        """
        res: list[float] = []
        pad = self.tokenizer.pad_token_id
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("score_tokens needs at least one prompt token per row (e.g. BOS)")
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
            lens = torch.tensor([len(c) for c in C], device=self.device)
            with self._cpu_threads():
                total = self._completion_logprobs(ids, mask, pos, lens)
            res.extend(float(x) for x in total.tolist())
        return res

    def _completion_logprobs(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, lens: torch.Tensor
    ) -> torch.Tensor:
        """Per row, the summed log-probs of its last ``lens[i]`` tokens (left-padded ``ids``)."""
        rows, L = ids.shape
        nmax = int(lens.max()) if rows else 0
        if nmax == 0:
            return torch.zeros(rows)
        first = L - 1 - nmax  # the first position whose logits predict a completion token
        head = self.model.get_output_embeddings()
        vocab = int(head.weight.shape[0]) if head is not None else int(self.model.config.vocab_size)
        chunk = max(1, SCORE_CHUNK_ELEMENTS // max(1, rows * vocab))
        keep_kw = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        total = torch.zeros(rows, dtype=torch.float64, device=ids.device)
        cache: Any = None
        start = 0
        while start < L - 1:
            # the first segment: everything up to ``first`` (keeping one position's logits) and
            # a chunk; later segments: a chunk each
            end = min(L - 1, (first if start == 0 and keep_kw else start) + chunk)
            kw: dict[str, Any] = {"use_cache": True}
            if cache is not None:
                kw[self._cache_kwarg()] = cache
            if keep_kw:
                kw["logits_to_keep"] = end - max(start, first)
            out = self.model(
                input_ids=ids[:, start:end], attention_mask=mask[:, :end], position_ids=pos[:, start:end], **kw
            )
            self.forward_passes += 1
            cache = getattr(out, "cache", None)
            if cache is None:
                cache = getattr(out, "past_key_values", None)
            logits = out.logits
            p0 = end - logits.shape[1]  # the position of the first kept logits
            del out
            if end > first:
                lo = max(p0, first)
                lg = logits[:, lo - p0 :]
                lp = torch.log_softmax(lg.float(), dim=-1).gather(-1, ids[:, lo + 1 : end + 1, None]).squeeze(-1)
                # position p predicts token p + 1, a completion token of row i when p + 1 >= L - lens[i]
                posn = torch.arange(lo, end, device=ids.device)
                use = (posn[None, :] + 1) >= (L - lens[:, None])
                total += (lp.double() * use).sum(-1)
                del lp
            del logits
            start = end
        return total.float()

    def _cache_kwarg(self) -> str:
        params = inspect.signature(self.model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"


def is_finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
