"""Which evaluation protocol a run's numbers follow, and whether they can be compared
with published numbers.

Pure functions over the run's own files (``config.json``, ``comparison.json``,
``metrics.json``). Published MBPP and HumanEval tables mostly use one protocol:

* MBPP (Austin et al. 2021, and most code-LLM papers since): the 500 test problems
  (task_ids 11-510), a 3-shot prompt with tasks 2, 3, 4, greedy decoding, pass@1.
* HumanEval (Chen et al. 2021): all 164 problems, 0-shot, greedy pass@1; or Codex's
  sampled protocol (pass@1 at T=0.2, pass@10/100 at T=0.8, n=200 samples).
* HumanEval+ / MBPP+ (EvalPlus, Liu et al. 2023): all 164 / 378 tasks of the release,
  greedy pass@1, base and plus side by side, judged as evalplus judges. HumanEval+'s prompt
  is HumanEval's (0-shot); EvalPlus prompts MBPP+ with its own docstring (0-shot, one
  example assert), which this project does not: its MBPP+ prompt is MBPP's (3-shot under
  the paper preset), so MBPP+ numbers compare only partly with published ones.

A BTP run that trains on MBPP leaves MBPP+'s tasks in MBPP's train split out of its MBPP+
evaluation (and, with shots, the prompt's tasks 2-4): the protocol says how many it kept
and why, and such a subset is not comparable with published numbers.

Anything else (a subset of problems, the validation split, a handful of samples at some
temperature, this project's synthetic benchmark) is fine for before/after comparisons
inside the project and says nothing about published numbers. The verdict says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from codedistill.report.files import settings

# Full size of each published test split.
FULL_TEST_SIZE = {"mbpp": 500, "mbpp-sanitized": 257, "humaneval": 164, "humaneval+": 164, "mbpp+": 378}
# The paper preset's shots per dataset.
PAPER_SHOTS = {"mbpp": 3, "mbpp-sanitized": 3, "humaneval": 0, "humaneval+": 0, "mbpp+": 3}
# EvalPlus's benchmarks are whole releases: their published numbers are on split "all"
# (HumanEval+'s test split is all of it)
EVALPLUS_FULL_SPLITS = {"humaneval+": ("test", "all"), "mbpp+": ("all",)}


@dataclass
class Protocol:
    """How one set of numbers was measured."""

    dataset: str
    split: str = "test"
    n_problems: int | None = None
    shots: int = 0
    temperature: float = 0.0
    top_p: float | None = None
    num_samples: int = 1
    preset: str | None = None  # "paper" | "sampled" | None (not recorded)
    method: str = "plain"  # plain | egcfg | beam ...
    decoding_note: str | None = None  # replaces "greedy"/"sampled, T=..." for other decoders
    # left out by the leakage guard: [{"reason", "n"}]; n_eligible: problems left after it
    excluded: list[dict[str, Any]] = field(default_factory=list)
    n_eligible: int | None = None

    @property
    def n_excluded(self) -> int:
        return sum(int(x.get("n", len(x.get("task_ids", ())))) for x in self.excluded)

    def kept(self) -> str:
        """``267 of 378 kept; left out: 108 in MBPP's train split ...; 3 ...`` ("" if nothing was)."""
        if not self.excluded:
            return ""
        eligible = self.n_eligible if self.n_eligible is not None else self.n_problems
        why = "; ".join(f"{int(x.get('n', len(x.get('task_ids', ()))))} {x.get('reason', '')}" for x in self.excluded)
        return f"{eligible} of {(eligible or 0) + self.n_excluded} kept; left out: {why}"

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def decoding(self) -> str:
        if self.decoding_note:
            return self.decoding_note
        if self.greedy:
            return "greedy" + (f" (n={self.num_samples})" if self.num_samples != 1 else "")
        tp = f", top_p {self.top_p:g}" if self.top_p is not None and self.top_p < 1 else ""
        return f"sampled, T={self.temperature:g}{tp}, n={self.num_samples}"

    def describe(self) -> str:
        """``mbpp test split, 500 problems, 3-shot, greedy``."""
        n = f", {self.n_problems} problems" if self.n_problems is not None else ""
        full = FULL_TEST_SIZE.get(self.dataset)
        if self.excluded:
            first = (
                f"first {self.n_problems} of the "
                if self.n_eligible is not None and self.n_problems is not None and self.n_problems < self.n_eligible
                else ""
            )
            n += f" ({first}{self.kept()})"
        elif full and self.split in self.full_splits() and self.n_problems is not None and self.n_problems < full:
            n += f" (first {self.n_problems} of {full})"
        pre = f"; preset {self.preset}" if self.preset else ""
        meth = f"; decoding method {self.method}" if self.method not in ("plain", "") and not self.decoding_note else ""
        return f"{self.dataset} {self.split} split{n}, {self.shots}-shot, {self.decoding}{meth}{pre}"

    def full_splits(self) -> tuple[str, ...]:
        """The splits whose whole is the published benchmark."""
        return EVALPLUS_FULL_SPLITS.get(self.dataset, ("test",))

    def short(self) -> str:
        """``mbpp test (500), 3-shot, greedy`` for table cells (``mbpp+ all (267 of 378
        kept)`` where the leakage guard left tasks out)."""
        n = f" ({self.n_problems})" if self.n_problems is not None else ""
        if self.excluded and self.n_problems is not None:
            total = (self.n_eligible if self.n_eligible is not None else self.n_problems) + self.n_excluded
            n = f" ({self.n_problems} of {total} kept)"
        dec = (
            ("greedy" if self.greedy else f"T={self.temperature:g} n={self.num_samples}")
            if self.method in ("plain", "")
            else f"{self.method} n={self.num_samples}"
        )
        return f"{self.dataset} {self.split}{n}, {self.shots}-shot, {dec}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "greedy": self.greedy}


@dataclass
class Verdict:
    """Can these numbers be put next to published ones?  ``level``: yes | partly | no."""

    level: str
    reasons: list[str] = field(default_factory=list)

    @property
    def comparable(self) -> bool:
        return self.level == "yes"

    def describe(self) -> str:
        head = {
            "yes": "comparable with published numbers",
            "partly": "comparable only with papers that use the same sampled protocol",
            "no": "not comparable with published numbers",
        }[self.level]
        return head + (": " + "; ".join(self.reasons) if self.reasons else "")


def comparability(p: Protocol) -> Verdict:
    """Compare a protocol with the standard published ones (see the module docstring)."""
    ds = p.dataset
    if ds == "synth":
        return Verdict(
            "no",
            [
                "synth is this project's generated benchmark; nothing is published on it. "
                "Its numbers compare runs of this project with each other"
            ],
        )
    full = FULL_TEST_SIZE.get(ds)
    if full is None:
        return Verdict("no", [f"no published reference protocol is known for {ds!r}"])
    no: list[str] = []
    if p.split not in p.full_splits():
        where = "all tasks of the release (--split all)" if ds in EVALPLUS_FULL_SPLITS else "the test split"
        no.append(f"{p.split} split, published numbers are on {where}")
    if p.n_problems is not None and p.n_problems < full:
        no.append(f"{p.n_problems} of the {full} test problems (a subset; published numbers use all {full})")
    if p.excluded:
        no.append("the leakage guard left tasks out: " + p.kept())
    want = PAPER_SHOTS[ds]
    if p.shots != want and ds != "mbpp+":  # MBPP+'s published prompt is neither: see its verdict
        no.append(f"{p.shots}-shot prompt, the standard {ds} protocol is {want}-shot")
    if p.method not in ("plain", ""):
        no.append(f"decoding method {p.method}: compare with that method's paper, not plain decoding")
    if no:
        return Verdict("no", no)
    if p.greedy and ds == "mbpp+":
        return Verdict(
            "partly",
            [
                "mbpp+ all 378 tasks, greedy pass@1, judged as evalplus judges; but the prompt is MBPP's "
                f"{p.shots}-shot [BEGIN] format, not EvalPlus's docstring prompt (0-shot, one example assert) "
                "that published MBPP+ numbers use"
            ],
        )
    if p.greedy:
        tests = {
            "mbpp": "tasks 2-4 as shots, test tasks 11-510",
            "humaneval+": "0-shot, all 164 tasks judged as evalplus judges (base and plus)",
        }.get(ds, "0-shot")
        return Verdict(
            "yes", [f"{ds} {tests}, greedy pass@1 on the full test split: the protocol of the published tables"]
        )
    reasons = [
        f"sampled at T={p.temperature:g} with n={p.num_samples}; most published {ds} tables report greedy "
        "pass@1, so compare only with papers reporting sampled pass@k at this temperature"
    ]
    if p.num_samples < 20:
        reasons.append(f"n={p.num_samples} samples per problem gives a noisy pass@k (Chen et al. use n=200)")
    return Verdict("partly", reasons)


# ----------------------------------------------------------------------------- from run files


def _first(*vals: Any) -> Any:
    for v in vals:
        if v is not None:
            return v
    return None


def btp_protocol(config_json: Mapping[str, Any] | None, comparison: Mapping[str, Any] | None, dataset: str) -> Protocol:
    """The evaluation protocol of one dataset of a BTP run (its before/after numbers).

    Reads the recorded values first (a ``protocol`` object in comparison.json, per dataset
    or for the run), then config.json's eval_* settings; ``eval_protocol: paper`` fills in
    the paper preset's shots and greedy decoding when the numbers were not recorded.
    """
    cfg = settings(config_json)
    comp = comparison or {}
    entry = (comp.get("datasets") or {}).get(dataset, {})
    rec = entry.get("protocol") or comp.get("protocol") or {}
    if isinstance(rec, Mapping) and dataset in rec and isinstance(rec[dataset], Mapping):
        rec = rec[dataset]
    if not isinstance(rec, Mapping):
        rec = {}
    preset = _first(rec.get("preset"), rec.get("eval_protocol"), comp.get("eval_protocol"), cfg.get("eval_protocol"))
    paper = preset == "paper"
    shots = _first(
        rec.get("shots"), cfg.get("eval_shots"), PAPER_SHOTS.get(dataset, 0) if paper else None, cfg.get("shots"), 0
    )
    temp = _first(
        rec.get("temperature"), 0.0 if paper else None, comp.get("eval_temperature"), cfg.get("eval_temperature"), 0.0
    )
    n = _first(
        rec.get("num_samples"),
        rec.get("n"),
        1 if paper else None,
        comp.get("eval_num_samples"),
        cfg.get("eval_num_samples"),
        1,
    )
    split = _first(rec.get("split"), cfg.get("eval_split"), "test")
    n_problems = _first(rec.get("n_problems"), entry.get("n_problems"))
    excluded = rec.get("excluded")
    return Protocol(
        dataset=dataset,
        split=str(split),
        n_problems=n_problems,
        shots=int(shots),
        temperature=float(temp),
        top_p=_first(rec.get("top_p"), cfg.get("eval_top_p")),
        num_samples=int(n),
        preset=preset,
        method=str(rec.get("method", "plain")),
        excluded=list(excluded) if isinstance(excluded, list) else [],
        n_eligible=rec.get("n_eligible"),
    )


def baseline_protocol(config_json: Mapping[str, Any] | None, metrics: Mapping[str, Any] | None) -> Protocol:
    """Protocol of a step-1 (baseline) run: config.json's dataset/split/shots/sampling."""
    cfg = settings(config_json)
    s = cfg.get("sampling") or {}
    m = metrics or {}
    n = m.get("num_samples")
    if isinstance(n, Mapping):  # {"min", "max"} when problems had different n
        n = n.get("min")
    method = str(cfg.get("method", "plain"))
    note = None
    if method == "egcfg":  # its own decoder: the sampling temperature does not describe it
        eg = cfg.get("egcfg") or {}
        grid = ", ".join(f"{k} {eg[k]}" for k in ("gammas", "depths", "temperatures") if k in eg)
        n_eg = _first(n, s.get("num_samples"), 1)
        note = f"EG-CFG execution-guided decoding{' (' + grid + ')' if grid else ''}, n={n_eg}"
    return Protocol(
        dataset=str(cfg.get("dataset", "?")),
        split=str(cfg.get("split", "test")),
        n_problems=m.get("n_problems"),
        shots=int(cfg.get("shots", 0) or 0),
        temperature=float(_first(s.get("temperature"), 0.0)),
        top_p=s.get("top_p"),
        num_samples=int(_first(n, s.get("num_samples"), 1)),
        preset=cfg.get("eval_protocol"),
        method=method,
        decoding_note=note,
        excluded=[{"reason": x.get("reason", ""), "n": len(x.get("task_ids", ()))} for x in m.get("excluded") or ()],
    )
