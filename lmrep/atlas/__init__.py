"""The atlas: the source's whole experiment in one command, with a verdict on each of its claims.

`python -m lmrep.atlas --preset {smoke,cpu,gpu} --out runs/atlas` runs:

- `preset`: the dataclasses `configs/atlas/*.yaml` map onto (prompts, protocols, sweeps, families, claims);
- `stages`: untrained sweeps and trained families, probed per protocol, skipping work already done;
- `training`: one family's training run through lmrep's CLI, on the preset's checkpoint schedule;
- `wandb_log`: a family's invertibility curves into its own W&B run;
- `table`: atlas.csv, every measured cell with its spread over prompts;
- `claims`: the rules that turn cells into verdicts;
- `figures`, `report`, `document`: the PNGs, and report.md / report.html;
- `cli`: the command line.
"""
