"""`--config FILE`: server flags from a YAML or JSON mapping (`dp-size: 2` or `dp_size: 2`).

Precedence: command-line flags > the config file > `DPSERVE_*` environment variables > defaults.
A key that is not a flag is an error, so a typo never goes unnoticed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from shared.config import ServerArgs


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The file's settings as argparse defaults (`dest` names); raises ValueError on bad content."""
    text = Path(path).read_text(encoding="utf-8")
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file is a mapping of flag names to values")
    names = {f.name: f for f in dataclasses.fields(ServerArgs) if f.name != "extra"}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in names:
            raise ValueError(f"{path}: unknown setting {key!r}")
        default = names[name].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"{path}: {key} must be true or false")
        if not isinstance(default, bool) and default is not None and not isinstance(value, type(default)):
            try:
                value = type(default)(value)
            except (TypeError, ValueError):
                raise ValueError(f"{path}: {key} must be a {type(default).__name__}") from None
        out[name] = value
    return out
