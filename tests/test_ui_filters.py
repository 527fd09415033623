"""The table viewer's filter language: tokenizer, parser, compiler to parameterised DuckDB SQL.

Checked three ways: exact SQL and parameters for the documented examples; errors with the
position of the offending token; and, with Hypothesis, that random filters evaluated by DuckDB
select exactly the rows a direct Python evaluation selects, and that no value from the text
ever reaches the SQL string.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.ui.filters import (
    BOOL,
    CLASS,
    MAX_DEPTH,
    MAX_IN_VALUES,
    MAX_LENGTH,
    NUMBER,
    OTHER,
    TEXT,
    FilterError,
    Schema,
    compile_filter,
    kind_of_duckdb_type,
    parse,
    quote_ident,
    tokenize,
)

CLASSES = ["T-shirt", "Shirt", "Sneaker"]
SCHEMA = Schema(
    {
        "id": TEXT,
        "label": CLASS,
        "pred": CLASS,
        "score": NUMBER,
        "width": NUMBER,
        "correct": BOOL,
        "scores": OTHER,
        "my col": NUMBER,
        'we"ird': TEXT,
    },
    CLASSES,
)


def compiled(text: str) -> tuple[str, list]:
    c = compile_filter(text, SCHEMA)
    return c.sql, c.params


# -- the documented examples -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "sql", "params"),
    [
        ('label = "Shirt" and pred != label', '(("label" = ?) AND ("pred" <> "label"))', [1]),
        ("score < 0.5", '("score" < ?)', [0.5]),
        ('id in ("a", "b")', '("id" IN (?, ?))', ["a", "b"]),
        ('id not in ("a")', '("id" NOT IN (?))', ["a"]),
        ("0.5 > score", '("score" < ?)', [0.5]),  # a value on the left is flipped
        ("score >= -1e3", '("score" >= ?)', [-1000.0]),
        ("width == 28", '("width" = ?)', [28]),
        ("width <> 28", '("width" <> ?)', [28]),
        ("correct", '("correct")', []),
        ("not correct", '(NOT ("correct"))', []),
        ("correct = false", '("correct" = ?)', [False]),
        ("id = null", '("id" IS NULL)', []),
        ("id != null", '("id" IS NOT NULL)', []),
        ("label = 2", '("label" = ?)', [2]),  # a class index works too
        ('label in ("Shirt", "Sneaker")', '("label" IN (?, ?))', [1, 2]),
        ("`my col` > 1", '("my col" > ?)', [1]),
        ('`we"ird` = "x"', '("we""ird" = ?)', ["x"]),
        ("id = 'single'", '("id" = ?)', ["single"]),
        (r'id = "say \"hi\""', '("id" = ?)', ['say "hi"']),
    ],
)
def test_examples(text: str, sql: str, params: list) -> None:
    assert compiled(text) == (sql, params)


def test_precedence_and_parentheses() -> None:
    sql, params = compiled("score < 1 or score > 2 and not correct")
    assert sql == '(("score" < ?) OR (("score" > ?) AND (NOT ("correct"))))'
    assert params == [1, 2]
    sql, _ = compiled("(score < 1 or score > 2) and not correct")
    assert sql == '((("score" < ?) OR ("score" > ?)) AND (NOT ("correct")))'
    sql, _ = compiled("not not (correct)")
    assert sql == '(NOT (NOT ("correct")))'


def test_keywords_are_case_insensitive() -> None:
    assert compiled('id IN ("a") AND NOT correct Or score < 1') == (
        '((("id" IN (?)) AND (NOT ("correct"))) OR ("score" < ?))',
        ["a", 1],
    )


# -- errors, with where they are ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message", "position"),
    [
        ("1; DROP TABLE runs", "unexpected ';'", 1),
        ('label = "x"); DROP TABLE runs; --', "unexpected ';'", 12),
        ("", "empty", 0),
        ("   ", "empty", 0),
        ("nope = 1", "unknown column 'nope'", 0),
        ("Score < 1", "did you mean score", 0),
        ('label = "Dress"', "'Dress' is not a class", 8),
        ('score < "a"', "holds numbers", 8),
        ("id = 3", "holds text", 5),
        ("correct = 1", "true or false", 10),
        ("correct < true", "use = or !=", 8),
        ("scores = 1", "cannot be compared", 0),
        ("score < 1 and", "expected a column name or a value", 13),
        ("(score < 1", "never closed", 0),
        ("score < 1)", "unbalanced ')'", 9),
        ("score < 1 score", "expected and / or", 10),
        ('"a" = "b"', "not two values", 4),
        ("id", "not true/false", 0),
        ("3", "a value alone", 0),
        ('id = "open', 'no closing "', 5),
        ("id = `x", "no closing `", 5),
        ("score ! 1", "unexpected '!'", 6),
        ("score < 1 & correct", "unexpected character '&'", 10),
        ("score < 12abc", "neither a number nor a column", 8),
        ("id in 'a'", "expected '('", 6),
        ("id in ('a' 'b')", "expected ',' or ')'", 11),
        ("id in (score)", "expected a value", 7),
        ("id < null", "null can only be compared", 3),
        ("id in (null)", "null cannot be in", 7),
        ("score < label", None, None),  # numbers and classes compare: no error
        ("id = label", "cannot compare 'id' (text) with 'label' (class)", 3),
        ("- score", "expected a number after '-'", 2),
        ("score = -", "expected a number after '-'", 9),
        ("``", "empty column name", 0),
    ],
)
def test_errors_say_what_and_where(text: str, message: str | None, position: int | None) -> None:
    if message is None:
        compile_filter(text, SCHEMA)
        return
    with pytest.raises(FilterError) as info:
        compile_filter(text, SCHEMA)
    assert message in info.value.message, info.value.message
    assert info.value.position == position, (info.value.position, info.value.message)
    assert f"at character {position + 1}" in str(info.value)


def test_limits() -> None:
    with pytest.raises(FilterError, match="longer than"):
        compile_filter("score < 1 or " * 1000 + "correct", SCHEMA)
    with pytest.raises(FilterError, match="nests deeper"):
        compile_filter("(" * (MAX_DEPTH + 1) + "correct" + ")" * (MAX_DEPTH + 1), SCHEMA)
    with pytest.raises(FilterError, match="nests deeper"):
        compile_filter("not " * (MAX_DEPTH + 1) + "correct", SCHEMA)
    values = ", ".join(str(i) for i in range(MAX_IN_VALUES + 1))
    with pytest.raises(FilterError, match="at most"):
        compile_filter(f"width in ({values})", Schema({"width": NUMBER}))
    assert len(compile_filter("x", Schema({"x": BOOL})).sql) < 10
    assert MAX_LENGTH >= 1000


def test_tokens_and_tree() -> None:
    kinds = [t.kind for t in tokenize('a.b/c >= -1.5e-3 and `x y` in ("s", 2)')]
    assert kinds == ["name", "op", "-", "number", "kw", "name", "kw", "(", "string", ",",
                     "number", ")", "end"]  # fmt: skip
    tree = parse("a or b and c")
    assert type(tree).__name__ == "BoolOp" and tree.op == "OR"


def test_identifiers_are_always_quoted() -> None:
    assert quote_ident("label") == '"label"'
    assert quote_ident('a"; DROP TABLE x; --') == '"a""; DROP TABLE x; --"'
    with pytest.raises(ValueError):
        quote_ident("a\0b")


@pytest.mark.parametrize(
    ("type_name", "kind"),
    [
        ("INTEGER", NUMBER),
        ("BIGINT", NUMBER),
        ("UTINYINT", NUMBER),
        ("HUGEINT", NUMBER),
        ("DOUBLE", NUMBER),
        ("FLOAT", NUMBER),
        ("DECIMAL(18,3)", NUMBER),
        ("VARCHAR", TEXT),
        ("BOOLEAN", BOOL),
        ("FLOAT[]", OTHER),
        ("FLOAT[10]", OTHER),
        ("STRUCT(digest VARCHAR, id VARCHAR)", OTHER),
        ("TIMESTAMP", OTHER),
        ("BLOB", OTHER),
    ],
)
def test_duckdb_types(type_name: str, kind: str) -> None:
    assert kind_of_duckdb_type(type_name) == kind


# -- against DuckDB ----------------------------------------------------------------------------


ROWS = [
    {
        "id": f"s{i}",
        "label": i % 3,
        "pred": (i * 7) % 3,
        "score": (i * 37 % 100) / 100,
        "width": 20 + i % 5,
        "correct": i % 3 == (i * 7) % 3,
    }
    for i in range(60)
]
DB_SCHEMA = Schema(
    {"id": TEXT, "label": CLASS, "pred": CLASS, "score": NUMBER, "width": NUMBER, "correct": BOOL},
    CLASSES,
)


@pytest.fixture(scope="module")
def db():
    con = duckdb.connect()
    con.register("rows_src", pa.Table.from_pylist(ROWS))
    con.execute("CREATE TABLE t AS SELECT * FROM rows_src")
    yield con
    con.close()


def select(con: duckdb.DuckDBPyConnection, text: str) -> list[str]:
    c = compile_filter(text, DB_SCHEMA)
    return [
        r[0]
        for r in con.execute(f"SELECT id FROM t WHERE {c.sql} ORDER BY rowid", c.params).fetchall()
    ]


def test_class_names_select_by_index(db: duckdb.DuckDBPyConnection) -> None:
    assert select(db, 'label = "Shirt" and pred != label') == [
        r["id"] for r in ROWS if r["label"] == 1 and r["pred"] != 1
    ]
    assert select(db, 'pred in ("T-shirt", "Sneaker") and score < 0.5') == [
        r["id"] for r in ROWS if r["pred"] in (0, 2) and r["score"] < 0.5
    ]


def test_injection_is_data(db: duckdb.DuckDBPyConnection) -> None:
    payload = "x'); DROP TABLE t; --"
    assert select(db, f'id = "{payload}"') == []
    assert select(db, f"id != '{payload.replace(chr(39), '')}'") == [r["id"] for r in ROWS]
    assert db.execute("SELECT count(*) FROM t").fetchone()[0] == len(ROWS)


# random filters: render a tree to text, compile it, and compare DuckDB with Python

COLUMNS = {"id": TEXT, "label": CLASS, "pred": CLASS, "score": NUMBER, "width": NUMBER}
OPS = {"=": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
       "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}  # fmt: skip


def literal(kind: str) -> st.SearchStrategy:
    if kind == TEXT:
        return st.sampled_from([f"s{i}" for i in range(0, 70, 3)] + ["", "s", "zz"]).map(
            lambda v: (f'"{v}"', v)
        )
    if kind == CLASS:
        return st.one_of(
            st.sampled_from(CLASSES).map(lambda c: (f'"{c}"', CLASSES.index(c))),
            st.integers(0, 3).map(lambda i: (str(i), i)),
        )
    return st.one_of(
        st.integers(-2, 30).map(lambda i: (str(i), i)),
        st.sampled_from([0.25, 0.5, 0.99]).map(lambda f: (repr(f), f)),
    )


@st.composite
def comparison(draw: st.DrawFn) -> tuple[str, object]:
    column = draw(st.sampled_from(sorted(COLUMNS)))
    kind = COLUMNS[column]
    if draw(st.booleans()) and kind != TEXT:
        values = draw(st.lists(literal(kind), min_size=1, max_size=4))
        negated = draw(st.booleans())
        text = f"{column} {'not in' if negated else 'in'} ({', '.join(v[0] for v in values)})"
        wanted = {v[1] for v in values}
        return text, lambda r: (r[column] in wanted) != negated
    op = draw(st.sampled_from(sorted(OPS)))
    if kind in (CLASS, NUMBER) and draw(st.booleans()):
        other = draw(st.sampled_from([c for c, k in COLUMNS.items() if k in (CLASS, NUMBER)]))
        return f"{column} {op} {other}", lambda r: OPS[op](r[column], r[other])
    text, value = draw(literal(kind))
    return f"{column} {op} {text}", lambda r: OPS[op](r[column], value)


def expression(depth: int = 3) -> st.SearchStrategy:
    leaf = st.one_of(
        comparison(),
        st.just(("correct", lambda r: r["correct"])),
    )
    if depth == 0:
        return leaf

    @st.composite
    def combined(draw: st.DrawFn) -> tuple[str, object]:
        kind = draw(st.sampled_from(["and", "or", "not", "paren", "leaf"]))
        if kind == "leaf":
            return draw(leaf)
        a_text, a = draw(expression(depth - 1))
        if kind == "not":
            return f"not ({a_text})", lambda r: not a(r)
        if kind == "paren":
            return f"({a_text})", a
        b_text, b = draw(expression(depth - 1))
        if kind == "and":
            return f"({a_text}) and ({b_text})", lambda r: a(r) and b(r)
        return f"({a_text}) or ({b_text})", lambda r: a(r) or b(r)

    return combined()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(expression())
def test_random_filters_select_what_python_selects(
    db: duckdb.DuckDBPyConnection, case: tuple
) -> None:
    text, predicate = case
    assert select(db, text) == [r["id"] for r in ROWS if predicate(r)], text


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(alphabet="abcdelrsiotnp _=!<>()\"',.-0123456789;`*/\\", max_size=60))
def test_any_text_compiles_to_runnable_sql_or_a_filter_error(
    db: duckdb.DuckDBPyConnection, text: str
) -> None:
    try:
        c = compile_filter(text, DB_SCHEMA)
    except FilterError as e:
        assert 0 <= e.position <= len(text)
        return
    # every literal is a parameter: the SQL holds only quoted names, operators and ?
    stripped = c.sql
    for name in DB_SCHEMA.columns:
        stripped = stripped.replace(quote_ident(name), "")
    assert set(stripped) <= set("()?<>=!, ANDORTISNUL"), c.sql
    db.execute(f"SELECT count(*) FROM t WHERE {c.sql}", c.params).fetchone()


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_string_values_never_reach_the_sql(value: str) -> None:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    c = compile_filter(f'id = "{escaped}"', DB_SCHEMA)
    assert c.sql == '("id" = ?)' and c.params == [value]
