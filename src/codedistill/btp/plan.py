"""A BTP run's inputs, resolved and checked before any expensive work: the two models and
their generation backends, the training problems, the evaluation sets, and the guard
that no training problem is an evaluation problem."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from codedistill.btp.config import BTPConfig
from codedistill.data import TRAIN_DATASETS_OF_MBPP, heldout_problems, load_problems
from codedistill.data.evalplus import EVALPLUS_DATASETS
from codedistill.data.problem import Problem
from codedistill.errors import ConfigError
from codedistill.generation import beam_fallback_note, check_served
from codedistill.models.loading import default_device
from codedistill.models.registry import local_path, resolve_model


class ResolvedInputs:
    """Models, backends, training problems and evaluation sets of one run, checked.

    ``chosen_on``: the MBPP splits on which this run's settings were chosen (a sweep's
    best trial evaluated on the test split: :func:`scored_mbpp_splits` of its trials); the
    leakage guard leaves their tasks out of every held-out set (MBPP+'s 39 in validation)."""

    def __init__(self, cfg: BTPConfig, chosen_on: Collection[str] = ()):
        self.cfg = cfg
        self.chosen_on = tuple(chosen_on)
        self.source_spec = resolve_model(cfg.source_model, cfg.source_variant)
        self.target_spec = resolve_model(cfg.target_model, cfg.target_variant)
        if self.target_spec.backend == "openai":
            raise ConfigError(
                f"{self.target_spec.alias} cannot be fine-tuned: it is an API model. Pick a "
                "target whose weights are here (e.g. DeepSeek-Coder-1.3B)."
            )
        self._resolve_backends()
        self.train = load_problems(cfg.dataset, "train", data_path=cfg.data_path, max_problems=cfg.max_problems)
        # the prompts the buffer is written from, where they differ from the training prompts
        self.gen_prompts: dict[str, str] = {}
        if cfg.gen_shots:
            shot = load_problems(cfg.dataset, "train", data_path=cfg.data_path, shots=cfg.gen_shots)
            self.gen_prompts = {p.task_id: p.prompt for p in shot}
        if not self.train:
            raise ConfigError(f"no training problems in {cfg.dataset}")
        self.evals: dict[str, list[Problem]] = {}
        self.eval_shots: dict[str, int] = {}
        self.skipped_evals: list[str] = []  # extra sets without the chosen split (HumanEval: test only)
        self.eval_splits: dict[str, str] = {}
        self.eval_excluded: dict[str, list[dict[str, Any]]] = {}  # what the leakage guard left out, and why
        self.eval_eligible: dict[str, int] = {}  # problems left after it (before eval_max_problems)
        self._load_eval_sets()
        self.overlap: list[str] = []
        self.near_duplicates: list[list[str]] = []
        self.dropped: list[str] = []
        self._guard_overlap()
        self.out = Path(cfg.output_dir) if cfg.output_dir else cfg.default_output_dir()

    def for_generation(self, problem: Problem) -> Problem:
        """``problem`` as the buffer's generations see it (with ``gen_shots``: the few-shot prompt)."""
        prompt = self.gen_prompts.get(problem.task_id)
        return problem if prompt is None else replace(problem, prompt=prompt)

    @property
    def serves_merged(self) -> bool:
        """The fine-tuned target is served as ``iter_K/merged`` (LoRA, a served backend, serve_merged)."""
        cfg = self.cfg
        return cfg.use_lora and cfg.serve_merged and self.target_backend != "hf"

    @property
    def uses_source(self) -> bool:
        return self.cfg.mode in ("finetune", "mixed") or self.cfg.eval_source

    def _resolve_backends(self) -> None:
        """Generation backend per role (codedistill.generation.make_generator), checked."""
        cfg = self.cfg
        self.source_backend = cfg.role_backend("source", self.source_spec) if self.uses_source else "hf"
        self.target_backend = cfg.role_backend("target", self.target_spec)
        if self.uses_source:
            check_served(self.source_spec, self.source_backend, cfg.serving)
        check_served(self.target_spec, self.target_backend, cfg.serving)
        self.beam_fallback = None
        if cfg.generation == "beam" and cfg.mode in ("finetune", "mixed"):
            self.beam_fallback = beam_fallback_note(
                self.source_spec.alias, self.source_backend, cfg.serving, cfg.num_beams
            )

    def _load_eval_sets(self) -> None:
        """The held-out sets (:func:`eval_dataset_names`). HumanEval+ / MBPP+ are whole
        releases, so with ``eval_split: test`` they are held out whole (split ``all``) less
        what the run touches (:func:`codedistill.data.heldout_problems`): MBPP+'s 108 tasks in
        MBPP's train split when the run trains on MBPP (unless --allow-overlap: then they stay
        and the overlap guard lists them), and the few-shot prompt's tasks 2-4 with shots."""
        cfg = self.cfg
        for d in eval_dataset_names(cfg):
            path = cfg.data_path if d == cfg.dataset else None
            if cfg.eval_split == "validation" and d in ("humaneval", "humaneval+"):
                self.skipped_evals.append(d)
                continue
            # the paper protocol: MBPP / MBPP+ 3-shot (tasks 2-4), HumanEval(+) and synth 0-shot
            shots = 3 if cfg.eval_protocol == "paper" and d in ("mbpp", "mbpp-sanitized", "mbpp+") else 0
            split = "all" if d in EVALPLUS_DATASETS and cfg.eval_split == "test" else cfg.eval_split
            problems, excluded = heldout_problems(
                d,
                split,
                data_path=path,
                shots=shots,
                trains_on=None if cfg.allow_overlap else cfg.dataset,
                chosen_on=self.chosen_on,
            )
            self.eval_shots[d], self.eval_splits[d], self.eval_excluded[d] = shots, split, excluded
            self.eval_eligible[d] = len(problems)
            self.evals[d] = problems[: cfg.eval_max_problems] if cfg.eval_max_problems else problems

    def _guard_overlap(self) -> None:
        """Refuse to train on evaluation problems unless asked (drop them, or allow them)."""
        cfg = self.cfg
        all_eval = [p for ps in self.evals.values() for p in ps]
        self.overlap = find_overlap(self.train, all_eval)
        self.near_duplicates = find_near_duplicates(self.train, all_eval)
        if self.overlap and cfg.drop_overlap:
            self.dropped = list(self.overlap)
            self.train = [p for p in self.train if p.task_id not in set(self.dropped)]
            self.overlap = []
            if not self.train:
                raise ConfigError("every training problem overlaps the evaluation sets")
        if self.overlap and not cfg.allow_overlap:
            raise ConfigError(
                f"{len(self.overlap)} training problem(s) also appear in the evaluation sets "
                f"({', '.join(self.overlap[:5])}); refusing to train on test problems. Pass "
                "--drop-overlap to leave them out of training, or --allow-overlap to train on them "
                "anyway (the report will say so in bold)."
            )

    def kept_lines(self) -> list[str]:
        """One line per evaluation set the leakage guard cut: how many it kept, and why not the rest."""
        lines = []
        for d, excluded in self.eval_excluded.items():
            if excluded:
                total = self.eval_eligible[d] + sum(len(x["task_ids"]) for x in excluded)
                why = "; ".join(f"{len(x['task_ids'])} {x['reason']}" for x in excluded)
                lines.append(f"{d}: {self.eval_eligible[d]} of {total} tasks kept, left out: {why}")
        return lines

    def iteration_problems(self, k: int) -> list[Problem]:
        """The training problems iteration ``k`` generates on (see BTPConfig.iteration_problems)."""
        if self.cfg.iteration_problems == "all" or self.cfg.n_iterations == 1:
            return list(self.train)
        return iteration_slices(self.train, self.cfg.n_iterations)[k - 1]

    @property
    def target_path(self) -> str:
        """Where the target's base weights are."""
        return local_path(self.target_spec)

    @property
    def device(self) -> str:
        return self.cfg.device or default_device()

    def dtype(self, spec: Any) -> str:
        """The dtype to load ``spec`` in: the config's, else the model's registry entry's."""
        if self.cfg.dtype != "auto":
            return self.cfg.dtype
        return spec.dtype if spec.dtype not in (None, "auto") else "auto"


#: the EvalPlus version of each benchmark, evaluated beside it under the paper protocol
PLUS_OF = {"mbpp": "mbpp+", "mbpp-sanitized": "mbpp+", "humaneval": "humaneval+"}


def eval_dataset_names(cfg: BTPConfig) -> list[str]:
    """The held-out sets of a run: the training dataset's, then ``eval_datasets``; with the
    paper protocol each MBPP / HumanEval set is followed by its EvalPlus version (MBPP+,
    HumanEval+), as the field reports them side by side."""
    names = [cfg.dataset] + [d for d in cfg.eval_datasets if d != cfg.dataset]
    if cfg.eval_protocol != "paper":
        return names
    out: list[str] = []
    for d in names:
        for x in (d, PLUS_OF.get(d)):
            if x and x not in out:
                out.append(x)
    return out


def scored_mbpp_splits(cfg: BTPConfig) -> tuple[str, ...]:
    """The MBPP splits a run with ``cfg`` scores programs on: its ``eval_split`` when one of
    its held-out sets (:func:`eval_dataset_names`) is MBPP, MBPP-sanitized or MBPP+, else
    none. A run whose settings were chosen on such scores (a sweep's best trial) passes
    them to :class:`ResolvedInputs` as ``chosen_on``."""
    mbpp = (*TRAIN_DATASETS_OF_MBPP, "mbpp+")
    return (cfg.eval_split,) if any(d in mbpp for d in eval_dataset_names(cfg)) else ()


def iteration_slices(problems: Sequence[Problem], n: int) -> list[list[Problem]]:
    """``n`` consecutive, disjoint, near-equal slices (sizes differ by at most one)."""
    if n > len(problems):
        raise ConfigError(
            f"iteration_problems=slices needs at least n_iterations ({n}) training problems, got {len(problems)}"
        )
    q, r = divmod(len(problems), n)
    out, i = [], 0
    for j in range(n):
        m = q + (1 if j < r else 0)
        out.append(list(problems[i : i + m]))
        i += m
    return out


def _norm_text(s: str, lower: bool = False) -> str:
    return " ".join((s.lower() if lower else s).split())


def find_overlap(train: Sequence[Problem], evals: Sequence[Problem]) -> list[str]:
    """Training task_ids that *are* evaluation problems: same task_id, same prompt
    (description + tests), or same reference solution."""
    ids = {p.task_id for p in evals}
    prompts = {_norm_text(p.prompt) for p in evals}
    refs = {_norm_text(p.reference) for p in evals if p.reference.strip()}
    return [
        p.task_id
        for p in train
        if p.task_id in ids
        or _norm_text(p.prompt) in prompts
        or (p.reference.strip() and _norm_text(p.reference) in refs)
    ]


def find_near_duplicates(train: Sequence[Problem], evals: Sequence[Problem]) -> list[list[str]]:
    """[train id, eval id] pairs with the same description but different tests and
    reference (MBPP has four such pairs across its standard train/test split). Not
    refused (they are different problems) but listed in comparison.json and the report."""
    descs: dict[str, str] = {}
    for p in evals:
        if p.description.strip():
            descs.setdefault(_norm_text(p.description, lower=True), p.task_id)
    return [
        [p.task_id, descs[_norm_text(p.description, lower=True)]]
        for p in train
        if p.description.strip() and _norm_text(p.description, lower=True) in descs
    ]
