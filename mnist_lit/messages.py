"""What a user reads when something goes wrong: one line to act on, made only once it has gone wrong.

The libraries' own errors rewritten (jsonargparse's parse errors, the Trainer refusing its settings,
torch's unpickler refusing a checkpoint, c10d giving up on a rank): each reads their wording, so each has
a test (tests/test_messages.py) that fails when that wording changes. Then ours: what a stopped, diverged or
disk-full fit says, and where it leaves the run.
"""

import pickle
import re
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from mnist_lit.errors import first_line

# ---------------------------------------------------------------------------------------- jsonargparse

# jsonargparse's words for a value of the wrong type, e.g. "Subtypes: [<class 'int'>, <class 'NoneType'>]",
# and for one outside a restricted type's range, e.g. "Not of type PositiveInt: 0 does not conform ...".
TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "PositiveInt": "an integer above 0",
    "NonNegativeInt": "an integer of 0 or more",
    "PositiveFloat": "a number above 0",
    "NonNegativeFloat": "a number of 0 or more",
    "ClosedUnitInterval": "a number from 0 to 1",
}
UNION_ERROR = re.compile(
    r"Does not validate against any of the Union subtypes.*?Subtypes: \[(?P<types>.*?)\] Errors:"
    r".*Given value: (?P<value>.*)$"
)
LITERAL_ERROR = re.compile(r"Expected a typing\.Literal\[(?P<choices>[^]]*)\]\.? Got value: (?P<value>.*)$")
TYPE_ERROR = re.compile(r"Expected a <class '(?:[\w.]+\.)?(?P<type>\w+)'>\.? Got value: (?P<value>.*)$")
RESTRICTED_ERROR = re.compile(
    r"Not of type (?P<type>\w+): (?:(?P<value>\S+) does not conform to restriction .*"
    r"|(?:invalid literal for int\(\) with base 10|could not convert string to float): '(?P<text>.*)')$"
)
UNKNOWN_KEY = re.compile(r"unrecognized arguments: (?P<flag>--[\w.]+)", re.IGNORECASE)
SEARCH_KEYS = {"params", "sampler", "pruner", "enqueue"}  # a tune search file's (docs/tune.md)


def flags_of(parser) -> list[str]:
    """Every flag of an argparse ``parser`` and of its subcommands' parsers."""
    flags = []
    for action in parser._actions:
        flags.extend(action.option_strings)
        if isinstance(action.choices, dict):  # subcommands: name -> parser
            flags.extend(flag for sub in action.choices.values() for flag in flags_of(sub))
    return flags


def readable(message: str, known_flags: list[str] = ()) -> str:
    """jsonargparse's error message as one line; an unknown flag gets the closest known one, and an error
    inside a --config file names the file."""
    if at_fault := config_at_fault(message, known_flags):
        return at_fault
    text = " ".join(line.strip() for line in message.splitlines())
    text = re.sub(r'Parser key "([^"]+)":?', r"--\1:", text)
    union = UNION_ERROR.search(text)
    if union:
        names = re.findall(r"<class '(?:[\w.]+\.)?(\w+)'>", union["types"])
        words = [TYPE_WORDS.get(name, name) for name in names if name != "NoneType"]
        choices = [
            c.strip() for group in re.findall(r"Literal\[([^]]*)\]", union["types"]) for c in group.split(",")
        ]
        if choices:  # e.g. --trainer.precision: Literal[64, 32, 16] | Literal['16-true', ...] | None
            words.append("one of " + ", ".join(dict.fromkeys(c.strip("'") for c in choices)))
        expected = " or ".join(words) + (" (or null)" if "NoneType" in names else "")
        text = text[: union.start()] + f"expected {expected}, got {union['value'].strip()!r}"
    if choice := LITERAL_ERROR.search(text):  # e.g. --format tflite
        got = choice["value"].strip()
        text = text[: choice.start()] + f"expected one of {choice['choices']}, got {got!r}"
    if wrong := TYPE_ERROR.search(text):  # e.g. --port abc
        got = wrong["value"].strip()
        text = text[: wrong.start()] + f"expected {TYPE_WORDS.get(wrong['type'], wrong['type'])}, got {got!r}"
    if restricted := RESTRICTED_ERROR.search(text):  # e.g. --data.val_size 0, --model.lr x
        got = restricted["value"] or repr(restricted["text"])
        expected = TYPE_WORDS.get(restricted["type"], restricted["type"])
        text = text[: restricted.start()] + f"expected {expected}, got {got}"
    unknown = UNKNOWN_KEY.search(text)
    if unknown and known_flags:
        import difflib

        close = difflib.get_close_matches(unknown["flag"], known_flags, n=1, cutoff=0.8)
        if close:
            return f"{text}: did you mean {close[0]}?"
    return f"{text} (see --help)"


def config_at_fault(message: str, known_flags: list[str]) -> str | None:
    """For a YAML error or an unknown key that came from a --config file on the command line: that file
    and what is wrong in it (jsonargparse's message names neither). None when no --config file explains
    the message."""
    import difflib
    import sys

    import yaml

    argv, files = sys.argv[1:], []
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        elif arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
    # jsonargparse's words for an unknown key: "... does not accept option 'model.lrr'", or with
    # --print_config "Group 'model' does not accept option 'lrr'" and "Option 'params.x' is not accepted".
    said = re.search(
        r"does not accept (?:nested key|option) '([\w.]+)'|Option '([\w.]+)' is not accepted", message
    )
    group = re.search(r"Group '([\w.]+)' does not accept", message)
    unknown = said and (f"{group[1]}." if group else "") + (said[1] or said[2])
    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                recipe = yaml.safe_load(f)
        except OSError:
            continue  # a missing file is jsonargparse's own "File does not exist"
        except yaml.YAMLError as err:
            if "Problems parsing config" in message:
                where = getattr(err, "problem_mark", None)
                at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
                return f"--config {file}: not valid YAML{at}: {getattr(err, 'problem', None) or err}"
            continue
        if "Unexpected config" in message and not isinstance(recipe, dict):  # empty, or a bare value
            holds = "is empty" if recipe is None else f"holds {recipe!r:.60}, not settings"
            return (
                f"--config {file}: {holds}: a recipe is a YAML mapping of settings, such as "
                "`trainer: {max_epochs: 5}` (configs/ has some)"
            )
        if unknown and isinstance(recipe, dict) and "params" in recipe and set(recipe) <= SEARCH_KEYS:
            return (
                f"--config {file} is a search space for tune, not a recipe: python -m mnist_lit tune "
                f"--config RECIPE --search {file} (its comments may say which recipe it searches)"
            )
        if unknown and isinstance(recipe, dict):
            keys = [key for key in flattened(recipe) if key == unknown]
            if keys:
                close = difflib.get_close_matches(f"--{keys[0]}", known_flags, n=1, cutoff=0.8)
                hint = f": did you mean {close[0].removeprefix('--')}?" if close else " (see --help)"
                return f"--config {file}: unknown setting {keys[0]}{hint}"
    return None


def flattened(mapping: dict, prefix: str = "") -> list[str]:
    """The dotted keys of a nested mapping's leaves and branches, e.g. ["model", "model.lr"]."""
    keys = []
    for key, value in mapping.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys.extend(flattened(value, f"{prefix}{key}."))
    return keys


# -------------------------------------------------------------------------------- Lightning's Trainer

UNAVAILABLE = re.compile(r"`(?P<name>\w+)Accelerator` can not run on your system.*?(?P<available>\[[^]]*\])")
TRAINER_FLAGS = ("accelerator", "devices", "num_nodes", "strategy", "precision")


def trainer_refused(err: BaseException) -> str:
    """One line for the Trainer refusing its settings (an accelerator the machine lacks, a device count it
    cannot use, a strategy's package not installed), naming the --trainer flag where Lightning's words
    show which."""
    text = " ".join(str(err).split()) or err.__class__.__name__
    if "No supported gpu backend found" in text:
        return (
            "--trainer.accelerator gpu: torch finds no GPU on this machine: use --trainer.accelerator cpu, "
            "or auto for whatever the machine has"
        )
    if unavailable := UNAVAILABLE.search(text):
        return (
            f"--trainer.accelerator {unavailable['name'].lower()}: not available on this machine, which has "
            f"{unavailable['available']}; or use --trainer.accelerator auto"
        )
    if isinstance(err, ImportError):
        return f"the --trainer settings need a package that is not installed: {text}"
    found = [(m.start(), flag) for flag in TRAINER_FLAGS if (m := re.search(rf"\b{flag}\b", text))]
    return f"--trainer.{min(found)[1]}: {text}" if found else f"the --trainer settings: {text}"


# ------------------------------------------------------------------------------------ torch.load


def checkpoint_refused(path: Path, err: Exception, not_a_checkpoint: str) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, from the exception it raised."""
    head = read_head(path)
    if head.startswith(b"version https://git-lfs"):  # a repository cloned without its LFS files
        return f"{path} is a Git LFS pointer, not the checkpoint itself: fetch it with `git lfs pull`"
    # torch's paragraph has one line on what it met: a GLOBAL (a class or function, which unpickling
    # would call) is a refusal; anything else (an unknown opcode...) is not a pickle.
    lines = [line.strip().removeprefix("WeightsUnpickler error: ") for line in str(err).splitlines()]
    why = next((line for line in lines if "GLOBAL" in line), None)
    if isinstance(err, pickle.UnpicklingError) and why is not None:
        return (
            f"{path} was refused: it holds objects other than tensors and plain data, and loading them "
            f"could run code ({why.split('. ')[0].rstrip('.')})"
        )
    if head and head.isascii() and all(c.isprintable() or c.isspace() for c in head.decode()):
        return f"{path} {not_a_checkpoint} (it is text: {head.decode().split(chr(10))[0][:60]!r})"
    if isinstance(err, pickle.UnpicklingError):
        what = next((line for line in lines if "nsupported" in line), first_line(err))
        return f"{path} {not_a_checkpoint} ({what})"
    # torch's own words for garbage run to a paragraph about zip archives; the first clause says enough.
    detail = first_line(err).split(". ")[0]
    kind = err.__class__.__name__
    return f"{path} {not_a_checkpoint} ({kind}{': ' + detail if detail != kind else ''})"


def read_head(path: Path) -> bytes:
    """The first bytes of ``path``, or none if it cannot be read."""
    try:
        with open(path, "rb") as file:
            return file.read(256)
    except OSError:
        return b""


# ------------------------------------------------------------------------------------------- c10d

TIMEOUT_FLAG = "--trainer.strategy.timeout=H:MM:SS (with --config configs/ddp.yaml)"
COLLECTIVES = (
    "all_reduce", "all_gather", "broadcast", "barrier", "reduce", "gather", "scatter", "recv", "send",
)  # fmt: skip


LOST_PEER = re.compile(r"Connection (?:reset|closed) by peer|Broken pipe|Connection refused")
KEPT_NOTE = "last checkpoint kept: "  # faults.LastCheckpoint's note on an error that ends a fit


def explained(err: BaseException) -> str | None:
    """The one line for an error the user's setup caused (a DDP rank lost or stalled, a file or folder the
    system refused); None for any other, which is a bug and keeps its traceback."""
    return stalled_message(err) or refused_by_system(err)


def refused_by_system(err: BaseException) -> str | None:
    """One line for an OSError about a path (no permission, a read-only or full disk, a file where a folder
    should be), as the shell's own tools say it; None for any other error."""
    if not isinstance(err, OSError) or err.filename is None:
        return None
    also = f" (renaming to {err.filename2})" if err.filename2 is not None else ""
    return f"{err.filename}: {err.strerror or first_line(err)}{also}"


def stalled_message(err: BaseException) -> str | None:
    """One line for a collective that timed out, or whose peer went away; None for any other error.

    A timeout names this rank, the collective it waited in and the code of ours that called it. A lost
    peer (gloo's "Connection reset by peer": the rank was killed, by kill -9 or the out-of-memory killer)
    can come out of any collective, DDP's own in backward included, so it needs no frame of ours; it names
    the rank that was lost where there are only two, and the ``last.ckpt`` to resume from.
    """
    import torch.distributed as dist

    text = str(err)
    joined = re.search(r"after (\d+) seconds waiting for clients\. (\d+)/(\d+) clients joined", text)
    if isinstance(err, RuntimeError) and joined:  # the first process waits for the others at the start
        return (
            f"only {joined[2]} of {joined[3]} processes started within {joined[1]} s: one failed to start "
            f"or is stuck (see its output); if they are only slow, wait longer with {TIMEOUT_FLAG}"
        )
    if not isinstance(err, RuntimeError):
        return None
    rank = dist.get_rank() if dist.is_initialized() else None
    world = dist.get_world_size() if dist.is_initialized() else None
    if LOST_PEER.search(text):
        other = f"rank {1 - rank}" if world == 2 else "another rank"
        kept = next(
            (n[len(KEPT_NOTE) :] for n in getattr(err, "__notes__", ()) if n.startswith(KEPT_NOTE)), None
        )
        resume = (
            f"resume with the same command plus --ckpt_path={kept}"
            if kept
            else "no last.ckpt was saved before it"
        )
        return (
            f"rank {'?' if rank is None else rank} of {world or '?'} lost {other}: it died or was killed "
            f"(see its output, or the system log for the out-of-memory killer); {resume}"
        )
    if not re.search(r"[Tt]imed out|[Tt]imeout", text):
        return None
    frames = traceback.extract_tb(err.__traceback__)
    collective = next(
        (f.name for f in reversed(frames) if f.name in COLLECTIVES and "distributed" in f.filename), None
    )
    if collective is None:
        return None
    here = Path(__file__).parent
    caller = next((f for f in reversed(frames) if Path(f.filename).parent == here), None)
    where = f" in {Path(caller.filename).stem}.py:{caller.lineno} ({caller.name})" if caller else ""
    waited = re.search(r"waiting (\d+)ms", text)
    after = f" {int(waited[1]) / 1000:g} s" if waited else ""
    return (
        f"rank {'?' if rank is None else rank} of {world or '?'} waited{after} for the other ranks in "
        f"{collective}{where} and gave up: a rank stalled, died or took another path (see the other ranks' "
        f"output); if one is only slow, wait longer with {TIMEOUT_FLAG}"
    )


# ---------------------------------------------------------------------------------------------- ours


def last_checkpoints(trainer) -> list[Path]:
    """The ``last.ckpt`` files this run's checkpoint callbacks have written (faults.LastCheckpoint's)."""
    writers = [cb for cb in trainer.checkpoint_callbacks if cb.filename == "last" and cb.dirpath]
    return [path for path in (Path(cb.format_checkpoint_name({})) for cb in writers) if path.is_file()]


def interrupted(trainer) -> str:
    """The one line a stopped ``fit`` ends with: where it was, and how to go on from there."""
    saved = last_checkpoints(trainer)
    where = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
    if not saved:
        return f"training stopped by a signal at {where}, before any checkpoint was saved"
    return (
        f"training stopped by a signal at {where}; saved {saved[0]}: continue with the same command "
        f"plus --ckpt_path={saved[0]}"
    )


def diverged(trainer, loss: float, batch_idx: int, interval: int | None) -> str:
    """A non-finite loss at this step; ``interval``: how many steps apart the loss was looked at."""
    kept = last_checkpoints(trainer)
    kept_text = f"kept the last good checkpoint {kept[0]}" if kept else "no checkpoint was saved before it"
    seen = f" (looked at every {interval} steps)" if interval else ""
    return (
        f"training diverged: the loss became {loss} at epoch {trainer.current_epoch}, step "
        f"{trainer.global_step} (batch {batch_idx}){seen}; {kept_text}; lower the learning rate"
    )


def out_of_space(err: BaseException | None) -> bool:
    """Whether ``err`` or an error it was raised from is a full disk or quota.

    torch's zip writer turns the file's ENOSPC into its own RuntimeError ("unexpected pos"), raised
    while handling the OSError.
    """
    import errno

    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full(path: Path, checkpoint: dict) -> str:
    """No space left to write ``checkpoint`` to ``path``; how much it needed, and what to resume from.

    The checkpoint to resume from is the newest one in the folder (the epoch's best one may have been
    written just before ``last.ckpt`` failed, and an earlier ``last.ckpt`` is kept whole when its
    replacement fails); in epoch 0 there may be none at all.
    """
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)  # how much the checkpoint needed
    needed = f"no space left in {path.parent} to write {path.name} (about {buffer.tell() / 2**20:.1f} MB)"
    kept = [file for file in path.parent.glob("*.ckpt") if file.is_file()]
    if not kept:
        return f"{needed}: free some space there and run again; no checkpoint was written"
    newest = max(kept, key=lambda file: file.stat().st_mtime_ns)
    return f"{needed}: free some space there, then resume with the same command plus --ckpt_path={newest}"


def flag_error(message: str) -> NoReturn:
    """End the command as a bad flag does: ``mnist_lit: error: MESSAGE`` on stderr and exit status 2.

    For flag values that parse but cannot be used (two flags that contradict each other, a number out of
    its range), which a tool's function finds after jsonargparse has parsed them.
    """
    sys.stderr.write(f"mnist_lit: error: {message}\n")
    raise SystemExit(2)
