"""``codedistill sweep CONFIG.yaml --trials N``: step 4, a hyperparameter search with Optuna.

* Search space (:func:`search_space`): sampling alpha, P2Value alpha, replay size,
  learning rate, LoRA rank, epochs per iteration, beam width.
* Objective: the target's pass@1 on the **validation** split (synth's validation split,
  MBPP 511-600) after the last iteration; never the test split. Each trial's per-iteration
  validation pass@1 is reported to Optuna, and the median pruner stops weak trials.
* TPE sampler with a fixed seed; each trial samples with (seed, trial number). Storage: a
  journal file ``OUT/optuna_journal.log`` (``optuna.storages.JournalStorage`` +
  ``JournalFileBackend``: append-only, resumes after a crash, processes of one machine share
  it), or a database URL (``--storage postgresql://...``) for workers on several machines:
  Optuna's RDB storage with heartbeats every lease/4 seconds (``--lease``).
* Workers: any number of ``codedistill sweep`` processes with the same storage and
  ``--output-dir`` share one study. Optuna hands each trial to one worker; ``--trials N``
  counts over all of them (a worker asks only while fewer than N trials hold a place, and a
  trial asked by two workers at once for the last place is dropped, as ``surplus``, by the
  one whose trial number is higher). A worker with no place left waits for the others'
  running trials and takes over those whose worker dies.
* Trials share ``OUT/cache`` (or ``--cache-dir``): source beams, verdicts and the base
  target's validation evaluation are generated once per setting.
* Resume: rerun the command. A trial left RUNNING by a process of this host that no longer
  exists (``kill -9``), or, on a database, whose heartbeat is older than the lease (a node
  that never comes back), is marked FAIL and enqueued again with the same parameters and the
  same run directory, which resumes from what that directory holds.
* At the end the best trial is evaluated once on the test split (its trained adapters are
  reused, not retrained) and written as best.yaml, sweep.json, sweep.md and two plots, by
  one worker (a claim in ``OUT/claims/``; the others wait for it). A rerun of a complete
  study runs nothing. The leakage guard of that evaluation leaves out the tasks of the MBPP split the trials were
  scored on (:func:`codedistill.btp.plan.scored_mbpp_splits`): MBPP+'s 39 tasks in MBPP's
  validation split (511-600) are not counted in its MBPP+ numbers, and its protocol line
  says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from codedistill.btp.config import BTPConfig, build_config, load_config_file
from codedistill.btp.gencache import cache_key
from codedistill.btp.loop import run_btp
from codedistill.btp.plan import scored_mbpp_splits
from codedistill.data import load_problems
from codedistill.errors import ConfigError
from codedistill.experiments.claims import DEFAULT_LEASE, heartbeat_interval, hostname, pid_alive, run_once, wait_poll
from codedistill.experiments.run import ensure_models, load_experiment
from codedistill.report.format import fmt_metric
from codedistill.report.plots import plot_importance as draw
from codedistill.report.plots import plot_sweep_history
from codedistill.runs import derive_seed, write_json, write_text

Log = Callable[[str], None]
#: the split each trial is evaluated on (the objective's); the best trial's test evaluation
#: leaves out what the trials scored there (scored_mbpp_splits)
OBJECTIVE_SPLIT = "validation"
OBJECTIVE = f"{OBJECTIVE_SPLIT} pass@1"
FINISHED = ("COMPLETE", "PRUNED")
MAX_RETRY = 3  # a trial interrupted this many times (its node keeps dying) fails for real


def search_space(cfg: BTPConfig, n_train: int) -> dict[str, dict[str, Any]]:
    """Each searched setting: Optuna distribution kind and bounds (recorded in sweep.json)."""
    lr = cfg.learning_rate
    space: dict[str, dict[str, Any]] = {
        "sampling_alpha": {"type": "float", "low": 0.5, "high": 12.0, "log": True},
        "p2_alpha": {"type": "float", "low": 0.0, "high": 1.0},
        "replay_size": {"type": "categorical", "choices": sorted({max(1, n_train // 2), n_train, 2 * n_train})},
        "learning_rate": {"type": "float", "low": lr / 10, "high": lr * 3, "log": True},
        "lora_r": {"type": "categorical", "choices": [4, 8, 16, 32]},
        "epochs": {"type": "int", "low": 1, "high": max(2, 2 * cfg.epochs)},
    }
    if cfg.generation == "beam":
        space["num_beams"] = {"type": "categorical", "choices": [3, 5]}
    if not cfg.use_lora:
        space.pop("lora_r")
    return space


def describe(spec: Mapping[str, Any]) -> str:
    if spec["type"] == "categorical":
        return "one of " + ", ".join(str(c) for c in spec["choices"])
    return f"{spec['type']} in [{spec['low']:g}, {spec['high']:g}]" + (" (log scale)" if spec.get("log") else "")


def suggest(trial: Any, space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    out = {}
    for name, s in space.items():
        if s["type"] == "float":
            out[name] = trial.suggest_float(name, s["low"], s["high"], log=s.get("log", False))
        elif s["type"] == "int":
            out[name] = trial.suggest_int(name, s["low"], s["high"])
        else:
            out[name] = trial.suggest_categorical(name, s["choices"])
    return out


def make_storage(out: Path, storage: str | None, lease: float = DEFAULT_LEASE) -> tuple[Any, str]:
    """The study's storage and how sweep.json names it. A database URL gets Optuna's RDB
    storage with heartbeats: a trial whose worker sent none for ``lease`` seconds is failed by
    the next worker that looks and enqueued again with its parameters and run directory."""
    if storage and "://" in storage:
        import optuna
        from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                rdb = RDBStorage(
                    storage,
                    engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=max(1, int(heartbeat_interval(lease))),
                    grace_period=max(1, int(lease)),
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
                )
            except ImportError as e:
                raise ConfigError(
                    f"--storage {redact(storage)}: no database driver for it ({e}); for PostgreSQL: "
                    "pip install 'codedistill[cluster]' (psycopg)"
                ) from e
            except Exception as e:  # sqlalchemy's OperationalError and friends: say which server
                raise ConfigError(
                    f"--storage {redact(storage)}: cannot open the database ({type(e).__name__}: "
                    f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}); check the URL, the server and "
                    "that the database exists"
                ) from e
        return rdb, redact(storage)
    path = Path(storage) if storage else out / "optuna_journal.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path))), f"journal:{path}"


def redact(url: str) -> str:
    """A database URL without its password (for logs and sweep.json)."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def make_sampler(seed: int, n_trials: int) -> Any:
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(4, max(1, n_trials // 2)))


def open_study(name: str, storage: Any, seed: int, n_trials: int) -> Any:
    """Create or load the study. Its TPE sampler is seeded by (seed, trials so far): a sampler
    restarted from the bare seed would replay its random stream and propose the first
    trials' parameters again after every resume (seen in a demo-size sweep). The sweep's
    objective goes further and seeds each trial's sampling by (seed, trial number), so that
    workers started at the same moment do not propose the same point."""
    import optuna

    study = optuna.create_study(
        study_name=name,
        storage=storage,
        load_if_exists=True,
        direction="maximize",
        sampler=make_sampler(seed, n_trials),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    )
    if study.trials:
        study.sampler = make_sampler(seed + len(study.trials), n_trials)
    return study


def worker_of(t: Any) -> dict[str, Any] | None:
    """The worker (host, pid) running trial ``t``. A retry copies its original's user
    attributes, so the record names the trial it was made for and a copied one is ignored."""
    w = t.user_attrs.get("worker")
    if isinstance(w, dict) and w.get("trial") == t.number:
        return w
    if "pid" in t.user_attrs and "worker" not in t.user_attrs:  # studies of earlier versions
        return {"host": t.user_attrs.get("host"), "pid": t.user_attrs["pid"], "trial": t.number}
    return None


def retried(trials: Sequence[Any]) -> set[int]:
    """Numbers of the trials that were interrupted and enqueued again."""
    out = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return out | {t.number for t in trials if t.user_attrs.get("interrupted")}


def root(t: Any) -> int:
    """The trial number a retry stands in for (its run directory's number)."""
    return int(t.user_attrs.get("run_number", t.system_attrs.get("failed_trial", t.number)))


def holders(trials: Sequence[Any]) -> list[Any]:
    """Trials that hold one of the --trials places: finished, running, waiting to run, or
    failed for real. An interrupted trial gives its place to its retry; a surplus trial (one
    asked when another worker had just taken the last place) holds none."""
    again = retried(trials)
    return [t for t in trials if not t.user_attrs.get("surplus") and t.number not in again]


def surplus(trials: Sequence[Any], number: int, n_trials: int) -> bool:
    """Whether trial ``number``, just asked, came too late: a new trial (not a retry) whose
    number is preceded by ``n_trials`` trials holding places. Trial numbers are handed out in
    order, so of workers that ask at once for the last place exactly one keeps it."""
    this = trials[number]
    if root(this) != number or "failed_trial" in this.system_attrs:
        return False  # a retry takes its original's place
    return sum(1 for t in holders(trials) if root(t) < number) >= n_trials


def recover_interrupted(study: Any, log: Log, lease: float = DEFAULT_LEASE) -> int:
    """Trials RUNNING for a dead process of this host (or, on a database, whose heartbeat is
    older than the lease: Optuna's fail_stale_trials): FAIL, and enqueued again with the same
    parameters and run directory. Of several workers that find the same trial, one wins."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    host = hostname()
    n = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
        before = retried(study.get_trials(deepcopy=False))
        optuna.storages.fail_stale_trials(study)  # a database: heartbeats older than the lease
        after = study.get_trials(deepcopy=False)
        for number in sorted(retried(after) - before):
            log(
                f"trial {number} sent no heartbeat for {lease:g} s: "
                f"enqueued again, resuming trials/{root(after[number])}"
            )
            n += 1
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            w = worker_of(t)
            if w is None:
                started = t.datetime_start.timestamp() if t.datetime_start else time.time()
                if time.time() - started <= lease:
                    continue  # just asked: its worker has not said who it is yet
                why = f"no worker recorded for {lease:g} s"
            elif w.get("host") != host or pid_alive(int(w.get("pid", -1))):
                continue
            else:
                why = f"process {w.get('pid')} is gone"
            try:
                study.tell(t.number, state=TrialState.FAIL)
            except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
                continue  # another worker recovered it first
            retry(study, study.get_trials(deepcopy=False)[t.number])
            log(f"trial {t.number} was interrupted ({why}): enqueued again, resuming trials/{root(t)}")
            n += 1
    return n


def run_sweep(
    config_path: str | Path,
    output_dir: str | Path,
    n_trials: int,
    storage: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    study_name: str | None = None,
    evaluate_best: bool = True,
    log: Log = print,
    lease: float = DEFAULT_LEASE,
) -> dict[str, Any] | None:
    """Run this worker's share of the study; the summary (and the best trial's test
    evaluation) once all --trials trials are finished. None when trials still run on other
    hosts of a journal-file study (whichever worker finishes last writes the summary)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(output_dir)
    cache = str(cache_dir or out / "cache")
    base = load_experiment(
        config_path,
        {**(overrides or {}), "generation_cache": cache, "eval_split": OBJECTIVE_SPLIT},
        output_dir=out / "trials" / "base",
    )
    ensure_models(base)

    n_train = len(load_problems(base.dataset, "train", data_path=base.data_path, max_problems=base.max_problems))
    space = search_space(base, n_train)
    store, store_name = make_storage(out, storage, lease)
    name = study_name or f"btp-sweep-{Path(config_path).stem}"
    study = open_study(name, store, base.seed, n_trials)
    values = base.model_dump()
    me = {"host": hostname(), "pid": os.getpid()}
    ran: list[int] = []

    def objective(trial: Any) -> float:
        trial.set_user_attr("worker", {**me, "trial": trial.number})
        frozen = study.get_trials(deepcopy=False)
        if surplus(frozen, trial.number, n_trials):  # another worker took the last place since this one looked
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned(f"the {n_trials} trials are taken by other workers")
        run_no = root(frozen[trial.number])
        trial.set_user_attr("run_number", run_no)
        ran.append(trial.number)
        study.sampler = make_sampler(derive_seed(base.seed, "sweep trial", trial.number), n_trials)
        params = suggest(trial, space)
        cfg = build_config({**values, **params, "output_dir": str(out / "trials" / str(run_no))}, {})
        log(
            f"=== trial {trial.number} (trials/{run_no}, worker {me['host']}:{me['pid']}): "
            + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        )

        def report(k: int, metrics: Mapping[str, Any]) -> None:
            trial.report(float(metrics[cfg.dataset]["pass@1"]["value"]), k)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation pass@1 after iteration {k} below the median")

        comp = run_btp(cfg, log=log, on_iteration=report)
        return float(comp["datasets"][cfg.dataset]["target_after"]["pass@1"]["value"])

    if not work(study, n_trials, objective, lease, bool(getattr(store, "heartbeat_interval", None)), log):
        return None
    trials = study.get_trials(deepcopy=False)
    job = "summary-" + cache_key(
        {
            "study": name,
            "evaluate_best": evaluate_best,
            "trials": [(t.number, t.state.name, t.value) for t in trials],
        }
    )
    did = run_once(
        out / "claims",
        job,
        lambda: write_sweep(study, out, config_path, base, space, store_name, evaluate_best, log),
        lease=lease,
        log=log,
    )
    if not did:
        by = json.loads((out / "claims" / f"{job}.done").read_text(encoding="utf-8")).get("by")
        log(
            f"the study is complete and its summary was written by {by}"
            if ran
            else f"the study is complete and its summary written by {by} (claims/{job}.done): nothing to run"
        )
    return json.loads((out / "sweep.json").read_text(encoding="utf-8"))


def work(
    study: Any, n_trials: int, objective: Callable[[Any], float], lease: float, heartbeats: bool, log: Log
) -> bool:
    """Run trials while places are free or retries wait; then wait for other workers' running
    trials (taking over those whose worker dies). False when trials run on another host of a
    storage without heartbeats (a journal file): this worker cannot tell whether they live."""
    import optuna
    from optuna.trial import TrialState

    waiting_for: set[int] = set()
    while True:
        recover_interrupted(study, log, lease)
        trials = study.get_trials(deepcopy=False)
        places = holders(trials)
        if any(t.state == TrialState.WAITING for t in trials) or len(places) < n_trials:
            try:
                study.optimize(objective, n_trials=1, catch=(Exception,))
            except optuna.exceptions.UpdateFinishedTrialError as e:
                log(f"a trial of this worker was taken over by another (no heartbeat for {lease:g} s): {e}")
            continue
        running = [t for t in trials if t.state == TrialState.RUNNING]
        if not running:
            return True
        here = hostname()
        mine = [t for t in running if (worker_of(t) or {}).get("host") == here]
        if not heartbeats and len(mine) < len(running):
            elsewhere = sorted(f"{t.number} ({(worker_of(t) or {}).get('host')})" for t in running if t not in mine)
            log(
                f"trials {', '.join(elsewhere)} run on other hosts and a journal file has no heartbeats: "
                "the worker that finishes last writes the summary (or rerun this command then)"
            )
            return False
        if {t.number for t in running} != waiting_for:
            waiting_for = {t.number for t in running}
            who = ", ".join(
                f"{t.number} ({(worker_of(t) or {}).get('host')}:{(worker_of(t) or {}).get('pid')})" for t in running
            )
            log(f"all {n_trials} trials are taken; waiting for trials {who}")
        time.sleep(wait_poll(lease))


def write_sweep(
    study: Any,
    out: Path,
    config_path: str | Path,
    base: BTPConfig,
    space: Mapping[str, Any],
    store_name: str,
    evaluate_best: bool,
    log: Log,
) -> dict[str, Any]:
    import yaml
    from optuna.trial import TrialState

    all_trials = study.get_trials(deepcopy=False)
    again = retried(all_trials)
    trials = []
    for t in all_trials:
        if t.user_attrs.get("surplus"):
            continue  # asked after the last place was taken: ran nothing
        w = worker_of(t)
        trials.append(
            {
                "number": t.number,
                "state": t.state.name,
                "params": dict(t.params),
                "value": t.value,
                "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                "run_dir": f"trials/{root(t)}",
                "interrupted": t.number in again,
                "worker": f"{w['host']}:{w['pid']}" if w else None,
            }
        )
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best = None
    if complete:
        bt = max(complete, key=lambda t: (t.value, -t.number))
        best = {
            "number": bt.number,
            "params": dict(bt.params),
            "value": bt.value,
            "test_metrics": None,
            "run_dir": f"trials/{root(bt)}",
        }
        best_values = {**load_config_file(config_path), **{k: v for k, v in bt.params.items()}}
        chosen = scored_mbpp_splits(base)
        note = (
            f"# Chosen on MBPP's {', '.join(chosen)} split: the sweep's test evaluation leaves those tasks out "
            "of MBPP+; a run of this file on the test split counts them.\n"
            if chosen
            else ""
        )
        text = (
            f"# Best of {len(complete)} complete trials of `codedistill sweep {config_path}`: "
            f"trial {bt.number}, validation pass@1 {bt.value:.4f}\n"
            + note
            + yaml.safe_dump(best_values, sort_keys=False)
        )
        write_text(out / "best.yaml", text)
        if evaluate_best:
            best["test_metrics"], best["test_run_dir"] = evaluate_on_test(out, base, bt, best["run_dir"], log)
    importances = None
    if len(complete) >= 2:
        try:
            import optuna

            ev = optuna.importance.PedAnovaImportanceEvaluator()
            importances = {k: float(v) for k, v in optuna.importance.get_param_importances(study, evaluator=ev).items()}
        except Exception as e:  # noqa: BLE001 - importance needs enough varied trials
            log(f"parameter importance not computed: {e}")
    summary = {
        "kind": "sweep",
        "objective": OBJECTIVE,
        "direction": "maximize",
        "storage": store_name,
        "study_name": study.study_name,
        "base_config": str(config_path),
        "search_space": {k: describe(v) for k, v in space.items()},
        "trials": trials,
        "best": best,
        "importances": importances,
    }
    write_json(out / "sweep.json", summary)
    write_text(out / "sweep.md", sweep_markdown(summary))
    try:
        plot_history(summary, out / "plots" / "sweep_history.png")
        if importances:
            plot_importance(importances, out / "plots" / "sweep_importance.png")
    except Exception as e:  # noqa: BLE001 - a plot never fails the sweep
        log(f"sweep plots failed: {e}")
    return summary


def evaluate_on_test(out: Path, base: BTPConfig, bt: Any, trial_dir: str, log: Log) -> tuple[dict, str]:
    """The best trial's trained target on the test split, once: its iteration folders are
    copied into best_test/trial_<n>/ and run_btp only evaluates (nothing is retrained).
    The MBPP split the trials were scored on (``base``'s, :func:`scored_mbpp_splits`) is
    left out of its held-out sets (MBPP+'s validation tasks)."""
    dest = out / "best_test" / f"trial_{bt.number}"
    src = out / trial_dir
    cfg = build_config({**base.model_dump(), **bt.params, "eval_split": "test", "output_dir": str(dest)}, {})
    for k in range(1, cfg.n_iterations + 1):
        if not (dest / f"iter_{k}" / "DONE").exists():
            shutil.copytree(src / f"iter_{k}", dest / f"iter_{k}", dirs_exist_ok=True)
    chosen_on = scored_mbpp_splits(base)
    log(
        f"=== best trial {bt.number} on the test split (evaluation only)"
        + (f"; MBPP's {', '.join(chosen_on)} tasks left out (the trials were scored there)" if chosen_on else "")
    )
    comp = run_btp(cfg, log=log, chosen_on=chosen_on)
    e = comp["datasets"][cfg.dataset]
    return ({k: v for k, v in e["target_after"].items() if k.startswith("pass@")}, str(dest.relative_to(out)))


def sweep_markdown(s: Mapping[str, Any]) -> str:
    names = list(s["search_space"])
    lines = [
        f"# Hyperparameter search: {s['base_config']}",
        "",
        f"- objective: {s['objective']} (maximize); storage {s['storage']}; study {s['study_name']}",
        "",
    ]
    lines += ["| parameter | searched |", "|---|---|"] + [f"| {k} | {v} |" for k, v in s["search_space"].items()]
    lines += ["", "| trial | state | value | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for t in s["trials"]:
        val = f"{t['value']:.4f}" if t["value"] is not None else "-"
        ps = [
            (f"{t['params'][k]:.4g}" if isinstance(t["params"].get(k), float) else str(t["params"].get(k, "-")))
            for k in names
        ]
        lines.append(
            f"| {t['number']} | {t['state']}{' (interrupted)' if t.get('interrupted') else ''} | {val} | "
            + " | ".join(ps)
            + " |"
        )
    b = s.get("best")
    if b:
        lines += ["", f"Best: trial {b['number']}, validation pass@1 {b['value']:.4f}."]
        if b.get("test_metrics"):
            lines.append(
                "Test split (evaluated once): "
                + ", ".join(f"{k} {fmt_metric(v)}" for k, v in b["test_metrics"].items())
            )
    if s.get("importances"):
        lines += ["", "Importance (PED-ANOVA): " + ", ".join(f"{k} {v:.3f}" for k, v in s["importances"].items())]
    return "\n".join(lines) + "\n"


def plot_history(s: Mapping[str, Any], path: Path) -> None:
    """Objective per trial and the best so far (drawn by the report's plot_sweep_history)."""
    if any(t["state"] == "COMPLETE" and t["value"] is not None for t in s["trials"]):
        plot_sweep_history(s["trials"], path, direction=s.get("direction", "maximize"), objective=s["objective"])


def plot_importance(imp: Mapping[str, float], path: Path) -> None:
    """Hyperparameter importances (drawn by the report's plot_importance)."""
    draw(imp, path)
