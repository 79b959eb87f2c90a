from refloop.data import JsonlWriter, read_records


def test_torn_last_line_is_dropped_and_resume_skips_done(tmp_path):
    path = tmp_path / "out.jsonl"
    with JsonlWriter(path) as w:
        w.write_many([{"id": "a", "v": 1}, {"id": "b", "v": 2}])
    with open(path, "a") as f:
        f.write('{"id": "c", "v"')  # killed mid-write
    assert [r["id"] for r in read_records(path)] == ["a", "b"]
    with JsonlWriter(path) as w:
        assert w.done == {"a", "b"}
        w.write_many([{"id": "c", "v": 3}])
    assert [r["id"] for r in read_records(path)] == ["a", "b", "c"]


def test_no_resume_starts_over(tmp_path):
    path = tmp_path / "out.jsonl"
    with JsonlWriter(path) as w:
        w.write_many([{"id": "a"}])
    with JsonlWriter(path, resume=False) as w:
        assert w.done == set()
        w.write_many([{"id": "z"}])
    assert [r["id"] for r in read_records(path)] == ["z"]
