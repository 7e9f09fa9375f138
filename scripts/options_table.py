"""The Markdown table of every configuration option, generated from grpo/config.py's models: section, dotted key,
type (with its constraints), default, description, and TRL GRPOConfig's name for the same setting (grpo.config's
TRL_NAMES). docs/recipes.md holds it between `<!-- options:start -->` and `<!-- options:end -->`;
tests/unit/test_options_table.py fails when the two differ.

    python scripts/options_table.py            # print the table
    python scripts/options_table.py --write    # rewrite docs/recipes.md's block in place
    python scripts/options_table.py --check    # exit 1 when docs/recipes.md's block is stale
"""

from __future__ import annotations

import json
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from grpo.config import TRL_NAMES, Config  # noqa: E402

DOC = ROOT / "docs" / "recipes.md"
START, END = "<!-- options:start -->", "<!-- options:end -->"
BOUNDS = {at.Gt: ("gt", ">"), at.Ge: ("ge", ">="), at.Lt: ("lt", "<"), at.Le: ("le", "<="),
          at.MinLen: ("min_length", "min length"), at.MaxLen: ("max_length", "max length")}


def options(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted key, field) of every leaf option, sections expanded in declaration order (list items as `[]`)."""
    for name, f in model.model_fields.items():
        tp, many = f.annotation, typing.get_origin(f.annotation) is list
        sub = typing.get_args(tp)[0] if many else tp
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            yield from options(sub, f"{prefix}{name}{'[]' if many else ''}.")
        else:
            yield prefix + (f.alias or name), f


def constraints(metadata: list[Any]) -> list[str]:
    out = []
    for m in metadata:
        if type(m) in BOUNDS:
            attr, op = BOUNDS[type(m)]
            out.append(f"{op} {getattr(m, attr)}")
        elif isinstance(m, FieldInfo):  # Field(...) inside Annotated[...]
            out += constraints(m.metadata)
    return out


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        bounds = constraints(list(tp.__metadata__))
        return type_name(args[0]) + (f" ({', '.join(bounds)})" if bounds else "")
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return "mapping"
    return tp.__name__


def row(key: str, f: FieldInfo) -> str:
    section = key.split(".")[0].removesuffix("[]") if "." in key else "top level"
    kind = type_name(f.annotation) + "".join(f", {c}" for c in constraints(f.metadata))
    default = json.dumps(f.get_default(call_default_factory=True))
    trl = (", ".join(f"`{n}`" for n in TRL_NAMES[key]) or "none") if key in TRL_NAMES else ""
    cells = [section, f"`{key}`", kind, f"`{default}`", " ".join(f.description.split()), trl]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def table() -> str:
    head = ["| section | key | type | default | description | TRL GRPOConfig |", "|---|---|---|---|---|---|"]
    return "\n".join(head + [row(key, f) for key, f in options()])


def splice(text: str, block: str) -> str:
    """`text` with what lies between the markers replaced by `block`."""
    before, sep, rest = text.partition(START)
    _, sep2, after = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"{DOC}: the markers {START} and {END} are missing")
    return f"{before}{START}\n{block}\n{END}{after}"


def main(argv: list[str]) -> int:
    text = DOC.read_text()
    if "--write" in argv:
        DOC.write_text(splice(text, table()))
    elif "--check" in argv:
        if splice(text, table()) != text:
            print(f"{DOC} is stale: run python scripts/options_table.py --write", file=sys.stderr)
            return 1
    else:
        print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
