"""Command-line argument checking shared by the ``scaling-compile`` subcommands.

Every bad argument is reported in ONE line, with what to do, and exit code 2, before any
heavy work (model loading, profiling): ranges are checked by the ``type=`` functions below
when argparse parses, and what needs a look at the disk or the machine (a model folder, a
``module:factory``, a CUDA device) by the ``check_*`` functions, which raise
:class:`UsageError`. Geometry is in LATENT units everywhere (frames, height, width of the
video latent, as diffusers pipelines and ``WanTransformer3DModel`` see them); token grids
(after the patch embedding) appear only where named so (``--tokens``).

This module imports nothing heavy (no torch), so ``--help`` and argument errors are fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os


class UsageError(Exception):
    """A bad command-line argument: the message says what to do; the CLI prints it and exits with 2."""


# ---------------------------------------------------------------------------------------------
# Parser and help
# ---------------------------------------------------------------------------------------------
def _shows_default(action: argparse.Action) -> bool:
    if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
        return False
    if not action.option_strings:
        return False
    return not isinstance(action, (argparse._HelpAction, argparse._VersionAction))


def format_default(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


class DefaultsFormatter(argparse.HelpFormatter):
    """Help with every option's default (``(default: 5 30 52)``), unless the help already states it."""

    def _get_help_string(self, action):
        help_text = (action.help or "").strip()
        stated = "(default" in help_text.lower() or "default:" in help_text.lower()
        if _shows_default(action) and not stated:
            help_text += f" (default: {format_default(action.default)})".replace("%", "%%")
        return help_text.strip()


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``PROG: message (see PROG --help)``), exit 2,
    and whose help shows every default; subparsers (also those other modules add) inherit both."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")

    def format_help(self):
        for action in self._actions:  # options without help text still show their default
            if action.help is None and _shows_default(action):
                action.help = f"(default: {format_default(action.default)})".replace("%", "%%")
        return super().format_help()


# ---------------------------------------------------------------------------------------------
# Argument types (checked while parsing)
# ---------------------------------------------------------------------------------------------
def _number(text: str, kind=float):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None


def budget(text: str) -> float:
    """A budget: the mean fraction of key blocks kept, in (0, 1]."""
    value = _number(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"{text} is not in (0, 1]: a budget is the mean fraction of key blocks kept, e.g. 0.3")
    return value


def density(text: str) -> float:
    """A density level in (0, 1]."""
    value = _number(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]: a density is a fraction of key blocks, e.g. 0.25")
    return value


def progress_fraction(text: str) -> float:
    """Denoising progress in [0, 1] (0: the first step, 1: the last)."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"{text} is not in [0, 1]: denoising progress is 0 at the first step and 1 at the last, e.g. 0.5")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def block_size(text: str) -> int:
    """Tokens per mask block: a positive multiple of 16 up to 1024 (the kernels' tiles)."""
    value = _number(text, int)
    if value < 16 or value > 1024 or value % 16:
        raise argparse.ArgumentTypeError(
            f"{text} is not a multiple of 16 in [16, 1024]: blocks are kernel tiles, e.g. 64 (CPU) or 128 (GPU)")
    return value


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({error.msg}); e.g. '{{\"num_layers\": 2}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; e.g. '{{\"num_layers\": 2}}'")
    return value


def add_latent_argument(parser, flag: str, default, help_text: str, *, required: bool = False) -> None:
    """``flag F H W``: a latent geometry (frames, height, width), positive integers."""
    parser.add_argument(flag, nargs=3, type=positive_int, default=default, required=required,
                        metavar=("F", "H", "W"), help=help_text)


# ---------------------------------------------------------------------------------------------
# Checks that look at the disk or the machine (before any heavy work)
# ---------------------------------------------------------------------------------------------
def check_device(name: str | None, *, allow_auto: bool = True) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` (or ``auto``/None: cuda if available): the device to run on."""
    import torch

    if name in (None, "auto"):
        if not allow_auto:
            raise UsageError("pass --device cpu or --device cuda")
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: this torch sees no CUDA GPU; use --device cpu "
                             "(or install a CUDA build of torch on a GPU machine)")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices "
                             f"(cuda:0 ... cuda:{torch.cuda.device_count() - 1})")
        return name
    raise UsageError(f"--device {name!r}: use cpu, cuda, cuda:N or auto")


def check_output_file(path: str, suffix: str, what: str) -> None:
    """``path`` ends with ``suffix`` and its folder exists or can be made."""
    if not path.endswith(suffix):
        raise UsageError(f"{path!r}: {what} must end with {suffix}")
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise UsageError(f"cannot write {path!r}: {existing!r} is not a writable folder")


def resolve_factory(spec: str):
    """The callable named by ``module:attribute[.attribute]``, or a :class:`UsageError` saying what is wrong."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"{spec!r}: write module:factory, e.g. scaling_compile.testing:planted_wan_transformer")
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"{spec!r}: cannot import {module_name!r} ({error}); install it, or run from the "
                         "folder that holds it (it must be on PYTHONPATH)") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UsageError(f"{spec!r}: {module_name} has no {attribute!r}; check the name after the colon")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"{spec!r}: {attribute!r} is a {type(target).__name__}, not a callable returning a model")
    return target


def diffusers_folder_class(folder: str, subfolder: str | None) -> tuple[str, str | None]:
    """The diffusers class name of the model in ``folder`` (a model folder, or a pipeline folder's
    ``subfolder``, 'transformer' by default) and the subfolder used; :class:`UsageError` if there is none."""
    if subfolder is None and os.path.exists(os.path.join(folder, "model_index.json")):
        subfolder = "transformer"
    config_path = os.path.join(folder, subfolder or "", "config.json")
    if not os.path.exists(config_path):
        raise UsageError(
            f"{folder!r} has no {os.path.relpath(config_path, folder)}: pass a diffusers model folder "
            "(with config.json), a pipeline folder (with model_index.json; saved with save_pretrained), "
            "or --subfolder")
    try:
        with open(config_path) as handle:
            class_name = json.load(handle).get("_class_name")
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"{config_path}: not a readable JSON config ({error})") from None
    import diffusers

    if not class_name or getattr(diffusers, class_name, None) is None:
        raise UsageError(f"{config_path}: {class_name!r} is not a diffusers class this diffusers "
                         f"({diffusers.__version__}) knows")
    return class_name, subfolder


def check_model_spec(spec: str, subfolder: str | None = None) -> None:
    """A model argument names an existing diffusers folder or an importable ``module:factory``."""
    if os.path.isdir(spec):
        diffusers_folder_class(spec, subfolder)
    elif ":" in spec and not os.path.exists(spec):
        resolve_factory(spec)
    else:
        raise UsageError(f"{spec!r} is neither a folder nor module:factory: pass a diffusers folder saved with "
                         "save_pretrained, or module:function returning a torch.nn.Module "
                         "(e.g. scaling_compile.testing:planted_wan_transformer)")


def tokens_from_latent(latent, patch_size, flag: str = "--latent") -> tuple[int, int, int]:
    """The token grid of a latent (frames, height, width) under ``patch_size``, or a :class:`UsageError`."""
    latent = tuple(int(v) for v in latent)
    patch = tuple(int(p) for p in patch_size)
    bad = [f"{name} {n} is not a multiple of {p}" for name, n, p in zip(("frames", "height", "width"), latent, patch)
           if n % p]
    if bad:
        raise UsageError(f"{flag} {' '.join(map(str, latent))}: {'; '.join(bad)} (the model's patch size is "
                         f"{' '.join(map(str, patch))})")
    return tuple(n // p for n, p in zip(latent, patch))


__all__ = [
    "DefaultsFormatter", "Parser", "UsageError", "add_latent_argument", "block_size", "budget", "check_device",
    "check_model_spec", "check_output_file", "density", "diffusers_folder_class", "json_object",
    "non_negative_int", "positive_int", "progress_fraction", "resolve_factory", "tokens_from_latent",
]
