"""Named pairs from models.toml: alias -> target repo, drafter repo, draft length, note."""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REGISTRY = Path(__file__).with_name("models.toml")


@dataclass
class PairEntry:
    alias: str
    target: str
    drafter: str
    draft_tokens: int = 4
    note: str = ""
    target_4bit: Optional[str] = None

    def target_path(self) -> str:
        return self.target

    def drafter_path(self) -> str:
        return self.drafter


def load_registry(path: Path = REGISTRY) -> Dict[str, PairEntry]:
    data = tomllib.loads(path.read_text())
    return {alias: PairEntry(alias=alias, **fields) for alias, fields in data.items()}


def find_pair(name: str) -> Optional[PairEntry]:
    return load_registry().get(name)
