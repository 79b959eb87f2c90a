"""The one sharded pass (`refloop.data.shards`): batches numbered over all items, resume, and the
streaming merge of shards (torn lines, out-of-order shards, duplicates) into one process's file."""

import json
import logging
from dataclasses import dataclass

import pytest

from refloop.data.shards import ShardedRun, batch_ranges, merge, share
from refloop.errors import DataError


@dataclass
class Processes:
    """A PartialState stand-in: process `process_index` of `num_processes`, run one after another."""

    process_index: int = 0
    num_processes: int = 1

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def wait_for_everyone(self) -> None:
        pass


ITEMS = [f"item-{i}" for i in range(10)]


def record(item: str) -> dict:
    return {"id": item, "value": int(item.split("-")[1]) ** 2}


def run_all(out, state, items=ITEMS, stop_after: int | None = None) -> list[int]:
    """Run every pending batch of `state`'s share (stop early: a kill), returning the batch numbers run."""
    run = ShardedRun(out, items, lambda it: it, 3, state=state)
    numbers = []
    for batch in run.batches():
        if stop_after is not None and len(numbers) == stop_after:
            break
        numbers.append(batch.number)
        run.write(record(it) for it in batch.items)
    run.writer.close()
    return numbers


def test_batch_b_goes_to_process_b_mod_p_and_shares_cover_all_items():
    assert batch_ranges(10, 3, 0, 2) == [(0, range(0, 3)), (2, range(6, 9))]
    assert batch_ranges(10, 3, 1, 2) == [(1, range(3, 6)), (3, range(9, 10))]
    assert share(10, 3, 0, 2) + share(10, 3, 1, 2) == 10 and share(10, 3) == 10


def test_one_process_output_is_the_records_in_item_order(tmp_path):
    out = tmp_path / "samples.jsonl"
    run = ShardedRun(out, ITEMS, lambda it: it, 3, state=Processes())
    assert [b.number for b in run.batches()] == [0, 1, 2, 3]
    for batch in run.batches():
        run.write(record(it) for it in batch.items)
    assert run.finish() == 0
    assert out.read_text() == "".join(json.dumps(record(it)) + "\n" for it in ITEMS)
    assert not (tmp_path / "samples.shards").exists()
    assert [r["id"] for r in run.rows()] == ITEMS


def test_resumed_batches_keep_their_numbers_and_rerun_whole(tmp_path, caplog):
    """A kill after batch 0 and half of batch 1: the resumed run reruns batch 1 whole (same number,
    same items: the same seed) and appends only the missing records."""
    out = tmp_path / "samples.jsonl"
    assert run_all(out, Processes(), stop_after=1) == [0]
    shard = tmp_path / "samples.shards" / "000.jsonl"
    with open(shard, "a") as f:
        f.write(json.dumps(record("item-3")) + "\n" + '{"id": "item-4", "val')  # item-4 torn by the kill
    with caplog.at_level(logging.INFO, logger="refloop"):
        run = ShardedRun(out, ITEMS, lambda it: it, 3, state=Processes())
    assert [r.getMessage() for r in caplog.records] == [f"{out}: resuming after 4 of {len(ITEMS)} (an earlier run of the same command)"]
    batches = list(run.batches())
    assert [(b.number, b.items) for b in batches[:1]] == [(1, ["item-3", "item-4", "item-5"])]
    for batch in batches:
        run.write(record(it) for it in batch.items)
    run.finish()
    assert out.read_text() == "".join(json.dumps(record(it)) + "\n" for it in ITEMS)


def test_two_processes_and_a_resume_at_another_count_merge_into_the_one_process_file(tmp_path):
    one = tmp_path / "one" / "samples.jsonl"
    run_all(one, Processes())
    merge(one, one.with_name("samples.shards"), {it: i for i, it in enumerate(ITEMS)}, "id")
    two = tmp_path / "two" / "samples.jsonl"
    run_all(two, Processes(1, 2))  # process 1 finishes; process 0 is killed after its first batch
    run_all(two, Processes(0, 2), stop_after=1)
    assert run_all(two, Processes(0, 1)) == [2]  # resumed with one process: batches 0, 1 and 3 are done
    run = ShardedRun(two, ITEMS, lambda it: it, 3, state=Processes())
    assert list(run.batches()) == []
    run.finish()
    assert two.read_bytes() == one.read_bytes()


def test_merge_streams_out_of_order_shards_dropping_torn_lines_and_repeats(tmp_path):
    out, shards = tmp_path / "x.jsonl", tmp_path / "x.shards"
    shards.mkdir()
    lines = {it: json.dumps(record(it)) + "\n" for it in ITEMS}
    out.write_text(lines["item-1"])  # merged by an earlier run
    (shards / "000.jsonl").write_text(lines["item-9"] + lines["item-0"] + lines["item-1"] + '{"id": "item-2"')
    (shards / "001.jsonl").write_text(lines["item-5"] + '{"id": "other", "value": 0}\n' + lines["item-2"])
    merge(out, shards, {it: i for i, it in enumerate(ITEMS)}, "id")
    keys = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert keys == ["item-0", "item-1", "item-2", "item-5", "item-9", "other"]  # unknown keys follow, in file order
    assert out.read_text().startswith(lines["item-0"] + lines["item-1"] + lines["item-2"])
    assert not shards.exists()


def test_a_damaged_complete_line_in_a_shard_is_a_data_error_naming_it(tmp_path):
    shards = tmp_path / "x.shards"
    shards.mkdir()
    (shards / "001.jsonl").write_text(json.dumps(record("item-0")) + "\n{not json}\n")
    with pytest.raises(DataError, match=r"001\.jsonl.*line 2"):
        merge(tmp_path / "x.jsonl", shards, {"item-0": 0}, "id")


def test_images_that_do_not_decode_are_skipped_and_counted(tmp_path):
    def load(item):
        if item == "item-4":
            raise DataError("x", item, "cannot decode")
        return item

    run = ShardedRun(tmp_path / "s.jsonl", ITEMS, lambda it: it, 3, state=Processes())
    batches = list(run.batches(load, "skip"))
    assert batches[1].items == ["item-3", "item-5"] and batches[1].images == ["item-3", "item-5"]
    with pytest.raises(DataError):
        list(ShardedRun(tmp_path / "f.jsonl", ITEMS, lambda it: it, 3, state=Processes()).batches(load, "fail"))
    assert len(run.skipped) == 1
