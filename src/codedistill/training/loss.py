"""The completion-only, importance-weighted loss, without [batch, positions, vocabulary] logits.

The loss is the same quantity whichever way it is computed: the next-token cross-entropy of
each labelled (completion) token, weighted by its example's importance weight, summed and
divided by the number of labelled tokens (:func:`completion_loss` on full logits is the
reference). What differs is memory. With a 262k vocabulary (Gemma 3) the full float32 logits
of a 16 x 100 batch are 1.7 GB, and cross-entropy keeps as much again for the backward pass.

:class:`CompletionLoss` picks the leanest of three ways the model allows, once per model:

- ``chunked`` (the default): the model runs with ``logits_to_keep=1`` (its LM head on the
  last position only) while a forward hook on its decoder (``model.get_decoder()``) keeps
  the final hidden states; the LM head (``model.get_output_embeddings()``, Gemma's
  ``final_logit_softcapping`` included) is then applied to the completion positions only, a
  chunk of positions at a time, so at most one chunk's logits (:data:`CHUNK_ELEMENTS`
  floats) exist at once. A plain linear head (the usual) gets a fused linear
  cross-entropy: each chunk's gradients (for the hidden states, and the head's weights if
  they train) are computed in the forward pass (:func:`linear_cross_entropy`), so nothing is
  recomputed; any other head (a LoRA-adapted one) has each chunk recomputed in the backward
  pass (``torch.utils.checkpoint``, :func:`head_cross_entropy`). On its first batch it checks
  that its LM head reproduces the model's own logits at the kept position; a model whose
  head does something else falls back to ``last_k`` with a warning.
- ``last_k`` (FSDP and DeepSpeed, whose sharded LM head can be used only inside the
  model's forward): ``logits_to_keep=K``, the last K positions, K covering every row's
  completion, through the model's own head.
- ``full``: a model whose forward takes no ``logits_to_keep``: its full logits.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

#: logits computed at once by the chunked loss: positions x vocabulary (64 MB in float32;
#: 64 positions of Gemma 3's 262,144-token vocabulary, 16,384 of a 1,024-token one)
CHUNK_ELEMENTS = 1 << 24

MODES = ("chunked", "last_k", "full")


def completion_loss(logits: Any, labels: Any, weights: Any | None = None) -> Any:
    """Mean next-token cross-entropy over labelled (completion) positions of full logits; each
    token weighted by its example's importance weight (sum w*ce / number of tokens)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    ce = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    valid = (shift_labels != IGNORE_INDEX).float()
    if weights is not None:
        valid_w = valid * weights.to(ce.device).float().unsqueeze(1)
    else:
        valid_w = valid
    denom = valid.sum().clamp(min=1.0)
    return (ce * valid_w).sum() / denom


def completion_targets(labels: Any, weights: Any | None = None) -> tuple[Any, Any, Any | None]:
    """``(keep, targets, token_weights)``: ``keep`` [batch, positions] marks the positions whose
    next token is labelled; ``targets`` and ``token_weights`` are those next tokens and their
    examples' weights, in ``hidden[keep]`` order (row-major)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][keep[:, :-1]]
    w = None
    if weights is not None:
        w = weights.to(labels.device).float().unsqueeze(1).expand(labels.shape)[keep]
    return keep, targets, w


def _chunk_ce(hidden: Any, targets: Any, weights: Any | None, head: Any, softcap: float | None) -> Any:
    logits = head(hidden)
    if softcap:  # as Gemma 2/3's forward does, in the model's dtype, before the loss's float()
        logits = torch.tanh(logits / softcap) * softcap
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return (ce * weights).sum() if weights is not None else ce.sum()


def head_cross_entropy(
    hidden: Any,
    targets: Any,
    weights: Any | None,
    head: Any,
    softcap: float | None = None,
    vocab_size: int | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Any:
    """Sum over positions of ``weight * cross_entropy(head(hidden), target)`` (float32), the
    head applied ``chunk_elements // vocab_size`` positions at a time; with more than one
    chunk, each chunk's logits are recomputed in the backward pass instead of kept."""
    n = int(hidden.shape[0])
    vocab = vocab_size or int(head.weight.shape[0])
    size = max(1, chunk_elements // max(1, vocab))
    total = hidden.new_zeros((), dtype=torch.float32)
    recompute = n > size and torch.is_grad_enabled()
    for s in range(0, n, size):
        args = (hidden[s : s + size], targets[s : s + size], None if weights is None else weights[s : s + size])
        if recompute:
            part = checkpoint(_chunk_ce, *args, head, softcap, use_reentrant=False)
        else:
            part = _chunk_ce(*args, head, softcap)
        total = total + part
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum_i w_i * CE(cap(h_i W^T + b), y_i)`` over chunks of positions, with the gradients
    for ``h`` (and ``W``, ``b`` where they need one) computed in the same pass, chunk by chunk:
    d/dlogits = w * (softmax - onehot), times the cap's derivative ``1 - (logits/cap)^2``.
    No chunk's logits outlive their chunk, and nothing is recomputed in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Any,
        weight: Any,
        bias: Any,
        targets: Any,
        weights: Any,
        softcap: float | None,
        size: int,
    ) -> Any:
        n = int(hidden.shape[0])
        grad_h = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        need_b = bias is not None and bias.requires_grad
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, n, size):
            h = hidden[s : s + size]
            y = targets[s : s + size]
            z = F.linear(h, weight, bias)
            t = None
            if softcap:
                t = torch.tanh(z / softcap)
                z = t * softcap
            logits = z.float()
            lse = torch.logsumexp(logits, dim=-1)
            ce = lse - logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
            w = None if weights is None else weights[s : s + size]
            total = total + ((ce * w).sum() if w is not None else ce.sum())
            g = torch.exp(logits - lse.unsqueeze(-1))
            g[torch.arange(len(y), device=g.device), y] -= 1.0
            if w is not None:
                g.mul_(w.unsqueeze(-1))
            if t is not None:
                g.mul_(1.0 - t.float().square())
            g = g.to(z.dtype)
            if grad_h is not None:
                grad_h[s : s + size] = (g @ weight.to(g.dtype)).to(hidden.dtype)
            if grad_w is not None:
                grad_w += (g.t() @ h.to(g.dtype)).float()
            if grad_b is not None:
                grad_b += g.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: Any) -> Any:  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (
            None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
            None if grad_w is None else (grad_w * grad_out).to(w_dtype),
            None if grad_b is None else (grad_b * grad_out).to(b_dtype),
            None,
            None,
            None,
            None,
        )


def fused_head(head: Any) -> bool:
    """Whether :func:`linear_cross_entropy` can use ``head`` directly: a plain ``nn.Linear``
    with floating-point weights (not a LoRA-wrapped or quantized layer)."""
    w = getattr(head, "weight", None)
    return (
        isinstance(head, torch.nn.Linear)
        and type(w) is torch.nn.Parameter
        and w.is_floating_point()
        and (head.bias is None or type(head.bias) is torch.nn.Parameter)
    )


def linear_cross_entropy(
    hidden: Any,
    targets: Any,
    weights: Any | None,
    head: Any,
    softcap: float | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Any:
    """:func:`head_cross_entropy` for a plain linear head (:func:`fused_head`), with its
    gradients computed in the forward pass chunk by chunk (no recomputation)."""
    vocab = int(head.weight.shape[0])
    size = max(1, chunk_elements // max(1, vocab))
    return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, weights, softcap, size)


def _causal_lm(model: Any) -> Any:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _softcap(model: Any) -> float | None:
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    cap = getattr(text, "final_logit_softcapping", None)
    return float(cap) if cap else None


class CompletionLoss:
    """The completion-only loss of one model (see the module docstring for the three modes).

    ``loss(model, input_ids, attention_mask, labels, weights)`` returns ``(mean loss, model
    outputs)``; ``model`` is what to call (a DDP wrapper, say), ``inner`` (given at
    construction) the unwrapped model whose decoder and LM head are used."""

    def __init__(
        self,
        inner: Any,
        sharded: bool = False,
        chunk_elements: int = CHUNK_ELEMENTS,
        mode: str | None = None,
        fused: bool | None = None,
    ):
        self.inner = inner
        self.chunk_elements = chunk_elements
        self.checked = False
        lm = _causal_lm(inner)
        takes_keep = "logits_to_keep" in inspect.signature(lm.forward).parameters
        if mode is not None:
            if mode not in MODES:
                raise ValueError(f"unknown loss mode {mode!r}; use one of {', '.join(MODES)}")
            self.mode = mode
        elif not takes_keep:
            self.mode = "full"
        elif sharded:
            self.mode = "last_k"
        else:
            self.mode = "chunked"
        if self.mode == "chunked":
            self.decoder = lm.get_decoder()
            self.head = lm.get_output_embeddings()
            self.softcap = _softcap(lm)
            cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
            self.vocab_size = int(getattr(cfg, "vocab_size", 0) or 0) or None
            self.fused = fused_head(self.head) if fused is None else fused

    def __call__(
        self, model: Any, input_ids: Any, attention_mask: Any, labels: Any, weights: Any | None = None
    ) -> tuple[Any, Any]:
        if self.mode == "chunked":
            return self._chunked(model, input_ids, attention_mask, labels, weights)
        if self.mode == "last_k":
            return self._last_k(model, input_ids, attention_mask, labels, weights)
        outputs = model(input_ids=input_ids, attention_mask=attention_mask)
        return completion_loss(outputs.logits, labels, weights), outputs

    def _last_k(self, model: Any, input_ids: Any, attention_mask: Any, labels: Any, weights: Any | None) -> Any:
        keep, _, _ = completion_targets(labels)
        T = labels.shape[1]
        cols = keep.any(dim=0).nonzero()
        k = T - int(cols[0]) if len(cols) else 1
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=k)
        return completion_loss(outputs.logits, labels[:, T - k :], weights), outputs

    def _chunked(self, model: Any, input_ids: Any, attention_mask: Any, labels: Any, weights: Any | None) -> Any:
        captured: list[Any] = []

        def keep_hidden(module: Any, args: Any, out: Any) -> None:
            captured.append(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])

        handle = self.decoder.register_forward_hook(keep_hidden)
        try:
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
        finally:
            handle.remove()
        hidden = captured[-1]
        if not self.checked:
            self.checked = True
            if not self._head_matches(hidden, outputs.logits):
                warnings.warn(
                    f"{type(_causal_lm(self.inner)).__name__}'s logits are not its LM head on its decoder's "
                    "output; the loss takes the model's own logits (of the completion positions) instead",
                    stacklevel=2,
                )
                self.mode = "last_k"
                return self._last_k(model, input_ids, attention_mask, labels, weights)
        keep, targets, w = completion_targets(labels, weights)
        if self.fused:
            total = linear_cross_entropy(hidden[keep], targets, w, self.head, self.softcap, self.chunk_elements)
        else:
            total = head_cross_entropy(
                hidden[keep], targets, w, self.head, self.softcap, self.vocab_size, self.chunk_elements
            )
        return total / keep.sum().clamp(min=1), outputs

    def _head_matches(self, hidden: Any, logits: Any) -> bool:
        with torch.no_grad():
            mine = self.head(hidden[:, -1:, :])
            if self.softcap:
                mine = torch.tanh(mine / self.softcap) * self.softcap
            theirs = logits[:, -1:, :]
            if mine.shape != theirs.shape:
                return False
            return bool(torch.allclose(mine.float(), theirs.float(), rtol=1e-3, atol=1e-3))
