"""A user's mistake -- a missing file, an invalid record, a bad flag value -- ends every command
with one line naming the file (and record) on stderr and exit status 2, never a traceback."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

import log_plot
from dataset import clean, download, regenerate
from traineagle3 import demo, evaluate, records

CHAT = {"id": "a", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}


def fails(main, argv, capsys) -> str:
    """main(argv) ends with exit status 2 and one line on stderr: that line."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def jsonl(path, *lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_a_missing_file_from_the_shell_is_one_line_and_status_2(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "dataset.clean", "--in", "missing.jsonl", "--out-dir", tmp_path],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 2 and r.stderr == "error: missing.jsonl: No such file or directory\n"


def test_clean(tmp_path, capsys):
    out = tmp_path / "out"
    assert "missing.jsonl: No such file" in fails(
        clean.main, ["--in", tmp_path / "missing.jsonl", "--out-dir", out], capsys
    )
    bad = jsonl(tmp_path / "bad.jsonl", CHAT, "{not json")
    assert f"{bad}: record 1 is not valid JSON" in fails(clean.main, ["--in", bad, "--out-dir", out], capsys)
    err = fails(clean.main, ["--in", bad, "--out-dir", out, "--test-fraction", "1.5"], capsys)
    assert "--test-fraction: 1.5: must be from 0 to 1" in err
    assert not out.exists()


def test_a_rerun_of_clean_replaces_its_output(tmp_path):
    src = jsonl(
        tmp_path / "in.jsonl",
        *(
            {"id": f"c{i}", "conversations": CHAT["conversations"][:1] + [{"from": "gpt", "value": f"Answer {i}."}]}
            for i in range(3)
        ),
    )
    clean.clean(src, tmp_path / "out", test_fraction=1.0)
    clean.clean(src, tmp_path / "out", test_fraction=0.0)
    assert (tmp_path / "out" / "test.jsonl").read_text() == ""


def test_download(tmp_path, capsys):
    out = jsonl(tmp_path / "raw.jsonl", CHAT)  # an earlier download's output: kept, not reported as rewritten
    assert "nope.json: no such file" in fails(download.main, [tmp_path / "nope.json", "--out", out], capsys)
    assert json.loads(out.read_text()) == CHAT
    bad = jsonl(tmp_path / "bad.jsonl", "{not json", {"conversations": []})
    err = fails(download.main, [bad, "--out", out], capsys)
    assert (
        f"{bad}: kept 0 records; skipped 1 (empty conversation; e.g. record 1); skipped 1 (invalid JSON; e.g. record 0)"
        in err
    )
    assert "--limit: 0: must be at least 1" in fails(download.main, [bad, "--out", out, "--limit", "0"], capsys)
    assert json.loads(out.read_text()) == CHAT


def test_regenerate(tmp_path, capsys):
    flags = ["--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--no-progress"]
    out = tmp_path / "regen.jsonl"
    assert "gone.jsonl: no such file" in fails(
        regenerate.main, flags + ["--in", tmp_path / "gone.jsonl", "--out", out], capsys
    )
    empty = jsonl(tmp_path / "empty.jsonl", {"messages": [{"role": "user", "content": "Hi?"}]})
    err = fails(regenerate.main, flags + ["--in", empty, "--out", out], capsys)
    assert f"{empty}: kept 0 records; skipped 1 (no assistant turn; e.g. record 0): no usable conversations" in err
    src = jsonl(tmp_path / "in.jsonl", CHAT)
    jsonl(out, CHAT, "[1, 2]", CHAT)  # a resumed output whose middle line is not a record
    assert f"{out}: record 1 is not a JSON object" in fails(
        regenerate.main, flags + ["--in", src, "--out", out], capsys
    )
    err = fails(regenerate.main, flags + ["--in", src, "--out", out, "--concurrency", "zero"], capsys)
    assert "--concurrency: invalid int value: 'zero'" in err


def test_evaluate(tmp_path, capsys):
    """Checked before any model loads: the prompts, then the draft folder."""
    flags = ["--target", "smollm2-135m-instruct", "--draft", tmp_path / "draft"]
    assert "q.jsonl: no such file" in fails(evaluate.main, flags + ["--prompts", tmp_path / "q.jsonl"], capsys)
    bad = jsonl(tmp_path / "bad.jsonl", "{oops", {"turns": []})
    assert records.read_prompts(str(bad)) == []
    assert capsys.readouterr().out.splitlines() == [
        f"{bad}: record 0 skipped (invalid JSON)",
        f"{bad}: record 1 skipped (turns must be non-empty strings)",
    ]
    assert f"{bad}: no usable prompts" in fails(evaluate.main, flags + ["--prompts", bad], capsys)
    good = jsonl(tmp_path / "q.jsonl", {"question_id": 1, "turns": ["Hi?"]})
    assert f"{tmp_path / 'draft'}: no draft here" in fails(evaluate.main, flags + ["--prompts", good], capsys)
    err = fails(evaluate.main, flags + ["--prompts", good, "--num-speculative-tokens", "0"], capsys)
    assert "--num-speculative-tokens: 0: must be at least 1" in err


def test_demo(tmp_path, capsys):
    (tmp_path / "recipe.json").write_text("{half")
    assert f"{tmp_path / 'recipe.json'}: not the JSON a demo wrote" in fails(demo.main, ["--out", tmp_path], capsys)
    assert "not allowed with argument" in fails(demo.main, ["--quick", "--full"], capsys)


def test_log_plot(tmp_path, capsys):
    assert "m.jsonl: no such metrics file" in fails(log_plot.main, [tmp_path / "m.jsonl"], capsys)
    bad = jsonl(tmp_path / "metrics.jsonl", {"step": 1, "split": "train"}, "nope")
    assert f"{bad}: line 2 is not a metrics record" in fails(log_plot.main, [bad], capsys)
    assert "--x: invalid choice: 'time'" in fails(log_plot.main, [bad, "--x", "time"], capsys)
