"""The table viewer's filter language, compiled to parameterised DuckDB SQL.

    label = "Shirt" and pred != label
    score < 0.5 or not (correct)
    id in ("a", "b") and width >= 28

Grammar (keywords are case-insensitive)::

    expr    := and ("or" and)*
    and     := unary ("and" unary)*
    unary   := "not" unary | primary
    primary := "(" expr ")" | operand [op operand | ["not"] "in" "(" literal ("," literal)* ")"]
    operand := column | literal
    op      := "=" | "==" | "!=" | "<>" | "<" | "<=" | ">" | ">="
    column  := name (letters, digits, "_", "." and "/"; not starting with a digit) | `any name`
    literal := "string" | 'string' | number | -number | true | false | null

A hand-written tokenizer and recursive-descent parser turn the text into a tree; the compiler
checks every column against the table's schema, quotes it, and binds every value as a
parameter: no part of the user's text is ever pasted into SQL. Class names compared with a
class-coded integer column (``label``, ``pred``) become their class index. Errors carry the
position (0-based offset) of the offending token.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

MAX_LENGTH = 8000
MAX_TOKENS = 4000
MAX_DEPTH = 40
MAX_IN_VALUES = 1000

KEYWORDS = {"and", "or", "not", "in", "true", "false", "null"}
OPERATORS = ("==", "!=", "<>", "<=", ">=", "=", "<", ">")
SQL_OPERATORS = {"==": "=", "=": "=", "!=": "<>", "<>": "<>", "<": "<", "<=": "<=", ">": ">"}
SQL_OPERATORS[">="] = ">="
FLIPPED = {"=": "=", "<>": "<>", "<": ">", "<=": ">=", ">": "<", ">=": "<="}

# Column kinds the language knows; anything else (lists, structs, blobs) cannot be filtered.
NUMBER, TEXT, BOOL, CLASS, OTHER = "number", "text", "bool", "class", "other"


class FilterError(ValueError):
    """A filter that cannot be used, with where in the text it went wrong."""

    def __init__(self, message: str, position: int, length: int = 1):
        super().__init__(message)
        self.message = message
        self.position = max(0, position)
        self.length = max(1, length)

    def __str__(self) -> str:
        return f"{self.message} (at character {self.position + 1})"


@dataclass(frozen=True)
class Schema:
    """What a filter may refer to: column name -> kind, and the class names of CLASS columns."""

    columns: dict[str, str]
    classes: list[str] | None = None

    def kind(self, name: str) -> str | None:
        return self.columns.get(name)


def kind_of_duckdb_type(type_name: str) -> str:
    """Map a DuckDB type name (as DESCRIBE prints it) to a filter kind."""
    t = type_name.upper()
    if t in ("BOOLEAN", "BOOL"):
        return BOOL
    if t in ("VARCHAR", "TEXT", "STRING") or t.startswith("VARCHAR"):
        return TEXT
    if re.fullmatch(
        r"(U?(TINY|SMALL|BIG|HUGE)?INT(EGER)?|INTEGER|U?HUGEINT|FLOAT|REAL|DOUBLE|DECIMAL.*)", t
    ):
        return NUMBER
    return OTHER


def quote_ident(name: str) -> str:
    """A DuckDB identifier, always quoted (a name may be any string)."""
    if "\0" in name:
        raise ValueError("a column name cannot contain NUL")
    return '"' + name.replace('"', '""') + '"'


# -- tokens ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    kind: str  # "name", "string", "number", "op", "(", ")", ",", "-", "kw", "end"
    text: str
    value: Any
    position: int

    @property
    def length(self) -> int:
        return max(1, len(self.text))


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_./]*")
_NUMBER = re.compile(r"(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def tokenize(text: str) -> list[Token]:
    if len(text) > MAX_LENGTH:
        raise FilterError(f"the filter is longer than {MAX_LENGTH} characters", MAX_LENGTH)
    tokens: list[Token] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if len(tokens) >= MAX_TOKENS:
            raise FilterError(f"the filter has more than {MAX_TOKENS} tokens", i)
        if c in "(),-":
            tokens.append(Token(c, c, c, i))
            i += 1
            continue
        op = next((o for o in OPERATORS if text.startswith(o, i)), None)
        if op is not None:
            tokens.append(Token("op", op, SQL_OPERATORS[op], i))
            i += len(op)
            continue
        if c in "\"'":
            value, end = _read_string(text, i)
            tokens.append(Token("string", text[i:end], value, i))
            i = end
            continue
        if c == "`":
            value, end = _read_quoted_name(text, i)
            tokens.append(Token("name", text[i:end], value, i))
            i = end
            continue
        match = _NUMBER.match(text, i)
        if match and (c.isdigit() or c == "."):
            raw = match.group(0)
            end = match.end()
            if end < n and (text[end].isalpha() or text[end] == "_"):
                raise FilterError(
                    f"{text[i : end + 1]!r} is neither a number nor a column name", i, end + 1 - i
                )
            tokens.append(Token("number", raw, _number(raw, i), i))
            i = end
            continue
        match = _NAME.match(text, i)
        if match:
            word = match.group(0)
            lower = word.lower()
            if lower in KEYWORDS:
                tokens.append(Token("kw", word, lower, i))
            else:
                tokens.append(Token("name", word, word, i))
            i = match.end()
            continue
        if c == "!":
            raise FilterError("unexpected '!': write != for 'not equal', or use not", i)
        if c == ";":
            raise FilterError("unexpected ';': a filter is a single condition, not SQL", i)
        raise FilterError(f"unexpected character {c!r}", i)
    tokens.append(Token("end", "", None, n))
    return tokens


def _read_string(text: str, start: int) -> tuple[str, int]:
    quote = text[start]
    out = []
    i = start + 1
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append({"n": "\n", "t": "\t"}.get(nxt, nxt))
            i += 2
            continue
        if c == quote:
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise FilterError(f"this string has no closing {quote}", start, len(text) - start)


def _read_quoted_name(text: str, start: int) -> tuple[str, int]:
    out = []
    i = start + 1
    while i < len(text):
        if text[i] == "`":
            if text.startswith("``", i):
                out.append("`")
                i += 2
                continue
            if not out:
                raise FilterError("empty column name", start, 2)
            return "".join(out), i + 1
        out.append(text[i])
        i += 1
    raise FilterError("this column name has no closing `", start, len(text) - start)


def _number(raw: str, position: int) -> int | float:
    if re.fullmatch(r"\d+", raw):
        value = int(raw)
        return value if value < 2**63 else float(value)
    value = float(raw)
    if not math.isfinite(value):
        raise FilterError(f"{raw} is too large a number", position, len(raw))
    return value


# -- syntax tree -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Col:
    name: str
    token: Token


@dataclass(frozen=True)
class Lit:
    value: Any  # str, int, float, bool or None
    token: Token
    length: int = 0


@dataclass(frozen=True)
class Compare:
    op: str  # SQL operator
    left: Col | Lit
    right: Col | Lit
    token: Token


@dataclass(frozen=True)
class InList:
    operand: Col | Lit
    values: list[Lit]
    negated: bool
    token: Token


@dataclass(frozen=True)
class Truth:
    operand: Col | Lit


@dataclass(frozen=True)
class Not:
    inner: Node


@dataclass(frozen=True)
class BoolOp:
    op: str  # "AND" / "OR"
    parts: list[Node] = field(default_factory=list)


Node = Compare | InList | Truth | Not | BoolOp


class _Parser:
    def __init__(self, tokens: list[Token]):
        self.tokens = tokens
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def is_kw(self, word: str) -> bool:
        return self.tok.kind == "kw" and self.tok.value == word

    def expect(self, kind: str, what: str) -> Token:
        if self.tok.kind != kind:
            raise self.error(f"expected {what}")
        return self.take()

    def error(self, message: str, tok: Token | None = None) -> FilterError:
        tok = tok or self.tok
        found = "the end of the filter" if tok.kind == "end" else repr(tok.text)
        return FilterError(f"{message}, found {found}", tok.position, tok.length)

    def parse(self) -> Node:
        if self.tok.kind == "end":
            raise FilterError("the filter is empty", 0)
        node = self.expr()
        if self.tok.kind != "end":
            if self.tok.kind == ")":
                raise FilterError("unbalanced ')': no '(' opens it", self.tok.position)
            raise self.error("expected and / or, or the end of the filter")
        return node

    def expr(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FilterError(f"the filter nests deeper than {MAX_DEPTH} levels", self.tok.position)
        parts = [self.conj()]
        while self.is_kw("or"):
            self.take()
            parts.append(self.conj())
        self.depth -= 1
        return parts[0] if len(parts) == 1 else BoolOp("OR", parts)

    def conj(self) -> Node:
        parts = [self.unary()]
        while self.is_kw("and"):
            self.take()
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else BoolOp("AND", parts)

    def unary(self) -> Node:
        if self.is_kw("not"):
            self.take()
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise FilterError(
                    f"the filter nests deeper than {MAX_DEPTH} levels", self.tok.position
                )
            inner = self.unary()
            self.depth -= 1
            return Not(inner)
        return self.primary()

    def primary(self) -> Node:
        if self.tok.kind == "(":
            opening = self.take()
            node = self.expr()
            if self.tok.kind != ")":
                if self.tok.kind == "end":
                    raise FilterError("this '(' is never closed", opening.position)
                raise self.error("expected ')'")
            self.take()
            return node
        left = self.operand()
        if self.tok.kind == "op":
            op_tok = self.take()
            right = self.operand()
            return Compare(op_tok.value, left, right, op_tok)
        negated = False
        following = self.tokens[self.i + 1] if self.tok.kind != "end" else self.tok
        if self.is_kw("not") and following.kind == "kw" and following.value == "in":
            self.take()
            negated = True
        if self.is_kw("in"):
            in_tok = self.take()
            if self.tok.kind != "(":
                raise self.error("expected '(' and a list of values after in")
            self.take()
            values = [self.literal()]
            while self.tok.kind == ",":
                self.take()
                values.append(self.literal())
                if len(values) > MAX_IN_VALUES:
                    raise FilterError(
                        f"an in (...) list may hold at most {MAX_IN_VALUES} values",
                        self.tok.position,
                    )
            if self.tok.kind != ")":
                raise self.error("expected ',' or ')' in the in (...) list")
            self.take()
            return InList(left, values, negated, in_tok)
        return Truth(left)

    def operand(self) -> Col | Lit:
        if self.tok.kind == "name":
            tok = self.take()
            return Col(tok.value, tok)
        return self.literal()

    def literal(self) -> Lit:
        tok = self.tok
        if tok.kind in ("string", "number"):
            self.take()
            return Lit(tok.value, tok, tok.length)
        if tok.kind == "-":
            self.take()
            if self.tok.kind != "number":
                raise self.error("expected a number after '-'")
            num = self.take()
            return Lit(-num.value, tok, num.position + num.length - tok.position)
        if tok.kind == "kw" and tok.value in ("true", "false", "null"):
            self.take()
            return Lit({"true": True, "false": False, "null": None}[tok.value], tok, tok.length)
        if tok.kind == "name":
            raise self.error("expected a value (a string in quotes, a number, true or false)")
        raise self.error("expected a column name or a value")


def parse(text: str) -> Node:
    """The syntax tree of a filter; FilterError on bad syntax."""
    return _Parser(tokenize(text)).parse()


# -- compiling -------------------------------------------------------------------------------


@dataclass
class CompiledFilter:
    sql: str  # a boolean SQL expression with ? placeholders
    params: list[Any]
    columns: set[str]  # the columns it reads


class _Compiler:
    def __init__(self, schema: Schema):
        self.schema = schema
        self.params: list[Any] = []
        self.columns: set[str] = set()

    def node(self, node: Node) -> str:
        if isinstance(node, BoolOp):
            return "(" + f" {node.op} ".join(self.node(p) for p in node.parts) + ")"
        if isinstance(node, Not):
            return f"(NOT {self.node(node.inner)})"
        if isinstance(node, Truth):
            return self.truth(node)
        if isinstance(node, InList):
            return self.in_list(node)
        return self.compare(node)

    def column(self, col: Col) -> tuple[str, str]:
        kind = self.schema.kind(col.name)
        if kind is None:
            names = list(self.schema.columns)
            close = [n for n in names if n.lower() == col.name.lower()]
            hint = (
                f"; did you mean {close[0]}?"
                if close
                else f"; columns: {', '.join(names[:30])}{' …' if len(names) > 30 else ''}"
            )
            raise FilterError(
                f"unknown column {col.name!r}{hint}", col.token.position, col.token.length
            )
        if kind == OTHER:
            raise FilterError(
                f"column {col.name!r} holds lists, images or other values that cannot be "
                "compared; filter on another column",
                col.token.position,
                col.token.length,
            )
        self.columns.add(col.name)
        return quote_ident(col.name), kind

    def bind(self, value: Any) -> str:
        self.params.append(value)
        return "?"

    def value_for(self, kind: str, lit: Lit, column: str) -> Any:
        """The parameter value of a literal compared with a column of ``kind``."""
        value = lit.value
        pos, length = lit.token.position, lit.length or lit.token.length
        if kind == CLASS:
            if isinstance(value, str):
                classes = self.schema.classes or []
                if value not in classes:
                    shown = ", ".join(repr(c) for c in classes[:20])
                    raise FilterError(
                        f"{value!r} is not a class of column {column!r}; classes: {shown}",
                        pos,
                        length,
                    )
                return classes.index(value)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise FilterError(
                    f"column {column!r} holds classes: compare it with a class name in quotes "
                    "or a class index",
                    pos,
                    length,
                )
            return value
        if kind == NUMBER:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise FilterError(
                    f"column {column!r} holds numbers; compare it with a number", pos, length
                )
            return value
        if kind == TEXT:
            if not isinstance(value, str):
                raise FilterError(
                    f"column {column!r} holds text; write the value in quotes, e.g. "
                    f'{column} = "{value}"',
                    pos,
                    length,
                )
            return value
        if kind == BOOL:
            if not isinstance(value, bool):
                raise FilterError(
                    f"column {column!r} is true or false; compare it with true or false",
                    pos,
                    length,
                )
            return value
        raise AssertionError(kind)

    def compare(self, node: Compare) -> str:
        left, right, op = node.left, node.right, node.op
        if isinstance(left, Lit) and isinstance(right, Col):
            left, right, op = right, left, FLIPPED[op]
        if isinstance(left, Lit):
            raise FilterError(
                "compare a column with a value or another column, not two values",
                node.token.position,
                node.token.length,
            )
        lsql, lkind = self.column(left)
        if isinstance(right, Col):
            rsql, rkind = self.column(right)
            numeric = {NUMBER, CLASS}
            if not (lkind == rkind or (lkind in numeric and rkind in numeric)):
                raise FilterError(
                    f"cannot compare {left.name!r} ({lkind}) with {right.name!r} ({rkind})",
                    node.token.position,
                    node.token.length,
                )
            return f"({lsql} {op} {rsql})"
        if right.value is None:
            if op == "=":
                return f"({lsql} IS NULL)"
            if op == "<>":
                return f"({lsql} IS NOT NULL)"
            raise FilterError(
                "null can only be compared with = or !=", node.token.position, node.token.length
            )
        if lkind == BOOL and op not in ("=", "<>"):
            raise FilterError(
                f"column {left.name!r} is true or false: use = or !=",
                node.token.position,
                node.token.length,
            )
        value = self.value_for(lkind, right, left.name)
        return f"({lsql} {op} {self.bind(value)})"

    def in_list(self, node: InList) -> str:
        if not isinstance(node.operand, Col):
            raise FilterError(
                "the left side of in (...) must be a column", node.token.position, node.token.length
            )
        sql, kind = self.column(node.operand)
        values = []
        for lit in node.values:
            if lit.value is None:
                raise FilterError(
                    "null cannot be in an in (...) list; use column = null",
                    lit.token.position,
                    lit.token.length,
                )
            values.append(self.bind(self.value_for(kind, lit, node.operand.name)))
        word = "NOT IN" if node.negated else "IN"
        return f"({sql} {word} ({', '.join(values)}))"

    def truth(self, node: Truth) -> str:
        operand = node.operand
        if isinstance(operand, Lit):
            raise FilterError(
                "a value alone is not a condition; compare a column with it, e.g. label = "
                + (repr(operand.value) if isinstance(operand.value, str) else str(operand.value)),
                operand.token.position,
                operand.length or operand.token.length,
            )
        sql, kind = self.column(operand)
        if kind != BOOL:
            raise FilterError(
                f"column {operand.name!r} is not true/false; compare it with something, e.g. "
                f"{operand.name} = …",
                operand.token.position,
                operand.token.length,
            )
        return f"({sql})"


def compile_filter(text: str, schema: Schema) -> CompiledFilter:
    """Parse ``text`` and compile it against ``schema``; FilterError if anything is wrong."""
    tree = parse(text)
    compiler = _Compiler(schema)
    sql = compiler.node(tree)
    return CompiledFilter(sql, compiler.params, compiler.columns)
