"""Map EuroCrops HCAT3 crop codes and names to the 8 training classes (0 = unlabelled, 255 = ignore)."""

from __future__ import annotations

import csv
import math
import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cropchips.errors import ConfigError

CLASS_NAMES: dict[int, str] = {
    0: "no_field",
    1: "olive_plantations",
    2: "vineyards",
    3: "fruit",
    4: "nuts_orchards_forest",
    5: "cereals",
    6: "legumes",
    7: "vegetables",
    8: "fallow_bare_arable",
}
"""The training classes: 0 (none of them) and 1..8. Masks may also hold :data:`IGNORE_LABEL`."""
#: The highest training class id (a spec's ``unmapped_label`` must be 0 or above it).
MAX_CLASS_ID = 8
#: The label of a field that must not be learned from: a class map row ``ignore``, and by default
#: (``DatasetSpec.unmapped_label``) a field whose crop is none of the classes or unknown. Loss
#: functions skip it (``ignore_index=255``); the classes mask declares it as nodata.
IGNORE_LABEL = 255
#: The word a class map CSV writes in ``class_id`` for :data:`IGNORE_LABEL`.
IGNORE_WORD = "ignore"
#: Every value a classes mask can hold by default, named for reports: the classes and 255.
LABEL_NAMES: dict[int, str] = {**CLASS_NAMES, IGNORE_LABEL: "unmapped_ignore"}

DEFAULT_CLASS_MAP_PATH: Path = Path(__file__).parent / "data" / "hcat_classes.csv"
REQUIRED_COLUMNS: tuple[str, ...] = ("hcat3_code", "hcat3_name", "class_id")

# HCAT3 codes are 10 digits, two per level of the hierarchy.
HCAT3_CODE_DIGITS = 10
_FILE_CODE = re.compile(r"\d{%d}" % HCAT3_CODE_DIGITS, re.ASCII)
# Codes read from data: digits, optionally "3301010100.0" as a float column prints them.
_DATA_CODE = re.compile(r"\s*(\d+)(?:\.0*)?\s*", re.ASCII)
_NOT_PARSED = -1


def rule_prefix(code: str) -> str:
    """The digits a code's descendants start with: ``"3303050000"`` -> ``"330305"``."""
    prefix = code
    # Strip whole pairs: "3301011000" (spelt) is "33010110", not "3301011" (which meslin matches).
    while len(prefix) >= 2 and prefix.endswith("00"):
        prefix = prefix[:-2]
    return prefix


def _code_digits(code: Any) -> str | None:
    """Canonical digit string of an HCAT3 code given as int, float or str; None if unusable."""
    if code is None or isinstance(code, bool):
        return None
    if isinstance(code, numbers.Integral):
        value = int(code)
    elif isinstance(code, numbers.Real):
        number = float(code)
        if not math.isfinite(number) or not number.is_integer():
            return None
        value = int(number)
    elif isinstance(code, str):
        match = _DATA_CODE.fullmatch(code)
        if match is None:
            return None
        value = int(match.group(1))
    else:  # pd.NA, pd.NaT, bytes, ...
        return None
    return str(value) if value >= 0 else None


def _normal_name(name: str) -> str:
    return name.strip().lower()


@dataclass(frozen=True)
class ClassMap:
    """HCAT3 code prefix rules and HCAT3 names, each mapped to a class id 0..8 or 255 (ignore)."""

    rules: tuple[tuple[str, int], ...]
    """(code prefix, class_id); the longest prefix matching a code wins, no match is 0."""
    names: Mapping[str, int]
    """HCAT3 name -> class_id, used when a record's code is missing or unparseable."""
    _by_prefix: dict[str, int] = field(init=False, repr=False, compare=False)
    _prefix_lengths: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _by_name: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_prefix: dict[str, int] = {}
        for prefix, class_id in self.rules:
            if not (prefix == "" or (prefix.isascii() and prefix.isdigit())):
                raise ConfigError(f"rule prefix {prefix!r} is not made of digits; use an HCAT3 code prefix")
            _check_class_id(class_id, f"rule {prefix!r}")
            if prefix in by_prefix:
                raise ConfigError(f"rule prefix {prefix!r} appears twice; keep one rule per prefix")
            by_prefix[prefix] = class_id
        by_name: dict[str, int] = {}
        for name, class_id in self.names.items():
            _check_class_id(class_id, f"name {name!r}")
            by_name[_normal_name(name)] = class_id
        object.__setattr__(self, "_by_prefix", by_prefix)
        object.__setattr__(self, "_prefix_lengths", tuple(sorted({len(p) for p in by_prefix}, reverse=True)))
        object.__setattr__(self, "_by_name", by_name)

    def _class_of_digits(self, digits: str) -> int:
        for length in self._prefix_lengths:
            if length <= len(digits):
                class_id = self._by_prefix.get(digits[:length])
                if class_id is not None:
                    return class_id
        return 0

    def _parsed_class_of_code(self, code: Any) -> int:
        """Class of a code, or -1 where the code is missing or unparseable."""
        digits = _code_digits(code)
        return _NOT_PARSED if digits is None else self._class_of_digits(digits)

    def class_of_code(self, code: Any) -> int:
        """Class of an HCAT3 code (int, float or str): 1..8, 255 for an ``ignore`` rule, 0 for a
        code of none of the classes, and for unknown, missing or bad codes."""
        return max(self._parsed_class_of_code(code), 0)

    def class_of_name(self, name: Any) -> int:
        """Class of an exact HCAT3 name (case and surrounding blanks ignored); 0 if unknown."""
        if not isinstance(name, str):
            return 0
        return self._by_name.get(_normal_name(name), 0)

    def classify(self, codes: Any, names: Any = None, *, unmapped: int = 0) -> np.ndarray:
        """Classes of many records as uint8: by code, by name where the code is missing or bad.

        ``codes`` and ``names`` are 1-D (pandas Series, numpy arrays, lists) of equal length
        and are matched by position, not by index. Work is done once per distinct value.
        A record of none of the classes (a rule with class_id 0, a code no rule covers, no
        usable code nor name) gets ``unmapped``: 0 (no field) or 9..255, typically
        :data:`IGNORE_LABEL`; ``ignore`` rows give :data:`IGNORE_LABEL` whatever ``unmapped`` is.
        """
        check_unmapped_label(unmapped)
        code_values = _as_series(codes, "codes")
        result = _map_distinct(code_values, self._parsed_class_of_code)
        unresolved = result == _NOT_PARSED
        if names is not None and unresolved.any():
            name_values = _as_series(names, "names")
            if len(name_values) != len(code_values):
                raise ValueError(
                    f"classify got {len(code_values)} codes but {len(name_values)} names; "
                    "pass one name per code (or names=None)"
                )
            picked = pd.Series(name_values.to_numpy(dtype=object)[unresolved])
            result[unresolved] = _map_distinct(picked, self.class_of_name)
        result[(result == _NOT_PARSED) | (result == 0)] = unmapped
        return result.astype(np.uint8)


def check_unmapped_label(value: Any) -> int:
    """``value`` if it can label fields of none of the classes (0, or 9..255), else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (
            value == 0 or MAX_CLASS_ID < value <= IGNORE_LABEL):
        raise ConfigError(f"unmapped label {value!r} is not 0 (no field) nor {MAX_CLASS_ID + 1}..{IGNORE_LABEL} "
                          f"({IGNORE_LABEL}: the ignore index); a class id 1..{MAX_CLASS_ID} would mislabel fields")
    return int(value)


def _check_class_id(class_id: Any, what: str) -> None:
    if isinstance(class_id, bool) or not isinstance(class_id, numbers.Integral) or not (
            0 <= class_id <= MAX_CLASS_ID or class_id == IGNORE_LABEL):
        raise ConfigError(f"{what} has class_id {class_id!r}; use an integer 0..{MAX_CLASS_ID} (see CLASS_NAMES) "
                          f"or {IGNORE_LABEL} (IGNORE_LABEL)")


def _as_series(values: Any, what: str) -> pd.Series:
    if isinstance(values, pd.Series):
        return values
    array = np.asarray(values, dtype=object) if isinstance(values, (list, tuple)) else values
    try:
        series = pd.Series(array)
    except ValueError as exc:
        raise ValueError(f"classify needs 1-D {what}: {exc}") from exc
    return series


def _map_distinct(values: pd.Series, func: Callable[[Any], int]) -> np.ndarray:
    """``func`` of every element as int16, calling ``func`` once per distinct value."""
    inverse, uniques = pd.factorize(values, use_na_sentinel=True)
    lookup = np.array([func(value) for value in uniques] + [func(None)], dtype=np.int16)
    # The missing-value sentinel -1 indexes the last entry, func(None).
    return lookup[inverse]


def load_class_map(path: str | Path | None = None) -> ClassMap:
    """Read and check a class map CSV (default: the packaged ``hcat_classes.csv``)."""
    source = DEFAULT_CLASS_MAP_PATH if path is None else Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"class map {source} does not exist: give the path of a CSV with columns "
            f"{','.join(REQUIRED_COLUMNS)}, or none for the packaged {DEFAULT_CLASS_MAP_PATH}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"class map {source} cannot be read ({exc}); give a UTF-8 CSV file") from exc

    columns: dict[str, int] | None = None
    header_width = 0
    code_lines: dict[str, int] = {}
    name_lines: dict[str, int] = {}
    rules: list[tuple[str, int]] = []
    name_only: list[tuple[int, str, str]] = []  # (line, code, name)
    named: list[tuple[str, str, int | None]] = []  # (name, code, class_id or None)

    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"class map {source}, line {lineno}"
        fields = [value.strip() for value in next(csv.reader([line]))]
        if columns is None:
            lowered = [value.lower() for value in fields]
            missing = [name for name in REQUIRED_COLUMNS if name not in lowered]
            if missing:
                raise ConfigError(
                    f"{where}: the header lacks column(s) {', '.join(missing)}; the first line that "
                    f"is not a # comment must name the columns {','.join(REQUIRED_COLUMNS)}"
                )
            columns = {name: lowered.index(name) for name in REQUIRED_COLUMNS}
            header_width = len(fields)
            continue
        if len(fields) != header_width:
            raise ConfigError(
                f"{where}: found {len(fields)} fields, the header has {header_width}; write one value "
                "per column (an empty class_id still needs its comma)"
            )
        code = fields[columns["hcat3_code"]]
        name = fields[columns["hcat3_name"]]
        raw_class = fields[columns["class_id"]]
        if not _FILE_CODE.fullmatch(code):
            raise ConfigError(
                f"{where}: hcat3_code {code!r} is not a {HCAT3_CODE_DIGITS}-digit number; "
                "copy the code from EuroCrops HCAT3.csv, e.g. 3303050000"
            )
        if code in code_lines:
            raise ConfigError(
                f"{where}: hcat3_code {code} already appears on line {code_lines[code]}; "
                "keep one row per code (delete or merge one of them)"
            )
        code_lines[code] = lineno
        if not name:
            raise ConfigError(f"{where}: hcat3_name is empty; write the HCAT3 name of {code} from HCAT3.csv")
        key = _normal_name(name)
        if key in name_lines:
            raise ConfigError(
                f"{where}: hcat3_name {name!r} already appears on line {name_lines[key]}; "
                "each HCAT3 name belongs to one code"
            )
        name_lines[key] = lineno
        if raw_class == "":
            name_only.append((lineno, code, name))
            named.append((name, code, None))
            continue
        if raw_class.lower() == IGNORE_WORD:
            class_id = IGNORE_LABEL
        elif raw_class.isascii() and raw_class.isdigit() and int(raw_class) <= MAX_CLASS_ID:
            class_id = int(raw_class)
        else:
            raise ConfigError(
                f"{where}: class_id {raw_class!r} is outside 0..{MAX_CLASS_ID}; use 0 (none of the classes), "
                f"1..{MAX_CLASS_ID} or {IGNORE_WORD} (label {IGNORE_LABEL}, never learned; see the header comment "
                f"of {DEFAULT_CLASS_MAP_PATH.name}), or leave it empty for a name-only row"
            )
        rules.append((rule_prefix(code), class_id))
        named.append((name, code, class_id))

    if columns is None:
        raise ConfigError(
            f"class map {source} has no header line; start it with {','.join(REQUIRED_COLUMNS)}"
        )
    rules.sort(key=lambda rule: (-len(rule[0]), rule[0]))
    by_rules = ClassMap(rules=tuple(rules), names={})
    for lineno, code, name in name_only:
        if not any(code.startswith(prefix) for prefix, _ in rules):
            raise ConfigError(
                f"class map {source}, line {lineno}: {name} ({code}) has an empty class_id but no "
                "rule row covers it; give it a class_id or add a rule row for one of its parents"
            )
    if not rules:
        raise ConfigError(f"class map {source} has no rule rows; give at least one row a class_id "
                          f"0..{MAX_CLASS_ID} or {IGNORE_WORD}")

    names = {
        _normal_name(name): by_rules.class_of_code(code) if class_id is None else class_id
        for name, code, class_id in named
    }
    return ClassMap(rules=tuple(rules), names=names)
