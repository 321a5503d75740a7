"""``MODEL`` of ``geomon inspect`` as a model: one of

- ``package.module:factory``: the module is imported (the current directory first on ``sys.path``, as
  ``python -m`` does) and ``factory`` (a dotted attribute path) is called with no arguments, or used as is when it
  already is an ``nn.Module``;
- ``path/to/file.py:factory``: the same, from a file;
- a Hugging Face config name found in the local cache, or a local directory holding a ``config.json``: the config is
  read with ``local_files_only=True`` (nothing is ever downloaded) and the model built from it with random weights
  (the class in ``config.architectures`` when transformers has it, else ``AutoModelForCausalLM``, else
  ``AutoModel``), on the ``meta`` device unless it is to be run.

Whatever a user can fix raises :class:`InspectError`, one line.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: What MODEL may be, for error messages.
ALLOWED = (
    "expected module:factory (e.g. mypkg.models:build), path/to/file.py:factory, a Hugging Face config name in the "
    "local cache, or a directory holding a config.json"
)


class InspectError(Exception):
    """A problem the user can fix (a bad MODEL, a module that does not import, ...): one line, exit status 2."""


@dataclass
class Loaded:
    model: nn.Module
    source: str  #: "factory" or "huggingface"
    description: str  #: what was loaded, for the title
    config: Any = None  #: the Hugging Face config, if any


def load_model(spec: str, *, materialise: bool = True) -> Loaded:
    """Build the model MODEL names (see the module docstring); :class:`InspectError` on anything a user can fix.

    ``materialise=False`` builds a Hugging Face model on the ``meta`` device (shapes only); factories always run.

    Example:
        >>> loaded = load_model("torch.nn:Identity")
        >>> type(loaded.model).__name__, loaded.source
        ('Identity', 'factory')
    """
    spec = spec.strip()
    if not spec:
        raise InspectError(f"empty MODEL: {ALLOWED}")
    if ":" in spec and not Path(spec).is_dir():
        location, _, attribute = spec.rpartition(":")
        return _load_factory(spec, location, attribute)
    if spec.endswith(".py"):
        raise InspectError(f"bad MODEL {spec!r}: a file needs the factory to call, as {spec}:build; {ALLOWED}")
    return _load_huggingface(spec, materialise)


def _check_attribute(spec: str, attribute: str) -> list[str]:
    parts = attribute.split(".")
    if not attribute or not all(part.isidentifier() for part in parts):
        raise InspectError(f"bad MODEL {spec!r}: {attribute!r} is not a Python name after the colon; {ALLOWED}")
    return parts


def _load_factory(spec: str, location: str, attribute: str) -> Loaded:
    parts = _check_attribute(spec, attribute)
    if not location:
        raise InspectError(f"bad MODEL {spec!r}: nothing before the colon; {ALLOWED}")
    if location.endswith(".py") or "/" in location or os.sep in location:
        module = _import_file(location)
    else:
        if not all(part.isidentifier() for part in location.split(".")):
            raise InspectError(f"bad MODEL {spec!r}: {location!r} is neither a module name nor a .py file; {ALLOWED}")
        module = _import_module(location)
    target: Any = module
    for depth, part in enumerate(parts):
        if not hasattr(target, part):
            where = location if depth == 0 else f"{location}:{'.'.join(parts[:depth])}"
            names = sorted(n for n in dir(target) if not n.startswith("_") and callable(getattr(target, n, None)))
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") or "(none)"
            raise InspectError(f"{where} has no attribute {part!r} (callables there: {shown})")
        target = getattr(target, part)
    if isinstance(target, nn.Module):
        return Loaded(target, "factory", spec)
    if not callable(target):
        raise InspectError(f"{spec} is {_what(target)}, neither an nn.Module nor a factory to call")
    try:
        model = target()
    except (Exception, SystemExit) as error:
        raise InspectError(f"calling {spec}() with no arguments failed: {one_line(error)}") from error
    if not isinstance(model, nn.Module):
        raise InspectError(f"{spec}() returned {_what(model)}, not a torch.nn.Module: a factory returns the model")
    return Loaded(model, "factory", spec)


def _what(value: Any) -> str:
    text = " ".join(repr(value).split())
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextmanager
def _on_path(directory: str) -> Iterator[None]:
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added and directory in sys.path:
            sys.path.remove(directory)


def _import_module(name: str) -> Any:
    with _on_path(os.getcwd()):
        try:
            return importlib.import_module(name)
        except (Exception, SystemExit) as error:
            raise InspectError(f"could not import module {name!r}: {one_line(error)}") from error


def _import_file(location: str) -> Any:
    path = Path(location).expanduser()
    if not path.is_file():
        raise InspectError(f"no such file: {location} (MODEL {location}:factory names a Python file)")
    if path.suffix != ".py":
        raise InspectError(f"{location} is not a .py file; {ALLOWED}")
    name = f"_geomon_inspect_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InspectError(f"could not import {location}: not a loadable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up while it runs
    with _on_path(str(path.resolve().parent)):
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as error:
            sys.modules.pop(name, None)
            raise InspectError(f"could not import {location}: {one_line(error)}") from error
    return module


def _load_huggingface(name: str, materialise: bool) -> Loaded:
    try:
        import transformers
    except ImportError as error:
        raise InspectError(
            f"MODEL {name!r} has no colon, so it would be a Hugging Face config name, but transformers is not "
            f"installed (pip install transformers); or {ALLOWED}"
        ) from error
    local = Path(name).exists()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        try:
            config = transformers.AutoConfig.from_pretrained(name, local_files_only=True)
        except Exception as error:
            if local:
                raise InspectError(f"{name} holds no readable Hugging Face config: {one_line(error)}") from error
            raise InspectError(
                f"Hugging Face config {name!r} could not be loaded from the local cache ({one_line(error)}); geomon "
                f"inspect never downloads (fetch it first, e.g. `hf download {name} config.json`, or pass a "
                "directory with a config.json); a factory is given as module:factory or path/to/file.py:factory"
            ) from error
        with nullcontext() if materialise else torch.device("meta"):
            model = _model_from_config(transformers, config)
    finally:
        transformers.logging.set_verbosity(verbosity)
    where = "a local path" if local else "the local cache"
    return Loaded(model, "huggingface", f"{name} ({type(config).__name__} from {where})", config)


def _model_from_config(transformers: Any, config: Any) -> nn.Module:
    errors = []
    for architecture in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, architecture, None)
        if cls is not None:
            try:
                return cls(config)
            except Exception as error:  # fall through to the auto classes
                errors.append(one_line(error))
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            return auto.from_config(config)
        except Exception as error:
            errors.append(one_line(error))
    raise InspectError(f"transformers could not build a model from config {type(config).__name__}: {errors[-1]}")


def safe_call(getter: Callable[[], Any]) -> Any:
    """``getter()``, or ``None`` when it raises (an unimplemented getter)."""
    try:
        return getter()
    except Exception:  # an unimplemented getter
        return None
