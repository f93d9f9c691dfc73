"""``python -m mnist_lit tune``: hyperparameter search with Optuna, each trial a real ``fit`` of this project.

    python -m mnist_lit tune --config configs/mnist.yaml --search configs/search.yaml --n_trials 20

Every other flag is a ``fit`` flag and fixes that setting for all trials. Each trial is built by the
project's LightningCLI from the recipe, the flags and the trial's values, so every default and check of
``fit`` applies; Optuna's Lightning callback reports ``val/acc`` after each epoch and prunes hopeless
trials. A study lives in ``tune/<study_name>/``: ``study.db`` (the default storage), ``trials/trial_N/``
(each a fit run: config.yaml, checkpoints, TensorBoard events), ``best.yaml`` and the plots. Running
the same command again resumes the study; other processes or machines pointed at the same storage
share it.
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import yaml
from jsonargparse.typing import PositiveInt
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalRedisBackend
from optuna.trial import FrozenTrial, Trial, TrialState
from optuna_integration import PyTorchLightningPruningCallback
from rich.console import Console
from rich.table import Table

from mnist_lit.cli import MNISTCLI, RUN_LOGGER, CommandParser, build_cli
from mnist_lit.errors import UserError
from mnist_lit.faults import TrainingDiverged

METRIC = "val/acc"  # reported after every epoch (pruning); a trial's value is its best, val/acc_best
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PRUNERS = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner}
SEARCH_KEYS = ("params", "pruner", "sampler", "enqueue")
# A worker whose process died leaves its trial RUNNING; an RDB storage notices the missing heartbeats
# and the retry callback queues the trial again.
HEARTBEAT_S = 30
DESCRIPTION = (
    "Hyperparameter search with Optuna: each trial is a `fit` of the recipe (--config) with values from "
    "the search space (--search), pruned when hopeless. Every `fit` flag (--data.*, --model.*, "
    "--trainer.*, --seed_everything) is accepted too and fixes that setting for all trials."
)


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a trial: the trial is queued to run again, and the study stops."""


class StudyFull(Exception):
    """Another worker started the study's last trial a moment before this one: this one is not run."""


# ---------------------------------------------------------------------------------------------- search


def load_search(path: str) -> dict:
    """The search file as a dict, its top-level keys checked."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--search {path}: file does not exist")
    try:
        search = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"--search {path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(search, dict) or not isinstance(search.get("params"), dict) or not search["params"]:
        raise UserError(f"{path}: needs a `params:` mapping of fit settings to ranges or lists of choices")
    unknown = sorted(set(search) - set(SEARCH_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(SEARCH_KEYS)})")
    return search


def _number(value: object, where: str) -> int | float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{where} must be a number, not {value!r}")
    return value


def distribution(name: str, spec: object, path: str) -> optuna.distributions.BaseDistribution:
    """One parameter's Optuna distribution: a list of choices, or ``{low, high[, log][, step]}``."""
    where = f"{path}: {name}"
    try:
        if isinstance(spec, list):
            if not spec:
                raise UserError(f"{where}: the list of choices is empty")
            return optuna.distributions.CategoricalDistribution(spec)
        keys = set(spec) if isinstance(spec, dict) else set()
        if not {"low", "high"} <= keys or keys - {"low", "high", "log", "step"}:
            raise UserError(f"{where}: give a list of choices or {{low, high}} with optional log and step")
        low, high = _number(spec["low"], f"{where}: low"), _number(spec["high"], f"{where}: high")
        if low > high:
            raise UserError(f"{where}: the range is empty (low {low} > high {high})")
        step, log = spec.get("step"), bool(spec.get("log", False))
        if all(isinstance(v, int) for v in (low, high, step or 1)):
            return optuna.distributions.IntDistribution(low, high, log=log, step=step or 1)
        step = None if step is None else float(_number(step, f"{where}: step"))
        return optuna.distributions.FloatDistribution(float(low), float(high), log=log, step=step)
    except ValueError as err:  # Optuna's own checks, e.g. a log range that starts at 0
        raise UserError(f"{where}: {err}") from None


def suggest(trial: Trial, name: str, dist: optuna.distributions.BaseDistribution) -> object:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, optuna.distributions.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def flag(name: str, value: object) -> str:
    return f"--{name}={value if isinstance(value, str) else json.dumps(value)}"


def given_keys(fit_args: list[str]) -> set[str]:
    """The settings the user's flags give (``--model.lr 3e-3`` -> ``model.lr``); --config gives defaults."""
    keys = {arg[2:].split("=", 1)[0] for arg in fit_args if arg.startswith("--")}
    return keys - {"config"}


# --------------------------------------------------------------------------------------------- trials


def build_fit(args: list[str], callbacks: list | None = None) -> MNISTCLI:
    """The project's LightningCLI for a ``fit`` with these flags, classes instantiated, not yet run.

    The same classes, callbacks and defaults as ``python -m mnist_lit fit`` (tests/test_tune.py checks
    that a trial logs what a fit logs).
    """
    with warnings.catch_warnings():  # "args and sys.argv both given": on purpose, tune's argv is not fit's
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return _build_fit(args, callbacks)


def _build_fit(args: list[str], callbacks: list | None) -> MNISTCLI:
    return build_cli(args, run=False, callbacks=tuple(callbacks or ()))


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's and its seeding's info lines held back (logging levels, restored after)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class Study:
    """One tune command: the search space, the fit flags, and the Optuna study they feed."""

    def __init__(self, fit_args: list[str], search_path: str, n_trials: int, study_name: str | None) -> None:
        self.search = load_search(search_path)
        self.search_path = search_path
        self.n_trials = n_trials
        self.fit_args = fit_args
        self.name = study_name or Path(search_path).stem
        # Piped to a file or a log, rich would cut the table to 80 columns and truncate the setting names.
        self.console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
        dists = {name: distribution(name, spec, search_path) for name, spec in self.search["params"].items()}
        with quiet_lightning():  # a check: each trial prints Lightning's start-up lines itself
            base = build_fit(fit_args)  # the user's recipe and flags, checked as fit checks them
        self.parser = base.parser
        self.known = set(base.config.keys())
        self.folder = Path(base.config.trainer.default_root_dir or ".") / "tune" / self.name
        self.space = self._space(dists, given_keys(fit_args))
        self.stop_requested = False

    def _space(self, dists: dict, given: set[str]) -> dict:
        space = {}
        for name, dist in dists.items():
            if name not in self.known:
                close = sorted(k for k in self.known if k.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1])
                hint = f" (did you mean {close[0]}?)" if close else " (a fit flag without --, e.g. model.lr)"
                raise UserError(f"{self.search_path}: unknown parameter {name!r}{hint}")
            if name in given or name.split(".")[0] in given:
                self.console.print(f"{name}: fixed by --{name}, not searched")
                continue
            self._check_values(name, dist)
            space[name] = dist
        return space

    def _check_values(self, name: str, dist: optuna.distributions.BaseDistribution) -> None:
        """Refuse now, naming the search file, a value that fit would refuse in the middle of the study."""
        values = (
            dist.choices
            if isinstance(dist, optuna.distributions.CategoricalDistribution)
            else (dist.low, dist.high)
        )
        self.parser.exit_on_error = False  # raise, instead of printing fit's one line and exiting
        try:
            for value in values:
                try:
                    self.parser.parse_args([*self.fit_args, flag(name, value)])
                except Exception as err:
                    reason = " ".join(str(err).split()).replace(f'Parser key "{name}":', "").strip()
                    refused = f"{self.search_path}: {name}: {value!r} is refused by fit"
                    raise UserError(f"{refused}: {reason}") from None
        finally:
            self.parser.exit_on_error = True

    def open(self, storage: str | None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.storage_url = storage or f"sqlite:///{self.folder / 'study.db'}"
        pruner_spec = dict(self.search.get("pruner") or {"name": "median"})
        pruner_name = pruner_spec.pop("name", "median")
        try:
            if pruner_name == "none":
                pruner = optuna.pruners.NopPruner()
            else:
                pruner = PRUNERS[pruner_name](**pruner_spec)
        except KeyError:
            known = ", ".join([*PRUNERS, "none"])
            raise UserError(f"{self.search_path}: pruner {pruner_name!r} is not one of {known}") from None
        except (TypeError, ValueError) as err:
            raise UserError(f"{self.search_path}: pruner: {err}") from None
        try:
            sampler = optuna.samplers.TPESampler(**(self.search.get("sampler") or {}))
        except (TypeError, ValueError) as err:
            raise UserError(f"{self.search_path}: sampler: {err}") from None
        self.study = optuna.create_study(
            study_name=self.name,
            storage=open_storage(self.storage_url),
            direction="maximize",
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
        if self.study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise UserError(f"--storage {self.storage_url}: study {self.name!r} minimizes; tune maximizes")
        for params in self.search.get("enqueue") or []:
            wanted = {k: v for k, v in params.items() if k in self.space}
            unknown = sorted(set(params) - self.known)
            if unknown:
                raise UserError(f"{self.search_path}: enqueue: unknown parameter {unknown[0]!r}")
            self.study.enqueue_trial(wanted, skip_if_exists=True)

    def counts(self) -> tuple[int, int]:
        """(finished, running) trials of the whole study, every worker's."""
        trials = self.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
        finished = sum(t.state in FINISHED for t in trials)
        return finished, len(trials) - finished

    def run(self) -> None:
        finished, running = self.counts()
        searched = ", ".join(self.space) or "nothing (every parameter is fixed)"
        self.console.print(
            f"study {self.name!r} in {self.folder}/ ({self.storage_url}): {finished} of {self.n_trials} "
            f"trials finished{f', {running} running elsewhere' if running else ''}; searching {searched}"
        )
        while True:
            self.requeue_dead_trials()
            finished, running = self.counts()
            if finished + running >= self.n_trials:
                break
            try:
                self.study.optimize(
                    self.objective,
                    n_trials=1,
                    gc_after_trial=True,
                    callbacks=[lambda _, trial: self.report_trial(trial)],
                )
            except StudyFull:
                break
            if self.stop_requested:
                raise Interrupted("stopped by a signal as a trial ended; run the same command again to go on")

    def requeue_dead_trials(self) -> None:
        """Trials left RUNNING by a worker process that died are failed and queued to run again.

        Optuna sees them on a database by their missing heartbeats; on this machine, and for a journal
        file too, by the worker's process id.
        """
        with warnings.catch_warnings():  # Optuna marks its heartbeat API experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            host, _, pid = trial.user_attrs.get("worker", "").rpartition(":")
            if host != socket.gethostname() or not pid.isdigit() or _alive(int(pid)):
                continue
            try:
                self.study.tell(trial.number, state=TrialState.FAIL)
            except (ValueError, RuntimeError):  # another worker of this machine got there first
                continue
            self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            self.console.print(f"trial {trial.number}: its worker (pid {pid}) is gone; queued to run again")

    def objective(self, trial: Trial) -> float:
        earlier = [t for t in self.study.get_trials(deepcopy=False) if t.number < trial.number]
        taken = sum(t.state in (*FINISHED, TrialState.RUNNING) for t in earlier)
        if taken >= self.n_trials:
            trial.set_user_attr("not_run", "the study had all its trials when this one started")
            raise StudyFull
        values = {name: suggest(trial, name, dist) for name, dist in self.space.items()}
        run_dir = self.folder / "trials" / f"trial_{trial.number:03d}"
        trial.set_user_attr("run", str(run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        shown = " ".join(f"{k}={_short(v)}" for k, v in values.items())
        self.console.print(f"trial {trial.number}: {shown} -> {run_dir}/")
        logger = {
            "class_path": RUN_LOGGER,
            "init_args": {"save_dir": str(self.folder.resolve()), "name": "trials", "version": run_dir.name},
        }
        args = [*self.fit_args, *(flag(k, v) for k, v in values.items()), flag("trainer.logger", logger)]
        try:
            fit = build_fit(args, [PyTorchLightningPruningCallback(trial, monitor=METRIC)])
            fit.trainer.fit(fit.model, datamodule=fit.datamodule)
        except TrainingDiverged as err:  # a learning rate that blows up is as hopeless as one too small
            raise optuna.TrialPruned(str(err)) from None
        except (SystemExit, KeyboardInterrupt):  # SIGTERMException is a SystemExit; Lightning exits on Ctrl-C
            self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            raise Interrupted(
                f"trial {trial.number} stopped by a signal; it is queued to run again: run the same command "
                "again to go on"
            ) from None
        self.stop_requested = fit.trainer.received_sigterm  # a signal during the last validation
        trial.set_user_attr("epochs", fit.trainer.current_epoch)
        checkpoint = fit.trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.best_model_path:
            trial.set_user_attr("checkpoint", checkpoint.best_model_path)
        return float(fit.trainer.callback_metrics["val/acc_best"])

    def report_trial(self, trial: FrozenTrial) -> None:
        if trial.state == TrialState.PRUNED:
            steps = trial.intermediate_values
            last = max(steps) if steps else None
            at = f" at epoch {last}, {METRIC} {steps[last]:.4f}" if last is not None else ""
            self.console.print(f"trial {trial.number}: pruned{at} (hopeless next to the other trials)")
        elif trial.state == TrialState.COMPLETE:
            best = self.study.best_trial
            self.console.print(
                f"trial {trial.number}: val/acc_best {trial.value:.4f} (best so far: trial {best.number}, "
                f"{best.value:.4f})"
            )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Optuna's storage for ``--storage``: a database URL, ``redis://...``, or a journal file's path."""
    try:
        if url.startswith("redis"):
            return JournalStorage(JournalRedisBackend(url))
        if "://" not in url:  # a path: Optuna's journal file, fine on a shared filesystem (NFS)
            if not Path(url).resolve().parent.is_dir():
                raise UserError(f"--storage {url}: folder {Path(url).parent} does not exist")
            return JournalStorage(JournalFileBackend(url))
        # SQLite serializes writers: several workers on one file wait for each other, up to a minute.
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
        with warnings.catch_warnings():  # Optuna marks its heartbeat API experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=HEARTBEAT_S,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
            )
    except UserError:
        raise
    except Exception as err:  # SQLAlchemy, the database driver or the filesystem, each in its own words
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"--storage {url} cannot be opened: {reason}") from None


# -------------------------------------------------------------------------------------------- results


def write_results(study: Study) -> None:
    """The table of best trials, best.yaml and the plots, from what the storage holds now."""
    trials = study.study.get_trials(deepcopy=False)
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    study.console.print(
        f"study {study.name!r}: {len(done) + pruned} finished trials ({len(done)} complete, {pruned} pruned)"
        + (f", {running} still running in other workers" if running else "")
    )
    if not done:
        return
    names = sorted({name for t in done for name in t.params})
    table = Table(title=f"best trials of {study.name!r}")
    for column in ("trial", "val/acc_best", "epochs", *names):
        table.add_column(column, justify="right")
    for t in done[:5]:
        table.add_row(
            str(t.number), f"{t.value:.4f}", str(t.user_attrs.get("epochs", "")),
            *(_short(t.params[n]) if n in t.params else "" for n in names),
        )  # fmt: skip
    study.console.print(table)
    best = done[0]
    path = study.folder / "best.yaml"
    write_atomic(path, best_recipe(study, best).encode())
    study.console.print(
        f"Best recipe: {path} (trial {best.number}, val/acc_best {best.value:.4f}): "
        f"python -m mnist_lit fit --config {path}"
    )
    plots = write_plots(study)
    if plots:
        study.console.print(f"Plots: {', '.join(str(p) for p in plots)}")
    study.console.print(f"Every trial in TensorBoard (HPARAMS tab): tensorboard --logdir {study.folder}")


def best_recipe(study: Study, best: FrozenTrial) -> str:
    """The recipe and flags with the best trial's values, as a YAML recipe: what differs from the defaults."""
    values = [flag(name, value) for name, value in best.params.items()]
    config = yaml.safe_load(study.parser.dump(study.parser.parse_args([*study.fit_args, *values])))
    defaults = yaml.safe_load(study.parser.dump(study.parser.get_defaults()))
    recipe = _differences(config, defaults) or {}
    recipe["seed_everything"] = config["seed_everything"]
    for name in best.params:  # searched values stay in the recipe even where they equal the defaults
        section, key = name.split(".", 1)[0], name.split(".")[1:]
        node = recipe.setdefault(section, {})
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = best.params[name]
    header = (
        f"# The best recipe of tune study {study.name!r} ({study.storage_url}): trial {best.number}, "
        f"val/acc_best {best.value:.4f}.\n# python -m mnist_lit fit --config {study.folder / 'best.yaml'}\n"
    )
    ordered = {k: recipe[k] for k in ("seed_everything", "trainer", "model", "data") if k in recipe}
    ordered.update({k: v for k, v in recipe.items() if k not in ordered})
    return header + yaml.safe_dump(ordered, sort_keys=False)


def _differences(config: object, defaults: object) -> object:
    if isinstance(config, dict) and isinstance(defaults, dict):
        diff = {k: _differences(v, defaults.get(k)) for k, v in config.items() if v != defaults.get(k)}
        return {k: v for k, v in diff.items() if v is not None} or None
    return config


def write_plots(study: Study) -> list[Path]:
    """Optuna's own plots (matplotlib backend), as PNG files in the study folder."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from optuna.visualization import matplotlib as plots

    written = []
    for name, plot in (
        ("history", plots.plot_optimization_history),
        ("importances", plots.plot_param_importances),
        ("intermediate", plots.plot_intermediate_values),
    ):
        with warnings.catch_warnings():  # the matplotlib backend is marked experimental by Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                axes = plot(study.study)
            except (ValueError, RuntimeError) as err:  # e.g. importances need two complete trials
                study.console.print(f"{name} plot skipped: {err}")
                continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        path = study.folder / f"{name}.png"
        tmp = path.with_suffix(f".{os.getpid()}.png")
        figure.savefig(tmp, dpi=100)
        os.replace(tmp, path)
        matplotlib.pyplot.close(figure)
        written.append(path)
    return written


def write_atomic(path: Path, data: bytes) -> None:
    """Other workers may write the same file at the same moment: each replaces it whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ CLI


def tune_parser() -> CommandParser:
    parser = CommandParser(prog="python -m mnist_lit tune", description=DESCRIPTION)
    add = parser.add_argument
    add("--search", type=str, required=True, help="YAML file of the search space (see configs/search.yaml).")
    add("--n_trials", type=PositiveInt, default=20, help="Finished trials the study is to have in all.")
    add("--storage", type=str, default=None, help=(
        "Optuna storage: a database URL (sqlite:///..., postgresql://..., mysql://...) or a journal file's "
        "path; default tune/<study_name>/study.db."
    ))  # fmt: skip
    add("--study_name", type=str, default=None, help="The study's name, and its folder tune/<study_name>/; "
        "default the search file's name.")  # fmt: skip
    add("--n_jobs", type=PositiveInt, default=1, help="Worker processes on this machine sharing the study.")
    return parser


TUNE_FLAGS = ("--search", "--n_trials", "--storage", "--study_name", "--n_jobs")


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(tune's own flags, fit's flags)."""
    ours, theirs = [], []
    args = iter(argv)
    for arg in args:
        name = arg.split("=", 1)[0]
        if arg in ("-h", "--help"):
            ours.append(arg)
        elif name in TUNE_FLAGS:
            ours.append(arg) if "=" in arg else ours.extend([arg, next(args, "")])
        else:
            theirs.append(arg)
    return ours, theirs


def without_n_jobs(argv: list[str]) -> list[str]:
    """The same command for one worker process: ``--n_jobs`` and its value left out."""
    kept, skip = [], False
    for arg in argv:
        if not skip and not arg.startswith("--n_jobs"):
            kept.append(arg)
        skip = arg == "--n_jobs"
    return kept


def tune(argv: list[str]) -> None:
    """``python -m mnist_lit tune ARGS``."""
    ours, fit_args = split_args(argv)
    options = tune_parser().parse_args(ours)
    verbosity = optuna.logging.get_verbosity()
    # Optuna's own log lines are replaced by ours: one per trial, and a failed trial's traceback (a Ctrl-C
    # is one to Optuna) becomes our one-line error.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = Study(fit_args, options.search, options.n_trials, options.study_name)
        study.open(options.storage)
        run_workers(study, argv, options.n_jobs)
    finally:
        optuna.logging.set_verbosity(verbosity)
    write_results(study)


def run_workers(study: Study, argv: list[str], n_jobs: int) -> None:
    """This process, and ``n_jobs - 1`` more running the same command, work on the study until it is done."""
    workers = []
    command = [sys.executable, "-m", "mnist_lit", "tune", *without_n_jobs(argv)]
    for number in range(1, n_jobs):
        log = study.folder / f"worker_{number}.log"
        with open(log, "w") as out:
            workers.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT))
        study.console.print(f"worker {number}: pid {workers[-1].pid}, output in {log}")
    try:
        study.run()
    except (Interrupted, KeyboardInterrupt) as err:
        for worker in workers:  # Ctrl-C in a terminal reaches them too, a kill of this process does not
            worker.send_signal(signal.SIGINT)
        for worker in workers:
            worker.wait()
        why = str(err) or "run the same command again to go on"
        raise UserError(f"interrupted: {why}") from None
    failed = [worker for worker in workers if worker.wait() != 0]
    if failed:
        raise UserError(f"worker pid {failed[0].pid} failed: see {study.folder}/worker_*.log")
