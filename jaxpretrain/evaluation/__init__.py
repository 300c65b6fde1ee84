"""Evaluations run on a model's logits (hellaswag.py); `python -m jaxpretrain.eval` is their CLI."""
