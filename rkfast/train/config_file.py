"""A run's configuration as a file (:data:`CONFIG_FILE` in every run folder): written when the run starts
(:func:`write_config`) and read back to run it again (:func:`read_config`, ``rkfast train DOMAIN --config
FILE``).

The file is strict JSON: the :class:`~rkfast.train.TrainConfig` fields of the resolved configuration (every
setting, the domain's defaults filled in), as ``results.json`` holds them under ``"config"``. JSON needs no
dependency on any supported Python and has ``null`` for the settings that are off or left to the domain
(``learn_rates``, ``test_step``...), which TOML cannot say."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..runs import write_json
from ..tableau import Tableau, get_tableau
from .config import TrainConfig

__all__ = ["CONFIG_FILE", "ConfigFileError", "config_data", "write_config", "read_config", "check_resolves"]

CONFIG_FILE = "config.json"  # the run's configuration, in every run folder

_FIELDS = {f.name: f for f in fields(TrainConfig)}
_BOOLS = ("first_order", "per_stage_rates", "recompute")
_STRINGS = ("domain", "device", "backend", "tableau_weights")
_OPTIONAL_STRINGS = ("learn_rates", "learn_tableau", "amp")


class ConfigFileError(ValueError):
    """A configuration file that cannot be read, or a key or value in it that is not a setting (the message
    names the file and the key)."""


def config_data(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` as the file's JSON data: :meth:`~rkfast.train.TrainConfig.to_json`, with a tableau whose name
    does not rebuild it (a custom one) written whole (:meth:`~rkfast.tableau.Tableau.to_dict`)."""
    data = cfg.to_json()
    if isinstance(cfg.tableau, Tableau):
        try:
            same = get_tableau(cfg.tableau.name).to_dict() == cfg.tableau.to_dict()
        except (ValueError, TypeError):
            same = False
        if not same:
            data["tableau"] = cfg.tableau.to_dict()
    return data


def write_config(path: Path | str, cfg: TrainConfig) -> None:
    """Write ``cfg`` (resolved, so that every setting is pinned) to ``path``, atomically."""
    write_json(path, config_data(cfg))


def _bad(path: Path, key: str, value: Any, expected: str) -> ConfigFileError:
    return ConfigFileError(f"{path}: {key!r} must be {expected}, got {json.dumps(value)}")


def _check_value(path: Path, key: str, value: Any) -> Any:
    """``value`` of ``key`` as :class:`TrainConfig` holds it, if its type is that setting's (numbers are checked
    in full by :meth:`TrainConfig.resolved`)."""
    if key in _BOOLS and not isinstance(value, bool):
        raise _bad(path, key, value, "true or false")
    if key in _STRINGS and not isinstance(value, str):
        raise _bad(path, key, value, "a string")
    if key in _OPTIONAL_STRINGS and not (value is None or isinstance(value, str)):
        raise _bad(path, key, value, "a string or null")
    if key == "options" and not isinstance(value, dict):
        raise _bad(path, key, value, "an object of the domain's options")
    frozen_ok = value is None or (isinstance(value, dict) and all(_is_number(v) for v in value.values()))
    if key == "frozen_rates" and not frozen_ok:
        raise _bad(path, key, value, "null or an object of {pattern: rate}")
    if key == "tableau":
        if isinstance(value, dict):
            try:
                return Tableau.from_dict(value)
            except (ValueError, TypeError) as err:
                raise ConfigFileError(f"{path}: 'tableau': {err}") from None
        if not (value is None or isinstance(value, str)):
            raise _bad(path, key, value, "a tableau's name, an object with 'A' and 'b', or null")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _load(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (:class:`ConfigFileError` naming the file and what is wrong)."""

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a number JSON allows")

    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constant)
    except OSError as err:
        raise ConfigFileError(f"cannot read the configuration {path}: {err.strerror or err}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigFileError(f"{path} is not a JSON configuration: {err}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path} holds no JSON object of settings")
    return data


def read_config(path: Path | str, domain: str | None = None, resolve: bool = True) -> TrainConfig:
    """The configuration in ``path``, checked: every key a :class:`TrainConfig` field, every value of its
    type and (``resolve``) the whole resolving (:meth:`TrainConfig.resolved`; without it, for a caller that
    overrides settings first). Missing keys take :class:`TrainConfig`'s defaults; given ``domain``, the
    file's must be it (a file without one is for ``domain``). Raises :class:`ConfigFileError` naming the file
    and the first bad key or value."""
    path = Path(path)
    data = _load(path)
    if domain is not None:
        saved = data.setdefault("domain", domain)
        if saved != domain:
            raise ConfigFileError(
                f"{path} configures a {saved!r} run, not {domain!r}: rkfast train {saved} --config {path}"
            )
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ConfigFileError(
            f"{path}: unknown key {unknown[0]!r}; the settings are {', '.join(_FIELDS)} (docs/training.md)"
        )
    cfg = TrainConfig(**{key: _check_value(path, key, value) for key, value in data.items()})
    if resolve:
        check_resolves(path, cfg)
    return cfg


def check_resolves(path: Path | str, cfg: TrainConfig) -> None:
    """:meth:`TrainConfig.resolved` of ``cfg``, read from ``path``; its error as a :class:`ConfigFileError`
    naming the file."""
    try:
        cfg.resolved()
    except (ValueError, TypeError) as err:
        raise ConfigFileError(f"{path}: {err}") from None
