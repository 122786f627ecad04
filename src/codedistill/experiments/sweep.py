"""``codedistill sweep CONFIG.yaml --trials N``: step 4, a hyperparameter search with Optuna.

* Search space (:func:`search_space`): sampling alpha, P2Value alpha, replay size,
  learning rate, LoRA rank, epochs per iteration, beam width.
* Objective: the target's pass@1 on the **validation** split (synth's validation split,
  MBPP 511-600) after the last iteration; never the test split. Each trial's per-iteration
  validation pass@1 is reported to Optuna, and the median pruner stops weak trials.
* TPE sampler with a fixed seed. Storage: a journal file ``OUT/optuna_journal.log``
  (``optuna.storages.JournalStorage`` + ``JournalFileBackend``: append-only, resumes after a
  crash, several processes on one file system can share it), or any database URL
  (``--storage postgresql://...``) for workers on several machines.
* Trials share ``OUT/cache`` (or ``--cache-dir``): source beams, verdicts and the base
  target's validation evaluation are generated once per setting.
* Resume: rerun the command. A trial left RUNNING by a process of this host that no longer
  exists (``kill -9``) is marked FAIL and enqueued again with the same parameters and the
  same run directory, which resumes from what that directory holds.
* At the end the best trial is evaluated once on the test split (its trained adapters are
  reused, not retrained) and written as best.yaml, sweep.json, sweep.md and two plots. The
  leakage guard of that evaluation leaves out the tasks of the MBPP split the trials were
  scored on (:func:`codedistill.btp.plan.scored_mbpp_splits`): MBPP+'s 39 tasks in MBPP's
  validation split (511-600) are not counted in its MBPP+ numbers, and its protocol line
  says so.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from codedistill.btp.config import BTPConfig, build_config, load_config_file
from codedistill.btp.loop import run_btp
from codedistill.btp.plan import scored_mbpp_splits
from codedistill.data import load_problems
from codedistill.experiments.run import ensure_models, load_experiment
from codedistill.report.format import fmt_metric
from codedistill.report.plots import plot_importance as draw
from codedistill.report.plots import plot_sweep_history
from codedistill.runs import write_json

Log = Callable[[str], None]
#: the split each trial is evaluated on (the objective's); the best trial's test evaluation
#: leaves out what the trials scored there (scored_mbpp_splits)
OBJECTIVE_SPLIT = "validation"
OBJECTIVE = f"{OBJECTIVE_SPLIT} pass@1"
FINISHED = ("COMPLETE", "PRUNED")


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


def make_storage(out: Path, storage: str | None) -> tuple[Any, str]:
    if storage and "://" in storage:
        return storage, storage  # a database URL (RDB storage) for a cluster
    path = Path(storage) if storage else out / "optuna_journal.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path))), f"journal:{path}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def open_study(name: str, storage: Any, seed: int, n_trials: int) -> Any:
    """Create or load the study. Its TPE sampler is seeded by (seed, trials so far): a sampler
    restarted from the bare seed would replay its random stream and propose the first
    trials' parameters again after every resume (seen in a demo-size sweep)."""
    import optuna

    def sampler(s: int) -> Any:
        return optuna.samplers.TPESampler(seed=s, n_startup_trials=min(4, max(1, n_trials // 2)))

    study = optuna.create_study(
        study_name=name,
        storage=storage,
        load_if_exists=True,
        direction="maximize",
        sampler=sampler(seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    )
    if study.trials:
        study.sampler = sampler(seed + len(study.trials))
    return study


def recover_interrupted(study: Any, log: Log) -> int:
    """Trials RUNNING for a dead process of this host: FAIL + enqueue again (same run dir)."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") != host or _alive(int(t.user_attrs.get("pid", -1))):
            continue
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study.tell(t.number, state=TrialState.FAIL)
        run_no = t.user_attrs.get("run_number", t.number)
        study.enqueue_trial(dict(t.params), user_attrs={"run_number": run_no})
        log(
            f"trial {t.number} was interrupted (process {t.user_attrs.get('pid')} is gone): enqueued again, "
            f"resuming trials/{run_no}"
        )
        n += 1
    return n


def counted(study: Any) -> int:
    """Trials that count towards --trials: finished ones and real failures (not interrupted)."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state.name in FINISHED or (t.state.name == "FAIL" and not t.user_attrs.get("interrupted")):
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
) -> dict[str, Any]:
    import optuna
    from optuna.trial import TrialState

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
    store, store_name = make_storage(out, storage)
    name = study_name or f"btp-sweep-{Path(config_path).stem}"
    study = open_study(name, store, base.seed, n_trials)
    recover_interrupted(study, log)
    values = base.model_dump()

    def objective(trial: Any) -> float:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = suggest(trial, space)
        run_no = trial.user_attrs.get("run_number", trial.number)
        trial.set_user_attr("run_number", run_no)
        cfg = build_config({**values, **params, "output_dir": str(out / "trials" / str(run_no))}, {})
        log(
            f"=== trial {trial.number} (trials/{run_no}): "
            + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        )

        def report(k: int, metrics: Mapping[str, Any]) -> None:
            trial.report(float(metrics[cfg.dataset]["pass@1"]["value"]), k)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation pass@1 after iteration {k} below the median")

        comp = run_btp(cfg, log=log, on_iteration=report)
        return float(comp["datasets"][cfg.dataset]["target_after"]["pass@1"]["value"])

    left = n_trials - counted(study)
    if left > 0:
        study.optimize(
            objective,
            n_trials=left,
            catch=(Exception,),
            callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED))],
        )
    return write_sweep(study, out, config_path, base, space, store_name, evaluate_best, log)


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

    trials = []
    for t in study.get_trials(deepcopy=False):
        trials.append(
            {
                "number": t.number,
                "state": t.state.name,
                "params": dict(t.params),
                "value": t.value,
                "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                "run_dir": f"trials/{t.user_attrs.get('run_number', t.number)}",
                "interrupted": bool(t.user_attrs.get("interrupted")),
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
            "run_dir": f"trials/{bt.user_attrs.get('run_number', bt.number)}",
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
        (out / "best.yaml").write_text(text, encoding="utf-8")
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
    (out / "sweep.md").write_text(sweep_markdown(summary), encoding="utf-8")
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
