"""Splits, import of external K&K data, export in veRL's schema, the data CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, SHARED_KK
from train.data import (DataError, build, generate_split, import_file, load_split, parse_people,
                        read_puzzles, to_rl_row)
from train.kk import PuzzleGenerator


def test_splits_are_disjoint_by_content_and_deterministic():
    a = generate_split(4, n_train=120, n_test=30, seed=3)
    b = generate_split(4, n_train=120, n_test=30, seed=3)
    assert [p.id for p in a["train"]] == [p.id for p in b["train"]]
    train_keys = {p.content_key for p in a["train"]}
    test_keys = {p.content_key for p in a["test"]}
    assert len(train_keys) == 120 and len(test_keys) == 30 and not train_keys & test_keys
    # The test set does not depend on the train size.
    c = generate_split(4, n_train=10, n_test=30, seed=3)
    assert [p.id for p in c["test"]] == [p.id for p in a["test"]]


def test_build_writes_parquet_summary_and_loads_with_datasets(tmp_path):
    from datasets import load_dataset

    s = build(tmp_path / "kk", [3, 5], n_train=20, n_test=5, seed=0, progress=False)
    assert s.counts == {3: {"test": 5, "train": 20}, 5: {"test": 5, "train": 20}}
    summary = json.loads((tmp_path / "kk" / "summary.json").read_text())
    assert summary["counts"]["5"]["train"] == 20 and sum(summary["statement_types"].values()) > 0
    ds = load_dataset("parquet", data_files=str(tmp_path / "kk" / "3ppl" / "train.parquet"), split="train")
    row = ds[0]
    assert row["data_source"] == "kk_logic" and row["ability"] == "logic"
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["reward_model"]["style"] == "rule"
    assert row["reward_model"]["ground_truth"]["solution_text_format"].startswith("(1) ")
    # Across sizes and splits nothing repeats.
    everything = load_split(tmp_path / "kk", [3, 5], "train") + load_split(tmp_path / "kk", [3, 5], "test")
    assert len({p.content_key for p in everything}) == len(everything) == 50


def test_raw_prompt_style_prefills_think(tmp_path):
    p = PuzzleGenerator(0).generate(3)
    row = to_rl_row(p, 0, "raw")
    assert row["prompt"][0]["content"].endswith("<|im_start|>assistant\n<think>")
    assert row["extra_info"]["prefilled_think"] is True


def test_import_reference_parquet_roundtrip(tmp_path):
    out = import_file(SHARED_KK / "4ppl" / "test.parquet", tmp_path / "ref")
    ours = read_puzzles(out / "4ppl" / "test.parquet")
    ref = read_puzzles(SHARED_KK / "4ppl" / "test.parquet")
    assert len(ours) == 100 and [p.solution for p in ours] == [p.solution for p in ref]
    assert [p.quiz for p in ours] == [p.quiz for p in ref]


def test_import_kk_jsonl_layout(tmp_path):
    # The original K&K release: one JSON object per line with quiz, names, solution, statements.
    ref = read_puzzles(SHARED_KK / "3ppl" / "test.parquet")[:5]
    path = tmp_path / "people3_num5.jsonl"
    path.write_text("\n".join(json.dumps({"quiz": p.quiz, "names": list(p.names), "solution": list(p.solution),
                                          "statements": repr(p.statements)}) for p in ref) + "\n")
    got = read_puzzles(path)
    assert [p.solution for p in got] == [p.solution for p in ref]


@pytest.mark.parametrize("content,msg", [
    (None, "no such file"),
    (b"", "not a readable parquet"),
    (b"garbage", "not a readable parquet"),
])
def test_bad_parquet_files(tmp_path, content, msg):
    path = tmp_path / "x.parquet"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=msg):
        read_puzzles(path)


def test_wrong_schema_and_empty(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"a": 1}]), tmp_path / "w.parquet")
    with pytest.raises(DataError, match="lacks 'statements'"):
        read_puzzles(tmp_path / "w.parquet")
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("names", pa.list_(pa.string()))])), tmp_path / "e.parquet")
    with pytest.raises(DataError, match="empty"):
        read_puzzles(tmp_path / "e.parquet")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"names": ["A", "B"], "statements": "(('maybe', 0), ('lying', 0))"}) + "\n")
    with pytest.raises(DataError, match="row 0: unknown operator"):
        read_puzzles(bad)


def test_parse_people():
    assert parse_people("2-4,7") == [2, 3, 4, 7]
    with pytest.raises(DataError, match="outside the supported range"):
        parse_people("1-3")
    with pytest.raises(DataError, match="bad people spec"):
        parse_people("x")


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "train.data", *args], capture_output=True, text=True,
                          cwd=cwd or REPO)


def test_cli_build_and_bad_input_writes_nothing(tmp_path):
    r = _cli("build", "--out", str(tmp_path / "d"), "--people", "3", "--train", "5", "--test", "2")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "d" / "3ppl" / "train.parquet").exists()
    for args, msg in ((["build", "--out", str(tmp_path / "e"), "--people", "0-3"], "outside the supported range"),
                      (["build", "--out", str(tmp_path / "e"), "--people", "2", "--train", "900"], "distinct 2-person"),
                      (["import", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "e")], "no such file")):
        r = _cli(*args)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not any(p.is_file() for p in (tmp_path / "e").rglob("*")) if (tmp_path / "e").exists() else True


def test_a_fixed_cast_root_records_its_world_and_refuses_the_other(tmp_path):
    from train.data import ensure_built
    from train.kk import NAMES

    root = tmp_path / "d"
    ensure_built(root, [3], n_train=4, n_test=2, progress=False, fixed_cast=True)
    assert json.loads((root / "summary.json").read_text())["fixed_cast"] is True
    assert {p.names for p in load_split(root, [3], "train")} == {NAMES[:3]}
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.parquet")}
    with pytest.raises(DataError, match="built with fixed_cast=True"):
        ensure_built(root, [3, 4], n_train=4, n_test=2, progress=False, fixed_cast=False)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.parquet")} == before
    random_cast = generate_split(3, 4, 2)
    assert all(p.names != NAMES[:3] for p in random_cast["train"])
