"""Where a JSON body nests too deeply: the field path to name in the 422.

Why: Python's JSON parser gives up on a deeply nested body with RecursionError, which FastAPI turns
into a bare 400 "error parsing the body" naming no field, where the API documents 422 naming the field.
This scanner never recurses (a stack of containers), reads the body once with a regex tokenizer, and
stops at the first point deeper than `limit`: the keys (and list indexes) on the way there are the field.
"""

from __future__ import annotations

import json
import re

#: strings (with escapes) and the structural characters; everything else (numbers, literals) is skipped
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\],:]', re.S)
#: the path shown: the field and one level into it (a 10,000-level path helps nobody)
MAX_PATH_PARTS = 2


def deep_field(body: bytes | str, limit: int = 64) -> str:
    """The dotted path (pydantic-style: keys and list indexes) to where `body` first nests deeper than
    `limit`; "body" when that is the top level or the body cannot be scanned."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    stack: list[list] = []  # [kind "{"/"[", key or index, expecting a key]
    for match in _TOKENS.finditer(text):
        tok = match.group()
        if tok in "{[":
            if len(stack) >= limit:
                return _path(stack)
            stack.append([tok, 0 if tok == "[" else None, tok == "{"])
        elif tok in "}]":
            if stack:
                stack.pop()
        elif tok == ",":
            if stack:
                top = stack[-1]
                if top[0] == "[":
                    top[1] += 1
                else:
                    top[2] = True
        elif tok == ":":
            if stack:
                stack[-1][2] = False
        elif stack and stack[-1][0] == "{" and stack[-1][2]:  # a string where a key is expected
            try:
                stack[-1][1] = json.loads(tok)
            except ValueError:
                stack[-1][1] = tok.strip('"')
    return "body"


def _path(stack: list[list]) -> str:
    parts = [str(level[1]) for level in stack if level[1] is not None][:MAX_PATH_PARTS]
    return ".".join(parts) or "body"
