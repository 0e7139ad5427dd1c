"""The access matrix — who can do what — from the same config objects the server runs."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from gateway.config_types import Config

COLUMNS = ("route", "methods", "host", "path", "upstream", "auth", "issuers", "scopes", "any_scopes", "roles",
           "claims", "forward", "websocket")


def access_matrix(config: Config) -> list[dict[str, Any]]:
    """One row per route, in file order. Besides the table's columns, JSON rows also carry the config's own
    names for what the columns show: `name`, `auth_required`, `path_prefix`, and the forward mode
    (`forward`: headers | token | none) apart from its `forward_audience` and `forward_scopes`."""
    rows = []
    for r in config.routes:
        a = r.auth
        token = r.forward.identity == "token"
        rows.append({
            "route": r.name,
            "name": r.name,
            "methods": list(r.methods) if r.methods else ["*"],
            "host": r.host or "*",
            "path": r.path if r.path is not None else f"{r.path_prefix}*",
            "path_prefix": r.path_prefix,
            "upstream": r.upstream,
            "auth": "required" if a.required else "public",
            "auth_required": a.required,
            "issuers": list(a.issuers),
            "scopes": list(a.scopes),
            "any_scopes": list(a.any_scopes),
            "roles": list(a.roles),
            "claims": {rule.claim: list(rule.values) if len(rule.values) > 1 else rule.values[0]
                       for rule in a.claims},
            "forward": r.forward.identity,
            "forward_audience": r.forward.audience if token else None,
            "forward_scopes": list(r.forward.scopes) if token and r.forward.scopes is not None else None,
            "websocket": r.websocket,
        })
    return rows


def _forward_cell(row: dict[str, Any]) -> str:
    """The table's and CSV's forward column: the mode, and for token mode its audience and scopes."""
    if row["forward"] != "token":
        return str(row["forward"])
    scopes = row["forward_scopes"]
    return f"token(aud={row['forward_audience']}" + (f", scopes={' '.join(scopes)}" if scopes is not None else "") + ")"


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(value) if value else "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={'|'.join(v) if isinstance(v, list) else v}" for k, v in value.items()) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def render(config: Config, fmt: str) -> str:
    rows = access_matrix(config)
    if fmt == "json":
        return json.dumps(rows, indent=2)
    cells = [[_forward_cell(row) if c == "forward" else _cell(row[c]) for c in COLUMNS] for row in rows]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(cells)
        return out.getvalue().rstrip("\n")
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(COLUMNS, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)
