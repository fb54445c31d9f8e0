"""Data sources: each kind on files the test writes, stdlib text, validation, missing paths."""

import gzip
import json
import subprocess
import sys

import pytest

from data_recipes.sources import SOURCE_KINDS, build_source, iter_documents, missing_paths


def test_text_files_recursive_sorted_and_pattern(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("second file\n")
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "b" / "skip.md").write_text("not a txt")
    (tmp_path / "empty.txt").write_text("  \n\n")  # whitespace only: not a document
    docs = list(iter_documents({"kind": "text", "paths": [str(tmp_path)]}))
    assert docs == ["first file", "second file\n"]
    md = list(iter_documents({"kind": "text", "paths": [str(tmp_path)], "pattern": "*.md"}))
    assert md == ["not a txt"]
    # a file named directly is read whatever the pattern
    assert list(iter_documents({"kind": "text", "paths": [str(tmp_path / "b" / "skip.md")]})) \
        == ["not a txt"]


def test_text_paragraph_split_and_max_docs(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("para one\nline two\n\n\npara two\n  \npara three\n")
    src = {"kind": "text", "paths": [str(f)], "split": "paragraph"}
    assert list(iter_documents(src)) == ["para one\nline two", "para two", "para three"]
    assert list(iter_documents({**src, "max_docs": 2})) == ["para one\nline two", "para two"]


def test_jsonl_field_gz_and_bad_field(tmp_path):
    rows = [{"text": "doc é 1", "id": 1}, {"text": "doc 2"}, {"text": ""}, {"body": "b"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "zipped"}) + "\n")
    assert list(iter_documents({"kind": "jsonl", "paths": [str(tmp_path)]})) == \
        ["doc é 1", "doc 2", "zipped"]
    (tmp_path / "c.jsonl").write_text(json.dumps(rows[3]) + "\n")
    with pytest.raises(ValueError, match=r"c.jsonl:1: no field 'text'"):
        list(iter_documents({"kind": "jsonl", "paths": [str(tmp_path / "c.jsonl")]}))
    assert list(iter_documents({"kind": "jsonl", "paths": [str(tmp_path / "c.jsonl")],
                                "field": "body"})) == ["b"]


def test_parquet_streams_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i}" for i in range(2500)]
    pq.write_table(pa.table({"content": texts, "n": list(range(2500))}), tmp_path / "x.parquet",
                   row_group_size=700)
    assert pq.ParquetFile(tmp_path / "x.parquet").num_row_groups == 4
    src = {"kind": "parquet", "paths": [str(tmp_path)], "column": "content"}
    assert list(iter_documents(src)) == texts
    with pytest.raises(ValueError, match="no column 'text'"):
        list(iter_documents({"kind": "parquet", "paths": [str(tmp_path)]}))


def test_hf_streaming_offline_local_json(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rows = [{"text": f"hf doc {i}", "other": i} for i in range(5)]
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # a builder name with local data_files ...
    docs = list(iter_documents({"kind": "hf", "name": "json", "data_files": [str(data)]}))
    assert docs == [r["text"] for r in rows]
    # ... and a local dataset directory, through the same load_dataset(streaming=True) call
    docs = list(iter_documents({"kind": "hf", "name": str(data.parent), "max_docs": 3}))
    assert docs == [r["text"] for r in rows[:3]]


def test_stdlib_code_and_docstrings_deterministic():
    code = list(iter_documents({"kind": "stdlib", "part": "code", "max_docs": 20}))
    assert len(code) == 20 and all(d.strip() for d in code)
    assert any("def " in d or "import " in d for d in code)
    assert code == list(iter_documents({"kind": "stdlib", "part": "code", "max_docs": 20}))
    docs = list(iter_documents({"kind": "stdlib", "part": "docstrings", "max_docs": 50}))
    assert len(docs) == 50 and all(d.strip() for d in docs)
    assert docs == list(iter_documents({"kind": "stdlib", "part": "docstrings", "max_docs": 50}))
    # docstrings are prose taken out of the code, not the code itself
    assert sum("def " in d for d in docs) < sum("def " in d for d in code)


def test_stdlib_skips_tests_and_site_packages():
    from data_recipes.sources import stdlib_files

    files = list(stdlib_files())
    assert len(files) > 100 and files == list(stdlib_files())
    assert any(f.name == "json" or f.parent.name == "json" for f in files)  # packages included
    parts = {part for f in files for part in f.parts}
    assert not parts & {"site-packages", "test", "tests", "__pycache__"}


def test_module_docstrings_extracts_all_levels():
    from data_recipes.sources import module_docstrings

    code = '"""Mod."""\nclass A:\n    """Cls."""\n    def f(self):\n        """Meth."""\n' \
           'async def g():\n    """Async."""\ndef h():\n    return 1\n'
    assert module_docstrings(code) == ["Mod.", "Cls.", "Meth.", "Async."]


def test_arithmetic_source():
    src = {"kind": "arithmetic", "num_docs": 30, "seed": 5, "max_digits": 3}
    docs = list(iter_documents(src))
    assert len(docs) == 30 and all(d.startswith("Question: ") for d in docs)
    assert docs == list(iter_documents(src))


def test_recall_source_lists_pairs_then_asks_them():
    src = {"kind": "recall", "num_docs": 20, "seed": 3, "pairs": 4, "queries": 6}
    docs = list(iter_documents(src))
    assert len(docs) == 20 and docs == list(iter_documents(src))
    for doc in docs:
        head, asked = doc.removeprefix("recall: ").split(" ; ")
        listing = dict(p.split("=") for p in head.split())
        answers = [p.split("=") for p in asked.split()]
        assert len(listing) == 4 and len(answers) == 6
        assert all(listing[k] == v for k, v in answers)  # each asked key's own value
    with pytest.raises(ValueError, match=r"^pairs: must be 1 to 26 \(distinct letters\), got 27$"):
        build_source({**src, "pairs": 27})


def test_validation_errors_name_the_key():
    with pytest.raises(ValueError, match="unknown source kind 'csv'"):
        list(iter_documents({"kind": "csv"}))
    with pytest.raises(ValueError, match="unknown option.*colum"):
        build_source({"kind": "parquet", "paths": ["x"], "colum": "t"})
    with pytest.raises(ValueError, match="split: must be one of"):
        build_source({"kind": "text", "paths": ["x"], "split": "line"})
    with pytest.raises(ValueError, match="part: must be one of"):
        build_source({"kind": "stdlib", "part": "tests"})
    with pytest.raises(ValueError, match="paths: required"):
        build_source({"kind": "jsonl"})
    with pytest.raises(ValueError, match="paths: must be a list"):
        build_source({"kind": "jsonl", "paths": "a.jsonl"})
    with pytest.raises(ValueError, match="name: required"):
        build_source({"kind": "hf"})
    for kind, cls in SOURCE_KINDS.items():
        assert cls.__dataclass_fields__["kind"].default == kind
        assert cls.__dataclass_fields__["quality"].default == "general"
        assert cls.__dataclass_fields__["max_docs"].default is None


def test_missing_paths(tmp_path):
    (tmp_path / "here.txt").write_text("x")
    src = {"kind": "text", "paths": [str(tmp_path / "here.txt"), str(tmp_path / "gone"),
                                     str(tmp_path)]}
    assert missing_paths(src) == [str(tmp_path / "gone")]
    assert missing_paths({"kind": "stdlib"}) == []
    with pytest.raises(FileNotFoundError, match="gone"):
        list(iter_documents(src))


def test_import_is_torch_free():
    code = ("import sys, data_recipes.sources; "
            "bad = [m for m in ('torch', 'megatron', 'datasets', 'pyarrow', 'ray') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
