"""Healing: LoRA / QLoRA adapters that recover what pruning costs, as precomputed profiles.

- :mod:`casrap.profiles.adapter`: the adapter on disk and the one function that merges it
  into a profile's own module copies (the bank calls it);
- :mod:`casrap.heal.data`: healing text (calibration text + the full model's own answers
  to training prompts), disjoint from every evaluation text;
- :mod:`casrap.heal.train`: distillation from the full model on a standalone copy;
- :mod:`casrap.heal.runner`: one call that heals a profile and writes its plan;
- :mod:`casrap.heal.evaluate`: perplexity / KL before and after, on test prose;
- :mod:`casrap.heal.task`: tuning on the safety task's train split, AUROC on its test split.

This package's ``__init__`` imports nothing heavy: the bank imports the adapter module.
"""
