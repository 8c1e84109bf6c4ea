"""One mechanism to check every JSON file minilora reads, as a whole, before it is used.

A file kind (Hugging Face's config.json, an adapter config, a checkpoint's state, a run
config) is described once by a Schema: its fields, each with a type and its limits, and
the relations between fields. `read_json(path, schema)` parses the file and checks all
of it; the first problem is raised as one line that names the file, the key, what was
expected and what was found:

    runs/x/adapter/minilora_adapter.json: rank: expected an integer >= 1, found -3

Nothing reads a field that was not checked, so a hand-edited or damaged file is refused
before the model, the optimizer or the run folder changes. The non-numbers NaN and
Infinity (which Python's json reads) and 1e999 (which parses to infinity) are refused
wherever a number is expected, with the key they sit under.

The types (`Field.kind`): "int" (a JSON integer, never a bool or 2.7), "number" (an
integer or a finite float), "str", "bool", "list" (of `items`, a Field), "dict" (a
nested Schema in `schema`, or any object when it is None), "any".
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MiniloraError


class FileCheckError(MiniloraError, ValueError):
    """A file whose content is not what its kind must hold: the message names the file,
    the key and what was expected, in one line."""


_KIND_WORDS = {"int": "an integer", "number": "a finite number", "str": "a string", "bool": "true or false",
               "list": "a list", "dict": "an object", "any": "a value"}


@dataclass(frozen=True)
class Field:
    """One key of a file: its type, whether it may be absent or null, and its limits."""

    kind: str
    required: bool = True  # the key must be present
    nullable: bool = False  # null is allowed
    least: float = None  # value >= least (numbers)
    above: float = None  # value > above (numbers)
    most: float = None  # value <= most (numbers)
    choices: tuple = None  # the value is one of these
    items: "Field" = None  # for lists: every item
    min_items: int = 0  # for lists
    schema: "Schema" = None  # for dicts: the nested object's schema

    def expected(self):
        """What this field must hold, in words: 'an integer >= 1', 'one of ["a", "b"]'."""
        if self.choices is not None:
            words = "one of " + ", ".join(json.dumps(c) for c in self.choices)
        else:
            words = _KIND_WORDS[self.kind]
            limits = [f"{op} {v:g}" for op, v in ((">=", self.least), (">", self.above), ("<=", self.most))
                      if v is not None]
            words += " " + " and ".join(limits) if limits else ""
            if self.kind == "list" and self.items is not None:
                words = f"a list of {self.items.expected()}" + (
                    f" (at least {self.min_items})" if self.min_items else "")
        return words + (" or null" if self.nullable else "")

    def problem(self, value):
        """None when `value` fits this field, else what is wrong (for the error line)."""
        if value is None:
            return None if self.nullable else "expected " + self.expected() + ", found null"
        if not _is_kind(value, self.kind):
            return f"expected {self.expected()}, found {_shown(value)}"
        if self.choices is not None and value not in self.choices:
            return f"expected {self.expected()}, found {_shown(value)}"
        if self.kind in ("int", "number"):
            if (self.least is not None and value < self.least) or (self.above is not None and value <= self.above) \
                    or (self.most is not None and value > self.most):
                return f"expected {self.expected()}, found {_shown(value)}"
        if self.kind == "list":
            if len(value) < self.min_items:
                return f"expected {self.expected()}, found {len(value)} item(s)"
        return None


def _is_kind(value, kind):
    if kind == "any":
        return True
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, {"str": str, "list": list, "dict": dict}[kind])


def _shown(value, limit=60):
    text = json.dumps(value, allow_nan=True) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Schema:
    """A JSON object's fields and the relations between them.

    relations: functions of the (already type-checked) dict returning None, or a pair
    (key, problem) naming what is wrong. extra: "refuse" unknown keys (minilora's own
    files) or "ignore" them (files other tools write too, such as Hugging Face's
    config.json, which holds dozens of keys minilora does not use).
    """

    what: str  # the kind of file, for messages: "adapter config"
    fields: dict
    relations: tuple = ()
    extra: str = "refuse"
    defaults: dict = field(default_factory=dict)  # what an absent optional key means

    def check(self, data, source, prefix=""):
        """`data` with the defaults of absent optional keys filled in, or FileCheckError."""
        if not isinstance(data, dict):
            raise FileCheckError(f"{source}: {prefix or 'the file'}: expected an object ({self.what}), "
                                 f"found {_shown(data)}")
        if self.extra == "refuse":
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise FileCheckError(f"{source}: {prefix}{unknown[0]}: not a key of a {self.what} "
                                     f"(known: {', '.join(self.fields)})")
        out = dict(data)
        for key, spec in self.fields.items():
            if key not in data:
                if spec.required:
                    raise FileCheckError(f"{source}: {prefix}{key}: missing (expected {spec.expected()})")
                out[key] = self.defaults.get(key)
                continue
            out[key] = _check_value(spec, data[key], source, f"{prefix}{key}")
        for relation in self.relations:
            found = relation(out)
            if found:
                key, problem = found
                raise FileCheckError(f"{source}: {prefix}{key}: {problem}")
        return out


def _check_value(spec, value, source, key):
    problem = spec.problem(value)
    if problem:
        raise FileCheckError(f"{source}: {key}: {problem}")
    if value is None:
        return None
    if spec.kind == "dict" and spec.schema is not None:
        return spec.schema.check(value, source, prefix=key + ".")
    if spec.kind == "list" and spec.items is not None:
        return [_check_value(spec.items, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def parse_json(text, source):
    """The JSON value of `text`, or FileCheckError naming `source`. NaN and Infinity
    (not JSON, but Python's json writes and reads them) are read as floats, so that the
    schema refuses them with the key they sit under: a "number" must be finite."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileCheckError(f"{source} is not valid JSON ({e})") from None


def load_json(path):
    """The parsed JSON of the file at `path`, unchecked (for a reader that must look at it
    before it knows which schema applies), or FileCheckError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FileCheckError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_json(text, path)


def read_json(path, schema):
    """Read `path` and check it against `schema`: the checked dict, or FileCheckError."""
    return schema.check(load_json(path), Path(path))


def strict_json(obj, indent=2):
    """JSON text of `obj` with every NaN or infinity written as null (an evaluation over no
    batch, a metric that could not be measured): Python's json module writes them as the
    bare words NaN / Infinity, which are not JSON, which most readers reject, and which
    read_json refuses wherever a number belongs."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=indent, allow_nan=False)
