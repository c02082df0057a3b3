"""Plugins: your own datasets, poisons, models, detectors and unlearning methods, without a fork.

A plugin is a plain Python module (a ``.py`` file, a package folder, or an importable name) whose import
registers entries in the public registries (``poisonsweep.DETECTORS.register(...)`` etc.). A sweep names
its plugins in its config (``plugins:``, paths relative to the config file); installed packages may declare
the entry-point group ``poisonsweep.plugins`` and are loaded for every sweep.

The driver imports them before the config is checked, so their parameters are validated like ours.
Each plugin ships with the Ray job (``runtime_env`` ``py_modules``: the file or the package folder), so a
node that lacks the file still runs the trial; the trial process imports it by name from the shipped copy
and checks that its source hash is the driver's (a different copy is a failed trial, never a silent mix).
The hash of every plugin's source is part of ``code_version``: editing a plugin makes its trials stale.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Iterable

from poisonsweep.engine.yaml_reader import read_yaml
from poisonsweep.tasks.registry import ConfigError

ENTRY_POINT_GROUP = "poisonsweep.plugins"


class PluginError(ConfigError):
    """A plugin that cannot be found, imported or trusted: one line naming it and why."""


@dataclass(frozen=True)
class Plugin:
    """One imported plugin, as the driver found it.

    ``module``: its import name; ``origin``: what named it (the path as the config wrote it, the import
    name, or ``entry point NAME (DIST)``); ``path``: the file or package folder that is shipped to the
    workers (None: nothing to ship, it is part of poisonsweep); ``sha256``: 12 hex digits of its source.
    """

    module: str
    origin: str
    path: str | None
    sha256: str

    def record(self) -> dict:
        """What the ``trials`` row records of it (column ``plugins``, a JSON list of these)."""
        return asdict(self)


# module name -> Plugin, for every plugin imported in this process (what `list` marks as its origin)
_LOADED: dict[str, Plugin] = {}


def source_hash(path: str | Path | None) -> str:
    """SHA-256 (12 hex digits) of a plugin's source: the file, or every ``.py`` file of the folder by
    relative path (what ``py_modules`` ships); ``""`` for no path."""
    if path is None:
        return ""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
    for file in files:
        name = file.name if file == path else file.relative_to(path).as_posix()
        digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def load_plugins(specs, base_dir: str | Path = ".") -> list[Plugin]:
    """Import the installed entry-point plugins and ``specs`` (the config's ``plugins:``: import names, or
    paths to a ``.py`` file or a package folder, relative to ``base_dir``), in that order. Raises
    ``PluginError`` (one line) for a spec that is not a string, a path that does not exist, or an import that
    fails; importing a plugin twice runs it once."""
    if specs is None:
        specs = []
    if not isinstance(specs, list) or not all(isinstance(s, str) and s.strip() for s in specs):
        raise PluginError(f"plugins must be a list of module names or paths (.py files, package folders); "
                          f"got {specs!r}")
    plugins = entry_point_plugins()
    for spec in specs:
        plugin = _load_spec(spec.strip(), Path(base_dir))
        if plugin.module not in {p.module for p in plugins}:
            plugins.append(plugin)
    return plugins


def config_plugins(config: str | Path) -> list[Plugin]:
    """Import the plugins a sweep config file names (paths relative to it), without checking the rest of it."""
    config = Path(config)
    try:
        raw = read_yaml(config.read_text())
    except Exception as error:  # a missing file, bad YAML: the config cannot name plugins
        raise PluginError(f"{config}: cannot read it: {_one_line(error)}") from None
    return load_plugins(raw.get("plugins") if isinstance(raw, dict) else None, config.parent)


def entry_point_plugins() -> list[Plugin]:
    """The installed packages' plugins (entry-point group ``poisonsweep.plugins``), imported."""
    plugins = []
    for point in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
        dist = getattr(point.dist, "name", None) or "an installed package"
        origin = f"entry point {point.name} ({dist})"
        module = _import_named(point.module, origin)
        plugins.append(_remember(module, origin))
    return plugins


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec or spec.startswith(".")


def _load_spec(spec: str, base_dir: Path) -> Plugin:
    if not _looks_like_path(spec):
        return _remember(_import_named(spec, spec), spec)
    path = (base_dir / Path(spec).expanduser()).resolve()  # an absolute (or ~) path ignores base_dir
    if not path.exists():
        raise PluginError(f"plugin {spec!r}: {path} does not exist (a plugin path is relative to the config file)")
    if path.is_dir() and not (path / "__init__.py").is_file():
        raise PluginError(f"plugin {spec!r}: {path} is a folder without __init__.py; name a .py file or a package")
    if path.is_file() and path.suffix != ".py":
        raise PluginError(f"plugin {spec!r}: {path} is not a .py file")
    name = path.stem if path.is_file() else path.name
    if not name.isidentifier():
        raise PluginError(f"plugin {spec!r}: {name!r} is not a valid module name; rename it (letters, digits, _)")
    return _remember(_import_path(name, path, spec), str(path))


def _import_named(name: str, origin: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as error:
        raise PluginError(f"plugin {origin!r} failed to import: {_one_line(error)}") from None


def _import_path(name: str, path: Path, origin: str) -> ModuleType:
    """Import the file or package at ``path`` as module ``name``: once, unless its source changed since (an
    edited plugin in a notebook runs again, so the hash recorded is always the code that runs)."""
    loaded = sys.modules.get(name)
    if loaded is not None:
        if _shipped_path(loaded) != path:
            raise PluginError(f"plugin {origin!r}: a module named {name!r} is already imported from "
                              f"{getattr(loaded, '__file__', None) or 'elsewhere'}; rename the plugin")
        if name in _LOADED and _LOADED[name].sha256 == source_hash(path):
            return loaded
        for stale in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[stale]  # edited: import it (and its submodules) again
    init = path / "__init__.py" if path.is_dir() else path
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(path)]
                                                  if path.is_dir() else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as error:
        sys.modules.pop(name, None)
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        raise PluginError(f"plugin {origin!r} failed to import: {_one_line(error)}") from None
    return module


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _shipped_path(module: ModuleType) -> Path | None:
    """What ships a module to the workers: its top-level package folder, or its single file; None for
    poisonsweep's own modules (every node has them) and for modules without a file."""
    top = module.__name__.split(".")[0]
    if top == "poisonsweep":
        return None
    root = sys.modules.get(top, module)
    paths = list(getattr(root, "__path__", []) or [])
    if len(paths) == 1:
        return Path(paths[0]).resolve()
    file = getattr(root, "__file__", None)
    return Path(file).resolve() if file and not paths else None


def _remember(module: ModuleType, origin: str) -> Plugin:
    path = _shipped_path(module)
    plugin = Plugin(module=module.__name__, origin=origin, path=str(path) if path else None,
                    sha256=source_hash(path))
    _LOADED[plugin.module] = plugin
    return plugin


def origin_of(module: str) -> str | None:
    """The origin of the plugin that defines ``module`` (a plugin's module or one of its submodules), or None
    for poisonsweep's own entries."""
    for name, plugin in _LOADED.items():
        if module == name or module.startswith(name + "."):
            return plugin.origin
    return None


def combined_hash(plugins: Iterable[Plugin]) -> str:
    """One 12-hex-digit hash of every plugin's module name and source hash (part of ``code_version``)."""
    text = json.dumps(sorted((p.module, p.sha256) for p in plugins))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def runtime_env_modules(plugins: Iterable[Plugin]) -> list[str]:
    """The ``py_modules`` entries that ship ``plugins`` with the Ray job: each file or package folder once."""
    return list(dict.fromkeys(p.path for p in plugins if p.path))


def column(plugins: Iterable[dict] | None) -> str:
    """The ``trials`` table's ``plugins`` value: a JSON list of each plugin's module, origin, path and hash."""
    return json.dumps(list(plugins or []), sort_keys=True)


def import_in_worker(records: Iterable[dict]) -> None:
    """In a trial process: import each plugin the driver loaded (``Plugin.record`` dicts) by its name, from the
    shipped copy (``py_modules`` puts it first on ``sys.path``); where Ray was started without it (a caller's
    own ``ray.init``) and the driver's path exists on this node, from that path. Raises ``PluginError`` when a
    plugin is missing or its source differs from the driver's."""
    for record in records:
        name, expected = record["module"], record["sha256"]
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            path = record.get("path")
            if error.name != name.split(".")[0] or not path or not Path(path).exists():
                raise PluginError(f"plugin {record['origin']!r} is not importable on this node ({_one_line(error)}); "
                                  "let poisonsweep start or join Ray so it ships the plugin with the job") from None
            _import_path(name.split(".")[0], Path(path), record["origin"])
            module = importlib.import_module(name)
        except Exception as error:  # the plugin itself raised: the trial records why
            raise PluginError(f"plugin {record['origin']!r} failed to import on this node: {_one_line(error)}") from None
        found = source_hash(_shipped_path(module))
        if found != expected:
            raise PluginError(f"plugin {record['origin']!r} on this node has source hash {found or '(no file)'}, the "
                              f"driver's has {expected}: a different copy (edited during the run, or a "
                              ".gitignore that kept files out of the shipped folder)")


def load_recorded(values: Iterable) -> list[str]:
    """Import the plugins a record names (its ``trials.plugins`` values) whose file or folder is here with the
    source hash recorded, so that the report rebuilds a plugin poison's images with the code that ran; returns
    the modules imported. Any other is skipped: the report then says its entries are not registered here."""
    records = {}
    for value in values:
        if isinstance(value, str) and value.startswith("["):
            records.update({r["module"]: r for r in json.loads(value) if isinstance(r, dict) and "module" in r})
    imported = []
    for name, record in records.items():
        path = record.get("path")
        if name in sys.modules or not path or not Path(path).exists() or source_hash(path) != record.get("sha256"):
            continue
        try:
            module = _import_path(name.split(".")[0], Path(path), record.get("origin", name))
            _remember(importlib.import_module(name) if "." in name else module, record.get("origin", name))
        except (PluginError, ImportError):
            continue
        imported.append(name)
    return imported
