"""Reading a config: a YAML file (or a preset's name) and dotted ``section.key=value`` overrides."""
from __future__ import annotations

import ast
import inspect
from dataclasses import fields
from pathlib import Path
from typing import Optional

import yaml

from megalm.config.schema import SECTIONS, Config, ConfigError


def preset_folder() -> Path:
    """The folder of the packaged presets (``configs/`` in the repository, ``megalm/presets`` in a wheel)."""
    import importlib.util

    spec = importlib.util.find_spec("megalm.presets")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parents[2] / "configs"     # an editable install older than megalm.presets


def resolve_config_file(path: str) -> Path:
    """A YAML path, or the name of a preset shipped with megalm (``tiny``, ``llama-7b``).

    A file that exists wins; otherwise the packaged presets (the repository's ``configs/``) are searched, so an
    installed wheel still finds them.
    """
    file = Path(path)
    if file.exists():
        return file
    presets = preset_folder()
    for candidate in (presets / path, presets / f"{path}.yaml", presets / Path(path).name):
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in presets.glob("*.yaml"))
    raise ConfigError(f"config file {path} does not exist, and it is not a preset name ({', '.join(names)})")


def deepspeed_json_path(name: str) -> Path:
    """A DeepSpeed JSON path, or a packaged one by name (``zero3``, ``zero3.json``, ``configs/deepspeed/zero3.json``
    from outside the repository)."""
    packaged = preset_folder() / "deepspeed"
    for candidate in (Path(name), packaged / f"{Path(name).stem}.json"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"parallel.deepspeed_config={name} does not exist; give a path or one of "
                      f"{', '.join(sorted(p.stem for p in packaged.glob('*.json')))}")


def read_yaml(file: Path) -> dict:
    """The file's top-level mapping; malformed YAML or another top level is one line naming the file."""
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {file} is not valid YAML{at}: {problem}; fix the file's syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {file} is not UTF-8 text; give a YAML file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {file} must hold a mapping of sections (model:, train:, ...) at its top "
                          f"level, not a {type(data).__name__}")
    return data


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML file (or the defaults) and apply ``section.key=value`` overrides in order. Every key either
    of them names is recorded as explicitly set."""
    data = read_yaml(resolve_config_file(path)) if path else {}
    cfg = Config.from_dict(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.steps=100")
        key, _, value = item.partition("=")
        cfg.set(key.strip(), value)
    return cfg


def describe_fields() -> str:
    """Every config key with its default and docstring (what ``megalm config`` prints)."""
    lines = []
    for name, cls in SECTIONS.items():
        body = ast.parse(inspect.getsource(cls)).body[0].body
        docs = {}
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
        defaults = cls()
        for f in fields(cls):
            lines.append(f"{name}.{f.name} = {getattr(defaults, f.name)!r}  {docs.get(f.name, '')}".rstrip())
    return "\n".join(lines)
