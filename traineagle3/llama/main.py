"""Train an EAGLE-3 draft for a frozen Llama-family target.

    cd traineagle3/llama && deepspeed main.py --deepspeed_config ds_config.json
    DS_ACCELERATOR=cpu deepspeed --num_gpus 1 main.py --deepspeed_config ds_config_cpu.json

Every rank holds the frozen target as a plain module; DeepSpeed (ZeRO) owns only the
draft.  With --feature_cache the ranks first run the target once over the data into an
offline cache (or find it complete), then train from it with only the target's token
embedding and output head in memory.  Flags override the fields of --config (see --help).
The pieces are in traineagle3/train.py; its Run puts them together.
"""

from __future__ import annotations

from traineagle3.cli import cli
from traineagle3.train import Run, training_parser


@cli
def main(argv=None) -> None:
    run, (train_idx,) = Run.prepare(training_parser(__doc__).parse_args(argv))
    run.train(run.features(), train_idx, run.cfg.output_dir)


if __name__ == "__main__":
    main()
