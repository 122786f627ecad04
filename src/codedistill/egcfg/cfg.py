"""Batched classifier-free guidance (CFG) decoding on stock transformers.

Guidance, as in EG-CFG (Lavon et al. 2025), on log-softmaxed logits::

    log p_guided ∝ log p_uncond + gamma * (log p_cond - log p_uncond)

``gamma = 0`` is the plain (unconditional) model, ``gamma = 1`` the conditional one. We
renormalise the result (``log_softmax`` of the combination), so that beam scores and the
reported guided log-probs are those of a proper distribution; argmax and sampling are
unaffected by the renormalisation.

Engineering: the conditional and the unconditional sequences of all ``B`` hypotheses live
in ONE left-padded batch of ``2B`` rows (rows ``[0, B)`` conditional, ``[B, 2B)``
unconditional) with one :class:`~transformers.DynamicCache`, explicit attention masks and
position ids. Each step is a single forward pass over ``2B`` new tokens; the prompts are
encoded once. On beam reordering BOTH halves of the cache are reordered with the same
beam indices (this is what transformers' built-in ``guidance_scale`` gets wrong under beam
search: its unconditional cache does not follow the beams). Finished rows of greedy /
sampling runs are dropped from the batch and the cache.

When ``cond_ids is None`` or ``gamma == 0`` only the unconditional stream is run (plain
decoding; B rows).

With a :class:`PrefixCache` (``prefixes=``), EG-CFG's line-by-line decoder stops paying for
its prompt again on every call: each prompt is prefilled from the longest cached prefix of its
tokens (a few-shot prompt's examples, the previous line's context), and the cond and uncond
streams keep a cache each, without padding (two forward passes per step instead of one
batched pass; a row of either stream is then computed exactly as it would be alone, sliding
windows included). On gemma-3-270m with MBPP's 3-shot prompt the prompts were some 95% of the
token positions EG-CFG processed.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from transformers import DynamicCache

Strategy = Literal["greedy", "sample", "beam"]
StopFn = Callable[[list[int]], bool]


@dataclass
class CFGResult:
    """Output of :func:`cfg_generate`, one entry per returned sequence (beams: best first).

    ``guided_logprob``: summed log-probs of the kept tokens under the (renormalised, temperature
    1) guided distribution. ``plain_logprob``: the same under the unconditional (= plain,
    prompt without signal) model, temperature 1. ``finished``: stopped by ``stop_fn``/eos
    (False: ran into ``max_new_tokens``). ``forward_passes`` counts model calls (a batched call
    over cond+uncond rows counts once); ``rows_tokens`` the token positions those calls processed.
    ``steps`` (only with ``record_steps``): per decoding step, ``{"prefixes": [ids per row],
    "logprobs": FloatTensor[rows, V]}`` with the guided log-probs each row saw.
    """

    tokens: list[list[int]]
    guided_logprob: list[float]
    plain_logprob: list[float]
    finished: list[bool]
    forward_passes: int = 0
    rows_tokens: int = 0
    scores: list[float] = field(default_factory=list)
    steps: list[dict] | None = None
    token_guided_logprobs: list[list[float]] = field(default_factory=list)
    token_plain_logprobs: list[list[float]] = field(default_factory=list)


def guided_logprobs(
    cond_logits: torch.Tensor | None, uncond_logits: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(guided log-probs, plain log-probs) from raw last-position logits, float32."""
    lu = torch.log_softmax(uncond_logits.float(), dim=-1)
    if cond_logits is None or gamma == 0:
        return lu, lu
    lc = torch.log_softmax(cond_logits.float(), dim=-1)
    if gamma == 1:
        return lc, lu
    return torch.log_softmax(lu + gamma * (lc - lu), dim=-1), lu


def reference_guided_logprobs(
    model, cond_ids: Sequence[int] | None, uncond_ids: Sequence[int], gamma: float
) -> torch.Tensor:
    """Guided next-token log-probs by a full forward pass without any cache (for tests)."""
    dev = _device(model)
    with torch.no_grad():
        lu = model(torch.tensor([list(uncond_ids)], device=dev), use_cache=False).logits[0, -1]
        lc = None
        if cond_ids is not None and gamma != 0:
            lc = model(torch.tensor([list(cond_ids)], device=dev), use_cache=False).logits[0, -1]
    return guided_logprobs(lc, lu, gamma)[0]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _extend(
    model, ids: torch.Tensor, pos: torch.Tensor, cache: DynamicCache, mask: torch.Tensor | None = None
) -> tuple[DynamicCache, torch.Tensor]:
    """Feed ``ids`` [rows, T] at positions ``pos`` after ``cache``: (the cache, the last
    position's logits [rows, V]); the LM head runs on that position only."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
    return out.cache, out.logits[:, -1, :]


class _Streams:
    """The 2B (or B) rows with their cache, attention mask and next positions."""

    def __init__(self, model, prompts: list[list[int]], pad_id: int):
        self.model = model
        dev = _device(model)
        n = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), n), pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((len(prompts), n), dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError("empty prompt")
            ids[i, n - len(p) :] = torch.tensor(p, dtype=torch.long, device=dev)
            mask[i, n - len(p) :] = 1
        self.mask = mask
        self.cache = DynamicCache(config=model.config)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        self.next_pos = mask.sum(-1)  # [rows]
        self.forward_passes = 0
        self.rows_tokens = 0
        self.last_logits = self._forward(ids, pos)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.cache, logits = _extend(self.model, ids, pos, self.cache, self.mask)
        self.forward_passes += 1
        self.rows_tokens += int(ids.numel())
        return logits

    def select(self, rows: torch.Tensor) -> None:
        """Keep / reorder / repeat rows (index into the current rows)."""
        rows = rows.to(self.mask.device)
        self.cache.reorder_cache(cast(torch.LongTensor, rows))
        self.mask = self.mask.index_select(0, rows)
        self.next_pos = self.next_pos.index_select(0, rows)
        self.last_logits = self.last_logits.index_select(0, rows)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        ones = torch.ones((self.mask.shape[0], 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        pos = self.next_pos.unsqueeze(1)
        self.next_pos = self.next_pos + 1
        self.last_logits = self._forward(tokens.view(-1, 1), pos)
        return self.last_logits


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """KV caches of token prefixes for one model, reused across :func:`cfg_generate` calls.

    ``prefill(ids)`` returns ``(cache, last logits)`` for ``ids`` (one row): a copy of the
    cache of the longest stored prefix of ``ids``, extended by the remaining tokens in one
    forward pass. Entries are kept least-recently-used, at most ``max_entries``
    (gemma-3-270m: about 26 MB for a 700-token prefix). Caches are never cropped (a
    sliding-window layer past its window cannot be): a prefix is stored as computed.
    ``forward_passes`` / ``rows_tokens`` count the prefills' model calls and token positions.
    """

    def __init__(self, model, max_entries: int = 4):
        self.model = model
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple[int, ...], tuple[DynamicCache, torch.Tensor]] = OrderedDict()
        self.forward_passes = 0
        self.rows_tokens = 0
        self.reused_tokens = 0  # prompt positions answered from a stored prefix

    def _best(self, ids: Sequence[int]) -> tuple[int, ...] | None:
        best: tuple[int, ...] | None = None
        for key in self.entries:
            if len(key) <= len(ids) and (best is None or len(key) > len(best)) and tuple(ids[: len(key)]) == key:
                best = key
        return best

    def _forward(self, cache: DynamicCache, new: Sequence[int], start: int) -> tuple[DynamicCache, torch.Tensor]:
        dev = _device(self.model)
        ids = torch.tensor([list(new)], dtype=torch.long, device=dev)
        pos = torch.arange(start, start + len(new), device=dev).unsqueeze(0)
        self.forward_passes += 1
        self.rows_tokens += len(new)
        return _extend(self.model, ids, pos, cache)

    def prefill(self, ids: Sequence[int], store: bool = False) -> tuple[DynamicCache, torch.Tensor]:
        if not ids:
            raise ValueError("empty prompt")
        key = self._best(ids)
        if key is not None and len(key) == len(ids):
            self.entries.move_to_end(key)
            cache, logits = self.entries[key]
            self.reused_tokens += len(ids)
            return copy.deepcopy(cache), logits
        if key is None:
            cache, start = DynamicCache(config=self.model.config), 0
        else:
            self.entries.move_to_end(key)
            cache, start = copy.deepcopy(self.entries[key][0]), len(key)
            self.reused_tokens += start
        cache, logits = self._forward(cache, ids[start:], start)
        if store:
            self.put(ids, cache, logits)
        return cache, logits

    def put(self, ids: Sequence[int], cache: DynamicCache, logits: torch.Tensor) -> None:
        """Store ``cache`` (one row) as the state after ``ids`` (kept: the caller gives it up)."""
        self.entries[tuple(ids)] = (copy.deepcopy(cache), logits)
        self.entries.move_to_end(tuple(ids))
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def share(self, a: Sequence[int], b: Sequence[int], min_tokens: int = 16) -> None:
        """Store the prefix that ``a`` and ``b`` have in common (the prompt before the signal),
        unless a stored prefix of it already covers it."""
        n = _common_prefix(a, b)
        if n >= min_tokens and self._best(a[:n]) != tuple(a[:n]):
            self.prefill(a[:n], store=True)


class _SplitStreams:
    """The :class:`_Streams` interface over one unpadded cache per prompt (rows of a stream
    share their length): prompts prefilled from a :class:`PrefixCache`, one forward pass per
    stream and step. ``select`` takes indices into the concatenated rows and keeps every row
    in its own stream (the only selections :func:`cfg_generate` makes)."""

    def __init__(self, model, prompts: list[list[int]], prefixes: PrefixCache):
        self.model = model
        self.prefixes = prefixes
        f0, r0 = prefixes.forward_passes, prefixes.rows_tokens
        if len(prompts) == 2:
            prefixes.share(prompts[0], prompts[1])
        self.caches: list[DynamicCache] = []
        self.logits: list[torch.Tensor] = []
        self.next_pos: list[int] = []
        self.ids: list[list[int]] = []  # each stream's tokens in its cache (prompt, then fed tokens)
        for p in prompts:
            cache, logits = prefixes.prefill(p)
            self.caches.append(cache)
            self.logits.append(logits)
            self.next_pos.append(len(p))
            self.ids.append(list(p))
        self.rows = [1] * len(prompts)
        self.forward_passes = prefixes.forward_passes - f0
        self.rows_tokens = prefixes.rows_tokens - r0

    @property
    def last_logits(self) -> torch.Tensor:
        return torch.cat(self.logits, dim=0)

    def select(self, rows: torch.Tensor) -> None:
        rows = rows.cpu()
        offsets = [sum(self.rows[:i]) for i in range(len(self.rows))]
        per: list[list[int]] = [[] for _ in self.rows]
        for r in rows.tolist():
            g = max(i for i, o in enumerate(offsets) if r >= o)
            if any(per[h] for h in range(g + 1, len(per))):
                raise ValueError("a selection that moves rows between streams")
            per[g].append(r - offsets[g])
        for g, idx in enumerate(per):
            if not idx:
                raise ValueError("a selection that empties a stream")
            t = torch.tensor(idx, dtype=torch.long)
            self.caches[g].reorder_cache(cast(torch.LongTensor, t.to(self.logits[g].device)))
            self.logits[g] = self.logits[g].index_select(0, t.to(self.logits[g].device))
            self.rows[g] = len(idx)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        dev = _device(self.model)
        start = 0
        for g, n in enumerate(self.rows):
            tok = tokens[start : start + n].view(-1, 1).to(dev)
            start += n
            pos = torch.full((n, 1), self.next_pos[g], dtype=torch.long, device=dev)
            self.caches[g], self.logits[g] = _extend(self.model, tok, pos, self.caches[g])
            self.next_pos[g] += 1
            self.forward_passes += 1
            self.rows_tokens += n
            if n == 1:
                self.ids[g].append(int(tok[0, 0]))
        return self.last_logits

    def keep_last(self) -> None:
        """Store the last stream (the unconditional one) in the prefix cache if it is one row:
        the next line's prompts start with its tokens."""
        if self.rows[-1] == 1 and len(self.ids[-1]) == self.next_pos[-1]:
            self.prefixes.put(self.ids[-1], self.caches[-1], self.logits[-1])


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    cum = probs.cumsum(-1)
    remove = cum - probs > top_p  # keep the smallest set whose mass reaches top_p
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)


def cfg_generate(
    model,
    uncond_ids: Sequence[int],
    cond_ids: Sequence[int] | None = None,
    *,
    gamma: float = 1.0,
    strategy: Strategy = "greedy",
    num_sequences: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    eos_token_id: int | Sequence[int] | None = None,
    stop_fn: StopFn | None = None,
    generator: torch.Generator | None = None,
    length_penalty: float = 1.0,
    pad_token_id: int = 0,
    record_steps: bool = False,
    prefixes: PrefixCache | None = None,
) -> CFGResult:
    """Decode from ``uncond_ids`` (and ``cond_ids``) with CFG, using KV caches.

    ``strategy``: "greedy" (one sequence), "sample" (``num_sequences`` independent samples at
    ``temperature``/``top_p``, drawn with ``generator``), or "beam" (beam search with
    ``num_sequences`` beams, all returned best first; score = guided log-prob /
    length**length_penalty). ``stop_fn(new_ids)`` is asked after every token of a row; True
    ends that row (the token is kept). Eos ends a row too (kept, like HF generate).
    ``prefixes``: prefill the prompts from these cached prefixes and keep the streams apart
    (module docstring); a one-row unconditional stream is stored back for the next call.
    """
    use_cond = cond_ids is not None and gamma != 0
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    if strategy == "greedy":
        num_sequences = 1
    if strategy not in ("greedy", "sample", "beam"):
        raise ValueError(f"unknown strategy {strategy!r}")
    if strategy == "sample" and temperature <= 0:
        strategy = "greedy" if num_sequences == 1 else strategy
    B = num_sequences
    prompts = [list(cond_ids), list(uncond_ids)] if use_cond and cond_ids is not None else [list(uncond_ids)]
    st: _Streams | _SplitStreams = (
        _Streams(model, prompts, pad_token_id) if prefixes is None else _SplitStreams(model, prompts, prefixes)
    )
    # expand the prefilled rows to B hypotheses each: [cond]*B + [uncond]*B
    base = torch.tensor([0] * B + ([1] * B if use_cond else []), dtype=torch.long)
    st.select(base)
    steps: list[dict] | None = [] if record_steps else None

    def split_logits(logits: torch.Tensor, n: int):
        if use_cond:
            return logits[:n], logits[n:]
        return None, logits

    def rows_index(sel: torch.Tensor, n: int) -> torch.Tensor:
        return torch.cat([sel, sel + n]) if use_cond else sel

    if strategy == "beam":
        return _beam(
            st, B, gamma, use_cond, max_new_tokens, eos, stop_fn, length_penalty, steps, split_logits, rows_index
        )

    seqs: list[list[int]] = [[] for _ in range(B)]
    g_tok: list[list[float]] = [[] for _ in range(B)]
    p_tok: list[list[float]] = [[] for _ in range(B)]
    finished = [False] * B
    active = list(range(B))  # hypothesis index of each current row (per stream half)
    for _ in range(max_new_tokens):
        n = len(active)
        lc, lu = split_logits(st.last_logits, n)
        glp, plp = guided_logprobs(lc, lu, gamma)
        if steps is not None:
            steps.append({"prefixes": [list(seqs[h]) for h in active], "logprobs": glp.clone()})
        if strategy == "greedy" or temperature <= 0:
            tok = glp.argmax(-1)
        else:
            probs = torch.softmax(_top_p_filter(glp / temperature, top_p), dim=-1)
            tok = torch.multinomial(probs.cpu(), 1, generator=generator).view(-1).to(glp.device)
        keep = []
        for r, h in enumerate(active):
            t = int(tok[r])
            seqs[h].append(t)
            g_tok[h].append(float(glp[r, t]))
            p_tok[h].append(float(plp[r, t]))
            if t in eos or (stop_fn is not None and stop_fn(seqs[h])):
                finished[h] = True
            else:
                keep.append(r)
        if not keep or len(seqs[active[0]]) >= max_new_tokens:
            break
        if len(keep) < n:
            sel = torch.tensor(keep, dtype=torch.long)
            st.select(rows_index(sel, n))
            tok = tok[sel.to(tok.device)]
            active = [active[r] for r in keep]
        st.step(torch.cat([tok, tok]) if use_cond else tok)
    if isinstance(st, _SplitStreams):
        st.keep_last()
    g_lp = [float(sum(x)) for x in g_tok]
    return CFGResult(
        tokens=seqs,
        guided_logprob=g_lp,
        plain_logprob=[float(sum(x)) for x in p_tok],
        finished=finished,
        forward_passes=st.forward_passes,
        rows_tokens=st.rows_tokens,
        scores=list(g_lp),
        steps=steps,
        token_guided_logprobs=g_tok,
        token_plain_logprobs=p_tok,
    )


def _beam(
    st: _Streams | _SplitStreams,
    B,
    gamma,
    use_cond,
    max_new_tokens,
    eos,
    stop_fn,
    length_penalty,
    steps,
    split_logits,
    rows_index,
) -> CFGResult:
    dev = st.last_logits.device
    seqs: list[list[int]] = [[] for _ in range(B)]
    beam_scores = torch.full((B,), float("-inf"), device=dev)
    beam_scores[0] = 0.0  # all rows start identical: only one live beam at step 0
    gtok: list[list[float]] = [[] for _ in range(B)]  # per-token guided / plain log-probs
    ptok: list[list[float]] = [[] for _ in range(B)]
    # (norm score, seq, guided sum, finished, guided per token, plain per token)
    done: list[tuple[float, list[int], float, bool, list[float], list[float]]] = []

    def norm(score: float, length: int) -> float:
        return score / (max(length, 1) ** length_penalty)

    for step in range(max_new_tokens):
        lc, lu = split_logits(st.last_logits, B)
        glp, plp = guided_logprobs(lc, lu, gamma)
        if steps is not None:
            steps.append({"prefixes": [list(s) for s in seqs], "logprobs": glp.clone()})
        V = glp.shape[-1]
        cand = (beam_scores.unsqueeze(1) + glp).view(-1)
        k = min(2 * B, int(torch.isfinite(cand).sum()))
        top_scores, top_idx = torch.topk(cand, k)
        next_beams: list[tuple[int, int, float]] = []  # (src beam, token, score)
        for rank, (sc, ix) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
            b, t = divmod(ix, V)
            new_seq = seqs[b] + [t]
            if t in eos or (stop_fn is not None and stop_fn(new_seq)):
                if rank < B:
                    done.append(
                        (
                            norm(sc, len(new_seq)),
                            new_seq,
                            sc,
                            True,
                            gtok[b] + [float(glp[b, t])],
                            ptok[b] + [float(plp[b, t])],
                        )
                    )
                continue
            next_beams.append((b, t, sc))
            if len(next_beams) == B:
                break
        last_step = step == max_new_tokens - 1
        if len(done) >= B:
            best_running = max((norm(sc, step + 1) for _, _, sc in next_beams), default=float("-inf"))
            worst_done = sorted(d[0] for d in done)[-B]
            if best_running <= worst_done:
                break
        if not next_beams:
            break
        if last_step:
            for b, t, sc in next_beams:
                done.append(
                    (
                        norm(sc, step + 1),
                        seqs[b] + [t],
                        sc,
                        False,
                        gtok[b] + [float(glp[b, t])],
                        ptok[b] + [float(plp[b, t])],
                    )
                )
            break
        while len(next_beams) < B:  # pad with dead beams
            next_beams.append((next_beams[0][0], next_beams[0][1], float("-inf")))
        src = torch.tensor([b for b, _, _ in next_beams], dtype=torch.long)
        toks = torch.tensor([t for _, t, _ in next_beams], dtype=torch.long, device=dev)
        gtok = [gtok[b] + [float(glp[b, t])] for b, t, _ in next_beams]
        ptok = [ptok[b] + [float(plp[b, t])] for b, t, _ in next_beams]
        seqs = [seqs[b] + [t] for b, t, _ in next_beams]
        beam_scores = torch.tensor([sc for _, _, sc in next_beams], device=dev)
        st.select(rows_index(src, B))  # reorder BOTH halves with the same beam indices
        st.step(torch.cat([toks, toks]) if use_cond else toks)
    done.sort(key=lambda d: -d[0])
    done = [d for d in done if math.isfinite(d[2])][:B]
    return CFGResult(
        tokens=[d[1] for d in done],
        guided_logprob=[d[2] for d in done],
        plain_logprob=[float(sum(d[5])) for d in done],
        finished=[d[3] for d in done],
        forward_passes=st.forward_passes,
        rows_tokens=st.rows_tokens,
        scores=[d[0] for d in done],
        steps=steps,
        token_guided_logprobs=[d[4] for d in done],
        token_plain_logprobs=[d[5] for d in done],
    )
