"""Tool calling: the chat template renders the tools and the conversation's calls and
results; a reply's calls are found at the template's markers and read by mlx-lm's parser of
that format (`TokenizerWrapper.tool_parser`); `tool_choice` "required" or a named function is
a grammar of the format's call syntax (decoding.grammar), so that any model, even one that
would not call, gives a call that parses and fits the function's parameter schema.

Formats with a grammar (the parser mlx-lm infers from the template):
- gemma4: `<|tool_call>call:name{key:value,...}<tool_call|>`, keys bare, strings between
  `<|"|>` tokens (Gemma 4's own string delimiter);
- json_tools: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.
Other formats are parsed in replies; "required" and named calls on them are refused.
"""

import json
import re
import uuid
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

from .decoding.grammar import LAYOUT, check_schema_size
from .request import held_back

GRAMMAR_FORMATS = ("gemma4", "json_tools")

# Gemma 4's value syntax, any value (where a schema does not say more)
GEMMA_VALUE = r"""
any_value: string | NUMBER | "true" | "false" | "null" | any_object | any_array
any_object: "{" (any_pair ("," any_pair)*)? "}"
any_pair: KEY ":" any_value
any_array: "[" (any_value ("," any_value)*)? "]"
KEY: /[A-Za-z0-9_]+/
NUMBER: /-?(0|[1-9][0-9]{0,15})(\.[0-9]{1,16})?([eE][+-]?[0-9]{1,2})?/
INTEGER: /-?(0|[1-9][0-9]{0,17})/
TEXT: /(.|\n)*/ & ~/(.|\n)*<\|"\|>(.|\n)*/
"""
KEY = re.compile(r"\w+")  # the keys mlx-lm's gemma4 parser reads back


def call_format(tokenizer) -> Optional[str]:
    """The name of the template's tool-call format (mlx-lm's parser module), or None if the
    template has no tool calling."""
    if tokenizer is None or not getattr(tokenizer, "has_tool_calling", False):
        return None
    return tokenizer.tool_parser.__module__.rsplit(".", 1)[-1]


def _literal(tokenizer, text: str) -> str:
    """Lark for `text`: its special tokens as such (`<[id]>`), the rest as strings (Gemma 4's
    thought opens with `<|channel>`, a special token, then the text `thought`)."""
    specials = set(_special_texts(tokenizer))
    parts, run = [], []
    for token in tokenizer.encode(text, add_special_tokens=False):
        if tokenizer.convert_ids_to_tokens(token) in specials:
            if run:
                parts.append(json.dumps(tokenizer.decode(run)))
            parts.append(f"<[{token}]>")
            run = []
        else:
            run.append(token)
    if run:
        parts.append(json.dumps(tokenizer.decode(run)))
    return " ".join(parts) if parts else json.dumps(text)


def thought_rule(tokenizer, opened: bool) -> str:
    """Lark of a thought before the calls, where the template has a thinking channel: its
    end (the prompt `opened` it), or a whole thought or none (the model may open one)."""
    start, end = _literal(tokenizer, tokenizer.think_start), _literal(tokenizer, tokenizer.think_end)
    text = "/(.|\\n)*/ & ~/(.|\\n)*" + re.escape(tokenizer.think_end).replace("/", "\\/") + "(.|\\n)*/"
    rule = "thought: THOUGHT " + end if opened else f"thought: ({start} THOUGHT {end})?"
    return f"{rule}\nTHOUGHT: {text}\n"


def call_grammar(tokenizer, tools: Sequence[dict], several: bool, thought: Optional[bool] = None) -> str:
    """An llguidance Lark grammar of the reply: a call (`several`: one or more calls) of
    one of `tools` (OpenAI's {"type": "function", "function": {...}}), in the template's
    format; after a thought if `thought` is not None (see `thought_rule`: True, the prompt
    opened one). ValueError: a format without a grammar here, or a schema it cannot express."""
    form = call_format(tokenizer)
    if form not in GRAMMAR_FORMATS:
        raise ValueError(f"a required tool call needs a grammar of this model's tool-call format ({form}), "
                         f"which mlx-mtp has for {', '.join(GRAMMAR_FORMATS)} only")
    start, end = _literal(tokenizer, tokenizer.tool_call_start), _literal(tokenizer, tokenizer.tool_call_end)
    functions = [t["function"] for t in tools]
    specials = _special_texts(tokenizer)
    for f in functions:
        check_schema_size(f.get("parameters") or {})
        for text in _constants(f.get("parameters") or {}):
            token = next((t for t in specials if t in text), None)
            if token is not None:  # (the model writes the special token, never its text)
                raise ValueError(f"a required tool call cannot have a constant holding the special token {token!r}")
    top = f"start: {'thought ' if thought is not None else ''}call{'+' if several else ''}\n"
    if thought is not None:
        top += thought_rule(tokenizer, thought)
    if form == "json_tools":
        definitions, schemas = {}, []
        for i, f in enumerate(functions):
            arguments = _closed(_hoist_definitions(f.get("parameters") or {"type": "object"}, f"f{i}_", definitions))
            schemas.append({"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": arguments},
                            "required": ["name", "arguments"], "additionalProperties": False})
        schema = {"anyOf": schemas, "x-guidance": LAYOUT, **({"$defs": definitions} if definitions else {})}
        return top + f'call: {start} "\\n" %json {json.dumps(schema)} "\\n" {end}\n'
    rules = _GemmaRules(_literal(tokenizer, '<|"|>'))
    calls = [f'"call:{f["name"]}" {rules.value(f.get("parameters") or {"type": "object"})}' for f in functions]
    return top + f"call: {start} ({' | '.join(calls)}) {end}\n" + "\n".join(rules.lines) + GEMMA_VALUE \
        + f"string: {rules.quote} TEXT {rules.quote}\n"


def _hoist_definitions(schema: dict, prefix: str, definitions: dict) -> dict:
    """A function's parameters with their `$defs` (or `definitions`) moved to the call
    schema's root under `prefix`, and their `$ref`s rewritten to match (refs are relative to
    the root, where the parameters are one branch of several)."""
    own = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    if not own:
        return schema

    def rewrite(node):
        if isinstance(node, dict):
            out = {k: rewrite(v) for k, v in node.items() if k not in ("$defs", "definitions")}
            ref = node.get("$ref")
            if isinstance(ref, str):
                for root in ("#/$defs/", "#/definitions/"):
                    if ref.startswith(root):
                        out["$ref"] = "#/$defs/" + prefix + ref[len(root):]
            return out
        return [rewrite(v) for v in node] if isinstance(node, list) else node

    definitions.update({prefix + name: rewrite(d) for name, d in own.items()})
    return rewrite(schema)


def _closed(schema):
    """Objects with properties take no other keys unless the schema says they may (else a
    small model goes on adding keys to the reply's end)."""
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def _special_texts(tokenizer) -> Tuple[str, ...]:
    """The texts of the tokenizer's added tokens, which llguidance reads as special tokens
    (never as text), whatever their `special` flag. (Once per tokenizer: Gemma's 6,414 take
    7 ms to list, and a call grammar asks several times.)"""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return tuple(t.content for t in added.values() if t.content)


def _constants(schema) -> List[str]:
    """The strings of a schema's `const`s and `enum`s, at any depth."""
    out = []
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "const" and isinstance(value, str):
                out.append(value)
            elif key == "enum" and isinstance(value, list):
                out += [v for v in value if isinstance(v, str)]
            else:
                out += _constants(value)
    elif isinstance(schema, list):
        for value in schema:
            out += _constants(value)
    return out


class _GemmaRules:
    """Lark rules for Gemma 4 values of JSON schemas: types, enums and consts, nested
    objects (their required keys, in sorted order as the template writes them), arrays (and
    how many items), and strings' lengths; anything else (a `$ref`, a string's pattern or format, a number's
    range) is any value of its type."""

    def __init__(self, quote: str):
        self.quote, self.lines = quote, []
        self.made = {}  # schema (as JSON) -> its rule: a subschema met again is not built again


    def rule(self, body: str) -> str:
        name = f"r{len(self.lines)}"
        self.lines.append(f"{name}: {body}")
        return name

    def string(self, schema: dict) -> str:
        """A string, of at most `maxLength` and at least `minLength` characters if set
        (without bounds, a random model's string may go on to the reply's end)."""
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        if not (isinstance(low, int) and low > 0) and not isinstance(high, int):
            return "string"
        low = low if isinstance(low, int) and low > 0 else 0
        bounds = f"{low},{high}" if isinstance(high, int) and high >= low else f"{low},"
        name = f"TEXT{len(self.lines)}"
        self.lines.append(f"{name}: /(.|\\n){{{bounds}}}/ & ~/(.|\\n)*<\\|\"\\|>(.|\\n)*/")
        return f"{self.quote} {name} {self.quote}"

    def constant(self, value) -> Optional[str]:
        if isinstance(value, str):
            return f"{self.quote} {json.dumps(value)} {self.quote}" if value else f"{self.quote} {self.quote}"
        if isinstance(value, bool):
            return '"true"' if value else '"false"'
        if isinstance(value, (int, float)):
            return json.dumps(json.dumps(value))
        return None  # (null, objects and arrays as constants: any value)

    def value(self, schema) -> str:
        if not isinstance(schema, dict):
            return "any_value"
        key = json.dumps(schema, sort_keys=True)
        if key not in self.made:
            self.made[key] = self._value(schema)
        return self.made[key]

    def _value(self, schema: dict) -> str:
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            alternatives = [self.constant(v) for v in values if isinstance(values, list)] or [None]
            return "any_value" if None in alternatives else self.rule(" | ".join(alternatives))
        options = schema.get("anyOf") or schema.get("oneOf")
        if isinstance(options, list) and options:
            return self.rule(" | ".join(self.value(s) for s in options))
        kind = schema.get("type")
        if isinstance(kind, list) and kind:
            return self.rule(" | ".join(self.value({**schema, "type": k}) for k in kind))
        if kind == "string":
            return self.string(schema)
        if kind == "integer":
            return "INTEGER"
        if kind == "number":
            return "NUMBER"
        if kind == "boolean":
            return '("true" | "false")'
        if kind == "null":
            return '"null"'
        if kind == "array":
            item = self.value(schema.get("items", {}))
            low, high = schema.get("minItems", 0), schema.get("maxItems")
            low = low if isinstance(low, int) and low > 0 else 0
            high = high if isinstance(high, int) and high >= low else None
            if high == 0:
                return '"[" "]"'
            more = "" if high == 1 else f" (\",\" {item}){{{max(low - 1, 0)},{'' if high is None else high - 1}}}"
            items = f"{item}{more}"  # the first item, then those after it
            return self.rule(f'"[" {items if low else f"({items})?"} "]"')
        if kind == "object" and isinstance(schema.get("properties"), dict) and schema["properties"]:
            return self.rule(f'"{{" {self.members(schema)} "}}"')
        return {"object": "any_object"}.get(kind, "any_value")

    def members(self, schema: dict) -> str:
        """An object's members in sorted key order: the required ones always, each optional
        one or not, commas between (a rule per start point, so that nothing is O(n^2))."""
        required = set(schema.get("required") or ())
        keys = sorted(schema["properties"])
        bad = [k for k in keys if not KEY.fullmatch(k)]
        if bad:
            raise ValueError(f"a required tool call cannot have the parameter name {bad[0]!r} "
                             "(Gemma 4's call syntax has bare word keys)")
        pairs = [f'"{k}:" {self.value(schema["properties"][k])}' for k in keys]
        rest = ['("," ' + p + (")" if k in required else ")?") for k, p in zip(keys, pairs)]
        first = '""'  # (nothing: only if no key is required)
        for i in reversed(range(len(keys))):  # first: the members from key i on, none written before
            tail = " ".join(rest[i + 1:])
            here = f"{pairs[i]} {tail}".strip()
            first = self.rule(here if keys[i] in required else f"{here} | {first}")
        return first


class ToolCallText:
    """Splits a reply's streamed text into its content and its tool calls at the template's
    markers, each call read by mlx-lm's parser of the format. A call that does not parse (a
    free reply that only looks like one) stays in the content, markers and all: nothing the
    model wrote is dropped."""

    def __init__(self, tokenizer, tools: Sequence[dict]):
        self.markers = (tokenizer.tool_call_start, tokenizer.tool_call_end)
        self.parse, self.tools = tokenizer.tool_parser, list(tools)
        self.inside, self.pending, self.call = False, "", ""
        self.count = 0  # calls so far (their index in a stream)

    def feed(self, text: str, final: bool) -> Tuple[str, List[dict]]:
        """-> (content safe to show now, the calls completed now, in OpenAI's form)."""
        self.pending += text
        content, calls = [], []
        while True:
            marker = self.markers[self.inside]
            at = self.pending.find(marker)
            if at < 0:
                break
            if self.inside:
                self._finish(self.call + self.pending[:at], content, calls, closed=True)
            else:
                content.append(self.pending[:at])
            self.pending, self.call = self.pending[at + len(marker):], ""
            self.inside = not self.inside
        hold = 0 if final else held_back(self.pending, self.markers)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        if self.inside:
            self.call += out
            if final:  # (a call the reply's end cut short)
                self._finish(self.call, content, calls, closed=False)
        else:
            content.append(out)
        return "".join(content), calls

    def _finish(self, text: str, content: list, calls: list, closed: bool):
        try:
            parsed = self.parse(text, self.tools)
        except ValueError:  # (json.JSONDecodeError is one)
            parsed = None
        parsed = parsed if isinstance(parsed, list) else [parsed]
        try:  # (JSON has no infinities: a number like 1e999 parses to one)
            found = [(p["name"], p.get("arguments", {}) if isinstance(p.get("arguments", {}), str)
                      else json.dumps(p.get("arguments", {}), ensure_ascii=False, allow_nan=False)) for p in parsed
                     if isinstance(p, dict) and isinstance(p.get("name"), str)]
        except ValueError:
            found = []
        if len(found) < len(parsed) or not found:
            content.append(self.markers[0] + text + (self.markers[1] if closed else ""))
            return
        for name, arguments in found:
            calls.append({"index": self.count, "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                          "function": {"name": name, "arguments": arguments}})
            self.count += 1
