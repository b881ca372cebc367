"""hotswap.train: from a recipe to a trained adapter or full fine-tune in the registry.

The modules follow the data:
  recipe.py    the TOML recipe, validated (pydantic) with `--set` overrides
  data.py      JSONL examples (prompt/completion or chat messages), refused with file and line
  encode.py    chat template, answer-only labels, right-padded batches
  model.py     base loading, target-module checks, LoRA/DoRA (PEFT) or every weight, saving
  trainer.py   the loop (AdamW, warm-up/decay, accumulation, clipping, held-out loss, early stopping)
  checkpoint.py  resumable state: trainable tensors, optimizer, scheduler, loop progress, RNGs
  evaluate.py  greedy generation on the held-out set, scored by metrics.py (langid.py for languages)
  run.py       one run end to end, with its records (metrics.json, lineage.json, history.json)
  publish.py   into the registry through `Registry.publish`, with metrics and lineage
  compare.py, report.py   LoRA vs full fine-tuning on one recipe, as Markdown and a PNG
  merge.py     weighted combination of adapters (PEFT add_weighted_adapter), incl. federated averaging
  scoring.py   held-out score of the base, a registry entry or an adapter folder
  cli.py       `hotswap train ...`

Importing this package loads neither torch nor transformers; the modules that need them do."""
