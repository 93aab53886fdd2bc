"""Reading sdk/vectors/frames.txt (format: the file's header comment)."""

from __future__ import annotations

from typing import Dict, List, NamedTuple

from conftest import VECTORS


class Vector(NamedTuple):
    line: int
    cls: str
    name: str
    frame: bytes
    keys: Dict[str, str]

    def number(self, key: str) -> int:
        return int(self.keys[key])

    @property
    def bound(self) -> int:
        return int(self.keys.get("bound", 16 * 1024 * 1024))


def load() -> List[Vector]:
    vectors = []
    for number, line in enumerate(VECTORS.read_text().splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        assert "\t" not in line and not line.endswith(" ") and len(line) <= 32768, number
        cls, name, *words = line.split(" ")
        keys = dict(word.split("=", 1) for word in words)
        assert len(keys) == len(words), f"line {number}: a duplicate key"
        frame = bytes.fromhex(keys.pop("frame"))
        vectors.append(Vector(number, cls, name, frame, keys))
    names = [v.name for v in vectors]
    assert len(names) == len(set(names)), "duplicate vector names"
    return vectors


ALL = load()


def of(*classes: str) -> List[Vector]:
    return [v for v in ALL if v.cls in classes]
