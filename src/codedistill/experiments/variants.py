"""The named ablation variants of step 3: each changes one component of the full method.

A variant is a set of BTPConfig overrides (or the GRPO baseline) plus a rule saying when
it applies to a config. Variants whose resolved settings equal another's share its run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from codedistill.btp.config import BTPConfig
from codedistill.errors import ConfigError


@dataclass(frozen=True)
class Variant:
    name: str
    group: str
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    kind: str = "btp"  # btp | grpo
    # None when it applies to the config, else why not
    applies: Callable[[BTPConfig], str | None] = lambda cfg: None


#: the rank method's alpha in the rank variant (prioritized experience replay's rank-based value)
RANK_ALPHA = 0.7


def _beam_only(cfg: BTPConfig) -> str | None:
    return None if cfg.generation == "beam" else "the config samples (generation=sample): no beam width"


def _prioritised(cfg: BTPConfig) -> str | None:
    return (
        None
        if cfg.sampling_method in ("power", "rank")
        else f"sampling alpha has no effect with sampling_method={cfg.sampling_method}"
    )


def _num(x: float) -> str:
    return f"{x:g}"


def all_variants() -> list[Variant]:
    """In the order they run: the reference and the components that matter most first."""
    v: list[Variant] = [
        Variant("full", "reference", "the config as it is (the full method)"),
        Variant(
            "testing_off", "testing", "P2Value without the pass rate (p2_alpha = 1): testing off", {"p2_alpha": 1.0}
        ),
        Variant("sampling_uniform", "replay", "uniform replay instead of prioritized", {"sampling_method": "uniform"}),
        Variant(
            "rft",
            "min_pass_rate",
            "only fully passing programs (min_pass_rate 1: rejection-sampling FT)",
            {"min_pass_rate": 1.0},
        ),
        Variant(
            "drop_zero_pass",
            "min_pass_rate",
            "zero-pass programs dropped before the draw (min_pass_rate 0.01)",
            {"min_pass_rate": 0.01},
        ),
        Variant(
            "keep_all", "min_pass_rate", "every tested program may be drawn (min_pass_rate 0)", {"min_pass_rate": 0.0}
        ),
        Variant(
            "grpo",
            "outside baseline",
            "TRL GRPO on the same problems, reward = sandbox pass rate, as many sampled programs as BTP's beam phase",
            kind="grpo",
        ),
        Variant(
            "p_raw",
            "sequence probability",
            "P = the paper's raw product of token probabilities exp(sum logprob) instead of the length-normalised one",
            {"p_mode": "raw"},
        ),
        Variant(
            "p_normalized",
            "sequence probability",
            "P = exp(mean token logprob) (length-normalised)",
            {"p_mode": "normalized"},
        ),
        Variant(
            "sample_generation",
            "generation",
            "temperature sampling (T=0.8, top_p 0.95) instead of beam search, as many programs per problem",
            {"generation": "sample", "gen_temperature": 0.8},
        ),
        Variant(
            "beam_3", "beam width", "3 beams per problem (the paper's width)", {"num_beams": 3}, applies=_beam_only
        ),
        Variant("beam_5", "beam width", "5 beams per problem (the plan's width)", {"num_beams": 5}, applies=_beam_only),
        Variant("mode_self", "samples", "the target's own beams (self) instead of the source's", {"mode": "self"}),
        Variant("mode_mixed", "samples", "the source's and the target's beams together (mixed)", {"mode": "mixed"}),
        Variant("mode_source", "samples", "the source's beams (finetune)", {"mode": "finetune"}),
    ]
    # rank's alpha is an exponent on 1/rank, not on the value: the power method's alpha (8 in
    # the demo) would put nearly every draw on the top-ranked program (measured: 600 draws, 2
    # distinct programs). It runs at Schaul et al.'s rank-based alpha instead.
    rank = (
        {"sampling_method": "rank", "sampling_alpha": RANK_ALPHA},
        f", P ∝ rank^-{RANK_ALPHA:g} (Schaul et al. 2016's rank-based alpha; the power method's is not comparable)",
    )
    for m in ("power", "rank", "greedy"):
        over, note = rank if m == "rank" else ({"sampling_method": m}, "")
        v.append(Variant(f"sampling_{m}", "sampling method", f"replay draws by the {m} method{note}", over))
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
        v.append(
            Variant(f"p2_alpha_{_num(a)}", "p2_alpha", f"P2Value = {a:g}*P + {1 - a:g}*pass_rate", {"p2_alpha": a})
        )
    for a in (1.0, 1.5, 3.0, 8.0):
        v.append(
            Variant(
                f"alpha_{_num(a)}",
                "sampling alpha",
                f"sampling alpha {a:g}",
                {"sampling_alpha": a},
                applies=_prioritised,
            )
        )
    return v


def variant_names() -> list[str]:
    return [v.name for v in all_variants()]


def select(names: str | None) -> list[Variant]:
    """``None``/``all`` -> every variant; else the comma-separated names (the reference is
    always included, first)."""
    every = all_variants()
    if not names or names.strip().lower() == "all":
        return every
    by = {v.name: v for v in every}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in wanted if n not in by]
    if bad:
        raise ConfigError(f"unknown variant(s) {', '.join(bad)}; valid: all, {', '.join(by)}")
    out = [by["full"]] + [by[n] for n in wanted if n != "full"]
    return out
