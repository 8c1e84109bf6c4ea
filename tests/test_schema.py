"""The one mechanism that checks every JSON file minilora reads (minilora.schema)."""

import json

import pytest

from minilora.schema import Field, FileCheckError, Schema, parse_json, read_json

INNER = Schema("inner thing", {"step": Field("int", least=0)})
THING = Schema("thing", {
    "rank": Field("int", least=1),
    "alpha": Field("number", above=0),
    "name": Field("str", choices=("a", "b")),
    "names": Field("list", items=Field("str"), min_items=2, required=False, nullable=True),
    "inner": Field("dict", schema=INNER),
}, relations=(lambda d: ("rank", f"expected at most alpha ({d['alpha']:g}), found {d['rank']}")
              if d["rank"] > d["alpha"] else None,),
    defaults={"names": None})
GOOD = {"rank": 2, "alpha": 4.0, "name": "a", "inner": {"step": 3}}


def test_a_good_file_is_returned_with_the_defaults_of_absent_keys(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(GOOD))
    assert read_json(path, THING) == {**GOOD, "names": None}


@pytest.mark.parametrize("change, message", [
    ({"rank": 2.7}, "rank: expected an integer >= 1, found 2.7"),
    ({"rank": True}, "rank: expected an integer >= 1, found true"),
    ({"rank": "2"}, 'rank: expected an integer >= 1, found "2"'),
    ({"rank": 0}, "rank: expected an integer >= 1, found 0"),
    ({"rank": None}, "rank: expected an integer >= 1, found null"),
    ({"alpha": 0}, "alpha: expected a finite number > 0, found 0"),
    ({"alpha": float("inf")}, "alpha: expected a finite number > 0, found inf"),
    ({"name": "c"}, 'name: expected one of "a", "b", found "c"'),
    ({"names": "ab"}, 'names: expected a list of a string (at least 2) or null, found "ab"'),
    ({"names": ["a"]}, "names: expected a list of a string (at least 2) or null, found 1 item(s)"),
    ({"names": ["a", 3]}, "names[1]: expected a string, found 3"),
    ({"inner": []}, "inner: expected an object, found []"),
    ({"inner": {"step": -1}}, "inner.step: expected an integer >= 0, found -1"),
    ({"inner": {"step": 1, "x": 0}}, "inner.x: not a key of a inner thing"),
    ({"extra": 1}, "extra: not a key of a thing"),
    ({"rank": 5}, "rank: expected at most alpha (4), found 5"),
])
def test_each_problem_is_one_line_naming_the_file_and_the_key(change, message):
    with pytest.raises(FileCheckError) as e:
        THING.check({**GOOD, **change}, "t.json")
    assert str(e.value).startswith(f"t.json: {message}") and "\n" not in str(e.value)


def test_a_missing_key_names_what_was_expected():
    with pytest.raises(FileCheckError, match=r"^t.json: rank: missing \(expected an integer >= 1\)$"):
        THING.check({k: v for k, v in GOOD.items() if k != "rank"}, "t.json")


def test_not_an_object_and_not_json_are_refused(tmp_path):
    with pytest.raises(FileCheckError, match=r"t.json: the file: expected an object \(thing\), found \[1\]"):
        THING.check([1], "t.json")
    with pytest.raises(FileCheckError, match="t.json is not valid JSON"):
        parse_json("{", "t.json")
    for text, found in (('{"alpha": NaN}', "nan"), ('{"alpha": Infinity}', "inf"), ('{"alpha": 1e999}', "inf")):
        with pytest.raises(FileCheckError, match=f"^t.json: alpha: expected a finite number > 0, found {found}$"):
            THING.check({**GOOD, **parse_json(text, "t.json")}, "t.json")
    path = tmp_path / "bin.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(FileCheckError, match="bin.json is not UTF-8 text"):
        read_json(path, THING)


def test_other_tools_keys_are_ignored_where_the_schema_says_so():
    open_schema = Schema("config", {"n": Field("int")}, extra="ignore")
    assert open_schema.check({"n": 1, "torch_dtype": "float32"}, "c.json")["n"] == 1
