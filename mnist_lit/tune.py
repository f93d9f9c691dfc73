"""``python -m mnist_lit tune``: hyperparameter search with Optuna, each trial a real ``fit`` of this project.

    python -m mnist_lit tune --config configs/mnist.yaml --search configs/search.yaml --n_trials 20

Every flag other than tune's own is a ``fit`` flag and fixes that setting for all trials. Each trial is
built by the project's LightningCLI from the recipe, the flags and the trial's values, so every default
and check of ``fit`` applies; Optuna's Lightning callback reports ``val/acc`` after each epoch and the
pruner stops hopeless trials. Optuna does the rest: the storage (SQLite by default, any SQLAlchemy
database URL), the sampler and pruner named in the search file, and heartbeats that put a dead worker's
trial back in the queue. Several workers are the same command run several times on one storage.
"""

import argparse
import difflib
import importlib
import io
import json
import os
import re
import shlex
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import sqlalchemy.exc
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, Trial, TrialState
from optuna_integration import PyTorchLightningPruningCallback
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url

from mnist_lit.cli import build_cli
from mnist_lit.errors import UserError, first_line
from mnist_lit.faults import TrainingDiverged
from mnist_lit.messages import flags_of

METRIC = "val/acc"  # reported after every epoch (pruning); a trial's value is its best, val/acc_best
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SEARCH_KEYS = ("params", "sampler", "pruner", "enqueue")
# A worker that dies (killed, out of memory, power cut) stops beating; after two missed beats any worker
# of the study fails its trial and queues it again, up to 3 times (a trial that kills its worker each time
# is not retried for ever).
HEARTBEAT_S = 30
MAX_RETRY = 3
# Settings (or prefixes) of the search's run, not of the recipe: best.yaml names them in a comment only.
NOT_RECIPE = (
    "data.data_dir",
    "trainer.limit_",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
)


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during trial ``args[0]`` (an Exception: Optuna records the trial as failed)."""


class StudyFull(Exception):
    """Another worker started the study's last trial a moment before this one: this one is not run."""


@contextmanager
def optuna_experimental() -> Iterator[None]:
    """Optuna marks heartbeats, the retry callback and its matplotlib plots experimental: used on purpose."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


# ---------------------------------------------------------------------------------------- search file


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


def distribution(name: str, spec: object, path: str) -> BaseDistribution:
    """One parameter's Optuna distribution: a list of choices, or ``{low, high[, log][, step]}``."""
    where = f"{path}: {name}"
    if isinstance(spec, list) and spec:
        return CategoricalDistribution(spec)
    if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) <= {"low", "high", "log", "step"}:
        raise UserError(
            f"{where}: give a non-empty list of choices, or {{low, high}} with optional log, step"
        )
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), bool(spec.get("log"))
    try:
        if all(type(v) is int for v in (low, high, step or 1)):
            return IntDistribution(low, high, log=log, step=step or 1)
        # float(): YAML 1.1 reads 1e-4 (no dot) as a string.
        return FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))
    except (TypeError, ValueError) as err:  # not a number, or Optuna's checks: low > high, a log range from 0
        raise UserError(f"{where}: {err}") from None


def optuna_object(spec: object, key: str, base: type, path: str) -> object:
    """The sampler or pruner the search file names: ``{class_path: optuna.pruners.MedianPruner, init_args}``.

    Any class of that kind works, Optuna's or your own; None (the key left out) means Optuna's default.
    """
    if spec is None:
        return None
    example = f"{{class_path: {base.__module__.split('._')[0]}.ClassName, init_args: {{...}}}}"
    if not isinstance(spec, dict) or "class_path" not in spec or set(spec) - {"class_path", "init_args"}:
        raise UserError(f"{path}: {key}: give {example}")
    module, _, name = str(spec["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"{path}: {key}: no class {spec['class_path']!r}; give {example}") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise UserError(f"{path}: {key}: {spec['class_path']} is not a {base.__name__}")
    try:
        return cls(**(spec.get("init_args") or {}))
    except (TypeError, ValueError) as err:  # an argument it does not take, or a value it refuses
        raise UserError(f"{path}: {key}: {spec['class_path']}: {err}") from None


# ------------------------------------------------------------------------------------------------ trials


def build_fit(args: list[str], callbacks: list | None = None) -> LightningCLI:
    """The project's LightningCLI for a ``fit`` with these flags, classes instantiated, not yet run.

    The same classes, callbacks and defaults as ``python -m mnist_lit fit`` (tests/test_tune.py checks
    that a trial logs what a fit logs).
    """
    with warnings.catch_warnings():  # "args and sys.argv both given": on purpose, tune's argv is not fit's
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return build_cli(args, run=False, callbacks=tuple(callbacks or ()))


def flag(name: str, value: object) -> str:
    return f"--{name}={value if isinstance(value, str) else json.dumps(value)}"


def suggest(trial: Trial, name: str, dist: BaseDistribution) -> object:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Study:
    """One tune command: the search space, the fit flags, and the Optuna study they feed."""

    def __init__(self, fit_args: list[str], options: argparse.Namespace) -> None:
        self.search_path, self.n_trials, self.fit_args = options.search, options.n_trials, fit_args
        path = self.search_path
        self.search = load_search(path)
        dists = {name: distribution(name, spec, path) for name, spec in self.search["params"].items()}
        self.sampler = optuna_object(self.search.get("sampler"), "sampler", optuna.samplers.BaseSampler, path)
        self.pruner = optuna_object(self.search.get("pruner"), "pruner", optuna.pruners.BasePruner, path)
        # Piped to a file or a log, rich would cut the table to 80 columns and truncate the setting names.
        self.console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
        base = build_fit(fit_args)  # the user's recipe and flags, checked as fit checks them
        self.parser = base.parser
        self.name = options.study_name or Path(self.search_path).stem
        self.folder = Path(base.config.trainer.default_root_dir or ".") / "tune" / self.name
        self.known = set(base.config.keys())
        given = {arg[2:].split("=", 1)[0] for arg in fit_args if arg.startswith("--")} - {"config"}
        self.space = {}
        for name, dist in dists.items():
            self._check_name(name)
            if name in given or name.split(".")[0] in given:
                self.console.print(f"{name}: fixed by --{name}, not searched")
                continue
            values = dist.choices if isinstance(dist, CategoricalDistribution) else (dist.low, dist.high)
            for value in values:
                self.check({name: value})
            self.space[name] = dist
        self.stopping = False  # a signal came during a trial's last validation: stop after it

    def _check_name(self, name: str) -> None:
        if name in self.known:
            return
        same_leaf = sorted(k for k in self.known if k.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1])
        close = same_leaf or difflib.get_close_matches(name, sorted(self.known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else " (a fit flag without --, e.g. model.lr)"
        raise UserError(f"{self.search_path}: unknown parameter {name!r}{hint}")

    def check(self, values: dict) -> None:
        """Refuse, naming the search file, values that fit would refuse in the middle of the study."""
        self.parser.exit_on_error = False  # raise, instead of printing fit's one line and exiting
        try:
            self.parser.parse_args([*self.fit_args, *(flag(k, v) for k, v in values.items())])
        except Exception as err:  # jsonargparse's ArgumentError, or a check of ours at parse time
            shown = ", ".join(f"{k}: {v!r}" for k, v in values.items())
            reason = " ".join(str(err).split())
            raise UserError(f"{self.search_path}: {shown} is refused by fit: {reason}") from None
        finally:
            self.parser.exit_on_error = True

    def open(self, storage: str | None) -> None:
        url = storage or f"sqlite:///{self.folder / 'study.db'}"
        self.storage_shown = masked(url)
        # A journal or SQLite file not made yet holds no trials, and is not made if check_folder refuses.
        file = stored_file(url)
        backend = None if file is not None and not file.exists() else open_storage(url)
        self.check_folder(url, backend)
        if backend is None:
            if storage is None:  # the default database is made in the study's folder
                self.folder.mkdir(parents=True, exist_ok=True)
            backend = open_storage(url)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.study = optuna.create_study(
            study_name=self.name,
            storage=backend,
            direction="maximize",
            sampler=self.sampler,
            pruner=self.pruner,
            load_if_exists=True,
        )
        if self.study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise UserError(f"--storage {self.storage_shown}: study {self.name!r} minimizes; tune maximizes")
        for params in self.search.get("enqueue") or []:
            for name in params:
                self._check_name(name)
            wanted = {k: v for k, v in params.items() if k in self.space}
            self.study.enqueue_trial(wanted, skip_if_exists=True)

    def check_folder(self, url: str, storage: optuna.storages.BaseStorage | None) -> None:
        """Refuse to start if the study's folder holds trial folders that are not this study's trials.

        Trial folders are named by trial number, and a study of the same name in another storage (or one
        made again) numbers its trials from 0 too: its trials would run into the other study's folders.
        """
        on_disk = sorted(p.name for p in (self.folder / "trials").glob("trial_*"))
        if not on_disk:
            return
        trials = []
        try:
            if storage is not None:
                trials = optuna.load_study(study_name=self.name, storage=storage).get_trials(deepcopy=False)
        except KeyError:  # no study of that name in this storage yet
            pass
        ours = {f"trial_{t.number:03d}" for t in trials}
        strays = [name for name in on_disk if name not in ours]
        if not strays:
            return
        own, file = self.folder / "study.db", stored_file(url)  # the folder's default database, if it has one
        own_elsewhere = own.is_file() and (file is None or file.resolve() != own.resolve())
        where = f"--storage sqlite:///{own}" if own_elsewhere else "the --storage it was run with"
        raise UserError(
            f"{self.folder}/trials/ holds {', '.join(strays[:3])}{', ...' if len(strays) > 3 else ''} of "
            f"another study {self.name!r}, not in {self.storage_shown}: give another --study_name, or "
            f"{where}"
        )

    def taken(self, before: int | None = None) -> tuple[int, int]:
        """(finished, running) trials of the whole study, every worker's; those numbered below ``before``.

        A dead worker's trial (no heartbeat for two intervals) is first failed and queued again.
        """
        with optuna_experimental():
            optuna.storages.fail_stale_trials(self.study)
        trials = self.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
        trials = [t for t in trials if before is None or t.number < before]
        finished = sum(t.state in FINISHED for t in trials)
        return finished, len(trials) - finished

    def run(self) -> None:
        finished, running = self.taken()
        searched = ", ".join(self.space) or "nothing (every parameter is fixed)"
        elsewhere = f", {running} running elsewhere" if running else ""
        self.console.print(
            f"study {self.name!r} in {self.folder}/ ({self.storage_shown}): {finished} of {self.n_trials} "
            f"trials finished{elsewhere}; searching {searched}"
        )
        while sum(self.taken()) < self.n_trials:
            try:
                # One trial at a time, so that the count is looked at again between trials: other
                # workers add to it. Optuna beats the trial's heartbeat while it runs.
                self.study.optimize(self.objective, n_trials=1, gc_after_trial=True, callbacks=[self.report])
            except StudyFull:
                break
            except Interrupted as stop:
                trial = self.study.get_trials(deepcopy=False)[stop.args[0]]
                with optuna_experimental():  # the same queueing as for a dead worker's trial
                    RetryHeartbeatStaleTrialCallback()(self.study, trial)
                raise UserError(
                    f"interrupted: trial {trial.number} stopped by a signal; it is queued to run again: run "
                    "the same command again to go on"
                ) from None
            if self.stopping:
                raise UserError(
                    "interrupted: stopped by a signal as a trial ended; run the same command again"
                )

    def objective(self, trial: Trial) -> float:
        if sum(self.taken(before=trial.number)) >= self.n_trials:
            trial.set_user_attr("not_run", "the study had all its trials when this one started")
            raise StudyFull
        values = {name: suggest(trial, name, dist) for name, dist in self.space.items()}
        self.check(values)
        run_dir = self.folder / "trials" / f"trial_{trial.number:03d}"
        trial.set_user_attr("run", str(run_dir))
        shown = " ".join(f"{k}={_short(v)}" for k, v in values.items())
        self.console.print(f"trial {trial.number}: {shown} -> {run_dir}/")
        logger = {
            "class_path": "mnist_lit.logger.RunLogger",
            "init_args": {"save_dir": str(self.folder.resolve()), "name": "trials", "version": run_dir.name},
        }
        args = [*self.fit_args, *(flag(k, v) for k, v in values.items()), flag("trainer.logger", logger)]
        fit = None
        try:
            fit = build_fit(args, [PyTorchLightningPruningCallback(trial, monitor=METRIC)])
            fit.trainer.fit(fit.model, datamodule=fit.datamodule)
        except TrainingDiverged as err:  # a learning rate that blows up is as hopeless as one too small
            raise optuna.TrialPruned(str(err)) from None
        except (SIGTERMException, KeyboardInterrupt):  # Lightning ends a fit stopped by a signal with these
            raise Interrupted(trial.number) from None
        except SystemExit:
            # Ctrl-C before training started (setup, the sanity check): Lightning ends the process with
            # exit(1), which Optuna does not catch, and the trial would be left running. It is queued again.
            if fit is None or not fit.trainer.interrupted:
                raise
            raise Interrupted(trial.number) from None
        self.stopping = fit.trainer.received_sigterm
        trial.set_user_attr("epochs", fit.trainer.current_epoch)
        return float(fit.trainer.callback_metrics["val/acc_best"])

    def report(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.PRUNED:
            steps = trial.intermediate_values
            at = f" at epoch {max(steps)}, {METRIC} {steps[max(steps)]:.4f}" if steps else ""
            self.console.print(f"trial {trial.number}: pruned{at} (hopeless next to the other trials)")
        elif trial.state == TrialState.COMPLETE:
            best = study.best_trial
            self.console.print(
                f"trial {trial.number}: val/acc_best {trial.value:.4f} (best so far: trial {best.number}, "
                f"{best.value:.4f})"
            )


# ----------------------------------------------------------------------------------------------- storage


# A password in any text, e.g. a URL SQLAlchemy cannot read: a URL's (scheme://user:password@host...), or
# a password= parameter's (?password=... of a URL, password=... of a libpq connection string), any case.
# Up to the URL's last @ before its path: a password may hold an @ that was not percent-encoded.
PASSWORD = re.compile(r"(://[^:/@\s]*:)[^/\s]*@|(\bpassword=)[^&\s]*", re.IGNORECASE)


def hide_passwords(text: str) -> str:
    return PASSWORD.sub(lambda m: f"{m[1]}***@" if m[1] else f"{m[2]}***", text)


def masked(url: str) -> str:
    """The storage URL as it may be printed: its passwords replaced by ***."""
    try:  # SQLAlchemy hides the password field only, not a password given as a query parameter
        return hide_passwords(make_url(url).render_as_string(hide_password=True))
    except Exception:  # not a URL SQLAlchemy can read (open_storage says so): its password hidden anyway
        return hide_passwords(url)


def stored_file(url: str) -> Path | None:
    """The local file a journal path or an SQLite URL names; None for a database server."""
    if "://" not in url:
        return Path(url)
    try:
        parsed = make_url(url)
    except Exception:  # open_storage says what is wrong with it
        return None
    return Path(parsed.database) if parsed.get_backend_name() == "sqlite" and parsed.database else None


def storage_flag(text: str) -> str:
    """--storage as given, unless it names an in-memory SQLite database (argparse's type check: exit 2)."""
    try:
        url = make_url(text)
    except Exception:  # a journal file's path, or a URL that open_storage says is wrong
        return text
    if url.get_backend_name() == "sqlite" and (
        url.database in (None, "", ":memory:")
        or url.query.get("mode") == "memory"
        or url.database.startswith("file::memory:")  # SQLite's URI form (with uri=true)
    ):
        raise argparse.ArgumentTypeError(
            f"{text} is an in-memory database, gone when the process ends and seen by no other worker: "
            "a search's storage must be kept and shared; give a file (sqlite:///study.db) or a server"
        )
    return text


def check_journal(path: str) -> None:
    """Refuse an existing file that is not an Optuna journal, before Optuna appends a line to it."""
    file = Path(path)
    if file.is_dir():
        raise UserError(f"--storage {path}: is a folder, not a journal file")
    if not file.exists():
        return  # Optuna makes it
    if not file.is_file():  # /dev/null fails Optuna's fsync, a FIFO blocks its read for ever
        raise UserError(
            f"--storage {path}: not a regular file (a device, FIFO or socket): give a journal file's path"
        )
    with file.open("rb") as f:
        first = f.readline(1 << 20)  # a bounded read: a big binary file may have no newline at all
        # Optuna's journal is JSON lines, each an operation with an op_code; an empty file is a new journal.
        try:
            entry = json.loads(first) if first.endswith(b"\n") else None
        except ValueError:  # not JSON, or not UTF-8
            entry = None
        if first and not (isinstance(entry, dict) and "op_code" in entry):
            raise UserError(
                f"--storage {path}: not an Optuna journal file (its first line is not a journal entry); give "
                "a new file's path, a database URL, or the journal of the study"
            )
        # Optuna's replay skips a last line that is not JSON (taken for one being written) and would append
        # after it; the journal then no longer replays. Only complete lines: another worker may be writing.
        for number, line in enumerate(f, 2):
            try:
                if line.endswith(b"\n"):
                    json.loads(line)
            except ValueError:
                raise UserError(
                    f"--storage {path}: not a readable Optuna journal (line {number} is not JSON)"
                ) from None


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Optuna's storage for ``--storage``: a database (RDB storage, with heartbeats and the retry of a dead
    worker's trial), or a journal file's path (for a shared filesystem without a database server)."""
    shown = masked(url)
    if "://" not in url:
        file = Path(url)
        folder = file.resolve().parent
        if not folder.is_dir():  # a link's target may be in another folder: the one that is missing is named
            raise UserError(
                f"--storage {url}: folder {file.parent if file.parent.resolve() == folder else folder} "
                "does not exist"
            )
        check_journal(url)
        try:  # Optuna replays the journal here, and fails on an entry it cannot apply
            # Journal files keep no heartbeats: a killed worker's trial stays "running" there (docs/tune.md).
            return JournalStorage(JournalFileBackend(url))
        except (ValueError, LookupError, AssertionError, TypeError) as err:
            reason = type(err).__name__ + (f": {first_line(err)}" if str(err) else "")
            raise UserError(f"--storage {url}: not a readable Optuna journal (Optuna: {reason})") from None
    scheme, rest = url.split("://", 1)
    if rest.split("/", 1)[0].count("@") > 1:  # SQLAlchemy would take the password's @ as the host's
        raise UserError(
            f"--storage {shown}: the URL holds more than one @ before its path: percent-encode an @ (%40), "
            'a : (%3A) or a / (%2F) in the user name or password (python -c "import urllib.parse; '
            "print(urllib.parse.quote(input(), safe=''))\")"
        )
    if scheme == "postgres":
        raise UserError(f"--storage {shown}: SQLAlchemy calls PostgreSQL postgresql://, not postgres://")
    # SQLite serializes writers: several workers on one file wait for each other, up to a minute.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        for attempt in range(3):
            try:
                with optuna_experimental():
                    return RDBStorage(
                        url,
                        engine_kwargs=engine,
                        heartbeat_interval=HEARTBEAT_S,
                        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
                    )
            # Workers that start together on a new database all create its tables: the losers find them
            # half made (a duplicate table or version row; SQLite says "table ... already exists") and,
            # a moment later, made.
            except (
                sqlalchemy.exc.IntegrityError,
                sqlalchemy.exc.ProgrammingError,
                sqlalchemy.exc.OperationalError,
            ):
                if attempt == 2:
                    raise
                time.sleep(1)
    except ImportError:  # Optuna's words name no module
        raise UserError(
            f"--storage {shown}: no database driver for {scheme}:// is installed: for PostgreSQL "
            "pip install -e '.[tune]' (psycopg), for MySQL pip install pymysql and use mysql+pymysql://"
        ) from None
    except Exception as err:  # SQLAlchemy or the database driver, each in its own words
        # Only passwords in a URL or password= are hidden: the password alone may be a word of the message
        # ("p" in "port").
        reason = hide_passwords(first_line(err))
        raise UserError(f"--storage {shown} cannot be opened: {reason}") from None


# ----------------------------------------------------------------------------------------------- results


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
        params = (_short(t.params[n]) if n in t.params else "" for n in names)
        table.add_row(str(t.number), f"{t.value:.4f}", str(t.user_attrs.get("epochs", "")), *params)
    study.console.print(table)
    best, path = done[0], study.folder / "best.yaml"
    recipe, command = best_recipe(study, best)
    write_atomic(path, recipe.encode())
    study.console.print(
        f"Best recipe: {path} (trial {best.number}, val/acc_best {best.value:.4f}): {command}",
        markup=False,  # a command to copy: a [ in a path is not rich markup
    )
    plots = write_plots(study)
    if plots:
        study.console.print(f"Plots: {', '.join(str(p) for p in plots)}")
    study.console.print(f"Every trial in TensorBoard (HPARAMS tab): tensorboard --logdir {study.folder}")


def best_recipe(study: Study, best: FrozenTrial) -> tuple[str, str]:
    """best.yaml: the recipe, the flags that fixed settings and the best trial's values, as a recipe; and
    the command that trains it.

    What differs from fit's defaults (jsonargparse's ``skip_default``). The search's own run settings
    (NOT_RECIPE: data folder, batch limits, progress bar...) are set back to fit's defaults and named in
    a comment, so that ``fit --config best.yaml`` trains the full recipe. The command keeps the data
    folder the study used, if one was given: without it fit would look in ./data, or download.
    """
    parser, defaults = study.parser, study.parser.get_defaults()
    config = parser.parse_args([*study.fit_args, *(flag(k, v) for k, v in best.params.items())])
    search_only = []
    for key in sorted(k for k in study.known if k.startswith(NOT_RECIPE) and config[k] != defaults[k]):
        search_only.append(flag(key, config[key]))
        config[key] = defaults[key]
    recipe = yaml.safe_load(parser.dump(config, skip_default=True)) or {}
    recipe = {"seed_everything": config.seed_everything, **recipe}  # explicit, whatever fit's default
    for name, value in best.params.items():  # searched values shown even where they equal the defaults
        *sections, key = name.split(".")
        node = recipe
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
    data = [setting for setting in search_only if setting.startswith("--data.")]
    command = shlex.join(
        ["python", "-m", "mnist_lit", "fit", "--config", str(study.folder / "best.yaml"), *data]
    )
    header = [
        f"# The best trial of tune study {study.name!r} ({study.storage_shown}): trial {best.number}, "
        f"val/acc_best {best.value:.4f}.",
        f"# {command}",
    ]
    if search_only:  # one per line: a data folder's path can be long
        header.append("# The search also ran with these flags; add them to train exactly as the trial did:")
        header += [f"#   {setting}" for setting in search_only]
    return "\n".join(header) + "\n" + yaml.safe_dump(recipe, sort_keys=False), command


def write_plots(study: Study) -> list[Path]:
    """Optuna's own plots (matplotlib backend), as PNG files in the study folder."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot
    from optuna.visualization import matplotlib as plots

    written = []
    for name, plot in (
        ("history", plots.plot_optimization_history),
        ("importances", plots.plot_param_importances),
        ("intermediate", plots.plot_intermediate_values),
    ):
        with optuna_experimental():
            try:
                axes = plot(study.study)
            except (ValueError, RuntimeError) as err:  # e.g. importances need two complete trials
                study.console.print(f"{name} plot skipped: {err}")
                continue
        axes.figure.set_size_inches(8, 5)
        axes.figure.tight_layout()
        png = io.BytesIO()
        axes.figure.savefig(png, format="png", dpi=100)
        pyplot.close(axes.figure)
        written.append(study.folder / f"{name}.png")
        write_atomic(written[-1], png.getvalue())
    return written


def write_atomic(path: Path, data: bytes) -> None:
    """Other workers may write the same file at the same moment: each replaces it whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------- CLI


class TuneParser(argparse.ArgumentParser):
    """tune's own flags; the rest go to fit. A bad flag is one line and exit status 2, as for fit's flags."""

    def error(self, message: str) -> None:
        self.exit(2, f"mnist_lit: error: {message} (see python -m mnist_lit tune --help)\n")


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def tune_parser() -> TuneParser:
    parser = TuneParser(
        prog="python -m mnist_lit tune",
        allow_abbrev=False,  # --n_trial must not pass for --n_trials, nor --search for a fit flag
        description="Hyperparameter search with Optuna: each trial is a `fit` of the recipe (--config) with "
        "values from the search space (--search), pruned when hopeless. Every `fit` flag (--data.*, "
        "--model.*, --trainer.*, --seed_everything) is accepted too and fixes that setting for all trials. "
        "Several workers: run the same command several times on one --storage.",
    )
    parser.add_argument(
        "--search", required=True, help="YAML file of the search space (configs/search.yaml)."
    )
    parser.add_argument(
        "--n_trials", type=positive, default=20, help="Finished trials the study is to have (default 20)."
    )
    parser.add_argument("--storage", type=storage_flag, help="Optuna's storage, a database URL (sqlite:///"
                        "..., postgresql://..., mysql+pymysql://...) or a journal file's path; default sqlite:///"
                        "tune/<study_name>/study.db.")  # fmt: skip
    parser.add_argument("--study_name", help="The study's name and folder tune/<study_name>/; default the "
                        "search file's name.")  # fmt: skip
    return parser


def main(argv: list[str]) -> None:
    """``python -m mnist_lit tune ARGS`` (routed here by __main__.py)."""
    tune(argv[1:])


def tune(argv: list[str]) -> None:
    """``python -m mnist_lit tune ARGS``, without the command's name."""
    parser = tune_parser()
    options, fit_args = parser.parse_known_args(argv)
    own = [flag for flag in flags_of(parser) if flag.startswith("--")]
    for arg in fit_args:  # fit's parser would say "unrecognized" of a mistyped --n_trials, without a guess
        if arg.startswith("--") and (close := difflib.get_close_matches(arg.split("=")[0], own, 1, 0.8)):
            parser.exit(2, f"mnist_lit: error: unrecognized arguments: {arg}: did you mean {close[0]}?\n")
    verbosity = optuna.logging.get_verbosity()
    # Optuna's own log lines are replaced by ours: one per trial, and a failed trial's traceback (a Ctrl-C
    # is one to Optuna) becomes our one-line error.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = Study(fit_args, options)
        study.open(options.storage)
        study.run()
        write_results(study)
    finally:
        optuna.logging.set_verbosity(verbosity)
