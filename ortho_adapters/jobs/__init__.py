"""The jobs behind the ``ortho-adapters`` command.

- :mod:`.finetune`: ``ortho-adapters finetune`` (dispatch, arms, results files)
- :mod:`.args`: its arguments and per-model defaults
- :mod:`.methods`: the adapter methods (configs, tuned rank / learning rate)
- :mod:`.encoder`: MiniLM + mean-pooling classifier on Rotten Tomatoes
- :mod:`.causal_lm`: SmolLM2-135M on Rotten Tomatoes and the tasks of ``ortho_adapters.tasks``
  (Trainer, 4-bit, checkpointing)
- :mod:`.lm_tasks`: those tasks as chat prompts; :mod:`.scoring`: answer-only labels, option
  log-likelihoods, generation exact match
- :mod:`.report`: result rows, tables, results files, peak memory
"""
